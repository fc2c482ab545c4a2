"""A download's reads of the origin: parallel ranges or one stream, a seed's lending
(``lending``) and a seed taking over from a lost one (``takeover``), which gathers what the
swarm holds before it reads the rest.

Every read is pinned to the content first seen (its ETag), paced and verified like a piece
from a parent (``transfer``). The conductor decides when to come here (``phases``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection, Coroutine, Iterable
from typing import Any

from swarmfly import telemetry
from swarmfly.content import SourceRequest, TaskContent, piece_count, piece_length_for
from swarmfly.contracts import messages
from swarmfly.errors import SwarmflyError
from swarmfly.ids import redact_url
from swarmfly.plugintypes import SourceStat
from swarmfly.services.peer.control import ControlLink
from swarmfly.services.peer.ledger import DigestLedger
from swarmfly.services.peer.lending import LEND_POLL, Lending
from swarmfly.services.peer.links import Links, OriginReader
from swarmfly.services.peer.store import StoredTask
from swarmfly.services.peer.swarming import BUSY_BACKOFF
from swarmfly.services.peer.takeover import ATTEMPTS, Gathering
from swarmfly.services.peer.transfer import LocalDiskError, Parent, ParentBusy, PieceIO

log = logging.getLogger(__name__)


class BackToSource:
    """One download's side of the origin."""

    def __init__(
        self,
        links: Links,
        task_id: str,
        source: SourceRequest,
        *,
        origin: OriginReader,
        stat: SourceStat,
        seed: bool,
        stored: StoredTask,
        ledger: DigestLedger,
        control: ControlLink,
        pieces: PieceIO,
    ) -> None:
        self.links = links
        self.settings = links.settings
        self.clock = links.clock
        self.metrics = links.metrics
        self.task_id = task_id
        self.source = source
        self.origin = origin
        self.stat = stat
        self.seed = seed
        self.stored = stored
        self.ledger = ledger
        self.control = control
        self.pieces = pieces
        self.bytes_origin = 0
        self.reads = 0
        """Pieces being read from the origin now."""
        self.draining = False
        """Read no further piece; the reads in flight finish (``drain``)."""

    # -- the content ---------------------------------------------------------------------

    def stat_content(self, size: int) -> TaskContent:
        """The content as this host's own stat of the origin (and its request) states it."""
        length = self.source.piece_length or piece_length_for(size)
        digest = self.source.digest or self.stat.digest
        return TaskContent(size, length, piece_count(size, length), digest)

    def content(self) -> TaskContent:
        """The task's size and piece layout as the origin states them (reported once)."""
        stat = self.stat
        if stat.size is None:
            raise SwarmflyError("source_error", "origin does not state the content length")
        self.stored.set_content(self.stat_content(stat.size))
        self.control.reports.tell_layout()
        content = self.stored.content
        assert content is not None
        return content

    def headers(self, etag: str | None = None) -> dict[str, str]:
        """Every read of the origin is pinned to the content first seen (``etag``: as the
        seed saw it): pieces of two versions of a file never end up in one download."""
        etag = etag or self.stat.etag
        if etag and not any(k.lower() == "if-match" for k in self.source.headers):
            return {**self.source.headers, "If-Match": etag}
        return self.source.headers

    # -- the whole download from the origin ----------------------------------------------

    async def read(self) -> None:
        """Read the missing pieces from the origin: parallel ranges, lent, or one stream."""
        with telemetry.span("back_to_source", attributes={"url.full": redact_url(self.source.url)}):
            try:
                await self._read()
            except SwarmflyError as exc:
                if exc.code == "source_error":
                    self.metrics.piece_failures.labels("origin").inc()
                raise

    async def _read(self) -> None:
        content = self.content()
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
            await self._lending(content)
        elif self.stat.ranges:
            await self.ranges(missing)
        else:
            await self._stream(content)

    async def ranges(self, numbers: list[int], *, report: bool = True) -> None:
        """These pieces by range, ``origin_concurrency`` at once."""
        queue: asyncio.Queue[int] = asyncio.Queue()
        for number in numbers:
            queue.put_nowait(number)
        readers = min(self.settings.origin_concurrency, len(numbers))
        await self._all(self._worker(queue, report=report) for _ in range(readers))

    async def _worker(self, queue: asyncio.Queue[int], *, report: bool = True) -> None:
        while not queue.empty() and not self.draining:
            await self.piece(queue.get_nowait(), self.headers(), report=report)

    async def _all(self, workers: Iterable[Coroutine[Any, Any, None]]) -> None:
        """Readers at once, all of them cancelled if one fails; a draining seed then waits
        to be cancelled (``drain``)."""
        tasks = [asyncio.create_task(worker) for worker in workers]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
        await self._parked_if_draining()

    async def _parked_if_draining(self) -> None:
        """A draining seed whose reads are done waits to be cancelled (``drain``)."""
        if self.draining:
            await asyncio.Event().wait()

    async def piece(
        self, number: int, headers: dict[str, str], *, report: bool = True, hashing: bool = True
    ) -> int:
        """One piece read from the origin by range, written, reported with its digest (not
        ``hashing``: written only, and not reported; the whole file's digest proves it)."""
        content = self.stored.content
        assert content is not None
        offset, size = content.piece(number)
        started = self.clock()
        # Read from the origin ourselves, the bytes are the truth: a digest only a lent child
        # vouches for is no test of them (they refute it), and saying so is the seed's job.
        vouched = self.ledger.vouched(number)
        expected = None if vouched else self.stored.digests[number]
        chunks = self.pieces.paced(
            self.origin.fetch(self.source.url, headers, offset, offset + size),
            size,
            SwarmflyError("source_error", "origin sent more than the range asked"),
        )
        self.reads += 1
        try:
            digest = await self.pieces.receive(number, chunks, expected, hashing=hashing)
        finally:
            self.reads -= 1
        if digest is not None:
            self._done(number, digest, started, report=report and not vouched and bool(digest))
        return number

    async def _stream(self, content: TaskContent) -> None:
        """An origin without ranges: one stream, cut into pieces as it comes."""
        buffer = bytearray()
        number = 0
        started = self.clock()
        async for chunk in self.origin.fetch(self.source.url, self.headers()):
            await self.pieces.take(len(chunk))
            buffer += chunk
            while number < content.piece_count and len(buffer) >= content.piece(number)[1]:
                size = content.piece(number)[1]
                piece, buffer = bytes(buffer[:size]), buffer[size:]
                if number not in self.stored.done:
                    await self._whole_piece(number, piece, started)
                number += 1
                started = self.clock()
            if len(buffer) > content.piece_length:
                raise SwarmflyError("source_error", "origin sent more bytes than it stated")
        if number < content.piece_count or buffer:
            raise SwarmflyError("source_error", "origin body length differs from what it stated")

    async def _whole_piece(self, number: int, data: bytes, started: float) -> None:
        vouched = self.ledger.vouched(number)
        expected = None if vouched else self.stored.digests[number]
        digest = await self.pieces.write(number, data, expected)
        self._done(number, digest, started, report=not vouched)

    def _done(self, number: int, digest: str, started: float, *, report: bool) -> None:
        """A piece read from the origin is verified in the store: mark it and say so (a
        child does not report a digest it refuted: that is the seed's to say)."""
        if number in self.stored.done:
            return
        self.pieces.mark_done(number, digest)
        assert self.stored.content is not None
        size = self.stored.content.piece(number)[1]
        self.bytes_origin += size
        self.metrics.download_bytes.labels("origin").inc(size)
        cost = self.clock() - started
        self.metrics.piece_seconds.labels("origin").observe(cost)
        if digest and (report or self.seed):
            self.control.report(
                messages.PieceReport(number, digest=digest, cost_ms=int(cost * 1000))
            )

    # -- a seed that lends ---------------------------------------------------------------

    async def _lending(self, content: TaskContent) -> None:
        """Read the origin as a seed that lends pieces (``lending``): the seed's workers
        read from the first piece up, waiting children are lent pieces from the last one
        down, and the lent pieces come back from the swarm."""
        concurrency = self.settings.origin_concurrency
        fresh = Lending.for_origin(
            content.piece_count, content.piece_length, concurrency, self.stat.etag,
            sole=self.settings.lend_sole,
        )  # fmt: skip
        with self.stored.lent(fresh) as lending:
            watcher = asyncio.create_task(self._watch_lent(lending))
            try:
                await self._lend_and_collect(lending, min(concurrency, content.piece_count))
            finally:
                watcher.cancel()
                self.ledger.lent_out = set(lending.pending)

    async def _lend_and_collect(self, lending: Lending, readers: int) -> None:
        await self._all(self._claiming_worker(lending) for _ in range(readers))
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
                holders = await self.control.register_quietly()
                found: set[int] = set()
                if holders:
                    held_off = lending.held_off(self.clock())
                    found = await self.gather(holders, hold_off=held_off)
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
                await self.control.refresh_task(None)
                lending.learned(self.stored.digests)

    async def _claiming_worker(self, lending: Lending) -> None:
        while not self.draining:
            await self._hold_back(lending)
            number = lending.claim(self.stored.done, self.clock())
            if number is None:
                return
            started = self.clock()
            took: float | None = None
            try:
                await self.piece(number, self.headers())
                took = self.clock() - started
            finally:
                lending.read(number, took)

    async def _hold_back(self, lending: Lending) -> None:
        since = now = self.clock()
        while lending.hold_back(since, now, self.stored.done, self.stored.served):
            await asyncio.sleep(0.02)
            now = self.clock()

    # -- a seed taking over --------------------------------------------------------------

    async def take_over(self, holders: list[messages.Parent]) -> None:
        """A seed continuing a task whose seed was lost: what the swarm already holds comes
        from its holders, only the rest from the origin, so the origin is read about once in
        all."""
        with telemetry.span("take_over", attributes={"swarmfly.holders": len(holders)}):
            self.content()
            await self.gather(holders)

    async def gather(
        self, holders: list[messages.Parent], hold_off: Collection[int] = ()
    ) -> set[int]:
        """What the holders have comes from them, the rest from the origin, both at once
        (``takeover.Gathering``). ``hold_off``: pieces children are reading from the origin,
        taken from holders only. Returns what the holders had."""
        content = self.stored.content
        assert content is not None
        await self.control.refresh_task(None)  # the digests the swarm's pieces are checked against
        by_id: dict[str, Parent] = {}
        for info in holders:
            by_id.setdefault(
                info.peer_id, Parent(info.peer_id, info.host_id, info.address.rstrip("/"))
            )
        answers = await asyncio.gather(*(self._holdings(p) for p in by_id.values()))
        held = dict(zip(by_id, answers, strict=True))
        missing = [n for n in range(content.piece_count) if n not in self.stored.done]
        gathering = Gathering.plan(
            missing, held, self.stored.digests, hold_off, proven=bool(content.digest)
        )
        log.info(
            "task %s: %d pieces from %d holders, %d from the origin",
            self.task_id[:12], len(gathering.queue), len(held), len(gathering.origin),
        )  # fmt: skip
        # As many at once as a download takes from a parent: more from one holder would only
        # hold more pieces in memory here, and load its uplink, for no more speed.
        workers = min(
            self.settings.concurrency, self.settings.per_parent * len(held), len(gathering.queue)
        )
        await asyncio.gather(
            self.ranges(gathering.origin) if gathering.origin else asyncio.sleep(0),
            *(self._from_holders(gathering, by_id) for _ in range(workers)),
        )
        if rest := gathering.rest(self.stored.done, hold_off):
            await self.ranges(rest)
        return Gathering.found(held)

    async def _holdings(self, parent: Parent) -> set[int]:
        """What a holder has now (no long-poll); nothing when it cannot answer."""
        params = {"since": "-1", "wait": "0"}
        try:
            answer = await self.links.parents.offers(
                parent.address, self.task_id, params, self.control.auth(), 10
            )
            if answer.status != 200:
                return set()
            return {int(n) for n in answer.data["pieces"]}
        except (SwarmflyError, ValueError, KeyError, TypeError) as exc:
            log.info("holder %s did not say what it has: %s", parent.peer_id, exc)
            return set()

    async def _from_holders(self, gathering: Gathering, holders: dict[str, Parent]) -> None:
        while (ask := gathering.next()) is not None:
            if not await self._from_any(*ask, gathering, holders):
                gathering.gave_up(ask[0])

    async def _from_any(
        self, number: int, where: list[str], gathering: Gathering, holders: dict[str, Parent]
    ) -> bool:
        """One piece from the least loaded holder that delivers it."""
        content = self.stored.content
        assert content is not None
        attempts = 0
        for holder in where:
            while attempts < ATTEMPTS and holder in holders:
                attempts += 1
                gathering.asking(holder)
                unknown = self.stored.digests[number] is None
                try:
                    # Only the whole file's digest proves a piece of none known (``plan``):
                    # hashing it on its own too waits until a child wants it.
                    proven = unknown and bool(content.digest)
                    await self.pieces.fetch(number, holders[holder], hashing=not proven)
                    if unknown:
                        self.ledger.unvouched.add(number)
                    return True
                except ParentBusy:
                    await asyncio.sleep(BUSY_BACKOFF)
                except LocalDiskError:
                    raise
                except SwarmflyError as exc:
                    log.info("piece %d from holder %s: %s", number, holder, exc)
                    gathering.refused(holder, number, corrupt=exc.code == "integrity")
                    if holder in gathering.dropped:
                        holders.pop(holder, None)
                    break
                finally:
                    gathering.answered(holder)
        return False
