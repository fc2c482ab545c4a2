"""The proxy as ``HTTP_PROXY``: plain-http URLs that match the configured rules through the
swarm, other requests to allowed hosts passed through."""

from __future__ import annotations

import logging
import re
from urllib.parse import urlsplit

from aiohttp import web
from opentelemetry.trace import SpanKind

from swarmfly import telemetry
from swarmfly.content import SourceRequest
from swarmfly.errors import SwarmflyError
from swarmfly.metrics import ProxyMetrics
from swarmfly.services.peer.host import PeerHost
from swarmfly.services.proxy import stream
from swarmfly.services.proxy.passthrough import Passthrough, end_to_end
from swarmfly.services.proxy.registry import AllowList, RegistryError
from swarmfly.services.proxy.responses import attributes, carrier

log = logging.getLogger(__name__)

SOURCE_SKIP = frozenset(
    {"range", "if-range", "if-match", "if-none-match", "if-modified-since",
     "if-unmodified-since", "accept-encoding"}
)  # fmt: skip
"""Client headers that describe this one request, not the content the swarm fetches."""


class ForwardProxy:
    def __init__(
        self,
        node: PeerHost,
        rules: list[re.Pattern[str]],
        allowed: AllowList,
        passthrough: Passthrough,
        metrics: ProxyMetrics,
    ) -> None:
        self.node = node
        self.rules = rules
        self.allowed = allowed
        self.passthrough = passthrough
        self.metrics = metrics

    async def handle(self, request: web.Request) -> web.StreamResponse:
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
            attributes=attributes(request.method, url, parts.path or "/"),
            carrier=carrier(request.headers),
        ) as current:  # fmt: skip
            response = await self._swarm(request) if swarm else None
            if response is None:
                self.metrics.count("http_passthrough")
                response = await self.passthrough.forward(request, url)
            telemetry.set_attributes(current, **{"http.response.status_code": response.status})
            return response

    async def _swarm(self, request: web.Request) -> web.StreamResponse | None:
        """A plain-http URL through the swarm; None when the origin refuses it or it cannot
        be carried (it then answers for itself)."""
        headers: dict[str, str] = {}
        for key, value in end_to_end(request.headers):
            if key.lower() not in SOURCE_SKIP:  # repeated ones folded, as RFC 9110 allows
                headers[key] = f"{headers[key]}, {value}" if key in headers else value
        try:
            download = await self.node.begin(
                SourceRequest(url=request.raw_path, headers=headers), strategy="sequential"
            )
            length, _ = await stream.content_of(download)
        except SwarmflyError as exc:
            host = urlsplit(request.raw_path).hostname
            log.info("proxy: passing %s through: %s", host, exc.code)
            return None
        self.metrics.count("http_swarm")
        etag = download.conductor.stat.etag
        return await stream.respond(
            request, download, length, {"ETag": etag} if etag else {}, self.metrics
        )
