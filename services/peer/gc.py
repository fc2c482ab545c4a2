"""Cache garbage collection, as a pure decision: which tasks to evict now.

Orphans (task dirs a restart could not load) go first; then expired tasks (unused longer
than the TTL); then, while the cache is above its quota's high watermark, the least recently
used until it is below the low one; then the same by the disk: while the state dir's
filesystem is fuller than its high watermark (whatever filled it), until it is below its low
one. A task that is being downloaded or uploaded is never chosen; one with an expiry of its
own (an import's TTL) is kept until it and evicted once it passed.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CachedTask:
    id: str
    size: int
    last_access: float
    active: bool
    orphan: bool = False
    """Left by an interrupted run and never loaded: nothing can use it."""
    expires: float | None = None
    """Kept until then whatever the TTL, quota or disk say, and evicted once it passed (an
    import's TTL); None: the policy's rules alone."""


@dataclass(frozen=True)
class DiskUsage:
    """The state dir's filesystem, in bytes (``used`` counts what is not free for us)."""

    total: int
    used: int


@dataclass(frozen=True)
class GcPolicy:
    quota: int = 0
    """Bytes the cache may hold; 0: no quota."""
    high: float = 0.9
    low: float = 0.7
    ttl: float = 0.0
    """Seconds a task may go unused; 0: forever."""
    disk_high: float = 0.95
    """Share of the filesystem in use above which cached tasks are evicted; 0: never."""
    disk_low: float = 0.85


def plan(
    tasks: list[CachedTask], policy: GcPolicy, now: float, disk: DiskUsage | None = None
) -> list[str]:
    """Task ids to evict: orphans, then oldest first. ``disk``: the state dir's filesystem
    now (None: no disk watermarks)."""
    evict = [t.id for t in tasks if t.orphan and not t.active]
    freed = sum(t.size for t in tasks if t.orphan and not t.active)
    cached = sum(t.size for t in tasks if not t.orphan)
    pinned = [t for t in tasks if t.expires is not None and not (t.active or t.orphan)]
    idle = sorted(
        (t for t in tasks if not (t.active or t.orphan or t.expires is not None)),
        key=lambda t: t.last_access,
    )
    chosen: set[str] = set()

    def take(task: CachedTask) -> None:
        nonlocal freed, cached
        evict.append(task.id)
        chosen.add(task.id)
        freed += task.size
        cached -= task.size

    for task in pinned:
        if task.expires is not None and task.expires <= now:
            take(task)
    for task in idle:
        if policy.ttl > 0 and now - task.last_access > policy.ttl:
            take(task)
    if policy.quota > 0 and cached > policy.high * policy.quota:
        for task in idle:
            if cached <= policy.low * policy.quota:
                break
            if task.id not in chosen:
                take(task)
    if disk is not None and policy.disk_high > 0 and disk.used > policy.disk_high * disk.total:
        for task in idle:
            if disk.used - freed <= policy.disk_low * disk.total:
                break
            if task.id not in chosen:
                take(task)
    return evict
