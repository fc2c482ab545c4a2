"""How the contracts' JSON Schemas are checked: draft 2020-12, the draft every contract
declares, compiled by jsonschema-rs, which implements all of it (fastjsonschema, used before,
implements drafts 4 to 7 and let 2020-12's ``prefixItems`` and ``unevaluatedProperties``
pass unchecked). It is also the faster: five to nine times (bench/messages.py's
``ratio_validator``: 5.1 on a register, 9.1 on a report of 64 pieces; bench/README.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jsonschema_rs

DIALECT = "https://json-schema.org/draft/2020-12/schema"

Validator = Callable[[Any], None]
"""Checks a decoded JSON value; raises ``Invalid`` when it breaks the schema."""


class Invalid(ValueError):
    """A value that breaks its schema: why, and where (``data.pieces[0].number``)."""

    def __init__(self, message: str, path: str) -> None:
        super().__init__(f"{path}: {message}")
        self.message = message
        self.path = path


def location(instance_path: Sequence[str | int]) -> str:
    """``data`` and the path to the failing value, as the error shape's ``path`` says it."""
    return "data" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in instance_path)


def compile_schema(schema: dict[str, Any]) -> Validator:
    """A validator for ``schema`` under draft 2020-12, whatever ``$schema`` it declares."""
    validator = jsonschema_rs.Draft202012Validator(schema)

    def check(data: Any) -> None:
        try:
            validator.validate(data)
        except jsonschema_rs.ValidationError as exc:
            raise Invalid(exc.message, location(exc.instance_path)) from None

    return check
