"""The observability artefacts stay true to the code: every metric named by the Grafana
dashboard (k8s/grafana-dashboard.json) and the PrometheusRule
(k8s/base/prometheusrule.yaml) exists in the Metrics registry, the rule's thresholds are
the config defaults, and the metrics table in docs/observability.md is exactly the
registry's (regenerate it with `.venv/bin/python -m tests.test_alerts_artifacts`)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.metrics import MetricWrapperBase

from gateway.config import AlertRules
from gateway.observability.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "k8s" / "grafana-dashboard.json"
RULE = ROOT / "k8s" / "base" / "prometheusrule.yaml"
DOC = ROOT / "docs" / "observability.md"
BEGIN = "<!-- metrics-table:begin (generated: python -m tests.test_alerts_artifacts) -->"
END = "<!-- metrics-table:end -->"
_NAME = re.compile(r"\bedge_[a-z0-9_]+")


def _collectors(m: Any) -> list[Any]:
    """Metrics' attributes, each policy's families (`metrics.<policy>`, defined in
    gateway/policies/<name>/metrics.py) in their place."""
    out = []
    for value in vars(m).values():
        nested = type(value).__name__.endswith("Metrics") and hasattr(value, "__dict__")
        out.extend(_collectors(value) if nested else [value])
    return out


def registry() -> list[tuple[str, str, tuple[str, ...], str]]:
    """(exposed name, type, label names, help) of every collector, in definition order."""
    m = Metrics()
    out = []
    for value in _collectors(m):
        if isinstance(value, MetricWrapperBase):
            kind = str(value._type)
            name: str = value._name + ("_total" if kind == "counter" else "")
            out.append((name, kind, tuple(value._labelnames), str(value._documentation)))
    # Nothing registered on the registry behind Metrics' back.
    families = {f.name + ("_total" if f.type == "counter" else "") for f in m.registry.collect()}
    assert families == {n for n, *_ in out}
    return out


def series_names() -> set[str]:
    """Every series name a query may use: counters' `_total`, histograms' parts."""
    names: set[str] = set()
    for name, kind, _, _ in registry():
        names.add(name)
        if kind == "histogram":
            names.update(f"{name}_{part}" for part in ("bucket", "sum", "count"))
    return names


def render_table() -> str:
    lines = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    for name, kind, labels, doc in registry():
        shown = ", ".join(f"`{label}`" for label in labels) or "—"
        lines.append(f"| `{name}` | {kind} | {shown} | {doc.replace('|', '/')} |")
    return "\n".join(lines)


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def rule() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(RULE.read_text(encoding="utf-8"))
    return data


def exprs_of_dashboard() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]


def exprs_of_rule() -> list[str]:
    return [r["expr"] for g in rule()["spec"]["groups"] for r in g["rules"]]


# --------------------------------------------------------------------------- tests


def test_every_metric_in_the_dashboard_and_the_rule_exists() -> None:
    known = series_names()
    for source, exprs in (("dashboard", exprs_of_dashboard()), ("rule", exprs_of_rule())):
        used = {n for e in exprs for n in _NAME.findall(e)}
        assert used, source
        assert used <= known, f"{source} uses unknown metrics: {sorted(used - known)}"


def test_dashboard_covers_what_the_issue_asks_for() -> None:
    d = dashboard()
    assert d["uid"] == "eventlive-edge"
    assert d["templating"]["list"][0]["type"] == "datasource"
    panels = d["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    text = " ".join(exprs_of_dashboard())
    for needed in (
        "edge_requests_total",  # requests
        'edge_heartbeats_total{outcome=~"absorbed',  # saved: absorbed heartbeats
        'edge_cache_results_total{result=~"hit',  # saved: cache hits
        'edge_refresh_total{outcome=~"follower|replay"}',  # saved: coalesced refreshes
        "edge_request_duration_seconds_bucket",  # latency
        "edge_upstream_duration_seconds_bucket",
        "edge_breaker_state",  # breaker state
        "edge_store_errors_total",  # store errors
    ):
        assert needed in text, needed
    # Every non-row panel queries something, through the datasource variable, and sits
    # inside Grafana's 24-column grid without overlapping another.
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        if p["type"] != "row":
            assert p["targets"] and p["datasource"]["uid"] == "${datasource}", p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps at {(x, y)}"
                cells.add((x, y))


def test_prometheus_rule_shape_and_thresholds_match_the_config_defaults() -> None:
    doc = rule()
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    assert doc["kind"] == "PrometheusRule"
    assert doc["metadata"]["name"] == "eventlive-edge"
    rules = {r["alert"]: r for g in doc["spec"]["groups"] for r in g["rules"]}
    for r in rules.values():
        assert set(r) <= {"alert", "expr", "for", "labels", "annotations"}
        assert r["labels"]["severity"] in ("warning", "critical")
        assert r["annotations"]["summary"]
        if "for" in r:
            assert re.fullmatch(r"\d+[smh]", r["for"])
    d = AlertRules()

    def threshold(alert: str) -> float:
        m = re.search(r">\s*([\d.]+)\s*$", rules[alert]["expr"].strip())
        assert m, rules[alert]["expr"]
        return float(m.group(1))

    assert threshold("EdgeUpstream400Rate") == d.upstream_400_per_min
    assert threshold("EdgeUpstream409Rate") == d.upstream_409_per_min
    assert threshold("EdgeSupabaseLatencyP95") == d.auth_p95
    assert threshold("EdgeRealtimeDisconnects") == d.realtime_disconnects_per_min
    assert "edge_breaker_state" in rules["EdgeBreakerOpen"]["expr"]
    assert 'by!="client"' in rules["EdgeRealtimeDisconnects"]["expr"]
    # Brackets balance in every expression (a cheap stand-in for promtool).
    for alert, r in rules.items():
        expr = r["expr"]
        for a, b in ("()", "[]", "{}"):
            assert expr.count(a) == expr.count(b), alert


def test_prometheus_rule_is_a_base_resource() -> None:
    kust = yaml.safe_load((ROOT / "k8s" / "base" / "kustomization.yaml").read_text())
    assert "prometheusrule.yaml" in kust["resources"]


def test_docs_metrics_table_is_the_registry() -> None:
    text = DOC.read_text(encoding="utf-8")
    assert BEGIN in text and END in text
    table = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert table == render_table(), (
        "docs/observability.md is out of date: run .venv/bin/python -m tests.test_alerts_artifacts"
    )
    # Names follow the conventions the table promises.
    for name, kind, _, _ in registry():
        assert name.startswith("edge_")
        if kind == "counter":
            assert name.endswith("_total")


def main() -> None:
    text = DOC.read_text(encoding="utf-8")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(f"{head}{BEGIN}\n{render_table()}\n{END}{tail}", encoding="utf-8")
    sys.stdout.write(f"wrote {DOC}\n")


if __name__ == "__main__":
    main()
