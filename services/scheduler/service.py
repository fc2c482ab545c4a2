"""The scheduler adapter: feeds NATS requests to the pure core and sends its answers back.

Task subjects are partitioned (``scheduler.<n>.*``): this scheduler subscribes to a partition
only while it holds the partition's lease (``ownership.py``) and forgets its tasks when it
lets go. Host-level subjects (heartbeat, leave, state) reach every scheduler.

About 700 lines: the NATS handlers and the state's views (NATS, HTTP, the dashboard's
events) read the same core and leases under the same partition checks; the views' pure
merging is apart (``views``).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import nats.errors
import orjson
from aiohttp import web

from swarmfly import __version__, apitoken, bitmap
from swarmfly.bus import Bus, RunningService
from swarmfly.capability import Signer
from swarmfly.config import Config, SchedulerConfig
from swarmfly.content import TaskContent
from swarmfly.contracts import Sender, messages
from swarmfly.contracts.wire import Endpoint
from swarmfly.errors import SwarmflyError
from swarmfly.httpserver import healthz, serve_http
from swarmfly.ids import default_host_id, keys_task, peer_id, redact_url
from swarmfly.metrics import SchedulerMetrics
from swarmfly.placement import partition_of
from swarmfly.plugintypes import Evaluator
from swarmfly.services.scheduler.core import (
    OWN_ORIGIN,
    HostSpec,
    Lending,
    Peer,
    PieceReport,
    Schedule,
    Scheduler,
    Task,
    TriggerSeed,
)
from swarmfly.services.scheduler.ownership import Ownership
from swarmfly.services.scheduler.views import merge

log = logging.getLogger(__name__)
EVENT_INTERVAL = 0.5
VIEW_TASKS = 200
"""Tasks the dashboard shows, the most recently active first."""
HOST_LIMIT = 1000
"""Hosts a state lists by default (the most recently seen); ``host_count`` counts them all."""
PEER_LIMIT = 200
"""Peers a task lists by default: its sources and its most recently active others."""
STATE_BUDGET = 768 * 1024
"""Bytes a state may take, below NATS's default max_payload (1 MiB) with room to spare."""
HOST_BYTES, TASK_BYTES, PEER_BYTES = 200, 600 + 70 * 9, 200
"""What one entry takes at most in the JSON (ids of 64 characters), besides a bitmap; a task
with its home and up to ``REPLICAS_SHOWN`` replicas."""
REPLICAS_SHOWN = 8
"""Replicas a task lists ([storage] copies makes few)."""
DASHBOARD_CSP = "default-src 'self'; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
"""The page loads nothing from elsewhere (no CDN): it must work on machines with no internet."""
DIGEST_PAGE = 8192
"""Digests per scheduler.<n>.task reply: a page stays far below NATS's 1 MiB payload limit."""
PUSHED_DIGESTS = 256
"""Digests at most pushed with a schedule or a report's reply (``digests_from``): 17 KiB."""
CAPABILITY_KEY = "capability-key"
"""Where the schedulers' shared signing key lives in their lease bucket."""
PLACEHOLDER_URL = "swarmfly:cached"
"""The source a host announces for a cached task whose URL it did not keep."""
ALL = "*"
"""The subscription layout of a scheduler that holds every partition: one wildcard each."""


def host_spec(host: messages.Host) -> HostSpec:
    return HostSpec(
        id=host.id,
        ip=host.ip,
        port=host.port,
        type=host.type,
        idc=host.idc or "",
        location=host.location or "",
        upload_slots=64 if host.upload_slots is None else host.upload_slots,
    )


def content(task: messages.TaskContent | None) -> TaskContent | None:
    return None if task is None else TaskContent.of(task)


def schedule_message(
    schedule: Schedule, token: str | None, digest_page: messages.DigestPage | None
) -> messages.Schedule:
    """The core's schedule as the wire carries it (``task`` null until the content is known)."""
    return messages.Schedule(
        action=schedule.action,
        parents=[
            messages.Parent(
                p.peer_id, p.host_id, p.address, "seed" if p.type == "seed" else "normal"
            )
            for p in schedule.parents
        ],
        task=schedule.content.message() if schedule.content else None,
        retry_after_ms=schedule.retry_after_ms,
        token=token,
        digest_page=digest_page,
    )


