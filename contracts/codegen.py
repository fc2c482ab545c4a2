"""Generate ``messages.py``: a frozen, slotted dataclass for each contract's request and reply.

Run ``python -m swarmfly.contracts.codegen`` after changing a contract (``--check``: exit 1
when ``messages.py`` is stale). From JSON Schema to Python:

- an object with ``properties`` is a class. An object in common.json's ``$defs`` is one class,
  shared by every message that refers to it; an inline object is named in ``INLINE_NAMES``
  (a new one fails here until it has a name in the domain).
- required properties come first, without a default. An optional one is ``X | None = None``
  and ``to_dict`` leaves it out while it is None. An optional one that may also be null is
  ``X | None | Absent = ABSENT``: null and absent are different bodies, and both round-trip.
- string, integer, number, boolean: str, int, float, bool; an enum: a Literal; an array: a
  list. Lists and maps are shared with the body, not copied: a decoded body belongs to its
  message, and ``to_dict``'s result goes straight to the encoder.
- free-form values are too loose for a dataclass: an object of ``additionalProperties`` only
  is a ``dict[str, V]``, a ``oneOf`` of different shapes (other than X-or-null) is ``Any``.

``from_dict`` trusts its input (the bus validated it) and is straight-line code, no
reflection, because it runs on every message.
"""

from __future__ import annotations

import argparse
import json
import keyword
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from swarmfly.contracts import COMMON_REF, common_defs

TARGET = Path(__file__).with_name("messages.py")
COMMAND = "python -m swarmfly.contracts.codegen"
DEF_NAMES = {"task": "TaskContent"}
"""Class names of common.json objects that their $defs key would name badly."""
INLINE_NAMES = {
    "pieces.request.pieces": "PieceReport",
    "pieces.request.lent": "LentPiece",
    "reschedule.request.bad_parents": "BadParent",
    "state.reply.hosts": "HostState",
    "state.reply.scheduler": "SchedulerState",
    "state.reply.tasks": "TaskState",
    "state.reply.tasks.summary": "TaskSummary",
    "state.reply.tasks.peers": "PeerState",
}
"""Class names of inline objects, by '<subject's last word>.<request|reply>.<properties>'."""
SCALARS = {"string": "str", "integer": "int", "number": "float", "boolean": "bool"}
NULL = {"type": "null"}

Code = Callable[[str], str]
"""Python source of a conversion, given the source of the value to convert."""


@dataclass(frozen=True)
class Shape:
    """How a schema looks in Python: its annotation, and how a JSON value becomes one and back
    (None: the JSON value is the Python value)."""

    hint: str
    load: Code | None = None
    dump: Code | None = None
    nullable: bool = False


@dataclass(frozen=True)
class Field:
    name: str
    shape: Shape
    required: bool


@dataclass(frozen=True)
class Class:
    name: str
    doc: str
    fields: list[Field]


def _camel(word: str) -> str:
    return "".join(part.capitalize() for part in word.split("_"))


SHORT_NAMES = {
    "peer.{host_id}.preheat": "peer_preheat",
    "preheat.{job}.progress": "preheat_progress",
}
"""Names of subjects whose last word another subject ends in too."""


def short_name(subject: str) -> str:
    """The subject's last word: ``scheduler.{partition}.register`` -> ``register``."""
    if subject in SHORT_NAMES:
        return SHORT_NAMES[subject]
    return [t for t in subject.split(".") if not t.startswith("{")][-1]


