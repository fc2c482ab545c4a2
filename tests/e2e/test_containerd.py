"""A real containerd (Debian's 1.6) on a node set up by swarmfly's node init: the chart's
``hosts.toml`` and ``python -m swarmfly.nodeinit`` over a config.toml as a node has it, then
``swarmfly doctor`` and real pulls with ``ctr``. Upstream is Debian's docker-registry with
alice's Basic credentials, the image pushed with skopeo; the swarm is a scheduler, a storage
and one peer (its proxy is the mirror), each its own process.

Each containerd runs as root on its own ``--root``, ``--state`` and socket, with the CRI
plugin on: the CRI plugin is what reads ``config_path`` (and refuses it beside
``registry.mirrors``), so its loading, and the registry configuration it logs, prove that
containerd took the file node init wrote. ``ctr images pull --hosts-dir`` resolves through
the same ``hosts.toml`` code as the CRI plugin does (no CRI client is packaged in Debian).
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest

from swarmfly.doctor import EXIT_PROBLEMS
from swarmfly.natsserver import NatsServer
from swarmfly.testing import ServiceProcess, metric_value, spawn_service
from tests.conftest import FAST_ENV, require_tool
from tests.e2e.conftest import (
    ALICE,
    ALICE_PASSWORD,
    Registry,
    free_port,
    run_htpasswd_registry,
    stop_process,
)
from tests.e2e.test_mirror import Layout, build_layout, skopeo
from tests.integration.test_doctor import by_name, doctor

MiB = 1024 * 1024
NAME = "team/app"
TAG = "v1"
SIZES = (3 * MiB + 5, MiB + 3)
"""Two layers: more than one piece and less, enough to see who read them."""
START_TIMEOUT = 20.0
CTR_TIMEOUT = 60.0
CHART_SCRIPT = Path(__file__).parents[2] / "helm/swarmfly/templates/containerd-configmap.yaml"
CRI = 'plugins."io.containerd.grpc.v1.cri"'
PLUGINS = {1: ("opt", "cri"), 2: ('"io.containerd.internal.v1.opt"', '"io.containerd.grpc.v1.cri"')}
"""The opt and CRI plugins' keys in config.toml, by its version."""

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(120)]


def node_config(root: Path, version: int = 2) -> str:
    """config.toml as a node has it before node init (``containerd config default`` cut
    down: config_path empty), plus what lets it run beside the host's own: the native
    snapshotter (overlayfs may not nest) and its ``/opt`` under ``root``. Version 1 is the
    file without a ``version`` line, with the plugins' short names."""
    opt, cri = PLUGINS[version]
    return ("version = 2\n\n" if version == 2 else "") + textwrap.dedent(f"""\
            [plugins]
              [plugins.{opt}]
                path = "{root / "opt"}"
              [plugins.{cri}]
                sandbox_image = "registry.k8s.io/pause:3.6"
                [plugins.{cri}.containerd]
                  snapshotter = "native"
                [plugins.{cri}.registry]
                  config_path = ""
            """)


def chart_hosts_toml(server: str, proxy_port: int) -> str:
    """The hosts.toml the chart's containerd init container writes (its heredoc, with the
    values a release would put in)."""
    template = CHART_SCRIPT.read_text()
    found = re.search(r'cat > "\$dir/hosts\.toml\.swarmfly" <<EOF\n(.*?\n)\s*EOF\n', template, re.S)
    assert found, f"no hosts.toml heredoc in {CHART_SCRIPT}"
    text = textwrap.dedent(found.group(1))
    text = text.replace("{{ .Values.peer.proxy.port }}", str(proxy_port)).replace(
        '"$2"', f'"{server}"'
    )
    text = text.replace("$1", server.removeprefix("http://"))
    assert "{{" not in text and "$" not in text, text
    return text


