"""The `swarmfly` command: parse, configure, run one command, and say how it ended.

A package by job: ``parser`` (flags), ``startup`` (configuration and the loop),
``commands`` (the one-shot commands), ``terminal`` (what a command shows)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import orjson

from swarmfly.cli.commands import (
    _cache,
    _doctor,
    _get,
    _plugins,
    _preheat,
    _scheduler_partitions,
    _status,
)
from swarmfly.cli.parser import UsageError, build_parser
from swarmfly.cli.startup import (
    CLUSTER_COMMANDS,
    _log_level,
    _run,
    _unreadable,
    config_from,
    use_recorded_cluster,
)
from swarmfly.cli.terminal import _fail, progress_line
from swarmfly.errors import SwarmflyError, in_words

__all__ = ["build_parser", "config_from", "main", "progress_line", "use_recorded_cluster"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser(argv[0] if argv else None).parse_args(argv)
    except UsageError as exc:
        return _fail(SwarmflyError("bad_request", str(exc)), as_json="--json" in argv)
    as_json = bool(getattr(args, "json", False))
    try:
        return _command(args)
    except SwarmflyError as exc:
        return _fail(exc, as_json=as_json)
    except ValueError as exc:  # a setting that cannot work (config names it)
        return _fail(SwarmflyError("bad_request", in_words(exc)), as_json=as_json)
    except OSError as exc:
        words = f"{exc.filename}: {in_words(exc)}" if exc.filename else in_words(exc)
        return _fail(SwarmflyError("internal", words), as_json=as_json)
    except KeyboardInterrupt:
        return 130


def _command(args: argparse.Namespace) -> int:
    if args.command == "contracts":
        from swarmfly.contracts.asyncapi import document

        sys.stdout.write(
            orjson.dumps(document(args.prefix), option=orjson.OPT_INDENT_2).decode() + "\n"
        )
        return 0
    warnings: list[str] = []
    try:
        config = config_from(args, warnings.append)
    except PermissionError as exc:  # the state dir's swarmfly.toml, behind a 0700 dir
        if args.command not in CLUSTER_COMMANDS or not exc.filename:
            raise
        raise _unreadable(Path(exc.filename).parent) from None
    logging.basicConfig(
        level=_log_level(args, config),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for warning in warnings:  # said once logging is set up, in its format
        logging.getLogger("swarmfly.config").warning("%s", warning)
    for noisy in ("botocore", "aiobotocore", "urllib3"):
        # their DEBUG lines carry request signatures and access key ids
        logging.getLogger(noisy).setLevel(max(logging.INFO, logging.root.level))
    if args.command in CLUSTER_COMMANDS:
        use_recorded_cluster(config)
    if args.command == "get":
        return _get(args, config)
    if args.command == "plugins":
        return _plugins(args, config)
    if args.command == "preheat":
        return _preheat(args, config)
    if args.command == "cache":
        return _cache(args, config)
    if args.command == "status":
        return _status(args, config)
    if args.command == "doctor":
        return _doctor(args, config)
    if args.command == "scheduler" and args.scheduler_command == "partitions":
        return _scheduler_partitions(args, config)
    from swarmfly import launch

    if args.command == "up":
        _run(launch.run_up(config, args.nats_port))
    else:
        _run(launch.run_service(args.command, config), fast_loop=args.command == "scheduler")
    return 0
