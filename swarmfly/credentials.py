"""Per-role NATS identities: one NKey user per role, and the nats-server authorization that
lets each role publish and subscribe only what it must (docs/deploy.md, "Permissions").

`swarmfly up` keeps the seeds in ``<state>/credentials`` (0700, files 0600) and gives the
server only their public keys. The same permissions, for a wildcard prefix and host ids,
are what compose, helm and the tests' shared server run with.

Kept to the standard library where `swarmfly get` reads it (``client_access``): that path
loads no NATS code.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROLES = ("scheduler", "storage", "peer", "client")
"""scheduler, storage and peer are the services; client is the CLI (get, status, preheat)."""
CREDENTIALS_DIR = "credentials"
SERVER_CONFIG = "auth.conf"
"""In the embedded server's data dir (``<state>/nats``)."""
CLUSTER_FILE = "cluster.json"
ANY = "*"
"""A prefix or host id that stands for every one: role-level permissions."""


class Unreadable(Exception):
    """The cluster's credentials exist but this user may not read them."""


def inbox_prefix(role: str) -> str:
    """Each role's replies arrive under its own prefix, which no other role may subscribe."""
    return f"_INBOX_{role}"


def seed_path(state_dir: Path, role: str) -> Path:
    return state_dir / CREDENTIALS_DIR / f"{role}.nk"


@dataclass(frozen=True)
class Identity:
    """A role's NKey user: the seed stays in its file; the server learns ``public_key``."""

    role: str
    seed_file: Path
    public_key: str

    @property
    def inbox_prefix(self) -> str:
        return inbox_prefix(self.role)


def ensure_identities(state_dir: Path) -> dict[str, Identity]:
    """Every role's identity, creating only the seeds that are missing: credentials handed
    out earlier (a CLI's, a restarted service's) keep working across restarts."""
    import nkeys  # nats-py's NKeys dependency; only `swarmfly up` creates keys

    from swarmfly.services.peer.store import private_dir

    folder = state_dir / CREDENTIALS_DIR
    private_dir(state_dir)
    private_dir(folder)
    identities = {}
    for role in ROLES:
        path = seed_path(state_dir, role)
        if not path.exists():
            seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
            _write_private(path, seed + b"\n", exclusive=True)
        text = path.read_bytes().strip()
        try:
            keys = nkeys.from_seed(bytearray(text))
        except Exception:  # nkeys and binascii errors alike: not a seed
            raise ValueError(f"{path} does not hold an NKey user seed; remove it") from None
        if not text.startswith(b"SU"):
            raise ValueError(f"{path} does not hold an NKey user seed; remove it")
        identities[role] = Identity(role, path, keys.public_key.decode())
        keys.wipe()
    return identities


def _write_private(path: Path, data: bytes, *, exclusive: bool = False) -> None:
    """Write ``data`` to a file only its owner may read, created so from the start (no
    moment at the umask's mode); otherwise replaced atomically."""
    if exclusive:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        return
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.unlink(missing_ok=True)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(partial, path)


RESPONSES: dict[str, Any] = {
    "scheduler": True,  # one reply per request, within nats-server's default 2 minutes
    "storage": {"max": 1, "expires": "6h"},  # a preheat answers when the blob is in
    # A download answers when done. The peer's connection carries the proxy's micro service
    # too, both answer $SRV discovery, and nats-server counts the second delivery of the
    # request against ``max`` as well: 3 lets both answer once.
    "peer": {"max": 3, "expires": "6h"},
}
"""What each service may answer: a reply goes only to a request it received, at most
``max`` times, until ``expires``."""


def kv_stream(prefix: str) -> str:
    """The JetStream stream of the schedulers' lease bucket, or ``*`` for every prefix."""
    if prefix == ANY:
        return ANY
    return "KV_" + re.sub(r"[^A-Za-z0-9_-]", "_", prefix) + "_scheduler"


SENT = ("register", "reschedule", "pieces", "result")
"""A host's subjects on its task's partition; each ends in the sender's type and host id."""


def host_publish(p: str, host_type: str, host_id: str) -> list[str]:
    """What a storage (``seed``) or peer (``normal``) host sends the schedulers: only under
    its own type and host id (the contracts' sender tokens), so it speaks for no other host
    and a peer never as storage; and it may read a task's digests."""
    sender = f"{host_type}.{host_id}"
    return [
        *(f"{p}.scheduler.*.{verb}.{sender}" for verb in SENT),
        f"{p}.scheduler.heartbeat.{sender}",
        f"{p}.scheduler.*.beat.{sender}",
        f"{p}.scheduler.leave.{sender}",
        f"{p}.scheduler.*.task",
    ]


