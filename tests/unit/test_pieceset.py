"""PieceSet behaves as the set of piece numbers it stands for."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from swarmfly.services.scheduler.pieceset import PieceSet

numbers = st.sets(st.integers(0, 600), max_size=80)


@given(a=numbers, b=numbers, n=st.integers(0, 600))
def test_it_answers_as_the_set_would(a: set[int], b: set[int], n: int) -> None:
    bits, other = PieceSet(a), PieceSet(b)
    assert (len(bits), bool(bits), n in bits, list(bits)) == (len(a), bool(a), n in a, sorted(a))
    assert bits - other == a - b and bits - b == a - b and a - bits == a - a
    assert (b - bits) == b - a and isinstance(b - bits, set)
    assert bits | other == a | b and bits & other == a & b
    grown = bits.copy()
    grown |= b
    grown -= {n}
    assert grown == (a | b) - {n} and len(grown) == len((a | b) - {n})
    assert bits == a, "a copy changed the original"
    grown.add(n)
    assert n in grown
    grown.discard(n)
    assert n not in grown and PieceSet(grown) == grown


def test_only_piece_numbers_are_members() -> None:
    bits = PieceSet({0, 3})
    assert -1 not in bits and "3" not in bits and 3 in bits
    assert repr(bits) == "PieceSet([0, 3])" and PieceSet() == set()


def test_count_missing_is_the_size_of_the_difference() -> None:
    have, lack = PieceSet([0, 3, 5, 200]), PieceSet([3, 7])
    assert have.count_missing(lack) == len(have - lack) == 3
    assert lack.count_missing(have) == 1
    assert PieceSet().count_missing(have) == 0
