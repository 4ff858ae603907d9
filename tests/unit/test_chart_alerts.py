"""The chart's alerting rules, evaluated by Prometheus' own ``promtool test rules``.

Each alert of ``templates/prometheusrule.yaml`` is rendered by the pinned helm and
run by promtool (Debian's, from ``.tools/bin``) against series shaped like the
ones the chart's ServiceMonitor produces: it fires in the situation it is named
for, with the labels and annotations an operator reads, and stays quiet in the
look-alike situations that are fine (a failover, a flat backlog, another
release's pods). Every alert links to its section of docs/runbook.md.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chart import CHART, ROOT, helm, kinds, render, tool
from tests.unit.test_docs import anchors as runbook_anchors

RUNBOOK = ROOT / "docs" / "runbook.md"
NAMESPACE = "ns"
FULLNAME = "eat-echo-at-time"  # release "eat", the chart's name

# Series labels as Prometheus stores them for each process (job: the Service scraped).
API = {"namespace": NAMESPACE, "job": f"{FULLNAME}-api", "pod": f"{FULLNAME}-api-6f9c-x1"}
SCHEDULER = {"namespace": NAMESPACE, "job": f"{FULLNAME}-scheduler-metrics"}
WORKER = {"namespace": NAMESPACE, "job": f"{FULLNAME}-worker-metrics", "pod": "w-1"}
# The queue gauges carry the partition (every process reports every partition).
P0, P1, P2 = ({"partition": str(p)} for p in range(3))


def series(name: str, labels: dict[str, str], values: str) -> dict[str, str]:
    matchers = ",".join(f'{key}="{value}"' for key, value in labels.items())
    return {"series": f"{name}{{{matchers}}}", "values": values}


def rule_groups(*settings: str) -> list[dict[str, Any]]:
    extra: tuple[str, ...] = ("--set", "prometheusRule.enabled=true")
    extra += ("--set", "serviceMonitor.enabled=true")
    for setting in settings:
        extra += ("--set", setting)
    (rule,) = kinds(render(extra=extra, namespace=NAMESPACE))["PrometheusRule"]
    return rule["spec"]["groups"]


def alerts(groups: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for group in groups for rule in group["rules"]}


def promtool_test(
    tmp_path: Path, groups: list[dict[str, Any]], case: dict[str, Any]
) -> tuple[bool, str]:
    """Run one promtool test case; (passed, promtool's output)."""
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}), encoding="utf-8")
    test = {"rule_files": ["rules.yaml"], "evaluation_interval": "30s", "tests": [case]}
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(test), encoding="utf-8")
    result = subprocess.run(
        [tool("promtool"), "test", "rules", "test.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result.returncode == 0, result.stdout + result.stderr


@dataclass(frozen=True)
class Fires:
    """One firing alert as promtool must see it: the rule's severity and annotations, the
    ``description`` as rendered with the alert's value, and the series' own labels."""

    alert: str
    description: str
    labels: dict[str, str] = field(default_factory=dict)

    def expected(self, groups: list[dict[str, Any]]) -> dict[str, Any]:
        rule = alerts(groups)[self.alert]
        return {
            "exp_labels": {"severity": rule["labels"]["severity"], **self.labels},
            "exp_annotations": {
                "summary": rule["annotations"]["summary"],
                "description": self.description,
                "runbook_url": rule["annotations"]["runbook_url"],
            },
        }


@dataclass(frozen=True)
class Scenario:
    inputs: list[dict[str, str]]
    alert: str
    at: str
    fires: Fires | None = None

    def case(self, groups: list[dict[str, Any]]) -> dict[str, Any]:
        fired = [] if self.fires is None else [self.fires.expected(groups)]
        return {
            "interval": "30s",
            "input_series": self.inputs,
            "alert_rule_test": [
                {"eval_time": self.at, "alertname": self.alert, "exp_alerts": fired}
            ],
        }


@pytest.fixture(scope="module")
def groups() -> list[dict[str, Any]]:
    return rule_groups()


# ---------------------------------------------------------------------------
# The rules as a whole


def test_promtool_accepts_the_rules(tmp_path: Path, groups: list[dict[str, Any]]) -> None:
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}), encoding="utf-8")
    result = subprocess.run(
        [tool("promtool"), "check", "rules", "rules.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_rules_have_the_alerts_an_operator_needs(groups: list[dict[str, Any]]) -> None:
    assert set(alerts(groups)) == {
        "EchoAtTimeNoLeader",
        "EchoAtTimeMessagesLate",
        "EchoAtTimeLagGrowing",
        "EchoAtTimeDeadLetters",
        "EchoAtTimePromotionRefused",
        "EchoAtTimeRestartLoop",
        "EchoAtTimeRedisUnavailable",
    }
    for name, rule in alerts(groups).items():
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        assert {"summary", "description", "runbook_url"} == set(rule["annotations"]), name


def test_every_alert_links_to_its_own_section_of_the_runbook(
    groups: list[dict[str, Any]],
) -> None:
    base = yaml.safe_load((CHART / "values.yaml").read_text())["prometheusRule"]["runbookUrl"]
    assert base.endswith("/docs/runbook.md")
    anchors = runbook_anchors(RUNBOOK)
    for name, rule in alerts(groups).items():
        url, _, anchor = rule["annotations"]["runbook_url"].partition("#")
        assert url == base, name
        assert anchor == name.lower() and anchor in anchors, name


def test_thresholds_selector_and_labels_are_values() -> None:
    groups = rule_groups(
        "prometheusRule.messagesLate.seconds=120",
        "prometheusRule.noLeader.for=3m",
        'prometheusRule.selector=cluster="c1"',
        "prometheusRule.alertLabels.team=messaging",
        "prometheusRule.runbookUrl=https://wiki.example/runbook",
    )
    rules = alerts(groups)
    assert rules["EchoAtTimeMessagesLate"]["expr"].endswith("> 120")
    assert rules["EchoAtTimeNoLeader"]["for"] == "3m"
    assert 'eat_leader{cluster="c1"}' in rules["EchoAtTimeNoLeader"]["expr"]
    assert all(rule["labels"]["team"] == "messaging" for rule in rules.values())
    assert rules["EchoAtTimeNoLeader"]["annotations"]["runbook_url"] == (
        "https://wiki.example/runbook#echoattimenoleader"
    )


def test_rules_without_a_way_to_find_the_releases_series_are_refused() -> None:
    """No ServiceMonitor and no selector: no series would match, and NoLeader would fire."""
    result = helm(
        "template", "eat", str(CHART), "--set", "prometheusRule.enabled=true", check=False
    )
    assert result.returncode != 0
    assert "prometheusRule.selector" in result.stderr
    selector = ("--set", 'prometheusRule.selector=job="eat"')
    helm("template", "eat", str(CHART), "--set", "prometheusRule.enabled=true", *selector)


def test_rules_only_pick_this_releases_series(groups: list[dict[str, Any]]) -> None:
    for name, rule in alerts(groups).items():
        selectors = re.findall(r"\{([^}]*)\}", rule["expr"])
        assert selectors, name
        for selector in selectors:
            assert f'namespace="{NAMESPACE}"' in selector, name
            assert FULLNAME in selector, name


# ---------------------------------------------------------------------------
# Each alert, evaluated


def scenarios() -> dict[str, Scenario]:
    leader, standby = dict(SCHEDULER, pod="s-1"), dict(SCHEDULER, pod="s-2")
    late = "The earliest due message has waited 1m 30s in the delayed set."
    other_release = dict(SCHEDULER, job="other-echo-at-time-scheduler-metrics", pod="o-1")
    worker_pod = f"{FULLNAME}-worker-7d9f8c-abcde"
    restarts = {"namespace": NAMESPACE, "pod": worker_pod, "container": "worker"}
    restart_text = f"Container worker of pod {worker_pod} restarted 6 times in the last 15m."
    ok = {"route": "/readyz", "method": "GET", "status": "200"}
    unavailable = {"route": "/readyz", "method": "GET", "status": "503"}
    saved = {"route": "/api/v1/save-message", "method": "POST", "status": "201"}
    return {
        "no leader for longer than its for: fires": Scenario(
            [series("eat_leader", leader, "1 1 0x10"), series("eat_leader", standby, "0x12")],
            "EchoAtTimeNoLeader",
            "3m",
            Fires(
                "EchoAtTimeNoLeader",
                "No scheduler of ns/eat has led for 1m: messages that fall due stay in the "
                "delayed set.",
            ),
        ),
        "no scheduler scraped at all: fires": Scenario(
            [series("eat_stream_length", API, "0x12")],
            "EchoAtTimeNoLeader",
            "3m",
            Fires(
                "EchoAtTimeNoLeader",
                "No scheduler of ns/eat has led for 1m: messages that fall due stay in the "
                "delayed set.",
            ),
        ),
        "another release's leader does not count: fires": Scenario(
            [series("eat_leader", leader, "0x12"), series("eat_leader", other_release, "1x12")],
            "EchoAtTimeNoLeader",
            "3m",
            Fires(
                "EchoAtTimeNoLeader",
                "No scheduler of ns/eat has led for 1m: messages that fall due stay in the "
                "delayed set.",
            ),
        ),
        "a failover shorter than its for: quiet": Scenario(
            [
                series("eat_leader", leader, "1 1 1 0 _x8"),
                series("eat_leader", standby, "0 0 0 0 1x8"),
            ],
            "EchoAtTimeNoLeader",
            "5m",
        ),
        "due message waiting 90 s: fires": Scenario(
            [
                series("eat_oldest_overdue_seconds", API | P0, "0x12"),
                series("eat_oldest_overdue_seconds", API | P1, "0 0 90x10"),
                series("eat_oldest_overdue_seconds", WORKER | P1, "0 0 90x10"),
            ],
            "EchoAtTimeMessagesLate",
            "4m",
            Fires("EchoAtTimeMessagesLate", late),
        ),
        "due messages promoted within seconds: quiet": Scenario(
            [series("eat_oldest_overdue_seconds", API | P0, "0 2 0 1 0 3 0 0 1 0")],
            "EchoAtTimeMessagesLate",
            "4m",
        ),
        "lag above its floor and growing for 10 min: fires": Scenario(
            [series("eat_stream_lag", WORKER | P0, "0+200x40")],
            "EchoAtTimeLagGrowing",
            "18m",
            Fires(
                "EchoAtTimeLagGrowing",
                "For 10m the stream's entries no worker has read have been more than 1000 "
                "and growing.",
            ),
        ),
        "a large but steady lag: quiet": Scenario(
            [series("eat_stream_lag", WORKER | P0, "5000x40")],
            "EchoAtTimeLagGrowing",
            "18m",
        ),
        "a growing lag under its floor: quiet": Scenario(
            [series("eat_stream_lag", WORKER | P0, "0+10x40")],
            "EchoAtTimeLagGrowing",
            "18m",
        ),
        "lag under the floor in each partition, above it summed, growing: fires": Scenario(
            [
                # Each under 1000 (760 at 18m), the three over it from the start.
                series("eat_stream_lag", WORKER | P, "400+10x40")
                for P in (P0, P1, P2)
            ],
            "EchoAtTimeLagGrowing",
            "18m",
            Fires(
                "EchoAtTimeLagGrowing",
                "For 10m the stream's entries no worker has read have been more than 1000 "
                "and growing.",
            ),
        ),
        "one partition's lag reported by two pods is counted once: quiet": Scenario(
            [
                # 636 at 18m: the two pods' series summed would be over 1000.
                series("eat_stream_lag", WORKER | P0, "600+1x40"),
                series("eat_stream_lag", API | P0, "600+1x40"),
            ],
            "EchoAtTimeLagGrowing",
            "18m",
        ),
        "two dead letters: fires": Scenario(
            [series("eat_messages_dead_lettered_total", WORKER, "0 0 1 2 2")],
            "EchoAtTimeDeadLetters",
            "2m",
            Fires(
                "EchoAtTimeDeadLetters",
                "2 messages were moved to the dead stream in the last 10m.",
            ),
        ),
        "a worker restart resetting its counter: quiet": Scenario(
            [series("eat_messages_dead_lettered_total", WORKER, "3 3 3 0 0 0")],
            "EchoAtTimeDeadLetters",
            "2m30s",
        ),
        "a fenced zombie leader: fires": Scenario(
            [series("eat_promote_refused_total", leader, "0 0 2 2 2")],
            "EchoAtTimePromotionRefused",
            "2m",
            Fires(
                "EchoAtTimePromotionRefused",
                "2 promote calls under a stale epoch were refused in the last 10m: a paused "
                "or partitioned leader was fenced.",
            ),
        ),
        "no refusal: quiet": Scenario(
            [series("eat_promote_refused_total", leader, "0x10")],
            "EchoAtTimePromotionRefused",
            "4m",
        ),
        "a worker restarting six times: fires": Scenario(
            [series("kube_pod_container_status_restarts_total", restarts, "0 1 2 3 4 5 6")],
            "EchoAtTimeRestartLoop",
            "3m",
            Fires("EchoAtTimeRestartLoop", restart_text, restarts),
        ),
        "another release's pod restarting: quiet": Scenario(
            [
                series(
                    "kube_pod_container_status_restarts_total",
                    dict(restarts, pod="other-echo-at-time-worker-7d9f8c-abcde"),
                    "0 1 2 3 4 5 6",
                )
            ],
            "EchoAtTimeRestartLoop",
            "3m",
        ),
        "two restarts: quiet": Scenario(
            [series("kube_pod_container_status_restarts_total", restarts, "0 1 2 2 2 2 2")],
            "EchoAtTimeRestartLoop",
            "3m",
        ),
        "the api answering only 503: fires": Scenario(
            [
                series("eat_http_requests_total", dict(API, **ok), "0+6x4 24x20"),
                series("eat_http_requests_total", dict(API, **unavailable), "0x4 0+6x20"),
            ],
            "EchoAtTimeRedisUnavailable",
            "10m",
            Fires(
                "EchoAtTimeRedisUnavailable",
                "100% of the API's answers are 503 (storage unavailable): nothing is accepted.",
            ),
        ),
        "a few 503 among many answers: quiet": Scenario(
            [
                series("eat_http_requests_total", dict(API, **saved), "0+1000x20"),
                series("eat_http_requests_total", dict(API, **unavailable), "0+1x20"),
            ],
            "EchoAtTimeRedisUnavailable",
            "10m",
        ),
    }


SCENARIOS = scenarios()


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_alert(tmp_path: Path, groups: list[dict[str, Any]], scenario: str) -> None:
    passed, output = promtool_test(tmp_path, groups, SCENARIOS[scenario].case(groups))
    assert passed, output


def test_a_threshold_set_in_values_moves_the_alert(tmp_path: Path) -> None:
    groups = rule_groups("prometheusRule.messagesLate.seconds=120")
    waiting = Scenario(
        [series("eat_oldest_overdue_seconds", API, "0 0 90x10")], "EchoAtTimeMessagesLate", "4m"
    )
    passed, output = promtool_test(tmp_path, groups, waiting.case(groups))
    assert passed, output
