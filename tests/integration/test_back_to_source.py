"""dfget's ``--disable-back-to-source``: a get that may not read the origin's bytes on its
host fails, with nothing written, where no peer or seed can serve it, and succeeds where the
swarm (or a seed reading the origin) can; through the real CLI, real services as their own
processes on a real nats-server, and a real HTTP origin."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from swarmfly.natsserver import NatsServer
from swarmfly.testing import Origin
from tests.integration.test_get_flags import cluster_get, get
from tests.integration.test_outputs import peer_on
from tests.integration.test_swarm import Cluster

pytestmark = pytest.mark.timeout(240)

MiB = 1024 * 1024
REFUSED = "--disable-back-to-source forbids this host to read the origin"


async def test_with_nobody_to_serve_it_the_get_fails_and_reads_nothing(
    nats: NatsServer, prefix: str, tmp_path: Path
) -> None:
    data = os.urandom(3 * MiB + 7)
    state = tmp_path / "peer"
    async with Origin().serve() as origin:
        url = origin.add("f.bin", data)
        with peer_on(nats, prefix, state):  # no storage: the scheduler says "the origin"
            out = tmp_path / "out.bin"
            code, summary, err = await get(url, out, state, "--disable-back-to-source")
            assert code == 3, err
            assert REFUSED in err and "no peer or seed can serve the task" in err
            assert summary["error"]["code"] == "not_found"
            assert not out.exists()
            assert origin.content_served["f.bin"] == 0, "only asked who may read it"

            # Once this host holds it (a get that may read the origin), the flag is no bar.
            code, _, err = await get(url, tmp_path / "first.bin", state)
            assert code == 0, err
            code, summary, err = await get(url, out, state, "--disable-back-to-source")
            assert code == 0, err
            assert summary["bytes_origin"] == 0 and out.read_bytes() == data
            assert origin.content_served["f.bin"] == len(data)


async def test_without_a_peer_service_the_in_process_get_refuses_too(tmp_path: Path) -> None:
    async with Origin().serve() as origin:
        url = origin.add("f.bin", os.urandom(MiB))
        out = tmp_path / "out.bin"
        code, summary, err = await get(url, out, tmp_path / "alone", "--disable-back-to-source")
        assert code == 3, err
        assert REFUSED in err and summary["error"]["code"] == "not_found"
        assert not out.exists() and origin.content_served["f.bin"] == 0


async def test_a_seed_or_a_peer_that_holds_it_serves_it(cluster: Cluster, tmp_path: Path) -> None:
    data = os.urandom(6 * MiB)
    async with Origin().serve() as origin:
        url = origin.add("f.bin", data)
        cluster.start(peers=2, seed_rate="16MiB")
        # The storage seed reads the origin for it: this host reads none of it.
        code, first, err = await cluster_get(
            cluster, url, tmp_path / "a.bin", 0, "--disable-back-to-source"
        )
        assert code == 0, err
        assert first["bytes_origin"] == 0 and first["bytes_p2p"] == len(data)
        assert (tmp_path / "a.bin").read_bytes() == data
        # A second host: from the swarm, and the origin still read once.
        code, second, err = await cluster_get(
            cluster, url, tmp_path / "b.bin", 1, "--disable-back-to-source"
        )
        assert code == 0, err
        assert second["bytes_origin"] == 0 and (tmp_path / "b.bin").read_bytes() == data
        assert origin.content_served["f.bin"] == len(data)
