"""Lending: while the seed's uplink is full, children read pieces from the origin; every
piece is still read once, and what a child does not deliver the seed reads itself."""

from __future__ import annotations

from swarmfly.services.peer.lending import (
    ABANDON_SECONDS,
    COLLECT_PATIENCE,
    HOLD_BACK,
    LEASE_FACTOR,
    LEND_RATE,
    LEND_SECONDS,
    LONE_SECONDS,
    Lending,
)


def test_pieces_are_lent_from_the_last_down_and_claimed_from_the_first_up() -> None:
    lending = Lending(8, limit=8, lease=5.0, window=0)
    everything = set(range(8))
    assert lending.claim(set(), now=0.0) == 0
    assert lending.lend(set(), {}, everything, now=0.0) == 7
    assert lending.lend(set(), {}, {5, 6}, now=0.0) == 6  # what this child wants
    assert lending.claim(set(), now=0.0) == 1
    assert lending.lend({5}, {}, everything, now=0.0) == 4  # 5 is done meanwhile
    assert lending.claim({5}, now=0.0) == 2
    assert lending.claim({5}, now=0.0) == 3
    assert lending.claim({5}, now=0.0) is None  # 4, 6, 7 are with children
    assert lending.lend({5}, {}, everything, now=0.0) is None
    assert lending.waiting({5}, now=1.0)


def test_lending_stops_at_its_limit_and_once_closed() -> None:
    lending = Lending(10, limit=2, window=0)
    assert lending.lend(set(), {}, set(range(10)), now=0.0) == 9
    assert lending.lend(set(), {}, set(range(10)), now=0.0) == 8
    assert lending.lend(set(), {}, set(range(10)), now=0.0) is None
    lending.delivered.add(9)  # its child delivered: one more may be lent
    assert lending.lend(set(), {}, set(range(10)), now=0.0) == 7
    lending.open = False
    assert lending.lend(set(), {}, set(range(10)), now=0.0) is None


def test_a_lent_piece_not_delivered_in_time_is_read_by_the_seed() -> None:
    lending = Lending(3, lease=2.0, grace=10.0, window=0)
    assert lending.lend(set(), {}, {0, 1, 2}, now=0.0) == 2
    assert lending.lend(set(), {}, {0, 1, 2}, now=0.0) == 1
    lending.reading.update({0})
    assert lending.claim(set(), now=1.0) is None  # both still with their children
    lending.delivered.add(1)
    assert lending.claim(set(), now=2.5) == 2  # late: the seed reads it itself
    assert lending.claim(set(), now=2.5) is None  # 1 is in the swarm: taken from holders
    assert lending.waiting(set(), now=2.5)
    assert lending.claim(set(), now=12.5) == 1  # its holders stayed silent too long
    assert lending.lend(set(), {}, {0, 1, 2}, now=20.0) is None  # a piece is lent once


def test_what_a_child_that_went_away_was_lent_is_read_without_waiting_out_its_time() -> None:
    lending = Lending(4, lease=60.0, grace=60.0, window=0)
    all_pieces = {0, 1, 2, 3}
    lending.seen["alive"] = lending.seen["dead"] = 0.0
    assert lending.lend(set(), {}, all_pieces, now=0.0, child="dead") == 3
    assert lending.lend(set(), {}, all_pieces, now=0.0, child="dead") == 2
    assert lending.lend(set(), {}, all_pieces, now=0.0, child="alive") == 1
    lending.delivered.add(2)  # "dead" read 2, then died while reading 3
    lending.reading.add(0)
    lending.seen["alive"] = ABANDON_SECONDS + 1  # asked again; "dead" never did
    now = ABANDON_SECONDS + 1.5
    assert lending.gone(3, now) and lending.gone(2, now) and not lending.gone(1, now)
    assert lending.claim(set(), now) == 3  # long before its 60 s
    assert lending.claim(set(), now) is None  # 2 may still be in the swarm; 1 is being read
    lending.unheld(found={0}, now=now)  # the holders have 0 only: 2 went with its child
    assert lending.claim(set(), now) == 2
    assert lending.claim(set(), now) is None


def both_asked(lending: Lending, now: float, *children: str) -> None:
    """Each child's poll came and went at ``now``."""
    for child in children:
        lending.asked(child, now)
        lending.ended(child, now)


def test_one_child_is_lent_a_few_pieces_at_once() -> None:
    lending = Lending(20, limit=8, per_child=2, window=0)
    both_asked(lending, 0.0, "a", "b")
    wanted = set(range(20))
    assert [lending.lend(set(), {}, wanted, 0.0, child="a") for _ in range(3)] == [19, 18, None]
    assert lending.lend(set(), {}, wanted, 0.0, child="b") == 17
    lending.delivered.add(19)  # delivered: no longer being read by "a"
    assert lending.lend(set(), {}, wanted, 0.0, child="a") == 16


def test_how_far_the_seed_reads_ahead_of_its_uplink() -> None:
    lending = Lending(6)
    lending.reading.add(5)
    assert lending.ahead({0, 1, 2}, {0: 1}) == 3  # 1 and 2 unsent, 5 being read


