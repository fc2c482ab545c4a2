"""A token bucket for upload and download rate limits (bytes per second)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class TokenBucket:
    """Allows ``rate`` bytes/s on average with bursts up to ``burst``; rate 0 means unlimited."""

    def __init__(
        self, rate: float, burst: float | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else max(rate / 8, 64 * 1024)
        self._clock = clock
        self._tokens = self.burst
        self._stamp = clock()
        self._lock = asyncio.Lock()

    @property
    def unlimited(self) -> bool:
        return self.rate <= 0

    async def take(self, amount: int) -> None:
        """Wait until ``amount`` bytes may pass; waiters are served in order."""
        if self.unlimited or amount <= 0:
            return
        async with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            self._tokens -= amount
            if self._tokens < 0:
                await asyncio.sleep(-self._tokens / self.rate)
