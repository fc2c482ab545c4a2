"""The `swarmfly` command."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import orjson

from swarmfly import __version__
from swarmfly.config import Config, load, parse_size
from swarmfly.errors import SwarmflyError


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML configuration file")
    parser.add_argument("--state-dir", help="where caches and state live (SWARMFLY_STATE_DIR)")
    parser.add_argument(
        "--nats", action="append", help="NATS server URL (repeatable or comma-separated)"
    )
    parser.add_argument("--prefix", help="subject prefix, so clusters can share a NATS account")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR")


def _node_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host-id", help="unique host id (default: hostname + state dir)")
    parser.add_argument("--listen", help="upload server listen address")
    parser.add_argument("--advertise-ip", help="address other hosts reach this one at")
    parser.add_argument("--upload-port", type=int, help="upload server port (0: any free)")
    parser.add_argument("--upload-rate", type=_size, help="upload limit in bytes/s, e.g. 8MiB")


def _proxy_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--proxy-listen", help="registry mirror / HTTP proxy address (default 127.0.0.1)"
    )
    parser.add_argument(
        "--proxy-port", type=int, help="proxy port (default 65001 when free; 0: any free)"
    )
    parser.add_argument(
        "--registry",
        action="append",
        help="upstream registry URL the mirror may forward to (repeatable; first is default)",
    )
    parser.add_argument(
        "--no-proxy", action="store_true", default=None, help="run no registry mirror / proxy"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swarmfly", description="Peer-to-peer file and image distribution"
    )
    parser.add_argument("--version", action="version", version=f"swarmfly {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="embedded NATS + scheduler, storage and peer on this machine")
    _common(up)
    up.add_argument("--nats-port", type=int, default=0, help="embedded NATS port (0: free)")
    _proxy_flags(up)

    for name, text in (
        ("scheduler", "run the scheduler against an existing NATS"),
        ("storage", "run a storage (seed/cache) instance against an existing NATS"),
        ("peer", "run a peer against an existing NATS"),
    ):
        service = sub.add_parser(name, help=text)
        _common(service)
        if name == "scheduler":
            service.add_argument("--http-port", type=int, help="metrics/health port")
            service.add_argument("--listen", help="HTTP listen address")
        else:
            _node_flags(service)
        if name == "peer":
            service.add_argument("--download-rate", type=_size, help="download limit, bytes/s")
            _proxy_flags(service)

    get = sub.add_parser("get", help="download a URL through the swarm")
    _common(get)
    get.add_argument("url")
    get.add_argument("-O", "--output", required=True, help="output path")
    get.add_argument(
        "-H", "--header", action="append", default=[], help="'Name: value' for the origin"
    )
    get.add_argument("--digest", help="expected sha256:HEX of the whole file")
    get.add_argument("--timeout", type=float, default=3600.0, help="seconds (default 3600)")
    get.add_argument("--strategy", help="rarest-first, sequential or random")
    get.add_argument("--piece-length", type=_size, help="piece length (default from size)")
    get.add_argument("--upload-rate", type=_size, help="upload limit of the in-process peer")
    get.add_argument("--download-rate", type=_size, help="download limit, bytes/s")
    get.add_argument(
        "--force-hard-link",
        action="store_true",
        help="hard-link the output to the cache file (made read-only) instead of copying it",
    )
    get.add_argument("--json", action="store_true", help="print a JSON summary")

    preheat = sub.add_parser("preheat", help="seed an image or a URL into storage")
    preheat_sub = preheat.add_subparsers(dest="what", required=True)
    image = preheat_sub.add_parser("image", help="every blob of an image, for one platform")
    url = preheat_sub.add_parser("url", help="one URL")
    for what in (image, url):
        _common(what)
        what.add_argument("--timeout", type=float, default=3600.0, help="seconds (default 3600)")
        what.add_argument("--json", action="store_true", help="print a JSON summary")
    image.add_argument("ref", help="registry.example.com/name:tag or name@sha256:…")
    image.add_argument("--platform", help="os/arch[/variant] (default: this host's)")
    image.add_argument("--username", help="registry user (the password comes from stdin)")
    image.add_argument(
        "--password-stdin", action="store_true", help="read the registry password from stdin"
    )
    image.add_argument("--auth-file", help="Docker config.json or containers auth.json")
    image.add_argument("--plain-http", action="store_true", help="the registry speaks http")
    url.add_argument("url")
    url.add_argument("--header", action="append", default=[], help="'Name: value' request header")
    url.add_argument("--digest", help="expected sha256:HEX of the content")

    status = sub.add_parser("status", help="services, hosts and tasks of the cluster")
    _common(status)
    status.add_argument("--json", action="store_true", help="print JSON")

    plugins = sub.add_parser("plugins", help="list the loaded plugins")
    _common(plugins)
    plugins.add_argument("--json", action="store_true", help="print JSON")

    contracts = sub.add_parser("contracts", help="the NATS contracts")
    contracts_sub = contracts.add_subparsers(dest="contracts_command", required=True)
    asyncapi = contracts_sub.add_parser("asyncapi", help="print the AsyncAPI 3 document")
    asyncapi.add_argument("--prefix", default="swarmfly")
    return parser


def config_from(args: argparse.Namespace) -> Config:
    get = getattr
    servers: list[str] | None = None
    if get(args, "nats", None):
        servers = [s.strip() for value in args.nats for s in value.split(",") if s.strip()]
    node = {
        "host_id": get(args, "host_id", None),
        "listen": get(args, "listen", None),
        "advertise_ip": get(args, "advertise_ip", None),
        "upload_port": get(args, "upload_port", None),
        "upload_rate": get(args, "upload_rate", None),
    }
    flags: dict[str, Any] = {
        "state_dir": get(args, "state_dir", None),
        "log_level": get(args, "log_level", None),
        "nats": {"servers": servers, "prefix": get(args, "prefix", None)},
    }
    if args.command == "scheduler":
        flags["scheduler"] = {"http_port": args.http_port, "listen": args.listen}
    elif args.command == "storage":
        flags["storage"] = node
    elif args.command in ("peer", "get"):
        flags["peer"] = {**node, "download_rate": get(args, "download_rate", None)}
    if args.command in ("peer", "up"):
        flags["proxy"] = {
            "listen": args.proxy_listen,
            "port": args.proxy_port,
            "registries": args.registry,
            "enabled": False if args.no_proxy else None,
        }
    return load(flags, config_file=get(args, "config", None))


CLUSTER_COMMANDS = ("get", "status", "preheat")
"""The commands that use the cluster `swarmfly up` recorded, as its client."""


def _unreadable(folder: Path) -> SwarmflyError:
    return SwarmflyError(
        "forbidden",
        f"cannot read the cluster's credentials in {folder}: run as the user that ran"
        " swarmfly up, or pass [nats] credentials",
    )


def use_recorded_cluster(config: Config) -> None:
    """Where no NATS is configured, the cluster `swarmfly up` recorded in the state dir, with
    the CLI's own credentials from there; a user who may not read them is told so at once
    (the server would only refuse an anonymous connection)."""
    n = config.nats
    if n.servers or n.user or n.token or n.creds or n.nkeys_seed:
        return
    from swarmfly.credentials import Unreadable, client_access

    try:
        access = client_access(config.state_dir)
    except Unreadable as exc:
        raise _unreadable(Path(str(exc))) from None
    if access is not None:
        n.servers, n.nkeys_seed = access.servers, access.nkeys_seed
        n.inbox_prefix = n.inbox_prefix or access.inbox_prefix


def _run(coro: Coroutine[Any, Any, Any], *, fast_loop: bool = False) -> Any:
    """uvloop where it helps; processes that serve pieces keep asyncio's loop, whose
    ``sendfile`` uvloop lacks."""
    if fast_loop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(coro)
    import asyncio  # here: `swarmfly get` through the local socket needs none of it

    return asyncio.run(coro)


class ProgressBar:
    """A one-line bar with rate and ETA on a terminal's stderr."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.shown = 0.0

    def __call__(self, done: int, total: int | None) -> None:
        now = time.monotonic()
        if now - self.shown < 0.2:
            return
        self.shown = now
        rate = done / max(now - self.started, 1e-6)
        if total:
            width = 30
            filled = int(width * done / total) if total else 0
            eta = (total - done) / rate if rate > 0 else float("inf")
            eta_text = f"{eta:5.0f}s" if eta != float("inf") else "    ?"
            line = (
                f"\r[{'#' * filled}{'.' * (width - filled)}] {100 * done / total:5.1f}% "
                f"{rate / 2**20:7.1f} MiB/s ETA {eta_text}"
            )
        else:
            line = f"\r{done / 2**20:9.1f} MiB {rate / 2**20:7.1f} MiB/s"
        sys.stderr.write(line)
        sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\n")


