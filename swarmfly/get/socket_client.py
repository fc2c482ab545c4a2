"""`swarmfly get` through the peer service of this host, over its local socket.

dfget asks dfdaemon over a Unix socket; so does `get` here: one JSON line, the
``peer.{host_id}.download`` request, sent with the descriptor of a file this process opened
next to the output (``SCM_RIGHTS``), answered by JSON lines of progress as the download moves
and a last line with the reply or the error; the file is renamed into place once the peer
says it is verified. So the peer writes with the caller's permissions, whoever runs it
(``swarmfly.localproto`` is the protocol, ``services/peer/localsocket.py`` the peer's end).
This path loads nothing but the standard library: many hosts' gets start at once when a job
fans out, and on a busy host every one of them pays for what it imports.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from swarmfly.errors import SwarmflyError
from swarmfly.get.request import GetRequest, PeerGone, Progress, cannot_write, summary
from swarmfly.localproto import MAX_LINE, PEER_FILE, SILENCE, answer, line, send
from swarmfly.placefile import place_file


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
    """The download's summary (of a ``GetRequest.checked`` request); None when no peer
    answers on this host's socket (the caller goes through NATS, or runs a peer of its own).
    PeerGone when it stops answering mid-download. ``socket_file``: ``[peer] socket``, for a
    peer whose socket lies outside this caller's state dir (another user's peer)."""
    path = _socket_of(state_dir, socket_file)
    if not path:
        return None
    output = request.output
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


def peer_socket(state_dir: Path, socket_file: str | None = None) -> str | None:
    """The socket of this host's peer service (``[peer] socket``, else its record's); None
    when none runs."""
    return _socket_of(state_dir, socket_file)


def _socket_of(state_dir: Path, socket_file: str | None) -> str | None:
    if socket_file:
        return socket_file
    record = peer_record(state_dir)
    path = record.get("socket") if record is not None else None
    return path if isinstance(path, str) else None


def entries(
    state_dir: Path,
    url: str,
    headers: dict[str, str],
    limit: int,
    socket_file: str | None = None,
) -> list[dict[str, Any]] | None:
    """The files below ``url`` as this host's peer lists them, with its source's
    credentials (`get --recursive`): ``{"entry": …}`` lines, then ``{"listed": …}``. None
    when no peer answers here; PeerGone when it stops answering; the peer's error raised."""
    path = _socket_of(state_dir, socket_file)
    if not path:
        return None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(SILENCE)
        try:
            conn.connect(path)
        except OSError:
            return None
        try:
            send(conn, line({"list": {"url": url, "headers": headers, "limit": limit}}))
            lines = conn.makefile("rb")
        except OSError:
            raise PeerGone() from None
        found: list[dict[str, Any]] = []
        with lines:
            try:
                while len(found) <= limit:
                    data = json.loads(lines.readline(MAX_LINE) or b"null")
                    if "entry" in data:
                        found.append(data["entry"])
                    elif "listed" in data:
                        return found
                    else:
                        raise SwarmflyError.from_dict(data)
            except (OSError, ValueError, KeyError, TypeError):
                pass
    raise PeerGone()


def _into_file(
    conn: socket.socket,
    request: GetRequest,
    output: Path,
    progress: Progress | None,
    deadline: float,
) -> dict[str, Any]:
    """Open a file next to ``output`` as this (the calling) user, let the peer fill it
    through its descriptor, and move it into place once the peer says it is verified (over
    an existing file only with ``overwrite``)."""
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
        place_file(str(tmp), str(output), overwrite=request.overwrite)
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
        send(conn, request, fd)
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
