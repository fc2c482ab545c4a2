"""The token bucket behind upload and download rate limits, on virtual time: the bucket reads
the clock its waits run on, so each wait is measured exactly and takes no time."""

from __future__ import annotations

import asyncio

import pytest

from swarmfly.ratelimit import TokenBucket
from tests.virtualtime import now, virtual_time


async def timed(bucket: TokenBucket, *amounts: int) -> float:
    started = now()
    for amount in amounts:
        await bucket.take(amount)
    return now() - started


@pytest.mark.parametrize("rate", [0, -1])
@virtual_time
async def test_rate_zero_is_unlimited(rate: float) -> None:
    bucket = TokenBucket(rate, clock=now)
    assert bucket.unlimited
    assert await timed(bucket, *[10**12] * 100) == 0


@virtual_time
async def test_a_burst_passes_at_once() -> None:
    bucket = TokenBucket(1000, burst=5000, clock=now)
    assert not bucket.unlimited
    assert await timed(bucket, 2000, 3000) == 0


@virtual_time
async def test_zero_bytes_never_wait() -> None:
    bucket = TokenBucket(10, burst=1, clock=now)
    await bucket.take(1)
    assert await timed(bucket, 0, 0, -5) == 0


@virtual_time
async def test_taking_beyond_the_burst_waits_for_the_deficit() -> None:
    bucket = TokenBucket(1000, burst=100, clock=now)
    await bucket.take(100)
    assert await timed(bucket, 100) == pytest.approx(0.1)  # 100 bytes at 1000 B/s


@virtual_time
async def test_tokens_refill_with_the_clock() -> None:
    bucket = TokenBucket(1000, burst=500, clock=now)
    await bucket.take(500)
    await asyncio.sleep(0.5)
    assert await timed(bucket, 500) == 0


@virtual_time
async def test_refill_is_capped_at_the_burst() -> None:
    bucket = TokenBucket(1000, burst=100, clock=now)
    await asyncio.sleep(3600)
    await bucket.take(100)
    assert await timed(bucket, 50) == pytest.approx(0.05)


def test_the_default_burst_is_an_eighth_of_a_second_but_at_least_64_kib() -> None:
    assert TokenBucket(8 * 1024 * 1024).burst == 1024 * 1024
    assert TokenBucket(1000).burst == 64 * 1024


@virtual_time
async def test_the_rate_is_honoured_over_time() -> None:
    rate = 1_000_000
    bucket = TokenBucket(rate, burst=50_000, clock=now)
    total = 300_000
    elapsed = await timed(bucket, *[10_000] * (total // 10_000))
    assert elapsed == pytest.approx((total - 50_000) / rate)  # 0.25 s once the burst is spent


@virtual_time
async def test_concurrent_takers_share_the_rate() -> None:
    rate = 1_000_000
    bucket = TokenBucket(rate, burst=20_000, clock=now)
    finished: list[float] = []

    async def taker() -> None:
        for _ in range(5):
            await bucket.take(10_000)
        finished.append(now())

    await asyncio.gather(*(taker() for _ in range(4)))
    assert max(finished) == pytest.approx((4 * 5 * 10_000 - 20_000) / rate)  # 0.18 s


@virtual_time
async def test_a_waiter_goes_on_when_the_rate_is_lifted() -> None:
    """A download held to 1 B/s by an ask that left must not hold the next one for a day."""
    bucket = TokenBucket(1, burst=1, clock=now)
    await bucket.take(1)
    waiter = asyncio.create_task(bucket.take(64 * 1024))  # 18 hours at 1 B/s
    await asyncio.sleep(0.05)
    assert not waiter.done()
    lifted = now()
    bucket.set_rate(0)
    await waiter
    assert now() == lifted


@virtual_time
async def test_a_waiter_takes_the_new_rate_for_what_it_still_lacks() -> None:
    bucket = TokenBucket(10, burst=10, clock=now)
    await bucket.take(10)
    waiter = asyncio.create_task(bucket.take(100_000))  # hours at 10 B/s
    await asyncio.sleep(0.02)
    assert not waiter.done()
    raised = now()
    bucket.set_rate(1_000_000)
    await waiter
    # what it lacked (100 000 bytes less the 0.2 the old rate gave in 0.02 s) at 1 MB/s
    assert now() - raised == pytest.approx((100_000 - 0.2) / 1_000_000)
