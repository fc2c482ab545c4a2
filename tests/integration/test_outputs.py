"""Outputs are the requester's own files: never the cache's inode (unless hard links are asked
for, and then read-only), created with the requester's umask; the cache is private (0700 dirs,
0600 files); the CLI's own peer leaves no copy behind."""

from __future__ import annotations

import asyncio
import fcntl
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from swarmfly.bus import Bus
from swarmfly.content import piece_length_for
from swarmfly.natsserver import NatsServer
from swarmfly.testing import Origin, ServiceProcess, capability, spawn_service
from tests.conftest import FAST_ENV

MiB = 1024 * 1024


async def get(
    url: str, output: Path, state: Path, *args: str, umask: int = 0o022
) -> tuple[int, dict[str, Any] | None, str]:
    """``swarmfly get --json`` run as a user with ``umask`` would run it."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "swarmfly", "get", url, "-O", str(output), "--json",
        "--state-dir", str(state), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **FAST_ENV}, preexec_fn=lambda: os.umask(umask),
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, orjson.loads(out) if out else None, err.decode()


def cache_file(state: Path, task_id: str) -> Path:
    return state / "tasks" / task_id[:2] / task_id / "data"


async def served(bus: Bus, peer: ServiceProcess, task_id: str, length: int) -> bytes:
    """The whole task as the peer's upload server serves it to a child the scheduler
    scheduled, piece by piece."""
    piece = piece_length_for(length)
    body = b""
    child = await capability(bus, task_id)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        for start in range(0, length, piece):
            last = min(length, start + piece) - 1
            headers = {**child, "Range": f"bytes={start}-{last}"}
            async with session.get(
                f"{peer.url}/v1/tasks/{task_id}/data", headers=headers
            ) as response:
                assert response.status == 206, await response.text()
                body += await response.read()
    return body


NO_SEED_ENV = {**FAST_ENV, "SWARMFLY_SCHEDULER_SEED_TIMEOUT": "0.5"}
"""No storage runs: the scheduler soon sends peers to the origin."""


@contextmanager
def peer_on(nats: NatsServer, prefix: str, state: Path) -> Iterator[ServiceProcess]:
    """A scheduler and a peer on ``state`` (no storage: the peer reads the origin); both
    must stop cleanly."""
    services = [
        spawn_service(kind, nats.url, folder, "--prefix", prefix, env=NO_SEED_ENV)
        for kind, folder in (("scheduler", state.parent / "scheduler"), ("peer", state))
    ]
    try:
        yield services[1]
    finally:
        for service in reversed(services):
            assert service.stop() == 0, service.log()


async def test_an_output_edited_in_place_never_changes_the_cache(
    nats: NatsServer, bus: Bus, prefix: str, tmp_path: Path
) -> None:
    data = os.urandom(3 * MiB + 5)
    state = tmp_path / "peer"
    async with Origin().serve() as origin:
        url = origin.add("f.bin", data)
        with peer_on(nats, prefix, state) as peer:
            out = tmp_path / "out.bin"
            code, summary, err = await get(url, out, state)
            assert code == 0, err
            assert summary is not None and summary["via"] == "peer"
            task_id = summary["task_id"]
            assert out.stat().st_ino != cache_file(state, task_id).stat().st_ino
            with open(out, "r+b") as handle:  # the user edits the output in place
                handle.seek(MiB + 1)
                handle.write(b"EDITED BY THE USER")

            again = tmp_path / "again.bin"
            code, summary, err = await get(url, again, state)
            assert code == 0, err
            assert summary is not None and summary["bytes_origin"] == 0, "from the cache"
            assert again.read_bytes() == data
            code, _, err = await get(url, out, state, "--overwrite")
            assert code == 0, err
            assert out.read_bytes() == data, "the edited output is replaced by the origin's"
            assert await served(bus, peer, task_id, len(data)) == data
            assert origin.bytes_served < len(data) + 64, "the origin was read once"


async def test_a_forced_hard_link_shares_a_read_only_cache_file(
    nats: NatsServer, prefix: str, tmp_path: Path
) -> None:
    data = os.urandom(2 * MiB)
    state = tmp_path / "peer"
    async with Origin().serve() as origin:
        url = origin.add("f.bin", data)
        with peer_on(nats, prefix, state):
            out = tmp_path / "linked.bin"
            code, summary, err = await get(url, out, state, "--force-hard-link")
            assert code == 0, err
            assert summary is not None
            cached = cache_file(state, summary["task_id"])
            assert out.stat().st_ino == cached.stat().st_ino
            assert out.stat().st_mode & 0o777 == 0o444, "nobody changes the cache through it"
            assert out.read_bytes() == data
            copy = tmp_path / "copy.bin"
            code, _, err = await get(url, copy, state)  # a later plain get still copies
            assert code == 0, err
            assert copy.stat().st_ino != cached.stat().st_ino
            assert copy.read_bytes() == data


async def test_files_are_private_and_outputs_follow_the_requesters_umask(
    nats: NatsServer, prefix: str, tmp_path: Path
) -> None:
    data = os.urandom(MiB + 1)
    state = tmp_path / "peer"
    state.mkdir(mode=0o755)
    os.chmod(state, 0o755)
    async with Origin().serve() as origin:
        url = origin.add("f.bin", data)
        with peer_on(nats, prefix, state):
            modes = {}
            for umask in (0o027, 0o000, 0o077):
                out = tmp_path / f"via-peer-{umask:03o}.bin"
                code, summary, err = await get(url, out, state, umask=umask)
                assert code == 0, err
                assert summary is not None and summary["via"] == "peer"
                modes[umask] = out.stat().st_mode & 0o777
            assert modes == {0o027: 0o640, 0o000: 0o666, 0o077: 0o600}
            task_dir = cache_file(state, summary["task_id"]).parent
            await asyncio.sleep(1.5)  # the metadata is saved within a second
            assert state.stat().st_mode & 0o777 == 0o700
            assert (state / "tasks").stat().st_mode & 0o777 == 0o700
            assert task_dir.stat().st_mode & 0o777 == 0o700
            for name in ("data", "meta.json"):
                assert (task_dir / name).stat().st_mode & 0o777 == 0o600, name

        for umask, mode in ((0o022, 0o644), (0o007, 0o660)):  # no peer: one in process
            out = tmp_path / f"in-process-{umask:03o}.bin"
            code, summary, err = await get(url, out, tmp_path / "alone", umask=umask)
            assert code == 0, err
            assert summary is not None and summary["via"] == "in-process"
            assert out.stat().st_mode & 0o777 == mode
            assert out.read_bytes() == data


async def test_the_cli_peer_keeps_no_copy_and_removes_what_killed_gets_left(
    origin: Origin, tmp_path: Path
) -> None:
    data = os.urandom(2 * MiB)
    url = origin.add("f.bin", data)
    cli = tmp_path / "state" / "cli"
    left = cli / "run-killed"  # what a get killed mid-download left behind
    (left / "tasks" / "ab").mkdir(parents=True)
    (left / "tasks" / "ab" / "data").write_bytes(os.urandom(MiB))
    running = cli / "run-running"  # a get that still runs holds its lock
    running.mkdir()
    lock = open(running / ".lock", "a")  # noqa: SIM115 - held across the get below
    fcntl.flock(lock, fcntl.LOCK_EX)
    old = time.time() - 3600
    for folder in (left, running):
        os.utime(folder, (old, old))
    try:
        for name in ("a.bin", "b.bin"):
            code, summary, err = await get(url, tmp_path / name, tmp_path / "state")
            assert code == 0, err
            assert summary is not None and summary["via"] == "in-process"
            assert summary["bytes_origin"] == len(data), "no lasting cache of its own"
            assert (tmp_path / name).read_bytes() == data
        assert sorted(p.name for p in cli.iterdir()) == ["run-running"]
        assert [p for p in cli.rglob("*") if p.is_file() and p.name != ".lock"] == []
    finally:
        lock.close()
