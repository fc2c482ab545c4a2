"""Acceptance of the core: real nats-server, real services in their own processes, a real
HTTP origin that counts what it serves, downloads started with `swarmfly get`."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from swarmfly import ids
from swarmfly.bus import Bus
from swarmfly.contracts import Sender, messages
from swarmfly.natsserver import NatsServer
from swarmfly.placement import DEFAULT_PARTITIONS, partition_of
from swarmfly.testing import Origin, ServiceProcess, metric_value, spawn_service
from tests.conftest import FAST_ENV

MiB = 1024 * 1024
pytestmark = pytest.mark.slow
LEND_SOLE = {"SWARMFLY_STORAGE_LEND_SOLE": "true"}
"""The storage lends a sole child the whole file (the default, said outright)."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def get(url: str, output: Path, state_dir: Path, *args: str) -> dict[str, Any]:
    """`swarmfly get --json` through the peer service that owns ``state_dir``."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "swarmfly", "get", url, "-O", str(output), "--json",
        "--state-dir", str(state_dir), *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **FAST_ENV},
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), 180)
    if process.returncode != 0:
        return {"exit": process.returncode, "error": stderr.decode()}
    summary: dict[str, Any] = orjson.loads(stdout)
    summary["exit"] = 0
    return summary


class Cluster:
    """Scheduler, storage and peers as separate processes on one nats-server."""

    def __init__(self, nats: NatsServer, prefix: str, root: Path, stack: ExitStack) -> None:
        self.nats, self.prefix, self.root, self.stack = nats, prefix, root, stack
        self.peers: list[ServiceProcess] = []

    def spawn(
        self, kind: str, name: str, *args: str, env: dict[str, str] | None = None
    ) -> ServiceProcess:
        service = spawn_service(
            kind, self.nats.url, self.root / name, "--prefix", self.prefix, *args,
            env={**FAST_ENV, **(env or {})},
        )  # fmt: skip
        self.stack.callback(service.stop)
        return service

    def start(
        self, peers: int, seed_rate: str | None = None, storage_env: dict[str, str] | None = None
    ) -> None:
        self.scheduler = self.spawn("scheduler", "scheduler")
        self.storage = self.spawn(
            "storage", "storage", *(["--upload-rate", seed_rate] if seed_rate else []),
            env=storage_env,
        )  # fmt: skip
        for i in range(peers):
            self.peers.append(self.spawn("peer", f"peer{i}"))

    def peer_dir(self, i: int) -> Path:
        return self.root / f"peer{i}"

    def get_args(self) -> tuple[str, ...]:
        return ("--nats", self.nats.url, "--prefix", self.prefix)

    async def metric(self, service: ServiceProcess, name: str) -> float:
        return await metric_value(service.url, name)

    async def seeded(self) -> None:
        """Wait until every source of every task succeeded: the storage holds its copy (taken
        after the get from the sole child it lent the file to)."""
        for _ in range(100):
            state = await self.state()
            seeds = [p for t in state["tasks"] for p in t["peers"] if p["source"]]
            if seeds and all(p["state"] == "succeeded" for p in seeds):
                return
            await asyncio.sleep(0.2)
        raise AssertionError(f"the storage did not take its copy: {state}")

    async def state(self) -> dict[str, Any]:
        url, auth = f"{self.scheduler.url}/api/state", self.scheduler.api_auth()
        async with aiohttp.ClientSession() as session, session.get(url, headers=auth) as response:
            data: dict[str, Any] = await response.json()
            return data


async def test_five_peers_share_a_64mib_file(cluster: Cluster, tmp_path: Path) -> None:
    data = os.urandom(64 * MiB)
    async with Origin().serve() as origin:
        url = origin.add("big.bin", data)
        cluster.start(peers=5, seed_rate="16MiB")
        outputs = [tmp_path / f"out{i}.bin" for i in range(5)]
        results = await asyncio.gather(
            *(get(url, outputs[i], cluster.peer_dir(i), *cluster.get_args()) for i in range(5))
        )
        for result in results:
            assert result["exit"] == 0, result
            assert result["via"] == "peer"
        for output in outputs:
            assert sha256(output.read_bytes()) == sha256(data)
        assert origin.bytes_served <= 1.05 * len(data)
        received = sum(r["bytes_p2p"] + r["bytes_origin"] for r in results)
        assert received == 5 * len(data)
        from_seed = await cluster.metric(cluster.storage, "swarmfly_peer_upload_bytes_total")
        from_peers = sum(r["bytes_p2p"] for r in results) - from_seed
        assert from_peers >= 0.3 * received, (from_peers, from_seed, results)


@pytest.mark.parametrize(
    "restart", ["", "clean", "tampered"], ids=["running", "restarted", "tampered"]
)
async def test_a_sole_child_reads_the_origin_and_the_storage_takes_its_copy_after(
    cluster: Cluster, tmp_path: Path, restart: str
) -> None:
    """The task's only child, with the file's digest, is lent the whole file by its seed (an
    uplink with no limit, ``lend_sole`` on): it reads the origin itself; the storage then
    takes its copy from it, proves it by the whole file's digest alone, and serves the next
    host, hashing each piece only then: the origin is read once. Restarted in between, the
    storage proves its copy again by the whole file before it serves any of it; a byte of it
    changed while it was down, the whole file fails, and what only it proved is read again:
    the next host still gets the origin's bytes."""
    data = os.urandom(24 * MiB)
    digest = f"sha256:{sha256(data)}"
    # Paced, so the seed is still at its first pieces when its child first asks.
    async with Origin(rate=16 * MiB).serve() as origin:
        url = origin.add("sole.bin", data)
        cluster.start(peers=2, storage_env=LEND_SOLE)
        first = await get(url, tmp_path / "a.bin", cluster.peer_dir(0), "--digest", digest,
                          *cluster.get_args())  # fmt: skip
        assert first["exit"] == 0, first
        assert first["bytes_origin"] >= len(data) // 2, first  # lent: read here
        # The storage takes what it lent back from the first host, then the second host's
        # get comes from the swarm with the first one gone: from the storage alone.
        await cluster.seeded()
        cluster.peers[0].stop()
        hashed_for_a_child = "a child wants it; hashing the"
        assert hashed_for_a_child not in cluster.storage.log(), "nobody wanted the pieces yet"
        if restart:
            assert cluster.storage.stop() == 0
            if restart == "tampered":  # bit rot, or a user, while the storage is down
                held = next((cluster.root / "storage").rglob(f"{first['task_id']}/data"))
                with open(held, "r+b") as handle:
                    handle.seek(5 * MiB + 3)
                    byte = handle.read(1)
                    handle.seek(5 * MiB + 3)
                    handle.write(bytes([byte[0] ^ 0xFF]))
            cluster.storage = cluster.spawn("storage", "storage", env=LEND_SOLE)
        second = await get(url, tmp_path / "b.bin", cluster.peer_dir(1), "--digest", digest,
                           *cluster.get_args())  # fmt: skip
        assert second["exit"] == 0, second
        assert (tmp_path / "b.bin").read_bytes() == data
        storage_log = cluster.storage.log()
        if restart == "tampered":
            # Only what failed is read again; what still matched its own digest, the
            # scheduler hears of again from the restarted storage, and serves the next host.
            dropped = re.search(r"(\d+) pieces failed re-verification and are dropped", storage_log)
            assert dropped, storage_log
            again = int(dropped[1]) * MiB
            assert origin.content_served["sole.bin"] == len(data) + again
            assert second["bytes_p2p"] >= len(data) - again, second
            return
        assert second["bytes_p2p"] == len(data) and second["bytes_origin"] == 0, second
        assert origin.content_served["sole.bin"] == len(data), "the origin was read once"
        # Pieces taken with no digest known are said to be held once proven, never before.
        assert "piece report refused" not in storage_log
        if restart:  # the load's whole-file pass gave every piece its digest
            assert "failed re-verification" not in storage_log
            assert hashed_for_a_child not in storage_log
        else:
            assert hashed_for_a_child in storage_log


