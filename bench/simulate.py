"""Swarm simulator: the real scheduler core and the real P2P core of every peer, in one
process on virtual time, over a network model.

What runs is what the services run: ``Scheduler`` as ``core_for`` builds it from
``[scheduler]`` (with the configured evaluator plugin), and for each peer the download's
``Phases`` and ``Swarming`` with a ``PieceBook`` and the configured strategy, driven as the
conductor drives them (a ``wait`` schedule asked again after its delay, ticks on every event
and every 0.25 s while swarming, reschedules as the core asks, reports batched every 50 ms). What is
modelled: the bytes. Each host has an uplink and a downlink; a transfer moves at the smaller
of its fair share of both (recomputed whenever a transfer starts or ends on either host); each
request waits one link latency; a parent whose upload slots are full lets a few wait for each
(``WAITING_PER_SLOT``), the neediest first, and answers busy beyond (``Admission``). The storage
reads the origin (capped) in ``origin_concurrency`` parallel ranges and offers every piece it
has; children long-poll parents, learning a piece one latency after it is done.

A capped seed super-seeds through the real ``GrantDesk`` and, with a known digest (as
``bench/swarm.py --mode digest``; ``--no-lending`` for ``--mode no-digest``), lends through the
real ``Lending``: children read lent pieces from the origin and the seed gathers them from the
swarm afterwards, as the conductor does. Digests come as the conductor gets them: pushed with
schedules and report replies, polled when a parent offers pieces we cannot verify yet. Not
modelled: piece hashing and disk, CPU contention. Defaults are bench/swarm.py's: N=16,
F=64 MiB, origin 32 MiB/s, 8 MiB/s uplinks, unlimited downlinks.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import itertools
import random
import sys
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from _common import (
    Out,
    add_env_flag,
    add_swarm_flags,
    env_pairs,
    lower_bound,
    median,
    percentile,
    seed_bound,
    size_arg,
    table,
)

from swarmfly import config as swarmfly_config
from swarmfly.content import TaskContent, piece_count, piece_length_for
from swarmfly.pluginhost import Plugins
from swarmfly.services.peer.admission import Admission
from swarmfly.services.peer.conductor import OFFER_GAP, SEED_POLL_WAIT
from swarmfly.services.peer.grants import GRANT_SECONDS, GrantDesk, Granted, Lent, Poll
from swarmfly.services.peer.ledger import DIGEST_POLL
from swarmfly.services.peer.lending import LEND_POLL, MAX_SAID, Lending
from swarmfly.services.peer.phases import Finish, Phases, Step, Swarm, Verify, Wait
from swarmfly.services.peer.pieces import PieceBook
from swarmfly.services.peer.reports import REPORT_INTERVAL
from swarmfly.services.peer.swarming import BUSY_BACKOFF, ORIGIN, Drop, Fetch, Reschedule, Swarming
from swarmfly.services.peer.upload import GRANT_TICK, PACED_SLOT_RATE, WAITING_PER_SLOT
from swarmfly.services.scheduler.core import HostSpec, PieceReport, Schedule, Scheduler
from swarmfly.services.scheduler.core import Lending as LendingReport
from swarmfly.services.scheduler.service import PUSHED_DIGESTS, core_for

TICK = 0.25
"""The conductor's wait between ticks when nothing happens."""
HEARTBEAT = 5.0
TASK = "t" * 64
INF = float("inf")


