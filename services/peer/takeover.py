"""Taking pieces from the swarm's holders: a seed that takes over a task whose seed was lost,
or a lending seed taking back what it lent.

What the holders have comes from them, the rest from the origin, both at once, so the origin
is read about once in all. A piece no holder delivers falls back to the origin; a piece a
holder served that did not match its digest is read from the origin whatever else holds it
off: only the seed's own read settles what a lent child's digest was worth (DESIGN §9).

Pure: the conductor feeds it what the holders said they have and how each ask ended.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from swarmfly.services.peer.swarming import PARENT_FAILURES

ATTEMPTS = 8
"""Tries per piece (busy holders included) before the seed reads it from the origin."""


@dataclass
class Gathering:
    """One pass over the holders: which piece to ask next, of whom, and what the holders'
    failures cost them."""

    queue: deque[tuple[int, list[str]]] = field(default_factory=deque)
    """Pieces to take from holders, with the holders that have them."""
    origin: list[int] = field(default_factory=list)
    """Pieces no holder has (with a known digest), read from the origin meanwhile."""
    load: dict[str, int] = field(default_factory=dict)
    """Holder -> asks under way."""
    failures: dict[str, int] = field(default_factory=dict)
    dropped: set[str] = field(default_factory=set)
    """Holders that failed ``PARENT_FAILURES`` times: asked no more."""
    disputed: set[int] = field(default_factory=set)
    """Pieces a holder served that did not match their digest."""
    failed: list[int] = field(default_factory=list)
    """Pieces no holder delivered."""

    @classmethod
    def plan(
        cls,
        missing: Sequence[int],
        held: Mapping[str, Collection[int]],
        digests: Sequence[str | None],
        hold_off: Collection[int] = (),
        *,
        proven: bool = False,
    ) -> Gathering:
        """``held``: holder -> what it says it has. A piece comes from holders only when its
        digest is known (the bytes are checked against it), or, ``proven``, when the whole
        file's digest will check them (a lent child's word the scheduler lost, say);
        ``hold_off``: pieces children are reading from the origin now, taken from holders
        only."""
        gathering = cls(load=dict.fromkeys(held, 0))
        for number in missing:
            where = [holder for holder, pieces in held.items() if number in pieces]
            if where and (digests[number] or proven):
                gathering.queue.append((number, where))
            elif number not in hold_off:
                gathering.origin.append(number)
        return gathering

    def next(self) -> tuple[int, list[str]] | None:
        """The next piece to take, and its holders, least loaded first."""
        if not self.queue:
            return None
        number, where = self.queue.popleft()
        live = [holder for holder in where if holder not in self.dropped]
        return number, sorted(live, key=lambda holder: self.load.get(holder, 0))

    def asking(self, holder: str) -> None:
        self.load[holder] = self.load.get(holder, 0) + 1

    def answered(self, holder: str) -> None:
        self.load[holder] -= 1

    def refused(self, holder: str, number: int, *, corrupt: bool) -> None:
        """The holder did not deliver the piece (not busy: that is only a wait)."""
        if corrupt:
            self.disputed.add(number)
        self.failures[holder] = self.failures.get(holder, 0) + 1
        if self.failures[holder] >= PARENT_FAILURES:
            self.dropped.add(holder)

    def gave_up(self, number: int) -> None:
        self.failed.append(number)

    def rest(self, done: Collection[int], hold_off: Collection[int] = ()) -> list[int]:
        """What the origin must still give once the holders are done: what they did not
        deliver, unless a child is reading it, and then still what a holder disputed."""
        return sorted(
            n
            for n in set(self.failed)
            if n not in done and (n not in hold_off or n in self.disputed)
        )

    @staticmethod
    def found(held: Mapping[str, Collection[int]]) -> set[int]:
        """Every piece some holder said it has."""
        return {n for pieces in held.values() for n in pieces}
