"""`swarmfly get` and `swarmfly up` as a user runs them: exit codes, outputs, summaries."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import orjson
import pytest

from swarmfly import preheat
from swarmfly.config import Config, NatsConfig
from swarmfly.natsserver import NatsServer
from swarmfly.testing import Origin, in_process_cluster, spawn_service
from tests.conftest import FAST_ENV, swarmfly
from tests.integration.test_cli_oneshot import on_a_terminal

MiB = 1024 * 1024


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


async def test_get_without_control_plane_reads_the_origin(origin: Origin, tmp_path: Path) -> None:
    data = os.urandom(9 * MiB + 123)
    url = origin.add("f.bin", data)
    out = tmp_path / "out" / "f.bin"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    code, stdout, stderr = await swarmfly(
        "get", url, "-O", str(out), "--json", "--digest", digest,
        "--state-dir", str(tmp_path / "state"),
    )  # fmt: skip
    assert code == 0, stderr
    summary: dict[str, Any] = orjson.loads(stdout)
    assert summary["bytes_origin"] == len(data)
    assert summary["bytes_p2p"] == 0
    assert summary["digest"] == digest, "verified against the digest given"
    assert out.read_bytes() == data
    assert leftovers(out.parent) == ["f.bin"]


async def test_get_verifies_the_whole_file_digest(origin: Origin, tmp_path: Path) -> None:
    data = os.urandom(MiB)
    url = origin.add("f.bin", data)
    out = tmp_path / "f.bin"
    wrong = "sha256:" + "0" * 64
    code, stdout, stderr = await swarmfly(
        "get", url, "-O", str(out), "--digest", wrong, "--state-dir", str(tmp_path / "s"),
        "--log-level", "WARNING",
    )  # fmt: skip
    assert code == 4, "a digest mismatch"
    assert stdout == ""
    assert stderr.strip().count("\n") == 0, "one line"
    actual = hashlib.sha256(data).hexdigest()
    assert f"{url}: the origin's content does not match its digest {wrong}" in stderr
    assert stderr.rstrip().endswith(f"(it is sha256:{actual})"), "what it is, to compare"
    assert not out.exists()
    assert leftovers(tmp_path) == ["s"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--digest", "md5:abc"], "sha256"),
        (["--header", "no colon"], "Name: value"),
    ],
)
async def test_get_refuses_bad_arguments(
    origin: Origin, tmp_path: Path, args: list[str], message: str
) -> None:
    url = origin.add("f.bin", b"x")
    code, _, stderr = await swarmfly(
        "get", url, "-O", str(tmp_path / "o"), *args, "--state-dir", str(tmp_path / "s")
    )
    assert code == 2, "a usage error"
    assert message in stderr
    assert not (tmp_path / "o").exists()


async def test_get_fails_cleanly_on_origin_errors(origin: Origin, tmp_path: Path) -> None:
    out = tmp_path / "missing.bin"
    code, _, stderr = await swarmfly(
        "get", f"{origin.url}/missing.bin", "-O", str(out), "--state-dir", str(tmp_path / "s")
    )
    assert code == 3, "not found at the origin"
    assert "404" in stderr
    assert not out.exists()


async def test_get_unknown_scheme_names_the_known_ones(tmp_path: Path) -> None:
    code, _, stderr = await swarmfly(
        "get", "gopher://x/y", "-O", str(tmp_path / "o"), "--state-dir", str(tmp_path / "s")
    )
    assert code == 2, "a usage error"
    assert "gopher" in stderr and "http" in stderr


@pytest.mark.parametrize(
    ("command", "prog"),
    [(["get", "not-a-url", "-O", "q"], "get"), (["preheat", "url", "not-a-url"], "preheat url")],
)
async def test_a_url_without_a_scheme_is_refused_with_an_example(
    tmp_path: Path, command: list[str], prog: str
) -> None:
    code, out, err = await swarmfly(*command, "--state-dir", str(tmp_path))
    assert (code, out) == (2, "")
    assert err == (
        "swarmfly: argument url: 'not-a-url' has no scheme: give the whole URL, such as"
        f" http://host/path/file (see swarmfly {prog} --help)\n"
    )


async def test_headers_reach_the_origin_and_are_never_stored(
    origin: Origin, tmp_path: Path
) -> None:
    secret = "Bearer s3cr3t-t0ken-value"
    origin.required_headers = {"Authorization": secret}
    url = origin.add("private.bin", os.urandom(2 * MiB)) + "?X-Amz-Signature=sig-s3cr3t"
    state = tmp_path / "state"
    code, _, stderr = await swarmfly(
        "get", url, "-O", str(tmp_path / "p.bin"), "--header", f"Authorization: {secret}",
        "--state-dir", str(state), "--log-level", "DEBUG",
    )  # fmt: skip
    assert code == 0, stderr
    assert "s3cr3t" not in stderr
    for path in state.rglob("*"):
        if path.is_file() and path.name != "data":
            assert b"s3cr3t" not in path.read_bytes(), path


async def test_get_times_out_with_a_clear_error(tmp_path: Path) -> None:
    async with Origin(rate=256 * 1024).serve() as slow:
        url = slow.add("slow.bin", os.urandom(8 * MiB))
        out = tmp_path / "slow.bin"
        code, _, stderr = await swarmfly(
            "get", url, "-O", str(out), "--timeout", "1", "--state-dir", str(tmp_path / "s")
        )
    assert code == 5, "a timeout"
    assert f"{url}: download did not finish in 1s" in stderr
    assert not out.exists()


async def test_get_through_a_peer_service(
    origin: Origin, nats: NatsServer, prefix: str, tmp_path: Path
) -> None:
    data = os.urandom(5 * MiB)
    url = origin.add("f.bin", data)
    services = [
        spawn_service(kind, nats.url, tmp_path / kind, "--prefix", prefix, env=FAST_ENV)
        for kind in ("scheduler", "storage", "peer")
    ]
    try:
        out = tmp_path / "f.bin"
        code, stdout, stderr = await swarmfly(
            "get", url, "-O", str(out), "--json", "--state-dir", str(tmp_path / "peer"),
            "--nats", nats.url, "--prefix", prefix,
        )  # fmt: skip
        assert code == 0, stderr
        summary = orjson.loads(stdout)
        assert summary["via"] == "peer"
        assert summary["bytes_p2p"] == len(data), "the seed read the origin, the peer the seed"
        assert out.read_bytes() == data
        # Beyond the content: one byte per ranged stat (the access check of each host).
        assert len(data) <= origin.bytes_served <= len(data) + 4
    finally:
        for service in services:
            assert service.stop() == 0, service.log()


QUICKSTART = Path(__file__).parents[2] / "docs" / "quickstart.md"
DOC_STATE = "~/.local/state/swarmfly"


def _banner_shape(lines: list[str], state: str) -> list[str]:
    """The banner with what differs from run to run masked: the state dir, host ids (a name
    and 8 hex digits), then every number (ports)."""
    masked = []
    for line in lines:
        line = line.replace(state, "STATE")
        line = re.sub(r"[\w.-]+-[0-9a-f]{8}\b", "HOST", line)
        masked.append(re.sub(r"\d+", "N", line))
    return masked


def _quickstart_banner() -> list[str]:
    """What docs/quickstart.md shows `swarmfly up` printing, masked the same way."""
    text = QUICKSTART.read_text()
    block = text.split("```\nswarmfly is up\n", 1)[1].split("\n```", 1)[0]
    return _banner_shape(["swarmfly is up", *block.split("\n")], DOC_STATE)


@dataclass
class Up:
    """A running `swarmfly up`: its banner after the first line, and its stderr so far."""

    lines: list[str]
    log: list[str]
    """Every line of stderr, read as it comes: a full pipe would block the process."""
    pid: int

    @property
    def nats_url(self) -> str:
        return self.lines[0].split()[1]


@asynccontextmanager
async def swarmfly_up(state: Path, *args: str, status: int = 0) -> AsyncIterator[Up]:
    """`swarmfly up --state-dir STATE ARGS` until its banner is printed; stopped with Ctrl-C
    (SIGINT) after, which must end it cleanly (exit ``status``: 0, unless the test made it
    stop otherwise)."""
    up = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "swarmfly", "up", "--state-dir", str(state), *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **FAST_ENV},
    )  # fmt: skip
    assert up.stdout is not None and up.stderr is not None
    log: list[str] = []

    async def read_log(stream: asyncio.StreamReader) -> None:
        async for line in stream:
            log.append(line.decode(errors="replace").rstrip("\n"))

    reading = asyncio.create_task(read_log(up.stderr))
    try:
        banner = (await asyncio.wait_for(up.stdout.readline(), 30)).decode()
        assert banner.strip() == "swarmfly is up", log
        lines: list[str] = []
        while not lines or lines[-1] != "stop with Ctrl-C":
            line = await asyncio.wait_for(up.stdout.readline(), 10)
            assert line, f"the banner ended early: {lines}"
            lines.append(line.decode().rstrip("\n"))
        yield Up(lines, log, up.pid)
    finally:
        if up.returncode is None:
            up.send_signal(signal.SIGINT)
        await asyncio.wait_for(asyncio.gather(reading, up.wait()), 20)
    assert up.returncode == status, "\n".join(log)


ALARMING = re.compile(r" (WARNING|ERROR|CRITICAL) |^Traceback ")
"""A log line of a level someone should look at (the format is time, level, logger)."""


async def test_swarmfly_up_runs_the_stack(origin: Origin, tmp_path: Path) -> None:
    state = tmp_path / "state"
    # Any free proxy port: with 65001 taken (another peer on this machine) the proxy warns
    # that the runtimes' mirror address is not its own.
    async with swarmfly_up(state, "--proxy-port", "0") as up:
        lines = up.lines
        assert _banner_shape(["swarmfly is up", *lines], str(state)) == _quickstart_banner()
        nats_url = up.nats_url
        assert nats_url.startswith("nats://127.0.0.1:")
        assert "metrics" in lines[1]
        # A healthy start says nothing alarming, for a few heartbeats after the banner too.
        await asyncio.sleep(2)
        assert [line for line in up.log if ALARMING.search(line)] == [], "\n".join(up.log)
        assert up.log, "nothing was logged at INFO: the check above would prove nothing"
        assert not [line for line in up.log if "tightening" in line], "a new dir made open"
        # The proxy, on loopback only, and the containerd snippet for its own address.
        proxy_url = next(line.split()[1] for line in lines if line.startswith("  proxy "))
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", proxy_url), lines
        hint = lines.index(f'  [host."{proxy_url}"]')
        assert "/etc/containerd/certs.d/_default/hosts.toml" in lines[hint - 1]
        assert lines[hint + 1] == '    capabilities = ["pull", "resolve"]'
        port = int(proxy_url.rsplit(":", 1)[1])
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.close()
        with pytest.raises(OSError):  # bound to 127.0.0.1, not to every address
            await asyncio.open_connection("127.0.0.2", port)

        # The CLI's own credentials, from the state dir `up` made private.
        record = orjson.loads((state / "cluster.json").read_bytes())
        assert record["nats"] == [nats_url]
        seed = Path(record["client"]["nkeys_seed"])
        assert seed.parent == state / "credentials"
        assert seed.read_text().strip() not in (state / "cluster.json").read_text()
        assert [oct(p.stat().st_mode & 0o777) for p in (state, seed.parent, seed)] == [
            oct(0o700),
            oct(0o700),
            oct(0o600),
        ]
        assert (state / "cluster.json").stat().st_mode & 0o777 == 0o600
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):  # no way in
            await nats.connect(nats_url, allow_reconnect=False, connect_timeout=2)
        client = await nats.connect(
            nats_url, nkeys_seed=str(seed), inbox_prefix=record["client"]["inbox_prefix"]
        )
        try:
            inbox = client.new_inbox()
            sub = await client.subscribe(inbox)
            await client.publish("$SRV.PING", b"", reply=inbox)
            names = set()
            try:
                while True:
                    msg = await sub.next_msg(timeout=0.5)
                    names.add(orjson.loads(msg.data)["name"])
            except TimeoutError:
                pass
            assert {"scheduler", "storage", "peer", "proxy"} <= names
        finally:
            await client.close()

        data = os.urandom(3 * MiB)
        url = origin.add("up.bin", data)
        code, stdout, stderr = await swarmfly(
            "get", url, "-O", str(tmp_path / "up.bin"), "--json", "--state-dir", str(state)
        )
        assert code == 0, stderr
        assert orjson.loads(stdout)["via"] == "peer"
        assert (tmp_path / "up.bin").read_bytes() == data
        # Again, at a terminal: this host's own copy, said so (not "0.0 MiB from the origin,
        # 0.0 MiB from peers", which leaves the user asking where the bytes came from).
        again = tmp_path / "again.bin"
        code, stdout, terminal = await on_a_terminal(
            "get", url, "-O", str(again), "--state-dir", str(state)
        )
        assert (code, stdout) == (0, ""), terminal
        last = terminal.replace("\r\n", "\n").rstrip("\n").split("\n")[-1]
        assert re.fullmatch(rf"{again}: 3\.0 MiB in \d+\.\ds \(all from this host's cache\)", last)
        assert again.read_bytes() == data
    assert not (state / "cluster.json").exists()


def nats_server_of(pid: int) -> int:
    """The process id of the nats-server that process ``pid`` started."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    found = [
        int(c) for c in children if Path(f"/proc/{c}/comm").read_text().strip() == "nats-server"
    ]
    assert len(found) == 1, children
    return found[0]


