"""What can be checked of helm/swarmfly without helm or a cluster.

The templates are reduced to a YAML skeleton: control lines (if/with/range/end) and
variable assignments go, the `else` branches are left out, a whole-line
`include ... | nindent N` becomes a marker key `__include_<n>: helper/component` at
indentation N, a `toYaml .Values.x | nindent N` a marker
`__values_<n>: x`, and an inline action the scalar `TPL/include/helper/component`,
`TPL/values/x` or `TPL`. That skeleton must parse, and names, labels, selectors, ports,
probes and resources are checked on it; the values, their comments and the README are checked
against each other and against the templates' `.Values` references.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nkeys
import pytest
import yaml

from swarmfly import credentials
from swarmfly.config import setting_names

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "swarmfly"
TEMPLATES = CHART / "templates"
HELPERS = TEMPLATES / "_helpers.tpl"
VALUES_FILE = CHART / "values.yaml"
README = CHART / "README.md"
PERMISSIONS_FILE = CHART / "files" / "nats-permissions.json"
DOCKERFILE = ROOT / "compose" / "Dockerfile"
NATS_REPOSITORY = "https://nats-io.github.io/k8s/helm/charts/"

WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet"}
MANIFESTS = sorted(p for p in TEMPLATES.glob("*.yaml"))
COMMENT = re.compile(r"\{\{-?\s*/\*.*?\*/\s*-?\}\}", re.DOTALL)
ACTION = re.compile(r"\{\{-?\s*(.*?)\s*-?\}\}", re.DOTALL)
VALUES_REF = re.compile(r"\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)")
INCLUDE = re.compile(r'include "([\w.]+)"')
COMPONENT = re.compile(r'"component" "([\w-]+)"')
DEFINE = re.compile(r'\{\{-?\s*define "([\w.]+)"')
BLOCK_WORDS = {"if", "with", "range", "define"}


# --- the skeleton -----------------------------------------------------------------------


def _inline(action: str) -> str:
    include = INCLUDE.match(action)
    if include:
        component = COMPONENT.search(action)
        return f"TPL/include/{include.group(1)}" + (f"/{component.group(1)}" if component else "")
    ref = VALUES_REF.match(action)
    if ref and ref.end() == len(action.split("|")[0].strip()):
        return f"TPL/values/{ref.group(1)[1:]}"
    return "TPL"


def _in_list(out: list[str], marker: re.Match[str]) -> bool:
    """Whether the lines a marker stands for continue a YAML list: the closest line above
    at its indentation or less is a list item at exactly its indentation."""
    indent = int(marker.group(3))
    for line in reversed(out):
        stripped = line.lstrip()
        if not stripped or len(line) - len(stripped) > indent:
            continue
        return len(line) - len(stripped) == indent and stripped.startswith("- ")
    return False


def skeleton(text: str) -> str:
    """The template as YAML, following the rules in the module docstring."""
    out: list[str] = []
    skipping: list[bool] = []  # one entry per open block: True while in its else branch
    markers = 0
    for line in COMMENT.sub("", text).splitlines():
        whole = re.fullmatch(r"\s*\{\{-?\s*(.*?)\s*-?\}\}\s*", line)
        if whole:
            action = whole.group(1)
            word = action.split()[0]
            if word in BLOCK_WORDS:
                skipping.append(False)
            elif word == "else":
                skipping[-1] = True
            elif word == "end":
                skipping.pop()
            elif any(skipping) or word == "fail" or re.match(r"\$\w+ :?= ", action):
                pass
            elif marker := re.fullmatch(r"(include .*|toYaml (\S+)) \| nindent (\d+)", action):
                markers += 1
                indent = " " * int(marker.group(3)) + ("- " if _in_list(out, marker) else "")
                if marker.group(2):
                    path = marker.group(2).removeprefix(".Values.")
                    out.append(f"{indent}__values_{markers}: {path}")
                else:
                    target = _inline(marker.group(1)).removeprefix("TPL/include/")
                    out.append(f"{indent}__include_{markers}: {target}")
            else:
                raise AssertionError(f"a line with only {{{{ {action} }}}} has no skeleton")
            continue
        if not any(skipping):
            out.append(ACTION.sub(lambda m: _inline(m.group(1)), line))
    assert not skipping, "unbalanced {{ end }}"
    return "\n".join(out) + "\n"


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(skeleton(path.read_text())) if doc]


@pytest.fixture(scope="module")
def manifests() -> list[dict[str, Any]]:
    return [doc for path in MANIFESTS for doc in _documents(path)]


def _markers(mapping: dict[str, Any] | None, kind: str) -> list[str]:
    return [v for k, v in (mapping or {}).items() if k.startswith(f"__{kind}_")]


def _component(labels: dict[str, Any], helper: str) -> str:
    found = [m.split("/")[1] for m in _markers(labels, "include") if m.split("/")[0] == helper]
    assert len(found) == 1, f"labels come from {helper}: {labels}"
    return found[0]


def _plain(items: list[Any] | dict[str, Any]) -> list[dict[str, Any]]:
    """The items a template writes out itself, without the markers of included ones."""
    if isinstance(items, dict):  # only included items: the skeleton saw no list
        return []
    return [item for item in items if not any(str(key).startswith("__") for key in item)]


def _containers(workload: dict[str, Any], *, init: bool = True) -> Iterator[dict[str, Any]]:
    spec = workload["spec"]["template"]["spec"]
    yield from spec["containers"]
    if init:
        yield from spec.get("initContainers") or []


def _helper_bodies() -> dict[str, str]:
    text = HELPERS.read_text()
    bodies = {}
    for match in DEFINE.finditer(text):
        rest = text[match.end() :]
        end = re.search(r"\{\{-?\s*end\s*-?\}\}\s*(?=\{\{/\*|\{\{-?\s*define|\Z)", rest)
        assert end, f"define {match.group(1)} has no end"
        bodies[match.group(1)] = rest[rest.index("}}") + 2 : end.start()]
    return bodies


# --- values -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def values() -> dict[str, Any]:
    loaded = yaml.safe_load(VALUES_FILE.read_text())
    assert isinstance(loaded, dict)
    return loaded


def _keys(node: yaml.Node, prefix: str = "") -> Iterator[tuple[str, int, bool]]:
    """(dotted path, line, is a leaf) of every key reached through mappings only."""
    assert isinstance(node, yaml.MappingNode)
    for key, value in node.value:
        path = f"{prefix}{key.value}"
        nested = isinstance(value, yaml.MappingNode) and bool(value.value)
        yield path, key.start_mark.line, not nested
        if nested:
            yield from _keys(value, path + ".")


def _value_keys() -> list[tuple[str, int, bool]]:
    return list(_keys(yaml.compose(VALUES_FILE.read_text())))


def _lookup(values: dict[str, Any], path: str) -> Any:
    node: Any = values
    for part in path.split("."):
        assert isinstance(node, dict) and part in node, f".Values.{path} is not in values.yaml"
        node = node[part]
    return node


def _template_value_refs() -> dict[str, set[str]]:
    refs: dict[str, set[str]] = {}
    for path in sorted(TEMPLATES.iterdir()):
        for match in VALUES_REF.finditer(path.read_text()):
            refs.setdefault(match.group(1)[1:], set()).add(path.name)
    return refs


def test_chart_yaml_declares_the_optional_nats_dependency(values: dict[str, Any]) -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "swarmfly"
    assert chart["type"] == "application" and chart["version"] and chart["appVersion"]
    (nats,) = chart["dependencies"]
    assert nats["name"] == "nats" and nats["repository"] == NATS_REPOSITORY
    assert nats["condition"] == "nats.enabled"
    assert isinstance(_lookup(values, "nats.enabled"), bool)


def test_every_value_the_templates_use_exists(values: dict[str, Any]) -> None:
    refs = _template_value_refs()
    assert refs, "the templates use values"
    for path, files in refs.items():
        try:
            _lookup(values, path)
        except AssertionError as exc:
            raise AssertionError(f"{exc} (used in {', '.join(sorted(files))})") from None


NATS_CHART_VALUES = ("nats.config.", "nats.container.", "nats.podTemplate.")
"""Values the official NATS chart reads, not this chart's templates."""