def test_pieces_are_lent_only_while_the_seed_reads_faster_than_it_sends() -> None:
    lending = Lending(10, window=2)
    assert lending.lend({0}, {}, set(range(10)), now=0.0) is None  # one unsent piece
    assert lending.lend({0, 1}, {0: 1}, set(range(10)), now=0.0) is None
    assert lending.lend({0, 1, 2}, {0: 1}, set(range(10)), now=0.0) == 9


def test_a_seed_reading_with_more_ranges_lends_more_and_a_large_piece_gets_longer() -> None:
    small = Lending.for_origin(100, 4 << 20, concurrency=4)
    assert (small.limit, small.window, small.lease) == (8, 4, LEND_SECONDS)
    large = Lending.for_origin(10, 64 << 20, concurrency=2)
    assert large.lease == (64 << 20) / LEND_RATE


def test_a_lent_piece_gets_more_time_when_the_origin_is_slow() -> None:
    lending = Lending(4, lease=LEND_SECONDS)
    number = lending.claim(set(), now=0.0)
    assert number == 0 and lending.reading == {0}
    lending.read(0, seconds=10.0)
    assert lending.reading == set() and lending.lease == LEASE_FACTOR * 10.0
    lending.claim(set(), now=0.0)
    lending.read(1, seconds=None)  # failed: says nothing of the origin's pace
    assert lending.lease == LEASE_FACTOR * 10.0


def test_what_children_say_they_delivered_counts_only_for_pieces_lent() -> None:
    lending = Lending(8, window=0)
    both_asked(lending, 0.0, "a", "b")
    assert lending.lend(set(), {}, set(range(8)), now=0.0, child="a") == 7
    assert lending.lend(set(), {}, set(range(8)), now=0.0, child="a") == 6
    assert lending.said([7, 3, 99]) == {7}
    assert lending.delivered == {7} and lending.outstanding
    digests: list[str | None] = [None] * 8
    digests[6] = "ab" * 32
    lending.learned(digests)  # the scheduler has a digest of 6: it reached the swarm
    assert lending.delivered == {6, 7} and not lending.outstanding


def test_the_seed_holds_back_only_while_children_ask_and_only_a_while() -> None:
    lending = Lending(10, window=2)
    done, served = {0, 1, 2}, {0: 1}
    assert not lending.hold_back(0.0, 0.0, done, served)  # nobody asked
    both_asked(lending, 0.0, "a", "b")
    assert lending.hold_back(0.0, 0.5, done, served)  # two read and unsent, a child asks
    assert not lending.hold_back(0.0, HOLD_BACK, done, served)  # not longer than that
    assert not lending.hold_back(0.0, 0.5, done, {0: 1, 1: 1})  # the uplink keeps up
    assert not lending.hold_back(1.5, 1.6, done, served)  # the child stopped asking
    lending.asked("a", now=1.5)
    lending.open = False
    assert not lending.hold_back(1.5, 1.6, done, served)  # closed: read what is left


def test_once_closed_the_seed_collects_while_children_ask_and_a_while_at_most() -> None:
    lending = Lending(4)
    lending.asked("a", now=0.0)
    assert lending.collecting(0.0, 0.5)
    assert not lending.collecting(0.0, 1.5)  # nobody asked for a second
    for second in range(1, int(COLLECT_PATIENCE) + 2):
        lending.asked("a", now=float(second))
    assert not lending.collecting(0.0, COLLECT_PATIENCE + 1)


def alone(lending: Lending, child: str = "a") -> float:
    """``child`` asks, and still asks ``LONE_SECONDS`` later, nobody beside it: when it is."""
    lending.asked(child, now=0.0)
    assert lending.sole(0.0) is None  # others may be a moment behind the first
    return LONE_SECONDS


def test_a_sole_child_is_lent_the_file_from_the_first_piece_up_and_the_seed_holds_back() -> None:
    lending = Lending(10, limit=8, per_child=3, window=4, lease=5.0)
    everything = set(range(10))
    t = alone(lending)  # its poll waits at the seed
    assert lending.sole(t) == "a"
    # The seed's uplink keeps up (nothing read and unsent), and still: in order, to its cap.
    assert [lending.lend(set(), {}, everything, t, child="a") for _ in range(4)] == [
        0, 1, 2, None,
    ]  # fmt: skip
    assert lending.hold_back(t, t + 4, set(), {})  # past HOLD_BACK: no limit while it is alone
    assert lending.claim(set(), now=t) == 3  # a reader that was not held reads past them
    assert lending.said([0]) == {0}
    assert lending.lend({0}, {}, everything - {0}, t, child="a") == 4
    lending.ended("a", now=t)
    assert lending.sole(t + 0.9) == "a" and lending.sole(t + 1.1) is None  # it stopped asking
    assert not lending.hold_back(t + 1.1, t + 1.1, {0}, {})
    # It holds them with no digest: the seed takes them back at once, with no collecting wait
    # for children that could not take them from it anyway.
    assert lending.whole == {0, 1, 2, 4}
    assert not lending.collecting(t, t + 0.5)


