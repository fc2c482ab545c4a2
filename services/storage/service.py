"""The storage service: fetches what the scheduler hands it from the origin and seeds it.

It is a PeerNode of host type ``seed`` whose store persists across restarts: cached tasks are
announced again at start-up. Each instance has its own seed subject: the scheduler picks the
instance for a task by rendezvous hashing, so a fleet shares the tasks and the cache.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import AsyncExitStack
from typing import Any

from swarmfly import __version__
from swarmfly.bus import Bus
from swarmfly.content import SourceRequest
from swarmfly.contracts import messages
from swarmfly.contracts.wire import Endpoint
from swarmfly.errors import SwarmflyError
from swarmfly.services.peer.node import PeerNode

log = logging.getLogger(__name__)


class StorageService:
    def __init__(self, node: PeerNode, bus: Bus) -> None:
        self.node = node
        self.bus = bus
        self._seeding: set[asyncio.Task[None]] = set()

    async def start(self, stack: AsyncExitStack) -> None:
        await self.node.start(stack)
        await self.bus.add_service(
            "storage",
            __version__,
            "swarmfly storage: the cluster's seed and cache",
            [Endpoint(messages.SEED, self.on_seed), Endpoint(messages.PREHEAT, self.on_preheat)],
            metadata={"host_id": self.node.settings.host_id, "upload": self.node.upload_url},
            host_id=self.node.settings.host_id,
        )
        stack.callback(self._cancel)

    def _cancel(self) -> None:
        for task in self._seeding:
            task.cancel()

    async def on_seed(self, req: messages.SeedRequest) -> messages.SeedReply:
        source = SourceRequest.of(req.source)
        self.node.source_for(source.url)
        await self.node.plugins.origins.check(source.url)  # refused in the reply, not later
        task = asyncio.create_task(self._seed(req.task_id, source))
        self._seeding.add(task)
        task.add_done_callback(self._seeding.discard)
        return messages.SeedReply(
            accepted=True,
            host_id=self.node.settings.host_id,
            peer_id=self.node.peer_id(req.task_id),
        )

    async def on_preheat(self, req: messages.PreheatRequest) -> messages.PreheatReply:
        """Seed a URL now and answer once it is verified in the cache."""
        source = SourceRequest.of(req.source)
        await self.node.plugins.origins.check(source.url)
        seconds = 3600 if req.timeout_s is None else req.timeout_s
        try:
            async with asyncio.timeout(seconds):
                result = await self.node.download(source, seed=True)
        except TimeoutError:
            raise SwarmflyError("timeout", f"preheat did not finish in {seconds:g}s") from None
        return messages.PreheatReply.from_dict(
            {**result.summary(), "host_id": self.node.settings.host_id}
        )

    async def _seed(self, task_id: str, source: Any) -> None:
        try:
            result = await self.node.download(source, seed=True, task_id=task_id)
            log.info(
                "seeded task %s: %d bytes from the origin in %.2fs",
                task_id[:12],
                result.bytes_origin,
                result.seconds,
            )
        except SwarmflyError as exc:
            log.warning("seeding task %s failed: %s", task_id[:12], exc)
