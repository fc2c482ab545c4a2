"""Partition leases, decided without IO: which to take, renew or give up, and which are lost.

The ownership adapter feeds this book what the key-value bucket holds (each key's latest
revision, as it watches them) and the time; the book answers with writes to try. Safety does
not rest on the book's view: every write names the revision it replaces, so of two schedulers
that both think a partition free, only one can take it. Expiry needs no shared clock: a lease
whose revision has not moved for its length, counted by a scheduler's own clock from when it
first saw that revision, is free; its holder counts from when it sent that renewal, so it has
stopped serving the partition by then (``margin`` earlier).

Keys: ``config`` holds the partition count and its generation (``Layout``);
``partition.<n>`` partition n's lease (``partition.<g>.<n>`` in generation g > 0: leases of
two counts never share a key); ``member.<scheduler id>`` says a scheduler is alive, and in
which generation. Each partition's home is the first live scheduler in rendezvous order for
its key: so a new scheduler gets a fair share, and a dead one's partitions spread over the
others.

A new count is a new generation: each scheduler gives up every lease of the old one at its
next tick, and takes leases of the new one only once every live member says it is in the new
generation and no other scheduler's lease of another generation is live. The count is read
only from the bucket's ``config``: tasks never have two holders, counted either way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import orjson

from swarmfly.placement import MAX_PARTITIONS, rendezvous

MEMBER_PREFIX = "member."
PARTITION_PREFIX = "partition."
CONFIG_KEY = "config"
"""Holds the ``Layout``: written by the first scheduler, then by `swarmfly scheduler
partitions`; every scheduler follows it, whatever its own configuration says."""
FORGET_AFTER = 10
"""Leases a scheduler's member key may go unchanged (unrenewed, or deleted on a clean stop)
before it is removed from the bucket: a run under a new id (a new pod) leaves one behind."""


def partition_key(partition: int, generation: int = 0) -> str:
    """Generation 0 keeps the names of the buckets from before generations."""
    if generation == 0:
        return f"{PARTITION_PREFIX}{partition}"
    return f"{PARTITION_PREFIX}{generation}.{partition}"


def key_generation(key: str) -> int | None:
    """The generation of a lease key; None for any other key."""
    if not key.startswith(PARTITION_PREFIX):
        return None
    parts = key[len(PARTITION_PREFIX) :].split(".")
    if not all(part.isdigit() for part in parts) or len(parts) > 2:
        return None
    return int(parts[0]) if len(parts) == 2 else 0


@dataclass(frozen=True, order=True)
class Layout:
    """How tasks are partitioned: ``partitions`` as of ``generation`` (each change adds one)."""

    generation: int
    partitions: int

    def to_bytes(self) -> bytes:
        return orjson.dumps({"partitions": self.partitions, "generation": self.generation})

    @classmethod
    def from_bytes(cls, data: bytes) -> Layout | None:
        """None for a value this version cannot read, or a count out of bounds: ignored.
        A value from before generations (no ``generation``) is generation 0."""
        try:
            raw: Any = orjson.loads(data)
            layout = cls(int(raw.get("generation", 0)), int(raw["partitions"]))
        except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
            return None
        ok = 1 <= layout.partitions <= MAX_PARTITIONS and layout.generation >= 0
        return layout if ok else None


@dataclass(frozen=True)
class Holder:
    """A lease's value (a member key's too, with epoch 0)."""

    owner: str
    """The scheduler's id: stable across its restarts."""
    instance: str
    """This run of it: a restarted scheduler has lost its state."""
    epoch: int
    """The revision this lease replaced when it was taken: new with every acquisition."""
    lease: float
    """Seconds its holder may go without renewing; observers count it themselves."""
    generation: int = 0
    """The ``Layout`` generation its writer was in (on a member key: has switched to)."""

    @property
    def token(self) -> str:
        """What heartbeat replies show per partition: a new one means a holder without state."""
        return f"{self.instance}.{self.epoch}"

    def to_bytes(self) -> bytes:
        return orjson.dumps(
            {"owner": self.owner, "instance": self.instance, "epoch": self.epoch,
             "lease_ms": int(self.lease * 1000), "generation": self.generation}
        )  # fmt: skip

    @classmethod
    def from_bytes(cls, data: bytes) -> Holder | None:
        """None for a value this version cannot read: it counts as nobody's."""
        try:
            raw: Any = orjson.loads(data)
            holder = cls(
                str(raw["owner"]),
                str(raw["instance"]),
                int(raw["epoch"]),
                raw["lease_ms"] / 1000,
                int(raw.get("generation", 0)),
            )
        except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
            return None
        return holder if 0 < holder.lease < 3600 else None


