"""Stream a task to an HTTP client while the swarm is still bringing it in.

Pieces go out in order as each is verified, so a container engine starts on a layer before
it is whole. The range's last piece goes out only once the whole download has passed its
digest check: a download that fails leaves the client with a short body (which it rejects),
never with a complete-looking, unverified one.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from swarmfly.errors import SwarmflyError
from swarmfly.httpheaders import Span
from swarmfly.httpserver import send_span
from swarmfly.services.peer.node import Download

POLL = 0.5
"""Seconds between looks at a download's state while no piece arrives."""


async def content_of(run: Download) -> tuple[int, int]:
    """(content length, piece length) once the run has learned them."""
    stored = run.conductor.stored
    while stored.content is None:
        if run.running.done():
            run.running.result()  # raises the download's error
            if stored.content is None:
                raise SwarmflyError("internal", "download ended without content")
        await stored.wait_change(stored.version, POLL)
    return stored.content.content_length, stored.content.piece_length


async def send(
    request: web.Request, response: web.StreamResponse, run: Download, span: Span
) -> None:
    """Write ``span`` of the task to a prepared response as its pieces are verified."""
    stored = run.conductor.stored
    assert stored.content is not None
    length = stored.content.piece_length
    last = (span.end - 1) // length
    offset = span.start
    with stored.in_use():  # never evicted while a client reads it
        while offset < span.end:
            number = offset // length
            if number == last:
                await asyncio.shield(run.running)
                if any(span.start // length <= n < last for n in run.conductor.repaired):
                    # Sent before the whole file's check found them false: the client has
                    # them; a short body makes it ask again, and the cache is right by then.
                    raise SwarmflyError("integrity", "pieces already sent were read again")
            while number not in stored.done:
                if run.running.done():
                    run.running.result()
                    if number not in stored.done:
                        raise SwarmflyError("integrity", "the download was reset")
                await stored.wait_change(stored.version, POLL)
            ready = number + 1
            while ready < last and ready in stored.done:
                ready += 1
            end = span.end if ready > last else min(span.end, ready * length)
            await send_span(request, response, stored.data_path, offset, end - offset)
            offset = end