def test_every_value_is_used_by_a_template() -> None:
    """Values the chart does not read are dead, except the NATS chart's own."""
    used = set(_template_value_refs())
    for path, _, leaf in _value_keys():
        if not leaf or path.startswith(NATS_CHART_VALUES):
            continue
        parts = path.split(".")
        prefixes = {".".join(parts[: n + 1]) for n in range(len(parts))}
        assert prefixes & used, f"{path} is in values.yaml but no template reads it"


def test_every_value_has_a_comment() -> None:
    lines = VALUES_FILE.read_text().splitlines()
    for path, line, _ in _value_keys():
        indent = len(lines[line]) - len(lines[line].lstrip())
        above = lines[line - 1] if line else ""
        assert above.startswith(" " * indent + "#"), f"{path} has no comment above it"


def test_readme_lists_every_value_and_no_other() -> None:
    rows = re.findall(r"^\|\s*`([^`]+)`\s*\|", README.read_text(), re.MULTILINE)
    leaves = [path for path, _, leaf in _value_keys() if leaf]
    assert sorted(set(leaves) - set(rows)) == [], "values missing from README.md"
    assert sorted(set(rows) - set(leaves)) == [], "README.md lists values that do not exist"
    assert len(rows) == len(set(rows)), "a value listed twice in README.md"


# --- templates --------------------------------------------------------------------------


def test_every_manifest_has_a_skeleton(manifests: list[dict[str, Any]]) -> None:
    kinds = sorted(doc["kind"] for doc in manifests)
    assert kinds == sorted(
        [
            "ClusterRoleBinding",
            "ConfigMap",
            "ConfigMap",
            "DaemonSet",
            "Deployment",
            "PodDisruptionBudget",
            "Secret",
            "Service",
            "Service",
            "Service",
            "ServiceAccount",
            "ServiceAccount",
            "ServiceAccount",
            "ServiceMonitor",
            "StatefulSet",
        ]
    )
    for doc in manifests:
        assert doc["apiVersion"] and doc["metadata"]["name"].startswith("TPL/include/swarmfly.")
        _component(doc["metadata"]["labels"], "swarmfly.labels")


def test_the_skeleton_keeps_what_it_cannot_check_out_of_the_way() -> None:
    text = (
        "a:\n"
        '  {{- include "swarmfly.labels" (dict "context" $ "component" "x") | nindent 2 }}\n'
        "{{- if .Values.b }}\nb: {{ .Values.b.c | quote }}\n{{- else }}\nb: 2\n{{- end }}\n"
    )
    assert yaml.safe_load(skeleton(text)) == {
        "a": {"__include_1": "swarmfly.labels/x"},
        "b": "TPL/values/b.c",
    }


