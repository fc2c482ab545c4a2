"""One task's download: register, fetch pieces from parents (or the origin), verify, report.

The conductor is the adapter of the download's pure cores: ``phases`` (which phase comes
next), ``swarming`` (which piece from which parent, when to ask the scheduler again),
``ledger`` (the digests pieces are checked against), ``reports`` (what the scheduler is
told), ``lending`` and ``takeover`` (a seed's origin reads). It carries out the phases and
the P2P core's decisions; how is its collaborators': ``control`` (the task's scheduler),
``transfer`` (a piece paced, written, verified, accounted for) and ``backtosource`` (the
origin, a seed's lending and take-over). It reaches the rest of the host only through
``links``.

About 700 lines: the phases, the parents' long polls and the P2P loop share the download's
state (its parents, the swarm core, the pieces lent to it) and act on one another's news;
what moves bytes or talks to the scheduler is already in the modules above.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Iterator
from typing import Any

from swarmfly import bitmap, telemetry
from swarmfly.content import SourceRequest
from swarmfly.contracts import messages
from swarmfly.errors import SwarmflyError, in_words
from swarmfly.ids import check_digest
from swarmfly.plugintypes import SourceStat, Strategy
from swarmfly.services.peer.backtosource import BackToSource
from swarmfly.services.peer.control import ControlLink, SwarmContradicts
from swarmfly.services.peer.filedigest import PrefixDigest
from swarmfly.services.peer.ledger import DigestLedger
from swarmfly.services.peer.lending import LOAN_WAIT, PER_CHILD
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
from swarmfly.services.peer.store import StoredTask
from swarmfly.services.peer.swarming import (
    BUSY_BACKOFF,
    ORIGIN,
    Drop,
    Failure,
    Fetch,
    Reschedule,
    Swarming,
)
from swarmfly.services.peer.transfer import LocalDiskError, Parent, ParentBusy, PieceIO

log = logging.getLogger(__name__)

POLL_WAIT = 10.0
SEED_POLL_WAIT = 2.0
"""A seed's grant follows the pieces the child said it wants; they go stale sooner."""
OFFER_GAP = 0.15
"""Seconds at least between two answers of one peer parent's long-poll. A parent in a busy
swarm has a new piece every few tens of milliseconds, and answered each of its children each
time: bench/simulate.py counts 3975 answers at bench/swarm.py's shape, 2460 with the gap,
each an HTTP request the parent and the child pay for in CPU (the swarm's bottleneck on a
small machine). What comes meanwhile is in the next answer; the simulated swarm is no slower
for it (16 or 64 peers, lending or not; at 0.25 s it is, by 3 %). Not a seed's: its polls
are grants, answered when the child's turn comes."""


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


