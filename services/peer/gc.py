"""Cache garbage collection, as a pure decision: which tasks to evict now.

Expired tasks (unused longer than the TTL) go first; then, while the cache is above its high
watermark, the least recently used go until it is below the low watermark. A task that is
being downloaded or uploaded is never chosen.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CachedTask:
    id: str
    size: int
    last_access: float
    active: bool


@dataclass(frozen=True)
class GcPolicy:
    quota: int = 0
    """Bytes the cache may hold; 0: no quota."""
    high: float = 0.9
    low: float = 0.7
    ttl: float = 0.0
    """Seconds a task may go unused; 0: forever."""


def plan(tasks: list[CachedTask], policy: GcPolicy, now: float) -> list[str]:
    """Task ids to evict, oldest first."""
    idle = sorted((t for t in tasks if not t.active), key=lambda t: t.last_access)
    evict: list[str] = []
    used = sum(t.size for t in tasks)
    for task in idle:
        if policy.ttl > 0 and now - task.last_access > policy.ttl:
            evict.append(task.id)
            used -= task.size
    if policy.quota > 0 and used > policy.high * policy.quota:
        for task in idle:
            if used <= policy.low * policy.quota:
                break
            if task.id not in evict:
                evict.append(task.id)
                used -= task.size
    return evict
