"""A token bucket for upload and download rate limits (bytes per second)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

MIN_SEND_RATE = 64 * 1024
"""Bytes/s an upload server requires a child to read, over every send window: a reader that
barely reads would hold an upload slot as long as it liked. A rate-capped download therefore
keeps no more pieces in flight than its rate feeds at twice this each."""


class TokenBucket:
    """Allows ``rate`` bytes/s on average with bursts up to ``burst``; rate 0 means unlimited."""

    def __init__(
        self, rate: float, burst: float | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._clock = clock
        self._fixed_burst = burst
        self.rate = rate
        self.burst = self._burst_for(rate)
        self._tokens = self.burst
        self._stamp = clock()
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()

    def _burst_for(self, rate: float) -> float:
        return self._fixed_burst if self._fixed_burst is not None else max(rate / 8, 64 * 1024)

    @property
    def unlimited(self) -> bool:
        return self.rate <= 0

    def set_rate(self, rate: float) -> None:
        """A new rate, for the bytes still waiting too: a waiter held by a slow rate that is
        lifted goes on at once, not after the wait the old rate set."""
        if rate == self.rate:
            return
        self._refill()
        self.rate = rate
        self.burst = self._burst_for(rate)
        self._tokens = min(self._tokens, self.burst)
        self._changed.set()

    def _refill(self) -> None:
        now = self._clock()
        if not self.unlimited:
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    async def take(self, amount: int) -> None:
        """Wait until ``amount`` bytes may pass; waiters are served in order."""
        if self.unlimited or amount <= 0:
            return
        async with self._lock:
            self._refill()
            self._tokens -= amount
            while self._tokens < 0 and not self.unlimited:
                self._changed.clear()
                try:
                    await asyncio.wait_for(self._changed.wait(), -self._tokens / self.rate)
                except TimeoutError:
                    break  # the deficit is paid: the next refill counts the time slept
                self._refill()  # at the new rate from here
            if self.unlimited:
                self._tokens = self.burst
