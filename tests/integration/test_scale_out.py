"""Scale-out: several schedulers share the task partitions through leases in JetStream KV and
take over a dead one's; several storage instances share the seeding by rendezvous hashing,
and one takes over a task whose seed died, from what the swarm already holds.

Every service is its own process (SIGKILL is a real crash), against the session's real
nats-server.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import nats
import nats.js.errors
import orjson
import pytest

from swarmfly.bus import Bus
from swarmfly.contracts import messages
from swarmfly.ids import task_id as make_task_id
from swarmfly.natsserver import NatsServer
from swarmfly.placement import DEFAULT_PARTITIONS, partition_of, rendezvous
from swarmfly.services.scheduler.ownership import bucket_name
from swarmfly.testing import Origin, ServiceProcess, spawn_service
from tests.conftest import FAST_ENV, swarmfly

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]
MiB = 1024 * 1024
TAKEOVER_LIMIT = 10.0
"""Seconds within which a dead scheduler's partitions must have a new holder."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def digest_of(data: bytes) -> str:
    return f"sha256:{sha256(data)}"


async def get(url: str, data: bytes, output: Path, peer: Path, *args: str) -> tuple[int, str]:
    """`swarmfly get --digest` through the peer service running on ``peer``."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "swarmfly", "get", url, "-O", str(output), "--json",
        "--digest", digest_of(data), "--state-dir", str(peer), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **FAST_ENV},
    )  # fmt: skip
    try:
        _, err = await asyncio.wait_for(process.communicate(), 60)
    except TimeoutError:  # the get must not outlive the test that gave up on it
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, err.decode()


@dataclass
class Fleet:
    nats_url: str
    prefix: str
    root: Path
    started: dict[str, ServiceProcess] = field(default_factory=dict)

    def start(self, kind: str, name: str, *args: str, env: dict[str, str] | None = None) -> None:
        self.started[name] = spawn_service(
            kind, self.nats_url, self.root / name, "--prefix", self.prefix, *args,
            env={**FAST_ENV, **(env or {})},
        )  # fmt: skip

    @property
    def args(self) -> tuple[str, ...]:
        """What `swarmfly get` needs to reach this cluster."""
        return ("--nats", self.nats_url, "--prefix", self.prefix)

    def gets(
        self, peers: list[str], urls: dict[str, str], files: dict[str, bytes]
    ) -> dict[tuple[str, str], asyncio.Task[tuple[int, str]]]:
        """Every file fetched through every peer at once, each into its own output."""
        return {
            (peer, name): asyncio.create_task(
                get(urls[name], data, self.root / "out" / peer / name, self.root / peer, *self.args)
            )
            for peer in peers
            for name, data in files.items()
        }


@asynccontextmanager
async def fleet(nats_url: str, prefix: str, root: Path) -> AsyncIterator[Fleet]:
    running = Fleet(nats_url, prefix, root)
    try:
        yield running
    finally:
        for service in reversed(running.started.values()):
            service.stop()


async def lease_holders(nats_url: str, prefix: str) -> dict[int, str]:
    """Partition -> the id of the scheduler holding its lease, read from the KV bucket."""
    nc = await nats.connect(nats_url, connect_timeout=3, max_reconnect_attempts=0)
    try:
        kv = await nc.jetstream().key_value(bucket_name(prefix))
        holders: dict[int, str] = {}
        for partition in range(DEFAULT_PARTITIONS):
            try:
                entry = await kv.get(f"partition.{partition}")
            except nats.js.errors.KeyNotFoundError:
                continue
            holders[partition] = orjson.loads(entry.value or b"{}")["owner"]
        return holders
    finally:
        await nc.close()


async def wait_for_holders(
    fleet: Fleet, done: Callable[[dict[int, str]], bool], timeout: float
) -> dict[int, str]:
    deadline = time.monotonic() + timeout
    while True:
        holders = await lease_holders(fleet.nats_url, fleet.prefix)
        if done(holders) or time.monotonic() > deadline:
            return holders
        await asyncio.sleep(0.2)


async def task_states(bus: Bus, schedulers: int) -> dict[str, dict[str, int]]:
    """Task id -> {peer id: pieces held}, as the schedulers' ``scheduler.state`` tells it
    (what `swarmfly status --json` reads): each scheduler lists its partitions' tasks."""
    replies = await bus.gather(
        messages.STATE, messages.StateRequest(limit=100), wait=2.0, expect=schedulers
    )
    return {
        task.id: {peer.id: peer.pieces for peer in task.peers}
        for reply in replies
        for task in reply.tasks
    }


