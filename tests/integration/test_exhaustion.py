"""Server bounds against real connections (issue 13, item 10): idle and slowloris connections
are closed within the header timeout, connections over a cap are closed at once, a client
still gets served at the total cap, and every dashboard event-stream client shares one
snapshot per tick. Attackers connect from other loopback addresses (127.0.0.2, 127.0.0.3):
each address is a client of its own to the per-address cap."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from swarmfly.config import Config
from swarmfly.content import SourceRequest
from swarmfly.httpserver import Limits, serve_http
from swarmfly.natsserver import NatsServer
from swarmfly.testing import InProcessCluster, Origin, in_process_cluster

MiB = 1024 * 1024
HEADER_TIMEOUT = 1.0
IDLE_TIMEOUT = 1.0
PER_ADDRESS = 64
pytestmark = pytest.mark.timeout(60)


async def connect(url: str, source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = url.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port), local_addr=(source, 0))


async def closed_after(reader: asyncio.StreamReader, opened: float, limit: float) -> float:
    """Seconds from ``opened`` until the server closed the connection (EOF or reset)."""
    try:
        while await asyncio.wait_for(reader.read(65536), limit):
            pass
    except (ConnectionError, OSError):
        pass
    return time.monotonic() - opened


async def slowloris(url: str, source: str, opened: list[float]) -> float:
    """A request head sent one byte at a time, never finished."""
    reader, writer = await connect(url, source)
    started = time.monotonic()
    opened.append(started)
    watch = asyncio.create_task(closed_after(reader, started, 30))
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        for _ in range(100):  # 20 s at most, far past the header timeout
            if watch.done():
                break
            writer.write(b"X")
            await asyncio.sleep(0.2)
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()
    return await watch


@pytest.fixture
async def cluster(nats: NatsServer, prefix: str, tmp_path: Path) -> AsyncIterator[InProcessCluster]:
    def configure(config: Config) -> None:
        config.http.header_timeout = HEADER_TIMEOUT
        config.http.idle_timeout = IDLE_TIMEOUT
        config.http.max_per_address = PER_ADDRESS

    async with in_process_cluster(nats.url, prefix, tmp_path, configure=configure) as running:
        yield running


async def test_idle_and_slowloris_connections_never_stop_a_child_downloading(
    cluster: InProcessCluster, origin: Origin
) -> None:
    seed = cluster.storage.node.upload_url
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []
    for _ in range(300):
        reader, writer = await connect(seed, "127.0.0.2")
        idle.append((reader, writer, time.monotonic()))
    watches = [asyncio.create_task(closed_after(r, t, 30)) for r, _, t in idle]
    opened: list[float] = []
    loris = [asyncio.create_task(slowloris(seed, "127.0.0.3", opened)) for _ in range(20)]
    try:
        # While they hold on: a real child downloads through the seed's upload server.
        data = os.urandom(6 * MiB + 7)
        result = await cluster.peer.node.download(SourceRequest(origin.add("layer.bin", data)))
        assert result.content_length == len(data)
        assert result.bytes_p2p > 0, "the child got pieces from the attacked seed"
        idle_closed = await asyncio.gather(*watches)
        loris_closed = await asyncio.gather(*loris)
    finally:
        for _, writer, _ in idle:
            writer.close()
    # Over the per-address cap: closed at once. The others: within the header timeout.
    assert sum(t < 0.5 for t in idle_closed) >= 300 - PER_ADDRESS
    assert max(idle_closed) < HEADER_TIMEOUT + 2
    assert max(loris_closed) < HEADER_TIMEOUT + 2, "a trickled head was let in"


async def test_at_the_total_cap_a_new_client_is_served_and_an_idle_keep_alive_closes() -> None:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="served")

    app = web.Application()
    app.router.add_get("/hello", hello)
    limits = Limits(header_timeout=5, idle_timeout=IDLE_TIMEOUT, max_connections=32)
    async with AsyncExitStack() as stack:
        url = await serve_http(stack, app, "127.0.0.1", 0, limits)
        idle = [await connect(url, f"127.0.0.{2 + n % 4}") for n in range(32)]
        started = time.monotonic()
        watches = [asyncio.create_task(closed_after(r, started, 10)) for r, _ in idle]
        try:
            # Every place is taken by a connection that sent nothing: a client still gets in,
            # as the oldest of them makes room.
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"{url}/hello") as response,
            ):
                assert (response.status, await response.text()) == (200, "served")
            await asyncio.sleep(0.2)
            assert watches[0].done() and watches[0].result() < 0.5, "the oldest made room"
            # A kept-alive connection idle past idle_timeout is closed by the server.
            reader, writer = await connect(url, "127.0.0.1")
            writer.write(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"served"), 5)
            assert head.startswith(b"HTTP/1.1 200")
            answered = time.monotonic()
            idle_for = await closed_after(reader, answered, 10)
            writer.close()
            assert IDLE_TIMEOUT - 0.2 < idle_for < IDLE_TIMEOUT + 2
        finally:
            for _, writer in idle:
                writer.close()


async def test_every_dashboard_client_reads_one_snapshot_per_tick(
    cluster: InProcessCluster,
) -> None:
    feed = cluster.scheduler._feed
    feed.interval = 0.2  # more ticks in the time the test takes
    clients = 30
    seconds = 2.0

    async def listen(session: aiohttp.ClientSession) -> bytes:
        async with session.get(f"{cluster.scheduler.http_url}/api/events") as response:
            assert response.status == 200
            return await response.content.readuntil(b"\n\n")

    auth = {"Authorization": f"Bearer {cluster.scheduler.api_token}"}
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=30), headers=auth
    ) as session:
        before = feed.taken
        started = time.monotonic()
        readers = [asyncio.create_task(listen(session)) for _ in range(clients)]
        first = await asyncio.gather(*readers)
        # Held open for a while, the streams still cost one snapshot per tick in all.
        held = [
            await session.get(f"{cluster.scheduler.http_url}/api/events") for _ in range(clients)
        ]
        try:
            await asyncio.sleep(seconds)
            elapsed = time.monotonic() - started
            taken = feed.taken - before
        finally:
            for response in held:
                response.release()
    assert len(set(first)) == 1 and first[0].startswith(b"data: {")
    ticks = elapsed / feed.interval
    assert taken <= ticks + 2, f"{taken} snapshots in {ticks:.0f} ticks for {clients} clients"
    assert taken >= 1
