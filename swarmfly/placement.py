"""Where a task lives: the scheduler partition that owns it, and the order of its seeds.

Pure and deterministic, so every scheduler and every peer (in any language) computes the same
answer from the same inputs; the formulas are spelled out in the contracts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

DEFAULT_PARTITIONS = 16
MAX_PARTITIONS = 4096


def partition_of(task_id: str, partitions: int) -> int:
    """The task's partition: its first 64 bits modulo the count. A task id is a sha256 (hex),
    so this spreads tasks evenly without hashing again."""
    return int(task_id[:16], 16) % partitions


def _weight(key: str, node: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{key}\n{node}".encode()).digest()[:8], "big")


def rendezvous(key: str, nodes: Iterable[str]) -> list[str]:
    """``nodes`` in highest-random-weight order for ``key``.

    The first is the key's home. When a node goes, only the keys it was home to move, each to
    its own next node; when one comes, it takes a fair share from every other node. Ties (a
    64-bit collision) fall to the larger node id, so the order is total.
    """
    return sorted(set(nodes), key=lambda node: (_weight(key, node), node), reverse=True)
