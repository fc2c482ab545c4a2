"""Which piece requests an upload server serves, and in what order: the neediest child first.

A capped parent uploads one piece or two at once (one slot per ``PACED_SLOT_RATE`` of its cap),
lets as many requests wait, and turns the rest away busy. Served first come, first served, a
swarm's children drift apart, and the swarm is done only when its poorest child is
(bench/simulate.py: the last peer finished 1.2 s after the median at 1,000 peers). So the
waiting requests are served least held first (the share of its task's pieces a child holds:
one server serves the children of many tasks), and a request from a child that holds less
than the richest waiting one takes that one's place: the richer child is answered busy and
asks another parent, as it would have had it come a moment later.

How many pieces a child holds is its word (``have``). A child that understates it to jump the
queue is held to at least the pieces this server has sent it, so here it jumps the queue for
at most one task's worth of pieces. A child that says nothing waits behind those that do.

Sans-IO: the adapter (``UploadServer``; bench/simulate.py's links) owns the waiters, what the
slot does, and when the place is full.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")

MAX_CHILDREN = 4096
"""Children whose pieces sent are remembered (least recently served forgotten first)."""


@dataclass
class Admission(Generic[T]):
    """``slots`` requests served at once; the others wait in order of need."""

    slots: int
    running: int = 0
    _heap: list[tuple[float, int, T]] = field(default_factory=list)
    """(share held, arrival, waiter); entries whose waiter left are skipped when they surface."""
    _waiting: dict[T, int] = field(default_factory=dict)
    """Waiter -> its arrival number (the key of its live heap entry)."""
    _arrivals: itertools.count[int] = field(default_factory=itertools.count)
    _sent: OrderedDict[str, int] = field(default_factory=OrderedDict)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def share(self, child: str | None, says: int | None, piece_count: int) -> float:
        """What to order a child's request by: the share of the task's pieces it holds, by
        its word but at least what we sent it; a child that says nothing holds them all."""
        if says is None or piece_count <= 0:
            return 1.0
        held = max(says, self._sent.get(child, 0)) if child is not None else says
        return min(1.0, held / piece_count)

    def sent(self, child: str | None) -> None:
        """A piece was delivered to ``child``."""
        if child is None:
            return
        self._sent[child] = self._sent.pop(child, 0) + 1
        if len(self._sent) > MAX_CHILDREN:
            self._sent.popitem(last=False)

    def enter(self, waiter: T, share: float) -> bool:
        """A request admitted: True when it takes a slot at once, else it waits its turn."""
        if self.running < self.slots and not self._waiting:
            self.running += 1
            return True
        arrival = next(self._arrivals)
        self._waiting[waiter] = arrival
        heapq.heappush(self._heap, (share, arrival, waiter))
        return False

    def displace(self, share: float) -> T | None:
        """The place is full: the richest waiter, if it holds more than ``share`` (it is to
        be answered busy; the caller then ``enter``s the new request in its place)."""
        if not self._waiting:
            return None
        live = [entry for entry in self._heap if self._waiting.get(entry[2]) == entry[1]]
        richest = max(live, key=lambda entry: (entry[0], entry[1]))
        if richest[0] <= share:
            return None
        self.leave(richest[2])
        return richest[2]

    def leave(self, waiter: T) -> None:
        """A waiter that will not be served (it went away, or was displaced)."""
        self._waiting.pop(waiter, None)
        if len(self._heap) > 2 * len(self._waiting) + 16:  # drop what no longer waits
            self._heap = [e for e in self._heap if self._waiting.get(e[2]) == e[1]]
            heapq.heapify(self._heap)

    def release(self) -> T | None:
        """A slot is free: the next waiter, which now holds it; None when nobody waits."""
        while self._heap:
            _, arrival, waiter = heapq.heappop(self._heap)
            if self._waiting.get(waiter) == arrival:
                del self._waiting[waiter]
                return waiter
        self.running -= 1
        return None
