"""End to end: real api, scheduler and worker processes on real Redis and ZooKeeper.

Each test starts its own cluster (1 api, 2 schedulers, 2 workers unless said
otherwise) on its own prefix, talks to it over HTTP, and reads what the workers
echoed on stdout. "Nothing lost" is the set of uuids answered 201/200 equal to
the set of echoed uuids; "once" is each uuid's echo count. Before counting, a
test waits until the prefix's delayed sets and streams are empty: every entry is
then acknowledged, and an entry is acknowledged only after its echo line was
written, so no further echo can appear.

The tests that prove the pipeline end to end (exactly once and on time, order,
the leader's kill -9, a SIGTERM mid-batch) run twice: on one Redis with one
partition, and on the session's 3-master Redis Cluster with 16 partitions
(``backend``). The others look at what one partition holds, or at the api's
answers, and run on the single Redis only.
"""

from __future__ import annotations

import signal
import threading
import time
import uuid as uuidlib
from collections.abc import Callable
from typing import Any

import pytest
import redis

from app.model import State
from app.store.codec import decode_record, member_uuid, uuid_key, uuid_text
from app.store.keys import CONSUMER_GROUP, Keyspace
from tests.e2e.conftest import BACKENDS, Backend
from tests.e2e.harness import (
    ApiClient,
    Cluster,
    Posted,
    accepted_uuids,
    assert_echoed_exactly_once,
    now_ms,
)

pytestmark = pytest.mark.e2e

LATENESS_LIMIT_MS = 1000  # healthy cluster: a due message is echoed well within this


def new_uuid() -> str:
    return str(uuidlib.uuid4())


def is_drained(client: redis.Redis, keys: Keyspace) -> bool:
    """Nothing scheduled, nothing in the stream, nothing pending: all work is done."""
    if client.zcard(keys.delayed) or client.xlen(keys.stream):
        return False
    try:
        return client.xpending(keys.stream, CONSUMER_GROUP)["pending"] == 0
    except redis.ResponseError:  # no group yet: nothing was ever delivered
        return True


def settle(
    c: Cluster, backend: Backend, expected: set[str], seconds: float
) -> list[dict[str, Any]]:
    """Wait until every expected uuid is echoed and every partition is drained; the echoes."""

    def done() -> bool:
        echoed = {e["uuid"] for e in c.all_echoes()}
        return expected <= echoed and all(
            is_drained(backend.client, keys) for keys in backend.keyspaces
        )

    c.wait_until(done, f"{len(expected)} messages echoed and queues drained", seconds)
    return c.all_echoes()


def delayed_members(client: redis.Redis, keys: Keyspace) -> dict[str, int]:
    """uuid -> score of the delayed set (members are ``<12 hex seq><uuid>``)."""
    return {
        member_uuid(member): int(score)
        for member, score in client.zrange(keys.delayed, 0, -1, withscores=True)
    }


def stream_uuids(client: redis.Redis, keys: Keyspace) -> set[str]:
    return {uuid_text(fields[b"u"]) for _id, fields in client.xrange(keys.stream)}


def post_original_three(api: ApiClient) -> tuple[Posted, Posted, Posted]:
    """The original service's scenario: two messages 1.5 s and 2 s ahead, one due now."""
    start = now_ms()
    later = api.post("in 1.5 s", start + 1500, new_uuid())
    latest = api.post("in 2 s", start + 2000, new_uuid())
    due = api.post("now", now_ms(), new_uuid())
    return later, latest, due


def report_lateness(label: str, echoes: list[dict[str, Any]], posts: list[Posted]) -> None:
    by_uuid = {e["uuid"]: e for e in echoes}
    for post in posts:
        echo = by_uuid[post.uuid]
        print(
            f"[{label}] {post.message!r}: runAt {post.run_at}, handledAt {echo['handledAt']}, "
            f"lateness {echo['lateness_ms']} ms ({echo['worker']})"
        )


# -- the original service's two tests ---------------------------------------------------


