"""A swarm across hosts: network namespaces on one machine, each host with its own address.

Three NATS servers in a cluster (routes, JetStream) on three hosts, the scheduler and the
storage on theirs, four peers on four more, and the origin on its own host behind a `tc`
token bucket. Every peer downloads the file with `swarmfly get`; mid-download the NATS server
that most downloading peers use is killed with SIGKILL. The services reconnect to the others
and every peer finishes with the right bytes, read from the origin about once.

Everything runs with the per-role permissions swarmfly ships (swarmfly.credentials): one
NKey identity per service per host, each storage and peer with its own host id, written by
``python -m swarmfly.credentials`` into a directory per host; the NATS servers admit only
those public keys (and each other, by a route password), and every service and `swarmfly
get` connects with its own seed and inbox prefix only.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import orjson
import pytest

from swarmfly.credentials import inbox_prefix
from swarmfly.natsserver import find_binary
from swarmfly.testing import ServiceProcess, spawn_service
from tests.conftest import FAST_ENV
from tests.e2e.natsprobe import probe_from
from tests.e2e.netns import Host, NamespacesUnavailable, Network, start_origin, start_process

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(120)]
MiB = 1024 * 1024
SIZE = 24 * MiB
ORIGIN_RATE = "20mbit"
"""About ten seconds for the seed to read the file: the kill falls inside every download."""
NATS_PORT, ROUTE_PORT, MONITOR_PORT = 4222, 6222, 8222
SERVICE_NAMES = ("swarmfly-scheduler", "swarmfly-storage", "swarmfly-peer")
"""Connection names of the services (``swarmfly get`` connects as swarmfly-get)."""
DEADLINE = 60.0
"""Seconds every download has, from its start."""
PREFIX = "swarmfly"
ROUTE_USER = "route"


def unavailable(reason: str) -> NoReturn:
    """Skip, except in CI, where the multi-host test must run."""
    if os.environ.get("CI") == "true" or os.environ.get("SWARMFLY_REQUIRE_E2E") == "1":
        pytest.fail(f"{reason} (required in CI)")
    pytest.skip(reason)


@dataclass(frozen=True)
class Hosts:
    """The machines of the test, each a network namespace on one bridge."""

    network: Network
    nats: list[Host]
    scheduler: Host
    storage: Host
    peers: list[Host]
    origin: Host


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    """Every host built before the test starts: a step this machine refuses (namespaces,
    veth pairs, the bridge, the shaper) skips with its reason, and whatever was made is
    removed in any case."""
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            unavailable(f"{tool} is not installed (Debian package iproute2)")
    net = Network()
    try:
        try:
            net.start()
            built = Hosts(
                net,
                nats=[net.add(f"n{i}", 10 + i) for i in (1, 2, 3)],
                scheduler=net.add("sched", 20),
                storage=net.add("stor", 21),
                peers=[net.add(f"p{i}", 30 + i) for i in (1, 2, 3, 4)],
                origin=net.add("origin", 40),
            )
            net.shape(built.origin, ORIGIN_RATE)
        except NamespacesUnavailable as exc:
            unavailable(f"this machine cannot build the test's hosts: {exc}")
        yield built
    finally:
        net.close()


@dataclass(frozen=True)
class Identity:
    """One service's (or one host's CLI's) NATS identity: its seed file and inbox prefix."""

    role: str
    host: Host
    host_id: str | None
    seed: Path
    inbox: str

    def env(self) -> dict[str, str]:
        """What a process started with this identity is given, and nothing else."""
        return {
            "SWARMFLY_NATS_PREFIX": PREFIX,
            "SWARMFLY_NATS_NKEYS_SEED": str(self.seed),
            "SWARMFLY_NATS_INBOX_PREFIX": self.inbox,
        }


def host_id(role: str, host: Host) -> str | None:
    """Set explicitly, so the permissions can name each storage and peer host."""
    return {"storage": f"seed-{host.name}", "peer": f"peer-{host.name}"}.get(role)


