"""Lending: a seed reading a task from the origin lends the origin's spare capacity.

The seed's uplink is slower than most origins: while it has no slot free, a waiting child is
told to read one piece nobody has read yet from the origin itself (the highest-numbered one:
the seed reads from the start). Every piece is still read from the origin once; the seed takes
the lent ones from the swarm afterwards, and reads a piece itself when its child did not
deliver it in time. A lent child's digest is only its word: the seed lends only where the
whole file's digest will prove every byte, and the scheduler holds such a digest provisional
until a trusted reader confirms it (DESIGN §9).

A child that is the only one asking (``sole``) is lent whatever it wants, from the first
piece up, and the seed holds its own reading back while it asks: the seed's read would only
put a hop, and a second pass over every byte on its host, between the origin and the one
reader of the file. The seed takes those pieces from the child once it is done (the child
still reads each piece once, and the seed gathers it from the swarm as any lent piece). Its
loans take the seed's place at the origin, never more reads of the task at once than the
seed makes alone: beside the seed's, they would halve every read's share of a busy origin.

Pure, like ``grants``: the seed's download (the conductor) and its upload server feed one
``Lending`` the clock and what they see, through its methods; neither writes its fields.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

LEND_SECONDS = 15.0
"""At least this long a lent piece waits for its child before the seed reads it."""
LEND_RATE = 512 * 1024
"""Bytes/s a child lent a piece is expected to read at least: its piece's time (or
``LEND_SECONDS``, whichever is longer)."""
LEASE_FACTOR = 4.0
"""A lent piece's time: at least this many times what the seed's last piece took it."""
ABANDON_SECONDS = 5.0
"""A child that names itself and has not asked the seed for this long is gone (a live one
asks again at least every ``SEED_POLL_WAIT``, 2 s): what it was lent is read or gathered
without waiting for its time to run out."""
ASKING_SECONDS = 1.0
"""Children asked this recently: they are still there to be lent to."""
HOLD_BACK = 1.0
"""Seconds at most a lending seed waits before reading its next piece."""
COLLECT_PATIENCE = 10.0
"""Seconds at most a lending seed leaves the swarm's uplinks to children before it takes
the lent pieces back for its cache."""
LEND_POLL = 0.25
"""Seconds between a lending seed's looks for the pieces it lent."""
MAX_SAID = 64
"""Lent pieces a child may say it delivered in one poll."""
LONE_SECONDS = 0.1
"""A child is ``sole`` once no other asked beside it for this long: children a schedule
starts together ask within this of one another, and share the seed as ever. One that comes
later finds the sole child hashing what it read, for it to take (``"sole": false``)."""
PER_CHILD = 4
"""Lent pieces one child (that named itself) reads at once: a child that dies or leaves
takes few unread pieces with it, each read again."""
LOAN_WAIT = 0.5
"""Seconds at most a child with ``PER_CHILD`` lent reads under way waits for one before it
asks the seed again: less than ``ASKING_SECONDS``, so it is still one that asks."""


def _key(child: str | None, borrows: bool) -> str:
    """Whom a poll counts for: its child, or ``""`` for all that may not be lent to."""
    return child if child is not None and borrows else ""


