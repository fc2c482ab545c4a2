"""The typed host around pluggy: loads plugins from the ``swarmfly`` entry-point group (the
built-ins too), calls each plugin's hooks once, and keeps what they registered.

A plugin that fails to import or raises while registering is reported by name and skipped;
the service starts without it.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any
from urllib.parse import urlsplit

import pluggy

from swarmfly.config import settings_of
from swarmfly.errors import SwarmflyError
from swarmfly.origins import OriginPolicy
from swarmfly.plugins import hookspecs
from swarmfly.plugintypes import Evaluator, OriginGuard, Source, Strategy

log = logging.getLogger(__name__)
GROUP = "swarmfly"


@dataclass
class PluginInfo:
    name: str
    version: str
    kinds: list[str] = field(default_factory=list)
    provides: list[str] = field(default_factory=list)
    error: str | None = None


class _Staging:
    """Collects one plugin's registrations so that a plugin that raises adds nothing."""

    def __init__(self) -> None:
        self.sources: list[Source] = []
        self.strategies: dict[str, Strategy] = {}
        self.evaluators: dict[str, Evaluator] = {}


class _SourceRegister:
    def __init__(self, staging: _Staging, origins: OriginGuard) -> None:
        self._staging = staging
        self.origins = origins

    def add(self, source: Source) -> None:
        if not isinstance(source, Source):
            raise TypeError(f"{source!r} is not a Source (stat, fetch, close, schemes)")
        self._staging.sources.append(source)


class _NamedRegister:
    def __init__(self, target: dict[str, Any], kind: str, takes: str) -> None:
        self._target, self._kind, self._takes = target, kind, takes

    def add(self, name: str, item: Callable[..., Any]) -> None:
        """Refuse, at start-up and by name, what could not be called as the API calls it (a
        plugin written for another version's arguments) rather than fail every decision."""
        if not callable(item):
            raise TypeError(f"{self._kind} {name!r} is not callable")
        try:
            inspect.signature(item).bind(*self._takes.split(", "))
        except TypeError:
            raise TypeError(f"{self._kind} {name!r} must take ({self._takes})") from None
        except ValueError:  # no signature to read (a builtin): called as it is
            pass
        self._target[name] = item


