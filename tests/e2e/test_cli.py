"""End to end: the operator commands (``echo-at-time send|status|dead``) against a real api.

Each command runs as its own process through the console script, with the
cluster's environment and ``EAT_API_URL`` pointing at the cluster's api, and
what it prints is checked together with what the service then does.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import uuid as uuidlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from app.model import NewMessage
from app.settings import Settings
from app.store import Store, connect
from app.store.keys import CONSUMER_GROUP, Keyspace
from tests.e2e.harness import Cluster, assert_echoed_exactly_once, now_ms

pytestmark = pytest.mark.e2e


def new_uuid() -> str:
    return str(uuidlib.uuid4())


def cli(c: Cluster, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**c.env, "EAT_API_URL": c.apis[0].base_url}
    return subprocess.run(
        [c.script, *args],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def is_drained(client: redis.Redis, keys: Keyspace) -> bool:
    if client.zcard(keys.delayed) or client.xlen(keys.stream):
        return False
    try:
        return client.xpending(keys.stream, CONSUMER_GROUP)["pending"] == 0
    except redis.ResponseError:
        return True


def settle(
    c: Cluster, client: redis.Redis, prefix: str, expected: set[str], seconds: float
) -> list[dict[str, Any]]:
    keys = Keyspace(prefix)

    def done() -> bool:
        return expected <= {e["uuid"] for e in c.all_echoes()} and is_drained(client, keys)

    c.wait_until(done, f"{len(expected)} messages echoed and drained", seconds)
    return c.all_echoes()


def test_send_schedules_a_message_that_is_echoed_once_at_its_time_and_a_resend_is_a_duplicate(
    cluster: Callable[..., Cluster], redis_client: redis.Redis, prefix: str
) -> None:
    c = cluster()
    uuid = new_uuid()
    sent = cli(c, "send", "hello from the cli", "--at", "+3s", "--uuid", uuid)
    assert sent.returncode == 0, sent.stderr
    match = re.fullmatch(rf"scheduled {uuid} runAt ([0-9]+) \(\S+Z\)\n", sent.stdout)
    assert match, sent.stdout
    run_at = int(match.group(1))

    again = cli(c, "send", "changed", "--at", "now", "--uuid", uuid)
    assert again.returncode == 0, again.stderr
    # The stored record answers, whatever its state by now (the machine may be slow).
    assert re.match(rf"duplicate {uuid}: accepted before, \w+, runAt {run_at} ", again.stdout)

    echoes = settle(c, redis_client, prefix, {uuid}, 15)
    assert_echoed_exactly_once({uuid}, echoes)
    assert echoes[0]["message"] == "hello from the cli"
    assert echoes[0]["handledAt"] >= run_at


def test_send_refused_by_the_api_names_the_field_and_exits_1(
    cluster: Callable[..., Cluster],
) -> None:
    c = cluster(schedulers=0, workers=0, env={"EAT_MAX_MESSAGE_BYTES": "16"})
    refused = cli(c, "send", "x" * 17, "--at", "now")
    assert refused.returncode == 1
    assert refused.stdout == ""
    assert "answered 413" in refused.stderr and "(field message)" in refused.stderr


def test_send_file_posts_thousands_of_lines_in_chunks_each_echoed_once(
    cluster: Callable[..., Cluster], redis_client: redis.Redis, prefix: str, tmp_path: Path
) -> None:
    c = cluster()
    start = now_ms()
    lines, with_uuid = [], set()
    for i in range(2500):
        fields: dict[str, Any] = {"message": f"bulk {i}", "runAt": start + (i % 50) * 20}
        if i % 2:
            fields["uuid"] = new_uuid()
            with_uuid.add(fields["uuid"])
        lines.append(json.dumps(fields))
    lines[1234] = json.dumps({"message": "bad", "runAt": "tomorrow"})
    path = tmp_path / "messages.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    sent = cli(c, "send", "--file", str(path))

    assert sent.returncode == 1, sent.stderr  # one line was invalid
    assert sent.stdout == "sent 2500 messages: 2499 accepted, 0 duplicates, 1 invalid\n"
    assert "line 1235: " in sent.stderr and "(field runAt)" in sent.stderr
    progress = [line for line in sent.stderr.splitlines() if line.startswith("sent ")]
    assert [p.split(":")[0] for p in progress] == [
        "sent 1000/2500",
        "sent 2000/2500",
        "sent 2500/2500",
    ]

    def all_echoed() -> list[dict[str, Any]] | None:
        echoes = c.all_echoes()
        bulk = [e for e in echoes if e["message"].startswith("bulk ")]
        return echoes if len(bulk) >= 2499 and is_drained(redis_client, Keyspace(prefix)) else None

    echoes = c.wait_until(all_echoed, "2499 bulk messages echoed", 60)
    echoed = [e for e in echoes if e["message"].startswith("bulk ")]
    assert len(echoed) == len({e["uuid"] for e in echoed}) == 2499
    assert with_uuid <= {e["uuid"] for e in echoed}


def test_status_prints_the_figures_the_leader_and_each_worker(
    cluster: Callable[..., Cluster],
) -> None:
    c = cluster()
    leader = c.leader()
    assert leader is not None

    shown = cli(c, "status")
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout
    for label in ("delayed", "stream", "pending", "lag", "dead", "oldest overdue", "workers"):
        assert re.search(rf"^{label}\s", text, re.MULTILINE), text
    assert re.search(r"^workers\s+2\s", text, re.MULTILINE), text
    assert re.search(r"^leader\s+\S+ \(epoch [0-9]+, since ", text, re.MULTILINE), text
    for n in (1, 2):
        assert re.search(rf"^{c.prefix}-worker-{n}\s+0\s", text, re.MULTILINE), text

    as_json = cli(c, "status", "--json")
    assert as_json.returncode == 0, as_json.stderr
    stats = json.loads(as_json.stdout)
    assert {c["name"] for c in stats["consumers"]} == {f"{c.prefix}-worker-{n}" for n in (1, 2)}
    assert stats["leader"]["epoch"] == c.leader_epoch(leader)


def dead_letter(settings: Settings, count: int) -> list[str]:
    """Make ``count`` dead messages the way a failing handler does (one delivery allowed)."""

    async def make() -> list[str]:
        client = connect(settings)
        try:
            store = Store(client, settings)
            await store.ensure_group()
            uuids = []
            for i in range(count):
                uuid = new_uuid()
                await store.accept(NewMessage(uuid, f"doomed {i}", now_ms()))
                uuids.append(uuid)
            for delivery in await store.read("probe", count, None):
                outcome, _ = await store.fail(delivery, 0, "RuntimeError: handler failed")
                assert outcome == "dead"
            return uuids
        finally:
            await client.aclose()

    return asyncio.run(make())


def test_dead_list_replay_and_purge_work_on_the_dead_stream(
    cluster: Callable[..., Cluster], redis_client: redis.Redis, prefix: str, redis_url: str
) -> None:
    c = cluster(workers=0)
    settings = Settings(redis_url=redis_url, prefix=prefix, max_deliveries=1)
    uuids = dead_letter(settings, 5)
    keys = Keyspace(prefix)
    assert redis_client.xlen(keys.dead) == 5

    listed = cli(c, "dead", "list", "--limit", "3")
    assert listed.returncode == 0, listed.stderr
    header, *rows, more = listed.stdout.splitlines()
    assert header.startswith("UUID")
    assert [row.split()[0] for row in rows] == uuids[:3]
    assert all(row.rstrip().endswith("RuntimeError: handler failed") for row in rows)
    assert more.startswith("more: echo-at-time dead list --limit 3 --cursor ")
    rest = cli(c, "dead", "list", "--limit", "3", "--cursor", more.rsplit(" ", 1)[1], "--json")
    assert [item["uuid"] for item in json.loads(rest.stdout)["items"]] == uuids[3:]

    one = cli(c, "dead", "replay", uuids[0])
    assert (one.returncode, one.stdout) == (0, f"replayed {uuids[0]}\n"), one.stderr
    missing = cli(c, "dead", "replay", uuids[0])
    assert missing.returncode == 1 and "answered 404" in missing.stderr

    dropped = cli(c, "dead", "purge", uuids[1])
    assert (dropped.returncode, dropped.stdout) == (0, f"deleted {uuids[1]}\n"), dropped.stderr
    unconfirmed = cli(c, "dead", "purge")
    assert unconfirmed.returncode == 2 and "--yes" in unconfirmed.stderr
    assert redis_client.xlen(keys.dead) == 3

    replayed = cli(c, "dead", "replay", "--all")
    assert (replayed.returncode, replayed.stdout) == (0, "replayed 3 dead messages\n")
    assert redis_client.xlen(keys.dead) == 0

    # A worker now handles each replayed message once.
    c.launch([c.add_worker()])
    expected = {uuids[0], *uuids[2:]}
    echoes = settle(c, redis_client, prefix, expected, 30)
    assert_echoed_exactly_once(expected, echoes)

    c.workers[0].terminate()  # so that the next doomed messages reach the probe, not it
    dead_letter(settings, 2)
    purged = cli(c, "dead", "purge", "--yes")
    assert (purged.returncode, purged.stdout) == (0, "deleted 2 dead messages\n"), purged.stderr
    assert cli(c, "dead", "list").stdout == "no dead messages\n"
