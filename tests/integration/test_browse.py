"""The dashboard's reads against the real Redis: the delayed set a page at a time from a
cursor (equal runAt, a cursor's member gone meanwhile, several partitions), a message with
its body in every state, and the pages across partitions."""

from __future__ import annotations

import asyncio
import time
import uuid as uuidlib

import pytest
import redis

from app.http.ui.source import Source
from app.model import NewMessage
from app.settings import Settings
from app.store import connect, open_client
from app.store.browse import BODY_SHOWN, Browser
from app.store.history import HistoryRecorder
from app.store.lifecycle import Lifecycle
from app.store.partitions import Partitions
from tests.aio import Harness

FAR = 253402300799999


def uuids(n: int) -> list[str]:
    return [str(uuidlib.uuid4()) for _ in range(n)]


def test_pages_of_the_delayed_set_follow_runat_then_acceptance_order(h: Harness) -> None:
    store = h.store()
    ids = uuids(12)
    # Three runAt values, four messages each: equal runAt keep their posting order.
    msgs = [NewMessage(u, f"m{i}", FAR - 3 + i % 3) for i, u in enumerate(ids)]
    h.run(store.accept_many(msgs))
    expected = [m.uuid for m in sorted(msgs, key=lambda m: (m.run_at, ids.index(m.uuid)))]
    browser = Browser(store)
    seen, after = [], None
    while True:
        page = h.run(browser.scheduled(5, after))
        seen += [s.uuid for s in page]
        if len(page) < 5:
            break
        after = (page[-1].run_at, page[-1].member)
    assert seen == expected
    first = h.run(browser.scheduled(1, None))[0]
    assert (first.state, first.attempts, first.body.text) == ("scheduled", 0, "m0")


def test_a_page_goes_on_exactly_after_a_cursor_whose_message_was_cancelled(h: Harness) -> None:
    store = h.store()
    ids = uuids(6)
    h.run(store.accept_many([NewMessage(u, "x", FAR) for u in ids]))  # one runAt for all
    browser = Browser(store)
    page = h.run(browser.scheduled(3, None))
    assert [s.uuid for s in page] == ids[:3]
    cursor = (page[-1].run_at, page[-1].member)
    assert h.run(Lifecycle(store).cancel(ids[2])).kind == "done"
    assert [s.uuid for s in h.run(browser.scheduled(3, cursor))] == ids[3:]


def test_a_page_reads_only_its_own_members(h: Harness, redis_client: redis.Redis) -> None:
    store = h.store()
    ids = uuids(3)
    h.run(store.accept_many([NewMessage(u, "x", FAR - i) for i, u in enumerate(ids)]))
    redis_client.execute_command("CONFIG", "RESETSTAT")
    page = h.run(Browser(store).scheduled(2, None))
    assert len(page) == 2
    stats = redis_client.info("commandstats")
    assert "cmdstat_zscan" not in stats and "cmdstat_scan" not in stats
    assert stats["cmdstat_hmget"]["calls"] == 1


def test_a_message_shows_its_body_wherever_the_service_still_holds_it(h: Harness) -> None:
    store = h.store(max_deliveries=1)
    h.run(store.ensure_group())
    browser = Browser(store)
    scheduled, queued, dead, delivered = uuids(4)
    h.run(
        store.accept_many(
            [
                NewMessage(scheduled, "<script>later</script>", FAR),
                NewMessage(queued, "now", 0),
                NewMessage(dead, "poison", 0),
                NewMessage(delivered, "done", 0),
            ]
        )
    )
    view = h.run(browser.message(scheduled))
    assert (view.record.state.value, view.body.text) == ("scheduled", "<script>later</script>")
    assert h.run(browser.message(queued)).body.text == "now"
    read = {d.uuid: d for d in h.run(store.read("w", 10, None))}
    assert h.run(store.fail(read[dead], 0, "PoisonError: boom")) == ("dead", 1)
    h.run(store.ack([read[delivered]]))
    view = h.run(browser.message(dead))
    assert (view.record.state.value, view.body.text, view.reason) == (
        "dead",
        "poison",
        "PoisonError: boom",
    )
    view = h.run(browser.message(delivered))
    assert (view.record.state.value, view.body) == ("delivered", None)
    assert h.run(browser.message(str(uuidlib.uuid4()))) is None


