"""Built-in piece-selection strategies: pure functions over a ``PieceView``."""

from __future__ import annotations

from swarmfly.plugins import PieceView, StrategyRegistry, hookimpl

SEQUENTIAL_WINDOW = 16
"""Pieces ahead of the first missing one that ``sequential`` may fetch: enough to keep every
parent busy, few enough that a stream consumer is never starved."""


def rarest_first(view: PieceView) -> list[int]:
    """Fewest holders first, ties broken at random so children spread over pieces."""
    draw = view.rng.random
    keyed = [(view.holders.get(n, 0), draw(), n) for n in view.candidates]
    keyed.sort()
    return [n for _, _, n in keyed]


def sequential(view: PieceView) -> list[int]:
    """Lowest piece first within a bounded window: a stream can be handed on as it grows."""
    limit = view.first_missing + SEQUENTIAL_WINDOW
    return sorted(n for n in view.candidates if n < limit)


def random_order(view: PieceView) -> list[int]:
    out = list(view.candidates)
    view.rng.shuffle(out)
    return out


@hookimpl
def swarmfly_register_strategies(register: StrategyRegistry) -> None:
    register.add("rarest-first", rarest_first)
    register.add("sequential", sequential)
    register.add("random", random_order)
