"""Heartbeats reach the schedulers that need them: a peer beats the schedulers holding the
partitions of its tasks (``scheduler.<run>.beat``), storage beats every scheduler, so the
work of heartbeats on a scheduler grows with the hosts it schedules, not with the cluster.

Two schedulers, a storage and a peer, each its own process, on the session's nats-server
with the permissions the project ships.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from swarmfly.bus import Bus
from swarmfly.contracts import messages
from swarmfly.ids import task_id as make_task_id
from swarmfly.natsserver import NatsServer
from swarmfly.placement import DEFAULT_PARTITIONS
from swarmfly.testing import Origin
from tests.conftest import FAST_ENV
from tests.integration.test_scale_out import digest_of, fleet, get, wait_for_holders

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]
MiB = 1024 * 1024
HOST_TTL = float(FAST_ENV["SWARMFLY_SCHEDULER_HOST_TTL"])


async def states(bus: Bus) -> list[messages.StateReply]:
    return await bus.gather(messages.STATE, messages.StateRequest(limit=100), wait=2.0, expect=2)


def hosts_of(reply: messages.StateReply) -> set[str]:
    return {host.id for host in reply.hosts}


async def test_a_peer_beats_only_the_schedulers_of_its_tasks(
    nats: NatsServer, prefix: str, bus: Bus, tmp_path: Path
) -> None:
    names = ["sched-a", "sched-b"]
    data = os.urandom(4 * MiB)
    async with (
        fleet(nats.url, prefix, tmp_path) as cluster,
        Origin(rate=64 * MiB).serve() as origin,
    ):
        for name in names:
            cluster.start("scheduler", name, env={"SWARMFLY_SCHEDULER_ID": name})
        holders = await wait_for_holders(
            cluster, lambda h: len(h) == DEFAULT_PARTITIONS and set(h.values()) == set(names), 10
        )
        assert set(holders.values()) == set(names), holders
        cluster.start("storage", "storage", env={"SWARMFLY_STORAGE_HOST_ID": "storage-1"})
        cluster.start("peer", "peer0", env={"SWARMFLY_PEER_HOST_ID": "peer-0"})

        # A peer without tasks beats one scheduler: after a host TTL, the other has
        # forgotten it, while both know the storage host.
        deadline = time.monotonic() + 3 * HOST_TTL + 10
        while True:
            replies = await states(bus)
            known = [hosts_of(r) for r in replies]
            if (
                len(replies) == 2
                and all("storage-1" in k for k in known)
                and sum("peer-0" in k for k in known) == 1
            ):
                break
            assert time.monotonic() < deadline, f"hosts per scheduler: {known}"
            await asyncio.sleep(0.5)

        # With a task, it beats that task's scheduler (and only it): that one lists the
        # peer among the task's peers and among its hosts, the other neither.
        url = origin.add("one.bin", data)
        code, err = await get(url, data, tmp_path / "out.bin", tmp_path / "peer0", *cluster.args)
        assert code == 0, err
        assert (tmp_path / "out.bin").read_bytes() == data
        task = make_task_id(url, digest=digest_of(data))
        deadline = time.monotonic() + 3 * HOST_TTL + 10
        while True:
            replies = await states(bus)
            owner = [r for r in replies if any(t.id == task for t in r.tasks)]
            other = [r for r in replies if not any(t.id == task for t in r.tasks)]
            if (
                len(owner) == 1
                and len(other) == 1
                and "peer-0" in hosts_of(owner[0])
                and "peer-0" not in hosts_of(other[0])
                and all("storage-1" in hosts_of(r) for r in replies)
            ):
                break
            assert time.monotonic() < deadline, (
                f"owner {[hosts_of(r) for r in owner]}, other {[hosts_of(r) for r in other]}"
            )
            await asyncio.sleep(0.5)
        # The peer stays a parent of its task all along: the owner still lists it as one.
        entry = next(t for t in owner[0].tasks if t.id == task)
        assert any(p.host_id == "peer-0" for p in entry.peers), entry

        # And the swarm still works: a second get of the same file is served from the cache.
        code, err = await get(url, data, tmp_path / "again.bin", tmp_path / "peer0", *cluster.args)
        assert code == 0, err
        assert (tmp_path / "again.bin").read_bytes() == data
