"""Built-in piece-selection strategies: pure orderings of candidate pieces."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from swarmfly.plugins.strategies.builtin import (
    STRATEGIES,
    Strategy,
    random_order,
    rarest_first,
    sequential,
)

CANDIDATES = st.lists(st.integers(min_value=0, max_value=10_000), unique=True, max_size=200)
HOLDERS = st.dictionaries(st.integers(min_value=0, max_value=10_000), st.integers(0, 50))


@given(candidates=CANDIDATES, holders=HOLDERS, seed=st.integers())
def test_rarest_first_orders_by_holder_count(
    candidates: list[int], holders: dict[int, int], seed: int
) -> None:
    out = rarest_first(candidates, holders, random.Random(seed))
    assert Counter(out) == Counter(candidates)
    counts = [holders.get(n, 0) for n in out]
    assert counts == sorted(counts)


def test_rarest_first_puts_unheld_pieces_first() -> None:
    out = rarest_first([1, 2, 3], {1: 5, 2: 1}, random.Random(0))
    assert out == [3, 2, 1]


def test_rarest_first_breaks_ties_at_random() -> None:
    candidates = list(range(20))
    orders = {tuple(rarest_first(candidates, {}, random.Random(s))) for s in range(10)}
    assert len(orders) > 1


@given(candidates=CANDIDATES, holders=HOLDERS)
def test_sequential_is_ascending(candidates: list[int], holders: dict[int, int]) -> None:
    assert sequential(candidates, holders, random.Random(0)) == sorted(candidates)


def test_sequential_ignores_holders() -> None:
    assert sequential([5, 1, 3], {1: 9, 3: 0, 5: 4}, random.Random(0)) == [1, 3, 5]


@given(candidates=CANDIDATES, seed=st.integers())
def test_random_order_is_a_permutation(candidates: list[int], seed: int) -> None:
    out = random_order(candidates, {}, random.Random(seed))
    assert sorted(out) == sorted(candidates)


def test_random_order_does_not_change_its_input() -> None:
    candidates = (3, 1, 2)
    random_order(candidates, {}, random.Random(0))
    assert candidates == (3, 1, 2)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
@given(candidates=CANDIDATES, holders=HOLDERS, seed=st.integers())
def test_every_strategy_is_deterministic_for_a_seeded_random(
    name: str, candidates: list[int], holders: dict[int, int], seed: int
) -> None:
    strategy: Strategy = STRATEGIES[name]
    first = strategy(candidates, holders, random.Random(seed))
    second = strategy(candidates, holders, random.Random(seed))
    assert first == second
    assert sorted(first) == sorted(candidates)


def test_strategies_are_registered_by_their_documented_names() -> None:
    assert dict(STRATEGIES) == {
        "rarest-first": rarest_first,
        "sequential": sequential,
        "random": random_order,
    }


@pytest.mark.parametrize("strategy", [rarest_first, sequential, random_order])
def test_no_candidates_gives_nothing(strategy: Strategy) -> None:
    assert strategy([], {}, random.Random(0)) == []
