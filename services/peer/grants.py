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

    def release(self, number: int) -> None:
        """The child asked for the piece's bytes (its reservation is used), or declined it
        (it has the piece by now)."""
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


DELEGATION_SECONDS = 15.0
"""At least this long a delegated piece waits for its child before the seed reads it."""
ABANDON_SECONDS = 5.0
"""A child that names itself and has not asked the seed for this long is gone (a live one
asks again at least every ``SEED_POLL_WAIT``, 2 s): what it was lent is read or gathered
without waiting for its time to run out."""


@dataclass
class Delegation:
    """A seed reading a task from the origin, lending the origin's spare capacity.

    The seed's uplink is slower than most origins: while it has no slot free, a waiting child
    is told to read one piece nobody has read yet from the origin itself (the highest-numbered
    one: the seed reads from the start). Every piece is still read from the origin once; the
    seed takes the delegated ones from the swarm afterwards, and reads a piece itself when
    its child did not deliver it in time.
    """

    piece_count: int
    etag: str | None = None
    limit: int = 8
    """Delegated pieces being read at once."""
    per_child: int = 4
    """Of those, at most this many by one child (that named itself): a child that dies or
    leaves takes few unread pieces with it, each read again."""
    window: int = 4
    """Lend only while the seed's reading runs this far ahead of its uplink (``ahead``):
    when the origin is the slower side, a lent piece would only share its bandwidth."""
    lease: float = DELEGATION_SECONDS
    """Raised by the seed to a few times what a piece takes it to read: on a slow origin a
    child reading a lent piece must not be taken for a child that failed."""
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
    """Child -> when it last asked (or its ask ended)."""
    lost: set[int] = field(default_factory=set)
    """Delivered pieces the swarm no longer holds (``unheld``)."""
    _next: int = 0
    """Every piece below is done, being read by the seed, or lent."""
    _top: int = -1
    """Every piece above is done, being read by the seed, or lent."""

    def __post_init__(self) -> None:
        self._top = self.piece_count - 1

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

    def unheld(self, found: set[int], now: float) -> None:
        """``found``: the pieces the swarm's holders have now. A delivered piece none of them
        has, from a child that went away, is lost to the swarm: the seed reads it."""
        self.lost.update(
            n for n in self.delivered - found if n in self.pending and self.gone(n, now)
        )

    def _taken(self, number: int, done: set[int]) -> bool:
        return number in done or number in self.reading or number in self.pending

    def lend(
        self,
        done: set[int],
        served: Mapping[int, int],
        wanted: set[int],
        now: float,
        child: str | None = None,
    ) -> int | None:
        """A piece for a waiting child to read from the origin, or None."""
        if not self.open:
            return None
        elsewhere = self.reading_elsewhere(now)
        if len(elsewhere) >= self.limit:
            return None
        if child is not None and (
            sum(self.lent_to.get(n) == child for n in elsewhere) >= self.per_child
        ):
            return None
        if self.ahead(done, served) < self.window:
            return None
        while self._top >= self._next and self._taken(self._top, done):
            self._top -= 1
        for number in range(self._top, self._next - 1, -1):
            if number in wanted and not self._taken(number, done):
                self.pending[number] = now + self.lease
                if child is not None:
                    self.lent_to[number] = child
                    self.seen.setdefault(child, now)
                return number
        return None

    def claim(self, done: set[int], now: float) -> int | None:
        """The next piece for the seed to read: a lent piece whose child did not deliver in
        time, else the lowest one nobody has or reads."""
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

    def ahead(self, done: set[int], served: Mapping[int, int]) -> int:
        """Pieces the seed read (or reads) and has not sent yet: how far its reading runs
        ahead of its uplink. While children ask, what runs further ahead is better lent."""
        return len(self.reading) + sum(1 for n in done if not served.get(n))

    def waiting(self, done: set[int], now: float) -> bool:
        """Some lent piece the seed lacks is still to come from a child or from holders."""
        return any(n not in done for n in self.held_off(now))
