"""``quick_init``: the same dataclass, built faster, still frozen."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest

from swarmfly.contracts import messages
from swarmfly.frozen import quick_init


@quick_init
@dataclass(frozen=True, slots=True)
class Point:
    x: int
    y: int = 0
    label: str | None = None


def test_it_builds_what_the_dataclass_would() -> None:
    assert Point(1) == Point(x=1, y=0, label=None)
    assert Point(1, 2, "a") == Point(label="a", y=2, x=1)
    assert repr(Point(1, label="a")) == "Point(x=1, y=0, label='a')"
    assert dataclasses.replace(Point(1), y=5) == Point(1, 5)
    assert hash(Point(1, 2)) == hash(Point(1, 2))


def test_instances_stay_frozen() -> None:
    point = Point(1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        point.x = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        Point()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Point(1, z=3)  # type: ignore[call-arg]


def test_only_frozen_slotted_plain_dataclasses() -> None:
    @dataclass(slots=True)
    class Mutable:
        x: int

    @dataclass(frozen=True)
    class NoSlots:
        x: int

    @dataclass(frozen=True, slots=True)
    class Factory:
        xs: list[int] = field(default_factory=list)

    for cls in (Mutable, NoSlots, Factory):
        with pytest.raises(TypeError):
            quick_init(cls)


def test_the_wire_messages_use_it() -> None:
    report = messages.PieceReport(3, cost_ms=12)
    assert report == messages.PieceReport.from_dict({"number": 3, "cost_ms": 12})
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.number = 4  # type: ignore[misc]
