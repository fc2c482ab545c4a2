"""A download's phases as a table: where each event leads, and what is done there.

Sans-IO like ``swarming.py``, after h11's ``EVENT_TRIGGERED_TRANSITIONS``: the conductor
says what happened (``Phases.on``), the table gives the next phase, and the phase's ``Step``
is what the conductor carries out next. Inside the ``swarming`` phase the P2P core
(``Swarming``) decides piece by piece; the origin's phases use ``Lending`` and
``Gathering``. An event the table does not expect in a phase is a bug in the caller, and
raises rather than being guessed at.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Phase = Literal[
    "start",
    "announcing",
    "registering",
    "registering_seed",
    "waiting",
    "swarming",
    "origin",
    "taking_over",
    "verifying",
    "repairing",
    "done",
    "failed",
]
EventName = Literal[
    "held",
    "missing",
    "missing_seed",
    "announced",
    "parents",
    "wait",
    "back_to_source",
    "holders",
    "no_holders",
    "contradicted",
    "complete",
    "matches",
    "mismatch",
    "suspects",
    "error",
]

TRANSITIONS: dict[Phase, dict[EventName, Phase]] = {
    "start": {
        "held": "announcing",  # the cache has it: tell the scheduler, prove it again
        "missing": "registering",
        "missing_seed": "registering_seed",  # a seed, or a host with no control plane
    },
    "announcing": {"announced": "verifying"},
    "registering": {
        "parents": "swarming",
        "wait": "waiting",
        "back_to_source": "origin",
        "contradicted": "origin",
    },
    "registering_seed": {
        "holders": "taking_over",  # a seed continuing a lost one's task
        "no_holders": "origin",
    },
    "waiting": {
        "parents": "swarming",
        "wait": "waiting",
        "back_to_source": "origin",
        "contradicted": "origin",
    },
    "swarming": {
        "complete": "verifying",
        "back_to_source": "origin",
        "contradicted": "origin",  # the swarm's word on the content is not the origin's
    },
    "origin": {"complete": "verifying"},
    "taking_over": {"complete": "verifying"},
    "verifying": {
        "matches": "done",
        "suspects": "repairing",  # pieces taken on someone's word: read them again
        "mismatch": "failed",
    },
    "repairing": {"matches": "done", "mismatch": "failed"},
    "done": {},
    "failed": {},
}
"""Every phase but the last two also takes ``error``, which ends the download failed."""
ENDED: frozenset[Phase] = frozenset({"done", "failed"})


@dataclass(frozen=True)
class Announce:
    """Tell the scheduler of the copy the cache holds."""


@dataclass(frozen=True)
class Register:
    """Ask the task's scheduler for parents; ``seed``: register only (a seed, or a host
    without a control plane, reads the origin; a seed learns who holds pieces already)."""

    seed: bool = False


@dataclass(frozen=True)
class Wait:
    """Ask the scheduler again after ``seconds``."""

    seconds: float


@dataclass(frozen=True)
class Swarm:
    """Fetch pieces from parents (``Swarming``) until complete or sent to the origin."""


@dataclass(frozen=True)
class ReadOrigin:
    """Read the missing pieces from the origin (lending them, as a seed with a digest)."""


@dataclass(frozen=True)
class TakeOver:
    """Take what the holders have from them, the rest from the origin."""


@dataclass(frozen=True)
class Verify:
    """Prove the whole file against its digest, when there is one."""


@dataclass(frozen=True)
class Repair:
    """Read again from the origin the pieces only someone's word vouched for."""


@dataclass(frozen=True)
class Finish:
    """Tell the scheduler how it ended; ``success`` False leaves nothing marked complete."""

    success: bool
    message: str = ""


Step = Announce | Register | Wait | Swarm | ReadOrigin | TakeOver | Verify | Repair | Finish

_STEPS: dict[Phase, Step] = {
    "announcing": Announce(),
    "registering": Register(),
    "registering_seed": Register(seed=True),
    "swarming": Swarm(),
    "origin": ReadOrigin(),
    "taking_over": TakeOver(),
    "verifying": Verify(),
    "repairing": Repair(),
    "done": Finish(True),
}


def first_event(*, held: bool, seed: bool, control_plane: bool) -> EventName:
    """How a download starts: from the cache, as the task's seed, or by joining the swarm."""
    if held:
        return "held"
    return "missing_seed" if seed or not control_plane else "missing"


@dataclass
class Phases:
    """One download's phase and the path it took (``history``: for logs and tests)."""

    phase: Phase = "start"

    def __post_init__(self) -> None:
        self.history: list[Phase] = [self.phase]

    @property
    def ended(self) -> bool:
        return self.phase in ENDED

    def on(self, event: EventName, *, seconds: float = 0.0, message: str = "") -> Step:
        """The step after ``event``: ``seconds`` is a ``wait``'s, ``message`` an ``error``'s."""
        if event == "error" and not self.ended:
            return self._enter("failed", Finish(False, message))
        try:
            phase = TRANSITIONS[self.phase][event]
        except KeyError:
            raise ValueError(f"no {event!r} expected while {self.phase}") from None
        if phase == "waiting":
            return self._enter(phase, Wait(seconds))
        if phase == "failed":
            return self._enter(phase, Finish(False, message))
        return self._enter(phase, _STEPS[phase])

    def _enter(self, phase: Phase, step: Step) -> Step:
        self.phase = phase
        self.history.append(phase)
        return step