async def test_schedulers_share_the_partitions_and_take_over_a_dead_ones(
    nats: NatsServer, prefix: str, bus: Bus, tmp_path: Path
) -> None:
    names = ["sched-a", "sched-b", "sched-c"]
    files = {f"f{n}.bin": os.urandom(12 * MiB) for n in range(4)}
    async with (
        fleet(nats.url, prefix, tmp_path) as cluster,
        Origin(rate=12 * MiB).serve() as origin,
    ):
        for name in names:
            cluster.start("scheduler", name, env={"SWARMFLY_SCHEDULER_ID": name})
        holders = await wait_for_holders(
            cluster, lambda h: len(h) == DEFAULT_PARTITIONS and set(h.values()) == set(names), 10
        )
        assert len(holders) == DEFAULT_PARTITIONS, holders
        assert set(holders.values()) == set(names), "each scheduler holds some partitions"
        # Partitions still settle on their rendezvous homes for a moment after all are held:
        # status must agree with the leases as they stand once they stop moving.
        for _ in range(40):
            code, out, err = await swarmfly("status", "--json", *cluster.args)
            assert code == 0, err
            shown = {s["id"]: s for s in orjson.loads(out)["schedulers"]}
            holders = await lease_holders(cluster.nats_url, cluster.prefix)
            by_lease = {n: sorted(p for p, h in holders.items() if h == n) for n in names}
            if {n: s["partitions"] for n, s in shown.items()} == by_lease:
                break
            await asyncio.sleep(0.25)
        assert set(shown) == set(names), "status shows every scheduler"
        for name, scheduler in shown.items():
            assert scheduler["partitions"] == by_lease[name], (shown, holders)
            assert scheduler["members"] == sorted(names)

        cluster.start("storage", "storage", "--upload-rate", "8MiB")
        peers = ["peer0", "peer1"]
        for peer in peers:
            cluster.start("peer", peer)
        urls = {name: origin.add(name, data) for name, data in files.items()}
        tasks = {n: make_task_id(urls[n], digest=digest_of(d)) for n, d in files.items()}

        jobs = cluster.gets(peers, urls, files)
        # The victim dies mid-transfer: the first file's peers hold some of its 12 pieces.
        for _ in range(300):
            assert not any(job.done() for job in jobs.values()), "downloads ended too soon"
            known = await task_states(bus, len(names))
            # Every file's peers registered (any file may be the victim's), and the first
            # file's hold some pieces.
            everyone = all(len(known.get(task, {})) >= 2 for task in tasks.values())
            if everyone and sum(known.get(tasks["f0.bin"], {}).values()) >= 4:
                break
            await asyncio.sleep(0.05)
        # The victim holds the first file's partition when it dies (partitions still settle
        # on their homes after the first snapshot): downloads it schedules are cut.
        at_kill = await lease_holders(cluster.nats_url, cluster.prefix)
        victim = at_kill[partition_of(tasks["f0.bin"], DEFAULT_PARTITIONS)]
        cluster.started[victim].kill()
        killed = time.monotonic()
        orphans = {p for p, holder in at_kill.items() if holder == victim}
        routed = {n for n, t in tasks.items() if partition_of(t, DEFAULT_PARTITIONS) in orphans}
        assert "f0.bin" in routed, (orphans, victim)
        # Those downloads were under way through the victim: it knew their peers, some of
        # which held pieces, and none had finished.
        assert not any(jobs[peer, name].done() for peer in peers for name in routed)
        held = {tasks[n]: known.get(tasks[n], {}) for n in routed}
        assert all(len(peers_of) >= 2 for peers_of in held.values()), held
        assert sum(held[tasks["f0.bin"]].values()) >= 4, held

        after = await wait_for_holders(
            cluster,
            lambda h: len(h) == DEFAULT_PARTITIONS and victim not in h.values(),
            TAKEOVER_LIMIT + 5,
        )
        took = time.monotonic() - killed
        assert all(after.get(p) not in (None, victim) for p in orphans), after
        assert took <= TAKEOVER_LIMIT, f"the partitions moved after {took:.1f}s"
        assert set(after.values()) == set(names) - {victim}

        # The new holders rebuilt the victim's soft state from the peers: every peer it knew
        # of these tasks re-registered, with at least the pieces it held then.
        def rebuilt(now: dict[str, dict[str, int]]) -> bool:
            return all(
                all(now.get(task, {}).get(peer, -1) >= count for peer, count in peers_of.items())
                for task, peers_of in held.items()
            )

        for _ in range(100):
            now = await task_states(bus, len(names) - 1)
            if rebuilt(now):
                break
            await asyncio.sleep(0.1)
        assert rebuilt(now), (held, {task: now.get(task) for task in held})

        for (peer, name), job in jobs.items():
            code, err = await job
            assert code == 0, err
            output = tmp_path / "out" / peer / name
            assert sha256(output.read_bytes()) == sha256(files[name]), (peer, name)
        # Each file read from the origin once, by the seed or the peers it lent pieces to:
        # nobody restarted from scratch or went back to the origin for what the swarm held.
        # Slack: a piece (1 MiB) per file, read twice if one was in flight from the origin
        # while its scheduler changed.
        total = sum(map(len, files.values()))
        served = origin.bytes_served - origin.probes
        assert served <= total + len(files) * MiB, f"the origin served {served / MiB:.1f} MiB"


