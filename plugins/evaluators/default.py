"""Built-in parent evaluators: Dragonfly's weights (``default``) and ``least-loaded``."""

from __future__ import annotations

from swarmfly.plugins import Candidate, Evaluation, EvaluatorRegistry, hookimpl

FINISHED_PIECE_WEIGHT = 0.2
FREE_UPLOAD_WEIGHT = 0.2
PIECE_COST_WEIGHT = 0.15
HOST_TYPE_WEIGHT = 0.15
IDC_WEIGHT = 0.15
LOCATION_WEIGHT = 0.15
MAX_LOCATION_ELEMENTS = 5


def _location_score(parent: str, child: str) -> float:
    if not parent or not child:
        return 0.0
    a, b = parent.split("|")[:MAX_LOCATION_ELEMENTS], child.split("|")[:MAX_LOCATION_ELEMENTS]
    matched = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        matched += 1
    return matched / MAX_LOCATION_ELEMENTS


def evaluate(parent: Candidate, evaluation: Evaluation) -> float:
    """Higher is better: pieces the child lacks, free upload, cheap pieces, closeness."""
    child, total_pieces = evaluation.child, evaluation.total_pieces
    median_cost_ms = evaluation.median_cost_ms
    if parent.useful_pieces is not None and total_pieces > 0:
        finished = parent.useful_pieces / total_pieces
    elif parent.host_type == "seed":
        finished = 1.0
    elif total_pieces > 0:
        finished = max(0, parent.finished_pieces - child.finished_pieces) / total_pieces
    else:
        finished = 0.0
    # Smooth, not a cliff at full: with one paced slot per parent, "full" is every parent
    # that has a child, and children would crowd onto the same few again.
    free = 1.0 / (1.0 + parent.uploads / max(1, parent.upload_slots))
    if parent.mean_cost_ms is None or not median_cost_ms:
        cost = 0.5
    else:
        cost = 1.0 / (1.0 + parent.mean_cost_ms / median_cost_ms)
    # A seed serves everything but is the cluster's scarcest uplink: normal peers rank higher
    # when they have as much to give.
    host_type = 0.5 if parent.host_type == "seed" else 1.0
    idc = 1.0 if parent.idc and parent.idc == child.idc else 0.0
    both = parent.location and child.location  # most hosts name none: no call for them
    return (
        FINISHED_PIECE_WEIGHT * finished
        + FREE_UPLOAD_WEIGHT * free
        + PIECE_COST_WEIGHT * cost
        + HOST_TYPE_WEIGHT * host_type
        + IDC_WEIGHT * idc
        + (LOCATION_WEIGHT * _location_score(parent.location, child.location) if both else 0.0)
    )


def least_loaded(parent: Candidate, evaluation: Evaluation) -> float:
    """Free upload slots first, then pieces to give: spreads load, ignores topology."""
    free = max(0, parent.upload_slots - parent.uploads)
    total = evaluation.total_pieces
    return free + (parent.finished_pieces / total if total else 0.0)


@hookimpl
def swarmfly_register_evaluators(register: EvaluatorRegistry) -> None:
    register.add("default", evaluate)
    register.add("least-loaded", least_loaded)
