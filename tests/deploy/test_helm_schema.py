"""helm/swarmfly/values.schema.json: the JSON Schema (draft-07, the draft Helm reads) of the
chart's values, held to values.yaml. Every key of values.yaml is in it and every property of
it in values.yaml; the defaults pass; typical mistakes fail, at the value that is wrong.
Helm renders the chart too, with helm-python-sdk (Helm's own Go SDK, a test dependency)."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python
import jsonschema
import pytest
import yaml

CHART = Path(__file__).resolve().parents[2] / "helm" / "swarmfly"
SCHEMA_FILE = CHART / "values.schema.json"
NATS_CHART_VALUES = ("nats.config.", "nats.container", "nats.podTemplate")
"""The NATS chart's own values: beyond what this chart sets, its schema checks them."""


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    loaded = json.loads(SCHEMA_FILE.read_text())
    assert isinstance(loaded, dict)
    return loaded


@pytest.fixture(scope="module")
def values() -> dict[str, Any]:
    loaded = yaml.safe_load((CHART / "values.yaml").read_text())
    assert isinstance(loaded, dict)
    return loaded


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """A property's schema with its `$ref` or `allOf: [{$ref}]` followed."""
    for part in node.get("allOf", []) + ([node] if "$ref" in node else []):
        ref = part["$ref"].removeprefix("#/definitions/")
        rest = {k: v for k, v in node.items() if k not in ("allOf", "$ref")}
        node = {**schema["definitions"][ref], **rest}
    return node


def _value_paths(node: Any, prefix: str = "") -> Iterator[str]:
    """Dotted path of every key of values.yaml reached through mappings."""
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{prefix}{key}"
            yield path
            yield from _value_paths(value, path + ".")


def _schema_paths(schema: dict[str, Any], node: dict[str, Any], prefix: str = "") -> Iterator[str]:
    for key, child in _resolve(schema, node).get("properties", {}).items():
        path = f"{prefix}{key}"
        yield path
        yield from _schema_paths(schema, child, path + ".")


def _errors(schema: dict[str, Any], values: dict[str, Any]) -> list[str]:
    """Where each validation error is, as a dotted path."""
    validator = jsonschema.Draft7Validator(schema)
    return sorted(".".join(map(str, e.absolute_path)) for e in validator.iter_errors(values))


def test_the_schema_is_draft_07(schema: dict[str, Any]) -> None:
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    jsonschema.Draft7Validator.check_schema(schema)
    assert schema["additionalProperties"] is False


def test_every_value_is_in_the_schema_and_no_other(
    schema: dict[str, Any], values: dict[str, Any]
) -> None:
    in_values = set(_value_paths(values))
    in_schema = set(_schema_paths(schema, schema))
    nats_own = {p for p in in_values if p.startswith(NATS_CHART_VALUES) and p not in in_schema}
    assert sorted(in_values - in_schema - nats_own) == [], "values the schema lacks"
    assert sorted(in_schema - in_values - {"global"}) == [], "schema properties with no value"
    # Anything the NATS chart reads that the schema does not list passes through.
    for passthrough in ("nats", "nats.config"):
        node: dict[str, Any] = schema
        for part in passthrough.split("."):
            node = _resolve(schema, node["properties"][part])
        assert node["additionalProperties"] is True, passthrough


def test_every_property_says_what_it_is(schema: dict[str, Any]) -> None:
    def walk(node: dict[str, Any], path: str) -> Iterator[tuple[str, dict[str, Any]]]:
        for key, child in _resolve(schema, node).get("properties", {}).items():
            yield f"{path}{key}", child
            yield from walk(child, f"{path}{key}.")

    for path, node in walk(schema, ""):
        resolved = _resolve(schema, node)
        assert "type" in resolved or "oneOf" in resolved, f"{path} has no type"
        assert node.get("description") or path.count(".") > 1 or resolved.get("description"), (
            f"{path} has no description"
        )


def test_the_defaults_pass(schema: dict[str, Any], values: dict[str, Any]) -> None:
    assert _errors(schema, values) == []


def _with(values: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    changed = copy.deepcopy(values)
    *parents, last = path.split(".")
    node = changed
    for part in parents:
        node = node[part]
    node[last] = value
    return changed


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("scheduler.replicas", "2"),  # --set-string, or a quoted number in a values file
        ("scheduler.replicas", 0),
        ("scheduler.replica", 2),  # misspelt: refused, not ignored
        ("scheduler.pdb.maxUnavailable", "one"),
        ("scheduler.pdb.minAvailable", -1),
        ("scheduler.service.type", "Ingress"),
        ("scheduler.resources.limits.memory", "1 GB"),
        ("scheduler.podLabels", {"app.kubernetes.io/component": "x"}),  # would break selectors
        ("scheduler.extraVolumeMounts", [{"name": "x"}]),  # no mountPath
        ("storage.cacheQuota", "lots"),
        ("storage.port", 70000),
        ("peer.proxy.registries", []),
        ("peer.proxy.registries", [{"host": "docker.io", "server": "registry-1.docker.io"}]),
        ("peer.containerd.configFile", "/etc/containerd/"),
        ("peer.containerd.restart", "yes"),
        ("peer.hostNetwork", "true"),
        ("peer.extraEnv", [{"value": "no name"}]),
        ("peer.nodeSelector", {"disk": 1}),
        ("image.pullPolicy", "Sometimes"),
        ("imagePullSecrets", [{"name": "regcred"}]),  # this chart takes the names
        ("logLevel", "LOUD"),
        ("securityContext.runAsUser", 0),  # the pods run as non-root
        ("natsClient.prefix", "two words"),
        ("natsAuth.callout.tokenExpirationSeconds", 60),
        ("probes.startup.failureThreshold", 0),
        ("probes.liveness", {"periodSeconds": 10}),
        ("serviceMonitor.interval", "30"),
        ("nats.url", "nats-a:4222"),
        ("nats.config.cluster.replicas", "3"),
    ],
)
def test_a_wrong_value_is_refused_where_it_is(
    schema: dict[str, Any], values: dict[str, Any], path: str, value: Any
) -> None:
    errors = _errors(schema, _with(values, path, value))
    assert errors, f"{path}={value!r} passed"
    parent = path.rsplit(".", 1)[0]
    assert all(e == path or e.startswith((path + ".", parent)) for e in errors), errors


