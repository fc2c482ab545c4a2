"""The NATS server restarted mid-download: every service reconnects by itself, the scheduler's
soft state is rebuilt from the peers, and every download finishes, correct, without sending
the peers to the origin."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from swarmfly.natsserver import free_port
from swarmfly.testing import Origin, ServiceProcess, nats_server, spawn_service
from tests.conftest import FAST_ENV

pytestmark = pytest.mark.slow
MiB = 1024 * 1024
SIZE = 24 * MiB
ORIGIN_RATE = 2 * MiB
"""The seed needs about twelve seconds to read the file: the outage falls inside every
download, while pieces keep flowing from the seed to the peers over HTTP."""
OUTAGE = 10.0
"""Longer than the scheduler's host TTL (3 s in FAST_ENV), so it drops every host and task and
the peers must rebuild its state; and longer than two request timeouts (5 s each), so
`swarmfly get` must not mistake NATS's silence for its peer service's."""
ENV = {**FAST_ENV, "SWARMFLY_PROXY_PORT": "0"}
"""Three peers on one machine: each proxy on a free port."""


async def get(
    url: str, output: Path, state_dir: Path, nats_url: str
) -> tuple[int, dict[str, Any] | None, str]:
    """`swarmfly get` on a peer's state dir: it talks to that host's peer service."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "swarmfly", "get", url, "-O", str(output), "--json",
        "--state-dir", str(state_dir), "--nats", nats_url, "--piece-length", "1MiB",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ, **ENV},
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(process.communicate(), 90)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, orjson.loads(out) if out else None, err.decode()


async def holders(scheduler: ServiceProcess, task_id: str) -> set[str]:
    """Hosts the scheduler knows to hold every piece of the task."""
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
        session.get(f"{scheduler.url}/api/state", headers=scheduler.api_auth()) as response,
    ):
        state = await response.json()
    return {
        peer["host_id"]
        for task in state["tasks"]
        if task["id"] == task_id
        for peer in task["peers"]
        if peer["pieces"] == task["task"]["piece_count"]
    }


async def test_a_nats_restart_does_not_fail_downloads(tmp_path: Path) -> None:
    data = os.urandom(SIZE)
    digest = hashlib.sha256(data).hexdigest()
    layout = [("scheduler", "scheduler"), ("storage", "storage")]
    layout += [("peer", f"peer{i}") for i in range(3)]
    with nats_server(tmp_path / "nats", port=free_port()) as server:
        services: list[ServiceProcess] = []
        jobs: list[asyncio.Task[tuple[int, dict[str, Any] | None, str]]] = []
        try:
            async with Origin(rate=ORIGIN_RATE).serve() as origin:
                url = origin.add("f.bin", data)
                for kind, name in layout:
                    services.append(spawn_service(kind, server.url, tmp_path / name, env=ENV))
                jobs += [
                    asyncio.create_task(
                        get(url, tmp_path / f"out{i}", tmp_path / f"peer{i}", server.url)
                    )
                    for i in range(3)
                ]
                deadline = time.monotonic() + 20
                while origin.bytes_served < 2 * MiB:
                    assert time.monotonic() < deadline, "the seed never read the origin"
                    assert not any(job.done() for job in jobs), "a download ended early"
                    await asyncio.sleep(0.05)
                server.stop()
                await asyncio.sleep(OUTAGE)
                assert not any(job.done() for job in jobs), "the outage outlasted a download"
                server.start()
                results = await asyncio.gather(*jobs)
            task_ids: set[str] = set()
            for i, (code, summary, err) in enumerate(results):
                assert code == 0, f"peer{i}: {err}"
                assert summary is not None
                assert summary["via"] == "peer", "get gave up its peer service during the outage"
                out = tmp_path / f"out{i}"
                assert hashlib.sha256(out.read_bytes()).hexdigest() == digest, f"peer{i}"
                task_ids.add(summary["task_id"])
            assert origin.bytes_served <= SIZE * 5 // 4, "peers fell back to the origin"
            # The scheduler dropped every host during the outage; the peers told it again.
            (task_id,) = task_ids
            expected = {s.host_id for s in services[1:]}
            deadline = time.monotonic() + 10
            while (known := await holders(services[0], task_id)) != expected:
                assert time.monotonic() < deadline, f"scheduler knows {known}, not {expected}"
                await asyncio.sleep(0.2)
            for service in services:
                assert service.process.poll() is None, f"{service.kind} died: {service.log()}"
        finally:
            for job in jobs:
                job.cancel()
            await asyncio.gather(*jobs, return_exceptions=True)
            for service in services:
                service.stop()


async def health_of(services: list[ServiceProcess]) -> dict[str, tuple[int, bool]]:
    """Each service's ``/healthz``: its status and ``ok``."""
    answers = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        for service in services:
            async with session.get(f"{service.url}/healthz") as response:
                answers[service.kind] = (response.status, (await response.json())["ok"])
    return answers


async def test_every_service_says_it_is_unhealthy_while_nats_is_away(tmp_path: Path) -> None:
    """A probe (Kubernetes, `swarmfly doctor`) sees a host cut off from its control plane:
    503 with ``ok: false`` on the scheduler and on the upload server of storage and peer, and
    200 again once they reconnected by themselves."""
    with nats_server(tmp_path / "nats", port=free_port()) as server:
        services = [
            spawn_service(kind, server.url, tmp_path / kind, env=ENV)
            for kind in ("scheduler", "storage", "peer")
        ]
        steps: list[tuple[Callable[[], object] | None, tuple[int, bool]]] = [
            (None, (200, True)),
            (server.stop, (503, False)),
            (server.start, (200, True)),
        ]
        try:
            for change, want in steps:
                if change is not None:
                    change()
                deadline = time.monotonic() + 20
                while set((health := await health_of(services)).values()) != {want}:
                    assert time.monotonic() < deadline, f"{health}, not all {want}"
                    await asyncio.sleep(0.2)
            for service in services:
                assert service.process.poll() is None, f"{service.kind} died: {service.log()}"
        finally:
            for service in services:
                service.stop()
