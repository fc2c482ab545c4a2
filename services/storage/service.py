"""The storage service: fetches what the scheduler hands it from the origin and seeds it.

It is a PeerHost of host type ``seed`` whose store persists across restarts: cached tasks are
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
from dataclasses import replace
from typing import Any

import nats.errors

from swarmfly import __version__
from swarmfly.bus import Bus
from swarmfly.cache import is_reference
from swarmfly.content import SourceRequest
from swarmfly.contracts import messages
from swarmfly.contracts.wire import Endpoint
from swarmfly.errors import SwarmflyError
from swarmfly.placement import rendezvous
from swarmfly.plugintypes import SourceStat
from swarmfly.services.peer.host import PeerHost
from swarmfly.services.peer.preheat import reported
from swarmfly.services.storage import handover
from swarmfly.services.storage.imports import StorageImports

log = logging.getLogger(__name__)

FLEET_SECONDS = 5.0
"""How long one look at the live storage instances ($SRV discovery) serves preheats."""
PREHEAT_SECONDS = 3600.0
"""A preheat's time limit unless the request sets one."""
MAX_REPLICAS = 64
"""Replicas a preheat of scope all-seeds fills at most (the reply's bound)."""


class StorageService:
    name = "storage"

    def __init__(
        self,
        node: PeerHost,
        bus: Bus,
        *,
        copies: int = 1,
        hand_over_seconds: float = 0.0,
        hand_over_concurrency: int = 4,
    ) -> None:
        self.node = node
        self.bus = bus
        self.copies = copies
        """Instances that hold each preheated task ([storage] copies)."""
        self.hand_over_seconds = hand_over_seconds
        """What the drain may take for the hand-over of the cached tasks ([storage]
        handover_timeout), beyond any service's drain bound (``swarmfly.lifecycle``)."""
        self.hand_over_concurrency = hand_over_concurrency
        self._stopping = False
        """Draining: hand-overs from other stopping instances go to the next in line."""
        self._seeding: set[asyncio.Task[None]] = set()
        self._fleet: tuple[float, set[str]] = (-FLEET_SECONDS, set())
        """When the live storage instances were last looked at ($SRV discovery), and who."""
        self._looking = asyncio.Lock()
        self.imports = StorageImports(node)
        """Files peers import (`swarmfly cache`): taken from them, kept until their TTL."""

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
                Endpoint(messages.IMPORT, self.imports.on_import),
                Endpoint(messages.CACHED, self.imports.on_cached),
            ],
            metrics=self.node.metrics,
            metadata={"host_id": self.node.settings.host_id, "upload": self.node.upload_url},
            host_id=self.node.settings.host_id,
        )
        stack.callback(self._cancel)

    async def drain(self) -> None:
        """Hand the cached tasks over to their next homes while this instance still serves
        them (``handover``), then leave the swarm, handing over what a seed read first
        (``PeerHost.leave``)."""
        self._stopping = True
        try:
            if self.hand_over_seconds > 0:
                self._fleet = (-FLEET_SECONDS, set())  # who is live now, not a while ago
                await handover.hand_over(
                    self.node,
                    self.bus,
                    self.fleet,
                    copies=self.copies,
                    seconds=self.hand_over_seconds,
                    concurrency=self.hand_over_concurrency,
                )
        finally:  # whatever became of the hand-over, the schedulers hear this host leave
            await self.node.leave()

    def _cancel(self) -> None:
        for task in self._seeding:
            task.cancel()

    async def on_seed(self, req: messages.SeedRequest) -> messages.SeedReply:
        source = SourceRequest.of(req.source)
        if is_reference(source.url):  # imported content has no origin to seed from
            return messages.SeedReply(accepted=False, host_id=self.node.settings.host_id)
        self.node.source_for(source.url)
        await self.node.plugins.origins.check(source.url)  # refused in the reply, not later
        if self.node.copying(req.task_id):  # a replica mid-copy: its seed must be elsewhere
            return messages.SeedReply(accepted=False, host_id=self.node.settings.host_id)
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
        the scheduler sends the swarm, and then the replicas take it from the swarm (scope
        all-seeds: every other live instance is one). The home not answering (it just went),
        this one reads the origin rather than fail. Each instance doing it reports its
        progress on the request's ``preheat.{job}.progress`` (``reported``)."""
        source = SourceRequest.of(req.source)
        await self.node.plugins.origins.check(source.url)
        resolved = await self.node.resolve(source)
        order = rendezvous(resolved.task_id, await self.fleet())
        fill = messages.FillRequest(req.source, req.timeout_s, progress=req.progress)
        try:
            reply = await self._fill_on(order[0], fill, resolved.stat)
        except SwarmflyError as exc:
            if exc.code != "unavailable":
                raise
            log.warning(
                "preheat of task %s: its home %s does not answer, caching it here",
                resolved.task_id[:12],
                order[0],
            )
            reply = await self._fill(fill, resolved.stat)
        wanted = MAX_REPLICAS + 1 if req.scope == "all-seeds" else self.copies
        copies = [h for h in order[:wanted] if h != reply.host_id][: wanted - 1]
        if not copies:
            return reply
        replica = replace(fill, replica=True)
        outcomes = await asyncio.gather(
            *(self._fill_on(host, replica) for host in copies), return_exceptions=True
        )
        held: list[str] = []
        failed: list[messages.PreheatFailure] = []
        for host, outcome in zip(copies, outcomes, strict=True):
            if isinstance(outcome, messages.PreheatReply):
                held.append(host)
            elif isinstance(outcome, Exception):
                log.warning(
                    "preheat of task %s: replica %s: %s", resolved.task_id[:12], host, outcome
                )
                error = outcome if isinstance(outcome, SwarmflyError) else None
                failed.append(
                    messages.PreheatFailure(
                        host,
                        error.code if error else "internal",
                        (error.message if error else "the replica failed (its log says why)")[
                            :4096
                        ],
                    )
                )
            else:
                raise outcome
        return replace(reply, replicas=held, failed=failed or None)

    async def _fill_on(
        self, host: str, req: messages.FillRequest, stat: SourceStat | None = None
    ) -> messages.PreheatReply:
        if host == self.node.settings.host_id:
            return await self._fill(req, stat)
        seconds = req.timeout_s or PREHEAT_SECONDS
        return await self.bus.request(messages.FILL, req, timeout=seconds + 5.0, host_id=host)

    async def on_fill(self, req: messages.FillRequest) -> messages.PreheatReply:
        await self.node.plugins.origins.check(req.source.url)
        if req.task_id is not None:  # a hand-over from an instance that is leaving
            if self._stopping:
                raise SwarmflyError("unavailable", "this storage instance is stopping too")
            return await handover.take(self.node, req, req.timeout_s or PREHEAT_SECONDS)
        return await self._fill(req)

    async def _fill(
        self, req: messages.FillRequest, stat: SourceStat | None = None
    ) -> messages.PreheatReply:
        """Bring a URL into this instance's cache now and answer once it is verified there:
        from the origin as the task's seed, or as a replica from the swarm. ``stat``: what
        the origin said to this request just now (its access check)."""
        seconds = req.timeout_s or PREHEAT_SECONDS
        source = SourceRequest.of(req.source)
        try:
            async with asyncio.timeout(seconds):
                result = await reported(
                    self.bus,
                    self.node.sender,
                    req.progress,
                    lambda: self.node.begin(source, seed=not req.replica, stat=stat),
                )
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
