"""A load generator: a known set of messages posted across every api while faults happen.

Each poster thread owns its share of the messages and posts them one after
another, paced evenly over ``duration`` seconds, rotating over the apis. A post
that fails (503, a connection error, a timeout, a killed api) is retried with
the *same* uuid on the next api until it is answered 2xx or ``give_up_after``
seconds passed: what a careful client does. Because a thread only sends message
``n + 1`` after message ``n`` was answered 2xx, a thread's messages were
accepted in its posting order: that is the order the checker expects among
messages with equal ``runAt``.

The mix: ``due_fraction`` due now (``runAt`` = the moment of the first send),
the rest delayed by 0-``max_delay_ms``; of the delayed ones, about
``group_fraction`` come in groups of ``group_size`` consecutive messages with one
shared ``runAt`` (at least ``min_group_delay_ms`` ahead, so every member is still
in the future when accepted), to measure order among equal ``runAt``.
"""

from __future__ import annotations

import random
import threading
import time
import uuid as uuidlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.e2e.harness import now_ms

PATH = "/api/v1/save-message"
RETRY_STATUSES = frozenset({502, 503, 504})


@dataclass
class Post:
    """One message of the load and what became of it."""

    uuid: str
    message: str
    run_at: int
    kind: str  # "due", "delayed" or "group"
    thread: int
    seq: int  # position in its thread's posting order
    group: int | None = None
    status: int | None = None  # the final answer: 201, 200, or a refusal
    state: str | None = None  # "queued" or "scheduled" from the 201/200 body
    answers: list[str] = field(default_factory=list)  # every answer, "201", "503", "ReadError"...
    apis: list[int] = field(default_factory=list)  # which api each attempt went to
    sent_at: float | None = None  # first send, epoch seconds
    answered_at: float | None = None  # final answer, epoch seconds
    in_flight_at: int | None = None  # the api index a request is outstanding at, else None

    @property
    def accepted(self) -> bool:
        return self.status in (200, 201)

    @property
    def attempts(self) -> int:
        return len(self.answers)


