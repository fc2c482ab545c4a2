"""URLs that arrive over NATS pass [origins] (issue 13, item 7: SSRF with read-back).

A member of the cluster asks storage to preheat or seed, or a peer to download, a URL on a
metadata or internal address, directly or through a redirect from an allowed origin. Each is
refused with ``forbidden`` before any connection (a socket audit hook sees every connect this
process makes), the internal origin sees no request, and the services keep serving.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from nats import connect as connect_nats
from nats.aio.client import Client as NatsClient

from swarmfly import contracts
from swarmfly.config import Config
from swarmfly.natsserver import NatsServer
from swarmfly.testing import (
    InProcessCluster,
    Origin,
    in_process_cluster,
    subject_tokens,
    wait_until,
)

pytestmark = pytest.mark.timeout(120)

METADATA = "http://169.254.169.254/latest/meta-data/"
DATA = b"allowed origin " * 5000
_connects: list[Any] | None = None


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event == "socket.connect" and _connects is not None:
        _connects.append(args[1])


sys.addaudithook(_audit)  # hooks cannot be removed: this one records only inside `connects`


@contextmanager
def connects() -> Iterator[list[Any]]:
    """Every address this process connects a socket to meanwhile."""
    global _connects
    _connects = seen = []
    try:
        yield seen
    finally:
        _connects = None


def internal(seen: list[Any]) -> list[Any]:
    """Connections to anything but loopback on 127.0.0.1 (NATS, the origins, the uploads)."""
    return [a for a in seen if not (isinstance(a, tuple) and a[0] == "127.0.0.1")]


@asynccontextmanager
async def redirector(target: str) -> AsyncIterator[str]:
    """An allowed origin whose every URL redirects to ``target``."""

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(target)

    app = web.Application()
    app.router.add_get("/{name:.*}", redirect)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[-1][1]}/file.bin"
    finally:
        await runner.cleanup()


class Raw:
    """Requests sent as any cluster member can: plain NATS, no swarmfly client."""

    def __init__(self, nc: NatsClient, cluster: InProcessCluster, prefix: str) -> None:
        self.nc, self.cluster, self.prefix = nc, cluster, prefix

    async def ask(self, name: str, url: str, output: Path | None = None) -> dict[str, Any]:
        request: dict[str, Any] = {"source": {"url": url}, "timeout_s": 30}
        if name == "storage.{host_id}.seed":
            request = {"task_id": "a" * 64, "source": {"url": url}}
        elif name == "peer.{host_id}.download":
            request["download_id"] = f"dl-{uuid.uuid4().hex[:8]}"
            request["output"] = str(output)
        subject = contracts.get(name).subject(
            self.prefix, **subject_tokens(name, self.cluster.hosts)
        )
        msg = await self.nc.request(subject, orjson.dumps(request), timeout=40)
        body: dict[str, Any] = orjson.loads(msg.data)
        if "error" in body:
            assert (msg.headers or {}).get("Nats-Service-Error-Code") == "403", body
        return body


@asynccontextmanager
async def running(
    nats: NatsServer, root: Path, deny: list[str]
) -> AsyncIterator[tuple[Raw, InProcessCluster]]:
    prefix = f"t{uuid.uuid4().hex[:12]}"
    (root / "out").mkdir()

    def configure(config: Config) -> None:
        config.origins.deny = deny
        config.peer.output_roots = [str(root / "out")]

    async with in_process_cluster(nats.url, prefix, root, configure=configure) as cluster:
        nc = await connect_nats(servers=[nats.url], connect_timeout=3, max_reconnect_attempts=0)
        try:
            yield Raw(nc, cluster, prefix), cluster
        finally:
            await nc.close()


NAMES = ["storage.preheat", "storage.{host_id}.seed", "peer.{host_id}.download"]


async def test_metadata_and_internal_origins_are_refused_directly_and_after_a_redirect(
    nats: NatsServer, tmp_path: Path
) -> None:
    internal_origin = Origin()
    async with (
        Origin().serve() as allowed,
        internal_origin.serve(host="127.0.0.2") as hidden,
        running(nats, tmp_path, deny=["127.0.0.2"]) as (raw, cluster),
    ):
        secret = hidden.add("secret.bin", b"internal only")
        async with redirector(METADATA) as to_metadata, redirector(secret) as to_hidden:
            cases = [
                (METADATA, "http://169.254.169.254/ is not an allowed origin"
                           " ([origins] deny: cloud metadata)"),
                ("http://169.254.10.1:8080/x", "([origins] deny: link-local)"),
                ("http://[fd00:ec2::254]/latest/", "deny: cloud metadata"),
                (secret, f"{hidden.url}/ is not an allowed origin ([origins] deny: 127.0.0.2)"),
                (to_metadata, "http://169.254.169.254/ is not an allowed origin"),
                (to_hidden, "127.0.0.2"),
            ]  # fmt: skip
            for name in NAMES:
                for url, message in cases:
                    output = tmp_path / "out" / f"{uuid.uuid4().hex}.bin"
                    with connects() as seen:
                        body = await raw.ask(name, url, output)
                        if name == "storage.{host_id}.seed" and url in (to_metadata, to_hidden):
                            # The redirect shows only once the seed reads: accepted, then
                            # refused at the redirect (logged), before connecting there.
                            assert body["accepted"] is True, body
                            await wait_until(lambda: not cluster.storage._seeding)
                            continue
                    assert body["error"]["code"] == "forbidden", (name, url, body)
                    assert message in body["error"]["message"], (name, url, body)
                    assert internal(seen) == [], (name, url, seen)
                    assert not output.exists()
        assert hidden.requests == 0, "the internal origin was never asked"
        assert list((tmp_path / "out").iterdir()) == []
        # The services keep serving what is allowed.
        url = allowed.add("ok.bin", DATA)
        preheated = await raw.ask("storage.preheat", url)
        assert preheated["content_length"] == len(DATA), preheated
        output = tmp_path / "out" / "ok.bin"
        reply = await raw.ask("peer.{host_id}.download", url, output)
        assert reply["content_length"] == len(DATA), reply
        assert output.read_bytes() == DATA
        assert cluster.peer.node.settings.host_id


async def test_an_operator_deny_of_loopback_refuses_an_origin_on_127_0_0_1(
    nats: NatsServer, tmp_path: Path
) -> None:
    origin = Origin()
    async with (
        origin.serve() as served,
        running(nats, tmp_path, deny=["127.0.0.0/8", "::1"]) as (raw, _),
    ):
        url = served.add("local.bin", DATA)
        for name in NAMES:
            body = await raw.ask(name, url, tmp_path / "out" / "local.bin")
            assert body["error"]["code"] == "forbidden", (name, body)
            assert "([origins] deny: 127.0.0.0/8)" in body["error"]["message"], body
            body = await raw.ask(name, url.replace("127.0.0.1", "localhost"), tmp_path / "out/x")
            assert body["error"]["code"] == "forbidden", (name, body)
        assert origin.requests == 0 and origin.probes == 0
        assert not (tmp_path / "out" / "local.bin").exists()
