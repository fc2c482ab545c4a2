"""What a download tells its scheduler, as a pure core: piece reports batched, the task's
layout once (from its reader), and a lending seed's loans, each told once per scheduler
that knows the download.

The conductor sends a ``Batch`` every ``REPORT_INTERVAL`` and says how it went (``sent``,
``failed``); the core says what follows a failure: send it again, announce everything held
(the scheduler lost the download), or drop it (refused for good).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from swarmfly.contracts import messages

REPORT_INTERVAL = 0.05
"""Seconds between batches: a piece's report waits this long at most."""
REPORT_BATCH = 2048
"""Piece reports per request: with digests, 2048 stay well inside the request size limit."""

AfterFailure = Literal["retry", "rejoin", "drop"]


@dataclass(frozen=True)
class Batch:
    pieces: list[messages.PieceReport]
    layout: bool
    """The task's size and piece layout go with it (the download reads the origin)."""
    lent: list[messages.LentPiece]


@dataclass
class Reports:
    pending: list[messages.PieceReport] = field(default_factory=list)
    layout: bool = False
    """The layout is still to be told."""
    told: set[int] = field(default_factory=set)
    """Lent pieces the scheduler knows the child of."""

    def piece(self, report: messages.PieceReport) -> None:
        self.pending.append(report)

    def tell_layout(self) -> None:
        self.layout = True

    def due(self, lent_to: Mapping[int, str]) -> Batch | None:
        """The next batch, or None with nothing to tell; ``lent_to``: a lending seed's
        loans (piece -> child), of which the scheduler hears a lent child's digest only."""
        fresh = [messages.LentPiece(n, c) for n, c in lent_to.items() if n not in self.told]
        if not (self.pending or self.layout or fresh):
            return None
        pieces, self.pending = self.pending[:REPORT_BATCH], self.pending[REPORT_BATCH:]
        return Batch(pieces, self.layout, fresh[:REPORT_BATCH])

    def sent(self, batch: Batch) -> None:
        if batch.layout:
            self.layout = False
        self.told.update(item.number for item in batch.lent)

    def failed(self, batch: Batch, code: str) -> AfterFailure:
        """What a failed batch calls for, by the error's code."""
        if code == "not_found":
            # A scheduler that does not know the download: everything held is announced
            # again, and it knows none of the loans either.
            self.rejoined()
            return "rejoin"
        if code in ("unavailable", "timeout"):
            self.pending = batch.pieces + self.pending
            return "retry"
        return "drop"  # refused for good (a digest known otherwise): it would be again

    def rejoined(self) -> None:
        """A scheduler that has just heard of the download knows none of its loans."""
        self.told.clear()