def homes_of(tasks: dict[str, str], storages: list[str]) -> dict[str, str]:
    """File name -> the storage instance rendezvous hashing makes its seed."""
    return {name: rendezvous(task, storages)[0] for name, task in tasks.items()}


def seeded_by(root: Path, storage: str, task: str) -> bool:
    return (root / storage / "tasks" / task[:2] / task).is_dir()


async def test_storages_share_the_tasks_and_one_takes_over_a_dead_seed(
    nats: NatsServer, prefix: str, tmp_path: Path
) -> None:
    storages = ["storage-a", "storage-b"]
    small = {f"s{n}.bin": os.urandom(MiB + n) for n in range(6)}
    big = os.urandom(24 * MiB)
    piece = MiB
    async with (
        fleet(nats.url, prefix, tmp_path) as cluster,
        Origin(rate=8 * MiB).serve() as origin,
    ):
        cluster.start("scheduler", "scheduler")
        for name in storages:
            cluster.start("storage", name, "--host-id", name)
        peers = ["peer0", "peer1"]
        for peer in peers:
            cluster.start("peer", peer)

        # Several tasks: each is seeded by its rendezvous home, and both instances are used
        # (six random tasks all homed on one instance, 1 in 32: draw again, a bounded number
        # of times).
        for _ in range(20):
            urls = {name: origin.add(name, data) for name, data in small.items()}
            tasks = {n: make_task_id(urls[n], digest=digest_of(d)) for n, d in small.items()}
            homes = homes_of(tasks, storages)
            if set(homes.values()) == set(storages):
                break
            small = {f"s{n}.bin": os.urandom(MiB + n) for n in range(6)}
        assert set(homes.values()) == set(storages), "these files happen to use one storage"
        results = await asyncio.gather(
            *(get(urls[n], d, tmp_path / "out" / n, tmp_path / "peer0", *cluster.args)
              for n, d in small.items())
        )  # fmt: skip
        for (code, err), name in zip(results, small, strict=True):
            assert code == 0, err
            assert (tmp_path / "out" / name).read_bytes() == small[name]
            home = homes[name]
            other = next(s for s in storages if s != home)
            assert seeded_by(tmp_path, home, tasks[name]), name
            assert not seeded_by(tmp_path, other, tasks[name]), name

        # A big task: its seed dies mid-fetch; the other instance takes over from the swarm.
        origin.bytes_served = 0
        url = origin.add("big.bin", big)
        home = rendezvous(make_task_id(url, digest=digest_of(big)), storages)[0]
        other = next(s for s in storages if s != home)
        jobs = [
            asyncio.create_task(
                get(
                    url,
                    big,
                    tmp_path / "out" / f"big-{peer}",
                    tmp_path / peer,
                    *cluster.args,
                    "--piece-length",
                    str(piece),
                )
            )
            for peer in peers
        ]
        while origin.bytes_served < 12 * MiB:
            assert not any(job.done() for job in jobs), "downloads ended before the crash"
            await asyncio.sleep(0.02)
        cluster.started[home].kill()
        for peer, job in zip(peers, jobs, strict=True):
            code, err = await job
            assert code == 0, err
            assert sha256((tmp_path / "out" / f"big-{peer}").read_bytes()) == sha256(big)
        task = make_task_id(url, digest=digest_of(big))
        assert seeded_by(tmp_path, other, task), "the other storage took the task over"
        # Read twice at most: what the dead seed had in flight from the origin (its origin
        # concurrency, 4 pieces) and a few pieces it had read but not yet handed on.
        bound = len(big) + 8 * piece
        assert origin.bytes_served <= bound, f"origin served {origin.bytes_served / MiB:.1f} MiB"


