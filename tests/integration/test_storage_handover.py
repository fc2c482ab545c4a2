"""A storage instance that stops (SIGTERM) hands its cached tasks over first (issue 19): the
tasks' next homes take them from it through the swarm, verified, so nobody reads the origin
for them again; a hand-over that does not match the task is refused with nothing cached.

Every service is its own process, against the session's real nats-server with JetStream and
the permissions swarmfly ships; a real HTTP origin counts what it serves.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import time
from pathlib import Path

import pytest

from swarmfly.bus import Bus
from swarmfly.contracts import messages
from swarmfly.errors import SwarmflyError
from swarmfly.ids import task_id as make_task_id
from swarmfly.lifecycle import DRAIN_SECONDS
from swarmfly.natsserver import NatsServer
from swarmfly.placement import rendezvous
from swarmfly.testing import Origin
from tests.conftest import swarmfly
from tests.integration.test_integrity import cached, settled
from tests.integration.test_scale_out import digest_of, fleet, get, homes_of, seeded_by, sha256

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]
MiB = 1024 * 1024
STORAGES = ["storage-a", "storage-b", "storage-c"]


def draw(
    origin: Origin, stem: str, size: int, count: int
) -> tuple[dict[str, bytes], dict[str, str]]:
    """``count`` random files served by ``origin``, and their URLs."""
    files = {f"{stem}{n}.bin": os.urandom(size + n) for n in range(count)}
    return files, {name: origin.add(name, data) for name, data in files.items()}


async def preheat(url: str, data: bytes, args: tuple[str, ...], cli: Path) -> None:
    code, _, err = await swarmfly(
        "preheat", "url", url, "--digest", digest_of(data), *args, "--state-dir", str(cli)
    )  # fmt: skip
    assert code == 0, err


async def test_a_stopping_storage_hands_its_tasks_to_their_next_homes(
    nats: NatsServer, prefix: str, tmp_path: Path
) -> None:
    """Three instances, each the home of some preheated files; one is stopped while a peer
    downloads a big file it seeds. After it exits, the files it was home to are cached,
    byte for byte, on their new homes; a fresh peer gets every file without the origin
    serving any of them again; the download under way completes with the right bytes."""
    async with (
        fleet(nats.url, prefix, tmp_path) as cluster,
        Origin(rate=64 * MiB).serve() as origin,
    ):
        cluster.start("scheduler", "scheduler")
        for name in STORAGES:
            cluster.start("storage", name, "--host-id", name)
        cluster.start("peer", "peer0")
        # Files that every instance is home to, the leaving one to at least two of them
        # (redrawn a bounded number of times: one in a few draws misses).
        for _ in range(20):
            files, urls = draw(origin, "h", 2 * MiB, 8)
            tasks = {n: make_task_id(urls[n], digest=digest_of(d)) for n, d in files.items()}
            homes = homes_of(tasks, STORAGES)
            if (
                set(homes.values()) == set(STORAGES)
                and list(homes.values()).count(STORAGES[0]) >= 2
            ):
                break
        else:
            pytest.fail("no draw made every instance a home")
        gone = STORAGES[0]
        stay = STORAGES[1:]
        moved = [name for name, home in homes.items() if home == gone]
        for name, data in files.items():
            await preheat(urls[name], data, cluster.args, tmp_path / "cli")
            assert seeded_by(tmp_path, homes[name], tasks[name]), name
        for name in moved:
            assert not any(seeded_by(tmp_path, s, tasks[name]) for s in stay), "one copy only"

        # A big file the leaving instance seeds, read slowly: under way when it stops.
        for n in range(20):
            big_name = f"big{n}.bin"
            big = os.urandom(24 * MiB + n)
            big_url = origin.add(big_name, big)
            if rendezvous(make_task_id(big_url, digest=digest_of(big)), STORAGES)[0] == gone:
                break
        else:
            pytest.fail("no big file homed on the leaving instance")
        origin.set_rate(6 * MiB)
        running = asyncio.create_task(
            get(big_url, big, tmp_path / "out" / "big", tmp_path / "peer0", *cluster.args)
        )
        for _ in range(400):
            if origin.content_served[big_name] >= 4 * MiB:
                break
            assert not running.done(), await running
            await asyncio.sleep(0.05)
        preheated = {name: origin.content_served[name] for name in files}
        assert not running.done(), "the download ended before the instance stopped"

        assert await asyncio.to_thread(cluster.started[gone].stop, 60) == 0
        log = cluster.started[gone].log()
        assert f"handed {len(moved)} cached tasks over ({len(moved)} homed here)" in log, log[
            -3000:
        ]
        for name in moved:  # taken from the leaving instance, verified, by the new home
            new_home = rendezvous(tasks[name], stay)[0]
            assert await settled(tmp_path / new_home, tasks[name], files[name]) == files[name], (
                name,
                new_home,
            )
        origin.set_rate(64 * MiB)
        code, err = await running
        assert code == 0, err
        assert sha256((tmp_path / "out" / "big").read_bytes()) == sha256(big)

        cluster.start("peer", "fresh")
        for name, data in files.items():
            code, err = await get(
                urls[name], data, tmp_path / "out" / name, tmp_path / "fresh", *cluster.args
            )
            assert code == 0, err
            assert (tmp_path / "out" / name).read_bytes() == data
        served = {name: origin.content_served[name] for name in files}
        assert served == preheated, "no file was read from the origin again, only probed"


async def fill(bus: Bus, host: str, request: messages.FillRequest) -> messages.PreheatReply:
    return await bus.request(messages.FILL, request, timeout=30.0, host_id=host)


async def test_a_hand_over_that_does_not_match_the_task_is_refused(
    nats: NatsServer, prefix: str, bus: Bus, tmp_path: Path
) -> None:
    """Hand-overs are only asks: the receiver checks the task against its scheduler and its
    own look at the origin before any piece moves, and caches nothing it refused. A genuine
    one is taken from the swarm, not the origin."""
    async with fleet(nats.url, prefix, tmp_path) as cluster, Origin().serve() as origin:
        cluster.start("scheduler", "scheduler")
        for name in STORAGES[:2]:
            cluster.start("storage", name, "--host-id", name)
        data, other = os.urandom(3 * MiB), os.urandom(2 * MiB)
        url, other_url = origin.add("a.bin", data), origin.add("b.bin", other)
        digest = digest_of(data)
        task = make_task_id(url, digest=digest)
        home = rendezvous(task, STORAGES[:2])[0]
        taker = next(s for s in STORAGES[:2] if s != home)
        await preheat(url, data, cluster.args, tmp_path / "cli")
        assert await settled(tmp_path / home, task, data) == data
        served = dict(origin.content_served)

        def forged(source: messages.Source, task_id: str = task) -> messages.FillRequest:
            return messages.FillRequest(source, timeout_s=20, replica=True, task_id=task_id)

        # Another URL's content under the task's id: the origin's length is not the task's.
        with pytest.raises(SwarmflyError, match="origin has 2097152 bytes") as refused:
            await fill(bus, taker, forged(messages.Source(other_url)))
        assert refused.value.code == "integrity"
        # The task's URL, but a digest that is not its content's.
        wrong = f"sha256:{sha256(other)}"
        with pytest.raises(SwarmflyError, match="digest is not the task's") as refused:
            await fill(bus, taker, forged(messages.Source(url, digest=wrong)))
        assert refused.value.code == "integrity"
        # A task nobody holds: nothing to take (and nothing read from the origin for it).
        nobody = hashlib.sha256(b"no such task").hexdigest()
        with pytest.raises(SwarmflyError, match="knows no content") as refused:
            await fill(bus, taker, forged(messages.Source(url, digest=digest), nobody))
        assert refused.value.code == "not_found"
        for task_id in (task, nobody):
            assert not seeded_by(tmp_path, taker, task_id), "nothing cached for a refusal"
        assert dict(origin.content_served) == served, "no refused hand-over read the origin"

        # The genuine hand-over: from the home, through the swarm, verified.
        reply = await fill(bus, taker, forged(messages.Source(url, digest=digest)))
        assert (reply.host_id, reply.task_id, reply.bytes_origin) == (taker, task, 0)
        assert reply.bytes_p2p == len(data) and reply.digest == digest
        assert await settled(tmp_path / taker, task, data) == data
        # Asked again, it holds the task: answered at once, nothing moves.
        again = await fill(bus, taker, forged(messages.Source(url, digest=digest)))
        assert (again.bytes_p2p, again.bytes_origin) == (0, 0)
        assert dict(origin.content_served) == served, "nothing read from the origin"


async def test_what_cannot_be_handed_over_in_time_is_counted_and_left(
    nats: NatsServer, prefix: str, tmp_path: Path
) -> None:
    """``[storage] handover_timeout`` bounds the hand-over: an instance whose uplink is too
    slow to give its task in time stops within the bound, says how many tasks it left, and
    the instance that was taking the task does not read the rest from the origin."""
    quick = {"SWARMFLY_STORAGE_HANDOVER_TIMEOUT": "2"}
    pair = STORAGES[:2]
    async with fleet(nats.url, prefix, tmp_path) as cluster, Origin().serve() as origin:
        cluster.start("scheduler", "scheduler")
        for n in range(20):
            data = os.urandom(12 * MiB + n)
            url = origin.add("slow.bin", data)
            task = make_task_id(url, digest=digest_of(data))
            if rendezvous(task, pair)[0] == pair[0]:
                break
        else:
            pytest.fail("no file homed on the first instance")
        cluster.start("storage", pair[0], "--host-id", pair[0], "--upload-rate", "1MiB", env=quick)
        cluster.start("storage", pair[1], "--host-id", pair[1])
        await preheat(url, data, cluster.args, tmp_path / "cli")
        served = origin.content_served["slow.bin"]
        assert served == len(data)

        started = time.monotonic()
        assert await asyncio.to_thread(cluster.started[pair[0]].stop, 30) == 0
        took = time.monotonic() - started
        assert took < 2 + DRAIN_SECONDS, f"stopped after {took:.1f}s"
        log = cluster.started[pair[0]].log()
        expected = "handed 0 of 1 cached tasks over (1 homed here); 0 failed, 1 not done within 2s"
        assert expected in log, log[-3000:]
        await asyncio.sleep(3.0)  # what the taker would read from the origin, it reads by now
        assert not seeded_by(tmp_path, pair[1], task) or cached(tmp_path / pair[1], task) is None
        assert origin.content_served["slow.bin"] == served, "the taker read the origin"


async def test_two_instances_stopping_at_once_hand_their_tasks_to_the_one_that_stays(
    nats: NatsServer, prefix: str, tmp_path: Path
) -> None:
    """A scale-down by two: each stopping instance refuses the other's hand-overs, which go
    on to the next in line, the one that stays; a fresh peer then reads no file's content
    from the origin again."""
    async with fleet(nats.url, prefix, tmp_path) as cluster, Origin().serve() as origin:
        cluster.start("scheduler", "scheduler")
        for name in STORAGES:
            cluster.start("storage", name, "--host-id", name)
        gone, stays = STORAGES[:2], STORAGES[2]
        # Some task's home and next in line both stop (redrawn a bounded number of times).
        for _ in range(20):
            files, urls = draw(origin, "t", MiB, 6)
            tasks = {n: make_task_id(urls[n], digest=digest_of(d)) for n, d in files.items()}
            passed = {
                name: order[:2]
                for name, task in tasks.items()
                if set((order := rendezvous(task, STORAGES))[:2]) == set(gone)
            }
            if passed:
                break
        else:
            pytest.fail("no task had both stopping instances first")
        for name, data in files.items():
            await preheat(urls[name], data, cluster.args, tmp_path / "cli")
        preheated = {name: origin.content_served[name] for name in files}
        for name in gone:
            cluster.started[name].process.send_signal(signal.SIGTERM)
        for name in gone:
            assert await asyncio.to_thread(cluster.started[name].process.wait, 60) == 0
        for name, data in files.items():
            assert await settled(tmp_path / stays, tasks[name], data) == data, name
        for name, (home, next_in_line) in passed.items():
            refused = f"hand-over of task {tasks[name][:12]} to {next_in_line}: unavailable"
            assert refused in cluster.started[home].log(), name
        cluster.start("peer", "fresh")
        for name, data in files.items():
            code, err = await get(
                urls[name], data, tmp_path / "out" / name, tmp_path / "fresh", *cluster.args
            )
            assert code == 0, err
            assert (tmp_path / "out" / name).read_bytes() == data
        assert {name: origin.content_served[name] for name in files} == preheated
