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
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web
from yarl import URL

from swarmfly.config import Config
from swarmfly.httpserver import serve_http
from swarmfly.natsserver import NatsServer
from swarmfly.status import gather
from swarmfly.testing import InProcessCluster, Origin, in_process_cluster, spawn_service
from tests.conftest import FAST_ENV
from tests.integration.test_tracing import CLIENT_SPAN, CLIENT_TRACE, CLIENT_TRACEPARENT, Receiver

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


@dataclass
class Received:
    method: str
    raw_path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Recorder:
    """An upstream that records every request as it arrived and answers 207 with a body and
    headers of its own, so a test sees what passed through, both ways."""

    url: str = ""
    received: list[Received] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        self.received.append(
            Received(request.method, request.raw_path, dict(request.headers), await request.read())
        )
        return web.Response(
            status=207,
            body=b'{"token": "from upstream"}',
            headers={"X-Upstream": "recorder", "WWW-Authenticate": 'Bearer realm="x"'},
            content_type="application/json",
        )


@pytest.fixture
async def recorder() -> AsyncIterator[Recorder]:
    made = Recorder()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", made.handle)
    async with AsyncExitStack() as stack:
        made.url = await serve_http(stack, app, "127.0.0.1", 0)
        yield made


@pytest.fixture
async def cluster(
    nats: NatsServer, prefix: str, tmp_path: Path, upstream: Origin, recorder: Recorder
) -> AsyncIterator[InProcessCluster]:
    def configure(config: Config) -> None:
        config.proxy.registries = [upstream.url, recorder.url, "https://registry.example.invalid"]
        config.proxy.rules = [r"^http://127\.0\.0\.1:\d+/files/"]
        config.proxy.hosts = ["127.0.0.1"]

    async with in_process_cluster(nats.url, prefix, tmp_path, configure=configure) as running:
        yield running


async def get(
    url: str, headers: dict[str, str] | None = None, proxy: str | None = None
) -> tuple[int, dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session,
        session.get(
            URL(url, encoded=True), headers=headers or {}, proxy=proxy, allow_redirects=False
        ) as response,
    ):
        return response.status, dict(response.headers), await response.read()


def requests_of(cluster: InProcessCluster, kind: str) -> float:
    """The proxy's own count (its registry: the peer beside it counts apart)."""
    value = cluster.proxy.metrics.registry.get_sample_value(
        "swarmfly_proxy_requests_total", {"kind": kind}
    )
    return value or 0.0


async def test_blob_streams_through_the_swarm_before_it_is_complete(
    cluster: InProcessCluster, upstream: Origin
) -> None:
    data = os.urandom(24 * MiB + 5)  # 6 pieces of 4 MiB at 8 MiB/s: about 3 s
    upstream.add(blob_path(data), data)
    before = requests_of(cluster, "blob")
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
    assert requests_of(cluster, "blob") == before + 1
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
        (f"/v2/{NAME}/manifests/..%2fx", 400, "NAME_INVALID"),
        (f"/v2/{NAME}/manifests/a%252e/..%252fx", 400, "NAME_INVALID"),
        (f"/v2/{NAME}/manifests/-x", 400, "MANIFEST_INVALID"),
        ("/v2/a/tags/..\\x", 400, "NAME_INVALID"),
        ("/token/%2E%2E/%2e%2e/etc/passwd", 400, "UNSUPPORTED"),
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


