"""The download's phase table: every path a download takes, and what is refused."""

from __future__ import annotations

import pytest

from swarmfly.services.peer.phases import (
    ENDED,
    TRANSITIONS,
    Announce,
    EventName,
    Finish,
    Phases,
    ReadOrigin,
    Register,
    Repair,
    Step,
    Swarm,
    TakeOver,
    Verify,
    Wait,
    first_event,
)


def walk(*events: EventName | tuple[EventName, float]) -> tuple[Phases, list[Step]]:
    phases = Phases()
    steps = []
    for event in events:
        if isinstance(event, tuple):
            steps.append(phases.on(event[0], seconds=event[1]))
        else:
            steps.append(phases.on(event))
    return phases, steps


def test_how_a_download_starts() -> None:
    assert first_event(held=True, seed=False, control_plane=True) == "held"
    assert first_event(held=True, seed=True, control_plane=False) == "held"
    assert first_event(held=False, seed=True, control_plane=True) == "missing_seed"
    assert first_event(held=False, seed=False, control_plane=False) == "missing_seed"
    assert first_event(held=False, seed=False, control_plane=True) == "missing"


def test_a_child_swarms_and_finishes() -> None:
    phases, steps = walk("missing", "parents", "complete", "matches")
    assert steps == [Register(), Swarm(), Verify(), Finish(True)]
    assert phases.history == ["start", "registering", "swarming", "verifying", "done"]
    assert phases.ended


def test_a_child_told_to_wait_asks_again_then_swarms() -> None:
    phases, steps = walk("missing", ("wait", 0.2), ("wait", 0.5), "parents")
    assert steps == [Register(), Wait(0.2), Wait(0.5), Swarm()]
    assert phases.phase == "swarming"


@pytest.mark.parametrize("phase_events", [("missing",), ("missing", ("wait", 0.2))])
def test_the_scheduler_sends_a_child_back_to_source(
    phase_events: tuple[EventName | tuple[EventName, float], ...],
) -> None:
    _, steps = walk(*phase_events, "back_to_source", "complete", "matches")
    assert steps[-3:] == [ReadOrigin(), Verify(), Finish(True)]


def test_a_child_sent_back_to_source_while_swarming() -> None:
    phases, _ = walk("missing", "parents", "back_to_source", "complete", "matches")
    assert phases.history[2:] == ["swarming", "origin", "verifying", "done"]


@pytest.mark.parametrize("before", [(), ("parents",), (("wait", 0.1),)])
def test_a_swarm_contradicting_the_origin_sends_the_child_to_the_origin(
    before: tuple[EventName | tuple[EventName, float], ...],
) -> None:
    _, steps = walk("missing", *before, "contradicted")
    assert steps[-1] == ReadOrigin()


def test_a_seed_reads_the_origin_or_takes_over() -> None:
    _, steps = walk("missing_seed", "no_holders", "complete", "matches")
    assert steps == [Register(seed=True), ReadOrigin(), Verify(), Finish(True)]
    _, steps = walk("missing_seed", "holders", "complete", "matches")
    assert steps == [Register(seed=True), TakeOver(), Verify(), Finish(True)]


def test_a_cached_copy_is_announced_and_proved_again() -> None:
    _, steps = walk("held", "announced", "matches")
    assert steps == [Announce(), Verify(), Finish(True)]


def test_a_file_that_fails_its_digest_is_repaired_once_or_fails() -> None:
    phases, steps = walk("missing", "parents", "complete", "suspects", "matches")
    assert steps[-2:] == [Repair(), Finish(True)]
    phases, steps = walk("missing", "parents", "complete", "suspects", "mismatch")
    assert steps[-1] == Finish(False)
    assert phases.phase == "failed"
    phases, steps = walk("missing", "parents", "complete", "mismatch")
    assert steps[-1] == Finish(False), "nothing to read again: it fails at once"


@pytest.mark.parametrize("phase", [p for p in TRANSITIONS if p not in ENDED])
def test_an_error_in_any_phase_ends_the_download_failed(phase: str) -> None:
    phases = Phases(phase)  # type: ignore[arg-type]
    assert phases.on("error", message="disk full") == Finish(False, "disk full")
    assert phases.phase == "failed"
    with pytest.raises(ValueError, match="while failed"):
        phases.on("error")


def test_an_event_a_phase_does_not_expect_is_refused() -> None:
    phases, _ = walk("missing", "parents")
    with pytest.raises(ValueError, match="no 'holders' expected while swarming"):
        phases.on("holders")
    assert phases.phase == "swarming", "a refused event changes nothing"
    done, _ = walk("held", "announced", "matches")
    with pytest.raises(ValueError, match="while done"):
        done.on("complete")


def test_every_phase_is_reachable_and_every_path_ends() -> None:
    reachable = {"start"}
    frontier = ["start"]
    while frontier:
        for target in TRANSITIONS[frontier.pop()].values():  # type: ignore[index]
            if target not in reachable:
                reachable.add(target)
                frontier.append(target)
    assert reachable == set(TRANSITIONS), "a phase nothing leads to"
    for phase, moves in TRANSITIONS.items():
        assert bool(moves) == (phase not in ENDED), phase
