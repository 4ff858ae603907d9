"""The chart's dashboard and alerts query only metrics the running processes export.

An api, a scheduler and a worker run as real processes (the scheduler and worker
with their health server on, ``EAT_HEALTH_PORT``, as the chart runs them),
handle a few messages, and each one's ``/metrics`` is scraped. Every metric name
in every panel query of ``charts/echo-at-time/dashboards/echo-at-time.json`` and
in every alert the chart renders must be among what those scrapes offer; the
alerts may also read kube-state-metrics' restart counter, which no process of
ours could export.
"""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from tests.chart import (
    EXTERNAL_METRICS,
    alert_expressions,
    dashboard_queries,
    exposed_names,
    promql_metric_names,
)
from tests.e2e.harness import Cluster, now_ms
from tests.servers import free_port
from tests.wait import wait_until

pytestmark = pytest.mark.e2e


def test_every_metric_the_dashboard_and_the_alerts_read_is_exported_by_a_running_process(
    cluster: Callable[..., Cluster],
) -> None:
    stack = cluster(apis=1, schedulers=0, workers=0)
    ports = {"scheduler": free_port(), "worker": free_port()}
    scheduler = stack.add_scheduler(env={"EAT_HEALTH_PORT": str(ports["scheduler"])})
    worker = stack.add_worker(env={"EAT_HEALTH_PORT": str(ports["worker"])})
    stack.launch([scheduler, worker])
    stack.wait_for_leader(15)

    api = stack.client()
    uuids = [
        api.post("due now", 1).uuid,
        api.post("due soon", now_ms() + 200).uuid,  # delayed, then promoted by the leader
    ]
    api.post("duplicate", 1, uuids[0])
    api.post("invalid", -1)
    wait_until(
        lambda: {line["uuid"] for line in stack.all_echoes()} >= set(uuids),
        "both messages to be handled",
        15,
    )

    scrapes = {"api": httpx.get(f"{stack.apis[0].base_url}/metrics", timeout=5).text}
    for role, port in ports.items():
        scrapes[role] = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    exported = {role: exposed_names(text) for role, text in scrapes.items()}
    everything = set().union(*exported.values())

    missing = {}
    for title, exprs in dashboard_queries().items():
        for expr in exprs:
            if names := promql_metric_names(expr) - everything:
                missing[f"panel {title!r}"] = names
    for alert, expr in alert_expressions().items():
        if names := promql_metric_names(expr) - everything - EXTERNAL_METRICS.keys():
            missing[f"alert {alert}"] = names
    assert missing == {}

    # ...and the processes that do the work report it (the panels are not empty).
    assert "eat_leader 1.0" in scrapes["scheduler"]
    assert 'eat_messages_accepted_total{kind="delayed"} 1.0' in scrapes["api"]
    assert "eat_delivery_lateness_seconds_count 2.0" in scrapes["worker"]
    assert (
        'eat_http_request_duration_seconds_bucket{le="+Inf",route="/api/v1/save-message"}'
        in (scrapes["api"])
    )
