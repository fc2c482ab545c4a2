"""Which storage instances take a stopping instance's cached tasks (services/storage/handover.py
``plan``): each task's homes among the instances that stay, homed tasks first."""

from __future__ import annotations

import hashlib

from swarmfly.placement import rendezvous
from swarmfly.services.storage.handover import plan

FLEET = ["storage-a", "storage-b", "storage-c", "storage-d"]
TASKS = [hashlib.sha256(str(n).encode()).hexdigest() for n in range(200)]


def test_each_task_goes_to_its_home_without_the_leaving_instance() -> None:
    handed = plan(TASKS, "storage-a", FLEET, copies=1)
    assert {h.task_id for h in handed} == set(TASKS), "every task is handed to someone"
    for handing in handed:
        stay = [s for s in FLEET if s != "storage-a"]
        assert handing.targets == (rendezvous(handing.task_id, stay)[0],)
        assert handing.order == tuple(rendezvous(handing.task_id, stay)), "then the next"
        assert "storage-a" not in handing.targets
        # Where the leaving instance was not the home, the home is the same as before.
        assert handing.homed == (rendezvous(handing.task_id, FLEET)[0] == "storage-a")
        if not handing.homed:
            assert handing.targets[0] == rendezvous(handing.task_id, FLEET)[0]


def test_homed_tasks_go_first_in_the_order_given() -> None:
    handed = plan(TASKS, "storage-b", FLEET, copies=1)
    flags = [h.homed for h in handed]
    assert flags == sorted(flags, reverse=True), "every homed task before any other"
    homed = [h.task_id for h in handed if h.homed]
    assert homed == [t for t in TASKS if t in set(homed)], "in the order given (recency)"
    assert 20 < len(homed) < 80, "about a quarter of the tasks are homed on one of four"


def test_with_copies_every_home_and_replica_that_stays_takes_it() -> None:
    for handing in plan(TASKS, "storage-c", FLEET, copies=2):
        order = rendezvous(handing.task_id, FLEET)
        assert handing.homed == ("storage-c" in order[:2])
        assert handing.targets == tuple(s for s in order if s != "storage-c")[:2]


def test_nothing_to_hand_over_to_when_no_other_instance_is_live() -> None:
    assert plan(TASKS, "storage-a", ["storage-a"], copies=1) == []
    assert plan(TASKS, "storage-a", [], copies=1) == []
    assert plan([], "storage-a", FLEET, copies=1) == []
