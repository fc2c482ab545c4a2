"""Access: who may read what (issue 13). Real nats-server, scheduler, storage and peer in their
own processes, a real HTTP origin; the attacker is whoever reaches a port."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import aiohttp
import pytest

from swarmfly.bus import Bus
from swarmfly.capability import Signer
from swarmfly.testing import Origin, capability
from tests.integration.test_swarm import Cluster, get

MiB = 1024 * 1024
pytestmark = pytest.mark.slow


async def test_the_data_plane_serves_only_a_child_the_scheduler_sent(
    cluster: Cluster, bus: Bus, tmp_path: Path
) -> None:
    """Attack 3: after a private download, a plain ranged GET of the task's data (or of what
    a host holds) from the peer's and the storage's upload servers gets nothing; a child the
    scheduler scheduled for the task does."""
    data = os.urandom(3 * MiB)
    async with Origin(required_headers={"Authorization": "Bearer s3cr3t"}).serve() as origin:
        url = origin.add("private.bin", data)
        cluster.start(peers=1)
        out = tmp_path / "out.bin"
        result = await get(
            url,
            out,
            cluster.peer_dir(0),
            *cluster.get_args(),
            "--header",
            "Authorization: Bearer s3cr3t",
        )
        assert result["exit"] == 0, result
        task = result["task_id"]
        other = hashlib.sha256(b"another task").hexdigest()
        forged = Signer.generate().mint(task, "pattacker", 2e9)
        attempts = {
            "no capability": {},
            "a member's own key": {"Authorization": f"Bearer {forged}"},
            "another task's": await capability(bus, other, host_id="attacker"),
        }
        async with aiohttp.ClientSession() as session:
            for server in (cluster.peers[0], cluster.storage):
                for resource in ("data", "pieces"):
                    target = f"{server.url}/v1/tasks/{task}/{resource}"
                    for name, auth in attempts.items():
                        headers = {"Range": "bytes=0-1048575", **auth}
                        async with session.get(target, headers=headers) as response:
                            body = await response.read()
                        assert response.status == 403, (server.kind, resource, name)
                        assert data[:64] not in body
            # A child the scheduler schedules for the task shows its capability and reads.
            scheduled = await capability(bus, task, host_id="newcomer")
            target = f"{cluster.storage.url}/v1/tasks/{task}/data"
            headers = {"Range": "bytes=0-1048575", **scheduled}
            async with session.get(target, headers=headers) as response:
                assert response.status == 206
                assert await response.read() == data[:MiB]


async def test_naming_a_private_digest_under_ones_own_url_gets_nothing_of_it(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Attack 1: after a client with credentials downloaded a private blob, a client without
    any names the same digest under a URL it controls, or with `--digest` on a public URL:
    it gets its own origin's bytes (or nothing), never the private ones, from the cache or
    over P2P, and the private origin sees only the first client."""
    private, own = os.urandom(2 * MiB), os.urandom(2 * MiB)
    digest = f"sha256:{hashlib.sha256(private).hexdigest()}"
    async with (
        Origin(required_headers={"Authorization": "Bearer s3cr3t"}).serve() as registry,
        Origin().serve() as attacker,
    ):
        path = f"v2/team/app/blobs/{digest}"
        cluster.start(peers=2)
        first = await get(
            registry.add(path, private),
            tmp_path / "a.bin",
            cluster.peer_dir(0),
            *cluster.get_args(),
            "--header",
            "Authorization: Bearer s3cr3t",
        )
        assert first["exit"] == 0, first
        served = registry.bytes_served
        # The attacker's own server answers for the private digest with its own bytes.
        lure = attacker.add(path, own)
        for host in (0, 1):  # the host that holds it, and another that would get it by P2P
            out = tmp_path / f"lure{host}.bin"
            result = await get(lure, out, cluster.peer_dir(host), *cluster.get_args())
            assert result["exit"] != 0  # its bytes do not match the digest it named
            assert not out.exists()
            public = attacker.add(f"public{host}.bin", own)
            named = tmp_path / f"named{host}.bin"
            result = await get(
                public, named, cluster.peer_dir(host), *cluster.get_args(), "--digest", digest
            )
            assert result["exit"] != 0
            assert not named.exists()
        assert registry.bytes_served == served  # nobody else read the private origin
