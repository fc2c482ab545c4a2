"""The scheduler's pure core: task, peer and piece bookkeeping and parent choice.

No asyncio, NATS or clock here: every entry point takes ``now`` and returns decisions and
effects, so unit tests and the simulator drive it directly. All state is soft: it can be
rebuilt from what peers re-register.

One module, over 1,000 lines, on purpose: every decision reads the same tables (tasks, peers,
hosts, loads) and keeps one set of invariants over them (a peer's pieces, its parents, the
seed's children, the blocklists), which the property tests check as a whole; the parts that
stand alone are apart already (``leases``, ``pieceset``, the evaluator plugin).
"""

from __future__ import annotations

import itertools
import math
import random
import re
import statistics
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal

from swarmfly.content import TaskContent, piece_count
from swarmfly.errors import SwarmflyError
from swarmfly.frozen import quick_init
from swarmfly.httpheaders import http_url
from swarmfly.placement import rendezvous
from swarmfly.plugintypes import Candidate, Evaluation, Evaluator
from swarmfly.services.scheduler.pieceset import PieceSet

Action = Literal["parents", "back_to_source", "wait"]
PeerState = Literal["running", "succeeded", "failed"]

FILTER_LIMIT = 15
"""Candidates scored per decision (Dragonfly's filterParentLimit): bounds a decision's cost.
bench/simulate.py measured 40 against 15 at 100 and 1,000 peers: the same swarm times
(ratio 1.298 / 1.297 at 100, 1.335 / 1.322 at 1,000), half the scheduler CPU per decision."""
SAMPLE_SIZE = 160
"""Peers of a task drawn at random as a decision's candidates (all of them in a smaller
swarm), of which the first FILTER_LIMIT eligible are scored: what a decision costs stays the
same however large the swarm grows."""
COST_SAMPLES = 20
WAIT_MS = 50
MAX_WAIT_MS = 2000
WAITERS_PER_WAIT = 64
"""A task's peers told to wait come back after WAIT_MS each per this many of them (at most
MAX_WAIT_MS): what waiting costs the scheduler stays bounded however large the swarm."""
RESCHEDULE_PEERS = 2000
MAX_RESCHEDULE_MS = 10_000
"""Past RESCHEDULE_PEERS peers in a task, a child is told to ask for fresh parents once a
second per that many of them (at most MAX_RESCHEDULE_MS; sooner when a parent fails): the
task's reschedules cost the scheduler about RESCHEDULE_PEERS decisions a second at most.
Fresh parents are how a large swarm's children find the few holders of a new piece while it
ramps up: bench/simulate.py at 10,000 peers, 1,000: ratio 1.314 at 0.15 reschedules per
peer per second; 2,000: 1.283 at 0.24 (0.28 ms of scheduler CPU each)."""
SEED_CHILDREN = 64
"""Running children a source is offered to at a time: a seed's uplink serves a bounded few,
which trade what it sends with everyone else, and its grant polls stay bounded too."""
LAGGARD_SHARE = 0.9
"""A child holding less than this share of what its candidate parents hold on average is
behind the swarm: it is offered ``LAGGARD_PARENTS`` times the parents. Its share of each
parent's uplink is everyone's, so without more parents it stays behind, and the swarm's last
peer sets when the swarm is done (bench/simulate.py, 4 parents: ratio 1.51 -> 1.32 at 1,000
peers, 1.70 -> 1.37 at 16)."""
LAGGARD_PARENTS = 2
BLOCK_SECONDS = 30.0
"""How long a parent a child reported failed or slow stays out of that child's parents."""
SEED_PARENTS = 8
"""Holders offered to a seed that takes over a task: enough to cover what the swarm has."""
REFUSED = 1
NO_ORIGIN = 2
OWN_ORIGIN = frozenset({3, 4, 5})
"""Dragonfly's priority levels (dfget --priority, common.json ``source.priority``) where they
differ from the default, as its scheduler reads them for a task with no source yet: LEVEL1
is refused; LEVEL2 may not read the origin (refused unless the swarm has a source); LEVEL3-5
read it themselves, no seed asked (the service passes those only for a task keyed by its
whole file's digest). LEVEL0 and LEVEL6 ask a storage seed, as every request did before
priorities (Dragonfly's weak, strong and super seeds are one kind here)."""


@dataclass(slots=True)
class Host:
    id: str
    ip: str
    port: int
    type: str
    idc: str = ""
    location: str = ""
    upload_slots: int = 64
    uploads: int = 0
    last_seen: float = 0.0

    @property
    def address(self) -> str:
        return http_url(self.ip, self.port)


@dataclass(slots=True)
class Peer:
    id: str
    task_id: str
    host_id: str
    seed: bool = False
    back_to_source: bool = False
    state: PeerState = "running"
    pieces: PieceSet = field(default_factory=PieceSet)
    parents: list[str] = field(default_factory=list)
    blocklist: dict[str, float] = field(default_factory=dict)
    """Parents this child will not use, until when: a parent that failed may recover, one
    that served corrupt bytes is out for good (``Task.bad_parents``)."""
    costs: deque[int] | None = None
    """The last COST_SAMPLES piece costs children reported of it; made at the first (an
    empty deque is 760 B, and most peers of a large swarm never serve)."""
    mean_cost_ms: float | None = None
    slow: bool = False
    """Its last piece cost far above its own mean (Dragonfly's bad-parent rule), judged when
    a cost arrives rather than for every candidate of every decision."""
    updated_at: float = 0.0
    origin_bytes: int = 0
    p2p_bytes: int = 0
    """Bytes of the pieces this peer reported, by where it got them (a report without a
    parent is an origin read); pieces it only announced from its cache are in neither."""

    @property
    def is_source(self) -> bool:
        """Reads the origin, so it will hold every piece."""
        return self.seed or self.back_to_source


