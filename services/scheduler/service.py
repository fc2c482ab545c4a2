"""The scheduler adapter: feeds NATS requests to the pure core and sends its answers back."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import AsyncExitStack
from importlib import resources
from typing import Any

import orjson
from aiohttp import web

from swarmfly import __version__, metrics
from swarmfly.bus import Bus
from swarmfly.config import Config
from swarmfly.content import TaskContent
from swarmfly.errors import SwarmflyError
from swarmfly.httpserver import serve_http
from swarmfly.plugins.hookspecs import Evaluator
from swarmfly.services.scheduler.core import HostSpec, PieceReport, Scheduler, TriggerSeed

log = logging.getLogger(__name__)
EVENT_INTERVAL = 0.5
DASHBOARD_CSP = "default-src 'self'; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
"""The page loads nothing from elsewhere (no CDN): it must work on machines with no internet."""
DIGEST_PAGE = 8192
"""Digests per scheduler.task reply: a page stays far below NATS's 1 MiB payload limit."""


def host_spec(data: dict[str, Any]) -> HostSpec:
    return HostSpec(
        id=data["id"],
        ip=data["ip"],
        port=data["port"],
        type=data["type"],
        idc=data.get("idc", ""),
        location=data.get("location", ""),
        upload_slots=data.get("upload_slots", 64),
    )


def content(data: dict[str, Any] | None) -> TaskContent | None:
    return None if data is None else TaskContent.from_dict(data)


