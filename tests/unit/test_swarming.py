"""The P2P core of a download (services/peer/swarming.py): every transition, with the time
passed in and a seeded book; no sockets, no event loop."""

from __future__ import annotations

import random

from swarmfly.plugins.strategies.builtin import rarest_first
from swarmfly.services.peer.pieces import PieceBook
from swarmfly.services.peer.swarming import (
    BLOCK_SECONDS,
    BUSY_BACKOFF,
    IDLE_RESCHEDULE,
    ORIGIN,
    PARENT_FAILURES,
    PIECE_RATE,
    RESCHEDULE_INTERVAL,
    SCHEDULER_PATIENCE,
    STALL_SECONDS,
    Decision,
    Drop,
    Fetch,
    Reschedule,
    Swarming,
    in_flight,
)

DIGEST = "sha256:" + "ab" * 32


def swarm(pieces: int = 8, *, concurrency: int = 4, per_parent: int = 2) -> Swarming:
    core = Swarming(concurrency, per_parent, now=0.0)
    core.book = PieceBook(
        pieces, digests=[DIGEST] * pieces, strategy=rarest_first, rng=random.Random(7)
    )
    return core


def fetches(decisions: list[Decision]) -> list[tuple[int, str]]:
    return [(d.number, d.parent_id) for d in decisions if isinstance(d, Fetch)]


def reschedules(decisions: list[Decision]) -> list[str]:
    return [d.why for d in decisions if isinstance(d, Reschedule)]


def test_no_parents_asks_the_scheduler() -> None:
    core = swarm()
    assert reschedules(core.tick(0.0)) == ["no_parents"]


def test_pieces_go_to_parents_within_their_slots_and_the_concurrency() -> None:
    core = swarm(concurrency=3, per_parent=2)
    assert core.scheduled({"a": "normal", "b": "normal"}, 0.0, exact=True) == ["a", "b"]
    core.offered("a", set(range(8)))
    core.offered("b", set(range(8)))
    started = fetches(core.tick(0.1))
    assert len(started) == 3 and len({n for n, _ in started}) == 3
    assert max(core.fetching.values()) <= 2 and sum(core.fetching.values()) == 3
    assert fetches(core.tick(0.2)) == [], "no room until one ends"
    number, parent = started[0]
    core.done(number, parent, 0.3)
    assert len(fetches(core.tick(0.3))) == 1
    assert core.book is not None and number in core.book.done


def test_a_corrupt_piece_drops_its_parent_and_reschedules_at_once() -> None:
    core = swarm()
    core.scheduled({"a": "normal", "b": "normal"}, 0.0, exact=True)
    core.offered("a", {0, 1})
    core.offered("b", {2, 3})
    started = dict((p, n) for n, p in fetches(core.tick(0.1)))
    core.failed(started["a"], "a", "corrupt", 0.2)
    decisions = core.tick(0.2)
    assert Drop("a", "corrupt") in decisions and reschedules(decisions) == ["dropped"]
    assert "a" not in core.parents and core.bad == [{"peer_id": "a", "reason": "corrupt"}]
    assert core.blocked(0.2 + BLOCK_SECONDS - 1) == {"a"}
    assert core.blocked(0.2 + BLOCK_SECONDS + 1) == set(), "a failed parent may come back"
    # The scheduler names it again within the block: it is not taken back.
    assert core.scheduled({"a": "normal", "b": "normal"}, 1.0, exact=True) == []
    assert core.book is not None and started["a"] not in core.book.in_flight


def test_a_parent_lost_is_dropped_and_its_pieces_fetched_elsewhere() -> None:
    core = swarm(pieces=2, per_parent=1)
    core.scheduled({"a": "normal", "b": "normal"}, 0.0, exact=True)
    core.offered("a", {0, 1})
    core.offered("b", {0, 1})
    first = fetches(core.tick(0.0))
    assert len(first) == 2
    core.lost("a")
    (lost_piece,) = [n for n, p in first if p == "a"]
    core.failed(lost_piece, "a", "failed", 0.1)  # its transfer broke with it
    decisions = core.tick(0.1)
    assert Drop("a", "failed") in decisions
    core.done(next(n for n, p in first if p == "b"), "b", 0.2)
    assert fetches(core.tick(0.2)) == [(lost_piece, "b")]


def test_failures_drop_a_parent_only_after_several() -> None:
    core = swarm()
    core.scheduled({"a": "normal"}, 0.0, exact=True)
    core.offered("a", set(range(8)))
    started = fetches(core.tick(0.0))
    for count, (number, parent) in enumerate(started[:PARENT_FAILURES], 1):
        core.failed(number, parent, "failed", 0.1)
        assert ("a" in core.parents) == (count < PARENT_FAILURES)


