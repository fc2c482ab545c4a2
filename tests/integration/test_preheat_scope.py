"""Targeted preheat (issue 18, item 6): `swarmfly preheat … --scope seed|all-seeds|all-peers
[--count N | --percentage P] --concurrency N`, as an operator runs it, against real services,
each its own process, on the session's nats-server with the shipped permissions (the CLI on
the client role's credentials). The hosts doing the work report their progress themselves;
the summary names every host that failed and why."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
from pathlib import Path
from typing import Any

import orjson
import pytest

from swarmfly.ids import task_id as make_task_id
from swarmfly.natsserver import NatsServer
from swarmfly.placement import rendezvous
from swarmfly.testing import Origin, role_settings
from tests.conftest import swarmfly
from tests.integration.test_nats_permissions import PEER, Connection, collect, roles
from tests.integration.test_scale_out import Fleet, fleet, seeded_by

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]
MiB = 1024 * 1024
__all__ = ["roles"]  # the fixture, used by name below


def digest_of(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


async def preheat(cluster: Fleet, nats: NatsServer, *args: str) -> tuple[int, str, str]:
    """`swarmfly preheat ARGS` on the client role's credentials, as the operator's CLI."""
    return await swarmfly(
        "preheat", *args, *cluster.args, "--state-dir", str(cluster.root / "cli"),
        env=role_settings(nats.url, "client"),
    )  # fmt: skip


def holds(root: Path, host: str, task: str) -> bool:
    """The host's cache holds the task, complete (seeded_by: its folder is there)."""
    return seeded_by(root, host, task)


async def test_seed_lands_on_the_home_and_all_seeds_on_every_storage(
    nats: NatsServer, prefix: str, tmp_path: Path
) -> None:
    storages = ["storage-a", "storage-b", "storage-c"]
    one, every = os.urandom(3 * MiB + 1), os.urandom(3 * MiB + 2)
    async with fleet(nats.url, prefix, tmp_path) as cluster, Origin().serve() as origin:
        cluster.start("scheduler", "scheduler")
        for name in storages:
            cluster.start("storage", name, "--host-id", name)
        cluster.start("peer", "peer-a", "--host-id", "peer-a")
        urls = {"one": origin.add("one.bin", one), "every": origin.add("every.bin", every)}
        tasks = {
            "one": make_task_id(urls["one"], digest=digest_of(one)),
            "every": make_task_id(urls["every"], digest=digest_of(every)),
        }
        # seed, the default: the task's home only.
        code, out, err = await preheat(
            cluster, nats, "url", urls["one"], "--digest", digest_of(one), "--json"
        )
        assert code == 0, err
        home = rendezvous(tasks["one"], storages)[0]
        assert [s for s in storages if holds(tmp_path, s, tasks["one"])] == [home]
        assert not holds(tmp_path, "peer-a", tasks["one"])
        summary = orjson.loads(out)
        assert (summary["scope"], summary["hosts"], summary["failures"]) == ("seed", [home], [])
        # all-seeds: every live storage instance; the origin read once, the rest from the swarm.
        code, out, err = await preheat(
            cluster, nats, "url", urls["every"], "--digest", digest_of(every),
            "--scope", "all-seeds",
        )  # fmt: skip
        assert code == 0, err
        assert all(holds(tmp_path, s, tasks["every"]) for s in storages)
        assert not holds(tmp_path, "peer-a", tasks["every"])
        assert origin.content_served["every.bin"] <= len(every) * 1.1, origin.content_served
        assert out.startswith("preheated 1 of 1 file(s) on 3 host(s) (all-seeds), 3.0 MiB")
        for name in storages:  # each instance's own report
            assert re.search(rf"^{name}: {digest_of(every)[:19]} verified, 3\.0 MiB$", err, re.M)