def make_identities(
    folder: Path, wanted: list[tuple[str, Host, str | None]]
) -> tuple[dict[tuple[str, Host], Identity], dict[str, Any]]:
    """An identity for each (role, host, host id) with ``python -m swarmfly.credentials``,
    as an operator deploys several hosts: seeds in one directory per host, and the servers'
    ``authorization`` (public keys and permissions only)."""
    identities = {
        (role, host): Identity(
            role,
            host,
            hid,
            folder / host.name / f"{role}.nk",
            f"{inbox_prefix(role)}_{hid}" if hid else inbox_prefix(role),
        )
        for role, host, hid in wanted
    }
    specs = [
        f"{i.role}{':' + i.host_id if i.host_id else ''}={i.seed}" for i in identities.values()
    ]
    config = folder / "auth.conf"
    subprocess.run(
        [sys.executable, "-m", "swarmfly.credentials", "--prefix", PREFIX,
         "--server-config", str(config), *specs],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    for identity in identities.values():
        assert identity.seed.stat().st_mode & 0o777 == 0o600, identity.seed
        assert identity.seed.read_text().strip() not in config.read_text(), "no seed in it"
    authorization: dict[str, Any] = json.loads(config.read_text())["authorization"]
    return identities, authorization


def nats_config(
    host: Host,
    cluster: list[Host],
    store: Path,
    authorization: dict[str, Any],
    route_password: str,
) -> dict[str, Any]:
    route = f"{ROUTE_USER}:{route_password}"
    return {
        "server_name": host.name,
        "listen": f"{host.ip}:{NATS_PORT}",
        "http": f"{host.ip}:{MONITOR_PORT}",
        "jetstream": {"store_dir": str(store), "max_memory_store": 64 * MiB},
        "authorization": authorization,
        "cluster": {
            "name": "swarmfly",
            "listen": f"{host.ip}:{ROUTE_PORT}",
            # Routes authenticate too: a route sees every message of the account.
            "authorization": {"user": ROUTE_USER, "password": route_password},
            "routes": [
                f"nats://{route}@{other.ip}:{ROUTE_PORT}" for other in cluster if other != host
            ],
        },
    }


def monitor(host: Host, endpoint: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(host.fetch(f"http://{host.ip}:{MONITOR_PORT}/{endpoint}"))
    return data


def routed(host: Host) -> set[str]:
    """The servers one NATS server has routes to (routes come pooled: count names)."""
    return {route["remote_name"] for route in monitor(host, "routez")["routes"]}


def connections(host: Host) -> list[dict[str, Any]]:
    """Client connections of one NATS server (``name``, ``ip``, ...)."""
    found: list[dict[str, Any]] = monitor(host, "connz?limit=1024")["connections"]
    return found


def clients(host: Host) -> Counter[str]:
    """Client connections of one NATS server, by connection name."""
    return Counter(c.get("name", "") for c in connections(host))


def peers_on(found: list[dict[str, Any]], peers: list[Host]) -> list[Host]:
    """The peer hosts whose peer service is among these connections (by its address)."""
    addresses = {c.get("ip") for c in found if c.get("name") == "swarmfly-peer"}
    return [peer for peer in peers if peer.ip in addresses]


def only_services(connections: Counter[str]) -> Counter[str]:
    return Counter({name: n for name, n in connections.items() if name in SERVICE_NAMES})


async def get(
    host: Host, url: str, output: Path, state_dir: Path, servers: list[str], client: Identity
) -> tuple[int, dict[str, Any] | None, str]:
    """`swarmfly get` on ``host``: it finds the host's peer service through its state dir;
    over NATS it would connect as ``client``, the host's CLI identity."""
    command = host.wrap(
        sys.executable, "-m", "swarmfly", "get", url, "-O", str(output), "--json",
        "--state-dir", str(state_dir), "--nats", ",".join(servers),
    )  # fmt: skip
    process = await asyncio.create_subprocess_exec(
        *command,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **FAST_ENV, **client.env()},
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), DEADLINE)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, orjson.loads(out) if out else None, err.decode()


