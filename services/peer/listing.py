"""The peer's answer to a ``list`` request on its local socket (`swarmfly get --recursive`):
the files below a prefix, listed with this peer's source credentials (S3's, the Hub token),
which never leave it. The client downloads each file with an ordinary download request."""

from __future__ import annotations

import logging
from typing import Any

import orjson

from swarmfly import contracts
from swarmfly.errors import SwarmflyError
from swarmfly.listing import entries, entry_to_dict
from swarmfly.localproto import line
from swarmfly.pluginhost import Plugins
from swarmfly.services.peer.localsocket import Send

log = logging.getLogger(__name__)


def listing_request(body: bytes) -> dict[str, Any] | None:
    """The ``list`` request ``body`` is, checked against the contract; None for any other
    line (a download request, or something the download's own check refuses)."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(payload, dict) or "list" not in payload:
        return None
    try:
        contracts.local_socket().messages["list"].validate(payload)
    except contracts.Invalid as exc:
        raise SwarmflyError("bad_request", exc.message[:1024], path=exc.path[:1024]) from None
    request: dict[str, Any] = payload["list"]
    return request


async def serve_listing(plugins: Plugins, request: dict[str, Any], send: Send) -> None:
    """An ``entry`` line per file, then ``listed``; an error line instead when the listing
    fails (the client has then been sent entries it must not use)."""
    count = 0
    try:
        async for entry in entries(
            plugins, request["url"], request.get("headers", {}), request["limit"]
        ):
            await send(line({"entry": entry_to_dict(entry)}))
            count += 1
    except (SwarmflyError, ConnectionError):
        raise  # the local server sends the error line, or sees the client gone
    except Exception:
        log.exception("listing failed")
        failed = "the listing failed inside the peer (its log says why)"
        raise SwarmflyError("internal", failed) from None
    await send(line({"listed": {"count": count}}))
