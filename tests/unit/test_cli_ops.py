"""Operator commands against a fake HTTP API: what they send and how they print it.

Only argument handling and output formatting are checked here (the transport is
``httpx.MockTransport``, answering with the documented contract). That each
command works against the real API is for the end-to-end tests.
"""

from __future__ import annotations

import io
import json
import uuid as uuidlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.cli import build_parser
from app.ops import commands
from app.settings import Settings

UUID = "123e4567-e89b-12d3-a456-426614174000"
TOKEN = "s3cret-token-0123456789"


class FakeApi:
    """Records every request; ``answer(request)`` makes the response."""

    def __init__(self, answer: Callable[[httpx.Request], httpx.Response]) -> None:
        self.answer = answer
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.answer(request)

    def bodies(self) -> list[Any]:
        return [json.loads(r.content) for r in self.requests]


def run(
    argv: list[str], api: FakeApi, *, tty: bool = False, settings: Settings | None = None
) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    args = build_parser().parse_args(argv)
    code = commands.run(
        args,
        settings or Settings(),
        transport=httpx.MockTransport(api),
        output=commands.Output(out=out, err=err, tty=tty),
    )
    return code, out.getvalue(), err.getvalue()


def reply(status: int, body: Any) -> Callable[[httpx.Request], httpx.Response]:
    return lambda request: httpx.Response(status, json=body)


# -- send ------------------------------------------------------------------------------


def test_send_posts_the_message_with_the_token_and_prints_its_state() -> None:
    api = FakeApi(reply(201, {"uuid": UUID, "runAt": 1795843243061, "state": "scheduled"}))
    code, out, err = run(
        ["send", "hello", "--at", "1795843243061", "--uuid", UUID, "--api", "http://api:9/"],
        api,
        settings=Settings(api_token=TOKEN),
    )
    assert code == 0, err
    (request,) = api.requests
    assert request.method == "POST"
    assert str(request.url) == "http://api:9/api/v1/save-message"
    assert request.headers["authorization"] == f"Bearer {TOKEN}"
    assert api.bodies() == [{"message": "hello", "runAt": 1795843243061, "uuid": UUID}]
    assert out == f"scheduled {UUID} runAt 1795843243061 (2026-11-28T05:20:43.061Z)\n"


def test_send_uses_eat_api_url_and_no_token_when_unset() -> None:
    api = FakeApi(reply(201, {"uuid": UUID, "runAt": 5, "state": "queued"}))
    code, out, _ = run(
        ["send", "now!", "--at", "now"], api, settings=Settings(api_url="https://eat.example")
    )
    assert code == 0
    assert str(api.requests[0].url) == "https://eat.example/api/v1/save-message"
    assert "authorization" not in api.requests[0].headers
    assert "uuid" not in api.bodies()[0]
    assert out.startswith(f"queued {UUID} runAt 5 ")


def test_send_of_a_known_uuid_says_duplicate_and_succeeds() -> None:
    body = {"uuid": UUID, "runAt": 7, "state": "delivered", "duplicate": True}
    code, out, _ = run(["send", "x", "--at", "0", "--uuid", UUID], FakeApi(reply(200, body)))
    assert code == 0
    assert out.startswith(f"duplicate {UUID}: accepted before, delivered, runAt 7")


def test_send_refused_by_the_api_prints_its_error_and_field_and_exits_1() -> None:
    api = FakeApi(
        reply(413, {"error": "message is 70000 bytes; the limit is 65536", "field": "message"})
    )
    code, out, err = run(["send", "x", "--at", "+1s"], api)
    assert code == 1
    assert out == ""
    assert err == (
        "echo-at-time: POST /api/v1/save-message answered 413: "
        "message is 70000 bytes; the limit is 65536 (field message)\n"
    )


def test_a_wrong_token_says_which_variable_to_set() -> None:
    api = FakeApi(reply(401, {"error": "missing or wrong bearer token", "field": "Authorization"}))
    code, _, err = run(["status"], api)
    assert code == 1
    assert "answered 401" in err and "EAT_API_TOKEN" in err


