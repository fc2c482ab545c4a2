"""The contracts declare JSON Schema draft 2020-12, and their validator implements it: the
keywords new in 2019-09 and 2020-12 are enforced, not skipped as a draft-7 validator would."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from swarmfly import contracts
from swarmfly.bus import decode_request
from swarmfly.contracts.schema import DIALECT, Invalid, compile_schema
from swarmfly.errors import BadRequest

ROOT = Path(__file__).parents[2]


def test_every_contract_declares_the_draft_its_validator_implements() -> None:
    files = [ROOT / "contracts" / "common.json", ROOT / "contracts" / "error.json"]
    files += [ROOT / "contracts" / "localsocket.json"]
    for path in files:
        assert json.loads(path.read_text())["$schema"] == DIALECT, path
    for contract in contracts.registry().values():
        assert contract.request["$schema"] == DIALECT
    openapi = json.loads((ROOT / "contracts" / "http" / "peer.openapi.json").read_text())
    assert openapi["jsonSchemaDialect"] == DIALECT


def test_prefix_items_are_enforced() -> None:
    check = compile_schema(
        {"$schema": DIALECT, "type": "array", "prefixItems": [{"type": "integer"}]}
    )
    check([1, "anything after"])
    with pytest.raises(Invalid) as refused:
        check(["not an integer"])
    assert refused.value.path == "data[0]"


def test_unevaluated_properties_are_enforced() -> None:
    check = compile_schema(
        {
            "$schema": DIALECT,
            "allOf": [{"properties": {"a": {"type": "integer"}}}],
            "unevaluatedProperties": False,
        }
    )
    check({"a": 1})
    with pytest.raises(Invalid, match="Unevaluated properties are not allowed"):
        check({"a": 1, "b": 2})


def test_dependent_required_is_enforced() -> None:
    check = compile_schema({"$schema": DIALECT, "dependentRequired": {"a": ["b"]}})
    check({"b": 1})
    with pytest.raises(Invalid):
        check({"a": 1})


def test_a_refusal_names_the_value_and_where_it_is() -> None:
    contract = contracts.get("scheduler.{partition}.pieces")
    body = {"task_id": "a" * 64, "peer_id": "p" + "b" * 24, "pieces": [{"number": -1}]}
    with pytest.raises(BadRequest) as refused:
        decode_request(contract, json.dumps(body).encode())
    assert refused.value.path == "data.pieces[0].number"
    assert "-1 is less than the minimum of 0" in refused.value.message
