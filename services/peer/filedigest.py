"""The verified prefix of a download, followed while it runs.

Pieces arrive out of order; a worker thread follows the growing prefix of verified pieces
(hashlib and the kernel's copies release the GIL) to hash it for the whole-file digest, when
there is one to prove, and to copy it into the outputs waiting for the file. At the end only
the tail is left, not a second pass over the whole file, and the output is not a copy made
after the download but beside it.

An output holds only verified pieces, but it is not the requester's file yet: the requester
renames it into place once the peer says the whole file is verified (``swarmfly get``'s
hidden temporary), so a failed or forged download never reaches the path asked for.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from dataclasses import dataclass, field
from typing import Any

from swarmfly.services.peer.store import StoredTask

PASS_BYTES = 64 * 1024 * 1024
"""At most this much prefix per thread hop: the pass keeps up without holding a thread long."""


@dataclass(eq=False)
class Output:
    """A file the verified prefix is copied into (an empty regular file open for writing),
    through a descriptor of its own: a pass still copying when its requester is gone never
    writes into a number the process reused."""

    fd: int
    copied: int = 0
    """Bytes of the prefix already in it."""
    failed: OSError | None = None
    """Why it could not be written (its disk full, say): its requester's failure, not the
    download's, said when the requester asks for the rest."""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def copy_up_to(self, stored: StoredTask, end: int) -> None:
        """Copy the prefix into it up to byte ``end`` (in a worker thread). The lock keeps
        a pass that was cancelled, and is still copying, from racing the requester's own
        copy of the tail."""
        with self._lock:
            if self.failed is not None:
                raise self.failed
            if self.fd >= 0 and self.copied < end:  # else closed: its requester is gone
                stored.copy_out(self.fd, self.copied, end - self.copied)
                self.copied = end

    def follow(self, stored: StoredTask, end: int) -> None:
        """``copy_up_to`` for the pass: a failure stays with this output."""
        try:
            self.copy_up_to(stored, end)
        except OSError as exc:
            self.failed = exc

    def rewind(self) -> None:
        with self._lock:
            self.copied = 0

    def close(self) -> None:
        """After a copy under way (a worker thread: it may wait for one)."""
        with self._lock:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1


class PrefixDigest:
    def __init__(self, stored: StoredTask) -> None:
        self.stored = stored
        self._hasher: Any = hashlib.sha256()
        self._hashed = 0
        """Bytes of the prefix hashed."""
        self.hashing = False
        """Set once there is a whole-file digest to prove: else hashing is a pass for nothing."""
        self.outputs: list[Output] = []
        self._running: asyncio.Task[None] | None = None

    def attach(self, fd: int) -> Output:
        """Copy the verified prefix into ``fd`` from now on, from its start; ``detach`` the
        output when done with it."""
        output = Output(os.dup(fd))
        self.outputs.append(output)
        self.kick()
        return output

    async def detach(self, output: Output) -> None:
        if output in self.outputs:
            self.outputs.remove(output)
        await asyncio.to_thread(output.close)

    def kick(self) -> None:
        """A piece was verified (or an output came): follow whatever prefix is contiguous."""
        if not (self.hashing or self.outputs):
            return
        if self._running is None or self._running.done():
            self._running = asyncio.create_task(self._advance())

    def _prefix(self) -> int:
        """Bytes from the start of the file that lie in verified pieces (from the lowest
        cursor on: below it, every piece was verified when a cursor passed it)."""
        content = self.stored.content
        followed = [o.copied for o in self.outputs if o.failed is None]
        cursors = followed + ([self._hashed] if self.hashing else [])
        if content is None or not cursors:
            return 0
        number = min(cursors) // content.piece_length if content.piece_length else 0
        while number < content.piece_count and number in self.stored.done:
            number += 1
        if number >= content.piece_count:
            return content.content_length
        return content.piece(number)[0]

    async def _advance(self) -> None:
        while True:
            end = self._prefix()
            behind = [o for o in self.outputs if o.copied < end and o.failed is None]
            hash_to = end if self.hashing and self._hashed < end else None
            if hash_to is None and not behind:
                return
            # The hash and the copies side by side (each its own thread): the pass goes at
            # the pace of the slower one, not of both in a row, and keeps up with the pieces.
            passes = [asyncio.to_thread(self._copy, end, behind)] if behind else []
            if hash_to is not None:
                passes.append(asyncio.to_thread(self._hash, hash_to))
            # Both end before the next pass starts, however either ends: one hasher, fed in
            # order, by one thread at a time.
            for outcome in await asyncio.gather(*passes, return_exceptions=True):
                if isinstance(outcome, BaseException):
                    raise outcome

    def _hash(self, hash_to: int) -> None:
        stop = min(hash_to, self._hashed + PASS_BYTES)
        self.stored.hash_into(self._hasher, self._hashed, stop - self._hashed)
        self._hashed = stop

    def _copy(self, end: int, outputs: list[Output]) -> None:
        for output in outputs:
            output.follow(self.stored, min(end, output.copied + PASS_BYTES))

    async def settle(self) -> None:
        """Wait for the pass under way, if any."""
        if self._running is not None:
            await asyncio.shield(self._running)

    async def finish(self) -> str:
        """``sha256:HEX`` of the complete file."""
        self.hashing = True
        await self.settle()
        await self._advance()
        content = self.stored.content
        assert content is not None and self._hashed == content.content_length
        return f"sha256:{self._hasher.hexdigest()}"

    async def rewind(self) -> None:
        """Start over from the first byte: pieces already passed were read again."""
        await self.settle()
        self._hasher = hashlib.sha256()
        self._hashed = 0
        for output in self.outputs:
            output.rewind()

    def cancel(self) -> None:
        if self._running is not None:
            self._running.cancel()
