"""Task ids, piece lengths (swarmfly.content) and the strict id patterns."""

from __future__ import annotations

from urllib.parse import urlencode

import pytest
from hypothesis import given
from hypothesis import strategies as st

from swarmfly.content import (
    MAX_PIECE_LENGTH,
    MIN_PIECE_LENGTH,
    piece_count,
    piece_length_for,
    piece_range,
)
from swarmfly.ids import NODE_ID, SIGNED_URLS, TASK_ID, SignedUrl, check_digest, task_id

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
GCS = "https://storage.googleapis.com/bucket/layers/blob.tar"
AZURE = "https://acct.blob.core.windows.net/layers/blob.tar"
BLOB = "https://registry.example/v2/team/app/blobs/sha256:" + HEX
PLAIN = "https://files.example/blob.tar"


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (
            S3 + "?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Date=20240101T000000Z"
            "&X-Amz-Expires=3600&X-Amz-Signature=aaaa&X-Amz-Credential=AK%2F1"
            "&X-Amz-SignedHeaders=host&X-Amz-Security-Token=t1",
            S3 + "?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Date=20240202T120000Z"
            "&X-Amz-Expires=600&X-Amz-Signature=bbbb&X-Amz-Credential=AK%2F2"
            "&X-Amz-SignedHeaders=host&X-Amz-Security-Token=t2",
        ),
        (S3 + "?X-Amz-Signature=aaaa", S3),
        (S3 + "?x-amz-signature=aaaa", S3 + "?X-AMZ-SIGNATURE=bbbb"),
        (
            S3 + "?X-Amz-Credential=AK%2F1&X-Amz-Date=1",
            S3 + "?X-Amz-Credential=AK%2F2&X-Amz-Date=2",
        ),
        (
            S3 + "?AWSAccessKeyId=AK1&Signature=aaaa&Expires=1700000000",
            S3 + "?AWSAccessKeyId=AK2&Signature=bbbb&Expires=1800000000",
        ),
        (
            GCS + "?X-Goog-Algorithm=GOOG4-RSA-SHA256&X-Goog-Credential=sa%2F1"
            "&X-Goog-Date=20240101T000000Z&X-Goog-Expires=900&X-Goog-SignedHeaders=host"
            "&X-Goog-Signature=1",
            GCS + "?X-Goog-Algorithm=GOOG4-RSA-SHA256&X-Goog-Credential=sa%2F2"
            "&X-Goog-Date=20250101T000000Z&X-Goog-Expires=60&X-Goog-SignedHeaders=host"
            "&X-Goog-Signature=2",
        ),
        (
            GCS + "?GoogleAccessId=sa1&Expires=1700000000&Signature=aaaa",
            GCS + "?GoogleAccessId=sa2&Expires=1800000000&Signature=bbbb",
        ),
        (
            AZURE + "?sv=2022-11-02&st=2024-01-01T00%3A00Z&se=2024-01-02T00%3A00Z&sr=b&sp=r"
            "&spr=https&sig=aaaa",
            AZURE + "?sv=2023-01-03&st=2025-01-01T00%3A00Z&se=2025-01-02T00%3A00Z&sr=b&sp=rl"
            "&sip=10.0.0.1&skoid=o&sktid=t&skt=1&ske=2&sks=b&skv=2022-11-02&sig=bbbb",
        ),
        (AZURE + "?sv=2022-11-02&sig=aaaa&ss=b&srt=o", AZURE),
        (BLOB + "?ns=docker.io", BLOB + "?ns=quay.io"),
        (BLOB + "?ns=docker.io", BLOB),
        (PLAIN + "?b=2&a=1", PLAIN + "?a=1&b=2"),
        ("https://EXAMPLE.com/f", "https://example.com/f"),
        ("https://example.com/f#part", "https://example.com/f"),
    ],
)
def test_a_re_signed_url_is_the_same_task(first: str, second: str) -> None:
    assert task_id(first) == task_id(second)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (S3, S3.replace("blob.tar", "other.tar")),
        ("https://example.com/F", "https://example.com/f"),
        (S3 + "?versionId=1&X-Amz-Signature=a", S3 + "?versionId=2&X-Amz-Signature=a"),
        (S3 + "?versionId=1", S3),
        (AZURE + "?sv=1&sig=a&snapshot=1", AZURE + "?sv=1&sig=a&snapshot=2"),
        (GCS + "?X-Goog-Signature=a&generation=1", GCS + "?X-Goog-Signature=a&generation=2"),
        ("https://a.example/f", "https://b.example/f"),
        ("http://example.com/f", "https://example.com/f"),
    ],
)
def test_task_id_differs_for_different_content(first: str, second: str) -> None:
    assert task_id(first) != task_id(second)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (PLAIN + "?sig=1", PLAIN + "?sig=2"),
        (PLAIN + "?expires=1", PLAIN + "?expires=2"),
        (PLAIN + "?ns=a", PLAIN + "?ns=b"),
        (PLAIN + "?st=1", PLAIN + "?st=2"),
        (PLAIN + "?signature=1", PLAIN + "?signature=2"),
        (PLAIN + "?sp=r&se=1", PLAIN + "?sp=r&se=2"),
        (PLAIN + "?X-Amz-Date=1", PLAIN + "?X-Amz-Date=2"),
        (PLAIN + "?X-Goog-Expires=1", PLAIN + "?X-Goog-Expires=2"),
        (PLAIN + "?sig=1", PLAIN),
        # One marker of a pair is not the format: Azure needs sig and sv, V2 both names.
        (AZURE + "?sig=a&se=1", AZURE + "?sig=a&se=2"),
        (AZURE + "?sv=1&se=1", AZURE + "?sv=1&se=2"),
        (S3 + "?Signature=a&Expires=1", S3 + "?Signature=a&Expires=2"),
        (S3 + "?AWSAccessKeyId=a&Expires=1", S3 + "?AWSAccessKeyId=a&Expires=2"),
        (GCS + "?GoogleAccessId=a&Expires=1", GCS + "?GoogleAccessId=a&Expires=2"),
        # A format's marker drops only that format's names.
        (S3 + "?X-Amz-Signature=a&sig=1", S3 + "?X-Amz-Signature=a&sig=2"),
        (AZURE + "?sv=1&sig=a&X-Amz-Date=1", AZURE + "?sv=1&sig=a&X-Amz-Date=2"),
        # containerd's ns= is dropped only on a registry blob.
        (
            "https://registry.example/v2/team/app/manifests/latest?ns=docker.io",
            "https://registry.example/v2/team/app/manifests/latest?ns=quay.io",
        ),
        (BLOB.removesuffix(HEX) + "?ns=a", BLOB.removesuffix(HEX) + "?ns=b"),
    ],
)
def test_a_parameter_is_kept_where_no_signing_format_uses_it(first: str, second: str) -> None:
    assert task_id(first) != task_id(second)


