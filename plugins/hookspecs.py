"""The swarmfly plugin hooks (the types they use are in ``swarmfly.plugintypes``; authors
import both from ``swarmfly.plugins``).

A plugin is a module (or object) with functions marked ``@hookimpl`` named like the hooks
below, published under the entry-point group ``swarmfly``::

    [project.entry-points.swarmfly]
    ftp = "swarmfly_ftp"

Hooks run once, at start-up, and only *register* objects; per-request work calls those
objects' async methods directly (pluggy itself is synchronous). The built-in sources,
strategies and evaluators are registered through exactly this path.

A plugin with settings of its own names their dataclass (``swarmfly_settings_class``); its
register hooks then take ``settings``, an instance read from the configuration file's
``[plugins.<entry-point name>]`` table and checked against the dataclass's types. A hook
that does not name ``settings`` is not given it (pluggy passes what an impl asks for).
"""

from __future__ import annotations

from typing import Any

import pluggy

from swarmfly.plugintypes import EvaluatorRegistry, SourceRegistry, StrategyRegistry

PROJECT = "swarmfly"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# -- hooks ------------------------------------------------------------------------------


@hookspec(firstresult=True)
def swarmfly_settings_class() -> type[Any] | None:
    """The dataclass of this plugin's settings.

    Called once per plugin, at start-up, before its register hooks. Each field is a setting
    of ``[plugins.<entry-point name>]`` in the configuration file, of type ``bool``, ``int``,
    ``float``, ``str``, ``list[str]`` or ``pathlib.Path`` (numbers are never negative); a
    field's default is the setting's. A key the dataclass lacks, or a value of another type,
    is an error naming the plugin and the key, and the plugin is skipped.
    """


@hookspec
def swarmfly_register_sources(register: SourceRegistry, settings: Any) -> None:
    """Register source backends.

    Called once at start-up in every process that reads origins (storage, peer, the CLI's
    in-process peer), for every plugin; all results are used (not first-result).

    :param register: call ``register.add(source)`` once per backend; a backend that connects
        to hosts a URL names takes ``register.origins`` and asks it before each connection.
    :param settings: this plugin's settings (``swarmfly_settings_class``), or None.
    """


@hookspec
def swarmfly_register_strategies(register: StrategyRegistry, settings: Any) -> None:
    """Register piece-selection strategies.

    Called once at start-up in every process that downloads pieces; all results are used.

    :param register: call ``register.add(name, strategy)`` once per strategy.
    :param settings: this plugin's settings (``swarmfly_settings_class``), or None.
    """


@hookspec
def swarmfly_register_evaluators(register: EvaluatorRegistry, settings: Any) -> None:
    """Register parent evaluators.

    Called once at start-up by the scheduler; all results are used. The scheduler uses the
    one its configuration names (``scheduler.evaluator``, default ``default``).

    :param register: call ``register.add(name, evaluator)`` once per evaluator.
    :param settings: this plugin's settings (``swarmfly_settings_class``), or None.
    """
