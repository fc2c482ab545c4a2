"""`swarmfly get`, `preheat` and `status` as one-shot commands (issue 17): a connect deadline,
one line in words per error, JSON errors with a stable code and distinct exit statuses, a
progress bar only on a terminal, and a healthy run that says nothing alarming."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from swarmfly.natsserver import NatsServer
from swarmfly.testing import Origin, in_process_cluster, swarmfly_get
from tests.conftest import swarmfly

pytestmark = pytest.mark.timeout(60)
MiB = 1024 * 1024
AT_WARNING = {"SWARMFLY_LOG_LEVEL": "WARNING"}
"""A get's own level (FAST_ENV sets the services' INFO, which a get now takes too)."""


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def one_line(stderr: str) -> str:
    assert stderr.count("\n") == 1 and stderr.startswith("swarmfly: "), stderr
    return stderr.strip()


@pytest.mark.parametrize(
    "command", [["status"], ["preheat", "url", "http://127.0.0.1:9/f"]], ids=["status", "preheat"]
)
async def test_an_unreachable_nats_is_given_up_on_in_time(
    tmp_path: Path, command: list[str]
) -> None:
    nats_url = f"nats://127.0.0.1:{closed_port()}"
    args = [*command, "--nats", nats_url, "--state-dir", str(tmp_path), "--connect-timeout", "1"]
    started = time.monotonic()
    code, out, err = await swarmfly(*args, "--json")
    assert time.monotonic() - started < 8, "the deadline held"
    assert code == 6
    assert one_line(err) == f"swarmfly: cannot reach NATS at {nats_url} in 1s: Connection refused"
    assert orjson.loads(out) == {
        "ok": False,
        "error": {
            "code": "unavailable",
            "status": 503,
            "message": f"cannot reach NATS at {nats_url} in 1s: Connection refused",
        },
    }


async def test_get_reads_the_origin_when_nats_is_unreachable_saying_so_once(
    origin: Origin, tmp_path: Path
) -> None:
    data = os.urandom(MiB)
    url = origin.add("f.bin", data)
    nats_url = f"nats://127.0.0.1:{closed_port()}"
    code, out, err = await swarmfly(
        "get", url, "-O", str(tmp_path / "f.bin"), "--nats", nats_url, "--connect-timeout", "1",
        "--state-dir", str(tmp_path / "s"), env=AT_WARNING,
    )  # fmt: skip
    assert (code, out) == (0, "")
    assert err.count("\n") == 1, "one warning, not one per attempt"
    assert f"cannot reach NATS at {nats_url} in 1s: Connection refused" in err
    assert (tmp_path / "f.bin").read_bytes() == data


async def test_get_errors_name_their_object_with_distinct_exit_statuses(
    origin: Origin, tmp_path: Path
) -> None:
    state = ("--state-dir", str(tmp_path / "s"))
    missing = f"{origin.url}/missing.bin"
    code, out, err = await swarmfly(
        "get", missing, "-O", str(tmp_path / "m"), "--json", *state, env=AT_WARNING
    )
    assert code == 3
    assert one_line(err) == f"swarmfly: {missing}: origin answered 404 Not Found"
    answer: dict[str, Any] = orjson.loads(out)
    assert (answer["ok"], answer["error"]["code"]) == (False, "not_found")
    assert answer["error"]["message"] == f"{missing}: origin answered 404 Not Found"

    # An output that cannot be created: refused before the origin is read, naming the path.
    url = origin.add("f.bin", os.urandom(MiB))
    (tmp_path / "file").write_bytes(b"")
    blocked = tmp_path / "file" / "out.bin"
    served = origin.bytes_served
    code, _, err = await swarmfly("get", url, "-O", str(blocked), *state, env=AT_WARNING)
    assert code == 2
    assert one_line(err) == f"swarmfly: cannot write {blocked}: {blocked.parent} is not a directory"
    assert origin.bytes_served == served


async def test_digests_in_upper_case_are_taken_and_malformed_ones_refused_in_words(
    origin: Origin, tmp_path: Path
) -> None:
    data = os.urandom(MiB)
    url = origin.add("f.bin", data)
    hex_digest = hashlib.sha256(data).hexdigest()
    code, out, err = await swarmfly(
        "get", url, "-O", str(tmp_path / "f.bin"), "--json", "--digest",
        f"sha256:{hex_digest.upper()}", "--state-dir", str(tmp_path / "s"),
    )  # fmt: skip
    assert code == 0, err
    assert orjson.loads(out)["digest"] == f"sha256:{hex_digest}"
    for command in (["get", url, "-O", str(tmp_path / "x")], ["preheat", "url", url]):
        code, out, err = await swarmfly(*command, "--digest", "abc")
        assert (code, out) == (2, "")
        line = one_line(err)
        assert "expected sha256:<64 hex digits>, got 'abc'" in line and "pattern" not in line


async def test_log_level_is_checked_and_does_what_it_says(origin: Origin, tmp_path: Path) -> None:
    url = origin.add("f.bin", os.urandom(MiB))
    get = ("get", url, "-O", str(tmp_path / "f.bin"), "--state-dir", str(tmp_path / "s"))
    code, out, err = await swarmfly(*get, "--log-level", "LOUD")
    assert (code, out) == (2, "")
    assert "argument --log-level: invalid choice: 'LOUD'" in one_line(err)
    code, _, err = await swarmfly(*get, "--log-level", "debug")
    assert code == 0, err
    assert " DEBUG " in err, "the flag was taken"


async def test_a_get_takes_the_log_level_of_the_variable_and_the_file_too(
    origin: Origin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = origin.add("f.bin", os.urandom(MiB))
    state = tmp_path / "s"
    get = ("get", url, "-O", str(tmp_path / "f.bin"), "--state-dir", str(state))
    code, _, err = await swarmfly(*get, env={"SWARMFLY_LOG_LEVEL": "debug"})
    assert code == 0, err
    assert " DEBUG " in err, "the variable was taken"
    again = (*get, "--overwrite", "--log-level", "ERROR")
    code, _, err = await swarmfly(*again, env={"SWARMFLY_LOG_LEVEL": "debug"})
    assert (code, err) == (0, ""), "the flag wins"
    state.mkdir(exist_ok=True)
    (state / "swarmfly.toml").write_text('log_level = "DEBUG"\n')
    monkeypatch.delenv("SWARMFLY_LOG_LEVEL", raising=False)
    done = await asyncio.to_thread(swarmfly_get, url, tmp_path / "g.bin", state)
    assert done.returncode == 0, done.stderr
    assert " DEBUG " in done.stderr, "the file was taken"
    # Set nowhere, a get is at WARNING: its in-process peer says nothing of itself.
    (state / "swarmfly.toml").unlink()
    done = await asyncio.to_thread(swarmfly_get, url, tmp_path / "h.bin", state)
    assert (done.returncode, done.stderr) == (0, "")


async def test_healthy_preheat_and_status_say_nothing_alarming(
    origin: Origin, nats: NatsServer, prefix: str, tmp_path: Path
) -> None:
    url = origin.add("pre.bin", os.urandom(2 * MiB))
    cli = ("--nats", nats.url, "--prefix", prefix, "--state-dir", str(tmp_path / "cli"))
    async with in_process_cluster(nats.url, prefix, tmp_path):
        code, out, err = await swarmfly("preheat", "url", url, *cli)  # at INFO (FAST_ENV)
        assert code == 0, err
        assert out.startswith("preheated 1 of 1 file(s)")
        assert [line for line in err.splitlines() if not line.startswith("[1/1] ")] == []
        code, out, err = await swarmfly("status", *cli)
        assert (code, err) == (0, "")
        assert "SERVICES" in out and url in out


async def test_status_without_a_scheduler_says_so(
    nats: NatsServer, prefix: str, tmp_path: Path
) -> None:
    cli = ("--nats", nats.url, "--prefix", prefix, "--state-dir", str(tmp_path))
    code, out, err = await swarmfly("status", *cli)
    assert code == 6
    assert "SERVICES" in out, "what was found is still shown"
    assert one_line(err) == f"swarmfly: no scheduler runs under the subject prefix {prefix!r}"
    code, out, _ = await swarmfly("status", "--json", *cli)
    answer = orjson.loads(out)
    assert (code, answer["ok"], answer["error"]["code"]) == (6, False, "unavailable")
    assert answer["services"] == []


def read_all(fd: int) -> bytes:
    """Everything written to a pty until its last writer closes it."""
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the other end is closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


async def on_a_terminal(*args: str) -> tuple[int, str, str]:
    """The command with its stderr on a pty, as someone at a terminal runs it (a get at its
    own level)."""
    leader, follower = os.openpty()
    try:
        reading = asyncio.create_task(asyncio.to_thread(read_all, leader))
        try:
            code, out, _ = await swarmfly(*args, stderr=follower, env=AT_WARNING)
        finally:
            os.close(follower)
        terminal = (await asyncio.wait_for(reading, 10)).decode()
    finally:
        os.close(leader)
    return code, out, terminal


async def test_get_on_a_terminal_shows_progress_to_100_and_a_summary(tmp_path: Path) -> None:
    async with Origin(rate=4 * MiB).serve() as slow:
        url = slow.add("slow.bin", os.urandom(4 * MiB))
        out = tmp_path / "slow.bin"
        state = ("--state-dir", str(tmp_path / "s"))
        code, stdout, terminal = await on_a_terminal("get", url, "-O", str(out), *state)
        assert (code, stdout) == (0, ""), terminal
        assert "MiB/s ETA" in terminal
        assert "100.0% 4.0/4.0 MiB" in terminal
        last = terminal.replace("\r\n", "\n").rstrip("\n").split("\n")[-1]
        assert last.startswith(f"{out}: 4.0 MiB in ") and "4.0 MiB from the origin" in last

        small = slow.add("small.bin", b"x" * 1024)
        quiet = ("get", small, "-O", str(tmp_path / "small.bin"), "--no-progress", *state)
        code, stdout, terminal = await on_a_terminal(*quiet)
        assert (code, stdout, terminal) == (0, "", "")


async def test_preheat_on_a_terminal_ends_its_bar_at_100(
    nats: NatsServer, prefix: str, tmp_path: Path
) -> None:
    cli = ("--nats", nats.url, "--prefix", prefix, "--state-dir", str(tmp_path / "cli"))
    async with (
        Origin(rate=4 * MiB).serve() as slow,
        in_process_cluster(nats.url, prefix, tmp_path),
    ):
        url = slow.add("layer", os.urandom(4 * MiB))
        code, stdout, terminal = await on_a_terminal("preheat", "url", url, *cli)
    assert code == 0, terminal
    assert stdout.startswith("preheated 1 of 1 file(s), 4.0 MiB")
    assert f"[1/1] {url}" in terminal
    assert "100.0% 4.0/4.0 MiB" in terminal