async def test_all_peers_with_count_and_percentage_picks_peers_in_rendezvous_order(
    nats: NatsServer, prefix: str, tmp_path: Path
) -> None:
    peers = [f"peer-{n}" for n in "abcd"]
    data = os.urandom(6 * MiB + 3)
    async with fleet(nats.url, prefix, tmp_path) as cluster, Origin().serve() as origin:
        cluster.start("scheduler", "scheduler")
        cluster.start("storage", "storage-a", "--host-id", "storage-a")
        for name in peers:
            cluster.start("peer", name, "--host-id", name)
        url = origin.add("model.bin", data)
        task = make_task_id(url, digest=digest_of(data))
        order = rendezvous(task, peers)
        code, out, err = await preheat(
            cluster, nats, "url", url, "--digest", digest_of(data),
            "--scope", "all-peers", "--count", "2", "--concurrency", "2",
        )  # fmt: skip
        assert code == 0, err
        assert [p for p in peers if holds(tmp_path, p, task)] == sorted(order[:2])
        # Through the swarm: the origin read about once, whoever read it.
        assert origin.content_served["model.bin"] <= len(data) * 1.1, origin.content_served
        assert out.startswith("preheated 1 of 1 file(s) on 2 host(s) (all-peers), 6.0 MiB")
        for name in order[:2]:  # progress lines come from the hosts doing it, one start each
            assert len(re.findall(rf"^{name}: {digest_of(data)[:19]} started$", err, re.M)) == 1
            assert re.search(rf"^{name}: {digest_of(data)[:19]} verified, 6\.0 MiB$", err, re.M)
        for name in order[2:]:
            assert name not in err
        # 75% of four: three, the same two first (they hold it already) and the next one.
        code, out, err = await preheat(
            cluster, nats, "url", url, "--digest", digest_of(data),
            "--scope", "all-peers", "--percentage", "75", "--json",
        )  # fmt: skip
        assert code == 0, err
        summary: dict[str, Any] = orjson.loads(out)
        assert summary["hosts"] == sorted(order[:3])
        assert (summary["tasks"], summary["failed"], summary["failures"]) == (1, 0, [])
        assert [p for p in peers if holds(tmp_path, p, task)] == sorted(order[:3])
        assert origin.content_served["model.bin"] <= len(data) * 1.1, "nothing read again"
        # More than there are: every live peer, and a word that there are fewer.
        code, out, err = await preheat(
            cluster, nats, "url", url, "--digest", digest_of(data),
            "--scope", "all-peers", "--count", "9",
        )  # fmt: skip
        assert code == 0, err
        assert "--count 9: there are 4 live peer(s) only" in err
        assert out.startswith("preheated 1 of 1 file(s) on 4 host(s) (all-peers), 6.0 MiB (0 ")
        assert all(holds(tmp_path, p, task) for p in peers)


