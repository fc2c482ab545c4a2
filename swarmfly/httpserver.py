"""Run an aiohttp application on a listen address, torn down with the service's exit stack."""

from __future__ import annotations

from contextlib import AsyncExitStack

from aiohttp import web


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
