"""The `swarmfly` command."""

from __future__ import annotations

import argparse
import logging
import math
import os
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


def _query_name(text: str) -> str:
    """A --filtered-query-param: a query parameter's name, printable ASCII with no space,
    at most 256 characters (the contract's)."""
    if not 0 < len(text) <= 256 or not all("!" <= c <= "~" for c in text):
        raise argparse.ArgumentTypeError(
            f"{text[:80]!r}: a query parameter name, printable ASCII without spaces, at most 256"
            " characters"
        )
    return text


MAX_FILTERED = 64
"""--filtered-query-param names one get may give (the contract's)."""


def _priority(text: str) -> int:
    """dfget's --priority: 0-6 or Dragonfly's LEVEL0-LEVEL6."""
    word = text.strip().upper().removeprefix("LEVEL")
    if len(word) != 1 or word not in "0123456":
        raise argparse.ArgumentTypeError(f"expected 0-6 or LEVEL0-LEVEL6, got {text[:80]!r}")
    return int(word)


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


def _percentage(text: str) -> int:
    value = _count(text)
    if value > 100:
        raise argparse.ArgumentTypeError(f"{text!r}: give 1 to 100")
    return value


def _preheat_flags(what: argparse.ArgumentParser) -> None:
    """Where a preheat lands (``swarmfly.preheat.Scope``, docs/deploy.md "Preheat")."""
    what.add_argument(
        "--scope",
        choices=("seed", "all-seeds", "all-peers"),
        default="seed",
        help="seed: the task's home storage (and [storage] copies); all-seeds: every storage"
        " instance; all-peers: every live peer, or --count/--percentage of them (default seed)",
    )
    some = what.add_mutually_exclusive_group()
    some.add_argument(
        "--count", type=_count, help="with --scope all-peers: this many peers (rendezvous order)"
    )
    some.add_argument(
        "--percentage", type=_percentage, help="with --scope all-peers: this share of them, 1-100"
    )
    what.add_argument(
        "--concurrency",
        type=_count,
        default=4,
        help="requests in flight at once: blobs, or blob and peer pairs (1-64, default 4)",
    )


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


def _ttl(text: str) -> float:
    from swarmfly.cache import parse_ttl

    try:
        return parse_ttl(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _cache_commands(sub: Any) -> None:
    """`swarmfly cache`: dfcache's import, export, stat and rm (docs/cache.md)."""
    from swarmfly.cache import DEFAULT_TTL, MAX_REPLICAS

    cache = sub.add_parser("cache", help="put a local file into the swarm, get it back, drop it")
    what = cache.add_subparsers(dest="cache_command", required=True)
    imp = what.add_parser(
        "import", help="this host becomes the origin of a file: storage keeps it for the TTL"
    )
    imp.add_argument("path", help="a regular file this user can read")
    imp.add_argument(
        "--ttl",
        type=_ttl,
        default=DEFAULT_TTL,
        help="how long storage keeps it: 90s, 30m, 1h, 7d (default 1d)",
    )
    imp.add_argument(
        "--replicas",
        type=_count,
        default=1,
        help=f"storage instances that keep it (1 to the fleet's size, at most {MAX_REPLICAS})",
    )
    imp.add_argument("--timeout", type=_seconds, default=3600.0, help="seconds (default 3600)")
    export = what.add_parser("export", help="download an imported file through the swarm")
    export.add_argument("id", help="sha256:<hex>, swarmfly:sha256:<hex> or the task id")
    export.add_argument("-O", "--output", required=True, help="output path")
    export.add_argument("--timeout", type=_seconds, default=3600.0, help="seconds (default 3600)")
    stat = what.add_parser("stat", help="which storage instances hold an import, until when")
    rm = what.add_parser("rm", help="remove an import from storage and this host's peer")
    for command in (stat, rm):
        command.add_argument("id", help="sha256:<hex>, swarmfly:sha256:<hex> or the task id")
    for command in (imp, export, stat, rm):
        _common(command)
        _one_shot(command, progress=command is export)


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
    get.add_argument(
        "--filtered-query-param",
        action="append",
        type=_query_name,
        metavar="NAME",
        help="drop query parameter NAME (any case) from the URL before the task id is"
        " computed, so re-signed URLs share a task; repeatable, at most"
        f" {MAX_FILTERED}; replaces the default (the parameters of S3, GCS and Azure presigned"
        " URLs); the origin is still read with the whole URL (dfget's)",
    )
    get.add_argument(
        "--priority",
        type=_priority,
        default=0,
        metavar="LEVEL",
        help="0-6 or LEVEL0-LEVEL6 (dfget's), for a task no host has yet: 0 and 6 (default)"
        " a storage seed reads the origin; 3, 4, 5 this host reads it itself, no seed (with"
        " --digest only, else as 0); 2 refused; 1 always refused",
    )
    get.add_argument(
        "--disable-back-to-source",
        action="store_true",
        help="fail (exit 3) rather than read the origin's bytes on this host when no peer or"
        " seed can serve the file (dfget's); the origin is still asked who may read it",
    )
    get.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing output (with -r: existing files); without it get refuses"
        " before any byte moves (dfget's)",
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
        _preheat_flags(what)
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

    _cache_commands(sub)

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


CLUSTER_COMMANDS = ("get", "status", "preheat", "doctor", "cache")
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


def _when(unix: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(unix or 0))


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
    return config.log_level or ("WARNING" if args.command in ("get", "cache") else "INFO")


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


if __name__ == "__main__":
    sys.exit(main())
