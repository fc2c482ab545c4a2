"""The mirror's access check behind an SSO front (issue 13, item 2): a redirect is no proof that
a client may read a blob. Debian's docker-registry (htpasswd) sits behind a small aiohttp front
that sends every request without credentials to a login page (302), as SSO proxies do, and
passes credentialed ones to the registry after a redirect of its own within its origin."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web
from yarl import URL

from swarmfly.config import Config
from swarmfly.httpserver import serve_http
from swarmfly.natsserver import NatsServer
from swarmfly.testing import InProcessCluster, in_process_cluster
from tests.e2e.conftest import ALICE, ALICE_BASIC, WRONG_PASSWORD, Registry, basic_auth, push_blob

MiB = 1024 * 1024
NAME = "team/private"
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]
PASSED_BACK = (
    "Content-Length", "Content-Type", "Content-Range", "Accept-Ranges", "ETag", "Location",
    "Docker-Content-Digest", "Docker-Distribution-API-Version", "WWW-Authenticate",
)  # fmt: skip


@dataclass
class SsoFront:
    """``login`` is where clients without credentials are sent: another origin, or a page
    of the front itself (answered 200 with HTML, as a login page is)."""

    registry: Registry
    login: str
    url: str = ""
    session: aiohttp.ClientSession | None = None
    credentialed: int = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/login":
            return web.Response(text="<html>sign in</html>", content_type="text/html")
        if "Authorization" not in request.headers:
            raise web.HTTPFound(location=f"{self.login}?rd={request.path}")
        self.credentialed += 1
        if "/blobs/" in request.path and "hop" not in request.query:
            raise web.HTTPTemporaryRedirect(location=f"{request.path}?hop=1")
        assert self.session is not None
        forwarded = {
            k: v for k, v in request.headers.items() if k in ("Authorization", "Range", "Accept")
        }
        async with self.session.request(
            request.method,
            URL(self.registry.url + request.raw_path, encoded=True),
            headers=forwarded,
            allow_redirects=False,
        ) as upstream:
            response = web.StreamResponse(status=upstream.status)
            for key in PASSED_BACK:
                if key in upstream.headers:
                    response.headers[key] = upstream.headers[key]
            await response.prepare(request)
            if request.method != "HEAD":
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
            await response.write_eof()
            return response


async def sign_in(request: web.Request) -> web.Response:
    return web.Response(text="<html>sso</html>", content_type="text/html")


async def login_page() -> web.Application:
    app = web.Application()
    app.router.add_get("/login", sign_in)
    return app


@pytest.fixture(params=["login-elsewhere", "login-on-the-front"])
async def front(
    request: pytest.FixtureRequest, htpasswd_registry: Registry
) -> AsyncIterator[SsoFront]:
    async with AsyncExitStack() as stack:
        login = "/login"
        if request.param == "login-elsewhere":
            login = await serve_http(stack, await login_page(), "127.0.0.1", 0) + "/login"
        made = SsoFront(htpasswd_registry, login)
        made.session = await stack.enter_async_context(aiohttp.ClientSession())
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", made.handle)
        made.url = await serve_http(stack, app, "127.0.0.1", 0)
        yield made


@pytest.fixture
async def cluster(
    nats: NatsServer, prefix: str, tmp_path: Path, front: SsoFront
) -> AsyncIterator[InProcessCluster]:
    def configure(config: Config) -> None:
        config.proxy.registries = [front.url]

    async with in_process_cluster(nats.url, prefix, tmp_path, configure=configure) as running:
        yield running


async def get(url: str, headers: dict[str, str]) -> tuple[int, str, bytes]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session,
        session.get(url, headers=headers, allow_redirects=False) as response,
    ):
        return response.status, response.headers.get("Content-Type", ""), await response.read()


def served_through_the_swarm(cluster: InProcessCluster) -> float:
    value = cluster.proxy.metrics.registry.get_sample_value(
        "swarmfly_proxy_requests_total", {"kind": "blob"}
    )
    return value or 0.0


async def test_a_redirect_to_a_login_page_never_hands_out_a_private_blob(
    cluster: InProcessCluster, front: SsoFront, htpasswd_registry: Registry
) -> None:
    data = os.urandom(3 * MiB + 11)
    digest = await push_blob(htpasswd_registry, NAME, data, {"Authorization": ALICE_BASIC})
    proxy = cluster.proxy.url
    # Alice, with her credentials: through the front's own redirect, through the swarm.
    before = served_through_the_swarm(cluster)
    status, _, body = await get(f"{proxy}/v2/{NAME}/blobs/{digest}", {"Authorization": ALICE_BASIC})
    assert (status, body) == (200, data)
    assert served_through_the_swarm(cluster) == before + 1
    # Now the blob is in this host's cache. Without credentials, under its own repository or
    # another one: a registry error, never the bytes.
    credentialed = front.credentialed
    for name in (NAME, "someone/else"):
        status, content_type, body = await get(f"{proxy}/v2/{name}/blobs/{digest}", {})
        assert status == 401, (name, body[:200])
        assert content_type.startswith("application/json")
        assert [e["code"] for e in orjson.loads(body)["errors"]] == ["UNAUTHORIZED"]
        assert data[:64] not in body
    assert front.credentialed == credentialed, "the front saw no credentials from them"
    # Wrong credentials pass the front; the registry refuses them, and the client gets the
    # upstream's own answer (here the front's redirect within itself), never the bytes.
    wrong = basic_auth(ALICE, WRONG_PASSWORD)
    status, _, body = await get(f"{proxy}/v2/{NAME}/blobs/{digest}", wrong)
    assert status != 200 and data[:64] not in body
    assert served_through_the_swarm(cluster) == before + 1
    # And Alice still gets it, from the cache now.
    status, _, body = await get(f"{proxy}/v2/{NAME}/blobs/{digest}", {"Authorization": ALICE_BASIC})
    assert (status, body) == (200, data)
