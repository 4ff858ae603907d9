"""The Grafana dashboard the chart ships: its ConfigMap, its panels and their queries.

Whether each metric a query names is really exported by the processes is checked
against live scrapes in ``tests/e2e/test_monitoring_metrics.py``; here, against
the metrics ``app.metrics`` registers, and every query's syntax with promtool.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from app import metrics
from tests.chart import (
    DASHBOARD,
    EXTERNAL_METRICS,
    alert_expressions,
    dashboard,
    dashboard_queries,
    exposed_names,
    kinds,
    promql_metric_names,
    render,
    tool,
    with_grafana_variables,
)

SELECTOR = 'namespace=~"$namespace",job=~"$release-(api|scheduler-metrics|worker-metrics)"'


def registered_names() -> set[str]:
    return exposed_names(metrics.exposition()[0].decode())


def test_the_dashboard_ships_in_a_configmap_for_grafanas_sidecar_only_when_asked() -> None:
    assert "ConfigMap" not in kinds(render())
    (configmap,) = kinds(render(extra=("--set", "grafanaDashboard.enabled=true")))["ConfigMap"]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["namespace"] == "ns"
    (name,) = configmap["data"]
    assert name.endswith(".json")
    assert json.loads(configmap["data"][name]) == dashboard()


def test_the_sidecar_label_and_namespace_are_values() -> None:
    settings = (
        "grafanaDashboard.enabled=true",
        "grafanaDashboard.label=dashboards",
        "grafanaDashboard.labelValue=eat",
        "grafanaDashboard.namespace=monitoring",
        "grafanaDashboard.annotations.grafana_folder=Messaging",
    )
    extra = tuple(arg for setting in settings for arg in ("--set", setting))
    (configmap,) = kinds(render(extra=extra))["ConfigMap"]
    assert configmap["metadata"]["labels"]["dashboards"] == "eat"
    assert "grafana_dashboard" not in configmap["metadata"]["labels"]
    assert configmap["metadata"]["namespace"] == "monitoring"
    assert configmap["metadata"]["annotations"] == {"grafana_folder": "Messaging"}


def test_the_dashboard_is_grafana_json_with_its_own_uid_and_variables() -> None:
    document = dashboard()
    assert document["uid"] == "echo-at-time"
    assert DASHBOARD.read_text(encoding="utf-8") == json.dumps(document, indent=2) + "\n"
    variables = {v["name"]: v for v in document["templating"]["list"]}
    assert set(variables) == {"datasource", "namespace", "release"}
    assert variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in document["panels"]]
    assert len(ids) == len(set(ids))
    for panel in document["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["description"] and panel["targets"], panel["title"]


def test_the_dashboard_shows_what_an_operator_watches() -> None:
    queries = dashboard_queries()
    names = {
        title: set().union(*(promql_metric_names(q) for q in exprs))
        for title, exprs in queries.items()
    }
    shown = set().union(*names.values())
    throughput = {
        "eat_messages_accepted_total",
        "eat_messages_promoted_total",
        "eat_messages_delivered_total",
        "eat_messages_retried_total",
        "eat_messages_dead_lettered_total",
    }
    queue = {"eat_delayed_messages", "eat_stream_length", "eat_stream_lag", "eat_stream_pending"}
    assert throughput <= names["Messages per second"]
    assert queue <= shown
    assert {"eat_leader", "eat_leader_epoch", "eat_promote_refused_total"} <= shown
    assert names["Pending per worker"] == {"eat_consumer_pending"}
    assert "histogram_quantile(0.99" in " ".join(queries["Lateness (handled minus runAt)"])
    assert "by (status)" in queries["Requests per second by status"][0]
    assert names["Latency p99 by route"] == {"eat_http_request_duration_seconds_bucket"}


# Queue gauges whose totals are the sum over the partitions (each partition's value is the
# same from every process that reports it: max by partition first, then sum).
SUMMED_GAUGES = (
    "eat_delayed_messages",
    "eat_stream_length",
    "eat_stream_lag",
    "eat_stream_pending",
    "eat_dead_messages",
    "eat_consumer_pending",
)


def test_queue_totals_sum_the_partitions_and_count_each_partition_once() -> None:
    queries = [e for exprs in dashboard_queries().values() for e in exprs]
    queries += list(alert_expressions().values())
    for expr in queries:
        if expr.startswith("max by (partition) "):  # the per-partition panel
            continue
        if promql_metric_names(expr) & set(SUMMED_GAUGES):
            assert "partition) (" in expr, expr
            assert expr.startswith("sum") or " sum(" in expr, expr
    assert dashboard_queries()["Lag per partition"] == [
        f"max by (partition) (eat_stream_lag{{{SELECTOR}}})"
    ]


def test_every_query_selects_only_the_chosen_releases_series() -> None:
    for title, exprs in dashboard_queries().items():
        for expr in exprs:
            selectors = re.findall(r"\{([^}]*)\}", expr)
            assert selectors, title
            assert all(s.startswith(SELECTOR) for s in selectors), f"{title}: {expr}"


def test_every_query_names_metrics_the_processes_register() -> None:
    registered = registered_names()
    for title, exprs in dashboard_queries().items():
        for expr in exprs:
            assert promql_metric_names(expr) <= registered, f"{title}: {expr}"
    for alert, expr in alert_expressions().items():
        assert promql_metric_names(expr) <= registered | EXTERNAL_METRICS.keys(), alert


def test_every_query_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query (Grafana's variables filled in) as a recording rule."""
    rules = [
        {"record": f"panel:{index}", "expr": with_grafana_variables(expr)}
        for index, expr in enumerate(
            expr for exprs in dashboard_queries().values() for expr in exprs
        )
    ]
    assert len(rules) >= 20
    (tmp_path / "rules.yaml").write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}), encoding="utf-8"
    )
    result = subprocess.run(
        [tool("promtool"), "check", "rules", "rules.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (le) (rate(a_seconds_bucket{x="{y}"}[5m]))', {"a_seconds_bucket"}),
        ("max(x) / on(job) group_left(pod) y:z > 1e3 and bool w offset 1h", {"x", "y:z", "w"}),
        ('(sum(eat_leader{job=~"a|b"}) or vector(0)) < 1', {"eat_leader"}),
        (
            "histogram_quantile(0.99, sum without (pod) (rate(h_bucket[$__rate_interval])))",
            {"h_bucket"},
        ),
    ],
)
def test_metric_names_are_read_out_of_promql(expr: str, names: set[str]) -> None:
    assert promql_metric_names(expr) == names