async def test_a_swarm_across_hosts_survives_losing_a_nats_server(
    hosts: Hosts, tmp_path: Path
) -> None:
    data = os.urandom(SIZE)
    digest = hashlib.sha256(data).hexdigest()
    (tmp_path / "origin").mkdir()
    (tmp_path / "origin" / "f.bin").write_bytes(data)
    network, nats_hosts, peer_hosts = hosts.network, hosts.nats, hosts.peers
    scheduler_host, storage_host, origin_host = hosts.scheduler, hosts.storage, hosts.origin

    layout = [("scheduler", scheduler_host), ("storage", storage_host)]
    layout += [("peer", host) for host in peer_hosts]
    wanted = [(role, host, host_id(role, host)) for role, host in layout]
    wanted += [("client", host, host_id("peer", host)) for host in peer_hosts]  # its own peer
    identities, authorization = make_identities(tmp_path / "credentials", wanted)
    route_password = secrets.token_hex(16)

    nats: dict[Host, subprocess.Popen[bytes]] = {}
    for host in nats_hosts:
        folder = tmp_path / host.name
        folder.mkdir()
        config = folder / "nats.conf"
        settings = nats_config(host, nats_hosts, folder / "js", authorization, route_password)
        config.write_text(json.dumps(settings))  # JSON is NATS syntax
        command = host.wrap(find_binary(), "-c", str(config))
        nats[host] = start_process(command, folder / "nats.log", "Server is ready")
    deadline = time.monotonic() + 20
    while any(len(routed(h)) < len(nats_hosts) - 1 for h in nats_hosts):
        assert time.monotonic() < deadline, "the NATS servers did not form a cluster"
        await asyncio.sleep(0.2)
    servers = [f"nats://{h.ip}:{NATS_PORT}" for h in nats_hosts]

    origin = start_origin(origin_host, tmp_path / "origin" / "f.bin")
    services: list[ServiceProcess] = []
    jobs: list[asyncio.Task[tuple[int, dict[str, Any] | None, str]]] = []
    try:

        def start(kind: str, host: Host) -> ServiceProcess:
            # Each service gets every URL, given the repeatable way (`get` uses a comma list),
            # and its own identity only.
            identity = identities[kind, host]
            node = [] if kind == "scheduler" else ["--advertise-ip", host.ip]
            node += ["--host-id", identity.host_id] if identity.host_id else []
            return spawn_service(
                kind, servers[0], tmp_path / host.name, "--nats", servers[1], "--nats",
                servers[2], *node, env={**FAST_ENV, **identity.env()}, wrapper=host.wrap(),
            )  # fmt: skip

        services += await asyncio.gather(
            *(asyncio.to_thread(start, kind, host) for kind, host in layout)
        )
        for host in peer_hosts:
            output, state = tmp_path / f"out-{host.name}", tmp_path / host.name
            job = get(host, origin.url, output, state, servers, identities["client", host])
            jobs.append(asyncio.create_task(job))
        deadline = time.monotonic() + 20
        while network.sent(origin_host) < 4 * MiB:
            assert time.monotonic() < deadline, "the seed never read the origin"
            assert not any(job.done() for job in jobs), "a download ended early"
            await asyncio.sleep(0.1)

        # The victim carries downloads: the server with the most downloading peers (4 peers
        # on 3 servers: at least 2), then the most services.
        found = {host: connections(host) for host in nats_hosts}
        load = {host: Counter(c.get("name", "") for c in found[host]) for host in nats_hosts}
        victim = max(
            nats_hosts,
            key=lambda h: (len(peers_on(found[h], peer_hosts)), only_services(load[h]).total()),
        )
        cut_off = peers_on(found[victim], peer_hosts)
        assert cut_off, f"no peer is connected to {victim.name}: {load}"
        nats[victim].kill()
        nats[victim].wait(timeout=10)
        assert not any(job.done() for job in jobs), "the kill came after a download ended"

        results = await asyncio.gather(*jobs)
        for host, (code, summary, err) in zip(peer_hosts, results, strict=True):
            assert code == 0, f"{host.name}: {err}"
            assert summary is not None and summary["via"] == "peer", f"{host.name}: {summary}"
            output = tmp_path / f"out-{host.name}"
            assert hashlib.sha256(output.read_bytes()).hexdigest() == digest, host.name

        # Every service reconnected to a surviving server by itself.
        survivors = [h for h in nats_hosts if h != victim]
        expected = Counter(dict(zip(SERVICE_NAMES, (1, 1, len(peer_hosts)), strict=True)))
        deadline = time.monotonic() + 10
        while (
            connected := sum((only_services(clients(h)) for h in survivors), Counter[str]())
        ) != expected:
            assert time.monotonic() < deadline, f"connected: {connected}; victim {victim.name}"
            await asyncio.sleep(0.2)
        moved = [c for h in survivors for c in connections(h)]
        assert peers_on(moved, peer_hosts) == peer_hosts, "cut-off peers reconnected elsewhere"
        for service in services:
            assert service.process.poll() is None, f"{service.kind} died: {service.log()}"

        # The permissions are in force in this topology: from a peer host, that peer's own
        # identity may not read registrations (they carry origin credentials), seed requests
        # or another peer's requests, only its own; and no one connects without one.
        spy, other = peer_hosts[0], peer_hosts[1]
        own = identities["peer", spy]
        url = servers[nats_hosts.index(survivors[0])]
        p = f"{PREFIX}.v1"
        forbidden = [f"{p}.scheduler.*.register.>", f"{p}.storage.*.seed",
                     f"{p}.peer.{host_id('peer', other)}.>"]  # fmt: skip
        allowed = f"{p}.peer.{own.host_id}.>"
        seen = probe_from(spy, url, [*forbidden, allowed], own.seed, own.inbox)
        assert seen["connected"], seen
        assert seen["refused"] == {**dict.fromkeys(forbidden, True), allowed: False}, seen
        anonymous = probe_from(spy, url, [f"{p}.scheduler.*.register"])
        assert not anonymous["connected"], anonymous
        assert "authorization violation" in str(anonymous["error"]).lower(), anonymous
    finally:
        for job in jobs:
            job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)
        served = origin.stop()
        for service in services:
            service.stop()
    assert served["bytes_served"] <= SIZE * 5 // 4, f"peers fell back to the origin: {served}"
