"""How far a download has got, told when it moves: the one progress mechanism behind the
local socket's progress lines, ``peer.{host_id}.progress`` (a long poll) and the in-process
`get`. Each waits on the stored task's change notification (``StoredTask.wait_change``),
never on a timer, but for a keepalive while nothing moves.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from swarmfly.contracts import messages

if TYPE_CHECKING:
    from swarmfly.services.peer.conductor import Conductor

UNKNOWN = messages.ProgressReply("unknown", 0, None)
"""A download this peer does not run (not yet, or no longer)."""
MAX_WAIT = 10.0
"""Seconds a progress request may ask the peer to hold its answer (the contract's bound)."""


def state_of(conductor: Conductor | None) -> messages.ProgressReply:
    if conductor is None:
        return UNKNOWN
    stored = conductor.stored
    content = stored.content
    return messages.ProgressReply(
        state="done" if stored.complete else "running",
        completed_bytes=stored.completed_bytes,
        content_length=content.content_length if content else None,
    )


async def moved(
    conductor: Conductor | None,
    after: int,
    wait: float,
    ended: asyncio.Future[Any] | None = None,
) -> messages.ProgressReply:
    """The state once more than ``after`` bytes are verified, or ``ended`` is done, or after
    ``wait`` seconds, whichever comes first."""
    if conductor is None:
        return UNKNOWN
    stored = conductor.stored
    loop = asyncio.get_running_loop()
    deadline = loop.time() + min(wait, MAX_WAIT)
    while (
        stored.completed_bytes <= after
        and not (ended is not None and ended.done())
        and (left := deadline - loop.time()) > 0
    ):
        change = asyncio.ensure_future(stored.wait_change(stored.version, left))
        try:
            await asyncio.wait(
                [change] if ended is None else [change, ended],
                timeout=left,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            change.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await change
    return state_of(conductor)


async def follow(
    conductor: Callable[[], Conductor | None],
    running: asyncio.Future[Any],
    report: Callable[[messages.ProgressReply], Awaitable[None] | None],
    *,
    interval: float,
    keepalive: float,
) -> None:
    """``report`` each move of a download until ``running`` is done: at most once per
    ``interval`` (a bar's refresh), and while nothing moves once per ``interval`` plus
    ``keepalive`` (so the other end knows the peer is alive)."""
    seen = -1
    while not running.done():
        state = await moved(conductor(), seen, keepalive, ended=running)
        if running.done():
            return
        seen = state.completed_bytes
        told = report(state)
        if told is not None:
            await told
        await asyncio.wait([running], timeout=interval)