def test_the_public_keys_formats_are_left_to_the_templates(
    schema: dict[str, Any], values: dict[str, Any]
) -> None:
    """A seed given as a public key must not appear in an error message: Helm's schema
    errors echo the value, the templates' own check says which key is wrong without it."""
    seed = "SUAAVVXGXOLZMMRMCRYJGFKH2GTUHRKHUPEHMKS2NF2ACBVLAXDVYWJQZM"
    changed = _with(values, "natsAuth.publicKeys.peer", seed)
    assert _errors(schema, changed) == []
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    assert 'regexMatch "^U[A-Z2-7]{55}$" $key' in helpers


# --- Helm itself, where its SDK is installed -------------------------------------------

EXTERNAL_NATS = {"nats": {"enabled": False, "url": "nats://nats-a:4222"}}
"""The bundled NATS chart is a dependency `helm dependency update` fetches; not here."""

EVERY_OPTION = {
    **EXTERNAL_NATS,
    "podAnnotations": {"a": "global", "b": "global"},
    "scheduler": {
        "replicas": 3,
        "pdb": {"minAvailable": "50%"},
        "priorityClassName": "swarmfly-high",
        "podLabels": {"team": "infra"},
        "podAnnotations": {"a": "scheduler"},
        "extraVolumes": [{"name": "extra", "emptyDir": {}}],
        "extraVolumeMounts": [{"name": "extra", "mountPath": "/extra"}],
    },
    "peer": {"containerd": {"enabled": True, "restart": True}},
}


def _render(overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
    with helm_python.Chart.load(str(CHART)) as chart:
        files = chart.render(overrides, name="rel", namespace="ns")
    rendered = {}
    for name, text in files.items():
        if not name.endswith(".yaml"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                rendered[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return rendered


def test_helm_renders_the_defaults() -> None:
    rendered = _render(EXTERNAL_NATS)
    assert "PodDisruptionBudget/rel-swarmfly-scheduler" in rendered
    for name in ("Deployment/rel-swarmfly-scheduler", "DaemonSet/rel-swarmfly-peer"):
        spec = rendered[name]["spec"]["template"]["spec"]
        assert spec["automountServiceAccountToken"] is False
        (container,) = spec["containers"]
        assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert "affinity" not in rendered["DaemonSet/rel-swarmfly-peer"]["spec"]["template"]["spec"]
    spread = rendered["Deployment/rel-swarmfly-scheduler"]["spec"]["template"]["spec"]
    assert spread["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]


def test_helm_renders_every_option() -> None:
    rendered = _render(EVERY_OPTION)
    assert rendered["PodDisruptionBudget/rel-swarmfly-scheduler"]["spec"]["minAvailable"] == "50%"
    template = rendered["Deployment/rel-swarmfly-scheduler"]["spec"]["template"]
    assert template["metadata"]["labels"]["team"] == "infra"
    assert template["metadata"]["annotations"]["a"] == "scheduler"
    assert template["metadata"]["annotations"]["b"] == "global"
    assert template["spec"]["priorityClassName"] == "swarmfly-high"
    assert template["spec"]["volumes"][-1] == {"name": "extra", "emptyDir": {}}
    peer = rendered["DaemonSet/rel-swarmfly-peer"]["spec"]["template"]["spec"]
    assert peer["hostPID"] is True
    assert [c["name"] for c in peer["initContainers"]] == [
        "data-owner",
        "containerd-hosts",
        "containerd-restart",
    ]
    script = rendered["ConfigMap/rel-swarmfly-containerd"]["data"]["install.sh"]
    assert (
        "python -m swarmfly.nodeinit --config '/host/containerd/config.toml'"
        " --certs-dir '/etc/containerd/certs.d' --changed-file /run/swarmfly/nodeinit/changed"
    ) in script


def test_helm_refuses_what_the_schema_refuses() -> None:
    with (
        helm_python.Chart.load(str(CHART)) as chart,
        pytest.raises(helm_python.HelmError, match="replica"),
    ):
        chart.render({**EXTERNAL_NATS, "scheduler": {"replica": 2}}, name="rel", namespace="ns")