@dataclass(eq=False)
class Link:
    """One host's side of the network, and its upload server's admission: as
    ``UploadServer``, a capped host uploads ``slots`` pieces at once (one per
    PACED_SLOT_RATE of its cap), lets ``waiting`` more per slot wait, neediest first
    (``Admission``), and answers busy beyond."""

    up: float
    down: float
    slots: int
    # Dicts, not sets, of transfers (hashed by identity): the order they are visited in,
    # and so the order of events at equal times, must not depend on memory addresses.
    uploads: dict[Transfer, None] = field(default_factory=dict)
    downloads: dict[Transfer, None] = field(default_factory=dict)
    waiting: int = WAITING_PER_SLOT
    """Requests that may wait per slot (a super-seeding seed: one)."""
    sent: int = 0
    admission: Admission[Transfer] = field(init=False)

    def __post_init__(self) -> None:
        self.admission = Admission(self.slots)

    @classmethod
    def capped(cls, up: float, down: float, upload_slots: int, waiting: int) -> Link:
        slots = min(upload_slots, max(1, -(-int(up) // PACED_SLOT_RATE))) if up else upload_slots
        return cls(up, down, slots, waiting=waiting)

    @property
    def capacity(self) -> int:
        return (1 + self.waiting) * self.slots

    @property
    def load(self) -> int:
        return self.admission.running + self.admission.waiting


@dataclass(eq=False)
class Transfer:
    parent: Link
    child: Link
    size: int
    remaining: float
    done: Callable[[], None]
    refused: Callable[[], None] = lambda: None
    """Displaced while it waited: the child hears busy."""
    rate: float = 0.0
    since: float = 0.0
    version: int = 0


class Network:
    def __init__(self, sim: Sim, latency: float) -> None:
        self.sim, self.latency = sim, latency

    def send(
        self,
        parent: Link,
        child: Link,
        size: int,
        done: Callable[[], None],
        held: float = 0.0,
        refused: Callable[[], None] = lambda: None,
    ) -> Transfer:
        """A request the parent admitted, from a child holding ``held`` of the pieces."""
        transfer = Transfer(parent, child, size, float(size), done, refused)
        if parent.admission.enter(transfer, held):
            self._start(transfer)
        return transfer

    def cancel(self, t: Transfer) -> None:
        """The child hung up (the endgame's other copy came first): its slot, or its place
        in the parent's queue, is the next one's."""
        if t not in t.parent.uploads:
            t.parent.admission.leave(t)
            return
        t.parent.uploads.pop(t)
        t.child.downloads.pop(t, None)
        t.version += 1  # its finish is void
        self._rebalance(t.parent, t.child)
        if (waiter := t.parent.admission.release()) is not None:
            self._start(waiter)

    def _start(self, transfer: Transfer) -> None:
        """Accepted at the parent: under way at once, or when a slot frees."""
        transfer.since = self.sim.now
        transfer.parent.uploads[transfer] = None
        transfer.child.downloads[transfer] = None
        self._rebalance(transfer.parent, transfer.child)

    def _rebalance(self, *links: Link) -> None:
        now = self.sim.now
        touched = dict.fromkeys(t for link in links for t in (*link.uploads, *link.downloads))
        for t in touched:
            t.remaining -= t.rate * (now - t.since)
            up = t.parent.up / len(t.parent.uploads) if t.parent.up else INF
            down = t.child.down / len(t.child.downloads) if t.child.down else INF
            t.rate, t.since, t.version = min(up, down), now, t.version + 1
            eta = now + max(0.0, t.remaining) / t.rate if t.rate < INF else now
            self.sim.at(eta, self._finish, t, t.version)

    def _finish(self, t: Transfer, version: int) -> None:
        if version != t.version:
            return  # superseded by a rebalance
        t.parent.uploads.pop(t, None)
        t.child.downloads.pop(t, None)
        t.parent.sent += t.size
        self._rebalance(t.parent, t.child)
        if (waiter := t.parent.admission.release()) is not None:
            self._start(waiter)
        t.done()


@dataclass(eq=False)
class Fetching:
    """One of a child's piece requests, from when it is sent until its piece is in."""

    parent: Node
    transfer: Transfer | None = None
    cancelled: bool = False


@dataclass(eq=False)
class Node:
    """A peer host (or the storage): its link, what it holds, who watches it. As the one
    task it holds, it is what a seed's ``GrantDesk`` reads (``SeedTask``)."""

    peer_id: str
    spec: HostSpec
    link: Link
    held: set[int] = field(default_factory=set)
    watchers: dict[SimPeer, None] = field(default_factory=dict)
    """Children long-polling it, in the order they came (a run is the same for a seed)."""
    desk: GrantDesk | None = None
    """A capped seed's (super-seeding): it offers each polling child one granted piece."""
    served: dict[int, int] = field(default_factory=dict)
    polls: dict[Poll, SimPeer] = field(default_factory=dict)
    """Children's polls waiting at the desk."""
    lending: Lending | None = None
    id: str = TASK

    @property
    def done(self) -> set[int]:
        return self.held

    def full(self, now: float) -> bool:
        if self.desk is None:
            return self.link.load >= self.link.capacity
        return self.desk.full(self.link.load, now)


class SimPeer:
    """A peer's download, as the conductor runs its phases and the Swarming core."""

    def __init__(self, sim: Sim, node: Node, rng: random.Random) -> None:
        self.sim, self.node = sim, node
        settings = sim.settings.peer
        self.phases = Phases()
        self.swarm = Swarming(settings.concurrency, settings.per_parent, now=0.0)
        self.strategy = sim.plugins.strategy(settings.strategy)
        self.rng = rng
        self.finished: float | None = None
        self.tick_due = False
        self.reports: list[PieceReport] = []
        self.parents: dict[str, Node] = {}
        self.polls: dict[str, Poll] = {}
        """Our poll waiting at each seed's desk."""
        self.digests_at = -INF
        self.delivered: list[int] = []
        """Lent pieces read, to tell the seed with the next poll."""
        self.fetches: dict[int, list[Fetching]] = {}
        """Requests under way by piece (two or more only in the endgame)."""
        self.answered_at: dict[str, float] = {}
        """When each peer parent last answered our long-poll (``OFFER_GAP``)."""
        self.gapped: set[str] = set()
        """Peer parents whose news waits out ``OFFER_GAP``."""

    def start(self) -> None:
        self.phases.on("missing")
        schedule, _ = self.sim.decide(
            "register",
            lambda s: s.register(
                task_id=TASK, peer_id=self.node.peer_id, host=self.node.spec, now=self.sim.now
            ),
        )
        self.scheduled(schedule)
        self.sim.at(self.sim.now + TICK, self.periodic)
        self.sim.at(self.sim.now + REPORT_INTERVAL, self.flush)

    def scheduled(self, schedule: Schedule) -> None:
        """The registering and waiting phases: the schedule as the phases' event."""
        if schedule.action == "wait":
            step = self.phases.on("wait", seconds=(schedule.retry_after_ms or 200) / 1000)
            assert isinstance(step, Wait)
            self.sim.at(self.sim.now + step.seconds, self.ask_again)
            return
        if schedule.action == "parents":
            assert isinstance(self.phases.on("parents"), Swarm)
        self.adopt(schedule, exact=False)  # back_to_source: not modelled, it stops there

    def ask_again(self) -> None:
        schedule, _ = self.sim.decide(
            "reschedule",
            lambda s: s.reschedule(task_id=TASK, peer_id=self.node.peer_id, now=self.sim.now),
        )
        self.scheduled(schedule)

    def adopt(self, schedule: Schedule, *, exact: bool) -> None:
        if schedule.content is not None and self.swarm.book is None:
            count = schedule.content.piece_count
            self.swarm.book = PieceBook(count, strategy=self.strategy, rng=self.rng)
        self.take_push()
        if schedule.action == "parents":
            parents = {p.peer_id: p.type for p in schedule.parents}
            added = self.swarm.scheduled(
                parents, self.sim.now, retry_after_ms=schedule.retry_after_ms or 0, exact=exact
            )
            for parent_id in [p for p in self.parents if p not in self.swarm.parents]:
                self.unwatch(parent_id)
            for parent_id in added:
                parent = self.sim.nodes[parent_id]
                self.parents[parent_id] = parent
                parent.watchers[self] = None
                self.sim.at(self.sim.now + self.sim.net.latency, self.offer, parent)
        elif schedule.action == "back_to_source":
            raise SystemExit("simulate: a peer was sent to the origin (not modelled)")
        else:
            self.swarm.asked(self.sim.now)
        self.wake()

    def unwatch(self, parent_id: str) -> None:
        """The watcher is cancelled: its long-poll, and a seed's waiting poll, go with it."""
        node = self.parents.pop(parent_id, None)
        if node is not None:
            node.watchers.pop(self, None)
            self._withdraw(node)

    def _withdraw(self, node: Node) -> bool:
        poll = self.polls.pop(node.peer_id, None)
        if poll is None or node.polls.pop(poll, None) is None:
            return False
        assert node.desk is not None
        node.desk.withdraw(poll, self.sim.now)
        return True

    def offer(self, parent: Node, declined: int | None = None) -> None:
        """A parent's answer to our long-poll: all it holds, or, from a capped seed, a poll
        that waits at its desk (saying what we want, what we declined, what we read of what
        it lent us)."""
        if parent.peer_id not in self.swarm.parents or self.finished is not None:
            return
        if parent.desk is None:
            due = self.answered_at.get(parent.peer_id, -INF) + OFFER_GAP
            if self.sim.now < due:  # the conductor asks again only then
                if parent.peer_id not in self.gapped:
                    self.gapped.add(parent.peer_id)
                    self.sim.at(due, self._gap_over, parent)
                return
            self.answered_at[parent.peer_id] = self.sim.now
            self.swarm.offered(parent.peer_id, set(parent.held))
            self.wake()
        elif self.swarm.book is not None:
            if parent.lending is not None and self.delivered:
                parent.lending.said(self.delivered[:MAX_SAID])
            del self.delivered[:MAX_SAID]
            poll = Poll(parent, self.swarm.book.wanted(), self.node.peer_id)
            parent.desk.ask(poll, self.sim.now, declined)
            self.polls[parent.peer_id] = poll
            parent.polls[poll] = self
            self.sim.at(self.sim.now + SEED_POLL_WAIT, self.repoll, parent, poll)
            self.sim.dispatch(parent)

    def _gap_over(self, parent: Node) -> None:
        self.gapped.discard(parent.peer_id)
        self.offer(parent)

    def repoll(self, parent: Node, poll: Poll) -> None:
        """A seed's poll that got no answer in time: asked again with what we want now."""
        if self.polls.get(parent.peer_id) is poll and self._withdraw(parent):
            self.offer(parent)

    def answered(self, parent: Node, poll: Poll) -> None:
        """The desk's answer reaches us: a granted piece, or one lent to read ourselves."""
        assert parent.desk is not None
        if self.polls.get(parent.peer_id) is poll:
            del self.polls[parent.peer_id]
        parent.desk.withdraw(poll, self.sim.now)
        book = self.swarm.book
        assert book is not None
        declined = None
        if isinstance(poll.answer, Granted):
            number = poll.answer.number
            if number in book.done or (number in book.in_flight and not book.endgame):
                declined = number  # with the next poll
            else:
                self.swarm.offered(parent.peer_id, {number})
                self.wake()
        elif isinstance(poll.answer, Lent) and self.swarm.lent(poll.answer.number):
            self.read_lent(poll.answer.number)
        self.sim.at(self.sim.now + self.sim.net.latency, self.offer, parent, declined)

    def read_lent(self, number: int) -> None:
        size = self.sim.content.piece(number)[1]
        started = self.sim.now

        def arrived() -> None:
            self.sim.origin_bytes += size
            self.delivered.append(number)
            self.got(number, ORIGIN, started)

        self.sim.at(
            self.sim.now + self.sim.net.latency,
            self.sim.net.send, self.sim.origin, self.node.link, size, arrived,
        )  # fmt: skip

    def take_push(self) -> None:
        """The digests a schedule or a report's reply pushes, from the first piece whose
        digest we lack (``digests_from``)."""
        book = self.swarm.book
        if book is None:
            return
        offset = next((n for n, digest in enumerate(book.digests) if digest is None), None)
        if offset is None:
            return
        started = time.process_time()
        digests, _ = self.sim.scheduler.digest_page(TASK, offset, PUSHED_DIGESTS)
        self.sim.cpu += time.process_time() - started
        if digests:
            self.digests_at = self.sim.now
        for number, digest in enumerate(digests, offset):
            if digest is not None and book.digests[number] is None:
                book.digests[number] = digest

    def refresh_digests(self) -> None:
        """``Conductor._refresh_task``: the digests the scheduler knows, for the pieces we
        cannot verify yet (what a child fetches only once it can)."""
        book = self.swarm.book
        assert book is not None
        self.digests_at = self.sim.now
        self.sim.messages["task"] += 1
        known = self.sim.scheduler.task_info(TASK)[1]
        for number, digest in enumerate(known):
            if digest is not None and book.digests[number] is None:
                book.digests[number] = digest

    def wake(self) -> None:
        if not self.tick_due and self.finished is None:
            self.tick_due = True
            self.sim.at(self.sim.now, self.tick)

    def periodic(self) -> None:
        if self.finished is None:
            self.wake()
            self.sim.at(self.sim.now + TICK, self.periodic)

    def tick(self) -> None:
        self.tick_due = False
        if self.finished is not None or self.phases.phase != "swarming":
            return
        book = self.swarm.book
        self.swarm.take_offers()
        if book is not None and book.needs_digests():
            if self.sim.now >= self.digests_at + DIGEST_POLL:
                self.refresh_digests()
            else:
                self.sim.at(self.digests_at + DIGEST_POLL, self.wake)
        for decision in self.swarm.tick(self.sim.now):
            if isinstance(decision, Fetch):
                self.fetch(decision.number, self.parents[decision.parent_id])
            elif isinstance(decision, Drop):
                self.unwatch(decision.parent_id)
            elif isinstance(decision, Reschedule):
                blocklist = sorted(self.swarm.blocked(self.sim.now))
                bad = [(b["peer_id"], b["reason"]) for b in self.swarm.bad[-256:]]
                schedule, _ = self.sim.decide(
                    "reschedule",
                    lambda s, blocklist=blocklist, bad=bad: s.reschedule(
                        task_id=TASK,
                        peer_id=self.node.peer_id,
                        now=self.sim.now,
                        blocklist=blocklist,
                        bad_parents=bad,
                    ),
                )
                self.adopt(schedule, exact=True)

    def fetch(self, number: int, parent: Node) -> None:
        latency = self.sim.net.latency
        started = self.sim.now
        mine = Fetching(parent)
        self.fetches.setdefault(number, []).append(mine)

        def arrive() -> None:  # the request reaches the parent
            if mine.cancelled:
                return
            admission = parent.link.admission
            count = self.sim.content.piece_count
            held = admission.share(self.node.peer_id, len(self.node.held), count)
            if parent.desk is not None:
                parent.desk.taken(TASK, number)  # a granted request holds its place already
            if parent.full(self.sim.now):
                # A seed's places are its grants': nobody is displaced there.
                waiter = admission.displace(held) if parent.desk is None else None
                if waiter is None:
                    self.sim.at(self.sim.now + latency, self.busy, number, parent, mine)
                    return
                self.sim.at(self.sim.now + latency, waiter.refused)
            parent.served[number] = parent.served.get(number, 0) + 1
            size = self.sim.content.piece(number)[1]

            def delivered() -> None:
                admission.sent(self.node.peer_id)
                self._settled(number, mine)
                for other in self.fetches.pop(number, []):  # the endgame's other copies
                    self.cancel(number, other)
                self.got(number, parent.peer_id, started)

            def refused() -> None:
                if not mine.cancelled:  # else ``cancel`` settled it
                    parent.served[number] -= 1
                    self.busy(number, parent, mine)

            send = self.sim.net.send
            mine.transfer = send(parent.link, self.node.link, size, delivered, held, refused)
            self.sim.dispatch(parent)

        self.sim.at(self.sim.now + latency, arrive)

    def busy(self, number: int, parent: Node, mine: Fetching) -> None:
        if mine.cancelled:
            return
        self._settled(number, mine)
        self.swarm.failed(number, parent.peer_id, "busy", self.sim.now)
        self.wake()

    def _settled(self, number: int, mine: Fetching) -> None:
        fetching = self.fetches.get(number, [])
        if mine in fetching:
            fetching.remove(mine)
            if not fetching:
                del self.fetches[number]

    def cancel(self, number: int, other: Fetching) -> None:
        """As the conductor cancels the endgame copy that lost the race."""
        other.cancelled = True
        if other.transfer is not None:
            self.sim.net.cancel(other.transfer)
            other.parent.served[number] -= 1
        self.swarm.failed(number, other.parent.peer_id, "cancelled", self.sim.now)

    def got(self, number: int, parent_id: str, started: float) -> None:
        first = number not in self.node.held
        self.swarm.done(number, parent_id, self.sim.now)
        if first:
            self.node.held.add(number)
            cost = int((self.sim.now - started) * 1000)
            if parent_id == ORIGIN:  # lent: our digest, provisional until the seed reads it
                assert self.swarm.book is not None
                self.swarm.book.digests[number] = self.sim.digests[number]
                self.reports.append(PieceReport(number, self.sim.digests[number]))
            else:
                self.sim.bytes_p2p += self.sim.content.piece(number)[1]
                self.reports.append(PieceReport(number, None, parent_id, cost))
            for child in list(self.node.watchers):
                self.sim.at(self.sim.now + self.sim.net.latency, child.offer, self.node)
        if self.finished is not None:
            return  # the endgame's other copy of a piece, after the last one
        if self.swarm.complete:
            self.flush()
            self.finish(self.phases.on("complete"))
            self.finished = self.sim.now
            self.sim.decide(
                "result",
                lambda s: s.result(
                    task_id=TASK, peer_id=self.node.peer_id, success=True, now=self.sim.now
                ),
            )
            self.sim.done += 1
        else:
            self.wake()

    def finish(self, step: Step) -> None:
        """Verifying: every piece checked against the seed's digests (hashing is not
        modelled), so the whole file matches."""
        assert isinstance(step, Verify)
        assert self.swarm.book is not None and None not in self.swarm.book.digests
        assert isinstance(self.phases.on("matches"), Finish)

    def flush(self) -> None:
        if self.reports:
            reports, self.reports = self.reports, []
            self.sim.decide(
                "pieces",
                lambda s: s.report_pieces(
                    task_id=TASK, peer_id=self.node.peer_id, pieces=reports, now=self.sim.now
                ),
            )
            self.take_push()
        if self.finished is None:
            self.sim.at(self.sim.now + REPORT_INTERVAL, self.flush)


class Sim:
    def __init__(self, args: argparse.Namespace, settings: Any, plugins: Plugins) -> None:
        self.args, self.settings, self.plugins = args, settings, plugins
        self.now = 0.0
        self._events: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._seq = itertools.count()
        self.net = Network(self, args.latency)
        length = args.piece_length or piece_length_for(args.file_size)
        count = piece_count(args.file_size, length)
        # The whole file's digest known (swarm.py --mode digest) is what lets the seed lend.
        whole = "sha256:" + "0" * 64 if args.lending else None
        self.content = TaskContent(args.file_size, length, count, whole)
        self.digests = [hashlib.sha256(f"{n}".encode()).hexdigest() for n in range(count)]
        rng = random.Random(args.seed)
        evaluator = plugins.evaluator(settings.scheduler.evaluator)
        self.scheduler: Scheduler = core_for(
            settings.scheduler, evaluator, random.Random(rng.random())
        )
        self.messages: Counter[str] = Counter()
        self.cpu = 0.0
        self.decisions = 0
        self.done = 0
        self.bytes_p2p = 0
        self.origin_bytes = 0
        self.nodes: dict[str, Node] = {}
        waiting = 1 if args.seed_upload_rate else WAITING_PER_SLOT  # as UploadServer's superseed
        seed_link = Link.capped(args.seed_upload_rate, 0, settings.storage.upload_slots, waiting)
        # A host tells the scheduler its slots, and its load (PeerHost.host).
        seed_spec = HostSpec("storage-1", "10.0.0.1", 4000, "seed", upload_slots=seed_link.slots)
        self.seed = Node("seed-peer", seed_spec, seed_link)
        if args.seed_upload_rate:  # a capped seed super-seeds (PeerHost: superseed)
            self.seed.desk = GrantDesk(seed_link.capacity, GRANT_SECONDS)
            if args.lending:  # a known digest: the seed lends (Conductor._read_origin)
                self.seed.lending = Lending.for_origin(
                    count, length, settings.storage.origin_concurrency
                )
        self._ticking = False
        self._told: set[int] = set()
        """Lent pieces the seed told the scheduler of."""
        self.nodes[self.seed.peer_id] = self.seed
        self.origin = Link(args.origin_rate, 0, 1 << 30)
        self.peers: list[SimPeer] = []
        for n in range(args.peers):
            link = Link.capped(
                args.peer_upload_rate,
                args.download_rate,
                settings.peer.upload_slots,
                WAITING_PER_SLOT,
            )
            ip = f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"
            spec = HostSpec(f"host-{n}", ip, 4000, "normal", upload_slots=link.slots)
            node = Node(f"peer-{n}", spec, link)
            self.nodes[node.peer_id] = node
            self.peers.append(SimPeer(self, node, random.Random(rng.random())))

    def at(self, when: float, call: Callable[..., None], *args: Any) -> None:
        heapq.heappush(self._events, (when, next(self._seq), call, args))

    def decide(self, subject: str, call: Callable[[Scheduler], Any]) -> Any:
        """A request to the scheduler: counted, and its CPU measured."""
        self.messages[subject] += 1
        started = time.process_time()
        answer = call(self.scheduler)
        self.cpu += time.process_time() - started
        if subject in ("register", "reschedule"):
            self.decisions += 1
        return answer

    def start_seed(self) -> None:
        """The storage: registers as the seed and reads the origin in parallel ranges;
        lending, as ``Conductor._origin_lending`` runs its ``Lending``."""
        self.decide(
            "register",
            lambda s: s.register(
                task_id=TASK, peer_id=self.seed.peer_id, host=self.seed.spec, now=self.now,
                content=self.content, seed=True,
            ),
        )  # fmt: skip
        readers = min(self.settings.storage.origin_concurrency, self.content.piece_count)
        if self.seed.lending is None:
            queue = iter(range(self.content.piece_count))
            for _ in range(readers):
                self._seed_next(queue)
            return
        self._readers = readers
        for _ in range(readers):
            self._claim(self.now, self._reader_done)
        self.at(self.now + LEND_POLL, self._watch_lent)
        self.at(self.now + REPORT_INTERVAL, self._tell_lendings)

    def _tell_lendings(self) -> None:
        """The seed's report loop: the scheduler hears whom it lent which piece."""
        if lent := self._new_lendings():
            self.decide(
                "pieces",
                lambda s: s.report_pieces(
                    task_id=TASK, peer_id=self.seed.peer_id, pieces=[], now=self.now, lent=lent
                ),
            )
        if len(self.seed.held) < self.content.piece_count:
            self.at(self.now + REPORT_INTERVAL, self._tell_lendings)

    def _new_lendings(self) -> list[LendingReport]:
        lending = self.seed.lending
        if lending is None:
            return []
        lent = [LendingReport(n, c) for n, c in lending.lent_to.items() if n not in self._told]
        self._told.update(item.number for item in lent)
        return lent

    def _seed_next(self, queue: Any) -> None:
        number = next(queue, None)
        if number is not None:
            self._seed_read(number, lambda _: self._seed_next(queue))

    def _seed_read(self, number: int, then: Callable[[float], None]) -> None:
        """One piece from the origin to the seed; ``then`` with the seconds it took."""
        size = self.content.piece(number)[1]
        started = self.now

        def done() -> None:
            self.origin_bytes += size
            self._seed_has(number, self.digests[number])
            then(self.now - started)

        self.at(self.now + self.net.latency, self.net.send, self.origin, self.seed.link, size, done)

    def _seed_has(self, number: int, digest: str | None) -> None:
        self.seed.held.add(number)
        lent = self._new_lendings()
        self.decide(
            "pieces",
            lambda s: s.report_pieces(
                task_id=TASK, peer_id=self.seed.peer_id,
                pieces=[PieceReport(number, digest)], now=self.now, lent=lent,
            ),
        )  # fmt: skip
        for child in list(self.seed.watchers):
            if self.seed.desk is None:
                self.at(self.now + self.net.latency, child.offer, self.seed)
        self.dispatch(self.seed)

    # -- a lending seed (Conductor._origin_lending) --------------------------------------

    def _claim(self, since: float, then: Callable[[], None]) -> None:
        """One claiming worker's step: hold back, claim, read; ``then`` once nothing is left
        to claim."""
        lending = self.seed.lending
        assert lending is not None
        if lending.hold_back(since, self.now, self.seed.held, self.seed.served):
            self.at(self.now + 0.02, self._claim, since, then)
            return
        number = lending.claim(self.seed.held, self.now)
        if number is None:
            then()
            return

        def read(took: float) -> None:
            lending.read(number, took)
            self._claim(self.now, then)

        self._seed_read(number, read)

    def _reader_done(self) -> None:
        self._readers -= 1
        if self._readers == 0:
            lending = self.seed.lending
            assert lending is not None
            lending.open = False
            self._collect(self.now)

    def _collect(self, closed: float) -> None:
        """Children still ask: the swarm's uplinks are theirs a while longer."""
        lending = self.seed.lending
        assert lending is not None
        if lending.collecting(closed, self.now):
            self._claim(self.now, lambda: self.at(self.now + LEND_POLL, self._collect, closed))
        else:
            self._take_back()

    def _take_back(self) -> None:
        """What was lent comes back from the swarm's holders; what nobody delivered in time
        (or the holders lost), from the origin."""
        lending = self.seed.lending
        assert lending is not None
        if self.seed.held >= set(range(self.content.piece_count)):
            return
        found = set().union(*(p.node.held for p in self.peers))
        wanted = [n for n in lending.delivered - self.seed.held if n in found]
        if wanted:
            self._gather(wanted, self._take_back_after)
        elif not lending.waiting(self.seed.held, self.now):
            self._claim(self.now, self._take_back_after)
        else:
            self._take_back_after()

    def _take_back_after(self) -> None:
        lending = self.seed.lending
        assert lending is not None
        lending.unheld(set().union(*(p.node.held for p in self.peers)), self.now)
        self.at(self.now + LEND_POLL, self._take_back)

    def _gather(self, numbers: list[int], then: Callable[[], None]) -> None:
        """Pieces from the least loaded holder of each, ``concurrency`` at once."""
        queue = deque(numbers)
        running = [min(self.settings.peer.concurrency, len(queue))]

        def next_piece() -> None:
            if not queue:
                running[0] -= 1
                if running[0] == 0:
                    then()
                return
            number = queue[0]
            holders = [p.node for p in self.peers if number in p.node.held]
            holder = min(holders, key=lambda n: n.link.load)
            if holder.full(self.now):
                self.at(self.now + BUSY_BACKOFF, next_piece)
                return
            queue.popleft()
            holder.served[number] = holder.served.get(number, 0) + 1
            size = self.content.piece(number)[1]

            def arrived() -> None:
                self._seed_has(number, None)
                next_piece()

            self.at(
                self.now + self.net.latency,
                self.net.send, holder.link, self.seed.link, size, arrived,
                len(self.seed.held) / self.content.piece_count,
            )  # fmt: skip

        for _ in range(running[0]):
            next_piece()

    def _watch_lent(self) -> None:
        """The seed learns which lent pieces children delivered from the task's digests."""
        lending = self.seed.lending
        assert lending is not None
        if lending.outstanding:
            self.messages["task"] += 1
            lending.learned(self.scheduler.task_info(TASK)[1])
        if len(self.seed.held) < self.content.piece_count:
            self.at(self.now + LEND_POLL, self._watch_lent)

    def dispatch(self, node: Node) -> None:
        """``UploadServer._dispatch``: the desk's answers to waiting children; a lapsed
        grant frees its place (ticked while any wait)."""
        desk = node.desk
        if desk is None:
            return
        for poll in desk.dispatch(node.link.load, self.now):
            child = node.polls.pop(poll)
            self.at(self.now + self.net.latency, child.answered, node, poll)
            if isinstance(poll.answer, Granted):
                self.at(self.now + desk.lease, self.dispatch, node)
        if desk.waiting and not self._ticking:
            self._ticking = True
            self.at(self.now + GRANT_TICK, self._tick, node)

    def _tick(self, node: Node) -> None:
        self._ticking = False
        self.dispatch(node)

    def heartbeats(self) -> None:
        for node in self.nodes.values():
            self.decide(
                "heartbeat",
                lambda s, node=node: s.heartbeat(node.spec, node.link.load, self.now),
            )
        if self.done < len(self.peers):
            self.at(self.now + HEARTBEAT, self.heartbeats)

    def run(self, limit: float) -> None:
        self.heartbeats()
        self.start_seed()
        for peer in self.peers:
            self.at(self.args.startup, peer.start)
        while self._events and self.done < len(self.peers):
            when, _, call, args = heapq.heappop(self._events)
            if when > limit:
                raise SystemExit(f"simulate: not done after {limit:g} s of virtual time")
            self.now = when
            call(*args)


def bounds(args: argparse.Namespace) -> tuple[float, float]:
    """The lower bound, and the bound with the seed as the origin's only reader."""
    rates = (args.origin_rate, args.seed_upload_rate, args.peer_upload_rate, args.download_rate)
    return lower_bound(args.peers, args.file_size, *rates), seed_bound(
        args.peers, args.file_size, *rates
    )


def run_once(
    args: argparse.Namespace, settings: Any, plugins: Plugins, seed: int
) -> dict[str, Any]:
    args.seed = seed
    wall = time.perf_counter()
    sim = Sim(args, settings, plugins)
    bound, _ = bounds(args)
    sim.run(limit=max(600.0, 50 * bound))
    times = [p.finished for p in sim.peers if p.finished is not None]
    if len(times) != len(sim.peers):  # a model that stops early flatters the swarm
        raise SystemExit(f"simulate: {len(sim.peers) - len(times)} peers did not finish")
    max_s = max(times)
    span = max_s or 1.0
    return {
        "seed": seed,
        "finished": len(times),
        "p50_s": round(percentile(times, 50), 4),
        "p99_s": round(percentile(times, 99), 4),
        "max_s": round(max_s, 4),
        "ratio": round(max_s / bound, 4),
        "origin_ratio": round(sim.origin_bytes / args.file_size, 4),
        "seed_uploads": sim.seed.link.sent // sim.content.piece_length,
        "lent": len(sim.seed.lending.pending) if sim.seed.lending else 0,
        "messages_per_peer_s": {
            k: round(v / len(sim.peers) / span, 3) for k, v in sorted(sim.messages.items())
        },
        "decisions": sim.decisions,
        "scheduler_cpu_per_decision_ms": round(sim.cpu / max(1, sim.decisions) * 1000, 4),
        "scheduler_cpu_s": round(sim.cpu, 3),
        "wall_s": round(time.perf_counter() - wall, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_swarm_flags(parser)
    parser.add_argument("--latency", type=float, default=0.0005, help="per request, s")
    parser.add_argument(
        "--startup",
        type=float,
        default=0.0,
        help="s before the peers register (swarm.py counts its gets' start-up: get_startup_s)",
    )
    parser.add_argument("--piece-length", type=size_arg, help="default: from F, as the peer")
    parser.add_argument(
        "--no-lending",
        dest="lending",
        action="store_false",
        help="the seed lends nothing (bench/swarm.py --mode no-digest)",
    )
    parser.add_argument("--runs", type=int, default=3, help="seeds 1..runs (default 3)")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    add_env_flag(parser, "a SWARMFLY_* setting of the cores (repeatable), as swarm.py's")
    args = parser.parse_args()
    out = Out(args.json)
    settings = swarmfly_config.load(env=env_pairs(parser, args.env))
    plugins = Plugins.load(settings.disable_plugins)
    bound, bound_seed = bounds(args)
    runs = []
    for seed in range(1, args.runs + 1):
        out.progress(f"run {seed}: {args.peers} peers")
        runs.append(run_once(args, settings, plugins, seed))
    keys = (
        "p50_s",
        "p99_s",
        "max_s",
        "ratio",
        "origin_ratio",
        "scheduler_cpu_per_decision_ms",
        "wall_s",
    )
    med = {k: median([r[k] for r in runs]) for k in keys}
    out.say(
        table(
            ["run", *keys],
            [[r["seed"], *(r[k] for k in keys)] for r in runs]
            + [["median", *(med[k] for k in keys)]],
        )
    )
    out.say(f"bound {bound:.3f} s (seed only: {bound_seed:.3f} s)")
    out.say(f"control messages per peer per s (run {runs[-1]['seed']}):")
    out.say(table(["subject", "rate"], list(runs[-1]["messages_per_peer_s"].items())))
    out.result({
        "peers": args.peers, "tasks": 1, "file_bytes": args.file_size, "bound_s": round(bound, 4),
        "bound_seed_s": round(bound_seed, 4), "lending": args.lending, **med,
        "ratio_seed_only": round(med["max_s"] / bound_seed, 4),
        "messages_per_peer_s": runs[-1]["messages_per_peer_s"], "runs": runs,
    })  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
