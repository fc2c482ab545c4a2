"""The one piece bitmap (swarmfly/bitmap.py): it survives the trip, and anything but a bitmap
of the task is a bad request."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from swarmfly.bitmap import decode, encode, size
from swarmfly.errors import SwarmflyError


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


@given(count=st.integers(0, 3000))
def test_its_size_is_what_encode_writes(count: int) -> None:
    assert len(encode(range(count), count)) == size(count)


def test_piece_zero_is_the_top_bit_of_the_first_byte() -> None:
    assert encode({0}, 8) == "gA"
    assert encode({7}, 8) == "AQ"
    assert encode({8}, 9) == "AIA"
