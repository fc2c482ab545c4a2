"""Fixtures shared by every test: a real nats-server per session with the permissions we ship,
a unique subject prefix per test (so tests share the server without seeing each other), and a
counting origin."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from swarmfly.bus import Bus
from swarmfly.natsserver import NatsServer
from swarmfly.testing import Origin, shipped_nats

FAST_ENV = {
    "SWARMFLY_SCHEDULER_HEARTBEAT_INTERVAL": "0.5",
    "SWARMFLY_SCHEDULER_HOST_TTL": "3",
    "SWARMFLY_PEER_OUTPUT_ROOTS": tempfile.gettempdir(),
}
"""Short heartbeats so that lost hosts are noticed within a test's patience."""


async def swarmfly(
    *args: str,
    env: dict[str, str] | None = None,
    stderr: int | None = None,
    timeout: float = 120.0,
) -> tuple[int, str, str]:
    """Run ``swarmfly ARGS`` as a user would (short heartbeats, ``env`` on top); its exit
    code, stdout and stderr. ``stderr``: a descriptor to write it to (a pty) instead."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "swarmfly", *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE if stderr is None else stderr,
        env={**os.environ, **FAST_ENV, **(env or {})},
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return process.returncode, out.decode(), (err or b"").decode()


def modules_loaded(setup: str, watched: tuple[str, ...]) -> list[str]:
    """Which of ``watched`` a fresh interpreter holds after running ``setup``, or whose name
    starts with a watched entry ending in a dot."""
    code = (
        "import json, sys\n"
        f"{setup}\n"
        f"watched = {watched!r}\n"
        "print(json.dumps(sorted(m for m in sys.modules if any(\n"
        "    m.startswith(w) if w.endswith('.') else m == w for w in watched))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded: list[str] = json.loads(out.stdout)
    return loaded


def require_tool(name: str) -> str:
    """The path of a Debian tool; skip without it, except under SWARMFLY_REQUIRE_E2E=1."""
    path = shutil.which(name)
    if path:
        return path
    if os.environ.get("SWARMFLY_REQUIRE_E2E") == "1":
        pytest.fail(f"{name} is required (SWARMFLY_REQUIRE_E2E=1) but not installed")
    pytest.skip(f"{name} is not installed")


@pytest.fixture(scope="session")
def nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """With the permissions swarmfly ships: the services tests start run as their roles."""
    with shipped_nats(tmp_path_factory.mktemp("nats")) as server:
        yield server


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def bus(nats: NatsServer, prefix: str) -> AsyncIterator[Bus]:
    client = await Bus.connect([nats.url], prefix=prefix, name="test-client")
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def origin() -> AsyncIterator[Origin]:
    async with Origin().serve() as served:
        yield served


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path
