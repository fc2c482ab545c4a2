"""Cache GC on a real peer node: files leave the disk, least recently used first, and a task
being downloaded or uploaded stays until it is idle again."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from swarmfly.capability import Signer
from swarmfly.config import Config
from swarmfly.content import SourceRequest
from swarmfly.pluginhost import Plugins
from swarmfly.services.peer.gc import GcPolicy
from swarmfly.services.peer.host import HostSettings, PeerHost
from swarmfly.testing import Origin, metric_value, wait_until

MiB = 1024 * 1024


@asynccontextmanager
async def peer_node(
    state: Path, gc: GcPolicy, *, origin_concurrency: int | None = None, **settings: Any
) -> AsyncIterator[PeerHost]:
    """A started peer node with no control plane (it reads the origin), serving uploads on
    loopback; the GC loop's own interval is far off, tests run collections themselves."""
    config = Config(state_dir=state)
    config.peer.listen = "127.0.0.1"
    for key, value in settings.items():  # the [peer] settings a test sets
        setattr(config.peer, key, value)
    base = HostSettings.of(config, "peer", state)
    download = base.download
    if origin_concurrency is not None:
        download = dataclasses.replace(download, origin_concurrency=origin_concurrency)
    plugins = Plugins.load()
    node = PeerHost(
        dataclasses.replace(base, gc=gc, download=download),
        None,
        [],
        plugins,
    )
    try:
        async with AsyncExitStack() as stack:
            await node.start(stack)
            yield node
    finally:
        await plugins.close()


