"""The local socket writes as the calling user (issue 13, item 4).

A root-run peer shares its socket with a group (``[peer] socket_group``). An unprivileged
member (``setpriv`` to nobody) cannot make it write where nobody could not write: the CLI
opens the output itself and passes the descriptor, and a raw request with only a path is
refused. Into its own directory the get works, and the file is nobody's.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from swarmfly.natsserver import NatsServer
from swarmfly.testing import Origin, spawn_service
from tests.conftest import FAST_ENV, require_tool

pytestmark = pytest.mark.timeout(180)

DATA = os.urandom(2 * 1024 * 1024)
RAW_ATTACK = """
import json, socket, sys
conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
conn.settimeout(30)
conn.connect(sys.argv[1])
body = {"download_id": "dl-attack", "source": {"url": sys.argv[2]}, "output": sys.argv[3]}
conn.sendall(json.dumps(body).encode() + b"\\n")
print(conn.makefile("rb").readlines()[-1].decode())
"""


@pytest.fixture
def as_nobody() -> list[str]:
    if os.geteuid() != 0:
        if os.environ.get("SWARMFLY_REQUIRE_E2E") == "1":
            pytest.fail("this test must run as root (SWARMFLY_REQUIRE_E2E=1)")
        pytest.skip("needs root: the peer runs as root and the caller as nobody")
    setpriv = require_tool("setpriv")
    return [setpriv, "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


@pytest.fixture
def dirs() -> Iterator[dict[str, Path]]:
    """Under /tmp (pytest's own dirs are root's 0700): the socket's, nobody's, root's."""
    made = {name: Path(tempfile.mkdtemp(prefix=f"swarmfly-{name}-")) for name in
            ("socket", "nobody", "root")}  # fmt: skip
    made["socket"].chmod(0o755)
    made["root"].chmod(0o755)  # nobody may look, not write
    user = pwd.getpwnam("nobody")
    os.chown(made["nobody"], user.pw_uid, user.pw_gid)
    try:
        yield made
    finally:
        for path in made.values():
            shutil.rmtree(path, ignore_errors=True)


async def test_the_local_socket_writes_as_its_caller(
    as_nobody: list[str], dirs: dict[str, Path], nats: NatsServer, prefix: str, tmp_path: Path
) -> None:
    sock = dirs["socket"] / "peer.sock"
    env = {**FAST_ENV, "SWARMFLY_PEER_SOCKET": str(sock), "SWARMFLY_PEER_SOCKET_GROUP": "nogroup"}
    origin = Origin()
    async with origin.serve() as served:
        url = served.add("f.bin", DATA)
        services = [
            spawn_service(kind, nats.url, tmp_path / kind, "--prefix", prefix, env=env)
            for kind in ("scheduler", "storage", "peer")
        ]
        try:
            assert sock.stat().st_mode & 0o777 == 0o660

            async def get(output: Path) -> subprocess.CompletedProcess[str]:
                command = [*as_nobody, sys.executable, "-m", "swarmfly", "get", url]
                command += ["-O", str(output), "--json", "--state-dir", str(dirs["nobody"])]
                return await asyncio.to_thread(  # the origin runs on this event loop
                    subprocess.run,
                    command,
                    capture_output=True,
                    text=True,
                    timeout=120,
                    env={**os.environ, "SWARMFLY_PEER_SOCKET": str(sock)},
                    check=False,
                    cwd="/",
                )

            # Into root's directory: refused, nothing written there.
            refused = await get(dirs["root"] / "planted.bin")
            assert refused.returncode != 0, refused.stdout
            assert "Permission denied" in refused.stderr, refused.stderr
            # The same with a hand-made request naming only the path.
            attack = await asyncio.to_thread(
                subprocess.run,
                [*as_nobody, sys.executable, "-c", RAW_ATTACK, str(sock), url,
                 str(dirs["root"] / "planted.bin")],
                capture_output=True, text=True, timeout=60, check=False, cwd="/",
            )  # fmt: skip
            error = json.loads(attack.stdout)["error"]
            assert error["code"] == "forbidden", attack
            assert "a file its caller opened" in error["message"]
            assert list(dirs["root"].iterdir()) == []

            # Into nobody's own directory: done through the root-run peer, owned by nobody.
            done = await get(dirs["nobody"] / "mine.bin")
            assert done.returncode == 0, done.stderr
            assert json.loads(done.stdout)["via"] == "peer"
            output = dirs["nobody"] / "mine.bin"
            assert output.read_bytes() == DATA
            assert output.stat().st_uid == pwd.getpwnam("nobody").pw_uid
            assert [p.name for p in dirs["nobody"].iterdir() if p.name.startswith(".")] == []
        finally:
            for service in services:
                assert service.stop() == 0, service.log()