def test_every_include_names_a_helper_and_every_helper_is_used() -> None:
    defined = set(_helper_bodies())
    included = {name for path in TEMPLATES.iterdir() for name in INCLUDE.findall(path.read_text())}
    assert included - defined == set(), "include of an undefined helper"
    assert defined - included == set(), "helpers nothing includes"


def test_labels_follow_kubernetes_conventions() -> None:
    bodies = _helper_bodies()
    assert "app.kubernetes.io/name:" in bodies["swarmfly.instanceLabels"]
    assert "app.kubernetes.io/instance:" in bodies["swarmfly.instanceLabels"]
    assert 'include "swarmfly.instanceLabels"' in bodies["swarmfly.selectorLabels"]
    assert "app.kubernetes.io/component:" in bodies["swarmfly.selectorLabels"]
    # The pod labels contain the selector labels, so a selector always matches its pods.
    assert 'include "swarmfly.selectorLabels"' in bodies["swarmfly.labels"]
    for label in ("part-of", "version", "managed-by"):
        assert f"app.kubernetes.io/{label}:" in bodies["swarmfly.labels"]
    assert "helm.sh/chart:" in bodies["swarmfly.labels"]


def test_workload_selectors_match_their_pods(manifests: list[dict[str, Any]]) -> None:
    workloads = [doc for doc in manifests if doc["kind"] in WORKLOADS]
    assert sorted(doc["kind"] for doc in workloads) == sorted(WORKLOADS)
    components = set()
    for doc in workloads:
        component = _component(doc["metadata"]["labels"], "swarmfly.labels")
        components.add(component)
        assert doc["metadata"]["name"] == f"TPL/include/swarmfly.componentName/{component}"
        selector = doc["spec"]["selector"]["matchLabels"]
        assert _component(selector, "swarmfly.selectorLabels") == component
        pod_labels = doc["spec"]["template"]["metadata"]["labels"]
        assert _component(pod_labels, "swarmfly.labels") == component
    assert components == {"scheduler", "storage", "peer"}


def _workload(manifests: list[dict[str, Any]], component: str) -> dict[str, Any]:
    (found,) = [
        doc
        for doc in manifests
        if doc["kind"] in WORKLOADS
        and _component(doc["metadata"]["labels"], "swarmfly.labels") == component
    ]
    return found


def test_services_select_a_workload_and_its_ports(manifests: list[dict[str, Any]]) -> None:
    services = [doc for doc in manifests if doc["kind"] == "Service"]
    for service in services:
        component = _component(service["spec"]["selector"], "swarmfly.selectorLabels")
        assert component == _component(service["metadata"]["labels"], "swarmfly.labels")
        assert service["metadata"]["name"] == f"TPL/include/swarmfly.componentName/{component}"
        workload = _workload(manifests, component)
        port_names = {
            port["name"] for c in _containers(workload, init=False) for port in c["ports"]
        }
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names, f"{component}: {port}"
            assert port["name"] == "http", "the ServiceMonitor scrapes the port named http"
    assert {_component(s["spec"]["selector"], "swarmfly.selectorLabels") for s in services} == {
        "scheduler",
        "storage",
        "peer",
    }


def test_storage_statefulset_has_its_headless_service_and_claim(
    manifests: list[dict[str, Any]],
) -> None:
    storage = _workload(manifests, "storage")
    assert storage["kind"] == "StatefulSet"
    (service,) = [
        doc
        for doc in manifests
        if doc["kind"] == "Service"
        and _component(doc["spec"]["selector"], "swarmfly.selectorLabels") == "storage"
    ]
    assert service["spec"]["clusterIP"] == "None"
    assert storage["spec"]["serviceName"] == service["metadata"]["name"]
    (claim,) = storage["spec"]["volumeClaimTemplates"]
    (container,) = list(_containers(storage))
    assert claim["metadata"]["name"] in {m["name"] for m in _plain(container["volumeMounts"])}
    storage_size = claim["spec"]["resources"]["requests"]["storage"]
    assert storage_size == "TPL/values/storage.persistence.size"


def test_containers_have_resources_probes_and_no_privilege(
    manifests: list[dict[str, Any]], values: dict[str, Any]
) -> None:
    for workload in (doc for doc in manifests if doc["kind"] in WORKLOADS):
        main = {id(c) for c in _containers(workload, init=False)}
        for container in _containers(workload):
            name = container["name"]
            assert container["image"] == "TPL/include/swarmfly.image", name
            (resources,) = _markers(container["resources"], "values")
            limits = _lookup(values, resources)
            for kind in ("requests", "limits"):
                assert set(limits[kind]) == {"cpu", "memory"}, f"{name}: {resources}.{kind}"
            security = container["securityContext"]
            if id(container) in main:
                assert "swarmfly.containerSecurityContext" in _markers(security, "include")
                assert "swarmfly.probes" in _markers(container, "include"), name
                assert "http" in {port["name"] for port in container["ports"]}, name
            elif name != "containerd-restart":  # privileged, opt-in: its own test
                assert security["allowPrivilegeEscalation"] is False, name
                assert security["capabilities"]["drop"] == ["ALL"], name


