"""Frozen dataclasses that are cheap to build: the scheduler builds several per decision.

A frozen dataclass's own ``__init__`` sets each field through ``object.__setattr__``, which
looks the name up on the type every time; with slots, each field has a descriptor whose
setter can be called directly. ``bench/scheduler.py --profile`` found building wire messages
and evaluator candidates at about a fifth of the scheduler's CPU; this halves it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


def quick_init(cls: type[T]) -> type[T]:
    """Replace the ``__init__`` of a frozen, slotted dataclass (``@dataclass(frozen=True,
    slots=True)`` below this decorator) with one of the same signature that sets each slot
    through its descriptor. Instances stay frozen: only ``__init__`` bypasses the guard."""
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.frozen or "__slots__" not in cls.__dict__:
        raise TypeError(f"{cls.__name__} is not a frozen, slotted dataclass")
    if hasattr(cls, "__post_init__"):
        raise TypeError(f"{cls.__name__} has a __post_init__, which this __init__ would skip")
    scope: dict[str, Any] = {}
    args: list[str] = []
    body: list[str] = []
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        if not field.init or field.kw_only or field.default_factory is not dataclasses.MISSING:
            raise TypeError(f"{cls.__name__}.{field.name}: only plain fields are supported")
        scope[f"_set_{field.name}"] = cls.__dict__[field.name].__set__
        if field.default is dataclasses.MISSING:
            args.append(field.name)
        else:
            scope[f"_default_{field.name}"] = field.default
            args.append(f"{field.name}=_default_{field.name}")
        body.append(f"    _set_{field.name}(self, {field.name})")
    source = f"def __init__(self, {', '.join(args)}):\n" + "\n".join(body or ["    pass"])
    exec(source, scope)
    init = scope["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__doc__ = cls.__init__.__doc__
    cls.__init__ = init  # type: ignore[method-assign]
    return cls
