"""The deployment files (Dockerfile, docker-compose.yml, the Helm chart) against the code.

No Docker engine or helm binary is needed for most of this: the files are parsed
and compared with what the code knows: ``app.cli.build_parser()`` for
subcommands and flags, ``app.settings.Settings`` for EAT_* variables (both
through ``tests/known.py``, which the docs' tests share), the
keyspace for the stream and consumer-group names. values.yaml and the example
values files are validated against values.schema.json with jsonschema, the way
Helm validates them (defaults coalesced with the overrides first).

``helm lint`` and ``helm template`` run with the pinned helm that
``scripts/bootstrap`` installs (``tests/chart.py``), and the rendered manifests
are checked here for what the code expects; ``test_chart_manifests.py`` checks
them against the Kubernetes and CRD schemas.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from app.settings import Settings, SettingsError
from app.store.keys import CONSUMER_GROUP, Keyspace, keyspaces
from tests.chart import CHART, EXAMPLES, helm, kinds, manifest_errors, render
from tests.known import EAT_NAME, assert_known_command, assert_known_settings

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.yml"
TEMPLATES = CHART / "templates"
DEPLOYMENTS = {
    "api": TEMPLATES / "api-deployment.yaml",
    "scheduler": TEMPLATES / "scheduler-deployment.yaml",
    "worker": TEMPLATES / "worker-deployment.yaml",
}

TEMPLATE_ACTION = re.compile(r"\{\{.*?\}\}")

# ---------------------------------------------------------------------------
# helpers


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def schema() -> dict[str, Any]:
    return json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))


def default_values() -> dict[str, Any]:
    return load_yaml(CHART / "values.yaml")


def coalesce(defaults: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Helm's merge of user values over the chart's: maps merge, null deletes, the rest replaces."""
    merged = copy.deepcopy(defaults)
    for key, value in overrides.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = coalesce(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def schema_errors(values: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(schema())
    return [
        f"{'/'.join(map(str, error.absolute_path))}: {error.message}"
        for error in validator.iter_errors(values)
    ]


def camel_to_env(key: str) -> str:
    return "EAT_" + re.sub(r"(?<!^)(?=[A-Z])", "_", key).upper()


# ---------------------------------------------------------------------------
# Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = DOCKERFILE.read_text(encoding="utf-8")
    logical: list[str] = []
    current = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        logical.append(current + stripped)
        current = ""
    result = []
    for entry in logical:
        instruction, _, arguments = entry.partition(" ")
        result.append((instruction.upper(), arguments.strip()))
    return result


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (ins, _) in enumerate(instructions) if ins == "FROM")
    return instructions[last_from:]


def test_dockerfile_is_multi_stage_on_python_311_slim() -> None:
    instructions = dockerfile_instructions()
    args = {
        name: default
        for ins, rest in instructions
        if ins == "ARG" and "=" in rest
        for name, default in [rest.split("=", 1)]
    }
    froms = [rest.split()[0] for ins, rest in instructions if ins == "FROM"]
    images = [re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image) for image in froms]
    assert len(images) >= 2, "builder and final stages"
    assert all(image == "python:3.11-slim" for image in images), images
    final = final_stage()
    assert any(ins == "COPY" and "--from=builder" in rest for ins, rest in final)


def test_dockerfile_final_stage_runs_unprivileged_without_compilers() -> None:
    final = final_stage()
    users = [rest for ins, rest in final if ins == "USER"]
    assert users, "the final stage sets USER"
    assert users[-1].split(":")[0] == "10001", users[-1]
    run_lines = " ".join(rest for ins, rest in final if ins == "RUN")
    for tool in ("gcc", "g++", "build-essential", "clang", "make", "apt-get install"):
        assert tool not in run_lines, f"final stage installs {tool!r}"
    assert ("EXPOSE", "8080") in final


def test_dockerfile_entrypoint_and_cmd_name_a_real_command() -> None:
    final = dict(final_stage())
    assert json.loads(final["ENTRYPOINT"]) == ["echo-at-time"]
    cmd = json.loads(final["CMD"])
    assert cmd == ["api", "--host", "0.0.0.0", "--port", "8080"]
    assert_known_command(cmd, "Dockerfile CMD")


def test_dockerfile_sets_only_existing_settings() -> None:
    names = set(EAT_NAME.findall(DOCKERFILE.read_text(encoding="utf-8")))
    assert_known_settings(names, "Dockerfile")


