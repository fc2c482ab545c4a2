"""A host in the swarm: its task store, upload server, heartbeats and downloads.

The peer service and the storage (seed) service are both a ``PeerHost``; storage differs
only in host type and in fetching the tasks the scheduler hands it.

About 900 lines: what the host does for all its downloads at once (joining runs, heartbeats,
eviction, leaving with hand-over and hand-back) shares its store, its runs and its
control-plane link; one download is ``conductor``'s, delivery ``delivery``'s.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import time
import zlib
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp

from swarmfly.bus import Bus
from swarmfly.cache import is_reference
from swarmfly.config import Config, HostConfig
from swarmfly.content import SourceRequest
from swarmfly.contracts import SENDER, Sender, messages
from swarmfly.contracts.wire import Rep, Req, Subject
from swarmfly.errors import SwarmflyError
from swarmfly.httpserver import serve_http
from swarmfly.ids import default_host_id, host_id_of, origin, url_digest
from swarmfly.ids import peer_id as make_peer_id
from swarmfly.ids import task_id as make_task_id
from swarmfly.metrics import PeerMetrics
from swarmfly.placement import DEFAULT_PARTITIONS, partition_of
from swarmfly.pluginhost import Plugins
from swarmfly.plugintypes import Source, SourceStat
from swarmfly.ratelimit import TokenBucket
from swarmfly.services.peer.conductor import Conductor
from swarmfly.services.peer.gc import CachedTask, DiskUsage, GcPolicy, plan
from swarmfly.services.peer.imports import CACHE_ORIGIN, cached_stat
from swarmfly.services.peer.links import DownloadSettings, HostBudget, HttpPieces, Links
from swarmfly.services.peer.reports import REPORT_BATCH
from swarmfly.services.peer.store import (
    VERIFY_BYTES,
    StoredTask,
    TaskStore,
    private_dir,
)
from swarmfly.services.peer.transfer import LocalDiskError
from swarmfly.services.peer.upload import UploadServer

log = logging.getLogger(__name__)
LEAVE_PATIENCE = 2.0
"""Seconds a leaving host waits for its cancelled downloads' last reports."""
HAND_OVER_SECONDS = 10.0
"""Seconds at most a storage host that leaves mid-seed serves on, for children to copy the
pieces it read from the origin (the seed taking over reads again what nobody holds)."""
HAND_BACK_SECONDS = 6.0
"""Seconds at most a leaving peer spends handing lent pieces back to their seeds (within
``lifecycle.DRAIN_SECONDS`` with the leave's own waits)."""
HAND_OVER_IDLE = 2.5
"""Seconds without a child taking one of those pieces after which it stops waiting: they do
not want them from it (a child asks its seed at least every 2 s)."""
UNANSWERED_RETRY = 1.0
"""Seconds to the next heartbeat after one no scheduler answered."""
CHECKPOINT_INTERVAL = 1.0
"""Seconds between saves of a changing task's metadata: what a kill -9 can cost a resumed
download is the pieces of about this long."""


@dataclass(frozen=True)
class HostSettings:
    """A host's settings: its section of the configuration (``[peer]`` or ``[storage]``) as
    given, and what it takes from the rest; ``of`` derives them, nothing copies the section."""

    section: HostConfig
    host_id: str
    host_type: str
    state_dir: Path
    download: DownloadSettings
    """What each download on this host follows."""
    heartbeat_interval: float
    gc: GcPolicy = field(default_factory=GcPolicy)
    download_rate: int = 0
    """Bytes/s the host's downloads may take together (0: no limit); a seed's is none."""
    capabilities: bool = True
    """The upload server serves only against a capability the schedulers signed."""
    registries: tuple[str, ...] = ()
    """Registries the operator configured: their blobs are one task per digest everywhere."""
    partitions: int = DEFAULT_PARTITIONS
    """Until a heartbeat reply says how many the schedulers use."""
    uploads: bool = True
    """False: a leech, with no upload slots (so never a parent) and no pieces served."""

    @classmethod
    def of(cls, config: Config, kind: Literal["peer", "storage"], state_dir: Path) -> HostSettings:
        """The settings of this process's peer or storage host on ``state_dir``."""
        peer, storage = config.peer, config.storage
        section: HostConfig = peer if kind == "peer" else storage
        if section.host_id:
            host_id = host_id_of(section.host_id)
        elif kind == "peer":
            host_id = default_host_id(str(state_dir))
        else:
            host_id = "seed-" + default_host_id(str(state_dir))[:59]
        return cls(
            section=section,
            host_id=host_id,
            host_type="normal" if kind == "peer" else "seed",
            state_dir=state_dir,
            download=DownloadSettings(
                concurrency=peer.concurrency,
                per_parent=peer.per_parent,
                piece_timeout=peer.piece_timeout,
                origin_concurrency=storage.origin_concurrency,
                lend_pieces=kind == "storage" and storage.lend_pieces,
                # A capped seed grants its uplink piece by piece (``superseed``) and never
                # lends a sole child the file: its reads must not wait for one.
                lend_sole=kind == "storage" and storage.lend_sole and storage.upload_rate == 0,
                piece_spans=kind == "peer" and peer.piece_spans,
            ),
            heartbeat_interval=config.scheduler.heartbeat_interval,
            gc=GcPolicy(
                section.cache_quota,
                section.cache_high,
                section.cache_low,
                section.cache_ttl,
                section.disk_high,
                section.disk_low,
            ),
            download_rate=peer.download_rate if kind == "peer" else 0,
            capabilities=config.http.capabilities,
            registries=tuple(config.proxy.registries),
            partitions=config.scheduler.partitions,
            uploads=kind == "storage" or peer.upload,
        )