async def test_a_storage_lost_before_anyone_asked_is_replaced_from_the_first_host(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The storage took its copy from its sole child without hashing each piece, and is
    killed before any child asked: no digest of a piece is known anywhere. A new storage
    takes the task over from the first host, proves it by the whole file's digest, and the
    next host gets it from the swarm: the origin is still read once."""
    data = os.urandom(16 * MiB)
    digest = f"sha256:{sha256(data)}"
    async with Origin(rate=16 * MiB).serve() as origin:
        url = origin.add("lost.bin", data)
        cluster.start(peers=2, storage_env=LEND_SOLE)
        args = ("--digest", digest, *cluster.get_args())
        first = await get(url, tmp_path / "a.bin", cluster.peer_dir(0), *args)
        assert first["exit"] == 0, first
        await cluster.seeded()
        cluster.storage.kill()
        cluster.storage = cluster.spawn("storage", "storage-2", env=LEND_SOLE)
        second = await get(url, tmp_path / "b.bin", cluster.peer_dir(1), *args)
        assert second["exit"] == 0, second
        assert (tmp_path / "b.bin").read_bytes() == data
        assert second["bytes_origin"] == 0, second
        assert origin.content_served["lost.bin"] == len(data), "the origin was read once"
        assert re.search(r"\d+ pieces from 1 holders, 0 from the origin", cluster.storage.log())


async def test_a_child_arriving_after_a_sole_one_takes_its_pieces_from_it(
    cluster: Cluster, tmp_path: Path
) -> None:
    """A second child asks while the first, lent the file as the seed's sole child, is still
    reading: the first hashes what it read unhashed and reports it, so the second takes it
    from the first (no stall until the storage has it); the origin is read once, and both
    files are right."""
    data = os.urandom(32 * MiB)
    digest = f"sha256:{sha256(data)}"
    async with Origin(rate=12 * MiB).serve() as origin:
        url = origin.add("staggered.bin", data)
        cluster.start(peers=2, storage_env=LEND_SOLE)
        args = ("--digest", digest, *cluster.get_args())
        first = asyncio.create_task(get(url, tmp_path / "a.bin", cluster.peer_dir(0), *args))
        for _ in range(200):  # the first host is reading lent pieces from the origin
            if origin.content_served.get("staggered.bin", 0) >= 8 * MiB:
                break
            await asyncio.sleep(0.05)
        second = await get(url, tmp_path / "b.bin", cluster.peer_dir(1), *args)
        results = [await first, second]
        for result, name in zip(results, ("a.bin", "b.bin"), strict=True):
            assert result["exit"] == 0, result
            assert (tmp_path / name).read_bytes() == data
        assert second["bytes_p2p"] == len(data), second  # none of it from the origin
        assert "hashing the" in cluster.peers[0].log(), "the first host vouched for its pieces"
        assert origin.content_served["staggered.bin"] == len(data), "the origin was read once"


async def test_parent_killed_mid_transfer(cluster: Cluster, tmp_path: Path) -> None:
    data = os.urandom(48 * MiB)
    async with Origin().serve() as origin:
        url = origin.add("f.bin", data)
        cluster.start(peers=3, seed_rate="6MiB")
        outputs = [tmp_path / f"out{i}.bin" for i in range(3)]
        jobs = [
            asyncio.create_task(get(url, outputs[i], cluster.peer_dir(i), *cluster.get_args()))
            for i in range(3)
        ]
        victim = cluster.peers[0]

        async def victim_serves_children() -> bool:
            """Mid-transfer, and a parent: it holds some pieces and has sent children some."""
            state = await cluster.state()
            sent = await metric_value(victim.url, "swarmfly_peer_upload_bytes_total")
            for task in state["tasks"]:
                total = task["task"]["piece_count"] if task.get("task") else 0
                for peer in task["peers"]:
                    if peer["host_id"] == victim.host_id and 2 <= peer["pieces"] < total // 2:
                        return sent >= MiB
            return False

        for _ in range(400):
            if await victim_serves_children():
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the victim never served children mid-transfer")
        victim.kill()
        results = await asyncio.gather(*jobs)
        # The victim's own `get` loses its peer service and finishes with an in-process peer.
        assert results[0]["exit"] == 0, results[0]
        assert results[0]["via"] == "in-process"
        for i in (0, 1, 2):
            assert results[i]["exit"] == 0, results[i]
            assert sha256(outputs[i].read_bytes()) == sha256(data)
        # Every piece read from the origin once, but those the victim was reading for the
        # seed (lent, at most 2 x origin_concurrency at once): the children took what the
        # victim held from the swarm, and nobody started again from the origin.
        lent_in_flight = 2 * 4 + 4  # and the seed's own window ahead
        assert origin.bytes_served - origin.probes <= len(data) + lent_in_flight * MiB, (
            origin.bytes_served
        )


async def test_corrupt_parent_is_caught_and_avoided(
    cluster: Cluster, tmp_path: Path, bus: Bus, prefix: str
) -> None:
    data = os.urandom(40 * MiB)
    async with Origin().serve() as origin:
        url = origin.add("f.bin", data)
        cluster.start(peers=2, seed_rate="4MiB")
        first = await get(url, tmp_path / "a.bin", cluster.peer_dir(0), *cluster.get_args())
        assert first["exit"] == 0, first
        task_id = first["task_id"]
        # Rot the bytes on the first peer's disk: it will serve them as they are.
        stored = cluster.peer_dir(0) / "tasks" / task_id[:2] / task_id / "data"
        rotten = bytearray(stored.read_bytes())
        for offset in range(0, len(rotten), 4096):
            rotten[offset] ^= 0xFF
        stored.write_bytes(bytes(rotten))

        second = await get(url, tmp_path / "b.bin", cluster.peer_dir(1), *cluster.get_args())
        assert second["exit"] == 0, second
        assert sha256((tmp_path / "b.bin").read_bytes()) == sha256(data)
        corrupt_caught = await cluster.metric(
            cluster.peers[1], 'swarmfly_peer_piece_failures_total{reason="corrupt"}'
        )
        assert corrupt_caught >= 1

        # A newcomer is never offered the corrupt peer for this task.
        bad_peer = ids.peer_id(cluster.peers[0].host_id, task_id)
        for n in range(5):
            newcomer = Sender("normal", f"elsewhere-{n}")
            reply = await bus.request(
                messages.REGISTER,
                messages.RegisterRequest(
                    task_id=task_id,
                    peer_id=ids.peer_id(newcomer.host_id, task_id),
                    host=messages.Host(
                        id=newcomer.host_id,
                        ip="127.0.0.1",
                        port=9,
                        type=newcomer.host_type,
                    ),
                    source=messages.Source(url=url),
                ),
                partition=str(partition_of(task_id, DEFAULT_PARTITIONS)),
                sender=newcomer.token,
            )
            assert reply.action == "parents"
            assert bad_peer not in {p.peer_id for p in reply.parents}
