"""What a task's content is: its length, piece length, piece count and digest (the contract's
``task`` object), shared by the scheduler and every peer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from swarmfly.ids import piece_range


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

    def piece(self, number: int) -> tuple[int, int]:
        return piece_range(number, self.content_length, self.piece_length)
