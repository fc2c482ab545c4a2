"""The on-disk task store: one data file per task written at piece offsets, and its metadata.

Metadata never holds secrets: the URL is kept without its query (signatures live there) and
headers are never written.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from swarmfly.content import TaskContent
from swarmfly.errors import SwarmflyError
from swarmfly.ids import TASK_ID, piece_count, redact_url
from swarmfly.services.peer.grants import Delegation

log = logging.getLogger(__name__)


@dataclass
class StoredTask:
    """One task's bytes and state; piece writes happen off the loop, marks on it."""

    id: str
    dir: Path
    url: str = ""
    content: TaskContent | None = None
    digests: list[str | None] = field(default_factory=list)
    done: set[int] = field(default_factory=set)
    last_access: float = field(default_factory=time.time)
    version: int = 0
    active: int = 0
    """Downloads and uploads in progress; a task in use is never evicted."""
    served: dict[int, int] = field(default_factory=dict)
    delegation: Delegation | None = None
    """Set while this host seeds the task from the origin and lends pieces of it."""
    """Uploads per piece, finished or under way."""
    _changed: asyncio.Event | None = None
    _fd: int | None = None

    @property
    def data_path(self) -> Path:
        return self.dir / "data"

    @property
    def complete(self) -> bool:
        return self.content is not None and len(self.done) >= self.content.piece_count

    @property
    def completed_bytes(self) -> int:
        if self.content is None:
            return 0
        return sum(self.content.piece(n)[1] for n in self.done)

    def set_content(self, content: TaskContent) -> None:
        if self.content is not None:
            if (self.content.content_length, self.content.piece_length) != (
                content.content_length,
                content.piece_length,
            ):
                raise SwarmflyError("conflict", "task content changed (length or piece length)")
            if content.digest and not self.content.digest:
                self.content = content
            return
        if content.piece_count != piece_count(content.content_length, content.piece_length):
            raise SwarmflyError("bad_request", "piece count does not match the content length")
        self.content = content
        self.digests = [None] * content.piece_count
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.data_path, "ab") as handle:
            handle.truncate(content.content_length)
        self.save()
        self._wake()

    def set_digests(self, digests: list[str | None], offset: int = 0) -> None:
        """Learn digests for pieces ``offset…``; ones already known are kept."""
        if self.content is None:
            return
        for number, digest in enumerate(digests, offset):
            if digest and number < self.content.piece_count and self.digests[number] is None:
                self.digests[number] = digest

    def _file(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.data_path, os.O_RDWR | os.O_CREAT, 0o644)
        return self._fd

    def write_piece(self, number: int, data: bytes, expected: str | None) -> str:
        """Verify and write one piece (runs in a worker thread); returns its sha256 hex.

        Never writes unverified bytes when a digest is known, nor past the piece.
        """
        assert self.content is not None
        offset, size = self.content.piece(number)
        if len(data) != size:
            raise SwarmflyError("integrity", f"piece {number}: got {len(data)} of {size} bytes")
        actual = hashlib.sha256(data).hexdigest()
        if expected is not None and actual != expected:
            raise SwarmflyError("integrity", f"piece {number}: sha256 mismatch")
        written = os.pwrite(self._file(), data, offset)
        if written != size:
            raise SwarmflyError("internal", f"short write of piece {number}")
        return actual

    def mark_done(self, number: int, digest: str) -> None:
        if number in self.done:
            return
        self.digests[number] = digest
        self.done.add(number)
        self.version += 1
        self.last_access = time.time()
        self._wake()
        if self.complete:
            self.save()

    def touch(self) -> None:
        """Used now: least-recently-used eviction goes by this."""
        self.last_access = time.time()

    def upload_event(self, number: int, delta: int) -> None:
        self.served[number] = self.served.get(number, 0) + delta

    def _wake(self) -> None:
        """Answer every long-poll waiting on this task."""
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def read(self, offset: int, size: int) -> bytes:
        return os.pread(self._file(), size, offset)

    def covers(self, start: int, end: int) -> bool:
        """True when bytes [start, end) lie in verified pieces only."""
        if self.content is None or start < 0 or end > self.content.content_length or start >= end:
            return False
        length = self.content.piece_length
        return all(n in self.done for n in range(start // length, (end - 1) // length + 1))

    async def wait_change(self, since: int, timeout: float) -> None:
        """Return when the task's piece version moves past ``since``, or after ``timeout``."""
        if self.version != since:
            return
        if self._changed is None:
            self._changed = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    def save(self) -> None:
        meta = {
            "id": self.id,
            "url": self.url,
            "content": self.content.to_dict() if self.content else None,
            "digests": self.digests,
            "done": sorted(self.done),
            "last_access": self.last_access,
        }
        tmp = self.dir / "meta.json.tmp"
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(orjson.dumps(meta))
        os.replace(tmp, self.dir / "meta.json")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def reset(self) -> None:
        """Forget every piece: the whole file failed its digest."""
        self.done.clear()
        self.digests = [None] * (self.content.piece_count if self.content else 0)
        self.version += 1
        self._wake()
        self.save()


class TaskStore:
    """Every task under ``<state_dir>/tasks``; ids are checked before they touch a path."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tasks: dict[str, StoredTask] = {}

    def path_for(self, task_id: str) -> Path:
        if not TASK_ID.fullmatch(task_id):
            raise SwarmflyError("bad_request", "invalid task id")
        return self.root / task_id[:2] / task_id

    def get(self, task_id: str) -> StoredTask | None:
        if not TASK_ID.fullmatch(task_id):
            return None
        return self.tasks.get(task_id)

    def open(self, task_id: str, url: str = "") -> StoredTask:
        task = self.tasks.get(task_id)
        if task is None:
            task = self.tasks[task_id] = StoredTask(task_id, self.path_for(task_id))
        if url and not task.url:
            task.url = redact_url(url)
        return task

    def load(self) -> list[StoredTask]:
        """Reload complete tasks after a restart; incomplete ones restart from scratch."""
        loaded: list[StoredTask] = []
        if not self.root.is_dir():
            return loaded
        for meta_path in self.root.glob("??/*/meta.json"):
            task_id = meta_path.parent.name
            if not TASK_ID.fullmatch(task_id):
                continue
            try:
                meta = orjson.loads(meta_path.read_bytes())
                task = StoredTask(task_id, meta_path.parent, url=meta.get("url", ""))
                if meta.get("content"):
                    task.content = TaskContent.from_dict(meta["content"])
                    task.digests = list(meta["digests"])
                    task.done = {int(n) for n in meta["done"]}
                    task.last_access = float(meta.get("last_access", time.time()))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("skipping unreadable task metadata %s: %s", meta_path, exc)
                continue
            if not task.complete or not task.data_path.is_file():
                continue
            self.tasks[task_id] = task
            loaded.append(task)
        return loaded

    def evict(self, task_id: str) -> int:
        """Delete a task's files; returns the bytes freed (outputs hard-linked from it keep
        their data)."""
        task = self.tasks.pop(task_id, None)
        if task is None:
            return 0
        task.close()
        size = task.content.content_length if task.content else 0
        shutil.rmtree(task.dir, ignore_errors=True)
        return size

    def close(self) -> None:
        for task in self.tasks.values():
            task.close()
