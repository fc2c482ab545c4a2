"""The one lifecycle of swarmfly's services (scheduler, storage, peer, proxy), as nameko has
one for its own (start, stop, kill):

``start(stack)``
    Open what the service serves (NATS endpoints, ports, background loops), each with its
    cleanup pushed on ``stack``; return once it serves. A failure to start raises, and what
    was opened closes with the stack.
``drain()``
    Stop taking new work and hand over what is in flight, while the service still answers
    what it has: a host leaves the swarm (its children get other parents at once, a seed's
    origin reads go to the swarm first), a scheduler hands its partitions on, the proxy stops
    accepting connections. Once each; bounded by ``DRAIN_SECONDS`` here, and by as much again
    as a service's ``hand_over_seconds`` (the storage's hand-over of its cached tasks).
stop
    The stack closes, last opened first: ports, subscriptions, connections; what still runs
    is cancelled.

``swarmfly.launch`` starts them in order and, on SIGINT or SIGTERM, drains them in reverse
(``drain``: the proxy before the peer it fronts, the hosts before the scheduler that hears
them leave) before the stack stops them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from contextlib import AsyncExitStack
from typing import Protocol

log = logging.getLogger(__name__)

DRAIN_SECONDS = 15.0
"""What one service's drain may take before the stop goes on without it (a seed hands over
for at most 10 s, a leave waits 2 s for the schedulers)."""


class Service(Protocol):
    name: str
    """``scheduler``, ``storage``, ``peer`` or ``proxy``: what logs and `swarmfly status` say."""

    async def start(self, stack: AsyncExitStack) -> None: ...

    async def drain(self) -> None: ...


async def drain(services: Sequence[Service], seconds: float = DRAIN_SECONDS) -> None:
    """Drain ``services`` in reverse order of start, each within ``seconds`` plus its own
    ``hand_over_seconds`` where it has one (an attribute, not part of every service's
    lifecycle: only the storage hands work over for longer)."""
    for service in reversed(services):
        bound = seconds + float(getattr(service, "hand_over_seconds", 0.0))
        try:
            await asyncio.wait_for(service.drain(), bound)
        except TimeoutError:
            log.warning("%s did not drain in %gs: stopping it", service.name, bound)
        except Exception:  # a failed drain must not keep the others from theirs
            log.exception("%s failed to drain", service.name)