def node_init(etc: Path, registry: Registry, proxy_port: int) -> tuple[Path, Path]:
    """What the chart's init container does on a node: a hosts.toml for the registry, then
    ``python -m swarmfly.nodeinit`` sets config_path. Returns config.toml and certs.d."""
    certs = etc / "certs.d"
    (certs / registry.host).mkdir(parents=True)
    (certs / registry.host / "hosts.toml").write_text(chart_hosts_toml(registry.url, proxy_port))
    config = etc / "config.toml"
    done = subprocess.run(
        [
            *(sys.executable, "-m", "swarmfly.nodeinit", "--config", str(config)),
            *("--certs-dir", str(certs), "--changed-file", str(etc / "changed")),
        ],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f'set config_path = "{certs}"' in done.stdout, done.stdout
    assert (etc / "changed").exists(), "the chart would restart containerd"
    return config, certs


# -- containerd ------------------------------------------------------------------------------


@dataclass
class Containerd:
    """A running containerd: its socket, its log, and ``ctr`` against it."""

    address: Path
    log_path: Path
    process: asyncio.subprocess.Process

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def ctr(self, *args: str, namespace: str = "default") -> subprocess.CompletedProcess[str]:
        command = [require_tool("ctr"), "--address", str(self.address), "-n", namespace, *args]
        return await asyncio.to_thread(
            subprocess.run,
            command,
            capture_output=True,
            text=True,
            timeout=CTR_TIMEOUT,
            check=False,
        )

    async def images(self, namespace: str = "default") -> list[str]:
        listed = await self.ctr("images", "ls", "-q", namespace=namespace)
        assert listed.returncode == 0, listed.stderr
        return listed.stdout.split()

    async def cri_plugin(self) -> str:
        """The CRI plugin's status in ``ctr plugins ls`` (ok, error, skip)."""
        listed = await self.ctr("plugins", "ls")
        assert listed.returncode == 0, listed.stderr
        for line in listed.stdout.splitlines():
            fields = line.split()
            if fields[:2] == ["io.containerd.grpc.v1", "cri"]:
                return fields[-1]
        raise AssertionError(f"no CRI plugin listed:\n{listed.stdout}")

    def registry_config(self) -> str:
        """The registry configuration the CRI plugin logged when it started."""
        found = re.search(r"Registry:\{ConfigPath:([^ ]*) ", self.log())
        assert found, f"the CRI plugin logged no configuration:\n{self.log()[-3000:]}"
        return found.group(1)


def require_root() -> None:
    if os.geteuid() == 0:
        return
    if os.environ.get("SWARMFLY_REQUIRE_E2E") == "1":
        pytest.fail("containerd runs as root (SWARMFLY_REQUIRE_E2E=1)")
    pytest.skip("containerd runs as root")


@asynccontextmanager
async def run_containerd(folder: Path, config: Path) -> AsyncIterator[Containerd]:
    """containerd with ``config`` on its own root, state and socket under ``folder``, once
    ``ctr version`` answers; stopped (its PID only) afterwards."""
    binary, ctr = require_tool("containerd"), require_tool("ctr")
    require_root()
    folder.mkdir(parents=True, exist_ok=True)
    address = folder / "containerd.sock"
    log_path = folder / "containerd.log"
    with open(log_path, "ab") as log:
        process = await asyncio.create_subprocess_exec(
            binary, "--config", str(config), "--root", str(folder / "root"),
            "--state", str(folder / "state"), "--address", str(address),
            stdout=log, stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
    daemon = Containerd(address, log_path, process)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while process.returncode is None and time.monotonic() < deadline:
            if address.exists():
                answer = await asyncio.to_thread(
                    subprocess.run, [ctr, "--address", str(address), "version"],
                    capture_output=True, timeout=5, check=False,
                )  # fmt: skip
                if answer.returncode == 0:
                    break
            await asyncio.sleep(0.1)
        else:
            pytest.fail(f"containerd did not start; its log:\n{daemon.log()[-4000:]}")
        yield daemon
    finally:
        await stop_process(process)


# -- the swarm and the registry, once for the module ------------------------------------------


@dataclass(frozen=True)
class Swarm:
    registry: Registry
    layout: Layout
    peer: ServiceProcess
    prefix: str
    nats: NatsServer
    state: Path
    """The peer's state dir: the doctor's ``--state-dir`` on this host."""

    @property
    def proxy_port(self) -> int:
        return int(self.peer.proxy_url.rsplit(":", 1)[1])

    def doctor_flags(self, config: Path) -> list[str]:
        """The cluster's and this node's: containerd's config.toml; no other runtime."""
        absent = config.parent / "absent"
        return [
            "--nats", self.nats.url, "--prefix", self.prefix, "--state-dir", str(self.state),
            "--containerd-config", str(config),
            "--crio-config", str(absent / "registries.conf"), "--crio-dir", str(absent / "crio"),
            "--docker-config", str(absent / "daemon.json"),
            "--k3s-config", str(absent / "registries.yaml"),
        ]  # fmt: skip

    @property
    def reference(self) -> str:
        return f"{self.registry.host}/{NAME}:{TAG}"


@pytest.fixture(scope="module")
async def swarm(nats: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Swarm]:
    for tool in ("containerd", "ctr"):  # before a swarm is started for nothing
        require_tool(tool)
    require_root()
    root = tmp_path_factory.mktemp("containerd-swarm")
    prefix = f"t{os.urandom(6).hex()}"
    async with run_htpasswd_registry(root / "registry") as registry:
        layout = build_layout(root / "layout", SIZES)
        pushed = await asyncio.to_thread(
            skopeo, "copy", "--dest-tls-verify=false", "--dest-creds", f"{ALICE}:{ALICE_PASSWORD}",
            f"oci:{layout.path}:{TAG}", f"docker://{registry.host}/{NAME}:{TAG}",
        )  # fmt: skip
        assert pushed.returncode == 0, pushed.stderr
        with services(nats, prefix, root, registry) as peer:
            yield Swarm(registry, layout, peer, prefix, nats, root / "peer")


@contextmanager
def services(
    nats: NatsServer, prefix: str, root: Path, registry: Registry
) -> Iterator[ServiceProcess]:
    """Scheduler, storage and a peer whose proxy mirrors ``registry``: the peer."""
    started: list[ServiceProcess] = []
    try:
        for kind, extra in (
            ("scheduler", ()),
            ("storage", ("--listen", "127.0.0.1")),
            ("peer", ("--listen", "127.0.0.1", "--proxy-port", "0", "--registry", registry.url)),
        ):
            started.append(
                spawn_service(kind, nats.url, root / kind, "--prefix", prefix, *extra, env=FAST_ENV)
            )
        assert started[-1].proxy_url, started[-1].banner
        yield started[-1]
    finally:
        for process in reversed(started):
            process.stop()


def ctr_pull(swarm: Swarm, certs: Path) -> list[str]:
    """``ctr images pull`` of the pushed image as a node pulls it: hosts.toml from ``certs``,
    alice's credentials (containerd offers them to whichever host asks, the mirror too)."""
    return [
        "images", "pull", "--hosts-dir", str(certs), "--user", f"{ALICE}:{ALICE_PASSWORD}",
        "--snapshotter", "native", "--platform", "linux/amd64", swarm.reference,
    ]  # fmt: skip


_BLOB_READ = re.compile(
    r'"GET /v2/[^ ]+/blobs/(sha256:[0-9a-f]{64}) HTTP/1\.1" (?:200|206) (\d+) "[^"]*" "([^"]*)"'
)
SWARM_AGENT = "aiohttp/"
"""How the peers' requests name themselves; containerd's say ``containerd/1.6…``."""


def blob_reads(registry: Registry) -> list[tuple[str, int, str]]:
    """Each successful blob GET in the registry's access log: digest, bytes sent, who asked."""
    return [(m[1], int(m[2]), m[3]) for m in _BLOB_READ.finditer(registry.log())]


def assert_read_once_each(layout: Layout, reads: list[tuple[str, int, str]]) -> None:
    """``reads`` sent each blob of the image once (the seed's one-byte probe aside), all to
    the swarm's peers."""
    assert {agent for _, _, agent in reads if SWARM_AGENT not in agent} == set(), reads
    for name, data in layout.blobs.items():
        if name != layout.manifest_digest:
            total = sum(sent for digest, sent, _ in reads if digest == name)
            assert len(data) <= total <= len(data) + 1, (name[:19], total, len(data))


# -- the tests -------------------------------------------------------------------------------


async def test_after_node_init_doctor_is_healthy_and_containerd_pulls_through_the_mirror(
    swarm: Swarm, tmp_path: Path
) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "config.toml").write_text(node_config(tmp_path))
    config, certs = node_init(etc, swarm.registry, swarm.proxy_port)
    async with run_containerd(tmp_path / "node-a", config) as node:
        assert await node.cri_plugin() == "ok", node.log()[-3000:]
        assert node.registry_config() == str(certs), "containerd read node init's config_path"

        code, out, err = await doctor(*swarm.doctor_flags(config), "--json")
        assert (code, err) == (0, ""), out
        report = orjson.loads(out)
        checks = by_name(report)
        assert report["ok"] is True and report["verdict"].startswith("healthy"), report
        assert checks["containerd"] == {
            "name": "containerd",
            "status": "ok",
            "message": f"config_path {certs}: the mirror serves {swarm.registry.host}",
            "details": {"config_path": str(certs), "registries": [swarm.registry.host]},
        }
        assert {n: c["status"] for n, c in checks.items()} == {
            "containerd": "ok", "cri-o": "skip", "docker": "skip", "k3s": "skip",
            "proxy-env": "skip", "mirror": "ok", "nats": "ok", "scheduler": "ok",
            "upload": "ok", "reach": "skip", "probe": "skip",
        }  # fmt: skip

        through = 'swarmfly_proxy_requests_total{kind="blob"}'
        before = await metric_value(swarm.peer.proxy_url, through)
        read_before = len(blob_reads(swarm.registry))
        pulled = await node.ctr(*ctr_pull(swarm, certs))
        assert pulled.returncode == 0, pulled.stderr + node.log()[-2000:]
        assert await node.images() == [swarm.reference]
        blobs = len(swarm.layout.blobs) - 1  # config and layers: the manifest is passed through
        assert await metric_value(swarm.peer.proxy_url, through) - before == blobs
        assert_read_once_each(swarm.layout, blob_reads(swarm.registry)[read_before:])

    # A second node pulls the same image: the mirror serves it from the swarm, and the
    # registry has still sent each blob once.
    async with run_containerd(tmp_path / "node-b", config) as other:
        pulled = await other.ctr(*ctr_pull(swarm, certs))
        assert pulled.returncode == 0, pulled.stderr
        assert await other.images() == [swarm.reference]
    assert await metric_value(swarm.peer.proxy_url, through) - before == 2 * blobs
    assert_read_once_each(swarm.layout, blob_reads(swarm.registry)[read_before:])


async def test_before_node_init_containerd_runs_but_doctor_says_what_to_set(
    swarm: Swarm, tmp_path: Path
) -> None:
    """The classic mistake: the chart's hosts.toml is there, config_path is not set (node
    init not run, or the file edited back). containerd starts happily and reads no
    hosts.toml; the doctor fails containerd and says what to set."""
    etc = tmp_path / "etc"
    (etc / "certs.d" / swarm.registry.host).mkdir(parents=True)
    hosts = etc / "certs.d" / swarm.registry.host / "hosts.toml"
    hosts.write_text(chart_hosts_toml(swarm.registry.url, swarm.proxy_port))
    config = etc / "config.toml"
    config.write_text(node_config(tmp_path))
    async with run_containerd(tmp_path / "node", config) as node:
        assert await node.cri_plugin() == "ok", node.log()[-3000:]
        assert node.registry_config() == "", "containerd reads no hosts.toml"

        code, out, err = await doctor(*swarm.doctor_flags(config), "--json")
        assert (code, err) == (EXIT_PROBLEMS, ""), out
        report = orjson.loads(out)
        checks = by_name(report)
        message = (
            f"{config}: config_path is not set in [{CRI}.registry], so containerd reads no"
            ' hosts.toml and pulls bypass the mirror; set config_path = "/etc/containerd/certs.d"'
        )
        assert report["ok"] is False
        assert report["verdict"] == "problems: containerd, runtimes failed (4 checks ok)"
        assert checks["containerd"] == {
            "name": "containerd", "status": "fail", "message": message, "details": {}
        }  # fmt: skip
        assert checks["runtimes"]["message"] == (
            "no runtime here pulls through the mirror (containerd)"
        )

        code, out, err = await doctor(*swarm.doctor_flags(config))
        assert (code, err) == (EXIT_PROBLEMS, "")
        lines = out.splitlines()
        assert lines[0] == f"fail  containerd  {message}", out
        assert lines[-1] == "verdict: problems: containerd, runtimes failed (4 checks ok)"


async def test_a_hosts_toml_naming_a_dead_mirror_port_is_found_though_pulls_still_work(
    swarm: Swarm, tmp_path: Path
) -> None:
    """hosts.toml names a port nothing listens on (the chart's proxy port is not the
    peer's): containerd falls back to the registry, so pulls work and bypass the swarm. The
    doctor names the mirror that does not answer, and, left to find this host's proxy
    itself, says no hosts.toml names it."""
    dead = free_port()
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "config.toml").write_text(node_config(tmp_path))
    config, certs = node_init(etc, swarm.registry, dead)
    async with run_containerd(tmp_path / "node", config) as node:
        assert node.registry_config() == str(certs)

        flags = swarm.doctor_flags(config)
        code, out, err = await doctor(*flags, "--mirror", f"http://127.0.0.1:{dead}", "--json")
        assert (code, err) == (EXIT_PROBLEMS, ""), out
        report = orjson.loads(out)
        checks = by_name(report)
        assert checks["mirror"] == {
            "name": "mirror",
            "status": "fail",
            "message": f"cannot connect to 127.0.0.1:{dead}: Connection refused",
            "details": {},
        }
        assert checks["containerd"]["status"] == "ok", "hosts.toml does name that mirror"
        assert report["verdict"].startswith("problems: mirror failed"), report["verdict"]

        code, out, _ = await doctor(*flags)
        assert code == EXIT_PROBLEMS
        assert (
            f"fail  containerd  no hosts.toml under {certs} names the mirror"
            f' {swarm.peer.proxy_url} (add [host."{swarm.peer.proxy_url}"] to'
            f" {certs}/_default/hosts.toml)"
        ) in out.splitlines(), out

        read_before = len(blob_reads(swarm.registry))
        pulled = await node.ctr(*ctr_pull(swarm, certs))
        assert pulled.returncode == 0, pulled.stderr
        assert await node.images() == [swarm.reference]
        agents = {agent for _, _, agent in blob_reads(swarm.registry)[read_before:]}
        assert agents and all(a.startswith("containerd/") for a in agents), agents