QUERY_NAMES = st.sampled_from(
    ["sig", "expires", "ns", "st", "se", "sp", "sr", "signature", "x-amz-date", "X-Goog-Date",
     "skoid", "id", "a"]
)  # fmt: skip
"""Volatile in some format, but none of them completes a format's marker."""
VALUES = st.text("abcXYZ019-_.%/=&", max_size=8)


@given(st.dictionaries(QUERY_NAMES, VALUES, min_size=1, max_size=6), st.data())
def test_every_parameter_of_a_plain_url_is_part_of_the_task(
    query: dict[str, str], data: st.DataObject
) -> None:
    name = data.draw(st.sampled_from(sorted(query)))
    other = data.draw(VALUES.filter(lambda v: v != query[name]))
    changed = {**query, name: other}
    assert task_id(f"{PLAIN}?{urlencode(query)}") != task_id(f"{PLAIN}?{urlencode(changed)}")


@pytest.mark.parametrize("signed", SIGNED_URLS, ids=lambda s: s.name)
@given(data=st.data())
def test_any_signature_of_a_format_is_the_same_task(signed: SignedUrl, data: st.DataObject) -> None:
    """Whatever values a signer puts in its names, the task is the object's; what the URL
    says besides them still counts."""
    url = BLOB if signed.path is not None else S3
    marker = data.draw(st.sampled_from(signed.markers))
    names = sorted(marker | data.draw(st.frozensets(st.sampled_from(sorted(signed.volatile)))))
    first = {n: data.draw(VALUES) for n in names}
    second = {n: data.draw(VALUES) for n in names}
    keep = {"versionId": data.draw(VALUES)}
    one = task_id(f"{url}?{urlencode({**keep, **first})}")
    assert one == task_id(f"{url}?{urlencode({**second, **keep})}")
    assert one == task_id(f"{url}?{urlencode(keep)}")
    assert one != task_id(f"{url}?{urlencode({**first, 'versionId': keep['versionId'] + 'x'})}")


