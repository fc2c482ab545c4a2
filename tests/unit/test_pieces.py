"""The peer's pure piece bookkeeping: which piece to fetch from which parent."""

from __future__ import annotations

import hashlib
import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from swarmfly.plugins.strategies.builtin import rarest_first, sequential
from swarmfly.services.peer.pieces import PieceBook


def digest(number: int) -> str:
    return hashlib.sha256(f"piece {number}".encode()).hexdigest()


def make_book(count: int, *, done: set[int] | None = None, seed: int = 0) -> PieceBook:
    return PieceBook(
        count,
        done=set(done or ()),
        digests=[digest(n) for n in range(count)],
        strategy=rarest_first,
        rng=random.Random(seed),
    )


def per_parent(assignments: list[tuple[int, str]]) -> Counter[str]:
    return Counter(parent for _, parent in assignments)


# -- slots and availability ----------------------------------------------------------------


def test_assignments_fill_each_parents_free_slots() -> None:
    book = make_book(20)
    book.update_parent("a", set(range(20)))
    book.update_parent("b", set(range(20)))
    assignments = book.assign({"a": 3, "b": 2})
    assert per_parent(assignments) == {"a": 3, "b": 2}
    pieces = [n for n, _ in assignments]
    assert len(set(pieces)) == 5  # far from the end: no piece twice


def test_parents_without_slots_or_without_a_piece_list_get_nothing() -> None:
    book = make_book(10)
    book.update_parent("a", set(range(10)))
    book.update_parent("full", set(range(10)))
    assignments = book.assign({"a": 1, "full": 0, "unknown": 5})
    assert assignments and per_parent(assignments) == {"a": 1}


def test_a_parent_gets_only_as_many_pieces_as_it_has() -> None:
    book = make_book(10)
    book.update_parent("a", {7})
    assert book.assign({"a": 4}) == [(7, "a")]


def test_a_piece_is_only_asked_of_a_parent_that_has_it() -> None:
    book = make_book(40)
    book.update_parent("even", set(range(0, 40, 2)))
    book.update_parent("odd", set(range(1, 40, 2)))
    assignments = book.assign({"even": 8, "odd": 8})
    assert len(assignments) == 16
    for number, parent in assignments:
        assert number % 2 == (0 if parent == "even" else 1)


def test_done_pieces_are_never_assigned() -> None:
    book = make_book(20, done=set(range(18)))
    book.update_parent("a", set(range(20)))
    assert sorted(book.assign({"a": 10})) == [(18, "a"), (19, "a")]
    assert book.assign({"a": 10}) == []


def test_pieces_without_a_digest_are_never_assigned() -> None:
    book = make_book(6)
    book.digests[1] = book.digests[4] = None
    book.update_parent("a", set(range(6)))
    assert book.needs_digests()
    assigned = {n for n, _ in book.assign({"a": 10})}
    assert assigned == {0, 2, 3, 5}

    book.digests[1] = digest(1)
    book.digests[4] = digest(4)
    assert not book.needs_digests()
    assert {n for n, _ in book.assign({"a": 10})} == {1, 4}


def test_no_digests_given_means_none_known() -> None:
    book = PieceBook(3, strategy=rarest_first, rng=random.Random(0))
    assert book.digests == [None, None, None]
    book.update_parent("a", {0, 1, 2})
    assert book.needs_digests()
    assert book.assign({"a": 3}) == []


def test_needs_digests_ignores_pieces_already_done() -> None:
    book = PieceBook(3, done={1}, strategy=rarest_first, rng=random.Random(0))
    book.update_parent("a", {1})
    assert not book.needs_digests()


def test_update_parent_ignores_pieces_out_of_range() -> None:
    book = make_book(4)
    book.update_parent("a", {-1, 0, 3, 4, 100})
    assert book.available["a"] == {0, 3}
    assert {n for n, _ in book.assign({"a": 10})} == {0, 3}


def test_update_parent_replaces_what_the_parent_had() -> None:
    book = make_book(4)
    book.update_parent("a", {0, 1})
    book.update_parent("a", {2})
    assert book.assign({"a": 4}) == [(2, "a")]


