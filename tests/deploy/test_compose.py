"""compose/ is a deployment that starts: the compose file is valid Compose, its services are
configured with settings swarmfly really has, and Prometheus and Grafana point at them.

Each swarmfly service's command and environment go through the real CLI parser and
configuration loader, so a renamed flag, setting or port breaks this test, not a user's
`docker compose up`.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import jsonschema
import pytest
import yaml

from swarmfly.cli import build_parser, config_from
from swarmfly.config import Config, setting_names

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yaml"
DOCKERFILE = COMPOSE_DIR / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
"""Read from the build context's root: the repository (compose sets it, as does the README)."""
PROMETHEUS_FILE = COMPOSE_DIR / "prometheus.yml"
GRAFANA_DIR = COMPOSE_DIR / "grafana"
SCHEMA_FILE = ROOT / "tests" / "data" / "compose-spec.json"
SCHEMA_SHA256 = "e4e1a42ce687c47e199551d1f025b1e713a4d1f9302706d3f89de9cef1d376a4"
"""As recorded in tests/data/compose-spec.README.md, with where the file comes from."""

SWARMFLY_COMMANDS = {"scheduler", "storage", "peer"}
NATS_CLIENT_PORT = 4222
PROMETHEUS_PORT = 9090
VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def _interpolate(value: Any) -> Any:
    """Compose's `${NAME:-default}` with nothing set in the environment: the defaults."""
    if isinstance(value, str):
        return VARIABLE.sub(lambda m: m.group(2) or "", value)
    if isinstance(value, dict):
        return {key: _interpolate(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_interpolate(item) for item in value]
    return value


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(loaded, dict)
    return dict(_interpolate(loaded))


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return dict(compose["services"])


def _swarmfly_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in services.items()
        if service.get("command") and service["command"][0] in SWARMFLY_COMMANDS
    }


def _nats_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in services.items()
        if str(service.get("image", "")).split(":")[0] == "nats"
    }


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def _dockerfile_env() -> dict[str, str]:
    """ENV of the image's last stage (the one services run)."""
    last_stage = DOCKERFILE.read_text().split("\nFROM ")[-1]
    joined = last_stage.replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in joined.splitlines():
        if line.startswith("ENV "):
            for pair in shlex.split(line[4:]):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def _config(service: dict[str, Any]) -> Config:
    """The configuration the service's process builds from its image, environment and flags."""
    env = {**_dockerfile_env(), **_environment(service)}
    env = {key: value for key, value in env.items() if key.startswith("SWARMFLY_")}
    args = build_parser().parse_args([str(part) for part in service["command"]])
    with mock.patch.dict(os.environ, env, clear=True):
        return config_from(args)


def _metrics_port(kind: str, config: Config) -> tuple[str, int]:
    """Listen address and port of the HTTP server that serves /metrics for this kind."""
    if kind == "scheduler":
        return config.scheduler.listen, config.scheduler.http_port
    node = config.storage if kind == "storage" else config.peer
    return node.listen, node.upload_port


def _published(service: dict[str, Any]) -> Iterator[tuple[str, int, int]]:
    """(host ip, host port, container port) of each short-syntax port."""
    for entry in service.get("ports", []):
        host_ip, host_port, container_port = str(entry).rsplit(":", 2)
        yield host_ip, int(host_port), int(container_port)


