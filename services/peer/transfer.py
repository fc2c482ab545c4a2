"""How a download's pieces move: paced within the host's and the download's rates, written
as their bytes arrive and verified, and, from a parent, accounted for (the store, the
ledger, the report, the metrics).

Both ways a piece comes in go through here: from a parent (``PieceIO.fetch``) and from the
origin (``backtosource``), so a piece is written, checked and marked in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

from opentelemetry.trace import SpanKind

from swarmfly import telemetry
from swarmfly.contracts import messages
from swarmfly.errors import SwarmflyError, in_words
from swarmfly.ratelimit import TokenBucket
from swarmfly.services.peer.control import ControlLink
from swarmfly.services.peer.filedigest import PrefixDigest
from swarmfly.services.peer.ledger import DigestLedger
from swarmfly.services.peer.links import Links
from swarmfly.services.peer.store import StoredTask
from swarmfly.services.peer.swarming import in_flight

log = logging.getLogger(__name__)

WRITE_BATCH = 512 * 1024
"""The least a piece gathers before its bytes go to disk in one thread hop (a hop per
network chunk cost more than the writing)."""
WRITE_BUFFERS = 8 * 1024 * 1024
"""What the pieces being written hold between hops, together: with 16 in flight each
gathers ``WRITE_BATCH`` (1 MiB each put the peer past 100 MiB resident); with fewer, each
gathers more, up to ``WRITE_BATCH_MOST``, in fewer hops: a hop costs the event loop as much
as the write, and a sole child reading 4 pieces at a time from its origin went from 1.5 to
1.3 s per GiB with 2 MiB batches."""
WRITE_BATCH_MOST = 2 * 1024 * 1024


def write_batch(writing: int) -> int:
    """Bytes a piece gathers per thread hop while ``writing`` pieces (its own among them)
    are being written."""
    return max(WRITE_BATCH, min(WRITE_BATCH_MOST, WRITE_BUFFERS // max(1, writing)))


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


class PieceIO:
    """One download's pieces in and out of its store."""

    def __init__(
        self,
        links: Links,
        task_id: str,
        *,
        stored: StoredTask,
        ledger: DigestLedger,
        digest: PrefixDigest,
        control: ControlLink,
    ) -> None:
        self.links = links
        self.settings = links.settings
        self.clock = links.clock
        self.metrics = links.metrics
        self.task_id = task_id
        self.stored = stored
        self.ledger = ledger
        self.digest = digest
        self.control = control
        self.rate = TokenBucket(0)
        """This download's own limit (``asking``), within the host's."""
        self._asks: list[int] = []
        """The rates of the asks waiting for this download (0: none of their own)."""
        self.bytes_p2p = 0

    # -- pace ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def asking(self, rate: int) -> Iterator[None]:
        """While an ask waits for this download, its rate (a get's ``--download-rate``; 0:
        none) counts: the download goes as fast as the fastest ask waiting allows, so an ask
        that set a slow rate and left never holds back the next one. With nobody waiting,
        the last rate holds (a get stopped with Ctrl-C is not finished at full speed behind
        its back)."""
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

    def in_flight(self) -> int:
        """How many pieces to keep in flight, for the rates that bind this download."""
        host = self.links.budget.share()
        return in_flight(self.settings.concurrency, self.rate.rate, host)

    async def take(self, amount: int) -> None:
        await self.links.budget.bucket.take(amount)
        await self.rate.take(amount)

    async def paced(
        self, chunks: AsyncIterator[bytes], size: int, too_much: SwarmflyError
    ) -> AsyncIterator[bytes]:
        """A piece's bytes as they come, within the rates and no more than the piece."""
        received = 0
        async for chunk in chunks:
            received += len(chunk)
            if received > size:
                raise too_much
            await self.take(len(chunk))
            yield chunk

    # -- the store -----------------------------------------------------------------------

    async def receive(
        self,
        number: int,
        chunks: AsyncIterator[bytes],
        expected: str | None,
        *,
        hashing: bool = True,
    ) -> str | None:
        """A piece written as its bytes arrive and verified (its sha256 hex); None when the
        endgame's other copy of it got there first. Not ``hashing`` (nor a digest to check
        it by), it is written only: ``UNHASHED``, for the whole file's digest to prove."""
        writer = self.stored.writer(number, hashing=hashing or expected is not None)
        aside: list[bytes] = []
        """Bytes not written yet: a batch for the writer, or all of ours while another copy
        is being written."""
        held = 0
        batch = write_batch(len(self.stored.writing))
        try:
            async for chunk in chunks:
                aside.append(chunk)
                held += len(chunk)
                if writer is not None and held >= batch:
                    await asyncio.to_thread(writer.write, aside)
                    aside, held = [], 0
            if writer is not None:  # the last chunks written in the hop that proves them
                return await asyncio.to_thread(writer.finish, expected, aside)
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
        return await self.write(number, b"".join(aside), expected)

    async def write(self, number: int, data: bytes, expected: str | None) -> str:
        """A whole piece written and verified (its sha256 hex)."""
        try:
            return await asyncio.to_thread(self.stored.write_piece, number, data, expected)
        except OSError as exc:
            raise LocalDiskError.of(exc) from None

    def mark_done(self, number: int, digest: str) -> None:
        """A verified piece is the download's; the verified prefix moves on: into the
        outputs waiting for the file, and through the whole-file hash only when there is a
        digest to verify against (otherwise it would be a pass over every byte for
        nothing)."""
        self.stored.mark_done(number, digest)
        content = self.stored.content
        self.digest.hashing = content is not None and bool(content.digest)
        self.digest.kick()

    # -- from a parent -------------------------------------------------------------------

    async def fetch(self, number: int, parent: Parent, *, hashing: bool = True) -> int:
        """One piece from a parent's upload server, verified, marked and reported. Not
        ``hashing`` (a piece of no digest known, which only the whole file's proves), it is
        written only: ``UNHASHED``, hashed when a child first wants it (``StoredTask.unhashed``)."""
        content = self.stored.content
        assert content is not None
        offset, size = content.piece(number)
        expected = self.stored.digests[number]
        started = self.clock()
        headers = {"Range": f"bytes={offset}-{offset + size - 1}", **self.control.auth()}
        if not self.settings.piece_spans:
            # Aggregated under the download's "p2p" span: no traceparent, so the parent
            # opens no span either (a 1,000-piece download is not 2,000 spans).
            return await self._transfer(number, parent, headers, size, expected, started, hashing)
        attributes = {
            "http.request.method": "GET",
            **telemetry.url_attributes(f"{parent.address}/v1/tasks/{self.task_id}/data"),
            "swarmfly.piece": number,
        }
        with telemetry.span("GET piece", kind=SpanKind.CLIENT, attributes=attributes) as current:
            telemetry.inject(headers)
            try:
                got = await self._transfer(
                    number, parent, headers, size, expected, started, hashing
                )
            except ParentBusy:
                telemetry.set_attributes(current, **{"http.response.status_code": 503})
                raise
            telemetry.set_attributes(current, **{"http.response.status_code": 206})
            return got

    async def _transfer(
        self,
        number: int,
        parent: Parent,
        headers: dict[str, str],
        size: int,
        expected: str | None,
        started: float,
        hashing: bool = True,
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
            chunks = self.paced(
                body, size, SwarmflyError("integrity", "parent sent more than the piece")
            )
            digest = await self.receive(number, chunks, expected, hashing=hashing)
        if digest is not None:
            # A piece of no known digest (a storage gathering a sole child's) is not said to
            # be held until the whole file proves it: the scheduler refuses such a report.
            self.got(number, digest, parent.peer_id, started, report=expected is not None)
        return number

    def got(
        self, number: int, digest: str, parent_id: str, started: float, *, report: bool = True
    ) -> bool:
        """A piece from another peer is verified in the store (``digest``): mark it,
        account for it, report it (unless not ``report``). False when another copy got
        there first."""
        if number in self.stored.done:
            return False
        assert self.stored.content is not None
        size = self.stored.content.piece(number)[1]
        self.mark_done(number, digest)
        self.ledger.came_from[number] = parent_id
        self.bytes_p2p += size
        self.metrics.download_bytes.labels("p2p").inc(size)
        cost = self.clock() - started
        self.metrics.piece_seconds.labels("p2p").observe(cost)
        log.debug("piece %d from %s in %.3fs", number, parent_id, cost)
        if report:
            self.control.report(
                messages.PieceReport(number, parent_id=parent_id, cost_ms=int(cost * 1000))
            )
        return True

    # -- a lent piece handed back ----------------------------------------------------------

    async def hand_back(self, number: int, seed: Parent, timeout: float) -> bool:
        """A lent piece this host read goes back to the seed that lent it, as this host
        leaves: it may be the only copy, and the seed would read it from the origin again.
        True when the seed took it; False when it had it, or would not."""
        content = self.stored.content
        if content is None or number not in self.stored.done:
            return False
        offset, size = content.piece(number)
        body = await asyncio.to_thread(self.stored.read, offset, size)
        answer = await self.links.parents.hand_back(
            seed.address, self.task_id, number, body, self.control.auth(), timeout
        )
        if answer.status != 200:
            log.info("seed %s refused lent piece %d: %d", seed.peer_id, number, answer.status)
            return False
        return bool(answer.data.get("taken"))

    async def take_back(self, number: int, child: str, chunks: AsyncIterator[bytes]) -> bool:
        """A seed: a piece it lent, handed back by its child (``hand_back``); verified like
        any from a peer, against the digest the scheduler knows of it (for a lent piece, the
        child's word) and with the rest against the whole file's digest. False when this
        host had it already."""
        content = self.stored.content
        if content is None or number in self.stored.done:
            return False
        started = self.clock()
        size = content.piece(number)[1]
        paced = self.paced(chunks, size, SwarmflyError("bad_request", "more than the piece"))
        expected = self.stored.digests[number]
        digest = await self.receive(number, paced, expected)
        if digest is None or number in self.stored.done:  # the seed's own read came first
            return False
        # Without a digest known, its child left before it reported the piece: this seed's
        # word on bytes it did not read waits for the whole file's.
        if expected is None:
            self.ledger.unvouched.add(number)
        return self.got(number, digest, child, started, report=expected is not None)