async def raw_exchange(proxy_url: str, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """``request`` as bytes on a fresh connection, read to the end: what a careless client
    that writes its whole request before it reads sees."""
    host, port = proxy_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    return int(status_line.split()[1]), headers, body


def assert_registry_error(status: int, headers: dict[str, str], body: bytes, code: str) -> None:
    assert 400 <= status < 500
    content_type = {k.lower(): v for k, v in headers.items()}["content-type"]
    assert content_type.startswith("application/json")
    errors = orjson.loads(body)["errors"]
    assert [e["code"] for e in errors] == [code] and errors[0]["message"]


@pytest.mark.parametrize("size", [40_000, 100 * 1024, 1024 * 1024], ids=["40K", "100K", "1M"])
async def test_huge_headers_are_refused_and_the_proxy_keeps_serving(
    cluster: InProcessCluster, upstream: Origin, size: int
) -> None:
    secret = "Bearer hug3-s3cret"
    big = f"Authorization: {secret}{'a' * size}\r\n".encode()
    refused = requests_of(cluster, "refused")
    status, headers, body = await raw_exchange(
        cluster.proxy.url, b"GET /v2/ HTTP/1.1\r\nHost: x\r\n" + big + b"\r\n"
    )
    assert status == 431
    assert_registry_error(status, headers, body, "UNSUPPORTED")
    assert secret.encode() not in body
    # A client that reads while it writes (aiohttp) gets the same answer.
    status, headers, body = await get(f"{cluster.proxy.url}/v2/", {"X-Big": "a" * size})
    assert_registry_error(status, headers, body, "UNSUPPORTED")
    assert requests_of(cluster, "refused") == refused + 2
    data = os.urandom(MiB)
    upstream.add(blob_path(data), data)
    assert (await get(f"{cluster.proxy.url}/{blob_path(data)}"))[::2] == (200, data)


async def test_what_is_not_http_gets_a_registry_error(cluster: InProcessCluster) -> None:
    # What containers/image sends first to an "insecure" mirror: a TLS ClientHello.
    hello = bytes.fromhex("16030100f4010000f00303") + os.urandom(32) + b"\x00" * 64
    status, headers, body = await raw_exchange(cluster.proxy.url, hello)
    assert status == 400
    assert_registry_error(status, headers, body, "UNSUPPORTED")
    assert (await get(f"{cluster.proxy.url}/healthz"))[0] == 200


async def test_everything_but_blobs_passes_through_to_the_configured_upstream_untouched(
    cluster: InProcessCluster, recorder: Recorder
) -> None:
    host = recorder.url.removeprefix("http://")
    secret = "Basic cGFzc3Rocm91Z2g6czNjcjN0"
    asks = [
        ("GET", f"/token?service=x&scope=repository:team/app:pull&ns={host}", {}, b""),
        ("GET", "/v2/_catalog?n=10&last=a%2Fb", {"X-Swarmfly-Registry": recorder.url}, b""),
        ("GET", f"/v2/?ns={host}", {}, b""),
        ("POST", f"/v2/{NAME}/blobs/uploads/?ns={host}", {}, b"chunk"),
        ("PATCH", f"/some/other/path%20x?a=1&ns={host}&b=2", {}, b"more"),
    ]
    for method, path, headers, body in asks:
        async with (
            aiohttp.ClientSession() as session,
            session.request(
                method,
                URL(f"{cluster.proxy.url}{path}", encoded=True),
                headers={**headers, "Authorization": secret, "Accept": "application/json"},
                data=body or None,
            ) as response,
        ):
            assert response.status == 207, (path, await response.text())
            assert response.headers["X-Upstream"] == "recorder"
            assert response.headers["WWW-Authenticate"] == 'Bearer realm="x"'
            assert await response.read() == b'{"token": "from upstream"}'
        got = recorder.received[-1]
        sent_path = path.replace(f"&ns={host}", "").replace(f"?ns={host}", "")
        assert (got.method, got.raw_path, got.body) == (method, sent_path, body)
        assert got.headers["Authorization"] == secret
        assert got.headers["Host"] == host, "the upstream's own name, not the proxy's"
        assert "X-Swarmfly-Registry" not in got.headers
    assert len(recorder.received) == len(asks)
    # Never to an unconfigured upstream, never a climb out of the path.
    for path, headers, code in [
        ("/token?ns=evil.example.com", {}, "DENIED"),
        ("/token", {"X-Swarmfly-Registry": "http://evil.example.com"}, "DENIED"),
        (f"/a/%2e%2e/b?ns={host}", {}, "UNSUPPORTED"),
    ]:
        status, answer_headers, body = await get(f"{cluster.proxy.url}{path}", headers)
        assert_registry_error(status, answer_headers, body, code)
    assert len(recorder.received) == len(asks)


async def test_health_metrics_and_discovery_while_a_blob_streams(
    cluster: InProcessCluster, upstream: Origin
) -> None:
    data = os.urandom(12 * MiB)  # 1.5 s at 8 MiB/s
    upstream.add(blob_path(data), data)
    refused = requests_of(cluster, "refused")
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{cluster.proxy.url}/{blob_path(data)}") as response,
    ):
        assert response.status == 200
        received = await response.content.readexactly(MiB)
        assert upstream.bytes_served < len(data), "still streaming"
        status, headers, body = await get(f"{cluster.proxy.url}/healthz")
        assert (status, orjson.loads(body)) == (200, {"ok": True})
        status, headers, body = await get(f"{cluster.proxy.url}/metrics")
        assert status == 200 and headers["Content-Type"].startswith("text/plain")
        assert b'swarmfly_proxy_requests_total{kind="blob"}' in body
        received += await response.read()
    assert received == data
    assert requests_of(cluster, "refused") == refused, "its own paths are no refusals"
    # `swarmfly status` lists the proxy with its host and address.
    status_now = await gather(cluster.config)
    proxies = [s for s in status_now["services"] if s["name"] == "proxy"]
    assert [(p["metadata"]["host_id"], p["metadata"]["url"]) for p in proxies] == [
        (cluster.peer.node.settings.host_id, cluster.proxy.url)
    ]


