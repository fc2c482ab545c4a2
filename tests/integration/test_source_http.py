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
        self.failures_left = 0
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(request.headers.get("Authorization"))
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
    with pytest.raises(SwarmflyError, match="from origin") as caught:
        await source.stat("http://127.0.0.1:9/nothing-listens-here", {})
    assert caught.value.code == "source_error"
    await source.close()
