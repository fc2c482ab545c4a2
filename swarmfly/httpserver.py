"""Run an aiohttp application on a listen address, and send file spans to its clients.

Every server runs under the bounds mature servers set (nginx's ``client_header_timeout``,
``keepalive_timeout`` and ``limit_conn``): a connection must send a whole request head within
``header_timeout``, may sit idle between requests for ``idle_timeout``, and is admitted only
within a per-address and a total connection cap; an excess connection is closed at once. At the
total cap, the oldest connection that has not sent a request head yet makes room (nginx reuses
idle connections the same way), so idle and slowloris connections cannot lock clients out.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

from aiohttp import web

from swarmfly.httpheaders import http_url
from swarmfly.ratelimit import TokenBucket

CHUNK = 128 * 1024
HEAD_LIMIT = 64 * 1024
"""Bytes buffered while waiting for a request head; past them the HTTP parser is handed what
came (and refuses it)."""
_REQUEST_START = re.compile(rb"^[A-Z]{0,15}(?: |\Z)")
"""What the first bytes of an HTTP request look like (a method, then a space): anything else
goes to the parser at once, to be refused."""
FD_SHARE = 4
"""A server admits at most a quarter of the process's file descriptors: the rest stay free
for the store, the origin, NATS and the process's other servers."""


@dataclass(frozen=True)
class Limits:
    header_timeout: float = 10.0
    """Seconds from accept to a whole first request head."""
    idle_timeout: float = 20.0
    """Seconds a keep-alive connection may wait for its next request: above clients' own
    15 s (aiohttp's), so a client, not the server, closes a connection it keeps."""
    max_connections: int = 4096
    max_per_address: int = 256

    def total(self) -> int:
        """The total cap, within this process's share of file descriptors."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return self.max_connections
        return max(16, min(self.max_connections, soft // FD_SHARE))


_default = Limits()


def use_limits(limits: Limits) -> Callable[[], None]:
    """Make ``limits`` the process's default (the configuration's ``[http]``); returns what
    puts the previous one back."""
    global _default
    previous, _default = _default, limits
    return lambda: _restore(previous)


def _restore(limits: Limits) -> None:
    global _default
    _default = limits


def default_limits() -> Limits:
    return _default


def raise_open_files() -> tuple[int, int]:
    """Raise ``RLIMIT_NOFILE``'s soft limit to the hard one, as servers do at start (the
    usual 1024 is a few hundred clients); returns (soft, hard) as they are now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):  # e.g. macOS caps below "infinity"
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    result: tuple[int, int] = resource.getrlimit(resource.RLIMIT_NOFILE)
    return result


class Connections:
    """The live connections of one server, counted by client address."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.cap = limits.total()
        self.total = 0
        self.by_address: Counter[str] = Counter()
        self.waiting: dict[Admitted, None] = {}
        """Connections without a request head yet, oldest first: what makes room at the cap."""
        self.refused = 0

    def admit(self, address: str) -> bool:
        if self.by_address[address] >= self.limits.max_per_address:
            return False
        if self.total >= self.cap:
            if not self.waiting:
                return False
            next(iter(self.waiting)).evict()
        self.total += 1
        self.by_address[address] += 1
        return True

    def release(self, address: str) -> None:
        self.total -= 1
        self.by_address[address] -= 1
        if self.by_address[address] <= 0:
            del self.by_address[address]


class Admitted(asyncio.Protocol):
    """One connection under a server's bounds: admitted within its caps, closed unless a whole
    request head arrives within ``header_timeout``, then handed, with the bytes read so far,
    to the protocol ``choose`` picks for them (aiohttp's handler, or another); every event
    after that goes to it, and the connection's place is given back when it closes."""

    def __init__(
        self,
        connections: Connections,
        choose: Callable[[bytes], asyncio.Protocol],
    ) -> None:
        self.connections = connections
        self.choose = choose
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.address = ""
        self.inner: asyncio.Protocol | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._counted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.address = str(peer[0]) if isinstance(peer, tuple) else str(peer)
        if not self.connections.admit(self.address):
            self.connections.refused += 1
            transport.abort()
            return
        self._counted = True
        self.connections.waiting[self] = None
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.connections.limits.header_timeout, self.close)

    def close(self) -> None:
        """Give up on a connection that never sent a request head."""
        self.connections.waiting.pop(self, None)
        if self.transport is not None:
            self.transport.abort()

    def evict(self) -> None:
        """Close, and give the place back now: a new connection takes it."""
        if self._counted:
            self._counted = False
            self.connections.release(self.address)
        self.close()

    def data_received(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.data_received(data)
            return
        seen = max(0, len(self.buffer) - 3)
        self.buffer += data
        whole = self.buffer.find(b"\r\n\r\n", seen) >= 0 or len(self.buffer) > HEAD_LIMIT
        if not whole and _REQUEST_START.match(self.buffer[:16]):
            return
        if self._timer is not None:
            self._timer.cancel()
        self.connections.waiting.pop(self, None)
        assert self.transport is not None
        buffered, self.buffer = bytes(self.buffer), bytearray()
        self.inner = self.choose(buffered)
        self.inner.connection_made(self.transport)
        self.inner.data_received(buffered)

    def eof_received(self) -> bool | None:
        if self.inner is not None:
            return self.inner.eof_received()
        return None

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.connections.waiting.pop(self, None)
        if self._counted:
            self._counted = False
            self.connections.release(self.address)
        if self.inner is not None:
            self.inner.connection_lost(exc)


async def listen(
    stack: AsyncExitStack,
    choose: Callable[[bytes], asyncio.Protocol],
    host: str,
    port: int,
    limits: Limits,
) -> tuple[asyncio.Server, Connections]:
    """A listening socket whose connections run under ``limits``; closed with ``stack``."""
    connections = Connections(limits)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: Admitted(connections, choose), host, port, reuse_address=True
    )
    stack.callback(server.close)
    return server, connections


