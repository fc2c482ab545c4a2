"""The one Range parser: the upload server, the mirror and the test origin read a Range the
same way (the mirror's reading of what a range means is in test_proxy_parts)."""

from __future__ import annotations

import pytest

from swarmfly.httpheaders import content_length, content_range, parse_range


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("bytes=0-9", (0, 9)),
        (" bytes=5-5 ", (5, 5)),
        ("bytes=90-", (90, None)),
        ("bytes=-10", (None, 10)),
        ("bytes=" + "9" * 19 + "-" + "9" * 19, (10**19 - 1, 10**19 - 1)),
        (None, None),
        ("", None),
        ("bytes=-", None),
        ("bytes=0-1,3-4", None),
        ("Bytes=0-1", None),
        ("items=0-1", None),
        ("bytes=a-b", None),
        ("bytes=0-1\n", None),
        ("bytes=" + "1" * 20 + "-", None),
        ("bytes=\u0661-\u0662", None),  # Arabic-Indic digits are \d to re, not to HTTP
    ],
)
def test_parse_range(header: str | None, expected: tuple[int | None, int | None] | None) -> None:
    assert parse_range(header) == expected


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("bytes 0-0/100", (0, 0, 100)),
        ("bytes 5-9/*", (5, 9, None)),
        ("bytes */100", None),
        ("bytes 0-0", None),
        (None, None),
        ("bytes 0-0/100/1", None),
    ],
)
def test_content_range(header: str | None, expected: tuple[int, int, int | None] | None) -> None:
    assert content_range(header) == expected


def test_no_range_parser_reads_other_scripts_digits() -> None:
    """``\\d`` matches Arabic-Indic digits and ``int`` reads them: a header the contract calls
    malformed would have been a request for bytes."""
    assert content_range("bytes \u0660-\u0660/\u0661") is None


@pytest.mark.parametrize(
    ("header", "expected"),
    [("100", 100), (" 0 ", 0), (None, None), ("", None), ("²", None), ("-1", None), ("1e3", None)],
)
def test_content_length(header: str | None, expected: int | None) -> None:
    assert content_length(header) == expected