async def test_peers_learn_the_partition_count_and_a_scheduler_configured_otherwise_follows(
    nats: NatsServer, prefix: str, tmp_path: Path
) -> None:
    """The lease bucket's count wins over a scheduler's ``partitions`` (the default 16 here):
    it is changed online, for all, with `swarmfly scheduler partitions N`."""
    four = {"SWARMFLY_SCHEDULER_PARTITIONS": "4"}
    files = {f"p{n}.bin": os.urandom(MiB + n) for n in range(4)}
    async with fleet(nats.url, prefix, tmp_path) as cluster, Origin().serve() as origin:
        cluster.start("scheduler", "scheduler", env=four)
        cluster.start("scheduler", "other")  # the default 16
        assert "scheduler.partitions = 16 does not apply" in cluster.started["other"].log()
        cluster.start("storage", "storage")
        cluster.start("peer", "peer")  # configured with the default 16 too
        urls = {name: origin.add(name, data) for name, data in files.items()}
        tasks = {n: make_task_id(urls[n], digest=digest_of(d)) for n, d in files.items()}
        assert len({partition_of(t, DEFAULT_PARTITIONS) for t in tasks.values()}) > 1
        results = await asyncio.gather(
            *(get(urls[n], d, tmp_path / "out" / n, tmp_path / "peer", *cluster.args)
              for n, d in files.items())
        )  # fmt: skip
        for (code, err), name in zip(results, files, strict=True):
            assert code == 0, err
            assert (tmp_path / "out" / name).read_bytes() == files[name]
        # Each file read once, by a seed; plus the one-byte checks each reader makes first.
        assert origin.bytes_served <= sum(map(len, files.values())) + 4 * len(files)


async def member_subjects(nats_url: str, prefix: str) -> set[str]:
    """Member keys the lease bucket's stream still stores anything for, markers included
    (``kv.keys()`` hides deleted keys, whose markers pile up all the same)."""
    nc = await nats.connect(nats_url, connect_timeout=3, max_reconnect_attempts=0)
    try:
        bucket = bucket_name(prefix)
        info = await nc.jetstream().stream_info(
            f"KV_{bucket}", subjects_filter=f"$KV.{bucket}.member.>"
        )
        return {s.removeprefix(f"$KV.{bucket}.") for s in info.state.subjects or {}}
    finally:
        await nc.close()


async def test_no_member_keys_of_gone_schedulers_stay_in_the_bucket(
    nats: NatsServer, prefix: str, tmp_path: Path
) -> None:
    """Each scheduler run under a new id (a new pod) writes a member key; one that crashed
    left its value, one that stopped cleanly a delete marker. The first live scheduler purges
    both once they are ten leases old, with the permissions the chart grants."""
    quick = {"SWARMFLY_SCHEDULER_LEASE": "1.5", "SWARMFLY_SCHEDULER_RENEW_INTERVAL": "0.5"}
    async with fleet(nats.url, prefix, tmp_path) as cluster:
        for name in ("sched-a", "sched-b", "sched-c"):
            cluster.start("scheduler", name, env={**quick, "SWARMFLY_SCHEDULER_ID": name})
        for _ in range(50):
            if len(await member_subjects(nats.url, prefix)) == 3:
                break
            await asyncio.sleep(0.2)
        assert await member_subjects(nats.url, prefix) == {
            "member.sched-a", "member.sched-b", "member.sched-c"
        }  # fmt: skip
        cluster.started["sched-b"].kill()
        assert cluster.started["sched-c"].stop() == 0
        await asyncio.sleep(1.0)
        assert await member_subjects(nats.url, prefix) == {
            "member.sched-a", "member.sched-b", "member.sched-c"
        }, "kept while they might come back"  # fmt: skip
        deadline = time.monotonic() + 10 * 1.5 + 10
        while time.monotonic() < deadline:
            if await member_subjects(nats.url, prefix) == {"member.sched-a"}:
                break
            await asyncio.sleep(0.5)
        assert await member_subjects(nats.url, prefix) == {"member.sched-a"}
        assert "removed member.sched-b" in cluster.started["sched-a"].log()
        holders = await lease_holders(nats.url, prefix)
        assert set(holders.values()) == {"sched-a"}, "the survivor serves every partition"


