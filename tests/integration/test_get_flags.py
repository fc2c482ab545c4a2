"""dfget's ``--overwrite``, ``--filtered-query-param`` and ``--priority``, through the real
CLI, real services as their own processes on a real nats-server and a real HTTP origin."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from swarmfly.bus import Bus
from swarmfly.contracts import messages
from swarmfly.errors import SwarmflyError
from swarmfly.natsserver import NatsServer
from swarmfly.testing import Origin
from tests.conftest import swarmfly
from tests.integration.test_outputs import peer_on
from tests.integration.test_recursive_get import TREE, TreeHub, files_under, get_r, hf_env, hub
from tests.integration.test_swarm import Cluster

__all__ = ["hf_env", "hub"]  # fixtures, used by name

pytestmark = pytest.mark.timeout(240)

MiB = 1024 * 1024


async def get(url: str, output: Path, state: Path, *flags: str) -> tuple[int, Any, str]:
    """``swarmfly get URL -O OUTPUT --json``: exit code, its JSON document, stderr."""
    code, out, err = await swarmfly(
        "get", url, "-O", str(output), "--state-dir", str(state), "--json", *flags
    )
    return code, orjson.loads(out) if out.strip() else None, err


def leftovers(folder: Path) -> list[str]:
    """Temporary files a get makes next to its output: none may stay."""
    return [p.name for p in folder.iterdir() if ".swarmfly-" in p.name]


# -- --overwrite ----------------------------------------------------------------------------


async def test_an_existing_output_is_refused_before_any_byte_and_replaced_with_overwrite(
    nats: NatsServer, prefix: str, tmp_path: Path
) -> None:
    data = os.urandom(2 * MiB + 3)
    state = tmp_path / "peer"
    async with Origin().serve() as origin:
        url = origin.add("f.bin", data)
        with peer_on(nats, prefix, state):
            for flags in ((), ("--force-hard-link",)):  # the CLI's file, and the peer's link
                out = tmp_path / f"out{len(flags)}.bin"
                out.write_bytes(b"the user's own file")
                code, summary, err = await get(url, out, state, *flags)
                assert code == 2, err
                assert f"{out} exists: pass --overwrite to replace it" in err
                assert summary["error"]["code"] == "bad_request"
                assert out.read_bytes() == b"the user's own file"
                assert origin.requests == 0, "refused before the origin was asked"

            link = tmp_path / "link.bin"
            link.symlink_to(tmp_path / "nowhere")
            code, _, err = await get(url, link, state)
            assert code == 2 and "exists: pass --overwrite" in err, err
            assert link.is_symlink() and not (tmp_path / "nowhere").exists()

            out = tmp_path / "out0.bin"
            code, summary, err = await get(url, out, state, "--overwrite")
            assert code == 0, err
            assert summary["via"] == "peer"
            assert out.read_bytes() == data
            hard = tmp_path / "out1.bin"
            code, _, err = await get(url, hard, state, "--overwrite", "--force-hard-link")
            assert code == 0, err
            assert hard.read_bytes() == data
            assert leftovers(tmp_path) == []


async def test_without_a_peer_service_the_same_rule_holds(tmp_path: Path) -> None:
    data = os.urandom(MiB)
    async with Origin().serve() as origin:
        url = origin.add("f.bin", data)
        out = tmp_path / "out.bin"
        out.write_bytes(b"mine")
        code, _, err = await get(url, out, tmp_path / "alone")
        assert code == 2 and f"{out} exists: pass --overwrite" in err, err
        assert out.read_bytes() == b"mine" and origin.requests == 0
        code, summary, err = await get(url, out, tmp_path / "alone", "--overwrite")
        assert code == 0, err
        assert summary["via"] == "in-process"
        assert out.read_bytes() == data
        assert leftovers(tmp_path) == []


async def test_a_file_that_appears_during_the_download_is_not_replaced(
    nats: NatsServer, prefix: str, tmp_path: Path
) -> None:
    """Checked before any byte moves, and again where the file is put in place: a file made
    meanwhile stays, the download's bytes go nowhere, and the user is told why."""
    data = os.urandom(4 * MiB)
    state = tmp_path / "peer"
    async with Origin(rate=2 * MiB).serve() as origin:
        url = origin.add("slow.bin", data)
        with peer_on(nats, prefix, state):
            out = tmp_path / "out.bin"
            job = asyncio.create_task(get(url, out, state))
            for _ in range(400):
                if origin.bytes_served > 64 * 1024:
                    break
                await asyncio.sleep(0.02)
            out.write_bytes(b"made meanwhile")
            code, _, err = await job
            assert code == 2, err
            assert "exists (it appeared during the download): pass --overwrite" in err
            assert out.read_bytes() == b"made meanwhile"
            assert leftovers(tmp_path) == []


