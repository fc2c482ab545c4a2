"""IPv6: hosts that listen on and advertise ``::1`` serve each other through the swarm."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from swarmfly.config import Config
from swarmfly.content import SourceRequest
from swarmfly.natsserver import NatsServer
from swarmfly.testing import Origin, in_process_cluster

MiB = 1024 * 1024


def on_ipv6(config: Config) -> None:
    for section in (config.peer, config.storage):
        section.listen = section.advertise_ip = "::1"
    config.proxy.listen = "::1"
    config.scheduler.listen = "::1"


async def test_a_download_between_hosts_on_ipv6_loopback(
    nats: NatsServer, prefix: str, tmp_path: Path
) -> None:
    data = os.urandom(5 * MiB + 3)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    async with (
        Origin().serve(host="::1") as origin,
        in_process_cluster(nats.url, prefix, tmp_path, configure=on_ipv6) as cluster,
    ):
        url = origin.add("f.bin", data)
        assert url.startswith("http://[::1]:")
        for node in (cluster.peer.node, cluster.storage.node):
            assert node.upload_url.startswith("http://[::1]:"), node.upload_url
        assert cluster.proxy.url.startswith("http://[::1]:"), cluster.proxy.url
        assert cluster.scheduler.http_url.startswith("http://[::1]:"), cluster.scheduler.http_url
        result = await cluster.peer.node.download(SourceRequest(url, digest=digest))
        assert result.bytes_p2p == len(data), "the storage read the origin, the peer the storage"
        stored = cluster.peer.node.store.open(result.task_id)
        assert stored.data_path.read_bytes() == data
        (host,) = [
            h for h in cluster.scheduler.snapshot()["hosts"]
            if h["id"] == cluster.peer.node.settings.host_id
        ]  # fmt: skip
        assert host["address"].startswith("http://[::1]:")


def test_a_host_advertises_the_address_that_reaches_nats_v4_or_v6() -> None:
    from swarmfly.services.peer.host import route_ip

    assert route_ip(["nats://[::1]:4222"]) == "::1"
    assert route_ip(["nats://127.0.0.1:4222"]) == "127.0.0.1"
    assert route_ip(["tls://localhost:4222"]) in ("127.0.0.1", "::1")


async def test_nats_on_ipv6_loopback_carries_the_control_plane(tmp_path: Path) -> None:
    """The embedded nats-server listens on ``::1``; services and the CLI's client reach it."""
    server = NatsServer(tmp_path / "nats", host="::1").start()
    try:
        assert server.url.startswith("nats://[::1]:")
        data = os.urandom(2 * MiB)
        async with (
            Origin().serve(host="::1") as origin,
            in_process_cluster(server.url, "v6", tmp_path / "c", configure=on_ipv6) as cluster,
        ):
            url = origin.add("g.bin", data)
            result = await cluster.peer.node.download(SourceRequest(url))
            assert result.bytes_p2p == len(data)
            assert cluster.peer.node.ip == "::1"
    finally:
        server.stop()
