"""``echo-at-time schedule ...`` against a fake HTTP API: what each action sends and how it
prints the answer (that it works against the real API: tests/e2e/test_schedules.py)."""

from __future__ import annotations

import io
import json

import httpx
import pytest

from app.cli import build_parser
from app.ops import schedule_commands
from app.ops.commands import Output
from app.settings import Settings
from tests.unit.test_cli_ops import TOKEN, FakeApi, reply

VIEW = {
    "name": "daily",
    "message": "report",
    "timezone": "Europe/Berlin",
    "paused": False,
    "generation": 7,
    "createdAt": 1_800_000_000_000,
    "materialisedThrough": 1_800_000_000_000,
    "cron": "0 7 * * *",
}


def run(argv, api: FakeApi, settings: Settings | None = None) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    args = build_parser().parse_args(argv)
    code = schedule_commands.run(
        args,
        settings or Settings(),
        transport=httpx.MockTransport(api),
        output=Output(out=out, err=err, tty=False),
    )
    return code, out.getvalue(), err.getvalue()


def test_set_puts_the_definition_with_the_token_and_prints_the_outcome():
    api = FakeApi(reply(201, {**VIEW, "outcome": "created"}))
    settings = Settings(api_token=TOKEN)
    argv = ["schedule", "set", "daily", "--cron", "0 7 * * *", "--tz", "Europe/Berlin"]
    code, out, _ = run([*argv, "--message", "report", "--start", "1800000000000"], api, settings)
    assert code == 0
    assert out.strip() == "daily: created (generation 7)"
    (request,) = api.requests
    assert (request.method, request.url.path) == ("PUT", "/api/v1/schedules/daily")
    assert request.headers["authorization"] == f"Bearer {TOKEN}"
    assert json.loads(request.content) == {
        "message": "report",
        "paused": False,
        "cron": "0 7 * * *",
        "timezone": "Europe/Berlin",
        "startAt": 1800000000000,
    }


def test_set_needs_cron_or_every_but_not_both():
    for argv in (
        ["schedule", "set", "x", "--message", "m"],
        ["schedule", "set", "x", "--message", "m", "--cron", "* * * * *", "--every", "5m"],
    ):
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args(argv)
        assert exc.value.code == 2


def test_a_refusal_prints_the_apis_error_and_field_and_exits_1():
    api = FakeApi(reply(422, {"error": "unknown timezone: 'Mars'", "field": "timezone"}))
    argv = ["schedule", "set", "x", "--message", "m", "--cron", "* * * * *", "--tz", "Mars"]
    code, _, err = run(argv, api)
    assert code == 1
    assert "unknown timezone" in err and "(field timezone)" in err


def test_list_prints_a_table_and_how_to_get_the_next_page():
    api = FakeApi(
        reply(
            200,
            {
                "items": [VIEW, {**VIEW, "name": "tick", "every": "5m", "cron": None}],
                "next": "tick",
            },
        )
    )
    code, out, _ = run(["schedule", "list", "--limit", "2"], api)
    assert code == 0
    assert "daily" in out and "cron 0 7 * * * Europe/Berlin" in out and "every 5m" in out
    assert "echo-at-time schedule list --limit 2 --cursor tick" in out
    assert api.requests[0].url.params["limit"] == "2"


def test_list_names_the_schedules_the_api_could_not_read_and_what_to_do():
    api = FakeApi(reply(200, {"items": [], "next": None, "unreadable": ["old-one"]}))
    code, out, _ = run(["schedule", "list"], api)
    assert code == 0
    assert "no schedules" not in out
    assert "old-one" in out and "unreadable" in out and "schedule set or delete it" in out


def test_show_prints_the_next_occurrences_and_the_produced_messages():
    body = {
        **VIEW,
        "next": [1_800_003_600_000],
        "produced": [
            {
                "uuid": "123e4567-e89b-12d3-a456-426614174000",
                "runAt": 1_800_000_000_000,
                "state": "delivered",
            }
        ],
    }
    code, out, _ = run(["schedule", "show", "daily"], FakeApi(reply(200, body)))
    assert code == 0
    assert "2027-01-15T09:00:00.000Z" in out  # 1_800_003_600_000
    assert "123e4567-e89b-12d3-a456-426614174000  delivered" in out


@pytest.mark.parametrize(
    ("action", "method", "path"),
    [
        ("delete", "DELETE", "/api/v1/schedules/daily"),
        ("pause", "POST", "/api/v1/schedules/daily/pause"),
        ("resume", "POST", "/api/v1/schedules/daily/resume"),
    ],
)
def test_delete_pause_and_resume_call_their_route(action, method, path):
    api = FakeApi(reply(200, {**VIEW, "paused": action == "pause", "deleted": True}))
    code, out, _ = run(["schedule", action, "daily"], api)
    assert code == 0
    assert (api.requests[0].method, api.requests[0].url.path) == (method, path)
    assert out.strip() in ("deleted daily", "daily: paused", "daily: active")


def test_a_bad_name_is_refused_before_any_request():
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["schedule", "show", "a/b"])
    assert exc.value.code == 2


def test_status_shows_the_schedule_count_when_there_are_schedules():
    from tests.unit.test_cli_ops import STATS
    from tests.unit.test_cli_ops import run as run_ops

    code, out, _ = run_ops(["status"], FakeApi(reply(200, {**STATS, "schedules": 12})))
    assert code == 0 and "schedules" in out and "12" in out
    _, without, _ = run_ops(["status"], FakeApi(reply(200, STATS)))
    assert "schedules" not in without
