"""swarmfly.plugins: the one import a plugin author needs, and the built-in plugins.

    from swarmfly.plugins import SourceRegistry, SourceStat, SwarmflyError, hookimpl

holds the hook marker, every type a hook passes or a plugin implements, the error a plugin
raises, and ``check_source``, the conformance check for source backends (docs/plugins.md).
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
    OriginGuard,
    PieceView,
    Source,
    SourceRegistry,
    SourceStat,
    Strategy,
    StrategyRegistry,
)

if TYPE_CHECKING:
    from swarmfly.testing import check_source

__all__ = [
    "Candidate",
    "Evaluation",
    "Evaluator",
    "EvaluatorRegistry",
    "OriginGuard",
    "PieceView",
    "Source",
    "SourceRegistry",
    "SourceStat",
    "Strategy",
    "StrategyRegistry",
    "SwarmflyError",
    "check_source",
    "hookimpl",
]


def __getattr__(name: str) -> Any:
    """``check_source`` on first use: the test kit is for a plugin's tests, and services that
    load the built-ins should not hold it."""
    if name == "check_source":
        from swarmfly.testing import check_source

        return check_source
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