class SchedulerService:
    """Lifecycle: ``start`` subscribes and serves; ``stop`` unsubscribes; state is soft."""

    def __init__(
        self, config: Config, bus: Bus, evaluator: Evaluator, clock: Any = time.monotonic
    ) -> None:
        self.config = config
        self.bus = bus
        self.clock = clock
        sc = config.scheduler
        self.core = Scheduler(
            candidate_parents=sc.candidate_parents,
            host_ttl=sc.host_ttl,
            seed_timeout=sc.seed_timeout,
            evaluator=evaluator,
        )
        self.http_url = ""
        self._sources: dict[str, dict[str, Any]] = {}
        """task id -> source (with headers) kept in memory only, to hand to a seed."""
        self._background: set[asyncio.Task[None]] = set()

    async def start(self, stack: AsyncExitStack) -> None:
        await self.bus.add_service(
            "scheduler",
            __version__,
            "swarmfly scheduler: tasks, peers and parent choice",
            {
                "scheduler.register": self.on_register,
                "scheduler.reschedule": self.on_reschedule,
                "scheduler.pieces": self.on_pieces,
                "scheduler.task": self.on_task,
                "scheduler.result": self.on_result,
                "scheduler.leave": self.on_leave,
                "scheduler.heartbeat": self.on_heartbeat,
                "scheduler.state": self.on_state,
            },
        )
        expiry = asyncio.create_task(self._expire_loop())
        stack.callback(expiry.cancel)
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", metrics.handler)
        app.router.add_get("/api/state", self._state)
        app.router.add_get("/api/events", self._events)
        app.router.add_get("/", self._dashboard)
        sc = self.config.scheduler
        self.http_url = await serve_http(stack, app, sc.listen, sc.http_port)

    # -- handlers ------------------------------------------------------------------------

    async def on_register(self, req: dict[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        self._sources.setdefault(req["task_id"], req["source"])
        schedule, effects = self.core.register(
            task_id=req["task_id"],
            peer_id=req["peer_id"],
            host=host_spec(req["host"]),
            now=self.clock(),
            pieces=req.get("pieces", ()),
            content=content(req.get("task")),
            seed=req.get("seed", False),
        )
        self._run(effects)
        metrics.SCHEDULER_REGISTRATIONS.inc()
        if schedule.action == "back_to_source" and not req.get("seed"):
            metrics.SCHEDULER_BACK_TO_SOURCE.inc()
        metrics.SCHEDULER_SCHEDULE_SECONDS.observe(time.perf_counter() - started)
        return schedule.to_dict()

    async def on_reschedule(self, req: dict[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        schedule, effects = self.core.reschedule(
            task_id=req["task_id"],
            peer_id=req["peer_id"],
            now=self.clock(),
            blocklist=req.get("blocklist", ()),
            bad_parents=[(b["peer_id"], b["reason"]) for b in req.get("bad_parents", ())],
        )
        self._run(effects)
        if schedule.action == "back_to_source":
            metrics.SCHEDULER_BACK_TO_SOURCE.inc()
        metrics.SCHEDULER_SCHEDULE_SECONDS.observe(time.perf_counter() - started)
        return schedule.to_dict()

    async def on_pieces(self, req: dict[str, Any]) -> dict[str, Any]:
        self.core.report_pieces(
            task_id=req["task_id"],
            peer_id=req["peer_id"],
            pieces=[
                PieceReport(p["number"], p.get("digest"), p.get("parent_id"), p.get("cost_ms"))
                for p in req["pieces"]
            ],
            now=self.clock(),
            content=content(req.get("task")),
        )
        return {"ok": True}

    async def on_task(self, req: dict[str, Any]) -> dict[str, Any]:
        task, digests = self.core.task_info(req["task_id"])
        offset = req.get("offset", 0)
        return {
            "task": task.to_dict() if task else None,
            "offset": offset,
            "digests": digests[offset : offset + DIGEST_PAGE],
        }

    async def on_result(self, req: dict[str, Any]) -> dict[str, Any]:
        self.core.result(
            task_id=req["task_id"], peer_id=req["peer_id"], success=req["success"], now=self.clock()
        )
        return {"ok": True}

    async def on_leave(self, req: dict[str, Any]) -> dict[str, Any]:
        self.core.leave(req["host_id"], req.get("peer_ids"))
        self._forget_sources()
        return {"ok": True}

    async def on_heartbeat(self, req: dict[str, Any]) -> dict[str, Any]:
        known = self.core.heartbeat(host_spec(req["host"]), req.get("uploads", 0), self.clock())
        interval_ms = int(self.config.scheduler.heartbeat_interval * 1000)
        return {"ok": True, "known": known, "interval_ms": interval_ms}

    # -- effects and housekeeping --------------------------------------------------------

    def _run(self, effects: list[TriggerSeed]) -> None:
        for effect in effects:
            task = asyncio.create_task(self._trigger_seed(effect.task_id))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _trigger_seed(self, task_id: str) -> None:
        source = self._sources.get(task_id)
        if source is None:
            self.core.seed_unavailable(task_id)
            return
        try:
            reply = await self.bus.request(
                "storage.seed", {"task_id": task_id, "source": source}, timeout=5.0
            )
            if not reply["accepted"]:
                self.core.seed_unavailable(task_id)
        except SwarmflyError as exc:
            log.info("no seed for task %s: %s", task_id[:12], exc.code)
            self.core.seed_unavailable(task_id)

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
            metrics.SCHEDULER_HOSTS.set(len(self.core.hosts))
            metrics.SCHEDULER_TASKS.set(len(self.core.tasks))

    async def _healthz(self, request: web.Request) -> web.Response:
        ok = self.bus.nc.is_connected
        return web.json_response({"ok": ok}, status=200 if ok else 503)

    def snapshot(
        self, *, bitmaps: bool = False, task_id: str | None = None, limit: int = 1000
    ) -> dict[str, Any]:
        """The scheduler's soft state, as ``scheduler.state`` replies and the dashboard shows."""
        core, now = self.core, self.clock()
        tasks = [t for t in core.tasks.values() if task_id is None or t.id == task_id]
        tasks.sort(key=lambda t: max((p.updated_at for p in t.peers.values()), default=0.0))
        return {
            "hosts": [
                {
                    "id": h.id,
                    "type": h.type,
                    "address": h.address,
                    "uploads": h.uploads,
                    "upload_slots": h.upload_slots,
                    "seen_s": round(max(0.0, now - h.last_seen), 3),
                }
                for h in core.hosts.values()
            ],
            "tasks": [
                {
                    "id": t.id,
                    "task": t.content.to_dict() if t.content else None,
                    "peers": [
                        {
                            "id": p.id,
                            "host_id": p.host_id,
                            "state": p.state,
                            "pieces": len(p.pieces),
                            "source": p.is_source,
                            **({"bitmap": bitmap(p.pieces)} if bitmaps else {}),
                        }
                        for p in t.peers.values()
                    ],
                }
                for t in reversed(tasks[-limit:])
            ],
        }

    async def on_state(self, req: dict[str, Any]) -> dict[str, Any]:
        return self.snapshot(
            bitmaps=req.get("bitmaps", False),
            task_id=req.get("task_id"),
            limit=req.get("limit", 1000),
        )

    async def _state(self, request: web.Request) -> web.Response:
        return web.json_response(self.snapshot(bitmaps=request.query.get("bitmaps") == "1"))

    async def _events(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: the state with piece bitmaps, whenever it changes."""
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        last = b""
        try:
            while True:
                body = orjson.dumps(self.snapshot(bitmaps=True))
                if body != last:
                    await response.write(b"data: " + body + b"\n\n")
                    last = body
                await asyncio.sleep(EVENT_INTERVAL)
        except (ConnectionResetError, asyncio.CancelledError):
            return response

    async def _dashboard(self, request: web.Request) -> web.Response:
        page = resources.files(__package__).joinpath("dashboard.html").read_text("utf-8")
        return web.Response(
            text=page,
            content_type="text/html",
            headers={"Content-Security-Policy": DASHBOARD_CSP},
        )


def bitmap(pieces: set[int]) -> str:
    """Hex bitmap: piece n is bit n (least significant bit of the first byte first)."""
    if not pieces:
        return ""
    out = bytearray(max(pieces) // 8 + 1)
    for number in pieces:
        out[number // 8] |= 1 << (number % 8)
    return out.hex()
