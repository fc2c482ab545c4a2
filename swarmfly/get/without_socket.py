"""The ways of `swarmfly get` that need an event loop and NATS: this host's peer service over
NATS (``nats_client``), else a peer in this process (``in_process``), which joins the swarm
if NATS is there and its credentials may act as a peer."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import AsyncExitStack
from typing import Any

from swarmfly import telemetry
from swarmfly.bus import Bus
from swarmfly.cluster import connect, local_peer, servers_of
from swarmfly.config import Config
from swarmfly.credentials import inbox_prefix
from swarmfly.errors import SwarmflyError
from swarmfly.get import in_process, nats_client
from swarmfly.get.request import GetRequest, Progress, summary
from swarmfly.ids import redact_url

log = logging.getLogger(__name__)


async def get(
    config: Config,
    request: GetRequest,
    progress: Progress | None = None,
    within: float | None = None,
) -> dict[str, Any]:
    """The download's summary (of a ``GetRequest.checked`` request): through the peer service
    over NATS, else an in-process peer."""
    async with AsyncExitStack() as stack:
        if shutdown := telemetry.setup("cli", config.tracing):
            stack.callback(shutdown)
        stack.enter_context(
            telemetry.span("swarmfly get", attributes={"url.full": redact_url(request.url)})
        )
        bus: Bus | None = None
        servers = servers_of(config)
        if servers:
            try:
                bus = await connect(config, "swarmfly-get", servers, within=within)
                stack.push_async_callback(bus.close)
            except SwarmflyError as exc:
                log.warning("%s: reading the origin without the swarm", exc.message)
                bus = None
        host_id = local_peer(config.state_dir)
        started = time.monotonic()
        async with asyncio.timeout(request.timeout):
            if bus is not None and host_id is not None:
                try:
                    reply = await nats_client.get(bus, host_id, request, progress)
                    return summary(request, reply, "peer", started)
                except SwarmflyError as exc:
                    if exc.code != "unavailable":
                        raise
                    log.info("local peer does not answer: running one in process")
            # The CLI's own credentials may not act as a peer: its in-process peer then
            # reads the origin by itself rather than wait on refused registrations.
            swarm = None if config.nats.inbox_prefix == inbox_prefix("client") else bus
            reply = await in_process.get(stack, config, swarm, servers, request, progress)
            return summary(request, reply, "in-process", started)
    raise AssertionError("unreachable")  # pragma: no cover
