"""Built-in piece-selection strategies: pure functions ordering the pieces a peer may fetch.

A strategy receives the candidate piece numbers, how many known holders each has, and a
random source, and returns the candidates in the order to fetch them.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence

Strategy = Callable[[Sequence[int], Mapping[int, int], random.Random], list[int]]


def rarest_first(
    candidates: Sequence[int], holders: Mapping[int, int], rng: random.Random
) -> list[int]:
    """Fewest holders first, ties broken at random so children spread over pieces."""
    keyed = [(holders.get(n, 0), rng.random(), n) for n in candidates]
    keyed.sort()
    return [n for _, _, n in keyed]


def sequential(
    candidates: Sequence[int], holders: Mapping[int, int], rng: random.Random
) -> list[int]:
    """Lowest piece first: a stream can be handed on while the download runs."""
    return sorted(candidates)


def random_order(
    candidates: Sequence[int], holders: Mapping[int, int], rng: random.Random
) -> list[int]:
    out = list(candidates)
    rng.shuffle(out)
    return out


STRATEGIES: dict[str, Strategy] = {
    "rarest-first": rarest_first,
    "sequential": sequential,
    "random": random_order,
}