@dataclass(frozen=True)
class DownloadResult:
    task_id: str
    content_length: int
    bytes_origin: int
    bytes_p2p: int
    seconds: float
    digest: str | None

    def reply(self, output: Path) -> messages.DownloadReply:
        """The ``peer.<host>.download`` reply for this result delivered at ``output``."""
        return messages.DownloadReply.from_dict({**self.summary(), "output": str(output)})

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
class Resolved:
    """What a request names, once the origin has been asked: its task and what it said."""

    task_id: str
    source: SourceRequest
    stat: SourceStat


@dataclass(frozen=True)
class Download:
    """One download asked of this host: the task's conductor it joined (one per task, shared
    by every download of the task at once) and its ``running``; ``result`` waits for it."""

    task_id: str
    conductor: Conductor
    running: asyncio.Task[Conductor]
    started: float
    rate: int = 0
    """Bytes/s this download lets the conductor take while it waits (0: the host's limit)."""
    back_to_source: bool = True
    """This host may read the origin for it (dfget's ``--disable-back-to-source``: not)."""

    async def result(self) -> DownloadResult:
        """Wait for the conductor (cancelling this wait leaves it going for the others)."""
        with self.conductor.asking(self.rate, back_to_source=self.back_to_source):
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
            family, _, _, _, address = socket.getaddrinfo(
                parts.hostname, parts.port or 4222, type=socket.SOCK_DGRAM
            )[0]
            with socket.socket(family, socket.SOCK_DGRAM) as sock:
                sock.connect(address)  # UDP: no packet leaves, the kernel picks the route
                ip: str = sock.getsockname()[0]
                return ip
        except (OSError, IndexError):
            continue
    return "127.0.0.1"


