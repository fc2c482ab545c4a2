"""`swarmfly get` through this host's peer service over NATS: the ``peer.{host_id}.download``
request, and the peer's progress as a long poll (``peer.{host_id}.progress``, answered when
the download moves) that also tells the peer is still there."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from swarmfly.bus import Bus
from swarmfly.contracts import messages
from swarmfly.errors import SwarmflyError
from swarmfly.get.request import GetRequest, PeerGone, Progress, report
from swarmfly.localproto import KEEPALIVE, PROGRESS_INTERVAL

REPLY_GRACE = 2.0
"""Seconds a finished download's reply may lag its progress before it is asked for again."""
PEER_SILENCE = 3.0
"""Seconds without a progress answer after which the peer service counts as gone."""
QUIET_INTERVAL = 1.0
"""Seconds between progress asks without a bar: they only watch that the peer is alive."""


async def get(
    bus: Bus, host_id: str, request: GetRequest, progress: Progress | None
) -> dict[str, Any]:
    """The peer's download reply; PeerGone when the peer stops answering."""
    body = messages.DownloadRequest.from_dict(request.body(request.output))
    download_id = body.download_id

    def ask() -> asyncio.Task[messages.DownloadReply]:
        return asyncio.create_task(
            bus.request(messages.DOWNLOAD, body, timeout=request.timeout + 5, host_id=host_id)
        )

    def poll(after: int) -> asyncio.Task[messages.ProgressReply]:
        asked = messages.ProgressRequest(download_id, after=after, wait_s=KEEPALIVE)
        return asyncio.create_task(
            bus.request(messages.PROGRESS, asked, timeout=KEEPALIVE + 5, host_id=host_id)
        )

    interval = PROGRESS_INTERVAL if progress is not None else QUIET_INTERVAL
    call = ask()
    seen_bytes = -1
    silent_since: float | None = None
    seen = False
    forgotten_since: float | None = None
    try:
        while not call.done():
            started = time.monotonic()
            asking = poll(seen_bytes)
            await asyncio.wait([call, asking], return_when=asyncio.FIRST_COMPLETED)
            if call.done():
                asking.cancel()
                break
            try:
                state = asking.result()
            except SwarmflyError:
                if not bus.nc.is_connected:
                    # NATS is down, not the peer: it keeps downloading, and both reconnect.
                    silent_since = None
                elif (silent_since := silent_since or time.monotonic()) and (
                    time.monotonic() - silent_since > PEER_SILENCE
                ):
                    # A peer service that stops answering will never reply to the download.
                    raise PeerGone() from None
                await asyncio.wait([call], timeout=interval)
                continue
            silent_since = None
            if state.state != "unknown":
                seen, forgotten_since = True, None
                seen_bytes = state.completed_bytes
            elif seen:
                # The peer finished and forgot this download, yet no reply came: it was lost
                # in a NATS reconnect. Ask again; the file is in the peer's cache by now.
                forgotten_since = forgotten_since or time.monotonic()
                if time.monotonic() - forgotten_since > REPLY_GRACE:
                    call.cancel()
                    call, seen, forgotten_since, seen_bytes = ask(), False, None, -1
            if progress is not None:
                report(progress, state)
            await asyncio.wait([call], timeout=max(0.0, interval - (time.monotonic() - started)))
    finally:
        call.cancel()
    return call.result().to_dict()
