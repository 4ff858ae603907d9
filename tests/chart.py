"""The Helm chart as the tests see it: the pinned ``helm``, rendering, and strict
validation of every object it renders.

``scripts/bootstrap`` puts ``helm`` and ``promtool`` in ``.tools/bin`` (see
``scripts/tools.py``); a test that needs one and finds neither there nor on PATH
fails, naming the command that installs it: chart tests never skip.

Built-in kinds are validated with ``kubernetes-validate`` (the Kubernetes JSON
schemas, offline) in strict mode: an unknown field, a missing required field or a
wrong type is an error. The custom resources (ServiceMonitor, PrometheusRule,
ScaledObject) are validated against the ``openAPIV3Schema`` of their published
CRDs, vendored in ``tests/crds/``, made strict the way the API server's strict
field validation is: an object schema that lists its properties refuses others,
unless it says ``x-kubernetes-preserve-unknown-fields``.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "echo-at-time"
EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))
CRDS = Path(__file__).resolve().parent / "crds"
TOOLS = ROOT / ".tools" / "bin"

# The Kubernetes release the rendered objects are validated against: the newest whose
# kubectl ships beside the pinned helm. The chart's kubeVersion floor is checked too.
KUBERNETES_VERSION = "1.35.0"
# The oldest release kubernetes-validate has schemas for (the chart says >=1.23).
OLDEST_KUBERNETES_VERSION = "1.25.0"


def tool(name: str) -> str:
    """Path of ``name`` from ``.tools/bin`` (pinned), else from PATH; fails without one."""
    pinned = TOOLS / name
    if pinned.is_file():
        return str(pinned)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"no {name}: run scripts/bootstrap (it puts one in .tools/bin)")
    return found


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("helm"), *args], capture_output=True, text=True, timeout=120, check=check
    )


def render(
    *values_files: Path, extra: tuple[str, ...] = (), namespace: str = "ns"
) -> list[dict[str, Any]]:
    """``helm template eat <chart>`` with these values: the documents, in order."""
    args = ["template", "eat", str(CHART), "--namespace", namespace]
    for path in values_files:
        args += ["--values", str(path)]
    result = helm(*args, *extra)
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def kinds(documents: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for document in documents:
        by_kind.setdefault(document["kind"], []).append(document)
    return by_kind


# ---------------------------------------------------------------------------
# Validation


def _strict(schema: Any) -> Any:
    """An OpenAPI v3 structural schema as a JSON schema refusing unknown fields."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    result = {key: _strict(value) for key, value in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        result["additionalProperties"] = False
    if schema.get("nullable") and isinstance(schema.get("type"), str):
        result["type"] = [schema["type"], "null"]
    return result


@functools.cache
def crd_validators() -> dict[tuple[str, str], jsonschema.protocols.Validator]:
    """(apiVersion, kind) -> a validator of that custom resource's vendored schema."""
    validators = {}
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text(encoding="utf-8"))
        spec = crd["spec"]
        for version in spec["versions"]:
            if not version.get("served"):
                continue
            schema = _strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
            api_version = f"{spec['group']}/{version['name']}"
            validators[(api_version, spec["names"]["kind"])] = jsonschema.Draft7Validator(schema)
    return validators


def _errors(validator: jsonschema.protocols.Validator, document: Any) -> Iterator[str]:
    for error in validator.iter_errors(document):
        yield f"{'.'.join(map(str, error.absolute_path)) or '(root)'}: {error.message}"


def _builtin_errors(document: dict[str, Any], version: str) -> list[str]:
    try:
        kubernetes_validate.validate(document, version, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{'.'.join(map(str, error.path)) or '(root)'}: {error.message}"]
    except kubernetes_validate.SchemaNotFoundError as error:
        return [f"{error.message} (nor a vendored CRD in tests/crds)"]
    return []


def manifest_errors(document: dict[str, Any], version: str = KUBERNETES_VERSION) -> list[str]:
    """Why the API server would refuse ``document`` under strict field validation, if it would."""
    key = (document.get("apiVersion"), document.get("kind"))
    custom = crd_validators().get(key)  # type: ignore[arg-type]
    if custom is None:
        errors = _builtin_errors(document, version)
    else:
        errors = list(_errors(custom, document))
        # The CRD says only "metadata: object"; the API server checks it as ObjectMeta.
        probe = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": document.get("metadata")}
        errors += _builtin_errors(probe, version)
    name = f"{key[1]} {document.get('metadata', {}).get('name')}"
    return [f"{name}: {error}" for error in errors]


# ---------------------------------------------------------------------------
# What the monitoring the chart ships queries

DASHBOARD = CHART / "dashboards" / "echo-at-time.json"

# Grafana's variables, as a query sees them once Grafana substituted them.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "30s",
    "$__range": "1h",
    "$namespace": "ns",
    "$release": "eat-echo-at-time",
}

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.$:])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:])(?!\s*\()")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "by", "without", "on"}


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, labels or keywords)."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers, their strings already blanked
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range and subquery windows
    text = _GROUPING.sub(" ", text)
    return {name for name in _IDENTIFIER.findall(text) if name.lower() not in _KEYWORDS}


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def dashboard_queries(document: dict[str, Any] | None = None) -> dict[str, list[str]]:
    """Panel title -> the PromQL of each of its targets."""
    document = dashboard() if document is None else document
    return {
        panel["title"]: [target["expr"] for target in panel.get("targets", [])]
        for panel in document["panels"]
        if panel["type"] != "row"
    }


def with_grafana_variables(expr: str) -> str:
    for name in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, GRAFANA_VARIABLES[name])
    return expr


def alert_expressions(*settings: str) -> dict[str, str]:
    """Alert name -> expression, as the chart renders them with prometheusRule on."""
    extra: tuple[str, ...] = ("--set", "prometheusRule.enabled=true")
    extra += ("--set", "serviceMonitor.enabled=true")
    for setting in settings:
        extra += ("--set", setting)
    (rule,) = kinds(render(extra=extra))["PrometheusRule"]
    return {r["alert"]: r["expr"] for group in rule["spec"]["groups"] for r in group["rules"]}


# Metrics the alerts read that no echo-at-time process exports, and where they come from.
EXTERNAL_METRICS = {"kube_pod_container_status_restarts_total": "kube-state-metrics"}


def exposed_names(exposition: str) -> set[str]:
    """Every series name a Prometheus text exposition offers: its samples' names, and for
    a family with no sample yet (a labelled metric no label set was used on), the names
    its declared type gives."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "gauge": ("",),
        "summary": ("", "_count", "_sum", "_created"),
    }
    names = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(" ", 3)
            base = family.removesuffix("_total") if kind == "counter" else family
            names |= {base + suffix for suffix in suffixes.get(kind, ("",))}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names
