"""A host in the swarm: its task store, upload server, heartbeats and downloads.

The peer service and the storage (seed) service are both a ``PeerNode``; storage differs
only in host type and in fetching the tasks the scheduler hands it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import socket
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from swarmfly import metrics
from swarmfly.bus import Bus
from swarmfly.content import SourceRequest
from swarmfly.errors import SwarmflyError
from swarmfly.httpserver import serve_http
from swarmfly.ids import task_id as make_task_id
from swarmfly.ids import url_digest
from swarmfly.placement import DEFAULT_PARTITIONS, partition_of
from swarmfly.pluginhost import Plugins
from swarmfly.plugins.hookspecs import Source, SourceStat
from swarmfly.ratelimit import TokenBucket
from swarmfly.services.peer.conductor import REPORT_BATCH, Conductor
from swarmfly.services.peer.gc import CachedTask, GcPolicy, plan
from swarmfly.services.peer.store import StoredTask, TaskStore
from swarmfly.services.peer.upload import UploadServer

log = logging.getLogger(__name__)
LEAVE_PATIENCE = 2.0
"""Seconds a leaving host waits for its cancelled downloads' last reports."""


@dataclass(frozen=True)
class NodeSettings:
    host_id: str
    host_type: str
    state_dir: Path
    listen: str
    advertise_ip: str | None
    upload_port: int
    upload_rate: int
    download_rate: int
    upload_slots: int
    concurrency: int
    per_parent: int
    piece_timeout: float
    origin_concurrency: int
    heartbeat_interval: float
    lend_pieces: bool = False
    """A seed lends pieces to read from the origin (``grants.Delegation``)."""
    piece_spans: bool = False
    idc: str = ""
    location: str = ""
    gc: GcPolicy = field(default_factory=GcPolicy)
    gc_interval: float = 60.0
    partitions: int = DEFAULT_PARTITIONS
    """Until a heartbeat reply says how many the schedulers use."""


@dataclass(frozen=True)
class DownloadResult:
    task_id: str
    content_length: int
    bytes_origin: int
    bytes_p2p: int
    seconds: float
    digest: str | None

    def reply(self, output: Path) -> dict[str, Any]:
        """The ``peer.<host>.download`` reply for this result delivered at ``output``."""
        return {**self.summary(), "output": str(output)}

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "task_id": self.task_id,
            "content_length": self.content_length,
            "bytes_origin": self.bytes_origin,
            "bytes_p2p": self.bytes_p2p,
            "seconds": round(self.seconds, 6),
        }
        if self.digest:
            out["digest"] = self.digest
        return out


@dataclass(frozen=True)
class Download:
    """One ask for a task: the run it joined, which may be shared with other asks."""

    task_id: str
    conductor: Conductor
    running: asyncio.Task[Conductor]
    started: float

    async def result(self) -> DownloadResult:
        """Wait for the run (cancelling this wait leaves it going for the others)."""
        conductor = await asyncio.shield(self.running)
        stored = conductor.stored
        assert stored.content is not None
        return DownloadResult(
            task_id=self.task_id,
            content_length=stored.content.content_length,
            bytes_origin=conductor.bytes_origin,
            bytes_p2p=conductor.bytes_p2p,
            seconds=time.monotonic() - self.started,
            digest=conductor.file_digest,
        )


def route_ip(servers: list[str]) -> str:
    """The local address that reaches the control plane: what other hosts can reach too."""
    for server in servers:
        parts = urlsplit(server if "://" in server else f"nats://{server}")
        if not parts.hostname:
            continue
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.connect((parts.hostname, parts.port or 4222))
                ip: str = sock.getsockname()[0]
                return ip
        except OSError:
            continue
    return "127.0.0.1"


