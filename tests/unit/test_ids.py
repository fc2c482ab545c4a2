"""Task ids, piece lengths and the strict id patterns."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from swarmfly.ids import (
    MAX_PIECE_LENGTH,
    MIN_PIECE_LENGTH,
    NODE_ID,
    TASK_ID,
    check_digest,
    piece_count,
    piece_length_for,
    piece_range,
    task_id,
)

MiB = 1024 * 1024
GiB = 1024 * MiB
HEX = "0123456789abcdef" * 4


# -- piece length --------------------------------------------------------------------------


@pytest.mark.parametrize("length", [0, 1, 4 * MiB, 100 * MiB, 500 * MiB])
def test_piece_length_has_a_1_mib_floor(length: int) -> None:
    assert piece_length_for(length) == MIN_PIECE_LENGTH == MiB


@pytest.mark.parametrize("length", [500 * 64 * MiB, 100 * GiB, 1024 * GiB])
def test_piece_length_has_a_64_mib_cap(length: int) -> None:
    assert piece_length_for(length) == MAX_PIECE_LENGTH == 64 * MiB


@pytest.mark.parametrize(
    ("length", "expected"),
    [
        (10 * GiB, 32 * MiB),  # 10 GiB / 500 = 20.5 MiB -> 32 MiB
        (2 * GiB, 8 * MiB),  # 4.1 MiB -> 8 MiB
        (1 * GiB, 4 * MiB),  # 2.05 MiB -> 4 MiB
        (600 * MiB, 2 * MiB),  # 1.2 MiB -> 2 MiB
        (500 * 8 * MiB, 8 * MiB),  # an exact power of two stays itself
        (500 * 16 * MiB + 499, 16 * MiB),  # length // 500 rounds down to 16 MiB
        (500 * 16 * MiB + 500 * 1024, 32 * MiB),
    ],
)
def test_piece_length_is_next_power_of_two_of_length_over_500(length: int, expected: int) -> None:
    assert piece_length_for(length) == expected


@given(st.integers(min_value=0, max_value=2**42))
def test_piece_length_is_a_clamped_power_of_two(length: int) -> None:
    piece = piece_length_for(length)
    assert MIN_PIECE_LENGTH <= piece <= MAX_PIECE_LENGTH
    assert piece & (piece - 1) == 0
    target = length // 500
    if MIN_PIECE_LENGTH < piece < MAX_PIECE_LENGTH:
        assert piece // 2 < target <= piece


def test_piece_count_rounds_up() -> None:
    assert piece_count(0, 4) == 0
    assert piece_count(8, 4) == 2
    assert piece_count(9, 4) == 3


def test_piece_range_of_the_last_piece_is_short() -> None:
    assert piece_range(0, 10, 4) == (0, 4)
    assert piece_range(1, 10, 4) == (4, 4)
    assert piece_range(2, 10, 4) == (8, 2)


def test_piece_range_of_an_exact_multiple_ends_full() -> None:
    assert piece_range(1, 8, 4) == (4, 4)


def test_piece_range_past_the_end_is_empty() -> None:
    assert piece_range(3, 10, 4) == (12, 0)


# -- task ids ------------------------------------------------------------------------------

S3 = "https://bucket.s3.amazonaws.com/layers/blob.tar"


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (
            S3 + "?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Date=20240101T000000Z"
            "&X-Amz-Expires=3600&X-Amz-Signature=aaaa&X-Amz-Credential=AK%2F1",
            S3 + "?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Date=20240202T120000Z"
            "&X-Amz-Expires=600&X-Amz-Signature=bbbb&X-Amz-Credential=AK%2F2",
        ),
        (S3 + "?X-Amz-Signature=aaaa", S3),
        (S3 + "?x-amz-signature=aaaa", S3 + "?X-AMZ-SIGNATURE=bbbb"),
        (
            "https://storage.googleapis.com/b/o?X-Goog-Signature=1&X-Goog-Date=20240101",
            "https://storage.googleapis.com/b/o?X-Goog-Signature=2&X-Goog-Date=20250101",
        ),
        (
            "https://registry.example/v2/lib/blobs/x?ns=docker.io",
            "https://registry.example/v2/lib/blobs/x?ns=quay.io",
        ),
        ("https://example.com/f?b=2&a=1", "https://example.com/f?a=1&b=2"),
        ("https://EXAMPLE.com/f", "https://example.com/f"),
        ("https://example.com/f#part", "https://example.com/f"),
    ],
)
def test_task_id_ignores_volatile_query_parameters(first: str, second: str) -> None:
    assert task_id(first) == task_id(second)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (S3, S3.replace("blob.tar", "other.tar")),
        ("https://example.com/F", "https://example.com/f"),
        (S3 + "?versionId=1&X-Amz-Signature=a", S3 + "?versionId=2&X-Amz-Signature=a"),
        (S3 + "?versionId=1", S3),
        ("https://a.example/f", "https://b.example/f"),
        ("http://example.com/f", "https://example.com/f"),
    ],
)
def test_task_id_differs_for_different_content(first: str, second: str) -> None:
    assert task_id(first) != task_id(second)


def test_task_id_depends_on_tag_application_and_piece_length() -> None:
    plain = task_id(S3)
    assert task_id(S3, tag="a") != plain
    assert task_id(S3, application="app") != plain
    assert task_id(S3, piece_length=8 * MiB) != plain
    assert task_id(S3, tag="a") != task_id(S3, application="a")


def test_task_id_is_keyed_by_digest_across_urls() -> None:
    digest = "sha256:" + HEX
    one = task_id("https://mirror-a.example/v2/lib/blobs/" + digest, digest=digest)
    two = task_id("https://mirror-b.example/other/path", digest=digest, tag="t")
    assert one == two
    assert one != task_id("https://mirror-a.example/v2/lib/blobs/" + digest)
    assert one != task_id("https://x", digest="sha256:" + HEX[::-1])


def test_task_id_matches_its_own_pattern() -> None:
    assert TASK_ID.match(task_id(S3))
    assert TASK_ID.match(task_id(S3, digest="sha256:" + HEX))


# -- strict patterns -----------------------------------------------------------------------


def test_check_digest_returns_the_hex() -> None:
    assert check_digest("sha256:" + HEX) == HEX


@pytest.mark.parametrize(
    "digest",
    [
        "",
        HEX,
        "sha256:",
        "sha256:" + HEX[:-1],
        "sha256:" + HEX + "0",
        "sha256:" + HEX.upper(),
        "sha512:" + HEX,
        "SHA256:" + HEX,
        "sha256: " + HEX,
        " sha256:" + HEX,
        "sha256:" + HEX[:-1] + "g",
        "sha256:" + HEX + " ",
    ],
)
def test_check_digest_rejects_bad_forms(digest: str) -> None:
    with pytest.raises(ValueError, match="sha256:<64 hex>"):
        check_digest(digest)


def test_check_digest_rejects_a_trailing_newline() -> None:
    with pytest.raises(ValueError, match="sha256:<64 hex>"):
        check_digest("sha256:" + HEX + "\n")


def test_id_patterns_reject_a_trailing_newline() -> None:
    assert not TASK_ID.match(HEX + "\n")
    assert not NODE_ID.match("peer-1\n")


@pytest.mark.parametrize("value", ["../../etc", HEX[:-1], HEX.upper(), HEX + "0", "", "/" + HEX])
def test_task_id_pattern_rejects_non_ids(value: str) -> None:
    assert not TASK_ID.match(value)


@pytest.mark.parametrize("value", ["", "a.b", "a b", "a/b", "*", ">", "x" * 65])
def test_node_id_pattern_rejects_non_tokens(value: str) -> None:
    assert not NODE_ID.match(value)