async def test_over_nats_an_existing_output_is_refused_unless_overwrite_is_asked(
    nats: NatsServer, bus: Bus, prefix: str, tmp_path: Path
) -> None:
    """``peer.<host>.download``'s ``overwrite`` (the output under ``[peer] output_roots``,
    the temporary directory in these tests)."""
    data = os.urandom(MiB + 1)
    state = tmp_path / "peer"
    async with Origin().serve() as origin:
        url = origin.add("f.bin", data)
        with peer_on(nats, prefix, state) as peer:
            out = tmp_path / "out.bin"
            out.write_bytes(b"there first")

            def body(**more: Any) -> messages.DownloadRequest:
                return messages.DownloadRequest(
                    "dl-" + os.urandom(4).hex(), messages.Source(url), str(out), **more
                )

            with pytest.raises(SwarmflyError, match="exists: pass --overwrite") as refused:
                await bus.request(messages.DOWNLOAD, body(), timeout=60, host_id=peer.host_id)
            assert refused.value.code == "bad_request" and refused.value.path == "data.output"
            assert out.read_bytes() == b"there first" and origin.requests == 0
            reply = await bus.request(
                messages.DOWNLOAD, body(overwrite=True), timeout=60, host_id=peer.host_id
            )
            assert reply.content_length == len(data)
            assert out.read_bytes() == data


async def test_a_recursive_get_refuses_a_listing_with_an_existing_file_whole(
    hub: TreeHub, hf_env: dict[str, str], tmp_path: Path
) -> None:
    hub.repo("acme/llm").commit(TREE)
    out = tmp_path / "llm"
    (out / "weights").mkdir(parents=True)
    (out / "weights" / "part-1.bin").write_bytes(b"kept")
    args = ("--state-dir", str(tmp_path / "cli"))
    code, summary, err = await get_r("hf://acme/llm@main", out, *args, env=hf_env)
    assert code == 2, err
    assert "'weights/part-1.bin' exist under" in err and "pass --overwrite" in err
    assert summary["error"]["code"] == "bad_request"
    assert files_under(out) == {"weights/part-1.bin": b"kept"}, "nothing else written"
    assert hub.resolved == [], "no file was read"

    code, summary, err = await get_r("hf://acme/llm@main", out, *args, "--overwrite", env=hf_env)
    assert code == 0, err
    assert files_under(out) == TREE


# -- --filtered-query-param -----------------------------------------------------------------


async def test_filtered_query_params_make_re_signed_urls_one_task(
    nats: NatsServer, prefix: str, tmp_path: Path
) -> None:
    data = os.urandom(MiB + 7)
    state = tmp_path / "peer"
    async with Origin().serve() as origin:
        url = origin.add("f.bin", data)
        with peer_on(nats, prefix, state):
            flags = ("--filtered-query-param", "token", "--filtered-query-param", "Expires")
            code, first, err = await get(f"{url}?token=a&expires=1", tmp_path / "a", state, *flags)
            assert code == 0, err
            read = origin.content_served["f.bin"]
            code, again, err = await get(f"{url}?Token=b&EXPIRES=2", tmp_path / "b", state, *flags)
            assert code == 0, err
            assert again["task_id"] == first["task_id"]
            assert again["bytes_origin"] == 0 and origin.content_served["f.bin"] == read
            assert (tmp_path / "b").read_bytes() == data

            code, plain, err = await get(f"{url}?token=c&expires=3", tmp_path / "c", state)
            assert code == 0, err
            assert plain["task_id"] != first["task_id"], "without the flag, the default filter"
            code, other, err = await get(f"{url}?token=d", tmp_path / "d", state, *flags[:2])
            assert code == 0, err
            assert other["task_id"] not in (first["task_id"], plain["task_id"]), "the list counts"


@dataclass
class QueryOrigin(Origin):
    """The origin, keeping the query of every request it answers."""

    queries: list[str] = field(default_factory=list)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.queries.append(request.query_string)
        return await super()._handle(request)


async def test_the_origin_is_read_with_the_whole_url(tmp_path: Path) -> None:
    """A filtered parameter leaves the task id, not the request the origin gets."""
    data = os.urandom(64 * 1024)
    async with QueryOrigin().serve() as origin:
        url = origin.add("f.bin", data)
        code, _, err = await get(
            f"{url}?sig=s1&v=1",
            tmp_path / "f",
            tmp_path / "alone",
            "--filtered-query-param",
            "sig",
        )
        assert code == 0, err
        assert (tmp_path / "f").read_bytes() == data
        assert origin.queries and set(origin.queries) == {"sig=s1&v=1"}, origin.queries


@pytest.mark.parametrize("bad", ["", "has space", "caf\u00e9", "tab\tname", "x" * 257], ids=repr)
async def test_a_query_name_that_is_not_printable_ascii_is_a_usage_error(
    tmp_path: Path, bad: str
) -> None:
    code, _, err = await swarmfly(
        "get", "http://127.0.0.1:1/f", "-O", str(tmp_path / "x"), "--filtered-query-param", bad
    )
    assert code == 2, err
    assert "argument --filtered-query-param:" in err and "printable ASCII without spaces" in err
    assert not (tmp_path / "x").exists()


