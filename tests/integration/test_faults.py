"""Faults: a broken origin fails cleanly and leaves nothing; a scheduler restart slows a
download but does not fail it."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from swarmfly.natsserver import NatsServer
from swarmfly.testing import Origin, spawn_service
from tests.conftest import FAST_ENV

pytestmark = pytest.mark.slow
MiB = 1024 * 1024


async def get(url: str, output: Path, *args: str) -> tuple[int, dict[str, Any] | None, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "swarmfly", "get", url, "-O", str(output), "--json", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **FAST_ENV},
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, orjson.loads(out) if out else None, err.decode()


@pytest.mark.parametrize("fault", ["500", "truncated"])
async def test_a_broken_origin_fails_cleanly(tmp_path: Path, fault: str) -> None:
    origin = Origin(fail_status=500) if fault == "500" else Origin(truncate_after=100_000)
    async with origin.serve():
        url = origin.add("f.bin", os.urandom(3 * MiB))
        out = tmp_path / "f.bin"
        code, _, err = await get(url, out, "--state-dir", str(tmp_path / "s"))
    assert code == 1
    assert err.count("\n") == 1 and "source_error" in err
    assert not out.exists()


async def test_content_changing_mid_download_is_refused(tmp_path: Path) -> None:
    async with Origin(rate=2 * MiB).serve() as origin:
        url = origin.add("moving.bin", os.urandom(8 * MiB))
        out = tmp_path / "moving.bin"
        job = asyncio.create_task(
            get(url, out, "--piece-length", "1MiB", "--state-dir", str(tmp_path / "s"))
        )
        while origin.bytes_served < MiB:  # noqa: ASYNC110 - the origin offers no event
            await asyncio.sleep(0.05)
        origin.files["moving.bin"] = os.urandom(8 * MiB)  # a new version, a new ETag
        code, _, err = await job
    assert code == 1
    assert "changed" in err
    assert not out.exists()


async def test_a_scheduler_restart_does_not_fail_a_download(
    nats: NatsServer, prefix: str, tmp_path: Path
) -> None:
    data = os.urandom(24 * MiB)
    async with Origin().serve() as origin:
        url = origin.add("f.bin", data)

        def start(kind: str, name: str, *args: str) -> Any:
            return spawn_service(kind, nats.url, tmp_path / name, "--prefix", prefix, *args,
                                 env=FAST_ENV)  # fmt: skip

        scheduler = start("scheduler", "scheduler")
        storage = start("storage", "storage", "--upload-rate", "4MiB")
        peer = start("peer", "peer")
        try:
            job = asyncio.create_task(
                get(url, tmp_path / "out", "--state-dir", str(tmp_path / "peer"),
                    "--nats", nats.url, "--prefix", prefix)
            )  # fmt: skip
            await asyncio.sleep(2.0)
            scheduler.kill()
            await asyncio.sleep(1.0)
            scheduler = start("scheduler", "scheduler")
            code, summary, err = await job
            assert code == 0, err
            assert (tmp_path / "out").read_bytes() == data
            # From the swarm, or from the origin for pieces the seed lent (its uplink is
            # capped): still, every byte was read from the origin once.
            assert summary is not None
            assert summary["bytes_p2p"] + summary["bytes_origin"] == len(data)
            assert origin.bytes_served <= len(data) + 16, "nobody fell back to the origin"
        finally:
            for service in (peer, storage, scheduler):
                service.stop()


def small_filesystem(path: Path, size: str) -> bool:
    path.mkdir(parents=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True, check=False,
    )  # fmt: skip
    return done.returncode == 0


async def test_a_full_disk_fails_that_download_only(
    nats: NatsServer, prefix: str, tmp_path: Path
) -> None:
    small = tmp_path / "small"
    if not small_filesystem(small, "3m"):
        if os.environ.get("SWARMFLY_REQUIRE_E2E") == "1":
            pytest.fail("cannot mount a small tmpfs for the disk-full test")
        pytest.skip("mounting a tmpfs is not permitted here")
    data = os.urandom(8 * MiB)
    services = []
    try:
        async with Origin().serve() as origin:
            url = origin.add("big.bin", data)
            layout = [
                ("scheduler", tmp_path / "scheduler"),
                ("storage", tmp_path / "storage"),
                ("peer", small / "peer"),
                ("peer", tmp_path / "roomy"),
            ]
            for kind, folder in layout:
                services.append(
                    spawn_service(kind, nats.url, folder, "--prefix", prefix, env=FAST_ENV)
                )
            args = ("--nats", nats.url, "--prefix", prefix)
            out_full, out_ok = tmp_path / "full.bin", tmp_path / "ok.bin"
            (full, _, err), (ok, _, err_ok) = await asyncio.gather(
                get(url, out_full, "--state-dir", str(small / "peer"), *args),
                get(url, out_ok, "--state-dir", str(tmp_path / "roomy"), *args),
            )
            assert full == 1 and "No space left on device" in err, err
            assert not out_full.exists()
            assert ok == 0, err_ok
            assert out_ok.read_bytes() == data
            assert services[2].process.poll() is None, "the full peer keeps running"
    finally:
        for service in services:
            service.stop()
        await asyncio.to_thread(subprocess.run, ["umount", "-l", str(small)], check=False)


@pytest.mark.parametrize("victim", ["storage", "peer-sigterm"])
async def test_losing_the_seed_or_a_parent_does_not_fail_downloads(
    nats: NatsServer, prefix: str, tmp_path: Path, victim: str
) -> None:
    data = os.urandom(24 * MiB)
    async with Origin().serve() as origin:
        url = origin.add("f.bin", data)

        def start(kind: str, name: str, *args: str) -> Any:
            return spawn_service(
                kind, nats.url, tmp_path / name, "--prefix", prefix, *args, env=FAST_ENV
            )

        services = [
            start("scheduler", "scheduler"),
            start("storage", "storage", "--upload-rate", "6MiB"),
        ]
        services += [start("peer", f"peer{i}", "--upload-rate", "12MiB") for i in range(3)]
        try:
            args = ("--nats", nats.url, "--prefix", prefix)
            jobs = [
                asyncio.create_task(
                    get(url, tmp_path / f"out{i}", "--state-dir", str(tmp_path / f"peer{i}"), *args)
                )
                for i in range(3)
            ]
            await asyncio.sleep(2.0)
            if victim == "storage":
                services[1].kill()
                survivors = range(3)
            else:
                assert services[2].stop() == 0, "a peer leaves gracefully on SIGTERM"
                survivors = range(1, 3)
            results = await asyncio.gather(*jobs)
            for i in survivors:
                code, _, err = results[i]
                assert code == 0, err
                assert (tmp_path / f"out{i}").read_bytes() == data
        finally:
            for service in services:
                service.stop()
