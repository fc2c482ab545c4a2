"""`swarmfly cache`: files put into the swarm from this host (Dragonfly's dfcache).

``cache import PATH`` hands the file to this host's peer over its local socket (the
descriptor of the file this user opened, as `get` hands its output): the peer hashes it into
its cache as a complete task and has the storage instances the task's rendezvous order
names take it from it, verified. The importing host is the origin of those bytes and their
sha256 is the task's: the reference ``swarmfly:sha256:<hex>`` names the content, `get` and
``cache export`` accept it, and every byte a getter receives is checked against that digest.
``cache stat`` and ``cache rm`` ask the same peer, which asks the storage fleet.

The standard library only here (parsing, the socket's client), as for `get`.
"""

from __future__ import annotations

import json
import os
import re
import socket
import stat
from pathlib import Path
from typing import Any

from swarmfly.errors import SwarmflyError
from swarmfly.ids import DIGEST, TASK_ID, task_id
from swarmfly.localproto import MAX_LINE, line, send

SCHEME = "swarmfly"
"""The reference's scheme: ``swarmfly:sha256:<hex>`` names no host, so no origin is asked."""
MAX_TTL = 365 * 24 * 3600.0
"""The longest a storage instance promises to keep an import."""
MIN_TTL = 1.0
DEFAULT_TTL = 24 * 3600.0
"""dfcache's default is an hour of upload; a cluster cache keeps an import a day unless told."""
MAX_REPLICAS = 16
IMPORT_SECONDS = 3600.0
"""How long an import (into the peer, then into storage) may take at most by default."""
ANSWER_SECONDS = 30.0
"""How long the peer may take to answer a stat or a removal."""
_TTL = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)\Z")
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_REFERENCE = re.compile(r"^swarmfly:(sha256:[0-9a-f]{64})\Z")


def parse_ttl(text: str) -> float:
    """``30m``, ``1h``, ``7d`` or seconds, between ``MIN_TTL`` and ``MAX_TTL``."""
    match = _TTL.fullmatch(text.strip().lower())
    if match is None:
        raise ValueError(f"{text[:40]!r} is not a duration such as 90s, 30m, 1h or 7d")
    seconds = float(match[1]) * _UNITS[match[2]]
    if not MIN_TTL <= seconds <= MAX_TTL:
        raise ValueError(f"{text[:40]!r}: give a TTL from 1s to 365d")
    return seconds


def reference(digest: str) -> str:
    """What `get` and ``cache export`` accept for imported content."""
    return f"{SCHEME}:{digest}"


def is_reference(url: str) -> bool:
    return url.startswith(f"{SCHEME}:")


def digest_of(url: str) -> str:
    """The ``sha256:<hex>`` a reference names; ``bad_request`` for anything else."""
    match = _REFERENCE.fullmatch(url)
    if match is None:
        raise SwarmflyError(
            "bad_request", f"{url[:80]!r} is no cache reference (swarmfly:sha256:<64 hex>)"
        )
    return match[1]


def cache_task_id(digest: str) -> str:
    """The task of imported content: keyed by its digest under its reference, so it meets no
    URL's task (an origin's content with that digest stays that origin's, DESIGN §9)."""
    return task_id(reference(digest), digest=digest)


def parse_id(text: str) -> dict[str, str]:
    """What ``cache stat/rm/export`` take: the digest (``sha256:<hex>``), the reference, or
    the task id an import printed; as the local request's ``digest`` or ``task_id``."""
    word = text.strip().lower()
    if word.startswith(f"{SCHEME}:"):
        return {"digest": digest_of(word)}
    if DIGEST.fullmatch(word):
        return {"digest": word}
    if TASK_ID.fullmatch(word):
        return {"task_id": word}
    raise SwarmflyError(
        "bad_request",
        f"{text[:80]!r} is no cache id: give sha256:<64 hex>, swarmfly:sha256:<64 hex> or"
        " the 64-hex task id `cache import` printed",
    )


def open_import(path: Path) -> int:
    """A descriptor of ``path`` for the peer to read: a readable regular file, opened by this
    user (the peer reads with this user's permission, never its own)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise SwarmflyError("not_found", f"{path}: no such file") from None
    except PermissionError:
        raise SwarmflyError("forbidden", f"{path}: permission denied") from None
    except OSError as exc:
        raise SwarmflyError("bad_request", f"{path}: {exc.strerror}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"
        raise SwarmflyError("bad_request", f"{path} is {kind}: import one regular file")
    return fd


def ask(
    socket_file: str | None, body: dict[str, Any], fd: int | None, timeout: float
) -> dict[str, Any]:
    """One ``cache`` request on the local peer's socket and its ``cached`` answer (its error
    raised); ``unavailable`` when no peer service runs on this host: only a peer can be the
    origin of an import."""
    if not socket_file:
        raise SwarmflyError(
            "unavailable",
            "no peer service runs on this host (swarmfly up or swarmfly peer): `cache` asks it",
        )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        try:
            conn.connect(socket_file)
            request = line({"cache": body})
            send(conn, request, fd)
            with conn.makefile("rb") as lines:
                text = lines.readline(MAX_LINE)
        except TimeoutError:
            raise SwarmflyError("timeout", f"the peer did not answer in {timeout:g}s") from None
        except OSError as exc:
            raise SwarmflyError("unavailable", f"the local peer: {exc.strerror or exc}") from None
    try:
        data = json.loads(text or b"null")
        if isinstance(data, dict) and "cached" in data:
            answer: dict[str, Any] = data["cached"]
            return answer
        error = SwarmflyError.from_dict(data)
    except (ValueError, KeyError, TypeError):
        raise SwarmflyError("unavailable", "the local peer went away") from None
    raise error
