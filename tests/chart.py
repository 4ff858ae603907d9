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
