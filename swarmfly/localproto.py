"""The local socket's protocol, for both of its ends: `swarmfly get`
(``swarmfly.get.socket_client``) and the peer service (``services/peer/localsocket.py``).
``contracts/localsocket.json`` is its contract.

Where: a peer writes ``PEER_FILE`` into its state dir, naming its socket. What: the caller
sends one JSON line, the ``peer.{host_id}.download`` request with the requester's ``umask``,
and with it the descriptor of the output file it opened (``SCM_RIGHTS``); the peer answers
with a progress line as the download moves (at most one per ``PROGRESS_INTERVAL``, at least
one per ``KEEPALIVE``) and a last line, the reply or the error. Only the standard library
here: every `get` on a host loads it before its first byte.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

from swarmfly.errors import SwarmflyError

PEER_FILE = "peer.json"
"""Written by a peer service into its state dir: its host id, pid, upload address and socket."""
SOCKET = "peer.sock"
MAX_SOCKET_PATH = 107
"""Bytes in a Unix socket's path (sun_path, less its NUL)."""
MAX_LINE = 1 << 20
"""Bytes of one line either way (the NATS request limit)."""
PROGRESS_INTERVAL = 0.5
"""Seconds between progress lines at least (a bar's refresh)."""
KEEPALIVE = 2.0
"""Seconds between progress lines at most, while nothing moves."""
SILENCE = 10.0
"""Seconds without a line from the peer after which it counts as gone."""


def socket_path(state_dir: Path) -> Path | None:
    """Where a peer on this state dir listens locally; None when the path is too long for
    a Unix socket (then `get` goes through NATS)."""
    path = state_dir.absolute() / SOCKET
    return path if len(os.fsencode(path)) <= MAX_SOCKET_PATH else None


def current_umask() -> int:
    """This process's umask, which outputs are created with (read without changing it where
    /proc tells it: other threads may be creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8) & 0o777
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def line(message: dict[str, Any]) -> bytes:
    """One line of the protocol: a request, or ``{"progress": …}``, ``{"reply": …}`` or an
    error's dict."""
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def send(conn: socket.socket, request: bytes, fd: int | None = None) -> None:
    """Send a request line, with ``fd`` (``SCM_RIGHTS``). The peer may refuse the request
    and hang up before the write is done: its answer, still to be read, says why, so a
    broken pipe here is not the caller's error."""
    try:
        sent = socket.send_fds(conn, [request], [fd]) if fd is not None else 0
        if sent < len(request):
            conn.sendall(request[sent:])
    except (BrokenPipeError, ConnectionResetError):
        pass


def progress_line(state: dict[str, Any]) -> bytes:
    return line({"progress": state})


def reply_line(reply: dict[str, Any]) -> bytes:
    return line({"reply": reply})


def error_line(error: SwarmflyError) -> bytes:
    return line(error.to_dict())


def answer(text: bytes) -> tuple[str, dict[str, Any]]:
    """One line from the peer: ``("progress", state)`` or ``("reply", reply)``; an error line
    is raised. ValueError, KeyError or TypeError when the line is none of these."""
    data = json.loads(text)
    if "progress" in data:
        state: dict[str, Any] = data["progress"]
        return "progress", state
    if "reply" in data:
        reply: dict[str, Any] = data["reply"]
        return "reply", reply
    raise SwarmflyError.from_dict(data)
