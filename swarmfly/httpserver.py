"""Run an aiohttp application on a listen address, and send file spans to its clients."""

from __future__ import annotations

import asyncio
import os
from contextlib import AsyncExitStack
from pathlib import Path

from aiohttp import web

from swarmfly.ratelimit import TokenBucket

CHUNK = 128 * 1024


async def serve_http(stack: AsyncExitStack, app: web.Application, host: str, port: int) -> str:
    """Start ``app`` and return its base URL (port 0 picks a free one)."""
    # Long-polls would hold a graceful shutdown for their whole wait: give them a second.
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    bound = runner.addresses[-1][1]
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    return f"http://{shown}:{bound}"


async def send_span(
    request: web.Request,
    response: web.StreamResponse,
    path: Path,
    start: int,
    size: int,
    bucket: TokenBucket | None = None,
) -> None:
    """Write bytes [start, start+size) of a file to a prepared response: sendfile when
    unpaced (the kernel copies), chunks paced by ``bucket`` otherwise or where the loop
    has no sendfile (uvloop)."""
    sent = 0
    with open(path, "rb") as handle:
        if (bucket is None or bucket.unlimited) and request.transport is not None:
            try:
                loop = asyncio.get_running_loop()
                sent = await loop.sendfile(request.transport, handle, start, size, fallback=False)
            except (NotImplementedError, asyncio.SendfileNotAvailableError):
                sent = 0
        offset, end = start + sent, start + size
        while offset < end:
            count = min(CHUNK, end - offset)
            if bucket is not None:
                await bucket.take(count)
            await response.write(os.pread(handle.fileno(), count, offset))
            offset += count
