"""Stream a task to an HTTP client while the swarm is still bringing it in.

Pieces go out in order as each is verified, so a container engine starts on a layer before
it is whole. The range's last piece goes out only once the whole download has passed its
digest check: a download that fails leaves the client with a short body (which it rejects),
never with a complete-looking, unverified one.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from swarmfly.errors import SwarmflyError
from swarmfly.httpheaders import Span, Unsatisfiable, byte_range
from swarmfly.httpserver import send_span
from swarmfly.metrics import ProxyMetrics
from swarmfly.services.peer.host import Download

log = logging.getLogger(__name__)

POLL = 0.5
"""Seconds between looks at a download's state while no piece arrives."""


async def content_of(download: Download) -> tuple[int, int]:
    """(content length, piece length) once the download has learned them."""
    stored = download.conductor.stored
    while stored.content is None:
        if download.running.done():
            download.running.result()  # raises the download's error
            if stored.content is None:
                raise SwarmflyError("internal", "download ended without content")
        await stored.wait_change(stored.version, POLL)
    return stored.content.content_length, stored.content.piece_length


async def respond(
    request: web.Request,
    download: Download,
    length: int,
    headers: dict[str, str],
    metrics: ProxyMetrics,
) -> web.StreamResponse:
    """The client's range (or all) of a download: 200 or 206, 416 for a range past the end."""
    try:
        span = byte_range(request.headers.get("Range"), length)
    except Unsatisfiable:
        return web.Response(status=416, headers={"Content-Range": f"bytes */{length}"})
    whole = span is None
    span = span or Span(0, length)
    response = web.StreamResponse(status=200 if whole else 206)
    response.headers.update(headers)
    response.headers["Accept-Ranges"] = "bytes"
    response.content_type = "application/octet-stream"
    if not whole:
        response.headers["Content-Range"] = f"bytes {span.start}-{span.end - 1}/{length}"
    response.content_length = span.size
    await response.prepare(request)
    if span.size == 0:
        return response
    try:
        await send(request, response, download, span)
        await response.write_eof()
    except ConnectionError:
        log.debug("proxy: client went away during %s", download.task_id[:12])
    except SwarmflyError as exc:
        # Headers are gone: cutting the connection is how the client learns of it.
        log.warning("proxy: %s failed mid-stream: %s", download.task_id[:12], exc)
        metrics.count("failed")
        if request.transport is not None:
            request.transport.abort()
    return response


async def send(
    request: web.Request, response: web.StreamResponse, download: Download, span: Span
) -> None:
    """Write ``span`` of the task to a prepared response as its pieces are verified."""
    stored = download.conductor.stored
    assert stored.content is not None
    length = stored.content.piece_length
    last = (span.end - 1) // length
    offset = span.start
    with stored.in_use():  # never evicted while a client reads it
        while offset < span.end:
            number = offset // length
            if number == last:
                await asyncio.shield(download.running)
                if any(span.start // length <= n < last for n in download.conductor.repaired):
                    # Sent before the whole file's check found them false: the client has
                    # them; a short body makes it ask again, and the cache is right by then.
                    raise SwarmflyError("integrity", "pieces already sent were read again")
            while number not in stored.done:
                if download.running.done():
                    download.running.result()
                    if number not in stored.done:
                        raise SwarmflyError("integrity", "the download was reset")
                await stored.wait_change(stored.version, POLL)
            ready = number + 1
            while ready < last and ready in stored.done:
                ready += 1
            end = span.end if ready > last else min(span.end, ready * length)
            await send_span(request, response, stored.data_path, offset, end - offset)
            offset = end
