"""End to end: recurring schedules on real api, scheduler and worker processes, on one
Redis and on a 3-master Redis Cluster with 16 partitions, driven by the operator CLI.

Occurrences are counted by their instant (an echo's ``runAt``): each must be echoed
exactly once, never before it, whatever happens to the leader meanwhile.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable

import pytest

from app.recurrence import occurrence_uuid
from tests.e2e.conftest import BACKENDS, Backend
from tests.e2e.harness import Cluster, now_ms
from tests.e2e.test_pipeline import is_drained

pytestmark = pytest.mark.e2e


def cli(c: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**c.env, "EAT_API_URL": c.apis[0].base_url}
    return subprocess.run(
        [c.script, *args],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_every_occurrence_runs_once_across_a_kill_9_a_rolling_restart_and_a_replace(
    cluster: Callable[..., Cluster], backend: Backend
) -> None:
    c = cluster(env={"EAT_SCHEDULE_CATCHUP": "all"})
    session = c.session_timeout
    assert "created" in ok(cli(c, "schedule", "set", "tick", "--every", "1s", "--message", "tick"))
    shown = json.loads(ok(cli(c, "schedule", "show", "tick", "--json")))
    generation, first = shown["generation"], shown["createdAt"] + 1000

    # ~5 s of healthy running, then kill -9 of the leader.
    c.wait_until(lambda: now_ms() > first + 5000, "5 s of occurrences", 10)
    leader = c.leader()
    assert leader is not None
    old_epoch = c.leader_epoch(leader)
    killed_ms, killed_mono = now_ms(), time.monotonic()
    assert leader.kill() == -signal.SIGKILL
    takeover = c.wait_for_leader(
        killed_mono + session + 3.0 - time.monotonic(), newer_than=old_epoch
    )
    taken_ms = int(takeover.at * 1000)
    c.restart(leader)

    # A rolling restart: each scheduler in turn stopped (SIGTERM) and started again.
    for proc in list(c.schedulers):
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        c.restart(proc)
        c.wait_for_leader(session + 5)

    # Replaced while its next 30 s are pending: the old generation's never run after it.
    c.wait_until(lambda: now_ms() > first + 14_000, "14 s of occurrences", 30)
    assert "replaced" in ok(cli(c, "schedule", "set", "tick", "--every", "1s", "--message", "tock"))
    replaced_ms = now_ms()
    anew = json.loads(ok(cli(c, "schedule", "show", "tick", "--json")))
    generation2, first2 = anew["generation"], anew["createdAt"] + 1000
    assert generation2 != generation

    c.wait_until(lambda: now_ms() > first2 + 6000, "6 s of the new definition", 30)
    assert "deleted tick" in ok(cli(c, "schedule", "delete", "tick"))
    deleted_ms = now_ms()
    c.wait_until(
        lambda: all(is_drained(backend.client, k) for k in backend.keyspaces),
        "every produced occurrence handled",
        session + 15,
    )
    echoes = c.all_echoes()
    for e in echoes:
        gen, start = (generation, first) if e["message"] == "tick" else (generation2, first2)
        assert (e["runAt"] - start) % 1000 == 0
        assert e["uuid"] == occurrence_uuid("tick", gen, e["runAt"])
        assert e["handledAt"] >= e["runAt"], f"occurrence {e['runAt']} echoed early"
    for message, start, end in (("tick", first, replaced_ms), ("tock", first2, deleted_ms)):
        by_instant = Counter(e["runAt"] for e in echoes if e["message"] == message)
        # Every occurrence due before the change ran, exactly once ...
        missing = [at for at in range(start, end - 1000, 1000) if by_instant[at] == 0]
        twice = {at: n for at, n in by_instant.items() if n > 1}
        assert not missing, f"{message}: occurrences never echoed: {missing}"
        assert not twice, f"{message}: occurrences echoed more than once: {twice}"
        # ... and none due after it (their messages were cancelled or met a tombstone).
        assert max(by_instant) <= end + 1000, f"{message}: an occurrence ran after the change"
    # The ones due while no leader ran were produced at once by the next leader: already
    # delayed messages (the horizon is 30 s), promoted by it as soon as it led.
    gap = [e for e in echoes if killed_ms <= e["runAt"] <= taken_ms]
    assert gap, "no occurrence fell in the failover"
    bound_ms = int((session + 1.5) * 1000)
    late = [e["lateness_ms"] for e in gap]
    print(f"[schedules, {backend.name}] failover {taken_ms - killed_ms} ms; lateness {late}")
    assert all(e["handledAt"] <= max(e["runAt"], taken_ms) + bound_ms for e in gap), late


def test_after_more_than_the_horizon_without_any_scheduler_only_the_latest_missed_occurrence_runs(
    cluster: Callable[..., Cluster], backend: Backend
) -> None:
    """EAT_SCHEDULE_CATCHUP=latest (the default), with real processes: every scheduler
    stopped, a schedule created meanwhile, and 42 s later (more than the 30 s horizon)
    the schedulers back. Occurrences due more than 30 s before the new leader's first
    pass were missed: only the newest of them runs; the later ones run, at once or on
    time; none twice."""
    c = cluster()
    schedulers = list(c.schedulers)
    for proc in schedulers:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    assert "created" in ok(cli(c, "schedule", "set", "gap", "--every", "2s", "--message", "gap"))
    shown = json.loads(ok(cli(c, "schedule", "show", "gap", "--json")))
    generation, first = shown["generation"], shown["createdAt"] + 2000
    c.wait_until(lambda: now_ms() > first + 40_000, "40 s without a scheduler", 60)
    restarted_ms = now_ms()
    c.restart(*schedulers)
    led = c.wait_for_leader(15)
    # The new leader's first pass comes at most a second after it leads (its loop's pace).
    last_pass_ms = int(led.at * 1000) + 2000
    c.wait_until(lambda: now_ms() > last_pass_ms + 4000, "a few occurrences after", 15)
    assert "deleted gap" in ok(cli(c, "schedule", "delete", "gap"))
    deleted_ms = now_ms()
    c.wait_until(
        lambda: all(is_drained(backend.client, k) for k in backend.keyspaces),
        "every produced occurrence handled",
        15,
    )
    echoes = [e for e in c.all_echoes() if e["message"] == "gap"]
    by_instant = Counter(e["runAt"] for e in echoes)
    assert not {at: n for at, n in by_instant.items() if n > 1}, "an occurrence ran twice"
    for e in echoes:
        assert e["uuid"] == occurrence_uuid("gap", generation, e["runAt"])
        assert e["handledAt"] >= e["runAt"]
    grid = range(first, deleted_ms - 2000, 2000)
    surely_missed = [at for at in grid if at < restarted_ms - 32_000]
    border = [at for at in grid if restarted_ms - 32_000 <= at < last_pass_ms - 30_000]
    produced = [at for at in grid if at >= last_pass_ms - 30_000]
    assert len(surely_missed) >= 3, "the gap was too short to miss anything"
    assert not [at for at in surely_missed if by_instant[at]], "a missed occurrence ran"
    assert any(by_instant[at] for at in border), "the latest missed occurrence did not run"
    assert all(by_instant[at] == 1 for at in produced), "a late or later occurrence is missing"
    print(
        f"[catch-up latest] missed {len(surely_missed)} skipped; border "
        f"{[by_instant[at] for at in border]}; produced {len(produced)}"
    )
