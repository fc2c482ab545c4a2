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
from swarmfly.content import SourceRequest
from swarmfly.natsserver import NatsServer
from swarmfly.runtime import peer_settings
from swarmfly.services.peer.node import PeerNode
from swarmfly.testing import Origin, in_process_cluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
KiB = 1024


async def test_200_concurrent_downloads(
    nats: NatsServer, prefix: str, origin: Origin, tmp_path: Path
) -> None:
    files = {f"t{i}.bin": os.urandom(300 * KiB + i) for i in range(20)}
    urls = {name: origin.add(name, data) for name, data in files.items()}
    digests = {name: "sha256:" + hashlib.sha256(data).hexdigest() for name, data in files.items()}
    async with in_process_cluster(nats.url, prefix, tmp_path) as cluster, AsyncExitStack() as stack:
        nodes = [cluster.peer.node]
        plugins = cluster.peer.node.plugins
        for i in range(1, 20):
            bus = await Bus.connect([nats.url], prefix=prefix, name=f"load-peer-{i}")
            stack.push_async_callback(bus.close)
            settings = dataclasses.replace(
                peer_settings(cluster.config, tmp_path / f"peer{i}"), piece_timeout=60.0
            )
            node = PeerNode(settings, bus, [nats.url], plugins)
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
    for (_, name), result in zip(jobs, results, strict=True):
        assert result.digest == digests[name], "every download verified against its digest"
        assert result.content_length == len(files[name])
    # Each task read from the origin about once (plus one-byte access checks per download).
    assert origin.bytes_served <= 1.05 * sum(len(d) for d in files.values()) + 200
