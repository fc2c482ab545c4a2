"""Leech hosts (``[peer] upload = false``, Dragonfly's disableShared): a leech downloads
through the swarm, serves no piece, and the scheduler never offers it as a parent."""

from __future__ import annotations

import copy
import hashlib
import os
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from swarmfly.bus import Bus
from swarmfly.content import SourceRequest
from swarmfly.natsserver import NatsServer
from swarmfly.services.peer.host import HostSettings, PeerHost
from swarmfly.testing import Origin, in_process_cluster

MiB = 1024 * 1024


async def test_a_leech_downloads_uploads_nothing_and_is_never_a_parent(
    nats: NatsServer, prefix: str, origin: Origin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(6 * MiB + 5)
    url = origin.add("f.bin", data)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    async with in_process_cluster(nats.url, prefix, tmp_path) as cluster, AsyncExitStack() as stack:
        core = cluster.scheduler.core
        offered: list[str] = []
        choose = core._choose_parents

        def recording(*args: Any) -> Any:
            parents = choose(*args)
            offered.extend(parent.host_id for parent in parents)
            return parents

        monkeypatch.setattr(core, "_choose_parents", recording)
        config = copy.deepcopy(cluster.config)
        config.peer.upload = False
        bus = await Bus.connect([nats.url], prefix=prefix, name="leech")
        stack.push_async_callback(bus.close)
        settings = HostSettings.of(config, "peer", tmp_path / "leech")
        leech = PeerHost(settings, bus, [nats.url], cluster.peer.node.plugins)
        await leech.start(stack)

        first = await leech.download(SourceRequest(url, digest=digest))
        assert first.digest == digest
        assert leech.store.open(first.task_id).data_path.read_bytes() == data

        async with aiohttp.ClientSession() as session:
            pieces = f"{leech.upload_url}/v1/tasks/{first.task_id}/pieces"
            async with session.get(pieces) as response:
                assert response.status == 403
                assert await response.text() == "this host does not upload"
            async with session.get(f"{leech.upload_url}/healthz") as response:
                assert response.status == 200, "health and metrics are still served"

        hosts = {h["id"]: h for h in cluster.scheduler.snapshot()["hosts"]}
        assert hosts[settings.host_id]["upload_slots"] == 0

        # The leech holds every piece, and a normal peer ranks above a seed: only its being
        # a leech keeps it out of the next peer's parents.
        second = await cluster.peer.node.download(SourceRequest(url, digest=digest))
        assert second.bytes_p2p == len(data)
        assert offered, "parents were offered"
        assert settings.host_id not in offered
        assert cluster.storage.node.settings.host_id in offered