# -- order ---------------------------------------------------------------------------------


def test_rarest_pieces_are_picked_first() -> None:
    book = make_book(4)
    book.update_parent("a", {0, 1, 2, 3})
    book.update_parent("b", {1, 2, 3})
    book.update_parent("c", {2, 3})
    book.update_parent("d", {3})
    # Holders: piece 0 -> 1, piece 1 -> 2, piece 2 -> 3, piece 3 -> 4.
    assert [n for n, _ in book.assign({"a": 4})] == [0, 1, 2, 3]


def test_rarest_first_spreads_parents_over_rare_pieces() -> None:
    book = make_book(6)
    book.update_parent("a", {0, 1, 2, 3, 4, 5})
    book.update_parent("b", {0, 1, 2, 3, 4, 5})
    book.update_parent("c", {0, 1})
    # 2..5 have two holders, 0 and 1 three: a and b start with the rarer ones.
    first = {n for n, p in book.assign({"a": 1, "b": 1})}
    assert first <= {2, 3, 4, 5}


def test_the_strategy_decides_the_order() -> None:
    book = PieceBook(
        8, digests=[digest(n) for n in range(8)], strategy=sequential, rng=random.Random(0)
    )
    book.update_parent("a", set(range(8)))
    assert [n for n, _ in book.assign({"a": 8})] == list(range(8))


def test_assignment_is_deterministic_for_a_seeded_random() -> None:
    def run(seed: int) -> list[tuple[int, str]]:
        book = make_book(50, seed=seed)
        for parent in "abcd":
            book.update_parent(parent, set(range(50)))
        return book.assign({"a": 3, "b": 3, "c": 3, "d": 3})

    assert run(7) == run(7)


# -- endgame -------------------------------------------------------------------------------


def test_endgame_duplicates_in_flight_pieces_near_the_end() -> None:
    book = make_book(10, done=set(range(8)))
    book.update_parent("a", set(range(10)))
    book.update_parent("b", set(range(10)))
    assert sorted(book.assign({"a": 2})) == [(8, "a"), (9, "a")]

    assert sorted(book.assign({"b": 4})) == [(8, "b"), (9, "b")]
    assert book.in_flight == {8: {"a", "b"}, 9: {"a", "b"}}
    # Two copies at most: a third parent gets nothing.
    book.update_parent("c", set(range(10)))
    assert book.assign({"c": 4}) == []


def test_endgame_never_asks_the_same_parent_twice() -> None:
    book = make_book(3, done={0, 1})
    book.update_parent("a", {2})
    assert book.assign({"a": 4}) == [(2, "a")]
    assert book.assign({"a": 4}) == []


def test_no_duplicate_fetch_far_from_the_end() -> None:
    book = make_book(100)
    book.update_parent("a", {0})
    book.update_parent("b", {0})
    assert book.assign({"a": 1}) == [(0, "a")]
    assert book.assign({"b": 1}) == []


def test_endgame_starts_once_every_missing_piece_is_in_flight() -> None:
    book = make_book(12, done=set(range(6)))
    for parent in "ab":
        book.update_parent(parent, set(range(12)))
    assert len(book.assign({"a": 5})) == 5
    fresh = book.assign({"b": 1})
    assert len(fresh) == 1 and book.in_flight[fresh[0][0]] == {"b"}, "a fresh piece first"
    assert book.missing() <= book.in_flight.keys()
    duplicate = book.assign({"b": 1})
    assert len(duplicate) == 1 and book.in_flight[duplicate[0][0]] == {"a", "b"}


# -- failures and completion -----------------------------------------------------------------


def test_drop_parent_returns_its_in_flight_pieces() -> None:
    book = make_book(20)
    book.update_parent("a", set(range(20)))
    book.update_parent("b", set(range(20)))
    from_a = {n for n, p in book.assign({"a": 3, "b": 2}) if p == "a"}
    assert set(book.drop_parent("a")) == from_a
    assert "a" not in book.available
    assert all("a" not in parents for parents in book.in_flight.values())
    # The lost pieces can be fetched from someone else.
    again = {n for n, _ in book.assign({"b": 20})}
    assert from_a <= again


