"""What a task is made of: where its bytes come from (the contract's ``source``) and what its
content is (the ``task`` object: length, piece length, piece count, digest), shared by the
scheduler, every peer and the CLI."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from swarmfly.ids import piece_range

if TYPE_CHECKING:
    # Imported where a message is made: the CLI's ``get`` needs none, and the typed messages
    # cost it a quarter of its start-up (25 ms of CPU; 16 gets start at once in bench/swarm.py).
    from swarmfly.contracts import messages


@dataclass(frozen=True)
class TaskContent:
    content_length: int
    piece_length: int
    piece_count: int
    digest: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskContent:
        return cls(
            data["content_length"], data["piece_length"], data["piece_count"], data.get("digest")
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "content_length": self.content_length,
            "piece_length": self.piece_length,
            "piece_count": self.piece_count,
        }
        if self.digest:
            out["digest"] = self.digest
        return out

    @classmethod
    def of(cls, task: messages.TaskContent) -> TaskContent:
        return cls(task.content_length, task.piece_length, task.piece_count, task.digest)

    def message(self) -> messages.TaskContent:
        from swarmfly.contracts import messages

        return messages.TaskContent(
            self.content_length, self.piece_length, self.piece_count, self.digest or None
        )

    def piece(self, number: int) -> tuple[int, int]:
        return piece_range(number, self.content_length, self.piece_length)


@dataclass(frozen=True)
class SourceRequest:
    url: str
    headers: dict[str, str] = field(default_factory=dict, repr=False)
    digest: str | None = None
    piece_length: int | None = None

    @classmethod
    def of(cls, source: messages.Source) -> SourceRequest:
        return cls(source.url, dict(source.headers or {}), source.digest, source.piece_length)

    def message(self) -> messages.Source:
        from swarmfly.contracts import messages

        return messages.Source(
            self.url, self.headers or None, self.digest or None, self.piece_length or None
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"url": self.url}
        if self.headers:
            out["headers"] = self.headers
        if self.digest:
            out["digest"] = self.digest
        if self.piece_length:
            out["piece_length"] = self.piece_length
        return out
