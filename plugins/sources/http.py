"""The http/https source: ranged GETs, retries with backoff on 5xx and connection errors."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
from collections.abc import AsyncIterator, Mapping
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import ResolveResult
from yarl import URL

from swarmfly.errors import ErrorCode, SwarmflyError, connect_error_in_words
from swarmfly.httpheaders import HOP_BY_HOP, content_length, content_range
from swarmfly.plugins import OriginGuard, SourceRegistry, SourceStat, hookimpl
from swarmfly.plugins.sources.bearer import Challenge, TokenCache, parse_challenge

log = logging.getLogger(__name__)

CHUNK = 256 * 1024


CROSS_ORIGIN_HEADERS = frozenset(
    {"accept", "accept-encoding", "accept-language", "user-agent", "range", "if-range",
     "if-match", "if-none-match", "if-modified-since", "if-unmodified-since"}
)  # fmt: skip
"""The caller's headers that follow a redirect to another origin: they say what is asked for,
not who asks. Every other one (Authorization, Cookie, PRIVATE-TOKEN, X-Api-Key, any header not
known here) stays with the origin the caller named, as browsers and curl keep cookies and
credentials to their own origin."""
MAX_REDIRECTS = 10
DEFAULT_PORTS = {"http": 80, "https": 443}


def origin_of(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) with the scheme's default port filled in: ``https://h`` and
    ``https://h:443`` are one origin."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise SwarmflyError("bad_request", "the URL cannot be parsed") from None
    if not parts.hostname:
        raise SwarmflyError("bad_request", "the URL names no host")
    scheme = parts.scheme.lower()
    return scheme, parts.hostname, port if port is not None else DEFAULT_PORTS.get(scheme)


def _scope_key(url: str) -> str:
    """An origin plus the repository part of a registry path (what a token's scope covers)."""
    parts = urlsplit(url)
    path = re.split(r"/(?:blobs|manifests)/", parts.path, maxsplit=1)[0]
    return f"{parts.scheme}://{parts.netloc}{path}"


def _bearer_of(headers: Mapping[str, str]) -> bool:
    return any(
        k.lower() == "authorization" and v[:7].lower() == "bearer " for k, v in headers.items()
    )


def _with_bearer(headers: Mapping[str, str], token: str) -> dict[str, str]:
    out = {k: v for k, v in headers.items() if k.lower() != "authorization"}
    out["Authorization"] = f"Bearer {token}"
    return out


class GuardedResolver(aiohttp.ThreadedResolver):
    """aiohttp's resolver that refuses denied addresses: a name may resolve otherwise when
    the connection is made than when its URL was checked (DNS rebinding)."""

    def __init__(self, guard: OriginGuard) -> None:
        super().__init__()
        self._guard = guard

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await super().resolve(host, port, family)
        self._guard.check_addresses(host, port, [result["host"] for result in results])
        return results


class HttpSource:
    schemes: tuple[str, ...] = ("http", "https")

    def __init__(
        self,
        *,
        retries: int = 3,
        backoff: float = 0.25,
        timeout: float = 30.0,
        guard: OriginGuard | None = None,
    ) -> None:
        self.guard = guard
        """Asked before every request and redirect; None connects anywhere (tests, tools)."""
        self.retries = retries
        self.backoff = backoff
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)
        self._session: aiohttp.ClientSession | None = None
        self.tokens = TokenCache()
        self._challenges: dict[str, Challenge] = {}
        """Bearer challenge last seen per origin and repository path."""

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = (
                aiohttp.TCPConnector(resolver=GuardedResolver(self.guard)) if self.guard else None
            )
            self._session = aiohttp.ClientSession(
                timeout=self.timeout,
                auto_decompress=False,
                raise_for_status=False,
                connector=connector,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _open(
        self, method: str, url: str, headers: Mapping[str, str]
    ) -> aiohttp.ClientResponse:
        """One request with retries; redirects followed by hand so that only
        ``CROSS_ORIGIN_HEADERS`` reach another origin; a Bearer challenge answered with a token."""
        origin_of(url)  # a URL that cannot be requested is the caller's error, not the origin's
        attempt = 0
        while True:
            try:
                response = await self._authorized(method, url, headers)
            except ValueError:  # aiohttp refuses e.g. control characters in a header value
                raise SwarmflyError("bad_request", "a request header is not valid HTTP") from None
            except (aiohttp.ClientError, TimeoutError) as exc:
                if attempt >= self.retries:
                    words = connect_error_in_words(exc, url, seconds=self.timeout.sock_connect)
                    raise SwarmflyError("source_error", words) from None
            else:
                if response.status < 500 or attempt >= self.retries:
                    return response
                response.release()
            attempt += 1
            await asyncio.sleep(self.backoff * 2 ** (attempt - 1))

    async def _authorized(
        self, method: str, url: str, headers: Mapping[str, str]
    ) -> aiohttp.ClientResponse:
        """Send with the token an earlier challenge of this repository led to, so a piece
        costs one round trip; on 401 answer the (new) challenge once."""
        if _bearer_of(headers):  # the caller holds its own token (a client behind the proxy)
            return await self._follow(method, url, dict(headers))
        scope = _scope_key(url)
        known = self._challenges.get(scope)
        if known is not None:
            token = await self.tokens.token(self._client(), known, headers)
            response = await self._follow(method, url, _with_bearer(headers, token))
            if response.status != 401:
                return response
            self.tokens.forget(known, headers)
        else:
            response = await self._follow(method, url, dict(headers))
        # Only the origin the caller named picks where its credentials go for a token: a
        # challenge from where a redirect led is that origin's answer, not ours to act on.
        challenge = (
            parse_challenge(response.headers.get("WWW-Authenticate", ""))
            if response.status == 401 and origin_of(str(response.url)) == origin_of(url)
            else None
        )
        if challenge is None:
            return response
        response.release()
        if self.guard is not None:  # the realm is the origin's word: it may name anywhere
            await self.guard.check(challenge.realm)
        self._challenges[scope] = challenge
        token = await self.tokens.token(self._client(), challenge, headers)
        return await self._follow(method, url, _with_bearer(headers, token))

    async def _follow(
        self, method: str, url: str, headers: dict[str, str]
    ) -> aiohttp.ClientResponse:
        origin = origin_of(url)
        headers = {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}
        for _ in range(MAX_REDIRECTS):
            if self.guard is not None:  # the URL given and every redirect, before connecting
                await self.guard.check(url)
            response = await self._client().request(
                method, url, headers=headers, allow_redirects=False
            )
            if response.status not in (301, 302, 303, 307, 308):
                return response
            location = response.headers.get("Location")
            response.release()
            if not location:
                raise SwarmflyError("source_error", "redirect without Location")
            url = str(response.url.join(URL(location)))
            if origin_of(url) != origin:  # once dropped, never sent again (curl does the same)
                headers = {k: v for k, v in headers.items() if k.lower() in CROSS_ORIGIN_HEADERS}
                origin = origin_of(url)
        raise SwarmflyError("source_error", "too many redirects")

    @staticmethod
    def _check(response: aiohttp.ClientResponse) -> None:
        if response.status == 412:
            raise SwarmflyError("source_error", "origin content changed during the download")
        if response.status >= 400:
            code: ErrorCode = "not_found" if response.status == 404 else "source_error"
            raise SwarmflyError(
                code, f"origin answered {response.status} {response.reason or ''}".strip()
            )

    async def stat(self, url: str, headers: Mapping[str, str]) -> SourceStat:
        response = await self._open("GET", url, {**headers, "Range": "bytes=0-0"})
        try:
            self._check(response)
            etag = response.headers.get("ETag")
            if response.status == 206:
                span = content_range(response.headers.get("Content-Range"))
                if span is not None and span[2] is not None:
                    return SourceStat(span[2], True, etag)
            return SourceStat(content_length(response.headers.get("Content-Length")), False, etag)
        finally:
            response.release()

    async def fetch(
        self, url: str, headers: Mapping[str, str], start: int = 0, end: int | None = None
    ) -> AsyncIterator[bytes]:
        request_headers = dict(headers)
        ranged = start > 0 or end is not None
        if ranged:
            last = "" if end is None else str(end - 1)
            request_headers["Range"] = f"bytes={start}-{last}"
        response = await self._open("GET", url, request_headers)
        try:
            self._check(response)
            if ranged and response.status != 206:
                raise SwarmflyError("source_error", "origin ignored the Range request")
            expected = None if end is None else end - start
            received = 0
            async for chunk in response.content.iter_chunked(CHUNK):
                received += len(chunk)
                if expected is not None and received > expected:
                    raise SwarmflyError("source_error", "origin sent more bytes than asked")
                yield chunk
            if expected is not None and received != expected:
                raise SwarmflyError("source_error", f"origin sent {received} of {expected} bytes")
        except (aiohttp.ClientError, TimeoutError) as exc:
            words = connect_error_in_words(exc, url, seconds=self.timeout.sock_read)
            raise SwarmflyError("source_error", words) from None
        finally:
            response.release()


@hookimpl
def swarmfly_register_sources(register: SourceRegistry) -> None:
    register.add(HttpSource(guard=register.origins))
