"""The proxy against a real HTTP upstream that answers on registry paths: blobs through the
swarm (streamed, ranged, verified), pass-through of everything else, the upstream choice,
auth, HTTP proxy mode with CONNECT, and bad requests. The e2e suite does the same against
Debian's docker-registry with skopeo."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from swarmfly import metrics
from swarmfly.config import Config
from swarmfly.natsserver import NatsServer
from swarmfly.testing import InProcessCluster, Origin, in_process_cluster

MiB = 1024 * 1024
NAME = "team/app"
pytestmark = pytest.mark.timeout(60)


def digest_of(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def blob_path(data: bytes, name: str = NAME) -> str:
    return f"v2/{name}/blobs/{digest_of(data)}"


@pytest.fixture
async def upstream() -> AsyncIterator[Origin]:
    """A registry-shaped origin: 8 MiB/s, so a blob of several pieces takes a while."""
    async with Origin(rate=8 * MiB).serve() as served:
        yield served


@pytest.fixture
async def cluster(
    nats: NatsServer, prefix: str, tmp_path: Path, upstream: Origin
) -> AsyncIterator[InProcessCluster]:
    def configure(config: Config) -> None:
        config.proxy.registries = [upstream.url, "https://registry.example.invalid"]
        config.proxy.rules = [r"^http://127\.0\.0\.1:\d+/files/"]
        config.proxy.hosts = ["127.0.0.1"]

    async with in_process_cluster(nats.url, prefix, tmp_path, configure=configure) as running:
        yield running


async def get(
    url: str, headers: dict[str, str] | None = None, proxy: str | None = None
) -> tuple[int, dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session,
        session.get(url, headers=headers or {}, proxy=proxy, allow_redirects=False) as response,
    ):
        return response.status, dict(response.headers), await response.read()


def requests_of(kind: str) -> float:
    return metrics.PROXY_REQUESTS.labels(kind=kind)._value.get()


async def test_blob_streams_through_the_swarm_before_it_is_complete(
    cluster: InProcessCluster, upstream: Origin
) -> None:
    data = os.urandom(24 * MiB + 5)  # 6 pieces of 4 MiB at 8 MiB/s: about 3 s
    upstream.add(blob_path(data), data)
    before = requests_of("blob")
    received = bytearray()
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{cluster.proxy.url}/{blob_path(data)}") as response,
    ):
        assert response.status == 200
        assert response.headers["Docker-Content-Digest"] == digest_of(data)
        assert response.headers["Content-Length"] == str(len(data))
        received += await response.content.readexactly(MiB)
        # The first bytes are here while the upstream is still sending the blob.
        assert upstream.bytes_served < len(data)
        received += await response.read()
    assert bytes(received) == data
    assert requests_of("blob") == before + 1
    assert upstream.bytes_served <= len(data) * 1.05  # the seed read it; the peer got it P2P


async def test_ranges_and_a_second_pull_from_the_cache(
    cluster: InProcessCluster, upstream: Origin
) -> None:
    data = os.urandom(9 * MiB + 123)
    upstream.add(blob_path(data), data)
    url = f"{cluster.proxy.url}/{blob_path(data)}"
    status, headers, body = await get(url, {"Range": f"bytes={5 * MiB}-{5 * MiB + 99}"})
    assert status == 206
    assert headers["Content-Range"] == f"bytes {5 * MiB}-{5 * MiB + 99}/{len(data)}"
    assert body == data[5 * MiB : 5 * MiB + 100]
    served = upstream.bytes_served
    status, _, body = await get(url, {"Range": "bytes=-10"})
    assert (status, body) == (206, data[-10:])
    status, _, body = await get(url)
    assert (status, body) == (200, data)
    status, headers, _ = await get(url, {"Range": f"bytes={len(data)}-"})
    assert status == 416 and headers["Content-Range"] == f"bytes */{len(data)}"
    assert upstream.bytes_served == served, "a cached blob went back to the upstream"


async def test_a_blob_that_does_not_match_its_digest_is_never_delivered_whole(
    cluster: InProcessCluster, upstream: Origin
) -> None:
    data = os.urandom(6 * MiB)
    upstream.add(blob_path(data), os.urandom(len(data)))  # same size, other bytes
    received = bytearray()
    with pytest.raises(aiohttp.ClientError):
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{cluster.proxy.url}/{blob_path(data)}") as response,
        ):
            async for chunk in response.content.iter_any():
                received += chunk
    assert len(received) < len(data)


async def test_everything_else_passes_through_and_tags_are_never_stale(
    cluster: InProcessCluster, upstream: Origin
) -> None:
    upstream.add(f"v2/{NAME}/manifests/latest", b'{"v": 1}')
    url = f"{cluster.proxy.url}/v2/{NAME}/manifests/latest"
    assert (await get(url))[2] == b'{"v": 1}'
    upstream.add(f"v2/{NAME}/manifests/latest", b'{"v": 2}')
    status, headers, body = await get(url)
    assert (status, body) == (200, b'{"v": 2}')
    assert "etag" in {key.lower() for key in headers}
    # HEAD of a blob goes to the upstream too (and is answered without a body).
    data = os.urandom(1000)
    upstream.add(blob_path(data), data)
    async with (
        aiohttp.ClientSession() as session,
        session.head(f"{cluster.proxy.url}/{blob_path(data)}") as response,
    ):
        assert response.status == 200
        assert response.headers["Content-Length"] == "1000"


async def test_upstream_choice_and_no_open_relay(
    cluster: InProcessCluster, upstream: Origin
) -> None:
    upstream.add(f"v2/{NAME}/manifests/v1", b"m")
    base = f"{cluster.proxy.url}/v2/{NAME}/manifests/v1"
    host = upstream.url.removeprefix("http://")
    assert (await get(f"{base}?ns={host}"))[0] == 200
    assert (await get(base, {"X-Swarmfly-Registry": upstream.url}))[0] == 200
    for headers, query in [
        ({"X-Swarmfly-Registry": "evil.example.com"}, ""),
        ({}, "?ns=evil.example.com"),
        ({"X-Swarmfly-Registry": f"https://{host}"}, ""),  # configured as http only
    ]:
        status, _, body = await get(base + query, headers)
        assert status == 403
        assert b'"DENIED"' in body


async def test_private_blob_needs_this_clients_credentials(
    cluster: InProcessCluster, upstream: Origin, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "Basic c2VjcmV0LXVzZXI6czNjcjN0"
    upstream.required_headers = {"Authorization": secret}
    data = os.urandom(5 * MiB)
    upstream.add(blob_path(data), data)
    url = f"{cluster.proxy.url}/{blob_path(data)}"
    status, _, body = await get(url, {"Authorization": secret})
    assert (status, body) == (200, data)
    for headers in ({}, {"Authorization": "Basic d3Jvbmc6d3Jvbmc="}):
        status, _, body = await get(url, headers)  # cached in the swarm, still refused
        assert status == 401 and body != data
    assert secret not in caplog.text
    stored = "".join(p.read_text() for p in cluster.config.state_dir.rglob("meta.json"))
    assert secret not in stored and "c2VjcmV0" not in stored


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        (f"/v2/{NAME}/blobs/sha256:1234", 400, "DIGEST_INVALID"),
        (f"/v2/{NAME}/blobs/sha256:{'G' * 64}", 400, "DIGEST_INVALID"),
        ("/v2/team/../../etc/blobs/sha256:" + "0" * 64, 400, "NAME_INVALID"),
        ("/v2/team/%2e%2e/x/blobs/sha256:" + "0" * 64, 400, "NAME_INVALID"),
        ("/v2/Team/App/manifests/latest", 400, "NAME_INVALID"),
        (f"/v2/{NAME}/manifests/..%2fx", 400, "MANIFEST_INVALID"),
        ("/etc/passwd", 404, "NOT_FOUND"),
    ],
)
async def test_bad_requests_get_registry_errors(
    cluster: InProcessCluster, path: str, status: int, code: str
) -> None:
    reader, writer = await asyncio.open_connection(*cluster.proxy.url[7:].split(":"))
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert answer.startswith(f"HTTP/1.1 {status}".encode()), answer[:200]
    assert f'"code":"{code}"'.encode() in answer
    assert (await get(f"{cluster.proxy.url}/healthz"))[0] == 200


async def test_huge_headers_are_refused_and_the_proxy_keeps_serving(
    cluster: InProcessCluster,
) -> None:
    status, _, body = await get(f"{cluster.proxy.url}/v2/", {"X-Big": "a" * 40_000})
    assert status == 431 and b"errors" in body
    status, _, _ = await get(f"{cluster.proxy.url}/v2/", {"X-Big": "a" * 200_000})
    assert 400 <= status < 500
    assert (await get(f"{cluster.proxy.url}/healthz"))[0] == 200


async def test_http_proxy_mode(cluster: InProcessCluster, upstream: Origin) -> None:
    data = os.urandom(5 * MiB)
    url = upstream.add("files/tool.bin", data)
    proxy = cluster.proxy.url
    before = requests_of("http_swarm")
    assert (await get(url, proxy=proxy))[2] == data
    served = upstream.bytes_served
    assert (await get(url, proxy=proxy))[2] == data  # the second time from the peer's cache
    assert requests_of("http_swarm") == before + 2
    assert upstream.bytes_served - served < MiB
    other = upstream.add("other.txt", b"plain")  # allowed host, no rule: passes through
    assert (await get(other, proxy=proxy))[:3:2] == (200, b"plain")
    status, _, _ = await get("http://example.invalid/x", proxy=proxy)
    assert status == 403


async def test_connect_tunnels_to_allowed_hosts_only(
    cluster: InProcessCluster, upstream: Origin
) -> None:
    upstream.add("hello", b"through the tunnel")
    host, port = cluster.proxy.url[7:].split(":")
    target = upstream.url.removeprefix("http://")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    writer.write(f"GET /hello HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n".encode())
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert answer.endswith(b"through the tunnel")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"CONNECT example.invalid:443 HTTP/1.1\r\nHost: example.invalid:443\r\n\r\n")
    assert (await asyncio.wait_for(reader.read(), 10)).startswith(b"HTTP/1.1 403")
    writer.close()