@dataclass
class Suspicion:
    """Children could not reach a seed: it may have died."""

    since: float
    reporters: set[str] = field(default_factory=set)


DIGEST_SIZE = 32
_ABSENT = bytes(DIGEST_SIZE)
_HEX = re.compile(r"[0-9a-f]*")


class PieceDigests:
    """Piece number -> sha256 (hex at the edges), 32 bytes a piece in one bytearray: a
    scheduler keeps every piece digest of every task it holds, and a hex string in a dict
    took about six times that. An all-zero entry is no digest (no data hashes to it)."""

    __slots__ = ("_raw",)

    def __init__(self) -> None:
        self._raw = bytearray()

    def get(self, number: int) -> str | None:
        start = number * DIGEST_SIZE
        entry = self._raw[start : start + DIGEST_SIZE]
        return entry.hex() if len(entry) == DIGEST_SIZE and entry != _ABSENT else None

    def __getitem__(self, number: int) -> str:
        digest = self.get(number)
        if digest is None:
            raise KeyError(number)
        return digest

    def __contains__(self, number: int) -> bool:
        return self.get(number) is not None

    def page(self, offset: int, limit: int) -> list[str | None]:
        """Up to ``limit`` digests from ``offset``, ending at the last one known (empty when
        none is): what a peer that lacks them from there is told."""
        start = offset * DIGEST_SIZE
        raw = bytes(self._raw[start : start + limit * DIGEST_SIZE]).rstrip(b"\0")
        count = -(-len(raw) // DIGEST_SIZE)
        entries = [raw[n * DIGEST_SIZE : (n + 1) * DIGEST_SIZE] for n in range(count)]
        return [e.ljust(DIGEST_SIZE, b"\0").hex() if e.strip(b"\0") else None for e in entries]

    def __setitem__(self, number: int, digest: str) -> None:
        entry = bytes.fromhex(digest)
        if len(entry) != DIGEST_SIZE or entry == _ABSENT:
            raise ValueError("not a sha256 digest")
        start = number * DIGEST_SIZE
        if len(self._raw) < start + DIGEST_SIZE:
            self._raw.extend(bytes(start + DIGEST_SIZE - len(self._raw)))
        self._raw[start : start + DIGEST_SIZE] = entry


@dataclass(slots=True)
class Task:
    id: str
    content: TaskContent | None = None
    """As the task's trusted reader stated it; nobody else's word sets it."""
    digests: PieceDigests = field(default_factory=PieceDigests)
    """Per piece, the sha256 its trusted reader computed, or (``provisional``) the one the
    child a seed lent the piece to reported."""
    provisional: dict[int, str] = field(default_factory=dict)
    """Piece -> the lent child whose digest stands until a trusted reader confirms it. Only
    where the whole file has a known digest, so every child still proves what it delivers."""
    lent: dict[int, str] = field(default_factory=dict)
    """Piece -> the child its seed said it lent the piece to: the only other peer whose
    digest of that piece is heard."""
    claims: dict[int, dict[str, str]] = field(default_factory=dict)
    """Digests children reported for origin reads before their seed said it lent them."""
    peers: dict[str, Peer] = field(default_factory=dict)
    bad_parents: set[str] = field(default_factory=set)
    seed_requested_at: float | None = None
    seed_host: str | None = None
    """The storage instance last asked to seed the task (None: none known when asked)."""
    failed_seeds: set[str] = field(default_factory=set)
    """Storage hosts that failed this task or went away while seeding it."""
    suspects: dict[str, Suspicion] = field(default_factory=dict)
    """Seed peers children reported failed since they last delivered a piece."""
    seed_failed: bool = False
    sources: dict[str, Peer] = field(default_factory=dict)
    """Its peers that read the origin (``Peer.is_source``): the few every decision asks about."""
    order: list[str] = field(default_factory=list)
    """Its peer ids, in no particular order, to draw candidates from (``slot`` indexes it)."""
    slot: dict[str, int] = field(default_factory=dict)
    updated_at: float = 0.0
    """When one of its peers last spoke: most recently active tasks are shown first."""
    load: dict[str, int] = field(default_factory=dict)
    """Parent id -> running children sent to it: its load before its heartbeat says so (kept
    for a parent that left while children still name it: it may come back, under its id)."""

    def add(self, peer: Peer) -> None:
        self.peers[peer.id] = peer
        self.slot[peer.id] = len(self.order)
        self.order.append(peer.id)

    def remove(self, peer: Peer) -> None:
        """Forget the peer (a swap with the last id: no shifting a long list)."""
        self.peers.pop(peer.id, None)
        self.sources.pop(peer.id, None)
        index = self.slot.pop(peer.id, None)
        if index is None:
            return
        last = self.order.pop()
        if last != peer.id:
            self.order[index] = last
            self.slot[last] = index

    def assign(self, child: Peer, parents: list[str]) -> None:
        """The child's parents now; the load they count is of running children only."""
        if child.state == "running":
            self._count(child.parents, -1)
            self._count(parents, 1)
        child.parents = parents

    def resume(self, peer: Peer) -> None:
        """The peer runs (again, after a failure or success): its parents count it now."""
        if peer.state != "running":
            peer.state = "running"
            self._count(peer.parents, 1)

    def retire(self, peer: Peer, state: PeerState) -> None:
        """The peer is done, or failed: it asks its parents for nothing any more."""
        self.assign(peer, [])
        peer.state = state

    def _count(self, parents: list[str], step: int) -> None:
        for parent_id in parents:
            left = self.load.get(parent_id, 0) + step
            if left > 0:
                self.load[parent_id] = left
            else:
                self.load.pop(parent_id, None)


@quick_init
@dataclass(frozen=True, slots=True)
class ParentInfo:
    peer_id: str
    host_id: str
    address: str
    type: str


@quick_init
@dataclass(frozen=True, slots=True)
class Schedule:
    action: Action
    parents: tuple[ParentInfo, ...] = ()
    content: TaskContent | None = None
    retry_after_ms: int | None = None


@quick_init
@dataclass(frozen=True, slots=True)
class TriggerSeed:
    """Effect: ask a storage instance to fetch this task from the origin; ``host_id`` None
    when no storage host is known (the adapter may wait for one to say hello, then reports
    ``seed_unavailable``)."""

    task_id: str
    host_id: str | None = None


@quick_init
@dataclass(frozen=True, slots=True)
class HostSpec:
    id: str
    ip: str
    port: int
    type: str
    idc: str = ""
    location: str = ""
    upload_slots: int = 64


@quick_init
@dataclass(frozen=True, slots=True)
class PieceReport:
    number: int
    digest: str | None = None
    parent_id: str | None = None
    cost_ms: int | None = None


@quick_init
@dataclass(frozen=True, slots=True)
class Lending:
    """A seed lent ``number`` to ``peer_id``, a child, to read from the origin."""

    number: int
    peer_id: str


class Scheduler:
    """Bookkeeping for every task and host this scheduler owns."""

    def __init__(
        self,
        *,
        candidate_parents: int = 4,
        host_ttl: float = 15.0,
        seed_timeout: float = 30.0,
        seed_silence: float = 5.0,
        acyclic: bool = False,
        evaluator: Evaluator,
        rng: random.Random | None = None,
    ) -> None:
        self.candidate_parents = candidate_parents
        self.host_ttl = host_ttl
        self.seed_timeout = seed_timeout
        self.seed_silence = seed_silence
        """A seed its children cannot reach counts as dead once its host has also been
        silent this long (about one heartbeat): sooner than host_ttl, and a seed that only
        one child cannot reach, or that is merely busy, keeps heartbeating."""
        self.acyclic = acyclic
        """Never offer a descendant as a parent (Dragonfly's DAG). Off by default: pieces
        then flow one way only, and the peers that joined first can get the pieces their
        descendants hold from nothing but the seed, whose uplink is the scarcest (measured
        with bench/swarm.py: 56 extra seed uploads to one root peer, twice the time)."""
        self.evaluator = evaluator
        self.rng = rng or random.Random(0)
        self.hosts: dict[str, Host] = {}
        """In the order they were last seen (a heartbeat or a registration moves a host to the
        end): expiry looks at the stale front only, not at every host."""
        self._seeds: dict[str, None] = {}
        """The storage hosts among ``hosts``."""
        self.homes_known = True
        """False while the storage hosts known may not be all of them (a scheduler that just
        started has not had every heartbeat yet): no task gets a home then, for the one
        chosen might not be the instance whose cache holds it. Its peers wait; a cached copy
        that announces itself meanwhile takes the vacant seat."""
        self.tasks: dict[str, Task] = {}
        self.peers: dict[str, Peer] = {}
        self.host_peers: dict[str, set[str]] = {}
        """Host -> its peers' ids: a host that leaves costs what it had, not every peer."""

    # -- hosts ---------------------------------------------------------------------------

    def heartbeat(self, spec: HostSpec, uploads: int, now: float) -> bool:
        """Record a host as alive; False tells it the scheduler has no state for it."""
        known = spec.id in self.hosts
        host = self._upsert_host(spec, now)
        host.uploads = uploads
        return known

    def expire(self, now: float) -> list[str]:
        """Drop hosts whose heartbeats stopped, with all their peers; they are never offered."""
        dead = list(itertools.takewhile(
            lambda h: now - self.hosts[h].last_seen > self.host_ttl, self.hosts
        ))  # fmt: skip
        for host_id in dead:
            self.leave(host_id, None)
        return dead

    def leave(self, host_id: str, peer_ids: Iterable[str] | None) -> None:
        """A host leaves (peer_ids None) or some of its peers leave their tasks."""
        if peer_ids is None:
            self.hosts.pop(host_id, None)
            self._seeds.pop(host_id, None)
            peer_ids = list(self.host_peers.get(host_id, ()))
        for peer_id in list(peer_ids):
            peer = self.peers.get(peer_id)
            if peer is None or peer.host_id != host_id:
                continue
            self._remove_peer(peer)

    # -- tasks and peers -----------------------------------------------------------------

    def register(
        self,
        *,
        task_id: str,
        peer_id: str,
        host: HostSpec,
        now: float,
        pieces: Iterable[int] = (),
        content: TaskContent | None = None,
        seed: bool = False,
        priority: int = 0,
    ) -> tuple[Schedule, list[TriggerSeed]]:
        """A peer joins a task (or rejoins with what it holds); answer where to download.
        ``priority`` (``OWN_ORIGIN``) counts at registration only: a child told to wait
        asks again as any other does."""
        if priority == REFUSED and not seed:
            raise SwarmflyError("forbidden", "priority LEVEL1: this download is refused")
        self._upsert_host(host, now)
        peer = self.peers.get(peer_id)
        if peer is not None and (peer.task_id != task_id or peer.host_id != host.id):
            raise SwarmflyError("conflict", f"peer {peer_id} belongs to another task or host")
        task = self.tasks.get(task_id)
        if content is not None:
            _check_layout(content)
            if task is not None and task.content is not None:
                _check_same_layout(task.content, content)
        if task is None:
            task = self.tasks[task_id] = Task(task_id)
        if peer is None:
            peer = self.peers[peer_id] = Peer(peer_id, task_id, host.id)
            task.add(peer)
            self.host_peers.setdefault(host.id, set()).add(peer_id)
        peer.updated_at = task.updated_at = now
        task.resume(peer)
        # Only a storage host seeds; anyone else asking to is an ordinary child.
        peer.seed = peer.seed or (seed and host.type == "seed")
        if peer.seed:
            task.sources[peer.id] = peer
        held = self._valid_pieces(task, pieces)
        if peer.seed:
            self._claim_seat(task, peer)
        if content is not None and self._trusted(task, peer):
            self._set_content(task, content)
        self._add_pieces(task, peer, held)
        if peer.seed:
            return self._seed_schedule(task, peer, now), []
        # A peer that holds all of what it says the task is needs nothing: it only announces.
        if self._complete(task, peer) or (
            task.content is None and content is not None and len(held) >= content.piece_count
        ):
            return Schedule("parents", content=task.content), []
        if (priority == NO_ORIGIN or priority in OWN_ORIGIN) and not self._served(task, now):
            # Nothing serves the task yet: no seed asked for this child, which reads the
            # origin itself (LEVEL3-5) or, LEVEL2, is refused rather than sent there.
            return self._schedule(task, peer, now, may_read_origin=priority != NO_ORIGIN), []
        effects = self._seed_effects(task, now)
        return self._schedule(task, peer, now), effects

    def seed_unavailable(
        self, task_id: str, host_id: str | None = None, now: float = 0.0
    ) -> list[TriggerSeed]:
        """The storage instance asked (if any) did not take the task: ask the next one in
        rendezvous order; with none left, peers go back to source instead of waiting. None
        asked (no home was chosen yet): a seed that took the seat meanwhile keeps it."""
        task = self.tasks.get(task_id)
        if task is None:
            return []
        if host_id is not None:
            task.failed_seeds.add(host_id)
        elif task.seed_host is not None and self._seated(task, task.seed_host):
            return []
        task.seed_requested_at = task.seed_host = None
        if self.homes_known and self._next_seed_host(task) is None:
            task.seed_failed = True
            return []
        return self._seed_effects(task, now)

    def seed_hosts(self) -> list[str]:
        """Storage instances alive as far as heartbeats tell."""
        return list(self._seeds)

    def drop_tasks(self, task_ids: Iterable[str]) -> None:
        """Forget tasks (their partition moved to another scheduler); hosts stay."""
        for task_id in list(task_ids):
            task = self.tasks.pop(task_id, None)
            if task is not None:
                for peer in task.peers.values():
                    self._forget(peer)

    def report_pieces(
        self,
        *,
        task_id: str,
        peer_id: str,
        pieces: Iterable[PieceReport],
        now: float,
        content: TaskContent | None = None,
        lent: Iterable[Lending] = (),
    ) -> None:
        """Record verified pieces. A digest counts only from the task's trusted reader, or,
        provisionally, from the child its seed lent that piece to; from anyone else it must
        match what is known. A bad batch changes nothing."""
        task, peer = self._lookup(task_id, peer_id)
        trusted = self._trusted(task, peer)
        if content is not None:
            _check_layout(content)
            if trusted:
                self._set_content(task, content)
            elif task.content is not None:
                _check_same_layout(task.content, content)
        peer.updated_at = task.updated_at = now
        reports = list(pieces)
        lendings = list(lent) if trusted and peer.seed else []
        digests: dict[int, str] = {}
        """What the batch sets, applied only once all of it checked out."""
        provisional = dict(task.provisional)
        claims: dict[int, str] = {}
        for report in reports:
            if task.content is not None and report.number >= task.content.piece_count:
                raise SwarmflyError(
                    "bad_request",
                    f"piece {report.number} out of range (task has {task.content.piece_count})",
                    path="data.pieces",
                )
            if report.digest is not None and not _is_digest(report.digest):
                raise SwarmflyError(
                    "bad_request", f"piece {report.number}: not a sha256 digest", path="data.pieces"
                )
            known = digests.get(report.number) or task.digests.get(report.number)
            if report.digest is None:
                if known is None:
                    raise SwarmflyError(
                        "conflict", f"piece {report.number} has no digest yet: cannot be finished"
                    )
            elif trusted and report.number in provisional:
                del provisional[report.number]  # confirmed, or the lent child lied
                digests[report.number] = report.digest
            elif known is None and trusted:
                digests[report.number] = report.digest
            elif known is None:
                claims[report.number] = report.digest
            elif known != report.digest:
                raise SwarmflyError(
                    "conflict",
                    f"piece {report.number} digest differs from the one already reported",
                )
        # Checked whole: from here on the batch is applied.
        for number in task.provisional:
            if number not in provisional and digests[number] != task.digests[number]:
                self._refute(task, number)
        for number, digest in digests.items():
            task.digests[number] = digest
        task.provisional = provisional
        for lending in lendings:
            self._lend(task, lending)
        held = {r.number for r in reports if r.number not in claims}
        for number, digest in claims.items():
            task.claims.setdefault(number, {})[peer.id] = digest
            if self._confirm_claim(task, number, peer.id):
                held.add(number)
        if task.content is not None:
            for report in reports:
                if report.number not in held or report.number in peer.pieces:
                    continue
                size = task.content.piece(report.number)[1]
                if report.parent_id is None:
                    peer.origin_bytes += size
                else:
                    peer.p2p_bytes += size
        self._add_pieces(task, peer, held)
        timed: dict[str, Peer] = {}
        for report in reports:
            if report.parent_id is not None:
                task.suspects.pop(report.parent_id, None)  # it delivers: alive
            if report.cost_ms is not None and report.parent_id is not None:
                parent = self.peers.get(report.parent_id)
                if parent is not None:
                    if parent.costs is None:
                        parent.costs = deque(maxlen=COST_SAMPLES)
                    parent.costs.append(report.cost_ms)
                    timed[parent.id] = parent
        for parent in timed.values():
            assert parent.costs is not None
            parent.mean_cost_ms = math.fsum(parent.costs) / len(parent.costs)
            parent.slow = _slow(parent.costs)

    def reschedule(
        self,
        *,
        task_id: str,
        peer_id: str,
        now: float,
        blocklist: Iterable[str] = (),
        bad_parents: Iterable[tuple[str, str]] = (),
    ) -> tuple[Schedule, list[TriggerSeed]]:
        """New parents for a child whose parents failed, were slow or served corrupt bytes."""
        task, peer = self._lookup(task_id, peer_id)
        peer.updated_at = task.updated_at = now
        until = now + BLOCK_SECONDS
        for blocked in blocklist:
            peer.blocklist[blocked] = max(peer.blocklist.get(blocked, 0.0), until)
        for bad_id, reason in bad_parents:
            peer.blocklist[bad_id] = max(peer.blocklist.get(bad_id, 0.0), until)
            if reason == "corrupt":
                task.bad_parents.add(bad_id)
            bad = task.peers.get(bad_id)
            if reason == "failed" and bad is not None and bad.seed and bad.state != "failed":
                task.suspects.setdefault(bad_id, Suspicion(now)).reporters.add(peer.id)
        if peer.seed:
            return self._seed_schedule(task, peer, now), []
        effects = self._seed_effects(task, now)
        return self._schedule(task, peer, now), effects

    def result(self, *, task_id: str, peer_id: str, success: bool, now: float) -> None:
        task, peer = self._lookup(task_id, peer_id)
        peer.updated_at = task.updated_at = now
        if success:
            if task.content is not None and len(peer.pieces) < task.content.piece_count:
                raise SwarmflyError(
                    "conflict",
                    f"peer reported {len(peer.pieces)} of {task.content.piece_count} pieces",
                )
            task.retire(peer, "succeeded")
        else:
            task.retire(peer, "failed")
            if peer.seed:
                task.failed_seeds.add(peer.host_id)
            if peer.is_source and not any(p.state != "failed" for p in task.sources.values()):
                # The origin read failed: let the next request trigger a seed again.
                task.seed_requested_at = task.seed_host = None

    def task_info(self, task_id: str) -> tuple[TaskContent | None, list[str | None]]:
        task = self.tasks.get(task_id)
        if task is None or task.content is None:
            return None, []
        return task.content, [task.digests.get(i) for i in range(task.content.piece_count)]

    def digest_page(
        self, task_id: str, offset: int, limit: int
    ) -> tuple[list[str | None], list[int]]:
        """``PieceDigests.page`` of the task, and which of those pieces are provisional."""
        task = self.tasks.get(task_id)
        if task is None or task.content is None:
            return [], []
        limit = max(0, min(limit, task.content.piece_count - offset))
        digests = task.digests.page(offset, limit)
        end = offset + len(digests)
        return digests, sorted(n for n in task.provisional if offset <= n < end)

    def provisional(self, task_id: str) -> list[int]:
        """Pieces whose digest only a lent child vouches for so far."""
        task = self.tasks.get(task_id)
        return sorted(task.provisional) if task is not None else []

    # -- internals -----------------------------------------------------------------------

    def _upsert_host(self, spec: HostSpec, now: float) -> Host:
        host = self.hosts.pop(spec.id, None)
        if host is None:
            host = Host(spec.id, spec.ip, spec.port, spec.type)
        self.hosts[spec.id] = host  # last seen now: at the end
        if spec.type == "seed":
            self._seeds[spec.id] = None
        else:
            self._seeds.pop(spec.id, None)
        host.ip, host.port, host.type = spec.ip, spec.port, spec.type
        host.idc, host.location, host.upload_slots = spec.idc, spec.location, spec.upload_slots
        host.last_seen = now
        return host

    def _lookup(self, task_id: str, peer_id: str) -> tuple[Task, Peer]:
        peer = self.peers.get(peer_id)
        if peer is None or peer.task_id != task_id:
            raise SwarmflyError("not_found", f"peer {peer_id} is not registered for this task")
        return self.tasks[task_id], peer

    def _trusted(self, task: Task, peer: Peer) -> bool:
        """The task's trusted reader: the peer the scheduler sent back to source, or the seed
        on the storage host that holds the task's seat (``_claim_seat``). Only its word sets
        the content and the digests."""
        if peer.back_to_source:
            return True
        return peer.seed and task.seed_host == peer.host_id and peer.state != "failed"

    def _seated(self, task: Task, host_id: str) -> bool:
        """Has ``host_id`` a live seed in the task?"""
        return any(p.seed and p.host_id == host_id and self._alive(p) for p in task.peers.values())

    def _claim_seat(self, task: Task, seed: Peer) -> None:
        """A storage host seeding the task takes its seat when the seat is free: nobody was
        asked, or the host asked is gone or failed it, and has no live seed in the task. A
        host asked to seed keeps its seat while it serves; one that failed the task (or was
        asked and never answered) never takes it."""
        holder = task.seed_host
        if holder == seed.host_id or seed.host_id in task.failed_seeds:
            return
        vacant = holder is None or holder not in self.hosts or holder in task.failed_seeds
        if vacant and not (holder is not None and self._seated(task, holder)):
            task.seed_host = seed.host_id

    def _set_content(self, task: Task, content: TaskContent) -> None:
        if task.content is None:
            task.content = content
            self._drop_out_of_range(task)
        else:
            _check_same_layout(task.content, content)

    def _drop_out_of_range(self, task: Task) -> None:
        """Pieces registered before the size was known that the task does not have."""
        assert task.content is not None
        limit = task.content.piece_count
        for peer in task.peers.values():
            peer.pieces -= [n for n in peer.pieces if n >= limit]

    def _lend(self, task: Task, lending: Lending) -> None:
        """The seed's word that it lent a piece. It stands for a child not registered here
        yet: after a partition moved, the seed tells its loans to the new holder once,
        often before the child it lent them to has come back, whose digests of them would
        otherwise never count (the pieces unknown to the swarm, read again by a seed that
        takes over)."""
        child = task.peers.get(lending.peer_id)
        if (child is not None and child.is_source) or lending.number in task.digests:
            return
        if task.content is None or not task.content.digest:
            return  # nothing could prove a lent reader's digest: its word is not taken
        if lending.number >= task.content.piece_count:
            return
        task.lent[lending.number] = lending.peer_id
        self._confirm_claim(task, lending.number, lending.peer_id)

    def _confirm_claim(self, task: Task, number: int, peer_id: str) -> bool:
        """A lent child's digest of its lent piece stands, provisionally, once both its report
        and its seed's word that it lent the piece have arrived."""
        digest = task.claims.get(number, {}).get(peer_id)
        if digest is None or task.lent.get(number) != peer_id or number in task.digests:
            return False
        task.digests[number] = digest
        task.provisional[number] = peer_id
        del task.claims[number]
        peer = task.peers.get(peer_id)
        if peer is not None:
            self._add_pieces(task, peer, {number})
        return True

    def _refute(self, task: Task, number: int) -> None:
        """The trusted reader read a lent piece and got other bytes: its lent child lied. It
        is never offered again, and nobody who took the piece on its word holds it."""
        liar = task.provisional.get(number) or task.lent.get(number)
        if liar is not None:
            task.bad_parents.add(liar)
        for peer in task.peers.values():
            if number in peer.pieces and not self._trusted(task, peer):
                peer.pieces.discard(number)

    def _valid_pieces(self, task: Task, pieces: Iterable[int]) -> set[int]:
        limit = task.content.piece_count if task.content else None
        return {n for n in pieces if limit is None or n < limit}

    def _complete(self, task: Task, peer: Peer) -> bool:
        return task.content is not None and len(peer.pieces) >= task.content.piece_count

    def _add_pieces(self, task: Task, peer: Peer, pieces: set[int]) -> None:
        peer.pieces |= pieces

    def _forget(self, peer: Peer) -> None:
        self.peers.pop(peer.id, None)
        held = self.host_peers.get(peer.host_id)
        if held is not None:
            held.discard(peer.id)
            if not held:
                del self.host_peers[peer.host_id]

    def _remove_peer(self, peer: Peer) -> None:
        self._forget(peer)
        task = self.tasks.get(peer.task_id)
        if task is None:
            return
        task.assign(peer, [])
        for number, claimants in list(task.claims.items()):
            claimants.pop(peer.id, None)
            if not claimants:
                del task.claims[number]
        task.remove(peer)
        if not task.peers:
            del self.tasks[task.id]

    def _alive(self, peer: Peer) -> bool:
        return peer.host_id in self.hosts and peer.state != "failed"

    def _has_source(self, task: Task, now: float) -> bool:
        return any(self._alive(p) for p in task.sources.values())

    def _served(self, task: Task, now: float) -> bool:
        """Has the task a source, or one asked for (Dragonfly's "not the first download")?"""
        return self._has_source(task, now) or (
            task.seed_requested_at is not None and not task.seed_failed
        )

    def _next_seed_host(self, task: Task) -> str | None:
        """The task's home among the live storage hosts that have not failed it: rendezvous
        hashing, so each task has one home and a lost instance moves only its own tasks;
        none while the hosts known may not be all (``homes_known``)."""
        if not self.homes_known:
            return None
        order = rendezvous(task.id, (h for h in self.seed_hosts() if h not in task.failed_seeds))
        return order[0] if order else None

    def _judge_suspects(self, task: Task, now: float) -> None:
        """A seed its children cannot reach has died when two of them say so (or the only
        one using it), it delivered no piece since, and its host has gone silent: the next
        storage instance takes over then, not when the host's heartbeats run out (host_ttl).
        One child alone may have trouble of its own, and the seed stays for the others."""
        for seed_id, doubt in list(task.suspects.items()):
            seed = task.peers.get(seed_id)
            if seed is None or seed.state == "failed" or now - doubt.since >= self.host_ttl:
                del task.suspects[seed_id]  # gone, judged, or it outlived a host's ttl: alive
                continue
            host = self.hosts.get(seed.host_id)
            if host is not None and now - host.last_seen < self.seed_silence:
                continue
            others = any(
                seed_id in p.parents
                for p in task.peers.values()
                if p.state == "running" and p.id not in doubt.reporters
            )
            if len(doubt.reporters) >= 2 or not others:
                task.retire(seed, "failed")
                task.failed_seeds.add(seed.host_id)
                del task.suspects[seed_id]

    def _seed_effects(self, task: Task, now: float) -> list[TriggerSeed]:
        """Ask a storage instance to seed the task when nothing serves it from the origin."""
        if task.suspects:
            self._judge_suspects(task, now)
        if self._has_source(task, now) or task.seed_failed:
            return []
        asked = task.seed_host
        if task.seed_requested_at is not None:
            if asked is None or (asked in self.hosts and asked not in task.failed_seeds):
                return []  # on its way (seed_timeout bounds the wait) or being looked for
            task.failed_seeds.add(asked)  # it went away before it served
        host = self._next_seed_host(task)
        task.seed_host, task.seed_requested_at = host, now
        return [TriggerSeed(task.id, host)]

    def _seed_schedule(self, task: Task, seed: Peer, now: float) -> Schedule:
        """A seed reads the origin; the peers that already hold pieces it lacks are listed,
        so a seed taking over from a lost one reads only what the swarm does not have. A
        live source counts too: a storage that holds the task whole while a new home is
        asked to seed it (a preheat after the fleet grew) is copied, not the origin read."""
        holders = [
            p
            for p in task.peers.values()
            if p.id != seed.id and p.pieces - seed.pieces and self._eligible(task, seed, p, now)
        ]
        holders.sort(key=lambda p: len(p.pieces - seed.pieces), reverse=True)
        chosen: list[Peer] = []
        covered = seed.pieces.copy()
        for holder in holders:  # greedy cover: each adds pieces the others do not
            if holder.pieces - covered:
                chosen.append(holder)
                covered |= holder.pieces
            if len(chosen) >= SEED_PARENTS:
                break
        return Schedule("back_to_source", self._parent_infos(chosen), task.content)

    def _parent_infos(self, peers: list[Peer]) -> tuple[ParentInfo, ...]:
        """What a child needs to reach each parent."""
        hosts = self.hosts
        return tuple(
            ParentInfo(p.id, p.host_id, hosts[p.host_id].address, hosts[p.host_id].type)
            for p in peers
        )

    def _schedule(
        self, task: Task, child: Peer, now: float, *, may_read_origin: bool = True
    ) -> Schedule:
        """Parents, a wait, or the origin; with ``may_read_origin`` False (LEVEL2) a child
        the origin would be the only way for is taken out again and refused."""
        parents = self._choose_parents(task, child, now)
        fed = any(self._alive(p) and p.id not in task.bad_parents for p in task.sources.values())
        if not fed and not any(p.pieces - child.pieces for p in parents):
            parents = []  # peers with nothing to give, and no source to get it from
        usable_source = any(self._eligible(task, child, p, now) for p in task.sources.values())
        task.assign(child, [p.id for p in parents])
        if parents:
            every = None
            if len(task.peers) > RESCHEDULE_PEERS:
                every = min(MAX_RESCHEDULE_MS, 1000 * -(-len(task.peers) // RESCHEDULE_PEERS))
            return Schedule("parents", self._parent_infos(parents), task.content, every)
        seed_pending = (
            task.seed_requested_at is not None
            and not task.seed_failed
            and now - task.seed_requested_at < self.seed_timeout
            and not any(p.seed and self._alive(p) for p in task.sources.values())
        )
        # While a seed is in doubt, its replacement may be coming: wait for it, not the origin.
        if usable_source or seed_pending or task.suspects:
            waiting = WAIT_MS * -(-len(task.peers) // WAITERS_PER_WAIT)
            return Schedule("wait", content=task.content, retry_after_ms=min(MAX_WAIT_MS, waiting))
        if not may_read_origin:
            self._remove_peer(child)
            raise SwarmflyError(
                "conflict",
                "priority LEVEL2: no peer has this task yet and this download may not read the"
                " origin",
            )
        child.back_to_source = True
        task.sources[child.id] = child
        return Schedule("back_to_source", content=task.content)

    def _is_ancestor(self, ancestor: Peer, of: Peer) -> bool:
        """Would making ``of`` a parent of ``ancestor`` close a cycle?"""
        seen: set[str] = set()
        stack = list(of.parents)
        while stack:
            peer_id = stack.pop()
            if peer_id == ancestor.id:
                return True
            if peer_id in seen:
                continue
            seen.add(peer_id)
            peer = self.peers.get(peer_id)
            if peer is not None and peer.state == "running":
                stack.extend(peer.parents)
        return False

    def _is_bad(self, peer: Peer) -> bool:
        """Never a source: a seed is slow because every child needs it at once, and judging
        it bad would send children to the origin; a dead seed is judged by its children's
        reports."""
        return peer.slow and not peer.is_source

    def _eligible(self, task: Task, child: Peer, parent: Peer, now: float) -> bool:
        """Could ``parent`` ever serve ``child``: alive, trusted, not blocked, not local."""
        return (
            parent.id != child.id
            and parent.host_id in self.hosts
            and parent.state != "failed"
            and child.blocklist.get(parent.id, 0.0) <= now
            and parent.id not in task.bad_parents
            and parent.host_id != child.host_id
            and not self._is_bad(parent)
        )

    def _candidates(self, task: Task) -> Iterator[Peer]:
        """The task's sources first (a few: they hold every piece, and a child must never
        miss them by chance), then every other peer of a small swarm, shuffled, or up to
        SAMPLE_SIZE drawn at random from a larger one: lazily, as the caller stops once it
        has FILTER_LIMIT eligible parents, so a decision costs the same at any swarm size."""
        sources = list(task.sources.values())[:FILTER_LIMIT]
        self.rng.shuffle(sources)
        yield from sources
        ids = task.order
        randbelow = self.rng.randrange
        if len(ids) <= SAMPLE_SIZE:
            # Fisher-Yates one draw at a time: the caller takes a few, a shuffle of the whole
            # list cost a decision more than its scoring.
            pool = list(ids)
            for i in range(len(pool) - 1, -1, -1):
                j = randbelow(i + 1)
                pool[i], pool[j] = pool[j], pool[i]
                peer = task.peers[pool[i]]
                if not peer.is_source:
                    yield peer
            return
        drawn: set[int] = set()
        while len(drawn) < SAMPLE_SIZE:
            index = randbelow(len(ids))
            if index in drawn:
                continue
            drawn.add(index)
            peer = task.peers[ids[index]]
            if not peer.is_source:
                yield peer

    def _choose_parents(self, task: Task, child: Peer, now: float) -> list[Peer]:
        pool = self._candidates(task)
        filtered: list[Peer] = []
        for parent in pool:
            if not self._eligible(task, child, parent, now):
                continue
            # A host's load is as old as its last heartbeat, while a piece takes a fraction
            # of a second: a busy parent ranks lower (the evaluator), and turns away what
            # it cannot serve at the moment it is asked.
            if self.hosts[parent.host_id].upload_slots <= 0:
                continue
            if self.acyclic and self._is_ancestor(child, parent):
                continue
            filtered.append(parent)
            if len(filtered) >= FILTER_LIMIT:
                break
        if not filtered:
            return []
        total = task.content.piece_count if task.content else 0
        means = [p.mean_cost_ms for p in filtered if p.mean_cost_ms is not None]
        median = statistics.median(means) if means else None
        # Children already sent to a parent count as its load at once, not only when the
        # next heartbeat says so: otherwise every child picks the same best few parents.
        mine = set(child.parents) if child.state == "running" else set()
        evaluation = Evaluation(self._candidate(child), total, median)
        scored: list[tuple[bool, float, Peer]] = []
        for parent in filtered:
            assigned = task.load.get(parent.id, 0) - (parent.id in mine)
            candidate = self._candidate(parent, child, total, assigned)
            score = self.evaluator(candidate, evaluation)
            # A parent holding nothing the child lacks goes last whatever its score: the
            # child could only wait on it while parents with pieces to give are busy.
            useful = not total or bool(candidate.useful_pieces)
            scored.append((useful, score, parent))
        scored.sort(key=lambda entry: entry[:2], reverse=True)
        # A source with its fill of children is kept by those it has and offered to nobody
        # else: they get its pieces from the children it serves, as those trade them.
        return self._with_source(
            [
                parent
                for *_, parent in scored
                if not parent.is_source
                or parent.id in mine
                or task.load.get(parent.id, 0) < SEED_CHILDREN
            ],
            self._parents_for(child, filtered),
        )

    def _parents_for(self, child: Peer, filtered: list[Peer]) -> int:
        """How many parents to offer: more to a child behind its candidates (a random
        sample of the swarm, so no count over the whole task is kept)."""
        if self.candidate_parents < 2:
            return self.candidate_parents  # one parent each, as configured: a chain
        held = [len(p.pieces) for p in filtered if not p.is_source]
        if held and len(child.pieces) < LAGGARD_SHARE * sum(held) / len(held):
            return self.candidate_parents * LAGGARD_PARENTS
        return self.candidate_parents

    def _with_source(self, ranked: list[Peer], count: int) -> list[Peer]:
        """The best ``count`` normal parents, and the best source as the last of them: a
        seed grants each child the pieces it sent least (``grants``), so it never sends what
        the swarm trades anyway ahead of what only it has, and its uplink adds to the
        swarm's."""
        if count < 2:
            return ranked[:count]  # no room to balance: trust the ranking
        normals = [p for p in ranked if not p.is_source]
        sources = [p for p in ranked if p.is_source]
        return [*normals[: count - len(sources[:1])], *sources[:1]]

    def _candidate(
        self, peer: Peer, child: Peer | None = None, total: int = 0, assigned: int = 0
    ) -> Candidate:
        host = self.hosts.get(peer.host_id)
        return Candidate(
            peer_id=peer.id,
            host_type="seed" if peer.is_source else (host.type if host else "normal"),
            finished_pieces=len(peer.pieces),
            upload_slots=host.upload_slots if host else 0,
            uploads=max(host.uploads, assigned) if host else assigned,
            idc=host.idc if host else "",
            location=host.location if host else "",
            mean_cost_ms=peer.mean_cost_ms,
            useful_pieces=None
            if child is None
            else (
                max(0, total - len(child.pieces))
                if peer.is_source
                else peer.pieces.count_missing(child.pieces)
            ),
        )


def _is_digest(text: str) -> bool:
    """64 lowercase hex digits that are not all zero (what no data hashes to)."""
    return (
        len(text) == 2 * DIGEST_SIZE and text != _ABSENT.hex() and _HEX.fullmatch(text) is not None
    )


def _check_layout(content: TaskContent) -> None:
    if content.piece_count != piece_count(content.content_length, content.piece_length):
        raise SwarmflyError(
            "bad_request", "piece_count does not fit content_length", path="data.task"
        )


def _check_same_layout(known: TaskContent, content: TaskContent) -> None:
    if (known.content_length, known.piece_length) != (content.content_length, content.piece_length):
        raise SwarmflyError("conflict", "content length or piece length differs for the task")


def _slow(costs: deque[int]) -> bool:
    """Dragonfly's bad-parent rule: the last piece cost far above the parent's own mean."""
    if len(costs) < 2:
        return False
    *history, last = costs
    mean = sum(history) / len(history)
    if len(costs) <= 5:
        return last > 20 * max(mean, 1.0)
    # Plain floats: statistics.pstdev computes with exact fractions.
    deviation = math.sqrt(sum((c - mean) ** 2 for c in history) / len(history))
    return last > mean + 3 * deviation and last > 4 * max(mean, 1.0)
