"""`swarmfly get` (and `swarmfly doctor`'s probe): a download for a user of this host.

Three ways, tried in turn: the host's peer service over its local socket (``socket_client``,
the standard library only, as dfget asks dfdaemon); the same peer over NATS (``nats_client``:
when tracing, since the trace goes with the request, or when the socket is not there); else a
peer run in this process (``in_process``). ``request`` holds what the user asks for. Progress
comes from the peer's change notification, whichever way (``services/peer/progress.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from swarmfly.get import socket_client
from swarmfly.get.request import GetRequest, PeerGone, Progress

if TYPE_CHECKING:
    from swarmfly.config import Config

__all__ = ["GetRequest", "Progress", "get", "get_async"]

Run = Callable[[Coroutine[Any, Any, dict[str, Any]]], dict[str, Any]]


def get(
    config: Config,
    request: GetRequest,
    progress: Progress | None = None,
    *,
    within: float | None = None,
    run: Run,
) -> dict[str, Any]:
    """The download's summary. ``within``: seconds to wait for NATS before the origin is read
    without the swarm (None: as long as it takes); ``run``: the event loop for the ways that
    need one (the socket needs none)."""
    request = request.checked()
    found = _via_socket(config, request, progress)
    if found is not None:
        return found
    from swarmfly.get import without_socket  # here: the socket needs no event loop, no NATS

    return run(without_socket.get(config, request, progress, within))


async def get_async(
    config: Config,
    request: GetRequest,
    progress: Progress | None = None,
    *,
    within: float | None = None,
) -> dict[str, Any]:
    """``get`` from a running event loop (the socket's blocking calls in a thread)."""
    import asyncio

    from swarmfly.get import without_socket

    request = request.checked()
    found = await asyncio.to_thread(_via_socket, config, request, progress)
    if found is not None:
        return found
    return await without_socket.get(config, request, progress, within)


def _via_socket(
    config: Config, request: GetRequest, progress: Progress | None
) -> dict[str, Any] | None:
    if config.tracing:
        return None
    try:
        return socket_client.get(config.state_dir, request, progress, config.peer.socket)
    except PeerGone:  # it died: an in-process peer takes over
        return None