def _get(args: argparse.Namespace, config: Config) -> int:
    from swarmfly import localpeer

    headers = dict(localpeer.parse_header(h) for h in args.header)
    request = localpeer.GetRequest(
        url=args.url,
        output=Path(args.output),
        headers=headers,
        digest=args.digest,
        timeout=args.timeout,
        strategy=args.strategy,
        piece_length=args.piece_length,
        hard_link=args.force_hard_link,
    )
    bar = ProgressBar() if sys.stderr.isatty() and not args.json else None
    try:
        # The host's peer over its local socket; through NATS when tracing (the trace goes
        # with the request) or when no peer answers there.
        summary = None
        if not config.tracing:
            try:
                summary = localpeer.get(config.state_dir, request, bar, config.peer.socket)
            except localpeer.PeerGone:  # it died: an in-process peer takes over (below)
                summary = None
        if summary is None:
            from swarmfly.client import get

            summary = _run(get(config, request, bar))
    except TimeoutError:
        raise SwarmflyError("timeout", f"download did not finish in {args.timeout:g}s") from None
    finally:
        if bar is not None:
            bar.close()
    if args.json:
        sys.stdout.write(orjson.dumps(summary).decode() + "\n")
    return 0


def _preheat(args: argparse.Namespace, config: Config) -> int:
    from swarmfly import preheat
    from swarmfly.ids import redact_url
    from swarmfly.localpeer import parse_header

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
        blobs = _run(preheat.resolve(ref, headers, wanted, config))
    bar = ProgressBar() if sys.stderr.isatty() and not args.json else None

    def on_blob(
        blob: preheat.Blob, outcome: dict[str, Any] | SwarmflyError, summary: preheat.Summary
    ) -> None:
        if args.json:
            return
        count = f"[{len(summary.replies) + len(summary.errors)}/{summary.total}]"
        name = blob.digest[:19] if blob.digest else redact_url(blob.url)
        if isinstance(outcome, SwarmflyError):
            line = f"{count} {name} failed: {outcome.code}: {outcome.message}"
        else:
            size = outcome["content_length"] / 2**20
            origin = outcome["bytes_origin"] / 2**20
            where = (
                "already cached"
                if outcome["bytes_origin"] == 0 and outcome["bytes_p2p"] == 0
                else f"{origin:.1f} MiB from the origin"
            )
            line = f"{count} {name} {size:8.1f} MiB in {outcome['seconds']:.1f}s ({where})"
        sys.stderr.write(("\r\x1b[K" if bar else "") + line + "\n")
        sys.stderr.flush()

    try:
        summary = _run(
            preheat.preheat(
                config, blobs, headers, timeout=args.timeout, on_blob=on_blob, on_bytes=bar
            )
        )
    finally:
        if bar is not None:
            bar.close()
    if args.json:
        sys.stdout.write(orjson.dumps(summary.to_dict()).decode() + "\n")
    else:
        print(summary.line("file" if args.what == "url" else "blob"), flush=True)
    if summary.errors:
        raise summary.errors[0]
    return 0


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

    loaded = Plugins.load(config.disable_plugins)
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "contracts":
            from swarmfly.contracts.asyncapi import document

            sys.stdout.write(
                orjson.dumps(document(args.prefix), option=orjson.OPT_INDENT_2).decode() + "\n"
            )
            return 0
        try:
            config = config_from(args)
        except PermissionError as exc:  # the state dir's swarmfly.toml, behind a 0700 dir
            if args.command not in CLUSTER_COMMANDS or not exc.filename:
                raise
            raise _unreadable(Path(exc.filename).parent) from None
        logging.basicConfig(
            level=config.log_level.upper() if args.command != "get" else "WARNING",
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
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
        if args.command == "status":
            from swarmfly.status import show

            return int(_run(show(config, as_json=args.json)))
        from swarmfly import runtime

        if args.command == "up":
            _run(runtime.run_up(config, args.nats_port))

        else:
            _run(
                runtime.run_service(args.command, config),
                fast_loop=args.command == "scheduler",
            )
        return 0
    except SwarmflyError as exc:
        print(f"swarmfly: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as exc:
        print(f"swarmfly: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
