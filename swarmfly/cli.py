"""The `swarmfly` command."""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import urlsplit

import orjson

from swarmfly import __version__
from swarmfly.config import LOG_LEVELS, MIN_RATE, Config, load, parse_size
from swarmfly.errors import SwarmflyError, in_words
from swarmfly.ids import DIGEST

if TYPE_CHECKING:
    from swarmfly.get import GetRequest

CONNECT_TIMEOUT = 10.0
"""Seconds a one-shot command waits for NATS by default: a service waits for as long as it
takes, but a command someone waits on gives up and says why."""


class UsageError(Exception):
    """A command line argparse refused, reported as every other error is."""


class Parser(argparse.ArgumentParser):
    """argparse, with its errors raised (one line, JSON with --json, exit 2) instead of a
    usage block printed."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _rate(text: str) -> int:
    rate = _size(text)
    if 0 < rate < MIN_RATE:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give at least {MIN_RATE // 1024}KiB (bytes/s), or 0 for no limit"
        )
    return rate


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of seconds above 0")
    return value


def _url(text: str) -> str:
    """A URL with a scheme: without one there is no source to ask, and the user meant a
    whole URL (which scheme has a source is the plugins' to say)."""
    try:
        scheme = urlsplit(text).scheme
    except ValueError:  # the source lookup says it cannot be parsed
        return text
    if not scheme:
        raise argparse.ArgumentTypeError(
            f"{text[:80]!r} has no scheme: give the whole URL, such as http://host/path/file"
        )
    return text


def _task_word(text: str) -> str:
    """A --tag or --application: printable ASCII, at most 256 characters (the contract's)."""
    if len(text) > 256 or not all(" " <= c <= "~" for c in text):
        raise argparse.ArgumentTypeError("printable ASCII, at most 256 characters")
    return text


def _digest(text: str) -> str:
    """``sha256:HEX`` in lower case, as the contracts take it: upper-case hex is the same
    digest."""
    digest = text.strip().lower()
    if not DIGEST.fullmatch(digest):
        raise argparse.ArgumentTypeError(f"expected sha256:<64 hex digits>, got {text[:80]!r}")
    return digest


def _one_shot(parser: argparse.ArgumentParser, *, progress: bool = True) -> None:
    """The flags of a command that runs once against the cluster and exits."""
    parser.add_argument(
        "--connect-timeout",
        type=_seconds,
        default=CONNECT_TIMEOUT,
        metavar="SECONDS",
        help=f"give up on reaching NATS after this long (default {CONNECT_TIMEOUT:g})",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON summary, or the error")
    if progress:
        parser.add_argument(
            "--no-progress", action="store_true", help="no progress bar, even on a terminal"
        )


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give 1 or more")
    return value


def _recursive_flags(get: argparse.ArgumentParser) -> None:
    from swarmfly.get.layout import DEFAULT_JOBS, DEFAULT_MAX_FILES, MAX_JOBS
    from swarmfly.listing import MAX_ENTRIES

    get.add_argument(
        "-r",
        "--recursive",
        action="store_true",
        help="every file below an s3://BUCKET/PREFIX/ or hf://OWNER/REPO[@REV][/FOLDER],"
        " written under -O DIR with the layout kept",
    )
    get.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="GLOB",
        help="with -r: only paths (below the URL) matching GLOB; * crosses /; repeatable",
    )
    get.add_argument(
        "--max-files",
        type=_count,
        default=DEFAULT_MAX_FILES,
        metavar="N",
        help=f"with -r: refuse a listing of more than N files (default {DEFAULT_MAX_FILES},"
        f" at most {MAX_ENTRIES}) rather than download part of it",
    )
    get.add_argument(
        "--jobs",
        type=_count,
        default=DEFAULT_JOBS,
        metavar="N",
        help=f"with -r: files downloaded at once (default {DEFAULT_JOBS}, at most {MAX_JOBS})",
    )


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML configuration file")
    parser.add_argument("--state-dir", help="where caches and state live (SWARMFLY_STATE_DIR)")
    parser.add_argument(
        "--nats", action="append", help="NATS server URL (repeatable or comma-separated)"
    )
    parser.add_argument("--prefix", help="subject prefix, so clusters can share a NATS account")
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        metavar="LEVEL",
        help="DEBUG, INFO, WARNING, ERROR or CRITICAL (any case)",
    )


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