async def test_a_failing_host_is_named_with_its_reason_and_the_exit_is_not_zero(
    nats: NatsServer, prefix: str, tmp_path: Path
) -> None:
    denying = tmp_path / "deny.toml"
    denying.write_text('[origins]\ndeny = ["127.0.0.0/8"]\n')
    data = os.urandom(2 * MiB)
    async with fleet(nats.url, prefix, tmp_path) as cluster, Origin().serve() as origin:
        cluster.start("scheduler", "scheduler")
        cluster.start("storage", "storage-a", "--host-id", "storage-a")
        cluster.start("peer", "peer-a", "--host-id", "peer-a")
        cluster.start("peer", "peer-b", "--host-id", "peer-b")
        cluster.start("peer", "peer-x", "--host-id", "peer-x", "--config", str(denying))
        url = origin.add("f.bin", data)
        task = make_task_id(url, digest=digest_of(data))
        code, out, err = await preheat(
            cluster, nats, "url", url, "--digest", digest_of(data), "--scope", "all-peers"
        )
        assert code == 1, (out, err)  # forbidden
        assert out.startswith("preheated 0 of 1 file(s) on 3 host(s) (all-peers), 1 failed")
        assert re.search(
            r"^  peer-x: sha256:\S+: http://127\.0\.0\.1:\d+/ is not an allowed", out, re.M
        )
        assert "peer-a:" not in out and "peer-b:" not in out, "only the failed host is named"
        assert holds(tmp_path, "peer-a", task) and holds(tmp_path, "peer-b", task)
        assert not holds(tmp_path, "peer-x", task)
        assert re.search(r"^peer-x: sha256:\S+ failed: http://127\.0\.0\.1:\d+/ is not", err, re.M)
        for name in ("peer-a", "peer-b"):
            assert re.search(rf"^{name}: sha256:\S+ verified, 2\.0 MiB$", err, re.M), err
        assert re.search(
            r"swarmfly: peer-x: sha256:\S+: http://127\.0\.0\.1:\d+/ is not an", err
        ), err
        # A URL the origin does not have: every host says so, and the JSON names each.
        code, out, err = await preheat(
            cluster, nats, "url", f"{origin.url}/missing", "--scope", "all-peers", "--json"
        )
        summary = orjson.loads(out)
        assert code == 3 and summary["ok"] is False, (out, err)  # peer-a's, first in order
        failures = {f["host_id"]: f["code"] for f in summary["failures"]}
        assert failures == {"peer-a": "not_found", "peer-b": "not_found", "peer-x": "forbidden"}
        assert summary["tasks"] == 0 and summary["failed"] == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--scope", "all-peers", "--count", "0"], "argument --count: '0': give 1 or more"),
        (
            ["--scope", "all-peers", "--percentage", "101"],
            "argument --percentage: '101': give 1 to 100",
        ),
        (
            ["--scope", "all-peers", "--count", "2", "--percentage", "5"],
            "argument --percentage: not allowed with argument --count",
        ),
        (["--scope", "everyone"], "argument --scope: invalid choice: 'everyone'"),
        (["--count", "2"], "--count and --percentage choose peers: use --scope all-peers"),
        (["--scope", "all-peers", "--count", "10001"], "--count is 1 to 10000"),
        (["--concurrency", "65"], "--concurrency is 1 to 64"),
    ],
)
async def test_bad_scope_flags_are_refused_before_anything_is_asked(
    tmp_path: Path, args: list[str], message: str
) -> None:
    code, out, err = await swarmfly(
        "preheat", "url", "http://127.0.0.1:9/f", *args, "--nats", "nats://127.0.0.1:9",
        "--state-dir", str(tmp_path),
    )  # fmt: skip
    assert (code, out) == (2, ""), err
    assert message in err


async def test_only_the_operator_may_ask_a_peer_to_preheat_or_hear_how_it_goes(
    roles: tuple[Any, dict[str, Connection]], prefix: str
) -> None:
    """DESIGN §9: a service (a peer, storage, a scheduler) cannot make a peer fetch and cache
    a URL, nor read the progress of others' preheats (it names task ids); a host reports
    only as itself."""
    _, by_role = roles
    p = f"{prefix}.v1"
    asked = f"{p}.peer.{PEER}.preheat"
    for role in ("peer", "storage", "scheduler"):
        await by_role[role].nc.publish(asked, b"{}")
        assert await by_role[role].refused("publish", asked), role
        await by_role[role].nc.subscribe(f"{p}.preheat.*.progress.>")
        assert await by_role[role].refused("subscription", f"{p}.preheat.*.progress.>"), role
    peer = by_role["peer"]
    for forged in (f"{p}.preheat.j1.progress.normal.other", f"{p}.preheat.j1.progress.seed.{PEER}"):
        await peer.nc.publish(forged, b"{}")
        assert await peer.refused("publish", forged), forged
    # What the operator may do: ask, and hear the peer report as itself.
    heard = await collect(by_role["client"].nc, f"{p}.preheat.j1.progress.>")
    await by_role["client"].nc.flush()
    await by_role["client"].nc.publish(asked, b"{}")
    own = f"{p}.preheat.j1.progress.normal.{PEER}"
    for _ in range(40):  # bounded: published again until the subscription is in place
        await peer.nc.publish(own, b"{}")
        await peer.nc.flush()
        if heard:
            break
        await asyncio.sleep(0.05)
    assert not await by_role["client"].refused("publish", asked)
    assert heard and heard[0].subject == own
