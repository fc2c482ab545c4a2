"""The http source against real HTTP servers: redirects, retries, errors."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import pytest
from aiohttp import web

from swarmfly.errors import SwarmflyError
from swarmfly.httpserver import serve_http
from swarmfly.plugins.sources.http import HttpSource

DATA = os.urandom(300_000)


class Recorder:
    """An origin that records the Authorization header of each request it gets."""

    def __init__(self) -> None:
        self.seen: list[str | None] = []
        self.headers: list[dict[str, str]] = []
        """Every header of each request, names lower-cased."""
        self.failures_left = 0
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(request.headers.get("Authorization"))
        self.headers.append({k.lower(): v for k, v in request.headers.items()})
        if self.failures_left > 0:
            self.failures_left -= 1
            raise web.HTTPServiceUnavailable()
        if request.match_info["name"] == "forbidden":
            raise web.HTTPForbidden()
        if request.match_info["name"] == "hop":
            raise web.HTTPFound(location=request.query["to"])
        return web.Response(body=DATA)


@asynccontextmanager
async def recorder() -> AsyncIterator[Recorder]:
    origin = Recorder()
    app = web.Application()
    app.router.add_get("/{name}", origin.handle)
    async with AsyncExitStack() as stack:
        origin.url = await serve_http(stack, app, "127.0.0.1", 0)
        yield origin


async def read(source: HttpSource, url: str, headers: dict[str, str]) -> bytes:
    return b"".join([chunk async for chunk in source.fetch(url, headers)])


async def test_authorization_is_dropped_when_a_redirect_changes_origin() -> None:
    source = HttpSource()
    async with recorder() as first, recorder() as second:
        headers = {"Authorization": "Bearer only-for-the-first-origin"}
        same = f"{first.url}/hop?to={first.url}/blob"
        assert await read(source, same, headers) == DATA
        assert first.seen == [headers["Authorization"]] * 2, "same origin: kept"
        other = f"{first.url}/hop?to={second.url}/blob"
        assert await read(source, other, headers) == DATA
        assert second.seen == [None], "another origin never sees the credential"
    await source.close()


SECRETS = {
    "Authorization": "Basic c2VjcmV0LXVzZXI6czNjcjN0",
    "Cookie": "session=c00kie-s3cret",
    "PRIVATE-TOKEN": "glpat-s3cret",
    "X-Api-Key": "k3y-s3cret",
    "X-Unknown-To-Swarmfly": "unkn0wn-s3cret",
}
"""Caller headers that say who asks: another origin must never see one of them."""
DESCRIPTIVE = {
    "Accept": "application/octet-stream",
    "User-Agent": "swarmfly-test/1",
    "If-None-Match": '"some-etag"',
}
"""Caller headers that say what is asked for: they follow the redirect."""


async def test_only_descriptive_headers_follow_a_redirect_to_another_origin() -> None:
    source = HttpSource()
    headers = {**SECRETS, **DESCRIPTIVE}
    async with recorder() as first, recorder() as second:
        # Different ports: different origins, though both are 127.0.0.1.
        assert await read(source, f"{first.url}/hop?to={second.url}/blob", headers) == DATA
        [seen] = second.headers
        for name, value in SECRETS.items():
            assert name.lower() not in seen, f"{name} crossed to another origin"
            assert all(value not in v for v in seen.values())
        for name, value in DESCRIPTIVE.items():
            assert seen[name.lower()] == value
        # A redirect within the origin keeps every header, secrets included.
        assert await read(source, f"{first.url}/hop?to={first.url}/blob", headers) == DATA
        for name, value in SECRETS.items():
            assert first.headers[-1][name.lower()] == value
        # Another name for the same address is another origin: secrets stay behind.
        alias = first.url.replace("127.0.0.1", "localhost")
        assert await read(source, f"{first.url}/hop?to={alias}/blob", headers) == DATA
        assert "cookie" not in first.headers[-1] and "x-api-key" not in first.headers[-1]
    await source.close()


async def test_a_challenge_from_where_a_redirect_led_gets_no_credentials() -> None:
    """A Bearer challenge answered by the origin a redirect went to must not make the source
    send the caller's Basic credentials to that origin's token realm."""
    source = HttpSource()
    realm_hits: list[dict[str, str]] = []

    async def challenge(request: web.Request) -> web.Response:
        return web.Response(
            status=401, headers={"WWW-Authenticate": f'Bearer realm="{realm}/token"'}
        )

    async def token(request: web.Request) -> web.Response:
        realm_hits.append(dict(request.headers))
        return web.json_response({"token": "t"})

    app = web.Application()
    app.router.add_get("/blob", challenge)
    app.router.add_get("/token", token)
    async with AsyncExitStack() as stack, recorder() as first:
        realm = await serve_http(stack, app, "127.0.0.1", 0)
        with pytest.raises(SwarmflyError, match="origin answered 401"):
            await source.stat(f"{first.url}/hop?to={realm}/blob", SECRETS)
    assert realm_hits == []
    await source.close()


async def test_5xx_is_retried_with_backoff_then_succeeds() -> None:
    source = HttpSource(retries=3, backoff=0.01)
    async with recorder() as origin:
        origin.failures_left = 2
        assert await read(source, f"{origin.url}/blob", {}) == DATA
        assert len(origin.seen) == 3
    await source.close()


async def test_persistent_5xx_and_4xx_give_clear_errors() -> None:
    source = HttpSource(retries=2, backoff=0.01)
    async with recorder() as origin:
        origin.failures_left = 100
        with pytest.raises(SwarmflyError, match="origin answered 503") as caught:
            await source.stat(f"{origin.url}/blob", {})
        assert caught.value.code == "source_error"
        assert len(origin.seen) == 3, "the first try and two retries"
        origin.failures_left = 0
        with pytest.raises(SwarmflyError, match="origin answered 403"):
            await source.stat(f"{origin.url}/forbidden", {"Authorization": "Basic c2VjcmV0"})
    await source.close()


async def test_connection_errors_are_retried_then_reported() -> None:
    source = HttpSource(retries=1, backoff=0.01)
    with pytest.raises(SwarmflyError, match=r"cannot connect to 127\.0\.0\.1:9: ") as caught:
        await source.stat("http://127.0.0.1:9/nothing-listens-here", {})
    assert caught.value.code == "source_error"
    await source.close()