def _doctor_flags(parser: argparse.ArgumentParser) -> None:
    from swarmfly.doctor import Paths

    defaults = Paths()
    for name, what in (
        ("containerd", "containerd's config.toml"),
        ("crio", "CRI-O's registries.conf"),
        ("docker", "Docker's daemon.json"),
        ("k3s", "k3s's registries.yaml"),
    ):
        parser.add_argument(
            f"--{name}-config",
            type=Path,
            default=getattr(defaults, name),
            metavar="PATH",
            help=f"{what} (default {getattr(defaults, name)})",
        )
    parser.add_argument(
        "--crio-dir",
        type=Path,
        default=defaults.crio_dir,
        metavar="PATH",
        help=f"CRI-O's own configuration: CRI-O is installed where it exists or crio is on PATH"
        f" (default {defaults.crio_dir})",
    )
    parser.add_argument(
        "--mirror", help="the mirror URL runtimes should use (default: this host's proxy)"
    )
    parser.add_argument("--probe", metavar="URL", help="a small file to pull through the swarm")
    parser.add_argument(
        "--timeout", type=_seconds, default=60.0, help="seconds for the probe (default 60)"
    )


def _partition_count(text: str) -> int:
    from swarmfly.placement import MAX_PARTITIONS

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= value <= MAX_PARTITIONS:
        raise argparse.ArgumentTypeError(f"{text!r}: give 1 to {MAX_PARTITIONS}")
    return value


