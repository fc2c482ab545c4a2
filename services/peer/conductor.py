"""One task's download: register, fetch pieces from parents (or the origin), verify, report.

The conductor is the adapter of the download's pure cores: ``phases`` (which phase comes
next), ``swarming`` (which piece from which parent, when to ask the scheduler again),
``ledger`` (the digests pieces are checked against), ``reports`` (what the scheduler is
told), ``lending`` and ``takeover`` (a seed's origin reads). It owns the tasks, timers and
threads, and reaches the rest of the host only through ``links``.

Some 1,300 lines, and the next to split: its parts (parents, the origin, a seed's lending and
take-over, the control plane) call one another and share the download's state (the stored
task, the ledger, the swarm core, the rates). Split as mixins, each part would have to name
that state as a protocol of some 50 members; the way out is to move more of the parts'
decisions into the cores above, until what is left here is IO.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Collection, Iterator
from dataclasses import dataclass, replace
from typing import Any

from opentelemetry.trace import SpanKind

from swarmfly import bitmap, telemetry
from swarmfly.content import SourceRequest, TaskContent, piece_count, piece_length_for
from swarmfly.contracts import messages
from swarmfly.contracts.wire import ABSENT, Absent, Rep, Req, Subject
from swarmfly.errors import SwarmflyError, in_words
from swarmfly.ids import check_digest, redact_url
from swarmfly.plugintypes import SourceStat, Strategy
from swarmfly.ratelimit import TokenBucket
from swarmfly.services.peer.filedigest import PrefixDigest
from swarmfly.services.peer.ledger import DigestLedger
from swarmfly.services.peer.lending import LEND_POLL, Lending
from swarmfly.services.peer.links import Links, OriginReader
from swarmfly.services.peer.phases import (
    TRANSITIONS,
    Announce,
    Finish,
    Phases,
    ReadOrigin,
    Register,
    Repair,
    Step,
    Swarm,
    TakeOver,
    Verify,
    Wait,
    first_event,
)
from swarmfly.services.peer.pieces import PieceBook
from swarmfly.services.peer.reports import REPORT_INTERVAL, Batch, Reports
from swarmfly.services.peer.store import StoredTask
from swarmfly.services.peer.swarming import (
    BUSY_BACKOFF,
    ORIGIN,
    Drop,
    Failure,
    Fetch,
    Reschedule,
    Swarming,
    in_flight,
)
from swarmfly.services.peer.takeover import ATTEMPTS, Gathering

log = logging.getLogger(__name__)

WRITE_BATCH = 512 * 1024
"""Bytes of a piece gathered before they go to disk in one thread hop (a hop per network
chunk cost more than the writing); with 16 pieces in flight, twice this is what a download
holds in memory (1 MiB put the peer past 100 MiB resident)."""
POLL_WAIT = 10.0
SEED_POLL_WAIT = 2.0
"""A seed's grant follows the pieces the child said it wants; they go stale sooner."""
_PUSHING = (messages.RegisterRequest, messages.RescheduleRequest, messages.PiecesRequest)
"""The requests whose replies push digests."""


def _retry_after(schedule: messages.Schedule, default_ms: int) -> float:
    """Seconds to wait as the schedule says, or ``default_ms`` when it does not."""
    ms = default_ms if schedule.retry_after_ms is None else schedule.retry_after_ms
    return ms / 1000


def _lent_pieces(answer: dict[str, Any]) -> list[tuple[int, str | None]]:
    """The pieces a seed's answer lends, checked: it is untrusted input."""
    numbers, etag = answer["origin"], answer.get("etag")
    if not isinstance(numbers, list) or not all(
        isinstance(n, int) and 0 <= n < 1 << 31 for n in numbers
    ):
        raise SwarmflyError("bad_request", "seed lent a malformed piece list")
    if etag is not None and not (isinstance(etag, str) and len(etag) <= 512 and etag.isprintable()):
        raise SwarmflyError("bad_request", "seed lent pieces with a malformed ETag")
    return [(n, etag) for n in numbers[:8]]


class LocalDiskError(SwarmflyError):
    """This host cannot store the piece (disk full, I/O error): no parent can help."""

    def __init__(self, reason: str) -> None:
        super().__init__("internal", f"cannot store the download here: {reason}")

    @classmethod
    def of(cls, exc: OSError) -> LocalDiskError:
        """The OS's words for it (or the store's own, which say more), and the file when
        the OS names one."""
        where = f" ({exc.filename})" if exc.filename else ""
        return cls((exc.strerror or in_words(exc)) + where)


class SwarmContradicts(SwarmflyError):
    """What the swarm says of the content differs from this host's own stat of the origin."""

    def __init__(self, reason: str) -> None:
        super().__init__("conflict", reason)


class ParentBusy(SwarmflyError):
    """The parent has no free upload slot: ask another, come back shortly."""

    def __init__(self) -> None:
        super().__init__("unavailable", "parent busy")


@dataclass
class Parent:
    peer_id: str
    host_id: str
    address: str
    type: str = "normal"
    failures: int = 0
    busy_until: float = 0.0
    version: int = -1
    complete: bool = False
    watcher: asyncio.Task[None] | None = None


