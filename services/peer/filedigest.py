"""The whole file's sha256, computed while the download runs.

Pieces arrive out of order; the hash follows the growing prefix of verified pieces in a worker
thread (hashlib releases the GIL), so at the end only the tail is left, not a second pass
over the whole file.
"""

from __future__ import annotations

import asyncio
import hashlib

from swarmfly.services.peer.store import StoredTask


class PrefixDigest:
    def __init__(self, stored: StoredTask) -> None:
        self.stored = stored
        self._hasher = hashlib.sha256()
        self._next = 0
        self._running: asyncio.Task[None] | None = None

    def kick(self) -> None:
        """A piece was verified: hash whatever prefix is now contiguous."""
        if self._running is None or self._running.done():
            self._running = asyncio.create_task(self._advance())

    async def _advance(self) -> None:
        content = self.stored.content
        while content is not None and self._next in self.stored.done:
            offset, size = content.piece(self._next)
            await asyncio.to_thread(self._hash, offset, size)
            self._next += 1

    def _hash(self, offset: int, size: int) -> None:
        position, end = offset, offset + size
        while position < end:
            block = self.stored.read(position, min(4 * 1024 * 1024, end - position))
            if not block:
                raise OSError("data file shorter than its content")
            self._hasher.update(block)
            position += len(block)

    async def finish(self) -> str:
        """``sha256:HEX`` of the complete file."""
        if self._running is not None:
            await self._running
        await self._advance()
        content = self.stored.content
        assert content is not None and self._next == content.piece_count
        return f"sha256:{self._hasher.hexdigest()}"

    def cancel(self) -> None:
        if self._running is not None:
            self._running.cancel()