class PeerHost:
    """Lifecycle: ``start`` loads the cache, serves uploads and heartbeats; leaving the exit
    stack it was started with leaves the scheduler and closes connections."""

    def __init__(
        self, settings: HostSettings, bus: Bus | None, servers: list[str], plugins: Plugins
    ) -> None:
        self.settings = settings
        self.bus = bus
        self.servers = servers
        self.store = TaskStore(settings.state_dir / "tasks")
        self.metrics = PeerMetrics()
        self.upload = UploadServer(
            self.store,
            metrics=self.metrics,
            rate=settings.section.upload_rate,
            slots=settings.section.upload_slots if settings.uploads else 0,
            # Grants ration a seed's uplink when it is capped: one round trip per piece,
            # which an uncapped seed need not pay (its children take what it lists).
            superseed=settings.host_type == "seed" and settings.section.upload_rate > 0,
            capabilities=settings.capabilities,
            healthy=lambda: self.bus is None or self.bus.nc.is_connected,
        )
        self.upload.take_back = self._take_back
        if settings.host_type == "seed":  # only a seed's word sets a piece's digest
            self.upload.wanted_unhashed = self._hash_wanted
        self.download_bucket = TokenBucket(settings.download_rate)
        self.links = Links(
            scheduler=self if bus is not None else None,
            parents=HttpPieces(lambda: self.session),
            settings=settings.download,
            budget=HostBudget(self.download_bucket, lambda: self.downloading),
            clock=time.monotonic,
            metrics=self.metrics,
        )
        """What a download reaches of this host (the conductor sees nothing else)."""
        self.ip = settings.section.advertise_ip or route_ip(servers)
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
        self._verifying: dict[str, asyncio.Task[None]] = {}
        """Re-verification of a restarted host's pieces, by task."""
        self._hashing: dict[str, asyncio.Task[None]] = {}
        """Pieces held ``unhashed`` being hashed for the children that want them, by task."""
        self._background: set[asyncio.Task[Any]] = set()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, limit_per_host=32),
                auto_decompress=False,
            )
        return self._session

    async def start(self, stack: AsyncExitStack) -> None:
        private_dir(self.settings.state_dir)
        private_dir(self.store.root)
        loaded = self.store.load()
        self._count_cache()
        stack.callback(self.store.close)
        stack.push_async_callback(self._checkpoint)  # the last changes, once downloads stop
        self.upload_url = await serve_http(
            stack, self.upload.app, self.settings.section.listen, self.settings.section.upload_port
        )
        self.port = int(self.upload_url.rsplit(":", 1)[1])
        stack.push_async_callback(self.close)
        if self.bus is not None:
            stack.push_async_callback(self.leave)
            await self._heartbeat(first=True)  # learns how tasks are partitioned
            self._beat = asyncio.create_task(self._heartbeat_loop())
            stack.callback(self._beat.cancel)
        verifier = asyncio.create_task(self._verify_loaded(loaded))
        stack.callback(verifier.cancel)
        collector = asyncio.create_task(self._gc_loop())
        stack.callback(collector.cancel)
        saver = asyncio.create_task(self._checkpoint_loop())
        stack.callback(saver.cancel)
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
        for job in self._background:
            job.cancel()
        if self._session is not None:
            await self._session.close()

    def host(self) -> messages.Host:
        s = self.settings
        return messages.Host(
            id=s.host_id,
            ip=self.ip,
            port=self.port,
            type=s.host_type,  # type: ignore[arg-type]
            idc=s.section.idc or None,
            location=s.section.location or None,
            # What the scheduler weighs a host's load against (the heartbeat's uploads and
            # waiting requests, and the children it sent here), smoothly: a parent with more
            # children per slot ranks lower (bench/simulate.py at 10,000 peers: ratio 1.299
            # with the slots, 1.313 with every place a request may take).
            upload_slots=self.upload.slots,
        )

    @property
    def sender(self) -> str:
        """This host as the subjects of its messages to the schedulers name it."""
        return Sender(self.settings.host_type, self.settings.host_id).token

    @property
    def downloading(self) -> int:
        """Downloads running on this host: they share its download rate."""
        return len(self._downloads)

    def copying(self, task_id: str) -> bool:
        """Is this host taking the task from the swarm now (not reading it as its seed)?"""
        entry = self._downloads.get(task_id)
        return entry is not None and not entry[0].seed

    def peer_id(self, task_id: str) -> str:
        return make_peer_id(self.settings.host_id, task_id)

    def source_for(self, url: str) -> Source:
        if is_reference(url):  # imported content: no origin but the hosts that hold it
            return CACHE_ORIGIN
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
        rate: int = 0,
        back_to_source: bool = True,
    ) -> Download:
        """Join the task's run, or start one; concurrent asks for one task share a run.

        Every request is first checked against the origin with its own credentials: content
        of a private repository reaches only a client the origin accepts, whether it comes
        from the cache, a running download or the swarm. A caller that has just made that
        check itself (the proxy's authenticated HEAD) passes what it learned as ``stat``.
        """
        self.source_for(source.url)  # an unsupported URL is refused before anything else
        self.plugins.strategy(strategy)
        started = time.monotonic()
        resolved = await self.resolve(source, stat)
        source, stat = resolved.source, resolved.stat
        task_id = task_id or resolved.task_id
        entry = self._downloads.get(task_id)
        if entry is None:
            self._drop_if_stale(task_id, source, stat)
            conductor = Conductor(
                self.links,
                task_id,
                source,
                stored=self.store.open(task_id, source.url),
                peer_id=self.peer_id(task_id),
                strategy=self.plugins.strategy(strategy),
                origin=self.source_for(source.url),
                seed=seed,
                stat=stat,
            )
            conductor.back_to_source = back_to_source  # before its first phase: no ask yet
            running = asyncio.create_task(self._run(conductor))
            entry = self._downloads[task_id] = (conductor, running)
            running.add_done_callback(lambda _: self._downloads.pop(task_id, None))
        if download_id:
            self._progress[download_id] = entry[0]
        return Download(task_id, entry[0], entry[1], started, rate, back_to_source)

    async def resolve(self, source: SourceRequest, stat: SourceStat | None = None) -> Resolved:
        """The task a request is for: what the origin says of it (``stat``, asked with the
        request's own credentials unless the caller just did), and the id that follows."""
        if stat is None and is_reference(source.url):
            stat = await cached_stat(self, source.url)
        if stat is None:
            try:
                stat = await self.source_for(source.url).stat(source.url, source.headers)
            except BaseException as exc:  # refused or missing at the origin: a failed download
                self.metrics.count_download(exc)
                raise
        if source.digest is None and (named := url_digest(source.url) or stat.digest):
            source = replace(source, digest=named)
        task_id = make_task_id(
            source.url,
            digest=source.digest,
            tag=source.tag,
            application=source.application,
            piece_length=source.piece_length,
            etag=stat.etag,
            shared=self._shared(source, stat),
            filtered=source.filtered_query_params,
        )
        return Resolved(task_id, source, stat)

    def _shared(self, source: SourceRequest, stat: SourceStat) -> bool:
        """May this request share its digest's task with other URLs? Only a blob of a
        registry the operator configured, whose digest that registry just stated to this
        requester for this repository (its own credentials, ``stat``): a URL of one's own
        or ``--digest`` alone proves nothing about who may read the content."""
        digest = source.digest
        where = origin(source.url)
        return (
            digest is not None
            and url_digest(source.url) == digest
            and stat.digest == digest
            and where is not None
            and where in {origin(r) for r in self.settings.registries}
        )

    def _drop_if_stale(self, task_id: str, source: SourceRequest, stat: SourceStat) -> None:
        """A cached copy is this requester's only if it agrees with what the origin tells
        the requester now (its length, the digest asked for): an origin with no ETag keeps
        the task id when its content changes."""
        cached = self.store.get(task_id)
        content = cached.content if cached is not None else None
        if content is None:
            return
        digest = source.digest
        if (stat.size is None or stat.size == content.content_length) and (
            not digest or not content.digest or digest == content.digest
        ):
            return
        log.warning("cached task %s disagrees with the origin now: reading it again", task_id[:12])
        self.store.evict(task_id)
        self._count_cache()

    async def download(
        self,
        source: SourceRequest,
        *,
        strategy: str = "rarest-first",
        seed: bool = False,
        task_id: str | None = None,
        download_id: str | None = None,
        rate: int = 0,
        back_to_source: bool = True,
    ) -> DownloadResult:
        """Bring a task into the store, verified; ``rate``: bytes/s it may take (0: the
        host's limit only); ``back_to_source``: this host may read the origin for it."""
        run = await self.begin(
            source,
            strategy=strategy,
            seed=seed,
            task_id=task_id,
            download_id=download_id,
            rate=rate,
            back_to_source=back_to_source,
        )
        return await run.result()

    async def _run(self, conductor: Conductor) -> Conductor:
        stored = conductor.stored
        try:
            with stored.in_use():
                try:
                    await self._verified(stored)
                except OSError as exc:  # reading back what this host held
                    raise LocalDiskError.of(exc) from None
                await conductor.run()
        except BaseException as exc:
            self.metrics.count_download(exc)
            self._discard_failed(stored, exc)
            raise
        finally:
            self._count_cache()
        self.metrics.count_download()
        return conductor

    def _discard_failed(self, stored: StoredTask, exc: BaseException) -> None:
        """Free a failed download's space at once when it cannot be resumed: after a local
        disk error (its blocks are what the disk lacks), or when it holds no verified piece.
        Otherwise its pieces stay for the next ask to resume from (GC takes them in time)."""
        if not (isinstance(exc, LocalDiskError) or not (stored.done or stored.unverified)):
            return
        if stored.active > 0 or self.store.get(stored.id) is not stored:
            log.info("failed task %s is in use: GC removes it later", stored.id[:12])
            return
        freed = self.store.evict(stored.id)
        if freed:
            log.info("removed failed task %s (%d bytes)", stored.id[:12], freed)
        if stored.content is not None and self.bus is not None:
            self._spawn(self._report_gone([stored.id]))

    def _spawn(self, coro: Any) -> None:
        job = asyncio.create_task(coro)
        self._background.add(job)
        job.add_done_callback(self._background.discard)

    async def _verified(self, stored: StoredTask) -> None:
        """Re-hash what a restarted host held of this task before any of it is used; shared
        by every caller (the loader's pass and downloads asking for it)."""
        if not stored.unverified:
            return
        job = self._verifying.get(stored.id)
        if job is None:
            job = self._verifying[stored.id] = asyncio.create_task(self._reverify(stored))
            job.add_done_callback(lambda _: self._verifying.pop(stored.id, None))
        await asyncio.shield(job)

    async def _reverify(self, stored: StoredTask) -> None:
        with stored.in_use():  # the file stays open and in place meanwhile
            while batch := stored.verify_batch():
                good = await asyncio.to_thread(stored.check_pieces, batch)
                stored.accept(batch, good)

    async def _verify_loaded(self, loaded: list[StoredTask]) -> None:
        """Re-verify the tasks found at start, most recently used first, and announce each
        complete one once it is: nothing unverified is offered to the swarm."""
        for stored in sorted(loaded, key=lambda t: -t.last_access):
            if self.store.get(stored.id) is not stored:
                continue  # evicted meanwhile
            try:
                await self._verified(stored)
            except OSError as exc:
                log.warning("cannot re-verify task %s: %s", stored.id[:12], exc)
                continue
            if stored.complete and self.bus is not None and stored.id not in self._downloads:
                await self._announce_safely(stored)
        self._count_cache()

    async def _checkpoint_loop(self) -> None:
        while True:
            await asyncio.sleep(CHECKPOINT_INTERVAL)
            await self._checkpoint()

    async def _checkpoint(self) -> None:
        """Save the metadata of every task that changed, off the event loop: at most once a
        ``CHECKPOINT_INTERVAL`` per task, however fast its pieces arrive."""
        for stored in list(self.store.tasks.values()):
            save = stored.checkpoint()
            if save is None:
                continue
            try:
                with stored.in_use():
                    await asyncio.to_thread(save)
            except OSError as exc:
                log.warning("cannot save task %s: %s", stored.id[:12], exc)

    def _count_cache(self) -> None:
        """Everything the store holds on disk: complete, partial and orphaned tasks."""
        tasks, orphans = self.store.tasks.values(), self.store.orphans
        self.metrics.cache_tasks.set(len(tasks) + len(orphans))
        self.metrics.cache_bytes.set(
            sum(t.content.content_length for t in tasks if t.content) + sum(orphans.values())
        )

    async def _take_back(
        self, task: StoredTask, number: int, child: str, chunks: AsyncIterator[bytes]
    ) -> bool:
        """A lent piece handed back by its child, into this seed's running download."""
        entry = self._downloads.get(task.id)
        if entry is None or not entry[0].seed:
            return False
        async with asyncio.timeout(self.settings.download.piece_timeout):
            return await entry[0].pieces.take_back(number, child, chunks)

    def _hash_wanted(self, stored: StoredTask) -> None:
        """A child wants a task this seed holds ``unhashed`` (the whole file proved it, no
        piece on its own): its pieces are hashed, one job per task."""
        if stored.id not in self._hashing and self.bus is not None:
            job = self._hashing[stored.id] = asyncio.create_task(self._hash_unhashed(stored))
            job.add_done_callback(lambda _: self._hashing.pop(stored.id, None))

    async def _hash_unhashed(self, stored: StoredTask) -> None:
        """Hash the pieces in order and report them a batch at a time, so that the child
        starts on the first while the rest are hashed."""
        assert stored.content is not None
        log.info(
            "task %s: a child wants it; hashing the %d pieces only the whole file proved",
            stored.id[:12], len(stored.unhashed),
        )  # fmt: skip
        per_batch = max(1, VERIFY_BYTES // stored.content.piece_length)
        peer_id, task = self.peer_id(stored.id), stored.content.message()
        refused = False
        with stored.in_use():
            while stored.unhashed:
                reports = []
                for number in sorted(stored.unhashed)[:per_batch]:
                    digest = await asyncio.to_thread(stored.hash_held, number)
                    stored.unhashed.discard(number)
                    if digest is not None:
                        reports.append(messages.PieceReport(number, digest))
                if reports and not refused:
                    try:
                        body = messages.PiecesRequest(stored.id, peer_id, reports, task=task)
                        await self.request(messages.PIECES, body)
                    except SwarmflyError as exc:
                        log.info("task %s: hashed pieces not reported: %s", stored.id[:12], exc)
                        refused = True
        if refused:  # the scheduler lost our registration, say: all of it again
            await self._announce_safely(stored)

    def progress(self, download_id: str) -> Conductor | None:
        return self._progress.get(download_id)

    def forget(self, download_id: str) -> None:
        self._progress.pop(download_id, None)

    # -- control plane ---------------------------------------------------------------------

    async def request(
        self, subject: Subject[Req, Rep], message: Req, *, timeout: float = 5.0
    ) -> Rep:
        """A request to the schedulers; a task's subjects go to the task's partition (each
        of their requests names its task)."""
        if self.bus is None:
            raise SwarmflyError("unavailable", "no control plane")
        if self._left:
            raise SwarmflyError("unavailable", "this host has left the swarm")
        tokens = {SENDER: self.sender} if subject.contract.sender else {}
        if "{partition}" in subject.name:
            task_id: str = getattr(message, "task_id")  # noqa: B009
            tokens["partition"] = str(partition_of(task_id, self.partitions))
        return await self.bus.request(subject, message, timeout=timeout, **tokens)

    async def announce(
        self, stored: StoredTask, *, peer_id: str | None = None, seed: bool = False
    ) -> None:
        """Tell the scheduler what this host holds of a task: how its state is rebuilt."""
        if self.bus is None or stored.content is None:
            return
        peer_id = peer_id or self.peer_id(stored.id)
        task = stored.content.message()
        seeds = seed or (self.settings.host_type == "seed" and stored.complete)
        await self.request(
            messages.REGISTER,
            messages.RegisterRequest(
                task_id=stored.id,
                peer_id=peer_id,
                host=self.host(),
                source=messages.Source(stored.url or "swarmfly:cached"),
                pieces=sorted(stored.done),
                task=task,
                seed=True if seeds else None,
            ),
        )
        reports = [
            messages.PieceReport(n, stored.digests[n])
            for n in sorted(stored.done)
            if stored.digests[n]
        ]
        for start in range(0, max(1, len(reports)), REPORT_BATCH):
            batch = reports[start : start + REPORT_BATCH]
            await self.request(
                messages.PIECES,
                messages.PiecesRequest(stored.id, peer_id, batch, task=task),
            )
        if stored.complete:
            await self.request(messages.RESULT, messages.ResultRequest(stored.id, peer_id, True))

    async def _announce_safely(self, stored: StoredTask) -> bool:
        """Announce a complete task, or a running download as its conductor (a seed that
        only waits, reporting nothing, would stay unknown to a restarted scheduler)."""
        running = self._downloads.get(stored.id)
        try:
            if running is not None and not stored.complete:
                conductor = running[0]
                await self.announce(stored, peer_id=conductor.peer_id, seed=conductor.seed)
                conductor.rejoined()
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
            # Unanswered (no scheduler yet, or one still starting): ask again soon, for a
            # host that knows no scheduler's key cannot serve its children.
            interval = await self._heartbeat() or min(interval, UNANSWERED_RETRY)

    def _beat_targets(self) -> set[str] | None:
        """The scheduler runs this host's heartbeats go to: those holding the partitions of
        its tasks, or one when it holds none. None: every scheduler, through the fanout
        subject: a storage host (any scheduler may seed on it), or a partition whose holder
        this host does not know."""
        if self.settings.host_type == "seed" or len(self._owners) != self.partitions:
            return None
        parts = {partition_of(t, self.partitions) for t in (*self.store.tasks, *self._downloads)}
        if not parts:  # spread the hosts without tasks over the schedulers
            parts = {zlib.crc32(self.settings.host_id.encode()) % self.partitions}
        runs = {self._owners[p].split(".")[0] for p in parts}
        return None if "" in runs else runs

    async def _send_beat(
        self, beat: messages.HeartbeatRequest, wait: float, expect: int | None
    ) -> list[messages.HeartbeatReply]:
        """The heartbeat to the schedulers that schedule this host's tasks, or to all (see
        ``_beat_targets``); all as well when one of those runs no longer answers (it ended:
        the fanout's replies name the new holders)."""
        assert self.bus is not None
        targets = None if expect == 1 else self._beat_targets()
        if targets is not None:
            answers = await asyncio.gather(
                *(
                    self.bus.request(
                        messages.BEAT, beat, timeout=wait, scheduler=run, sender=self.sender
                    )
                    for run in sorted(targets)
                ),
                return_exceptions=True,
            )
            replies = [a for a in answers if isinstance(a, messages.HeartbeatReply)]
            if len(replies) == len(targets):
                return replies
            log.debug("heartbeat: %d of %d schedulers answered", len(replies), len(targets))
        return await self.bus.gather(
            messages.HEARTBEAT, beat, wait=wait, expect=expect, sender=self.sender
        )

    async def _heartbeat(self, *, first: bool = False) -> float | None:
        """One heartbeat (``_send_beat``); the seconds to the next one, None when no scheduler
        answered.

        Whoever lost this host's state (a restarted scheduler, one that expired the host, the
        new holder of a partition) gets its complete tasks again: the schedulers' state is
        soft, rebuilt from hosts. Hence every reply counts, not just the first.
        """
        beat = messages.HeartbeatRequest(self.host(), self.upload.load, len(self.store.tasks))
        schedulers = self.schedulers
        wait = max(0.2, min(2.0, self._interval / 2))
        try:
            replies = await self._send_beat(beat, wait, 1 if first else len(schedulers) or None)
        except SwarmflyError as exc:
            log.debug("heartbeat: %s", exc)
            return None
        if not replies:
            log.debug("heartbeat: no scheduler answered")
            return None
        self._answered = time.monotonic()
        for reply in replies:
            self.upload.trust(reply.verify_keys or ())
        first_reply = replies[0]
        partitions = self.partitions if first_reply.partitions is None else first_reply.partitions
        owners = [""] * partitions
        for reply in replies:  # any scheduler's view of the bucket; they agree but for lag
            theirs = reply.owners or []
            if len(theirs) == partitions:
                owners = [mine or other for mine, other in zip(owners, theirs, strict=True)]
        if partitions != self.partitions or len(self._owners) != partitions:
            self.partitions, self._owners = partitions, [""] * partitions
        moved: set[int] = set()
        if not first:
            moved = {p for p, token in enumerate(owners) if token and token != self._owners[p]}
            for reply in replies:
                if not reply.known:
                    run = reply.scheduler
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
        interval_ms = first_reply.interval_ms
        interval = self._interval if interval_ms is None else interval_ms / 1000
        self._interval = interval
        return interval

    @property
    def schedulers(self) -> set[str]:
        """The runs of the schedulers holding partitions, as the last heartbeats said: how
        many answers a fanout to them waits for."""
        return {token.split(".")[0] for token in self._owners if token}

    def schedulers_answer(self) -> bool:
        """Some scheduler answered a recent heartbeat: a task subject nobody answers then
        means its partition is moving to another scheduler, not that there is none."""
        return time.monotonic() - self._answered < 3 * self._interval

    async def collect(self, now: float | None = None) -> list[str]:
        """Evict what the cache policy says; tell the scheduler these pieces are gone."""
        cached = [
            CachedTask(t.id, t.content.content_length if t.content else 0, t.last_access,
                       t.active > 0 or t.id in self._downloads or t.id in self._verifying,
                       expires=t.expires_at)
            for t in self.store.tasks.values()
        ] + [
            CachedTask(task_id, size, 0.0, active=False, orphan=True)
            for task_id, size in self.store.orphans.items()
        ]  # fmt: skip
        now = time.time() if now is None else now
        evicted = plan(cached, self.settings.gc, now, self._disk_usage())
        announced = [task_id for task_id in evicted if task_id not in self.store.orphans]
        for task_id in evicted:
            freed = self.store.evict(task_id)
            self.metrics.gc_evictions.inc()
            log.info("evicted task %s (%d bytes)", task_id[:12], freed)
        if announced:
            await self._report_gone(announced)
        self._count_cache()
        return evicted

    async def remove(self, task_id: str) -> bool:
        """Drop a task from the cache now and tell the schedulers (``swarmfly cache rm``);
        False when it was not here."""
        if self.store.get(task_id) is None:
            return False
        freed = self.store.evict(task_id)
        log.info("removed task %s (%d bytes)", task_id[:12], freed)
        self._count_cache()
        await self._report_gone([task_id])
        return True

    def _disk_usage(self) -> DiskUsage | None:
        """The state dir's filesystem now, for the disk watermarks."""
        try:
            stat = os.statvfs(self.settings.state_dir)
        except OSError as exc:
            log.warning("cannot read the disk usage of %s: %s", self.settings.state_dir, exc)
            return None
        total = stat.f_blocks * stat.f_frsize
        return DiskUsage(total, total - stat.f_bavail * stat.f_frsize)

    async def _report_gone(self, task_ids: list[str]) -> None:
        """Tell the schedulers this host no longer holds these tasks."""
        if self.bus is None:
            return
        peer_ids = [self.peer_id(task_id) for task_id in task_ids]
        try:
            await self.request(
                messages.LEAVE, messages.LeaveRequest(self.settings.host_id, peer_ids[:4096])
            )
        except SwarmflyError as exc:
            log.info("eviction not reported: %s", exc)

    async def _gc_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.section.gc_interval)
            try:
                await self.collect()
            except OSError as exc:
                log.warning("cache collection failed: %s", exc)

    async def leave(self) -> None:
        """Leave the swarm, once: the schedulers drop this host's peers and offer them to no
        child any more. A stopping service does this first, not after its servers have wound
        down (seconds, with connections open).

        A lending seed first hands over what it read (its reports go on meanwhile: the swarm
        must know those pieces to copy them while this host still serves). Then nothing of
        this host speaks to the schedulers but the leave: its downloads stop without a last
        report or result (the leave drops their peers anyway), and neither a heartbeat nor
        a report registers the host again. The leave waits for no scheduler's answer to
        anything else."""
        if self._left:
            return
        # Heartbeats go on while a seed hands over: a partition's new holder learns of its
        # tasks (and their digests) from them.
        await self._hand_over([c for c, _ in self._downloads.values() if c.seed])
        self._left = True
        if self._beat is not None:
            self._beat.cancel()
        running = []
        borrowers = [c for c, _ in self._downloads.values() if c.borrowed or c.lent_reads]
        for conductor, task in self._downloads.values():
            conductor.silence()
            task.cancel()
            running.append(task)
        if running:
            await asyncio.wait(running, timeout=LEAVE_PATIENCE)
        if self.bus is not None and self.bus.nc.is_connected:
            try:
                await self.bus.request(
                    messages.LEAVE,
                    messages.LeaveRequest(self.settings.host_id),
                    timeout=2.0,
                    sender=self.sender,
                )
            except SwarmflyError as exc:
                log.debug("leave: %s", exc)
        await self._hand_back(borrowers)

    async def _hand_back(self, borrowers: list[Conductor]) -> None:
        """After the leave (children are sent elsewhere at once), the lent pieces read here
        go back to their seeds, which would read them from the origin again: a while at
        most, the upload server serving on meanwhile."""
        if not borrowers:
            return
        jobs = [asyncio.create_task(c.hand_back(HAND_BACK_SECONDS)) for c in borrowers]
        done, late = await asyncio.wait(jobs, timeout=HAND_BACK_SECONDS)
        for job in late:
            job.cancel()
        taken = sum(job.result() for job in done if not job.cancelled() and not job.exception())
        lent = sum(len(c.borrowed) for c in borrowers)
        log.info("leaving: %d of %d lent pieces read here went back to their seeds", taken, lent)

    async def _hand_over(self, seeding: list[Conductor]) -> None:
        """A seed leaving mid-read: no new origin reads, those in flight finish, and it
        serves on while children take the pieces it read that it never sent: a while at
        most, and not once they stop taking them (they had them from each other)."""
        if not seeding:
            return
        for conductor in seeding:
            conductor.drain()
        loop = asyncio.get_running_loop()
        deadline = idle = loop.time()
        deadline += HAND_OVER_SECONDS
        fewest: int | None = None
        while (now := loop.time()) < deadline:
            reading = any(c.origin_reads for c in seeding)
            unsent = sum(not c.stored.served.get(n) for c in seeding for n in c.stored.done)
            if not reading and not unsent:
                return
            if reading or fewest is None or unsent < fewest:
                idle, fewest = now, unsent
            elif now - idle > HAND_OVER_IDLE:
                break
            await asyncio.sleep(0.05)
        log.info("leaving: %d pieces read here were never sent from here", unsent)