def test_drop_parent_keeps_an_endgame_copy_in_flight() -> None:
    book = make_book(2, done={0})
    book.update_parent("a", {1})
    book.update_parent("b", {1})
    book.assign({"a": 1})
    book.assign({"b": 1})
    assert book.drop_parent("a") == [1]
    assert book.in_flight == {1: {"b"}}


def test_drop_of_an_unknown_parent_is_harmless() -> None:
    book = make_book(2)
    assert book.drop_parent("nobody") == []


def test_a_failed_piece_can_be_assigned_again() -> None:
    book = make_book(1)
    book.update_parent("a", {0})
    assert book.assign({"a": 1}) == [(0, "a")]
    assert book.assign({"a": 1}) == []
    book.failed(0, "a")
    assert book.in_flight == {}
    assert book.assign({"a": 1}) == [(0, "a")]


def test_failed_of_a_piece_not_in_flight_is_harmless() -> None:
    book = make_book(2)
    book.failed(0, "a")
    assert book.in_flight == {}


def test_finished_pieces_complete_the_book() -> None:
    book = make_book(3)
    book.update_parent("a", {0, 1, 2})
    assert not book.complete
    assert book.missing() == {0, 1, 2}
    for number, parent in book.assign({"a": 3}):
        book.finished(number, parent)
    assert book.complete
    assert book.missing() == set()
    assert book.in_flight == {}
    assert book.assign({"a": 3}) == []


def test_finishing_one_endgame_copy_ends_the_piece() -> None:
    book = make_book(2, done={0})
    book.update_parent("a", {1})
    book.update_parent("b", {1})
    book.assign({"a": 1})
    book.assign({"b": 1})
    book.finished(1, "b")
    assert book.complete
    assert book.in_flight == {}
    book.failed(1, "a")  # the losing copy reports later
    assert book.complete


def test_an_empty_task_is_complete() -> None:
    assert PieceBook(0, strategy=rarest_first, rng=random.Random(0)).complete


# -- invariants ----------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    count=st.integers(min_value=1, max_value=30),
    data=st.data(),
    seed=st.integers(0, 2**16),
)
def test_assignments_always_respect_the_rules(count: int, data: st.DataObject, seed: int) -> None:
    pieces = st.sets(st.integers(min_value=0, max_value=count - 1))
    book = PieceBook(count, done=data.draw(pieces), strategy=rarest_first, rng=random.Random(seed))
    unknown = data.draw(pieces)
    book.digests = [None if n in unknown else digest(n) for n in range(count)]
    parents = data.draw(st.lists(st.sampled_from("abcdef"), unique=True, max_size=6))
    for parent in parents:
        book.update_parent(parent, data.draw(pieces))
    free = {p: data.draw(st.integers(min_value=0, max_value=5)) for p in parents}

    for _ in range(2):  # a second round sees the first round's pieces in flight
        before = {n: set(ps) for n, ps in book.in_flight.items()}
        assignments = book.assign(free)
        assert len(set(assignments)) == len(assignments)
        for parent, used in per_parent(assignments).items():
            assert used <= free[parent]
        for number, parent in assignments:
            assert number in book.available[parent]
            assert number not in book.done
            assert book.digests[number] is not None
            assert parent not in before.get(number, set())
        for parents_now in book.in_flight.values():
            assert 1 <= len(parents_now) <= 2
            if len(parents_now) == 2:
                assert book.missing() <= book.in_flight.keys()


def test_a_seed_is_asked_for_what_is_missing_and_not_in_flight_until_the_endgame() -> None:
    book = PieceBook(4, done={0}, digests=["d"] * 4, strategy=rarest_first, rng=random.Random(0))
    book.update_parent("a", {1, 2, 3})
    assert book.wanted() == {1, 2, 3}
    book.assign({"a": 2})  # two of the three in flight
    assert book.wanted() == {1, 2, 3} - book.in_flight.keys()
    assert not book.endgame
    book.assign({"a": 1})
    # Every missing piece is on its way: any of them may be granted, to race the slowest.
    assert book.endgame
    assert book.wanted() == {1, 2, 3}