def test_task_id_depends_on_tag_application_and_piece_length() -> None:
    plain = task_id(S3)
    assert task_id(S3, tag="a") != plain
    assert task_id(S3, application="app") != plain
    assert task_id(S3, piece_length=8 * MiB) != plain
    assert task_id(S3, tag="a") != task_id(S3, application="a")


def test_a_shared_digest_is_one_task_across_urls() -> None:
    digest = "sha256:" + HEX
    one = task_id("https://mirror-a.example/v2/lib/blobs/" + digest, digest=digest, shared=True)
    two = task_id("https://mirror-b.example/other/path", digest=digest, tag="t", shared=True)
    assert one == two
    assert one != task_id("https://mirror-a.example/v2/lib/blobs/" + digest)
    assert one != task_id("https://x", digest="sha256:" + HEX[::-1], shared=True)


def test_a_digest_not_shared_is_bound_to_its_url() -> None:
    """Naming a digest under one's own URL (or with --digest) reaches no other origin's task."""
    digest = "sha256:" + HEX
    private = task_id("https://registry.example/v2/team/blobs/" + digest, digest=digest)
    assert private != task_id("http://attacker.example/x/blobs/" + digest, digest=digest)
    assert private != task_id("https://registry.example/v2/team/blobs/" + digest, digest=digest,
                              shared=True)  # fmt: skip
    assert private == task_id("https://REGISTRY.example/v2/team/blobs/" + digest, digest=digest)


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


# -- --filtered-query-param ----------------------------------------------------------------


def test_a_filter_of_ones_own_drops_exactly_its_names_in_any_case() -> None:
    base = "https://cdn.example.com/f.bin"
    filtered = ("token", "Expires")
    one = task_id(f"{base}?Token=a&expires=1&v=2", filtered=filtered)
    assert task_id(f"{base}?v=2&TOKEN=b&Expires=9", filtered=filtered) == one
    assert task_id(f"{base}?token=a&expires=1&v=3", filtered=filtered) != one, "v is kept"


def test_a_filter_replaces_the_default_one() -> None:
    signed = "https://b.s3.amazonaws.com/k?X-Amz-Signature=aa&X-Amz-Credential=c&X-Amz-Date=1"
    resigned = "https://b.s3.amazonaws.com/k?X-Amz-Signature=bb&X-Amz-Credential=c&X-Amz-Date=2"
    assert task_id(signed) == task_id(resigned)
    assert task_id(signed, filtered=["other"]) != task_id(resigned, filtered=["other"])
    sigv4 = ["X-Amz-Signature", "X-Amz-Date"]
    assert task_id(signed, filtered=sigv4) == task_id(resigned, filtered=sigv4)


def test_a_filter_joins_the_task_id_so_it_reaches_no_plain_urls_task() -> None:
    plain = "https://cdn.example.com/f.bin"
    assert task_id(f"{plain}?key=a", filtered=["key"]) != task_id(plain)
    assert task_id(f"{plain}?key=a", filtered=["key"]) == task_id(plain, filtered=["KEY"])
    digest = "sha256:" + HEX
    assert task_id(f"{plain}?key=a", digest=digest, filtered=["key"]) != task_id(
        plain, digest=digest
    )
