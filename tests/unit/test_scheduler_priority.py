"""dfget's ``--priority`` in the scheduler's pure core: Dragonfly's LEVEL0-6 decide what a
child of a task nobody serves yet gets (a seed asked, the origin itself, or a refusal)."""

from __future__ import annotations

import pytest

from swarmfly.errors import SwarmflyError
from swarmfly.services.scheduler.core import Schedule, Scheduler, TriggerSeed
from tests.unit.test_scheduler_core import T, add_seed, host, ids, new_core


def register(
    s: Scheduler, peer: str, host_id: str, priority: int, now: float = 0.0
) -> tuple[Schedule, list[TriggerSeed]]:
    return s.register(task_id=T, peer_id=peer, host=host(host_id), now=now, priority=priority)


@pytest.mark.parametrize("priority", [0, 6])
def test_levels_0_and_6_ask_a_seed_as_every_request_did(priority: int) -> None:
    schedule, effects = register(new_core(), "a", "h1", priority)
    assert schedule.action == "wait"
    assert effects == [TriggerSeed(T)]


@pytest.mark.parametrize("priority", [3, 4, 5])
def test_levels_3_to_5_read_a_new_task_from_the_origin_with_no_seed(priority: int) -> None:
    s = new_core()
    schedule, effects = register(s, "a", "h1", priority)
    assert schedule.action == "back_to_source"
    assert effects == []
    # The child reading the origin is the task's source: the next one, default priority,
    # gets it as a parent and asks no seed either.
    later, more = register(s, "b", "h2", 0, now=0.5)
    assert later.action == "parents"
    assert ids(later) == {"a"}
    assert more == []


def test_level_3_waits_for_a_seed_already_asked_for() -> None:
    s = new_core()
    _, asked = register(s, "a", "h1", 0)
    assert asked == [TriggerSeed(T)]
    schedule, effects = register(s, "b", "h2", 3, now=0.1)
    assert (schedule.action, effects) == ("wait", [])


def test_level_3_takes_the_swarm_where_a_seed_serves() -> None:
    s = new_core()
    add_seed(s)
    schedule, effects = register(s, "a", "h1", 3, now=0.5)
    assert schedule.action == "parents"
    assert "seed" in ids(schedule)
    assert effects == []


def test_level_2_is_refused_where_only_the_origin_has_the_task_and_leaves_nothing() -> None:
    s = new_core()
    with pytest.raises(SwarmflyError, match="priority LEVEL2: no peer has this task") as caught:
        register(s, "a", "h1", 2)
    assert caught.value.code == "conflict"
    assert s.tasks == {} and s.peers == {}
    # Once a seed serves it, the same child is scheduled as any other.
    add_seed(s, now=1.0)
    schedule, effects = register(s, "a", "h1", 2, now=1.5)
    assert schedule.action == "parents"
    assert "seed" in ids(schedule)
    assert effects == []


def test_level_2_waits_for_a_seed_already_asked_for() -> None:
    s = new_core()
    register(s, "a", "h1", 0)
    schedule, effects = register(s, "b", "h2", 2, now=0.1)
    assert (schedule.action, effects) == ("wait", [])


def test_level_1_is_refused_even_where_a_seed_serves() -> None:
    s = new_core()
    add_seed(s)
    with pytest.raises(SwarmflyError, match="priority LEVEL1") as caught:
        register(s, "a", "h1", 1, now=0.5)
    assert caught.value.code == "forbidden"
    assert set(s.peers) == {"seed"}
    assert "h1" not in s.hosts
