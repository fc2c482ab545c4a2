"""Faults: a broken origin fails cleanly and leaves nothing; a scheduler restart slows a
download but does not fail it."""

from __future__ import annotations

import asyncio
import os
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
            assert summary is not None and summary["bytes_p2p"] == len(data)
            assert origin.bytes_served <= len(data) + 16, "nobody fell back to the origin"
        finally:
            for service in (peer, storage, scheduler):
                service.stop()
