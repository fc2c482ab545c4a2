"""Super-seeding by grants: the seed's uplink sends each piece about once.

A seed's uplink is the scarcest in the swarm: every byte read from the origin leaves through
it. So a seed does not show children all it holds (they would all ask for the same pieces and
take turns being turned away); it grants one piece at a time to whichever child asks next, and
only when it has an upload slot free for it. A grant goes to a piece the child lacks and that
has left the seed the fewest times, so the first round sends every piece once, to different
children, who then trade them among themselves. A grant the child does not take lapses.

Pure: the upload server feeds it the clock and the pieces; ``encode``/``decode`` carry the
child's wanted pieces in a query parameter.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from swarmfly.errors import SwarmflyError

_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")
GRANT_SECONDS = 0.5
"""How long a granted piece stays reserved for the child it was granted to."""


@dataclass
class GrantBook:
    """One task's outstanding grants at a seed."""

    lease: float = GRANT_SECONDS
    pending: dict[int, float] = field(default_factory=dict)
    """Granted piece -> until when (monotonic) it is reserved."""

    def outstanding(self, now: float) -> int:
        """Grants not taken yet and not lapsed."""
        for number in [n for n, until in self.pending.items() if until <= now]:
            del self.pending[number]
        return len(self.pending)

    def grant(
        self,
        done: Iterable[int],
        served: Mapping[int, int],
        now: float,
        wanted: set[int] | None = None,
    ) -> int | None:
        """Reserve the piece to send next: one the child wants (any, when it did not say),
        sent the fewest times so far, not reserved for another child, lowest number first
        (children streaming a file in order get it in order)."""
        self.outstanding(now)
        choices = [n for n in done if n not in self.pending and (wanted is None or n in wanted)]
        if not choices:
            return None
        number = min(choices, key=lambda n: (served.get(n, 0), n))
        self.pending[number] = now + self.lease
        return number

    def taken(self, number: int) -> None:
        """The child asked for the piece's bytes: its reservation is used."""
        self.pending.pop(number, None)


def encode(pieces: Iterable[int], piece_count: int) -> str:
    """A set of piece numbers as an unpadded base64url bitmap (bit 7 of byte 0 = piece 0)."""
    bitmap = bytearray((piece_count + 7) // 8)
    for number in pieces:
        if 0 <= number < piece_count:
            bitmap[number // 8] |= 0x80 >> (number % 8)
    return base64.urlsafe_b64encode(bytes(bitmap)).rstrip(b"=").decode()


def decode(text: str, piece_count: int) -> set[int]:
    """The inverse of ``encode``; anything but a bitmap of exactly this task's size is a
    bad request."""
    size = (piece_count + 7) // 8
    if len(text) > (size * 4 + 2) // 3 or not _BASE64URL.fullmatch(text):
        raise SwarmflyError("bad_request", "piece bitmap is not this task's, in base64url")
    try:
        bitmap = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise SwarmflyError("bad_request", "piece bitmap is not base64url") from None
    if len(bitmap) != size:
        raise SwarmflyError("bad_request", "piece bitmap does not match the task's pieces")
    return {
        index * 8 + bit
        for index, byte in enumerate(bitmap)
        if byte
        for bit in range(8)
        if byte & (0x80 >> bit) and index * 8 + bit < piece_count
    }
