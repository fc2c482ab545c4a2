"""What every command starts from: the configuration (flags <- variables <- file), the
cluster this host's `swarmfly up` recorded, and the event loop a command runs on."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import orjson

from swarmfly.config import Config, load
from swarmfly.errors import SwarmflyError

if TYPE_CHECKING:
    pass


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


def _log_level(args: argparse.Namespace, config: Config) -> str:
    """The flag's, the variable's or the file's (config checked it, naming where it came
    from); unset, a get's is WARNING: its in-process peer would say at INFO what a service
    does."""
    return config.log_level or ("WARNING" if args.command in ("get", "cache") else "INFO")
