"""What the swarm does not carry: the request to the upstream as the client made it, the
answer as the upstream gave it (status, headers as spelled, body streamed)."""

from __future__ import annotations

from typing import Any

import aiohttp
from aiohttp import web
from yarl import URL

from swarmfly.errors import connect_error_in_words
from swarmfly.httpheaders import HOP_BY_HOP, content_length
from swarmfly.services.proxy.registry import RegistryError

CONNECT_TIMEOUT = 10.0
PRIVATE = frozenset({"x-swarmfly-registry", "traceparent", "tracestate"})
"""Headers for the proxy only: never sent on."""


def end_to_end(headers: Any) -> list[tuple[str, str]]:
    """The headers that travel on, repeated ones (several ``Accept`` lines) kept apart."""
    return [
        (str(k), v)
        for k, v in headers.items()
        if k.lower() not in HOP_BY_HOP and k.lower() not in PRIVATE
    ]


class Passthrough:
    """The proxy's one HTTP client session to upstreams, made on first use (in the loop)."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                auto_decompress=False,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT),
                connector=aiohttp.TCPConnector(limit=0),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def forward(self, request: web.Request, url: str) -> web.StreamResponse:
        """The request as the client made it, to ``url``; the answer as the upstream gave it."""
        body = request.content if request.body_exists else None
        try:
            upstream = await self.session.request(
                request.method,
                URL(url, encoded=True),  # as the client spelled it: no requoting
                headers=end_to_end(request.headers),
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