def digest_of(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


async def test_quota_evicts_the_least_recently_used_down_to_the_low_watermark(
    origin: Origin, tmp_path: Path
) -> None:
    async with peer_node(tmp_path, GcPolicy(quota=10 * MiB)) as node:
        urls = [origin.add(f"f{i}.bin", os.urandom(4 * MiB)) for i in range(3)]
        results = []
        for url in urls:
            results.append(await node.download(SourceRequest(url)))
            await asyncio.sleep(0.01)  # distinct access times
        oldest, middle, newest = (r.task_id for r in results)
        evicted = await node.collect(time.time())
        # 12 MiB > 90% of 10: the least recently used go until below 70% (7 MiB).
        assert evicted == [oldest, middle]
        for task_id in evicted:
            assert not (tmp_path / "tasks" / task_id[:2] / task_id).exists()
        assert set(node.store.tasks) == {newest}
        again = await node.download(SourceRequest(urls[0]))  # the evicted one comes back
        assert again.bytes_origin == 4 * MiB


async def test_ttl_expires_unused_tasks(origin: Origin, tmp_path: Path) -> None:
    async with peer_node(tmp_path, GcPolicy(ttl=60)) as node:
        result = await node.download(SourceRequest(origin.add("t.bin", os.urandom(MiB))))
        assert await node.collect(time.time()) == []
        assert await node.collect(time.time() + 61) == [result.task_id]
        assert node.store.tasks == {}


POLICIES = {"quota": GcPolicy(quota=MiB), "ttl": GcPolicy(ttl=1.0)}
"""Either way every task is due: over the high watermark, or unused for longer than the TTL
(collections run an hour ahead)."""


@pytest.mark.parametrize("policy", POLICIES)
async def test_a_task_being_downloaded_is_never_evicted(tmp_path: Path, policy: str) -> None:
    data = os.urandom(4 * MiB)
    async with (
        Origin(rate=2 * MiB).serve() as origin,
        peer_node(tmp_path, POLICIES[policy], origin_concurrency=1) as node,
    ):
        idle = await node.download(SourceRequest(origin.add("idle.bin", os.urandom(MiB))))
        run = await node.begin(SourceRequest(origin.add("x.bin", data), digest=digest_of(data)))
        stored = node.store.tasks[run.task_id]
        # One 1 MiB piece at a time at 2 MiB/s: a collection runs mid-download.
        await wait_until(lambda: 1 <= len(stored.done) < 4, timeout=10, interval=0.02)
        evicted = await node.collect(time.time() + 3600)
        assert not run.running.done(), "the collection ran mid-download"
        assert evicted == [idle.task_id], "the idle task goes, the running one stays"
        assert node.store.tasks.get(run.task_id) is stored and stored.data_path.is_file()

        result = await run.result()
        assert result.digest == digest_of(data)
        assert result.bytes_origin == len(data), "read once: the download never restarted"
        assert stored.data_path.read_bytes() == data
        # Idle now, it is as due as any other.
        assert await node.collect(time.time() + 3600) == [run.task_id]
        assert not stored.dir.exists()


async def test_a_task_being_uploaded_is_never_evicted(origin: Origin, tmp_path: Path) -> None:
    files = {name: os.urandom(2 * MiB) for name in ("served", "queued", "idle")}
    # 1 MiB/s uplink: one upload slot, a 1 MiB piece takes about a second to send.
    async with peer_node(tmp_path, GcPolicy(quota=MiB), upload_rate=MiB) as node:
        tasks = {
            name: (await node.download(SourceRequest(origin.add(name, data)))).task_id
            for name, data in files.items()
        }
        assert node.upload.slots == 1
        signer = Signer.generate()  # no scheduler here: the test signs as one would
        node.upload.trust([signer.verify_key])

        async def read_piece(
            session: aiohttp.ClientSession, name: str, started: asyncio.Event
        ) -> bytes:
            """A child reading piece 0, as a slow reader would see it."""
            url = f"{node.upload_url}/v1/tasks/{tasks[name]}/data"
            token = signer.mint(tasks[name], "child", time.time())
            headers = {"Range": f"bytes=0-{MiB - 1}", "Authorization": f"Bearer {token}"}
            async with session.get(url, headers=headers) as response:
                assert response.status == 206, await response.text()
                body = await response.content.read(64 * 1024)
                started.set()
                return body + await response.read()

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            serving, waiting = asyncio.Event(), asyncio.Event()
            served = asyncio.create_task(read_piece(session, "served", serving))
            queued: asyncio.Task[bytes] | None = None
            try:
                await asyncio.wait_for(serving.wait(), 10)
                # A second child waits for the only slot: its upload has begun too.
                queued = asyncio.create_task(read_piece(session, "queued", waiting))
                await wait_until(lambda: node.upload.load == 2, timeout=10, interval=0.01)
                evicted = await node.collect(time.time())
                assert not served.done() and not waiting.is_set(), "the collection ran mid-upload"
                assert evicted == [tasks["idle"]], "the idle task goes, the uploaded ones stay"
                bodies = {"served": await served, "queued": await queued}
            finally:
                for reader in (served, queued):
                    if reader is not None:
                        reader.cancel()
        for name, body in bodies.items():
            stored = node.store.tasks[tasks[name]]
            assert body == files[name][:MiB], name
            assert hashlib.sha256(body).hexdigest() == stored.digests[0], name
        await wait_until(lambda: node.upload.load == 0, timeout=5)
        assert sorted(await node.collect(time.time())) == sorted([tasks["served"], tasks["queued"]])
        assert node.store.tasks == {}


async def test_a_task_dir_left_without_metadata_is_counted_until_collected(
    origin: Origin, tmp_path: Path
) -> None:
    urls = [origin.add(name, os.urandom(size)) for name, size in (("kept", MiB), ("lost", 2 * MiB))]
    async with peer_node(tmp_path, GcPolicy()) as node:
        kept, lost = [(await node.download(SourceRequest(url))).task_id for url in urls]
    lost_dir = tmp_path / "tasks" / lost[:2] / lost
    (lost_dir / "meta.json").unlink()  # as a kill -9 before its first save leaves it

    async with peer_node(tmp_path, GcPolicy()) as node:
        gauge = await metric_value(node.upload_url, "swarmfly_peer_cache_bytes")
        assert 3 * MiB <= gauge < 3 * MiB + 64 * 1024, "the orphan's blocks are counted"
        assert await metric_value(node.upload_url, "swarmfly_peer_cache_tasks") == 2
        assert await node.collect(time.time()) == [lost], "orphans go whatever the policy"
        assert not lost_dir.exists()
        assert await metric_value(node.upload_url, "swarmfly_peer_cache_bytes") == MiB
        again = await node.download(SourceRequest(urls[0]))
        assert again.task_id == kept and again.bytes_origin == 0, "the loaded task is kept"
        assert origin.bytes_served < 3 * MiB + 64 * 1024
