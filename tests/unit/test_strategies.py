"""Built-in piece-selection strategies: pure functions over a PieceView."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from swarmfly.pluginhost import Plugins
from swarmfly.plugins.strategies.builtin import (
    SEQUENTIAL_WINDOW,
    random_order,
    rarest_first,
    sequential,
)
from swarmfly.plugintypes import PieceView

CANDIDATES = st.lists(st.integers(min_value=0, max_value=10_000), unique=True, max_size=200)
HOLDERS = st.dictionaries(st.integers(min_value=0, max_value=10_000), st.integers(0, 50))
STRATEGIES = Plugins.load().strategies


def view(
    candidates: list[int], holders: dict[int, int] | None = None, first: int = 0, seed: int = 0
) -> PieceView:
    return PieceView(candidates, holders or {}, first, 10_001, random.Random(seed))


@given(candidates=CANDIDATES, holders=HOLDERS, seed=st.integers())
def test_rarest_first_orders_by_holder_count(
    candidates: list[int], holders: dict[int, int], seed: int
) -> None:
    out = rarest_first(view(candidates, holders, seed=seed))
    assert Counter(out) == Counter(candidates)
    counts = [holders.get(n, 0) for n in out]
    assert counts == sorted(counts)


def test_rarest_first_puts_unheld_pieces_first() -> None:
    assert rarest_first(view([1, 2, 3], {1: 5, 2: 1})) == [3, 2, 1]


def test_rarest_first_breaks_ties_at_random() -> None:
    candidates = list(range(20))
    orders = {tuple(rarest_first(view(candidates, seed=s))) for s in range(10)}
    assert len(orders) > 1


@given(candidates=CANDIDATES, first=st.integers(0, 10_000))
def test_sequential_is_ascending_within_its_window(candidates: list[int], first: int) -> None:
    out = sequential(view(candidates, first=first))
    assert out == sorted(n for n in candidates if n < first + SEQUENTIAL_WINDOW)


def test_sequential_keeps_a_bounded_look_ahead() -> None:
    out = sequential(view(list(range(5, 100)), first=3))
    assert out == list(range(5, 3 + SEQUENTIAL_WINDOW))
    assert len(out) <= SEQUENTIAL_WINDOW


def test_sequential_ignores_holders() -> None:
    assert sequential(view([5, 1, 3], {1: 9, 3: 0, 5: 4})) == [1, 3, 5]


@given(candidates=CANDIDATES, seed=st.integers())
def test_random_order_is_a_permutation(candidates: list[int], seed: int) -> None:
    assert sorted(random_order(view(candidates, seed=seed))) == sorted(candidates)


def test_random_order_does_not_change_its_input() -> None:
    candidates = [3, 1, 2]
    random_order(view(candidates))
    assert candidates == [3, 1, 2]


@pytest.mark.parametrize("name", sorted(STRATEGIES))
@given(candidates=CANDIDATES, holders=HOLDERS, seed=st.integers())
def test_every_strategy_is_deterministic_for_a_seeded_random(
    name: str, candidates: list[int], holders: dict[int, int], seed: int
) -> None:
    strategy = STRATEGIES[name]
    first = strategy(view(candidates, holders, seed=seed))
    second = strategy(view(candidates, holders, seed=seed))
    assert first == second
    assert set(first) <= set(candidates)


def test_strategies_are_registered_by_their_documented_names() -> None:
    assert {
        "rarest-first": rarest_first,
        "sequential": sequential,
        "random": random_order,
    } == STRATEGIES
