"""docs/quickstart.md's "Several peers on one machine", run as written: its own nats-server,
the services in the background, and a get through each peer."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import sys
from pathlib import Path

import pytest

from swarmfly.natsserver import find_binary, free_port
from swarmfly.testing import Origin
from tests.conftest import FAST_ENV

pytestmark = pytest.mark.timeout(120)
QUICKSTART = Path(__file__).parents[2] / "docs" / "quickstart.md"
MiB = 1024 * 1024


def several_peers() -> list[str]:
    """The commands of the section, one a line."""
    section = QUICKSTART.read_text().split("## Several peers on one machine\n", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.DOTALL)
    assert block is not None, "the section shows its commands"
    return block.group(1).strip().splitlines()


def as_run_here(line: str, tmp_path: Path, url: str, port: int) -> tuple[list[str], bool]:
    """The line's command with this test's folders, URL and port; whether it ends in ``&``."""
    words = shlex.split(line, comments=True)
    background = words[-1] == "&"
    words = [
        str(tmp_path / w.removeprefix("/tmp/")) if w.startswith("/tmp/") else w
        for w in (words[:-1] if background else words)
    ]
    words = [url if w == "URL" else w.replace("4222", str(port)) for w in words]
    program = {"nats-server": [find_binary()], "swarmfly": [sys.executable, "-m", "swarmfly"]}
    return [*program[words[0]], *words[1:]], background


async def listening(port: int, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.05)
            else:
                writer.close()
                return


async def test_several_peers_on_one_machine_as_the_quickstart_shows(
    origin: Origin, tmp_path: Path
) -> None:
    data = os.urandom(4 * MiB)
    url = origin.add("f.bin", data)
    port = free_port()
    env = {**os.environ, **FAST_ENV}
    background: list[asyncio.subprocess.Process] = []
    try:
        for line in several_peers():
            command, in_background = as_run_here(line, tmp_path, url, port)
            if not in_background:
                get = await asyncio.create_subprocess_exec(
                    *command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE, env=env, cwd=tmp_path,
                )  # fmt: skip
                _, err = await asyncio.wait_for(get.communicate(), 60)
                assert get.returncode == 0, f"{line}: {err.decode()}"
                continue
            log = open(tmp_path / f"{len(background)}.log", "wb")  # noqa: SIM115 - the child's
            started = await asyncio.create_subprocess_exec(
                *command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=log, env=env, cwd=tmp_path,
            )  # fmt: skip
            log.close()
            background.append(started)
            if command[0] == find_binary():
                await listening(port)
            else:  # a service prints one line once it serves
                assert started.stdout is not None
                banner = await asyncio.wait_for(started.stdout.readline(), 30)
                assert banner, f"{line}: {(tmp_path / f'{len(background) - 1}.log').read_text()}"
        assert (tmp_path / "a").read_bytes() == data
        assert (tmp_path / "b").read_bytes() == data
        # The seed read the origin once; the peers took it from the swarm (besides each
        # host's one-byte access check).
        assert len(data) <= origin.bytes_served <= len(data) + 8
    finally:
        for process in reversed(background):
            if process.returncode is None:
                process.terminate()
            await asyncio.wait_for(process.wait(), 20)
