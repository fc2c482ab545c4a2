"""The typed wire messages (issue 14, item 2) cannot drift from the contracts: the checked-in
``messages.py`` is what the generator makes of them now, and every body a contract accepts,
its examples and generated ones, survives ``from_dict`` then ``to_dict`` unchanged."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swarmfly import contracts
from swarmfly.contracts import codegen, messages
from swarmfly.contracts.wire import ABSENT

CONTRACTS = sorted(contracts.registry().values(), key=lambda c: c.name)
BODIES = [
    pytest.param(contract, kind, example[kind], id=f"{contract.name}-{kind}-{i}")
    for contract in CONTRACTS
    for i, example in enumerate(contract.examples)
    for kind in ("request", "reply")
    if kind in example
]


def message_class(contract: contracts.Contract, kind: str) -> Any:
    subject = messages.SUBJECTS[contract.name]
    return subject.request if kind == "request" else subject.reply


def validator(contract: contracts.Contract, kind: str) -> contracts.Validator:
    check = contract.validate_request if kind == "request" else contract.validate_reply
    assert check is not None
    return check


def test_messages_py_is_what_the_generator_makes() -> None:
    assert codegen.TARGET.read_text(encoding="utf-8") == codegen.generate(), (
        f"contracts/messages.py is stale: run `{codegen.COMMAND}`"
    )


def test_every_contract_has_its_types() -> None:
    assert set(messages.SUBJECTS) == set(contracts.registry())
    for name, subject in messages.SUBJECTS.items():
        assert subject.name == name
        assert subject.contract is contracts.get(name)


@pytest.mark.parametrize(("contract", "kind", "body"), BODIES)
def test_examples_round_trip(contract: contracts.Contract, kind: str, body: dict[str, Any]) -> None:
    again = message_class(contract, kind).from_dict(body).to_dict()
    assert again == body
    validator(contract, kind)(again)


def test_null_and_absent_stay_apart() -> None:
    waiting = {"action": "wait", "parents": [], "retry_after_ms": 200}
    assert messages.Schedule.from_dict(waiting).task is ABSENT
    assert messages.Schedule.from_dict({**waiting, "task": None}).to_dict()["task"] is None
    assert "task" not in messages.Schedule("wait", []).to_dict()


def test_nested_objects_are_typed() -> None:
    body = contracts.get("scheduler.{partition}.register").examples[0]["reply"]
    schedule = messages.REGISTER.reply.from_dict(body)
    assert isinstance(schedule.parents[0], messages.Parent)
    assert isinstance(schedule.task, messages.TaskContent)
    assert schedule.task.piece_count == 16


# Bodies from the schemas themselves (hypothesis-jsonschema is not installed): every keyword
# the contracts use, with short lists, so that optional properties no example shows are sent.
MAX_ITEMS = 3


def bodies(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "oneOf" in schema:
        return st.one_of([bodies(option) for option in schema["oneOf"]])
    kind = schema.get("type")
    if isinstance(kind, list):
        return st.one_of([bodies({**schema, "type": k}) for k in kind])
    if kind == "object":
        return objects(schema)
    if kind == "array":
        items = bodies(schema["items"])
        high = min(schema.get("maxItems", MAX_ITEMS), MAX_ITEMS)
        return st.lists(items, min_size=schema.get("minItems", 0), max_size=high)
    if kind == "integer":
        return st.integers(schema.get("minimum"), schema.get("maximum"))
    if kind == "number":
        low = schema.get("minimum", schema.get("exclusiveMinimum"))
        return st.floats(  # JSON has no NaN or infinity
            low,
            schema.get("maximum"),
            exclude_min="exclusiveMinimum" in schema,
            allow_nan=False,
            allow_infinity=False,
        )
    if kind == "string":
        return strings(schema)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    raise AssertionError(f"no strategy for {schema}")


def objects(schema: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    properties = schema.get("properties")
    if properties is None:
        names = strings(schema.get("propertyNames", {"type": "string"}))
        return st.dictionaries(names, bodies(schema["additionalProperties"]), max_size=MAX_ITEMS)
    required = set(schema.get("required", ()))
    return st.fixed_dictionaries(
        {k: bodies(v) for k, v in properties.items() if k in required},
        optional={k: bodies(v) for k, v in properties.items() if k not in required},
    )


def strings(schema: dict[str, Any]) -> st.SearchStrategy[str]:
    low, high = schema.get("minLength", 0), schema.get("maxLength", 64)
    if "pattern" not in schema:
        return st.text(min_size=low, max_size=min(high, 64))
    matching = st.from_regex(schema["pattern"], fullmatch=True)
    return matching.filter(lambda text: low <= len(text) <= high)


@pytest.mark.parametrize(
    ("contract", "kind"),
    [
        pytest.param(c, k, id=f"{c.name}-{k}")
        for c in CONTRACTS
        for k in ("request", "reply")
        if k == "request" or c.reply is not None  # an event has no reply
    ],
)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_generated_bodies_round_trip(
    contract: contracts.Contract, kind: str, data: st.DataObject
) -> None:
    schema = contract.request if kind == "request" else contract.reply
    assert schema is not None
    body = data.draw(bodies(schema))
    check = validator(contract, kind)
    check(body)  # the strategy makes only valid bodies: else it tests nothing
    again = message_class(contract, kind).from_dict(body).to_dict()
    assert again == body
    check(again)