def _scheduler_commands(scheduler: argparse.ArgumentParser) -> None:
    """`swarmfly scheduler partitions N`, a change to every scheduler at once; `swarmfly
    scheduler` alone runs one."""
    commands = scheduler.add_subparsers(dest="scheduler_command", metavar="{partitions}")
    partitions = commands.add_parser(
        "partitions",
        help="change the task partition count of the running schedulers, online",
        argument_default=argparse.SUPPRESS,  # the flags given before `partitions` stand
    )
    _common(partitions)
    partitions.add_argument("count", type=_partition_count, help="the new count (1 to 4096)")
    _one_shot(partitions, progress=False)
    partitions.set_defaults(json=False)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="swarmfly", description="Peer-to-peer file and image distribution")
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
            _scheduler_commands(service)
        else:
            _node_flags(service)
        if name == "peer":
            service.add_argument("--download-rate", type=_size, help="download limit, bytes/s")
            _proxy_flags(service)

    get = sub.add_parser("get", help="download a URL through the swarm")
    _common(get)
    get.add_argument("url", type=_url)
    get.add_argument("-O", "--output", required=True, help="output path")
    get.add_argument(
        "-H", "--header", action="append", default=[], help="'Name: value' for the origin"
    )
    get.add_argument("--digest", type=_digest, help="expected sha256:HEX of the whole file")
    get.add_argument("--timeout", type=_seconds, default=3600.0, help="seconds (default 3600)")
    get.add_argument("--strategy", help="rarest-first, sequential or random")
    get.add_argument("--piece-length", type=_size, help="piece length (default from size)")
    get.add_argument(
        "--tag",
        type=_task_word,
        default="",
        help="without --digest, the same URL under another tag is another task (dfget's)",
    )
    get.add_argument(
        "--application", type=_task_word, default="", help="a task-id input, as --tag is"
    )
    get.add_argument("--upload-rate", type=_size, help="upload limit of the in-process peer")
    get.add_argument(
        "--download-rate", type=_rate, help="bytes/s for this download, kept by the peer serving it"
    )
    get.add_argument(
        "--force-hard-link",
        action="store_true",
        help="hard-link the output to the cache file (made read-only) instead of copying it",
    )
    _recursive_flags(get)
    _one_shot(get)

    preheat = sub.add_parser("preheat", help="seed an image or a URL into storage")
    preheat_sub = preheat.add_subparsers(dest="what", required=True)
    image = preheat_sub.add_parser("image", help="every blob of an image, for one platform")
    url = preheat_sub.add_parser("url", help="one URL")
    for what in (image, url):
        _common(what)
        what.add_argument("--timeout", type=_seconds, default=3600.0, help="seconds (default 3600)")
        _one_shot(what)
    image.add_argument("ref", help="registry.example.com/name:tag or name@sha256:…")
    image.add_argument("--platform", help="os/arch[/variant] (default: this host's)")
    image.add_argument("--username", help="registry user (the password comes from stdin)")
    image.add_argument(
        "--password-stdin", action="store_true", help="read the registry password from stdin"
    )
    image.add_argument("--auth-file", help="Docker config.json or containers auth.json")
    image.add_argument("--plain-http", action="store_true", help="the registry speaks http")
    url.add_argument("url", type=_url)
    url.add_argument("--header", action="append", default=[], help="'Name: value' request header")
    url.add_argument("--digest", type=_digest, help="expected sha256:HEX of the content")

    status = sub.add_parser("status", help="services, hosts and tasks of the cluster")
    _common(status)
    _one_shot(status, progress=False)

    doctor = sub.add_parser(
        "doctor", help="is it working on this host? runtimes, mirror, cluster, a probe pull"
    )
    _common(doctor)
    _one_shot(doctor, progress=False)
    _doctor_flags(doctor)

    plugins = sub.add_parser("plugins", help="list the loaded plugins")
    _common(plugins)
    plugins.add_argument("--json", action="store_true", help="print JSON")

    contracts = sub.add_parser("contracts", help="the NATS contracts")
    contracts_sub = contracts.add_subparsers(dest="contracts_command", required=True)
    asyncapi = contracts_sub.add_parser("asyncapi", help="print the AsyncAPI 3 document")
    asyncapi.add_argument("--prefix", default="swarmfly")
    return parser


def config_from(args: argparse.Namespace, warn: Callable[[str], None] | None = None) -> Config:
    """The configuration of the command line's flags over the file and the environment;
    ``warn`` hears of ``SWARMFLY_*`` variables that are no setting."""
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
    elif args.command == "peer":
        flags["peer"] = {**node, "download_rate": get(args, "download_rate", None)}
    elif args.command == "get":  # its --download-rate goes with the request (GetRequest)
        flags["peer"] = node
    if args.command in ("peer", "up"):
        flags["proxy"] = {
            "listen": args.proxy_listen,
            "port": args.proxy_port,
            "registries": args.registry,
            "enabled": False if args.no_proxy else None,
        }
    return load(flags, config_file=get(args, "config", None), warn=warn)


CLUSTER_COMMANDS = ("get", "status", "preheat", "doctor")
"""The commands that use the cluster `swarmfly up` recorded, as its client."""


def _unreadable(folder: Path) -> SwarmflyError:
    return SwarmflyError(
        "forbidden",
        f"cannot read the cluster's credentials in {folder}: run as the user that ran"
        " swarmfly up, or pass [nats] credentials",
    )