def test_a_busy_parent_is_asked_again_after_the_backoff() -> None:
    core = swarm(per_parent=1)
    core.scheduled({"a": "normal"}, 0.0, exact=True)
    core.offered("a", {0})
    ((number, _),) = fetches(core.tick(0.0))
    core.failed(number, "a", "busy", 0.1)
    assert fetches(core.tick(0.1 + BUSY_BACKOFF / 2)) == []
    assert fetches(core.tick(0.1 + BUSY_BACKOFF + 0.01)) == [(number, "a")]
    assert "a" in core.parents and core.bad == []


def test_a_parent_busy_past_what_it_took_is_asked_for_that_many_at_once() -> None:
    """A capped parent serves one piece and queues one: the rest of a full window comes
    back busy. The child keeps what it took in flight, asks again as each ends (no
    backoff), and widens the window once it delivered a window's worth."""
    core = swarm(pieces=16, concurrency=8, per_parent=4)
    core.scheduled({"a": "normal"}, 0.0, exact=True)
    core.offered("a", set(range(16)))
    started = fetches(core.tick(0.0))
    assert len(started) == 4
    for number, parent in started[2:]:
        core.failed(number, parent, "busy", 0.1)
    assert core.parents["a"].busy_until == 0.0, "it serves us: no backoff"
    assert fetches(core.tick(0.1)) == [], "the window is what it took"
    core.done(started[0][0], "a", 0.2)
    assert len(fetches(core.tick(0.2))) == 1, "its slot is asked for again at once"
    core.done(started[1][0], "a", 0.3)
    assert len(fetches(core.tick(0.3))) == 2, "two delivered at a window of two: three"
    assert core.parents["a"].window == 3


def test_a_window_never_grows_past_per_parent() -> None:
    core = swarm(pieces=16, concurrency=8, per_parent=2)
    core.scheduled({"a": "normal"}, 0.0, exact=True)
    core.offered("a", set(range(16)))
    for step in range(6):
        for number, parent in fetches(core.tick(float(step))):
            core.done(number, parent, step + 0.5)
    assert core.parents["a"].window == 2


def test_a_slow_seed_is_kept_a_slow_peer_dropped() -> None:
    core = swarm()
    core.scheduled({"seed": "seed", "p": "normal"}, 0.0, exact=True)
    core.offered("seed", {0, 1, 2})
    core.offered("p", {3, 4, 5})
    started = dict((p, n) for n, p in fetches(core.tick(0.0)))
    core.failed(started["seed"], "seed", "slow", 1.0)
    core.failed(started["p"], "p", "slow", 1.0)
    assert "seed" in core.parents and "p" not in core.parents


def test_stalled_periodic_and_idle_reschedules() -> None:
    core = swarm()
    core.scheduled({"a": "normal"}, 0.0, exact=True)
    assert reschedules(core.tick(RESCHEDULE_INTERVAL * IDLE_RESCHEDULE / 2)) == []
    # Nothing to fetch from a: ask again soon, not only at the periodic interval.
    assert reschedules(core.tick(RESCHEDULE_INTERVAL * IDLE_RESCHEDULE + 0.01)) == ["idle"]
    core.scheduled({"a": "normal"}, 1.0, exact=True, retry_after_ms=5000)
    assert core.reschedule_every == 5.0, "a large swarm's scheduler asks for fewer"
    core.offered("a", {0})
    assert fetches(core.tick(1.0)) == [(0, "a")]
    assert reschedules(core.tick(1.0 + 4.9)) == [], "busy: neither idle nor stalled"
    assert reschedules(core.tick(1.0 + 5.1)) == ["periodic"]
    core.asked(10.0)
    core.done(0, "a", 10.0)
    assert reschedules(core.tick(10.0 + STALL_SECONDS + 0.1)) == ["stalled"]


def test_a_reschedule_releases_parents_it_does_not_name() -> None:
    core = swarm()
    core.scheduled({"a": "normal", "b": "normal"}, 0.0, exact=True)
    core.offered("a", {0, 1})
    core.offered("b", {2, 3})
    core.tick(0.0)
    core.scheduled({"b": "normal", "c": "normal"}, 1.0, exact=True)
    assert set(core.parents) == {"b", "c"}
    assert core.book is not None and "a" not in core.book.available
    assert any("a" in holders for holders in core.book.in_flight.values()), "a's still finish"
    assert core.bad == [], "released, not bad"
    # The first schedule adds to the parents we have (the scheduler lost: we keep ours).
    assert core.scheduled({"d": "normal"}, 2.0, exact=False) == ["d"]
    assert set(core.parents) == {"b", "c", "d"}