def test_future_messages_wait_in_the_delayed_set_and_a_due_message_goes_straight_to_the_stream(
    cluster: Callable[..., Cluster], backend: Backend, redis_client: redis.Redis, prefix: str
) -> None:
    c = cluster()
    keys = Keyspace(prefix)
    later, latest, due = post_original_three(c.client())

    # Look at once, long before the first delayed message falls due.
    streamed = stream_uuids(redis_client, keys)  # before the echoes: ack deletes after echo
    echoed = {e["uuid"] for e in c.all_echoes()}
    delayed = delayed_members(redis_client, keys)
    assert now_ms() < later.run_at, "posting took so long the placement check is meaningless"

    for post in (later, latest):
        assert post.status == 201, post.body
        assert post.body == {"uuid": post.uuid, "runAt": post.run_at, "state": "scheduled"}
        assert delayed.get(post.uuid) == post.run_at, f"{post.message} not in {keys.delayed}"
        assert post.uuid not in streamed, f"{post.message} reached the stream early"
        assert post.uuid not in echoed, f"{post.message} was echoed early"
        record = decode_record(post.uuid, redis_client.hget(keys.messages, uuid_key(post.uuid)))
        assert record.state is State.SCHEDULED
    assert due.status == 201, due.body
    assert due.body["state"] == "queued"
    assert due.uuid not in delayed
    assert due.uuid in streamed or due.uuid in echoed, "the due message is neither queued nor done"

    posts = [later, latest, due]
    echoes = settle(c, backend, accepted_uuids(posts), 10)
    assert_echoed_exactly_once(accepted_uuids(posts), echoes)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_every_message_is_echoed_exactly_once_never_before_its_runat_and_within_1s(
    cluster: Callable[..., Cluster], backend: Backend
) -> None:
    c = cluster()
    posts = list(post_original_three(c.client()))
    assert all(p.status == 201 for p in posts), [p.body for p in posts]

    echoes = settle(c, backend, accepted_uuids(posts), 10)
    assert_echoed_exactly_once(accepted_uuids(posts), echoes)
    report_lateness(f"healthy, {backend.name}", echoes, posts)
    by_uuid = {e["uuid"]: e for e in echoes}
    for post in posts:
        echo = by_uuid[post.uuid]
        assert echo["runAt"] == post.run_at
        assert echo["message"] == post.message
        assert echo["handledAt"] >= post.run_at, f"{post.message} echoed before its runAt"
        assert echo["lateness_ms"] < LATENESS_LIMIT_MS, f"{post.message} echoed too late"


# -- idempotency ------------------------------------------------------------------------


def test_a_reposted_uuid_is_answered_200_with_the_same_record_and_echoed_once(
    cluster: Callable[..., Cluster], backend: Backend
) -> None:
    c = cluster()
    api = c.client()
    uuid = new_uuid()
    first = api.post("original", now_ms() + 1000, uuid)
    again = api.post("changed body and time", now_ms() + 5000, uuid)

    assert first.status == 201, first.body
    assert again.status == 200, again.body
    assert again.body == {
        "uuid": uuid,
        "runAt": first.run_at,
        "state": "scheduled",
        "duplicate": True,
    }

    echoes = settle(c, backend, {uuid}, 10)
    assert_echoed_exactly_once({uuid}, echoes)
    assert echoes[0]["message"] == "original"

    # Re-posted after it was handled (due now, so a wrong accept would echo at once).
    late = api.post("re-posted after delivery", now_ms(), uuid)
    assert late.status == 200, late.body
    assert late.body["runAt"] == first.run_at
    assert late.body["state"] == "delivered"
    echoes = settle(c, backend, {uuid}, 10)
    assert_echoed_exactly_once({uuid}, echoes)


# -- order ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_one_worker_echoes_messages_with_equal_runat_in_posting_order_within_a_partition(
    cluster: Callable[..., Cluster], backend: Backend
) -> None:
    c = cluster(workers=1, worker_concurrency=1)
    api = c.client()
    run_at = now_ms() + 2000
    posts = [api.post(f"message {i}", run_at, new_uuid()) for i in range(100)]
    print(f"[order] 100 posts took until runAt - {run_at - now_ms()} ms")
    assert all(p.status == 201 for p in posts), [p.body for p in posts if p.status != 201][:3]
    # All waited in the delayed set: the order under test is the promotion's.
    assert {p.body["state"] for p in posts} == {"scheduled"}

    expected = accepted_uuids(posts)
    echoes = settle(c, backend, expected, 15)
    assert_echoed_exactly_once(expected, echoes)
    (worker,) = c.workers
    # Order is per partition: each partition's stream is read in its order (with one
    # partition, that is every message's posting order).
    echoed = [e["uuid"] for e in worker.echo_lines()]
    for partition in range(backend.partitions):
        mine = [u for u in echoed if backend.partition_of(u) == partition]
        assert mine == [p.uuid for p in posts if backend.partition_of(p.uuid) == partition]
    if backend.partitions > 1:
        assert len({backend.partition_of(p.uuid) for p in posts}) > 8, "too few partitions used"
    assert min(e["handledAt"] for e in echoes) >= run_at
    print(f"[order] lateness of the last of 100: {worker.echo_lines()[-1]['lateness_ms']} ms")


