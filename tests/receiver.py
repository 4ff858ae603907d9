"""A real webhook receiver for the tests: a Starlette app under uvicorn on 127.0.0.1.

It runs in a thread of its own (its own event loop), so a test in-process and a test of
real worker processes use it alike. Every request is recorded as an :class:`Arrival`
(headers, body, the time it came, whether its Standard Webhooks signature verified with
the reference library); what it answers is the test's ``script``: a function of the
arrival and how many came before with the same ``webhook-id``, returning a
:class:`Answer` (status, headers, body, and seconds to wait before answering).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import uvicorn
from standardwebhooks import Webhook, WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # a test key, 24 bytes of base64


@dataclass
class Arrival:
    at: float  # epoch seconds it arrived
    path: str
    headers: dict[str, str]
    body: bytes
    verified: bool
    seen_before: int  # arrivals with the same webhook-id before this one

    @property
    def id(self) -> str:
        return self.headers.get("webhook-id", "")


@dataclass
class Answer:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    delay: float = 0.0  # seconds to wait before answering (a hang: longer than the timeout)


Script = Callable[[Arrival], Answer]


def ok(_: Arrival) -> Answer:
    return Answer()


class Receiver:
    """Start with :meth:`start` (or as a context manager); ``url`` is its base URL."""

    def __init__(self, secret: str = SECRET, script: Script = ok) -> None:
        self.verifier = Webhook(secret)
        self.script = script
        self.arrivals: list[Arrival] = []
        self.in_flight = 0  # requests being answered now
        self.most_in_flight = 0
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        app = Starlette(routes=[Route("/{path:path}", self._endpoint, methods=["POST"])])
        config = uvicorn.Config(
            app, log_level="warning", lifespan="off", access_log=False, timeout_graceful_shutdown=1
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._serve, name="receiver", daemon=True)

    def _serve(self) -> None:
        asyncio.run(self._server.serve(sockets=[self._sock]))

    async def _endpoint(self, request: Request) -> Response:
        body = await request.body()
        headers = {k.lower(): v for k, v in request.headers.items()}
        try:
            self.verifier.verify(body, headers, json_parse=False)
            verified = True
        except WebhookVerificationError:
            verified = False
        with self._lock:
            seen = sum(1 for a in self.arrivals if a.id and a.id == headers.get("webhook-id"))
            arrival = Arrival(time.time(), request.url.path, headers, body, verified, seen)
            self.arrivals.append(arrival)
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            answer = self.script(arrival)
            if answer.delay:
                await asyncio.sleep(answer.delay)
            return Response(answer.body, answer.status, headers=answer.headers)
        finally:
            with self._lock:
                self.in_flight -= 1

    def by_id(self, webhook_id: str) -> list[Arrival]:
        with self._lock:
            return [a for a in self.arrivals if a.id == webhook_id]

    def count(self) -> int:
        with self._lock:
            return len(self.arrivals)

    def start(self) -> Receiver:
        self._thread.start()
        deadline = time.monotonic() + 5
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the receiver did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(5)

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
