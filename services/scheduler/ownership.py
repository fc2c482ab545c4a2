"""The scheduler's partition leases in JetStream KV: the IO around the pure ``LeaseBook``.

One bucket per subject prefix (``<prefix>_scheduler``, history 1): ``config`` holds the
partition count and its generation (the bucket's wins over ``scheduler.partitions`` once
set; ``change_partitions`` writes a new one), ``partition.<n>`` a lease (``partition.<g>.<n>``
in generation g), ``member.<scheduler id>`` a scheduler's presence.
A watcher keeps the book's view current; every ``renew / 4`` seconds the book is asked what
to write, and each write names the revision it replaces. A partition is served (its subjects
subscribed) only between a successful take and the moment the book gives it up.

Without JetStream the scheduler serves every partition with no lease, as a lone scheduler.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack

import nats.errors
import nats.js.errors
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from swarmfly.bus import Bus
from swarmfly.errors import SwarmflyError, in_words
from swarmfly.placement import MAX_PARTITIONS
from swarmfly.services.scheduler.leases import (
    CONFIG_KEY,
    Action,
    Holder,
    Layout,
    LeaseBook,
    Lost,
    Release,
    Renew,
    Take,
    key_generation,
)

log = logging.getLogger(__name__)

HeldCallback = Callable[[frozenset[int]], Awaitable[None]]
KV_TIMEOUT = 0.75
"""Seconds a lease write may take: a tick must not outlast the book's safety margin."""
CATCH_UP_TIMEOUT = 5.0
BUCKET_REPLICAS = 3
"""Copies of the lease bucket in a NATS cluster (one on a lone server): losing the server
that held a single copy would leave every partition without a lease."""
KvErrors = (nats.errors.Error, TimeoutError)


