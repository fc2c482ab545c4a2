"""A restarted peer: it resumes an interrupted download from its verified pieces, and re-hashes
what it held before it serves or delivers any of it."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import aiohttp
import orjson

from swarmfly.bus import Bus
from swarmfly.natsserver import NatsServer
from swarmfly.testing import Origin, ServiceProcess, capability, spawn_service
from tests.integration.test_outputs import NO_SEED_ENV, cache_file, get, served

MiB = 1024 * 1024


def start(kind: str, nats: NatsServer, prefix: str, state: Path) -> ServiceProcess:
    return spawn_service(kind, nats.url, state, "--prefix", prefix, env=NO_SEED_ENV)


def saved_pieces(state: Path) -> int:
    """Pieces the peer's metadata on disk says it holds (what survives a kill -9)."""
    count = 0
    for meta in (state / "tasks").glob("??/*/meta.json"):
        try:
            count = max(count, len(orjson.loads(meta.read_bytes())["done"]))
        except (OSError, ValueError, KeyError):
            continue  # being replaced: read it next time
    return count


async def test_a_peer_killed_mid_download_resumes_from_its_verified_pieces(
    nats: NatsServer, prefix: str, tmp_path: Path
) -> None:
    data = os.urandom(8 * MiB)  # eight 1 MiB pieces, at 2 MiB/s: about four seconds
    state = tmp_path / "peer"
    async with Origin(rate=2 * MiB).serve() as origin:
        url = origin.add("f.bin", data)
        scheduler = start("scheduler", nats, prefix, tmp_path / "scheduler")
        peer = start("peer", nats, prefix, state)
        try:
            out = tmp_path / "f.bin"
            client = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "swarmfly", "get", url, "-O", str(out),
                "--state-dir", str(state),
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            deadline = time.monotonic() + 30
            while saved_pieces(state) < 3:
                assert time.monotonic() < deadline, "no progress saved in time"
                assert client.returncode is None, "the download ended before the kill"
                await asyncio.sleep(0.05)
            client.send_signal(signal.SIGKILL)  # else it would go on with a peer of its own
            await client.wait()
            peer.kill()
            held = saved_pieces(state)
            assert held < 8 and not out.exists()

            peer = start("peer", nats, prefix, state)
            code, summary, err = await get(url, out, state)
            assert code == 0, err
            assert out.read_bytes() == data
            assert summary is not None
            assert summary["bytes_origin"] <= len(data) - held * MiB, "only what was missing"
            assert origin.bytes_served < 1.5 * len(data), "the origin was not read again"
        finally:
            peer.stop()
            scheduler.stop()


async def test_a_byte_changed_in_the_cache_while_stopped_is_never_served_or_delivered(
    nats: NatsServer, bus: Bus, prefix: str, tmp_path: Path
) -> None:
    data = os.urandom(4 * MiB)
    state = tmp_path / "peer"
    async with Origin().serve() as origin:
        url = origin.add("f.bin", data)
        scheduler = start("scheduler", nats, prefix, tmp_path / "scheduler")
        peer = start("peer", nats, prefix, state)
        try:
            code, summary, err = await get(url, tmp_path / "first.bin", state)
            assert code == 0, err
            assert summary is not None
            task_id = summary["task_id"]
            assert peer.stop() == 0, peer.log()
            with open(cache_file(state, task_id), "r+b") as handle:  # bit rot, or a user
                handle.seek(2 * MiB + 7)
                byte = handle.read(1)
                handle.seek(2 * MiB + 7)
                handle.write(bytes([byte[0] ^ 0xFF]))
            before = origin.bytes_served

            peer = start("peer", nats, prefix, state)
            url_of = f"{peer.url}/v1/tasks/{task_id}/data"
            child = await capability(bus, task_id)
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:

                async def status(piece: int) -> int:
                    headers = {**child, "Range": f"bytes={piece * MiB}-{piece * MiB + MiB - 1}"}
                    async with session.get(url_of, headers=headers) as response:
                        await response.read()
                        return response.status

                deadline = time.monotonic() + 20
                while [await status(n) for n in (0, 1, 3)] != [206] * 3:
                    assert time.monotonic() < deadline, "the good pieces never came back"
                    await asyncio.sleep(0.1)
                assert await status(2) == 416, "the changed piece is never served"

            out = tmp_path / "second.bin"
            code, summary, err = await get(url, out, state)
            assert code == 0, err
            assert out.read_bytes() == data
            assert summary is not None and summary["bytes_origin"] == MiB, "that piece only"
            assert origin.bytes_served - before < MiB + 64
            assert await served(bus, peer, task_id, len(data)) == data
        finally:
            peer.stop()
            scheduler.stop()
