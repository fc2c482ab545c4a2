"""Cache GC on a real peer node: files leave the disk, busy tasks stay, the cache refills."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from swarmfly.config import Config
from swarmfly.content import SourceRequest
from swarmfly.pluginhost import Plugins
from swarmfly.runtime import peer_settings
from swarmfly.services.peer.gc import GcPolicy
from swarmfly.services.peer.node import PeerNode
from swarmfly.testing import Origin

MiB = 1024 * 1024


async def test_quota_evicts_the_least_recently_used_and_spares_busy_tasks(
    origin: Origin, tmp_path: Path
) -> None:
    settings = peer_settings(Config(state_dir=tmp_path), tmp_path)
    settings = type(settings)(**{**settings.__dict__, "gc": GcPolicy(quota=10 * MiB)})
    plugins = Plugins.load()
    node = PeerNode(settings, None, [], plugins)
    urls = [origin.add(f"f{i}.bin", os.urandom(4 * MiB)) for i in range(3)]
    results = []
    for url in urls:
        results.append(await node.download(SourceRequest(url)))
        await asyncio.sleep(0.01)  # distinct access times
    oldest, middle, newest = (r.task_id for r in results)
    node.store.tasks[oldest].active += 1  # being uploaded right now
    now = time.time()
    evicted = await node.collect(now)
    # 12 MiB > 90% of 10: idle tasks go, least recently used first, down to 70% (7 MiB);
    # the busy one stays though it is the oldest.
    assert evicted == [middle, newest]
    for task_id in evicted:
        assert not (tmp_path / "tasks" / task_id[:2] / task_id).exists()
    assert set(node.store.tasks) == {oldest}

    node.store.tasks[oldest].active -= 1
    again = await node.download(SourceRequest(urls[1]))  # the evicted one comes back
    assert again.bytes_origin == 4 * MiB
    await node.close()
    await plugins.close()


async def test_ttl_expires_unused_tasks(origin: Origin, tmp_path: Path) -> None:
    settings = peer_settings(Config(state_dir=tmp_path), tmp_path)
    settings = type(settings)(**{**settings.__dict__, "gc": GcPolicy(ttl=60)})
    plugins = Plugins.load()
    node = PeerNode(settings, None, [], plugins)
    result = await node.download(SourceRequest(origin.add("t.bin", os.urandom(MiB))))
    assert await node.collect(time.time()) == []
    assert await node.collect(time.time() + 61) == [result.task_id]
    assert node.store.tasks == {}
    await node.close()
    await plugins.close()