def use_recorded_cluster(config: Config) -> None:
    """The cluster `swarmfly up` recorded in the state dir, with the CLI's own credentials
    from there, where no NATS is configured or the one configured is that cluster's (the URL
    its banner prints); never where credentials are given. A user who may not read them is
    told so at once (the server would only refuse an anonymous connection)."""
    n = config.nats
    if n.user or n.token or n.token_file or n.creds or n.nkeys_seed:
        return
    if n.servers and not _names_recorded(n.servers, config.state_dir):
        return
    from swarmfly.credentials import Unreadable, client_access

    try:
        access = client_access(config.state_dir)
    except Unreadable as exc:
        raise _unreadable(Path(str(exc))) from None
    if access is not None:
        n.servers, n.nkeys_seed = n.servers or access.servers, access.nkeys_seed
        n.inbox_prefix = n.inbox_prefix or access.inbox_prefix


def _server(url: str) -> tuple[str, int] | None:
    """Host and port of a NATS URL, as nats-py reads it (no scheme: nats://, no port: 4222);
    None for a URL with credentials of its own, or none that parses."""
    parts = urlsplit(url if "://" in url else f"nats://{url}")
    try:
        port = parts.port or 4222
    except ValueError:
        return None
    if parts.username is not None or not parts.hostname:
        return None
    host = parts.hostname.lower()
    return ("127.0.0.1" if host == "localhost" else host), port


def _names_recorded(servers: list[str], state_dir: Path) -> bool:
    """Whether every one of ``servers`` is a server of the cluster recorded in ``state_dir``
    (none recorded, or a record this user may not read: no)."""
    from swarmfly.credentials import CLUSTER_FILE

    try:
        recorded = orjson.loads((state_dir / CLUSTER_FILE).read_bytes())["nats"]
        ours = {_server(str(url)) for url in recorded} - {None}
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return all(_server(url) in ours for url in servers)


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


def progress_line(done: int, total: int | None, elapsed: float, width: int = 30) -> str:
    """The bar as drawn after ``elapsed`` seconds: done, rate and ETA (only the bytes and the
    rate where the size is not known yet)."""
    rate = done / max(elapsed, 1e-6)
    speed = f"{rate / 2**20:7.1f} MiB/s"
    if not total:
        return f"{done / 2**20:9.1f} MiB {speed}"
    share = min(done / total, 1.0)
    filled = int(width * share)
    left = (total - done) / rate if rate > 0 else math.inf
    eta = f"{left:5.0f}s" if math.isfinite(left) else "    ?"
    return (
        f"[{'#' * filled}{'.' * (width - filled)}] {100 * share:5.1f}%"
        f" {done / 2**20:.1f}/{total / 2**20:.1f} MiB {speed} ETA {eta}"
    )


class ProgressBar:
    """A one-line bar on a terminal's stderr, redrawn at most every ``REDRAW`` seconds."""

    REDRAW = 0.2

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.shown = -math.inf
        self.drawn = False

    def __call__(self, done: int, total: int | None) -> None:
        now = time.monotonic()
        if now - self.shown >= self.REDRAW:
            self.shown = now
            self._draw(progress_line(done, total, now - self.started))

    def _draw(self, line: str) -> None:
        sys.stderr.write(f"\r\x1b[K{line}")
        sys.stderr.flush()
        self.drawn = True

    def close(self, done: int | None = None, summary: str | None = None) -> None:
        """End the bar's line; ``done``: the size of what finished, drawn at 100% (the last
        redraw may have been skipped, or the last progress report come before the end);
        ``summary``: a line saying what was done."""
        if done is not None:
            self._draw(progress_line(done, done, time.monotonic() - self.started))
        if self.drawn:
            sys.stderr.write("\n")
        if summary is not None:
            sys.stderr.write(summary + "\n")
        sys.stderr.flush()


def _progress(args: argparse.Namespace) -> ProgressBar | None:
    """A bar only for someone at a terminal: in a log or a pipe (or with --json or
    --no-progress) nothing is drawn."""
    if args.json or args.no_progress or not sys.stderr.isatty():
        return None
    return ProgressBar()


def _print_json(document: Mapping[str, Any]) -> None:
    sys.stdout.write(orjson.dumps(document).decode() + "\n")
    sys.stdout.flush()


