"""The registry mirror: blob GETs, keyed by digest, through the swarm once the upstream has
accepted the client's own credentials for the blob; every other registry request (manifests
by tag, HEADs, token endpoints, uploads) passed through untouched, so a moved tag is never
served stale."""

from __future__ import annotations

from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from opentelemetry.trace import SpanKind
from yarl import URL

from swarmfly import telemetry
from swarmfly.content import SourceRequest
from swarmfly.errors import SwarmflyError, connect_error_in_words
from swarmfly.httpheaders import content_length
from swarmfly.metrics import ProxyMetrics
from swarmfly.plugintypes import SourceStat
from swarmfly.services.peer.host import PeerHost
from swarmfly.services.proxy import stream
from swarmfly.services.proxy.passthrough import Passthrough
from swarmfly.services.proxy.registry import (
    DEFAULT_PORTS,
    RegistryError,
    Route,
    Upstreams,
    route,
)
from swarmfly.services.proxy.responses import (
    API_VERSION,
    attributes,
    carrier,
    from_swarm_error,
    path_of,
)

HEAD_TIMEOUT = 30.0
ACCESS_HOPS = 5
"""Same-origin redirects the access check follows (with the client's credentials)."""
REDIRECTS = frozenset({301, 302, 303, 307, 308})


class Mirror:
    def __init__(
        self,
        node: PeerHost,
        upstreams: Upstreams,
        passthrough: Passthrough,
        metrics: ProxyMetrics,
    ) -> None:
        self.node = node
        self.upstreams = upstreams
        self.passthrough = passthrough
        self.metrics = metrics

    async def handle(self, request: web.Request) -> web.StreamResponse:
        target = route(request.raw_path, request.method)
        upstream = self.upstreams.pick(
            request.headers.get("X-Swarmfly-Registry"), request.query.get("ns")
        )
        if target.kind == "blob":
            return await self._blob(request, upstream, target)
        self.metrics.count("passthrough")
        url = upstream + _without_ns(request.raw_path)
        with telemetry.span(
            "proxy passthrough", kind=SpanKind.SERVER,
            attributes=attributes(request.method, upstream, path_of(request)),
            carrier=carrier(request.headers),
        ) as current:  # fmt: skip
            response = await self.passthrough.forward(request, url)
            telemetry.set_attributes(current, **{"http.response.status_code": response.status})
            return response

    async def _blob(self, request: web.Request, upstream: str, target: Route) -> web.StreamResponse:
        url = f"{upstream}/v2/{target.name}/blobs/{target.digest}"
        token = request.headers.get("Authorization")
        auth = {"Authorization": token} if token else {}
        with telemetry.span(
            "proxy blob", kind=SpanKind.SERVER,
            attributes=attributes("GET", upstream, path_of(request)),
            carrier=carrier(request.headers),
        ) as current:  # fmt: skip
            stat = await self._authorize(url, auth, target.digest)
            if stat is None:  # refused (or odd): the client gets the upstream's own answer
                self.metrics.count("passthrough")
                return await self.passthrough.forward(request, url)
            self.metrics.count("blob")
            source = SourceRequest(url=url, headers=auth, digest=target.digest)
            try:
                download = await self.node.begin(source, strategy="sequential", stat=stat)
                length, _ = await stream.content_of(download)
            except SwarmflyError as exc:
                raise from_swarm_error(exc) from None
            headers = {"Docker-Content-Digest": target.digest, **API_VERSION}
            response = await stream.respond(request, download, length, headers, self.metrics)
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
                async with self.passthrough.session.head(
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


def _without_ns(raw_path: str) -> str:
    """The path and query for the upstream as the client spelled them, but for containerd's
    ``ns=``, which is for us only."""
    path, _, query = raw_path.partition("?")
    kept = [item for item in query.split("&") if item and item.split("=", 1)[0] != "ns"]
    return f"{path}?{'&'.join(kept)}" if kept else path
