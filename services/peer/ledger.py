"""The digests a download checks its pieces against, and on whose word each one stands: a
pure core beside ``swarming`` (the conductor feeds it the scheduler's pages of digests).

A digest is the task's reader's (the seed's, read from the origin) unless the scheduler marks
it provisional: only the child a seed lent the piece to vouches for it. The whole file's
digest settles everything in the end; until then the ledger remembers which pieces were
taken on someone's word, so that a file that fails its digest reads only those again.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

DIGEST_POLL = 0.1
"""Seconds a download that lacks digests waits for a push before it polls for them."""


@dataclass
class DigestLedger:
    provisional: set[int] = field(default_factory=set)
    """Pieces whose digest only the child they were lent to vouches for."""
    refuted: dict[int, str] = field(default_factory=dict)
    """Pieces held whose digest the scheduler now states otherwise (its digest): taken on a
    lent child's word, and the seed has since read them."""
    lent_out: set[int] = field(default_factory=set)
    """A lending seed: every piece it lent (their digests are the lent children's word)."""
    unvouched: set[int] = field(default_factory=set)
    """A seed: pieces it took from holders with no digest known (a lent child that left
    before it reported one, or a scheduler that knew the lent child's word lost it with its
    partition). The whole file's digest proves them; this seed reports them then."""
    came_from: dict[int, str] = field(default_factory=dict)
    """Piece -> the parent that served it: whom a piece that proves false accuses."""
    came_at: float = -math.inf
    """When digests last came (pushed or polled)."""

    def take(
        self,
        start: int,
        digests: Sequence[str | None],
        provisional: Collection[int],
        *,
        known: list[str | None],
        held: Collection[int],
        now: float,
    ) -> list[int]:
        """A page of the scheduler's digests, from piece ``start``, into ``known``: a digest
        learned is kept; where the page disagrees, a piece held is refuted, and a piece not
        held takes the page's (a lent child's word the seed has since refuted: every honest
        parent's bytes, and the origin's, would fail the old one). Returns the pieces whose
        digest in ``known`` changed."""
        self.came_at = now
        if start < 0 or start + len(digests) > len(known):
            return []  # not this layout: the next page says
        changed = []
        for number, digest in enumerate(digests, start):
            if not digest or known[number] == digest:
                continue
            if known[number] is not None and number in held:
                self.refuted[number] = digest
                continue
            known[number] = digest
            changed.append(number)
        page = range(start, start + len(digests))
        self.provisional = {n for n in self.provisional if n not in page}
        self.provisional.update(n for n in provisional if n in page)
        return changed

    def offset(self, known: Sequence[str | None]) -> int:
        """The first piece whose digest may still come or change (unknown, or only a lent
        child's word): where the next page should start; ``len(known)`` when none may."""
        unknown = next((n for n, digest in enumerate(known) if digest is None), len(known))
        return min(unknown, min(self.provisional, default=unknown))

    def poll_due(self, now: float) -> bool:
        """No digests came for ``DIGEST_POLL``: ask for them rather than wait for a push."""
        return now - self.came_at > DIGEST_POLL

    def poll_in(self, now: float) -> float:
        """Seconds until ``poll_due``: a download lacking digests looks again then."""
        return self.came_at + DIGEST_POLL - now

    def vouched(self, number: int) -> bool:
        """Only a lent child's word: no test of bytes read from the origin ourselves."""
        return number in self.provisional

    def suspects(self) -> list[int]:
        """What to read again when the whole file fails its digest."""
        return sorted(self.refuted.keys() | self.provisional | self.lent_out | self.unvouched)