def preheat_progress(p: str, sender: str = ">") -> str:
    """Where the hosts doing a preheat report to the CLI: a host only under its own type and
    host id (``sender``), and only the client listens."""
    return f"{p}.preheat.*.progress.{sender}"


def permissions(
    role: str, prefix: str, host_id: str = ANY, inbox: str | None = None
) -> dict[str, Any]:
    """The nats-server ``permissions`` of ``role`` under ``prefix``; ``host_id`` is the one
    storage or peer host the credentials belong to (``*``: any, where hosts are not known
    when the permissions are written); ``inbox`` the identity's own inbox prefix, where
    several hosts share a role (default: the role's)."""
    p = f"{prefix}.v1"
    inbox = f"{inbox or inbox_prefix(role)}.>"
    if role == "scheduler":
        stream = kv_stream(prefix)
        bucket = ANY if stream == ANY else stream.removeprefix("KV_")
        js = "$JS.API"
        publish = [
            f"{p}.scheduler.state",  # the dashboard's view merges every scheduler's
            f"{p}.storage.*.seed",
            "$SRV.INFO.storage",  # the storage fleet at start, before its heartbeats
            f"{js}.INFO",
            *(
                f"{js}.STREAM.{op}.{stream}"
                for op in ("INFO", "CREATE", "UPDATE", "MSG.GET", "PURGE")  # PURGE: dead members
            ),
            *(f"{js}.CONSUMER.{op}.{stream}" for op in ("CREATE", "INFO")),
            *(f"{js}.CONSUMER.{op}.{stream}.>" for op in ("CREATE", "INFO", "DELETE")),
            f"{js}.DIRECT.GET.{stream}",
            f"{js}.DIRECT.GET.{stream}.>",
            f"$JS.FC.{stream}.>",  # flow control of the lease watcher
            f"$KV.{bucket}.>",
        ]
        # $SYS.REQ.USER.AUTH: nats-server's auth callout, where one is set (swarmfly.callout)
        subscribe = [f"{p}.scheduler.>", inbox, "$SRV.>", "$SYS.REQ.USER.AUTH"]
    elif role == "storage":
        # a preheat goes on to the task's home, found by discovering the storage fleet
        publish = [
            *host_publish(p, "seed", host_id),
            f"{p}.storage.*.fill",
            "$SRV.INFO.storage",
            preheat_progress(p, f"seed.{host_id}"),
        ]
        subscribe = [f"{p}.storage.{host_id}.>", f"{p}.storage.preheat", inbox, "$SRV.>"]
    elif role == "peer":
        publish = [
            *host_publish(p, "normal", host_id),
            preheat_progress(p, f"normal.{host_id}"),
            # swarmfly cache: the storage fleet takes (and answers for) what this host imported
            *(f"{p}.storage.*.{verb}.normal.{host_id}" for verb in ("import", "cached")),
            "$SRV.INFO.storage",
            f"{p}.scheduler.address",  # where a host it is asked to probe (reach) is
        ]
        subscribe = [f"{p}.peer.{host_id}.>", inbox, "$SRV.>"]
    elif role == "client":
        publish = [
            f"{p}.peer.{host_id}.download",
            f"{p}.peer.{host_id}.progress",
            f"{p}.peer.{host_id}.preheat",  # the operator's: no service may ask a peer so
            f"{p}.peer.{host_id}.reach",  # swarmfly doctor: no service makes a peer probe
            f"{p}.storage.preheat",
            f"{p}.scheduler.state",
            "$SRV.>",
        ]
        subscribe = [inbox, preheat_progress(p)]
        return {"publish": {"allow": publish}, "subscribe": {"allow": subscribe}}
    else:
        raise ValueError(f"unknown role {role!r}")
    return {
        "publish": {"allow": publish},
        "subscribe": {"allow": subscribe},
        "allow_responses": RESPONSES[role],
    }


def authorization(
    users: dict[str, str], prefix: str, hosts: dict[str, str] | None = None
) -> dict[str, Any]:
    """nats-server's ``authorization`` block: each role's public NKey (``users``) with its
    permissions; ``hosts`` names the storage and peer host ids where they are known."""
    hosts = hosts or {}
    return {
        "users": [
            {"nkey": key, "permissions": permissions(role, prefix, hosts.get(role, ANY))}
            for role, key in users.items()
        ]
    }


def server_config(users: dict[str, str], prefix: str, hosts: dict[str, str] | None = None) -> str:
    """A nats-server configuration file (JSON is a subset of its syntax) holding only public
    keys and permissions."""
    return json.dumps({"authorization": authorization(users, prefix, hosts)}, indent=2) + "\n"