def test_an_unreachable_api_is_named_with_its_url_and_exits_1() -> None:
    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("Connection refused", request=request)

    code, _, err = run(["status", "--api", "http://10.9.9.9:1"], FakeApi(down))
    assert code == 1
    assert "cannot reach the API at http://10.9.9.9:1" in err


def bulk_answer(request: httpx.Request) -> httpx.Response:
    """The /save-messages contract: an item without a string message is invalid."""
    items = json.loads(request.content)
    results, counts = [], {"accepted": 0, "duplicates": 0, "invalid": 0}
    for index, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("message"), str):
            results.append(
                {
                    "index": index,
                    "status": "invalid",
                    "error": "field is required: message",
                    "field": "message",
                }
            )
            counts["invalid"] += 1
        elif item.get("message") == "again":
            results.append({"index": index, "status": "duplicate", "uuid": item["uuid"]})
            counts["duplicates"] += 1
        else:
            results.append({"index": index, "status": "accepted", "uuid": item["uuid"]})
            counts["accepted"] += 1
    return httpx.Response(200, json={"results": results, **counts})


def test_send_file_posts_chunks_of_1000_and_gives_each_line_without_uuid_its_own(
    tmp_path: Path,
) -> None:
    path = tmp_path / "messages.jsonl"
    lines = [json.dumps({"message": f"m{i}", "runAt": 1000 + i}) for i in range(2500)]
    lines[10] = json.dumps({"message": "again", "runAt": 1, "uuid": UUID})
    lines.insert(20, "")  # blank lines are skipped
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    api = FakeApi(bulk_answer)

    code, out, err = run(["send", "--file", str(path)], api)

    assert code == 0, err
    assert [len(body) for body in api.bodies()] == [1000, 1000, 500]
    assert all(str(r.url).endswith("/api/v1/save-messages") for r in api.requests)
    sent = [item for body in api.bodies() for item in body]
    assert [item["message"] for item in sent[:3]] == ["m0", "m1", "m2"]
    assert sent[10]["uuid"] == UUID
    uuids = [item["uuid"] for item in sent]
    assert len(set(uuids)) == 2500
    assert all(uuidlib.UUID(u) for u in uuids)
    assert out == "sent 2500 messages: 2499 accepted, 1 duplicates, 0 invalid\n"
    # Off a terminal: one plain progress line per chunk, no bar.
    assert err.splitlines() == [
        "sent 1000/2500: 999 accepted, 1 duplicates, 0 invalid",
        "sent 2000/2500: 1999 accepted, 1 duplicates, 0 invalid",
        "sent 2500/2500: 2499 accepted, 1 duplicates, 0 invalid",
    ]


def test_send_file_names_the_line_of_each_invalid_item_and_exits_1(tmp_path: Path) -> None:
    path = tmp_path / "messages.jsonl"
    path.write_text('{"message": "ok", "runAt": 1}\n{not json\n\n{"runAt": 2}\n', encoding="utf-8")
    api = FakeApi(bulk_answer)
    code, out, err = run(["send", "--file", str(path)], api)
    assert code == 1
    assert len(api.bodies()[0]) == 2  # the line that is not JSON never left
    assert "line 2: not JSON" in err
    assert "line 4: field is required: message (field message)" in err
    assert out == "sent 3 messages: 1 accepted, 0 duplicates, 2 invalid\n"


def test_send_file_retries_a_chunk_on_503_with_the_same_uuids(tmp_path: Path) -> None:
    path = tmp_path / "messages.jsonl"
    path.write_text('{"message": "a", "runAt": 1}\n', encoding="utf-8")
    answers = iter([httpx.Response(503, json={"error": "storage unavailable", "field": None})])

    def flaky(request: httpx.Request) -> httpx.Response:
        return next(answers, None) or bulk_answer(request)

    api = FakeApi(flaky)
    code, out, _ = run(["send", "--file", str(path)], api)
    assert code == 0
    first, second = api.bodies()
    assert first == second
    assert out == "sent 1 messages: 1 accepted, 0 duplicates, 0 invalid\n"


