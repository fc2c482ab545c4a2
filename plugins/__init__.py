"""swarmfly.plugins: the one import a plugin author needs, and the built-in plugins.

    from swarmfly.plugins import SourceRegistry, SourceStat, SwarmflyError, hookimpl

holds the hook marker, every type a hook passes or a plugin implements, the error a plugin
raises, and ``check_source`` and ``check_listing``, the conformance checks for source backends
(docs/plugins.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from swarmfly.errors import SwarmflyError
from swarmfly.plugins.hookspecs import hookimpl
from swarmfly.plugintypes import (
    Candidate,
    Evaluation,
    Evaluator,
    EvaluatorRegistry,
    Lister,
    OriginGuard,
    PieceView,
    Source,
    SourceEntry,
    SourceRegistry,
    SourceStat,
    Strategy,
    StrategyRegistry,
)

if TYPE_CHECKING:
    from swarmfly.testing import check_listing, check_source

__all__ = [
    "Candidate",
    "Evaluation",
    "Evaluator",
    "EvaluatorRegistry",
    "Lister",
    "OriginGuard",
    "PieceView",
    "Source",
    "SourceEntry",
    "SourceRegistry",
    "SourceStat",
    "Strategy",
    "StrategyRegistry",
    "SwarmflyError",
    "check_listing",
    "check_source",
    "hookimpl",
]


def __getattr__(name: str) -> Any:
    """``check_source`` on first use: the test kit is for a plugin's tests, and services that
    load the built-ins should not hold it."""
    if name in ("check_source", "check_listing"):
        from swarmfly import testing

        return getattr(testing, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