# -- crashes and restarts -----------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_kill_9_of_the_leader_hands_over_within_session_timeout_and_loses_nothing(
    cluster: Callable[..., Cluster], backend: Backend
) -> None:
    c = cluster()
    session = c.session_timeout
    api = c.client()
    start = now_ms()
    posts = [api.post(f"pending {i}", start + 1000 + i * 150, new_uuid()) for i in range(20)]
    assert all(p.status == 201 for p in posts), [p.body for p in posts if p.status != 201][:3]

    leader = c.leader()
    assert leader is not None
    old_epoch = c.leader_epoch(leader)
    assert old_epoch is not None
    killed_at, killed_mono = time.time(), time.monotonic()
    assert leader.kill() == -signal.SIGKILL

    takeover = c.wait_for_leader(
        killed_mono + session + 3.0 - time.monotonic(), newer_than=old_epoch
    )
    failover = takeover.at - killed_at
    print(
        f"[failover] kill -9 of {leader.name} (epoch {old_epoch}) -> {takeover.process.name} "
        f"leads (epoch {takeover.epoch}) after {failover * 1000:.0f} ms "
        f"(session timeout {session:g} s)"
    )
    assert takeover.process is not leader
    assert takeover.epoch > old_epoch
    assert failover <= session + 1.0, f"failover took {failover:.2f} s"

    expected = accepted_uuids(posts)
    echoes = settle(c, backend, expected, session + 10)
    assert_echoed_exactly_once(expected, echoes)
    report_lateness(f"failover, {backend.name}", echoes, posts)
    bound_ms = int((session + 1.5) * 1000)
    by_uuid = {e["uuid"]: e for e in echoes}
    for post in posts:
        echo = by_uuid[post.uuid]
        assert echo["handledAt"] >= post.run_at, f"{post.message} echoed before its runAt"
        assert echo["handledAt"] <= post.run_at + bound_ms, (
            f"{post.message} echoed {echo['lateness_ms']} ms late (bound {bound_ms} ms)"
        )


def test_messages_due_while_schedulers_and_workers_are_down_are_echoed_once_on_restart(
    cluster: Callable[..., Cluster], backend: Backend, redis_client: redis.Redis, prefix: str
) -> None:
    c = cluster()
    keys = Keyspace(prefix)
    api = c.client()

    stopping = [*c.schedulers, *c.workers]
    for proc in stopping:
        proc.send_signal(signal.SIGTERM)
    codes = {proc.name: proc.wait(15) for proc in stopping}
    assert codes == dict.fromkeys(codes, 0), f"exit codes after SIGTERM: {codes}"

    start = now_ms()
    posts = [api.post(f"delayed {i}", start + 1000 + i * 10, new_uuid()) for i in range(10)]
    posts += [api.post(f"due {i}", now_ms(), new_uuid()) for i in range(5)]
    assert all(p.status == 201 for p in posts), [p.body for p in posts if p.status != 201][:3]
    last_due = max(p.run_at for p in posts)
    c.wait_until(lambda: now_ms() > last_due + 100, "every message to be past due", 5)

    # Nobody promoted or consumed while they were down.
    assert redis_client.zcard(keys.delayed) == 10
    assert redis_client.xlen(keys.stream) == 5
    assert c.all_echoes() == []

    c.restart(*stopping)
    c.wait_for_leader(10)
    expected = accepted_uuids(posts)
    echoes = settle(c, backend, expected, 15)
    assert_echoed_exactly_once(expected, echoes)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_sigterm_stops_api_scheduler_and_a_mid_batch_worker_with_exit_0_losing_nothing(
    cluster: Callable[..., Cluster], backend: Backend
) -> None:
    c = cluster()
    victim, survivor = c.workers
    posts: list[Posted] = []

    def post_burst() -> None:
        with ApiClient(c.apis[0].base_url) as client:
            for i in range(200):
                posts.append(client.post(f"burst {i}", now_ms(), new_uuid()))

    poster = threading.Thread(target=post_burst, name="poster")
    poster.start()
    try:
        c.wait_until(lambda: len(victim.echo_lines()) >= 20, "the worker to be busy", 15)
        posted_before_sigterm = len(posts)
        victim_code = victim.terminate()
    finally:
        poster.join(60)
    print(
        f"[sigterm] worker SIGTERM after {posted_before_sigterm}/200 posts; it echoed "
        f"{len(victim.echo_lines())}, exit {victim_code}"
    )
    assert victim_code == 0, victim.describe()
    assert posted_before_sigterm < 200, "the worker was stopped only after the burst was posted"
    assert not poster.is_alive()
    assert len(posts) == 200
    assert all(p.status == 201 for p in posts), [p.body for p in posts if p.status != 201][:3]

    leader = c.leader()
    assert leader is not None
    old_epoch = c.leader_epoch(leader)
    assert leader.terminate() == 0, leader.describe()
    # A leader that stops deletes its election node: the other takes over at once.
    takeover = c.wait_for_leader(c.session_timeout + 1, newer_than=old_epoch)
    assert takeover.process is not leader
    later = [c.client().post(f"after handover {i}", now_ms() + 300, new_uuid()) for i in range(5)]
    assert all(p.status == 201 for p in later)

    expected = accepted_uuids(posts) | accepted_uuids(later)
    echoes = settle(c, backend, expected, 15)
    assert_echoed_exactly_once(expected, echoes)
    assert survivor.echo_lines(), "the surviving worker did nothing"

    (api,) = c.apis
    assert api.terminate() == 0, api.describe()
    assert survivor.terminate() == 0, survivor.describe()
