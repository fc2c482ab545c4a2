"""Preheat on a host: ``peer.{host_id}.preheat``, a peer caching a task now through the swarm
(`swarmfly preheat --scope all-peers`), and ``reported``, how every host doing a preheat
(storage or peer) tells the CLI that started it how far it has got, on
``preheat.{job}.progress`` under its own host id.

Who may ask a peer to preheat is the shipped NATS permissions' business: only the client
role (the operator's CLI) may publish ``peer.*.preheat``. The bytes are any download's:
checked against the origin with the request's own credentials, verified piece by piece.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import nats.errors

from swarmfly.bus import Bus
from swarmfly.content import SourceRequest
from swarmfly.contracts import messages
from swarmfly.errors import SwarmflyError
from swarmfly.localproto import KEEPALIVE, PROGRESS_INTERVAL
from swarmfly.services.peer.host import Download, DownloadResult, PeerHost
from swarmfly.services.peer.progress import follow

log = logging.getLogger(__name__)

PREHEAT_SECONDS = 3600.0
"""A peer preheat's time limit unless the request sets one."""
MAX_ERROR = 1024
"""Characters of a failure's message an event carries (the contract's bound)."""


async def reported(
    bus: Bus,
    sender: str,
    to: messages.PreheatProgressTo | None,
    begin: Callable[[], Awaitable[Download]],
) -> DownloadResult:
    """Run the download ``begin`` starts, reporting on ``to`` (when the request named it)
    as it starts, as verified bytes grow, and once at the end, done or failed. A report
    that cannot be sent is dropped: progress never fails the preheat."""
    if to is None:
        return await (await begin()).result()

    async def say(event: messages.PreheatProgressRequest) -> None:
        try:
            await bus.publish(messages.PREHEAT_PROGRESS, event, job=to.job, sender=sender)
        except (nats.errors.Error, OSError) as exc:
            log.debug("preheat progress of job %s not sent: %s", to.job, exc)

    await say(messages.PreheatProgressRequest(to.item, "running", 0))
    try:
        download = await begin()
        running = asyncio.ensure_future(download.result())
        task = download.task_id

        def state(now: messages.ProgressReply) -> Awaitable[None]:
            length = now.content_length if isinstance(now.content_length, int) else None
            return say(
                messages.PreheatProgressRequest(
                    to.item, "running", now.completed_bytes, task, length
                )
            )

        try:
            await follow(
                lambda: download.conductor,
                running,
                state,
                interval=PROGRESS_INTERVAL,
                keepalive=KEEPALIVE,
            )
            result = await running
        finally:
            running.cancel()  # a cancelled preheat stops waiting; the download goes on
    except SwarmflyError as exc:
        await say(failed(to.item, exc.message))
        raise
    except asyncio.CancelledError:  # its time limit, or the host shutting down
        await say(failed(to.item, "stopped before it finished"))
        raise
    size = result.content_length
    await say(messages.PreheatProgressRequest(to.item, "done", size, result.task_id, size))
    return result


def failed(item: int, why: str) -> messages.PreheatProgressRequest:
    return messages.PreheatProgressRequest(item, "failed", 0, error=why[:MAX_ERROR])


class PeerPreheat:
    """``peer.{host_id}.preheat``: the task into this peer's cache, no output written."""

    def __init__(self, node: PeerHost, bus: Bus, *, strategy: str) -> None:
        self.node = node
        self.bus = bus
        self.strategy = strategy

    async def on_preheat(self, req: messages.PeerPreheatRequest) -> messages.PreheatReply:
        source = SourceRequest.of(req.source)
        await self.node.plugins.origins.check(source.url)
        seconds = req.timeout_s or PREHEAT_SECONDS
        try:
            async with asyncio.timeout(seconds):
                result = await reported(
                    self.bus,
                    self.node.sender,
                    req.progress,
                    lambda: self.node.begin(source, strategy=self.strategy),
                )
        except TimeoutError:
            raise SwarmflyError("timeout", f"preheat did not finish in {seconds:g}s") from None
        log.info(
            "preheated task %s: %d bytes (%d from the origin) in %.2fs",
            result.task_id[:12],
            result.content_length,
            result.bytes_origin,
            result.seconds,
        )
        return messages.PreheatReply.from_dict(
            {**result.summary(), "host_id": self.node.settings.host_id}
        )
