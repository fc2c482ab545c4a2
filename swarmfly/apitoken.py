"""The token that guards the scheduler's dashboard and API: they show task ids, URLs and every
host's address, which nobody who merely reaches the port (or shares the machine) may read.

One per state dir, made on first start (0600 in the 0700 state dir), or configured
(``[scheduler] api_token_file``, e.g. a Kubernetes secret) so that several schedulers share it.
A browser shows it once (``/?token=…``) and keeps it as a same-site, HTTP-only cookie.
"""

from __future__ import annotations

import hmac
import os
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

FILE = "api-token"
COOKIE = "swarmfly_api"
OPEN = frozenset({"/", "/healthz", "/metrics"})
"""Paths that show nothing of tasks or hosts: the page (its data comes from the API), and
what load balancers and Prometheus read."""


def load(path: Path) -> str:
    """The token in ``path``, made there first if missing (readable by its owner only)."""
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        token = ""
    if token:
        return token
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "w") as handle:
        handle.write(token + "\n")
    return token


def presented(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip()
    return request.cookies.get(COOKIE, "")


def guard(token: str) -> Callable[..., Awaitable[web.StreamResponse]]:
    """aiohttp middleware: the API answers 401 without the token; ``/?token=`` sets the
    cookie the page's own requests then carry."""

    @web.middleware
    async def check(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        offered = request.query.get("token", "")
        if request.path == "/" and offered and hmac.compare_digest(offered, token):
            response = web.HTTPFound("/")  # the token leaves the address bar at once
            response.set_cookie(COOKIE, token, httponly=True, samesite="Strict", path="/")
            raise response
        if request.path in OPEN:
            return await handler(request)
        if not hmac.compare_digest(presented(request), token):
            raise web.HTTPUnauthorized(
                text="the scheduler's API needs its token (Authorization: Bearer, or open"
                " /?token=… once): see [scheduler] api_token_file",
                headers={"WWW-Authenticate": 'Bearer realm="swarmfly"'},
            )
        return await handler(request)

    return check
