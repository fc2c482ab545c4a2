"""Partition leases, decided by the pure ``LeaseBook`` against an in-memory bucket that checks
revisions as JetStream KV does, on virtual time."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmfly.services.scheduler.leases import (
    CONFIG_KEY,
    FORGET_AFTER,
    MEMBER_PREFIX,
    Holder,
    Layout,
    LeaseBook,
    Lost,
    Release,
    Renew,
    Take,
    key_generation,
    partition_key,
)

P = 16
LEASE, RENEW = 6.0, 2.0
TICK = RENEW / 4


@dataclass
class Bucket:
    """Revision-checked writes; every write is appended to a log that books watch."""

    revision: int = 0
    keys: dict[str, tuple[int, bytes | None]] = field(default_factory=dict)
    log: list[tuple[float, str, int, bytes | None]] = field(default_factory=list)
    purged: list[str] = field(default_factory=list)

    def _write(self, now: float, key: str, value: bytes | None) -> int:
        self.revision += 1
        self.keys[key] = (self.revision, value)
        self.log.append((now, key, self.revision, value))
        return self.revision

    def update(self, now: float, key: str, value: bytes, last: int) -> int | None:
        current = self.keys.get(key, (0, None))[0]
        return self._write(now, key, value) if current == last else None

    def delete(self, now: float, key: str, last: int) -> None:
        if self.keys.get(key, (0, None))[0] == last:
            self._write(now, key, None)

    def put(self, now: float, key: str, value: bytes) -> int:
        return self._write(now, key, value)

    def purge(self, key: str) -> None:
        """A stream purge of the key: gone, markers and all, and no watcher hears of it."""
        self.keys.pop(key, None)
        self.purged.append(key)


@dataclass
class Scheduler:
    """A book plus what its adapter does: apply the plan to the bucket, watch the log."""

    book: LeaseBook
    bucket: Bucket
    lag: float = 0.0
    read: int = 0
    alive: bool = True
    cut_until: float = 0.0
    """Until then it cannot reach the bucket, yet serves what it holds."""

    @property
    def held(self) -> set[int]:
        return set(self.book.owned)

    def watch(self, now: float) -> None:
        initial = self.read == 0  # what the bucket held when this scheduler joined
        while self.read < len(self.bucket.log):
            at, key, revision, value = self.bucket.log[self.read]
            if at > now - self.lag:
                break
            self.book.observe(key, revision, value, now, initial=initial)
            self.read += 1

    def tick(self, now: float) -> list[object]:
        if now < self.cut_until:
            return list(self.book.plan(now))  # every write fails; the book still decides
        self.watch(now)
        if self.book.member_due(now):
            revision = self.bucket.put(
                now, self.book.member_key, self.book.member_value().to_bytes()
            )
            self.book.member_written(revision, now, now)
        actions = self.book.plan(now)
        for key in self.book.forgettable(now):
            self.bucket.purge(key)
            self.book.forgot(key)
        for action in actions:
            if isinstance(action, Release):
                self.bucket.delete(now, action.key, action.last)
            elif isinstance(action, Take | Renew):
                key = action.key
                revision = self.bucket.update(now, key, action.holder.to_bytes(), action.last)
                if revision is None:
                    if isinstance(action, Renew):
                        self.watch(now + self.lag)  # the adapter reads the key back
                        self.book.refused(action.partition)
                elif isinstance(action, Take):
                    self.book.taken(action.partition, revision, action.holder, now, now)
                else:
                    self.book.renewed(action.partition, revision, now, now)
        return list(actions)


def scheduler(bucket: Bucket, name: str, now: float = 0.0, lag: float = 0.0) -> Scheduler:
    book = LeaseBook(me=name, instance=f"{name}-run", partitions=P, now=now, lease=LEASE)
    return Scheduler(book, bucket, lag)


def run(schedulers: list[Scheduler], start: float, end: float) -> Iterator[float]:
    now = start
    while now < end:
        for s in schedulers:
            if s.alive:
                s.tick(now)
        yield now
        now = round(now + TICK, 6)


def homes(names: list[str]) -> dict[str, set[int]]:
    book = LeaseBook(me=names[0], instance="x", partitions=P, now=0.0)
    out: dict[str, set[int]] = {n: set() for n in names}
    for p in range(P):
        out[book.home(p, sorted(names))].add(p)
    return out


# -- one scheduler -----------------------------------------------------------------------


def test_a_lone_scheduler_takes_every_partition_at_once() -> None:
    bucket = Bucket()
    a = scheduler(bucket, "a")
    actions = a.tick(0.0)
    assert {x.partition for x in actions if isinstance(x, Take)} == set(range(P))
    assert all(x.last == 0 for x in actions if isinstance(x, Take))
    assert a.held == set(range(P))


def test_leases_are_renewed_every_interval_and_keep_their_token() -> None:
    bucket = Bucket()
    a = scheduler(bucket, "a")
    a.tick(0.0)
    tokens = a.book.owners(0.0)
    assert all(t.startswith("a-run.") for t in tokens)
    assert a.tick(1.0) == []
    renewals = a.tick(2.0)
    assert {x.partition for x in renewals if isinstance(x, Renew)} == set(range(P))
    assert a.book.owners(2.0) == tokens


def test_a_holder_that_cannot_renew_stops_serving_before_anyone_may_take_over() -> None:
    bucket = Bucket()
    a = scheduler(bucket, "a")
    a.tick(0.0)
    cut = LEASE - a.book.margin
    assert a.book.plan(cut - 0.01) != [] and a.held == set(range(P))  # renewals it cannot send
    lost = a.book.plan(cut)
    assert {x.partition for x in lost if isinstance(x, Lost)} == set(range(P))
    assert a.held == set()


def test_a_refused_renewal_loses_the_partition() -> None:
    bucket = Bucket()
    a = scheduler(bucket, "a")
    a.tick(0.0)
    key = partition_key(3)
    bucket.update(0.5, key, Holder("b", "b-run", 1, LEASE).to_bytes(), bucket.keys[key][0])
    a.tick(2.0)
    assert 3 not in a.held and len(a.held) == P - 1


def test_a_renewal_whose_answer_was_lost_still_counts() -> None:
    bucket = Bucket()
    a = scheduler(bucket, "a")
    a.tick(0.0)
    owned = a.book.owned[5]
    bucket.update(1.0, partition_key(5), owned.holder.to_bytes(), owned.revision)  # no answer
    a.tick(2.0)
    assert 5 in a.held


def test_a_restarted_scheduler_takes_its_own_leases_back_at_once() -> None:
    bucket = Bucket()
    scheduler(bucket, "a").tick(0.0)
    again = Scheduler(LeaseBook(me="a", instance="a-run2", partitions=P, now=1.0), bucket)
    again.tick(1.0)
    assert again.held == set(range(P))
    tokens = again.book.owners(1.0)
    assert all(t.startswith("a-run2.") for t in tokens)


def test_another_schedulers_fresh_leases_are_left_alone() -> None:
    bucket = Bucket()
    scheduler(bucket, "a").tick(0.0)
    b = scheduler(bucket, "b", now=1.0)
    b.tick(1.0)
    assert b.held == set()


def test_unreadable_values_count_as_nobodys() -> None:
    assert Holder.from_bytes(b"not json") is None
    assert Holder.from_bytes(b'{"owner": "a"}') is None
    assert Holder.from_bytes(b'{"owner":"a","instance":"i","epoch":1,"lease_ms":0}') is None
    holder = Holder("a", "i", 7, 6.0)
    assert Holder.from_bytes(holder.to_bytes()) == holder


def test_renewing_more_rarely_than_twice_a_lease_is_refused() -> None:
    with pytest.raises(ValueError, match="renewed at least twice"):
        LeaseBook(me="a", instance="i", partitions=1, now=0.0, lease=6.0, renew=4.0)


# -- several schedulers ------------------------------------------------------------------


def test_a_second_scheduler_gets_its_home_partitions() -> None:
    bucket = Bucket()
    a, b = scheduler(bucket, "a"), scheduler(bucket, "b", now=0.0)
    a.tick(0.0)
    for _ in run([a, b], 0.5, 3.0):
        pass
    expected = homes(["a", "b"])
    assert a.held == expected["a"] and b.held == expected["b"]
    assert expected["a"] and expected["b"], "both get some of the 16"


def test_a_dead_schedulers_partitions_move_within_ten_seconds() -> None:
    bucket = Bucket()
    group = [scheduler(bucket, n) for n in ("a", "b", "c")]
    for _ in run(group, 0.0, 5.0):
        pass
    assert set().union(*(s.held for s in group)) == set(range(P))
    victim = group[0]
    orphans = set(victim.held)
    assert orphans
    victim.alive = False
    moved_at = None
    for now in run(group, 5.0, 20.0):
        survivors = group[1].held | group[2].held
        if moved_at is None and orphans <= survivors:
            moved_at = now
    assert moved_at is not None and moved_at - 5.0 <= 10.0
    assert group[1].held | group[2].held == set(range(P))
    assert group[1].held == homes(["b", "c"])["b"]


@settings(max_examples=60, deadline=None)
@given(
    lags=st.lists(st.sampled_from([0.0, 0.1, 0.3, 0.9]), min_size=3, max_size=3),
    offsets=st.lists(st.sampled_from([0.0, 0.1, 0.2, 0.3, 0.4]), min_size=3, max_size=3),
    crashes=st.lists(st.tuples(st.integers(0, 2), st.floats(1.0, 30.0)), max_size=3),
    rejoins=st.lists(st.tuples(st.integers(0, 2), st.floats(5.0, 40.0)), max_size=2),
    cuts=st.lists(
        st.tuples(st.integers(0, 2), st.floats(1.0, 30.0), st.floats(0.5, 12.0)), max_size=2
    ),
    seed=st.integers(0, 2**16),
)
def test_no_partition_is_ever_served_twice(
    lags: list[float],
    offsets: list[float],
    crashes: list[tuple[int, float]],
    rejoins: list[tuple[int, float]],
    cuts: list[tuple[int, float, float]],
    seed: int,
) -> None:
    """Three schedulers with watch lag, unaligned ticks, crashes, restarts and spells
    without the bucket: at every moment each partition is served by at most one of them (a
    holder serves a partition from its take until it gives it up at a tick)."""
    rng = random.Random(seed)
    bucket = Bucket()
    names = ["a", "b", "c"]
    group = [scheduler(bucket, n, lag=lags[i]) for i, n in enumerate(names)]
    events = sorted([(t, i, "crash") for i, t in crashes] + [(t, i, "rejoin") for i, t in rejoins])
    cut_at = sorted((t, i, length) for i, t, length in cuts)
    now, end, run_number = 0.0, 50.0, 0
    next_tick = list(offsets)
    while now < end:
        while cut_at and cut_at[0][0] <= now:
            _, i, length = cut_at.pop(0)
            group[i].cut_until = now + length
        while events and events[0][0] <= now:
            _, i, kind = events.pop(0)
            if kind == "crash":
                group[i].alive = False
            elif not group[i].alive:
                run_number += 1
                book = LeaseBook(
                    me=names[i], instance=f"{names[i]}-{run_number}", partitions=P, now=now
                )
                group[i] = Scheduler(book, bucket, lags[i])
        for i, s in enumerate(group):
            if s.alive and now >= next_tick[i]:
                s.tick(now)
                next_tick[i] = now + TICK + rng.choice([0.0, 0.05, 0.1])
        serving = [s.held for s in group if s.alive]
        for p in range(P):
            assert sum(p in held for held in serving) <= 1, (now, p)
        now = round(now + 0.05, 6)
    living = [s for s in group if s.alive]
    if living and not events and not cut_at:
        settled = set().union(*(s.held for s in living))
        assert settled == set(range(P)), "every partition has a holder in the end"


def test_a_newcomer_soon_stops_counting_a_member_that_died_before_it_came() -> None:
    bucket = Bucket()
    group = [scheduler(bucket, n) for n in ("a", "b", "c")]
    for _ in run(group, 0.0, 1.0):
        pass
    group[0].alive = group[1].alive = False
    for _ in run(group, 1.0, 20.0):
        pass
    assert group[2].held == set(range(P))
    group[0] = Scheduler(LeaseBook(me="a", instance="a-2", partitions=P, now=20.0), bucket)
    settled_at = None
    for now in run(group, 20.0, 30.0):
        if settled_at is None and group[0].held == homes(["a", "c"])["a"]:
            settled_at = now
    assert settled_at is not None and settled_at - 20.0 < 1.5 * RENEW + 1.0
    assert group[2].held == homes(["a", "c"])["c"]


def members_in(bucket: Bucket) -> set[str]:
    """Member keys the bucket still holds (a deleted key's marker counts)."""
    return {key for key in bucket.keys if key.startswith(MEMBER_PREFIX)}


def test_dead_schedulers_member_keys_are_removed_once_by_the_first_live_one() -> None:
    """Every run under a new id leaves a member key: a crashed run its value, a clean stop
    its delete marker. They go after FORGET_AFTER leases, purged by one scheduler only."""
    bucket = Bucket()
    group = [scheduler(bucket, n) for n in ("a", "b", "c", "d")]
    for _ in run(group, 0.0, 1.0):
        pass
    assert members_in(bucket) == {"member.a", "member.b", "member.c", "member.d"}
    group[2].alive = False  # c crashes
    bucket.delete(1.0, "member.d", bucket.keys["member.d"][0])  # d stops cleanly
    group[3].alive = False
    gone = FORGET_AFTER * LEASE
    for _ in run(group, 1.0, 1.0 + gone - 2 * RENEW):
        pass
    assert members_in(bucket) == {"member.a", "member.b", "member.c", "member.d"}, "too soon"
    for _ in run(group, 1.0 + gone - 2 * RENEW, 2.0 + gone + LEASE):
        pass
    assert members_in(bucket) == {"member.a", "member.b"}
    assert sorted(bucket.purged) == ["member.c", "member.d"], "each purged once"


def test_a_forgotten_scheduler_that_comes_back_counts_again() -> None:
    bucket = Bucket()
    group = [scheduler(bucket, n) for n in ("a", "b")]
    for _ in run(group, 0.0, 1.0):
        pass
    group[1].alive = False
    end = 2.0 + FORGET_AFTER * LEASE + LEASE
    for _ in run(group, 1.0, end):
        pass
    assert members_in(bucket) == {"member.a"}
    assert group[0].held == set(range(P))
    group[1] = Scheduler(LeaseBook(me="b", instance="b-2", partitions=P, now=end), bucket)
    for _ in run(group, end, end + 3 * LEASE):
        pass
    assert members_in(bucket) == {"member.a", "member.b"}
    assert group[1].held == homes(["a", "b"])["b"]


# -- the partition count, changed online -------------------------------------------------


def change(bucket: Bucket, now: float, partitions: int) -> Layout:
    """What `swarmfly scheduler partitions` writes: the next generation of the layout."""
    entry = bucket.keys.get(CONFIG_KEY)
    current = Layout.from_bytes(entry[1] or b"") if entry else None
    layout = Layout(current.generation + 1 if current else 0, partitions)
    bucket.put(now, CONFIG_KEY, layout.to_bytes())
    return layout


def served(group: list[Scheduler], tasks: range) -> dict[int, int]:
    """Task -> how many schedulers serve it, each by the count it partitions by now."""
    return {t: sum(t % s.book.partitions in s.held for s in group if s.alive) for t in tasks}


def test_the_layout_reads_what_earlier_versions_wrote_and_refuses_bad_counts() -> None:
    assert Layout.from_bytes(b'{"partitions": 16}') == Layout(0, 16)
    assert Layout.from_bytes(Layout(3, 7).to_bytes()) == Layout(3, 7)
    for bad in (b'{"partitions": 0}', b'{"partitions": 4097}', b"[]", b"x", b'{"generation": 1}'):
        assert Layout.from_bytes(bad) is None, bad
    assert key_generation("partition.5") == 0 and key_generation("partition.2.5") == 2
    assert key_generation("member.a") is None and key_generation("partition.x") is None


def test_the_buckets_count_wins_over_the_configured_one() -> None:
    bucket = Bucket()
    bucket.put(0.0, CONFIG_KEY, Layout(2, 4).to_bytes())
    a = scheduler(bucket, "a")  # configured with 16
    a.tick(0.0)
    assert (a.book.partitions, a.book.generation) == (4, 2)
    assert a.held == set(range(4))
    assert set(bucket.keys) == {CONFIG_KEY, "member.a", *(f"partition.2.{p}" for p in range(4))}


def test_a_lone_scheduler_follows_a_new_count_at_its_next_tick() -> None:
    bucket = Bucket()
    change(bucket, 0.0, P)
    a = scheduler(bucket, "a")
    a.tick(0.0)
    change(bucket, 0.2, 32)
    actions = a.tick(0.5)
    released = {x.key for x in actions if isinstance(x, Release)}
    assert released == {partition_key(p) for p in range(P)}, "every lease of the old count"
    assert {x.key for x in actions if isinstance(x, Take)} == {
        partition_key(p, 1) for p in range(32)
    }
    assert a.held == set(range(32)) and len(a.book.owners(0.5)) == 32
    assert all(bucket.keys[partition_key(p)][1] is None for p in range(P)), "deleted"
    assert Holder.from_bytes(bucket.keys["member.a"][1] or b"") is not None


def test_takes_of_a_new_count_wait_for_every_member_to_switch() -> None:
    """b sees the change a second late: a gives its leases up at once but takes none of
    the new count while b may still serve the old one; then both take their homes."""
    bucket = Bucket()
    change(bucket, 0.0, P)
    a, b = scheduler(bucket, "a"), scheduler(bucket, "b", lag=1.0)
    for _ in run([a, b], 0.0, 6.0):
        pass
    assert a.held | b.held == set(range(P)) and a.held and b.held
    change(bucket, 6.0, 5)
    for now in run([a, b], 6.0, 7.0):
        if a.book.generation == 1 and b.book.generation == 0:
            assert a.held == set(), now
    for _ in run([a, b], 7.0, 10.0):
        pass
    expected = homes(["a", "b"])
    assert a.held == {p for p in expected["a"] if p < 5}
    assert b.held == {p for p in expected["b"] if p < 5}
    assert a.held | b.held == set(range(5))


def test_an_older_or_unreadable_layout_is_ignored() -> None:
    bucket = Bucket()
    change(bucket, 0.0, 8)
    change(bucket, 0.0, 12)
    a = scheduler(bucket, "a")
    a.tick(0.0)
    assert a.book.layout == Layout(1, 12)
    for value in (Layout(0, 3).to_bytes(), b"garbage", None):
        if value is None:
            bucket.delete(1.0, CONFIG_KEY, bucket.keys[CONFIG_KEY][0])
        else:
            bucket.put(1.0, CONFIG_KEY, value)
        a.tick(1.5)
        assert a.book.layout == Layout(1, 12) and a.held == set(range(12))


def test_two_changes_in_a_row_end_on_the_last() -> None:
    bucket = Bucket()
    change(bucket, 0.0, P)
    group = [scheduler(bucket, n) for n in ("a", "b")]
    for _ in run(group, 0.0, 3.0):
        pass
    change(bucket, 3.0, 24)
    group[0].tick(3.0)  # a switches to 24 before the next change lands
    change(bucket, 3.0, 7)
    for _ in run(group, 3.0, 8.0):
        pass
    assert all(s.book.layout == Layout(2, 7) for s in group)
    assert set().union(*(s.held for s in group)) == set(range(7))


def test_leases_of_a_dead_scheduler_of_the_old_count_hold_takes_back_until_they_expire() -> None:
    bucket = Bucket()
    change(bucket, 0.0, P)
    group = [scheduler(bucket, n) for n in ("a", "b")]
    for _ in run(group, 0.0, 3.0):
        pass
    group[1].alive = False  # b dies: its leases of generation 0 stay until they expire
    change(bucket, 3.0, 8)
    settled_at = None
    for now in run(group, 3.0, 3.0 + 3 * LEASE):
        if settled_at is None and group[0].held == set(range(8)):
            settled_at = now
        if now < 3.0 + LEASE - 1.0:
            assert group[0].held == set(), now
    assert settled_at is not None and settled_at - 3.0 <= LEASE + 2.0


def test_an_earlier_counts_keys_are_purged_once_long_gone() -> None:
    bucket = Bucket()
    change(bucket, 0.0, P)
    group = [scheduler(bucket, n) for n in ("a", "b")]
    for _ in run(group, 0.0, 1.0):
        pass
    change(bucket, 1.0, 4)
    for _ in run(group, 1.0, 3.0 + FORGET_AFTER * LEASE):
        pass
    assert {k for k in bucket.keys if k.startswith("partition.")} == {
        partition_key(p, 1) for p in range(4)
    }
    assert sorted(bucket.purged) == sorted(partition_key(p) for p in range(P)), "each once"


@settings(max_examples=40, deadline=None)
@given(
    lags=st.lists(st.sampled_from([0.0, 0.1, 0.3, 0.9]), min_size=3, max_size=3),
    offsets=st.lists(st.sampled_from([0.0, 0.1, 0.2, 0.3, 0.4]), min_size=3, max_size=3),
    counts=st.lists(
        st.tuples(st.floats(1.0, 30.0), st.sampled_from([1, 3, 5, 8, 16, 24, 32])),
        min_size=1,
        max_size=4,
    ),
    crash=st.one_of(st.none(), st.tuples(st.integers(0, 2), st.floats(1.0, 30.0))),
    seed=st.integers(0, 2**16),
)
def test_no_task_is_ever_served_twice_while_the_count_changes(
    lags: list[float],
    offsets: list[float],
    counts: list[tuple[float, int]],
    crash: tuple[int, float] | None,
    seed: int,
) -> None:
    """Three schedulers with watch lag and unaligned ticks; the count changes up and down,
    sometimes twice before all have followed, and one may crash: at every moment each task
    is served by one scheduler at most, by whichever count each partitions by, and in the
    end by exactly one."""
    rng = random.Random(seed)
    bucket = Bucket()
    change(bucket, 0.0, P)
    group = [scheduler(bucket, n, lag=lags[i]) for i, n in enumerate(["a", "b", "c"])]
    changes = sorted(counts)
    tasks = range(96)  # every residue of the counts used (their least common multiple)
    now, end = 0.0, 50.0
    next_tick = list(offsets)
    while now < end:
        while changes and changes[0][0] <= now:
            change(bucket, now, changes.pop(0)[1])
        if crash is not None and crash[1] <= now:
            group[crash[0]].alive = False
        for i, s in enumerate(group):
            if s.alive and now >= next_tick[i]:
                s.tick(now)
                next_tick[i] = now + TICK + rng.choice([0.0, 0.05, 0.1])
        assert max(served(group, tasks).values()) <= 1, now
        now = round(now + 0.05, 6)
    assert set(served(group, tasks).values()) == {1}, "every task has a holder in the end"


def test_a_scheduler_that_has_not_seen_the_change_yet_holds_the_others_takes_back() -> None:
    """a holds the one partition of count 1 and stops just before the count becomes 3; c
    sees a's release a moment before the change, and as partition 0's home takes it in the
    old count. b, quick to switch, must not take any of the new count meanwhile: c's member
    key does not say it switched."""
    bucket = Bucket()
    bucket.put(0.0, CONFIG_KEY, Layout(0, 1).to_bytes())
    a, b, c = scheduler(bucket, "a"), scheduler(bucket, "b"), scheduler(bucket, "c", lag=0.9)
    for _ in run([a, b, c], 0.0, 5.0):
        pass
    assert a.held == {0}, "partition 0's home of the three"
    for release in a.book.release_all():
        bucket.delete(5.0, release.key, release.last)
    bucket.delete(5.0, a.book.member_key, bucket.keys[a.book.member_key][0])
    a.alive = False
    change(bucket, 5.05, 3)  # partition 2 is b's home
    b.tick(5.1)
    c.tick(5.9)
    assert c.held == {0} and c.book.partitions == 1, "taken in the old count"
    assert b.book.partitions == 3 and b.held == set()
    for now in run([b, c], 6.0, 10.0):
        assert max(served([b, c], range(3)).values()) <= 1, now
    assert set(served([b, c], range(3)).values()) == {1}