def test_probes_are_http_gets_of_healthz() -> None:
    body = _helper_bodies()["swarmfly.probes"]
    probes = yaml.safe_load(skeleton(body))
    assert set(probes) == {"startupProbe", "livenessProbe", "readinessProbe"}
    for probe in probes.values():
        assert probe["httpGet"] == {"path": "/healthz", "port": "http"}
    assert body.lstrip().startswith("{{- if .Values.probes.startup.enabled }}\nstartupProbe:")
    assert "initialDelaySeconds" not in probes["startupProbe"], "it starts probing at once"
    security = yaml.safe_load(skeleton(_helper_bodies()["swarmfly.containerSecurityContext"]))
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    pod = yaml.safe_load(skeleton(_helper_bodies()["swarmfly.podSecurityContext"]))
    assert pod["runAsNonRoot"] is True


def test_state_lives_where_the_image_keeps_it(manifests: list[dict[str, Any]]) -> None:
    state_dir = re.search(r"SWARMFLY_STATE_DIR=(\S+)", DOCKERFILE.read_text())
    assert state_dir
    for workload in (doc for doc in manifests if doc["kind"] in WORKLOADS):
        for container in _containers(workload, init=False):
            mounts = {m["mountPath"] for m in _plain(container["volumeMounts"])}
            assert state_dir.group(1) in mounts, container["name"]


def test_peer_daemonset_uses_the_node(manifests: list[dict[str, Any]]) -> None:
    peer = _workload(manifests, "peer")
    assert peer["kind"] == "DaemonSet"
    spec = peer["spec"]["template"]["spec"]
    assert spec["hostNetwork"] == "TPL/values/peer.hostNetwork"
    volumes = {v["name"]: v for v in _plain(spec["volumes"])}
    assert volumes["data"]["hostPath"]["path"] == "TPL/values/peer.dataDir"
    assert volumes["containerd-certs"]["hostPath"]["path"] == "TPL/values/peer.containerd.certsDir"
    init = {c["name"]: c for c in spec["initContainers"]}
    certs = {m["name"]: m["mountPath"] for m in _plain(init["containerd-hosts"]["volumeMounts"])}
    script = (TEMPLATES / "containerd-configmap.yaml").read_text()
    assert f"{certs['containerd-certs']}/$1" in script, "the script writes into the mount"
    assert '[host."http://127.0.0.1:{{ .Values.peer.proxy.port }}"]' in script
    assert 'capabilities = ["pull", "resolve"]' in script
    assert "range .Values.peer.proxy.registries" in script
    (container,) = spec["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": "TPL/values/peer.port", "proxy": "TPL/values/peer.proxy.port"}


def test_servicemonitor_scrapes_every_service(manifests: list[dict[str, Any]]) -> None:
    (monitor,) = [doc for doc in manifests if doc["kind"] == "ServiceMonitor"]
    assert "swarmfly.instanceLabels" in _markers(
        monitor["spec"]["selector"]["matchLabels"], "include"
    )
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint == {
        "port": "http",
        "path": "/metrics",
        "interval": "TPL/values/serviceMonitor.interval",
    }


def test_environment_names_real_settings() -> None:
    known = setting_names()
    used = {
        name
        for path in TEMPLATES.iterdir()
        for name in re.findall(r"\bSWARMFLY_[A-Z0-9_]+", path.read_text())
    }
    if "SWARMFLY_PROXY_PORT" not in known:
        used = {name for name in used if not name.startswith("SWARMFLY_PROXY_")}
    assert used - known == set(), "not swarmfly settings"


def test_scheduler_and_storage_replicas_are_values(
    manifests: list[dict[str, Any]], values: dict[str, Any]
) -> None:
    for component in ("scheduler", "storage"):
        workload = _workload(manifests, component)
        assert workload["spec"]["replicas"] == f"TPL/values/{component}.replicas"
        replicas = _lookup(values, f"{component}.replicas")
        assert isinstance(replicas, int) and replicas >= 1, component


def test_several_schedulers_run_only_with_jetstream(values: dict[str, Any]) -> None:
    """Schedulers share the tasks through leases in JetStream KV; without it each would take
    every task. The defaults give the bundled NATS JetStream whenever they run several, the
    template refuses several with a bundled NATS without it, and one scheduler is replaced
    with Recreate (never two at once) while several roll."""
    if _lookup(values, "scheduler.replicas") > 1:
        assert _lookup(values, "nats.enabled") is True
        assert _lookup(values, "nats.config.jetstream.enabled") is True
        assert _lookup(values, "nats.config.cluster.replicas") >= 3, "the KV bucket has 3 copies"
    text = (TEMPLATES / "scheduler-deployment.yaml").read_text()
    guard = re.search(r'\{\{-? if (.+?) -?\}\}\n\{\{-? fail "([^"]+)" -?\}\}\n', text)
    assert guard, "a guard that fails the install"
    for condition in (
        "(gt (int .Values.scheduler.replicas) 1)",
        "(not .Values.nats.url)",
        ".Values.nats.enabled",
        "(not .Values.nats.config.jetstream.enabled)",
    ):
        assert condition in guard.group(1)
    assert "scheduler.replicas" in guard.group(2) and "jetstream" in guard.group(2)
    strategy = (
        'type: {{ ternary "RollingUpdate" "Recreate" (gt (int .Values.scheduler.replicas) 1) }}'
    )
    assert strategy in text


# --- NATS permissions -------------------------------------------------------------------

AUTH_BLOCK = re.compile(
    r"\{\{-? if (?:and )?\.Values\.natsAuth\.enabled[^}]*-?\}\}\n(.*?)\{\{-? end -?\}\}\n",
    re.DOTALL,
)
IDENTITY_DIR = "/etc/swarmfly/nats-identity"


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value") for e in _plain(container["env"])}


