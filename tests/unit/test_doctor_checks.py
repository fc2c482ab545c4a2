"""`swarmfly doctor`'s reading of the runtimes' configuration files, each as it is written on
a host: containerd (both config versions), CRI-O, Docker and k3s, and proxy variables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from swarmfly.doctor import (
    Check,
    Paths,
    Report,
    check_containerd,
    check_crio,
    check_docker,
    check_k3s,
    check_proxy_env,
    crio_installed,
    host_port,
    runtime_checks,
)

MIRROR = "http://127.0.0.1:65001"


CRI_TABLES = {
    1: "plugins.cri.registry",
    2: 'plugins."io.containerd.grpc.v1.cri".registry',
    3: 'plugins."io.containerd.cri.v1.images".registry',
}


def containerd(tmp_path: Path, registry: str, version: int | None = 2) -> Path:
    """config.toml with ``registry`` in its CRI registry table; None: no ``version`` line,
    which containerd reads as version 1."""
    path = tmp_path / "config.toml"
    head = "" if version is None else f"version = {version}\n"
    path.write_text(f"{head}[{CRI_TABLES[version or 1]}]\n{registry}\n")
    return path


def hosts(certs: Path, namespace: str, mirror: str = MIRROR) -> None:
    (certs / namespace).mkdir(parents=True)
    (certs / namespace / "hosts.toml").write_text(
        f'server = "https://registry-1.docker.io"\n[host."{mirror}"]\n'
        '  capabilities = ["pull", "resolve"]\n'
    )


@pytest.mark.parametrize("version", [None, 1, 2, 3])
def test_containerd_with_config_path_and_the_mirror(tmp_path: Path, version: int | None) -> None:
    certs = tmp_path / "certs.d"
    hosts(certs, "docker.io")
    check = check_containerd(containerd(tmp_path, f'config_path = "{certs}"', version), MIRROR)
    assert (check.status, check.message) == (
        "ok",
        f"config_path {certs}: the mirror serves docker.io",
    )


def test_containerd_hosts_toml_naming_another_address_is_a_failure(tmp_path: Path) -> None:
    certs = tmp_path / "certs.d"
    hosts(certs, "_default", "http://127.0.0.1:5000")
    check = check_containerd(containerd(tmp_path, f'config_path = "{certs}"'), MIRROR)
    assert check.status == "fail"
    assert check.message.startswith(f"no hosts.toml under {certs} names the mirror {MIRROR}")


def test_containerd_mirrors_beside_config_path_is_a_failure(tmp_path: Path) -> None:
    """containerd's CRI plugin refuses to load with both (tests/e2e/test_containerd.py)."""
    certs = tmp_path / "certs.d"
    hosts(certs, "_default")
    text = (
        f'config_path = "{certs}"\n[{CRI_TABLES[2]}.mirrors."docker.io"]\nendpoint = ["{MIRROR}"]'
    )
    check = check_containerd(containerd(tmp_path, text), MIRROR)
    assert (check.status, check.message) == (
        "fail",
        f"{tmp_path / 'config.toml'}: [{CRI_TABLES[2]}.mirrors] is set beside config_path, which"
        " containerd's CRI plugin refuses: it does not load, and no pod starts; move the"
        f" mirrors to hosts.toml files under {certs}",
    )


def test_containerd_without_config_path_and_broken_files(tmp_path: Path) -> None:
    check = check_containerd(containerd(tmp_path, ""), MIRROR)
    assert check.status == "fail" and "config_path is not set" in check.message
    (tmp_path / "config.toml").write_text("version = [\n")
    assert check_containerd(tmp_path / "config.toml", MIRROR).status == "fail"
    assert check_containerd(tmp_path / "none.toml", MIRROR).status == "skip"


def test_crio_registries_conf(tmp_path: Path) -> None:
    path = tmp_path / "registries.conf"
    path.write_text(
        '[[registry]]\nprefix = "docker.io"\nlocation = "registry-1.docker.io"\n'
        '[[registry.mirror]]\nlocation = "127.0.0.1:65001"\ninsecure = true\n'
    )
    assert check_crio(path, MIRROR).message.endswith("the mirror serves docker.io")
    path.write_text('unqualified-search-registries = ["docker.io"]\n')
    assert check_crio(path, MIRROR).status == "warn"


SKOPEO_CONF = 'unqualified-search-registries = ["registry.fedoraproject.org", "docker.io"]\n'
"""The registries.conf Debian's containers-common installs with skopeo or podman."""


