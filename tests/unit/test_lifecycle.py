"""The one service lifecycle (swarmfly/lifecycle.py): drains run in reverse order of start,
each bounded, and one that fails or hangs keeps no other from its drain; on virtual time."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack

import pytest

from swarmfly import lifecycle
from swarmfly.services.peer.service import PeerService
from swarmfly.services.proxy.service import ProxyService
from swarmfly.services.scheduler.service import SchedulerService
from swarmfly.services.storage.service import StorageService
from tests.virtualtime import now, virtual_time


class Recorded:
    def __init__(self, name: str, log: list[tuple[str, float]], hang: float = 0.0) -> None:
        self.name, self.log, self.hang = name, log, hang

    async def start(self, stack: AsyncExitStack) -> None:
        self.log.append((f"start {self.name}", now()))

    async def drain(self) -> None:
        if self.name == "broken":
            raise RuntimeError("drain failed")
        await asyncio.sleep(self.hang)
        self.log.append((f"drained {self.name}", now()))


@virtual_time
async def test_drains_run_last_started_first_each_within_its_bound() -> None:
    log: list[tuple[str, float]] = []
    services = [
        Recorded("scheduler", log),
        Recorded("storage", log, hang=1.0),
        Recorded("broken", log),
        Recorded("peer", log, hang=60.0),  # past the bound: cut, the others go on
        Recorded("proxy", log),
    ]
    await lifecycle.drain(services, seconds=5.0)
    assert log == [("drained proxy", 0.0), ("drained storage", 6.0), ("drained scheduler", 6.0)]


class HandingOver(Recorded):
    hand_over_seconds = 30.0


@virtual_time
async def test_a_service_that_hands_over_has_its_own_longer_bound() -> None:
    """The storage's drain hands its cached tasks over ([storage] handover_timeout) on top
    of the bound every drain has."""
    log: list[tuple[str, float]] = []
    services = [HandingOver("storage", log, hang=20.0), HandingOver("slow", log, hang=60.0)]
    await lifecycle.drain(services, seconds=5.0)
    assert log == [("drained storage", 55.0)], "slow cut at 35 s, storage done at 20 s more"


@pytest.mark.parametrize("service", [SchedulerService, StorageService, PeerService, ProxyService])
def test_every_service_has_the_lifecycle(service: type) -> None:
    assert isinstance(service.name, str)
    for method in ("start", "drain"):
        assert asyncio.iscoroutinefunction(getattr(service, method)), (service, method)