def test_each_workload_mounts_only_its_own_roles_seed(manifests: list[dict[str, Any]]) -> None:
    """With natsAuth on (the skeleton keeps the if branches): the scheduler, storage and peer
    pods each get the one Secret of their own role, only its seed.nk, readable by the
    service's group alone, and connect with it on their role's own inbox."""
    for role in ("scheduler", "storage", "peer"):
        workload = _workload(manifests, role)
        spec = workload["spec"]["template"]["spec"]
        secrets = [v for v in _plain(spec["volumes"]) if "secret" in v]
        assert len(secrets) == 1, f"{role}: one Secret volume, its own: {secrets}"
        (volume,) = secrets
        assert volume["name"] == "nats-identity"
        secret = volume["secret"]
        assert secret["secretName"] == f"TPL/include/swarmfly.identitySecret/{role}"
        assert secret["items"] == [{"key": "seed.nk", "path": "seed.nk"}], role
        assert secret["defaultMode"] == 0o440, role
        (container,) = list(_containers(workload, init=False))
        mounts = {m["name"]: m for m in _plain(container["volumeMounts"])}
        assert mounts["nats-identity"] == {
            "name": "nats-identity",
            "mountPath": IDENTITY_DIR,
            "readOnly": True,
        }
        env = _env(container)
        assert env["SWARMFLY_NATS_NKEYS_SEED"] == f"{IDENTITY_DIR}/seed.nk", role
        assert env["SWARMFLY_NATS_INBOX_PREFIX"] == credentials.inbox_prefix(role), role
        for init in workload["spec"]["template"]["spec"].get("initContainers") or []:
            assert "nats-identity" not in str(init), f"{role}: init containers get no seed"


def test_seeds_and_identities_appear_only_with_nats_auth() -> None:
    """The default render (natsAuth.enabled false) names no seed Secret, which would not
    exist; every identity line of a workload sits in an `if .Values.natsAuth.enabled`."""
    for name in ("scheduler-deployment.yaml", "storage-statefulset.yaml", "peer-daemonset.yaml"):
        text = (TEMPLATES / name).read_text()
        blocks = AUTH_BLOCK.findall(text)
        assert len(blocks) == 3, f"{name}: env, mount and volume"
        rest = AUTH_BLOCK.sub("", text)
        for word in ("nats-identity", "NKEYS_SEED", "INBOX_PREFIX", "identitySecret"):
            assert word not in rest, f"{name}: {word} outside natsAuth.enabled"


def test_nats_auth_is_off_by_default_and_warned_about(values: dict[str, Any]) -> None:
    """Off by default: a chart cannot make NKeys, and the default install must work without
    steps before it. The default auth.conf is comments only (a valid, empty include), the
    guards that refuse a bad configuration run only with natsAuth on, and NOTES.txt warns."""
    assert _lookup(values, "natsAuth.enabled") is False
    body = _helper_bodies()["swarmfly.natsAuthConf"]
    enabled, _, disabled = body.partition("{{- else }}")
    assert enabled.lstrip().startswith("{{- if .Values.natsAuth.enabled }}")
    assert "fail" not in disabled
    lines = [line for line in disabled.splitlines() if line.strip()]
    assert lines[-1].strip() == "{{- end }}" and all(line.startswith("#") for line in lines[:-1]), (
        "the include of a disabled natsAuth holds only comments"
    )
    notes = (TEMPLATES / "NOTES.txt").read_text()
    _, _, warning = notes.partition("{{- if .Values.natsAuth.enabled }}")
    assert "WARNING: NATS runs WITHOUT AUTHORIZATION" in warning.partition("{{- else }}")[2]


def _helper_bucket_regex() -> str:
    body = _helper_bodies()["swarmfly.natsAuthConf"]
    found = re.search(r'regexReplaceAll "([^"]+)" \$prefix "_"', body)
    assert found, "the helper names the lease bucket as credentials.kv_stream does"
    return found.group(1)


def _rendered_permissions(prefix: str) -> dict[str, Any]:
    """What the swarmfly.natsAuthConf helper makes of files/nats-permissions.json."""
    body = _helper_bodies()["swarmfly.natsAuthConf"]
    pipeline = (
        '.Files.Get "files/nats-permissions.json" | replace "@PREFIX@" $prefix'
        ' | replace "@BUCKET@" $bucket | fromJson'
    )
    assert pipeline in body
    bucket = re.sub(_helper_bucket_regex(), "_", prefix)
    text = PERMISSIONS_FILE.read_text().replace("@PREFIX@", prefix)
    loaded = yaml.safe_load(text.replace("@BUCKET@", bucket))
    assert isinstance(loaded, dict)
    return loaded


@pytest.mark.parametrize("prefix", ["swarmfly", "team.a", "x-y_z", "a.b.c"])
def test_chart_permissions_are_those_of_swarmfly_credentials(prefix: str) -> None:
    """The chart's permissions cannot drift from the code's: every role's, for the prefix,
    at role level (host id `*`, the role's inbox), as swarmfly.credentials.permissions."""
    rendered = _rendered_permissions(prefix)
    assert sorted(rendered) == sorted(credentials.ROLES)
    for role in credentials.ROLES:
        assert rendered[role] == credentials.permissions(role, prefix), role
    if prefix == "swarmfly":  # the peers' residual risk, as documented
        assert "swarmfly.v1.peer.*.>" in rendered["peer"]["subscribe"]["allow"]