def _volume_targets(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> source of each short-syntax volume."""
    out = {}
    for entry in service.get("volumes", []):
        source, target = str(entry).split(":")[:2]
        out[target] = source
    return out


def _flag(command: list[str], name: str) -> str | None:
    for part in command:
        if part == name:
            raise AssertionError(f"write {name}=VALUE so the value cannot be misread")
        if part.startswith(name + "="):
            return part.split("=", 1)[1]
    return None


def test_vendored_schema_is_the_published_one() -> None:
    digest = hashlib.sha256(SCHEMA_FILE.read_bytes()).hexdigest()
    assert digest == SCHEMA_SHA256, "tests/data/compose-spec.json differs from its source"


def test_compose_file_follows_the_compose_specification(compose: dict[str, Any]) -> None:
    schema = json.loads(SCHEMA_FILE.read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = [
        f"{'/'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}"
        for error in validator.iter_errors(compose)
    ]
    assert not errors, "\n".join(errors)


def test_the_schema_rejects_what_compose_rejects() -> None:
    """The check has teeth: a misspelt service key fails it."""
    schema = json.loads(SCHEMA_FILE.read_text())
    bad = {"services": {"scheduler": {"image": "swarmfly:local", "comand": ["scheduler"]}}}
    with pytest.raises(jsonschema.ValidationError, match="comand"):
        jsonschema.validate(bad, schema, cls=jsonschema.Draft7Validator)


def test_the_deployment_has_every_part(services: dict[str, dict[str, Any]]) -> None:
    kinds = sorted(service["command"][0] for service in _swarmfly_services(services).values())
    assert kinds == ["peer", "peer", "scheduler", "storage"]
    assert len(_nats_services(services)) == 3
    images = {str(service.get("image", "")).split(":")[0] for service in services.values()}
    assert {"prom/prometheus", "grafana/grafana"} <= images


def test_swarmfly_services_run_the_one_image(services: dict[str, dict[str, Any]]) -> None:
    swarmfly = _swarmfly_services(services)
    images = {service.get("image") for service in swarmfly.values()}
    assert len(images) == 1, f"one image for every swarmfly service, got {images}"
    for name, service in swarmfly.items():
        build = service.get("build")
        assert isinstance(build, dict), f"{name} is built from compose/Dockerfile"
        context = (COMPOSE_DIR / build["context"]).resolve()
        assert context == ROOT, f"{name}: the build context is the repository"
        assert (context / build["dockerfile"]).resolve() == DOCKERFILE
    others = {name for name, service in services.items() if "build" in service}
    assert others == {*swarmfly, "credentials"}, "only swarmfly's image is built here"


def test_dockerfile_is_slim_non_root_and_runs_swarmfly() -> None:
    text = DOCKERFILE.read_text()
    joined = text.replace("\\\n", " ")
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", joined, re.MULTILINE)
    assert base and base.group(1) == "python:3.11-slim"
    assert re.findall(r"^FROM (\S+)", joined, re.MULTILINE)[-1] == "${PYTHON_IMAGE}"
    users = re.findall(r"^USER (\S+)$", joined, re.MULTILINE)
    assert users and users[-1].split(":")[0] not in ("0", "root")
    entrypoint = re.search(r"^ENTRYPOINT (.+)$", joined, re.MULTILINE)
    assert entrypoint and json.loads(entrypoint.group(1)) == ["swarmfly"]
    state_dir = _dockerfile_env()["SWARMFLY_STATE_DIR"]
    assert f'VOLUME ["{state_dir}"]' in joined
    # Everything pyproject.toml builds the package from is copied into the build stage.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    sources = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    sources |= {"pyproject.toml", pyproject["project"]["readme"]}
    copied = set(_copied_sources())
    assert sources <= copied, f"not copied into the image: {sources - copied}"
    assert "pip install ." in joined


def _copied_sources() -> list[str]:
    """What the Dockerfile's COPY lines take from the build context (the repository)."""
    joined = DOCKERFILE.read_text().replace("\\\n", " ")
    return [
        source
        for line in re.findall(r"^COPY (?!--from)(.+)$", joined, re.MULTILINE)
        for source in line.split()[:-1]
    ]


def _glob(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as Docker matches it: Go's filepath.Match plus ``**``."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + "[" + pattern[i + 1 : end].replace("!", "^", 1) + "]", end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def _ignore_rules(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    """(an exception ``!``, the pattern) per line, in order."""
    rules = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            pattern = posixpath.normpath(line.removeprefix("!").strip().lstrip("/"))
            rules.append((line.startswith("!"), _glob(pattern)))
    return rules


def _ignored(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parent
    directories decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for exception, rule in rules:
        if any(rule.fullmatch(prefix) for prefix in prefixes):
            ignored = not exception
    return ignored


def test_the_dockerignore_reading_follows_docker() -> None:
    rules = _ignore_rules("*\n!src\n**/__pycache__\n*.py[co]\n")
    assert _ignored(".git/HEAD", rules) and _ignored("docs", rules)
    assert not _ignored("src/a/b.py", rules)
    assert _ignored("src/a/__pycache__/b.cpython-311.pyc", rules)
    assert _ignored("__pycache__/x", rules)
    assert _ignored("x.pyc", rules) and not _ignored("src/x.pyc", rules), "* stops at a /"


def test_dockerignore_keeps_private_files_out_and_copied_ones_in() -> None:
    rules = _ignore_rules(DOCKERIGNORE.read_text())
    for private in (
        ".git/config",
        ".venv/bin/python",
        "venv/lib/python3.11/site-packages/x.py",
        ".env",
        "nats.creds",
        "tests/deploy/test_compose.py",
        "bench/results/swarm.json",
        "swarmfly/__pycache__/bus.cpython-311.pyc",
        "swarmfly.egg-info/PKG-INFO",
        ".mypy_cache/3.11/x.json",
    ):
        assert _ignored(private, rules), f"{private} would be sent to docker build"
    needed = []
    for source in _copied_sources():
        path = ROOT / source
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        assert files, f"COPY {source}: nothing there"
        needed += [
            p.relative_to(ROOT).as_posix()
            for p in files
            if "__pycache__" not in p.parts and p.suffix != ".pyc"
        ]
    excluded = [path for path in needed if _ignored(path, rules)]
    assert not excluded, f".dockerignore leaves out what the Dockerfile copies: {excluded}"


def test_swarmfly_services_keep_state_in_a_volume(services: dict[str, dict[str, Any]]) -> None:
    for name, service in _swarmfly_services(services).items():
        config = _config(service)
        assert str(config.state_dir) in _volume_targets(service), f"{name}: state dir volume"


def test_nats_is_a_three_node_jetstream_cluster(services: dict[str, dict[str, Any]]) -> None:
    nodes = _nats_services(services)
    cluster_names, server_names = set(), set()
    for name, node in nodes.items():
        command = [str(part) for part in node["command"]]
        assert "--jetstream" in command, f"{name}: JetStream on"
        store_dir = _flag(command, "--store_dir")
        assert store_dir in _volume_targets(node), f"{name}: JetStream store in a volume"
        cluster_names.add(_flag(command, "--cluster_name"))
        server_names.add(_flag(command, "--name"))
        cluster = _flag(command, "--cluster")
        assert cluster is not None
        cluster_port = int(cluster.rsplit(":", 1)[1])
        routes = (_flag(command, "--routes") or "").split(",")
        routed = {re.fullmatch(r"nats://([\w-]+):(\d+)", route) for route in routes}
        assert None not in routed, f"{name}: routes {routes}"
        assert {(m.group(1), int(m.group(2))) for m in routed if m} == {
            (other, cluster_port) for other in nodes if other != name
        }, f"{name} routes to each of the other nodes"
    assert len(cluster_names) == 1 and None not in cluster_names, "one cluster name"
    assert len(server_names) == 3 and None not in server_names, "unique server names"


def test_services_know_every_nats_node(services: dict[str, dict[str, Any]]) -> None:
    expected = {f"nats://{name}:{NATS_CLIENT_PORT}" for name in _nats_services(services)}
    for name, service in _swarmfly_services(services).items():
        config = _config(service)
        assert set(config.nats.servers) == expected, f"{name}: --nats lists every node"
        assert len(config.nats.servers) == 3
        depends = set(service.get("depends_on", {}))
        assert set(_nats_services(services)) <= depends, f"{name} starts after NATS"


def test_host_ids_are_distinct(services: dict[str, dict[str, Any]]) -> None:
    ids = []
    for service in _swarmfly_services(services).values():
        config = _config(service)
        kind = service["command"][0]
        if kind != "scheduler":
            ids.append((config.storage if kind == "storage" else config.peer).host_id)
    assert None not in ids and len(set(ids)) == len(ids)


def test_prometheus_scrapes_every_service_on_its_metrics_port(
    services: dict[str, dict[str, Any]],
) -> None:
    scrape = yaml.safe_load(PROMETHEUS_FILE.read_text())
    targets = {
        target
        for job in scrape["scrape_configs"]
        if job.get("metrics_path", "/metrics") == "/metrics"
        for static in job["static_configs"]
        for target in static["targets"]
    }
    expected = set()
    for name, service in _swarmfly_services(services).items():
        listen, port = _metrics_port(service["command"][0], _config(service))
        assert port != 0, f"{name}: a fixed metrics port, so Prometheus can find it"
        assert listen not in ("127.0.0.1", "localhost"), f"{name}: reachable from prometheus"
        expected.add(f"{name}:{port}")
        healthcheck = " ".join(service["healthcheck"]["test"])
        assert f"http://127.0.0.1:{port}/healthz" in healthcheck, f"{name}: health check port"
    assert targets == expected


def test_scheduler_dashboard_is_published(services: dict[str, dict[str, Any]]) -> None:
    scheduler = services["scheduler"]
    _, port = _metrics_port("scheduler", _config(scheduler))
    assert ("127.0.0.1", port, port) in set(_published(scheduler))


def test_environment_names_real_settings(services: dict[str, dict[str, Any]]) -> None:
    known = setting_names()
    has_proxy = "SWARMFLY_PROXY_PORT" in known
    for name, service in _swarmfly_services(services).items():
        for variable in _environment(service):
            if variable.startswith("SWARMFLY_PROXY_") and not has_proxy:
                continue  # test_peers_publish_their_proxy_on_loopback skips, saying why
            assert variable in known, f"{name}: {variable} is no swarmfly setting"


def test_peers_publish_their_proxy_on_loopback(services: dict[str, dict[str, Any]]) -> None:
    if not hasattr(Config(), "proxy"):
        pytest.skip("swarmfly.config has no [proxy] section yet")
    published_ports = set()
    for name, service in _swarmfly_services(services).items():
        if service["command"][0] != "peer":
            continue
        proxy = _config(service).proxy
        assert proxy.enabled and proxy.listen == "0.0.0.0", f"{name}: proxy on the network"
        assert proxy.registries, f"{name}: an upstream registry"
        ports = [p for p in _published(service) if p[2] == proxy.port]
        assert ports, f"{name}: proxy port {proxy.port} is published"
        for host_ip, host_port, _ in ports:
            assert host_ip == "127.0.0.1", f"{name}: the proxy is no open relay"
            published_ports.add(host_port)
    assert len(published_ports) == 2, "each peer's proxy on its own host port"


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard(
    services: dict[str, dict[str, Any]],
) -> None:
    grafana = services["grafana"]
    mounts = _volume_targets(grafana)
    for target, source in mounts.items():
        if source.startswith("."):
            assert (COMPOSE_DIR / source).exists(), f"grafana mounts {source} at {target}"
    provisioning = GRAFANA_DIR / "provisioning"
    assert mounts["/etc/grafana/provisioning"] == "./grafana/provisioning"

    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus" and source["isDefault"] is True
    assert source["url"] == f"http://prometheus:{PROMETHEUS_PORT}"
    assert "prometheus" in services

    providers = yaml.safe_load((provisioning / "dashboards" / "swarmfly.yaml").read_text())
    (provider,) = providers["providers"]
    folder = provider["options"]["path"]
    dashboard = f"{folder}/swarmfly-dashboard.json"
    assert mounts[dashboard] == "./grafana/swarmfly-dashboard.json"
    home = _environment(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == dashboard


def test_prometheus_reads_the_scrape_file(services: dict[str, dict[str, Any]]) -> None:
    prometheus = services["prometheus"]
    mounts = _volume_targets(prometheus)
    config_flag = _flag([str(p) for p in prometheus["command"]], "--config.file")
    assert config_flag is not None and mounts[config_flag] == "./prometheus.yml"
    assert ("127.0.0.1", PROMETHEUS_PORT, PROMETHEUS_PORT) in set(_published(prometheus))


def _credentials_job(services: dict[str, dict[str, Any]]) -> dict[str, tuple[str, str, str]]:
    """The identities the credentials job makes: seed path -> (role, host id, volume)."""
    job = services["credentials"]
    assert job["entrypoint"] == ["python", "-m", "swarmfly.credentials"]
    mounts = dict(reversed(v.split(":")[:2]) for v in job["volumes"])
    made = {}
    for spec in job["command"]:
        if spec.startswith("--"):
            continue
        who, _, path = spec.partition("=")
        role, _, host = who.partition(":")
        mount = next(m for m in mounts if path.startswith(m + "/"))
        made[path] = (role, host, mounts[mount])
    return made


def test_every_service_has_its_own_nats_identity(services: dict[str, dict[str, Any]]) -> None:
    made = _credentials_job(services)
    seen = set()
    for name, service in _swarmfly_services(services).items():
        config = _config(service)
        volume = next(
            v.split(":")[0] for v in service["volumes"] if v.endswith(":/var/lib/swarmfly")
        )
        seed = config.nats.nkeys_seed
        assert seed and seed.startswith(str(config.state_dir) + "/credentials/"), name
        path = "/v/" + volume.removesuffix("-data") + seed.removeprefix(str(config.state_dir))
        role, host, written_to = made[path]
        assert written_to == volume, f"{name}: its seed is written into its own volume only"
        kind = service["command"][0]
        assert role == kind, name
        host_id = config.peer.host_id if kind == "peer" else config.storage.host_id
        if kind != "scheduler":
            assert host == host_id, f"{name}: permissions for its own host id"
            assert config.nats.inbox_prefix == f"_INBOX_{kind}_{host_id}"
        else:
            assert config.nats.inbox_prefix == "_INBOX_scheduler"
        seen.add(path)
    assert len(seen) == 4, "four identities, one per service"
    assert {made[p][0] for p in set(made) - seen} == {"client"}


def test_nats_requires_the_shipped_authorization(services: dict[str, dict[str, Any]]) -> None:
    from swarmfly.credentials import permissions

    for name, node in _nats_services(services).items():
        command = [str(part) for part in node["command"]]
        assert _flag(command, "--config") == "/etc/nats-auth/auth.conf", name
        assert "nats-auth:/etc/nats-auth:ro" in node["volumes"], name
        assert node["depends_on"]["credentials"] == {"condition": "service_completed_successfully"}
    job = services["credentials"]
    assert "--server-config=/nats-auth/auth.conf" in job["command"]
    assert "nats-auth:/nats-auth" in job["volumes"]
    # What the job writes for a peer: its own subjects and inbox; to the schedulers, only
    # under its own host id and as a normal host (never storage's type, seed).
    rules = permissions("peer", "swarmfly", "peer-1", "_INBOX_peer_peer-1")
    assert rules["subscribe"]["allow"] == [
        "swarmfly.v1.peer.peer-1.>",
        "_INBOX_peer_peer-1.>",
        "$SRV.>",
    ]
    assert rules["publish"]["allow"] == [
        "swarmfly.v1.scheduler.*.register.normal.peer-1",
        "swarmfly.v1.scheduler.*.reschedule.normal.peer-1",
        "swarmfly.v1.scheduler.*.pieces.normal.peer-1",
        "swarmfly.v1.scheduler.*.result.normal.peer-1",
        "swarmfly.v1.scheduler.heartbeat.normal.peer-1",
        "swarmfly.v1.scheduler.*.beat.normal.peer-1",
        "swarmfly.v1.scheduler.leave.normal.peer-1",
        "swarmfly.v1.scheduler.*.task",
        "swarmfly.v1.preheat.*.progress.normal.peer-1",  # its own preheat reports only
        "swarmfly.v1.storage.*.import.normal.peer-1",  # swarmfly cache, as itself
        "swarmfly.v1.storage.*.cached.normal.peer-1",
        "$SRV.INFO.storage",
        "swarmfly.v1.scheduler.address",  # where a host it probes for doctor is
    ]
