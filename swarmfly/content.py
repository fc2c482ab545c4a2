"""What a task is made of: where its bytes come from (the contract's ``source``) and what its
content is (the ``task`` object: length, piece length, piece count, digest), with the piece
arithmetic, shared by the scheduler, every peer and the CLI."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # Imported where a message is made: the CLI's ``get`` needs none, and the typed messages
    # cost it a quarter of its start-up (25 ms of CPU; 16 gets start at once in bench/swarm.py).
    from swarmfly.contracts import messages


MIN_PIECE_LENGTH = 1024 * 1024
"""Dragonfly's floor is 4 MiB; a piece reaches the last of N peers after about log2(N)
store-and-forward hops of one piece each, so a swarm's tail grows with the piece: measured
with bench/swarm.py (16 peers, 64 MiB at 8 MiB/s each), 1 MiB pieces finish in 0.87 of
the time 4 MiB ones take."""
MAX_PIECE_LENGTH = 64 * 1024 * 1024
"""Also the contracts' ``piece_length`` maximum (a test holds the two equal)."""
TARGET_PIECE_COUNT = 500


def piece_length_for(content_length: int) -> int:
    """next_power_of_two(length / 500), clamped to 1-64 MiB (Dragonfly's client: 4-64)."""
    target = max(1, content_length // TARGET_PIECE_COUNT)
    length = 1 << (target - 1).bit_length()
    return min(MAX_PIECE_LENGTH, max(MIN_PIECE_LENGTH, length))


def piece_count(content_length: int, piece_length: int) -> int:
    return (content_length + piece_length - 1) // piece_length


def piece_range(number: int, content_length: int, piece_length: int) -> tuple[int, int]:
    """(offset, size) of a piece."""
    start = number * piece_length
    return start, max(0, min(piece_length, content_length - start))


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
    tag: str = ""
    """dfget's ``--tag``: without a digest, the same URL under another tag is another task."""
    application: str = ""
    """dfget's ``--application``: a task-id input, as ``tag`` is."""
    filtered_query_params: tuple[str, ...] | None = None
    """dfget's ``--filtered-query-param``: the query names dropped before the task id is
    computed, instead of the default (``swarmfly.ids.normalize_url``)."""
    priority: int = 0
    """dfget's ``--priority``, Dragonfly's LEVEL0-6: what the scheduler may do for a task
    with no source yet (common.json ``source.priority``)."""

    @classmethod
    def of(cls, source: messages.Source) -> SourceRequest:
        return cls(
            source.url,
            dict(source.headers or {}),
            source.digest,
            source.piece_length,
            source.tag or "",
            source.application or "",
            tuple(source.filtered_query_params) if source.filtered_query_params else None,
            source.priority or 0,
        )

    def message(self) -> messages.Source:
        from swarmfly.contracts import messages

        return messages.Source(
            self.url,
            self.headers or None,
            self.digest or None,
            self.piece_length or None,
            self.tag or None,
            self.application or None,
            list(self.filtered_query_params) if self.filtered_query_params else None,
            self.priority or None,
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"url": self.url}
        if self.headers:
            out["headers"] = self.headers
        if self.digest:
            out["digest"] = self.digest
        if self.piece_length:
            out["piece_length"] = self.piece_length
        if self.tag:
            out["tag"] = self.tag
        if self.application:
            out["application"] = self.application
        if self.filtered_query_params:
            out["filtered_query_params"] = list(self.filtered_query_params)
        if self.priority:
            out["priority"] = self.priority
        return out