@dataclass
class Lending:
    """One task's lending at its seed: what was lent to whom, until when, what came back."""

    piece_count: int
    etag: str | None = None
    limit: int = 8
    """Lent pieces being read at once."""
    per_child: int = PER_CHILD
    """Of those, at most this many by one child."""
    window: int = 4
    """Lend only while the seed's reading runs this far ahead of its uplink (``ahead``):
    when the origin is the slower side, a lent piece would only share its bandwidth."""
    lease: float = LEND_SECONDS
    """Raised by the seed to a few times what a piece takes it to read (``read``): on a slow
    origin a child reading a lent piece must not be taken for a child that failed."""
    lends_sole: bool = True
    """Lend a sole child the whole file (``sole``); a seed sets it from ``[storage]
    lend_sole``."""
    open: bool = True
    """Still lending: closed once the seed has read everything it did not lend."""
    reading: set[int] = field(default_factory=set)
    """Pieces the seed itself is reading."""
    polled_at: float = float("-inf")
    """When a child last asked the seed for a piece (monotonic)."""
    pending: dict[int, float] = field(default_factory=dict)
    """Lent piece -> until when (monotonic) its child has to deliver it. A piece is lent
    once at most."""
    delivered: set[int] = field(default_factory=set)
    """Lent pieces the swarm has (their digest is known): taken from their holders."""
    grace: float = 30.0
    """Seconds after its time a delivered piece may still come from holders before the
    seed reads it from the origin after all (its holders went away)."""
    lent_to: dict[int, str] = field(default_factory=dict)
    """Lent piece -> the child it went to, when the child named itself."""
    seen: dict[str, float] = field(default_factory=dict)
    """Child -> when it last asked (or its ask ended); ``""``: any that may not be lent to."""
    lost: set[int] = field(default_factory=set)
    """Delivered pieces the swarm no longer holds (``unheld``)."""
    whole: set[int] = field(default_factory=set)
    """Pieces lent to a ``sole`` child: it holds them with no digest its others could check
    them by, until the seed says others ask (then it hashes them)."""
    _next: int = 0
    """Every piece below is done, being read by the seed, or lent."""
    _top: int = -1
    """Every piece above is done, being read by the seed, or lent."""
    _crowded_at: float = float("-inf")
    """When another child last asked beside the one asking (or the first one did)."""
    _open: dict[str, int] = field(default_factory=dict)
    """Child -> its polls waiting here now (``""``: children that may not be lent to)."""

    def __post_init__(self) -> None:
        self._top = self.piece_count - 1

    @classmethod
    def for_origin(
        cls,
        piece_count: int,
        piece_length: int,
        concurrency: int,
        etag: str | None = None,
        *,
        sole: bool = False,
    ) -> Lending:
        """The lending of a seed reading with ``concurrency`` ranges at once: as many lent
        pieces again, lent while it reads that far ahead of its uplink (and to a sole child,
        with ``sole``: ``[storage] lend_sole``)."""
        return cls(
            piece_count,
            etag=etag,
            lends_sole=sole,
            limit=2 * concurrency,
            window=concurrency,
            lease=max(LEND_SECONDS, piece_length / LEND_RATE),
        )

    # -- what the upload server sees -----------------------------------------------------

    def sole(self, now: float) -> str | None:
        """The one named child that asked within ``ASKING_SECONDS``, when it is the only
        one and may be lent to (one that may not, unnamed or not borrowing, shares the
        seed's uplink all the same, and needs the seed to read)."""
        if not self.lends_sole:
            return None
        asking = self._asking(now)
        if len(asking) != 1 or "" in asking or now - self._crowded_at < LONE_SECONDS:
            return None
        return asking.pop()

    def _asking(self, now: float) -> set[str]:
        asking = set(self._open)
        asking.update(c for c, at in self.seen.items() if now - at < ASKING_SECONDS)
        return asking

    def asked(self, child: str | None, now: float, borrows: bool = True) -> None:
        """A child's poll arrived (or, ``ended``, left): the child is alive. ``borrows``:
        it may be lent pieces (it reads the origin). A child that was lent pieces and says
        it borrows no more (a read of the origin failed there) gives back what it has not
        delivered: the seed reads those now, not once their time is up."""
        if self.polled_at == float("-inf"):
            self._crowded_at = now  # the first: others may be a moment behind it
        self.polled_at = now
        key = _key(child, borrows)
        self._open[key] = self._open.get(key, 0) + 1
        self.seen[key] = now
        if child is not None:
            self.seen[child] = now
        asking = self._asking(now)
        if len(asking) > 1 or "" in asking:
            self._crowded_at = now
            if not borrows:
                for number, to in self.lent_to.items():
                    if to == child and number not in self.delivered:
                        self.pending[number] = min(self.pending[number], now)

    def ended(self, child: str | None, now: float, borrows: bool = True) -> None:
        """A child's poll ended: it waited here all along."""
        key = _key(child, borrows)
        if self._open.get(key, 0) > 1:
            self._open[key] -= 1
        else:
            self._open.pop(key, None)
        self.seen[key] = now
        if child is not None:
            self.seen[child] = now

    def said(self, numbers: Iterable[int]) -> set[int]:
        """A child says it read these lent pieces: only pieces lent at all count (it proves
        nothing; the scheduler's digests do, ``learned``). Returns those that count."""
        counted = set(numbers) & self.pending.keys()
        self.delivered |= counted
        return counted

    def learned(self, digests: list[str | None]) -> None:
        """The task's digests as the scheduler knows them: a lent piece with one was
        delivered to the swarm."""
        self.delivered.update(n for n in self.pending if digests[n])

    @property
    def outstanding(self) -> bool:
        """Some lent piece is not known delivered yet."""
        return any(n not in self.delivered for n in self.pending)

    # -- what the seed's reading asks ----------------------------------------------------

    def reading_elsewhere(self, now: float) -> set[int]:
        """Lent pieces children are reading now (not delivered, within their time)."""
        return {n for n in self.pending if n not in self.delivered and self._reading(n, now)}

    def held_off(self, now: float) -> set[int]:
        """Lent pieces the seed must not read from the origin: being read by a child, or
        delivered to the swarm (unless their holders stayed silent too long, or no holder
        has them and their child went away)."""
        return {
            n
            for n, until in self.pending.items()
            if self._reading(n, now)
            or (n in self.delivered and until + self.grace > now and n not in self.lost)
        }

    def _reading(self, number: int, now: float) -> bool:
        return self.pending[number] > now and not self.gone(number, now)

    def gone(self, number: int, now: float) -> bool:
        """The child a piece was lent to stopped asking the seed: it died or left, or it is
        done (then it delivered the piece, and holds it)."""
        child = self.lent_to.get(number)
        return child is not None and now - self.seen.get(child, now) > ABANDON_SECONDS

    def unheld(self, found: Collection[int], now: float) -> None:
        """``found``: the pieces the swarm's holders have now. A delivered piece none of them
        has, from a child that went away, is lost to the swarm: the seed reads it."""
        self.lost.update(
            n for n in self.delivered - set(found) if n in self.pending and self.gone(n, now)
        )

    def _taken(self, number: int, done: Collection[int]) -> bool:
        return number in done or number in self.reading or number in self.pending

    def lend(
        self,
        done: Collection[int],
        served: Mapping[int, int],
        wanted: Collection[int],
        now: float,
        child: str | None = None,
    ) -> int | None:
        """A piece for a waiting child to read from the origin, or None. A ``sole`` child
        is lent one from the first piece up whatever the seed's uplink does (it reads the
        file in order, so its whole-file hash keeps up); others from the last one down, only
        while the seed's reading runs ahead of its uplink."""
        if not self.open:
            return None
        elsewhere = self.reading_elsewhere(now)
        if len(elsewhere) >= self.limit:
            return None
        if child is not None and (
            sum(self.lent_to.get(n) == child for n in elsewhere) >= self.per_child
        ):
            return None
        alone = child is not None and self.sole(now) == child
        if not alone and self.ahead(done, served) < self.window:
            return None
        if alone and self._at_origin(now) >= self.window:
            return None
        while self._next <= self._top and self._taken(self._next, done):
            self._next += 1
        while self._top >= self._next and self._taken(self._top, done):
            self._top -= 1
        order = range(self._next, self._top + 1) if alone else range(self._top, self._next - 1, -1)
        for number in order:
            if number in wanted and not self._taken(number, done):
                self.pending[number] = now + self.lease
                if child is not None:
                    self.lent_to[number] = child
                    self.seen.setdefault(child, now)
                if alone:
                    self.whole.add(number)
                return number
        return None

    def claim(self, done: Collection[int], now: float) -> int | None:
        """The next piece for the seed to read: a lent piece whose child did not deliver in
        time, else the lowest one nobody has or reads. ``read`` says when it is read."""
        held_off = self.held_off(now)
        for number in self.pending:
            if number not in held_off and number not in done and number not in self.reading:
                self.reading.add(number)
                return number
        while self._next <= self._top and self._taken(self._next, done):
            self._next += 1
        if self._next > self._top:
            return None
        self.reading.add(self._next)
        return self._next

    def read(self, number: int, seconds: float | None) -> None:
        """The seed's read of a claimed piece ended; ``seconds``: what it took, when it
        succeeded (a lent piece's time follows the origin's pace)."""
        self.reading.discard(number)
        if seconds is not None:
            self.lease = max(self.lease, LEASE_FACTOR * seconds)

    def ahead(self, done: Collection[int], served: Mapping[int, int]) -> int:
        """Pieces the seed read (or reads) and has not sent yet: how far its reading runs
        ahead of its uplink. While children ask, what runs further ahead is better lent."""
        return len(self.reading) + sum(1 for n in done if not served.get(n))

    def hold_back(
        self, since: float, now: float, done: Collection[int], served: Mapping[int, int]
    ) -> bool:
        """Should a reader that came for its next piece at ``since`` wait? While children ask
        and the seed's reading runs ahead of its uplink, the origin's capacity is better
        lent; but a while at most: never stall on children that want none of it. While a
        ``sole`` child asks, the whole origin is its to read (a second child, or its silence,
        ends the wait)."""
        if not self.open:
            return False
        if self.sole(now) is not None:
            return not self._overdue(done, now)
        if self._at_origin(now) >= self.window:
            return True  # a former sole child's loans still read in the seed's place
        return (
            now - since < HOLD_BACK
            and now - self.polled_at < ASKING_SECONDS
            and self.ahead(done, served) >= self.window
        )

    def _at_origin(self, now: float) -> int:
        """Reads of the task at the origin that a sole child's loans count in: the seed's,
        and those loans being read. A sole child reads in the seed's place: the origin sees
        no more reads of the task at once than the seed alone makes (twice as many would
        halve each one's share of a busy origin, and a seed that leaves would cut them)."""
        asking = self._asking(now)
        lent = self.whole & self.reading_elsewhere(now)
        return len(self.reading) + sum(self.lent_to.get(n) in asking for n in lent)

    def _overdue(self, done: Collection[int], now: float) -> bool:
        """A lent piece is past its time (or its child went away) and nobody reads it."""
        held_off = self.held_off(now)
        return any(
            n not in done and n not in self.reading and n not in held_off for n in self.pending
        )

    def collecting(self, since: float, now: float) -> bool:
        """Closed at ``since``: children still ask, and the swarm's uplinks are theirs a
        while longer before the seed takes the lent pieces back for its cache. Not when it
        lent a sole child pieces (``whole``): the others may wait for them, and would only
        have them sooner from the seed."""
        return (
            not self.whole
            and now - self.polled_at < ASKING_SECONDS
            and now - since <= COLLECT_PATIENCE
        )

    def waiting(self, done: Collection[int], now: float) -> bool:
        """Some lent piece the seed lacks is still to come from a child or from holders."""
        return any(n not in done for n in self.held_off(now))