def test_children_that_start_together_are_never_sole() -> None:
    lending = Lending(10, window=4)
    lending.asked("a", now=0.0)
    lending.asked("b", now=0.1)
    lending.ended("b", now=0.2)
    for now in (0.1, LONE_SECONDS, 1.1):  # b asked within the last second
        assert lending.sole(now) is None
        assert lending.lend(set(), {}, set(range(10)), now, child="a") is None
    assert lending.sole(1.3) == "a"  # b is done: a is alone now


def test_a_second_child_ends_the_sole_childs_loans_in_order() -> None:
    lending = Lending(10, window=4, lease=5.0)
    t = alone(lending)
    assert lending.lend(set(), {}, set(range(10)), t, child="a") == 0
    lending.asked("b", now=t + 0.1)
    assert lending.sole(t + 0.1) is None
    assert lending.lend(set(), {}, set(range(10)), t + 0.1, child="a") is None  # the window
    assert not lending.hold_back(t + 0.1, t + 0.1, set(), {})
    assert lending.lend({1, 2, 3, 4}, {}, set(range(10)), t + 0.1, child="b") == 9  # the top


def test_a_child_that_may_not_be_lent_to_keeps_the_seed_reading() -> None:
    for child, borrows in (("a", False), (None, True)):
        lending = Lending(10, window=4)
        lending.asked(child, now=0.0, borrows=borrows)
        t = LONE_SECONDS
        assert lending.sole(t) is None
        assert not lending.hold_back(t, t, set(), {})
        # Beside a child that may borrow, too: the other needs the seed's reads.
        lending.asked("b", now=t)
        assert lending.sole(2 * t) is None
        assert lending.lend(set(), {}, set(range(10)), 2 * t, child="b") is None


def test_a_sole_childs_late_piece_is_read_by_the_seed_at_once() -> None:
    lending = Lending(4, window=4, lease=2.0, grace=0.0)
    t = alone(lending)
    assert lending.lend(set(), {}, {0, 1, 2, 3}, t, child="a") == 0
    assert lending.hold_back(t, t + 1.0, set(), {})
    assert not lending.hold_back(t, t + 2.5, set(), {})  # piece 0 is past its time
    assert lending.claim(set(), now=t + 2.5) == 0


def test_a_child_that_borrows_no_more_gives_back_what_it_did_not_deliver() -> None:
    lending = Lending(8, window=4, lease=30.0, grace=0.0)
    t = alone(lending)
    assert [lending.lend(set(), {}, set(range(8)), t, child="a") for _ in range(3)] == [
        0, 1, 2,
    ]  # fmt: skip
    lending.said([0])
    lending.asked("a", now=t + 1.0, borrows=False)  # its read of piece 1 failed
    assert lending.sole(t + 1.0) is None and not lending.hold_back(t + 1.0, t + 1.0, set(), {})
    assert [lending.claim(set(), now=t + 1.0) for _ in range(3)] == [1, 2, 3]  # not in 30 s
    assert lending.lend(set(), {}, set(range(8)), t + 1.0, child="a") is None


def test_a_sole_child_reads_in_the_seeds_place_not_beside_it() -> None:
    """The seed's reads and a sole child's loans are as many at once as the seed alone would
    read (``window``): twice as many would halve each one's share of a busy origin, and a
    seed that leaves while they are under way would cut its own."""
    lending = Lending(12, per_child=4, window=4, lease=30.0)
    assert [lending.claim(set(), now=0.0) for _ in range(2)] == [0, 1]  # before anyone asked
    t = alone(lending)
    assert [lending.lend(set(), {}, set(range(12)), t, child="a") for _ in range(3)] == [
        2, 3, None,
    ]  # fmt: skip
    lending.read(0, 1.0)
    assert lending.lend({0}, {}, set(range(1, 12)), t, child="a") == 4
    # A second child: the seed reads again, once the first child's loans leave it room.
    lending.asked("a", now=t + 0.1)
    lending.asked("b", now=t + 0.1)
    assert lending.sole(t + 0.1) is None
    assert lending.hold_back(t + 0.1, t + 0.1, {0}, {})
    lending.ended("b", now=t + 0.5)
    for _ in range(2):  # its polls, the one that made it sole too
        lending.ended("a", now=t + 0.5)
    lending.said([2])
    sent = {0: 1, 2: 1}  # the seed's uplink keeps up
    assert not lending.hold_back(t + 0.5, t + 0.5, {0, 2}, sent)
    assert lending.claim({0, 2}, now=t + 0.5) == 5
    assert lending.hold_back(t + 0.5, t + 0.5, {0, 2}, sent)
    # A child that stops asking holds the seed back no more (what it was lent is read
    # once it is gone or its time is up).
    assert not lending.hold_back(t + 0.5, t + 1.6, {0, 2}, sent)