async def test_up_whose_nats_server_dies_stops_saying_why(tmp_path: Path) -> None:
    """Without its NATS, `up`'s services could only retry (a warning each, forever) and every
    get would time out: it stops instead, exit 6, one line saying why, no traceback."""
    async with swarmfly_up(tmp_path / "state", "--proxy-port", "0", status=6) as up:
        os.kill(nats_server_of(up.pid), signal.SIGKILL)
        for _ in range(100):  # 10 s at most: `up` looks every 0.5 s, its shutdown is quick
            if not Path(f"/proc/{up.pid}").exists() or _zombie(up.pid):
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("up still runs 10 s after its nats-server died")
    assert not [line for line in up.log if "Traceback" in line], "\n".join(up.log)
    assert up.log[-1] == (
        "swarmfly: the embedded nats-server exited (status -9), so no service could reach"
        " another: swarmfly up stopped; run it again"
    ), "\n".join(up.log)


def _zombie(pid: int) -> bool:
    """Exited, not yet reaped (asyncio's child watcher reaps it when it gets to it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


async def test_the_nats_url_up_prints_works_with_its_state_dir(tmp_path: Path) -> None:
    state = tmp_path / "state"
    async with swarmfly_up(state) as up:
        port = up.nats_url.rsplit(":", 1)[1]
        for given in (up.nats_url, f"127.0.0.1:{port}", f"nats://localhost:{port}"):
            code, out, err = await swarmfly("status", "--nats", given, "--state-dir", str(state))
            assert (code, err) == (0, ""), given
            assert "SERVICES" in out and "scheduler" in out

        # Elsewhere the server admits no one without credentials, and says where they are.
        refusal = (
            f"swarmfly: NATS ({up.nats_url}) requires credentials and none were given"
            " (nats: 'Authorization Violation'): `swarmfly up` keeps its cluster's under"
            " <state dir>/credentials, and get, status, preheat and doctor use them when run"
            " with the same --state-dir; otherwise set [nats] creds, nkeys_seed, token_file or"
            " user\n"
        )
        other = ("--nats", up.nats_url, "--state-dir", str(tmp_path / "other"))
        code, out, err = await swarmfly("status", *other)
        assert (code, out, err) == (6, "", refusal)
        code, out, err = await swarmfly("peer", *other)  # the quickstart's old extra peer
        assert (code, out) == (6, "") and err.endswith(refusal), err


def local_ask(path: Path, body: bytes) -> list[dict[str, Any]]:
    """One request line on the peer's local socket, sent with no descriptor; its lines."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(30)
        conn.connect(str(path))
        conn.sendall(body + b"\n")
        with conn.makefile("rb") as answer:
            return [orjson.loads(line) for line in answer]


