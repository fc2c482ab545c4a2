"""What every part of the proxy answers in: the registry API's JSON error, and the trace
attributes of the spans around a request."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from swarmfly import telemetry
from swarmfly.errors import SwarmflyError
from swarmfly.services.proxy.registry import RegistryError

API_VERSION = {"Docker-Distribution-API-Version": "registry/2.0"}


def registry_error(error: RegistryError, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=error.status,
        body=error.body(),
        content_type="application/json",
        headers={**API_VERSION, **(headers or {})},
    )


def from_swarm_error(exc: SwarmflyError) -> RegistryError:
    codes = {"not_found": (404, "BLOB_UNKNOWN"), "bad_request": (400, "UNSUPPORTED")}
    status, code = codes.get(exc.code, (502, "UNAVAILABLE"))
    if exc.code == "timeout":
        status = 504
    return RegistryError(status, code, exc.message)


def path_of(request: web.BaseRequest) -> str:
    """The path as the client sent it, without the query (which may hold a signature)."""
    return request.raw_path.split("?", 1)[0]


def carrier(headers: Any) -> dict[str, str] | None:
    """The W3C trace context a client sent, to parent the proxy's span on its own."""
    found = {k.lower(): v for k, v in headers.items() if k.lower() in ("traceparent", "tracestate")}
    return found or None


def attributes(method: str, target: str, path: str | None = None) -> dict[str, Any]:
    """OTel HTTP attributes of a request to ``target`` (a URL or ``host:port``): its host and
    port only (telemetry's, less ``url.full``: a server span names the path it was asked for),
    never userinfo, a query or a header value."""
    found = telemetry.url_attributes(target if "://" in target else f"//{target}")
    attributes = {k: v for k, v in found.items() if k != "url.full"}
    attributes["http.request.method"] = method
    if path is not None:
        attributes["url.path"] = path
    return attributes
