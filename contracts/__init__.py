"""The contracts: one JSON Schema per NATS subject, the single source of truth of the wire.

Each file in ``subjects/`` names a subject (relative to ``<prefix>.v1.``), its request and
reply schemas and examples. ``common.json`` holds shared definitions; references into it are
inlined at load time so every compiled validator is self-contained. Off NATS, the peer HTTP
API (``http/peer.openapi.json``) and the local socket (``localsocket.json``) are contracts too
(``peer_api``, ``local_socket``; see ``documents``).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

from swarmfly.contracts.documents import (
    Answer,
    LocalMessage,
    LocalSocket,
    Operation,
    local_socket,
    peer_api,
    peer_openapi,
    peer_operation,
)
from swarmfly.contracts.schema import DIALECT, Invalid, Validator, compile_schema

API_VERSION = "v1"
COMMON_REF = "common.json#/$defs/"
_TOKEN = re.compile(r"\{([a-z_]+)\}")
TOKEN_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
SENDER = "sender"
"""The tokens a sending host fills (contracts with ``"sender": true``): its type and id."""
HOST_TYPES = ("normal", "seed")


@dataclass(frozen=True)
class Sender:
    """The host a message's subject names as its sender: nats-server lets a host's
    credentials publish only under its own id, and only storage's under type ``seed``."""

    host_type: str
    host_id: str

    @property
    def token(self) -> str:
        """The value of the ``sender`` subject token (two subject tokens)."""
        return f"{self.host_type}.{self.host_id}"

    @classmethod
    def of(cls, subject: str) -> Sender:
        host_type, host_id = subject.split(".")[-2:]
        return cls(host_type, host_id)


@dataclass(frozen=True)
class Contract:
    """One subject: its schemas, compiled validators and examples."""

    name: str
    version: int
    service: str
    summary: str
    description: str
    request: dict[str, Any]
    reply: dict[str, Any] | None
    examples: list[dict[str, Any]]
    queue_group: str | None
    fanout: bool
    """Every instance of the service receives each request (each in its own queue group);
    the requester takes the first reply."""
    sender: bool
    """The subject ends in the sending host's type and id (``Sender``): nats-server
    permissions let a host publish only under its own, and the receiver checks the body
    names no other."""
    validate_request: Validator = field(repr=False, compare=False)
    validate_reply: Validator | None = field(repr=False, compare=False)

    @property
    def tokens(self) -> list[str]:
        """Placeholders in the subject, such as ``host_id`` in ``peer.{host_id}.download``."""
        return _TOKEN.findall(self.name)

    def subject(self, prefix: str, *, every: tuple[str, ...] = (), **tokens: str) -> str:
        """The concrete NATS subject; tokens must be valid single subject tokens. A token
        named in ``every`` becomes ``*``: a subscription to all its values."""
        for key, value in tokens.items():
            if key == SENDER:
                host_type, _, value = value.partition(".")
                if host_type not in HOST_TYPES:
                    raise ValueError(f"invalid sender host type {host_type!r}")
            if not TOKEN_PATTERN.fullmatch(value):
                raise ValueError(f"invalid subject token {key}={value!r}")
        subject = f"{prefix}.{API_VERSION}." + self.name.format(
            **{k: v for k, v in tokens.items() if k != SENDER}, **dict.fromkeys(every, "*")
        )
        if not self.sender:
            if SENDER in tokens:
                raise ValueError(f"{self.name} names no sender")
            return subject
        if SENDER in every:
            return f"{subject}.*.*"
        if SENDER not in tokens:
            raise ValueError(f"{self.name} names its sender: a {SENDER} token is required")
        return f"{subject}.{tokens[SENDER]}"

    @property
    def address(self) -> str:
        """The subject as a template, the sender's token included."""
        return self.name + (".{sender_type}.{sender}" if self.sender else "")


def _inline(node: Any, defs: Mapping[str, Any]) -> Any:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith(COMMON_REF):
            return _inline(copy.deepcopy(defs[ref.removeprefix(COMMON_REF)]), defs)
        return {key: _inline(value, defs) for key, value in node.items()}
    if isinstance(node, list):
        return [_inline(item, defs) for item in node]
    return node


def _load_json(name: str) -> dict[str, Any]:
    text = resources.files(__package__).joinpath(name).read_text(encoding="utf-8")
    data: dict[str, Any] = json.loads(text)
    return data


def _schema(body: dict[str, Any]) -> dict[str, Any]:
    return {"$schema": DIALECT, **body}


@cache
def common_defs() -> dict[str, Any]:
    defs: dict[str, Any] = _load_json("common.json")["$defs"]
    return defs


@cache
def error_schema() -> dict[str, Any]:
    return _load_json("error.json")


@cache
def validate_error() -> Validator:
    return compile_schema(error_schema())


class _OnUse:
    """A validator compiled at its first use: a process uses a few contracts (the CLI two),
    and compiling all of them costs a short-lived one more than its work. A service compiles
    them all as it starts (``warm``), not in its first download."""

    def __init__(self, schema: dict[str, Any]) -> None:
        self.schema = schema
        self._compiled: Validator | None = None

    def compiled(self) -> Validator:
        if self._compiled is None:
            self._compiled = compile_schema(self.schema)
        return self._compiled

    def __call__(self, data: Any) -> None:
        self.compiled()(data)


def _compiled_on_use(schema: dict[str, Any]) -> Validator:
    return _OnUse(schema)


def warm() -> None:
    """Compile every contract's validators now (a service starting)."""
    for contract in registry().values():
        for validator in (contract.validate_request, contract.validate_reply):
            if isinstance(validator, _OnUse):
                validator.compiled()


@cache
def registry() -> dict[str, Contract]:
    """Every contract by subject name, loaded and compiled once per process."""
    defs = common_defs()
    contracts: dict[str, Contract] = {}
    folder = resources.files(__package__).joinpath("subjects")
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".json"):
            continue
        raw = json.loads(entry.read_text(encoding="utf-8"))
        request = _schema(_inline(raw["request"], defs))
        reply = _schema(_inline(raw["reply"], defs)) if raw.get("reply") else None
        contract = Contract(
            name=raw["subject"],
            version=raw["version"],
            service=raw["service"],
            summary=raw["summary"],
            description=raw.get("description", raw["summary"]),
            request=request,
            reply=reply,
            examples=raw["examples"],
            queue_group=raw.get("queue_group"),
            fanout=bool(raw.get("fanout", False)),
            sender=bool(raw.get("sender", False)),
            validate_request=_compiled_on_use(request),
            validate_reply=_compiled_on_use(reply) if reply else None,
        )
        contracts[contract.name] = contract
    return contracts


def get(name: str) -> Contract:
    """The contract for a subject name; a name without one is a programming error."""
    try:
        return registry()[name]
    except KeyError:
        raise LookupError(f"no contract for subject {name!r}") from None


__all__ = [
    "API_VERSION",
    "HOST_TYPES",
    "SENDER",
    "Answer",
    "Contract",
    "Invalid",
    "LocalMessage",
    "LocalSocket",
    "Operation",
    "Sender",
    "Validator",
    "get",
    "local_socket",
    "peer_api",
    "peer_openapi",
    "peer_operation",
    "registry",
    "validate_error",
]
