"""Cache GC decisions: orphans and TTL first, then least recently used down to the low
watermark (of the quota, then of the disk), never a task in use."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from swarmfly.services.peer.gc import CachedTask, DiskUsage, GcPolicy, plan

MiB = 1024 * 1024


def task(name: str, size_mib: int, last_access: float, active: bool = False) -> CachedTask:
    return CachedTask(name, size_mib * MiB, last_access, active)


def test_nothing_is_evicted_under_the_high_watermark() -> None:
    tasks = [task("a", 40, 1), task("b", 40, 2)]
    assert plan(tasks, GcPolicy(quota=100 * MiB), now=10) == []


def test_least_recently_used_go_first_down_to_the_low_watermark() -> None:
    tasks = [task("new", 30, 9), task("old", 30, 1), task("mid", 30, 5), task("x", 5, 8)]
    # 95 MiB > 90% of 100: evict oldest until <= 70 MiB
    assert plan(tasks, GcPolicy(quota=100 * MiB), now=10) == ["old"]
    assert plan(tasks, GcPolicy(quota=100 * MiB, low=0.5), now=10) == ["old", "mid"]


def test_tasks_in_use_are_never_evicted() -> None:
    tasks = [task("busy", 90, 1, active=True), task("idle", 10, 5)]
    assert plan(tasks, GcPolicy(quota=50 * MiB), now=10) == ["idle"]
    assert plan(tasks, GcPolicy(ttl=1.0), now=10) == ["idle"]


def test_expired_tasks_go_regardless_of_quota() -> None:
    tasks = [task("stale", 1, 0), task("fresh", 1, 99)]
    assert plan(tasks, GcPolicy(ttl=60), now=100) == ["stale"]
    assert plan(tasks, GcPolicy(ttl=0), now=100) == [], "ttl 0 keeps tasks forever"


@given(
    sizes=st.lists(st.tuples(st.integers(1, 50), st.floats(0, 100), st.booleans()), max_size=30),
    quota=st.integers(1, 500),
)
def test_after_eviction_the_cache_is_under_the_low_watermark_or_only_busy_tasks_remain(
    sizes: list[tuple[int, float, bool]], quota: int
) -> None:
    tasks = [task(f"t{i}", s, a, busy) for i, (s, a, busy) in enumerate(sizes)]
    policy = GcPolicy(quota=quota * MiB)
    evicted = set(plan(tasks, policy, now=100))
    kept = [t for t in tasks if t.id not in evicted]
    assert not any(t.active for t in tasks if t.id in evicted), "a task in use was evicted"
    before = sum(t.size for t in tasks)
    after = sum(t.size for t in kept)
    if before > policy.high * policy.quota:
        assert after <= policy.low * policy.quota or all(t.active for t in kept)
    else:
        assert not evicted, "under the high watermark nothing goes (no TTL here)"


def test_orphans_always_go_first() -> None:
    tasks = [task("old", 1, 1), CachedTask("orphan", 5 * MiB, 0.0, False, orphan=True)]
    assert plan(tasks, GcPolicy(), now=10) == ["orphan"]
    assert plan(tasks, GcPolicy(ttl=1), now=10) == ["orphan", "old"]


def test_a_full_disk_evicts_least_recently_used_down_to_its_low_watermark() -> None:
    tasks = [task("new", 10, 9), task("old", 10, 1), task("mid", 10, 5), task("busy", 10, 0, True)]
    # 96 of 100 MiB used (by anything), over 95%: down to 85% takes the two oldest idle tasks.
    full = DiskUsage(total=100 * MiB, used=96 * MiB)
    assert plan(tasks, GcPolicy(), now=10, disk=full) == ["old", "mid"]
    assert plan(tasks, GcPolicy(), now=10, disk=DiskUsage(100 * MiB, 94 * MiB)) == []
    assert plan(tasks, GcPolicy(disk_high=0), now=10, disk=full) == [], "0 turns it off"


def test_what_expiry_frees_counts_towards_the_disk() -> None:
    tasks = [task("stale", 8, 0), task("old", 10, 1), task("new", 10, 9)]
    disk = DiskUsage(total=100 * MiB, used=96 * MiB)
    assert plan(tasks, GcPolicy(ttl=9.5), now=10, disk=disk) == ["stale", "old"]
    assert plan(tasks, GcPolicy(ttl=9.5), now=10, disk=DiskUsage(100 * MiB, 92 * MiB)) == ["stale"]


@given(
    sizes=st.lists(st.tuples(st.integers(1, 50), st.floats(0, 100), st.booleans()), max_size=30),
    other=st.integers(0, 400),
)
def test_after_eviction_the_disk_is_under_its_low_watermark_or_only_busy_tasks_remain(
    sizes: list[tuple[int, float, bool]], other: int
) -> None:
    tasks = [task(f"t{i}", s, a, busy) for i, (s, a, busy) in enumerate(sizes)]
    total = 1000 * MiB
    disk = DiskUsage(total, other * MiB + sum(t.size for t in tasks))
    policy = GcPolicy()
    evicted = set(plan(tasks, policy, now=100, disk=disk))
    assert not any(t.active for t in tasks if t.id in evicted), "a task in use was evicted"
    after = disk.used - sum(t.size for t in tasks if t.id in evicted)
    if disk.used > policy.disk_high * total:
        idle_left = [t for t in tasks if t.id not in evicted and not t.active]
        assert after <= policy.disk_low * total or not idle_left
    else:
        assert not evicted


def test_an_import_is_kept_until_its_own_expiry_then_evicted() -> None:
    """An imported task's TTL (``swarmfly cache import --ttl``) is its own: neither the
    cache's TTL, nor the quota, nor the disk evict it before it, and it goes once past."""
    imported = CachedTask("imported", 80 * MiB, 0.0, active=False, expires=200.0)
    others = [task("old", 10, 1), task("new", 10, 90)]
    full = DiskUsage(total=100 * MiB, used=99 * MiB)
    policy = GcPolicy(quota=100 * MiB, ttl=60)
    assert plan([imported, *others], policy, now=100, disk=full) == ["old", "new"]
    assert plan([imported, *others], GcPolicy(), now=200) == ["imported"]
    busy = CachedTask("imported", 80 * MiB, 0.0, active=True, expires=200.0)
    assert plan([busy], GcPolicy(), now=300) == [], "in use: evicted at a later pass"
