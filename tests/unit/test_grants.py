"""Super-seeding grants: each piece leaves the seed about once, and the wanted-pieces
bitmap a child sends survives the trip."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from swarmfly.errors import SwarmflyError
from swarmfly.services.peer.grants import ABANDON_SECONDS, Delegation, GrantBook, decode, encode


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


@given(count=st.integers(1, 3000), data=st.data())
def test_a_bitmap_round_trips(count: int, data: st.DataObject) -> None:
    pieces = data.draw(st.sets(st.integers(0, count - 1), max_size=64))
    text = encode(pieces, count)
    assert len(text) <= 4 * ((count + 7) // 8 + 2) // 3
    assert decode(text, count) == pieces


@given(text=st.text(max_size=40), count=st.integers(1, 200))
def test_decode_accepts_only_a_bitmap_of_the_task(text: str, count: int) -> None:
    try:
        pieces = decode(text, count)
    except SwarmflyError as exc:
        assert exc.code == "bad_request"
    else:
        assert all(0 <= n < count for n in pieces)
        assert encode(pieces, count) == text or len(text) == len(encode(pieces, count))


@pytest.mark.parametrize("text", ["", "A", "AAAA", "AA==", "A+A", "AA A", "ÄÄ"])
def test_bitmaps_of_the_wrong_shape_are_bad_requests(text: str) -> None:
    with pytest.raises(SwarmflyError) as caught:
        decode(text, 10)  # 10 pieces: 2 bytes, 3 characters
    assert caught.value.code == "bad_request"


# -- lending: children read pieces from the origin while the seed's uplink is full --------


def test_pieces_are_lent_from_the_last_down_and_claimed_from_the_first_up() -> None:
    lending = Delegation(8, limit=8, lease=5.0, window=0)
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
    lending = Delegation(10, limit=2, window=0)
    assert lending.lend(set(), {}, set(range(10)), now=0.0) == 9
    assert lending.lend(set(), {}, set(range(10)), now=0.0) == 8
    assert lending.lend(set(), {}, set(range(10)), now=0.0) is None
    lending.delivered.add(9)  # its child delivered: one more may be lent
    assert lending.lend(set(), {}, set(range(10)), now=0.0) == 7
    lending.open = False
    assert lending.lend(set(), {}, set(range(10)), now=0.0) is None


def test_a_lent_piece_not_delivered_in_time_is_read_by_the_seed() -> None:
    lending = Delegation(3, lease=2.0, grace=10.0, window=0)
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
    lending = Delegation(4, lease=60.0, grace=60.0, window=0)
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


def test_one_child_is_lent_a_few_pieces_at_once() -> None:
    lending = Delegation(20, limit=8, per_child=2, window=0)
    wanted = set(range(20))
    assert [lending.lend(set(), {}, wanted, 0.0, child="a") for _ in range(3)] == [19, 18, None]
    assert lending.lend(set(), {}, wanted, 0.0, child="b") == 17
    lending.delivered.add(19)  # delivered: no longer being read by "a"
    assert lending.lend(set(), {}, wanted, 0.0, child="a") == 16


def test_how_far_the_seed_reads_ahead_of_its_uplink() -> None:
    lending = Delegation(6)
    lending.reading.add(5)
    assert lending.ahead({0, 1, 2}, {0: 1}) == 3  # 1 and 2 unsent, 5 being read


def test_pieces_are_lent_only_while_the_seed_reads_faster_than_it_sends() -> None:
    lending = Delegation(10, window=2)
    assert lending.lend({0}, {}, set(range(10)), now=0.0) is None  # one unsent piece
    assert lending.lend({0, 1}, {0: 1}, set(range(10)), now=0.0) is None
    assert lending.lend({0, 1, 2}, {0: 1}, set(range(10)), now=0.0) == 9