async def serve_http(
    stack: AsyncExitStack,
    app: web.Application,
    host: str,
    port: int,
    limits: Limits | None = None,
) -> str:
    """Start ``app`` under ``limits`` (the process's default when None) and return its base
    URL (port 0 picks a free one)."""
    limits = limits or _default
    # Long-polls would hold a graceful shutdown for their whole wait: give them a second.
    runner = web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        shutdown_timeout=1.0,
        keepalive_timeout=limits.idle_timeout,
    )
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    http = runner.server
    assert http is not None
    server, _ = await listen(stack, lambda _: http(), host, port, limits)
    return http_url(host, server.sockets[0].getsockname()[1])


def healthz(ok: bool = True, **details: int) -> web.Response:
    """The one ``/healthz`` body of every service: ``{"ok": true|false, …counts}``, 200 when
    ok and 503 when not, so one probe (Kubernetes, compose, `swarmfly doctor`) reads them all;
    ``details`` are a service's own counts (an upload server's ``uploads``)."""
    return web.json_response({"ok": ok, **details}, status=200 if ok else 503)


class SlowReader(ConnectionError):
    """The client read more slowly than the send deadline allows: it was cut off."""


async def send_span(
    request: web.Request,
    response: web.StreamResponse,
    path: Path,
    start: int,
    size: int,
    bucket: TokenBucket | None = None,
    min_rate: int = 0,
    window: float = 4.0,
) -> None:
    """Write bytes [start, start+size) of a file to a prepared response with sendfile (the
    kernel copies, also when paced: ``bucket`` releases it a chunk at a time), or in chunks
    read and written here where the loop has no sendfile (uvloop).

    With ``min_rate``, each ``min_rate * window`` bytes must go out within ``window``
    seconds (time spent waiting for our own pacing aside), or the client is cut off
    (``SlowReader``): a reader that barely reads must not hold an upload slot for ever.
    """
    paced = bucket is not None and not bucket.unlimited
    # As few sends as the deadline allows (each a bucket wait and a sendfile call, which cost
    # more than the bytes of a CHUNK); paced, no more than a burst at once.
    step = max(CHUNK, int(min_rate * window)) if min_rate > 0 else size
    if paced:
        assert bucket is not None
        step = max(CHUNK, min(step, int(bucket.burst)))
    offset, end = start, start + size
    native = request.transport is not None
    with open(path, "rb") as handle:
        while offset < end:
            count = min(step if native else CHUNK, end - offset)
            if paced:
                assert bucket is not None
                await bucket.take(count)
            async with _deadline(request, min_rate, window):
                sent = await _sendfile(request, handle, offset, count) if native else None
                if sent is None:  # no sendfile in this loop: these tokens pay for a copy
                    native = False
                    sent = await _copy(response, handle, offset, count)
            if sent == 0:
                raise OSError(f"{path} ends before byte {end}")
            offset += sent


async def _sendfile(request: web.Request, handle: BinaryIO, offset: int, count: int) -> int | None:
    """Up to ``count`` bytes at ``offset`` by sendfile; None where the loop cannot."""
    if request.transport is None:
        return None
    try:
        loop = asyncio.get_running_loop()
        return await loop.sendfile(request.transport, handle, offset, count, fallback=False)
    except (NotImplementedError, asyncio.SendfileNotAvailableError):
        return None


async def _copy(response: web.StreamResponse, handle: BinaryIO, offset: int, count: int) -> int:
    data = os.pread(handle.fileno(), count, offset)
    await response.write(data)
    return len(data)


@contextlib.asynccontextmanager
async def _deadline(request: web.Request, min_rate: int, window: float) -> AsyncIterator[None]:
    """Cut the client off when the block inside takes longer than ``window``."""
    if min_rate <= 0:
        yield
        return
    try:
        async with asyncio.timeout(window):
            yield
    except TimeoutError:
        if request.transport is not None:
            request.transport.abort()
        raise SlowReader(f"the client read under {min_rate} bytes/s") from None