def test_send_file_shows_a_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    path = tmp_path / "messages.jsonl"
    path.write_text('{"message": "a", "runAt": 1}\n' * 3, encoding="utf-8")
    code, _, err = run(["send", "--file", str(path)], FakeApi(bulk_answer), tty=True)
    assert code == 0
    assert "3/3" in err and "msg" in err
    assert "sent 3/3:" not in err


def test_send_file_that_cannot_be_read_is_named(tmp_path: Path) -> None:
    code, _, err = run(["send", "--file", str(tmp_path / "nope.jsonl")], FakeApi(bulk_answer))
    assert code == 1
    assert "cannot read" in err and "nope.jsonl" in err


# -- status ----------------------------------------------------------------------------

STATS = {
    "delayed": 1234,
    "streamLength": 12,
    "pending": 3,
    "lag": 9,
    "dead": 2,
    "consumers": [
        {"name": "vm-worker-1", "pending": 2, "idleMs": 150},
        {"name": "vm-worker-2", "pending": 1, "idleMs": 4500},
    ],
    "leader": {"identifier": "vm-1-4242", "epoch": 4711, "since": 1795843243061},
    "oldestOverdueMs": 15,
}


def test_status_prints_a_readable_table_with_each_worker_and_its_pending_count() -> None:
    api = FakeApi(reply(200, STATS))
    code, out, _ = run(["status"], api)
    assert code == 0
    assert str(api.requests[0].url).endswith("/api/v1/stats")
    assert out.splitlines() == [
        "delayed         1,234   scheduled for later",
        "stream             12   due, in the stream",
        "pending             3   delivered, not yet acknowledged",
        "lag                 9   due, not yet read by a worker",
        "dead                2   dead-lettered",
        "oldest overdue  15 ms   age of the oldest due",
        "workers             2   consumers in the group",
        "leader          vm-1-4242 (epoch 4711, since 2026-11-28T05:20:43.061Z)",
        "",
        "WORKER         PENDING  IDLE",
        "vm-worker-1          2  150 ms",
        "vm-worker-2          1  4.5 s",
    ]


def partition(number: int, lag: int, master: str | None) -> dict[str, Any]:
    return {
        "partition": number,
        "delayed": 1000 * number,
        "streamLength": lag + 1,
        "pending": 1,
        "lag": lag,
        "dead": 0,
        "oldestOverdueMs": None if number else 1500,
        "master": master,
    }


def test_status_shows_each_partition_with_its_master_when_there_are_several() -> None:
    parts = [partition(0, 5, "10.0.0.1:6379"), partition(1, 12_000, "10.0.0.2:6379")]
    code, out, _ = run(["status"], FakeApi(reply(200, {**STATS, "partitions": parts})))
    assert code == 0
    lines = out.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("PARTITION")))
    assert lines[start : start + 3] == [
        "PARTITION  DELAYED  STREAM  PENDING     LAG  DEAD  OVERDUE  MASTER",
        "        0        0       6        1       5     0  1.5 s    10.0.0.1:6379",
        "        1    1,000  12,001        1  12,000     0  -        10.0.0.2:6379",
    ]


def test_status_shows_no_partition_table_with_one_partition() -> None:
    one = {**STATS, "partitions": [partition(0, 9, None)]}
    for stats in (STATS, one):
        _, out, _ = run(["status"], FakeApi(reply(200, stats)))
        assert "PARTITION" not in out


def test_status_without_a_leader_says_nothing_is_promoted() -> None:
    stats = {**STATS, "leader": None, "consumers": [], "oldestOverdueMs": None}
    code, out, _ = run(["status"], FakeApi(reply(200, stats)))
    assert code == 0
    assert "leader          none (no scheduler leads: nothing is promoted)" in out
    overdue = next(line for line in out.splitlines() if line.startswith("oldest overdue"))
    assert overdue.split() == ["oldest", "overdue", "-", "age", "of", "the", "oldest", "due"]
    assert "WORKER" not in out


