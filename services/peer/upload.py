"""The upload server: a peer serves its verified pieces to children over HTTP.

``GET /v1/tasks/{id}/pieces?since=V&wait=S`` long-polls what this peer holds, so children learn
availability from their parents, not from a swarm-wide broadcast; a seed answers with one
granted piece instead (``grants``), optionally among the ``wants`` bitmap the child sends.
``GET /v1/tasks/{id}/data`` with a ``Range`` inside verified pieces serves bytes with sendfile
(or paced, when an upload rate limit is set).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from nacl.signing import VerifyKey
from opentelemetry.trace import SpanKind

from swarmfly import bitmap, capability, telemetry
from swarmfly.errors import SwarmflyError
from swarmfly.httpheaders import parse_range
from swarmfly.httpserver import SlowReader, healthz, send_span
from swarmfly.ids import NODE_ID, TASK_ID
from swarmfly.metrics import PeerMetrics
from swarmfly.ratelimit import MIN_SEND_RATE, TokenBucket
from swarmfly.services.peer import grants
from swarmfly.services.peer.admission import Admission
from swarmfly.services.peer.lending import LONE_SECONDS, MAX_SAID
from swarmfly.services.peer.store import StoredTask, TaskStore

log = logging.getLogger(__name__)
MAX_OFFSET = 10**15 - 1
"""The largest byte offset a Range may name (15 digits, as the contract says)."""
MAX_WAIT = 30.0
GRANT_TICK = 0.05
"""Seconds between looks for newly verified pieces while children wait for a grant."""
PACED_SLOT_RATE = 8 * 1024 * 1024
"""Bytes/s each concurrent upload should get when an upload rate cap is set."""
WAITING_PER_SLOT = 3
"""Requests that may wait for each upload slot (at a super-seeding seed one: its places are
its grants'). Waiting costs a child nothing but a connection, and the neediest of them is
served next; turned away, it asks again later (bench/simulate.py, 1,000 peers: one waiting
per slot, ratio 1.225 and 18.9 busy answers per peer per second; three, 1.210 and 12.0)."""
MAX_KEYS = 4
CHECKED_TOKENS = 4096
CHILD: web.RequestKey[capability.Grant | None] = web.RequestKey("child")
"""The capability a request came with (None where capabilities are off)."""
SEND_WINDOW = 4.0
"""A child must read at least MIN_SEND_RATE bytes/s, over every SEND_WINDOW seconds, or it
is cut off."""
_CHUNK = 256 * 1024
TakeBack = Callable[[StoredTask, int, str, AsyncIterator[bytes]], Awaitable[bool]]
"""A seed's download taking a piece it lent back from its child (``PieceIO.take_back``):
the task, the piece, the child, the body. False when it had the piece already."""


class UploadServer:
    def __init__(
        self,
        store: TaskStore,
        *,
        rate: int = 0,
        slots: int = 64,
        superseed: bool = False,
        grant_seconds: float = grants.GRANT_SECONDS,
        capabilities: bool = True,
        healthy: Callable[[], bool] = lambda: True,
        metrics: PeerMetrics | None = None,
    ) -> None:
        self.store = store
        self.metrics = metrics or PeerMetrics()
        """Its host's (a server alone, in a test, has its own)."""
        self.healthy = healthy
        """Whether the host can do its work (``/healthz``): its control plane is reachable."""
        self.capabilities = capabilities
        """Serve a task only against a capability for it (``swarmfly.capability``)."""
        self.verify_keys: dict[str, VerifyKey] = {}
        """The schedulers' public keys, as heartbeat replies name them, newest last."""
        self._checked: OrderedDict[str, capability.Grant] = OrderedDict()
        """Tokens whose signature checked out, most recently shown last: a child shows the
        same one in every request until its next schedule, and a signature check costs
        about 100 us, a lookup nothing."""
        self.superseed = superseed
        """Answer polls with grants (a seed): see ``grants``."""
        self._answers: dict[grants.Poll, asyncio.Future[None]] = {}
        """The polls waiting at the desk, and how each learns its answer came."""
        self._ticker: asyncio.Task[None] | None = None
        self._serial = 0
        self.bucket = TokenBucket(rate)
        # Under a rate cap, few uploads at full speed beat many crawling ones: pieces finish
        # and spread sooner, and children turned away (503) ask another parent.
        self.slots = min(slots, max(1, -(-rate // PACED_SLOT_RATE))) if rate > 0 else slots
        self.leech = slots == 0
        """No slots: a leech, which serves no piece (only its health and metrics)."""
        self.uploads = 0
        self.admission: Admission[asyncio.Future[bool]] = Admission(self.slots)
        """Who uploads next: the neediest waiting child (True: its turn; False: displaced)."""
        waiting = 1 if superseed else WAITING_PER_SLOT
        self.desk = grants.GrantDesk((1 + waiting) * self.slots, grant_seconds)
        """Requests accepted at once (its capacity): some may wait per slot, so a slot never
        idles between two uploads; more are turned away (503) to ask another parent."""
        self.app = web.Application(client_max_size=1024)
        self.app.router.add_get("/v1/tasks/{task_id}/pieces", self.pieces, allow_head=False)
        self.app.router.add_get("/v1/tasks/{task_id}/data", self.data, allow_head=False)
        self.app.router.add_put("/v1/tasks/{task_id}/lent/{number}", self.lent)
        self.take_back: TakeBack | None = None
        """Where a lent piece handed back goes (the host's running seed download)."""
        self.wanted_unhashed: Callable[[StoredTask], None] | None = None
        """Told when a child's download asks for a task whose pieces this host holds
        ``unhashed`` (a seed's: it hashes and reports them, for the child to check)."""
        self.app.router.add_get("/healthz", self.healthz)
        self.app.router.add_get("/metrics", self.metrics.handler)

    @property
    def capacity(self) -> int:
        return self.desk.capacity

    @property
    def load(self) -> int:
        """Requests being served or waiting for a slot."""
        return self.admission.running + self.admission.waiting

    def trust(self, keys: Iterable[str]) -> None:
        """Check capabilities with these keys too (the newest few: a rotation overlaps)."""
        for text in keys:
            try:
                key = capability.verify_key(text)
            except ValueError:
                log.warning("a scheduler named a malformed capability key")
                continue
            if text not in self.verify_keys:
                self._checked.clear()  # the keys changed: what was checked is checked again
            self.verify_keys.pop(text, None)
            self.verify_keys[text] = key
        while len(self.verify_keys) > MAX_KEYS:
            del self.verify_keys[next(iter(self.verify_keys))]
            self._checked.clear()

    def _grant(self, request: web.Request, task_id: str) -> capability.Grant | None:
        """What the request's capability allows; 403 without a valid one for the task. Checked
        before the task is looked up: nobody learns what this host holds without one."""
        if not self.capabilities:
            return None
        header = request.headers.get("Authorization", "")
        token = header[7:] if header[:7].lower() == "bearer " else None
        now = time.time()
        known = self._checked.get(token) if token else None
        if token and known is not None and known.task_id == task_id and known.expires > now:
            self._checked.move_to_end(token)
            return known
        if not self.verify_keys:
            # No scheduler has named its key yet (this host just started): the child's token
            # may be good; it is told to come back, not that it holds no right.
            raise web.HTTPServiceUnavailable(
                text="no scheduler key known yet", headers={"Retry-After": "1"}
            )
        try:
            grant = capability.check(token, self.verify_keys.values(), task_id, now)
        except capability.CapabilityError as exc:
            self.metrics.upload_refused.labels("capability").inc()
            raise web.HTTPForbidden(text=exc.message) from None
        assert token is not None
        self._checked[token] = grant
        if len(self._checked) > CHECKED_TOKENS:
            self._checked.popitem(last=False)
        return grant

    def _task(self, request: web.Request) -> StoredTask:
        if self.leech:
            raise web.HTTPForbidden(text="this host does not upload")
        task_id = request.match_info["task_id"]
        if not TASK_ID.fullmatch(task_id):
            raise web.HTTPBadRequest(text="invalid task id")
        request[CHILD] = self._grant(request, task_id)
        task = self.store.get(task_id)
        if task is None or task.content is None:
            raise web.HTTPNotFound(text="unknown task")
        return task

    async def healthz(self, request: web.Request) -> web.Response:
        return healthz(self.healthy(), uploads=self.uploads)

    async def pieces(self, request: web.Request) -> web.Response:
        task = self._task(request)
        try:
            since = int(request.query.get("since", "-1"))
            wait = min(MAX_WAIT, max(0.0, float(request.query.get("wait", "0"))))
        except ValueError:
            raise web.HTTPBadRequest(text="since and wait must be numbers") from None
        assert task.content is not None
        if task.unhashed and "wants" in request.query and self.wanted_unhashed is not None:
            self.wanted_unhashed(task)  # a download's poll (a holder's copy asks no "wants")
        if self.superseed:
            return await self._grant_poll(request, task, wait)
        answer: dict[str, Any] = {}
        lending = task.lending
        ask = _SeedAsk.of(request, task) if lending is not None else None
        if lending is not None and lending.lends_sole and ask is not None and ask.child is not None:
            # A seed with no uplink limit lends only to a sole child: its own reads wait.
            now = time.monotonic()
            lending.asked(ask.child, now, ask.borrows)
            try:
                # News ends the wait; so does becoming the sole child meanwhile (the seed's
                # reads then wait for this child's, which must not wait for news).
                deadline = now + wait
                while True:
                    lent: list[int] = []
                    if ask.borrows and ask.wanted is not None and lending.sole(now) == ask.child:
                        # As many as it may read at once, in one answer: a child asking
                        # for each in turn would leave the origin idle between them.
                        while (
                            number := lending.lend(
                                task.done, task.served, ask.wanted, now, ask.child
                            )
                        ) is not None:
                            lent.append(number)
                    if lent:
                        # Nobody else asks: no one takes the pieces on the child's word, and
                        # they need no digest of their own (``sole``).
                        answer = {**_lent_answer(lent, lending.etag), "sole": True}
                        break
                    if now >= deadline or task.complete or task.version != since:
                        # Others ask beside it: what it was lent as the sole child, unhashed,
                        # it hashes and reports after all, for them to take from it.
                        answer = {"sole": False} if lending.sole(now) != ask.child else {}
                        break
                    await task.wait_change(since, min(deadline - now, LOAN_RECHECK))
                    now = time.monotonic()
            finally:
                lending.ended(ask.child, time.monotonic(), ask.borrows)
        elif wait and not task.complete:  # a complete task has no news
            await task.wait_change(since, wait)
        return web.json_response(
            {
                "version": task.version,
                "piece_count": task.content.piece_count,
                "complete": task.complete,
                "pieces": sorted(task.done),
                **answer,
            }
        )

    async def lent(self, request: web.Request) -> web.Response:
        """A child that leaves hands back a piece this seed lent it and lacks: only the
        child it was lent to (by its capability), only the whole piece, verified as it is
        written. ``taken``: false when this host has it already or lends the task no more."""
        task = self._task(request)
        assert task.content is not None
        text = request.match_info["number"]
        if not (text.isascii() and text.isdigit() and len(text) <= 9) or (
            int(text) >= task.content.piece_count
        ):
            raise web.HTTPBadRequest(text="not a piece of the task")
        number = int(text)
        grant: capability.Grant | None = request[CHILD]
        child = grant.peer_id if grant is not None else request.query.get("peer")
        lending = task.lending
        if lending is None or number in task.done or self.take_back is None:
            return web.json_response({"taken": False})
        if child is None or lending.lent_to.get(number) != child:
            raise web.HTTPForbidden(text="the piece was not lent to this child")
        if request.content_length != task.content.piece(number)[1]:
            raise web.HTTPBadRequest(text="the body must be the whole piece")
        try:
            taken = await self.take_back(task, number, child, request.content.iter_chunked(_CHUNK))
        except SwarmflyError as exc:
            if exc.code == "integrity":
                raise web.HTTPUnprocessableEntity(text="the piece does not match") from None
            raise web.HTTPServiceUnavailable(text="the piece was not taken") from None
        return web.json_response({"taken": taken})

    # -- grants (a seed) -----------------------------------------------------------------

    async def _grant_poll(
        self, request: web.Request, task: StoredTask, wait: float
    ) -> web.Response:
        """One granted piece when this child's turn comes and a slot is free for it, or one
        to read from the origin itself (``lending``); none after ``wait``. Never
        ``complete``: a child keeps asking while it lacks pieces."""
        assert task.content is not None
        ask = _SeedAsk.of(request, task)
        try:
            declined = int(request.query.get("decline", "-1"))
        except ValueError:
            raise web.HTTPBadRequest(text="decline must be a piece number") from None
        poll = grants.Poll(task, ask.wanted, ask.child, borrows=ask.borrows)
        answered = self._answers[poll] = asyncio.get_running_loop().create_future()
        in_range = 0 <= declined < task.content.piece_count
        self.desk.ask(poll, time.monotonic(), declined if in_range else None)
        self._dispatch()
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(answered), wait)
        finally:
            del self._answers[poll]
            self.desk.withdraw(poll, time.monotonic())
        self._serial += 1
        answer: dict[str, Any] = {
            "version": self._serial,
            "piece_count": task.content.piece_count,
            "complete": False,
            "pieces": [poll.answer.number] if isinstance(poll.answer, grants.Granted) else [],
        }
        if isinstance(poll.answer, grants.Lent):
            answer.update(_lent_answer([poll.answer.number], poll.answer.etag))
        return web.json_response(answer)

    def _dispatch(self) -> None:
        """The desk's answers to waiting children (``grants.GrantDesk.dispatch``); a grant
        that lapses frees its place for the next."""
        loop = asyncio.get_running_loop()
        for poll in self.desk.dispatch(self.load, time.monotonic()):
            if isinstance(poll.answer, grants.Granted):
                loop.call_later(self.desk.lease, self._dispatch)
            answered = self._answers.get(poll)
            if answered is not None and not answered.done():
                answered.set_result(None)
        if self.desk.waiting and self._ticker is None:
            self._ticker = asyncio.create_task(self._tick())

    async def _tick(self) -> None:
        """Pieces verified while children wait (a seed still reading the origin) are
        granted within a tick; the ticker ends when no child waits."""
        try:
            while self.desk.waiting:
                await asyncio.sleep(GRANT_TICK)
                self._dispatch()
        finally:
            self._ticker = None

    async def data(self, request: web.Request) -> web.StreamResponse:
        task = self._task(request)
        span = parse_range(request.headers.get("Range"))
        start, last = span or (None, None)
        if start is None or last is None or max(start, last) > MAX_OFFSET:  # both, and bounded
            raise web.HTTPBadRequest(text="a Range of verified pieces is required")
        assert task.content is not None
        have = _have(request.query.get("have"), task.content.piece_count)
        number = start // task.content.piece_length
        whole = {"Content-Range": f"bytes */{task.content.content_length}"}  # RFC 9110 15.5.17
        if last // task.content.piece_length != number:  # what children ask: one piece
            raise web.HTTPRequestRangeNotSatisfiable(
                text="a range must lie within one piece", headers=whole
            )
        if not task.covers(start, last + 1):
            raise web.HTTPRequestRangeNotSatisfiable(
                text="range not within verified pieces", headers=whole
            )
        grant: capability.Grant | None = request[CHILD]
        child = grant.peer_id if grant is not None else None
        share = self.admission.share(child, have, task.content.piece_count)
        self.desk.taken(task.id, number)  # a granted request holds its place already
        if self.desk.full(self.load, time.monotonic()):
            # A seed's places are its grants': nobody is displaced there.
            waiter = None if self.superseed else self.admission.displace(share)
            if waiter is None:
                self.metrics.upload_refused.labels("busy").inc()
                raise _busy()
            if not waiter.done():  # else its child went away: the place is free anyway
                waiter.set_result(False)
        task.touch()
        with task.in_use():  # from now, not from its slot: GC must not evict a queued upload
            return await self._upload(request, task, number, start, last, child, share)

    async def _upload(
        self,
        request: web.Request,
        task: StoredTask,
        number: int,
        start: int,
        last: int,
        child: str | None,
        share: float,
    ) -> web.StreamResponse:
        """One piece's span, once an upload slot is free; counted served at once (the next
        grant prefers another piece) and uncounted when it was not delivered."""
        assert task.content is not None
        task.upload_event(number, 1)
        delivered = False
        try:
            await self._turn(share)
        except BaseException:
            task.upload_event(number, -1)
            raise
        self.uploads += 1
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
                    attributes={
                        "http.request.method": "GET",
                        "url.path": request.path,
                        "http.response.status_code": 206,
                        "swarmfly.piece": number,
                    },
                    carrier=carrier,
                )
                if carrier
                else nullcontext()
            ):
                delivered = await self._send(request, response, task, start, last - start + 1)
            return response
        finally:
            if delivered:
                self.admission.sent(child)
            else:
                task.upload_event(number, -1)  # not delivered: it does not count as served
            self.uploads -= 1
            self._release()
            if self.superseed:
                self._dispatch()

    async def _turn(self, share: float) -> None:
        """Until this request holds an upload slot; 503 when a needier child displaced it."""
        turn = asyncio.get_running_loop().create_future()
        if self.admission.enter(turn, share):
            return
        try:
            mine = await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled() and turn.result():
                self._release()  # the slot came as the child went away: the next one's
            else:
                self.admission.leave(turn)
            raise
        if not mine:
            self.metrics.upload_refused.labels("displaced").inc()
            raise _busy()

    def _release(self) -> None:
        """A slot is free: the neediest waiter's turn (skipping those that went away)."""
        while (turn := self.admission.release()) is not None:
            if not turn.done():
                turn.set_result(True)
                return

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
            await send_span(
                request, response, task.data_path, start, size, self.bucket,
                min_rate=MIN_SEND_RATE, window=SEND_WINDOW,
            )  # fmt: skip
            await response.write_eof()
        except SlowReader:
            log.info("cut off a child reading %s at byte %d too slowly", task.id[:12], start)
            return False
        except ConnectionError:
            log.debug("child went away during piece %d of %s", start, task.id[:12])
            return False
        self.metrics.upload_bytes.inc(size)
        return True


def _busy() -> web.HTTPServiceUnavailable:
    return web.HTTPServiceUnavailable(text="no free upload slot", headers={"Retry-After": "1"})


def _have(text: str | None, piece_count: int) -> int | None:
    """The pieces a child says it holds (``have=12``), which orders who is served first."""
    if text is None:
        return None
    if not (text.isascii() and text.isdigit() and len(text) <= 9) or int(text) > piece_count:
        raise web.HTTPBadRequest(text="have must be a count of the task's pieces")
    return int(text)


@dataclass(frozen=True)
class _SeedAsk:
    """What a child's poll of a seed says of it, checked (untrusted input); what it says it
    read of the pieces lent to it is told to the task's lending as it is read."""

    wanted: set[int] | None
    child: str | None
    borrows: bool

    @classmethod
    def of(cls, request: web.Request, task: StoredTask) -> _SeedAsk:
        assert task.content is not None
        wants = request.query.get("wants")
        try:
            wanted = None if wants is None else bitmap.decode(wants, task.content.piece_count)
        except SwarmflyError as exc:
            raise web.HTTPBadRequest(text=exc.message) from None
        child = request.query.get("peer")
        if child is not None and not NODE_ID.match(child):
            raise web.HTTPBadRequest(text="peer must be a peer id")
        borrow = request.query.get("borrow", "1")
        if borrow not in ("0", "1"):
            raise web.HTTPBadRequest(text="borrow must be 0 or 1")
        grant: capability.Grant | None = request[CHILD]
        if grant is not None:
            child = grant.peer_id  # who the capability says, whatever the query says
        if task.lending is not None and "lent" in request.query:
            task.lending.said(_numbers(request.query["lent"]))
        return cls(wanted, child, borrow == "1")


LOAN_RECHECK = LONE_SECONDS / 5
"""Seconds between a waiting child's looks at whether it is the sole one now."""


def _lent_answer(numbers: list[int], etag: str | None) -> dict[str, Any]:
    """A poll's answer lending ``numbers``: read them from the origin, pinned to ``etag``."""
    return {"origin": numbers, **({"etag": etag} if etag else {})}


def _numbers(text: str) -> list[int]:
    """The lent pieces a child says it read (``lent=3,7``)."""
    numbers = text.split(",")
    # ASCII digits only: str.isdigit() also takes "²", which int() refuses (a 500).
    if len(numbers) > MAX_SAID or not all(
        n.isascii() and n.isdigit() and len(n) <= 9 for n in numbers
    ):
        raise web.HTTPBadRequest(text=f"lent must be up to {MAX_SAID} piece numbers")
    return [int(n) for n in numbers]