def test_chart_authorization_is_the_servers_of_swarmfly_credentials(tmp_path: Path) -> None:
    """Every role's public key with its permissions: what swarmfly.credentials.authorization
    gives, and what `python -m swarmfly.credentials` writes for an external NATS when given
    role-level identities (no :HOST_ID), in the same order."""
    body = _helper_bodies()["swarmfly.natsAuthConf"]
    roles = re.search(r"range \$role := list ((?:\"\w+\" ?)+)", body)
    assert roles and roles.group(1).split() == [f'"{r}"' for r in credentials.ROLES]
    assert "get $.Values.natsAuth.publicKeys $role" in body
    assert '(dict "nkey" $key "permissions" (get $permissions $role))' in body
    assert '{{- $block := dict "users" $users }}' in body
    assert "authorization: {{ $block | toJson }}" in body

    specs = [f"{role}={tmp_path / role}.nk" for role in credentials.ROLES]
    conf = tmp_path / "auth.conf"
    assert credentials.main(["--prefix", "team.a", "--server-config", str(conf), *specs]) == 0
    keys = {}
    for role in credentials.ROLES:
        seed = (tmp_path / f"{role}.nk").read_bytes().strip()
        keys[role] = nkeys.from_seed(bytearray(seed)).public_key.decode()
        assert re.fullmatch(r"U[A-Z2-7]{55}", keys[role]), "the helper's check of a key"
    rendered = _rendered_permissions("team.a")
    chart = {"users": [{"nkey": keys[r], "permissions": rendered[r]} for r in credentials.ROLES]}
    assert chart == credentials.authorization(keys, "team.a")
    assert {"authorization": chart} == yaml.safe_load(conf.read_text())


def test_bundled_nats_includes_the_charts_authorization(
    manifests: list[dict[str, Any]], values: dict[str, Any]
) -> None:
    """The bundled NATS mounts the Secret this chart renders (same name, under /etc/ so the
    NATS chart's reloader sees it) and includes its auth.conf."""
    (secret,) = [doc for doc in manifests if doc["kind"] == "Secret"]
    assert secret["metadata"]["name"] == "TPL/include/swarmfly.natsAuthSecret"
    assert secret["stringData"] == {"auth.conf": "TPL/include/swarmfly.natsAuthConf"}
    (mount,) = [p["value"] for p in _lookup(values, "nats.container.patch")]
    assert mount["mountPath"].startswith("/etc/") and mount["readOnly"] is True
    include = _lookup(values, "nats.config.merge")["$include"]
    assert str(Path("/etc/nats-config", include).resolve()) == f"{mount['mountPath']}/auth.conf"
    (volume,) = [p["value"] for p in _lookup(values, "nats.podTemplate.patch")]
    assert volume["name"] == mount["name"]
    name = volume["secret"]["secretName"]["$tplYaml"]
    helper = _helper_bodies()["swarmfly.natsAuthSecret"].strip()
    assert name == helper.replace("{{- ", "{{ "), "the same name in both charts"
    for patch in ("nats.container.patch", "nats.podTemplate.patch"):
        assert all(p["op"] == "add" and p["path"].endswith("/-") for p in _lookup(values, patch))


def test_chart_callout_authorization_is_the_servers_of_swarmfly_credentials(
    tmp_path: Path,
) -> None:
    """With natsAuth.callout the scheduler and client NKeys (storage and peers get none)
    bypass the auth callout, whose issuer is natsAuth.callout.issuerPublicKey: what
    `python -m swarmfly.credentials --callout-issuer` writes for an external NATS."""
    body = _helper_bodies()["swarmfly.natsAuthConf"]
    via_callout = (
        "{{- $viaCallout := and $.Values.natsAuth.callout.enabled"
        ' (has $role (list "storage" "peer")) }}'
    )
    assert via_callout in body
    assert '"auth_callout" (dict "issuer" $issuer "auth_users" $bypass)' in body
    assert 'regexMatch "^A[A-Z2-7]{55}$" $issuer' in body
    roles = ["scheduler", "client"]
    specs = [f"{role}={tmp_path / role}.nk" for role in roles]
    conf, issuer_seed = tmp_path / "auth.conf", tmp_path / "issuer.nk"
    argv = ["--prefix", "team.a", "--server-config", str(conf)]
    assert credentials.main([*argv, "--callout-issuer", str(issuer_seed), *specs]) == 0
    keys = {
        role: nkeys.from_seed(
            bytearray((tmp_path / f"{role}.nk").read_bytes().strip())
        ).public_key.decode()
        for role in roles
    }
    issuer = nkeys.from_seed(bytearray(issuer_seed.read_bytes().strip())).public_key.decode()
    assert re.fullmatch(r"A[A-Z2-7]{55}", issuer), "the helper's check of an issuer"
    rendered = _rendered_permissions("team.a")
    chart = {
        "users": [{"nkey": keys[r], "permissions": rendered[r]} for r in roles],
        "auth_callout": {"issuer": issuer, "auth_users": [keys[r] for r in roles]},
    }
    assert {"authorization": chart} == yaml.safe_load(conf.read_text())


