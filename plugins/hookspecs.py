"""The swarmfly plugin hooks (the types they use are in ``swarmfly.plugintypes``; authors
import both from ``swarmfly.plugins``).

A plugin is a module (or object) with functions marked ``@hookimpl`` named like the hooks
below, published under the entry-point group ``swarmfly``::

    [project.entry-points.swarmfly]
    ftp = "swarmfly_ftp"

Hooks run once, at start-up, and only *register* objects; per-request work calls those
objects' async methods directly (pluggy itself is synchronous). The built-in sources,
strategies and evaluators are registered through exactly this path.
"""

from __future__ import annotations

import pluggy

from swarmfly.plugintypes import EvaluatorRegistry, SourceRegistry, StrategyRegistry

PROJECT = "swarmfly"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# -- hooks ------------------------------------------------------------------------------


@hookspec
def swarmfly_register_sources(register: SourceRegistry) -> None:
    """Register source backends.

    Called once at start-up in every process that reads origins (storage, peer, the CLI's
    in-process peer), for every plugin; all results are used (not first-result).

    :param register: call ``register.add(source)`` once per backend; a backend that connects
        to hosts a URL names takes ``register.origins`` and asks it before each connection.
    """


@hookspec
def swarmfly_register_strategies(register: StrategyRegistry) -> None:
    """Register piece-selection strategies.

    Called once at start-up in every process that downloads pieces; all results are used.

    :param register: call ``register.add(name, strategy)`` once per strategy.
    """


@hookspec
def swarmfly_register_evaluators(register: EvaluatorRegistry) -> None:
    """Register parent evaluators.

    Called once at start-up by the scheduler; all results are used. The scheduler uses the
    one its configuration names (``scheduler.evaluator``, default ``default``).

    :param register: call ``register.add(name, evaluator)`` once per evaluator.
    """