async def test_a_version_1_config_is_read_by_node_init_containerd_and_the_doctor_alike(
    swarm: Swarm, tmp_path: Path
) -> None:
    """A config.toml without ``version`` is version 1 (``plugins.cri``) to containerd 1.x:
    node init sets config_path there, containerd reads it, and the doctor finds it."""
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "config.toml").write_text(node_config(tmp_path, version=1))
    config, certs = node_init(etc, swarm.registry, swarm.proxy_port)
    async with run_containerd(tmp_path / "node", config) as node:
        assert await node.cri_plugin() == "ok", node.log()[-3000:]
        assert node.registry_config() == str(certs)
        code, out, err = await doctor(*swarm.doctor_flags(config), "--json")
    assert (code, err) == (0, ""), out
    assert by_name(orjson.loads(out))["containerd"]["message"] == (
        f"config_path {certs}: the mirror serves {swarm.registry.host}"
    )


async def test_mirrors_beside_config_path_stop_the_cri_plugin_and_the_doctor_says_so(
    swarm: Swarm, tmp_path: Path
) -> None:
    """``registry.mirrors`` added beside node init's config_path (by hand, or an older
    guide): containerd runs, but its CRI plugin refuses to load, so no pod could start."""
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "config.toml").write_text(node_config(tmp_path))
    config, certs = node_init(etc, swarm.registry, swarm.proxy_port)
    with config.open("a") as extra:
        extra.write(
            f'\n[{CRI}.registry.mirrors."docker.io"]\n  endpoint = ["{swarm.peer.proxy_url}"]\n'
        )
    async with run_containerd(tmp_path / "node", config) as node:
        assert await node.cri_plugin() == "error"
        assert "`mirrors` cannot be set when `config_path` is provided" in node.log()
        code, out, err = await doctor(*swarm.doctor_flags(config))
    assert (code, err) == (EXIT_PROBLEMS, ""), out
    assert out.splitlines()[0] == (
        f"fail  containerd  {config}: [{CRI}.registry.mirrors] is set beside config_path, which"
        " containerd's CRI plugin refuses: it does not load, and no pod starts; move the"
        f" mirrors to hosts.toml files under {certs}"
    ), out