@dataclass
class _Seen:
    revision: int
    holder: Holder | None
    """None: deleted, or unreadable."""
    since: float
    """When this scheduler first saw this revision."""


@dataclass
class _Owned:
    revision: int
    holder: Holder
    renewed: float
    """When the write that this revision is was sent: the lease runs from there."""


@dataclass(frozen=True)
class Take:
    partition: int
    last: int
    """The revision to replace (0: the key must not exist)."""
    holder: Holder

    @property
    def key(self) -> str:
        return partition_key(self.partition, self.holder.generation)


@dataclass(frozen=True)
class Renew:
    partition: int
    last: int
    holder: Holder

    @property
    def key(self) -> str:
        return partition_key(self.partition, self.holder.generation)


@dataclass(frozen=True)
class Release:
    """Give a partition to its home, or up for a new generation: stop serving it, then
    delete the lease."""

    partition: int
    last: int
    generation: int = 0

    @property
    def key(self) -> str:
        return partition_key(self.partition, self.generation)


@dataclass(frozen=True)
class Lost:
    """Stop serving a partition now: its lease could not be renewed in time, or was taken."""

    partition: int


Action = Take | Renew | Release | Lost


class LeaseBook:
    """One scheduler's view of the bucket and the leases it holds."""

    def __init__(
        self,
        *,
        me: str,
        instance: str,
        partitions: int,
        now: float,
        lease: float = 6.0,
        renew: float = 2.0,
    ) -> None:
        if not 0 < renew <= lease / 2:
            raise ValueError("a lease must be renewed at least twice within its length")
        self.me = me
        self.instance = instance
        self.layout = Layout(0, partitions)
        """The count tasks are partitioned by: the configured one until the bucket's is read."""
        self._wanted: Layout | None = None
        """A newer layout the bucket holds, to switch to at the next ``plan``."""
        self._confirmed = False
        """The bucket's layout was read: the configured count no longer matters."""
        self._planned = False
        self.lease = lease
        self.renew = renew
        self.margin = lease / 4
        """A holder stops this much before observers may count its lease as expired: room
        for a late tick and the unsubscribe."""
        self.grace = lease * 3 / 4
        """How long a free partition waits for its home before any scheduler takes it: longer
        than a newcomer may take to see that a member it read at start is dead."""
        self.started = now
        self.seen: dict[str, _Seen] = {}
        self.owned: dict[int, _Owned] = {}
        self.member_renewed = -math.inf
        self._reclaim = True
        self._abandoned: dict[int, int] = {}
        """Partition -> the revision of ours we gave up: not to be mistaken for a lost answer."""
        self._closed_at = -math.inf
        """When takes were last held back for a generation change: a partition counts as
        free for others than its home only from then on (its home goes first)."""

    @property
    def partitions(self) -> int:
        return self.layout.partitions

    @property
    def generation(self) -> int:
        return self.layout.generation

    @property
    def member_key(self) -> str:
        return f"{MEMBER_PREFIX}{self.me}"

    def member_value(self) -> Holder:
        return Holder(self.me, self.instance, 0, self.lease, self.generation)

    # -- what the bucket holds -------------------------------------------------------------

    def observe(
        self, key: str, revision: int, value: bytes | None, now: float, *, initial: bool = False
    ) -> None:
        """A key's revision, as watched or read back (``value`` None: deleted).

        ``initial``: read when this scheduler joined, so possibly written long ago. A lease
        still counts in full from now (safety); a member only until its next renewal is due,
        so a newcomer does not count a dead scheduler as alive for a whole lease.
        """
        if key == CONFIG_KEY:
            self._observe_layout(value)
            return
        seen = self.seen.get(key)
        if seen is not None and revision <= seen.revision:
            return
        holder = Holder.from_bytes(value) if value is not None else None
        since = now
        if initial and holder is not None and key.startswith(MEMBER_PREFIX):
            since = now - max(0.0, holder.lease - 1.5 * self.renew)
        self.seen[key] = _Seen(revision, holder, since)

    def _observe_layout(self, value: bytes | None) -> None:
        """The bucket's layout wins over the configured count; a later generation over an
        earlier one. Before the first plan nothing is held, so it applies at once."""
        layout = Layout.from_bytes(value) if value is not None else None
        if layout is None:  # deleted or unreadable: partitioned as before
            return
        newest = self._wanted or self.layout
        if self._confirmed and layout.generation <= newest.generation:
            return
        self._confirmed = True
        if not self._planned:
            self.layout = layout
        elif layout != self.layout:
            self._wanted = layout

    def _stale(self, seen: _Seen, now: float) -> bool:
        return seen.holder is None or now - seen.since >= seen.holder.lease

    def members(self, now: float) -> list[str]:
        """Ids of the schedulers alive as far as this one can tell, itself included."""
        live = {self.me}
        for key, seen in self.seen.items():
            fresh = seen.holder is not None and not self._stale(seen, now)
            if key.startswith(MEMBER_PREFIX) and seen.holder is not None and fresh:
                live.add(seen.holder.owner)
        return sorted(live)

    def home(self, partition: int, live: list[str]) -> str:
        """By the partition's number alone: the same in every generation."""
        return rendezvous(partition_key(partition), live)[0]

    def owners(self, now: float) -> list[str]:
        """Per partition, the token of its live holder ("" when none)."""
        tokens: list[str] = []
        for partition in range(self.partitions):
            owned = self.owned.get(partition)
            seen = self.seen.get(partition_key(partition, self.generation))
            if owned is not None:
                tokens.append(owned.holder.token)
            elif seen is not None and seen.holder is not None and not self._stale(seen, now):
                tokens.append(seen.holder.token)
            else:
                tokens.append("")
        return tokens

    # -- what to do ------------------------------------------------------------------------

    def forgettable(self, now: float) -> list[str]:
        """Member keys to remove from the bucket: those unchanged for FORGET_AFTER leases
        (their own, where longer). Only the first live scheduler asks, so one removes each."""
        if self.members(now)[0] != self.me:
            return []
        return sorted(
            key
            for key, seen in self.seen.items()
            if (
                (key.startswith(MEMBER_PREFIX) and key != self.member_key)
                or key_generation(key) not in (None, self.generation)  # an earlier layout's
            )
            and now - seen.since
            >= FORGET_AFTER * max(self.lease, seen.holder.lease if seen.holder else 0)
        )

    def forgot(self, key: str) -> None:
        """The key is gone from the bucket, with no marker a watcher would see."""
        self.seen.pop(key, None)

    def member_due(self, now: float) -> bool:
        return now - self.member_renewed >= self.renew

    def plan(self, now: float) -> list[Action]:
        """The writes to try now. Lost and Release are already applied to the book: the
        caller stops serving those partitions before anything else. A new layout first gives
        up every lease (``Release`` of the old generation), then takes wait for ``settled``."""
        live = self.members(now)
        actions: list[Action] = []
        if self._wanted is not None:
            actions += self._switch(now)
        settled = self.settled(now)
        if not settled:
            self._closed_at = now
        generation = self.generation
        for partition in range(self.partitions):
            seen = self.seen.get(partition_key(partition, generation))
            home = self.home(partition, live)
            owned = self.owned.get(partition)
            if owned is not None:
                actions += self._held(partition, owned, seen, home, now)
                continue
            free_since = self._free_since(partition, seen, now)
            if free_since is None or not settled:
                continue
            if home != self.me and now - max(free_since, self._closed_at) < self.grace:
                continue
            last = seen.revision if seen is not None else 0
            holder = Holder(self.me, self.instance, last, self.lease, generation)
            actions.append(Take(partition, last, holder))
        self._reclaim = False
        self._planned = True
        return actions

    def _switch(self, now: float) -> list[Action]:
        """Partition by the wanted layout from now on: give up every lease of the old one
        (its partitions hold other tasks), and say so in the member key at once."""
        assert self._wanted is not None
        old = self.generation
        releases: list[Action] = [Release(p, self._give_up(p), old) for p in sorted(self.owned)]
        self.layout, self._wanted = self._wanted, None
        self._abandoned.clear()
        self.member_renewed = -math.inf
        self._closed_at = now
        return releases

    def settled(self, now: float) -> bool:
        """Leases of this generation may be taken: every other live member says it is in
        this generation too (so it gave up the old one's and takes none of them again), and
        no other scheduler's lease of another generation is live (not yet deleted or
        expired). A previous run of this scheduler is gone, and so are its leases."""
        for key, seen in self.seen.items():
            holder = seen.holder
            if holder is None or holder.owner == self.me or self._stale(seen, now):
                continue
            if key.startswith(MEMBER_PREFIX) and holder.generation != self.generation:
                return False
            if key_generation(key) not in (None, self.generation):
                return False
        return True

    def _held(
        self, partition: int, owned: _Owned, seen: _Seen | None, home: str, now: float
    ) -> list[Action]:
        if seen is not None and seen.revision > owned.revision:
            if seen.holder is not None and seen.holder.instance == self.instance:
                owned.revision = seen.revision  # a renewal whose answer was lost still counts
            else:
                self._give_up(partition)
                return [Lost(partition)]
        if now >= owned.renewed + owned.holder.lease - self.margin:
            self._give_up(partition)
            return [Lost(partition)]
        if home != self.me:
            return [Release(partition, self._give_up(partition), self.generation)]
        if now - owned.renewed >= self.renew:
            return [Renew(partition, owned.revision, owned.holder)]
        return []

    def _give_up(self, partition: int) -> int:
        revision = self.owned.pop(partition).revision
        self._abandoned[partition] = revision
        return revision

    def _free_since(self, partition: int, seen: _Seen | None, now: float) -> float | None:
        """Since when a partition this scheduler does not hold has been free; None: held."""
        if seen is None:
            return self.started
        if seen.holder is None:
            return seen.since
        mine = seen.holder.instance == self.instance
        if mine and self._abandoned.get(partition) != seen.revision:
            return -math.inf  # ours, from a take whose answer was lost
        if self._reclaim and seen.holder.owner == self.me:
            return -math.inf  # held by this scheduler's previous run, which is gone
        if now - seen.since >= seen.holder.lease:
            return seen.since + seen.holder.lease
        return None

    # -- what the writes did ---------------------------------------------------------------

    def taken(self, partition: int, revision: int, holder: Holder, sent: float, now: float) -> None:
        self.owned[partition] = _Owned(revision, holder, sent)
        self.observe(partition_key(partition, holder.generation), revision, holder.to_bytes(), now)

    def renewed(self, partition: int, revision: int, sent: float, now: float) -> None:
        owned = self.owned.get(partition)
        if owned is None:
            return
        owned.revision, owned.renewed = revision, sent
        key = partition_key(partition, owned.holder.generation)
        self.observe(key, revision, owned.holder.to_bytes(), now)

    def refused(self, partition: int) -> bool:
        """A renewal was refused because the revision moved on (observe the key first): True
        if the partition is lost and the caller must stop serving it."""
        owned = self.owned.get(partition)
        if owned is None:
            return False
        seen = self.seen.get(partition_key(partition, owned.holder.generation))
        newer = seen is not None and seen.revision > owned.revision
        if newer and seen is not None and seen.holder and seen.holder.instance == self.instance:
            owned.revision = seen.revision  # our own earlier renewal landed after all
            return False
        self._give_up(partition)
        return True

    def member_written(self, revision: int, sent: float, now: float) -> None:
        self.member_renewed = sent
        self.observe(self.member_key, revision, self.member_value().to_bytes(), now)

    def release_all(self) -> list[Release]:
        """On a clean stop: every partition goes, so others need not wait for expiry."""
        return [Release(p, self._give_up(p), self.generation) for p in sorted(self.owned)]