def test_the_endgame_asks_a_second_parent_and_the_loser_is_cancelled() -> None:
    core = swarm(pieces=2, per_parent=2)
    core.scheduled({"a": "normal", "b": "normal"}, 0.0, exact=True)
    core.offered("a", {0, 1})
    first = fetches(core.tick(0.0))
    assert sorted(n for n, _ in first) == [0, 1]
    core.offered("b", {0, 1})
    second = fetches(core.tick(0.1))
    assert second and all(p == "b" for _, p in second), "every missing piece in flight: race"
    number = second[0][0]
    core.done(number, "b", 0.2)
    core.failed(number, "a", "cancelled", 0.2)  # the adapter cancels the losing copy
    assert core.book is not None and number in core.book.done
    assert "a" in core.parents and core.bad == []


def test_lent_pieces_are_read_from_the_origin_once() -> None:
    core = swarm(pieces=4)
    assert core.lent(1) and not core.lent(1), "already in flight"
    assert not core.lent(9), "not a piece of the task"
    assert core.fetching[ORIGIN] == 1
    core.failed(1, ORIGIN, "origin", 0.5)  # the seed reads it when we do not deliver
    assert core.fetching[ORIGIN] == 0 and core.bad == []
    assert core.lent(1)
    core.done(1, ORIGIN, 1.0)
    assert not core.lent(1), "done"


def test_completion() -> None:
    core = swarm(pieces=1)
    core.scheduled({"a": "normal"}, 0.0, exact=True)
    core.offered("a", {0})
    ((number, parent),) = fetches(core.tick(0.0))
    assert not core.complete
    core.done(number, parent, 0.1)
    assert core.complete


def test_scheduler_lost_and_back() -> None:
    """Parents kept while it is gone; with none, wait while another scheduler may take the
    partition, then the origin; its return resets the patience."""
    core = swarm()
    core.scheduled({"a": "normal"}, 0.0, exact=True)
    assert core.scheduler_lost(1.0, others_answer=False) == "keep"
    core.drop("a", "failed", 1.0)
    assert core.scheduler_lost(2.0, others_answer=True) == "wait"
    assert core.scheduler_lost(2.0 + SCHEDULER_PATIENCE - 0.1, others_answer=True) == "wait"
    assert core.scheduler_lost(2.0 + SCHEDULER_PATIENCE + 0.1, others_answer=True) == "origin"
    core.scheduler_back()
    assert core.scheduler_lost(100.0, others_answer=True) == "wait", "patience anew"
    assert core.scheduler_lost(100.0, others_answer=False) == "origin", "none answers at all"


def test_a_download_rate_keeps_no_more_pieces_in_flight_than_it_feeds_above_the_floor() -> None:
    """Parents cut off a child that reads a piece under half PIECE_RATE: a capped download
    that kept its 16 pieces in flight would share its rate among them and be cut off on all."""
    assert in_flight(16) == 16
    assert in_flight(16, 0, 0) == 16
    assert in_flight(16, 4 * PIECE_RATE) == 4
    assert in_flight(16, 0, 3 * PIECE_RATE + 1) == 3, "the host's share counts as well"
    assert in_flight(16, 8 * PIECE_RATE, 2 * PIECE_RATE) == 2, "the lower rate wins"
    assert in_flight(16, PIECE_RATE // 2) == 1, "always at least one"
    assert in_flight(4, 100 * PIECE_RATE) == 4, "never more than configured"


def test_lowering_concurrency_mid_download_starts_no_more_than_it_allows() -> None:
    core = swarm(pieces=8, concurrency=4, per_parent=4)
    core.scheduled({"a": "normal"}, 0.0, exact=True)
    core.offered("a", set(range(8)))
    core.concurrency = 1
    assert len([d for d in core.tick(0.0) if isinstance(d, Fetch)]) == 1
    core.concurrency = 3
    assert len([d for d in core.tick(0.0) if isinstance(d, Fetch)]) == 2, "the rest of 3"


def test_an_offer_of_pieces_with_no_digest_yet_is_seen_before_the_tick() -> None:
    """The adapter asks whether digests are lacking before it ticks: a parent's new pieces
    whose digests we lack make the poll for them due at once (the seed's first grants
    waited for the next periodic tick, a quarter of a second, for theirs)."""
    core = swarm(4)
    assert core.book is not None
    core.book.digests[2] = None
    core.scheduled({"seed": "seed"}, 0.0, exact=True)
    core.offered("seed", {2})
    assert not core.book.needs_digests(), "not in the book until taken"
    core.take_offers()
    assert core.book.needs_digests()
    assert fetches(core.tick(0.1)) == [], "no fetch of a piece we cannot verify"
    core.book.digests[2] = DIGEST
    assert fetches(core.tick(0.2)) == [(2, "seed")]
