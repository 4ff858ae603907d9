"""The HTTP limits (app.httpserver) on a real uvicorn server on 127.0.0.1, spoken to
through raw sockets: the api's own app and Redis, a health server, uvloop.

Every wait is a read until the server closes the connection, with a deadline:
a limit that does not hold fails the test with what never happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
import redis
import uvicorn
import uvloop

from app import metrics
from app.health import HealthServer
from app.http.app import create_app
from app.httpserver import HttpLimits, LimitedProtocol, server_config
from app.settings import Settings
from tests.servers import free_port
from tests.wait import async_wait_until

# Short limits, so that each test waits well under a second for the one it checks.
LIMITS = HttpLimits(
    max_header_bytes=4096,
    header_timeout=0.5,
    body_timeout=0.5,
    idle_timeout=0.5,
    max_connections=4,
)
SLACK = 3.0  # seconds past a limit before a test gives up (the machine may be busy)
SAVE = "/api/v1/save-message"


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the test process keeps its own signal handlers


class Api:
    """The api app served on a free port; ``connections`` as the server holds them."""

    def __init__(self, server: _Server, port: int) -> None:
        self.server = server
        self.port = port
        self.writers: list[asyncio.StreamWriter] = []

    @property
    def connections(self) -> list[LimitedProtocol]:
        return list(self.server.server_state.connections)  # type: ignore[arg-type]

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A raw connection, closed when the server stops if the test did not close it."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.writers.append(writer)
        return reader, writer

    async def accepted(self, writer: asyncio.StreamWriter) -> None:
        """Wait until the server holds the connection of ``writer``."""
        port = writer.get_extra_info("sockname")[1]
        await async_wait_until(
            lambda: any(c.client is not None and c.client[1] == port for c in self.connections),
            f"the server to accept the connection from port {port}",
            5,
        )

    async def connected(self, count: int) -> None:
        await async_wait_until(
            lambda: len(self.connections) == count, f"the server to hold {count} connections", 5
        )


@contextlib.asynccontextmanager
async def serving(settings: Settings, limits: HttpLimits = LIMITS) -> AsyncIterator[Api]:
    port = free_port()
    config = server_config(
        create_app(settings), "127.0.0.1", port, limits, lifespan="on", timeout_graceful_shutdown=2
    )
    server = _Server(config)
    task = asyncio.create_task(server.serve())
    await async_wait_until(lambda: server.started or task.done(), "the api to listen", 10)
    if task.done():
        task.result()
    api = Api(server, port)
    try:
        yield api
    finally:
        for writer in api.writers:
            writer.close()
        server.should_exit = True
        await task


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    uvloop.run(scenario())  # the api's event loop


async def until_closed(reader: asyncio.StreamReader, within: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    started = time.monotonic()
    try:
        data = await asyncio.wait_for(reader.read(), within)
    except TimeoutError:
        raise AssertionError(f"the server did not close the connection within {within} s") from None
    except ConnectionResetError:
        data = b""
    return data, time.monotonic() - started


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def body_of(answer: bytes) -> dict:
    return json.loads(answer.split(b"\r\n\r\n", 1)[1])


def answers_in(data: bytes) -> list[int]:
    """The status of every answer in ``data`` (a body ends where the next answer starts)."""
    return [int(status) for status in re.findall(rb"HTTP/1\.1 ([0-9]{3}) ", data)]


def head(path: str = "/healthz", method: str = "GET", **headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: test", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@pytest.fixture
def settings(redis_url: str, prefix: str, redis_client: redis.Redis) -> Settings:
    # redis_client: the test's keys are deleted afterwards.
    return Settings.from_env({}, redis_url=redis_url, prefix=prefix)


def keys_of(r: redis.Redis, prefix: str) -> list[bytes]:
    return list(r.scan_iter(match=f"*{prefix}*", count=1000))


# --- the request head ------------------------------------------------------------------------


def test_a_head_trickled_past_the_header_timeout_is_answered_408_and_closed(settings):
    async def scenario() -> None:
        async with serving(settings) as api:
            reader, writer = await api.open()
            started = time.monotonic()
            writer.write(b"GET /healthz HTTP/1.1\r\n")

            async def trickle() -> None:
                # A byte at a time, never finishing: the connection is never idle.
                with contextlib.suppress(ConnectionError):
                    for _ in range(1000):
                        writer.write(b"X")
                        await writer.drain()
                        await asyncio.sleep(0.05)

            trickling = asyncio.create_task(trickle())
            answer, _ = await until_closed(reader, LIMITS.header_timeout + SLACK)
            trickling.cancel()
            elapsed = time.monotonic() - started
            assert status_of(answer) == 408
            assert body_of(answer) == {
                "error": "request head not received within 0.5 s",
                "field": None,
            }
            assert b"connection: close" in answer
            assert elapsed >= LIMITS.header_timeout - 0.05
            writer.close()

    run(scenario)


@pytest.mark.parametrize("pieces", [1, 64], ids=["in-one-write", "streamed"])
def test_a_head_over_the_size_limit_is_answered_431_and_closed(settings, pieces: int):
    async def scenario() -> None:
        async with serving(settings) as api:
            reader, writer = await api.open()
            big = head(**{"X-Filler": "a" * (LIMITS.max_header_bytes * 4)})
            step = -(-len(big) // pieces)

            async def send() -> None:
                with contextlib.suppress(ConnectionError):
                    for at in range(0, len(big), step):
                        writer.write(big[at : at + step])
                        await writer.drain()

            sending = asyncio.create_task(send())
            answer, _ = await until_closed(reader, SLACK)
            await sending
            assert status_of(answer) == 431
            assert body_of(answer) == {
                "error": "request head larger than 4096 bytes",
                "field": None,
            }
            assert answers_in(answer) == [431]  # and nothing else: no 400 after it
            writer.close()

    run(scenario)


def test_a_head_under_the_size_limit_is_served(settings):
    async def scenario() -> None:
        async with serving(settings) as api:
            reader, writer = await api.open()
            writer.write(head(**{"X-Filler": "a" * 3500, "Connection": "close"}))
            answer, _ = await until_closed(reader, SLACK)
            assert answers_in(answer) == [200]
            writer.close()

    run(scenario)


def test_the_health_server_refuses_a_head_over_its_limit_with_431(settings):
    async def scenario() -> None:
        port = free_port()

        async def ready() -> dict[str, bool]:
            return {}

        async def figures():
            raise OSError

        server = HealthServer("127.0.0.1", port, ready, figures, HttpLimits(max_header_bytes=1024))
        await server.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(head(**{"X-Filler": "a" * 2048}))
            answer, _ = await until_closed(reader, SLACK)
            assert status_of(answer) == 431
            writer.close()
        finally:
            await server.stop()

    run(scenario)


# --- the request body ------------------------------------------------------------------------


def test_an_unfinished_chunked_body_is_answered_408_closed_and_nothing_is_written(
    settings, redis_client, prefix
):
    async def scenario() -> None:
        async with serving(settings) as api:
            reader, writer = await api.open()
            writer.write(
                head(SAVE, "POST", **{"Content-Type": "application/json"})[:-2]
                + b"Transfer-Encoding: chunked\r\n\r\n"
                + b'10\r\n{"message": "hi"\r\n'
            )
            answer, elapsed = await until_closed(reader, LIMITS.body_timeout + SLACK)
            assert status_of(answer) == 408
            assert body_of(answer) == {
                "error": "request body not received within 0.5 s",
                "field": None,
            }
            assert answers_in(answer) == [408]
            assert elapsed >= LIMITS.body_timeout - 0.05
            writer.close()
        assert keys_of(redis_client, prefix) == []

    run(scenario)


def test_a_request_answered_before_its_body_arrived_is_closed_without_a_second_answer(settings):
    async def scenario() -> None:
        async with serving(settings) as api:
            reader, writer = await api.open()
            # Not JSON: 415 before the body is read. The body then trickles in, never
            # finishing, so neither the idle timer nor the client ends the connection.
            writer.write(
                head(SAVE, "POST", **{"Content-Type": "text/plain", "Content-Length": "1000"})
            )
            started = time.monotonic()

            async def trickle() -> None:
                with contextlib.suppress(ConnectionError):
                    for _ in range(999):
                        writer.write(b"x")
                        await writer.drain()
                        await asyncio.sleep(0.05)

            trickling = asyncio.create_task(trickle())
            answer, _ = await until_closed(reader, LIMITS.body_timeout + SLACK)
            trickling.cancel()
            assert answers_in(answer) == [415]
            assert time.monotonic() - started >= LIMITS.body_timeout - 0.05

    run(scenario)


# --- the response ----------------------------------------------------------------------------


def closed_for(reason: str) -> float:
    return (
        metrics.REGISTRY.get_sample_value("eat_http_connections_closed_total", {"reason": reason})
        or 0.0
    )


def test_a_client_that_stops_reading_its_answers_is_closed_after_the_send_timeout(settings):
    """Requests pipelined, answers never read: once the buffers are full the response
    waits for the client; past the send timeout the connection is closed, and the
    server serves others (the slot is not held for ever)."""
    limits = dataclasses.replace(LIMITS, send_timeout=0.5)

    async def scenario() -> None:
        async with serving(settings, limits) as api:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", api.port))
            sock.setblocking(False)
            _reader, writer = await asyncio.open_connection(sock=sock)
            api.writers.append(writer)
            await api.accepted(writer)
            before = closed_for("send_timeout")
            request = head("/api/v1/openapi.json")
            started = time.monotonic()
            with contextlib.suppress(ConnectionError):
                for _ in range(400):  # each answer tens of KB: far past every buffer
                    writer.write(request)
                await writer.drain()
            await async_wait_until(
                lambda: closed_for("send_timeout") == before + 1,
                "the stalled connection closed",
                limits.send_timeout + SLACK,
            )
            assert time.monotonic() - started >= limits.send_timeout - 0.05
            await api.connected(0)
            other, other_writer = await api.open()
            other_writer.write(head("/healthz"))
            assert status_of(await other.readuntil(b"\r\n\r\n")) == 200

    run(scenario)


def test_bodies_arriving_in_pieces_past_the_buffered_bound_are_answered_503_then_served(
    redis_url, prefix, redis_client
):
    """One slow bulk body holds most of the bound: another that would take it past is
    answered 503 (retry), and once the first is done the bound is free again."""
    bound = 64 * 1024
    settings = Settings.from_env(
        {}, redis_url=redis_url, prefix=prefix, max_batch_bytes=bound, http_max_buffered_bytes=bound
    )
    now = int(time.time() * 1000)
    items = [{"message": "x" * 200, "runAt": now, "uuid": str(uuid.uuid4())} for _ in range(150)]
    body = json.dumps(items).encode()  # about 37 KiB: two of them are over the bound
    bulk = head(
        "/api/v1/save-messages",
        "POST",
        **{"Content-Type": "application/json", "Content-Length": str(len(body))},
    )

    async def scenario() -> None:
        async with serving(settings) as api:
            buffered = api.server.config.app.state.buffered
            slow, slow_writer = await api.open()
            slow_writer.write(bulk + body[:-10])  # all but its end: held while it waits
            await async_wait_until(lambda: buffered.held >= len(body) - 10, "the slow body held", 5)
            other, other_writer = await api.open()
            other_writer.write(bulk + body[:20000])
            await async_wait_until(
                lambda: buffered.held >= len(body) - 10 + 20000, "its first piece held", 5
            )
            other_writer.write(body[20000:])
            answer = await other.readuntil(b"\r\n\r\n")
            assert status_of(answer) == 503, answer
            slow_writer.write(body[-10:])
            answer = await slow.readuntil(b"\r\n\r\n")
            assert status_of(answer) == 200, answer
            await async_wait_until(lambda: buffered.held == 0, "the bound free again", 5)
            again, again_writer = await api.open()
            again_writer.write(bulk + body[:20000])
            await async_wait_until(lambda: buffered.held >= 20000, "a first piece held", 5)
            again_writer.write(body[20000:])
            assert status_of(await again.readuntil(b"\r\n\r\n")) == 200

    run(scenario)


# --- idle connections ------------------------------------------------------------------------


@pytest.mark.parametrize("requests", [0, 1], ids=["fresh", "after-a-response"])
def test_a_connection_that_carries_no_request_is_closed_after_the_idle_timeout(
    settings, requests: int
):
    async def scenario() -> None:
        async with serving(settings) as api:
            reader, writer = await api.open()
            writer.write(head() * requests)
            started = time.monotonic()
            data, _ = await until_closed(reader, LIMITS.idle_timeout + SLACK)
            assert answers_in(data) == [200] * requests  # closed silently: no 408
            assert time.monotonic() - started >= LIMITS.idle_timeout - 0.05
            writer.close()

    run(scenario)


def test_pipelined_requests_are_each_answered(settings):
    async def scenario() -> None:
        async with serving(settings) as api:
            reader, writer = await api.open()
            writer.write(head() + head("/readyz") + head(**{"Connection": "close"}))
            data, _ = await until_closed(reader, SLACK)
            assert answers_in(data) == [200, 200, 200]
            writer.close()

    run(scenario)


# --- the connection cap ----------------------------------------------------------------------


def test_idle_sockets_beyond_the_cap_cannot_lock_a_client_out(settings):
    async def scenario() -> None:
        # Idle long enough that only the cap, not the idle timeout, closes anything here.
        limits = HttpLimits(max_header_bytes=4096, idle_timeout=30, max_connections=4)
        async with serving(settings, limits) as api:
            idle = []
            for _ in range(3 * limits.max_connections):
                idle.append(await api.open())
                await api.accepted(idle[-1][1])
            reader, writer = await api.open()
            writer.write(head(**{"Connection": "close"}))
            answer, _ = await until_closed(reader, SLACK)
            assert answers_in(answer) == [200]
            # The oldest were closed to make room, silently (they had sent nothing).
            for old_reader, old_writer in idle[: 2 * limits.max_connections + 1]:
                data, _ = await until_closed(old_reader, SLACK)
                assert data == b""
                old_writer.close()
            for _, old_writer in idle[2 * limits.max_connections + 1 :]:
                old_writer.close()

    run(scenario)


def test_when_every_connection_is_busy_a_new_one_gets_503_until_one_frees(settings):
    async def scenario() -> None:
        limits = HttpLimits(body_timeout=30, max_connections=4)
        async with serving(settings, limits) as api:
            busy = []
            for _ in range(limits.max_connections):
                reader, writer = await api.open()
                # A head, and a body still on its way: being served, not waiting.
                writer.write(
                    head(
                        SAVE, "POST", **{"Content-Type": "application/json", "Content-Length": "99"}
                    )
                    + b"{"
                )
                busy.append((reader, writer))
            await api.connected(limits.max_connections)
            await async_wait_until(
                lambda: all(not c.waiting() for c in api.connections),
                "every connection to be receiving a body",
                5,
            )
            reader, writer = await api.open()
            writer.write(head(**{"Connection": "close"}))
            answer, elapsed = await until_closed(reader, SLACK)
            assert status_of(answer) == 503
            assert b"retry-after: 1" in answer
            assert body_of(answer)["error"] == ("server at its limit of 4 connections, retry later")
            writer.close()
            assert elapsed < 1.0  # refused at once, not left waiting
            # One busy client leaves: the next ordinary client is served.
            busy[0][1].close()
            await api.connected(limits.max_connections - 1)
            reader, writer = await api.open()
            writer.write(head(**{"Connection": "close"}))
            answer, _ = await until_closed(reader, SLACK)
            assert answers_in(answer) == [200]
            writer.close()
            for _, busy_writer in busy[1:]:
                busy_writer.close()

    run(scenario)