def write_server_config(
    folder: Path, identities: dict[str, Identity], prefix: str, hosts: dict[str, str]
) -> Path:
    """Written again at every start: the prefix and host ids may have changed since."""
    from swarmfly.services.peer.store import private_dir

    private_dir(folder)
    path = folder / SERVER_CONFIG
    users = {role: identity.public_key for role, identity in identities.items()}
    _write_private(path, server_config(users, prefix, hosts).encode())
    return path


def write_cluster_record(state_dir: Path, servers: list[str], client: Identity) -> Path:
    """``cluster.json``: where the NATS is and which file holds the CLI's seed (never a
    secret itself), readable by the user that ran `swarmfly up` only."""
    path = state_dir / CLUSTER_FILE
    record = {
        "nats": servers,
        "client": {"nkeys_seed": str(client.seed_file), "inbox_prefix": client.inbox_prefix},
    }
    _write_private(path, json.dumps(record).encode())
    return path


@dataclass(frozen=True)
class ClientAccess:
    servers: list[str]
    nkeys_seed: str
    inbox_prefix: str


def client_access(state_dir: Path) -> ClientAccess | None:
    """The CLI's way into the cluster `swarmfly up` recorded in ``state_dir``; None where
    none was recorded (or one without credentials). Raises Unreadable where the record or
    its seed exists but this user may not read it."""
    path = state_dir / CLUSTER_FILE
    try:
        record = json.loads(path.read_bytes())
    except PermissionError:
        raise Unreadable(str(state_dir)) from None
    except (OSError, ValueError):
        return None
    client = record.get("client") if isinstance(record, dict) else None
    if not isinstance(client, dict) or not isinstance(record.get("nats"), list):
        return None
    seed = str(client.get("nkeys_seed", ""))
    try:
        with open(seed, "rb"):
            pass
    except PermissionError:
        raise Unreadable(str(Path(seed).parent)) from None
    except OSError as exc:
        raise ValueError(f"{path} names {seed}: {exc.strerror}; start swarmfly up again") from None
    return ClientAccess(
        [str(s) for s in record["nats"]], seed, str(client.get("inbox_prefix") or "_INBOX")
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m swarmfly.credentials``: identities for a deployment of several hosts (as
    compose runs it), each seed written only where its service reads it, and the server's
    authorization with each host's own subjects and inbox."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m swarmfly.credentials")
    parser.add_argument("--prefix", default="swarmfly")
    parser.add_argument("--server-config", required=True, help="nats-server file to write")
    parser.add_argument(
        "--callout-issuer",
        metavar="SEED_PATH",
        help="the auth callout's account seed (made if missing): storage and peers then come"
        " in through the schedulers' callout ([callout]), and the identities given bypass it",
    )
    parser.add_argument(
        "identity", nargs="+", help="ROLE[:HOST_ID]=SEED_PATH, e.g. peer:peer-1=/p1/peer.nk"
    )
    args = parser.parse_args(argv)
    import nkeys

    users = []
    for spec in args.identity:
        who, _, path = spec.partition("=")
        role, _, host = who.partition(":")
        if role not in ROLES or not path:
            parser.error(f"not ROLE[:HOST_ID]=SEED_PATH: {spec}")
        keys = _keys(Path(path), nkeys.PREFIX_BYTE_USER)
        inbox = f"{inbox_prefix(role)}_{host}" if host else None
        rules = permissions(role, args.prefix, host or ANY, inbox)
        users.append({"nkey": keys.public_key.decode(), "permissions": rules})
        keys.wipe()
        print(f"{role}{':' + host if host else ''}: {path} (inbox {inbox or inbox_prefix(role)})")
    block: dict[str, Any] = {"users": users}
    if args.callout_issuer:
        issuer = _keys(Path(args.callout_issuer), nkeys.PREFIX_BYTE_ACCOUNT)
        block["auth_callout"] = {
            "issuer": issuer.public_key.decode(),
            "auth_users": [user["nkey"] for user in users],
        }
        print(f"callout issuer: {args.callout_issuer} ({issuer.public_key.decode()})")
        issuer.wipe()
    target = Path(args.server_config)
    target.parent.mkdir(parents=True, exist_ok=True)
    _write_private(target, json.dumps({"authorization": block}, indent=2).encode())
    return 0


def _keys(seed_file: Path, kind: int) -> Any:
    """The NKey pair in ``seed_file``, made there (0600, in a 0700 folder) if missing."""
    import nkeys

    from swarmfly.services.peer.store import private_dir

    private_dir(seed_file.parent)
    if not seed_file.exists():
        seed = nkeys.encode_seed(os.urandom(32), kind)
        _write_private(seed_file, seed + b"\n", exclusive=True)
    return nkeys.from_seed(bytearray(seed_file.read_bytes().strip()))


if __name__ == "__main__":
    raise SystemExit(main())
