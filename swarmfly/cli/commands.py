"""The one-shot commands: get (one file or, with -r, a tree), preheat, cache, status,
doctor, plugins and the schedulers' partition count."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from swarmfly.config import Config
from swarmfly.errors import SwarmflyError

if TYPE_CHECKING:
    from swarmfly.get import GetRequest
from swarmfly.cli.parser import MAX_FILTERED
from swarmfly.cli.startup import _run, use_recorded_cluster
from swarmfly.cli.terminal import (
    ORIGIN_CODES,
    ProgressBar,
    _about,
    _fail,
    _print_json,
    _progress,
    _saved,
    _saved_all,
    _when,
)


def _get(args: argparse.Namespace, config: Config) -> int:
    from swarmfly.get import GetRequest
    from swarmfly.get.request import parse_header

    headers = dict(parse_header(h) for h in args.header)
    request = GetRequest(
        url=args.url,
        output=Path(args.output),
        headers=headers,
        digest=args.digest,
        timeout=args.timeout,
        strategy=args.strategy,
        piece_length=args.piece_length,
        tag=args.tag,
        application=args.application,
        hard_link=args.force_hard_link,
        download_rate=args.download_rate or 0,
        overwrite=args.overwrite,
        back_to_source=not args.disable_back_to_source,
        filtered_query_params=_filtered(args.filtered_query_param),
        priority=args.priority,
    )
    if args.recursive:
        return _get_recursive(args, config, request)
    if args.include:
        raise SwarmflyError("bad_request", "--include needs -r/--recursive")
    bar = _progress(args)
    try:
        summary = _download(args, config, request, bar)
    except BaseException:
        if bar is not None:
            bar.close()
        raise
    if bar is not None:
        bar.close(summary["content_length"], _saved(summary))
    if args.json:
        _print_json({"ok": True, **summary})
    return 0


def _filtered(names: list[str] | None) -> tuple[str, ...] | None:
    """The --filtered-query-param names, once each (without case), bounded."""
    if not names:
        return None
    unique = tuple(dict.fromkeys(name.lower() for name in names))
    if len(unique) > MAX_FILTERED:
        raise SwarmflyError(
            "bad_request",
            f"--filtered-query-param: at most {MAX_FILTERED} names, got {len(unique)}",
        )
    return unique


def _download(
    args: argparse.Namespace, config: Config, request: GetRequest, bar: ProgressBar | None
) -> dict[str, Any]:
    """The host's peer over its local socket; through NATS when tracing (the trace goes with
    the request) or when no peer answers there; errors naming what they are about."""
    from swarmfly.get import get
    from swarmfly.ids import redact_url

    try:
        return get(config, request, bar, within=args.connect_timeout, run=_run)
    except TimeoutError:
        raise SwarmflyError(
            "timeout", f"{redact_url(args.url)}: download did not finish in {args.timeout:g}s"
        ) from None
    except SwarmflyError as exc:
        if exc.path == "data.output":
            raise _about(exc, str(request.output)) from None
        if exc.code in ORIGIN_CODES:
            raise _about(exc, redact_url(args.url)) from None
        raise


def _get_recursive(args: argparse.Namespace, config: Config, request: GetRequest) -> int:
    """Every file below the URL, one bar for all of them and one summary; a failed file's
    error comes with what was written (in the --json document too)."""
    from swarmfly.get.layout import MAX_JOBS
    from swarmfly.get.recursive import PartlyDone, RecursiveGet, get_tree
    from swarmfly.listing import MAX_ENTRIES

    if args.digest:
        raise SwarmflyError("bad_request", "--digest names one file: it cannot go with -r")
    if args.max_files > MAX_ENTRIES or args.jobs > MAX_JOBS:
        raise SwarmflyError(
            "bad_request", f"--max-files takes at most {MAX_ENTRIES}, --jobs at most {MAX_JOBS}"
        )
    job = RecursiveGet(request, tuple(args.include), args.max_files, args.jobs)
    bar = _progress(args)
    try:
        summary = _run(get_tree(config, job, bar, within=args.connect_timeout))
    except PartlyDone as exc:
        if bar is not None:
            bar.close()
        return _fail(exc, as_json=args.json, result=exc.summary)
    except BaseException:
        if bar is not None:
            bar.close()
        raise
    if bar is not None:
        bar.close(summary["content_length"], _saved_all(summary))
    if args.json:
        _print_json({"ok": True, **summary})
    return 0


def _preheat(args: argparse.Namespace, config: Config) -> int:
    from swarmfly import preheat
    from swarmfly.contracts import messages
    from swarmfly.get.request import parse_header

    scope = preheat.Scope(args.scope, args.count, args.percentage, args.concurrency)
    blobs: list[preheat.Blob]
    if args.what == "url":
        headers = dict(parse_header(h) for h in args.header)
        blobs = [preheat.Blob(args.url, args.digest)]
    else:
        headers = _registry_auth(args)
        ref = preheat.parse_image(args.ref, plain_http=args.plain_http)
        if args.auth_file:
            headers = preheat.auth_from_file(Path(args.auth_file), ref.base.split("://")[1])
        wanted = args.platform or preheat.host_platform()
        try:
            blobs = _run(preheat.resolve(ref, headers, wanted, config))
        except SwarmflyError as exc:
            raise _about(exc, args.ref) from None
    bar = _progress(args)
    started: set[tuple[int, str]] = set()
    """(blob, host) pairs whose start a line said."""
    hosts = args.scope != "seed"
    """Name the host on each line: several hold each blob."""

    def say(line: str) -> None:
        sys.stderr.write(("\r\x1b[K" if bar else "") + line + "\n")
        sys.stderr.flush()

    def on_event(blob: preheat.Blob, host: str, event: messages.PreheatProgressRequest) -> None:
        """A host's own report, where several work: a line as it starts and once verified
        (a failure's line comes with its reply, which says why)."""
        if args.json or not hosts or event.state == "failed":
            return
        if event.state == "done":
            say(f"{host}: {blob.name} verified, {event.completed_bytes / 2**20:.1f} MiB")
        elif (event.item, host) not in started:
            started.add((event.item, host))
            say(f"{host}: {blob.name} started")

    def on_blob(
        blob: preheat.Blob,
        host: str,
        outcome: dict[str, Any] | SwarmflyError,
        summary: preheat.Summary,
    ) -> None:
        if args.json:
            return
        if hosts:  # the hosts said how it went; failures, with why
            if isinstance(outcome, SwarmflyError):
                say(f"{host}: {blob.name} failed: {outcome.message}")
            for f in () if isinstance(outcome, SwarmflyError) else outcome.get("failed", ()):
                say(f"{f['host_id']}: {blob.name} failed: {f['message']}")
            return
        count = f"[{len(summary.replies) + len(summary.errors)}/{summary.total}]"
        if isinstance(outcome, SwarmflyError):
            say(f"{count} {blob.name} failed: {outcome.message}")
            return
        size = outcome["content_length"] / 2**20
        origin = outcome["bytes_origin"] / 2**20
        cached = outcome["bytes_origin"] == 0 and outcome["bytes_p2p"] == 0
        source = "already cached" if cached else f"{origin:.1f} MiB from the origin"
        say(f"{count} {blob.name} {size:8.1f} MiB in {outcome['seconds']:.1f}s ({source})")

    try:
        summary = _run(
            preheat.preheat(
                config,
                blobs,
                headers,
                timeout=args.timeout,
                scope=scope,
                within=args.connect_timeout,
                on_blob=on_blob,
                on_bytes=bar,
                on_event=on_event,
            )
        )
    except BaseException:
        if bar is not None:
            bar.close()
        raise
    result = summary.to_dict()
    failures = result["failures"]
    """In blob then host order: the exit status is the first's, whichever ended first."""
    if bar is not None:
        bar.close(None if failures else result["bytes"])
    noun = "file" if args.what == "url" else "blob"
    if not args.json:
        asked = args.count or 0
        if asked > len(summary.hosts):
            say(f"--count {asked}: there are {len(summary.hosts)} live peer(s) only")
        print(summary.line(noun), flush=True)
        for f in failures if hosts else ():
            print(f"  {f['host_id']}: {f['blob']}: {f['message']}", flush=True)
    if failures:
        first = failures[0]
        where = f"{first['host_id']}: {first['blob']}" if hosts else first["blob"]
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        error = _about(SwarmflyError(first["code"], first["message"]), where)
        error = SwarmflyError(error.code, f"{error.message}{more}")
        return _fail(error, as_json=args.json, result=result)
    if args.json:
        _print_json({"ok": True, **result})
    return 0


def _cache(args: argparse.Namespace, config: Config) -> int:
    """One `swarmfly cache` command through this host's peer (export: a get of the
    reference); what it did on a line, or the --json document."""
    from swarmfly import cache
    from swarmfly.get import GetRequest
    from swarmfly.get.socket_client import peer_socket

    socket_file = peer_socket(config.state_dir, config.peer.socket)
    if args.cache_command == "import":
        if args.replicas > cache.MAX_REPLICAS:
            raise SwarmflyError("bad_request", f"--replicas takes at most {cache.MAX_REPLICAS}")
        path = Path(args.path)
        fd = cache.open_import(path)
        try:
            body = {"op": "import", "ttl_s": args.ttl, "replicas": args.replicas}
            answer = cache.ask(
                socket_file, {**body, "timeout_s": args.timeout}, fd, args.timeout + 10
            )
        finally:
            os.close(fd)
        line = (
            f"{path}: {answer['content_length']} bytes imported as {answer['reference']}"
            f" (task {answer['task_id']}), kept by {', '.join(answer['replicas'])}"
            f" until {_when(answer['expires_at'])}"
        )
    elif args.cache_command in ("stat", "rm"):
        op = "stat" if args.cache_command == "stat" else "rm"
        answer = cache.ask(socket_file, {"op": op, **cache.parse_id(args.id)}, None, 60.0)
        if op == "stat":
            held = ", ".join(
                f"{s['host_id']} (until {_when(s['expires_at'])})" for s in answer["storages"]
            )
            line = f"{answer['reference']}: {answer['content_length']} bytes, held by {held}"
        else:
            where = [*answer["removed"], *(["this host's peer"] if answer["peer"] else [])]
            line = f"task {answer['task_id']}: removed from {', '.join(where)}"
            if answer["refused"]:
                print(
                    f"swarmfly: {', '.join(answer['refused'])} keep it: this host did not"
                    " import it there (only its importer removes it)",
                    file=sys.stderr,
                    flush=True,
                )
    else:
        named = cache.parse_id(args.id)
        digest = named.get("digest")
        if digest is None:  # a task id: its digest from the storage instances holding it
            found = cache.ask(socket_file, {"op": "stat", **named}, None, 60.0)
            digest = found["digest"]
        request = GetRequest(
            url=cache.reference(digest),
            output=Path(args.output),
            headers={},
            digest=digest,
            timeout=args.timeout,
        )
        args.url = request.url  # what the get's errors name
        bar = _progress(args)
        try:
            answer = _download(args, config, request, bar)
        except BaseException:
            if bar is not None:
                bar.close()
            raise
        if bar is not None:
            bar.close(answer["content_length"], _saved(answer))
        line = ""
    if args.json:
        _print_json({"ok": True, **answer})
    elif line:
        print(line, flush=True)
    return 0


def _scheduler_partitions(args: argparse.Namespace, config: Config) -> int:
    """Write the count to the schedulers' lease bucket: each follows it at its next tick,
    handing its leases over (docs/deploy.md, "The partition count")."""
    from swarmfly.cluster import connect
    from swarmfly.services.scheduler.ownership import change_partitions

    use_recorded_cluster(config)

    async def change() -> tuple[int | None, int, int]:
        bus = await connect(config, "swarmfly-scheduler-partitions", within=args.connect_timeout)
        try:
            before, now = await change_partitions(bus, args.count)
        finally:
            await bus.close()
        return (before.partitions if before else None), now.partitions, now.generation

    before, count, generation = _run(change())
    if args.json:
        _print_json({"ok": True, "before": before, "partitions": count, "generation": generation})
    elif before == count:
        print(f"the schedulers use {count} partitions already (generation {generation})")
    else:
        was = f"from {before} " if before is not None else ""
        print(f"partitions {was}to {count} (generation {generation}): the schedulers follow")
    return 0


def _status(args: argparse.Namespace, config: Config) -> int:
    from swarmfly.status import gather, render

    status = _run(gather(config, within=args.connect_timeout))
    problem = status.pop("error", None)
    if not args.json:
        print(render(status), flush=True)
    if problem is not None:
        return _fail(SwarmflyError("unavailable", problem), as_json=args.json, result=status)
    if args.json:
        _print_json({"ok": True, **status})
    return 0


def _doctor(args: argparse.Namespace, config: Config) -> int:
    """Every check on a line and the verdict last (or one JSON document); a failed check
    exits with ``EXIT_PROBLEMS``, apart from the errors' statuses."""
    from swarmfly.doctor import EXIT_PROBLEMS, Paths, diagnose

    paths = Paths(
        args.containerd_config, args.crio_config, args.docker_config, args.k3s_config, args.crio_dir
    )
    report = _run(
        diagnose(
            config,
            paths,
            mirror=args.mirror,
            probe=args.probe,
            within=args.connect_timeout,
            timeout=args.timeout,
        )
    )
    if args.json:
        _print_json(report.to_dict())
    else:
        print(report.render(), flush=True)
    return 0 if report.ok else EXIT_PROBLEMS


def _registry_auth(args: argparse.Namespace) -> dict[str, str]:
    """The Authorization header from ``--username`` and a password on stdin; the flags'
    combinations checked before anything is read."""
    if args.password_stdin and not args.username:
        raise SwarmflyError("bad_request", "--password-stdin needs --username")
    if args.username and not args.password_stdin:
        raise SwarmflyError("bad_request", "--username needs --password-stdin")
    if args.username and args.auth_file:
        raise SwarmflyError("bad_request", "give --username or --auth-file, not both")
    if not args.username:
        return {}
    from swarmfly.preheat import basic_auth

    password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise SwarmflyError("bad_request", "--password-stdin read no password")
    return basic_auth(args.username, password)


def _plugins(args: argparse.Namespace, config: Config) -> int:
    from swarmfly.pluginhost import Plugins

    loaded = Plugins.load(config.disable_plugins, settings=config.plugins)
    rows = [
        {
            "name": info.name,
            "version": info.version,
            "kinds": info.kinds,
            "provides": info.provides,
            "error": info.error,
        }
        for info in loaded.infos
    ]
    if args.json:
        sys.stdout.write(orjson.dumps(rows).decode() + "\n")
        return 0
    print(f"{'NAME':<16} {'VERSION':<10} {'KIND':<20} PROVIDES")
    for info in loaded.infos:
        kinds = ",".join(info.kinds) or "-"
        provides = ", ".join(info.provides) or f"FAILED: {info.error}"
        print(f"{info.name:<16} {info.version:<10} {kinds:<20} {provides}")
    return 0