def _about(exc: SwarmflyError, subject: str) -> SwarmflyError:
    """``exc`` naming what it is about (a URL, an output path), unless its words already do:
    a service says what went wrong, the CLI knows with what."""
    if subject in exc.message:
        return exc
    return SwarmflyError(exc.code, f"{subject}: {exc.message}", path=exc.path)


ORIGIN_CODES = ("not_found", "source_error", "integrity", "timeout")
"""Error codes about a download's content: the message gets the URL it is about."""


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


def _saved_all(summary: Mapping[str, Any]) -> str:
    """What a recursive get did, in one line for the terminal."""
    size, seconds = summary["content_length"], summary["seconds"]
    return (
        f"{summary['output']}: {summary['written']} files, {size / 2**20:.1f} MiB in"
        f" {seconds:.1f}s ({summary['bytes_origin'] / 2**20:.1f} MiB from the origin,"
        f" {summary['bytes_p2p'] / 2**20:.1f} MiB from peers)"
    )


def _saved(summary: Mapping[str, Any]) -> str:
    """What a get did, in one line for the terminal."""
    size, seconds = summary["content_length"], summary["seconds"]
    return (
        f"{summary['output']}: {size / 2**20:.1f} MiB in {seconds:.1f}s"
        f" ({size / 2**20 / max(seconds, 1e-6):.1f} MiB/s;"
        f" {summary['bytes_origin'] / 2**20:.1f} MiB from the origin,"
        f" {summary['bytes_p2p'] / 2**20:.1f} MiB from peers)"
    )


def _preheat(args: argparse.Namespace, config: Config) -> int:
    from swarmfly import preheat
    from swarmfly.get.request import parse_header
    from swarmfly.ids import redact_url

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
    failed: list[SwarmflyError] = []
    """Each failed blob's error, naming the blob."""

    def on_blob(
        blob: preheat.Blob, outcome: dict[str, Any] | SwarmflyError, summary: preheat.Summary
    ) -> None:
        name = blob.digest[:19] if blob.digest else redact_url(blob.url)
        if isinstance(outcome, SwarmflyError):
            failed.append(_about(outcome, name))
        if args.json:
            return
        count = f"[{len(summary.replies) + len(summary.errors)}/{summary.total}]"
        if isinstance(outcome, SwarmflyError):
            line = f"{count} {name} failed: {outcome.message}"
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
                config,
                blobs,
                headers,
                timeout=args.timeout,
                within=args.connect_timeout,
                on_blob=on_blob,
                on_bytes=bar,
            )
        )
    except BaseException:
        if bar is not None:
            bar.close()
        raise
    result = summary.to_dict()
    if bar is not None:
        bar.close(None if failed else result["bytes"])
    noun = "file" if args.what == "url" else "blob"
    if not args.json:
        print(summary.line(noun), flush=True)
    if failed:
        first = failed[0]
        more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        error = SwarmflyError(first.code, f"{first.message}{more}", path=first.path)
        return _fail(error, as_json=args.json, result=result)
    if args.json:
        _print_json({"ok": True, **result})
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


def _fail(exc: SwarmflyError, *, as_json: bool, result: Mapping[str, Any] | None = None) -> int:
    """Report a failure: one line on stderr with the cause in words; with --json also the
    one JSON document on stdout (the error, and ``result``: what was done); the exit status
    of its code."""
    print(f"swarmfly: {' '.join(exc.message.split())}", file=sys.stderr, flush=True)
    if as_json:
        _print_json({"ok": False, **(result or {}), **exc.to_dict()})
    return exc.exit_status


def _log_level(args: argparse.Namespace, config: Config) -> str:
    """The flag's, the variable's or the file's (config checked it, naming where it came
    from); unset, a get's is WARNING: its in-process peer would say at INFO what a service
    does."""
    return config.log_level or ("WARNING" if args.command == "get" else "INFO")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser().parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
