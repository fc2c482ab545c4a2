"""What an operator sees: `swarmfly status`, the scheduler's state and live events, metrics
that agree with what moved, and /healthz everywhere."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from swarmfly.bus import Bus
from swarmfly.config import Config
from swarmfly.content import SourceRequest
from swarmfly.natsserver import NatsServer
from swarmfly.testing import Origin, in_process_cluster

MiB = 1024 * 1024


async def text(url: str) -> tuple[int, str, dict[str, str]]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.text(), dict(response.headers)


def metric(exposition: str, name: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in exposition.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


async def test_status_lists_services_hosts_and_tasks(
    nats: NatsServer, prefix: str, origin: Origin, tmp_path: Path
) -> None:
    url = origin.add("s.bin", os.urandom(2 * MiB))
    async with in_process_cluster(nats.url, prefix, tmp_path) as cluster:
        result = await cluster.peer.node.download(SourceRequest(url))
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "swarmfly", "status", "--json",
            "--nats", nats.url, "--prefix", prefix,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == 0, err
        status: dict[str, Any] = orjson.loads(out)
        assert {"scheduler", "storage", "peer"} <= {s["name"] for s in status["services"]}
        hosts = {h["id"] for h in status["hosts"]}
        assert cluster.peer.node.settings.host_id in hosts
        task = next(t for t in status["tasks"] if t["id"] == result.task_id)
        assert {p["state"] for p in task["peers"]} == {"succeeded"}

        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "swarmfly", "status", "--nats", nats.url, "--prefix", prefix,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(process.communicate(), 60)
        table = out.decode()
        assert "SERVICES" in table and "HOSTS" in table and "TASKS" in table
        assert result.task_id[:12] in table and "100%" in table


async def test_byte_counters_agree_with_what_moved(
    nats: NatsServer, prefix: str, origin: Origin, tmp_path: Path
) -> None:
    data = os.urandom(6 * MiB)
    url = origin.add("m.bin", data)
    async with in_process_cluster(nats.url, prefix, tmp_path) as cluster:
        peer_url = cluster.peer.node.upload_url
        before = (await text(f"{peer_url}/metrics"))[1]
        result = await cluster.peer.node.download(SourceRequest(url))
        after = (await text(f"{peer_url}/metrics"))[1]
        # One process serves storage and peer here: both count into the same registry.
        origin_bytes = metric(after, 'swarmfly_peer_download_bytes_total{source="origin"}') - (
            metric(before, 'swarmfly_peer_download_bytes_total{source="origin"}')
        )
        p2p_bytes = metric(after, 'swarmfly_peer_download_bytes_total{source="p2p"}') - metric(
            before, 'swarmfly_peer_download_bytes_total{source="p2p"}'
        )
        assert origin_bytes == len(data) <= origin.bytes_served <= len(data) + 2
        assert p2p_bytes == result.bytes_p2p == len(data)
        for service_url in (peer_url, cluster.storage.node.upload_url, cluster.scheduler.http_url):
            status, body, _ = await text(f"{service_url}/healthz")
            assert status == 200 and orjson.loads(body)["ok"] is True
        assert "swarmfly_scheduler_schedule_duration_seconds_bucket" in after


async def test_dashboard_and_live_events(
    nats: NatsServer, prefix: str, origin: Origin, tmp_path: Path, bus: Bus
) -> None:
    url = origin.add("d.bin", os.urandom(2 * MiB))

    def slow_seed(config: Config) -> None:
        config.storage.upload_rate = MiB
        config.storage.lend_pieces = False  # every piece through the slow seed

    async with in_process_cluster(nats.url, prefix, tmp_path, configure=slow_seed) as cluster:
        base = cluster.scheduler.http_url
        status, page, headers = await text(f"{base}/")
        assert status == 200 and "<title>swarmfly</title>" in page
        assert "default-src 'self'" in headers["Content-Security-Policy"]
        assert "http://" not in page.split("<script>")[1] and "https://" not in page
        download = asyncio.create_task(cluster.peer.node.download(SourceRequest(url)))
        rounds = 0
        while not download.done():  # everything answers while a download runs
            rounds += 1
            for address in (base, cluster.peer.node.upload_url, cluster.storage.node.upload_url):
                for path in ("/healthz", "/metrics"):
                    assert (await text(address + path))[0] == 200
            assert (await text(base + "/"))[0] == 200
            await asyncio.sleep(0.05)
        result = await download
        assert rounds >= 3
        async with aiohttp.ClientSession() as session, session.get(f"{base}/api/events") as events:
            line = await asyncio.wait_for(events.content.readline(), 10)
        assert line.startswith(b"data: ")
        state = orjson.loads(line[6:])
        task = next(t for t in state["tasks"] if t["id"] == result.task_id)
        assert all(p["bitmap"] for p in task["peers"])
        reply = await bus.request("scheduler.state", {"task_id": result.task_id, "bitmaps": True})
        assert [t["id"] for t in reply["tasks"]] == [result.task_id]
