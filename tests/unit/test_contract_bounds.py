"""The contracts bound every size and count to what the code handles, and take each bound from
the code's own constant where it has one, so the two cannot drift apart (issue 12, item 9)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from swarmfly import bitmap, content, contracts
from swarmfly.bus import MAX_REQUEST_BYTES
from swarmfly.config import MIN_RATE
from swarmfly.placement import MAX_PARTITIONS
from swarmfly.services.peer.reports import REPORT_BATCH
from swarmfly.services.scheduler.service import DIGEST_PAGE

CONTRACTS = contracts.registry()
COMMON = contracts.common_defs()
TASK = COMMON["task"]["properties"]
MAX_CONTENT_LENGTH: int = TASK["content_length"]["maximum"]
MAX_PIECE_COUNT: int = TASK["piece_count"]["maximum"]

UNBOUNDED = {
    "bytes_origin": "counts every origin read, re-reads of corrupt pieces too",
    "bytes_p2p": "counts every peer read, re-reads of corrupt pieces too",
    "origin_bytes": "a scheduler's sum of reported pieces, re-reports too",
    "p2p_bytes": "a scheduler's sum of reported pieces, re-reports too",
    "seconds": "a reply's wall time, set by the service itself",
    "seen_s": "a reply's age of a heartbeat, set by the scheduler itself",
}
"""Reply fields with no bound the code could name: counters the services fill in themselves."""


def schemas() -> Iterator[tuple[str, dict[str, Any]]]:
    for name, contract in sorted(CONTRACTS.items()):
        yield f"{name} request", contract.request
        if contract.reply is not None:
            yield f"{name} reply", contract.reply


def fields(node: Any, path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every (path, schema) below ``node`` that describes a value."""
    if not isinstance(node, dict):
        return
    yield path, node
    for key, child in node.get("properties", {}).items():
        yield from fields(child, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        yield from fields(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from fields(node["additionalProperties"], f"{path}.*")
    for key in ("oneOf", "anyOf", "allOf"):
        for child in node.get(key, []):
            yield from fields(child, path)


def every_field() -> Iterator[tuple[str, dict[str, Any]]]:
    for label, schema in schemas():
        yield from fields(schema, label)


def named(name: str) -> list[tuple[str, dict[str, Any]]]:
    found = [(path, schema) for path, schema in every_field() if path.endswith(f".{name}")]
    assert found, name
    return found


def types_of(schema: dict[str, Any]) -> set[str]:
    kind = schema.get("type", [])
    return {kind} if isinstance(kind, str) else set(kind)


# -- nothing is unbounded ------------------------------------------------------------------


def unbounded_in(label: str, schema: dict[str, Any]) -> list[str]:
    """What under ``schema`` takes a value of any size."""
    found = []
    for path, node in fields(schema, label):
        kinds, leaf = types_of(node), path.rsplit(".", 1)[-1]
        if kinds & {"integer", "number"} and "maximum" not in node and leaf not in UNBOUNDED:
            found.append(f"{path}: no maximum")
        if "array" in kinds and "maxItems" not in node:
            found.append(f"{path}: no maxItems")
        extra = node.get("additionalProperties", False)
        if "object" in kinds and extra is not False and "maxProperties" not in node:
            found.append(f"{path}: no maxProperties")
        pattern = node.get("pattern", "")
        if "string" in kinds and "maxLength" not in node and ("{" not in pattern or "*" in pattern):
            found.append(f"{path}: no maxLength")
    return found


def test_the_check_sees_unbounded_fields() -> None:
    schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "n": {"type": ["integer", "null"], "minimum": 0},
            "list": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]*$"}},
            "map": {"type": "object", "additionalProperties": {"type": "string"}},
            "id": {"type": "string", "pattern": "^[a-z]{1,8}$"},
            "seconds": {"type": "number"},
        },
    }
    assert unbounded_in("x", schema) == [
        "x.n: no maximum",
        "x.list: no maxItems",
        "x.list[]: no maxLength",
        "x.map: no maxProperties",
        "x.map.*: no maxLength",
    ]


def test_every_number_array_and_string_is_bounded() -> None:
    assert [problem for label, schema in schemas() for problem in unbounded_in(label, schema)] == []


def test_the_unbounded_allowance_names_only_fields_that_exist() -> None:
    for name in UNBOUNDED:
        assert all("maximum" not in schema for _, schema in named(name)), name


# -- piece length, content length and piece count ----------------------------------------


