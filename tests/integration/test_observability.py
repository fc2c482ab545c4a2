"""What an operator sees: `swarmfly status`, the scheduler's state and live events, metrics
that agree with what moved, and /healthz everywhere."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from swarmfly.bus import Bus
from swarmfly.config import Config
from swarmfly.content import SourceRequest
from swarmfly.contracts import messages
from swarmfly.errors import SwarmflyError
from swarmfly.ids import task_id as make_task_id
from swarmfly.natsserver import NatsServer
from swarmfly.placement import partition_of
from swarmfly.testing import (
    Origin,
    in_process_cluster,
    spawn_service,
    swarmfly_get,
    wait_until,
)
from tests.conftest import FAST_ENV

MiB = 1024 * 1024


async def text(url: str, headers: dict[str, str] | None = None) -> tuple[int, str, dict[str, str]]:
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as response:
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
        assert task["home"] == cluster.storage.node.settings.host_id and task["replicas"] == []
        [scheduler] = status["schedulers"]
        count = scheduler["partition_count"]
        assert scheduler["partitions"] == list(range(count)), "a lone scheduler holds them all"
        assert scheduler["members"] == [scheduler["id"]]

        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "swarmfly", "status", "--nats", nats.url, "--prefix", prefix,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(process.communicate(), 60)
        table = out.decode()
        assert "SERVICES" in table and "HOSTS" in table and "TASKS" in table
        assert f"SCHEDULERS ({count} partitions)" in table, table
        assert re.search(rf"^{scheduler['id']}\s+{scheduler['run']}\s+0-{count - 1}\s", table, re.M)
        assert re.search(rf"^{result.task_id[:12]}.*\s{task['home']}\s+-\s", table, re.M), table
        assert result.task_id[:12] in table and "100%" in table and url in table


async def test_byte_counters_agree_with_what_moved(
    nats: NatsServer, prefix: str, origin: Origin, tmp_path: Path
) -> None:
    data = os.urandom(6 * MiB)
    url = origin.add("m.bin", data)
    async with in_process_cluster(nats.url, prefix, tmp_path) as cluster:
        peer_url = cluster.peer.node.upload_url
        storage_url = cluster.storage.node.upload_url
        origin_name = 'swarmfly_peer_download_bytes_total{source="origin"}'
        p2p_name = 'swarmfly_peer_download_bytes_total{source="p2p"}'
        before = {u: (await text(f"{u}/metrics"))[1] for u in (peer_url, storage_url)}
        result = await cluster.peer.node.download(SourceRequest(url))
        after = {u: (await text(f"{u}/metrics"))[1] for u in (peer_url, storage_url)}

        def moved(service: str, name: str) -> float:
            return metric(after[service], name) - metric(before[service], name)

        # One process serves storage and peer here, each from its own registry: the storage
        # read the origin, the peer took every byte from it.
        assert moved(storage_url, origin_name) == len(data) <= origin.bytes_served
        assert origin.bytes_served <= len(data) + 2
        assert moved(peer_url, origin_name) == 0
        assert moved(peer_url, p2p_name) == result.bytes_p2p == len(data)
        assert moved(storage_url, "swarmfly_peer_upload_bytes_total") == len(data)
        assert "swarmfly_scheduler_" not in after[peer_url] + after[storage_url]
        scheduler = (await text(f"{cluster.scheduler.http_url}/metrics"))[1]
        assert "swarmfly_peer_" not in scheduler and "swarmfly_build_info" in scheduler
        for service_url in (peer_url, cluster.storage.node.upload_url, cluster.scheduler.http_url):
            status, body, _ = await text(f"{service_url}/healthz")
            assert status == 200 and orjson.loads(body)["ok"] is True
        assert "swarmfly_scheduler_schedule_duration_seconds_bucket" in scheduler


@pytest.mark.slow
async def test_byte_counters_of_a_swarm_agree_with_the_origin(
    nats: NatsServer, prefix: str, origin: Origin, tmp_path: Path
) -> None:
    """Three peers and a lending seed in their own processes: every byte the origin sent is
    counted as an origin byte somewhere, and each peer's p2p bytes are the rest of its file."""
    size = 12 * MiB
    data = os.urandom(size)
    url = origin.add("swarm.bin", data)
    with ExitStack() as stack:
        services = [
            spawn_service(kind, nats.url, tmp_path / name, "--prefix", prefix, *args, env=FAST_ENV)
            for kind, name, args in (
                ("scheduler", "scheduler", ()),
                ("storage", "storage", ("--upload-rate", "4MiB")),  # full uplink: it lends
                ("peer", "peer0", ()), ("peer", "peer1", ()), ("peer", "peer2", ()))
        ]  # fmt: skip
        for service in services:
            stack.callback(service.stop)
        gets = [
            asyncio.to_thread(
                swarmfly_get, url, tmp_path / f"out{i}", tmp_path / f"peer{i}",
                "--nats", nats.url, "--prefix", prefix, env=FAST_ENV, timeout=120,
            )
            for i in range(3)
        ]  # fmt: skip
        for done in await asyncio.gather(*gets):
            assert done.returncode == 0, done.stderr
        for i in range(3):
            assert (tmp_path / f"out{i}").read_bytes() == data

        def by_source(exposition: str, source: str) -> float:
            return metric(exposition, f'swarmfly_peer_download_bytes_total{{source="{source}"}}')

        expositions = [(await text(f"{s.url}/metrics"))[1] for s in services[1:]]
        origin_bytes = sum(by_source(e, "origin") for e in expositions)
        assert origin_bytes == origin.bytes_served - origin.probes, "every origin byte counted"
        assert origin.probes >= 4  # the storage's and each peer's access check, one byte each
        for exposition in expositions[1:]:  # each peer holds the whole file: p2p is the rest
            assert by_source(exposition, "origin") + by_source(exposition, "p2p") == size
        assert sum(by_source(e, "p2p") for e in expositions[1:]) > 0
        uploaded = sum(metric(e, "swarmfly_peer_upload_bytes_total") for e in expositions)
        # A piece can cross twice when an endgame copy races the slowest transfer.
        assert uploaded >= sum(by_source(e, "p2p") for e in expositions)


