"""The default parent evaluator: higher is better."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from swarmfly.plugins.evaluators.default import evaluate
from swarmfly.plugintypes import Candidate, Evaluation

CHILD = Candidate(
    peer_id="child",
    host_type="normal",
    finished_pieces=0,
    upload_slots=64,
    uploads=0,
    idc="",
    location="",
    mean_cost_ms=None,
)
PARENT = dataclasses.replace(CHILD, peer_id="parent")
TOTAL = 100


def score(parent: Candidate, child: Candidate = CHILD, median: float | None = None) -> float:
    return evaluate(parent, Evaluation(child, TOTAL, median))


def with_(candidate: Candidate, **changes: Any) -> Candidate:
    return dataclasses.replace(candidate, **changes)


def test_a_seed_beats_a_normal_peer_with_nothing_to_give() -> None:
    seed = with_(PARENT, host_type="seed", finished_pieces=0)
    empty = with_(PARENT, finished_pieces=0)
    assert score(seed) > score(empty)


def test_a_seed_counts_as_holding_every_piece() -> None:
    seed = with_(PARENT, host_type="seed")
    assert score(seed) == score(with_(seed, finished_pieces=TOTAL))


def test_a_normal_peer_with_everything_beats_an_equally_loaded_seed() -> None:
    seed = with_(PARENT, host_type="seed", finished_pieces=TOTAL)
    full = with_(PARENT, finished_pieces=TOTAL)
    assert score(full) > score(seed)


def test_more_pieces_the_child_lacks_score_higher() -> None:
    child = with_(CHILD, finished_pieces=40)
    assert score(with_(PARENT, finished_pieces=90), child) > score(
        with_(PARENT, finished_pieces=50), child
    )
    # A parent behind the child has nothing for it, but is not penalised below zero.
    assert score(with_(PARENT, finished_pieces=10), child) == score(
        with_(PARENT, finished_pieces=40), child
    )


def test_same_idc_scores_higher() -> None:
    child = with_(CHILD, idc="dc1")
    assert score(with_(PARENT, idc="dc1"), child) > score(with_(PARENT, idc="dc2"), child)


def test_an_empty_idc_never_matches() -> None:
    assert score(with_(PARENT, idc="")) == score(with_(PARENT, idc="dc1"))


@pytest.mark.parametrize(
    ("closer", "farther"),
    [
        ("cn|east|z1", "cn|east|z2"),
        ("cn|east|z2", "cn|west|z1"),
        ("cn|west", "us|east"),
        ("cn|east|z1|r1|h1", "cn|east|z1|r1|h2"),
    ],
)
def test_a_longer_location_prefix_scores_higher(closer: str, farther: str) -> None:
    child = with_(CHILD, location="cn|east|z1|r1|h1")
    assert score(with_(PARENT, location=closer), child) > score(
        with_(PARENT, location=farther), child
    )


def test_location_matching_stops_at_the_first_difference() -> None:
    child = with_(CHILD, location="cn|east|z1")
    assert score(with_(PARENT, location="us|east|z1"), child) == score(
        with_(PARENT, location=""), child
    )


def test_location_elements_past_the_fifth_do_not_count() -> None:
    child = with_(CHILD, location="a|b|c|d|e|f")
    assert score(with_(PARENT, location="a|b|c|d|e|f"), child) == score(
        with_(PARENT, location="a|b|c|d|e|x"), child
    )


def test_free_upload_slots_order_parents() -> None:
    by_load = [with_(PARENT, uploads=n) for n in (0, 16, 32, 63, 64)]
    scores = [score(p) for p in by_load]
    assert scores == sorted(scores, reverse=True)
    assert len(set(scores)) == len(scores)


def test_load_lowers_the_score_smoothly() -> None:
    idle, busy, overloaded = (score(with_(PARENT, uploads=n)) for n in (0, 64, 80))
    assert idle > busy > overloaded, "no cliff: the least loaded of full parents still wins"
    assert score(with_(PARENT, upload_slots=0, uploads=0)) == idle


def test_cheaper_pieces_score_higher() -> None:
    fast = with_(PARENT, mean_cost_ms=10.0)
    slow = with_(PARENT, mean_cost_ms=100.0)
    unknown = with_(PARENT, mean_cost_ms=None)
    assert score(fast, median=50.0) > score(unknown, median=50.0) > score(slow, median=50.0)
    assert score(fast, median=None) == score(slow, median=None) == score(unknown)


def test_total_pieces_unknown_is_not_a_division_error() -> None:
    unknown = Evaluation(CHILD, 0, None)
    assert evaluate(PARENT, unknown) == evaluate(with_(PARENT, finished_pieces=5), unknown)


def test_the_best_parent_scores_one() -> None:
    best = with_(PARENT, finished_pieces=TOTAL, idc="dc", location="a|b|c|d|e")
    child = with_(CHILD, idc="dc", location="a|b|c|d|e")
    assert evaluate(best, Evaluation(child, TOTAL, None)) == pytest.approx(1.0 - 0.15 * 0.5)
    timed = Evaluation(child, TOTAL, 1.0)
    assert evaluate(with_(best, mean_cost_ms=0.0), timed) == pytest.approx(1.0)