def test_status_json_prints_the_apis_figures_for_scripts() -> None:
    code, out, _ = run(["status", "--json"], FakeApi(reply(200, STATS)))
    assert code == 0
    assert json.loads(out) == STATS


# -- dead ------------------------------------------------------------------------------

DEAD_PAGE = {
    "items": [
        {
            "id": "1795843243061-0",
            "uuid": UUID,
            "message": "hello",
            "runAt": 1795843243061,
            "attempts": 5,
            "reason": "RuntimeError: the handler\nfailed " + "x" * 100,
            "deadAt": 1795843253061,
        }
    ],
    "next": "1795843243060-0",
}


def test_dead_list_prints_a_table_and_how_to_get_the_next_page() -> None:
    api = FakeApi(reply(200, DEAD_PAGE))
    code, out, _ = run(["dead", "list", "--limit", "1"], api)
    assert code == 0
    assert api.requests[0].url.params["limit"] == "1"
    assert "cursor" not in api.requests[0].url.params
    header, row, more = out.splitlines()
    assert header.split() == ["UUID", "RUN", "AT", "DEAD", "AT", "TRIES", "REASON"]
    assert row.startswith(f"{UUID}  2026-11-28T05:20:43.061Z  2026-11-28T05:20:53.061Z      5  ")
    assert row.endswith("RuntimeError: the handler failed " + "x" * 26 + "…")
    assert "hello" not in out  # bodies stay out of the table (use --json)
    assert more == "more: echo-at-time dead list --limit 1 --cursor 1795843243060-0"


def test_dead_list_passes_the_cursor_and_says_when_empty() -> None:
    api = FakeApi(reply(200, {"items": [], "next": None}))
    code, out, _ = run(["dead", "list", "--cursor", "5-0"], api)
    assert code == 0
    assert api.requests[0].url.params["cursor"] == "5-0"
    assert out == "no dead messages\n"


def test_dead_list_json_is_the_apis_page() -> None:
    code, out, _ = run(["dead", "list", "--json"], FakeApi(reply(200, DEAD_PAGE)))
    assert code == 0
    assert json.loads(out) == DEAD_PAGE


@pytest.mark.parametrize(
    ("argv", "method", "path", "answer", "printed"),
    [
        (["dead", "replay", UUID], "POST", f"/api/v1/dead/{UUID}/replay", {}, f"replayed {UUID}"),
        (
            ["dead", "replay", "--all"],
            "POST",
            "/api/v1/dead/replay",
            {"replayed": 7},
            "replayed 7 dead messages",
        ),
        (["dead", "purge", UUID], "DELETE", f"/api/v1/dead/{UUID}", {}, f"deleted {UUID}"),
        (
            ["dead", "purge", "--yes"],
            "DELETE",
            "/api/v1/dead",
            {"deleted": 3},
            "deleted 3 dead messages",
        ),
    ],
)
def test_dead_replay_and_purge_call_the_api_and_say_what_happened(
    argv: list[str], method: str, path: str, answer: dict[str, int], printed: str
) -> None:
    api = FakeApi(reply(200, answer))
    code, out, _ = run(argv, api)
    assert code == 0
    (request,) = api.requests
    assert (request.method, request.url.path) == (method, path)
    assert out == printed + "\n"


def test_replay_of_an_unknown_uuid_prints_the_apis_404() -> None:
    api = FakeApi(reply(404, {"error": "no dead message with this uuid", "field": "uuid"}))
    code, _, err = run(["dead", "replay", UUID], api)
    assert code == 1
    assert f"POST /api/v1/dead/{UUID}/replay answered 404: no dead message" in err


def test_purge_of_everything_asks_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("builtins.input", lambda: "n")
    api = FakeApi(reply(200, {"deleted": 3}))
    code, _, err = run(["dead", "purge"], api, tty=True)
    assert code == 1
    assert api.requests == []
    assert "nothing deleted" in err

    monkeypatch.setattr("builtins.input", lambda: "yes")
    code, out, _ = run(["dead", "purge"], api, tty=True)
    assert code == 0
    assert out == "deleted 3 dead messages\n"