def test_a_requested_rate_is_at_least_the_codes_minimum() -> None:
    """A rate of a few bytes/s would hold a request for hours: the contract refuses it with
    the same bound the CLI gives (``get --download-rate``)."""
    for path, schema in named("download_rate"):
        assert schema["minimum"] == MIN_RATE, path


def test_piece_length_maximum_is_the_codes() -> None:
    for path, schema in named("piece_length"):
        assert schema["maximum"] == content.MAX_PIECE_LENGTH, path


def test_piece_length_minimum_admits_every_piece_length_the_code_picks() -> None:
    for path, schema in named("piece_length"):
        assert schema["minimum"] <= content.MIN_PIECE_LENGTH, path


def test_content_length_has_one_bound_everywhere() -> None:
    for path, schema in named("content_length"):
        assert schema["maximum"] == MAX_CONTENT_LENGTH, path


@given(st.integers(min_value=0, max_value=MAX_CONTENT_LENGTH))
def test_any_content_the_contracts_allow_has_a_layout_they_allow(length: int) -> None:
    """The piece length the code picks for any allowed size gives an allowed piece count."""
    piece = content.piece_length_for(length)
    schema = COMMON["piece_length"]
    assert schema["minimum"] <= piece <= schema["maximum"]
    assert content.piece_count(length, piece) <= MAX_PIECE_COUNT


def test_the_largest_content_fits_at_the_largest_piece_length() -> None:
    assert content.piece_count(MAX_CONTENT_LENGTH, content.MAX_PIECE_LENGTH) <= MAX_PIECE_COUNT


def test_every_piece_number_is_below_the_largest_piece_count() -> None:
    assert COMMON["piece_number"]["maximum"] == MAX_PIECE_COUNT - 1
    for path, schema in named("number"):
        assert schema["maximum"] == MAX_PIECE_COUNT - 1, path


@pytest.mark.parametrize(
    ("field", "key", "bound"),
    [
        ("piece_count", "maximum", MAX_PIECE_COUNT),
        ("offset", "maximum", MAX_PIECE_COUNT),
        ("pieces", "maximum", MAX_PIECE_COUNT),  # scheduler.state: a peer's pieces held
        ("bitmap", "maxLength", bitmap.size(MAX_PIECE_COUNT)),  # base64url of ceil(n / 8) bytes
    ],
)
def test_piece_counts_offsets_and_bitmaps_fit_the_largest_piece_count(
    field: str, key: str, bound: int
) -> None:
    checked = [path for path, schema in named(field) if key in schema]
    assert checked, field
    for path, schema in named(field):
        if key in schema:
            assert schema[key] == bound, path


def test_a_re_registration_listing_every_piece_fits_one_request() -> None:
    """A peer registers again with every piece it holds (announce, resume) in one request:
    the largest piece count, with the longest URL, must fit what a service reads."""
    contract = CONTRACTS["scheduler.{partition}.register"]
    assert contract.request["properties"]["pieces"]["maxItems"] == MAX_PIECE_COUNT
    url_length = contract.request["properties"]["source"]["properties"]["url"]["maxLength"]
    body = {
        "task_id": "0" * 64,
        "peer_id": "p" * 64,
        "host": {
            "id": "h" * 64, "ip": "f" * 64, "port": 65535, "type": "normal",
            "idc": "i" * 128, "location": "l" * 256, "upload_slots": 100000,
        },
        "source": {"url": "u" * url_length},
        "pieces": list(range(MAX_PIECE_COUNT)),
        "task": {
            "content_length": MAX_CONTENT_LENGTH, "piece_length": 16384,
            "piece_count": MAX_PIECE_COUNT, "digest": "sha256:" + "0" * 64,
        },
        "seed": True,
    }  # fmt: skip
    contract.validate_request(body)
    assert len(orjson.dumps(body)) <= MAX_REQUEST_BYTES


# -- batches and pages the code sends --------------------------------------------------------


def test_a_piece_report_batch_is_what_a_peer_sends() -> None:
    pieces = CONTRACTS["scheduler.{partition}.pieces"].request["properties"]["pieces"]
    assert pieces["maxItems"] == REPORT_BATCH


def test_a_digest_page_is_what_the_scheduler_sends() -> None:
    reply = CONTRACTS["scheduler.{partition}.task"].reply
    assert reply is not None
    assert reply["properties"]["digests"]["maxItems"] == DIGEST_PAGE


def test_partitions_are_bounded_by_the_codes_maximum() -> None:
    reply = CONTRACTS["scheduler.heartbeat"].reply
    assert reply is not None
    assert reply["properties"]["partitions"]["maximum"] == MAX_PARTITIONS
    assert reply["properties"]["owners"]["maxItems"] == MAX_PARTITIONS
