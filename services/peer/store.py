"""The on-disk task store: one data file per task written at piece offsets, and its metadata.

Metadata never holds secrets: the URL is kept without its query (signatures live there) and
headers are never written. It is written atomically and only after the data it describes is
on disk; what it lists is trusted again after a restart only once re-hashed (``verify_batch``).

About 600 lines: the piece writer, the task and the store keep one on-disk format and one
order of writes (data, then metadata) that a kill at any point must leave consistent.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from swarmfly.content import TaskContent, piece_count
from swarmfly.errors import SwarmflyError
from swarmfly.ids import TASK_ID, check_digest, redact_url
from swarmfly.services.peer.lending import Lending

log = logging.getLogger(__name__)

DIR_MODE = 0o700
FILE_MODE = 0o600
"""Modes of the state dir, task dirs and cache files, set here only: a group operators need
would be allowed in this one place."""
LINKED_MODE = 0o444
"""A data file hard-linked to an output (opt-in): nobody changes the cache through it."""
VERIFY_BYTES = 64 * 1024 * 1024
"""Bytes re-hashed per batch after a restart: pieces become usable as they pass."""
BLOCK = 4 * 1024 * 1024
UNHASHED = ""
"""A held piece's digest when it was written without hashing: a sole child's lent read,
which the whole file's digest proves (one pass over its bytes, not two). The store keeps
None for it: nothing this host reports or checks a piece by."""
USE_PATIENCE = 30.0
"""Seconds ``close`` waits for piece reads and writes still running in worker threads."""
_UNSUPPORTED = {errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV}
"""What ``posix_fallocate`` says where it cannot reserve (then free space is checked)."""


def private_dir(path: Path) -> None:
    """Make ``path`` (and missing parents) and leave it DIR_MODE: the state dir holds the
    cache, credentials and the local socket. A shared sticky directory such as /tmp is
    left as it is (only its owner could loosen it back anyway)."""
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    mode = path.stat().st_mode
    if mode & 0o077 and not mode & 0o1000:
        log.info("tightening %s to mode %o", path, DIR_MODE)
        os.chmod(path, DIR_MODE)


def copy_range(source: int, target: int, offset: int, size: int) -> None:
    """Bytes [offset, offset + size) of ``source`` to the same place in ``target``: in the
    kernel (``copy_file_range``, which shares the blocks where the filesystem can), else
    through a buffer. A source shorter than the range is an error, never a short file."""
    end = offset + size
    position = offset
    try:
        while position < end:
            sent = os.copy_file_range(source, target, end - position, position, position)
            if sent == 0:
                raise OSError(errno.EIO, "the data file is shorter than its content")
            position += sent
        return
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    buffer = memoryview(bytearray(min(BLOCK, end - position)))
    while position < end:
        got = os.preadv(source, [buffer[: min(BLOCK, end - position)]], position)
        if not got:
            raise OSError(errno.EIO, "the data file is shorter than its content")
        written = 0
        while written < got:
            written += os.pwrite(target, buffer[written:got], position + written)
        position += got


def mebibytes(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def disk_size(folder: Path) -> int:
    """Bytes a task dir takes on disk (blocks, not lengths: data files may be sparse)."""
    total = 0
    with contextlib.suppress(OSError), os.scandir(folder) as entries:
        for entry in entries:
            with contextlib.suppress(OSError):
                total += entry.stat(follow_symlinks=False).st_blocks * 512
    return total


@dataclass
class StoredTask:
    """One task's bytes and state; piece writes happen off the loop, marks on it."""

    id: str
    dir: Path
    url: str = ""
    content: TaskContent | None = None
    digests: list[str | None] = field(default_factory=list)
    done: set[int] = field(default_factory=set)
    writing: set[int] = field(default_factory=set)
    """Pieces a ``PieceWriter`` is writing now (on the event loop's side)."""
    unverified: set[int] = field(default_factory=set)
    """Pieces the metadata listed as done before a restart, not re-hashed yet: never served,
    delivered or counted until they pass (a byte may have changed while nobody watched)."""
    unproven: set[int] = field(default_factory=set)
    """Of ``unverified``: pieces that were held ``UNHASHED``, which only the whole file's
    digest proves again (``check_pieces``, one pass over the whole file)."""
    unhashed: set[int] = field(default_factory=set)
    """Done pieces the whole file's digest proved with no digest of their own: hashed only
    once a child wants them (``hash_held``), since nobody else checks a piece by one."""
    last_access: float = field(default_factory=time.time)
    version: int = 0
    active: int = 0
    """Downloads, uploads and saves in progress (``in_use``); a task in use is never
    evicted."""
    served: dict[int, int] = field(default_factory=dict)
    """Uploads per piece, finished or under way."""
    expires_at: float | None = None
    """Unix time until which GC keeps the task and after which it drops it (an import's
    TTL, ``swarmfly cache``); None: the cache's own rules."""
    importers: list[str] = field(default_factory=list)
    """Hosts that imported the task here (``swarmfly cache``): they alone may remove it."""
    lending: Lending | None = None
    """Set while this host seeds the task from the origin and lends pieces of it (by the
    seed's download, ``lent``); the upload server lends through it."""
    _changed: asyncio.Event | None = None
    _fd: int | None = None
    _reserved: bool = False
    _users: int = 0
    """Worker threads using ``_fd`` now: it is closed only when none is."""
    _lock: threading.Condition = field(default_factory=threading.Condition, repr=False)
    _save_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _edits: int = 0
    """Changes worth saving (content, pieces); ``_saved`` is the count last on disk."""
    _saved: int = 0

    @property
    def data_path(self) -> Path:
        return self.dir / "data"

    @property
    def root(self) -> Path:
        """The store's directory: what a full disk error names."""
        return self.dir.parent.parent

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
                self._edits += 1
            return
        if content.piece_count != piece_count(content.content_length, content.piece_length):
            raise SwarmflyError("bad_request", "piece count does not match the content length")
        self.content = content
        self.digests = [None] * content.piece_count
        self.dir.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        fd = os.open(self.data_path, os.O_WRONLY | os.O_CREAT, FILE_MODE)
        try:
            os.ftruncate(fd, content.content_length)  # sparse: space is claimed at first write
        finally:
            os.close(fd)
        self._edits += 1
        self._wake()

    @contextlib.contextmanager
    def _using(self, *, write: bool = False) -> Iterator[int]:
        """The data file's descriptor, held for one read or write (in a worker thread)."""
        with self._lock:
            if self._fd is None:
                try:
                    self._fd = os.open(self.data_path, os.O_RDWR | os.O_CREAT, FILE_MODE)
                except PermissionError:
                    if write:  # read-only: hard-linked to an output, never written again
                        raise
                    self._fd = os.open(self.data_path, os.O_RDONLY)
            if write and not self._reserved:
                self._reserve(self._fd)
            self._users += 1
            fd = self._fd
        try:
            yield fd
        finally:
            with self._lock:
                self._users -= 1
                self._lock.notify_all()

    def _reserve(self, fd: int) -> None:
        """Claim the whole file's blocks before its first byte is written: a full disk fails
        the download here, clearly and at once, not as a short write half-way."""
        assert self.content is not None
        length = self.content.content_length
        try:
            if length:
                os.posix_fallocate(fd, 0, length)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise self._no_space(fd, length) from None
            if exc.errno not in _UNSUPPORTED:
                raise
            free = self._free()
            need = max(0, length - os.fstat(fd).st_blocks * 512)
            if need > free:
                raise self._no_space(fd, length) from None
        self._reserved = True

    def _free(self) -> int:
        stat = os.statvfs(self.dir)
        return stat.f_bavail * stat.f_frsize

    def _no_space(self, fd: int, length: int) -> OSError:
        need = max(0, length - os.fstat(fd).st_blocks * 512)
        return OSError(
            errno.ENOSPC,
            f"{os.strerror(errno.ENOSPC)} in {self.root}: "
            f"need {mebibytes(need)}, {mebibytes(self._free())} free",
        )

    def write_piece(self, number: int, data: bytes, expected: str | None) -> str:
        """Verify and write one whole piece (runs in a worker thread); returns its sha256
        hex. Never writes unverified bytes when a digest is known, nor past the piece."""
        assert self.content is not None
        size = self.content.piece(number)[1]
        if len(data) != size:
            raise SwarmflyError("integrity", f"piece {number}: got {len(data)} of {size} bytes")
        actual = hashlib.sha256(data).hexdigest()
        if expected is not None and actual != expected:
            raise SwarmflyError("integrity", f"piece {number}: sha256 mismatch")
        self._pwrite(number, data, 0)
        return actual

    def _pwrite(self, number: int, data: bytes | list[bytes], at: int) -> None:
        """``data`` (a buffer, or several in a row) at ``at`` within piece ``number``. The
        disk failing (full, a short write, I/O) is an OSError naming the store: a local fault,
        which no other parent would fix."""
        assert self.content is not None
        offset = self.content.piece(number)[0] + at
        buffers = data if isinstance(data, list) else [data]
        size = sum(map(len, buffers))
        with self._using(write=True) as fd:
            try:
                written = os.pwritev(fd, buffers, offset)
            except OSError as exc:
                raise OSError(exc.errno, f"{exc.strerror} in {self.root}") from None
        if written != size:
            raise OSError(
                errno.ENOSPC,
                f"short write of piece {number} in {self.root}: {written} of {size} bytes",
            )

    def writer(self, number: int, *, hashing: bool = True) -> PieceWriter | None:
        """The piece's one writer, or None while another one writes it (an endgame race):
        its bytes go to the data file as they arrive, hashed on the way, and nothing marks
        the piece done before ``PieceWriter.finish`` has proved them. Without ``hashing``
        the piece is only written: the whole file's digest is its proof (``UNHASHED``)."""
        if number in self.writing or number in self.done:
            return None
        self.writing.add(number)
        return PieceWriter(self, number, hashing=hashing)

    def mark_done(self, number: int, digest: str) -> None:
        """The piece is held; its ``digest`` (``UNHASHED``: none known, the whole file's
        digest is to prove it)."""
        if number in self.done:
            return
        self.digests[number] = digest or None
        self.done.add(number)
        self.unverified.discard(number)
        self.version += 1
        self._edits += 1
        self.last_access = time.time()
        self._wake()

    def keep_until(self, expires_at: float, importer: str) -> None:
        """An import's TTL: kept until ``expires_at`` at least (two imports: the later), and
        ``importer`` may remove it."""
        self.expires_at = max(expires_at, self.expires_at or 0.0)
        if importer not in self.importers:
            self.importers = [*self.importers, importer][-64:]
        self._edits += 1

    @contextlib.contextmanager
    def in_use(self) -> Iterator[None]:
        """While in it, the task is not evicted (a download, an upload, a save, a read)."""
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1

    @contextlib.contextmanager
    def lent(self, lending: Lending) -> Iterator[Lending]:
        """While in it, this host seeds the task from the origin and lends pieces of it."""
        self.lending = lending
        try:
            yield lending
        finally:
            self.lending = None

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
        with self._using() as fd:
            return os.pread(fd, size, offset)

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

    # -- re-verifying after a restart ----------------------------------------------------

    def verify_batch(self) -> list[int]:
        """The next unverified pieces to re-hash. All at once when the data file is also an
        output (hard-linked): its user may have changed it, and then none of it is used; or
        when only the whole file's digest proves some (``unproven``)."""
        if self.content is None:
            return []
        pending = sorted(self.unverified)
        if self.shared() or self.unproven:
            return pending
        return pending[: max(1, VERIFY_BYTES // self.content.piece_length)]

    def shared(self) -> bool:
        try:
            return self.data_path.stat().st_nlink > 1
        except OSError:
            return False

    def hash_held(self, number: int) -> str | None:
        """Hash a piece held ``UNHASHED`` after all (a worker thread), and keep its digest:
        its sha256 hex, or None when it is not held so (or the file is shorter)."""
        if self.content is None or number not in self.done or self.digests[number] is not None:
            return None
        offset, size = self.content.piece(number)
        hasher = hashlib.sha256()
        if not self.hash_into(hasher, offset, size):
            return None
        digest: str = hasher.hexdigest()
        self.digests[number] = digest
        self._edits += 1
        return digest

    def check_pieces(self, numbers: list[int]) -> set[int]:
        """The pieces of ``numbers`` whose bytes match their digests (a worker thread)."""
        assert self.content is not None
        if self.unproven:
            return self._check_whole(numbers)
        good: set[int] = set()
        for number in numbers:
            expected = self.digests[number] if number < len(self.digests) else None
            if expected is None:
                continue
            offset, size = self.content.piece(number)
            hasher = hashlib.sha256()
            try:
                whole = self.hash_into(hasher, offset, size)
            except OSError as exc:
                log.warning("task %s piece %d unreadable: %s", self.id[:12], number, exc)
                continue
            if whole and hasher.hexdigest() == expected:
                good.add(number)
        return good

    def _check_whole(self, numbers: list[int]) -> set[int]:
        """``check_pieces`` with ``unproven`` pieces: one pass hashes each piece and the
        whole file. The whole matching its digest proves every piece, which keeps the
        digest found for it; otherwise only those whose own digest matches pass."""
        assert self.content is not None
        whole = hashlib.sha256()
        found: list[str | None] = []
        for number in range(self.content.piece_count):
            offset, size = self.content.piece(number)
            piece = hashlib.sha256()
            try:
                if not self.hash_into(_Both(piece, whole), offset, size):
                    return set()
            except OSError as exc:
                log.warning("task %s piece %d unreadable: %s", self.id[:12], number, exc)
                return set()
            found.append(piece.hexdigest())
        try:
            proven = whole.hexdigest() == check_digest(self.content.digest or "")
        except ValueError:
            proven = False
        if proven:
            self.digests = found
            self._edits += 1
            return set(numbers)
        return {n for n in numbers if self.digests[n] == found[n]}

    def hash_into(self, hasher: Any, offset: int, size: int) -> bool:
        """Feed bytes [offset, offset + size) of the data file to ``hasher`` (a worker
        thread), through one reused buffer; False when the file is shorter."""
        buffer = memoryview(bytearray(min(BLOCK, size)))
        with self._using() as fd:
            position, end = offset, offset + size
            while position < end:
                got = os.preadv(fd, [buffer[: min(BLOCK, end - position)]], position)
                if not got:
                    return False
                hasher.update(buffer[:got])
                position += got
        return True

    def copy_out(self, fd: int, offset: int, size: int) -> None:
        """Copy bytes [offset, offset + size) of the data file to the same place in ``fd``
        (a worker thread)."""
        with self._using() as source:
            copy_range(source, fd, offset, size)

    def accept(self, numbers: list[int], good: set[int]) -> None:
        """Apply a batch's re-verification: good pieces are usable again, the others are
        read again by the next download. A shared data file that failed is replaced by a
        private one, so that rewriting pieces never touches the output linked to it."""
        bad = [n for n in numbers if n not in good]
        self.unverified.difference_update(numbers)
        self.unproven.difference_update(numbers)
        if bad:
            log.warning(
                "task %s: %d pieces failed re-verification and are dropped", self.id[:12], len(bad)
            )
            for number in bad:
                self.digests[number] = None
            if self.shared():
                self._replace_data()
                good = set()
            self._edits += 1
        self.done.update(good)
        self.version += 1
        self._wake()

    def _replace_data(self) -> None:
        assert self.content is not None
        with self._lock:
            self._close_fd()
            self.data_path.unlink(missing_ok=True)
        self.done.clear()
        self.unverified.clear()
        self.unproven.clear()
        self.unhashed.clear()
        self.digests = [None] * self.content.piece_count
        fd = os.open(self.data_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        try:
            os.ftruncate(fd, self.content.content_length)
        finally:
            os.close(fd)
        self._reserved = False

    # -- metadata ------------------------------------------------------------------------

    def metadata(self) -> dict[str, Any]:
        """What ``save`` writes, taken on the event loop (the sets change there)."""
        return {
            "id": self.id,
            "url": self.url,
            "content": self.content.to_dict() if self.content else None,
            "digests": list(self.digests),
            "done": sorted(self.done | self.unverified),
            "last_access": self.last_access,
            "expires_at": self.expires_at,
            "importers": list(self.importers),
        }

    def checkpoint(self) -> Callable[[], None] | None:
        """A save of what changed since the last one, to run in a worker thread; None when
        nothing did (or there is nothing to resume yet)."""
        if self._edits == self._saved or self.content is None:
            return None
        edits, meta = self._edits, self.metadata()

        def save() -> None:
            self.write_metadata(meta)
            self._saved = max(self._saved, edits)

        return save

    def save(self) -> None:
        """Save now, from the calling thread."""
        save = self.checkpoint()
        if save is not None:
            save()

    def write_metadata(self, meta: dict[str, Any]) -> None:
        """Write ``meta`` atomically (tmp, fsync, rename, fsync of the dir); when it says the
        task is complete, the data is synced first, so it never says more than the disk
        holds."""
        with self._save_lock:
            content = meta["content"]
            if content and len(meta["done"]) >= content["piece_count"]:
                with self._using() as fd:
                    os.fdatasync(fd)
            tmp = self.dir / "meta.json.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
            with open(fd, "wb") as handle:
                handle.write(orjson.dumps(meta))
                handle.flush()
                os.fsync(fd)
            os.replace(tmp, self.dir / "meta.json")
            folder = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)

    def make_read_only(self) -> None:
        """Before the data file is hard-linked to an output: neither side may change it."""
        os.chmod(self.data_path, LINKED_MODE)
        with self._lock:
            if self._users == 0:
                self._close_fd()  # reopened read-only: the file is no one's to write now

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        """Close the data file once no worker thread uses it (bounded: ``USE_PATIENCE``)."""
        with self._lock:
            if not self._lock.wait_for(lambda: self._users == 0, USE_PATIENCE):
                log.warning("task %s: closing its file under %d users", self.id[:12], self._users)
            self._close_fd()

    def reset(self) -> None:
        """Forget every piece: the whole file failed its digest."""
        self.done.clear()
        self.unverified.clear()
        self.unproven.clear()
        self.unhashed.clear()
        self.digests = [None] * (self.content.piece_count if self.content else 0)
        self.version += 1
        self._edits += 1
        self._wake()


@dataclass
class PieceWriter:
    """One piece written chunk by chunk as it arrives (``write`` in a worker thread): no
    piece is held in memory whole. ``close`` it on the event loop, whatever happened."""

    task: StoredTask
    number: int
    received: int = 0
    hashing: bool = True
    """False: written only (``UNHASHED``), for a reader whose whole-file hash proves it."""
    _hasher: Any = field(default_factory=hashlib.sha256, repr=False)

    def write(self, chunks: list[bytes]) -> None:
        """The next chunks of the piece, in order (one thread hop for a batch of them)."""
        assert self.task.content is not None
        size = sum(map(len, chunks))
        if self.received + size > self.task.content.piece(self.number)[1]:
            raise SwarmflyError("integrity", f"piece {self.number}: more bytes than the piece")
        self.task._pwrite(self.number, chunks, self.received)
        if self.hashing:
            for chunk in chunks:
                self._hasher.update(chunk)
        self.received += size

    def finish(self, expected: str | None, last: list[bytes] | None = None) -> str:
        """The piece's sha256 hex, once all of it came (its ``last`` chunks written first,
        in the same thread hop) and it matches ``expected`` (``UNHASHED`` for a writer not
        hashing, which has nothing to match)."""
        if last:
            self.write(last)
        assert self.task.content is not None
        size = self.task.content.piece(self.number)[1]
        if self.received != size:
            raise SwarmflyError(
                "integrity", f"piece {self.number}: got {self.received} of {size} bytes"
            )
        if not self.hashing:
            if expected is not None:
                raise SwarmflyError("internal", f"piece {self.number}: a digest to check unhashed")
            return UNHASHED
        actual: str = self._hasher.hexdigest()
        if expected is not None and actual != expected:
            raise SwarmflyError("integrity", f"piece {self.number}: sha256 mismatch")
        return actual

    def close(self) -> None:
        self.task.writing.discard(self.number)
        self.task._wake()  # a copy kept aside may be wanted now


class TaskStore:
    """Every task under ``<state_dir>/tasks``; ids are checked before they touch a path."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tasks: dict[str, StoredTask] = {}
        self.orphans: dict[str, int] = {}
        """Task dirs a restart could not load (no or unreadable metadata, a missing data
        file), with the bytes they take: GC removes them, the gauges count them until then."""

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
            self.orphans.pop(task_id, None)  # its dir is this task's again
        if url and not task.url:
            task.url = redact_url(url)
        return task

    def load(self) -> list[StoredTask]:
        """Reload every task after a restart, complete or not, so that an interrupted
        download resumes; what each held comes back unverified (``StoredTask.unverified``)
        until re-hashed. Task dirs that cannot be loaded become ``orphans``."""
        loaded: list[StoredTask] = []
        if not self.root.is_dir():
            return loaded
        for folder in self.root.glob("??/*"):
            task_id = folder.name
            if not TASK_ID.fullmatch(task_id) or folder.parent.name != task_id[:2]:
                continue  # not ours: left alone
            if not folder.is_dir() or task_id in self.tasks:
                continue
            task = self._load(folder)
            if task is None:
                self.orphans[task_id] = disk_size(folder)
                continue
            self.tasks[task_id] = task
            loaded.append(task)
        return loaded

    def _load(self, folder: Path) -> StoredTask | None:
        meta_path = folder / "meta.json"
        try:
            meta = orjson.loads(meta_path.read_bytes())
            task = StoredTask(folder.name, folder, url=str(meta.get("url", "")))
            if not meta.get("content"):
                return None
            task.content = TaskContent.from_dict(meta["content"])
            digests = [d if isinstance(d, str) else None for d in meta["digests"]]
            count = task.content.piece_count
            if len(digests) != count:
                raise ValueError("digests do not match the piece count")
            task.digests = digests
            listed = {int(n) for n in meta["done"] if 0 <= int(n) < count}
            task.unverified = {n for n in listed if digests[n]}
            if len(listed) == count and task.content.digest:  # held whole: the digest proves it
                task.unproven = listed - task.unverified
                task.unverified = listed
            task.last_access = float(meta.get("last_access", time.time()))
            expires = meta.get("expires_at")
            task.expires_at = None if expires is None else float(expires)
            task.importers = [str(h) for h in meta.get("importers") or ()][:64]
            if task.data_path.stat().st_size != task.content.content_length:
                raise ValueError("the data file is not the content's length")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("task dir %s cannot be loaded (GC removes it): %s", folder, exc)
            return None
        task._edits = task._saved = 1
        return task

    def evict(self, task_id: str) -> int:
        """Delete a task's files (or an orphan's); returns the bytes freed (an output
        hard-linked from it keeps its data)."""
        if task_id in self.orphans:
            size = self.orphans.pop(task_id)
            shutil.rmtree(self.path_for(task_id), ignore_errors=True)
            return size
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


@dataclass
class _Both:
    """A hasher that feeds two: a piece's and the whole file's, in one pass."""

    first: Any
    second: Any

    def update(self, data: Any) -> None:
        self.first.update(data)
        self.second.update(data)
