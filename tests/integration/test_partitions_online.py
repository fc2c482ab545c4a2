"""The scheduler partition count changes online (`swarmfly scheduler partitions N`): two
schedulers hand their leases over to the new count while downloads run, and the peers
register their tasks again with the new holders, as when a partition moves.

Every service is its own process, against the session's real nats-server with JetStream.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import nats
import orjson
import pytest

from swarmfly.bus import Bus
from swarmfly.contracts import messages
from swarmfly.natsserver import NatsServer
from swarmfly.services.scheduler.leases import CONFIG_KEY
from swarmfly.services.scheduler.ownership import bucket_name
from swarmfly.testing import Origin, role_settings
from tests.conftest import FAST_ENV, swarmfly
from tests.integration.test_scale_out import MiB, fleet, sha256

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]
SETTLE_LIMIT = 20.0
"""Seconds within which every partition of a new count has exactly one holder."""


async def layouts(bus: Bus) -> list[messages.SchedulerState]:
    """What each scheduler says it serves (``scheduler.state``), both of them answering."""
    replies = await bus.gather(messages.STATE, messages.StateRequest(limit=1), wait=2.0, expect=2)
    return [reply.scheduler for reply in replies if reply.scheduler is not None]


def owned_once(states: list[messages.SchedulerState], count: int, generation: int) -> bool:
    """Both schedulers partition by ``count`` of ``generation``, and each partition is
    served by exactly one of them."""
    if len(states) != 2 or any(
        (s.partition_count, s.generation) != (count, generation) for s in states
    ):
        return False
    served = sorted(p for s in states for p in s.partitions)
    return served == list(range(count))


async def settle(bus: Bus, count: int, generation: int) -> list[messages.SchedulerState]:
    deadline = time.monotonic() + SETTLE_LIMIT
    while True:
        states = await layouts(bus)
        if owned_once(states, count, generation) or time.monotonic() > deadline:
            return states
        await asyncio.sleep(0.2)


async def bucket_layout(nats_url: str, prefix: str) -> dict[str, int]:
    nc = await nats.connect(nats_url, connect_timeout=3, max_reconnect_attempts=0)
    try:
        kv = await nc.jetstream().key_value(bucket_name(prefix))
        entry = await kv.get(CONFIG_KEY)
        layout: dict[str, int] = orjson.loads(entry.value or b"{}")
        return layout
    finally:
        await nc.close()


async def test_the_partition_count_changes_up_and_down_while_downloads_run(
    nats: NatsServer, prefix: str, bus: Bus, tmp_path: Path
) -> None:
    """While two peers download four files from two storage instances, the count goes from
    16 to 32 and then to 5: every download completes with the right bytes, the origin serves
    each file about once, and after each change each partition has exactly one holder."""
    files = {f"c{n}.bin": os.urandom(16 * MiB + n) for n in range(4)}
    as_scheduler = role_settings(nats.url, "scheduler")  # the role allowed to write the bucket
    async with (
        fleet(nats.url, prefix, tmp_path) as cluster,
        Origin(rate=8 * MiB).serve() as origin,
    ):
        for name in ("sched-a", "sched-b"):
            cluster.start("scheduler", name, env={"SWARMFLY_SCHEDULER_ID": name})
        for name in ("storage-a", "storage-b"):
            cluster.start("storage", name, "--host-id", name)
        peers = ["peer0", "peer1"]
        for peer in peers:
            cluster.start("peer", peer)
        states = await settle(bus, 16, 0)
        assert owned_once(states, 16, 0), states
        urls = {name: origin.add(name, data) for name, data in files.items()}
        jobs = cluster.gets(peers, urls, files)
        while origin.bytes_served < 8 * MiB:  # under way
            assert not any(job.done() for job in jobs.values()), "downloads ended too soon"
            await asyncio.sleep(0.05)
        origin.set_rate(3 * MiB)  # so that the downloads outlast both changes
        heartbeat = float(FAST_ENV["SWARMFLY_SCHEDULER_HEARTBEAT_INTERVAL"])
        for count, generation, was in ((32, 1, 16), (5, 2, 32)):
            code, out, err = await swarmfly(
                "scheduler", "partitions", str(count), *cluster.args, env=as_scheduler
            )
            assert code == 0, err
            assert f"partitions from {was} to {count} (generation {generation})" in out
            states = await settle(bus, count, generation)
            assert owned_once(states, count, generation), states
            await asyncio.sleep(2 * heartbeat)  # the hosts register with the new holders
            assert not all(job.done() for job in jobs.values()), "none ran as it changed"
        origin.set_rate(12 * MiB)
        for (peer, name), job in jobs.items():
            code, err = await job
            assert code == 0, err
            output = tmp_path / "out" / peer / name
            assert sha256(output.read_bytes()) == sha256(files[name]), (peer, name)
        for name, data in files.items():  # each about once: a piece more at the most
            assert origin.content_served[name] <= len(data) + MiB, (name, origin.content_served)
        states = await layouts(bus)
        assert owned_once(states, 5, 2), states
        assert await bucket_layout(nats.url, prefix) == {"partitions": 5, "generation": 2}
        for log in (cluster.started[n].log() for n in ("sched-a", "sched-b")):
            assert "partitions: 32 -> 5 (generation 2)" in log
        code, out, err = await swarmfly("status", *cluster.args)
        assert code == 0, err
        assert "SCHEDULERS (5 partitions, generation 2)" in out, out


async def test_a_bad_count_is_refused_and_the_same_count_changes_nothing(
    nats: NatsServer, prefix: str, tmp_path: Path
) -> None:
    args = ("--nats", nats.url, "--prefix", prefix)
    as_scheduler = role_settings(nats.url, "scheduler")
    for bad in ("0", "4097", "many"):
        code, _, err = await swarmfly("scheduler", "partitions", bad, *args, env=as_scheduler)
        assert code == 2 and ("give 1 to 4096" in err or "whole number" in err), err
    async with fleet(nats.url, prefix, tmp_path) as cluster:
        cluster.start("scheduler", "sched-a", env={"SWARMFLY_SCHEDULER_PARTITIONS": "8"})
        code, out, err = await swarmfly("scheduler", "partitions", "8", *args, env=as_scheduler)
        assert code == 0, err
        assert "use 8 partitions already (generation 0)" in out
        code, out, err = await swarmfly(
            "scheduler", "partitions", "4", "--json", *args, env=as_scheduler
        )
        assert code == 0, err
        assert orjson.loads(out) == {"ok": True, "before": 8, "partitions": 4, "generation": 1}