def test_callout_helpers_give_each_pod_what_the_callout_expects() -> None:
    """Each workload includes the callout's helpers for itself; a peer's host id is its
    node's name and a storage's its pod's (swarmfly.callout.HOST_CLAIM), each on its own
    inbox, with the bound token where [nats] token_file points; only the schedulers mount
    an API token, to read the JWKS, and only they get the issuer's seed."""
    from swarmfly.callout import HOST_CLAIM

    for name, component in (
        ("scheduler-deployment.yaml", "scheduler"),
        ("storage-statefulset.yaml", "storage"),
        ("peer-daemonset.yaml", "peer"),
    ):
        text = (TEMPLATES / name).read_text()
        for helper in ("podServiceAccount", "calloutEnv", "calloutMount", "calloutVolume"):
            call = f'include "swarmfly.{helper}" (dict "context" $ "component" "{component}")'
            assert call in text, (name, helper)
    bodies = _helper_bodies()
    guard = (
        "{{- if and .context.Values.natsAuth.enabled .context.Values.natsAuth.callout.enabled }}"
    )
    for helper in ("podServiceAccount", "calloutEnv", "calloutMount", "calloutVolume"):
        assert bodies[f"swarmfly.{helper}"].lstrip().startswith(guard), helper
    env = bodies["swarmfly.calloutEnv"]
    assert HOST_CLAIM == {"peer": "node", "storage": "pod"}
    host_id = (
        '- name: {{ ternary "SWARMFLY_PEER_HOST_ID" "SWARMFLY_STORAGE_HOST_ID"'
        ' (eq .component "peer") }}'
    )
    assert host_id in env
    assert 'fieldPath: {{ ternary "spec.nodeName" "metadata.name" (eq .component "peer") }}' in env
    assert 'value: {{ printf "_INBOX_%s_{host_id}" .component | quote }}' in env
    assert credentials.inbox_prefix("peer") == "_INBOX_peer"
    token_file = re.search(r"SWARMFLY_NATS_TOKEN_FILE\n\s+value: (\S+)", env)
    mount = re.search(r'"/etc/swarmfly/callout" "(\S+)"', bodies["swarmfly.calloutMount"])
    assert token_file and mount and token_file.group(1) == f"{mount.group(1)}/token"
    volume = bodies["swarmfly.calloutVolume"]
    assert "path: token" in volume and "serviceAccountToken:" in volume
    assert "key: issuer.nk" in volume
    service_account = "/var/run/secrets/kubernetes.io/serviceaccount"
    assert f"{service_account}/ca.crt" in env and f"{service_account}/token" in env
    account = bodies["swarmfly.podServiceAccount"]
    callout, _, otherwise = account.partition("{{- else }}")
    assert 'automountServiceAccountToken: {{ eq .component "scheduler" }}' in callout
    assert otherwise.split() == ["automountServiceAccountToken:", "false", "{{-", "end", "}}"]
    accounts = (TEMPLATES / "serviceaccounts.yaml").read_text()
    assert "name: system:service-account-issuer-discovery" in accounts
    assert accounts.count("automountServiceAccountToken: false") == 3


# --- scheduling, disruption and the node init -------------------------------------------

POD_VALUES = (
    "nodeSelector",
    "tolerations",
    "affinity",
    "priorityClassName",
    "podLabels",
    "podAnnotations",
    "extraVolumes",
    "extraVolumeMounts",
)


@pytest.mark.parametrize("component", ["scheduler", "storage", "peer"])
def test_every_workload_takes_the_usual_pod_values(
    manifests: list[dict[str, Any]], values: dict[str, Any], component: str
) -> None:
    """What Dragonfly's and Bitnami's charts let an operator set on each component, each
    where Kubernetes reads it; none by default."""
    for name in POD_VALUES:
        default = _lookup(values, f"{component}.{name}")
        assert not default and isinstance(default, str | list | dict), (component, name)
    workload = _workload(manifests, component)
    template = workload["spec"]["template"]
    spec = template["spec"]
    assert _markers(template["metadata"]["labels"], "values") == ["."], "podLabels"
    assert spec["priorityClassName"] == "TPL"
    assert "swarmfly.podServiceAccount/" + component in _markers(spec, "include")
    assert f"swarmfly.affinity/{component}" in _markers(spec, "include")
    (container,) = spec["containers"]
    assert _markers(container["volumeMounts"][-1], "values") == ["."], "extraVolumeMounts"
    assert _markers(spec["volumes"][-1], "values") == ["."], "extraVolumes"
    text = (TEMPLATES / f"{_template_of(component)}").read_text()
    for name in ("podLabels", "priorityClassName", "extraVolumes", "extraVolumeMounts"):
        assert f"{{{{- with .Values.{component}.{name} }}}}" in text, name
    assert f'"affinity" .Values.{component}.affinity)' in text
    assert f'"annotations" .Values.{component}.podAnnotations)' in text


def _template_of(component: str) -> str:
    return {
        "scheduler": "scheduler-deployment.yaml",
        "storage": "storage-statefulset.yaml",
        "peer": "peer-daemonset.yaml",
    }[component]


def test_helpers_of_pod_values() -> None:
    """A set affinity replaces the chart's; schedulers and storage otherwise spread over
    nodes, softly; a component's annotations win over the global ones."""
    bodies = _helper_bodies()
    affinity = bodies["swarmfly.affinity"]
    assert affinity.lstrip().startswith("{{- if .affinity }}\naffinity:\n  {{- toYaml .affinity")
    otherwise = affinity.partition('{{- else if ne .component "peer" }}\n')[2]
    spread = yaml.safe_load(skeleton("{{- if x }}\n" + otherwise))["affinity"]["podAntiAffinity"]
    (term,) = spread["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert _markers(term["podAffinityTerm"]["labelSelector"]["matchLabels"], "include") == [
        "swarmfly.selectorLabels"
    ]
    annotations = bodies["swarmfly.podAnnotations"]
    assert "merge (dict) (.annotations | default dict) (.context.Values.podAnnotations" in (
        annotations
    )