async def test_get_asks_its_hosts_peer_over_a_private_local_socket(
    origin: Origin, nats: NatsServer, prefix: str, tmp_path: Path
) -> None:
    data = os.urandom(3 * MiB)
    url = origin.add("local.bin", data)
    deep = tmp_path / ("d" * 60) / ("e" * 60)  # too long a path for a Unix socket
    services = [
        spawn_service(kind, nats.url, folder, "--prefix", prefix, env=FAST_ENV)
        for kind, folder in (
            ("scheduler", tmp_path / "scheduler"),
            ("storage", tmp_path / "storage"),
            ("peer", tmp_path / "peer"),
            ("peer", deep),
        )
    ]
    services[-1].stop()  # a peer with no socket is asked over NATS: let it write here
    roots = {**FAST_ENV, "SWARMFLY_PEER_OUTPUT_ROOTS": str(tmp_path)}
    services[-1] = spawn_service("peer", nats.url, deep, "--prefix", prefix, env=roots)
    try:
        record = orjson.loads((tmp_path / "peer" / "peer.json").read_bytes())
        socket_file = Path(record["socket"])
        assert socket_file.stat().st_mode & 0o777 == 0o600, "only this user may ask"

        # Bad requests on the socket get an error, and the peer keeps serving.
        for body in (b"{not json", b"[]", orjson.dumps({"download_id": "dl-x"})):
            lines = await asyncio.to_thread(local_ask, socket_file, body)
            assert lines[-1]["error"]["code"] == "bad_request", lines
        missing = {
            "download_id": "dl-missing",
            "source": {"url": f"{origin.url}/missing.bin"},
            "output": str(tmp_path / "never.bin"),
        }
        lines = await asyncio.to_thread(local_ask, socket_file, orjson.dumps(missing))
        assert lines[-1]["error"]["code"] == "not_found"
        assert not (tmp_path / "never.bin").exists()

        for state, out in ((tmp_path / "peer", tmp_path / "a.bin"), (deep, tmp_path / "b.bin")):
            code, stdout, stderr = await swarmfly(
                "get", url, "-O", str(out), "--json", "--state-dir", str(state),
                "--nats", nats.url, "--prefix", prefix,
            )  # fmt: skip
            assert code == 0, stderr
            assert orjson.loads(stdout)["via"] == "peer"  # the socket, then NATS
            assert out.read_bytes() == data
        assert orjson.loads((deep / "peer.json").read_bytes())["socket"] is None
    finally:
        for service in services:
            assert service.stop() == 0, service.log()
    assert not socket_file.exists()


