"""The contracts off NATS: the peer HTTP API (``http/peer.openapi.json``, OpenAPI 3.1) and the
local socket (``localsocket.json``), loaded with every ``$ref`` inlined so that each schema
compiles on its own, as the subject contracts are.

A ``$ref`` names a file relative to the file it is written in (``../common.json#/$defs/id``).
The subject files name ``common.json`` from the contracts folder instead, so a file that is not
next to the one referring to it is looked up there.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

from swarmfly.contracts.schema import DIALECT, Validator, compile_schema

PEER_API = "http/peer.openapi.json"
LOCAL_SOCKET = "localsocket.json"
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
"""The keys of an OpenAPI path item that are operations."""


@cache
def _raw(name: str) -> Any:
    text = resources.files(__package__).joinpath(name).read_text(encoding="utf-8")
    return json.loads(text)


def _exists(name: str) -> bool:
    return resources.files(__package__).joinpath(name).is_file()


def _target(ref: str, base: str) -> tuple[str, str]:
    """The file and JSON pointer a ``$ref`` in file ``base`` names."""
    file, _, pointer = ref.partition("#")
    if not file:
        return base, pointer
    name = posixpath.normpath(posixpath.join(posixpath.dirname(base), file))
    if not _exists(name):
        name = posixpath.normpath(file)
    if name.startswith("../") or not _exists(name):
        raise LookupError(f"{base}: $ref {ref!r} names no contract file")
    return name, pointer


def _at(document: Any, pointer: str) -> Any:
    node = document
    for part in pointer.removeprefix("/").split("/") if pointer else ():
        part = part.replace("~1", "/").replace("~0", "~")
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def resolved(node: Any, base: str) -> Any:
    """``node``, read from file ``base``, with every ``$ref`` replaced by what it names; the
    keywords beside a ``$ref`` (a description) are kept over those of its target."""
    if isinstance(node, list):
        return [resolved(item, base) for item in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref")
    if not isinstance(ref, str):
        return {key: resolved(value, base) for key, value in node.items()}
    name, pointer = _target(ref, base)
    target = resolved(_at(_raw(name), pointer), name)
    if not isinstance(target, dict):
        return target
    if not pointer:  # a whole file: its identity is not the referrer's
        target = {k: v for k, v in target.items() if k not in ("$schema", "$id")}
    siblings = {key: resolved(value, base) for key, value in node.items() if key != "$ref"}
    return {**target, **siblings}


def _compiled(schema: dict[str, Any]) -> tuple[dict[str, Any], Validator]:
    schema = {"$schema": DIALECT, **schema}
    return schema, compile_schema(schema)


# -- the peer HTTP API ---------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """One documented response of an operation."""

    status: int
    description: str
    media_type: str | None
    """The body's media type (without parameters); None where no body is documented."""
    headers: dict[str, dict[str, Any]]
    """Documented response headers by lower-case name: each with ``required`` and ``schema``."""
    causes: dict[str, str]
    """An error body's every sentence, and when the server sends it (``x-swarmfly-causes``)."""
    schema: dict[str, Any] | None = field(repr=False)
    validate: Validator | None = field(repr=False, compare=False)


@dataclass(frozen=True)
class Operation:
    """One documented method on one path of the peer HTTP API."""

    operation_id: str
    method: str
    path: str
    """The path template, e.g. ``/v1/tasks/{task_id}/data``."""
    summary: str
    parameters: dict[tuple[str, str], dict[str, Any]]
    """Parameter objects by (``in``, name): ``("query", "wait")``, ``("header", "Range")``."""
    answers: dict[int, Answer]
    secured: bool
    """The capability is checked (``Authorization: Bearer``)."""

    @property
    def pattern(self) -> re.Pattern[str]:
        """Concrete paths of this template (a path parameter is one segment)."""
        parts = re.split(r"(\{[^}/]+\})", self.path)
        return re.compile(
            "".join("[^/]+" if p.startswith("{") else re.escape(p) for p in parts) + r"\Z"
        )

    def answer(self, status: int) -> Answer:
        """The documented response for ``status``; an undocumented one is a contract breach."""
        try:
            return self.answers[status]
        except KeyError:
            raise LookupError(f"{self.operation_id} documents no {status} answer") from None


