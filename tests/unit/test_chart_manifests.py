"""What the chart renders is valid Kubernetes, and Helm refuses values the schema refuses.

Every object ``helm template`` renders, for the default values and for each file
in ``charts/echo-at-time/examples/``, passes strict validation (``tests/chart.py``):
the Kubernetes schemas of the release the chart is tested against and of the oldest
one there are schemas for, and the vendored CRD schemas for ServiceMonitor,
PrometheusRule and ScaledObject.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chart import (
    CHART,
    EXAMPLES,
    KUBERNETES_VERSION,
    OLDEST_KUBERNETES_VERSION,
    crd_validators,
    helm,
    kinds,
    manifest_errors,
    render,
)

VALUES_SETS = [None, *EXAMPLES]


def values_id(path: Path | None) -> str:
    return path.name if path else "defaults"


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {values_id(p): render(*([p] if p else [])) for p in VALUES_SETS}


@pytest.mark.parametrize("version", [KUBERNETES_VERSION, OLDEST_KUBERNETES_VERSION])
@pytest.mark.parametrize("values", VALUES_SETS, ids=values_id)
def test_every_rendered_object_passes_strict_kubernetes_validation(
    rendered: dict[str, list[dict[str, Any]]], values: Path | None, version: str
) -> None:
    documents = rendered[values_id(values)]
    assert documents
    errors = [error for document in documents for error in manifest_errors(document, version)]
    assert errors == []


def test_the_examples_together_render_every_custom_resource(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    """So the CRD validation above has something to validate for each vendored CRD."""
    seen = {(d["apiVersion"], d["kind"]) for docs in rendered.values() for d in docs}
    assert set(crd_validators()) <= seen


@pytest.mark.parametrize(
    "document",
    [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}, "spec": {"portz": []}},
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "d"},
            "spec": {"replicas": "two", "selector": {}, "template": {}},
        },
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "x", "label": {}}},
        {"apiVersion": "example.com/v1", "kind": "Unknown", "metadata": {"name": "u"}},
        {
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "PrometheusRule",
            "metadata": {"name": "r"},
            "spec": {"groups": [{"name": "g", "rules": [{"alert": "A", "expr": "up", "fo": 1}]}]},
        },
        {
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "ServiceMonitor",
            "metadata": {"name": "m", "labelz": {}},
            "spec": {"endpoints": [], "selector": {}},
        },
        {
            "apiVersion": "keda.sh/v1alpha1",
            "kind": "ScaledObject",
            "metadata": {"name": "o"},
            "spec": {"scaleTargetRef": {"name": "w"}, "triggers": [{"type": 1, "metadata": {}}]},
        },
    ],
    ids=[
        "unknown field",
        "wrong type",
        "unknown metadata field",
        "unknown kind",
        "unknown rule field",
        "unknown metadata field of a custom resource",
        "wrong type in a custom resource",
    ],
)
def test_the_validation_refuses_what_the_api_server_would(document: dict[str, Any]) -> None:
    assert manifest_errors(document)


@pytest.mark.parametrize("values", VALUES_SETS, ids=values_id)
def test_helm_lint_strict_is_clean(values: Path | None) -> None:
    args = ["lint", str(CHART), "--strict"] + (["--values", str(values)] if values else [])
    result = helm(*args, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[INFO]" not in result.stdout and "[WARNING]" not in result.stdout, result.stdout


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        ("config.visibilityTimeout=thirty", "visibilityTimeout"),
        ("api.replicas=two", "replicas"),
        ("worker.handlers=echo", "handlers"),
        ("alerts.noLeader=true", "alerts"),
    ],
    ids=["wrong type", "wrong type of a count", "unknown key", "unknown top-level key"],
)
def test_values_schema_refuses_a_wrong_type_and_an_unknown_key(setting: str, named: str) -> None:
    result = helm("template", "eat", str(CHART), "--set", setting, check=False)
    assert result.returncode != 0, result.stdout
    assert "values don't meet the specifications of the schema" in result.stderr
    assert named in result.stderr


def test_chart_declares_its_kubernetes_floor_and_helm_enforces_it() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text(encoding="utf-8"))
    assert chart["kubeVersion"] == ">=1.23.0-0"
    old = helm("template", "eat", str(CHART), "--kube-version", "1.22.0", check=False)
    assert old.returncode != 0 and "kubeVersion" in old.stderr
    for version in ("1.23.0", KUBERNETES_VERSION):
        helm("template", "eat", str(CHART), "--kube-version", version)


def test_defaults_render_the_same_objects_as_before_monitoring_was_added(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    """Monitoring objects are opt-in: the default install is what it was."""
    by_kind = kinds(rendered["defaults"])
    assert {kind: len(docs) for kind, docs in by_kind.items()} == {
        "PodDisruptionBudget": 3,
        "ServiceAccount": 1,
        "Secret": 1,
        "Service": 1,
        "Deployment": 3,
    }


def test_chart_icon_is_the_repositorys_own_svg() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text(encoding="utf-8"))
    (source,) = chart["sources"]
    prefix = f"{source}/raw/main/"
    assert chart["icon"].startswith(prefix)
    icon = CHART.parents[1] / chart["icon"].removeprefix(prefix)
    assert icon.suffix == ".svg" and "<svg" in icon.read_text(encoding="utf-8")


def test_notes_say_how_to_reach_the_api_the_dashboard_and_the_runbook() -> None:
    monitoring = CHART / "examples" / "monitoring.yaml"
    result = helm("install", "eat", str(CHART), "--namespace", "ns", "--dry-run=client")
    notes = result.stdout.split("NOTES:", 1)[1]
    assert "port-forward service/eat-echo-at-time-api 8080:8080" in notes
    assert "grafanaDashboard.enabled=true" in notes
    args = ("--dry-run=client", "--values", str(monitoring))
    notes = helm("install", "eat", str(CHART), "--namespace", "ns", *args).stdout
    notes = notes.split("NOTES:", 1)[1]
    assert 'ConfigMap "eat-echo-at-time-dashboard"' in notes
    assert "http://localhost:3000/d/echo-at-time" in notes
    runbook = yaml.safe_load(monitoring.read_text())["prometheusRule"]["runbookUrl"]
    assert runbook in notes
    balancer = ("--dry-run=client", "--set", "api.service.type=LoadBalancer")
    notes = helm("install", "eat", str(CHART), "--namespace", "ns", *balancer).stdout
    assert "status.loadBalancer.ingress" in notes


def test_the_webhook_values_reach_every_process_and_the_secret_only_the_workers() -> None:
    documents = render(
        extra=(
            "--set",
            "redis.url=redis://r:6379/0",
            "--set",
            "worker.handler=webhook",
            "--set",
            "webhook.url=https://hooks.example.com/in",
            "--set",
            "webhook.allow=*.example.com",
            "--set",
            "webhook.secret=whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        )
    )
    by_kind = kinds(documents)
    (secret,) = by_kind["Secret"]
    assert secret["stringData"]["webhook-secret"] == "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    for deployment in by_kind["Deployment"]:
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e for e in container["env"]}
        assert env["EAT_WEBHOOK_URL"]["value"] == "https://hooks.example.com/in"
        assert env["EAT_WEBHOOK_ALLOW"]["value"] == "*.example.com"
        assert env["EAT_WEBHOOK_TIMEOUT"]["value"] == "10"
        is_worker = container["args"][0] == "worker"
        assert ("EAT_WEBHOOK_SECRET" in env) is is_worker
        if is_worker:
            assert env["EAT_WEBHOOK_SECRET"]["valueFrom"]["secretKeyRef"]["key"] == "webhook-secret"
            assert container["args"][-2:] == ["--handler", "webhook"]