async def test_more_query_names_than_the_bound_are_refused(tmp_path: Path) -> None:
    names = [arg for i in range(65) for arg in ("--filtered-query-param", f"p{i}")]
    code, out, err = await swarmfly(
        "get", "http://127.0.0.1:1/f", "-O", str(tmp_path / "x"), "--json", *names
    )
    assert code == 2, err
    assert "--filtered-query-param: at most 64 names, got 65" in err
    assert orjson.loads(out)["error"]["code"] == "bad_request"
    assert not (tmp_path / "x").exists()


# -- --priority -------------------------------------------------------------------------------


async def task_hosts(cluster: Cluster, task_id: str) -> set[str]:
    """The hosts of a task's peers, as its scheduler's state lists them."""
    state = await cluster.state()
    task = next(t for t in state["tasks"] if t["id"] == task_id)
    return {p["host_id"] for p in task["peers"]}


async def cluster_get(cluster: Cluster, url: str, out: Path, peer: int, *flags: str) -> Any:
    code, summary, err = await get(url, out, cluster.peer_dir(peer), *cluster.get_args(), *flags)
    return code, summary, err


async def test_priority_reaches_the_scheduler_and_decides_a_new_tasks_first_read(
    cluster: Cluster, tmp_path: Path
) -> None:
    data = os.urandom(3 * MiB)
    async with Origin().serve() as origin:
        names = ("own", "unproven", "two", "one")
        own, unproven, refused, forbidden = (origin.add(n, data) for n in names)
        cluster.start(peers=3)

        # LEVEL3, the file's digest named: this host reads a new task itself, no seed asked.
        digest = ("--digest", "sha256:" + hashlib.sha256(data).hexdigest())
        code, first, err = await cluster_get(
            cluster, own, tmp_path / "a", 0, "--priority", "3", *digest
        )
        assert code == 0, err
        assert (first["bytes_origin"], first["bytes_p2p"]) == (len(data), 0)
        hosts = await task_hosts(cluster, first["task_id"])
        assert hosts == {cluster.peers[0].host_id}, "no seed"
        code, second, err = await cluster_get(cluster, own, tmp_path / "b", 1, *digest)
        assert code == 0, err
        assert second["bytes_p2p"] == len(data), "the next host gets it from the first"
        assert origin.content_served["own"] == len(data)

        # Without a digest nothing would prove what this host read to the others: a seed
        # reads the task, as for LEVEL0.
        code, seeded, err = await cluster_get(
            cluster, unproven, tmp_path / "u", 0, "--priority", "3"
        )
        assert code == 0, err
        assert (seeded["bytes_origin"], seeded["bytes_p2p"]) == (0, len(data))
        assert cluster.storage.host_id in await task_hosts(cluster, seeded["task_id"])

        # LEVEL2: no peer has it and it may not read the origin: refused, nothing written.
        code, summary, err = await cluster_get(
            cluster, refused, tmp_path / "c", 0, "--priority", "LEVEL2"
        )
        assert code == 1, err
        assert "priority LEVEL2: no peer has this task yet" in err
        assert summary["error"]["code"] == "conflict"
        assert not (tmp_path / "c").exists() and origin.content_served["two"] == 0
        code, _, err = await cluster_get(cluster, refused, tmp_path / "c", 0)
        assert code == 0, err
        code, summary, err = await cluster_get(
            cluster, refused, tmp_path / "d", 1, "--priority", "2"
        )
        assert code == 0, err
        assert summary["bytes_p2p"] == len(data), "once the swarm has it, LEVEL2 takes it"

        # LEVEL1: refused, even where the swarm has it (a host that holds it already
        # delivers its own copy without asking: peer 2 holds nothing).
        for url in (forbidden, unproven):
            code, summary, err = await cluster_get(
                cluster, url, tmp_path / "e", 2, "--priority", "1"
            )
            assert code == 1, err
            assert "priority LEVEL1: this download is refused" in err
            assert summary["error"]["code"] == "forbidden"
        assert not (tmp_path / "e").exists() and origin.content_served["one"] == 0


@pytest.mark.parametrize("bad", ["7", "-1", "LEVEL9", "high", "01"])
async def test_a_priority_out_of_range_is_a_usage_error(tmp_path: Path, bad: str) -> None:
    code, _, err = await swarmfly(
        "get", "http://127.0.0.1:1/f", "-O", str(tmp_path / "x"), "--priority", bad
    )
    assert code == 2, err
    assert "argument --priority: expected 0-6 or LEVEL0-LEVEL6" in err


def test_the_flags_are_in_get_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "swarmfly", "get", "--help"], capture_output=True, text=True
    ).stdout
    for flag in (
        "--overwrite",
        "--filtered-query-param NAME",
        "--priority LEVEL",
        "--disable-back-to-source",
    ):
        assert flag in out, out
