"""The storage service: fetches what the scheduler hands it from the origin and seeds it.

It is a PeerNode of host type ``seed`` whose store persists across restarts: cached tasks are
announced again at start-up. Each instance has its own seed subject: the scheduler picks the
instance for a task by rendezvous hashing, so a fleet shares the tasks and the cache. A
preheat, which any instance may take, goes on to the task's home by the same hashing: there
the scheduler will look for it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import AsyncExitStack
from typing import Any

import nats.errors

from swarmfly import __version__
from swarmfly.bus import Bus
from swarmfly.content import SourceRequest
from swarmfly.contracts import messages
from swarmfly.contracts.wire import Endpoint
from swarmfly.errors import SwarmflyError
from swarmfly.placement import rendezvous
from swarmfly.plugins.hookspecs import SourceStat
from swarmfly.services.peer.node import PeerNode

log = logging.getLogger(__name__)

FLEET_SECONDS = 5.0
"""How long one look at the live storage instances ($SRV discovery) serves preheats."""
PREHEAT_SECONDS = 3600.0
"""A preheat's time limit unless the request sets one."""


class StorageService:
    def __init__(self, node: PeerNode, bus: Bus) -> None:
        self.node = node
        self.bus = bus
        self._seeding: set[asyncio.Task[None]] = set()
        self._fleet: tuple[float, set[str]] = (-FLEET_SECONDS, set())
        """When the live storage instances were last looked at ($SRV discovery), and who."""
        self._looking = asyncio.Lock()

    async def start(self, stack: AsyncExitStack) -> None:
        await self.node.start(stack)
        await self.bus.add_service(
            "storage",
            __version__,
            "swarmfly storage: the cluster's seed and cache",
            [
                Endpoint(messages.SEED, self.on_seed),
                Endpoint(messages.PREHEAT, self.on_preheat),
                Endpoint(messages.FILL, self.on_fill),
            ],
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
        """Any instance takes a preheat; the task's home does the work, so the copy is where
        the scheduler sends the swarm. The home not answering (it just went), this one does
        it rather than fail."""
        source = SourceRequest.of(req.source)
        await self.node.plugins.origins.check(source.url)
        resolved = await self.node.resolve(source)
        me = self.node.settings.host_id
        home = rendezvous(resolved.task_id, await self.fleet())[0]
        if home != me:
            seconds = req.timeout_s or PREHEAT_SECONDS
            try:
                return await self.bus.request(
                    messages.FILL, req, timeout=seconds + 5.0, host_id=home
                )
            except SwarmflyError as exc:
                if exc.code != "unavailable":
                    raise
                log.warning(
                    "preheat of task %s: its home %s does not answer, caching it here",
                    resolved.task_id[:12],
                    home,
                )
        return await self._fill(source, req.timeout_s, resolved.stat)

    async def on_fill(self, req: messages.PreheatRequest) -> messages.PreheatReply:
        source = SourceRequest.of(req.source)
        await self.node.plugins.origins.check(source.url)
        return await self._fill(source, req.timeout_s)

    async def _fill(
        self, source: SourceRequest, timeout_s: float | None, stat: SourceStat | None = None
    ) -> messages.PreheatReply:
        """Seed a URL now and answer once it is verified in this instance's cache; ``stat``:
        what the origin said to this request just now (its access check)."""
        seconds = timeout_s or PREHEAT_SECONDS
        try:
            async with asyncio.timeout(seconds):
                run = await self.node.begin(source, seed=True, stat=stat)
                result = await run.result()
        except TimeoutError:
            raise SwarmflyError("timeout", f"preheat did not finish in {seconds:g}s") from None
        return messages.PreheatReply.from_dict(
            {**result.summary(), "host_id": self.node.settings.host_id}
        )

    async def fleet(self) -> set[str]:
        """The live storage instances, this one among them. One look serves the preheats of
        ``FLEET_SECONDS`` (an image's blobs come together); it is not kept longer, for an
        instance that joined since must be seen before it is some task's home."""
        async with self._looking:
            seen, hosts = self._fleet
            if time.monotonic() - seen >= FLEET_SECONDS:
                try:
                    hosts = await self.bus.hosts_of("storage")
                except (SwarmflyError, nats.errors.Error) as exc:
                    log.info("storage discovery: %s; preheating here", exc)
                    hosts = set()
                self._fleet = (time.monotonic(), hosts)
        return {self.node.settings.host_id, *hosts}

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