def test_a_long_body_is_cut_and_says_so(h: Harness) -> None:
    store = h.store(max_message_bytes=BODY_SHOWN * 2)
    uuid = uuids(1)[0]
    h.run(store.accept_many([NewMessage(uuid, "é" * BODY_SHOWN, FAR)]))
    body = h.run(Browser(store).message(uuid)).body
    assert body.cut and body.size == 2 * BODY_SHOWN
    assert len(body.text.encode()) <= BODY_SHOWN


@pytest.fixture
def four(redis_url: str, prefix: str, redis_client: redis.Redis):
    """Four partitions on the one test Redis, the dashboard's Source over them."""
    settings = Settings.from_env(
        {}, redis_url=redis_url, prefix=prefix, partitions=4, max_deliveries=1
    )
    loop = asyncio.new_event_loop()
    client = connect(settings)
    partitions = Partitions(client, settings)
    try:
        yield loop, partitions, Source(partitions)
    finally:
        loop.run_until_complete(client.aclose())
        loop.close()


def test_the_scheduled_pages_span_every_partition_in_one_order(four) -> None:
    loop, partitions, source = four
    msgs = [NewMessage(u, "x", FAR - i % 7) for i, u in enumerate(uuids(40))]
    loop.run_until_complete(partitions.accept_many(msgs))
    assert len({partitions.index_of(m.uuid) for m in msgs}) == 4
    seen, cursor = [], None
    while True:
        page, cursor = loop.run_until_complete(source.scheduled(7, cursor))
        seen += page
        if cursor is None:
            break
    assert sorted(s.uuid for s in seen) == sorted(m.uuid for m in msgs)
    keys = [(s.run_at, s.member) for s in seen]
    assert keys == sorted(keys)


def test_the_dead_pages_span_every_partition_oldest_first(four) -> None:
    loop, partitions, source = four
    msgs = [NewMessage(u, "poison", 0) for u in uuids(24)]
    loop.run_until_complete(partitions.accept_many(msgs))

    async def kill_all() -> None:
        for store in partitions.stores:
            await store.ensure_group()
            for delivery in await store.read("w", 100, None):
                await store.fail(delivery, 0, "boom")

    loop.run_until_complete(kill_all())
    seen, cursor = [], None
    while True:
        page, cursor = loop.run_until_complete(source.dead(5, cursor))
        seen += page
        if cursor is None:
            break
    assert sorted(r.entry.uuid for r in seen) == sorted(m.uuid for m in msgs)
    order = [(tuple(map(int, r.entry.id.split("-"))), r.partition) for r in seen]
    assert order == sorted(order)
    overview = loop.run_until_complete(source.overview())
    assert overview.dead == 24 and len(overview.partitions) == 4
    assert sum(row.report.dead for row in overview.partitions) == 24
    assert loop.run_until_complete(source.replay_all()) == (24, 0)
    assert loop.run_until_complete(source.overview()).dead == 0


def test_the_dashboard_reads_and_acts_on_a_redis_cluster(cluster_url: str, prefix: str) -> None:
    settings = Settings.from_env(
        {}, redis_url=cluster_url, prefix=prefix, partitions=4, redis_cluster="true"
    )

    async def go() -> None:
        client = await open_client(settings)
        try:
            partitions = Partitions(client, settings)
            source = Source(partitions)
            msgs = [NewMessage(u, "x", FAR - i) for i, u in enumerate(uuids(12))]
            await partitions.accept_many(msgs)
            page, cursor = await source.scheduled(5, None)
            rest, end = await source.scheduled(50, cursor)
            assert [s.uuid for s in page + rest] == [m.uuid for m in reversed(msgs)]
            assert end is None
            # (The overview's figures come from Lifecycle.stats, whose pipeline sends TIME,
            # which a cluster pipeline refuses: the api's partition work owns that read.)
            nodes = {browser.serving_node() for browser in source.browsers}
            assert len(nodes) > 1  # the partitions are spread over the masters
            target = msgs[0].uuid
            assert (await source.run_now(target)).state == "queued"
            assert (await source.message(target)).record.state.value == "queued"
            counted = {"accepted": 0.0}
            recorder = HistoryRecorder(client, prefix, lambda: dict(counted))
            counted["accepted"] = 12.0
            assert await recorder.flush() == 1
            minutes = await source.history(time.time())
            assert minutes[-1].accepted == 12
        finally:
            await client.aclose()

    asyncio.run(go())