async def test_preheat_url_seeds_storage_so_a_get_reads_nothing_from_the_origin(
    origin: Origin, nats: NatsServer, prefix: str, tmp_path: Path
) -> None:
    data = os.urandom(6 * MiB)
    url = origin.add("pre.bin", data)
    cli = ("--nats", nats.url, "--prefix", prefix, "--state-dir", str(tmp_path / "cli"))
    async with in_process_cluster(nats.url, prefix, tmp_path):
        code, stdout, stderr = await swarmfly("preheat", "url", url, *cli)
        assert code == 0, stderr
        assert re.fullmatch(
            r"preheated 1 of 1 file\(s\), 6\.0 MiB \(0 already cached, 6\.0 MiB from the origin\)"
            r" in \d+\.\ds\n",
            stdout,
        )
        assert re.search(rf"^\[1/1\] {url}\s+6\.0 MiB in", stderr, re.M), stderr
        served = origin.bytes_served
        code, stdout, stderr = await swarmfly("preheat", "url", url, "--json", *cli)
        assert code == 0, stderr
        summary = orjson.loads(stdout)
        assert (summary["tasks"], summary["cached"], summary["bytes"]) == (1, 1, len(data))
        assert summary["bytes_origin"] == 0 and summary["seconds"] >= 0
        # A host's peer gets it from storage: no byte of it from the origin.
        code, stdout, stderr = await swarmfly(
            "get", url, "-O", str(tmp_path / "got.bin"), "--json",
            "--state-dir", str(tmp_path / "peer"), "--nats", nats.url, "--prefix", prefix,
        )  # fmt: skip
        assert code == 0, stderr
        got = orjson.loads(stdout)
        assert (got["via"], got["bytes_origin"], got["bytes_p2p"]) == ("peer", 0, len(data))
        assert (tmp_path / "got.bin").read_bytes() == data
        assert origin.bytes_served - served <= 2, "the access checks' one-byte reads at most"
        # A URL the origin refuses: the error, and the summary all the same.
        code, stdout, stderr = await swarmfly("preheat", "url", f"{origin.url}/missing", *cli)
        assert code == 3, "not found at the origin"
        assert stdout.startswith("preheated 0 of 1 file(s), 1 failed, 0.0 MiB")
        assert f"[1/1] {origin.url}/missing failed: origin answered 404" in stderr
        assert f"swarmfly: {origin.url}/missing: origin answered 404" in stderr