def test_dockerignore_keeps_the_build_context_small_but_complete() -> None:
    ignored = {
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", "tests"} <= ignored
    copied = {
        source
        for ins, rest in dockerfile_instructions()
        if ins == "COPY" and not rest.startswith("--from")
        for source in rest.split()[:-1]
    }
    assert {"pyproject.toml", "README.md", "app", "election", "workers"} <= copied
    for source in copied:
        assert source not in ignored, f"{source} is COPYed but excluded by .dockerignore"
        assert (ROOT / source).exists(), f"COPY {source}: no such file"


# ---------------------------------------------------------------------------
# docker-compose.yml


def compose_services() -> dict[str, dict[str, Any]]:
    return load_yaml(COMPOSE)["services"]


def app_services() -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in compose_services().items()
        if service.get("image", "").startswith("echo-at-time")
    }


def test_compose_runs_redis_with_aof_and_zookeeper() -> None:
    services = compose_services()
    redis = services["redis"]
    assert redis["image"] == "redis:7.0"
    command = redis["command"]
    command = command if isinstance(command, list) else shlex.split(command)
    assert "--appendonly" in command
    assert command[command.index("--appendonly") + 1] == "yes"
    assert services["zookeeper"]["image"] == "zookeeper:3.8"


def test_compose_runs_api_two_schedulers_and_two_workers() -> None:
    services = app_services()
    by_command: dict[str, list[str]] = {}
    for name, service in services.items():
        by_command.setdefault(service["command"][0], []).append(name)
    assert len(by_command["api"]) == 1
    assert len(by_command["scheduler"]) == 2
    assert len(by_command["worker"]) == 2
    (api,) = (services[name] for name in by_command["api"])
    assert "8080:8080" in api["ports"]
    assert api["command"][api["command"].index("--host") + 1] == "0.0.0.0"


def test_compose_commands_name_real_subcommands_and_flags() -> None:
    for name, service in app_services().items():
        command = service["command"]
        assert isinstance(command, list), f"{name}: use the exec (list) form"
        assert_known_command([str(token) for token in command], f"docker-compose {name}")


def test_compose_environment_uses_only_existing_settings() -> None:
    for name, service in app_services().items():
        environment = service.get("environment", {})
        assert isinstance(environment, dict), f"{name}: environment as a mapping"
        assert {"EAT_REDIS_URL", "EAT_ZK_HOSTS"} <= environment.keys(), name
        assert_known_settings(set(environment), f"docker-compose {name}")
    names = set(EAT_NAME.findall(COMPOSE.read_text(encoding="utf-8")))
    assert_known_settings(names, "docker-compose.yml")


def test_compose_healthchecks_use_the_configured_health_port() -> None:
    for name, service in app_services().items():
        test = " ".join(service["healthcheck"]["test"])
        port = service["environment"].get("EAT_HEALTH_PORT")
        if service["command"][0] == "api":
            assert "127.0.0.1:8080/readyz" in test, name
        else:
            assert port, f"{name}: a scheduler or worker needs EAT_HEALTH_PORT for its check"
            assert f"127.0.0.1:{port}/readyz" in test, name


# ---------------------------------------------------------------------------
# The chart's values and schema


def test_chart_metadata() -> None:
    chart = load_yaml(CHART / "Chart.yaml")
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "echo-at-time"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert chart["appVersion"] == project["version"], "appVersion is the image's default tag"


def test_schema_is_draft_07_and_closed_at_the_top() -> None:
    document = schema()
    assert document["$schema"] == "http://json-schema.org/draft-07/schema#"
    jsonschema.Draft7Validator.check_schema(document)
    assert document["additionalProperties"] is False
    for key in ("image", "redis", "zookeeper", "config", "api", "scheduler", "worker", "keda"):
        assert document["properties"][key]["additionalProperties"] is False, key


def test_values_yaml_validates_against_the_schema() -> None:
    assert schema_errors(default_values()) == []


def test_there_are_example_values_files() -> None:
    names = {path.name for path in EXAMPLES}
    assert {"keda.yaml", "production.yaml"} <= names


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda path: path.name)
def test_example_values_validate_against_the_schema(example: Path) -> None:
    overrides = load_yaml(example)
    assert isinstance(overrides, dict) and overrides
    assert schema_errors(coalesce(default_values(), overrides)) == []


