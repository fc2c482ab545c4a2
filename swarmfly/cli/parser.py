"""The `swarmfly` command line: its flags, each checked as argparse reads it, and the
parser that argparse errors leave as one line (``Parser``)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar
from urllib.parse import urlsplit

from swarmfly import __version__
from swarmfly.config import LOG_LEVELS, MIN_RATE, parse_size
from swarmfly.ids import DIGEST

if TYPE_CHECKING:
    pass


CONNECT_TIMEOUT = 10.0
"""Seconds a one-shot command waits for NATS by default: a service waits for as long as it
takes, but a command someone waits on gives up and says why."""

T = TypeVar("T")

COMMANDS = (
    "up", "scheduler", "storage", "peer", "get", "preheat", "cache", "status", "doctor",
    "plugins", "contracts",
)  # fmt: skip


class UsageError(Exception):
    """A command line argparse refused, reported as every other error is."""


class Parser(argparse.ArgumentParser):
    """argparse, with its errors raised (one line, JSON with --json, exit 2) instead of a
    usage block printed."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def _in_words(parse: Callable[[str], T], text: str) -> T:
    """``parse(text)``, its ValueError the flag's error (its message says what is wrong)."""
    try:
        return parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _size(text: str) -> int:
    return _in_words(parse_size, text)


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


def _whole(text: str, most: int | None = None) -> int:
    """A whole number from 1 (to ``most``), or the flag's error in words."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1 or (most is not None and value > most):
        bound = "1 or more" if most is None else f"1 to {most}"
        raise argparse.ArgumentTypeError(f"{text!r}: give {bound}")
    return value


def _count(text: str) -> int:
    return _whole(text)


def _percentage(text: str) -> int:
    return _whole(text, 100)


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

    return _whole(text, MAX_PARTITIONS)


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

    return _in_words(parse_ttl, text)


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


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with ``command`` (the first word of one), only that command's
    part of it, when it is one: a `swarmfly get` builds its own flags, not the other ten
    commands' (half the parser's start-up, paid by every get on a host)."""
    parser = Parser(prog="swarmfly", description="Peer-to-peer file and image distribution")
    parser.add_argument("--version", action="version", version=f"swarmfly {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    only = command if command in COMMANDS else None

    def wanted(name: str) -> bool:
        return only is None or name == only

    if wanted("up"):
        up = sub.add_parser(
            "up", help="embedded NATS + scheduler, storage and peer on this machine"
        )
        _common(up)
        up.add_argument("--nats-port", type=int, default=0, help="embedded NATS port (0: free)")
        _proxy_flags(up)

    for name, text in (
        ("scheduler", "run the scheduler against an existing NATS"),
        ("storage", "run a storage (seed/cache) instance against an existing NATS"),
        ("peer", "run a peer against an existing NATS"),
    ):
        if not wanted(name):
            continue
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

    if wanted("get"):
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
            "--download-rate",
            type=_rate,
            help="bytes/s for this download, kept by the peer serving it",
        )
        get.add_argument(
            "--force-hard-link",
            action="store_true",
            help="hard-link the output to the cache file (made read-only) instead of copying it",
        )
        _recursive_flags(get)
        _one_shot(get)

    if wanted("preheat"):
        preheat = sub.add_parser("preheat", help="seed an image or a URL into storage")
        preheat_sub = preheat.add_subparsers(dest="what", required=True)
        image = preheat_sub.add_parser("image", help="every blob of an image, for one platform")
        url = preheat_sub.add_parser("url", help="one URL")
        for what in (image, url):
            _common(what)
            what.add_argument(
                "--timeout", type=_seconds, default=3600.0, help="seconds (default 3600)"
            )
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
        url.add_argument(
            "--header", action="append", default=[], help="'Name: value' request header"
        )
        url.add_argument("--digest", type=_digest, help="expected sha256:HEX of the content")

    if wanted("cache"):
        _cache_commands(sub)

    if wanted("status"):
        status = sub.add_parser("status", help="services, hosts and tasks of the cluster")
        _common(status)
        _one_shot(status, progress=False)

    if wanted("doctor"):
        doctor = sub.add_parser(
            "doctor", help="is it working on this host? runtimes, mirror, cluster, a probe pull"
        )
        _common(doctor)
        _one_shot(doctor, progress=False)
        _doctor_flags(doctor)

    if wanted("plugins"):
        plugins = sub.add_parser("plugins", help="list the loaded plugins")
        _common(plugins)
        plugins.add_argument("--json", action="store_true", help="print JSON")

    if wanted("contracts"):
        contracts = sub.add_parser("contracts", help="the NATS contracts")
        contracts_sub = contracts.add_subparsers(dest="contracts_command", required=True)
        asyncapi = contracts_sub.add_parser("asyncapi", help="print the AsyncAPI 3 document")
        asyncapi.add_argument("--prefix", default="swarmfly")
    return parser