async def test_every_counter_moves_with_what_it_counts(
    nats: NatsServer, prefix: str, origin: Origin, tmp_path: Path, bus: Bus
) -> None:
    """Registrations, back-to-source, cache size, evictions, origin failures and refused
    requests, each read from /metrics as an operator would: each service's own, though all
    run in one process."""
    size = 3 * MiB
    url = origin.add("c.bin", os.urandom(size))
    async with (
        Origin(truncate_after=256 * 1024).serve() as cut,
        in_process_cluster(nats.url, prefix, tmp_path) as cluster,
    ):
        node = cluster.peer.node
        endpoints = [
            f"{u}/metrics"
            for u in (cluster.scheduler.http_url, node.upload_url, cluster.storage.node.upload_url)
        ]
        before = [(await text(e))[1] for e in endpoints]

        def moved(name: str, *services: int) -> float:
            return sum(metric(after[i], name) - metric(before[i], name) for i in services)

        result = await node.download(SourceRequest(url))
        broken = cut.add("cut.bin", os.urandom(size))
        with pytest.raises(SwarmflyError):
            await node.download(SourceRequest(broken))
        bad = orjson.dumps({"task_id": "not a task id"})
        reply = await bus.nc.request(bus.subject("scheduler.state"), bad, timeout=5)
        assert orjson.loads(reply.data)["error"]["code"] == "bad_request"
        after = [(await text(e))[1] for e in endpoints]
        assert moved("swarmfly_scheduler_registrations_total", 0) >= 4  # peer + seed, twice
        # Seeds read the origin by role; the peer was sent there once the cut file's seed failed.
        assert moved("swarmfly_scheduler_back_to_source_total", 0) >= 1
        assert moved('swarmfly_peer_piece_failures_total{reason="origin"}', 1, 2) >= 1
        failures = 'swarmfly_contract_validation_failures_total{subject="scheduler.state"}'
        assert moved(failures, 0) == 1 and moved(failures, 1, 2) == 0
        evicted = await node.collect(now=time.time() + 10 * 365 * 86400)  # past every TTL
        assert result.task_id in evicted
        after = [(await text(e))[1] for e in endpoints]
        assert moved("swarmfly_peer_gc_evictions_total", 1) == len(evicted)
        assert moved("swarmfly_peer_gc_evictions_total", 2) == 0
        # The peer's cache gauges are the peer's: the storage's collection never overwrites them.
        await cluster.storage.node.collect(now=time.time())
        after = [(await text(e))[1] for e in endpoints]
        assert metric(after[1], "swarmfly_peer_cache_tasks") == len(node.store.tasks)
        assert metric(after[2], "swarmfly_peer_cache_tasks") == len(
            cluster.storage.node.store.tasks
        )
        assert len(cluster.storage.node.store.tasks) != len(node.store.tasks)
        assert result.task_id not in node.store.tasks


