"""The plugin API as a plugin author and an operator meet it: a third-party package found
through its entry point, broken plugins skipped by name, sources held to the conformance kit."""

from __future__ import annotations

import ast
import inspect
import os
import random
import shutil
import sys
import tomllib
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from types import ModuleType

import orjson
import pytest

from swarmfly.errors import SwarmflyError
from swarmfly.natsserver import NatsServer
from swarmfly.pluginhost import Plugins
from swarmfly.plugins import (
    EvaluatorRegistry,
    SourceRegistry,
    SourceStat,
    StrategyRegistry,
    hookimpl,
    hookspecs,
)
from swarmfly.plugins.sources.http import HttpSource
from swarmfly.testing import Origin, check_source, spawn_service
from tests.conftest import FAST_ENV, swarmfly

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "swarmfly-file"
MiB = 1024 * 1024


def install_metadata(
    site: Path, name: str, module: str, source: str, group: str = "swarmfly"
) -> None:
    """Put a distribution on ``site`` as pip would: the module and its dist-info."""
    (site / f"{module}.py").write_text(source)
    info = site / f"{name.replace('-', '_')}-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(f"[{group}]\n{name} = {module}\n")


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A folder on PYTHONPATH holding the example plugin as an installed distribution."""
    folder = tmp_path / "site"
    folder.mkdir()
    shutil.copytree(EXAMPLE / "swarmfly_file", folder / "swarmfly_file")
    info = folder / "swarmfly_file-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: swarmfly-file\nVersion: 0.1.0\n")
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    points = project["entry-points"]["swarmfly"]
    lines = "".join(f"{name} = {value}\n" for name, value in points.items())
    (info / "entry_points.txt").write_text("[swarmfly]\n" + lines)
    return folder


def env_with(site: Path, **extra: str) -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH", "")]))
    return {**FAST_ENV, "PYTHONPATH": path, **extra}


def test_every_hook_is_documented_and_exercised() -> None:
    hooks = [name for name in dir(hookspecs) if name.startswith("swarmfly_")]
    assert len(hooks) == 4
    docs = (ROOT / "docs" / "plugins.md").read_text()
    here = ast.parse(Path(__file__).read_text())
    example = ast.parse((EXAMPLE / "swarmfly_file" / "__init__.py").read_text())
    implemented = {
        node.name
        for tree in (here, example)
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef)
    }
    for hook in hooks:
        function = getattr(hookspecs, hook)
        arguments = ", ".join(a for a in inspect.signature(function).parameters if a != "settings")
        assert f"`{hook}({arguments})`" in docs, f"{hook} is not documented in docs/plugins.md"
        assert hook in implemented, f"no test plugin here implements {hook}"
        assert function.__doc__ and "Called" in function.__doc__
        assert "return" in function.__annotations__, f"{hook} is not typed"
        for name in inspect.signature(function).parameters:
            assert function.__annotations__.get(name), f"{hook}: {name} is not typed"


def test_builtins_are_loaded_through_the_entry_point_group() -> None:
    plugins = Plugins.load()
    names = {info.name for info in plugins.infos}
    assert {"http", "oci", "strategies", "evaluators"} <= names
    assert {"http", "https", "oci", "oci+http"} <= set(plugins.sources)
    assert {"rarest-first", "sequential", "random"} <= set(plugins.strategies)
    assert {"default", "least-loaded"} <= set(plugins.evaluators)
    assert all(info.error is None for info in plugins.infos)


async def test_the_example_plugin_downloads_file_urls_through_a_swarm(
    site: Path, nats: NatsServer, prefix: str, tmp_path: Path
) -> None:
    env = env_with(site)
    code, out, err = await swarmfly("plugins", "--json", env=env)
    assert code == 0, err
    listed = {row["name"]: row for row in orjson.loads(out)}
    assert listed["file"]["provides"] == ["file"]
    assert listed["file"]["version"] == "0.1.0"

    data = os.urandom(6 * MiB + 7)
    origin = tmp_path / "shared" / "model.bin"
    origin.parent.mkdir()
    origin.write_bytes(data)
    services = [
        spawn_service(kind, nats.url, tmp_path / kind, "--prefix", prefix, env=env)
        for kind in ("scheduler", "storage", "peer")
    ]
    try:
        out_path = tmp_path / "model.bin"
        code, out, err = await swarmfly(
            "get", f"file://{origin}", "-O", str(out_path), "--json",
            "--state-dir", str(tmp_path / "peer"), "--nats", nats.url, "--prefix", prefix,
            env=env,
        )  # fmt: skip
        assert code == 0, err
        summary = orjson.loads(out)
        assert summary["via"] == "peer"
        assert summary["bytes_p2p"] == len(data), "the storage read the file, the peer the swarm"
        assert out_path.read_bytes() == data
    finally:
        for service in services:
            service.stop()


async def test_every_builtin_source_and_the_example_pass_the_conformance_kit(
    tmp_path: Path,
) -> None:
    sys.path.insert(0, str(EXAMPLE))
    try:
        from swarmfly_file import FileSource
    finally:
        sys.path.remove(str(EXAMPLE))
    data = os.urandom(2 * MiB + 3)
    (tmp_path / "f").write_bytes(data)
    await check_source(
        FileSource(), f"file://{tmp_path}/f", data, missing_url=f"file://{tmp_path}/x"
    )
    await check_source(
        FileSource([str(tmp_path)]), f"file://{tmp_path}/f", data,
        missing_url=f"file://{tmp_path}/x",
    )  # fmt: skip
    for ranges in (True, False):
        async with Origin(ranges=ranges).serve() as origin:
            url = origin.add("f", data)
            source = HttpSource()
            try:
                await check_source(source, url, data, missing_url=f"{origin.url}/missing")
            finally:
                await source.close()


async def test_a_plugin_takes_its_settings_from_its_table_checked(
    site: Path, tmp_path: Path
) -> None:
    """``[plugins.file] roots`` reaches the example's source; a wrong type or an unknown key
    is reported by plugin and key, and the plugin is not loaded; a table for a plugin that
    is not installed is warned about."""
    shared, private = tmp_path / "shared", tmp_path / "private"
    for folder in (shared, private):
        folder.mkdir()
        (folder / "f.bin").write_bytes(b"data " * 1000)
    config = tmp_path / "swarmfly.toml"
    env = env_with(site, SWARMFLY_CONFIG=str(config))

    config.write_text(f'[plugins.file]\nroots = ["{shared}"]\n')
    state = ("--state-dir", str(tmp_path / "s"))
    code, _, err = await swarmfly(
        "get", f"file://{shared}/f.bin", "-O", str(tmp_path / "ok"), *state, env=env
    )
    assert code == 0, err
    assert (tmp_path / "ok").read_bytes() == b"data " * 1000
    code, _, err = await swarmfly(
        "get", f"file://{private}/f.bin", "-O", str(tmp_path / "no"), *state, env=env
    )
    assert code != 0
    assert "outside [plugins.file] roots" in err
    assert not (tmp_path / "no").exists()

    for table, words in (
        ('roots = "/mnt"', "[plugins.file] roots: expected a list of strings, got '/mnt'"),
        ("root = []", "[plugins.file] root: unknown setting (did you mean roots?)"),
    ):
        config.write_text(f"[plugins.file]\n{table}\n")
        code, out, err = await swarmfly("plugins", "--json", env=env)
        assert code == 0, err
        row = {r["name"]: r for r in orjson.loads(out)}["file"]
        assert words in row["error"] and row["provides"] == []

    config.write_text("[plugins.nothing]\nx = 1\n[plugins.http]\nx = 1\n")
    code, out, err = await swarmfly("plugins", "--json", env=env)
    assert code == 0, err
    rows = {r["name"]: r for r in orjson.loads(out)}
    assert "[plugins.http]: this plugin takes no settings" in rows["http"]["error"]
    assert "[plugins.nothing]: no plugin of that name is loaded" in err


BROKEN = {
    "import-fails": "raise ImportError('this plugin is broken on purpose')\n",
    "hook-raises": (
        "from swarmfly.plugins import hookimpl\n"
        "@hookimpl\n"
        "def swarmfly_register_sources(register):\n"
        "    raise RuntimeError('registration blew up')\n"
    ),
    "steals-http": (
        "from swarmfly.plugins import hookimpl\n"
        "from swarmfly.plugins.sources.http import HttpSource\n"
        "@hookimpl\n"
        "def swarmfly_register_sources(register):\n"
        "    register.add(HttpSource())\n"
    ),
    "misspelt": (
        "from swarmfly.plugins import hookimpl\n"
        "@hookimpl\n"
        "def swarmfly_register_source(register):\n"
        "    pass\n"
    ),
    "wrong-argument": (
        "from swarmfly.plugins import hookimpl\n"
        "@hookimpl\n"
        "def swarmfly_register_sources(registry):\n"
        "    pass\n"
    ),
    "old-evaluator": (
        "from swarmfly.plugins import hookimpl\n"
        "@hookimpl\n"
        "def swarmfly_register_evaluators(register):\n"
        "    register.add('old', lambda parent, child, total, median: 0.0)\n"
    ),
    "old-strategy": (
        "from swarmfly.plugins import hookimpl\n"
        "@hookimpl\n"
        "def swarmfly_register_strategies(register):\n"
        "    register.add('old', lambda view, rng: [])\n"
    ),
}


async def test_broken_plugins_are_reported_by_name_and_skipped(
    tmp_path: Path, origin: Origin
) -> None:
    site = tmp_path / "site"
    site.mkdir()
    for name, source in BROKEN.items():
        install_metadata(site, name, name.replace("-", "_"), source)
    env = env_with(site)
    code, out, err = await swarmfly("plugins", "--json", env=env)
    assert code == 0, err
    rows = {row["name"]: row for row in orjson.loads(out)}
    assert "broken on purpose" in rows["import-fails"]["error"]
    assert "blew up" in rows["hook-raises"]["error"]
    assert "already served" in rows["steals-http"]["error"]
    assert "unknown hook 'swarmfly_register_source'" in rows["misspelt"]["error"]
    assert "{'registry'} are declared in the hookimpl" in rows["wrong-argument"]["error"]
    assert "evaluator 'old' must take (parent, evaluation)" in rows["old-evaluator"]["error"]
    assert "strategy 'old' must take (view)" in rows["old-strategy"]["error"]
    assert rows["http"]["error"] is None

    data = os.urandom(MiB)
    url = origin.add("ok.bin", data)
    code, out, err = await swarmfly(
        "get", url, "-O", str(tmp_path / "ok.bin"), "--state-dir", str(tmp_path / "s"), env=env
    )
    assert code == 0, err
    assert (tmp_path / "ok.bin").read_bytes() == data


async def test_disabled_plugins_are_not_loaded(tmp_path: Path, origin: Origin) -> None:
    url = origin.add("f.bin", b"data")
    env = {**FAST_ENV, "SWARMFLY_DISABLE_PLUGINS": "http"}
    code, _, err = await swarmfly(
        "get", url, "-O", str(tmp_path / "f"), "--state-dir", str(tmp_path / "s"), env=env
    )
    assert code == 2, "a usage error"
    assert "no source for scheme 'http'; installed: hf, oci, oci+http, s3" in err
    assert not (tmp_path / "f").exists()


async def test_unknown_strategy_names_the_installed_ones(tmp_path: Path, origin: Origin) -> None:
    url = origin.add("f.bin", b"data")
    code, _, err = await swarmfly(
        "get", url, "-O", str(tmp_path / "f"), "--strategy", "fastest",
        "--state-dir", str(tmp_path / "s"), env=FAST_ENV,
    )  # fmt: skip
    assert code == 2, "a usage error"
    assert "fastest" in err and "rarest-first" in err and "sequential" in err


async def test_sequential_strategy_downloads(tmp_path: Path, origin: Origin) -> None:
    data = os.urandom(9 * MiB)
    url = origin.add("seq.bin", data)
    code, _, err = await swarmfly(
        "get", url, "-O", str(tmp_path / "seq"), "--strategy", "sequential",
        "--state-dir", str(tmp_path / "s"), env=FAST_ENV,
    )  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "seq").read_bytes() == data


async def test_scheduler_takes_a_configured_evaluator(
    nats: NatsServer, prefix: str, tmp_path: Path
) -> None:
    service = spawn_service(
        "scheduler", nats.url, tmp_path / "a", "--prefix", prefix,
        env={**FAST_ENV, "SWARMFLY_SCHEDULER_EVALUATOR": "least-loaded"},
    )  # fmt: skip
    assert service.stop() == 0
    with pytest.raises(RuntimeError, match="unknown evaluator 'nope'; installed: default"):
        spawn_service(
            "scheduler", nats.url, tmp_path / "b", "--prefix", prefix,
            env={**FAST_ENV, "SWARMFLY_SCHEDULER_EVALUATOR": "nope"},
        )  # fmt: skip


class LyingSource:
    """Says 1 MiB, then sends more or fewer bytes than it said."""

    schemes: tuple[str, ...] = ("liar",)

    def __init__(self) -> None:
        self.extra = 0

    async def stat(self, url: str, headers: Mapping[str, str]) -> SourceStat:
        return SourceStat(size=MiB, ranges=True)

    async def fetch(
        self, url: str, headers: Mapping[str, str], start: int = 0, end: int | None = None
    ) -> AsyncIterator[bytes]:
        want = (end if end is not None else MiB) - start
        yield b"x" * (want + (17 if "more" in url else -17))

    async def close(self) -> None:
        return None


def liar_plugin() -> ModuleType:
    module = ModuleType("liar")

    @hookimpl
    def swarmfly_register_sources(register: SourceRegistry) -> None:
        register.add(LyingSource())

    module.swarmfly_register_sources = swarmfly_register_sources  # type: ignore[attr-defined]
    return module


@pytest.mark.parametrize("url", ["liar://x/more", "liar://x/fewer"])
async def test_a_source_with_the_wrong_byte_count_fails_the_piece_not_the_process(
    tmp_path: Path, url: str
) -> None:
    from swarmfly.config import Config
    from swarmfly.content import SourceRequest
    from swarmfly.services.peer.host import HostSettings, PeerHost

    plugins = Plugins.load(extra=[("liar", liar_plugin())])
    settings = HostSettings.of(Config(state_dir=tmp_path), "peer", tmp_path)
    node = PeerHost(settings, None, [], plugins)
    with pytest.raises(SwarmflyError) as caught:
        await node.download(SourceRequest(url))
    assert caught.value.code in ("integrity", "source_error")
    # A download that failed with nothing verified frees its space at once; whatever is
    # left holds nothing past the piece.
    for data in (tmp_path / "tasks").rglob("data"):
        assert data.stat().st_size == MiB, "nothing is written past the piece"
    stored = node.store.tasks
    assert all(not task.done for task in stored.values())
    await node.close()
    await plugins.close()


def test_a_plugin_adds_a_strategy_and_an_evaluator() -> None:
    from swarmfly.services.peer.pieces import PieceBook
    from swarmfly.services.scheduler.core import HostSpec, Scheduler

    module = ModuleType("custom")

    @hookimpl
    def swarmfly_register_strategies(register: StrategyRegistry) -> None:
        register.add("newest-first", lambda view: sorted(view.candidates, reverse=True))

    @hookimpl
    def swarmfly_register_evaluators(register: EvaluatorRegistry) -> None:
        register.add("same-idc", lambda parent, e: float(parent.idc == e.child.idc))

    module.swarmfly_register_strategies = swarmfly_register_strategies  # type: ignore[attr-defined]
    module.swarmfly_register_evaluators = swarmfly_register_evaluators  # type: ignore[attr-defined]
    plugins = Plugins.load(extra=[("custom", module)])
    assert next(i for i in plugins.infos if i.name == "custom").kinds == ["strategy", "evaluator"]

    book = PieceBook(
        8, digests=["0" * 64] * 8, strategy=plugins.strategy("newest-first"), rng=random.Random(0)
    )
    book.update_parent("parent", set(range(8)))
    assert book.assign({"parent": 3}) == [(7, "parent"), (6, "parent"), (5, "parent")]

    core = Scheduler(candidate_parents=1, evaluator=plugins.evaluator("same-idc"))
    task = "ab" * 32
    for name, idc in (("near", "dc1"), ("far", "dc2")):
        core.register(
            task_id=task, peer_id=name, host=HostSpec(name, "127.0.0.1", 1, "seed", idc=idc),
            now=0, seed=True,
        )  # fmt: skip
    schedule, _ = core.register(
        task_id=task, peer_id="child", host=HostSpec("c", "127.0.0.1", 1, "normal", idc="dc1"),
        now=0,
    )  # fmt: skip
    assert [p.peer_id for p in schedule.parents] == ["near"]
