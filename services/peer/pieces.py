"""The peer's pure piece bookkeeping: which piece to fetch from which parent next.

No IO: the conductor feeds it what parents hold and what finished, and asks for assignments.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

from swarmfly.plugintypes import PieceView, Strategy


@dataclass
class PieceBook:
    piece_count: int
    done: set[int] = field(default_factory=set)
    digests: list[str | None] = field(default_factory=list)
    available: dict[str, set[int]] = field(default_factory=dict)
    """parent id -> pieces that parent has verified."""
    in_flight: dict[int, set[str]] = field(default_factory=dict)
    """piece -> parents it is being fetched from (more than one only in the endgame)."""
    strategy: Strategy = field(kw_only=True)
    """The peer's strategy plugin (``rarest-first`` unless configured)."""
    rng: random.Random = field(kw_only=True)
    """Seeded by the caller: the strategy's ties break the same way on a replay."""

    def __post_init__(self) -> None:
        if not self.digests:
            self.digests = [None] * self.piece_count

    @property
    def complete(self) -> bool:
        return len(self.done) >= self.piece_count

    def first_missing(self) -> int:
        return next((n for n in range(self.piece_count) if n not in self.done), self.piece_count)

    def missing(self) -> set[int]:
        return set(range(self.piece_count)) - self.done

    def update_parent(self, parent_id: str, pieces: set[int]) -> None:
        self.available[parent_id] = {n for n in pieces if 0 <= n < self.piece_count}

    def release_parent(self, parent_id: str) -> None:
        """Stop offering a parent's pieces; what is in flight from it may still finish."""
        self.available.pop(parent_id, None)

    def drop_parent(self, parent_id: str) -> list[int]:
        """Forget a parent; returns the pieces that were in flight from it."""
        self.available.pop(parent_id, None)
        lost = []
        for number, parents in list(self.in_flight.items()):
            if parent_id in parents:
                parents.discard(parent_id)
                if not parents:
                    del self.in_flight[number]
                lost.append(number)
        return lost

    @property
    def endgame(self) -> bool:
        """Every missing piece is being fetched: a slow one may be asked of a second parent."""
        return self.missing() <= self.in_flight.keys()

    def wanted(self) -> set[int]:
        """What a parent may grant: missing and not in flight; in the endgame, any missing
        piece (the seed's spare uplink races the slowest transfers)."""
        missing = self.missing()
        return missing if missing <= self.in_flight.keys() else missing - self.in_flight.keys()

    def needs_digests(self) -> bool:
        """Some parent holds a piece we miss whose digest we do not know yet. Asked on every
        pass of a download: once the digests are known (they are pushed), it costs a scan."""
        if None not in self.digests:
            return False
        unknown = {n for n, d in enumerate(self.digests) if d is None} - self.done
        return any(not unknown.isdisjoint(pieces) for pieces in self.available.values())

    def assign(self, free_slots: dict[str, int], limit: int | None = None) -> list[tuple[int, str]]:
        """At most ``limit`` pieces to start now, each with its parent, within each parent's
        free slots.

        Strategy order decides among pieces nobody fetches yet; when none is left (the
        endgame), a piece in flight from one slow parent may also be asked of another.
        """
        parents = [p for p, free in free_slots.items() if free > 0 and p in self.available]
        if not parents:
            return []
        digests, done, in_flight = self.digests, self.done, self.in_flight
        # What nobody fetches yet and could be checked on arrival; shrinks as pieces start.
        open_ = {
            n
            for n in range(self.piece_count)
            if digests[n] is not None and n not in done and n not in in_flight
        }
        if all(open_.isdisjoint(self.available[p]) for p in parents) and not self.endgame:
            return []  # the usual pass while parents fetch what they will offer next
        holders: Counter[int] = Counter()
        for pieces in self.available.values():
            holders.update(pieces)
        first_missing = self.first_missing()
        assignments: list[tuple[int, str]] = []
        self.rng.shuffle(parents)
        remaining = dict(free_slots)
        limit = sum(free_slots.values()) if limit is None else limit
        progress = True
        while progress and len(assignments) < limit:
            progress = False
            for parent in parents:
                if remaining[parent] <= 0 or len(assignments) >= limit:
                    continue
                piece = self._pick(parent, holders, open_, first_missing)
                if piece is None:
                    continue
                open_.discard(piece)
                self.in_flight.setdefault(piece, set()).add(parent)
                assignments.append((piece, parent))
                remaining[parent] -= 1
                progress = True
        return assignments

    def _pick(
        self, parent: str, holders: Counter[int], open_: set[int], first_missing: int
    ) -> int | None:
        offered = self.available[parent]
        fresh = [n for n in offered if n in open_]
        if fresh:
            view = PieceView(fresh, holders, first_missing, self.piece_count, self.rng)
            ordered = self.strategy(view)
            if ordered:
                return ordered[0]
        endgame = [
            n
            for n in offered
            if n not in self.done
            and len(self.in_flight.get(n, ())) == 1
            and parent not in self.in_flight[n]
            and self.digests[n] is not None
        ]
        # The endgame: only once every missing piece is being fetched, a slow one may be
        # asked of a second parent too.
        if endgame and self.endgame:
            choice: int = self.rng.choice(endgame)
            return choice
        return None

    def finished(self, number: int, parent: str) -> None:
        self.done.add(number)
        self.in_flight.pop(number, None)

    def failed(self, number: int, parent: str) -> None:
        parents = self.in_flight.get(number)
        if parents is not None:
            parents.discard(parent)
            if not parents:
                del self.in_flight[number]