class Generator:
    def __init__(self) -> None:
        self.defs = common_defs()
        self.shared: dict[str, Class] = {}
        self.classes: dict[str, Class] = {}
        self.subjects: list[tuple[str, str, str]] = []
        self.origin: dict[str, str] = {}
        """Where each class name comes from: one name, one schema."""
        self.uses_literal = False
        self.uses_absent = False

    def subject(self, raw: dict[str, Any]) -> None:
        name = raw["subject"]
        short = short_name(name)
        if any(short == short_name(other) for other, _, _ in self.subjects):
            raise ValueError(f"{name}: another subject ends in {short!r} too")
        summary = raw["summary"][0].lower() + raw["summary"][1:]
        request = self.message(raw["request"], f"{short}.request", f"``{name}`` request", summary)
        reply = "NoReply"  # an event: published, never answered
        if raw.get("reply") is not None:
            reply = self.message(raw["reply"], f"{short}.reply", f"``{name}`` reply", summary)
        self.subjects.append((name, request, reply))

    def message(self, node: dict[str, Any], where: str, label: str, summary: str) -> str:
        """The class of a request or reply: a common.json object, or its own."""
        if "$ref" in node:
            return self.shape(node, where).hint
        short, kind = where.split(".")
        name = _camel(short) + kind.capitalize()
        node = {"description": summary, **node}
        return self.klass(node, name, where, label, self.classes).hint

    def shape(self, node: dict[str, Any], where: str) -> Shape:
        ref = node.get("$ref")
        if isinstance(ref, str):
            key = ref.removeprefix(COMMON_REF)
            target = self.defs[key]
            if "properties" in target:
                name = DEF_NAMES.get(key, _camel(key))
                return self.klass(target, name, key, f"common.json ``{key}``", self.shared)
            return self.shape(target, where)
        if "enum" in node:
            if not all(isinstance(v, str) for v in node["enum"]):
                return Shape("Any")
            self.uses_literal = True
            return Shape(f"Literal[{', '.join(json.dumps(v) for v in node['enum'])}]")
        if "oneOf" in node:
            options = [o for o in node["oneOf"] if o != NULL]
            if len(options) == 1 and len(node["oneOf"]) == 2:
                return _nullable(self.shape(options[0], where))
            return Shape("Any")  # different shapes: free-form
        kind = node.get("type")
        if isinstance(kind, list):
            kinds = [k for k in kind if k != "null"]
            if len(kinds) != 1:
                return Shape("Any")
            inner = self.shape({**node, "type": kinds[0]}, where)
            return _nullable(inner) if "null" in kind else inner
        if kind == "object":
            if "properties" in node:
                inline = INLINE_NAMES.get(where)
                if inline is None:
                    raise LookupError(f"{where}: name its class in codegen.INLINE_NAMES")
                return self.klass(node, inline, where, f"In ``{where}``", self.classes)
            values = node.get("additionalProperties")
            value = self.shape(values, where) if isinstance(values, dict) else Shape("Any")
            if value.load is not None:
                raise NotImplementedError(f"{where}: a map of objects")
            return Shape(f"dict[str, {value.hint}]")
        if kind == "array":
            item = self.shape(node["items"], where)
            if item.load is None or item.dump is None:
                return Shape(f"list[{item.hint}]")
            load, dump = item.load("v"), item.dump("v")
            if item.nullable:
                load, dump = f"None if v is None else {load}", f"None if v is None else {dump}"
            return Shape(
                f"list[{item.hint}]",
                lambda e: f"[{load} for v in {e}]",
                lambda e: f"[{dump} for v in {e}]",
            )
        if kind in SCALARS:
            return Shape(SCALARS[kind])
        raise NotImplementedError(f"{where}: no Python type for {node}")

    def klass(
        self, node: dict[str, Any], name: str, where: str, label: str, into: dict[str, Class]
    ) -> Shape:
        if self.origin.setdefault(name, where) != where:
            raise ValueError(f"{where} and {self.origin[name]} are both named {name}")
        if name not in into:
            required = node.get("required", [])
            fields = []
            for prop, schema in node["properties"].items():
                if keyword.iskeyword(prop) or prop in ("cls", "data"):
                    raise NotImplementedError(f"{where}.{prop}: not a usable field name")
                shape = self.shape(schema, f"{where}.{prop}")
                self.uses_absent |= shape.nullable and prop not in required
                fields.append(Field(prop, shape, prop in required))
            fields.sort(key=lambda f: not f.required)
            doc = f"{label}: {node['description']}" if "description" in node else label
            into[name] = Class(name, doc if doc.endswith(".") else doc + ".", fields)
        return Shape(name, lambda e: f"{name}.from_dict({e})", lambda e: f"{e}.to_dict()")

    def source(self) -> str:
        typing = "Any, Final, Literal" if self.uses_literal else "Any, Final"
        absent = "ABSENT, Absent, " if self.uses_absent else ""
        no_reply = "NoReply, " if any(r == "NoReply" for *_, r in self.subjects) else ""
        lines = [
            f"# @generated by `{COMMAND}` from contracts/subjects/*.json and",
            "# contracts/common.json: edit those and regenerate, never this file.",
            '"""Typed wire messages: a frozen dataclass for each contract\'s request and reply,',
            "with ``to_dict`` and ``from_dict``, and ``SUBJECTS``: each subject's pair of types.",
            '"""',
            "",
            "from __future__ import annotations",
            "",
            "from collections.abc import Mapping",
            "from dataclasses import dataclass",
            f"from typing import {typing}",
            "",
            f"from swarmfly.contracts.wire import {absent}{no_reply}Subject",
            "from swarmfly.frozen import quick_init",
            "",
        ]
        order = {DEF_NAMES.get(key, _camel(key)): i for i, key in enumerate(self.defs)}
        shared = sorted(self.shared.values(), key=lambda c: order[c.name])
        for cls in [*shared, *self.classes.values()]:
            lines += ["", *_class_source(cls)]
        lines.append("")
        for name, request, reply in self.subjects:
            constant = short_name(name).upper()
            lines.append(f"{constant}: Final = Subject({json.dumps(name)}, {request}, {reply})")
        lines += ["SUBJECTS: Final[Mapping[str, Subject[Any, Any]]] = {"]
        lines += [
            f"    {short_name(name).upper()}.name: {short_name(name).upper()},"
            for name, *_ in self.subjects
        ]
        lines += ["}", '"""Every subject\'s types, by contract name."""', ""]
        return "\n".join(lines)


