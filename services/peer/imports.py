"""This host as the origin of the files its users import (`swarmfly cache`, dfcache).

A ``cache`` line on the local socket comes with the descriptor of a file the caller opened
(so the peer reads with the caller's permission, never its own). The peer hashes it, keeps it
as a complete task of the reference ``swarmfly:sha256:<hex>`` and registers it, then has the
storage instances of the task's rendezvous order take it from its upload server
(``storage.{host_id}.import``): each proves the whole file against the digest before it
announces it as the task's seed. ``stat`` and ``rm`` ask the fleet (``storage.{host_id}.cached``).

A getter of a reference has no origin to ask: ``cached_stat`` takes the content from the
schedulers (what a storage instance proved), and ``CacheOrigin`` refuses every read, so a
reference no host holds fails with ``not_found``, never reading anything else.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import logging
import os
import stat
import time
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any

import nats.errors
import orjson

from swarmfly import contracts
from swarmfly.bus import Bus
from swarmfly.cache import (
    ANSWER_SECONDS,
    IMPORT_SECONDS,
    MAX_REPLICAS,
    MAX_TTL,
    MIN_TTL,
    SCHEME,
    cache_task_id,
    digest_of,
    reference,
)
from swarmfly.content import TaskContent, piece_count, piece_length_for
from swarmfly.contracts import messages
from swarmfly.errors import SwarmflyError
from swarmfly.ids import DIGEST, TASK_ID
from swarmfly.localproto import line
from swarmfly.placement import rendezvous
from swarmfly.plugintypes import SourceStat
from swarmfly.services.peer.localsocket import Send
from swarmfly.services.peer.store import StoredTask

if TYPE_CHECKING:
    from swarmfly.services.peer.host import PeerHost

log = logging.getLogger(__name__)

MAX_IMPORT = 1024**4
"""Bytes of one import at most (the contracts' bound on a content length): 1 TiB."""
READ_BLOCK = 4 * 1024 * 1024


def not_in_cache(digest: str) -> SwarmflyError:
    return SwarmflyError(
        "not_found",
        f"{reference(digest)} is not in the swarm's cache: no peer or storage instance holds"
        " it (swarmfly cache import puts a file there)",
    )


class CacheOrigin:
    """The source of ``swarmfly:`` references: imported content has no origin but the
    hosts that hold it, so nothing is ever read from here (``not_found``)."""

    schemes: tuple[str, ...] = (SCHEME,)

    async def stat(self, url: str, headers: Mapping[str, str]) -> SourceStat:
        raise not_in_cache(digest_of(url))

    async def fetch(
        self, url: str, headers: Mapping[str, str], start: int = 0, end: int | None = None
    ) -> AsyncIterator[bytes]:
        raise not_in_cache(digest_of(url))
        yield b""  # an async generator, as a source's fetch is

    async def close(self) -> None:
        return None


CACHE_ORIGIN = CacheOrigin()


async def cached_stat(host: PeerHost, url: str) -> SourceStat:
    """What the swarm holds of a reference: the content a storage instance proved and
    registered as the task's seed (the schedulers take no one else's word for it)."""
    digest = digest_of(url)
    if host.bus is None:
        raise not_in_cache(digest)
    try:
        reply = await host.request(messages.TASK, messages.TaskRequest(cache_task_id(digest)))
    except SwarmflyError as exc:
        if exc.code == "not_found":
            raise not_in_cache(digest) from None
        raise
    task = reply.task
    if task is None or task.digest != digest:
        raise not_in_cache(digest)
    return SourceStat(size=task.content_length, ranges=True, digest=digest)


def _hash_file(fd: int, size: int, length: int) -> tuple[str, list[str]]:
    """The file's digest and its pieces' (in a worker thread, a block at a time)."""
    whole, pieces = hashlib.sha256(), []
    for number in range(piece_count(size, length)):
        piece, offset = hashlib.sha256(), number * length
        end = min(size, offset + length)
        while offset < end:
            block = os.pread(fd, min(READ_BLOCK, end - offset), offset)
            if not block:
                raise SwarmflyError("bad_request", "the file shrank while it was read")
            piece.update(block)
            whole.update(block)
            offset += len(block)
        pieces.append(piece.hexdigest())
    return f"sha256:{whole.hexdigest()}", pieces


def _checked_input(fd: int | None) -> int:
    """The size of the file a descriptor reads: a regular, readable, non-empty file."""
    if fd is None:
        raise SwarmflyError("bad_request", "an import sends the descriptor of the file to import")
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise SwarmflyError("bad_request", "the import descriptor must be a regular file")
    if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_WRONLY:
        raise SwarmflyError("bad_request", "the import descriptor must be open for reading")
    if info.st_size == 0:
        raise SwarmflyError("bad_request", "the file is empty: there is nothing to import")
    if info.st_size > MAX_IMPORT:
        raise SwarmflyError("bad_request", "the file is larger than 1 TiB")
    return info.st_size


def cache_request(body: bytes) -> dict[str, Any] | None:
    """The ``cache`` request ``body`` is, checked against the contract; None for any other
    line (a download or list request)."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(payload, dict) or "cache" not in payload:
        return None
    try:
        contracts.local_socket().messages["cache"].validate(payload)
    except contracts.Invalid as exc:
        raise SwarmflyError("bad_request", exc.message[:1024], path=exc.path[:1024]) from None
    request: dict[str, Any] = payload["cache"]
    return request


class Imports:
    """The peer's ``cache`` requests on its local socket."""

    def __init__(self, host: PeerHost, bus: Bus) -> None:
        self.host = host
        self.bus = bus

    async def serve(self, body: dict[str, Any], fd: int | None, send: Send) -> None:
        """One checked ``cache`` request (``contracts/localsocket.json``), answered with one
        ``cached`` line (or the error line the local server sends)."""
        op = body["op"]
        if op != "import" and fd is not None:
            raise SwarmflyError("bad_request", f"a {op} request takes no descriptor")
        if op == "import":
            answer = await self.import_file(
                fd,
                ttl=float(body["ttl_s"]),
                replicas=int(body.get("replicas", 1)),
                timeout=float(body.get("timeout_s", IMPORT_SECONDS)),
            )
        elif op == "stat":
            answer = await self.stat(_task_of(body))
        else:
            answer = await self.remove(_task_of(body))
        await send(line({"cached": answer}))

    async def fleet(self) -> list[str]:
        try:
            return sorted(await self.bus.hosts_of("storage"))
        except (SwarmflyError, nats.errors.Error) as exc:
            raise SwarmflyError("unavailable", f"cannot see the storage instances: {exc}") from None

    async def import_file(
        self, fd: int | None, *, ttl: float, replicas: int, timeout: float
    ) -> dict[str, Any]:
        """Hold the file here as a task, then have ``replicas`` storage instances take it."""
        size = _checked_input(fd)
        assert fd is not None
        if not (MIN_TTL <= ttl <= MAX_TTL and 1 <= replicas <= MAX_REPLICAS):
            raise SwarmflyError("bad_request", "ttl or replicas out of range")
        fleet = await self.fleet()
        if not fleet:
            raise SwarmflyError(
                "unavailable", "no storage instance runs: an import needs one to keep it"
            )
        if replicas > len(fleet):
            raise SwarmflyError(
                "bad_request",
                f"--replicas {replicas}: only {len(fleet)} storage instance"
                f"{'s' if len(fleet) > 1 else ''} run{'s' if len(fleet) == 1 else ''} now",
            )
        started = time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                stored = await self.hold(fd, size, ttl)
                with stored.in_use():  # GC keeps it while the storage instances take it
                    held = await self.place(stored, ttl, replicas, fleet, timeout)
        except TimeoutError:
            raise SwarmflyError("timeout", f"the import did not finish in {timeout:g}s") from None
        content = stored.content
        assert content is not None and content.digest
        return {
            "task_id": stored.id,
            "digest": content.digest,
            "reference": reference(content.digest),
            "content_length": content.content_length,
            "replicas": [reply.host_id for reply in held],
            "expires_at": min(reply.expires_at or 0.0 for reply in held),
            "seconds": round(time.monotonic() - started, 6),
        }

    async def hold(self, fd: int, size: int, ttl: float) -> StoredTask:
        """The file as a complete task in this host's store, registered with its schedulers:
        hashed first (its digest names the task), then copied piece by piece, each checked
        against that first pass (a file changing meanwhile is refused)."""
        length = piece_length_for(size)
        digest, pieces = await asyncio.to_thread(_hash_file, fd, size, length)
        task_id = cache_task_id(digest)
        stored = self.host.store.open(task_id, reference(digest))
        content = TaskContent(size, length, len(pieces), digest)
        stored.set_content(content)
        with stored.in_use():
            for number, expected in enumerate(pieces):
                if number in stored.done:
                    continue
                offset, span = content.piece(number)
                data = await asyncio.to_thread(os.pread, fd, span, offset)
                try:
                    got = await asyncio.to_thread(stored.write_piece, number, data, expected)
                except SwarmflyError as exc:
                    if exc.code != "integrity":
                        raise
                    self.host.store.evict(task_id)
                    raise SwarmflyError(
                        "conflict", "the file changed while it was imported"
                    ) from None
                stored.mark_done(number, got)
        stored.keep_until(time.time() + ttl, self.host.settings.host_id)
        await asyncio.to_thread(stored.save)
        await self.host.announce(stored)
        log.info("imported task %s (%s, %d bytes)", task_id[:12], digest[:19], size)
        return stored

    async def place(
        self, stored: StoredTask, ttl: float, replicas: int, fleet: list[str], timeout: float
    ) -> list[messages.CachedReply]:
        """The task's home takes it first (it becomes the seed the schedulers trust), then
        the next ``replicas - 1`` instances in rendezvous order, from this host too."""
        content = stored.content
        assert content is not None and content.digest
        request = messages.ImportRequest(
            task_id=stored.id,
            digest=content.digest,
            content_length=content.content_length,
            piece_length=content.piece_length,
            ttl_s=ttl,
            timeout_s=timeout,
        )
        order = rendezvous(stored.id, fleet)[:replicas]
        home = await self._import_on(order[0], request, timeout)
        others = await asyncio.gather(
            *(self._import_on(host, request, timeout) for host in order[1:]),
            return_exceptions=True,
        )
        held = [home]
        for host, outcome in zip(order[1:], others, strict=True):
            if isinstance(outcome, messages.CachedReply):
                held.append(outcome)
            elif isinstance(outcome, SwarmflyError):
                log.warning("import of task %s: replica %s: %s", stored.id[:12], host, outcome)
            else:
                raise outcome
        return held

    async def _import_on(
        self, host_id: str, request: messages.ImportRequest, timeout: float
    ) -> messages.CachedReply:
        return await self.bus.request(
            messages.IMPORT,
            request,
            timeout=timeout + 5.0,
            host_id=host_id,
            sender=self.host.sender,
        )

    async def _ask_fleet(
        self, task_id: str, *, remove: bool
    ) -> tuple[list[messages.CachedReply], dict[str, SwarmflyError]]:
        """Every live storage instance's answer, and the errors of those that refused."""
        fleet = await self.fleet()
        outcomes = await asyncio.gather(
            *(
                self.bus.request(
                    messages.CACHED,
                    messages.CachedRequest(task_id, remove=True if remove else None),
                    timeout=ANSWER_SECONDS,
                    host_id=host,
                    sender=self.host.sender,
                )
                for host in fleet
            ),
            return_exceptions=True,
        )
        replies: list[messages.CachedReply] = []
        refused: dict[str, SwarmflyError] = {}
        for host, outcome in zip(fleet, outcomes, strict=True):
            if isinstance(outcome, messages.CachedReply):
                replies.append(outcome)
            elif isinstance(outcome, SwarmflyError):
                log.info("cache request to storage %s: %s", host, outcome)
                refused[host] = outcome
            else:
                raise outcome
        if refused and not replies and not remove:
            raise next(iter(refused.values()))
        return replies, refused

    async def stat(self, task_id: str) -> dict[str, Any]:
        """Where the task is held: the storage instances that hold it complete (not found
        when none does), and whether this host's peer does."""
        replies, _ = await self._ask_fleet(task_id, remove=False)
        held = [r for r in replies if r.held]
        here = self.host.store.get(task_id)
        local = here is not None and here.complete
        if not held:
            also = " (this host's peer still holds it: the import did not finish)" * local
            raise SwarmflyError(
                "not_found", f"task {task_id} is in no storage instance's cache{also}"
            )
        digest = next((r.digest for r in held if r.digest), None)
        return {
            "task_id": task_id,
            "digest": digest,
            "reference": reference(digest) if digest else None,
            "content_length": held[0].content_length,
            "storages": [
                {
                    "host_id": r.host_id,
                    "expires_at": r.expires_at,
                    "content_length": r.content_length,
                }
                for r in sorted(held, key=lambda r: r.host_id)
            ],
            "peer": local,
        }

    async def remove(self, task_id: str) -> dict[str, Any]:
        """Drop the task from this host's peer and from every storage instance this host
        imported it to (only its importers may remove it there: the others are
        ``refused``); not found when nobody held it, forbidden when only refusals came."""
        replies, refused = await self._ask_fleet(task_id, remove=True)
        removed = sorted(r.host_id for r in replies if r.removed)
        here = self.host.store.get(task_id)
        local = here is not None and here.url.startswith(f"{SCHEME}:")
        if local:
            await self.host.remove(task_id)
        if not removed and not local:
            if refused:
                raise next(iter(refused.values()))
            raise SwarmflyError("not_found", f"task {task_id} is not in the swarm's cache")
        return {"task_id": task_id, "removed": removed, "peer": local, "refused": sorted(refused)}


def _task_of(body: dict[str, Any]) -> str:
    """The task a stat or rm names, by its digest or its id (the contract checked both)."""
    digest = body.get("digest")
    if isinstance(digest, str) and DIGEST.fullmatch(digest):
        return cache_task_id(digest)
    task_id = body.get("task_id")
    if isinstance(task_id, str) and TASK_ID.fullmatch(task_id):
        return task_id
    raise SwarmflyError("bad_request", "name the task by its digest or its task id")