def test_registries_conf_is_cri_o_only_where_cri_o_is(tmp_path: Path) -> None:
    conf = tmp_path / "registries.conf"
    conf.write_text(SKOPEO_CONF)
    crio_dir, bin_dir = tmp_path / "crio", tmp_path / "bin"
    bin_dir.mkdir()
    absent = tmp_path / "absent"
    paths = Paths(absent / "c.toml", conf, absent / "d.json", absent / "r.yaml", crio_dir)
    path = {"PATH": str(bin_dir)}
    assert not crio_installed(crio_dir, path)
    checks = {c.name: c for c in runtime_checks(paths, MIRROR, path)}
    assert (checks["cri-o"].status, checks["cri-o"].message) == (
        "skip",
        f"CRI-O is not installed (no {crio_dir}, no crio on PATH): {conf} is for podman,"
        " skopeo or buildah",
    )
    assert checks["runtimes"].status == "skip", "no runtime here, so none to fail"

    crio = bin_dir / "crio"  # CRI-O's binary, and nothing else of it
    crio.write_text("#!/bin/sh\n")
    crio.chmod(0o755)
    assert crio_installed(crio_dir, path)
    checks = {c.name: c for c in runtime_checks(paths, MIRROR, path)}
    assert checks["cri-o"].status == "warn"
    assert checks["runtimes"].message == "no runtime here pulls through the mirror (cri-o)"

    crio.unlink()
    (crio_dir / "crio.conf.d").mkdir(parents=True)  # its configuration, and no binary on PATH
    assert crio_installed(crio_dir, path)
    assert check_crio(conf, MIRROR, crio_installed(crio_dir, {})).status == "warn"


def test_docker_daemon_json_and_its_proxy(tmp_path: Path) -> None:
    path = tmp_path / "daemon.json"
    path.write_text(json.dumps({"registry-mirrors": [MIRROR + "/"]}))
    assert check_docker(path, MIRROR).status == "ok"
    proxied = {"registry-mirrors": [MIRROR], "proxies": {"https-proxy": "http://proxy:3128"}}
    path.write_text(json.dumps(proxied))
    check = check_docker(path, MIRROR)
    assert check.status == "fail" and "http://proxy:3128" in check.message
    proxied["proxies"]["no-proxy"] = "localhost,127.0.0.1"
    path.write_text(json.dumps(proxied))
    assert check_docker(path, MIRROR).status == "ok"
    path.write_text("{}")
    assert check_docker(path, MIRROR).status == "warn"


def test_k3s_registries_yaml(tmp_path: Path) -> None:
    path = tmp_path / "registries.yaml"
    path.write_text(f'mirrors:\n  "*":\n    endpoint:\n      - "{MIRROR}"\n')
    assert check_k3s(path, MIRROR).status == "ok"
    path.write_text('mirrors:\n  docker.io:\n    endpoint:\n      - "https://mirror.gcr.io"\n')
    assert check_k3s(path, MIRROR).status == "warn"


def test_proxy_variables() -> None:
    assert check_proxy_env({}, MIRROR).status == "skip"
    assert check_proxy_env({"HTTPS_PROXY": "http://p:3128"}, MIRROR).status == "warn"
    env = {"https_proxy": "http://p:3128", "no_proxy": "example.com,127.0.0.1"}
    assert check_proxy_env(env, MIRROR).status == "ok"
    env = {"HTTP_PROXY": "http://p:3128", "NO_PROXY": ".cluster.local"}
    assert check_proxy_env(env, "http://mirror.cluster.local:65001").status == "ok"


def test_no_runtime_using_the_mirror_is_the_verdict(tmp_path: Path) -> None:
    docker = tmp_path / "daemon.json"
    docker.write_text("{}")
    absent = tmp_path / "absent"
    paths = Paths(absent / "c.toml", absent / "r.conf", docker, absent / "r.yaml")
    checks = {c.name: c for c in runtime_checks(paths, MIRROR, {})}
    assert checks["runtimes"].status == "fail"
    assert checks["runtimes"].message == "no runtime here pulls through the mirror (docker)"
    nothing = Paths(absent / "c.toml", absent / "r.conf", absent / "d.json", absent / "r.yaml")
    assert {c.name: c.status for c in runtime_checks(nothing, MIRROR, {})}["runtimes"] == "skip"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://127.0.0.1:65001", ("127.0.0.1", 65001)),
        ("127.0.0.1:65001", ("127.0.0.1", 65001)),
        ("https://mirror.example", ("mirror.example", 443)),
        ("http://[::1]:5000/", ("::1", 5000)),
        ("http://x:port", None),
    ],
)
def test_host_port(url: str, expected: tuple[str, int] | None) -> None:
    assert host_port(url) == expected


def test_the_verdict_counts_in_words() -> None:
    """One check ok is "1 check ok", as the broken-host transcript (NATS down) shows it."""
    mirror = Check("mirror", "ok", "answers")
    nats = Check("nats", "fail", "cannot reach NATS")
    assert Report([mirror, nats]).verdict == "problems: nats failed (1 check ok)"
    assert Report([mirror, mirror]).verdict == "healthy (2 checks ok)"
    assert Report([nats]).verdict == "problems: nats failed (0 checks ok)"
