"""Service lifecycles against a real nats-server: the storage cache survives a restart, a host
whose heartbeats stop is dropped, rate limits hold, and the terminal gets a progress bar."""

from __future__ import annotations

import asyncio
import os
import pty
import signal
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from swarmfly.natsserver import NatsServer
from swarmfly.testing import Origin, ServiceProcess, spawn_service
from tests.conftest import FAST_ENV
from tests.integration.test_cli import swarmfly

MiB = 1024 * 1024


def start(kind: str, nats: NatsServer, prefix: str, folder: Path, *args: str) -> ServiceProcess:
    return spawn_service(kind, nats.url, folder, "--prefix", prefix, *args, env=FAST_ENV)


async def scheduler_state(scheduler: ServiceProcess) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{scheduler.url}/api/state", headers=scheduler.api_auth()) as response,
    ):
        data: dict[str, Any] = await response.json()
        return data


async def test_storage_cache_survives_a_restart(
    origin: Origin, nats: NatsServer, prefix: str, tmp_path: Path
) -> None:
    data = os.urandom(6 * MiB)
    url = origin.add("cached.bin", data)
    scheduler = start("scheduler", nats, prefix, tmp_path / "scheduler")
    storage = start("storage", nats, prefix, tmp_path / "storage")
    args = ("--nats", nats.url, "--prefix", prefix, "--json")
    try:
        code, _, stderr = await swarmfly(
            "get", url, "-O", str(tmp_path / "a"), "--state-dir", str(tmp_path / "cli-a"), *args
        )
        assert code == 0, stderr
        served = origin.bytes_served
        assert storage.stop() == 0
        storage = start("storage", nats, prefix, tmp_path / "storage")
        code, stdout, stderr = await swarmfly(
            "get", url, "-O", str(tmp_path / "b"), "--state-dir", str(tmp_path / "cli-b"), *args
        )
        assert code == 0, stderr
        assert orjson.loads(stdout)["bytes_p2p"] == len(data)
        assert (tmp_path / "b").read_bytes() == data
        # Only the access check of the second download (a 1-byte ranged stat) reached the origin.
        assert origin.bytes_served <= served + 1, "the restarted storage served from its cache"
    finally:
        storage.stop()
        scheduler.stop()


async def test_a_host_whose_heartbeats_stop_is_dropped(
    nats: NatsServer, prefix: str, tmp_path: Path
) -> None:
    scheduler = start("scheduler", nats, prefix, tmp_path / "scheduler")
    peer = start("peer", nats, prefix, tmp_path / "peer")
    try:
        deadline = time.monotonic() + 10
        while peer.host_id not in {h["id"] for h in (await scheduler_state(scheduler))["hosts"]}:
            assert time.monotonic() < deadline, "the peer never showed up"
            await asyncio.sleep(0.1)
        os.kill(peer.process.pid, signal.SIGSTOP)
        try:
            deadline = time.monotonic() + 15
            while peer.host_id in {h["id"] for h in (await scheduler_state(scheduler))["hosts"]}:
                assert time.monotonic() < deadline, "the silent host was never dropped"
                await asyncio.sleep(0.2)
        finally:
            os.kill(peer.process.pid, signal.SIGCONT)
    finally:
        peer.stop()
        scheduler.stop()


async def test_download_rate_limit_holds(origin: Origin, tmp_path: Path) -> None:
    url = origin.add("f.bin", os.urandom(4 * MiB))
    started = time.monotonic()
    code, _, stderr = await swarmfly("get", url, "-O", str(tmp_path / "f"), "--download-rate",
                                     "2MiB", "--state-dir", str(tmp_path / "s"))  # fmt: skip
    assert code == 0, stderr
    assert stderr == "", "nothing but errors when not a terminal"
    elapsed = time.monotonic() - started
    assert elapsed >= 1.5, f"4 MiB at 2 MiB/s took only {elapsed:.2f}s"