class Plugins:
    """Sources by scheme, strategies and evaluators by name, and what was loaded."""

    def __init__(self, origins: OriginGuard | None = None) -> None:
        self.origins: OriginGuard = origins or OriginPolicy()
        """What every source of this process may connect to; services check URLs with it."""
        self.sources: dict[str, Source] = {}
        self.strategies: dict[str, Strategy] = {}
        self.evaluators: dict[str, Evaluator] = {}
        self.infos: list[PluginInfo] = []
        self.manager = pluggy.PluginManager(hookspecs.PROJECT)
        self.manager.add_hookspecs(hookspecs)

    @classmethod
    def load(
        cls,
        disabled: Iterable[str] = (),
        extra: Iterable[tuple[str, object]] = (),
        origins: OriginGuard | None = None,
        settings: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> Plugins:
        """Every entry point of the group, less ``disabled``, plus ``extra`` (name, module)
        objects registered the same way (for tests and embedding); sources get ``origins``
        (default: the built-in denials only); ``settings``: each plugin's table of its own
        settings by name (``[plugins.<name>]``), checked against its settings class."""
        plugins = cls(origins)
        tables = dict(settings or {})
        blocked = {name.strip() for name in disabled if name.strip()}
        candidates: list[tuple[str, str, Callable[[], object]]] = []
        for point in sorted(entry_points(group=GROUP), key=lambda p: p.name):
            candidates.append((point.name, _version(point), point.load))
        for name, module in extra:
            candidates.append((name, "", lambda module=module: module))  # type: ignore[misc]
        for name, version, load in candidates:
            if name in blocked:
                plugins.manager.set_blocked(name)
                log.info("plugin %s disabled", name)
                continue
            info = PluginInfo(name, version)
            plugins.infos.append(info)
            try:
                plugins._register(name, load(), info, tables.pop(name, None))
            except Exception as exc:
                info.error = f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300]  # one line
                log.error("plugin %s skipped: %s", name, info.error)
        for name in sorted(tables):
            log.warning("[plugins.%s]: no plugin of that name is loaded; its settings unused", name)
        return plugins

    def _register(
        self, name: str, plugin: object, info: PluginInfo, table: Mapping[str, Any] | None
    ) -> None:
        staging = _Staging()
        others = self.manager.get_plugins()
        self.manager.register(plugin, name=name)
        try:
            # A hook pluggy does not know (a misspelt name) would otherwise never be called.
            self.manager.check_pending()
            settings = self._settings(name, others, table)
            for hook, register, kind in (
                ("swarmfly_register_sources", _SourceRegister(staging, self.origins), "source"),
                (
                    "swarmfly_register_strategies",
                    _NamedRegister(staging.strategies, "strategy", "view"),
                    "strategy",
                ),
                (
                    "swarmfly_register_evaluators",
                    _NamedRegister(staging.evaluators, "evaluator", "parent, evaluation"),
                    "evaluator",
                ),
            ):
                if not any(
                    i.plugin_name == name for i in getattr(self.manager.hook, hook).get_hookimpls()
                ):
                    continue
                # Through pluggy (its argument checks and wrappers), this plugin alone: what
                # it registers is staged, and kept only if all of it is consistent.
                self.manager.subset_hook_caller(hook, remove_plugins=others)(
                    register=register, settings=settings
                )
                info.kinds.append(kind)
            for source in staging.sources:
                for scheme in source.schemes:
                    if scheme in self.sources:
                        raise ValueError(f"scheme {scheme!r} is already served by another plugin")
            for kind, target, new in (
                ("strategy", self.strategies, staging.strategies),
                ("evaluator", self.evaluators, staging.evaluators),
            ):
                for key in new:
                    if key in target:
                        raise ValueError(f"{kind} {key!r} is already registered")
        except Exception:
            self.manager.unregister(name=name)
            raise
        for source in staging.sources:
            for scheme in source.schemes:
                self.sources[scheme.lower()] = source
            info.provides += list(source.schemes)
        self.strategies.update(staging.strategies)
        self.evaluators.update(staging.evaluators)
        info.provides += list(staging.strategies) + list(staging.evaluators)

    def _settings(self, name: str, others: Iterable[Any], table: Mapping[str, Any] | None) -> Any:
        """The plugin's settings, from its ``[plugins.<name>]`` table and its class; None for
        a plugin without a class (which a table then cannot configure)."""
        caller = self.manager.subset_hook_caller("swarmfly_settings_class", remove_plugins=others)
        kind = caller()
        if kind is None:
            if table:
                raise ValueError(f"[plugins.{name}]: this plugin takes no settings")
            return None
        if not isinstance(kind, type) or not dataclasses.is_dataclass(kind):
            raise TypeError(f"swarmfly_settings_class returned {kind!r}, not a dataclass")
        return settings_of(kind, table or {}, f"[plugins.{name}]")

    def source_for(self, url: str) -> Source:
        try:
            scheme = urlsplit(url).scheme.lower()
        except ValueError:
            raise SwarmflyError("bad_request", "the URL cannot be parsed") from None
        source = self.sources.get(scheme)
        if source is None:
            known = ", ".join(sorted(self.sources)) or "none"
            raise SwarmflyError(
                "bad_request", f"no source for scheme {scheme or '(none)'!r}; installed: {known}"
            )
        return source

    def strategy(self, name: str) -> Strategy:
        try:
            return self.strategies[name]
        except KeyError:
            known = ", ".join(sorted(self.strategies))
            raise SwarmflyError(
                "bad_request", f"unknown strategy {name!r}; installed: {known}"
            ) from None

    def evaluator(self, name: str) -> Evaluator:
        try:
            return self.evaluators[name]
        except KeyError:
            known = ", ".join(sorted(self.evaluators))
            raise SwarmflyError(
                "bad_request", f"unknown evaluator {name!r}; installed: {known}"
            ) from None

    async def close(self) -> None:
        for source in {id(s): s for s in self.sources.values()}.values():
            try:
                await source.close()
            except Exception as exc:  # a failing close must not block shutdown
                log.warning("closing a source failed: %s", exc)


def _version(point: EntryPoint) -> str:
    dist = point.dist
    return dist.version if dist is not None else ""
