"""The proxy: a registry mirror and an HTTP proxy in front of this host's peer.

Container engines pull through it. Blob GETs, keyed by digest, come through the swarm and
stream to the client as pieces are verified; everything else (manifests by tag, HEADs, token
endpoints, uploads) passes through to the upstream untouched, so a moved tag is never
served stale. As ``HTTP_PROXY`` it carries plain-http URLs matching the configured rules
through the swarm, passes other allowed requests through, and tunnels ``CONNECT``.

A blob reaches a client only after the upstream has accepted that client's own credentials
for it (an authenticated HEAD); the client's ``Authorization`` goes to whichever node reads
the origin, and never into a task id, a log line, a span or the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
import re
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import aiohttp
from aiohttp import web
from opentelemetry.trace import SpanKind

from swarmfly import metrics, telemetry
from swarmfly.config import ProxyConfig
from swarmfly.content import SourceRequest
from swarmfly.errors import SwarmflyError
from swarmfly.plugins.hookspecs import SourceStat
from swarmfly.plugins.sources.http import HOP_BY_HOP
from swarmfly.services.peer.node import Download, PeerNode
from swarmfly.services.proxy import stream
from swarmfly.services.proxy.registry import RegistryError, Route, Upstreams, route

log = logging.getLogger(__name__)

DEFAULT_PORT = 65001
MAX_HEADERS = 16 * 1024
"""Bytes of request headers the proxy accepts; more is refused with a registry error."""
_PARSER_LIMIT = 64 * 1024
"""What the HTTP parser lets through, so the refusal above can be a proper answer."""
CONNECT_TIMEOUT = 10.0
HEAD_TIMEOUT = 30.0
PRIVATE = frozenset({"x-swarmfly-registry", "traceparent", "tracestate"})
SOURCE_SKIP = frozenset(
    {"range", "if-range", "if-match", "if-none-match", "if-modified-since",
     "if-unmodified-since", "accept-encoding"}
)  # fmt: skip
"""Client headers that describe this one request, not the content the swarm fetches."""
API_VERSION = {"Docker-Distribution-API-Version": "registry/2.0"}


def _end_to_end(headers: Any) -> list[tuple[str, str]]:
    """The headers that travel on, repeated ones (several ``Accept`` lines) kept apart."""
    return [
        (str(k), v)
        for k, v in headers.items()
        if k.lower() not in HOP_BY_HOP and k.lower() not in PRIVATE
    ]


def registry_error(error: RegistryError, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=error.status,
        body=error.body(),
        content_type="application/json",
        headers={**API_VERSION, **(headers or {})},
    )


def _from_swarm_error(exc: SwarmflyError) -> RegistryError:
    codes = {"not_found": (404, "BLOB_UNKNOWN"), "bad_request": (400, "UNSUPPORTED")}
    status, code = codes.get(exc.code, (502, "UNAVAILABLE"))
    if exc.code == "timeout":
        status = 504
    return RegistryError(status, code, exc.message)


def _count(kind: str) -> None:
    metrics.PROXY_REQUESTS.labels(kind=kind).inc()


class ProxyService:
    def __init__(self, node: PeerNode, config: ProxyConfig) -> None:
        self.node = node
        self.config = config
        self.upstreams = Upstreams(config.registries)
        self.rules = [re.compile(rule) for rule in config.rules]
        self.allowed = [*config.hosts, *(urlsplit(b).hostname or "" for b in self.upstreams.bases)]
        self.url = ""
        self._session: aiohttp.ClientSession | None = None
        self._tunnels: set[asyncio.Task[None]] = set()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                auto_decompress=False,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT),
                connector=aiohttp.TCPConnector(limit=0),
            )
        return self._session

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._bounded], client_max_size=0)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def start(self, stack: AsyncExitStack) -> str:
        """Serve on ``listen:port``; CONNECT is split off before aiohttp sees the request."""
        runner = web.AppRunner(
            self.app(),
            access_log=None,
            handle_signals=False,
            shutdown_timeout=1.0,
            max_line_size=_PARSER_LIMIT,
            max_field_size=_PARSER_LIMIT,
        )
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        http = runner.server
        assert http is not None
        loop = asyncio.get_running_loop()
        port = DEFAULT_PORT if self.config.port is None else self.config.port
        try:
            server = await loop.create_server(
                lambda: _Sniffer(http, self._on_connect), self.config.listen, port
            )
        except OSError:
            if self.config.port is not None:
                raise
            log.warning("proxy: port %d is taken, using a free one", port)
            server = await loop.create_server(
                lambda: _Sniffer(http, self._on_connect), self.config.listen, 0
            )
        stack.push_async_callback(self._close, server)
        port = server.sockets[0].getsockname()[1]
        shown = "127.0.0.1" if self.config.listen in ("0.0.0.0", "") else self.config.listen
        self.url = f"http://{shown}:{port}"
        log.info("proxy on %s for %s", self.url, ", ".join(self.upstreams.bases) or "nothing")
        return self.url

    async def _close(self, server: asyncio.Server) -> None:
        server.close()
        for tunnel in list(self._tunnels):
            tunnel.cancel()
        if self._session is not None:
            await self._session.close()

    # -- HTTP ------------------------------------------------------------------------------

    @web.middleware
    async def _bounded(
        self, request: web.Request, handler: Callable[[web.Request], Any]
    ) -> web.StreamResponse:
        size = sum(len(k) + len(v) + 4 for k, v in request.raw_headers)
        if size > MAX_HEADERS:
            _count("refused")
            return registry_error(
                RegistryError(431, "UNSUPPORTED", "request headers are too large")
            )
        try:
            response: web.StreamResponse = await handler(request)
            return response
        except RegistryError as exc:
            _count("refused")
            return registry_error(exc)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.raw_path.startswith(("http://", "https://")):
            return await self._http_proxy(request)
        if request.raw_path == "/healthz":
            return web.json_response({"status": "ok"})
        target = route(request.raw_path, request.method)
        upstream = self.upstreams.pick(
            request.headers.get("X-Swarmfly-Registry"), request.query.get("ns")
        )
        if target.kind == "blob":
            return await self._blob(request, upstream, target)
        _count("passthrough")
        return await self._forward(request, upstream + _without_ns(request.raw_path))

    async def _blob(self, request: web.Request, upstream: str, target: Route) -> web.StreamResponse:
        url = f"{upstream}/v2/{target.name}/blobs/{target.digest}"
        token = request.headers.get("Authorization")
        auth = {"Authorization": token} if token else {}
        attributes = {"http.request.method": "GET", "url.path": request.path,
                      "server.address": urlsplit(upstream).netloc}  # fmt: skip
        carrier = {k: v for k, v in request.headers.items() if k.lower() == "traceparent"}
        with telemetry.span(
            "proxy blob", kind=SpanKind.SERVER, attributes=attributes, carrier=carrier or None
        ) as current:
            stat = await self._authorize(url, auth)
            if stat is None:  # refused (or odd): the client gets the upstream's own answer
                _count("passthrough")
                return await self._forward(request, url)
            _count("blob")
            source = SourceRequest(url=url, headers=auth, digest=target.digest)
            try:
                run = await self.node.begin(source, strategy="sequential", stat=stat)
                length, _ = await stream.content_of(run)
            except SwarmflyError as exc:
                raise _from_swarm_error(exc) from None
            headers = {"Docker-Content-Digest": target.digest, **API_VERSION}
            response = await self._stream(request, run, length, headers)
            telemetry.set_attributes(current, **{"http.response.status_code": response.status})
            return response

    async def _authorize(self, url: str, auth: dict[str, str]) -> SourceStat | None:
        """HEAD the blob with the client's credentials: what we learn if the upstream says
        yes, None if it says anything else."""
        try:
            async with self.session.head(
                url,
                headers=auth,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=HEAD_TIMEOUT),
            ) as response:
                if response.status in (301, 302, 303, 307, 308):  # accepted; bytes elsewhere
                    return SourceStat(None, True, None)
                if response.status != 200:
                    return None
                length = response.headers.get("Content-Length", "")
                return SourceStat(
                    int(length) if length.isdigit() else None,
                    "bytes" in response.headers.get("Accept-Ranges", "bytes"),
                    response.headers.get("ETag"),
                )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RegistryError(502, "UNAVAILABLE", f"upstream: {type(exc).__name__}") from None

    async def _stream(
        self, request: web.Request, run: Download, length: int, headers: dict[str, str]
    ) -> web.StreamResponse:
        try:
            span = stream.byte_range(request.headers.get("Range"), length)
        except stream.Unsatisfiable:
            return web.Response(status=416, headers={"Content-Range": f"bytes */{length}"})
        whole = span is None
        span = span or stream.Span(0, length)
        response = web.StreamResponse(status=200 if whole else 206)
        response.headers.update(headers)
        response.headers["Accept-Ranges"] = "bytes"
        response.content_type = "application/octet-stream"
        if not whole:
            response.headers["Content-Range"] = f"bytes {span.start}-{span.end - 1}/{length}"
        response.content_length = span.size
        await response.prepare(request)
        if span.size == 0:
            return response
        try:
            await stream.send(request, response, run, span)
            await response.write_eof()
        except ConnectionError:
            log.debug("proxy: client went away during %s", run.task_id[:12])
        except SwarmflyError as exc:
            # Headers are gone: cutting the connection is how the client learns of it.
            log.warning("proxy: %s failed mid-stream: %s", run.task_id[:12], exc)
            _count("failed")
            if request.transport is not None:
                request.transport.abort()
        return response

    async def _forward(self, request: web.Request, url: str) -> web.StreamResponse:
        """The request as the client made it, to ``url``; the answer as the upstream gave it."""
        body = request.content if request.body_exists else None
        try:
            upstream = await self.session.request(
                request.method,
                url,
                headers=_end_to_end(request.headers),
                data=body,
                allow_redirects=False,
            )
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise RegistryError(502, "UNAVAILABLE", f"upstream: {type(exc).__name__}") from None
        try:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for raw_key, raw_value in upstream.raw_headers:  # as sent, spelling included
                key = raw_key.decode("latin-1")
                if key.lower() not in HOP_BY_HOP:
                    response.headers.add(key, raw_value.decode("latin-1"))
            length = upstream.headers.get("Content-Length", "")
            if length.isdigit():
                response.content_length = int(length)
            await response.prepare(request)
            if request.method != "HEAD":
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
            await response.write_eof()
            return response
        except (aiohttp.ClientError, TimeoutError):
            if request.transport is not None:
                request.transport.abort()  # the upstream broke off: so do we
            return response
        finally:
            upstream.release()

    # -- HTTP proxy mode -------------------------------------------------------------------

    def _host_allowed(self, host: str) -> bool:
        host = host.lower()
        return any(fnmatch.fnmatchcase(host, pattern.lower()) for pattern in self.allowed)

    async def _http_proxy(self, request: web.Request) -> web.StreamResponse:
        url = request.raw_path
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise RegistryError(400, "UNSUPPORTED", "only http:// URLs are proxied; use CONNECT")
        swarm = request.method == "GET" and any(rule.search(url) for rule in self.rules)
        if not swarm and not self._host_allowed(parts.hostname):
            raise RegistryError(403, "DENIED", "this proxy does not forward to that host")
        if swarm:
            headers: dict[str, str] = {}
            for key, value in _end_to_end(request.headers):
                if key.lower() not in SOURCE_SKIP:  # repeated ones folded, as RFC 9110 allows
                    headers[key] = f"{headers[key]}, {value}" if key in headers else value
            with telemetry.span(
                "proxy http", kind=SpanKind.SERVER,
                attributes={"http.request.method": "GET", "server.address": parts.netloc},
            ):  # fmt: skip
                try:
                    run = await self.node.begin(
                        SourceRequest(url=url, headers=headers), strategy="sequential"
                    )
                    length, _ = await stream.content_of(run)
                except SwarmflyError as exc:
                    # The origin refused or cannot be carried: it answers for itself.
                    log.info("proxy: passing %s through: %s", parts.netloc, exc.code)
                else:
                    _count("http_swarm")
                    etag = run.conductor.stat.etag
                    return await self._stream(request, run, length, {"ETag": etag} if etag else {})
        _count("http_passthrough")
        return await self._forward(request, url)

    def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tunnel = asyncio.create_task(self._tunnel_safely(reader, writer))
        self._tunnels.add(tunnel)
        tunnel.add_done_callback(self._tunnels.discard)

    async def _tunnel_safely(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            await self._tunnel(reader, writer)
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            writer.close()

    async def _tunnel(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """CONNECT host:port: bytes both ways, untouched (TLS stays end to end)."""
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), CONNECT_TIMEOUT)
        except asyncio.LimitOverrunError:
            writer.write(_status_line(431, "Request Header Fields Too Large"))
            return
        line = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
        target = urlsplit(f"//{line[1]}") if len(line) == 3 else None
        try:
            host, port = (target.hostname, target.port) if target else (None, None)
        except ValueError:
            host, port = None, None
        if not host or not port:
            writer.write(_status_line(400, "Bad Request"))
            return
        if not self._host_allowed(host):
            _count("refused")
            writer.write(_status_line(403, "Forbidden"))
            return
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(host, port), CONNECT_TIMEOUT
            )
        except (OSError, TimeoutError):
            writer.write(_status_line(502, "Bad Gateway"))
            return
        _count("connect")
        writer.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            up_writer.close()


def _status_line(status: int, reason: str) -> bytes:
    return f"HTTP/1.1 {status} {reason}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode()


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while chunk := await source.read(256 * 1024):
            sink.write(chunk)
            await sink.drain()
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            if sink.can_write_eof():
                sink.write_eof()


def _without_ns(raw_path: str) -> str:
    """The path and query for the upstream: containerd's ``ns=`` is for us only."""
    path, _, query = raw_path.partition("?")
    kept = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k != "ns"]
    return f"{path}?{urlencode(kept)}" if kept else path


