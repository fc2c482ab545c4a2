"""Issue 13, item 4: another local user of a `swarmfly up` host gets nothing from it.

`swarmfly up` runs as root; the attacker is uid nobody with the system python and no
swarmfly, speaking NATS over a raw socket: it is refused before it can subscribe or publish,
and cannot read the state dir, the credentials or cluster.json. The legitimate user's CLI
still downloads through the stack, on the client credentials `up` made for it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest

from swarmfly.testing import Origin
from tests.conftest import FAST_ENV, require_tool
from tests.integration.test_cli import swarmfly

MiB = 1024 * 1024
NOBODY = ["--reuid=nobody", "--regid=nogroup", "--clear-groups"]

RAW_CLIENT = r"""
import socket, sys, time
host, port, subject = sys.argv[1], int(sys.argv[2]), sys.argv[3]
sock = socket.create_connection((host, port), timeout=5)
got = b""
sock.settimeout(0.5)
sock.sendall(
    b'CONNECT {"verbose":false,"pedantic":false}\r\nSUB > 1\r\n'
    + b"PUB " + subject.encode() + b' 2\r\n{}\r\nPING\r\n'
)
deadline = time.monotonic() + 5
while time.monotonic() < deadline:
    try:
        chunk = sock.recv(65536)
    except socket.timeout:
        continue
    if not chunk:
        break
    got += chunk
sys.stdout.write(got.decode(errors="replace"))
"""

READER = r"""
import os, sys
for path in sys.argv[1:]:
    try:
        if os.path.isdir(path):
            os.listdir(path)
        else:
            open(path, "rb").read()
        print("read", path)
    except PermissionError:
        print("denied", path)
"""


def system_python() -> str:
    return "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


def as_nobody(*command: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    setpriv = require_tool("setpriv")
    return subprocess.run(
        [setpriv, *NOBODY, *command],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd="/",
        env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "LANG": "C.UTF-8"},
        check=False,
    )


@dataclass
class Up:
    state: Path
    nats_host: str
    nats_port: int
    peer_host: str


@pytest.fixture
async def up() -> AsyncIterator[Up]:
    if os.geteuid() != 0:
        if os.environ.get("SWARMFLY_REQUIRE_E2E") == "1":
            pytest.fail("running as another uid needs root (SWARMFLY_REQUIRE_E2E=1)")
        pytest.skip("running as another uid needs root")
    require_tool("setpriv")
    # A parent everyone may enter, as a home directory or /var/lib is: pytest's own temp
    # dirs are private to root, which would hide the state dir whatever its mode.
    parent = Path(tempfile.mkdtemp(prefix="swarmfly-users-"))
    parent.chmod(0o755)
    state = parent / "state"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "swarmfly", "up", "--state-dir", str(state),
        "--no-proxy",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **FAST_ENV},
    )  # fmt: skip
    assert process.stdout is not None
    try:
        lines: list[str] = []
        while not lines or lines[-1] != "stop with Ctrl-C":
            line = await asyncio.wait_for(process.stdout.readline(), 60)
            assert line, f"swarmfly up ended early: {lines}"
            lines.append(line.decode().rstrip("\n"))
        nats_url = next(line.split()[1] for line in lines if line.startswith("  nats "))
        host, port = nats_url.removeprefix("nats://").rsplit(":", 1)
        peer = next(line for line in lines if line.startswith("  peer "))
        peer_host = peer.split("(")[1].split(",")[0]
        yield Up(state, host, int(port), peer_host)
    finally:
        process.send_signal(signal.SIGINT)
        _, errors = await asyncio.wait_for(process.communicate(), 30)
        shutil.rmtree(parent, ignore_errors=True)
    assert process.returncode == 0, errors.decode()


async def test_another_local_user_cannot_use_the_embedded_nats(up: Up) -> None:
    subject = f"swarmfly.v1.peer.{up.peer_host}.download"
    seen = as_nobody(system_python(), "-c", RAW_CLIENT, up.nats_host, str(up.nats_port), subject)
    assert seen.returncode == 0, seen.stderr
    assert seen.stdout.startswith("INFO "), seen.stdout
    assert '"auth_required":true' in seen.stdout
    assert "-ERR 'Authorization Violation'" in seen.stdout
    assert "MSG " not in seen.stdout and "PONG" not in seen.stdout, "nothing delivered"


async def test_another_local_user_cannot_read_the_state_dir_or_credentials(up: Up) -> None:
    record = orjson.loads((up.state / "cluster.json").read_bytes())
    seed = record["client"]["nkeys_seed"]
    paths = [str(up.state), str(up.state / "credentials"), seed, str(up.state / "cluster.json")]
    seen = as_nobody(system_python(), "-c", READER, *paths)
    assert seen.stdout.split("\n")[:-1] == [f"denied {p}" for p in paths], seen.stderr
    # The credentials are 0600 inside 0700 directories, so even a leaked path is no use.
    assert (up.state.stat().st_mode & 0o777, Path(seed).stat().st_mode & 0o777) == (0o700, 0o600)


async def test_another_local_users_cli_says_it_cannot_read_the_credentials(up: Up) -> None:
    seen = as_nobody(
        sys.executable, "-m", "swarmfly", "status", "--state-dir", str(up.state), timeout=60
    )
    assert seen.returncode == 1
    assert (
        f"cannot read the cluster's credentials in {up.state}: run as the user that ran"
        " swarmfly up, or pass [nats] credentials"
    ) in seen.stderr


async def test_the_user_that_ran_up_still_downloads(up: Up, origin: Origin, tmp_path: Path) -> None:
    data = os.urandom(3 * MiB)
    url = origin.add("mine.bin", data)
    code, stdout, stderr = await swarmfly(
        "get", url, "-O", str(tmp_path / "mine.bin"), "--json", "--state-dir", str(up.state)
    )
    assert code == 0, stderr
    assert orjson.loads(stdout)["via"] == "peer"
    assert (tmp_path / "mine.bin").read_bytes() == data
    code, stdout, stderr = await swarmfly("status", "--json", "--state-dir", str(up.state))
    assert code == 0, stderr
    assert up.peer_host in stdout, "status reached the services on the client credentials"
