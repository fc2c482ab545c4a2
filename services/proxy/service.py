"""The proxy: a registry mirror and an HTTP proxy in front of this host's peer.

Container engines pull through it. Blob GETs, keyed by digest, come through the swarm and
stream to the client as pieces are verified; everything else (manifests by tag, HEADs, token
endpoints, uploads) passes through to the upstream untouched, so a moved tag is never
served stale. As ``HTTP_PROXY`` it carries plain-http URLs matching the configured rules
through the swarm, passes other allowed requests through, and tunnels ``CONNECT``.

A blob reaches a client only after the upstream has accepted that client's own credentials
for it (an authenticated HEAD); the client's ``Authorization`` goes to whichever node reads
the origin, and never into a task id, a log line, a span or the store.

Every refusal, aiohttp's own HTTP parser's included, is the registry API's JSON error body,
and the proxy answers ``/healthz`` and ``/metrics`` on its own port.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable, Iterable
from contextlib import AsyncExitStack
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import LineTooLong
from opentelemetry.trace import SpanKind
from yarl import URL

from swarmfly import __version__, telemetry
from swarmfly.config import ProxyConfig
from swarmfly.content import SourceRequest
from swarmfly.errors import SwarmflyError, connect_error_in_words
from swarmfly.httpheaders import HOP_BY_HOP, Span, Unsatisfiable, byte_range, content_length
from swarmfly.httpserver import Limits, default_limits, healthz, listen
from swarmfly.metrics import ProxyMetrics
from swarmfly.plugintypes import SourceStat
from swarmfly.services.peer.node import Download, PeerNode
from swarmfly.services.proxy import stream
from swarmfly.services.proxy.registry import (
    DEFAULT_PORTS,
    OWN_PATHS,
    AllowList,
    RegistryError,
    Route,
    Upstreams,
    route,
)

log = logging.getLogger(__name__)

DEFAULT_PORT = 65001
MAX_HEADERS = 16 * 1024
"""Bytes of request headers the proxy accepts, and of a request line or header line the HTTP
parser buffers (so a connection's parser holds at most aiohttp's 128 such lines); more is
refused with a registry error."""
CONNECT_TIMEOUT = 10.0
LINGER_SECONDS = 2.0
LINGER_BYTES = 4 * 1024 * 1024
"""How long, and how much, the proxy reads and drops of a request it refused half-read."""
HEAD_TIMEOUT = 30.0
ACCESS_HOPS = 5
"""Same-origin redirects the access check follows (with the client's credentials)."""
REDIRECTS = frozenset({301, 302, 303, 307, 308})
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


def _path_of(request: web.BaseRequest) -> str:
    """The path as the client sent it, without the query (which may hold a signature)."""
    return request.raw_path.split("?", 1)[0]


def _carrier(headers: Any) -> dict[str, str] | None:
    """The W3C trace context a client sent, to parent the proxy's span on its own."""
    carrier = {
        k.lower(): v for k, v in headers.items() if k.lower() in ("traceparent", "tracestate")
    }
    return carrier or None


def _attributes(method: str, target: str, path: str | None = None) -> dict[str, Any]:
    """OTel HTTP attributes of a request to ``target`` (a URL or ``host:port``): its host and
    port only (telemetry's, less ``url.full``: a server span names the path it was asked for),
    never userinfo, a query or a header value."""
    found = telemetry.url_attributes(target if "://" in target else f"//{target}")
    attributes = {k: v for k, v in found.items() if k != "url.full"}
    attributes["http.request.method"] = method
    if path is not None:
        attributes["url.path"] = path
    return attributes


class ProxyService:
    def __init__(self, node: PeerNode, config: ProxyConfig, limits: Limits | None = None) -> None:
        self.node = node
        self.config = config
        self.limits = limits or default_limits()
        self.upstreams = Upstreams(config.registries)
        self.rules = [re.compile(rule) for rule in config.rules]
        self.allowed = AllowList([*config.hosts, *self.upstreams.bases])
        self.url = ""
        self.metrics = ProxyMetrics()
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

    def _count(self, kind: str) -> None:
        self.metrics.requests.labels(kind=kind).inc()

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._bounded], client_max_size=0)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def start(self, stack: AsyncExitStack) -> str:
        """Serve on ``listen:port`` under the server bounds (``httpserver.Limits``); CONNECT
        is split off before aiohttp sees the request.
        The proxy joins the peer's ``$SRV`` discovery, so `swarmfly status` lists it."""
        runner = web.AppRunner(
            self.app(), access_log=None, handle_signals=False, shutdown_timeout=1.0
        )
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        http = runner.server
        assert http is not None
        loop = asyncio.get_running_loop()

        def choose(head: bytes) -> asyncio.Protocol:
            """A tunnel for CONNECT; aiohttp's handler, answering in registry errors, else."""
            if head.startswith(b"CONNECT "):
                reader = asyncio.StreamReader(limit=MAX_HEADERS)
                return asyncio.StreamReaderProtocol(reader, self._on_connect)
            return _RegistryErrors(
                http,
                refused=lambda: self._count("refused"),
                loop=loop,
                access_log=None,  # its request lines may hold secrets
                max_line_size=MAX_HEADERS,
                max_field_size=MAX_HEADERS,
                keepalive_timeout=self.limits.idle_timeout,
            )

        port = DEFAULT_PORT if self.config.port is None else self.config.port
        try:
            server, _ = await listen(stack, choose, self.config.listen, port, self.limits)
        except OSError:
            if self.config.port is not None:
                raise
            log.warning("proxy: port %d is taken, using a free one", port)
            server, _ = await listen(stack, choose, self.config.listen, 0, self.limits)
        stack.push_async_callback(self._close, server)
        port = server.sockets[0].getsockname()[1]
        shown = "127.0.0.1" if self.config.listen in ("0.0.0.0", "") else self.config.listen
        self.url = f"http://{shown}:{port}"
        log.info("proxy on %s for %s", self.url, ", ".join(self.upstreams.bases) or "nothing")
        if self.node.bus is not None:
            await self.node.bus.add_service(
                "proxy",
                __version__,
                "swarmfly proxy: registry mirror and HTTP proxy in front of a peer",
                [],
                # No endpoints to carry the subject prefix: discovery matches on this.
                metrics=self.metrics,
                metadata={
                    "host_id": self.node.settings.host_id,
                    "url": self.url,
                    "prefix": self.node.bus.prefix,
                },
            )
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
            self._count("refused")
            return registry_error(
                RegistryError(431, "UNSUPPORTED", "request headers are too large")
            )
        try:
            response: web.StreamResponse = await handler(request)
            return response
        except RegistryError as exc:
            self._count("refused")
            return registry_error(exc)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.raw_path.startswith(("http://", "https://")):
            return await self._http_proxy(request)
        if request.raw_path.split("?", 1)[0] in OWN_PATHS:
            return await self._own(request)
        target = route(request.raw_path, request.method)
        upstream = self.upstreams.pick(
            request.headers.get("X-Swarmfly-Registry"), request.query.get("ns")
        )
        if target.kind == "blob":
            return await self._blob(request, upstream, target)
        self._count("passthrough")
        url = upstream + _without_ns(request.raw_path)
        attributes = _attributes(request.method, upstream, _path_of(request))
        with telemetry.span(
            "proxy passthrough", kind=SpanKind.SERVER, attributes=attributes,
            carrier=_carrier(request.headers),
        ) as current:  # fmt: skip
            response = await self._forward(request, url)
            telemetry.set_attributes(current, **{"http.response.status_code": response.status})
            return response

    async def _own(self, request: web.Request) -> web.StreamResponse:
        """``/healthz`` and ``/metrics``: the proxy's own, on its own port."""
        if request.method not in ("GET", "HEAD"):
            raise RegistryError(405, "UNSUPPORTED", "only GET and HEAD")
        if request.path == "/metrics":
            return await self.metrics.handler(request)
        return healthz()

    async def _blob(self, request: web.Request, upstream: str, target: Route) -> web.StreamResponse:
        url = f"{upstream}/v2/{target.name}/blobs/{target.digest}"
        token = request.headers.get("Authorization")
        auth = {"Authorization": token} if token else {}
        attributes = _attributes("GET", upstream, _path_of(request))
        with telemetry.span(
            "proxy blob", kind=SpanKind.SERVER, attributes=attributes,
            carrier=_carrier(request.headers),
        ) as current:  # fmt: skip
            stat = await self._authorize(url, auth, target.digest)
            if stat is None:  # refused (or odd): the client gets the upstream's own answer
                self._count("passthrough")
                return await self._forward(request, url)
            self._count("blob")
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

    async def _authorize(self, url: str, auth: dict[str, str], digest: str) -> SourceStat | None:
        """HEAD the blob with the client's credentials: what we learn if the registry says
        yes (200, and the blob's digest when it names one); None to hand the client the
        upstream's own answer. A redirect is no yes: one within the origin is followed with
        the same credentials; one to elsewhere proves nothing about this client (an SSO front
        sends everyone to its login page), so it is refused, or, when the registry API itself
        sent it (a registry redirects a blob to its storage), passed through for the client
        to follow without the swarm."""
        origin = _origin_of(url)
        for hop in range(ACCESS_HOPS + 1):
            try:
                async with self.session.head(
                    URL(url, encoded=True),
                    headers=auth,
                    allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=HEAD_TIMEOUT),
                ) as response:
                    status, headers = response.status, response.headers
                    location = response.headers.get("Location")
                    next_url = str(response.url.join(URL(location))) if location else None
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                words = connect_error_in_words(exc, url, seconds=HEAD_TIMEOUT)
                raise RegistryError(502, "UNAVAILABLE", f"upstream: {words}") from None
            if status in REDIRECTS:
                if next_url is not None and _origin_of(next_url) == origin:
                    url = next_url
                    continue
                if "Docker-Distribution-API-Version" in headers:
                    return None
                raise _unconfirmed(auth)
            if status != 200:
                return None
            named = headers.get("Docker-Content-Digest")
            # After a redirect only the digest says the answer is about this blob (a login
            # page answers 200 too).
            if (named is not None and named != digest) or (hop and named is None):
                raise _unconfirmed(auth)
            return SourceStat(
                content_length(headers.get("Content-Length")),
                "bytes" in headers.get("Accept-Ranges", "bytes"),
                headers.get("ETag"),
            )
        raise _unconfirmed(auth)

    async def _stream(
        self, request: web.Request, run: Download, length: int, headers: dict[str, str]
    ) -> web.StreamResponse:
        try:
            span = byte_range(request.headers.get("Range"), length)
        except Unsatisfiable:
            return web.Response(status=416, headers={"Content-Range": f"bytes */{length}"})
        whole = span is None
        span = span or Span(0, length)
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
            self._count("failed")
            if request.transport is not None:
                request.transport.abort()
        return response

    async def _forward(self, request: web.Request, url: str) -> web.StreamResponse:
        """The request as the client made it, to ``url``; the answer as the upstream gave it."""
        body = request.content if request.body_exists else None
        try:
            upstream = await self.session.request(
                request.method,
                URL(url, encoded=True),  # as the client spelled it: no requoting
                headers=_end_to_end(request.headers),
                data=body,
                allow_redirects=False,
            )
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            words = connect_error_in_words(exc, url, seconds=CONNECT_TIMEOUT)
            raise RegistryError(502, "UNAVAILABLE", f"upstream: {words}") from None
        try:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for raw_key, raw_value in upstream.raw_headers:  # as sent, spelling included
                key = raw_key.decode("latin-1")
                if key.lower() not in HOP_BY_HOP:
                    response.headers.add(key, raw_value.decode("latin-1"))
            length = content_length(upstream.headers.get("Content-Length"))
            if length is not None:
                response.content_length = length
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

    async def _http_proxy(self, request: web.Request) -> web.StreamResponse:
        url = request.raw_path
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise RegistryError(400, "UNSUPPORTED", "only http:// URLs are proxied; use CONNECT")
        try:
            parts.port  # noqa: B018 (read for its check: a port out of range raises)
        except ValueError:
            raise RegistryError(400, "UNSUPPORTED", "the URL's port is invalid") from None
        swarm = request.method == "GET" and any(rule.search(url) for rule in self.rules)
        if not swarm and not self.allowed.allows(parts.scheme, parts.hostname, parts.port):
            raise RegistryError(403, "DENIED", "this proxy does not forward to that host")
        with telemetry.span(
            "proxy http", kind=SpanKind.SERVER,
            attributes=_attributes(request.method, url, parts.path or "/"),
            carrier=_carrier(request.headers),
        ) as current:  # fmt: skip
            response = await self._http_swarm(request) if swarm else None
            if response is None:
                self._count("http_passthrough")
                response = await self._forward(request, url)
            telemetry.set_attributes(current, **{"http.response.status_code": response.status})
            return response

    async def _http_swarm(self, request: web.Request) -> web.StreamResponse | None:
        """A plain-http URL through the swarm; None when the origin refuses it or it cannot
        be carried (it then answers for itself)."""
        headers: dict[str, str] = {}
        for key, value in _end_to_end(request.headers):
            if key.lower() not in SOURCE_SKIP:  # repeated ones folded, as RFC 9110 allows
                headers[key] = f"{headers[key]}, {value}" if key in headers else value
        try:
            run = await self.node.begin(
                SourceRequest(url=request.raw_path, headers=headers), strategy="sequential"
            )
            length, _ = await stream.content_of(run)
        except SwarmflyError as exc:
            host = urlsplit(request.raw_path).hostname
            log.info("proxy: passing %s through: %s", host, exc.code)
            return None
        self._count("http_swarm")
        etag = run.conductor.stat.etag
        return await self._stream(request, run, length, {"ETag": etag} if etag else {})

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
            self._count("refused")
            writer.write(
                _refusal(RegistryError(431, "UNSUPPORTED", "request headers are too large"))
            )
            return
        lines = head.decode("latin-1").split("\r\n")
        line = lines[0].split(" ")
        target = urlsplit(f"//{line[1]}") if len(line) == 3 else None
        try:
            host, port = (target.hostname, target.port) if target else (None, None)
        except ValueError:
            host, port = None, None
        if not host or not port:
            self._count("refused")
            writer.write(_refusal(RegistryError(400, "UNSUPPORTED", "CONNECT needs host:port")))
            return
        fields = dict(field.split(":", 1) for field in lines[1:] if ":" in field)
        attributes = _attributes("CONNECT", f"{host}:{port}")
        with telemetry.span(
            "proxy connect", kind=SpanKind.SERVER, attributes=attributes,
            carrier=_carrier({k.strip(): v.strip() for k, v in fields.items()}),
        ) as current:  # fmt: skip
            status = await self._connect(reader, writer, host, port)
            telemetry.set_attributes(current, **{"http.response.status_code": status})

    async def _connect(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, port: int
    ) -> int:
        """The tunnel to an allowed ``host:port``; the status the client was answered."""
        if not self.allowed.allows_tunnel(host, port):
            self._count("refused")
            writer.write(_refusal(RegistryError(403, "DENIED", "this proxy does not tunnel there")))
            return 403
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(host, port), CONNECT_TIMEOUT
            )
        except (OSError, TimeoutError):
            writer.write(_refusal(RegistryError(502, "UNAVAILABLE", "the host cannot be reached")))
            return 502
        self._count("connect")
        writer.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            up_writer.close()
        return 200