class PeerNode:
    """Lifecycle: ``start`` loads the cache, serves uploads and heartbeats; leaving the exit
    stack it was started with leaves the scheduler and closes connections."""

    def __init__(
        self, settings: NodeSettings, bus: Bus | None, servers: list[str], plugins: Plugins
    ) -> None:
        self.settings = settings
        self.bus = bus
        self.servers = servers
        self.store = TaskStore(settings.state_dir / "tasks")
        self.upload = UploadServer(
            self.store,
            rate=settings.upload_rate,
            slots=settings.upload_slots,
            # Grants ration a seed's uplink when it is capped: one round trip per piece,
            # which an uncapped seed need not pay (its children take what it lists).
            superseed=settings.host_type == "seed" and settings.upload_rate > 0,
        )
        self.download_bucket = TokenBucket(settings.download_rate)
        self.origin_concurrency = settings.origin_concurrency
        self.lend_pieces = settings.lend_pieces
        self.ip = settings.advertise_ip or route_ip(servers)
        self.port = 0
        self.upload_url = ""
        self.plugins = plugins
        self._session: aiohttp.ClientSession | None = None
        self._downloads: dict[str, tuple[Conductor, asyncio.Task[Conductor]]] = {}
        self._progress: dict[str, Conductor] = {}
        self.partitions = settings.partitions
        self._owners: list[str] = []
        self._answered = -math.inf
        self._interval = settings.heartbeat_interval
        """Per partition, the last holder token this host registered its tasks with."""
        self._beat: asyncio.Task[None] | None = None
        self._left = False
        """This host left the swarm: nothing of it registers again (``leave``)."""

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, limit_per_host=32),
                auto_decompress=False,
            )
        return self._session

    async def start(self, stack: AsyncExitStack) -> None:
        loaded = self.store.load()
        self._count_cache()
        stack.callback(self.store.close)
        self.upload_url = await serve_http(
            stack, self.upload.app, self.settings.listen, self.settings.upload_port
        )
        self.port = int(self.upload_url.rsplit(":", 1)[1])
        stack.push_async_callback(self.close)
        if self.bus is not None:
            stack.push_async_callback(self.leave)
            await self._heartbeat(first=True)  # learns how tasks are partitioned
            for task in loaded:
                await self._announce_safely(task)
            self._beat = asyncio.create_task(self._heartbeat_loop())
            stack.callback(self._beat.cancel)
        collector = asyncio.create_task(self._gc_loop())
        stack.callback(collector.cancel)
        log.info(
            "%s %s serving uploads on %s (%d cached tasks)",
            self.settings.host_type,
            self.settings.host_id,
            self.upload_url,
            len(loaded),
        )

    async def close(self) -> None:
        """Stop downloads and close connection pools (done by ``start``'s exit stack)."""
        for _, task in self._downloads.values():
            task.cancel()
        if self._session is not None:
            await self._session.close()

    def host(self) -> dict[str, Any]:
        s = self.settings
        host: dict[str, Any] = {
            "id": s.host_id,
            "ip": self.ip,
            "port": self.port,
            "type": s.host_type,
            # What the scheduler compares with the heartbeat's load: a host is full when it
            # turns children away, not while one upload runs in its only paced slot.
            "upload_slots": self.upload.capacity,
        }
        if s.idc:
            host["idc"] = s.idc
        if s.location:
            host["location"] = s.location
        return host

    def peer_id(self, task_id: str) -> str:
        """Stable per (host, task), so a re-registration is the same peer."""
        return "p" + hashlib.sha256(f"{self.settings.host_id}/{task_id}".encode()).hexdigest()[:24]

    def source_for(self, url: str) -> Source:
        return self.plugins.source_for(url)

    # -- downloads -------------------------------------------------------------------------

    async def begin(
        self,
        source: SourceRequest,
        *,
        strategy: str = "rarest-first",
        seed: bool = False,
        task_id: str | None = None,
        download_id: str | None = None,
        stat: SourceStat | None = None,
    ) -> Download:
        """Join the task's run, or start one; concurrent asks for one task share a run.

        Every request is first checked against the origin with its own credentials: content
        of a private repository reaches only a client the origin accepts, whether it comes
        from the cache, a running download or the swarm. A caller that has just made that
        check itself (the proxy's authenticated HEAD) passes what it learned as ``stat``.
        """
        backend = self.source_for(source.url)
        self.plugins.strategy(strategy)
        started = time.monotonic()
        if stat is None:
            stat = await backend.stat(source.url, source.headers)
        if source.digest is None and (named := url_digest(source.url) or stat.digest):
            source = replace(source, digest=named)
        task_id = task_id or make_task_id(
            source.url, digest=source.digest, piece_length=source.piece_length, etag=stat.etag
        )
        entry = self._downloads.get(task_id)
        if entry is None:
            conductor = Conductor(self, task_id, source, strategy=strategy, seed=seed, stat=stat)
            running = asyncio.create_task(self._run(conductor))
            entry = self._downloads[task_id] = (conductor, running)
            running.add_done_callback(lambda _: self._downloads.pop(task_id, None))
        if download_id:
            self._progress[download_id] = entry[0]
        return Download(task_id, entry[0], entry[1], started)

    async def download(
        self,
        source: SourceRequest,
        *,
        strategy: str = "rarest-first",
        seed: bool = False,
        task_id: str | None = None,
        download_id: str | None = None,
    ) -> DownloadResult:
        """Bring a task into the store, verified."""
        run = await self.begin(
            source, strategy=strategy, seed=seed, task_id=task_id, download_id=download_id
        )
        return await run.result()

    async def _run(self, conductor: Conductor) -> Conductor:
        conductor.stored.active += 1
        try:
            await conductor.run()
        finally:
            conductor.stored.active -= 1
            self._count_cache()
        return conductor

    def _count_cache(self) -> None:
        metrics.PEER_CACHE_TASKS.set(len(self.store.tasks))
        metrics.PEER_CACHE_BYTES.set(
            sum(t.content.content_length for t in self.store.tasks.values() if t.content)
        )

    def progress(self, download_id: str) -> Conductor | None:
        return self._progress.get(download_id)

    def forget(self, download_id: str) -> None:
        self._progress.pop(download_id, None)

    # -- control plane ---------------------------------------------------------------------

    async def request(
        self, name: str, body: dict[str, Any], *, timeout: float = 5.0
    ) -> dict[str, Any]:
        """A request to the schedulers; a task's subjects go to the task's partition."""
        if self.bus is None:
            raise SwarmflyError("unavailable", "no control plane")
        if self._left:
            raise SwarmflyError("unavailable", "this host has left the swarm")
        if "{partition}" in name:
            partition = str(partition_of(body["task_id"], self.partitions))
            return await self.bus.request(name, body, timeout=timeout, partition=partition)
        return await self.bus.request(name, body, timeout=timeout)

    async def announce(
        self, stored: StoredTask, *, peer_id: str | None = None, seed: bool = False
    ) -> None:
        """Tell the scheduler what this host holds of a task: how its state is rebuilt."""
        if self.bus is None or stored.content is None:
            return
        peer_id = peer_id or self.peer_id(stored.id)
        body: dict[str, Any] = {
            "task_id": stored.id,
            "peer_id": peer_id,
            "host": self.host(),
            "source": {"url": stored.url or "swarmfly:cached"},
            "pieces": sorted(stored.done),
            "task": stored.content.to_dict(),
        }
        if seed or (self.settings.host_type == "seed" and stored.complete):
            body["seed"] = True
        await self.request("scheduler.{partition}.register", body)
        reports = [
            {"number": n, "digest": stored.digests[n]}
            for n in sorted(stored.done)
            if stored.digests[n]
        ]
        for start in range(0, max(1, len(reports)), REPORT_BATCH):
            await self.request(
                "scheduler.{partition}.pieces",
                {
                    "task_id": stored.id,
                    "peer_id": peer_id,
                    "pieces": reports[start : start + REPORT_BATCH],
                    "task": stored.content.to_dict(),
                },
            )
        if stored.complete:
            await self.request(
                "scheduler.{partition}.result",
                {"task_id": stored.id, "peer_id": peer_id, "success": True},
            )

    async def _announce_safely(self, stored: StoredTask) -> bool:
        """Announce a complete task, or a running download as its conductor (a seed that
        only waits, reporting nothing, would stay unknown to a restarted scheduler)."""
        running = self._downloads.get(stored.id)
        try:
            if running is not None and not stored.complete:
                conductor = running[0]
                await self.announce(stored, peer_id=conductor.peer_id, seed=conductor.seed)
            else:
                await self.announce(stored)
        except SwarmflyError as exc:
            log.warning("could not announce task %s: %s", stored.id[:12], exc)
            return False
        return True

    async def _heartbeat_loop(self) -> None:
        interval = self.settings.heartbeat_interval
        while True:
            await asyncio.sleep(interval)
            interval = await self._heartbeat() or interval

    async def _heartbeat(self, *, first: bool = False) -> float | None:
        """One heartbeat to every scheduler; the seconds to the next one, None when no
        scheduler answered.

        Whoever lost this host's state (a restarted scheduler, one that expired the host, the
        new holder of a partition) gets its complete tasks again: the schedulers' state is
        soft, rebuilt from hosts. Hence every reply counts, not just the first.
        """
        assert self.bus is not None
        beat = {"host": self.host(), "uploads": self.upload.load}
        beat["peers"] = len(self.store.tasks)
        schedulers = {token.split(".")[0] for token in self._owners if token}
        try:
            replies = await self.bus.gather(
                "scheduler.heartbeat",
                beat,
                wait=max(0.2, min(2.0, self._interval / 2)),
                expect=1 if first else len(schedulers) or None,
            )
        except SwarmflyError as exc:
            log.debug("heartbeat: %s", exc)
            return None
        if not replies:
            log.debug("heartbeat: no scheduler answered")
            return None
        self._answered = time.monotonic()
        partitions = int(replies[0].get("partitions", self.partitions))
        owners = [""] * partitions
        for reply in replies:  # any scheduler's view of the bucket; they agree but for lag
            theirs = reply.get("owners", [])
            if len(theirs) == partitions:
                owners = [mine or other for mine, other in zip(owners, theirs, strict=True)]
        if partitions != self.partitions or len(self._owners) != partitions:
            self.partitions, self._owners = partitions, [""] * partitions
        moved: set[int] = set()
        if not first:
            moved = {p for p, token in enumerate(owners) if token and token != self._owners[p]}
            for reply in replies:
                if not reply["known"]:
                    run = reply.get("scheduler")
                    moved |= {
                        p
                        for p, token in enumerate(owners)
                        if run is None or token.split(".")[0] == run
                    }
        held: dict[int, list[StoredTask]] = {}
        if moved:
            for stored in list(self.store.tasks.values()):
                if stored.complete or stored.id in self._downloads:
                    held.setdefault(partition_of(stored.id, partitions), []).append(stored)
        for p, token in enumerate(owners):
            ok = True
            for stored in held.get(p, []) if p in moved else []:
                ok = await self._announce_safely(stored) and ok
            if token and ok:
                self._owners[p] = token
        interval: float = replies[0].get("interval_ms", self._interval * 1000) / 1000
        self._interval = interval
        return interval

    def schedulers_answer(self) -> bool:
        """Some scheduler answered a recent heartbeat: a task subject nobody answers then
        means its partition is moving to another scheduler, not that there is none."""
        return time.monotonic() - self._answered < 3 * self._interval

    async def collect(self, now: float | None = None) -> list[str]:
        """Evict what the cache policy says; tell the scheduler these pieces are gone."""
        cached = [
            CachedTask(t.id, t.content.content_length if t.content else 0, t.last_access,
                       t.active > 0 or t.id in self._downloads)
            for t in self.store.tasks.values()
        ]  # fmt: skip
        evicted = plan(cached, self.settings.gc, time.time() if now is None else now)
        for task_id in evicted:
            freed = self.store.evict(task_id)
            metrics.PEER_GC_EVICTIONS.inc()
            log.info("evicted task %s (%d bytes)", task_id[:12], freed)
        if evicted and self.bus is not None:
            peer_ids = [self.peer_id(task_id) for task_id in evicted]
            try:
                await self.request(
                    "scheduler.leave",
                    {"host_id": self.settings.host_id, "peer_ids": peer_ids[:4096]},
                )
            except SwarmflyError as exc:
                log.info("eviction not reported: %s", exc)
        self._count_cache()
        return evicted

    async def _gc_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.gc_interval)
            try:
                await self.collect()
            except OSError as exc:
                log.warning("cache collection failed: %s", exc)

    async def leave(self) -> None:
        """Leave the swarm, once: the schedulers drop this host's peers and offer them to no
        child any more. A stopping service does this first, not after its servers have wound
        down (seconds, with connections open).

        Its downloads stop first and report what they hold (pieces read for a lending seed
        must be known to the swarm, which copies them while this host still serves); then
        nothing of this host registers again (a heartbeat or a report would)."""
        if self._left:
            return
        if self._beat is not None:
            self._beat.cancel()
        running = [task for _, task in self._downloads.values()]
        for task in running:
            task.cancel()
        if running:
            await asyncio.wait(running, timeout=LEAVE_PATIENCE)
        self._left = True
        if self.bus is None or not self.bus.nc.is_connected:
            return
        try:
            await self.bus.request(
                "scheduler.leave", {"host_id": self.settings.host_id}, timeout=2.0
            )
        except SwarmflyError as exc:
            log.debug("leave: %s", exc)


def deliver(stored: StoredTask, output: Path) -> None:
    """Put the verified file at ``output`` atomically: a hard link when the filesystem
    allows, else a copy; the path never holds a partial file."""
    output = output.absolute()
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.swarmfly-{os.getpid()}-{os.urandom(4).hex()}"
    try:
        try:
            os.link(stored.data_path, tmp)
        except OSError:
            import shutil

            shutil.copyfile(stored.data_path, tmp)
        os.replace(tmp, output)
    finally:
        if tmp.exists():
            tmp.unlink()
