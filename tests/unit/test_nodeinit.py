"""The peer's node init sets containerd's config_path in real config.toml files, only where
it is unset, and leaves every other key as it was."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from swarmfly import nodeinit

CERTS = "/etc/containerd/certs.d"
V2 = 'plugins."io.containerd.grpc.v1.cri".registry'
V3 = 'plugins."io.containerd.cri.v1.images".registry'

# What `containerd config default` writes for 1.7 (cut down): config_path empty.
V2_DEFAULT = """\
version = 2
root = "/var/lib/containerd"

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "registry.k8s.io/pause:3.8"
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "overlayfs"
    [plugins."io.containerd.grpc.v1.cri".registry]
      config_path = ""

      [plugins."io.containerd.grpc.v1.cri".registry.auths]

      [plugins."io.containerd.grpc.v1.cri".registry.configs]
"""

V2_NO_REGISTRY = """\
version = 2

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
  SystemdCgroup = true
"""

V3_DEFAULT = """\
version = 3

[plugins]
  [plugins.'io.containerd.cri.v1.images']
    snapshotter = 'overlayfs'

    [plugins.'io.containerd.cri.v1.images'.registry]
      # where hosts.toml files live
"""


def run(tmp_path: Path, text: str | None, *extra: str) -> tuple[int, str, Path]:
    """`python -m swarmfly.nodeinit` over tmp_path/config.toml, as the init container runs
    it: its exit status, what it printed, and the file."""
    config = tmp_path / "config.toml"
    if text is not None:
        config.write_text(text)
        config.chmod(0o640)
    done = subprocess.run(
        [
            *(sys.executable, "-m", "swarmfly.nodeinit", "--config", str(config)),
            *("--certs-dir", CERTS, "--changed-file", str(tmp_path / "changed"), *extra),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.returncode, done.stdout + done.stderr, config


def registry(config: Path, plugin: str) -> object:
    node: object = tomllib.loads(config.read_text())
    for key in ("plugins", plugin, "registry"):
        assert isinstance(node, dict), node
        node = node[key]
    return node


def test_no_config_is_not_created(tmp_path: Path) -> None:
    status, out, config = run(tmp_path, None)
    assert status == 0
    assert "no config.toml" in out and "not created" in out and CERTS in out
    assert not config.exists() and not (tmp_path / "changed").exists()


def test_v2_without_config_path_gets_it_and_nothing_else_changes(tmp_path: Path) -> None:
    status, out, config = run(tmp_path, V2_DEFAULT)
    assert status == 0, out
    assert f'set config_path = "{CERTS}" under [{V2}]' in out
    before, after = tomllib.loads(V2_DEFAULT), tomllib.loads(config.read_text())
    assert after["plugins"]["io.containerd.grpc.v1.cri"]["registry"]["config_path"] == CERTS
    after["plugins"]["io.containerd.grpc.v1.cri"]["registry"]["config_path"] = ""
    assert after == before
    # One line changed, in place; the file keeps its mode; the restart step is told.
    changed = [
        (a, b)
        for a, b in zip(V2_DEFAULT.splitlines(), config.read_text().splitlines(), strict=True)
        if a != b
    ]
    assert changed == [('      config_path = ""', f'      config_path = "{CERTS}"')]
    assert config.stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "changed").exists()
    assert not list(tmp_path.glob("*.swarmfly")), "no temporary file left"


def test_v2_without_a_registry_table_gets_one(tmp_path: Path) -> None:
    status, out, config = run(tmp_path, V2_NO_REGISTRY)
    assert status == 0, out
    assert registry(config, "io.containerd.grpc.v1.cri") == {"config_path": CERTS}
    runc = tomllib.loads(config.read_text())["plugins"]["io.containerd.grpc.v1.cri"]
    assert runc["containerd"]["runtimes"]["runc"]["options"] == {"SystemdCgroup": True}
    assert config.read_text().startswith(V2_NO_REGISTRY)


def test_v2_with_another_config_path_is_not_clobbered(tmp_path: Path) -> None:
    text = V2_DEFAULT.replace('config_path = ""', 'config_path = "/etc/containerd/registry.d"')
    status, out, config = run(tmp_path, text)
    assert status == 0
    assert "warning:" in out and 'config_path = "/etc/containerd/registry.d"' in out
    assert "peer.containerd.certsDir" in out
    assert config.read_text() == text and not (tmp_path / "changed").exists()


def test_v2_with_mirrors_is_left_alone(tmp_path: Path) -> None:
    """containerd refuses config_path beside registry.mirrors: adding it would stop it."""
    text = V2_NO_REGISTRY + (
        f'\n[{V2}.mirrors."docker.io"]\n  endpoint = ["https://mirror.example.com"]\n'
    )
    status, out, config = run(tmp_path, text)
    assert status == 0
    assert "warning:" in out and "mirrors" in out
    assert config.read_text() == text


def test_v3_gets_the_images_plugins_config_path(tmp_path: Path) -> None:
    status, out, config = run(tmp_path, V3_DEFAULT)
    assert status == 0, out
    assert f"under [{V3}]" in out
    assert registry(config, "io.containerd.cri.v1.images") == {"config_path": CERTS}
    assert "io.containerd.grpc.v1.cri" not in config.read_text()
    text = config.read_text()
    assert text.index("config_path") > text.index(".registry]"), "inside its table"


@pytest.mark.parametrize(
    "config_path", [CERTS, CERTS + "/", f"{CERTS}:/etc/docker/certs.d", "/x:" + CERTS]
)
def test_already_set_is_no_change(tmp_path: Path, config_path: str) -> None:
    text = V2_DEFAULT.replace('config_path = ""', f'config_path = "{config_path}"')
    status, out, config = run(tmp_path, text)
    assert status == 0
    assert "already: no change" in out and "warning" not in out
    assert config.read_text() == text and not (tmp_path / "changed").exists()


def test_a_second_run_changes_nothing(tmp_path: Path) -> None:
    run(tmp_path, V3_DEFAULT)
    (tmp_path / "changed").unlink()
    once = (tmp_path / "config.toml").read_text()
    status, out, config = run(tmp_path, once)
    assert status == 0 and "already" in out
    assert config.read_text() == once and not (tmp_path / "changed").exists()


def test_version_1_uses_the_short_plugin_name(tmp_path: Path) -> None:
    status, out, config = run(tmp_path, '[plugins.cri]\n  sandbox_image = "pause"\n')
    assert status == 0, out
    assert registry(config, "cri") == {"config_path": CERTS}


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("version = 2\n[plugins\n", "not valid TOML"),
        ("version = 4\n", "version = 4"),
        ("version = true\n", "version = True"),
        (f"version = 2\n[{V2.rsplit('.', 1)[0]}]\n  registry = 1\n", "is not a table"),
        # The registry table made by dotted keys: a [..registry] header would be a second
        # definition, so the edit is refused rather than written.
        (
            f"version = 2\n[{V2.rsplit('.', 1)[0]}]\n  registry.configs = {{}}\n",
            "by hand",
        ),
    ],
)
def test_what_it_cannot_edit_it_leaves_as_it_is(tmp_path: Path, text: str, says: str) -> None:
    status, out, config = run(tmp_path, text)
    assert status == 0
    assert "warning:" in out and says in out
    assert config.read_text() == text


def test_an_unreadable_config_fails_the_init(tmp_path: Path) -> None:
    (tmp_path / "config.toml").mkdir()
    status, out, _ = run(tmp_path, None)
    assert status == 1 and "cannot read" in out


def test_plan_is_pure() -> None:
    decided = nodeinit.plan(V2_DEFAULT, "/srv/certs.d")
    assert decided.verdict is nodeinit.Verdict.ADDED and decided.text
    assert 'config_path = "/srv/certs.d"' in decided.text
    assert nodeinit.plan(decided.text, "/srv/certs.d").verdict is nodeinit.Verdict.ALREADY_SET