def core_for(
    sc: SchedulerConfig, evaluator: Evaluator, rng: random.Random | None = None
) -> Scheduler:
    """The pure core as ``[scheduler]`` configures it (the service's, and bench/core.py's)."""
    return Scheduler(
        candidate_parents=sc.candidate_parents,
        host_ttl=sc.host_ttl,
        seed_timeout=sc.seed_timeout,
        seed_silence=sc.heartbeat_interval,
        acyclic=sc.acyclic,
        evaluator=evaluator,
        rng=rng,
    )


class SchedulerService:
    name = "scheduler"
    """Lifecycle: ``start`` subscribes and serves; ``stop`` unsubscribes; state is soft."""

    def __init__(
        self, config: Config, bus: Bus, evaluator: Evaluator, clock: Any = time.monotonic
    ) -> None:
        self.config = config
        self.bus = bus
        self.clock = clock
        self.metrics = SchedulerMetrics()
        sc = config.scheduler
        self.core = core_for(sc, evaluator)
        self.http_url = ""
        self._sources: dict[str, messages.Source] = {}
        """task id -> source (with headers) kept in memory only, to hand to a seed."""
        self._background: set[asyncio.Task[None]] = set()
        self.ownership = Ownership(
            bus,
            scheduler_id=sc.id or "scheduler-" + default_host_id(str(config.state_dir))[:54],
            partitions=sc.partitions,
            lease=sc.lease,
            renew=sc.renew_interval,
            on_change=self._serve,
        )
        self._service: RunningService | None = None
        self._layout: set[str] = set()
        """What task subjects are subscribed under: partition numbers, or ALL."""
        self._serving = asyncio.Lock()
        self._warm_until = 0.0
        """Until then, storage hosts may be unknown only for not having sent a heartbeat."""
        self._moved_until = 0.0
        """Until then, the seeds of tasks in partitions this scheduler just took over may not
        have announced themselves yet (a host does on its next report or heartbeat): no
        home is chosen (``homes_known``), or another instance would read such a task again."""
        self._held: frozenset[int] = frozenset()
        """The partitions held as of the last change."""
        self._generation: int | None = None
        """The partition layout's generation as of the last change (None: none yet)."""
        self._fleet: set[str] | None = None
        """The storage instances up at this scheduler's start ($SRV discovery), None until
        they answered."""
        self._fleet_known = asyncio.Event()
        """Set once each of ``_fleet`` has sent its heartbeat, and one at least: the core
        knows every storage host then (``Scheduler.homes_known``)."""
        self.api_token = apitoken.load(
            Path(sc.api_token_file) if sc.api_token_file else config.state_dir / apitoken.FILE
        )
        """What the dashboard and API ask for."""
        self.signer: Signer | None = None
        """Signs the capabilities children show parents; one key for all schedulers."""
        self._feed = EventFeed(self._event_body, EVENT_INTERVAL)
        """The dashboard's snapshots, taken once per tick while anyone listens."""

    async def start(self, stack: AsyncExitStack) -> None:
        self._warm_until = self.clock() + 2 * self.config.scheduler.heartbeat_interval
        self.core.homes_known = False
        self._service = await self.bus.add_service(
            "scheduler",
            __version__,
            "swarmfly scheduler: tasks, peers and parent choice",
            [
                Endpoint(messages.REGISTER, self.on_register),
                Endpoint(messages.RESCHEDULE, self.on_reschedule),
                Endpoint(messages.PIECES, self.on_pieces),
                Endpoint(messages.TASK, self.on_task),
                Endpoint(messages.RESULT, self.on_result),
                Endpoint(messages.LEAVE, self.on_leave),
                Endpoint(messages.HEARTBEAT, self.on_heartbeat),
                Endpoint(messages.BEAT, self.on_heartbeat),
                Endpoint(messages.STATE, self.on_state),
                Endpoint(messages.ADDRESS, self.on_address),
            ],
            metrics=self.metrics,
            inline=True,  # every handler computes and answers: no I/O to wait on
            scheduler=self.ownership.instance,
        )
        await self.ownership.start(stack)
        self.signer = Signer(await self.ownership.shared(CAPABILITY_KEY, Signer.generate().seed))
        expiry = asyncio.create_task(self._expire_loop())
        stack.callback(expiry.cancel)
        looking = asyncio.create_task(self._learn_fleet())
        stack.callback(looking.cancel)
        app = web.Application(middlewares=[apitoken.guard(self.api_token)])
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", self.metrics.handler)
        app.router.add_get("/api/state", self._state)
        app.router.add_get("/api/events", self._events)
        app.router.add_get("/", self._dashboard)
        sc = self.config.scheduler
        self.http_url = await serve_http(stack, app, sc.listen, sc.http_port)

    @property
    def partitions(self) -> int:
        """The count tasks are partitioned by: the lease bucket's, which may change online."""
        return self.ownership.partitions

    async def drain(self) -> None:
        """Hand every partition on now: the schedulers that stay take them at once."""
        await self.ownership.hand_over()

    # -- handlers ------------------------------------------------------------------------

    async def _serve(self, held: frozenset[int]) -> None:
        """Subscribe the task subjects of exactly the held partitions, and forget the tasks
        of the others (``held`` already says so to the handlers, so none comes back).

        Holding every partition, as a lone scheduler does, each subject is one wildcard
        subscription: one subscription per partition would spread the requests over many
        of nats-py's dispatch tasks, a measurable cost per request.
        """
        assert self._service is not None
        layout = {ALL} if len(held) == self.partitions else {str(p) for p in held}
        async with self._serving:
            for token in sorted(layout - self._layout):
                await self.bus.open_endpoints(self._service, **_partition_tokens(token))
            for token in sorted(self._layout - layout):
                await self.bus.close_endpoints(self._service, **_partition_tokens(token))
            self._layout = layout
        self.core.drop_tasks(
            [t for t in self.core.tasks if partition_of(t, self.partitions) not in held]
        )
        self._forget_sources()
        # Partitions taken from another scheduler (a lone one's are its own: at its start,
        # the storage fleet's look settles it), or of a new count (every task moved).
        moved = self._generation not in (None, self.ownership.generation)
        if moved or (held - self._held and len(self.ownership.members()) > 1):
            self._moved_until = self.clock() + 2 * self.config.scheduler.heartbeat_interval
            self.core.homes_known = False
        self._held, self._generation = held, self.ownership.generation

    def _check_partition(self, task_id: str) -> None:
        """A request can arrive after its partition moved (or from a peer that counts
        partitions differently): only the partition's holder may answer it."""
        partition = partition_of(task_id, self.partitions)
        if partition not in self.ownership.held:
            raise SwarmflyError(
                "unavailable",
                f"partition {partition} (of {self.partitions}) is not held by this scheduler",
            )

    async def on_register(self, req: messages.RegisterRequest, sender: Sender) -> messages.Schedule:
        started = time.perf_counter()
        _speaks_for(sender, req.task_id, req.peer_id, req.host)
        self._check_partition(req.task_id)
        schedule, effects = self.core.register(
            task_id=req.task_id,
            peer_id=req.peer_id,
            host=host_spec(req.host),
            now=self.clock(),
            pieces=req.pieces or (),
            content=content(req.task),
            seed=bool(req.seed),
            priority=_priority(req),
        )
        # Kept once the core took the peer (a refused priority leaves nothing behind), and
        # before the effects run: a seed asked for gets this source.
        known = self._sources.get(req.task_id)
        if known is None or known.url == PLACEHOLDER_URL or _names_digest(req, known):
            self._sources[req.task_id] = req.source
        self._run(effects)
        self.metrics.registrations.inc()
        if schedule.action == "back_to_source" and not req.seed:
            self.metrics.back_to_source.inc()
        self.metrics.schedule_seconds.observe(time.perf_counter() - started)
        return self._reply(schedule, req.task_id, req.peer_id, req.digests_from)

    async def on_reschedule(
        self, req: messages.RescheduleRequest, sender: Sender
    ) -> messages.Schedule:
        started = time.perf_counter()
        _speaks_for(sender, req.task_id, req.peer_id)
        self._check_partition(req.task_id)
        schedule, effects = self.core.reschedule(
            task_id=req.task_id,
            peer_id=req.peer_id,
            now=self.clock(),
            blocklist=req.blocklist or (),
            bad_parents=[(b.peer_id, b.reason) for b in req.bad_parents or ()],
        )
        self._run(effects)
        if schedule.action == "back_to_source":
            self.metrics.back_to_source.inc()
        self.metrics.schedule_seconds.observe(time.perf_counter() - started)
        return self._reply(schedule, req.task_id, req.peer_id, req.digests_from)

    def _reply(
        self, schedule: Schedule, task_id: str, peer: str, digests_from: int | None
    ) -> messages.Schedule:
        """The schedule, and the capability that lets this peer read the task's pieces."""
        token = self._signer().mint(task_id, peer, time.time())
        return schedule_message(schedule, token, self._digest_page(task_id, digests_from))

    def _digest_page(self, task_id: str, offset: int | None) -> messages.DigestPage | None:
        """The digests known from where the peer lacks them: it need not poll for them."""
        if offset is None:
            return None
        digests, provisional = self.core.digest_page(task_id, offset, PUSHED_DIGESTS)
        if not digests:
            return None
        return messages.DigestPage(offset, digests, provisional or None)

    def _signer(self) -> Signer:
        """The cluster's capability key: a scheduler answers no host before it has it (its
        partitions open, and hosts heartbeat, while it starts), or the host could not be
        read from, nor check who reads from it."""
        if self.signer is None:
            raise SwarmflyError("unavailable", "the scheduler is starting")
        return self.signer

    async def on_pieces(self, req: messages.PiecesRequest, sender: Sender) -> messages.ReportReply:
        _speaks_for(sender, req.task_id, req.peer_id)
        self._check_partition(req.task_id)
        self.core.report_pieces(
            task_id=req.task_id,
            peer_id=req.peer_id,
            pieces=[PieceReport(p.number, p.digest, p.parent_id, p.cost_ms) for p in req.pieces],
            now=self.clock(),
            content=content(req.task),
            lent=[Lending(lent.number, lent.peer_id) for lent in req.lent or ()],
        )
        return messages.ReportReply(True, self._digest_page(req.task_id, req.digests_from))

    async def on_task(self, req: messages.TaskRequest) -> messages.TaskReply:
        self._check_partition(req.task_id)
        task, digests = self.core.task_info(req.task_id)
        offset = req.offset or 0
        end = offset + DIGEST_PAGE
        provisional = [n for n in self.core.provisional(req.task_id) if offset <= n < end]
        return messages.TaskReply(
            task=task.message() if task else None,
            digests=digests[offset:end],
            offset=offset,
            provisional=provisional or None,
        )

    async def on_result(self, req: messages.ResultRequest, sender: Sender) -> messages.Ok:
        _speaks_for(sender, req.task_id, req.peer_id)
        self._check_partition(req.task_id)
        self.core.result(
            task_id=req.task_id, peer_id=req.peer_id, success=req.success, now=self.clock()
        )
        return messages.Ok(True)

    async def on_leave(self, req: messages.LeaveRequest, sender: Sender) -> messages.Ok:
        _speaks_for(sender, host_id=req.host_id)
        self.core.leave(req.host_id, req.peer_ids)
        self._forget_sources()
        return messages.Ok(True)

    async def on_heartbeat(
        self, req: messages.HeartbeatRequest, sender: Sender
    ) -> messages.HeartbeatReply:
        _speaks_for(sender, host=req.host)
        verify_key = self._signer().verify_key
        known = self.core.heartbeat(host_spec(req.host), req.uploads or 0, self.clock())
        if req.host.type == "seed":
            self._check_fleet()
        return messages.HeartbeatReply(
            ok=True,
            known=known,
            interval_ms=int(self.config.scheduler.heartbeat_interval * 1000),
            verify_keys=[verify_key],
            partitions=self.partitions,
            scheduler=self.ownership.instance,
            owners=self.ownership.owners(),
        )

    # -- effects and housekeeping --------------------------------------------------------

    def _run(self, effects: list[TriggerSeed]) -> None:
        for effect in effects:
            task = asyncio.create_task(self._trigger_seed(effect))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _learn_fleet(self) -> None:
        try:
            self._fleet = await self.bus.hosts_of("storage")
        except (SwarmflyError, nats.errors.Error) as exc:
            log.info("storage discovery: %s; their heartbeats will tell", exc)
            self._fleet = set()
        self._check_fleet()

    def _check_fleet(self) -> None:
        seeds = set(self.core.seed_hosts())
        if self._fleet is not None and seeds and self._fleet <= seeds:
            self._fleet_known.set()
            self.core.homes_known = self.clock() >= self._moved_until

    async def _trigger_seed(self, effect: TriggerSeed) -> None:
        task_id, host_id = effect.task_id, effect.host_id
        if host_id is None:
            # Just after a start, storage instances may not all have said hello yet: the
            # core chose no home (or found none) until they have, or until they had time to.
            wait = self._warm_until - self.clock()
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._fleet_known.wait(), wait)
            await asyncio.sleep(max(0.0, self._moved_until - self.clock()))
            self.core.homes_known = True
            self._seed_unavailable(task_id, None)
            return
        source = self._sources.get(task_id)
        if source is None or source.url == PLACEHOLDER_URL:
            self._seed_unavailable(task_id, host_id)
            return
        try:
            reply = await self.bus.request(
                messages.SEED,
                messages.SeedRequest(task_id=task_id, source=source),
                timeout=5.0,
                host_id=host_id,
            )
            accepted = reply.accepted
        except SwarmflyError as exc:
            log.info("storage %s did not take task %s: %s", host_id, task_id[:12], exc.code)
            accepted = False
        if not accepted:
            self._seed_unavailable(task_id, host_id)

    def _seed_unavailable(self, task_id: str, host_id: str | None) -> None:
        if partition_of(task_id, self.partitions) in self.ownership.held:
            self._run(self.core.seed_unavailable(task_id, host_id, self.clock()))

    def _forget_sources(self) -> None:
        for task_id in list(self._sources):
            if task_id not in self.core.tasks:
                del self._sources[task_id]

    async def _expire_loop(self) -> None:
        interval = max(0.2, self.config.scheduler.heartbeat_interval / 2)
        while True:
            await asyncio.sleep(interval)
            dropped = self.core.expire(self.clock())
            if dropped:
                log.info("dropped hosts without heartbeat: %s", ", ".join(dropped))
                self._forget_sources()
            self.metrics.hosts.set(len(self.core.hosts))
            self.metrics.tasks.set(len(self.core.tasks))

    async def _healthz(self, request: web.Request) -> web.Response:
        return healthz(self.bus.nc.is_connected)

    def snapshot(
        self,
        *,
        bitmaps: bool = False,
        task_id: str | None = None,
        limit: int = 1000,
        host_limit: int = HOST_LIMIT,
        peer_limit: int = PEER_LIMIT,
    ) -> dict[str, Any]:
        """The scheduler's soft state, as ``scheduler.state`` replies and the dashboard shows:
        the most recently seen hosts and active tasks, each task's sources and most recently
        active peers, with the counts of all of them, and never more than a NATS message
        holds (``truncated`` says something was left out)."""
        core, now = self.core, self.clock()
        tasks = (
            [t for t in (core.tasks.get(task_id),) if t is not None]
            if task_id is not None
            else heapq.nlargest(limit, core.tasks.values(), key=lambda t: t.updated_at)
        )
        members = self.ownership.members()
        scheduler = {
            "id": self.ownership.book.me,
            "run": self.ownership.instance,
            "partitions": sorted(self.ownership.held),
            "partition_count": self.partitions,
            "generation": self.ownership.generation,
            "members": members,
        }
        budget = STATE_BUDGET - 200 - 6 * self.partitions - 70 * len(members)
        shown_hosts = heapq.nlargest(host_limit, core.hosts.values(), key=lambda h: h.last_seen)
        hosts = [
            {
                "id": h.id,
                "type": h.type,
                "address": h.address,
                "uploads": h.uploads,
                "upload_slots": h.upload_slots,
                "seen_s": round(max(0.0, now - h.last_seen), 3),
            }
            for h in shown_hosts
        ]
        budget -= HOST_BYTES * len(hosts)
        truncated = False
        views = []
        for t in tasks:
            budget -= TASK_BYTES
            if budget < 0:
                truncated = True
                break
            peers = list(t.sources.values())[:peer_limit]
            peers += heapq.nlargest(
                peer_limit - len(peers),
                (p for p in t.peers.values() if not p.is_source),
                key=lambda p: p.updated_at,
            )
            size = PEER_BYTES
            if bitmaps and t.content is not None:
                size += bitmap.size(t.content.piece_count)
            fits = min(len(peers), budget // size)
            truncated = truncated or fits < len(peers)
            budget -= fits * size
            views.append(self._task_view(t, peers[:fits], bitmaps))
        state: dict[str, Any] = {
            "hosts": hosts,
            "tasks": views,
            "host_count": len(core.hosts),
            "task_count": len(core.tasks),
            "scheduler": scheduler,
        }
        if truncated:
            state["truncated"] = True
        return state

    def _task_view(self, t: Task, peers: list[Peer], bitmaps: bool) -> dict[str, Any]:
        every = t.peers.values()
        normal = [p for p in every if not p.is_source]
        return {
            "id": t.id,
            "task": t.content.to_dict() if t.content else None,
            "url": self._shown_url(t.id),
            "home": t.seed_host,
            "replicas": self._replicas(t)[:REPLICAS_SHOWN],
            "peers": [
                {
                    "id": p.id,
                    "host_id": p.host_id,
                    "state": p.state,
                    "pieces": len(p.pieces),
                    "source": p.is_source,
                    "origin_bytes": p.origin_bytes,
                    "p2p_bytes": p.p2p_bytes,
                    **(
                        {"bitmap": bitmap.encode(p.pieces, t.content.piece_count)}
                        if bitmaps and t.content is not None
                        else {}
                    ),
                }
                for p in peers
            ],
            "summary": {
                "peers": len(t.peers),
                "sources": len(t.peers) - len(normal),
                "succeeded": sum(p.state == "succeeded" for p in normal),
                "failed": sum(p.state == "failed" for p in normal),
                "pieces_held": sum(len(p.pieces) for p in normal),
                "origin_bytes": sum(p.origin_bytes for p in every),
                "p2p_bytes": sum(p.p2p_bytes for p in every),
            },
        }

    def _replicas(self, t: Task) -> list[str]:
        """The storage instances other than the task's home that hold all of it."""
        if t.content is None:
            return []
        count = t.content.piece_count
        peers = ((h, t.peers.get(peer_id(h, t.id))) for h in self.core.seed_hosts())
        return sorted(
            h for h, p in peers if p is not None and h != t.seed_host and len(p.pieces) == count
        )

    def _shown_url(self, task_id: str) -> str | None:
        """The task's URL without credentials, for people; None when this scheduler only
        knows the task from a host's announcement of its cache."""
        source = self._sources.get(task_id)
        if source is None or source.url == PLACEHOLDER_URL:
            return None
        return redact_url(source.url)[:2048]

    async def on_state(self, req: messages.StateRequest) -> messages.StateReply:
        return messages.StateReply.from_dict(
            self.snapshot(
                bitmaps=bool(req.bitmaps),
                task_id=req.task_id,
                limit=1000 if req.limit is None else req.limit,
                host_limit=HOST_LIMIT if req.host_limit is None else req.host_limit,
                peer_limit=PEER_LIMIT if req.peer_limit is None else req.peer_limit,
            )
        )

    async def on_address(self, req: messages.AddressRequest) -> messages.AddressReply:
        """One live host's upload address, nothing of its tasks: what a peer probes for
        `swarmfly doctor` (``peer.{host_id}.reach``), taken from here rather than its asker."""
        host = self.core.hosts.get(req.host_id)
        if host is None:
            return messages.AddressReply(req.host_id, known=False)
        seen = round(max(0.0, self.clock() - host.last_seen), 3)
        kind: Literal["normal", "seed"] = "seed" if host.type == "seed" else "normal"
        return messages.AddressReply(req.host_id, True, host.address, kind, seen)

    async def _state(self, request: web.Request) -> web.Response:
        return web.json_response(await self._view(bitmaps=request.query.get("bitmaps") == "1"))

    async def _view(self, *, bitmaps: bool) -> dict[str, Any]:
        """The cluster as the dashboard shows it: this scheduler's state when it holds every
        partition, else every scheduler's merged (each knows its partitions' tasks only)."""
        if len(self.ownership.held) >= self.partitions:
            return self.snapshot(bitmaps=bitmaps)
        holders = {token for token in self.ownership.owners() if token}
        try:
            replies = await self.bus.gather(
                messages.STATE,
                messages.StateRequest(bitmaps=bitmaps, limit=VIEW_TASKS),
                wait=1.0,
                expect=len(holders) or None,
            )
            states = [reply.to_dict() for reply in replies]
        except (SwarmflyError, nats.errors.Error) as exc:
            log.debug("state of the other schedulers: %s", exc)
            states = []
        return merge(states or [self.snapshot(bitmaps=bitmaps, limit=VIEW_TASKS)], VIEW_TASKS)

    async def _events(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: the state with piece bitmaps, whenever it changes. Every
        client reads the one snapshot the feed takes per tick."""
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        try:
            async for body in self._feed.bodies():
                await response.write(b"data: " + body + b"\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        return response

    async def _event_body(self) -> bytes:
        return orjson.dumps(await self._view(bitmaps=True))

    async def _dashboard(self, request: web.Request) -> web.Response:
        page = resources.files(__package__).joinpath("dashboard.html").read_text("utf-8")
        return web.Response(
            text=page,
            content_type="text/html",
            headers={"Content-Security-Policy": DASHBOARD_CSP},
        )


def _speaks_for(
    sender: Sender,
    task_id: str | None = None,
    peer: str | None = None,
    host: messages.Host | None = None,
    *,
    host_id: str | None = None,
) -> None:
    """A host speaks only for itself: the subject names the sender (nats-server lets only
    that host's credentials publish under its id, where each host has its own, and only
    storage's under type seed); the body must name that host, and a peer that is this
    host's on the task."""
    if host is not None:
        host_id = host.id
    if host_id is not None and host_id != sender.host_id:
        raise SwarmflyError("forbidden", f"host {sender.host_id} may not speak for {host_id}")
    if host is not None and host.type != sender.host_type:
        raise SwarmflyError(
            "forbidden", f"a {sender.host_type} host may not speak as a {host.type} one"
        )
    if task_id is not None and peer is not None and peer != peer_id(sender.host_id, task_id):
        raise SwarmflyError("forbidden", f"peer {peer} is not host {sender.host_id}'s peer")


def _priority(req: messages.RegisterRequest) -> int:
    """The request's priority as the core may take it. LEVEL3-5 make this peer the task's
    origin reader, whose piece digests its children trust (DESIGN §9): only where the task is
    keyed by the whole file's digest the request names, so every child proves every byte;
    elsewhere they count as the default (a storage seed reads it), as lending does."""
    priority = req.source.priority or 0
    if priority in OWN_ORIGIN:
        digest = req.source.digest
        proven = digest is not None and keys_task(
            req.task_id, req.source.url, digest, req.source.filtered_query_params
        )
        return priority if proven else 0
    return priority


def _names_digest(req: messages.RegisterRequest, known: messages.Source) -> bool:
    """The request names the digest its task is keyed by, and the source the seed would get
    does not: the seed then knows the whole file's digest (and lends, since it proves).
    Checked against the task id, so nobody hands the seed a wrong one."""
    digest = req.source.digest
    return (
        not known.digest
        and digest is not None
        and keys_task(req.task_id, req.source.url, digest, req.source.filtered_query_params)
    )


class EventFeed:
    """One snapshot per tick for every event-stream client: the state is computed once per
    ``interval`` while at least one client listens (and not at all while none does), not
    once per client."""

    def __init__(self, take: Callable[[], Awaitable[bytes]], interval: float) -> None:
        self.take = take
        self.interval = interval
        self.body = b""
        self.taken = 0
        """Snapshots taken so far."""
        self._listeners = 0
        self._changed = asyncio.Event()
        self._ticker: asyncio.Task[None] | None = None

    async def bodies(self) -> AsyncIterator[bytes]:
        """Each new snapshot, the current one first; ends when the caller stops reading."""
        self._listeners += 1
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.create_task(self._tick())
        last = b""
        try:
            while True:
                if self.body and self.body != last:
                    last = self.body
                    yield last
                changed = self._changed
                await changed.wait()
        finally:
            self._listeners -= 1
            if self._listeners == 0 and self._ticker is not None:
                self._ticker.cancel()
                self._ticker = None
                self.body = b""  # stale by the time anyone listens again

    async def _tick(self) -> None:
        while self._listeners:
            try:
                body = await self.take()
            except Exception:  # one failed snapshot must not end every client's stream
                log.exception("dashboard snapshot failed")
            else:
                self.taken += 1
                if body != self.body:
                    self.body = body
                    self._changed.set()
                    self._changed = asyncio.Event()
            await asyncio.sleep(self.interval)


def _partition_tokens(token: str) -> dict[str, Any]:
    return {"every": ("partition",)} if token == ALL else {"partition": token}
