"""A download's link to its task's scheduler: requests, the reports it is owed, the result,
and the swarm's word on the content (its layout, its digests), taken only where it agrees
with what this host knows itself.

The conductor decides when to ask (``phases``, ``swarming``); this module is how: the
capability a schedule carries, the digests pushed with replies, the report batches
(``reports``) and what a failed report leads to.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection
from dataclasses import replace

from swarmfly.content import SourceRequest, TaskContent
from swarmfly.contracts import messages
from swarmfly.contracts.wire import ABSENT, Absent, Rep, Req, Subject
from swarmfly.errors import SwarmflyError
from swarmfly.services.peer.ledger import DigestLedger
from swarmfly.services.peer.links import Clock, SchedulerLink
from swarmfly.services.peer.pieces import PieceBook
from swarmfly.services.peer.reports import REPORT_INTERVAL, Batch, Reports
from swarmfly.services.peer.store import StoredTask
from swarmfly.services.peer.swarming import Swarming

log = logging.getLogger(__name__)

_PUSHING = (messages.RegisterRequest, messages.RescheduleRequest, messages.PiecesRequest)
"""The requests whose replies push digests."""


class SwarmContradicts(SwarmflyError):
    """What the swarm says of the content differs from this host's own stat of the origin."""

    def __init__(self, reason: str) -> None:
        super().__init__("conflict", reason)


class ControlLink:
    """One download's side of the control plane (``scheduler`` None: a download without
    one, which reads the origin)."""

    def __init__(
        self,
        scheduler: SchedulerLink | None,
        task_id: str,
        peer_id: str,
        source: SourceRequest,
        *,
        seed: bool,
        stored: StoredTask,
        ledger: DigestLedger,
        swarm: Swarming,
        clock: Clock,
    ) -> None:
        self.scheduler = scheduler
        self.task_id = task_id
        self.peer_id = peer_id
        self.source = source
        self.seed = seed
        self.stored = stored
        self.ledger = ledger
        self.swarm = swarm
        self.clock = clock
        self.reports = Reports()
        """What the scheduler is still to hear."""
        self._token: str | None = None
        """The capability of the last schedule: parents serve the task only against it."""
        self.silent = False
        """Its host is leaving: no last report or result (the leave drops its peer)."""

    # -- requests ------------------------------------------------------------------------

    async def request(self, subject: Subject[Req, Rep], message: Req) -> Rep:
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
                self.adopt(reply.task)  # a schedule's: the layout the page is of
            page = reply.digest_page
            self.take_digests(page.offset, page.digests, page.provisional or ())
        return reply

    def register_body(self) -> messages.RegisterRequest:
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

    async def register_quietly(self) -> list[messages.Parent]:
        """Register a download that reads the origin; for a seed, the peers that already
        hold pieces of the task (a seed taking over from a lost one)."""
        if self.scheduler is None:
            return []
        try:
            reply = await self.request(messages.REGISTER, self.register_body())
        except SwarmflyError as exc:
            log.info("registering a back-to-source download: %s", exc)
            return []
        return reply.parents if self.seed else []

    async def announce_cached(self) -> None:
        if self.scheduler is not None:
            await self.scheduler.announce(self.stored)

    def schedulers_answer(self) -> bool:
        """Some scheduler answered lately: this one not answering is a partition moving."""
        return self.scheduler is not None and self.scheduler.schedulers_answer()

    def auth(self) -> dict[str, str]:
        """What shows a parent this peer was scheduled for the task."""
        return {"Authorization": f"Bearer {self._token}"} if self._token else {}

    async def result(self, success: bool, message: str = "", *, unreported: bool = False) -> None:
        """How the download ended. ``unreported``: it holds pieces of no digest known (read
        ``UNHASHED``), which no piece report carries: registering them does, so that the
        seed takes them from here."""
        if self.scheduler is None or self.silent:
            return
        body = messages.ResultRequest(self.task_id, self.peer_id, success, message or None)
        try:
            if success and unreported:
                await self.scheduler.announce(self.stored, peer_id=self.peer_id, seed=self.seed)
                return
            try:
                await self.request(messages.RESULT, body)
            except SwarmflyError as exc:
                if not (success and exc.code == "conflict"):
                    raise
                # It missed reports (taken by a partition's previous holder as it moved):
                # everything held again, the result with it.
                await self.scheduler.announce(self.stored, peer_id=self.peer_id, seed=self.seed)
        except SwarmflyError as exc:
            log.info("result not recorded: %s", exc)

    # -- what the swarm says of the content ----------------------------------------------

    def adopt(self, data: messages.TaskContent | Absent | None) -> None:
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

    async def refresh_task(self, book: PieceBook | None) -> None:
        """Task size and the per-piece digests the scheduler knows, page by page: while
        downloading (``book``), from the first piece whose digest may still come or change
        (unknown, or only a lent child's word), not the whole list every time; else all."""
        offset = 0 if book is None else self.ledger.offset(self.stored.digests)
        while True:
            try:
                reply = await self.request(
                    messages.TASK, messages.TaskRequest(self.task_id, offset)
                )
            except SwarmflyError as exc:
                log.debug("task info: %s", exc)
                return
            if not reply.task:
                return
            self.adopt(reply.task)
            digests = reply.digests
            start = offset if reply.offset is None else reply.offset
            self.take_digests(start, digests, reply.provisional or ())
            offset = start + len(digests)
            if not digests or offset >= reply.task.piece_count:
                return

    def take_digests(
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

    def _digests_from(self) -> int | None:
        """Where this download lacks digests; None once it has them all."""
        if self.stored.content is None:
            return 0
        offset = self.ledger.offset(self.stored.digests)
        return offset if offset < self.stored.content.piece_count else None

    # -- reports -------------------------------------------------------------------------

    def report(self, piece: messages.PieceReport) -> None:
        """A piece for the next batch."""
        self.reports.piece(piece)

    def rejoined(self) -> None:
        """A scheduler that did not know this download has just heard of it."""
        self.reports.rejoined()

    def report_held(self) -> None:
        """Every held piece of a known digest into the next reports: a register names the
        pieces only, and a scheduler that forgot the task (every peer of it left, or it
        restarted) knows none of their digests. Without them, children offered those pieces
        would wait on digests that never come."""
        digests = self.stored.digests
        for number in sorted(self.stored.done):
            if digests[number] is not None:
                self.reports.piece(messages.PieceReport(number, digests[number]))

    async def report_loop(self) -> None:
        while True:
            await asyncio.sleep(REPORT_INTERVAL)
            await self.flush_reports()

    async def flush_reports(self) -> None:
        if self.scheduler is None or self.silent:
            return
        lending = self.stored.lending
        batch = self.reports.due(lending.lent_to if lending is not None else {})
        if batch is None:
            return
        try:
            await self.request(messages.PIECES, self._pieces_body(batch))
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
