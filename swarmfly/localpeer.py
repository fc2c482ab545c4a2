"""`swarmfly get` through the peer service of this host, over its local socket.

dfget asks dfdaemon over a Unix socket; so does `get` here: one JSON line, the
``peer.{host_id}.download`` request, sent with the descriptor of a file this process opened
next to the output (``SCM_RIGHTS``), answered by a JSON line of progress every
``PROGRESS_INTERVAL`` and a last line with the reply or the error; the file is renamed into
place once the peer says it is verified. So the peer writes with the caller's permissions,
whoever runs it (``services/peer/localsocket.py`` is the peer's end). This path loads nothing
but the standard library: many hosts' gets start at once when a job fans out, and on a busy
host every one of them pays for what it imports.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from swarmfly.content import SourceRequest
from swarmfly.errors import SwarmflyError, in_words
from swarmfly.ids import new_id, redact_url
from swarmfly.localproto import MAX_LINE, PEER_FILE, SILENCE, answer, current_umask, line

Progress = Callable[[int, int | None], None]


class PeerGone(SwarmflyError):
    """The local peer stopped answering mid-download: the caller may go on without it."""

    def __init__(self) -> None:
        super().__init__("unavailable", "the local peer service went away")


@dataclass(frozen=True)
class GetRequest:
    url: str
    output: Path
    headers: dict[str, str]
    digest: str | None = None
    timeout: float = 3600.0
    strategy: str | None = None
    piece_length: int | None = None
    hard_link: bool = False
    """Hard-link the output to the (then read-only) cache file instead of copying it."""
    umask: int = field(default_factory=current_umask)
    """The requester's: the peer creates the output with mode ``0o666 & ~umask``."""
    download_rate: int = 0
    """Bytes/s the serving peer may take for this download (0: its own limit only)."""

    def source(self) -> SourceRequest:
        return SourceRequest(self.url, self.headers, self.digest, self.piece_length)

    def body(self, output: Path) -> dict[str, Any]:
        """The ``peer.{host_id}.download`` request."""
        body: dict[str, Any] = {
            "download_id": new_id("dl"),
            "source": self.source().to_dict(),
            "output": str(output),
            "timeout_s": self.timeout,
            "umask": self.umask,
        }
        if self.strategy:
            body["strategy"] = self.strategy
        if self.hard_link:
            body["hard_link"] = True
        if self.download_rate:
            body["download_rate"] = self.download_rate
        return body


def parse_header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip() or any(c in name for c in " \t\r\n"):
        raise SwarmflyError("bad_request", f"header must look like 'Name: value', got {text!r}")
    return name.strip(), value.strip()


def cannot_write(output: Path, exc: OSError) -> SwarmflyError:
    """The error for an output this user cannot create: the path, and why in words (a file
    where a folder should be makes ``mkdir`` say "File exists")."""
    reason = in_words(exc)
    if isinstance(exc, FileExistsError | NotADirectoryError):
        blocking = next((p for p in output.parents if p.exists() and not p.is_dir()), None)
        reason = f"{blocking} is not a directory" if blocking else reason
    return SwarmflyError("bad_request", f"cannot write {output}: {reason}")


def summary(request: GetRequest, reply: dict[str, Any], via: str, started: float) -> dict[str, Any]:
    return {
        "url": redact_url(request.url),
        "output": reply["output"],
        "task_id": reply["task_id"],
        "content_length": reply["content_length"],
        "bytes_origin": reply["bytes_origin"],
        "bytes_p2p": reply["bytes_p2p"],
        "seconds": round(time.monotonic() - started, 6),
        "digest": reply.get("digest"),
        "via": via,
    }


def peer_record(state_dir: Path) -> dict[str, Any] | None:
    """What the peer service running on this state dir wrote about itself, if it lives."""
    try:
        data = json.loads((state_dir / PEER_FILE).read_bytes())
        os.kill(int(data["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return data if isinstance(data, dict) else None


def get(
    state_dir: Path,
    request: GetRequest,
    progress: Progress | None = None,
    socket_file: str | None = None,
) -> dict[str, Any] | None:
    """The download's summary; None when no peer answers on this host's socket (the caller
    goes through NATS, or runs a peer of its own). ``socket_file``: ``[peer] socket``, for a
    peer whose socket lies outside this caller's state dir (another user's peer)."""
    path = socket_file
    if not path:
        record = peer_record(state_dir)
        path = record.get("socket") if record is not None else None
    if not path:
        return None
    output = request.output.absolute()
    if output.is_dir():
        raise SwarmflyError("bad_request", f"{output} is a directory")
    started = time.monotonic()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(SILENCE)
        try:
            conn.connect(str(path))
        except OSError:
            return None  # nobody listens: the peer went away since it wrote its record
        if request.hard_link:  # the peer links its cache file: only for its own user
            reply = _ask(conn, request.body(output), None, progress, started + request.timeout)
        else:
            reply = _into_file(conn, request, output, progress, started + request.timeout)
    return summary(request, reply, "peer", started)


def _into_file(
    conn: socket.socket,
    request: GetRequest,
    output: Path,
    progress: Progress | None,
    deadline: float,
) -> dict[str, Any]:
    """Open a file next to ``output`` as this (the calling) user, let the peer fill it
    through its descriptor, and rename it into place once the peer says it is verified."""
    tmp = output.parent / f".{output.name}.swarmfly-{os.getpid()}-{os.urandom(4).hex()}"
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
    except OSError as exc:
        raise cannot_write(output, exc) from None
    try:
        try:
            os.fchmod(fd, 0o666 & ~request.umask)
            reply = _ask(conn, request.body(output), fd, progress, deadline)
        finally:
            os.close(fd)
        os.replace(tmp, output)
        return reply
    finally:
        tmp.unlink(missing_ok=True)


def _ask(
    conn: socket.socket,
    body: dict[str, Any],
    fd: int | None,
    progress: Progress | None,
    deadline: float,
) -> dict[str, Any]:
    request = line(body)
    try:
        sent = socket.send_fds(conn, [request], [fd]) if fd is not None else conn.send(request)
        conn.sendall(request[sent:])
        lines = conn.makefile("rb")
    except OSError:
        raise PeerGone() from None
    with lines:
        return _answer(lines, progress, deadline)


def _answer(lines: Any, progress: Progress | None, deadline: float) -> dict[str, Any]:
    """The reply in the peer's last line; progress lines on the way."""
    try:
        while time.monotonic() < deadline + SILENCE:
            text = lines.readline(MAX_LINE)
            if not text:
                break
            kind, data = answer(text)
            if kind == "reply":
                return data
            if progress is not None:
                progress(data["completed_bytes"], data["content_length"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    raise PeerGone()
