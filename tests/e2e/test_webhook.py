"""``echo-at-time worker --handler webhook`` as a real process, against a real receiver on
loopback: at least once across a worker's kill -9 in the middle of a delivery.

On one Redis with one partition and on the session's 3-master Redis Cluster with 16
partitions.
"""

from __future__ import annotations

import signal
import time
import uuid as uuidlib
from collections.abc import Callable

import httpx
import pytest

from app.model import State
from app.store.codec import decode_record, uuid_key
from tests.e2e.conftest import BACKENDS, Backend
from tests.e2e.harness import Cluster, now_ms
from tests.receiver import SECRET, Answer, Arrival, Receiver
from tests.wait import wait_until

VISIBILITY = 2.0


@pytest.mark.e2e
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_a_worker_killed_mid_delivery_leaves_it_to_another_that_sends_it_again_with_the_same_id(
    cluster: Callable[..., Cluster], backend: Backend
) -> None:
    def script(arrival: Arrival) -> Answer:
        # The first delivery hangs: the worker is in the middle of it when it is killed.
        return Answer(200, delay=30.0) if arrival.seen_before == 0 else Answer(200)

    with Receiver(script=script) as receiver:
        env = {
            "EAT_WEBHOOK_URL": receiver.url + "/default",
            "EAT_WEBHOOK_SECRET": SECRET,
            "EAT_WEBHOOK_ALLOW": "127.0.0.1",  # the receiver's loopback address, named
            "EAT_WEBHOOK_TIMEOUT": "60",
            "EAT_VISIBILITY_TIMEOUT": f"{VISIBILITY:g}",
        }
        c = cluster(apis=1, schedulers=1, workers=0, env=env)
        first_worker = c.add_worker(handler="webhook")
        c.launch([first_worker])
        uuid = str(uuidlib.uuid4())
        body = {"message": "pay 42", "runAt": now_ms(), "uuid": uuid, "target": receiver.url + "/t"}
        answer = httpx.post(c.apis[0].base_url + "/api/v1/save-message", json=body, timeout=10)
        assert answer.status_code == 201, answer.text

        wait_until(lambda: receiver.count() == 1, "the first delivery", 10)
        killed_at = time.time()
        assert first_worker.kill() == -signal.SIGKILL
        second_worker = c.add_worker(handler="webhook")
        c.launch([second_worker])

        wait_until(lambda: receiver.count() == 2, "the delivery again", VISIBILITY + 10)
        first, again = receiver.arrivals
        assert first.id == again.id == uuid, "the same webhook-id: receivers deduplicate by it"
        assert first.verified and again.verified
        assert first.path == again.path == "/t"
        assert again.body == b"pay 42"
        assert again.at - killed_at >= VISIBILITY - 0.5, "not before the visibility timeout"
        assert again.headers["x-eat-attempt"] == "1"  # a crash is not a failed attempt

        keys = backend.keys_of(uuid)

        def delivered() -> bool:
            packed = backend.client.hget(keys.messages, uuid_key(uuid))
            return packed is not None and decode_record(uuid, packed).state is State.DELIVERED

        wait_until(delivered, "the record delivered", 10)
        assert receiver.count() == 2