BAD_VALUES = {
    "misspelt top-level key": {"workers": {"replicas": 3}},
    "misspelt nested key": {"api": {"replica": 3}},
    "string where a number goes": {"config": {"visibilityTimeout": "30s"}},
    "zero where positive is required": {"config": {"retryBase": 0}},
    "promote batch above the settings' cap": {"config": {"promoteBatch": 20000}},
    "unknown log level": {"config": {"logLevel": "verbose"}},
    "negative replicas": {"scheduler": {"replicas": -1}},
    "port out of range": {"healthPort": 70000},
    "redis URL of another scheme": {"redis": {"url": "http://redis:6379"}},
    "prefix ZooKeeper cannot use": {"prefix": ".."},
    "keda on without an address": {"keda": {"enabled": True}},
    "keda address with a scheme": {"keda": {"redis": {"address": "redis://r:6379"}}},
    "unknown service type": {"api": {"service": {"type": "Ingress"}}},
    "root user id": {"securityContext": {"runAsUser": 0}},
}


@pytest.mark.parametrize("overrides", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_bad_values_are_rejected(overrides: dict[str, Any]) -> None:
    assert schema_errors(coalesce(default_values(), overrides)), overrides


def test_schema_prefix_rule_agrees_with_settings() -> None:
    for prefix in ["eat", "eat-prod", "a.b_c-1", "x" * 64, "x" * 65, "", ".", "..", "a/b", "{a}"]:
        try:
            Settings(prefix=prefix).validate()
            settings_accept = True
        except SettingsError:
            settings_accept = False
        schema_accepts = not schema_errors(coalesce(default_values(), {"prefix": prefix}))
        assert schema_accepts == settings_accept, prefix


def test_every_key_of_values_yaml_is_documented() -> None:
    """Each key has a comment line right above it (resource quantities excepted)."""
    lines = (CHART / "values.yaml").read_text(encoding="utf-8").splitlines()
    key_line = re.compile(r"^(\s*)([A-Za-z][A-Za-z0-9_-]*):")
    parents: list[tuple[int, str]] = []
    undocumented = []
    for number, line in enumerate(lines):
        match = key_line.match(line)
        if not match:
            continue
        indent, key = len(match.group(1)), match.group(2)
        while parents and parents[-1][0] >= indent:
            parents.pop()
        path = [name for _, name in parents] + [key]
        parents.append((indent, key))
        if "resources" in path[:-1]:
            continue
        previous = lines[number - 1].strip() if number else ""
        if not previous.startswith("#"):
            undocumented.append(".".join(path))
    assert undocumented == []


def _resolve(node: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        path = node["$ref"].removeprefix("#/").split("/")
        target: Any = root
        for part in path:
            target = target[part]
        node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    return node


def _schema_keys_missing(
    node: dict[str, Any], values: Any, root: dict[str, Any], path: str
) -> Iterator[str]:
    node = _resolve(node, root)
    for key, child in node.get("properties", {}).items():
        if key == "global" and not path:
            continue
        if not isinstance(values, dict) or key not in values:
            yield f"{path}{key}"
        else:
            yield from _schema_keys_missing(child, values[key], root, f"{path}{key}.")


def test_every_schema_key_has_a_default_in_values_yaml() -> None:
    document = schema()
    assert list(_schema_keys_missing(document, default_values(), document, "")) == []


def test_config_defaults_are_the_processes_defaults() -> None:
    values = default_values()
    defaults = {f"EAT_{f.name.upper()}": f.default for f in dataclasses.fields(Settings)}
    assert values["prefix"] == defaults["EAT_PREFIX"]
    for key, value in values["config"].items():
        variable = camel_to_env(key)
        assert variable in defaults, f"config.{key} maps to {variable}, which is no setting"
        if key == "logFormat":
            assert value == "json", "pods log JSON lines for the cluster's log collector"
        else:
            assert value == defaults[variable], f"config.{key}"


def test_grace_period_outlasts_a_worker_drain() -> None:
    values = default_values()
    assert values["terminationGracePeriodSeconds"] >= 60
    assert values["terminationGracePeriodSeconds"] > values["config"]["visibilityTimeout"]
    for example in EXAMPLES:
        merged = coalesce(values, load_yaml(example))
        assert merged["terminationGracePeriodSeconds"] > merged["config"]["visibilityTimeout"]
    # ...and the chart refuses to render when a user breaks that.
    helpers = (TEMPLATES / "_helpers.tpl").read_text(encoding="utf-8")
    assert "fail" in helpers and "config.visibilityTimeout" in helpers
    assert 'include "echo-at-time.checkGracePeriod"' in DEPLOYMENTS["worker"].read_text()


def test_scheduler_defaults_to_two_replicas() -> None:
    assert default_values()["scheduler"]["replicas"] == 2


# ---------------------------------------------------------------------------
# The chart's templates, as text


def chart_text_files() -> list[Path]:
    files = [CHART / "values.yaml", CHART / "values.schema.json", *EXAMPLES]
    return files + sorted(path for path in TEMPLATES.iterdir() if path.is_file())


def test_chart_uses_only_existing_settings() -> None:
    for path in chart_text_files():
        names = set(EAT_NAME.findall(path.read_text(encoding="utf-8")))
        assert_known_settings(names, str(path.relative_to(ROOT)))


def test_chart_passes_every_config_key_and_the_new_settings() -> None:
    helpers = (TEMPLATES / "_helpers.tpl").read_text(encoding="utf-8")
    for key in default_values()["config"]:
        assert f"name: {camel_to_env(key)}" in helpers, key
    for variable in (
        "EAT_REDIS_URL",
        "EAT_ZK_HOSTS",
        "EAT_PREFIX",
        "EAT_API_TOKEN",
        "EAT_ZK_AUTH",
        "EAT_REDIS_CA_FILE",
        "EAT_HEALTH_HOST",
        "EAT_HEALTH_PORT",
    ):
        assert f"name: {variable}" in helpers, variable


def test_chart_container_args_are_real_commands() -> None:
    for component, path in DEPLOYMENTS.items():
        (line,) = re.findall(r"^\s*args: (\[.*\])$", path.read_text(encoding="utf-8"), re.M)
        argv = yaml.safe_load(TEMPLATE_ACTION.sub('"1"', line))
        assert argv[0] == component
        assert_known_command(argv, f"{path.name} args")


@pytest.mark.parametrize("component", DEPLOYMENTS)
def test_deployment_templates_have_probes_and_the_shared_pod_settings(component: str) -> None:
    text = DEPLOYMENTS[component].read_text(encoding="utf-8")
    port = "http" if component == "api" else "health"
    for needle in (
        "livenessProbe:",
        "readinessProbe:",
        "path: /healthz",
        "path: /readyz",
        f"port: {port}",
        f"- name: {port}",
        'include "echo-at-time.podSpec"',
        'include "echo-at-time.container"',
        'include "echo-at-time.env"',
        "resources:",
    ):
        assert needle in text, f"{component}: {needle}"


def test_helpers_hold_the_restrictive_security_context() -> None:
    helpers = (TEMPLATES / "_helpers.tpl").read_text(encoding="utf-8")
    for needle in (
        "securityContext:",
        "runAsNonRoot: true",
        "runAsUser:",
        "readOnlyRootFilesystem: true",
        "allowPrivilegeEscalation: false",
        'drop: ["ALL"]',
        "type: RuntimeDefault",
        "terminationGracePeriodSeconds:",
        "automountServiceAccountToken: false",
        "mountPath: /tmp",
    ):
        assert needle in helpers, needle
    assert default_values()["securityContext"]["runAsUser"] == 10001


def test_secret_keys_match_the_references() -> None:
    secret = (TEMPLATES / "secret.yaml").read_text(encoding="utf-8")
    string_data = secret.split("stringData:", 1)[1]
    made = set(re.findall(r"^\s+([a-z-]+): \{\{", string_data, re.M))
    helpers = (TEMPLATES / "_helpers.tpl").read_text(encoding="utf-8")
    referenced = set(re.findall(r"secretKeyRef:\s+name: .*\n\s+key: ([a-z-]+)", helpers))
    assert made == referenced == {"redis-url", "api-token", "zk-auth", "webhook-secret"}
    assert ".Values.existingSecret" in helpers


def test_keda_template_targets_the_stream_and_group_the_workers_use() -> None:
    text = (TEMPLATES / "worker-scaledobject.yaml").read_text(encoding="utf-8")
    assert "apiVersion: keda.sh/v1alpha1" in text
    assert "kind: ScaledObject" in text
    assert f"consumerGroup: {CONSUMER_GROUP}" in text
    for field in ("address:", "lagCount:", "activationLagCount:", "databaseIndex:", "enableTLS:"):
        assert field in text, field
    for prefix in ("eat", "eat-prod"):
        (scaled,) = kinds(render(extra=(*KEDA_ON, "--set", f"prefix={prefix}")))["ScaledObject"]
        (trigger,) = scaled["spec"]["triggers"]
        assert trigger["type"] == "redis-streams"
        assert trigger["metadata"]["stream"] == Keyspace(prefix).stream
        assert "advanced" not in scaled["spec"], "one partition needs no formula"


KEDA_ON = ("--set", "keda.enabled=true", "--set", "keda.redis.address=r:6379")


@pytest.mark.parametrize(
    ("cluster", "kind"), [("auto", "redis-streams"), ("true", "redis-cluster-streams")]
)
def test_keda_scales_on_the_sum_of_every_partitions_lag(cluster: str, kind: str) -> None:
    extra = (*KEDA_ON, "--set", "config.partitions=4", "--set-string", f"redis.cluster={cluster}")
    extra += ("--set", "keda.lagCount=25", "--set", "prefix=p")
    (scaled,) = kinds(render(extra=extra))["ScaledObject"]
    triggers = scaled["spec"]["triggers"]
    assert [t["type"] for t in triggers] == [kind] * 4
    assert [t["metadata"]["stream"] for t in triggers] == [k.stream for k in keyspaces("p", 4)]
    assert all(t["metadata"]["consumerGroup"] == CONSUMER_GROUP for t in triggers)
    address = "addresses" if cluster == "true" else "address"
    assert all(t["metadata"][address] == "r:6379" for t in triggers)
    # The HPA takes the largest of several metrics; the formula makes it the sum, so
    # the pods follow the total lag, lagCount entries each.
    modifiers = scaled["spec"]["advanced"]["scalingModifiers"]
    assert [t["name"] for t in triggers] == ["p0", "p1", "p2", "p3"]
    assert modifiers["formula"] == "p0 + p1 + p2 + p3"
    assert (modifiers["target"], modifiers["metricType"]) == ("25", "AverageValue")
    assert manifest_errors(scaled) == []


def test_helm_template_cluster_example() -> None:
    example = CHART / "examples" / "cluster.yaml"
    values = merged_values(example)
    by_kind = kinds(render(example))
    check_deployments(by_kind["Deployment"], values)
    (scaled,) = by_kind["ScaledObject"]
    partitions = values["config"]["partitions"]
    assert len(scaled["spec"]["triggers"]) == partitions == 16
    assert {t["type"] for t in scaled["spec"]["triggers"]} == {"redis-cluster-streams"}
    worker = next(
        d
        for d in by_kind["Deployment"]
        if d["metadata"]["labels"]["app.kubernetes.io/component"] == "worker"
    )
    env = {
        e["name"]: e.get("value")
        for e in worker["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["EAT_REDIS_CLUSTER"] == "true" and env["EAT_PARTITIONS"] == "16"
    assert env["EAT_WAIT_REPLICAS"] == "1"
    # One hash tag for the three legacy lists, as a cluster requires.
    names = [env["EAT_LEGACY_QUEUE"], env["EAT_LEGACY_DELAYED"], env["EAT_LEGACY_IN_FLIGHT"]]
    assert {name[: name.index("}") + 1] for name in names} == {"{legacy}"}


def test_other_templates_use_the_expected_apis() -> None:
    expectations = {
        "api-hpa.yaml": ["apiVersion: autoscaling/v2", "kind: HorizontalPodAutoscaler"],
        "api-service.yaml": ["kind: Service", "targetPort: http"],
        "servicemonitor.yaml": [
            "apiVersion: monitoring.coreos.com/v1",
            "kind: ServiceMonitor",
            "path: /metrics",
            "- port: http",
            "- port: health",
        ],
        "pdb.yaml": ["apiVersion: policy/v1", "minAvailable: 1", "maxUnavailable: 1"],
        "NOTES.txt": ["port-forward", "/api/v1/save-message"],
    }
    for name, needles in expectations.items():
        text = (TEMPLATES / name).read_text(encoding="utf-8")
        for needle in needles:
            assert needle in text, f"{name}: {needle}"
    assert (TEMPLATES / "pdb.yaml").read_text().count("maxUnavailable: 1") == 2


# ---------------------------------------------------------------------------
# helm lint and helm template (the pinned helm)


def merged_values(*values_files: Path) -> dict[str, Any]:
    merged = default_values()
    for path in values_files:
        merged = coalesce(merged, load_yaml(path))
    return merged


def check_deployments(documents: list[dict[str, Any]], values: dict[str, Any]) -> None:
    deployments = {d["metadata"]["labels"]["app.kubernetes.io/component"]: d for d in documents}
    assert set(deployments) == {"api", "scheduler", "worker"}
    for component, deployment in deployments.items():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert pod["terminationGracePeriodSeconds"] > values["config"]["visibilityTimeout"]
        (container,) = pod["containers"]
        security = container["securityContext"]
        assert security["runAsNonRoot"] is True
        assert security["runAsUser"] == 10001
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        port = "http" if component == "api" else "health"
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port}
        assert port in {p["name"] for p in container["ports"]}
        assert container["resources"]["requests"] and container["resources"]["limits"]
        assert_known_command([str(a) for a in container["args"]], f"rendered {component}")
        env = {e["name"]: e for e in container["env"]}
        assert_known_settings({n for n in env if n.startswith("EAT_")}, f"rendered {component}")
        assert "secretKeyRef" in env["EAT_REDIS_URL"]["valueFrom"]
        if component != "api":
            assert env["EAT_HEALTH_HOST"]["value"] == "0.0.0.0"
            assert env["EAT_HEALTH_PORT"]["value"] == str(values["healthPort"])
        for variable, entry in env.items():
            if "value" in entry:
                assert isinstance(entry["value"], str), variable
                assert "e+" not in entry["value"], f"{variable}={entry['value']}"


@pytest.mark.parametrize("example", [None, *EXAMPLES], ids=lambda p: p.name if p else "defaults")
def test_helm_lint(example: Path | None) -> None:
    args = ["lint", str(CHART), "--strict"]
    if example is not None:
        args += ["--values", str(example)]
    result = helm(*args, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_helm_template_defaults() -> None:
    documents = render()
    by_kind = kinds(documents)
    assert len(by_kind["Deployment"]) == 3
    assert {"Service", "Secret", "PodDisruptionBudget", "ServiceAccount"} <= by_kind.keys()
    assert "ScaledObject" not in by_kind and "ServiceMonitor" not in by_kind
    check_deployments(by_kind["Deployment"], default_values())
    budgets = {
        p["metadata"]["labels"]["app.kubernetes.io/component"]: p["spec"]
        for p in by_kind["PodDisruptionBudget"]
    }
    assert budgets["scheduler"]["minAvailable"] == 1
    assert budgets["api"]["maxUnavailable"] == budgets["worker"]["maxUnavailable"] == 1
    (secret,) = by_kind["Secret"]
    assert set(secret["stringData"]) == {"redis-url"}


def test_helm_template_keda_example() -> None:
    example = CHART / "examples" / "keda.yaml"
    values = merged_values(example)
    by_kind = kinds(render(example))
    check_deployments(by_kind["Deployment"], values)
    (scaled,) = by_kind["ScaledObject"]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    worker = next(
        d
        for d in by_kind["Deployment"]
        if d["metadata"]["labels"]["app.kubernetes.io/component"] == "worker"
    )
    assert scaled["spec"]["scaleTargetRef"]["name"] == worker["metadata"]["name"]
    assert "replicas" not in worker["spec"], "KEDA owns the worker count"
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "redis-streams"
    metadata = trigger["metadata"]
    assert metadata["stream"] == Keyspace(values["prefix"]).stream
    assert metadata["consumerGroup"] == CONSUMER_GROUP
    assert metadata["lagCount"] == str(values["keda"]["lagCount"])
    assert metadata["address"] == values["keda"]["redis"]["address"]
    assert all(isinstance(v, str) for v in metadata.values()), "KEDA metadata are strings"
    (monitor,) = by_kind["ServiceMonitor"]
    assert {e["port"] for e in monitor["spec"]["endpoints"]} == {"http", "health"}
    assert all(e["path"] == "/metrics" for e in monitor["spec"]["endpoints"])


def test_helm_template_production_example() -> None:
    example = CHART / "examples" / "production.yaml"
    values = merged_values(example)
    by_kind = kinds(render(example))
    check_deployments(by_kind["Deployment"], values)
    assert "Secret" not in by_kind, "existingSecret replaces the chart's Secret"
    (hpa,) = by_kind["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert "ServiceMonitor" in by_kind


@pytest.mark.parametrize(
    "overrides",
    [
        ("--set", "workers.replicas=3"),
        ("--set", "keda.enabled=true"),
        ("--set", "terminationGracePeriodSeconds=20"),
    ],
    ids=["misspelt key", "keda without address", "grace period below drain"],
)
def test_helm_refuses_bad_values(overrides: tuple[str, ...]) -> None:
    result = helm("template", "eat", str(CHART), *overrides, check=False)
    assert result.returncode != 0, result.stdout
