"""The proxy: a registry mirror and an HTTP proxy in front of this host's peer.

Container engines pull through it. One listening port, split by feature: the registry mirror
(``mirror``: blobs through the swarm, the rest of the registry API passed through), the
forward proxy for ``HTTP_PROXY`` (``forward``), ``CONNECT`` tunnels (``tunnel``), and the
client to upstreams they share (``passthrough``); a download reaches a client through
``stream`` as its pieces are verified.

A blob reaches a client only after the upstream has accepted that client's own credentials
for it (an authenticated HEAD); the client's ``Authorization`` goes to whichever node reads
the origin, and never into a task id, a log line, a span or the store.

Every refusal, aiohttp's own HTTP parser's included, is the registry API's JSON error body,
and the proxy answers ``/healthz`` and ``/metrics`` on its own port.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

from aiohttp import web

from swarmfly import __version__
from swarmfly.aiohttpinternals import ParserErrors, too_large
from swarmfly.config import ProxyConfig
from swarmfly.httpheaders import http_url
from swarmfly.httpserver import Limits, default_limits, healthz, listen
from swarmfly.metrics import ProxyMetrics
from swarmfly.services.peer.host import PeerHost
from swarmfly.services.proxy.forward import ForwardProxy
from swarmfly.services.proxy.mirror import Mirror
from swarmfly.services.proxy.passthrough import Passthrough
from swarmfly.services.proxy.registry import OWN_PATHS, AllowList, RegistryError, Upstreams
from swarmfly.services.proxy.responses import registry_error
from swarmfly.services.proxy.tunnel import Tunnels

log = logging.getLogger(__name__)

DEFAULT_PORT = 65001
MAX_HEADERS = 16 * 1024
"""Bytes of request headers the proxy accepts, and of a request line or header line the HTTP
parser buffers (so a connection's parser holds at most aiohttp's 128 such lines); more is
refused with a registry error."""


class ProxyService:
    name = "proxy"

    def __init__(self, node: PeerHost, config: ProxyConfig, limits: Limits | None = None) -> None:
        self.node = node
        self.config = config
        self.limits = limits or default_limits()
        self.url = ""
        self.metrics = ProxyMetrics()
        upstreams = Upstreams(config.registries)
        self.upstreams = upstreams
        allowed = AllowList([*config.hosts, *upstreams.bases])
        self.passthrough = Passthrough()
        self.mirror = Mirror(node, upstreams, self.passthrough, self.metrics)
        rules = [re.compile(rule) for rule in config.rules]
        self.forward = ForwardProxy(node, rules, allowed, self.passthrough, self.metrics)
        self.tunnels = Tunnels(allowed, self.metrics, max_head=MAX_HEADERS)
        self._server: asyncio.Server | None = None

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._bounded], client_max_size=0)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def start(self, stack: AsyncExitStack) -> None:
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
                return self.tunnels.protocol()
            return ParserErrors(
                http,
                self._parser_error,
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
        self._server = server
        stack.push_async_callback(self._close, server)
        self.url = http_url(self.config.listen, server.sockets[0].getsockname()[1])
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

    async def drain(self) -> None:
        """Accept no new connection (containerd falls back to the registry, or another
        mirror); requests in flight go on until the stop."""
        if self._server is not None:
            self._server.close()

    async def _close(self, server: asyncio.Server) -> None:
        server.close()
        self.tunnels.close()
        await self.passthrough.close()

    def _parser_error(self, status: int, exc: BaseException | None) -> web.Response:
        """What aiohttp's handler could not hand to the app, as a registry error."""
        if status >= 500:
            log.error("proxy: internal error", exc_info=exc)
            return registry_error(RegistryError(500, "UNKNOWN", "internal error"))
        # Never the parser's message: it quotes the request, credentials included.
        log.info("proxy: refused a malformed request: %s", type(exc).__name__)
        self.metrics.count("refused")
        if too_large(exc):
            return registry_error(
                RegistryError(431, "UNSUPPORTED", "request headers are too large")
            )
        return registry_error(RegistryError(400, "UNSUPPORTED", "malformed HTTP request"))

    @web.middleware
    async def _bounded(
        self, request: web.Request, handler: Callable[[web.Request], Any]
    ) -> web.StreamResponse:
        size = sum(len(k) + len(v) + 4 for k, v in request.raw_headers)
        if size > MAX_HEADERS:
            self.metrics.count("refused")
            return registry_error(
                RegistryError(431, "UNSUPPORTED", "request headers are too large")
            )
        try:
            response: web.StreamResponse = await handler(request)
            return response
        except RegistryError as exc:
            self.metrics.count("refused")
            return registry_error(exc)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.raw_path.startswith(("http://", "https://")):
            return await self.forward.handle(request)
        if request.raw_path.split("?", 1)[0] in OWN_PATHS:
            return await self._own(request)
        return await self.mirror.handle(request)

    async def _own(self, request: web.Request) -> web.StreamResponse:
        """``/healthz`` and ``/metrics``: the proxy's own, on its own port."""
        if request.method not in ("GET", "HEAD"):
            raise RegistryError(405, "UNSUPPORTED", "only GET and HEAD")
        if request.path == "/metrics":
            return await self.metrics.handler(request)
        return healthz()