async def _shielded(read: asyncio.Task[int]) -> int:
    """A lent read as the P2P loop awaits it: cancelling the loop leaves the read going."""
    return await asyncio.shield(read)


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
        self.task_id = task_id
        self.source = source
        self.seed = seed
        self.stat = stat
        self.strategy = strategy
        self.peer_id = peer_id
        self.stored = stored
        self.digest = PrefixDigest(self.stored)
        self.file_digest: str | None = None
        """``sha256:HEX`` of the whole file, once verified against the known digest."""
        self.parents: dict[str, Parent] = {}
        self.swarm = Swarming(self.settings.concurrency, self.settings.per_parent, now=self.clock())
        """The P2P policy: parents, pieces, when to reschedule (a pure core)."""
        self._lent: list[tuple[int, str | None, Parent, bool]] = []
        """Pieces a seed lent us to read from the origin, with the ETag it pinned, the seed,
        and whether we are its sole child (then the whole file's digest alone proves them)."""
        self.borrowed: dict[int, Parent] = {}
        """Lent pieces read here, and the seed that lent each: handed back on leaving."""
        self.unhashed: set[int] = set()
        """Lent pieces read here as the seed's sole child: held with no digest (``UNHASHED``)
        until the seed says others ask beside us (``_vouch_unhashed``)."""
        self._vouching: asyncio.Task[None] | None = None
        self.lent_reads: set[asyncio.Task[int]] = set()
        """Lent pieces being read from the origin: they outlive the download's cancel when
        its host leaves (``silence``), finish, and go back to their seed with the rest."""
        self.loans_failed = False
        """A lent read failed here: the seed reads the rest itself (this host may not reach
        the origin)."""
        self._leaving = False
        self._delivered: list[int] = []
        """Lent pieces we read, to tell the seed."""
        self.ledger = DigestLedger()
        """The digests pieces are checked against, and on whose word (a pure core)."""
        self.repaired: set[int] = set()
        """Pieces the whole file's check found false and read again: whoever streamed them
        before (the mirror) sent false bytes."""
        self.phases = Phases()
        """Where the download is (``phases.TRANSITIONS``)."""
        self.control = ControlLink(
            self.scheduler,
            task_id,
            peer_id,
            source,
            seed=seed,
            stored=stored,
            ledger=self.ledger,
            swarm=self.swarm,
            clock=self.clock,
        )
        self.pieces = PieceIO(
            links,
            task_id,
            stored=stored,
            ledger=self.ledger,
            digest=self.digest,
            control=self.control,
        )
        self.origin = BackToSource(
            links,
            task_id,
            source,
            origin=origin,
            stat=stat,
            seed=seed,
            stored=stored,
            ledger=self.ledger,
            control=self.control,
            pieces=self.pieces,
        )
        self._holders: list[messages.Parent] = []
        """A seed taking over: the peers that held pieces when it registered."""
        self._wake = asyncio.Event()
        self._origin_asks: list[bool] = []
        self.back_to_source = True
        """This host may read the origin for the download (``asking``)."""

    @property
    def bytes_origin(self) -> int:
        return self.origin.bytes_origin

    @property
    def bytes_p2p(self) -> int:
        return self.pieces.bytes_p2p

    @property
    def origin_reads(self) -> int:
        """Pieces being read from the origin now: by this host, or, lent, by its children
        (within their time), which a seed that leaves waits for as for its own."""
        lending = self.stored.lending
        lent = lending.reading_elsewhere(self.clock()) if lending is not None else ()
        return self.origin.reads + len(lent)

    @contextlib.contextmanager
    def asking(self, rate: int, *, back_to_source: bool = True) -> Iterator[None]:
        """While an ask waits for this download, its rate counts (``PieceIO.asking``), and
        so does whether it lets this host read the origin (dfget's
        ``--disable-back-to-source``): it may while any ask waiting allows it; with nobody
        waiting, the last word holds."""
        self._origin_asks.append(back_to_source)
        self.back_to_source = any(self._origin_asks)
        try:
            with self.pieces.asking(rate):
                yield
        finally:
            self._origin_asks.remove(back_to_source)
            if self._origin_asks:
                self.back_to_source = any(self._origin_asks)

    def _origin_allowed(self, why: str) -> None:
        """Reading the origin here is what comes next: refused when no ask allows it."""
        if not self.back_to_source:
            raise SwarmflyError(
                "not_found",
                f"{why}, and --disable-back-to-source forbids this host to read the origin",
            )

    def rejoined(self) -> None:
        """A scheduler that did not know this download has just heard of it."""
        self.control.rejoined()

    def silence(self) -> None:
        """Its host is leaving: no last report or result when it stops (the leave drops
        its peer), so the leave waits on no answer of a scheduler's."""
        self.control.silent = True
        self._leaving = True

    def drain(self) -> None:
        """Read no further piece from the origin, nor lend one; the reads in flight finish
        (its children's of what it lent too). A leaving seed hands what it read to the swarm
        instead of dropping it half-read: the seed taking over takes those from holders."""
        self.origin.draining = True
        if self.stored.lending is not None:
            self.stored.lending.open = False

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
        reporter = asyncio.create_task(self.control.report_loop()) if self.scheduler else None
        if not self.stored.complete:
            # What a previous run held, resumed (a complete task is announced instead).
            self.control.report_held()
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
            await self.control.flush_reports()
            unreported = any(self.stored.digests[n] is None for n in self.stored.done)
            await self.control.result(True, unreported=unreported)
        except BaseException as exc:
            if not self.phases.ended:
                self.phases.on("error", message=str(exc)[:200])
            await self.control.flush_reports()
            await self.control.result(False, str(exc)[:200])
            raise
        finally:
            if reporter is not None:
                reporter.cancel()
            self.digest.cancel()
            if self._vouching is not None:
                self._vouching.cancel()
            for parent in self.parents.values():
                if parent.watcher is not None:
                    parent.watcher.cancel()
            if not self._leaving:
                for read in self.lent_reads:
                    read.cancel()

    async def _carry_out(self, step: Step) -> Step:
        """One phase's work (``phases``); the step of the phase it leads to."""
        phases = self.phases
        match step:
            case Announce():
                self.stored.touch()
                try:
                    await self.control.announce_cached()
                except SwarmflyError as exc:
                    if exc.code not in ("unavailable", "timeout"):
                        raise
                    # The copy here is verified: it is delivered; the swarm hears of it later.
                    log.info("task %s: not announced: %s", self.task_id[:12], exc.message)
                return phases.on("announced")
            case Register(seed=True):
                holders = await self.control.register_quietly()
                if holders and self.stat.ranges:
                    self._holders = holders
                    return phases.on("holders")
                return phases.on("no_holders")
            case Register():
                # P2P as the scheduler directs; the origin only when it says so, when it is
                # unreachable, or when the swarm's word on the content contradicts our stat.
                if self.stat.size is not None:
                    self.stored.set_content(self.origin.stat_content(self.stat.size))
                try:
                    schedule = await self.control.request(
                        messages.REGISTER, self.control.register_body()
                    )
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
                self._origin_allowed("no peer or seed can serve the task")
                await self.origin.read()
                return phases.on("complete")
            case TakeOver():
                await self.origin.take_over(self._holders)
                return phases.on("complete")
            case Verify():
                return await self._verify_whole()
            case Repair():
                self._origin_allowed("the whole file failed its digest")
                return await self._repair()
        raise AssertionError(f"no step {step!r}")

    def _scheduled(self, schedule: messages.Schedule) -> Step:
        """The scheduler's answer as the phases' event."""
        self.control.adopt(schedule.task)
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
            try:
                reply = await self.control.request(messages.RESCHEDULE, body)
            except SwarmflyError as exc:
                if exc.code != "not_found":
                    raise
                # A scheduler that does not know us (a restart, a partition moved): join
                # again, which a scheduler still starting may not answer either.
                reply = await self.control.request(messages.REGISTER, self.control.register_body())
                self.control.report_held()
        except SwarmflyError as exc:
            if exc.code not in ("unavailable", "timeout"):
                raise
            return self._without_scheduler(exc)
        self.swarm.scheduler_back()
        return reply

    def _without_scheduler(self, exc: SwarmflyError) -> messages.Schedule:
        """What to do while the task's scheduler does not answer: the core's call."""
        answering = self.control.schedulers_answer()
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
        answered = float("-inf")
        while not parent.complete:
            wait = SEED_POLL_WAIT if parent.type == "seed" else POLL_WAIT
            if parent.type == "seed":
                await self._room_for_a_loan()
            elif (gap := answered + OFFER_GAP - self.clock()) > 0:
                await asyncio.sleep(gap)
            params = {"since": str(parent.version), "wait": str(wait)}
            book = self.swarm.book
            if parent.type == "seed" and book is not None:
                params["wants"] = bitmap.encode(book.wanted(), book.piece_count)
                params["peer"] = self.peer_id  # what it lends us follows our liveness
                if not self.back_to_source or self.loans_failed:
                    # No loans: this host does not read the origin, or could not.
                    params["borrow"] = "0"
                if declined is not None:
                    params["decline"] = str(declined)
                if self._delivered:
                    # Told over HTTP, not only through the scheduler: with NATS down, the
                    # seed would read them from the origin again once their time is up.
                    params["lent"] = ",".join(map(str, self._delivered[:64]))
                    del self._delivered[:64]
            try:
                answer = await self.links.parents.offers(
                    parent.address, self.task_id, params, self.control.auth(), wait + 10
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
                if data.get("sole") is False and self.unhashed and self._vouching is None:
                    self._vouching = asyncio.create_task(self._vouch_unhashed())
                if parent.type == "seed" and "origin" in data:
                    sole = data.get("sole") is True
                    self._lent.extend((n, etag, parent, sole) for n, etag in _lent_pieces(data))
                parent.version = version
                answered = self.clock()
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
                swarm.take_offers()
                lacking = content is None or (book is not None and book.needs_digests())
                if lacking:
                    if self.ledger.poll_due(self.clock()):
                        await self.control.refresh_task(book)
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
                swarm.concurrency = self.pieces.in_flight()
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
                            self.pieces.fetch(decision.number, self.parents[decision.parent_id])
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
                        self.control.adopt(schedule.task)
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
                timeout = 0.25 if swarm.book is not None else 0.2
                if lacking:  # a parent has pieces we could fetch once their digests come
                    timeout = min(timeout, max(0.01, self.ledger.poll_in(self.clock())))
                waiter = asyncio.create_task(self._wake.wait())
                done, _ = await asyncio.wait(
                    [waiter, *fetches], timeout=timeout, return_when=asyncio.FIRST_COMPLETED
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
            self.loans_failed = True
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

    async def _room_for_a_loan(self) -> None:
        """Ask a seed again once a lent read is done, while as many as it lends one child
        are under way: the ask then says which came back, and the seed lends the next
        (a seed lends a sole child the whole file, a few pieces at a time). Never longer
        than ``LOAN_WAIT``: the seed keeps lending only to a child that keeps asking."""
        deadline = self.clock() + LOAN_WAIT
        while (
            len(self.lent_reads) + len(self._lent) >= PER_CHILD
            and (left := deadline - self.clock()) > 0
        ):
            reads = set(self.lent_reads)
            if not reads:
                await asyncio.sleep(min(left, 0.01))  # its reads are about to start
                continue
            await asyncio.wait(reads, timeout=left, return_when=asyncio.FIRST_COMPLETED)

    def _start_lent(self, fetches: dict[asyncio.Task[int], tuple[int, str]]) -> None:
        if self.swarm.book is None:
            return
        if not self.back_to_source:  # a seed that lent all the same reads them itself
            self._lent.clear()
        for number, etag, seed, sole in self._lent:
            if self.swarm.lent(number):
                read = asyncio.create_task(self._lent_piece(number, etag, seed, sole))
                self.lent_reads.add(read)
                read.add_done_callback(self.lent_reads.discard)
                fetches[asyncio.create_task(_shielded(read))] = (number, ORIGIN)
        self._lent.clear()

    async def _lent_piece(self, number: int, etag: str | None, seed: Parent, sole: bool) -> int:
        """A piece the seed lent us: read from the origin, pinned to the version it saw. The
        seed's sole child does not hash it on its own: nobody takes it on our word (the seed
        takes it back proven by the whole file, as we are), so one pass over its bytes, the
        whole file's, is all it costs (a report needs a digest: ``control.result`` registers
        it instead)."""
        content = self.stored.content
        hashing = not (sole and content is not None and content.digest)
        with telemetry.span("lent piece", attributes={"swarmfly.piece": number}):
            await self.origin.piece(number, self.origin.headers(etag), hashing=hashing)
        if not hashing:
            self.unhashed.add(number)
            if self._vouching is not None:  # the seed said others ask: this one, too
                self._vouching = asyncio.create_task(self._vouch_unhashed(self._vouching))
        self._delivered.append(number)
        self.borrowed[number] = seed
        return number

    async def _vouch_unhashed(self, before: asyncio.Task[None] | None = None) -> None:
        """Other children ask our seed now, and could take from us what it lent us as its
        sole child, but not without a digest: those pieces are hashed after all and
        reported, the lent child's word like any (DESIGN §9), one after the other."""
        if before is not None:
            await asyncio.wait({before})  # however it ended; a cancel of ours still ends us
        else:
            log.info(
                "task %s: other children ask our seed now; hashing the %d pieces read as its"
                " sole child, for them", self.task_id[:12], len(self.unhashed),
            )  # fmt: skip
        for number in sorted(self.unhashed):
            digest = await asyncio.to_thread(self.stored.hash_held, number)
            self.unhashed.discard(number)
            if digest is not None:
                self.control.report(messages.PieceReport(number, digest=digest))

    async def hand_back(self, timeout: float) -> int:
        """This host is leaving: the lent pieces it read go back to their seed, which lacks
        them (it takes what it lent from the swarm once it has read the rest, and would read
        from the origin again what only this host holds). How many it took."""
        if self.lent_reads:
            await asyncio.wait(self.lent_reads, timeout=timeout)
        for read in self.lent_reads:
            read.cancel()
        taken = 0
        for number, seed in sorted(self.borrowed.items()):
            try:
                taken += await self.pieces.hand_back(number, seed, timeout)
            except SwarmflyError as exc:
                log.info("lent piece %d not handed back: %s", number, exc)
                if exc.code in ("unavailable", "timeout"):
                    break  # the seed is gone or stalls: the rest would fare no better
        return taken

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
        if (found := await self.digest.finish()) == self._wanted():
            self.file_digest = content.digest
            self._vouch_taken_back()
            return self.phases.on("matches")
        await self.control.refresh_task(None)  # the seed may since have read what we took on trust
        if self.ledger.suspects():
            return self.phases.on("suspects")
        return self._mismatch(found)

    def _mismatch(self, found: str) -> Step:
        """What the user sees: both digests, so a digest pasted wrong is told from a file
        that changed."""
        message = f"the origin's content does not match its digest {self._wanted()} (it is {found})"
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
        await self.origin.ranges(suspects, report=self.seed)
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
        if (found := await self.digest.finish()) != self._wanted():
            return self._mismatch(found)
        assert self.stored.content is not None
        self.file_digest = self.stored.content.digest
        self._vouch_taken_back()
        return self.phases.on("matches")

    def _vouch_taken_back(self) -> None:
        """The whole file matched its digest: the pieces it took from holders, or its lent
        children handed back, with no digest known for them are proved now, and this seed,
        their trusted reader, reports them. Those it did not hash on their own (taken from
        a sole child) are hashed when a child first wants them (``StoredTask.unhashed``)."""
        for number in sorted(self.ledger.unvouched):
            digest = self.stored.digests[number]
            if number in self.stored.done and digest is not None:
                self.control.report(messages.PieceReport(number, digest=digest))
        self.ledger.unvouched.clear()
        self.stored.unhashed = {n for n in self.stored.done if self.stored.digests[n] is None}
