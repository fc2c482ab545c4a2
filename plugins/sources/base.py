"""What a source backend offers: ``stat`` and ranged ``fetch`` as an async byte stream."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class SourceStat:
    size: int | None
    """None when the origin does not say (a chunked response)."""
    ranges: bool
    etag: str | None = None
    digest: str | None = None
    """sha256:HEX when the origin states the content's digest."""


class Source(Protocol):
    schemes: tuple[str, ...]

    async def stat(self, url: str, headers: Mapping[str, str]) -> SourceStat: ...

    def fetch(
        self, url: str, headers: Mapping[str, str], start: int = 0, end: int | None = None
    ) -> AsyncIterator[bytes]:
        """Bytes [start, end) (end None: to the end); exactly those bytes or an error."""
        ...
