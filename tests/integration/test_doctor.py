"""`swarmfly doctor` on a host of a real cluster (scheduler, storage and a peer with its
mirror, each its own process): healthy with a containerd that uses the mirror, a problem
with one whose ``config_path`` is not set, and what it says when NATS is gone; whether other
peers reach this host's upload server (they probe it, ``peer.{host_id}.reach``), and that a
peer probes nothing but a listed host's upload address."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from nats import connect as nats_connect

from swarmfly.cluster import local_peer
from swarmfly.doctor import EXIT_PROBLEMS
from swarmfly.natsserver import NatsServer
from swarmfly.testing import Origin, ServiceProcess, spawn_service
from tests.conftest import FAST_ENV

pytestmark = pytest.mark.timeout(120)
MiB = 1024 * 1024
PROXY_VARIABLES = {"HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"}


async def doctor(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """``swarmfly doctor ARGS`` without proxy variables; ``env`` on top."""
    base = {k: v for k, v in os.environ.items() if k not in PROXY_VARIABLES}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "swarmfly", "doctor", *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**base, **FAST_ENV, **(env or {})},
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 90)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.fixture
def services(nats: NatsServer, prefix: str, tmp_path: Path) -> Iterator[list[ServiceProcess]]:
    started = [
        spawn_service(kind, nats.url, tmp_path / kind, "--prefix", prefix, *extra, env=FAST_ENV)
        for kind, extra in (("scheduler", ()), ("storage", ()), ("peer", ("--proxy-port", "0")))
    ]
    try:
        yield started
    finally:
        for service in started:
            assert service.stop() == 0, service.log()


def runtime_files(root: Path, mirror: str, *, config_path: bool) -> list[str]:
    """containerd's config.toml (with or without config_path) and a hosts.toml that names
    the mirror; CRI-O, Docker and k3s absent. Returns the doctor's flags for them."""
    certs = root / "certs.d"
    (certs / "_default").mkdir(parents=True)
    (certs / "_default" / "hosts.toml").write_text(
        f'[host."{mirror}"]\n  capabilities = ["pull", "resolve"]\n'
    )
    registry = f'config_path = "{certs}"\n' if config_path else 'sandbox_image = "pause"\n'
    (root / "config.toml").write_text(
        f'version = 2\n[plugins."io.containerd.grpc.v1.cri".registry]\n{registry}'
    )
    return [
        "--containerd-config", str(root / "config.toml"),
        "--crio-config", str(root / "absent" / "registries.conf"),
        "--docker-config", str(root / "absent" / "daemon.json"),
        "--k3s-config", str(root / "absent" / "registries.yaml"),
    ]  # fmt: skip


