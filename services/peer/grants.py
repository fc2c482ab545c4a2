"""Super-seeding by grants: the seed's uplink sends each piece about once.

A seed's uplink is the scarcest in the swarm: every byte read from the origin leaves through
it. So a seed does not show children all it holds (they would all ask for the same pieces and
take turns being turned away); it grants one piece at a time to whichever child asks next, and
only when it has an upload slot free for it. A grant goes to a piece the child lacks and that
has left the seed the fewest times, so the first round sends every piece once, to different
children, who then trade them among themselves. A grant the child does not take lapses.

Pure: ``GrantDesk`` is the seed's side of its upload server (which feeds it the clock, the
polls and its load) and of the simulator alike; ``encode``/``decode`` carry the child's wanted
pieces in a query parameter.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from swarmfly.services.peer.lending import Lending

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
        done: Collection[int],
        served: Mapping[int, int],
        now: float,
        wanted: Collection[int] | None = None,
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


class SeedTask(Protocol):
    """What the desk reads of a task (``StoredTask``; the simulator's own)."""

    @property
    def id(self) -> str: ...
    @property
    def done(self) -> Collection[int]: ...
    @property
    def served(self) -> Mapping[int, int]: ...
    @property
    def lending(self) -> Lending | None: ...


@dataclass(frozen=True)
class Granted:
    """Take this piece's bytes from the seed: a slot is reserved for it."""

    number: int


@dataclass(frozen=True)
class Lent:
    """Read this piece from the origin yourself (pinned to the seed's ETag), and say so."""

    number: int
    etag: str | None


@dataclass(eq=False)
class Poll:
    """A child's poll waiting for its turn."""

    task: SeedTask
    wanted: Collection[int] | None
    """The pieces it lacks, when it said (only then can it be lent one)."""
    child: str | None = None
    """The peer id its capability names (or it gave): whose liveness a lent piece follows."""
    borrows: bool = True
    """It may be lent pieces (a child that does not read the origin says not)."""
    answer: Granted | Lent | None = None


class GrantDesk:
    """A seed's grants across its tasks: polls wait their turn, oldest first, and each
    grant holds one of the uplink's places (``capacity``) until its child takes the bytes,
    declines, or lets it lapse. Once no place is free, a waiting child that said what it
    wants and who it is may be lent a piece to read from the origin (``lending``)."""

    def __init__(self, capacity: int, lease: float = GRANT_SECONDS) -> None:
        self.capacity = capacity
        self.lease = lease
        self._books: dict[str, GrantBook] = {}
        self._waiting: dict[Poll, None] = {}
        """An ordered set: a seed with thousands of children removes each in constant time."""

    @property
    def waiting(self) -> bool:
        return bool(self._waiting)

    @property
    def books(self) -> int:
        """Tasks with grants outstanding (or that had some at the last ``reserved``)."""
        return len(self._books)

    def reserved(self, load: int, now: float) -> int:
        """Places promised: ``load`` (uploads under way or queued) plus grants not taken
        yet. A task's book goes once nothing in it is outstanding: the books are the tasks
        with a grant pending (at most one per place), not every task ever granted."""
        pending = 0
        for task_id, book in list(self._books.items()):
            if outstanding := book.outstanding(now):
                pending += outstanding
            else:
                del self._books[task_id]
        return load + pending

    def full(self, load: int, now: float) -> bool:
        return self.reserved(load, now) >= self.capacity

    def ask(self, poll: Poll, now: float, declined: int | None = None) -> None:
        """A child's poll arrives; ``declined``: the piece it was granted and got elsewhere
        (its place is free again)."""
        if declined is not None:
            self.taken(poll.task.id, declined)
        lending = poll.task.lending
        if lending is not None:
            lending.asked(poll.child, now, poll.borrows)
        self._waiting[poll] = None

    def withdraw(self, poll: Poll, now: float) -> None:
        """The poll ended, answered or not."""
        self._waiting.pop(poll, None)
        lending = poll.task.lending
        if lending is not None:
            lending.ended(poll.child, now, poll.borrows)

    def taken(self, task_id: str, number: int) -> None:
        """A child asked for a piece's bytes: a grant of it holds its place already."""
        book = self._books.get(task_id)
        if book is not None:
            book.release(number)

    def dispatch(self, load: int, now: float) -> list[Poll]:
        """Answer waiting polls, oldest first, while places are free: a child that wants
        nothing available now lets the next one go ahead. Returns the polls answered; a
        grant lapses after ``lease`` (dispatch again then)."""
        answered: list[Poll] = []
        reserved = self.reserved(load, now)  # once: each grant below adds one
        for poll in list(self._waiting):
            task = poll.task
            lending = task.lending
            if reserved < self.capacity:
                book = self._books.setdefault(task.id, GrantBook(self.lease))
                number = book.grant(task.done, task.served, now, poll.wanted)
                if number is not None:
                    reserved += 1
                    poll.answer = Granted(number)
            # The uplink is full, or nothing is here for the task's sole child: lend. (Only
            # to a child that said what it wants, so it can take one, and who it is: only the
            # child named may vouch for the piece.)
            if (
                poll.answer is None
                and lending is not None
                and (reserved >= self.capacity or lending.sole(now) == poll.child)
                and poll.wanted is not None
                and poll.child is not None
                and poll.borrows
            ):
                number = lending.lend(task.done, task.served, poll.wanted, now, poll.child)
                if number is not None:
                    poll.answer = Lent(number, lending.etag)
            if poll.answer is not None:
                del self._waiting[poll]
                answered.append(poll)
        return answered
