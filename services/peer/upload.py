"""The upload server: a peer serves its verified pieces to children over HTTP.

``GET /v1/tasks/{id}/pieces?since=V&wait=S`` long-polls what this peer holds, so children learn
availability from their parents, not from a swarm-wide broadcast. ``GET /v1/tasks/{id}/data``
with a ``Range`` inside verified pieces serves bytes with sendfile (or paced, when an upload
rate limit is set).
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
from contextlib import nullcontext

from aiohttp import web
from opentelemetry.trace import SpanKind

from swarmfly import metrics, telemetry
from swarmfly.httpserver import send_span
from swarmfly.ids import TASK_ID
from swarmfly.ratelimit import TokenBucket
from swarmfly.services.peer.store import StoredTask, TaskStore

log = logging.getLogger(__name__)
_RANGE = re.compile(r"^bytes=(\d{1,15})-(\d{1,15})$")
MAX_WAIT = 30.0
REVEAL = 1
"""Pieces a super-seeding parent offers per answer."""
PACED_SLOT_RATE = 8 * 1024 * 1024
"""Bytes/s each concurrent upload should get when an upload rate cap is set."""


class UploadServer:
    def __init__(
        self, store: TaskStore, *, rate: int = 0, slots: int = 64, superseed: bool = False
    ) -> None:
        self.store = store
        self.superseed = superseed
        self.rng = random.Random()
        self.bucket = TokenBucket(rate)
        # Under a rate cap, few uploads at full speed beat many crawling ones: pieces finish
        # and spread sooner, and children turned away (503) ask another parent.
        self.slots = min(slots, max(1, -(-rate // PACED_SLOT_RATE))) if rate > 0 else slots
        self.uploads = 0
        self._waiting = 0
        self.capacity = 2 * self.slots
        """Requests accepted at once: one may wait per slot, so a slot never idles between
        two uploads; more are turned away (503) to ask another parent."""
        self._free = asyncio.Semaphore(self.slots)
        self.app = web.Application(client_max_size=1024)
        self.app.router.add_get("/v1/tasks/{task_id}/pieces", self.pieces)
        self.app.router.add_get("/v1/tasks/{task_id}/data", self.data)
        self.app.router.add_get("/healthz", self.healthz)
        self.app.router.add_get("/metrics", metrics.handler)

    @property
    def load(self) -> int:
        """Requests being served or waiting for a slot."""
        return self.uploads + self._waiting

    def _task(self, request: web.Request) -> StoredTask:
        task_id = request.match_info["task_id"]
        if not TASK_ID.fullmatch(task_id):
            raise web.HTTPBadRequest(text="invalid task id")
        task = self.store.get(task_id)
        if task is None or task.content is None:
            raise web.HTTPNotFound(text="unknown task")
        return task

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "uploads": self.uploads})

    async def pieces(self, request: web.Request) -> web.Response:
        task = self._task(request)
        try:
            since = int(request.query.get("since", "-1"))
            wait = min(MAX_WAIT, max(0.0, float(request.query.get("wait", "0"))))
        except ValueError:
            raise web.HTTPBadRequest(text="since and wait must be numbers") from None
        superseed = self.superseed and task.complete
        current = task.version + task.upload_events if superseed else task.version
        if wait and (superseed or not task.complete):  # a complete task has no news
            await task.wait_change(since, wait, current)
            current = task.version + task.upload_events if superseed else task.version
        assert task.content is not None
        return web.json_response(
            {
                "version": current,
                "piece_count": task.content.piece_count,
                "complete": task.complete and not superseed,
                "pieces": self._reveal(task) if superseed else sorted(task.done),
            }
        )

    def _reveal(self, task: StoredTask) -> list[int]:
        """Super-seeding: offer each child a few of the least-uploaded pieces, in random
        order, so the scarce seed uplink sends each piece about once and the children trade
        the rest among themselves."""
        least = min(task.served.get(n, 0) for n in task.done)
        tier = [n for n in task.done if task.served.get(n, 0) == least]
        self.rng.shuffle(tier)
        return sorted(tier[:REVEAL])

    async def data(self, request: web.Request) -> web.StreamResponse:
        task = self._task(request)
        match = _RANGE.fullmatch(request.headers.get("Range", ""))
        if not match:
            raise web.HTTPBadRequest(text="a Range of verified pieces is required")
        start, last = int(match.group(1)), int(match.group(2))
        if not task.covers(start, last + 1):
            raise web.HTTPRequestRangeNotSatisfiable(text="range not within verified pieces")
        if self.load >= self.capacity:
            raise web.HTTPServiceUnavailable(
                text="no free upload slot", headers={"Retry-After": "1"}
            )
        assert task.content is not None
        number = start // task.content.piece_length
        task.upload_event(number, 1)  # asked for: a super-seeding reveal moves on at once
        task.touch()
        delivered = False
        self._waiting += 1
        try:
            await self._free.acquire()
        except BaseException:
            task.upload_event(number, -1)
            raise
        finally:
            self._waiting -= 1
        self.uploads += 1
        task.active += 1
        carrier = (
            {"traceparent": request.headers["traceparent"]}
            if "traceparent" in request.headers
            else None
        )
        response = web.StreamResponse(
            status=206,
            headers={
                "Content-Range": f"bytes {start}-{last}/{task.content.content_length}",
                "Content-Type": "application/octet-stream",
            },
        )
        try:
            with (
                telemetry.span(
                    "serve piece",
                    kind=SpanKind.SERVER,
                    attributes={"http.request.method": "GET", "swarmfly.piece": number},
                    carrier=carrier,
                )
                if carrier
                else nullcontext()
            ):
                delivered = await self._send(request, response, task, start, last - start + 1)
            return response
        finally:
            if not delivered:
                task.upload_event(number, -1)  # not delivered: it does not count as served
            self.uploads -= 1
            task.active -= 1
            self._free.release()

    async def _send(
        self,
        request: web.Request,
        response: web.StreamResponse,
        task: StoredTask,
        start: int,
        size: int,
    ) -> bool:
        """Send the span; False when the child hung up first (it asked another parent, or
        gave up): routine in a swarm, not an error."""
        response.content_length = size
        try:
            await response.prepare(request)
            await send_span(request, response, task.data_path, start, size, self.bucket)
            await response.write_eof()
        except ConnectionError:
            log.debug("child went away during piece %d of %s", start, task.id[:12])
            return False
        metrics.PEER_UPLOAD_BYTES.inc(size)
        return True