def by_name(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {check["name"]: check for check in report["checks"]}


async def test_a_healthy_host(
    services: list[ServiceProcess], nats: NatsServer, prefix: str, origin: Origin, tmp_path: Path
) -> None:
    peer = services[2]
    mirror = peer.proxy_url
    data = os.urandom(2 * MiB)
    probe = origin.add("probe.bin", data)
    flags = runtime_files(tmp_path / "etc", mirror, config_path=True)
    cli = ("--nats", nats.url, "--prefix", prefix, "--state-dir", str(tmp_path / "peer"))
    code, out, err = await doctor(*cli, *flags, "--probe", probe, "--json")
    assert (code, err) == (0, ""), out
    report = orjson.loads(out)
    checks = by_name(report)
    assert report["ok"] is True and report["verdict"].startswith("healthy")
    assert {n: c["status"] for n, c in checks.items()} == {
        "containerd": "ok",
        "cri-o": "skip",
        "docker": "skip",
        "k3s": "skip",
        "proxy-env": "skip",
        "mirror": "ok",
        "nats": "ok",
        "scheduler": "ok",
        "upload": "ok",
        "reach": "skip",
        "probe": "ok",
    }
    assert checks["reach"]["message"] == (
        "no other live peer to ask: whether other hosts reach this upload server is checked"
        " once another peer runs"
    ), "storage runs no peer service: nobody else to ask"
    assert checks["containerd"]["message"].endswith("the mirror serves every registry")
    assert checks["upload"]["message"].endswith("answers (loopback: only this machine reaches it)")
    assert checks["mirror"]["details"]["url"] == mirror, "found through discovery"
    assert {"scheduler", "storage", "peer", "proxy"} <= set(checks["nats"]["details"]["names"])
    assert checks["probe"]["details"] == {
        "content_length": len(data),
        "bytes_origin": 0,
        "bytes_p2p": len(data),
        "via": "peer",
    }, "the seed read the origin; this host's peer read the seed"

    # The same, as a person reads it: a line per check and the verdict last. The probe is in
    # this host's cache now: it says the swarm was not tried, rather than "ok".
    code, out, err = await doctor(*cli, *flags, "--probe", probe)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[-1] == "verdict: healthy, with warnings: probe (5 checks ok)"
    assert any(
        line.startswith("warn  probe")
        and "all from this host's cache; probe a URL this host has not cached" in line
        for line in lines
    ), out


async def test_a_registries_conf_without_cri_o_is_no_runtime(
    services: list[ServiceProcess], nats: NatsServer, prefix: str, tmp_path: Path
) -> None:
    """skopeo's and podman's package installs /etc/containers/registries.conf: on a host
    without CRI-O that file is no runtime's, and the host is not failed for it."""
    etc, bin_dir = tmp_path / "etc", tmp_path / "bin"
    (etc / "containers").mkdir(parents=True)
    bin_dir.mkdir()
    conf = etc / "containers" / "registries.conf"
    conf.write_text('unqualified-search-registries = ["docker.io"]\n')
    flags = [
        "--containerd-config", str(etc / "absent" / "config.toml"),
        "--crio-config", str(conf), "--crio-dir", str(etc / "crio"),
        "--docker-config", str(etc / "absent" / "daemon.json"),
        "--k3s-config", str(etc / "absent" / "registries.yaml"),
        "--nats", nats.url, "--prefix", prefix, "--state-dir", str(tmp_path / "peer"),
    ]  # fmt: skip
    path = {"PATH": str(bin_dir)}
    code, out, err = await doctor(*flags, env=path)
    assert (code, err) == (0, ""), out
    lines = out.splitlines()
    assert (
        f"skip  cri-o       CRI-O is not installed (no {etc / 'crio'}, no crio on PATH): {conf}"
        " is for podman, skopeo or buildah"
    ) in lines
    assert "skip  runtimes    no container runtime configuration here (files only)" in lines
    assert lines[-1] == "verdict: healthy (4 checks ok)"

    crio = bin_dir / "crio"  # with CRI-O here the file is its own, and lacks the mirror
    crio.write_text("#!/bin/sh\n")
    crio.chmod(0o755)
    code, out, _ = await doctor(*flags, env=path)
    assert code == EXIT_PROBLEMS
    assert "fail  runtimes    no runtime here pulls through the mirror (cri-o)" in out.splitlines()


async def test_a_containerd_without_config_path_is_a_problem(
    services: list[ServiceProcess], nats: NatsServer, prefix: str, tmp_path: Path
) -> None:
    flags = runtime_files(tmp_path / "etc", services[2].proxy_url, config_path=False)
    cli = ("--nats", nats.url, "--prefix", prefix, "--state-dir", str(tmp_path / "peer"))
    code, out, err = await doctor(*cli, *flags, "--json")
    assert (code, err) == (EXIT_PROBLEMS, "")
    report = orjson.loads(out)
    checks = by_name(report)
    assert report["ok"] is False
    assert report["verdict"] == "problems: containerd, runtimes failed (4 checks ok)"
    assert checks["containerd"]["message"] == (
        f"{tmp_path / 'etc' / 'config.toml'}: config_path is not set in"
        ' [plugins."io.containerd.grpc.v1.cri".registry], so containerd reads no hosts.toml'
        ' and pulls bypass the mirror; set config_path = "/etc/containerd/certs.d"'
    )
    for name in ("mirror", "nats", "scheduler", "upload"):
        assert checks[name]["status"] == "ok", checks[name]
    assert checks["probe"]["status"] == "skip"

    code, out, _ = await doctor(*cli, *flags)
    assert code == EXIT_PROBLEMS
    assert out.splitlines()[0].startswith("fail  containerd  ")
    assert out.splitlines()[-1] == "verdict: problems: containerd, runtimes failed (4 checks ok)"


async def test_without_nats_the_cluster_checks_fail_in_time(tmp_path: Path) -> None:
    flags = runtime_files(tmp_path / "etc", "http://127.0.0.1:9", config_path=True)
    code, out, _ = await doctor(
        "--nats", "nats://127.0.0.1:9", "--connect-timeout", "1", "--state-dir", str(tmp_path),
        "--mirror", "http://127.0.0.1:9", *flags, "--json",
    )  # fmt: skip
    assert code == EXIT_PROBLEMS
    checks = by_name(orjson.loads(out))
    assert checks["nats"] == {
        "name": "nats",
        "status": "fail",
        "message": "cannot reach NATS at nats://127.0.0.1:9 in 1s: Connection refused",
        "details": {},
    }
    assert checks["mirror"]["message"] == "cannot connect to 127.0.0.1:9: Connection refused"
    assert [checks[n]["status"] for n in ("scheduler", "upload", "reach", "probe")] == ["skip"] * 4


async def test_without_a_scheduler_the_upload_check_waits_for_one(
    nats: NatsServer, prefix: str, tmp_path: Path
) -> None:
    peer = spawn_service(
        "peer", nats.url, tmp_path / "peer", "--prefix", prefix, "--proxy-port", "0", env=FAST_ENV
    )
    try:
        flags = runtime_files(tmp_path / "etc", peer.proxy_url, config_path=True)
        cli = ("--nats", nats.url, "--prefix", prefix, "--state-dir", str(tmp_path / "peer"))
        code, out, _ = await doctor(*cli, *flags, "--json")
    finally:
        assert peer.stop() == 0, peer.log()
    assert code == EXIT_PROBLEMS
    checks = by_name(orjson.loads(out))
    assert checks["scheduler"]["status"] == "fail"
    assert (
        checks["scheduler"]["message"] == f"no scheduler runs under the subject prefix {prefix!r}"
    )
    for name in ("upload", "reach"):
        assert checks[name] == {
            "name": name,
            "status": "skip",
            "message": "needs a scheduler",
            "details": {},
        }
    assert [checks[n]["status"] for n in ("containerd", "mirror", "nats")] == ["ok"] * 3


def peer(nats: NatsServer, prefix: str, folder: Path, *extra: str) -> ServiceProcess:
    return spawn_service(
        "peer", nats.url, folder, "--prefix", prefix, "--proxy-port", "0", *extra, env=FAST_ENV
    )


def host_id(folder: Path) -> str:
    found = local_peer(folder)
    assert found is not None, f"no peer runs on {folder}"
    return found


async def test_another_peer_reaches_the_upload_server(
    services: list[ServiceProcess], nats: NatsServer, prefix: str, tmp_path: Path
) -> None:
    other = peer(nats, prefix, tmp_path / "peer-b")
    try:
        flags = runtime_files(tmp_path / "etc", services[2].proxy_url, config_path=True)
        cli = ("--nats", nats.url, "--prefix", prefix, "--state-dir", str(tmp_path / "peer"))
        code, out, err = await doctor(*cli, *flags, "--json")
        asked = host_id(tmp_path / "peer-b")
    finally:
        assert other.stop() == 0, other.log()
    assert (code, err) == (0, ""), out
    checks = by_name(orjson.loads(out))
    reach = checks["reach"]
    address = reach["details"]["address"]
    assert checks["upload"]["message"].startswith(f"{address} answers"), "the one address"
    assert reach["status"] == "ok", reach
    assert reach["message"] == f"{address} is reached from {asked}"
    [seen] = reach["details"]["asked"]
    assert (seen["host_id"], seen["ok"]) == (asked, True)
    assert 0 <= seen["seconds"] < 3


async def test_an_address_other_hosts_cannot_reach_fails_naming_them(
    nats: NatsServer, prefix: str, tmp_path: Path
) -> None:
    """This peer listens on 127.0.0.1 but advertises 127.0.0.3, where nothing listens: the
    other peer, asked to probe it, cannot connect, and the doctor says who and why."""
    started = [spawn_service("scheduler", nats.url, tmp_path / "scheduler", "--prefix", prefix,
                             env=FAST_ENV)]  # fmt: skip
    try:
        started.append(
            peer(nats, prefix, tmp_path / "peer", "--listen", "127.0.0.1",
                 "--advertise-ip", "127.0.0.3")
        )  # fmt: skip
        started.append(peer(nats, prefix, tmp_path / "peer-b"))
        flags = runtime_files(tmp_path / "etc", started[1].proxy_url, config_path=True)
        cli = ("--nats", nats.url, "--prefix", prefix, "--state-dir", str(tmp_path / "peer"))
        code, out, err = await doctor(*cli, *flags, "--json")
        _, text, _ = await doctor(*cli, *flags)  # as a person reads it
        asked = host_id(tmp_path / "peer-b")
    finally:
        for service in reversed(started):
            assert service.stop() == 0, service.log()
    assert (code, err) == (EXIT_PROBLEMS, ""), out
    report = orjson.loads(out)
    reach = by_name(report)["reach"]
    address = reach["details"]["address"]
    assert address.startswith("http://127.0.0.3:"), address
    where = address.removeprefix("http://")
    why = f"cannot connect to {where}: Connection refused"
    assert reach["status"] == "fail"
    assert reach["message"] == (
        f"other hosts cannot reach this upload server at {address}: {asked}: {why}"
    )
    assert reach["details"]["asked"] == [{"host_id": asked, "ok": False, "error": why}]
    assert report["verdict"].startswith("problems: upload, reach failed"), report["verdict"]
    assert f"fail  reach       {reach['message']}" in text.splitlines(), text


async def test_a_loopback_address_fails_when_another_machine_is_asked(
    nats: NatsServer, prefix: str, tmp_path: Path
) -> None:
    """This peer advertises 127.0.0.1; the other advertises 192.0.2.8, as a peer on another
    machine would. That peer does not GET 127.0.0.1 (a port of its own machine): it answers
    that no other machine reaches a loopback address, and the doctor fails this host for it."""
    started = [spawn_service("scheduler", nats.url, tmp_path / "scheduler", "--prefix", prefix,
                             env=FAST_ENV)]  # fmt: skip
    try:
        started.append(peer(nats, prefix, tmp_path / "peer", "--advertise-ip", "127.0.0.1"))
        started.append(peer(nats, prefix, tmp_path / "peer-b", "--advertise-ip", "192.0.2.8"))
        flags = runtime_files(tmp_path / "etc", started[1].proxy_url, config_path=True)
        cli = ("--nats", nats.url, "--prefix", prefix, "--state-dir", str(tmp_path / "peer"))
        code, out, err = await doctor(*cli, *flags, "--json")
        asked = host_id(tmp_path / "peer-b")
    finally:
        for service in reversed(started):
            assert service.stop() == 0, service.log()
    assert (code, err) == (EXIT_PROBLEMS, ""), out
    report = orjson.loads(out)
    checks = by_name(report)
    address = checks["reach"]["details"]["address"]
    assert address.startswith("http://127.0.0.1:"), address
    why = (
        f"{address.removeprefix('http://')} is a loopback address, which other machines cannot"
        f" reach ({asked} advertises 192.0.2.8: not probed)"
    )
    assert checks["reach"]["status"] == "fail"
    assert checks["reach"]["message"] == (
        f"other hosts cannot reach this upload server at {address}: {asked}: {why}"
    )
    assert checks["reach"]["details"]["asked"] == [{"host_id": asked, "ok": False, "error": why}]
    assert checks["upload"]["status"] == "ok", "this machine reaches it"
    assert report["verdict"].startswith("problems: reach failed"), report["verdict"]


async def test_a_peer_probes_only_a_listed_hosts_upload_address(
    services: list[ServiceProcess], nats: NatsServer, prefix: str, tmp_path: Path
) -> None:
    """Asked over NATS, a peer is no HTTP prober: the request names a host id, never an
    address, and the address probed is the one the schedulers list for that live host (one
    in a denied range, such as cloud metadata, refused). A trap server sees no connection."""
    hits = 0

    async def count(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal hits
        hits += 1
        writer.close()

    trap = await asyncio.start_server(count, "127.0.0.1", 0)
    port = trap.sockets[0].getsockname()[1]
    metadata = peer(nats, prefix, tmp_path / "peer-m", "--advertise-ip", "169.254.169.254")
    nc = await nats_connect(servers=[nats.url], connect_timeout=3, max_reconnect_attempts=0)
    try:
        subject = f"{prefix}.v1.peer.{host_id(tmp_path / 'peer')}.reach"
        trap_url = f"http://127.0.0.1:{port}/"

        async def error(body: dict[str, Any]) -> dict[str, Any]:
            msg = await nc.request(subject, orjson.dumps(body), timeout=10)
            assert msg.headers and msg.headers.get("Nats-Service-Error-Code"), msg.data
            found: dict[str, Any] = orjson.loads(msg.data)["error"]
            return found

        unlisted = await error({"target": "no-such-host"})
        assert (unlisted["code"], unlisted["message"]) == (
            "not_found",
            "no scheduler lists a live host 'no-such-host': this peer probes only the upload"
            " address of a host the schedulers list",
        )
        for body in (
            {"target": "no-such-host", "url": trap_url},
            {"target": "no-such-host", "address": trap_url},
            {"target": f"127.0.0.1:{port}"},
            {"target": trap_url},
            {"target": host_id(tmp_path / "peer"), "timeout_s": 600},
        ):
            assert (await error(body))["code"] == "bad_request", body
        denied = await error({"target": host_id(tmp_path / "peer-m")})
        assert denied["code"] == "forbidden", denied
        assert denied["message"].startswith("http://169.254.169.254:"), denied
        assert denied["message"].endswith(
            "is not an allowed origin ([origins] deny: cloud metadata)"
        ), denied
    finally:
        await nc.close()
        trap.close()
        assert metadata.stop() == 0, metadata.log()
    assert hits == 0, "nothing was fetched from the address a request named"