def _origin_of(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port), the default port filled in; an unparsable port names no origin."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port if parts.port is not None else DEFAULT_PORTS.get(scheme)
    except ValueError:
        return "", "", None
    return scheme, (parts.hostname or "").lower(), port


def _unconfirmed(auth: dict[str, str]) -> RegistryError:
    """The registry did not confirm this client's access: it must authenticate, or is not
    allowed."""
    if not auth:
        return RegistryError(401, "UNAUTHORIZED", "authentication required")
    return RegistryError(403, "DENIED", "the registry did not confirm access to this blob")


def _refusal(error: RegistryError) -> bytes:
    """A whole answer to a CONNECT that is not tunnelled, with the same JSON body as every
    other refusal of the proxy."""
    body = error.body()
    reason = HTTPStatus(error.status).phrase
    head = (
        f"HTTP/1.1 {error.status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


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
    """The path and query for the upstream as the client spelled them, but for containerd's
    ``ns=``, which is for us only."""
    path, _, query = raw_path.partition("?")
    kept = [item for item in query.split("&") if item and item.split("=", 1)[0] != "ns"]
    return f"{path}?{'&'.join(kept)}" if kept else path


class _RegistryErrors(web.RequestHandler):
    """aiohttp's request handler, answering what its HTTP parser refuses (a request or header
    line over ``MAX_HEADERS``, too many headers, a malformed request line) with the registry
    API's JSON error, as every other refusal of the proxy is, instead of text/plain; and
    closing such a connection with a linger, so the client reads the answer."""

    __slots__ = ("_lingering", "_refused")

    def __init__(self, manager: web.Server, refused: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._lingering: _Lingering | None = None
        self._refused = refused

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:  # as aiohttp does: the answer has begun
            raise ConnectionError("the response has begun: no error can follow")
        if status >= 500:
            log.error("proxy: internal error", exc_info=exc)
            error = RegistryError(500, "UNKNOWN", "internal error")
        else:
            # Never the parser's message: it quotes the request, credentials included.
            log.info("proxy: refused a malformed request: %s", type(exc).__name__)
            self._refused()
            error = (
                RegistryError(431, "UNSUPPORTED", "request headers are too large")
                if isinstance(exc, LineTooLong)
                else RegistryError(400, "UNSUPPORTED", "malformed HTTP request")
            )
            if self.transport is not None and self._lingering is None:
                self._lingering = self.transport = _Lingering(self.transport)
        response = registry_error(error)
        response.force_close()
        return response

    def data_received(self, data: bytes) -> None:
        if self._lingering is not None:  # the rest of a refused request: dropped unparsed
            self._lingering.drop(len(data))
            return
        super().data_received(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._lingering is not None:
            self._lingering.cancel()
        super().connection_lost(exc)


class _Lingering(asyncio.Transport):
    """A connection whose request was refused before it was read whole, closed as web
    servers close one (nginx's lingering close): the answer, then our end shut, then what the
    client still sends read and dropped, up to ``LINGER_BYTES`` for ``LINGER_SECONDS`` at
    most. Closing at once, with the request unread, would reset the connection, and the
    client would lose the answer."""

    def __init__(self, transport: asyncio.Transport) -> None:
        super().__init__()
        self.transport = transport
        self.dropped = 0
        self._timer: asyncio.TimerHandle | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.transport.write(data)

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        self.transport.writelines(list_of_data)

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.transport.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self.transport.pause_reading()

    def resume_reading(self) -> None:
        self.transport.resume_reading()

    def close(self) -> None:
        """Shut our end once the answer is out; close when the client closes (end of file
        closes a socket transport), at the deadline, or past the byte budget."""
        if self._timer is not None or self.transport.is_closing():
            return
        self.transport.resume_reading()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._timer = asyncio.get_running_loop().call_later(LINGER_SECONDS, self.transport.close)

    def abort(self) -> None:
        self.cancel()
        self.transport.abort()

    def drop(self, size: int) -> None:
        self.dropped += size
        if self.dropped > LINGER_BYTES:
            self.transport.close()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
