"""What a typed wire message is, and how a subject pairs its request type with its reply type.

The message classes themselves are generated into ``messages`` (``codegen``). A bus typed by
contract takes a ``Subject`` as aiohttp takes an ``AppKey``: ``bus.request(REGISTER,
RegisterRequest(...))`` is a ``Schedule`` to mypy, and a handler bound to ``REGISTER`` must take
a ``RegisterRequest`` and return a ``Schedule``.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Generic, Protocol, Self, TypeAlias, TypeVar

from swarmfly.contracts import Contract, Sender, get


class Absent(enum.Enum):
    """A property left out of a body, where the schema also allows null: the two are
    different bodies, so both survive ``from_dict``/``to_dict``."""

    ABSENT = "absent"


ABSENT: Final = Absent.ABSENT


class Message(Protocol):
    """A generated request or reply: built from a body the contract's validator accepted."""

    def to_dict(self) -> dict[str, Any]: ...

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self: ...


class NoReply:
    """The reply type of an event (a contract without a reply): published, never answered,
    so nothing ever makes one."""

    def to_dict(self) -> dict[str, Any]:
        raise TypeError("an event has no reply")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        raise TypeError("an event has no reply")


Req = TypeVar("Req", bound=Message)
Rep = TypeVar("Rep", bound=Message)


@dataclass(frozen=True, slots=True)
class Subject(Generic[Req, Rep]):
    """A contract's subject name with the types of its request and its reply."""

    name: str
    request: type[Req]
    reply: type[Rep]

    @property
    def contract(self) -> Contract:
        return get(self.name)


Handler: TypeAlias = Callable[[Req], Awaitable[Rep]]
SentHandler: TypeAlias = Callable[[Req, Sender], Awaitable[Rep]]
"""The handler of a subject that names its sender (``Contract.sender``)."""


@dataclass(frozen=True, slots=True)
class Endpoint(Generic[Req, Rep]):
    """A handler bound to its subject, so mypy checks the pair: ``Endpoint(REGISTER,
    on_register)``. A mapping of names to handlers cannot be typed per key."""

    subject: Subject[Req, Rep]
    handler: Handler[Req, Rep] | SentHandler[Req, Rep]


class Requester(Protocol):
    """The typed calls of a bus: what a caller holds instead of ``Bus`` itself."""

    async def request(
        self, subject: Subject[Req, Rep], message: Req, *, timeout: float = ..., **tokens: str
    ) -> Rep: ...

    async def gather(
        self,
        subject: Subject[Req, Rep],
        message: Req,
        *,
        wait: float = ...,
        expect: int | None = ...,
        **tokens: str,
    ) -> list[Rep]: ...