class LoadGenerator:
    """
    :param api_urls: a callable giving the current base URLs (apis may be replaced).
    :param total: how many messages, split over the threads.
    :param duration: seconds over which to spread the first sends.
    :param threads: poster threads (default: one per api).
    :param make_message: ``(thread, seq) -> text``; default ``"<label>-<thread>-<seq>"``.
    :param make_uuid: ``() -> uuid text``; default a random uuid4 (a skewed load picks
        uuids of one partition).
    """

    def __init__(
        self,
        api_urls: Callable[[], Sequence[str]],
        total: int,
        duration: float,
        *,
        threads: int = 2,
        due_fraction: float = 0.3,
        group_fraction: float = 0.3,
        group_size: int = 4,
        max_delay_ms: int = 10_000,
        min_group_delay_ms: int = 1_500,
        give_up_after: float = 60.0,
        label: str = "m",
        make_message: Callable[[int, int], str] | None = None,
        make_uuid: Callable[[], str] | None = None,
        seed: int | None = None,
        request_timeout: float = 10.0,
    ) -> None:
        self.api_urls = api_urls
        self.total = total
        self.duration = duration
        self.threads = threads
        self.due_fraction = due_fraction
        self.group_fraction = group_fraction
        self.group_size = group_size
        self.max_delay_ms = max_delay_ms
        self.min_group_delay_ms = min_group_delay_ms
        self.give_up_after = give_up_after
        self.label = label
        self.make_message = make_message
        self.make_uuid = make_uuid or (lambda: str(uuidlib.uuid4()))
        self.request_timeout = request_timeout
        self.seed = random.randrange(2**32) if seed is None else seed
        self.posts: list[Post] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []
        self._next_group = 0
        self.errors: list[str] = []  # unexpected answers (a 4xx for a valid body...)
        self.started_at: float | None = None

    # -- control -----------------------------------------------------------------------

    def start(self) -> LoadGenerator:
        self.started_at = time.time()
        for t in range(self.threads):
            share = self.total // self.threads + (1 if t < self.total % self.threads else 0)
            thread = threading.Thread(
                target=self._run, args=(t, share), name=f"load-{t}", daemon=True
            )
            self._workers.append(thread)
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for thread in self._workers:
            thread.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in self._workers if t.is_alive()]
        if alive:
            raise AssertionError(f"load threads still posting after {timeout:g} s: {alive}")

    @property
    def done(self) -> bool:
        return bool(self._workers) and not any(t.is_alive() for t in self._workers)

    # -- results ------------------------------------------------------------------------

    def snapshot(self) -> list[Post]:
        with self._lock:
            return list(self.posts)

    def accepted(self) -> list[Post]:
        return [p for p in self.snapshot() if p.accepted]

    def sent(self) -> int:
        return len(self.snapshot())

    def in_flight(self, api_index: int) -> list[Post]:
        return [p for p in self.snapshot() if p.in_flight_at == api_index]

    def answer_counts(self) -> Counter[str]:
        return Counter(a for p in self.snapshot() for a in p.answers)

    # -- a poster thread ---------------------------------------------------------------

    def _run(self, thread: int, share: int) -> None:
        rng = random.Random(self.seed * 1000 + thread)
        interval = self.duration / max(share, 1)
        start = time.monotonic()
        clients: dict[str, httpx.Client] = {}
        group_left = 0
        group_id: int | None = None
        group_run_at = 0
        try:
            for seq in range(share):
                if self._stop.is_set():
                    return
                pause = start + seq * interval - time.monotonic()
                if pause > 0 and self._stop.wait(pause):
                    return
                text = (
                    self.make_message(thread, seq)
                    if self.make_message
                    else f"{self.label}-{thread}-{seq}"
                )
                now = now_ms()
                if group_left == 0 and rng.random() < self.group_fraction / self.group_size:
                    with self._lock:
                        group_id, self._next_group = self._next_group, self._next_group + 1
                    group_left = self.group_size
                    group_run_at = now + rng.randint(self.min_group_delay_ms, self.max_delay_ms)
                if group_left:
                    group_left -= 1
                    kind, run_at, group = "group", group_run_at, group_id
                elif rng.random() < self.due_fraction:
                    kind, run_at, group = "due", now, None
                else:
                    kind, run_at, group = "delayed", now + rng.randint(0, self.max_delay_ms), None
                post = Post(self.make_uuid(), text, run_at, kind, thread, seq, group)
                with self._lock:
                    self.posts.append(post)
                self._deliver(post, thread + seq, clients)
        finally:
            for client in clients.values():
                client.close()

    def _deliver(self, post: Post, first_api: int, clients: dict[str, httpx.Client]) -> None:
        body = {"message": post.message, "runAt": post.run_at, "uuid": post.uuid}
        deadline = time.monotonic() + self.give_up_after
        delay = 0.02
        attempt = 0
        post.sent_at = time.time()
        while True:
            urls = list(self.api_urls())
            index = (first_api + attempt) % len(urls)
            attempt += 1
            url = urls[index]
            client = clients.get(url)
            if client is None:
                client = clients[url] = httpx.Client(base_url=url, timeout=self.request_timeout)
            post.apis.append(index)
            post.in_flight_at = index
            try:
                response = client.post(PATH, json=body)
            except httpx.HTTPError as exc:
                post.in_flight_at = None
                post.answers.append(type(exc).__name__)
                # The connection may be half dead (a killed api): start a fresh one.
                clients.pop(url, None)
                client.close()
            else:
                post.in_flight_at = None
                post.answers.append(str(response.status_code))
                if response.status_code in (200, 201):
                    answer: dict[str, Any] = response.json()
                    post.status = response.status_code
                    post.state = answer.get("state")
                    post.answered_at = time.time()
                    return
                if response.status_code not in RETRY_STATUSES:
                    post.status = response.status_code
                    post.answered_at = time.time()
                    with self._lock:
                        self.errors.append(f"{post.uuid}: {response.status_code} {response.text}")
                    return
            if time.monotonic() >= deadline or self._stop.is_set():
                post.answered_at = time.time()
                return
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