def bucket_name(prefix: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", prefix) + "_scheduler"


CHANGE_TRIES = 5
"""Times ``change_partitions`` reads and writes again when another change came in between."""


async def change_partitions(bus: Bus, partitions: int) -> tuple[Layout | None, Layout]:
    """Make ``partitions`` the cluster's count: the next generation of the bucket's layout,
    which every scheduler follows at its next tick. The layout before (None: the bucket had
    none; schedulers that start later use it) and the one now. Each write names the revision
    it replaces, so of two changes at once both land, one after the other, each its own
    generation; the last one's count stands."""
    if not 1 <= partitions <= MAX_PARTITIONS:
        raise SwarmflyError(
            "bad_request",
            f"the partition count must be within 1..{MAX_PARTITIONS}, not {partitions}",
        )
    bucket = bucket_name(bus.prefix)
    kv = await bus.key_value(bucket, timeout=2.0, replicas=BUCKET_REPLICAS)
    try:
        for _ in range(CHANGE_TRIES):
            try:
                entry = await kv.get(CONFIG_KEY)
            except nats.js.errors.KeyNotFoundError:
                wanted = Layout(0, partitions)
                try:
                    await kv.create(CONFIG_KEY, wanted.to_bytes())
                except nats.js.errors.KeyWrongLastSequenceError:
                    continue
                return None, wanted
            current = Layout.from_bytes(entry.value or b"")
            if current is not None and current.partitions == partitions:
                return current, current
            if current is not None:
                generation = current.generation
            else:  # unreadable: past every generation the bucket's keys name
                keys = await kv.keys()
                generation = max((key_generation(k) or 0 for k in keys), default=0)
            wanted = Layout(generation + 1, partitions)
            try:
                await kv.update(CONFIG_KEY, wanted.to_bytes(), last=entry.revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                continue
            return current, wanted
    except KvErrors as exc:
        raise SwarmflyError("unavailable", f"lease bucket {bucket}: {in_words(exc)}") from None
    raise SwarmflyError(
        "conflict", f"lease bucket {bucket}: the partition count kept changing; try again"
    )


class Ownership:
    """Lifecycle: ``start`` takes this scheduler's share of the partitions before returning,
    then keeps the leases; leaving the exit stack gives them all back."""

    def __init__(
        self,
        bus: Bus,
        *,
        scheduler_id: str,
        partitions: int,
        lease: float,
        renew: float,
        on_change: HeldCallback,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 1 <= partitions <= MAX_PARTITIONS:
            raise ValueError(f"scheduler.partitions must be within 1..{MAX_PARTITIONS}")
        self.bus = bus
        self.configured = partitions
        """``scheduler.partitions``: used only where the bucket holds no count yet."""
        self.instance = secrets.token_hex(4)
        self.clock = clock
        self.book = LeaseBook(
            me=scheduler_id,
            instance=self.instance,
            partitions=partitions,
            now=clock(),
            lease=lease,
            renew=renew,
        )
        self.bucket = bucket_name(bus.prefix)
        self.kv: KeyValue | None = None
        self.held: set[int] = set()
        """Partitions this scheduler serves now."""
        self._on_change = on_change
        self._told: frozenset[int] = frozenset()
        self._owners = [""] * partitions
        self._lock = asyncio.Lock()
        self._twin = False
        self.draining = False
        """Handed over (``hand_over``): it takes no lease again."""

    @property
    def partitions(self) -> int:
        """The count tasks are partitioned by now (the bucket's)."""
        return self.book.partitions

    @property
    def generation(self) -> int:
        return self.book.generation

    def members(self) -> list[str]:
        """The schedulers alive in the lease bucket as far as this one can tell."""
        return self.book.members(self.clock())

    def owners(self) -> list[str]:
        """Per partition, the token of its holder, as heartbeat replies carry it."""
        return self._owners

    async def start(self, stack: AsyncExitStack) -> None:
        try:
            self.kv = await self.bus.key_value(
                self.bucket, timeout=KV_TIMEOUT, replicas=BUCKET_REPLICAS
            )
        except SwarmflyError as exc:
            log.warning(
                "%s: serving all %d partitions without leases; run only one scheduler",
                exc.message,
                self.partitions,
            )
            self.held = set(range(self.partitions))
            await self._changed()
            self._owners = [f"{self.instance}.0"] * self.partitions
            return
        try:
            await self._agree_on_layout(self.kv)
            watcher = await self.kv.watchall()
        except KvErrors as exc:
            raise SwarmflyError(
                "unavailable", f"lease bucket {self.bucket}: {in_words(exc)}"
            ) from None
        stack.push_async_callback(watcher.stop)
        await self._catch_up(watcher)
        if self.partitions != self.configured:
            log.warning(
                "the cluster's schedulers use %d partitions (generation %d, lease bucket %s):"
                " scheduler.partitions = %d does not apply; `swarmfly scheduler partitions %d`"
                " changes the count for all of them",
                self.partitions,
                self.generation,
                self.bucket,
                self.configured,
                self.configured,
            )
        self._owners = [""] * self.partitions
        reader = asyncio.create_task(self._read(watcher))
        stack.callback(reader.cancel)
        log.info(
            "scheduler %s, run %s, joins lease bucket %s", self.book.me, self.instance, self.bucket
        )
        await self._tick()
        ticker = asyncio.create_task(self._loop())
        stack.push_async_callback(self._stop, ticker)

    # -- the bucket ----------------------------------------------------------------------

    async def shared(self, key: str, value: bytes) -> bytes:
        """What every scheduler of the cluster holds under ``key``: ``value`` when this one
        is the first to ask (created atomically), else what the first one put there."""
        if self.kv is None:  # no JetStream: a lone scheduler, nobody to share with
            return value
        try:
            await self.kv.create(key, value)
            return value
        except nats.js.errors.KeyWrongLastSequenceError:
            entry = await self.kv.get(key)
            return entry.value or b""

    async def _agree_on_layout(self, kv: KeyValue) -> None:
        """The first scheduler writes its configured count; the others read the bucket's
        (the watcher's initial values bring it to the book)."""
        try:
            await kv.create(CONFIG_KEY, Layout(0, self.configured).to_bytes())
            return
        except nats.js.errors.KeyWrongLastSequenceError:
            pass
        entry = await kv.get(CONFIG_KEY)
        if Layout.from_bytes(entry.value or b"") is None:
            raise SwarmflyError(
                "conflict",
                f"lease bucket {self.bucket}: its partition count is unreadable"
                f" ({(entry.value or b'')[:80]!r}); `swarmfly scheduler partitions N` sets one",
            )

    async def _catch_up(self, watcher: KeyValue.KeyWatcher) -> None:
        """Read what the bucket holds before deciding anything (the watcher's None marks the
        end of the initial values)."""
        deadline = self.clock() + CATCH_UP_TIMEOUT
        while (left := deadline - self.clock()) > 0:
            try:
                entry = await watcher.updates(timeout=left)  # type: ignore[no-untyped-call]
            except nats.errors.TimeoutError:
                break
            if entry is None:
                return
            self._observe(entry, initial=True)
        log.warning("lease bucket %s: initial values not read in time", self.bucket)

    async def _read(self, watcher: KeyValue.KeyWatcher) -> None:
        async for entry in watcher:
            if entry is not None:
                self._observe(entry)

    def _observe(self, entry: KeyValue.Entry, *, initial: bool = False) -> None:
        if entry.revision is None:
            return
        deleted = entry.operation in (KV_DEL, KV_PURGE)
        value = None if deleted else (entry.value or b"")
        self.book.observe(entry.key, entry.revision, value, self.clock(), initial=initial)
        written = self.book.member_renewed > -math.inf  # an earlier run's key is no twin
        if entry.key == self.book.member_key and value and written and not self._twin:
            holder = Holder.from_bytes(value)
            if holder is not None and holder.instance != self.instance:
                self._twin = True
                log.error(
                    "another scheduler runs with the id %s: give each its own scheduler.id",
                    self.book.me,
                )

    # -- the ticks -----------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.book.renew / 4)
            try:
                await self._tick()
            except Exception:  # a lease bug must not end the loop that keeps the others
                log.exception("lease tick failed")

    async def _tick(self) -> None:
        async with self._lock:
            if self.draining:
                return
            before, layout = set(self.held), self.book.layout
            if self.book.member_due(self.clock()):
                await self._write_member()
            await self._apply(self.book.plan(self.clock()))
            if self.book.layout != layout:
                log.info(
                    "partitions: %d -> %d (generation %d): the old count's leases given up",
                    layout.partitions,
                    self.partitions,
                    self.generation,
                )
                before = set()  # numbers of the old count: nothing to compare
            await self._forget(self.book.forgettable(self.clock()))
            self._owners = self.book.owners(self.clock())
            if gained := sorted(self.held - before):
                log.info(
                    "took partitions %s; holds %d of %d", gained, len(self.held), self.partitions
                )
            if gone := sorted(before - self.held):
                log.info("gave up partitions %s; holds %d", gone, len(self.held))

    async def _write_member(self) -> None:
        assert self.kv is not None
        sent = self.clock()
        try:
            revision = await self.kv.put(self.book.member_key, self.book.member_value().to_bytes())
        except KvErrors as exc:
            log.info("could not renew membership: %s", type(exc).__name__)
            return
        self.book.member_written(revision, sent, self.clock())

    async def _apply(self, actions: list[Action]) -> None:
        """Stop serving what goes (Lost, Release) before anything else, then write the rest
        concurrently, then serve what was taken."""
        for action in actions:
            if isinstance(action, Lost):
                log.warning("partition %d: lease lost, no longer served", action.partition)
            if isinstance(action, Lost | Release):
                self.held.discard(action.partition)
        await self._changed()
        releases = [a for a in actions if isinstance(a, Release)]
        writes = [a for a in actions if isinstance(a, Take | Renew)]
        await asyncio.gather(
            *(self._release(a) for a in releases), *(self._write(a) for a in writes)
        )
        await self._changed()

    async def _write(self, action: Take | Renew) -> None:
        assert self.kv is not None
        key = action.key
        sent = self.clock()
        try:
            revision = await self.kv.update(key, action.holder.to_bytes(), last=action.last)
        except nats.js.errors.KeyWrongLastSequenceError:
            await self._refresh(key)
            if isinstance(action, Renew) and self.book.refused(action.partition):
                log.warning("partition %d: lease taken over, no longer served", action.partition)
                self.held.discard(action.partition)
                await self._changed()
            return
        except KvErrors as exc:
            log.info("partition %d: lease write failed: %s", action.partition, type(exc).__name__)
            return
        if isinstance(action, Take):
            self.book.taken(action.partition, revision, action.holder, sent, self.clock())
            self.held.add(action.partition)
        else:
            self.book.renewed(action.partition, revision, sent, self.clock())

    async def _refresh(self, key: str) -> None:
        """Read a key back after a refused write: the watcher may be behind."""
        assert self.kv is not None
        try:
            entry = await self.kv.get(key)
        except nats.js.errors.KeyNotFoundError as exc:
            gone = getattr(exc, "entry", None)
            if gone is not None and gone.revision:
                self.book.observe(key, gone.revision, None, self.clock())
            return
        except KvErrors as exc:
            log.debug("reading %s back: %s", key, type(exc).__name__)
            return
        if entry.revision is not None:
            self.book.observe(key, entry.revision, entry.value or b"", self.clock())

    async def _release(self, action: Release) -> None:
        """Delete a lease this scheduler no longer serves, so its home need not wait."""
        assert self.kv is not None
        try:
            await self.kv.delete(action.key, last=action.last)
        except KvErrors as exc:  # it expires instead
            log.info("partition %d: release failed: %s", action.partition, type(exc).__name__)

    async def _forget(self, keys: list[str]) -> None:
        """Purge dead schedulers' member keys, markers and all (a delete would leave one)."""
        if not keys:
            return
        manager = self.bus.nc.jetstream(timeout=KV_TIMEOUT)
        for key in keys:
            try:
                await manager.purge_stream(f"KV_{self.bucket}", subject=f"$KV.{self.bucket}.{key}")
            except KvErrors as exc:
                log.info("could not remove %s from the bucket: %s", key, in_words(exc))
                return
            self.book.forgot(key)
            log.info("removed %s from lease bucket %s: gone", key, self.bucket)

    async def _changed(self) -> None:
        """Tell the service what it serves now, when that changed."""
        held = frozenset(self.held)
        if held != self._told:
            self._told = held
            await self._on_change(held)

    async def hand_over(self) -> None:
        """Serve no partition any more and let the others take them at once; the scheduler
        stays a member until it stops, and takes no lease again."""
        self.draining = True
        async with self._lock:
            releases = self.book.release_all()
            self.held.clear()
            await self._changed()
            await asyncio.gather(*(self._release(release) for release in releases))

    async def _stop(self, ticker: asyncio.Task[None]) -> None:
        """A clean stop hands every partition on at once, and says this scheduler is gone."""
        ticker.cancel()
        async with self._lock:
            releases = self.book.release_all()
            self.held.clear()
            await self._changed()
            await asyncio.gather(*(self._release(release) for release in releases))
            if self.kv is not None:
                try:
                    await self.kv.delete(self.book.member_key)
                except KvErrors as exc:
                    log.debug("membership not withdrawn: %s", type(exc).__name__)