async def test_the_serving_peer_keeps_a_gets_download_rate(
    origin: Origin, nats: NatsServer, prefix: str, tmp_path: Path
) -> None:
    """`get --download-rate` through a running peer service: the peer paces that download
    (it used to apply the flag only to a peer run in process)."""
    data = os.urandom(4 * MiB)
    url = origin.add("paced-get.bin", data)
    scheduler = start("scheduler", nats, prefix, tmp_path / "scheduler")
    storage = start("storage", nats, prefix, tmp_path / "storage")
    peer = start("peer", nats, prefix, tmp_path / "peer")
    try:
        started = time.monotonic()
        code, stdout, stderr = await swarmfly(
            "get", url, "-O", str(tmp_path / "out"), "--download-rate", "2MiB", "--json",
            "--state-dir", str(tmp_path / "peer"), "--nats", nats.url, "--prefix", prefix,
        )  # fmt: skip
        elapsed = time.monotonic() - started
        assert code == 0, stderr
        assert orjson.loads(stdout)["via"] == "peer", "the peer service served it"
        assert (tmp_path / "out").read_bytes() == data
        assert elapsed >= 1.5, f"4 MiB at 2 MiB/s took only {elapsed:.2f}s"
    finally:
        for service in (peer, storage, scheduler):
            service.stop()


async def test_a_slow_download_rate_is_not_cut_off_by_its_parents(
    origin: Origin, nats: NatsServer, prefix: str, tmp_path: Path
) -> None:
    """A parent cuts off a child that reads a piece under 64 KiB/s; the slowest rate a get may
    ask (128 KiB/s) still finishes from its parent with no piece cut off or parent dropped.
    (Loopback's socket buffers hold these pieces whole, so the in-flight bound that keeps
    larger pieces above the floor is checked in test_swarming.)"""
    data = os.urandom(MiB)
    url = origin.add("slow-get.bin", data)
    scheduler = start("scheduler", nats, prefix, tmp_path / "scheduler")
    storage = start("storage", nats, prefix, tmp_path / "storage")
    peer = start("peer", nats, prefix, tmp_path / "peer")
    try:
        code, stdout, stderr = await swarmfly(
            "get", url, "-O", str(tmp_path / "out"), "--download-rate", "128KiB", "--json",
            "--piece-length", "256KiB", "--state-dir", str(tmp_path / "peer"),
            "--nats", nats.url, "--prefix", prefix,
        )  # fmt: skip
        assert code == 0, stderr
        summary = orjson.loads(stdout)
        assert (tmp_path / "out").read_bytes() == data
        assert summary["bytes_p2p"] == MiB and summary["bytes_origin"] == 0, summary
        assert "cut off a child" not in storage.log()
        assert "dropped parent" not in peer.log()
    finally:
        for service in (peer, storage, scheduler):
            service.stop()


async def test_upload_rate_limit_paces_children(
    origin: Origin, nats: NatsServer, prefix: str, tmp_path: Path
) -> None:
    data = os.urandom(8 * MiB)
    url = origin.add("paced.bin", data)
    scheduler = start("scheduler", nats, prefix, tmp_path / "scheduler")
    # A seed that lends pieces would let the child read them from the origin, unpaced.
    storage = spawn_service(
        "storage", nats.url, tmp_path / "storage", "--prefix", prefix, "--upload-rate", "4MiB",
        env={**FAST_ENV, "SWARMFLY_STORAGE_LEND_PIECES": "false"},
    )  # fmt: skip
    try:
        started = time.monotonic()
        code, stdout, stderr = await swarmfly("get", url, "-O", str(tmp_path / "p"), "--json",
                                              "--state-dir", str(tmp_path / "cli"), "--nats",
                                              nats.url, "--prefix", prefix)  # fmt: skip
        elapsed = time.monotonic() - started
        assert code == 0, stderr
        assert orjson.loads(stdout)["bytes_p2p"] == len(data)
        assert elapsed >= 1.5, f"8 MiB at 4 MiB/s took only {elapsed:.2f}s"
    finally:
        storage.stop()
        scheduler.stop()


@pytest.mark.skipif(sys.platform != "linux", reason="needs a Linux pty")
async def test_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    async with Origin(rate=4 * MiB).serve() as origin:
        url = origin.add("bar.bin", os.urandom(6 * MiB))
        leader, follower = pty.openpty()
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "swarmfly", "get", url, "-O", str(tmp_path / "bar"),
            "--state-dir", str(tmp_path / "s"),
            stdin=follower, stdout=follower, stderr=follower,
        )  # fmt: skip
        os.close(follower)
        output = b""
        loop = asyncio.get_running_loop()
        while True:
            try:
                chunk = await loop.run_in_executor(None, os.read, leader, 4096)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
        await asyncio.wait_for(process.wait(), 60)
        os.close(leader)
    assert process.returncode == 0, output
    text = output.decode(errors="replace")
    assert "MiB/s" in text and "ETA" in text and "%" in text
