"""``scheduler.state`` and the dashboard stay within a NATS message however large the cluster:
at 12,000 hosts and a task of 5,000 peers the state lists the most recent few, counts all of
them, and says what it left out (#14: it used to list every host, past NATS's 1 MiB at about
8,500)."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path

import orjson

from swarmfly import ids
from swarmfly.bus import Bus
from swarmfly.config import Config, NatsConfig
from swarmfly.content import TaskContent
from swarmfly.contracts import messages
from swarmfly.launch import start_scheduler
from swarmfly.natsserver import NatsServer
from swarmfly.services.scheduler.core import HostSpec
from swarmfly.services.scheduler.service import HOST_LIMIT, PEER_LIMIT, STATE_BUDGET
from swarmfly.testing import connect_role

HOSTS, PEERS, PIECES = 12_000, 5_000, 16_384
TASK = "e" * 64


async def test_the_state_of_a_large_cluster_fits_a_message(
    nats: NatsServer, prefix: str, bus: Bus, tmp_path: Path
) -> None:
    config = Config(state_dir=tmp_path, nats=NatsConfig(servers=[nats.url], prefix=prefix))
    async with AsyncExitStack() as stack:
        own = await connect_role(nats.url, prefix, "scheduler")
        stack.push_async_callback(own.close)
        scheduler = await start_scheduler(stack, config, own)
        core, now = scheduler.core, scheduler.clock()
        content = TaskContent(PIECES * 4 * 2**20, 4 * 2**20, PIECES)
        seed = HostSpec("storage-big", "10.1.0.1", 4000, "seed")
        core.register(
            task_id=TASK, peer_id=ids.peer_id(seed.id, TASK), host=seed, now=now,
            content=content, seed=True,
        )  # fmt: skip
        for n in range(HOSTS):
            spec = HostSpec(f"host-{n}", f"10.{n // 250 % 250}.{n % 250}.9", 4000, "normal")
            core.heartbeat(spec, 0, now + n / HOSTS)
            if n < PEERS:
                core.register(task_id=TASK, peer_id=ids.peer_id(spec.id, TASK), host=spec, now=now)

        msg = await bus.nc.request(
            bus.subject("scheduler.state"), orjson.dumps({"bitmaps": True}), timeout=10
        )
        assert len(msg.data) <= STATE_BUDGET
        state = await bus.request(messages.STATE, messages.StateRequest(bitmaps=True), timeout=10)
        assert state.host_count == HOSTS + 1
        assert len(state.hosts) == HOST_LIMIT
        assert state.hosts[0].id == f"host-{HOSTS - 1}", "most recently seen first"
        (task,) = state.tasks
        assert task.summary is not None
        assert task.summary.peers == PEERS + 1
        assert task.summary.sources == 1
        assert task.peers[0].source, "the task's sources come first"
        assert len(task.peers) <= PEER_LIMIT
        assert state.truncated is True, "a bitmap of 16,384 pieces each: not all 200 fit"
        # Asking for fewer is answered in full.
        small = await bus.request(
            messages.STATE, messages.StateRequest(host_limit=10, peer_limit=5, task_id=TASK)
        )
        assert (len(small.hosts), len(small.tasks[0].peers)) == (10, 5)
        assert "truncated" not in small.to_dict()
        # The dashboard's view is the same bounded state.
        view = await scheduler._view(bitmaps=True)
        assert len(orjson.dumps(view)) <= STATE_BUDGET