def test_schedulers_have_a_disruption_budget_when_there_are_several(
    manifests: list[dict[str, Any]], values: dict[str, Any]
) -> None:
    (pdb,) = [doc for doc in manifests if doc["kind"] == "PodDisruptionBudget"]
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["metadata"]["name"] == "TPL/include/swarmfly.componentName/scheduler"
    assert _component(pdb["spec"]["selector"]["matchLabels"], "swarmfly.selectorLabels") == (
        "scheduler"
    )
    assert _lookup(values, "scheduler.pdb") == {
        "enabled": True,
        "minAvailable": "",
        "maxUnavailable": "",
    }
    text = (TEMPLATES / "scheduler-pdb.yaml").read_text()
    first = text.split("-}}\n", 1)[1].splitlines()[0]
    assert first == (
        "{{- if and .Values.scheduler.pdb.enabled (gt (int .Values.scheduler.replicas) 1) }}"
    )
    assert "maxUnavailable: {{ .Values.scheduler.pdb.maxUnavailable | default 1 }}" in text
    assert '{{- fail "scheduler.pdb: set minAvailable or maxUnavailable, not both" }}' in text


def test_containerd_init_sets_config_path_and_restarts_only_when_asked(
    manifests: list[dict[str, Any]], values: dict[str, Any]
) -> None:
    """The init container that writes hosts.toml then runs swarmfly.nodeinit on the node's
    config.toml (mounted from its directory) with the node's certsDir; the privileged
    restart container, and hostPID, come only with peer.containerd.restart, which is off."""
    assert _lookup(values, "peer.containerd.setConfigPath") is True
    assert _lookup(values, "peer.containerd.restart") is False
    assert _lookup(values, "peer.containerd.configFile") == "/etc/containerd/config.toml"
    spec = _workload(manifests, "peer")["spec"]["template"]["spec"]
    init = {c["name"]: c for c in spec["initContainers"]}
    mounts = {m["name"]: m["mountPath"] for m in init["containerd-hosts"]["volumeMounts"]}
    volumes = {v["name"]: v for v in _plain(spec["volumes"])}
    assert volumes["containerd-config"]["hostPath"]["path"] == "TPL"  # dir of configFile
    assert mounts["containerd-config"] == "/host/containerd"
    script = (TEMPLATES / "containerd-configmap.yaml").read_text()
    call = re.search(r"python -m swarmfly\.nodeinit (.+)", script)
    assert call, "install.sh runs the node init"
    assert '--config {{ printf "/host/containerd/%s" (base .Values.peer.containerd.configFile)' in (
        call.group(1)
    )
    assert "--certs-dir {{ .Values.peer.containerd.certsDir | squote }}" in call.group(1)
    assert "{{ if .Values.peer.containerd.restart }} --changed-file" in call.group(1)
    marker = "/run/swarmfly/nodeinit/changed"
    assert marker in call.group(1) and mounts["nodeinit"] == str(Path(marker).parent)
    assert script.index("write {{ .host") < call.start(), "hosts.toml first"

    restart = init["containerd-restart"]
    assert restart["securityContext"]["privileged"] is True
    assert restart["command"] == ["sh", "/etc/swarmfly/containerd/restart.sh"]
    restart_sh = script.split("restart.sh: |\n", 1)[1]
    assert f"changed={marker}" in restart_sh
    assert "nsenter --target 1 --mount -- systemctl restart containerd" in restart_sh
    lines = [line.strip() for line in restart_sh.splitlines()]
    assert lines.index('rm -f "$changed"') > lines.index(
        "nsenter --target 1 --mount -- systemctl restart containerd"
    ), "the marker goes once containerd restarted, so a later pod restart does not"
    assert spec["hostPID"] is True
    daemonset = (TEMPLATES / "peer-daemonset.yaml").read_text()
    restart_var = (
        "{{- $restart := and .Values.peer.containerd.enabled"
        " .Values.peer.containerd.setConfigPath .Values.peer.containerd.restart }}"
    )
    assert restart_var in daemonset
    assert daemonset.count("{{- if $restart }}") == 4, "hostPID, mount, container, volume"
    assert "{{- if .Values.peer.containerd.restart }}\n  restart.sh: |" in script


def test_no_pod_mounts_an_api_token_it_does_not_use() -> None:
    """Without the callout no pod reads the API (automountServiceAccountToken: false); with
    it only the schedulers do (test_callout_helpers_give_each_pod_what_the_callout_expects)."""
    bodies = _helper_bodies()
    account = bodies["swarmfly.podServiceAccount"]
    rendered_without_callout = account.partition("{{- else }}")[2]
    assert yaml.safe_load(skeleton("{{- if x }}\n" + rendered_without_callout)) == {
        "automountServiceAccountToken": False
    }


def test_notes_say_what_the_dashboard_shows() -> None:
    """Each scheduler's dashboard and /api/state merge every scheduler's state
    (services/scheduler/service.py, _view), so NOTES.txt must not say otherwise."""
    service = (ROOT / "services" / "scheduler" / "service.py").read_text()
    view = service.split("async def _view", 1)[1].split("\n    async def ", 1)[0]
    assert "messages.STATE" in view and "merge(" in view
    notes = (TEMPLATES / "NOTES.txt").read_text()
    assert "shows its own" not in notes
    assert "show the whole swarm: it asks every scheduler for its state and merges" in notes