async def test_preheat_lands_on_each_tasks_home_so_gets_read_no_origin(
    nats: NatsServer, prefix: str, tmp_path: Path
) -> None:
    """With three storage instances, ``storage.preheat`` reaches any one of them; each file
    must end up cached on its home (the instance the scheduler asks to seed it), or the home
    reads the origin again when the first host asks."""
    storages = ["storage-a", "storage-b", "storage-c"]
    files = {f"h{n}.bin": os.urandom(MiB + n) for n in range(6)}
    async with fleet(nats.url, prefix, tmp_path) as cluster, Origin().serve() as origin:
        cluster.start("scheduler", "scheduler")
        for name in storages:
            cluster.start("storage", name, "--host-id", name)
        cluster.start("peer", "peer")
        urls = {name: origin.add(name, data) for name, data in files.items()}
        tasks = {n: make_task_id(urls[n], digest=digest_of(d)) for n, d in files.items()}
        homes = homes_of(tasks, storages)
        for name, data in files.items():
            code, _, err = await swarmfly(
                "preheat", "url", urls[name], "--digest", digest_of(data), *cluster.args,
                "--state-dir", str(tmp_path / "cli"),
            )  # fmt: skip
            assert code == 0, err
        for name in files:
            assert seeded_by(tmp_path, homes[name], tasks[name]), (name, homes[name])
        cluster.started["scheduler"].stop()  # its soft state goes; the storages' caches stay
        cluster.start("scheduler", "scheduler-2")
        preheated = dict(origin.content_served)
        for name, data in files.items():
            code, err = await get(
                urls[name], data, tmp_path / "out" / name, tmp_path / "peer", *cluster.args
            )
            assert code == 0, err
            assert (tmp_path / "out" / name).read_bytes() == data
        assert dict(origin.content_served) == preheated, "no content read again, only probes"


async def test_preheated_replicas_keep_a_task_cached_when_its_home_is_killed(
    nats: NatsServer, prefix: str, tmp_path: Path
) -> None:
    """``[storage] copies = 2``: the home reads each file once, the next instance in order
    takes it from the home; with the home killed, every get is served from the replica."""
    storages = ["storage-a", "storage-b", "storage-c"]
    files = {f"r{n}.bin": os.urandom(2 * MiB + n) for n in range(6)}
    copies = {"SWARMFLY_STORAGE_COPIES": "2"}
    async with fleet(nats.url, prefix, tmp_path) as cluster, Origin().serve() as origin:
        cluster.start("scheduler", "scheduler")
        for name in storages:
            cluster.start("storage", name, "--host-id", name, env=copies)
        cluster.start("peer", "peer")
        urls = {name: origin.add(name, data) for name, data in files.items()}
        tasks = {n: make_task_id(urls[n], digest=digest_of(d)) for n, d in files.items()}
        orders = {name: rendezvous(task, storages) for name, task in tasks.items()}
        for name, data in files.items():
            code, _, err = await swarmfly(
                "preheat", "url", urls[name], "--digest", digest_of(data), *cluster.args,
                "--state-dir", str(tmp_path / "cli"),
            )  # fmt: skip
            assert code == 0, err
            for holder in orders[name][:2]:
                assert seeded_by(tmp_path, holder, tasks[name]), (name, holder)
            assert not seeded_by(tmp_path, orders[name][2], tasks[name]), "two copies only"
        code, out, err = await swarmfly("status", "--json", *cluster.args)
        assert code == 0, err
        shown = {t["id"]: t for t in orjson.loads(out)["tasks"]}
        for name, task in tasks.items():
            assert (shown[task]["home"], shown[task]["replicas"]) == (
                orders[name][0],
                orders[name][1:2],
            ), "status shows each task's home and replica"
        read = origin.bytes_served
        # Once each, and the one-byte access checks of the instances that took part.
        assert read <= sum(map(len, files.values())) + 3 * len(files), "replicas read the swarm"
        gone = max(storages, key=lambda s: sum(o[0] == s for o in orders.values()))
        cluster.started[gone].kill()
        for name, data in files.items():
            code, err = await get(
                urls[name], data, tmp_path / "out" / name, tmp_path / "peer", *cluster.args
            )
            assert code == 0, err
            assert (tmp_path / "out" / name).read_bytes() == data
        assert origin.bytes_served - read <= 2 * len(files), "the replicas served every file"


