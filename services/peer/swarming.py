"""The P2P phase of a download as a pure core: which piece from which parent, when to ask
the scheduler again, which parent to drop and for how long.

Sans-IO like ``scheduler/core.py``: events in (a schedule, pieces a parent offers, a parent
lost, a piece done or failed with its reason), decisions out of ``tick(now)`` (fetch, drop,
reschedule); the time is always passed in and the randomness is the book's seeded RNG. The
conductor is the adapter: it long-polls the parents, moves the bytes, and asks the scheduler.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

from swarmfly.ratelimit import MIN_SEND_RATE
from swarmfly.services.peer.pieces import PieceBook

STALL_SECONDS = 3.0
"""No piece for this long, and nothing in flight: ask for other parents."""
RESCHEDULE_INTERVAL = 1.0
"""Seconds between asks for fresher parents while pieces are missing (at least: a large
swarm's scheduler tells its children to ask less often)."""
IDLE_RESCHEDULE = 0.25
"""Of that interval: how soon a child with nothing in flight asks again."""
PARENT_FAILURES = 2
BLOCK_SECONDS = 30.0
"""A dropped parent is not used again for this long (a corrupt one never: the scheduler)."""
BUSY_BACKOFF = 0.25
"""Seconds before asking a parent that had no free upload slot again."""
SCHEDULER_PATIENCE = 10.0
"""Seconds a download with no parents waits for its scheduler to come back (a partition
moves to another scheduler within 10 s) before it reads the origin."""
ORIGIN = "@origin"
"""Where a lent piece comes from, in place of a parent id."""

PIECE_RATE = 2 * MIN_SEND_RATE
"""The least bytes/s each piece in flight gets under a download rate: twice what a parent
requires of a child before it cuts it off as a slow reader."""


def in_flight(configured: int, *rates: float) -> int:
    """Pieces to fetch at once: as configured, but under a download rate (the lowest of
    ``rates`` above 0: the run's own, its share of the host's) no more than that rate feeds
    at ``PIECE_RATE`` each, and at least one."""
    rate = min((r for r in rates if r > 0), default=0.0)
    return configured if rate <= 0 else max(1, min(configured, int(rate // PIECE_RATE)))


Failure = Literal["busy", "corrupt", "slow", "failed", "origin", "cancelled"]
"""Why a piece did not arrive, as the adapter tells it."""
Why = Literal["no_parents", "stalled", "periodic", "idle", "dropped"]
WithoutScheduler = Literal["keep", "wait", "origin"]


@dataclass(frozen=True)
class Fetch:
    number: int
    parent_id: str


@dataclass(frozen=True)
class Drop:
    """Stop watching this parent: the core has already forgotten it."""

    parent_id: str
    reason: str


@dataclass(frozen=True)
class Reschedule:
    why: Why


Decision = Fetch | Drop | Reschedule


@dataclass
class ParentState:
    type: str = "normal"
    failures: int = 0
    busy_until: float = 0.0
    window: int = 1
    """Pieces to have in flight from it: what it last took at once, grown by one for each
    window's worth delivered, up to ``per_parent``. A capped parent serves one or two pieces
    at a time and answers busy past that; asking for more wastes requests, and backing off
    from it altogether would leave its slot idle when our piece ends."""
    delivered: int = 0
    """Pieces it delivered since the window last changed."""


@dataclass
class Swarming:
    """One download's P2P phase. ``book`` arrives once the content is known."""

    concurrency: int
    per_parent: int
    now: float
    book: PieceBook | None = None
    parents: dict[str, ParentState] = field(default_factory=dict)
    blocklist: dict[str, float] = field(default_factory=dict)
    """Parents dropped, until when: a failed parent may come back later."""
    bad: list[dict[str, str]] = field(default_factory=list)
    """Dropped parents and why, for the scheduler."""
    fetching: Counter[str] = field(default_factory=Counter)
    """Pieces in flight per parent (ORIGIN: lent pieces read from the origin)."""
    reschedule_every: float = RESCHEDULE_INTERVAL
    _offers: dict[str, set[int]] = field(default_factory=dict)
    _lost: list[str] = field(default_factory=list)
    _drops: list[Drop] = field(default_factory=list)
    _due: bool = False
    _scheduler_lost: float | None = None
    """Since when the task's scheduler has not answered."""
    _last_progress: float = 0.0
    _last_schedule: float = 0.0

    def __post_init__(self) -> None:
        self._last_progress = self._last_schedule = self.now

    @property
    def complete(self) -> bool:
        return self.book is not None and self.book.complete

    def blocked(self, now: float) -> set[str]:
        return {peer_id for peer_id, until in self.blocklist.items() if until > now}

    # -- events ----------------------------------------------------------------------------

    def scheduled(
        self, parents: dict[str, str], now: float, *, retry_after_ms: int = 0, exact: bool
    ) -> list[str]:
        """The scheduler's parents (id -> host type); ``exact``: exactly these (a
        reschedule), else in addition to ours (the first schedule). Returns the ids to start
        watching; a released parent's pieces in flight still finish."""
        self._last_progress = self._last_schedule = now
        self.reschedule_every = max(RESCHEDULE_INTERVAL, retry_after_ms / 1000)
        if exact:
            for parent_id in [p for p in self.parents if p not in parents]:
                del self.parents[parent_id]
                if self.book is not None:
                    self.book.release_parent(parent_id)
        blocked = self.blocked(now)
        added = [p for p in parents if p not in self.parents and p not in blocked]
        for parent_id in added:
            self.parents[parent_id] = ParentState(parents[parent_id], window=self.per_parent)
        return added

    def asked(self, now: float) -> None:
        """The scheduler was asked and answered without new parents (wait, or kept ours)."""
        self._last_progress = self._last_schedule = now

    def scheduler_lost(self, now: float, *, others_answer: bool) -> WithoutScheduler:
        """The task's scheduler did not answer: keep the parents we have (a scheduler
        restart must not send everyone to the origin); with none, wait while its partition
        moves to another scheduler (``others_answer``: some scheduler still does); read the
        origin when there is none, or after SCHEDULER_PATIENCE."""
        if self.parents:
            return "keep"
        self._scheduler_lost = self._scheduler_lost if self._scheduler_lost is not None else now
        if others_answer and now - self._scheduler_lost < SCHEDULER_PATIENCE:
            return "wait"
        return "origin"

    def scheduler_back(self) -> None:
        self._scheduler_lost = None

    def offered(self, parent_id: str, pieces: set[int]) -> None:
        self._offers[parent_id] = pieces

    def take_offers(self) -> None:
        """The offers that came since the last tick, into the book (``tick`` takes them
        too). Asked before whether digests are lacking: a parent's new pieces may be ones
        whose digests we do not have, and the poll for them is then due now, not at the
        next tick (a seed's first pieces waited a quarter of a second for one)."""
        book = self.book
        if book is None:
            return
        for parent_id, pieces in self._offers.items():
            if parent_id in self.parents:
                book.update_parent(parent_id, pieces)
        self._offers.clear()

    def lost(self, parent_id: str) -> None:
        """The parent stopped answering what it holds."""
        self._lost.append(parent_id)

    def lent(self, number: int) -> bool:
        """A seed lent us ``number`` to read from the origin: whether to read it (wanted,
        and nobody fetches it yet)."""
        book = self.book
        if book is None or number >= book.piece_count or number in book.done:
            return False
        if number in book.in_flight:
            return False
        book.in_flight[number] = {ORIGIN}
        self.fetching[ORIGIN] += 1
        return True

    def done(self, number: int, parent_id: str, now: float) -> None:
        self._settle(parent_id)
        if self.book is not None:
            self.book.finished(number, parent_id)
        self._last_progress = now
        parent = self.parents.get(parent_id)
        if parent is not None and parent.window < self.per_parent:
            parent.delivered += 1
            if parent.delivered >= parent.window:
                parent.window, parent.delivered = parent.window + 1, 0

    def failed(self, number: int, parent_id: str, reason: Failure, now: float) -> None:
        """A fetch that did not deliver; the policy of what it costs the parent is here."""
        self._settle(parent_id)
        if self.book is not None:
            self.book.failed(number, parent_id)
        parent = self.parents.get(parent_id)
        if reason in ("cancelled", "origin") or parent is None:
            return  # a lent piece the seed reads itself when we do not deliver
        if reason == "busy":
            # It serves what it took: ask again as those end. Only one that took nothing
            # of ours is left alone for a moment.
            taken = self.fetching.get(parent_id, 0)
            parent.window, parent.delivered = max(1, taken), 0
            if not taken:
                parent.busy_until = now + BUSY_BACKOFF
        elif reason == "corrupt":
            self.drop(parent_id, "corrupt", now)
        elif reason == "slow":
            if parent.type != "seed":  # a stalled seed is slow, not gone: it has the pieces
                self.drop(parent_id, "slow", now)
        else:
            parent.failures += 1
            if parent.failures >= PARENT_FAILURES:
                self.drop(parent_id, "failed", now)

    def drop(self, parent_id: str, reason: str, now: float) -> None:
        if self.parents.pop(parent_id, None) is None:
            return
        self.blocklist[parent_id] = now + BLOCK_SECONDS
        self.bad.append({"peer_id": parent_id, "reason": reason})
        if self.book is not None:
            self.book.drop_parent(parent_id)
        self._due = True
        self._drops.append(Drop(parent_id, reason))

    def _settle(self, parent_id: str) -> None:
        self.fetching[parent_id] -= 1
        if self.fetching[parent_id] <= 0:
            del self.fetching[parent_id]

    # -- decisions -------------------------------------------------------------------------

    def tick(self, now: float) -> list[Decision]:
        """What to do now: parents to drop, pieces to fetch, and whether to ask the
        scheduler (a Reschedule, last: the adapter answers it with ``scheduled``)."""
        for parent_id in self._lost:
            self.drop(parent_id, "failed", now)
        self._lost.clear()
        decisions: list[Decision] = list(self._drops)
        self._drops.clear()
        book = self.book
        if book is not None:
            self.take_offers()
            room = self.concurrency - sum(self.fetching.values())
            free = {
                p: slots
                for p, parent in self.parents.items()
                if parent.busy_until <= now
                and (slots := parent.window - self.fetching.get(p, 0)) > 0
                and p in book.available
            }
            if room > 0 and free:  # the book's choice costs a count of every offer
                for number, parent_id in book.assign(free, room):
                    self.fetching[parent_id] += 1
                    decisions.append(Fetch(number, parent_id))
        why = self._why(now)
        if why is not None:
            self._due = False
            decisions.append(Reschedule(why))
        return decisions

    def _why(self, now: float) -> Why | None:
        idle = not self.fetching
        if not self.parents:
            return "no_parents"
        if self._due:
            return "dropped"
        if idle and now - self._last_progress > STALL_SECONDS:
            return "stalled"
        if now - self._last_schedule > self.reschedule_every:
            return "periodic"
        # Nothing in flight: these parents have nothing to give now; ask for others at once
        # rather than idle until the periodic reschedule.
        if (
            self.book is not None
            and idle
            and now - self._last_schedule > self.reschedule_every * IDLE_RESCHEDULE
        ):
            return "idle"
        return None
