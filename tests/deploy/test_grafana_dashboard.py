"""The Grafana dashboard in compose/grafana/ stays in step with swarmfly.metrics.

Metric names are taken from the prometheus_client objects in swarmfly.metrics, never from a list
kept here, so renaming or dropping a metric without fixing the dashboard fails this test.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import Counter, Gauge, Histogram, Summary

from swarmfly import metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "compose" / "grafana" / "swarmfly-dashboard.json"
GRID_WIDTH = 24

# The sample names prometheus_client exposes for a family of each type (describe()'s name is
# the family name: a Counter "x" is described as "x" and exposed as "x_total"); no
# ``_created`` series (swarmfly.metrics turns them off).
SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
}
# Labels Prometheus adds at scrape time, and the histogram bucket bound.
TARGET_LABELS = {"job", "instance"}

PROMQL_WORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "atan2",
    "inf",
    "nan",
}
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
SELECTOR = re.compile(r"(?<![\w.:$])([a-zA-Z_:][\w:]*)\s*(\{[^}]*\})?")
MATCHER = re.compile(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)\s*\"")


def _metric_objects() -> list[Counter | Gauge | Histogram | Summary]:
    found = [
        value
        for kind in (metrics.SchedulerMetrics, metrics.PeerMetrics, metrics.ProxyMetrics)
        for value in vars(kind()).values()
        if isinstance(value, Counter | Gauge | Histogram | Summary)
    ]
    assert found, "swarmfly.metrics defines no prometheus_client metrics"
    return found


def _exposed() -> dict[str, tuple[str, set[str]]]:
    """Every sample name swarmfly exposes -> (family name, label names usable on it)."""
    exposed: dict[str, tuple[str, set[str]]] = {}
    for metric in _metric_objects():
        labels = set(metric._labelnames) | TARGET_LABELS
        for family in metric.describe():
            for suffix in SUFFIXES[family.type]:
                usable = labels | {"le"} if suffix == "_bucket" else labels
                if family.type == "summary" and suffix == "":
                    usable = usable | {"quantile"}
                exposed[family.name + suffix] = (family.name, usable)
    return exposed


EXPOSED = _exposed()


def _load() -> dict[str, Any]:
    loaded = json.loads(DASHBOARD.read_text())
    assert isinstance(loaded, dict)
    return loaded


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # panels of a collapsed row


DASH = _load()
PANELS = list(_panels(DASH["panels"]))
QUERY_PANELS = [p for p in PANELS if p.get("type") != "row"]
EXPRS = [(panel["title"], target["expr"]) for panel in QUERY_PANELS for target in panel["targets"]]


def _strip(expr: str) -> str:
    """The expression without string literals' contents and range/subquery brackets."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    return re.sub(r"\[[^\]]*\]", "", expr)


def _selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, label names in its matchers) for every vector selector in a PromQL expr."""
    expr = GROUPING.sub(" ", _strip(expr))
    found = []
    for match in SELECTOR.finditer(expr):
        name, braces = match.group(1), match.group(2) or ""
        if name.lower() in PROMQL_WORDS:
            continue
        if not braces and expr[match.end() :].lstrip().startswith("("):
            continue  # a function call
        found.append((name, set(MATCHER.findall(braces))))
    return found


def test_dashboard_parses_and_is_schema_39() -> None:
    assert DASH["schemaVersion"] == 39
    assert DASH["title"]
    assert DASH["uid"]
    assert QUERY_PANELS


def test_template_variables() -> None:
    variables = {v["name"]: v for v in DASH["templating"]["list"]}
    datasource = variables["datasource"]
    assert datasource["type"] == "datasource"
    assert datasource["query"] == "prometheus"
    for name in ("job", "instance"):
        assert variables[name]["type"] == "query"
        assert variables[name]["datasource"]["uid"] == "${datasource}"


@pytest.mark.parametrize("panel", PANELS, ids=lambda p: p.get("title", "?"))
def test_panel_has_title_and_templated_datasource(panel: dict[str, Any]) -> None:
    assert panel.get("title", "").strip(), f"panel {panel.get('id')} has no title"
    assert panel.get("datasource", {}).get("uid") == "${datasource}"
    assert panel["datasource"].get("type") == "prometheus"
    for target in panel.get("targets", []):
        assert target.get("datasource", {}).get("uid") == "${datasource}"
        assert target["expr"].strip()


def test_panel_ids_are_unique() -> None:
    ids = [panel["id"] for panel in PANELS]
    assert all(isinstance(i, int) for i in ids)
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(ids)}"


def test_grid_positions_are_complete_and_do_not_overlap() -> None:
    boxes = []
    for panel in PANELS:
        grid = panel.get("gridPos")
        assert grid is not None, f"{panel['title']!r} has no gridPos"
        for field in ("x", "y", "w", "h"):
            assert isinstance(grid.get(field), int), f"{panel['title']!r} gridPos.{field}"
        assert grid["x"] >= 0 and grid["y"] >= 0 and grid["w"] > 0 and grid["h"] > 0
        assert grid["x"] + grid["w"] <= GRID_WIDTH, f"{panel['title']!r} is wider than the grid"
        boxes.append((panel["title"], grid))
    for (a, ga), (b, gb) in itertools.combinations(boxes, 2):
        apart = (
            ga["x"] + ga["w"] <= gb["x"]
            or gb["x"] + gb["w"] <= ga["x"]
            or ga["y"] + ga["h"] <= gb["y"]
            or gb["y"] + gb["h"] <= ga["y"]
        )
        assert apart, f"panels {a!r} and {b!r} overlap"


@pytest.mark.parametrize(("title", "expr"), EXPRS, ids=[t for t, _ in EXPRS])
def test_expr_uses_only_real_metrics_and_labels(title: str, expr: str) -> None:
    selectors = _selectors(expr)
    assert selectors, f"{title!r}: no metric found in {expr!r}"
    for name, matched in selectors:
        assert name in EXPOSED, f"{title!r}: {name!r} is not exposed by swarmfly.metrics"
        usable = EXPOSED[name][1]
        assert matched <= usable, f"{title!r}: {name} has no label(s) {matched - usable}"
        assert {"job", "instance"} <= matched, f"{title!r}: {name} ignores $job/$instance"
    usable = set().union(*(EXPOSED[name][1] for name, _ in selectors))
    for _, grouped in GROUPING.findall(_strip(expr)):
        labels = {label.strip() for label in grouped.split(",") if label.strip()}
        assert labels <= usable, f"{title!r}: grouping by unknown label(s) {labels - usable}"


def test_every_metric_is_on_the_dashboard() -> None:
    shown = {EXPOSED[name][0] for _, expr in EXPRS for name, _ in _selectors(expr)}
    families = {family.name for m in _metric_objects() for family in m.describe()}
    assert families <= shown, f"metrics missing from the dashboard: {sorted(families - shown)}"


def test_selector_parser_finds_metrics_not_functions_or_labels() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, source) (rate(a_bucket{job=~"$job",x="y"}'
        "[$__rate_interval]))) / (sum(b_total) > 0) or vector(1e-9)"
    )
    assert _selectors(expr) == [("a_bucket", {"job", "x"}), ("b_total", set())]