async def test_preheat_reports_progress_within_a_blob(
    nats: NatsServer, prefix: str, tmp_path: Path
) -> None:
    data = os.urandom(8 * MiB)  # 1 MiB pieces at 2 MiB/s: 4 s, progress looked at every 1 s
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    seen: list[tuple[int, int | None]] = []
    config = Config(state_dir=tmp_path / "cli", nats=NatsConfig(servers=[nats.url], prefix=prefix))
    async with (
        Origin(rate=2 * MiB).serve() as slow,
        in_process_cluster(nats.url, prefix, tmp_path),
    ):
        blob = preheat.Blob(slow.add("layer", data), digest, len(data))
        summary = await preheat.preheat(
            config, [blob], {}, timeout=60, on_bytes=lambda done, total: seen.append((done, total))
        )
    assert summary.to_dict()["tasks"] == 1 and not summary.errors
    assert seen[-1] == (len(data), len(data))
    assert any(0 < done < len(data) for done, _ in seen), f"only whole blobs: {seen}"
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--password-stdin"], "--password-stdin needs --username"),
        (["--username", "alice"], "--username needs --password-stdin"),
        (
            ["--username", "a", "--password-stdin", "--auth-file", "x"],
            "give --username or --auth-file, not both",
        ),
    ],
)
async def test_preheat_image_refuses_half_given_credentials(
    tmp_path: Path, args: list[str], message: str
) -> None:
    code, stdout, stderr = await swarmfly(
        "preheat", "image", "registry.example.invalid/team/app:v1", *args,
        "--state-dir", str(tmp_path),
    )  # fmt: skip
    assert (code, stdout) == (2, "")
    assert stderr.strip() == f"swarmfly: {message}"