def _nullable(inner: Shape) -> Shape:
    """``inner`` or null; its load and dump stay ``inner``'s: the caller checks for None."""
    return Shape(f"{inner.hint} | None", inner.load, inner.dump, nullable=True)


def _docstring(text: str, indent: str) -> list[str]:
    text = text.replace("\\", "\\\\").replace('"""', '\\"\\"\\"')
    wrapped = textwrap.wrap(text, 96 - len(indent) - 6) or [""]
    if len(wrapped) == 1:
        return [f'{indent}"""{wrapped[0]}"""']
    return [f'{indent}"""{wrapped[0]}', *(indent + line for line in wrapped[1:]), f'{indent}"""']


def _from_dict(cls: Class) -> list[str]:
    """A value converted only when it is set (not None, not absent) is read into a local."""
    locals_, args = [], []
    for f in cls.fields:
        key = json.dumps(f.name)
        if f.required:
            read = f"data[{key}]"
        else:
            read = f"data.get({key}, ABSENT)" if f.shape.nullable else f"data.get({key})"
        load = f.shape.load
        if load is None:
            args.append(read)
        elif f.required and not f.shape.nullable:
            args.append(load(read))
        else:
            locals_.append(f"        {f.name} = {read}")
            if f.shape.nullable and not f.required:
                unset = f"{f.name} if {f.name} is None or {f.name} is ABSENT"
            else:
                unset = f"None if {f.name} is None"
            args.append(f"{unset} else {load(f.name)}")
    # One line, no magic trailing comma: ruff format wraps what does not fit.
    keywords = ", ".join(f"{f.name}={a}" for f, a in zip(cls.fields, args, strict=True))
    return [
        "    @classmethod",
        f"    def from_dict(cls, data: Mapping[str, Any]) -> {cls.name}:",
        *locals_,
        f"        return cls({keywords})",
    ]


def _to_dict(cls: Class) -> list[str]:
    """Required properties in one literal; each optional one added when it is set."""

    def dumped(f: Field) -> str:
        value = f"self.{f.name}"
        if f.shape.dump is None:
            return value
        if f.shape.nullable:
            return f"None if {value} is None else {f.shape.dump(value)}"
        return f.shape.dump(value)

    literal = ", ".join(f"{json.dumps(f.name)}: {dumped(f)}" for f in cls.fields if f.required)
    lines = ["    def to_dict(self) -> dict[str, Any]:"]
    if all(f.required for f in cls.fields):
        return [*lines, f"        return {{{literal}}}"]
    lines.append(f"        data: dict[str, Any] = {{{literal}}}")
    for f in cls.fields:
        if not f.required:
            unset = "ABSENT" if f.shape.nullable else "None"
            lines.append(f"        if self.{f.name} is not {unset}:")
            lines.append(f"            data[{json.dumps(f.name)}] = {dumped(f)}")
    return [*lines, "        return data"]


def _class_source(cls: Class) -> list[str]:
    lines = ["@quick_init", "@dataclass(frozen=True, slots=True)", f"class {cls.name}:"]
    lines += [*_docstring(cls.doc, "    "), ""]
    for f in cls.fields:
        if f.required:
            lines.append(f"    {f.name}: {f.shape.hint}")
        elif f.shape.nullable:
            hint = f.shape.hint.removesuffix(" | None")
            lines.append(f"    {f.name}: {hint} | Absent | None = ABSENT")
        else:
            lines.append(f"    {f.name}: {f.shape.hint} | None = None")
    return [*lines, "", *_from_dict(cls), "", *_to_dict(cls)]


def _subject_files() -> list[dict[str, Any]]:
    folder = resources.files(__package__).joinpath("subjects")
    entries = sorted(folder.iterdir(), key=lambda e: e.name)
    return [json.loads(e.read_text(encoding="utf-8")) for e in entries if e.name.endswith(".json")]


def generate() -> str:
    """The source ``messages.py`` must hold, formatted as ``ruff format`` leaves it."""
    generator = Generator()
    for raw in _subject_files():
        generator.subject(raw)
    format_ = [sys.executable, "-m", "ruff", "format", "--stdin-filename", str(TARGET), "-"]
    result = subprocess.run(
        format_, input=generator.source(), capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"ruff format failed (is ruff installed?): {result.stderr}")
    return result.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if messages.py is stale")
    args = parser.parse_args(argv)
    source = generate()
    current = TARGET.read_text(encoding="utf-8") if TARGET.exists() else ""
    if args.check:
        if current != source:
            print(f"{TARGET} is stale: run {COMMAND}", file=sys.stderr)
            return 1
        return 0
    if current != source:
        TARGET.write_text(source, encoding="utf-8")
        print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