async def test_fleets_grow_and_shrink_while_downloads_run(
    nats: NatsServer, prefix: str, tmp_path: Path
) -> None:
    """While two peers download six files, a storage instance and a scheduler join and
    another of each stops (SIGTERM): every download completes with the right bytes, and the
    origin serves each file about once (the leaving seed finishes its reads and serves on a
    while, for children to take what only it holds; the instance that takes its tasks over
    reads what they did not)."""
    files = {f"g{n}.bin": os.urandom(16 * MiB + n) for n in range(6)}
    async with (
        fleet(nats.url, prefix, tmp_path) as cluster,
        Origin(rate=12 * MiB).serve() as origin,
    ):
        for name in ("sched-a", "sched-b"):
            cluster.start("scheduler", name, env={"SWARMFLY_SCHEDULER_ID": name})
        for name in ("storage-a", "storage-b", "storage-c"):
            cluster.start("storage", name, "--host-id", name)
        peers = ["peer0", "peer1"]
        for peer in peers:
            cluster.start("peer", peer)
        urls = {name: origin.add(name, data) for name, data in files.items()}
        jobs = cluster.gets(peers, urls, files)
        while origin.bytes_served < 16 * MiB:  # under way: every storage instance seeds
            assert not any(job.done() for job in jobs.values()), "downloads ended too soon"
            await asyncio.sleep(0.05)
        # Slower while the fleets change: at full rate the downloads could all end while the
        # leaving seed hands over (measured: within a second of it), and nobody would be
        # downloading as the scheduler goes.
        origin.set_rate(3 * MiB)
        # In threads: the origin serves from this event loop meanwhile.
        await asyncio.to_thread(cluster.start, "storage", "storage-d", "--host-id", "storage-d")
        sched_c = {"SWARMFLY_SCHEDULER_ID": "sched-c"}
        await asyncio.to_thread(cluster.start, "scheduler", "sched-c", env=sched_c)
        # One change at a time: the partitions settle on the three schedulers (and the
        # hosts re-announce to their new holders, within a heartbeat) before anyone leaves.
        await wait_for_holders(cluster, lambda h: "sched-c" in h.values(), 10)
        await asyncio.sleep(2 * float(FAST_ENV["SWARMFLY_SCHEDULER_HEARTBEAT_INTERVAL"]))
        assert not any(job.done() for job in jobs.values()), "downloads ended too soon"
        assert await asyncio.to_thread(cluster.started["storage-a"].stop, 20) == 0
        assert not all(job.done() for job in jobs.values()), "none runs as the scheduler goes"
        assert await asyncio.to_thread(cluster.started["sched-a"].stop) == 0
        origin.set_rate(12 * MiB)
        for (peer, name), job in jobs.items():
            code, err = await job
            assert code == 0, err
            output = tmp_path / "out" / peer / name
            assert sha256(output.read_bytes()) == sha256(files[name]), (peer, name)
        total = sum(map(len, files.values()))
        served = origin.bytes_served - origin.probes
        # Measured 1.000 in 7 of 7 runs: what the leaving seed read went to the children
        # (its hand-over), the instance taking its tasks over read only the rest.
        twice = sorted(
            (name, start // MiB) for (name, start), n in origin.ranges_asked.items() if n > 1
        )
        assert served <= 1.05 * total, f"the origin served {served / total:.3f}x the files; {twice}"
        for name, data in files.items():  # and each about once: a piece more at the most
            assert origin.content_served[name] <= len(data) + MiB, (name, twice)