class Conductor:
    def __init__(
        self,
        links: Links,
        task_id: str,
        source: SourceRequest,
        *,
        stored: StoredTask,
        peer_id: str,
        strategy: Strategy,
        origin: OriginReader,
        seed: bool,
        stat: SourceStat,
    ) -> None:
        self.links = links
        self.scheduler = links.scheduler
        self.settings = links.settings
        self.clock = links.clock
        self.metrics = links.metrics
        self.origin = origin
        self.task_id = task_id
        self.source = source
        self.seed = seed
        self.stat = stat
        self.rate = TokenBucket(0)
        """This download's own limit (``asking``), within the host's."""
        self._asks: list[int] = []
        """The rates of the asks waiting for this run (0: none of their own)."""
        self.strategy = strategy
        self.peer_id = peer_id
        self.stored = stored
        self.digest = PrefixDigest(self.stored)
        self.file_digest: str | None = None
        """``sha256:HEX`` of the whole file, once verified against the known digest."""
        self.bytes_origin = 0
        self.bytes_p2p = 0
        self.parents: dict[str, Parent] = {}
        self.swarm = Swarming(self.settings.concurrency, self.settings.per_parent, now=self.clock())
        """The P2P policy: parents, pieces, when to reschedule (a pure core)."""
        self._lent: list[tuple[int, str | None]] = []
        """Pieces a seed lent us to read from the origin, with the ETag it pinned."""
        self._delivered: list[int] = []
        """Lent pieces we read, to tell the seed."""
        self.ledger = DigestLedger()
        """The digests pieces are checked against, and on whose word (a pure core)."""
        self.repaired: set[int] = set()
        """Pieces the whole file's check found false and read again: whoever streamed them
        before (the mirror) sent false bytes."""
        self.phases = Phases()
        """Where the download is (``phases.TRANSITIONS``)."""
        self.reports = Reports()
        """What the scheduler is still to hear."""
        self._holders: list[messages.Parent] = []
        """A seed taking over: the peers that held pieces when it registered."""
        self._wake = asyncio.Event()
        self._token: str | None = None
        """The capability of the last schedule: parents serve the task only against it."""
        self._draining = False
        self._silent = False
        self.origin_reads = 0
        """Pieces being read from the origin now."""

    def silence(self) -> None:
        """Its host is leaving: no last report or result when it stops (the leave drops
        its peer), so the leave waits on no answer of a scheduler's."""
        self._silent = True

    def drain(self) -> None:
        """Read no further piece from the origin; the reads in flight finish. A leaving seed
        hands what it read to the swarm instead of dropping it half-read."""
        self._draining = True

    # -- the whole download ----------------------------------------------------------------

    async def run(self) -> None:
        """Leaves every piece verified in the store, or raises SwarmflyError."""
        attributes = {"swarmfly.task_id": self.task_id, "swarmfly.seed": self.seed}
        with telemetry.span("download", attributes=attributes) as current:
            try:
                await self._run()
            except OSError as exc:  # the store's own files: metadata, the data file
                raise LocalDiskError.of(exc) from None
            telemetry.set_attributes(
                current,
                **{
                    "swarmfly.bytes_origin": self.bytes_origin,
                    "swarmfly.bytes_p2p": self.bytes_p2p,
                },
            )

    async def _run(self) -> None:
        reporter = asyncio.create_task(self._report_loop()) if self.scheduler else None
        try:
            step = self.phases.on(
                first_event(
                    held=self.stored.complete,
                    seed=self.seed,
                    control_plane=self.scheduler is not None,
                )
            )
            while not isinstance(step, Finish):
                try:
                    step = await self._carry_out(step)
                except SwarmContradicts as exc:
                    if "contradicted" not in TRANSITIONS[self.phases.phase]:
                        raise
                    self.metrics.piece_failures.labels("contradicted").inc()
                    log.warning("task %s: %s; reading the origin", self.task_id[:12], exc.message)
                    step = self.phases.on("contradicted")
            if not step.success:
                self.stored.reset()
                raise SwarmflyError("integrity", step.message)
            await self._flush_reports()
            await self._result(True)
        except BaseException as exc:
            if not self.phases.ended:
                self.phases.on("error", message=str(exc)[:200])
            await self._flush_reports()
            await self._result(False, str(exc)[:200])
            raise
        finally:
            if reporter is not None:
                reporter.cancel()
            self.digest.cancel()
            for parent in self.parents.values():
                if parent.watcher is not None:
                    parent.watcher.cancel()

    async def _carry_out(self, step: Step) -> Step:
        """One phase's work (``phases``); the step of the phase it leads to."""
        phases = self.phases
        match step:
            case Announce():
                self.stored.touch()
                await self._announce_cached()
                return phases.on("announced")
            case Register(seed=True):
                holders = await self._register_quietly()
                if holders and self.stat.ranges:
                    self._holders = holders
                    return phases.on("holders")
                return phases.on("no_holders")
            case Register():
                # P2P as the scheduler directs; the origin only when it says so, when it is
                # unreachable, or when the swarm's word on the content contradicts our stat.
                if self.stat.size is not None:
                    self.stored.set_content(self._stat_content(self.stat.size))
                try:
                    schedule = await self._request(messages.REGISTER, self._register_body())
                except SwarmflyError as exc:
                    if exc.code not in ("unavailable", "timeout"):
                        raise
                    schedule = self._without_scheduler(exc)
                return self._scheduled(schedule)
            case Wait(seconds=seconds):
                await asyncio.sleep(seconds)
                return self._scheduled(await self._reschedule_or_register())
            case Swarm():
                after = await self._p2p()
                return phases.on("complete") if after is None else self._scheduled(after)
            case ReadOrigin():
                await self._from_origin()
                return phases.on("complete")
            case TakeOver():
                await self._take_over(self._holders)
                return phases.on("complete")
            case Verify():
                return await self._verify_whole()
            case Repair():
                return await self._repair()
        raise AssertionError(f"no step {step!r}")

    def _scheduled(self, schedule: messages.Schedule) -> Step:
        """The scheduler's answer as the phases' event."""
        self._adopt(schedule.task)
        if schedule.action == "parents":
            self._set_parents(schedule.parents, exact=False)
            return self.phases.on("parents")
        if schedule.action == "wait":
            return self.phases.on("wait", seconds=_retry_after(schedule, 200))
        return self.phases.on("back_to_source")

    async def _reschedule_or_register(self) -> messages.Schedule:
        body = messages.RescheduleRequest(
            task_id=self.task_id,
            peer_id=self.peer_id,
            blocklist=sorted(self.swarm.blocked(self.clock()))[:1024],
            bad_parents=[messages.BadParent.from_dict(b) for b in self.swarm.bad[-256:]],
        )
        try:
            reply = await self._request(messages.RESCHEDULE, body)
        except SwarmflyError as exc:
            if exc.code == "not_found":
                reply = await self._request(messages.REGISTER, self._register_body())
            elif exc.code not in ("unavailable", "timeout"):
                raise
            else:
                return self._without_scheduler(exc)
        self.swarm.scheduler_back()
        return reply

    def _without_scheduler(self, exc: SwarmflyError) -> messages.Schedule:
        """What to do while the task's scheduler does not answer: the core's call."""
        answering = self.scheduler is not None and self.scheduler.schedulers_answer()
        what = self.swarm.scheduler_lost(self.clock(), others_answer=answering)
        if what == "keep":
            return messages.Schedule("parents", self._current_parents())
        if what == "wait":
            return messages.Schedule("wait", [], retry_after_ms=500)
        log.warning("no scheduler answers (%s): reading the origin", exc.code)
        return messages.Schedule("back_to_source", [])

    # -- P2P -----------------------------------------------------------------------------

    def _current_parents(self) -> list[messages.Parent]:
        return [
            messages.Parent(
                p.peer_id, p.host_id, p.address, "seed" if p.type == "seed" else "normal"
            )
            for p in self.parents.values()
        ]

    def _set_parents(self, parents: list[messages.Parent], *, exact: bool, hint: int = 0) -> None:
        """The scheduler's parents: exactly these on a reschedule (its DAG has no cycles),
        in addition to ours on the first schedule; pieces in flight from a released parent
        still finish."""
        by_id = {info.peer_id: info for info in parents}
        now = self.clock()
        added = self.swarm.scheduled(
            {p: info.type for p, info in by_id.items()}, now, retry_after_ms=hint, exact=exact
        )
        for parent_id in [p for p in self.parents if p not in self.swarm.parents]:
            self._unwatch(parent_id)
        for parent_id in added:
            info = by_id[parent_id]
            parent = Parent(parent_id, info.host_id, info.address.rstrip("/"), info.type)
            self.parents[parent_id] = parent
            parent.watcher = asyncio.create_task(self._watch(parent))

    def _unwatch(self, parent_id: str) -> None:
        parent = self.parents.pop(parent_id, None)
        if parent is not None and parent.watcher is not None:
            parent.watcher.cancel()

    async def _watch(self, parent: Parent) -> None:
        """Long-poll what the parent holds; a parent that cannot answer is dropped."""
        misses = 0
        declined: int | None = None
        while not parent.complete:
            wait = SEED_POLL_WAIT if parent.type == "seed" else POLL_WAIT
            params = {"since": str(parent.version), "wait": str(wait)}
            book = self.swarm.book
            if parent.type == "seed" and book is not None:
                params["wants"] = bitmap.encode(book.wanted(), book.piece_count)
                params["peer"] = self.peer_id  # what it lends us follows our liveness
                if declined is not None:
                    params["decline"] = str(declined)
                if self._delivered:
                    # Told over HTTP, not only through the scheduler: with NATS down, the
                    # seed would read them from the origin again once their time is up.
                    params["lent"] = ",".join(map(str, self._delivered[:64]))
                    del self._delivered[:64]
            try:
                answer = await self.links.parents.offers(
                    parent.address, self.task_id, params, self._auth(), wait + 10
                )
                if answer.status in (404, 503):
                    # Not yet: it has not opened the task, or (just started) it knows no
                    # scheduler's key to check our capability with.
                    misses += 1
                    if misses > 100 and answer.status == 404:
                        raise SwarmflyError("not_found", "parent does not have the task")
                    if misses > 100:
                        raise SwarmflyError("unavailable", "parent knows no scheduler key")
                    await asyncio.sleep(0.1 if answer.status == 404 else BUSY_BACKOFF)
                    continue
                if answer.status != 200:
                    raise SwarmflyError("unavailable", f"parent answered {answer.status}")
                data = answer.data
                version, pieces = int(data["version"]), data["pieces"]
                if not isinstance(pieces, list):
                    raise SwarmflyError("bad_request", "parent sent a malformed piece list")
                if parent.type == "seed" and "origin" in data:
                    self._lent.extend(_lent_pieces(data))
                parent.version = version
                parent.complete = bool(data.get("complete"))
                offered = {int(n) for n in pieces}
                self.swarm.offered(parent.peer_id, offered)
                # A grant of a piece we have or fetch already is handed back at once: the
                # seed keeps a slot for it otherwise. (In the endgame it races the transfer.)
                if parent.type == "seed" and book is not None:
                    racing = book.endgame
                    declined = next(
                        (
                            n
                            for n in offered
                            if n in book.done or (n in book.in_flight and not racing)
                        ),
                        None,
                    )
                self._wake.set()
            except asyncio.CancelledError:
                raise
            except (SwarmflyError, ValueError, KeyError, TypeError) as exc:
                log.debug("parent %s: %s", parent.peer_id, in_words(exc))
                self.swarm.lost(parent.peer_id)
                self._wake.set()
                return

    async def _p2p(self) -> messages.Schedule | None:
        """Fetch pieces until complete (None) or until the scheduler answers otherwise."""
        with telemetry.span("p2p") as current:
            before = len(self.stored.done)
            try:
                return await self._p2p_loop()
            finally:
                telemetry.set_attributes(
                    current, **{"swarmfly.pieces": len(self.stored.done) - before,
                                "swarmfly.parents_dropped": len(self.swarm.bad)}
                )  # fmt: skip

    async def _p2p_loop(self) -> messages.Schedule | None:
        """The adapter of the Swarming core: events in, its decisions carried out."""
        swarm = self.swarm
        fetches: dict[asyncio.Task[int], tuple[int, str]] = {}
        swarm.asked(self.clock())
        try:
            while True:
                self._wake.clear()
                content = self.stored.content
                book = swarm.book
                if content is None or (book is not None and book.needs_digests()):
                    if self.ledger.poll_due(self.clock()):
                        await self._refresh_task(book)
                    content = self.stored.content
                if content is not None and swarm.book is None:
                    swarm.book = PieceBook(
                        content.piece_count,
                        done=set(self.stored.done),
                        digests=list(self.stored.digests),
                        strategy=self.strategy,
                        rng=random.Random(self.peer_id),  # peers of a task break ties apart
                    )
                if swarm.complete:
                    return None
                self._start_lent(fetches)
                rescheduled = False
                swarm.concurrency = self._in_flight()
                for decision in swarm.tick(self.clock()):
                    if isinstance(decision, Drop):
                        self._unwatch(decision.parent_id)
                        log.info(
                            "dropped parent %s of task %s: %s",
                            decision.parent_id,
                            self.task_id[:12],
                            decision.reason,
                        )
                    elif isinstance(decision, Fetch):
                        task = asyncio.create_task(
                            self._fetch_piece(decision.number, decision.parent_id)
                        )
                        fetches[task] = (decision.number, decision.parent_id)
                    elif isinstance(decision, Reschedule):
                        rescheduled = True
                        schedule = await self._reschedule_or_register()
                        log.debug(
                            "schedule %s (%s): %s, %d pieces, fetching %d",
                            self.task_id[:8],
                            decision.why,
                            schedule.action,
                            len(self.stored.done),
                            len(fetches),
                        )
                        self._adopt(schedule.task)
                        if schedule.action == "parents":
                            # A large swarm's scheduler asks its children to come back less
                            # often.
                            hint = schedule.retry_after_ms or 0
                            self._set_parents(schedule.parents, exact=True, hint=hint)
                        elif schedule.action == "back_to_source":
                            return schedule
                        else:
                            swarm.asked(self.clock())
                            if not self.parents:
                                await asyncio.sleep(_retry_after(schedule, 200))
                if rescheduled:
                    continue
                waiter = asyncio.create_task(self._wake.wait())
                done, _ = await asyncio.wait(
                    [waiter, *fetches],
                    timeout=0.25 if swarm.book is not None else 0.2,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                waiter.cancel()
                for task in done:
                    if task is not waiter:
                        number, parent_id = fetches.pop(task)
                        self._settle(task, number, parent_id, fetches)
        finally:
            for task in fetches:
                task.cancel()

    def _settle(
        self,
        task: asyncio.Task[int],
        number: int,
        parent_id: str,
        fetches: dict[asyncio.Task[int], tuple[int, str]],
    ) -> None:
        """Tell the core how a fetch ended; the reason is read off the exception here, what
        it costs the parent is the core's."""
        now = self.clock()
        if task.cancelled():
            self.swarm.failed(number, parent_id, "cancelled", now)
            return
        exc = task.exception()
        if exc is None:
            self.swarm.done(number, parent_id, now)
            for other, (n, _) in list(fetches.items()):
                if n == number:  # the endgame copy lost the race
                    other.cancel()
            return
        reason: Failure = "failed"
        if isinstance(exc, LocalDiskError):
            self.swarm.failed(number, parent_id, "cancelled", now)
            raise exc
        if parent_id == ORIGIN:  # the seed reads it when we do not deliver
            self.metrics.piece_failures.labels("origin").inc()
            log.info("lent piece %d from the origin: %s", number, exc)
            reason = "origin"
        elif isinstance(exc, ParentBusy):
            log.debug("parent %s busy", parent_id)
            reason = "busy"
        elif isinstance(exc, SwarmflyError) and exc.code == "integrity":
            self.metrics.piece_failures.labels("corrupt").inc()
            log.warning("parent %s served a corrupt piece %d", parent_id, number)
            reason = "corrupt"
        elif isinstance(exc, SwarmflyError) and exc.code == "timeout":
            self.metrics.piece_failures.labels("slow").inc()
            reason = "slow"
        elif parent_id in self.swarm.parents:
            self.metrics.piece_failures.labels("failed").inc()
        self.swarm.failed(number, parent_id, reason, now)
        self._wake.set()

    async def _fetch_piece(self, number: int, parent_id: str) -> int:
        parent = self.parents[parent_id]
        content = self.stored.content
        assert content is not None
        offset, size = content.piece(number)
        expected = self.stored.digests[number]
        started = self.clock()
        headers = {"Range": f"bytes={offset}-{offset + size - 1}", **self._auth()}
        if not self.settings.piece_spans:
            # Aggregated under the download's "p2p" span: no traceparent, so the parent
            # opens no span either (a 1,000-piece download is not 2,000 spans).
            return await self._transfer(number, parent_id, parent, headers, size, expected, started)
        attributes = {
            "http.request.method": "GET",
            **telemetry.url_attributes(f"{parent.address}/v1/tasks/{self.task_id}/data"),
            "swarmfly.piece": number,
        }
        with telemetry.span("GET piece", kind=SpanKind.CLIENT, attributes=attributes) as current:
            telemetry.inject(headers)
            try:
                got = await self._transfer(
                    number, parent_id, parent, headers, size, expected, started
                )
            except ParentBusy:
                telemetry.set_attributes(current, **{"http.response.status_code": 503})
                raise
            telemetry.set_attributes(current, **{"http.response.status_code": 206})
            return got

    async def _transfer(
        self,
        number: int,
        parent_id: str,
        parent: Parent,
        headers: dict[str, str],
        size: int,
        expected: str | None,
        started: float,
    ) -> int:
        # What we hold orders our request at a busy parent: the neediest child first.
        params = {"have": str(len(self.stored.done))}
        reading = self.links.parents.piece(
            parent.address, self.task_id, params, headers, self.settings.piece_timeout
        )
        async with reading as (status, body):
            if status == 503:
                raise ParentBusy()
            if status != 206:
                raise SwarmflyError("unavailable", f"parent answered {status}")
            chunks = self._paced(
                body, size, SwarmflyError("integrity", "parent sent more than the piece")
            )
            digest = await self._receive(number, chunks, expected)
        if digest is not None and number not in self.stored.done:
            self.stored.mark_done(number, digest)
            self.ledger.came_from[number] = parent_id
            self._kick_digest()
            self.bytes_p2p += size
            self.metrics.download_bytes.labels("p2p").inc(size)
            cost = self.clock() - started
            self.metrics.piece_seconds.labels("p2p").observe(cost)
            log.debug("piece %d from %s in %.3fs", number, parent_id, cost)
            self._queue_report(
                messages.PieceReport(number, parent_id=parent_id, cost_ms=int(cost * 1000))
            )
        return number

    def _start_lent(self, fetches: dict[asyncio.Task[int], tuple[int, str]]) -> None:
        if self.swarm.book is None:
            return
        for number, etag in self._lent:
            if self.swarm.lent(number):
                fetches[asyncio.create_task(self._lent_piece(number, etag))] = (number, ORIGIN)
        self._lent.clear()

    async def _lent_piece(self, number: int, etag: str | None) -> int:
        """A piece the seed lent us: read from the origin, pinned to the version it saw."""
        with telemetry.span("lent piece", attributes={"swarmfly.piece": number}):
            await self._origin_piece(number, self._origin_headers(etag))
        self._delivered.append(number)
        return number

    async def _refresh_task(self, book: PieceBook | None) -> None:
        """Task size and the per-piece digests the scheduler knows, page by page: while
        downloading (``book``), from the first piece whose digest may still come or change
        (unknown, or only a lent child's word), not the whole list every time; else all."""
        offset = 0 if book is None else self.ledger.offset(self.stored.digests)
        while True:
            try:
                reply = await self._request(
                    messages.TASK, messages.TaskRequest(self.task_id, offset)
                )
            except SwarmflyError as exc:
                log.debug("task info: %s", exc)
                return
            if not reply.task:
                return
            self._adopt(reply.task)
            digests = reply.digests
            start = offset if reply.offset is None else reply.offset
            self._take_digests(start, digests, reply.provisional or ())
            offset = start + len(digests)
            if not digests or offset >= reply.task.piece_count:
                return

    def _take_digests(
        self, start: int, digests: list[str | None], provisional: Collection[int]
    ) -> None:
        """A page of the digests the scheduler knows, from piece ``start`` (pushed or
        polled), into the store's and the book's (``DigestLedger.take``)."""
        known = self.stored.digests
        changed = self.ledger.take(
            start, digests, provisional, known=known, held=self.stored.done, now=self.clock()
        )
        book = self.swarm.book
        if book is not None:
            for number in changed:
                if number < book.piece_count:
                    book.digests[number] = known[number]

    # -- the origin ----------------------------------------------------------------------

    async def _from_origin(self) -> None:
        """Read the missing pieces from the origin: parallel ranges, or one stream."""
        with telemetry.span("back_to_source", attributes={"url.full": redact_url(self.source.url)}):
            try:
                await self._read_origin()
            except SwarmflyError as exc:
                if exc.code == "source_error":
                    self.metrics.piece_failures.labels("origin").inc()
                raise

    def _stat_content(self, size: int) -> TaskContent:
        """The content as this host's own stat of the origin (and its request) states it."""
        length = self.source.piece_length or piece_length_for(size)
        digest = self.source.digest or self.stat.digest
        return TaskContent(size, length, piece_count(size, length), digest)

    def _adopt(self, data: messages.TaskContent | Absent | None) -> None:
        """Take the swarm's word on the content only where it agrees with what this host
        knows itself (its stat of the origin, the digest it was given); it may add the
        whole-file digest, which then proves every byte delivered."""
        if data is None or data is ABSENT:
            return
        theirs = TaskContent.of(data)
        own = self.stored.content
        if own is not None:
            if (own.content_length, own.piece_length) != (
                theirs.content_length,
                theirs.piece_length,
            ):
                raise SwarmContradicts(
                    f"the swarm says {theirs.content_length} bytes in pieces of "
                    f"{theirs.piece_length}, the origin {own.content_length} in {own.piece_length}"
                )
            if own.digest and theirs.digest and own.digest != theirs.digest:
                raise SwarmContradicts(
                    f"the swarm says {theirs.digest[:19]}…, not {own.digest[:19]}…"
                )
        self.stored.set_content(theirs)

    def _origin_content(self) -> TaskContent:
        """The task's size and piece layout as the origin states them (reported once)."""
        stat = self.stat
        if stat.size is None:
            raise SwarmflyError("source_error", "origin does not state the content length")
        self.stored.set_content(self._stat_content(stat.size))
        self.reports.tell_layout()
        content = self.stored.content
        assert content is not None
        return content

    async def _read_origin(self) -> None:
        content = self._origin_content()
        missing = [n for n in range(content.piece_count) if n not in self.stored.done]
        if not missing:
            return
        log.info(
            "task %s: reading %d of %d pieces from the origin%s",
            self.task_id[:12], len(missing), content.piece_count, " as its seed" * self.seed,
        )  # fmt: skip
        # A lent child's digest is its word: lend only where the whole file's digest will
        # still prove every byte.
        if self.stat.ranges and self.seed and self.settings.lend_pieces and content.digest:
            await self._origin_lending(content)
        elif self.stat.ranges:
            await self._origin_ranges(missing)
        else:
            await self._origin_stream(content)

    async def _origin_lending(self, content: TaskContent) -> None:
        """Read the origin as a seed that lends pieces (``lending``): the seed's workers
        read from the first piece up, waiting children are lent pieces from the last one
        down, and the lent pieces come back from the swarm."""
        concurrency = self.settings.origin_concurrency
        fresh = Lending.for_origin(
            content.piece_count, content.piece_length, concurrency, self.stat.etag
        )
        with self.stored.lent(fresh) as lending:
            watcher = asyncio.create_task(self._watch_lent(lending))
            try:
                await self._lend_and_collect(lending, min(concurrency, content.piece_count))
            finally:
                watcher.cancel()
                self.ledger.lent_out = set(lending.pending)

    async def _lend_and_collect(self, lending: Lending, readers: int) -> None:
        workers = [asyncio.create_task(self._claiming_worker(lending)) for _ in range(readers)]
        try:
            await asyncio.gather(*workers)
        finally:
            for worker in workers:
                worker.cancel()
        await self._parked_if_draining()
        lending.open = False
        # The lent pieces come back once children stop asking: until then the swarm's
        # uplinks are theirs (a while at most). A lent piece its child did not deliver in
        # time is read meanwhile: children may be waiting for it.
        closed = self.clock()
        while lending.collecting(closed, self.clock()):
            await self._claiming_worker(lending)
            await asyncio.sleep(LEND_POLL)
        while not self.stored.complete:
            await self._parked_if_draining()
            if lending.delivered - self.stored.done:
                holders = await self._register_quietly()
                found: set[int] = set()
                if holders:
                    held_off = lending.held_off(self.clock())
                    found = await self._gather(holders, hold_off=held_off)
                lending.unheld(found, self.clock())
            if self.stored.complete:
                break
            if not lending.waiting(self.stored.done, self.clock()):
                await self._claiming_worker(lending)  # what no child delivered in time
            else:
                await asyncio.sleep(LEND_POLL)
        log.info("task %s: %d of %d pieces were lent to children", self.task_id[:12],
                 len(lending.pending), lending.piece_count)  # fmt: skip

    async def _watch_lent(self, lending: Lending) -> None:
        """Learn which lent pieces children delivered: their digests reach the scheduler."""
        while True:
            await asyncio.sleep(LEND_POLL)
            if lending.outstanding:
                await self._refresh_task(None)
                lending.learned(self.stored.digests)

    async def _claiming_worker(self, lending: Lending) -> None:
        while not self._draining:
            await self._hold_back(lending)
            number = lending.claim(self.stored.done, self.clock())
            if number is None:
                return
            started = self.clock()
            took: float | None = None
            try:
                await self._origin_piece(number, self._origin_headers())
                took = self.clock() - started
            finally:
                lending.read(number, took)

    async def _hold_back(self, lending: Lending) -> None:
        since = now = self.clock()
        while lending.hold_back(since, now, self.stored.done, self.stored.served):
            await asyncio.sleep(0.02)
            now = self.clock()

    async def _origin_ranges(self, numbers: list[int], *, report: bool = True) -> None:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for number in numbers:
            queue.put_nowait(number)
        workers = [
            asyncio.create_task(self._origin_worker(queue, report=report))
            for _ in range(min(self.settings.origin_concurrency, len(numbers)))
        ]
        try:
            await asyncio.gather(*workers)
        finally:
            for worker in workers:
                worker.cancel()
        await self._parked_if_draining()

    async def _parked_if_draining(self) -> None:
        """A draining seed whose reads are done waits to be cancelled (``drain``)."""
        if self._draining:
            await asyncio.Event().wait()

    # -- a seed taking over --------------------------------------------------------------

    async def _take_over(self, holders: list[messages.Parent]) -> None:
        """A seed continuing a task whose seed was lost: what the swarm already holds comes
        from its holders, only the rest from the origin, so the origin is read about once in
        all."""
        with telemetry.span("take_over", attributes={"swarmfly.holders": len(holders)}):
            self._origin_content()
            await self._gather(holders)

    async def _gather(
        self, holders: list[messages.Parent], hold_off: Collection[int] = ()
    ) -> set[int]:
        """What the holders have comes from them, the rest from the origin, both at once
        (``takeover.Gathering``). ``hold_off``: pieces children are reading from the origin,
        taken from holders only. Returns what the holders had."""
        content = self.stored.content
        assert content is not None
        await self._refresh_task(None)  # the digests the swarm's pieces are checked against
        for info in holders:
            address = info.address.rstrip("/")
            parent = Parent(info.peer_id, info.host_id, address, "normal")
            self.parents.setdefault(parent.peer_id, parent)
        answers = await asyncio.gather(*(self._holdings(p) for p in self.parents.values()))
        held = dict(zip(self.parents, answers, strict=True))
        missing = [n for n in range(content.piece_count) if n not in self.stored.done]
        gathering = Gathering.plan(missing, held, self.stored.digests, hold_off)
        log.info(
            "task %s: %d pieces from %d holders, %d from the origin",
            self.task_id[:12], len(gathering.queue), len(held), len(gathering.origin),
        )  # fmt: skip
        workers = min(self.settings.concurrency, len(gathering.queue))
        await asyncio.gather(
            self._origin_ranges(gathering.origin) if gathering.origin else asyncio.sleep(0),
            *(self._from_holders(gathering) for _ in range(workers)),
        )
        if rest := gathering.rest(self.stored.done, hold_off):
            await self._origin_ranges(rest)
        return Gathering.found(held)

    async def _holdings(self, parent: Parent) -> set[int]:
        """What a holder has now (no long-poll); nothing when it cannot answer."""
        params = {"since": "-1", "wait": "0"}
        try:
            answer = await self.links.parents.offers(
                parent.address, self.task_id, params, self._auth(), 10
            )
            if answer.status != 200:
                return set()
            return {int(n) for n in answer.data["pieces"]}
        except (SwarmflyError, ValueError, KeyError, TypeError) as exc:
            log.info("holder %s did not say what it has: %s", parent.peer_id, exc)
            return set()

    async def _from_holders(self, gathering: Gathering) -> None:
        while (ask := gathering.next()) is not None:
            if not await self._from_any(*ask, gathering):
                gathering.gave_up(ask[0])

    async def _from_any(self, number: int, where: list[str], gathering: Gathering) -> bool:
        """One piece from the least loaded holder that delivers it."""
        attempts = 0
        for holder in where:
            while attempts < ATTEMPTS and holder in self.parents:
                attempts += 1
                gathering.asking(holder)
                try:
                    await self._fetch_piece(number, holder)
                    return True
                except ParentBusy:
                    await asyncio.sleep(BUSY_BACKOFF)
                except LocalDiskError:
                    raise
                except SwarmflyError as exc:
                    log.info("piece %d from holder %s: %s", number, holder, exc)
                    gathering.refused(holder, number, corrupt=exc.code == "integrity")
                    if holder in gathering.dropped:
                        self.parents.pop(holder, None)
                    break
                finally:
                    gathering.answered(holder)
        return False

    async def _origin_worker(self, queue: asyncio.Queue[int], *, report: bool = True) -> None:
        while not queue.empty() and not self._draining:
            await self._origin_piece(queue.get_nowait(), self._origin_headers(), report=report)

    async def _origin_piece(
        self, number: int, headers: dict[str, str], *, report: bool = True
    ) -> int:
        """One piece read from the origin by range, written, reported with its digest."""
        content = self.stored.content
        assert content is not None
        offset, size = content.piece(number)
        started = self.clock()
        # Read from the origin ourselves, the bytes are the truth: a digest only a lent child
        # vouches for is no test of them (they refute it), and saying so is the seed's job.
        vouched = self.ledger.vouched(number)
        expected = None if vouched else self.stored.digests[number]
        chunks = self._paced(
            self.origin.fetch(self.source.url, headers, offset, offset + size),
            size,
            SwarmflyError("source_error", "origin sent more than the range asked"),
        )
        self.origin_reads += 1
        try:
            digest = await self._receive(number, chunks, expected)
        finally:
            self.origin_reads -= 1
        if digest is not None:
            self._origin_done(number, digest, started, report=report and not vouched)
        return number

    async def _paced(
        self, chunks: AsyncIterator[bytes], size: int, too_much: SwarmflyError
    ) -> AsyncIterator[bytes]:
        """A piece's bytes as they come, within this host's download rate and no more than
        the piece."""
        received = 0
        async for chunk in chunks:
            received += len(chunk)
            if received > size:
                raise too_much
            await self._take(len(chunk))
            yield chunk

    @contextlib.contextmanager
    def asking(self, rate: int) -> Iterator[None]:
        """While an ask waits for this run, its rate (a get's ``--download-rate``; 0: none)
        counts: the run goes as fast as the fastest ask waiting allows, so an ask that set a
        slow rate and left never holds back the next one. With nobody waiting, the last rate
        holds (a get stopped with Ctrl-C is not finished at full speed behind its back)."""
        self._asks.append(max(rate, 0))
        self._pace()
        try:
            yield
        finally:
            self._asks.remove(max(rate, 0))
            if self._asks:
                self._pace()

    def _pace(self) -> None:
        self.rate.set_rate(0 if 0 in self._asks else max(self._asks))

    def _in_flight(self) -> int:
        host = self.links.budget.share()
        return in_flight(self.settings.concurrency, self.rate.rate, host)

    async def _take(self, amount: int) -> None:
        await self.links.budget.bucket.take(amount)
        await self.rate.take(amount)

    async def _receive(
        self, number: int, chunks: AsyncIterator[bytes], expected: str | None
    ) -> str | None:
        """A piece written as its bytes arrive and verified (its sha256 hex); None when the
        endgame's other copy of it got there first."""
        writer = self.stored.writer(number)
        aside: list[bytes] = []
        """Bytes not written yet: a batch for the writer, or all of ours while another copy
        is being written."""
        held = 0
        try:
            async for chunk in chunks:
                aside.append(chunk)
                held += len(chunk)
                if writer is not None and held >= WRITE_BATCH:
                    await asyncio.to_thread(writer.write, aside)
                    aside, held = [], 0
            if writer is not None:
                if aside:
                    await asyncio.to_thread(writer.write, aside)
                return await asyncio.to_thread(writer.finish, expected)
        except OSError as exc:  # the local disk: no parent can help
            raise LocalDiskError.of(exc) from None
        finally:
            if writer is not None:
                writer.close()
        # Ours is used only if the copy that was written fails.
        deadline = self.clock() + self.settings.piece_timeout
        while number in self.stored.writing and (left := deadline - self.clock()) > 0:
            await self.stored.wait_change(self.stored.version, left)  # a writer's close wakes
        if number in self.stored.done or number in self.stored.writing:
            return None
        return await self._write(number, b"".join(aside), expected)

    async def _origin_stream(self, content: TaskContent) -> None:
        buffer = bytearray()
        number = 0
        started = self.clock()
        async for chunk in self.origin.fetch(self.source.url, self._origin_headers()):
            await self._take(len(chunk))
            buffer += chunk
            while number < content.piece_count and len(buffer) >= content.piece(number)[1]:
                size = content.piece(number)[1]
                piece, buffer = bytes(buffer[:size]), buffer[size:]
                if number not in self.stored.done:
                    await self._store_origin_piece(number, piece, started)
                number += 1
                started = self.clock()
            if len(buffer) > content.piece_length:
                raise SwarmflyError("source_error", "origin sent more bytes than it stated")
        if number < content.piece_count or buffer:
            raise SwarmflyError("source_error", "origin body length differs from what it stated")

    async def _write(self, number: int, data: bytes, expected: str | None) -> str:
        try:
            return await asyncio.to_thread(self.stored.write_piece, number, data, expected)
        except OSError as exc:
            raise LocalDiskError.of(exc) from None

    def _origin_headers(self, etag: str | None = None) -> dict[str, str]:
        """Every read of the origin is pinned to the content first seen (``etag``: as the
        seed saw it): pieces of two versions of a file never end up in one download."""
        etag = etag or self.stat.etag
        if etag and not any(k.lower() == "if-match" for k in self.source.headers):
            return {**self.source.headers, "If-Match": etag}
        return self.source.headers

    async def _store_origin_piece(self, number: int, data: bytes, started: float) -> None:
        """A piece of a stream from the origin (no ranges), whole."""
        vouched = self.ledger.vouched(number)
        digest = await self._write(number, data, None if vouched else self.stored.digests[number])
        self._origin_done(number, digest, started, report=not vouched)

    def _origin_done(self, number: int, digest: str, started: float, *, report: bool) -> None:
        """A piece read from the origin is verified in the store: mark it and say so (a
        child does not report a digest it refuted: that is the seed's to say)."""
        if number in self.stored.done:
            return
        self.stored.mark_done(number, digest)
        self._kick_digest()
        assert self.stored.content is not None
        size = self.stored.content.piece(number)[1]
        self.bytes_origin += size
        self.metrics.download_bytes.labels("origin").inc(size)
        cost = self.clock() - started
        self.metrics.piece_seconds.labels("origin").observe(cost)
        if report or self.seed:
            self._queue_report(
                messages.PieceReport(number, digest=digest, cost_ms=int(cost * 1000))
            )

    # -- end of download -----------------------------------------------------------------

    def _kick_digest(self) -> None:
        """Follow the verified prefix: into the outputs waiting for the file, and through
        the whole-file hash only when there is a digest to verify against (otherwise it
        would be a pass over every byte for nothing)."""
        content = self.stored.content
        self.digest.hashing = content is not None and bool(content.digest)
        self.digest.kick()

    def _wanted(self) -> str:
        content = self.stored.content
        assert content is not None and content.digest
        return f"sha256:{check_digest(content.digest)}"

    async def _verify_whole(self) -> Step:
        content = self.stored.content
        if content is None or not self.stored.complete:
            raise SwarmflyError("internal", "download ended before every piece was verified")
        if not content.digest:
            return self.phases.on("matches")
        if await self.digest.finish() == self._wanted():
            self.file_digest = content.digest
            return self.phases.on("matches")
        await self._refresh_task(None)  # the seed may since have read what we took on trust
        if self.ledger.suspects():
            return self.phases.on("suspects")
        return self._mismatch()

    def _mismatch(self) -> Step:
        message = f"the origin's content does not match its digest {self._wanted()}"
        return self.phases.on("mismatch", message=message)

    async def _repair(self) -> Step:
        """The whole file failed its digest: read again from the origin every suspect piece;
        the parents that served pieces that prove false are reported corrupt."""
        suspects = self.ledger.suspects()
        log.warning(
            "task %s: the whole file failed its digest; reading %d pieces again from the origin",
            self.task_id[:12], len(suspects),
        )  # fmt: skip
        before = {n: self.stored.digests[n] for n in suspects}
        for number in suspects:
            self.stored.done.discard(number)
            # the seed's, if it read it
            self.stored.digests[number] = self.ledger.refuted.get(number)
        # A child's word is not the origin's: it does not report what it read here.
        await self._origin_ranges(suspects, report=self.seed)
        for number, digest in before.items():
            if digest == self.stored.digests[number]:
                continue
            self.repaired.add(number)
            if (parent := self.ledger.came_from.get(number)) is not None:
                log.warning("parent %s served a false piece %d", parent, number)
                self.swarm.bad.append({"peer_id": parent, "reason": "corrupt"})
        if self.swarm.bad:
            with contextlib.suppress(SwarmflyError):
                await self._reschedule_or_register()
        await self.digest.rewind()  # the outputs, too, take the pieces read again
        if await self.digest.finish() != self._wanted():
            return self._mismatch()
        assert self.stored.content is not None
        self.file_digest = self.stored.content.digest
        return self.phases.on("matches")

    async def _announce_cached(self) -> None:
        if self.scheduler is not None:
            await self.scheduler.announce(self.stored)

    async def _register_quietly(self) -> list[messages.Parent]:
        """Register a download that reads the origin; for a seed, the peers that already
        hold pieces of the task (a seed taking over from a lost one)."""
        if self.scheduler is None:
            return []
        try:
            reply = await self._request(messages.REGISTER, self._register_body())
        except SwarmflyError as exc:
            log.info("registering a back-to-source download: %s", exc)
            return []
        return reply.parents if self.seed else []

    async def _result(self, success: bool, message: str = "") -> None:
        if self.scheduler is None or self._silent:
            return
        body = messages.ResultRequest(self.task_id, self.peer_id, success, message or None)
        try:
            try:
                await self._request(messages.RESULT, body)
            except SwarmflyError as exc:
                if not (success and exc.code == "conflict"):
                    raise
                # It missed reports (taken by a partition's previous holder as it moved):
                # everything held again, the result with it.
                await self.scheduler.announce(self.stored, peer_id=self.peer_id, seed=self.seed)
        except SwarmflyError as exc:
            log.info("result not recorded: %s", exc)

    # -- control plane -------------------------------------------------------------------

    def _register_body(self) -> messages.RegisterRequest:
        assert self.scheduler is not None
        content = self.stored.content
        return messages.RegisterRequest(
            task_id=self.task_id,
            peer_id=self.peer_id,
            host=self.scheduler.host(),
            source=self.source.message(),
            pieces=sorted(self.stored.done) or None,
            # heard from the task's seed only
            task=content.message() if self.seed and content else None,
            seed=True if self.seed else None,
        )

    async def _request(self, subject: Subject[Req, Rep], message: Req) -> Rep:
        """A request to the task's scheduler. Schedules and report replies push the digests
        this download lacks (``digests_from``): a downloading peer rarely polls for them."""
        if isinstance(message, _PUSHING) and (offset := self._digests_from()) is not None:
            message = replace(message, digests_from=offset)
        if self.scheduler is None:
            raise SwarmflyError("unavailable", "no control plane")
        reply = await self.scheduler.request(subject, message)
        if isinstance(reply, messages.Schedule) and reply.token:
            self._token = reply.token  # every schedule carries a fresh one
        if isinstance(reply, (messages.Schedule, messages.ReportReply)) and reply.digest_page:
            if isinstance(reply, messages.Schedule):
                self._adopt(reply.task)  # a schedule's: the layout the page is of
            page = reply.digest_page
            self._take_digests(page.offset, page.digests, page.provisional or ())
        return reply

    def _digests_from(self) -> int | None:
        """Where this download lacks digests; None once it has them all."""
        if self.stored.content is None:
            return 0
        offset = self.ledger.offset(self.stored.digests)
        return offset if offset < self.stored.content.piece_count else None

    def _auth(self) -> dict[str, str]:
        """What shows a parent this peer was scheduled for the task."""
        return {"Authorization": f"Bearer {self._token}"} if self._token else {}

    def _queue_report(self, piece: messages.PieceReport) -> None:
        self.reports.piece(piece)

    async def _report_loop(self) -> None:
        while True:
            await asyncio.sleep(REPORT_INTERVAL)
            await self._flush_reports()

    def rejoined(self) -> None:
        """A scheduler that did not know this download has just heard of it."""
        self.reports.rejoined()

    async def _flush_reports(self) -> None:
        if self.scheduler is None or self._silent:
            return
        lending = self.stored.lending
        batch = self.reports.due(lending.lent_to if lending is not None else {})
        if batch is None:
            return
        try:
            await self._request(messages.PIECES, self._pieces_body(batch))
            self.reports.sent(batch)
        except SwarmflyError as exc:
            after = self.reports.failed(batch, exc.code)
            if after == "rejoin":  # the scheduler lost us (a restart): everything held
                await self.scheduler.announce(self.stored, peer_id=self.peer_id, seed=self.seed)
            elif after == "retry":
                log.warning("piece report failed: %s", exc)
            else:
                log.warning("piece report refused: %s", exc)

    def _pieces_body(self, batch: Batch) -> messages.PiecesRequest:
        content = self.stored.content
        return messages.PiecesRequest(
            task_id=self.task_id,
            peer_id=self.peer_id,
            pieces=batch.pieces,
            task=content.message() if batch.layout and content else None,
            lent=batch.lent or None,
        )
