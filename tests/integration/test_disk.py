"""The disk: a download that does not fit fails at once with a local error naming the state
dir, never blamed on a parent, and frees what it took; GC keeps the state dir's filesystem
under its watermarks."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from swarmfly.content import SourceRequest
from swarmfly.natsserver import NatsServer
from swarmfly.services.peer.gc import GcPolicy
from swarmfly.testing import Origin, metric_value, spawn_service
from tests.conftest import FAST_ENV
from tests.integration.test_cache_gc import peer_node
from tests.integration.test_outputs import get

MiB = 1024 * 1024


@contextmanager
def small_filesystem(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` at ``path``; skipped where mounting is not permitted, except under
    SWARMFLY_REQUIRE_E2E=1."""
    path.mkdir(parents=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        if os.environ.get("SWARMFLY_REQUIRE_E2E") == "1":
            pytest.fail(f"cannot mount a {size} tmpfs: {done.stderr.strip()}")
        pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def task_dirs(state: Path) -> list[Path]:
    return list((state / "tasks").glob("??/*"))


async def test_a_download_bigger_than_the_disk_fails_locally_and_frees_its_space(
    nats: NatsServer, prefix: str, tmp_path: Path
) -> None:
    big, small_file = os.urandom(16 * MiB), os.urandom(4 * MiB)
    with small_filesystem(tmp_path / "small", "12m") as small:
        state = small / "peer"
        services = []
        try:
            async with Origin().serve() as origin:
                urls = [origin.add("big.bin", big), origin.add("small.bin", small_file)]
                for kind, folder in (
                    ("scheduler", tmp_path / "scheduler"),
                    ("storage", tmp_path / "storage"),
                    ("peer", state),
                    ("peer", tmp_path / "roomy"),
                ):
                    services.append(
                        spawn_service(kind, nats.url, folder, "--prefix", prefix, env=FAST_ENV)
                    )
                full_peer = services[2]
                out = tmp_path / "big.bin"
                code, summary, err = await get(urls[0], out, state)
                assert code == 1 and summary is not None
                assert (summary["ok"], summary["error"]["code"]) == (False, "internal")
                tasks = re.escape(str(state / "tasks"))
                assert re.search(
                    rf"cannot store the download here: No space left on device in {tasks}: "
                    r"need 16\.0 MiB, \d+\.\d MiB free",
                    err,
                ), err
                assert not out.exists()
                assert task_dirs(state) == [], "the failed download's space is freed at once"
                # No parent was blamed: none of its pieces failed, and the seed it used
                # serves the same task to another host.
                assert await metric_value(full_peer.url, "swarmfly_peer_piece_failures") == 0
                code, summary, err = await get(urls[0], tmp_path / "roomy.bin", tmp_path / "roomy")
                assert code == 0, err
                assert summary is not None and summary["bytes_p2p"] == len(big)

                out = tmp_path / "small.bin"
                code, summary, err = await get(urls[1], out, state)
                assert code == 0, err
                assert out.read_bytes() == small_file
                assert full_peer.process.poll() is None, "the full peer keeps running"
        finally:
            for service in reversed(services):
                service.stop()


async def test_gc_keeps_the_filesystem_under_its_high_watermark(tmp_path: Path) -> None:
    with small_filesystem(tmp_path / "small", "12m") as small:
        # 7.5 of 12 MiB is over half: least recently used go until under 30% (3.6 MiB).
        policy = GcPolicy(disk_high=0.5, disk_low=0.3)
        async with Origin().serve() as origin, peer_node(small, policy) as node:
            task_ids = []
            for name in ("old", "mid", "new"):
                url = origin.add(f"{name}.bin", os.urandom(5 * MiB // 2))
                task_ids.append((await node.download(SourceRequest(url))).task_id)
                await asyncio.sleep(0.01)  # distinct access times
            assert await node.collect(time.time()) == task_ids[:2]
            assert [p.name for p in task_dirs(small)] == [task_ids[2]]
            assert await node.collect(time.time()) == [], "under the high watermark now"
