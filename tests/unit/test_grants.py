"""Super-seeding grants: each piece leaves the seed about once, and the desk gives each child
its turn and never promises more places than the uplink has."""

from __future__ import annotations

from dataclasses import dataclass, field

from swarmfly.services.peer.grants import GrantBook, GrantDesk, Granted, Lent, Poll
from swarmfly.services.peer.lending import Lending


def test_grants_go_to_the_least_sent_piece_then_the_lowest_number() -> None:
    book = GrantBook(lease=1.0)
    served = {0: 2, 1: 1, 2: 1, 3: 0}
    assert book.grant(range(4), served, now=0.0) == 3
    assert book.grant(range(4), served, now=0.0) == 1  # 3 is reserved; 1 and 2 tie
    assert book.grant(range(4), served, now=0.0) == 2
    assert book.grant(range(4), served, now=0.0) == 0
    assert book.grant(range(4), served, now=0.0) is None  # all reserved
    assert book.outstanding(0.5) == 4


def test_a_grant_lapses_after_its_lease_and_a_taken_one_is_released() -> None:
    book = GrantBook(lease=1.0)
    assert book.grant([5, 6], {}, now=0.0) == 5
    assert book.grant([5, 6], {}, now=0.5) == 6
    book.release(6)
    assert book.outstanding(0.9) == 1
    assert book.outstanding(1.0) == 0  # 5 lapsed
    assert book.grant([5, 6], {6: 1}, now=1.0) == 5


def test_only_wanted_pieces_are_granted() -> None:
    book = GrantBook()
    assert book.grant(range(10), {}, now=0.0, wanted={8, 9}) == 8
    assert book.grant(range(10), {}, now=0.0, wanted={8}) is None
    assert book.grant(range(10), {}, now=0.0, wanted=set()) is None


# -- the desk: a seed's polls, its places, and lending once they are full ------------------


@dataclass
class Task:
    id: str
    done: set[int] = field(default_factory=set)
    served: dict[int, int] = field(default_factory=dict)
    lending: Lending | None = None


def test_polls_are_answered_oldest_first_while_places_are_free() -> None:
    desk = GrantDesk(capacity=2, lease=1.0)
    task = Task("t", done={0, 1, 2})
    polls = [Poll(task, None, f"c{n}") for n in range(3)]
    for poll in polls:
        desk.ask(poll, now=0.0)
    assert desk.dispatch(load=0, now=0.0) == polls[:2]
    assert [p.answer for p in polls] == [Granted(0), Granted(1), None]
    assert desk.waiting and desk.full(load=0, now=0.5)
    # A grant taken (its bytes asked for) holds a place as an upload (load) from then on.
    desk.taken("t", 0)
    task.served[0] = 1
    assert desk.dispatch(load=1, now=0.5) == []
    assert desk.dispatch(load=0, now=0.5) == [polls[2]]  # the upload ended
    assert polls[2].answer == Granted(2)  # 0 left once, 1 is reserved


def test_a_child_that_wants_nothing_available_lets_the_next_go_ahead() -> None:
    desk = GrantDesk(capacity=4)
    task = Task("t", done={0, 1})
    picky, easy = Poll(task, {7}), Poll(task, {1})
    desk.ask(picky, now=0.0)
    desk.ask(easy, now=0.0)
    assert desk.dispatch(load=0, now=0.0) == [easy]
    assert picky.answer is None and desk.waiting
    desk.withdraw(picky, now=2.0)
    assert not desk.waiting


def test_a_grant_declined_or_lapsed_frees_its_place() -> None:
    desk = GrantDesk(capacity=1, lease=1.0)
    task = Task("t", done={0, 1})
    first = Poll(task, None)
    desk.ask(first, now=0.0)
    assert desk.dispatch(load=0, now=0.0) == [first]
    second = Poll(task, None)
    desk.ask(second, now=0.1)
    assert desk.dispatch(load=0, now=0.1) == []
    assert desk.dispatch(load=0, now=1.0) == [second]  # the first grant lapsed
    third = Poll(task, None)
    desk.ask(third, now=1.1, declined=second.answer.number if second.answer else None)
    assert desk.dispatch(load=0, now=1.1) == [third]  # the second child got it elsewhere
    assert desk.books == 1


def test_books_go_once_nothing_in_them_is_outstanding() -> None:
    desk = GrantDesk(capacity=64, lease=1.0)
    for n in range(50):
        poll = Poll(Task(f"t{n}", done={0}), None)
        desk.ask(poll, now=0.0)
    assert len(desk.dispatch(load=0, now=0.0)) == 50
    assert desk.books == 50
    assert desk.reserved(load=3, now=2.0) == 3
    assert desk.books == 0


def test_once_full_a_named_child_that_said_what_it_wants_is_lent_a_piece() -> None:
    lending = Lending(8, etag='"v1"', limit=2, window=0)
    task = Task("t", done={0}, lending=lending)
    desk = GrantDesk(capacity=1)
    granted, anonymous, vague, named = (
        Poll(task, {0, 5, 6, 7}, "a"),
        Poll(task, {5, 6, 7}),
        Poll(task, None, "c"),
        Poll(task, {5, 6, 7}, "d"),
    )
    for poll in (granted, anonymous, vague, named):
        desk.ask(poll, now=0.0)
    assert desk.dispatch(load=0, now=0.0) == [granted, named]
    assert (granted.answer, named.answer) == (Granted(0), Lent(7, '"v1"'))
    assert lending.lent_to == {7: "d"} and lending.polled_at == 0.0
    desk.withdraw(named, now=1.5)
    assert lending.seen["d"] == 1.5  # it waited at the desk until then: alive


def test_a_child_that_does_not_read_the_origin_is_never_lent_a_piece() -> None:
    """dfget's --disable-back-to-source: the child says ``borrow=0``; it waits its turn."""
    lending = Lending(8, etag='"v1"', limit=2, window=0)
    task = Task("t", done={0}, lending=lending)
    desk = GrantDesk(capacity=1)
    granted, offline, named = (
        Poll(task, {0, 5, 6, 7}, "a"),
        Poll(task, {5, 6, 7}, "b", borrows=False),
        Poll(task, {5, 6, 7}, "d"),
    )
    for poll in (granted, offline, named):
        desk.ask(poll, now=0.0)
    assert desk.dispatch(load=0, now=0.0) == [granted, named]
    assert offline.answer is None and "b" not in lending.lent_to.values()
