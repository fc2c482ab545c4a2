"""Load: 200 concurrent downloads across 20 tasks and 20 peers against one scheduler."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from swarmfly.bus import Bus
from swarmfly.content import SourceRequest, piece_count, piece_length_for
from swarmfly.natsserver import NatsServer
from swarmfly.services.peer.host import HostSettings, PeerHost
from swarmfly.testing import Origin, in_process_cluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
KiB = 1024
MiB = 1024 * KiB


async def test_200_concurrent_downloads(
    nats: NatsServer, prefix: str, origin: Origin, tmp_path: Path
) -> None:
    # Two or three 1 MiB pieces each, the last one ragged: the scheduler has pieces to
    # place and parents that hold some of a task, not just whole single-piece files.
    files = {f"t{i}.bin": os.urandom((2 + i % 2) * MiB - (i + 1) * 4 * KiB) for i in range(20)}
    pieces = {name: piece_count(len(d), piece_length_for(len(d))) for name, d in files.items()}
    assert set(pieces.values()) == {2, 3}, pieces
    urls = {name: origin.add(name, data) for name, data in files.items()}
    digests = {name: "sha256:" + hashlib.sha256(data).hexdigest() for name, data in files.items()}
    async with in_process_cluster(nats.url, prefix, tmp_path) as cluster, AsyncExitStack() as stack:
        nodes = [cluster.peer.node]
        plugins = cluster.peer.node.plugins
        for i in range(1, 20):
            bus = await Bus.connect([nats.url], prefix=prefix, name=f"load-peer-{i}")
            stack.push_async_callback(bus.close)
            base = HostSettings.of(cluster.config, "peer", tmp_path / f"peer{i}")
            download = dataclasses.replace(base.download, piece_timeout=60.0)
            settings = dataclasses.replace(base, download=download)
            node = PeerHost(settings, bus, [nats.url], plugins)
            await node.start(stack)
            nodes.append(node)
        jobs = [
            (node, name)
            for n, node in enumerate(nodes)
            for name in list(files)[n % 20 :][:10] + list(files)[: max(0, n % 20 - 10)]
        ]
        assert len(jobs) == 200 and {name for _, name in jobs} == set(files)
        results = await asyncio.wait_for(
            asyncio.gather(
                *(
                    node.download(SourceRequest(urls[name], digest=digests[name]))
                    for node, name in jobs
                )
            ),
            240,
        )
        for (node, name), result in zip(jobs, results, strict=True):
            assert result.digest == digests[name], "every download verified against its digest"
            assert result.content_length == len(files[name])
            assert result.bytes_p2p + result.bytes_origin == len(files[name]), (name, result)
            stored = node.store.tasks[result.task_id]
            assert stored.complete and stored.content is not None
            assert stored.content.piece_count == pieces[name]
            assert hashlib.sha256(stored.data_path.read_bytes()).hexdigest() == digests[name][7:]
    # Each task read from the origin about once (plus one-byte access checks per download).
    assert origin.bytes_served <= 1.05 * sum(len(d) for d in files.values()) + 200
