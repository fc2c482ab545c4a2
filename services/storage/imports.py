"""A storage instance taking a file a peer imported (``storage.{host_id}.import``) and
answering for what it keeps of imports (``storage.{host_id}.cached``): `swarmfly cache`.

The importing host is the origin of those bytes; this instance is the reader the schedulers
trust. It registers as the task's seed, takes each piece from the importer's upload server
against its schedule's capability, hashes every piece itself and checks the whole file
against the digest the task id is made of, before it marks anything done or reports a
digest: a forged byte leaves nothing here. Then it keeps the task until its expiry.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time

from swarmfly.cache import SCHEME, cache_task_id, reference
from swarmfly.content import TaskContent, piece_count, piece_length_for
from swarmfly.contracts import Sender, messages
from swarmfly.errors import SwarmflyError
from swarmfly.ids import peer_id
from swarmfly.services.peer.host import PeerHost
from swarmfly.services.peer.store import StoredTask

log = logging.getLogger(__name__)

PIECE_SECONDS = 30.0
"""Seconds a piece read from the importer may stall."""


class StorageImports:
    """The import endpoints of one storage instance."""

    def __init__(self, node: PeerHost) -> None:
        self.node = node
        self._taking: dict[str, asyncio.Task[StoredTask]] = {}
        """Imports under way, by task: a second request for one joins it."""

    def _reply(self, stored: StoredTask | None, task_id: str) -> messages.CachedReply:
        held = stored is not None and stored.complete and stored.content is not None
        content = stored.content if stored is not None and held else None
        return messages.CachedReply(
            task_id=task_id,
            host_id=self.node.settings.host_id,
            held=held,
            digest=content.digest if content else None,
            content_length=content.content_length if content else None,
            expires_at=stored.expires_at if stored is not None and held else None,
        )

    async def on_import(self, req: messages.ImportRequest, sender: Sender) -> messages.CachedReply:
        if sender.host_type != "normal":
            raise SwarmflyError("forbidden", "only a peer imports a file it holds")
        if req.task_id != cache_task_id(req.digest):
            raise SwarmflyError("bad_request", "task_id is not the task of this digest")
        if req.piece_length != piece_length_for(req.content_length):
            raise SwarmflyError("bad_request", "piece_length is not that of the content length")
        stored = self.node.store.get(req.task_id)
        if stored is None or not stored.complete:
            job = self._taking.get(req.task_id)
            if job is None:
                job = self._taking[req.task_id] = asyncio.create_task(self._take(req, sender))
                job.add_done_callback(lambda _: self._taking.pop(req.task_id, None))
            stored = await asyncio.shield(job)
        stored.keep_until(time.time() + req.ttl_s, sender.host_id)
        await asyncio.to_thread(stored.save)
        return self._reply(stored, req.task_id)

    async def _take(self, req: messages.ImportRequest, sender: Sender) -> StoredTask:
        """The task from its importer, proved whole, announced as its seed."""
        node, task_id = self.node, req.task_id
        count = piece_count(req.content_length, req.piece_length)
        content = TaskContent(req.content_length, req.piece_length, count, req.digest)
        schedule = await node.request(
            messages.REGISTER,
            messages.RegisterRequest(
                task_id=task_id,
                peer_id=node.peer_id(task_id),
                host=node.host(),
                source=messages.Source(reference(req.digest), digest=req.digest),
                pieces=[],
                seed=True,
            ),
        )  # no content yet: the schedulers learn it from this seed once it proved it
        importer = peer_id(sender.host_id, task_id)
        parents = [p for p in schedule.parents if p.peer_id == importer]
        if not parents:
            raise SwarmflyError(
                "not_found", f"the importing host {sender.host_id} does not hold task {task_id}"
            )
        address = parents[0].address.rstrip("/")
        auth = {"Authorization": f"Bearer {schedule.token}"} if schedule.token else {}
        stored = node.store.open(task_id, reference(req.digest))
        try:
            with stored.in_use():
                stored.set_content(content)
                digests = await self._pieces(stored, address, auth)
        except BaseException as exc:
            node.store.evict(task_id)
            await self._failed(task_id, str(exc))
            raise
        for number, digest in enumerate(digests):
            stored.mark_done(number, digest)
        await asyncio.to_thread(stored.save)
        await node.announce(stored, seed=True)
        log.info("took imported task %s from %s", task_id[:12], sender.host_id)
        return stored

    async def _pieces(self, stored: StoredTask, address: str, auth: dict[str, str]) -> list[str]:
        """Every piece from the importer in order, written and hashed as it arrives; the
        pieces' digests once the whole file matched its own."""
        content = stored.content
        assert content is not None and content.digest
        whole, digests = hashlib.sha256(), []
        for number in range(content.piece_count):
            offset, size = content.piece(number)
            headers = {**auth, "Range": f"bytes={offset}-{offset + size - 1}"}
            writer = stored.writer(number)
            if writer is None:
                raise SwarmflyError("conflict", f"piece {number} is being written already")
            try:
                reading = self.node.links.parents.piece(
                    address, stored.id, {}, headers, PIECE_SECONDS
                )
                async with reading as (status, chunks):
                    if status != 206:
                        raise SwarmflyError(
                            "unavailable",
                            f"the importing peer answered {status} for piece {number}",
                        )
                    async for chunk in chunks:
                        await asyncio.to_thread(writer.write, [chunk])
                        whole.update(chunk)
                digests.append(writer.finish(None))
            finally:
                writer.close()
        if f"sha256:{whole.hexdigest()}" != content.digest:
            raise SwarmflyError(
                "integrity", f"the importing peer's bytes do not match {content.digest}: refused"
            )
        return digests

    async def _failed(self, task_id: str, message: str) -> None:
        """Tell the schedulers this seed gave the task up (it holds nothing of it)."""
        try:
            await self.node.request(
                messages.RESULT,
                messages.ResultRequest(task_id, self.node.peer_id(task_id), False, message[:200]),
            )
        except SwarmflyError as exc:
            log.info("import failure of task %s not reported: %s", task_id[:12], exc)

    async def on_cached(self, req: messages.CachedRequest, sender: Sender) -> messages.CachedReply:
        """What this instance holds of an import; with ``remove``, drop it (only for a host
        that imported it here)."""
        stored = self.node.store.get(req.task_id)
        if not req.remove:
            return self._reply(stored, req.task_id)
        if stored is None:
            return messages.CachedReply(req.task_id, self.node.settings.host_id, False)
        if not stored.url.startswith(f"{SCHEME}:"):
            raise SwarmflyError("forbidden", "only an imported task is removed this way")
        if sender.host_id not in stored.importers:
            raise SwarmflyError(
                "forbidden", f"host {sender.host_id} did not import task {req.task_id[:12]} here"
            )
        removed = await self.node.remove(req.task_id)
        return messages.CachedReply(req.task_id, self.node.settings.host_id, False, removed=removed)