class _Sniffer(asyncio.Protocol):
    """Looks at a connection's first bytes: CONNECT becomes a tunnel, anything else is
    handed to aiohttp with the bytes read so far."""

    MAX_WAIT = 30.0

    def __init__(
        self,
        http: Callable[[], asyncio.Protocol],
        on_connect: Callable[[asyncio.StreamReader, asyncio.StreamWriter], None],
    ) -> None:
        self.http = http
        self.on_connect = on_connect
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._timer = asyncio.get_running_loop().call_later(self.MAX_WAIT, transport.close)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buffer += data
        if len(self.buffer) < len(b"CONNECT ") and b"\n" not in self.buffer:
            return
        if self._timer is not None:
            self._timer.cancel()
        buffered = bytes(self.buffer)
        if buffered.startswith(b"CONNECT "):
            loop = asyncio.get_running_loop()
            reader = asyncio.StreamReader(limit=MAX_HEADERS)
            protocol = asyncio.StreamReaderProtocol(reader)
            self.transport.set_protocol(protocol)
            protocol.connection_made(self.transport)
            reader.feed_data(buffered)
            writer = asyncio.StreamWriter(self.transport, protocol, reader, loop)
            self.on_connect(reader, writer)
            return
        handler = self.http()
        self.transport.set_protocol(handler)
        handler.connection_made(self.transport)
        handler.data_received(buffered)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