def _answer(status: str, response: dict[str, Any]) -> Answer:
    content: dict[str, Any] = response.get("content", {})
    media_type = next(iter(content), None)
    schema = validate = None
    if media_type is not None and "schema" in content[media_type]:
        schema, validate = _compiled(content[media_type]["schema"])
    return Answer(
        status=int(status),
        description=response.get("description", ""),
        media_type=media_type,
        headers={name.lower(): value for name, value in response.get("headers", {}).items()},
        causes=dict(response.get("x-swarmfly-causes", {})),
        schema=schema,
        validate=validate,
    )


@cache
def peer_openapi() -> dict[str, Any]:
    """The peer HTTP API's OpenAPI document with every ``$ref`` inlined."""
    document: dict[str, Any] = resolved(_raw(PEER_API), PEER_API)
    return document


@cache
def peer_api() -> dict[str, Operation]:
    """Every operation of the peer HTTP API by its ``operationId``."""
    document = peer_openapi()
    secured_by_default = bool(document.get("security"))
    operations: dict[str, Operation] = {}
    for path, item in document["paths"].items():
        shared = item.get("parameters", [])
        for method in METHODS:
            if method not in item:
                continue
            operation = item[method]
            parameters = {
                (p["in"], p["name"]): p for p in (*shared, *operation.get("parameters", []))
            }
            security = operation.get("security")
            operations[operation["operationId"]] = Operation(
                operation_id=operation["operationId"],
                method=method.upper(),
                path=path,
                summary=operation.get("summary", ""),
                parameters=parameters,
                answers={int(s): _answer(s, r) for s, r in operation["responses"].items()},
                secured=secured_by_default if security is None else bool(security),
            )
    return operations


def peer_operation(method: str, path: str) -> Operation:
    """The operation that serves ``method`` on the concrete ``path`` (no query)."""
    for operation in peer_api().values():
        if operation.method == method.upper() and operation.pattern.match(path):
            return operation
    raise LookupError(f"the peer HTTP API documents no {method} {path}")


# -- the local socket ----------------------------------------------------------------------


@dataclass(frozen=True)
class LocalMessage:
    """One kind of line on the local socket."""

    name: str
    sender: str
    """``client`` or ``peer``."""
    key: str | None
    """The one key of a peer's line that says which message it is."""
    when: str
    schema: dict[str, Any] = field(repr=False)
    validate: Validator = field(repr=False, compare=False)


@dataclass(frozen=True)
class LocalSocket:
    """The local socket's framing, its messages and the peer's record (``peer.json``)."""

    framing: dict[str, Any]
    messages: dict[str, LocalMessage]
    validate_record: Validator = field(repr=False, compare=False)

    def of(self, line: Mapping[str, Any]) -> LocalMessage:
        """The peer message ``line`` is, by its key; LookupError for anything else."""
        for message in self.messages.values():
            if message.key is not None and list(line) == [message.key]:
                return message
        raise LookupError(f"a peer line with the keys {sorted(line)} is no local-socket message")


@cache
def local_socket() -> LocalSocket:
    document: dict[str, Any] = resolved(_raw(LOCAL_SOCKET), LOCAL_SOCKET)
    messages: dict[str, LocalMessage] = {}
    for name, message in document["messages"].items():
        schema, validate = _compiled(message["schema"])
        messages[name] = LocalMessage(
            name, message["from"], message.get("key"), message["when"], schema, validate
        )
    _, validate_record = _compiled(document["$defs"]["record"])
    return LocalSocket(dict(document["framing"]), messages, validate_record)
