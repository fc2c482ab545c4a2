"""A service handles requests side by side: a long download on a peer does not hold up the
next one (nats-py hands a subscription's messages over one at a time)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from swarmfly.bus import Bus
from swarmfly.contracts import messages
from swarmfly.natsserver import NatsServer
from swarmfly.testing import Origin, in_process_cluster

MiB = 1024 * 1024


async def test_a_quick_download_finishes_while_a_slow_one_runs(
    nats: NatsServer, prefix: str, bus: Bus, tmp_path: Path
) -> None:
    async with (
        Origin(rate=MiB).serve() as slow,
        Origin().serve() as fast,
        in_process_cluster(nats.url, prefix, tmp_path / "cluster") as cluster,
    ):
        host_id = cluster.peer.node.settings.host_id

        def download(url: str, name: str) -> asyncio.Task[messages.DownloadReply]:
            body = messages.DownloadRequest(
                download_id=f"dl-{name}",
                source=messages.Source(url=url),
                output=str(tmp_path / name),
            )
            return asyncio.create_task(
                bus.request(messages.DOWNLOAD, body, timeout=60, host_id=host_id)
            )

        big = download(slow.add("big.bin", os.urandom(5 * MiB)), "big")
        await asyncio.sleep(1.0)  # the slow one is under way
        small = await download(fast.add("small.bin", os.urandom(64 * 1024)), "small")
        assert small.content_length == 64 * 1024
        assert not big.done(), "the quick download waited for the slow one"
        assert (await big).content_length == 5 * MiB
