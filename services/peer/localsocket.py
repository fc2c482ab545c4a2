"""The peer's end of the local socket `swarmfly get` uses (``swarmfly.localproto`` is the
protocol, ``swarmfly.get.socket_client`` the other end).

The peer writes into the caller's descriptor only, so with the caller's permissions, never
its own. The kernel says who the caller is (``SO_PEERCRED``); HTTP framing would have lost the
descriptor, hence this small protocol. Here: its bounds in size, time and clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from swarmfly.errors import SwarmflyError
from swarmfly.localproto import MAX_LINE, error_line

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 10.0
"""Seconds a connection has to send its whole request."""
MAX_CLIENTS = 256


@dataclass(frozen=True)
class Caller:
    """Who is on the other end, as the kernel says (``SO_PEERCRED``)."""

    pid: int
    uid: int
    gid: int


@dataclass
class LocalRequest:
    body: bytes
    caller: Caller
    fd: int | None
    """The output file the caller opened, if it sent one; closed once the handler returns."""


Send = Callable[[bytes], Awaitable[None]]
Handler = Callable[[LocalRequest, Send], Awaitable[None]]


def caller_of(conn: socket.socket) -> Caller:
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Caller(pid, uid, gid)


async def _readable(conn: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(conn.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_reader(conn.fileno())


async def read_request(conn: socket.socket) -> tuple[bytes, list[int]]:
    """The request line and the descriptors that came with it (bounded in size and time)."""
    data, fds = b"", []
    async with asyncio.timeout(REQUEST_TIMEOUT):
        while b"\n" not in data:
            try:
                chunk, received, _, _ = socket.recv_fds(conn, 65536, 2)
            except BlockingIOError:
                await _readable(conn)
                continue
            fds += received
            if not chunk:
                break
            data += chunk
            if len(data) > MAX_LINE:
                break
    return data, fds


class LocalServer:
    """Accepts on ``path`` (mode 0600, or 0660 for ``group``) and hands each request on."""

    def __init__(self, path: Path, handler: Handler, group: str | None = None) -> None:
        self.path = path
        self.handler = handler
        self.group = group
        self._sock: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._clients: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        gid = grp.getgrnam(self.group).gr_gid if self.group else -1  # KeyError: a typo
        self.path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        mask = os.umask(0o177)
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(mask)
        if self.group:
            os.chown(self.path, -1, gid)
            os.chmod(self.path, 0o660)
        sock.listen(128)
        sock.setblocking(False)
        self._sock = sock
        self._accepting = asyncio.create_task(self._accept(sock))

    async def stop(self) -> None:
        tasks = [t for t in (self._accepting, *self._clients) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._sock is not None:
            self._sock.close()
        self.path.unlink(missing_ok=True)

    async def _accept(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:  # until stop() cancels it
            conn, _ = await loop.sock_accept(sock)
            if len(self._clients) >= MAX_CLIENTS:
                log.warning("local socket: %d gets at once, refusing one", MAX_CLIENTS)
                conn.close()
                continue
            task = asyncio.create_task(self._serve(conn))
            self._clients.add(task)
            task.add_done_callback(self._clients.discard)

    async def _serve(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        fds: list[int] = []
        with conn:
            try:
                caller = caller_of(conn)
                body, fds = await read_request(conn)
                if len(fds) > 1:
                    raise SwarmflyError("bad_request", "send one output descriptor at most")
                fd = fds[0] if fds else None
                await self.handler(
                    LocalRequest(body, caller, fd), lambda data: loop.sock_sendall(conn, data)
                )
            except TimeoutError:
                log.debug("local socket: a request did not arrive in time")
            except SwarmflyError as exc:
                with contextlib.suppress(OSError):
                    await loop.sock_sendall(conn, error_line(exc))
            except ConnectionError:
                log.debug("local socket: the client went away")
            finally:
                for fd in fds:
                    os.close(fd)