@pytest.mark.slow
async def test_the_dashboard_shows_the_tasks_of_every_scheduler(
    nats: NatsServer, prefix: str, origin: Origin, tmp_path: Path
) -> None:
    """Each scheduler holds some partitions; the page of either shows the whole cluster."""
    async with in_process_cluster(nats.url, prefix, tmp_path) as cluster:
        other = spawn_service(
            "scheduler", nats.url, tmp_path / "other", "--prefix", prefix, env=FAST_ENV
        )
        try:
            own = cluster.scheduler.ownership
            await wait_until(lambda: 0 < len(own.held) < own.partitions, timeout=30)
            for _ in range(100):  # content whose task the other scheduler holds
                data = os.urandom(MiB)
                digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
                url = origin.add("elsewhere.bin", data)
                if partition_of(make_task_id(url, digest=digest), own.partitions) not in own.held:
                    break
            result = await cluster.peer.node.download(SourceRequest(url, digest=digest))
            assert result.task_id == make_task_id(url, digest=digest)
            own_auth = {"Authorization": f"Bearer {cluster.scheduler.api_token}"}
            for base, auth in (
                (cluster.scheduler.http_url, own_auth),
                (other.url, other.api_auth()),
            ):
                # A partition that moves while the second scheduler settles in is rebuilt
                # from the hosts' next heartbeat: the task shows again within a few seconds.
                shown: set[str] = set()
                for _ in range(50):
                    status, body, _ = await text(f"{base}/api/state", auth)
                    assert status == 200
                    shown = {t["id"] for t in orjson.loads(body)["tasks"]}
                    if result.task_id in shown:
                        break
                    await asyncio.sleep(0.2)
                assert result.task_id in shown, base
        finally:
            other.stop()


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
        # The API shows tasks and hosts only to who has the scheduler's token; a browser
        # shows it once and keeps it as a cookie.
        for path in ("/api/state", "/api/events"):
            status, body, _ = await text(base + path)
            assert status == 401
            assert result.task_id not in body
        # A cookie jar that keeps cookies of an address (127.0.0.1), as a browser does.
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:
            async with browser.get(f"{base}/?token=wrong", allow_redirects=False) as page_:
                assert page_.status == 200 and not page_.cookies
            token = cluster.scheduler.api_token
            async with browser.get(f"{base}/?token={token}", allow_redirects=False) as page_:
                assert page_.status == 302 and page_.headers["Location"] == "/"
            async with browser.get(f"{base}/api/state") as state_:
                assert state_.status == 200
                assert result.task_id in await state_.text()
            async with browser.get(f"{base}/api/events") as events:
                line = await asyncio.wait_for(events.content.readline(), 10)
        assert line.startswith(b"data: ")
        state = orjson.loads(line[6:])
        task = next(t for t in state["tasks"] if t["id"] == result.task_id)
        assert all(p["bitmap"] for p in task["peers"])
        assert task["url"] == url  # no credentials or query in it to redact here
        (seed,) = (p for p in task["peers"] if p["source"])
        (child,) = (p for p in task["peers"] if not p["source"])
        assert (seed["origin_bytes"], seed["p2p_bytes"]) == (2 * MiB, 0)
        assert (child["origin_bytes"], child["p2p_bytes"]) == (0, 2 * MiB)
        reply = await bus.request(
            messages.STATE, messages.StateRequest(task_id=result.task_id, bitmaps=True)
        )
        assert [t.id for t in reply.tasks] == [result.task_id]