async def test_http_proxy_mode(cluster: InProcessCluster, upstream: Origin) -> None:
    data = os.urandom(5 * MiB)
    url = upstream.add("files/tool.bin", data)
    proxy = cluster.proxy.url
    before = requests_of(cluster, "http_swarm")
    assert (await get(url, proxy=proxy))[2] == data
    served = upstream.bytes_served
    assert (await get(url, proxy=proxy))[2] == data  # the second time from the peer's cache
    assert requests_of(cluster, "http_swarm") == before + 2
    assert upstream.bytes_served - served < MiB
    other = upstream.add("other.txt", b"plain")  # allowed host, no rule: passes through
    assert (await get(other, proxy=proxy))[:3:2] == (200, b"plain")
    status, _, _ = await get("http://example.invalid/x", proxy=proxy)
    assert status == 403
    status, headers, body = await raw_exchange(
        proxy, b"GET http://127.0.0.1:99999/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert_registry_error(status, headers, body, "UNSUPPORTED")


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
    for request, code in [
        (b"CONNECT example.invalid:443 HTTP/1.1\r\nHost: example.invalid:443\r\n\r\n", "DENIED"),
        (b"CONNECT example.invalid HTTP/1.1\r\n\r\n", "UNSUPPORTED"),
    ]:
        status, headers, body = await raw_exchange(cluster.proxy.url, request)
        assert_registry_error(status, headers, body, code)


async def test_an_allowed_host_opens_only_its_allowed_ports(
    cluster: InProcessCluster, upstream: Origin, nats: NatsServer
) -> None:
    """Registries and ``hosts`` on 127.0.0.1: the real nats-server on 127.0.0.1 stays out of
    reach, by CONNECT and by HTTP proxy mode; the registry's own host:port still tunnels."""
    nats_port = int(nats.url.rsplit(":", 1)[1])
    for target in (f"127.0.0.1:{nats_port}", f"localhost:{nats_port}", "127.0.0.1:4222"):
        status, headers, body = await raw_exchange(
            cluster.proxy.url, f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode()
        )
        assert status == 403, target
        assert_registry_error(status, headers, body, "DENIED")
        assert b"INFO" not in body and b"server_id" not in body, "NATS answered through it"
    status, headers, body = await raw_exchange(
        cluster.proxy.url,
        f"GET http://127.0.0.1:{nats_port}/ HTTP/1.1\r\nHost: 127.0.0.1:{nats_port}\r\n"
        "Connection: close\r\n\r\n".encode(),
    )
    assert_registry_error(status, headers, body, "DENIED")
    # The registry's own host and port: tunnelled, and answering.
    upstream.add("hello", b"still tunnelled")
    target = upstream.url.removeprefix("http://")
    host, port = cluster.proxy.url[7:].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        writer.write(f"GET /hello HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n".encode())
        assert (await asyncio.wait_for(reader.read(), 10)).endswith(b"still tunnelled")
    finally:
        writer.close()


async def test_proxy_spans_name_host_and_port_and_never_userinfo(
    nats: NatsServer, prefix: str, tmp_path: Path
) -> None:
    receiver = Receiver()
    app = web.Application(client_max_size=64 * MiB)
    app.router.add_post("/v1/traces", receiver.traces)
    secret = "pr0xy-s3cret"
    data = os.urandom(2 * MiB)
    async with AsyncExitStack() as stack:
        endpoint = await serve_http(stack, app, "127.0.0.1", 0)
        origin = await stack.enter_async_context(Origin().serve())
        origin.add("files/tool.bin", data)
        origin.add("other.txt", b"plain")
        origin.add("hello", b"tunnelled")
        port = origin.url.rsplit(":", 1)[1]
        env = {
            **FAST_ENV,
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "SWARMFLY_PROXY_RULES": r"^http://[^/]*127\.0\.0\.1:\d+/files/",
            "SWARMFLY_PROXY_HOSTS": "127.0.0.1",
        }
        registry = ("--proxy-port", "0", "--registry", f"http://alice:{secret}@127.0.0.1:{port}")
        services = [
            spawn_service(kind, nats.url, tmp_path / kind, "--prefix", prefix, *args, env=env)
            for kind, args in (("scheduler", ()), ("storage", ()), ("peer", registry))
        ]
        try:
            proxy = services[2].proxy_url
            userinfo = f"http://alice:{secret}@127.0.0.1:{port}"
            traced = f"traceparent: {CLIENT_TRACEPARENT}\r\n"
            for target, want in (
                (f"{userinfo}/files/tool.bin", data),
                (f"{userinfo}/other.txt", b"plain"),
            ):
                status, _, body = await raw_exchange(
                    proxy,
                    f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{traced}"
                    "Connection: close\r\n\r\n".encode(),
                )
                assert (status, body) == (200, want)
            status, _, _ = await raw_exchange(
                proxy, f"GET /v2/ HTTP/1.1\r\nHost: x\r\n{traced}Connection: close\r\n\r\n".encode()
            )
            assert status == 404, "the upstream's own answer"
            host, proxy_port = proxy.removeprefix("http://").split(":")
            reader, writer = await asyncio.open_connection(host, int(proxy_port))
            writer.write(
                f"CONNECT alice:{secret}@127.0.0.1:{port} HTTP/1.1\r\n{traced}\r\n".encode()
            )
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
            writer.write(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert (await asyncio.wait_for(reader.read(), 10)).endswith(b"tunnelled")
            writer.close()
        finally:
            # Stopped off the loop: the receiver on this loop must take their last spans.
            await asyncio.gather(*(asyncio.to_thread(service.stop) for service in services))
    spans = {s.name: s for s in receiver.spans if s.trace_id == CLIENT_TRACE}
    wanted = {"proxy http": "200", "proxy passthrough": "404", "proxy connect": "200"}
    assert set(wanted) <= set(spans), sorted(spans)
    for name, code in wanted.items():
        span = spans[name]
        assert span.parent_id == CLIENT_SPAN and span.service == "swarmfly-peer"
        assert span.attributes["server.address"] == "127.0.0.1"
        assert span.attributes["server.port"] == port
        assert span.attributes["http.response.status_code"] == code, name
    assert spans["proxy connect"].attributes["http.request.method"] == "CONNECT"
    assert spans["proxy passthrough"].attributes["url.path"] == "/v2/"
    proxied = [s for s in receiver.spans if s.name == "proxy http"]
    assert sorted(s.attributes["url.path"] for s in proxied) == ["/files/tool.bin", "/other.txt"]
    for span in receiver.spans:
        for key, value in span.attributes.items():
            assert secret not in value and "alice" not in value, f"userinfo in {span.name} {key}"
