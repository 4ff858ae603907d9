"""One way to read a body and one way to answer, for every route.

The ingest hot path (``app.http.ingest``) speaks raw ASGI and the lifecycle
routes speak Starlette; both read bodies with :func:`read_body` and answer errors
as :func:`error_answer` (``{"error", "field"}``), so a limit, a status or an
error's shape cannot differ between them. An answer is ``(status, headers,
body)``; :func:`response` turns it into a Starlette ``Response``.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, MutableMapping
from time import perf_counter
from typing import Any

import msgspec
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from app import metrics
from app.backoff import describe
from app.log import get_logger
from app.model import InvalidInput
from app.store import OutcomeUnknown
from app.store.codec import CorruptRecord
from app.store.replicated import NotReplicated

log = get_logger("api")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]
Answer = tuple[int, Headers, bytes]

_json = msgspec.json.Encoder()
_CONTENT_TYPE_JSON = (b"content-type", b"application/json")


def json_answer(payload: object, status: int = 200) -> Answer:
    """``payload`` (a dict or a msgspec Struct) as a JSON answer."""
    body = _json.encode(payload)
    return status, [(b"content-length", b"%d" % len(body)), _CONTENT_TYPE_JSON], body


def error_answer(status: int, message: str, field: str | None = None) -> Answer:
    """Every error of the API: ``{"error": message, "field": field}``."""
    return json_answer({"error": message, "field": field}, status)


# The client closed the connection before its request was read whole (or the server
# closed it: a body past its deadline, answered 408 by the server and counted there).
# Nobody receives this answer; its status, nginx's "client closed request", is what the
# request metrics record, so no 400 is counted that no client was sent.
CLIENT_CLOSED = 499


def client_gone_answer() -> Answer:
    return error_answer(CLIENT_CLOSED, "client disconnected before the body was read")


def internal_error_answer() -> Answer:
    """What an unexpected exception answers, on every route: JSON like every other error
    (the exception itself is logged by the server, never sent)."""
    return error_answer(500, "internal error")


def unauthorized_answer() -> Answer:
    status, headers, body = error_answer(401, "missing or wrong bearer token", "Authorization")
    return status, [*headers, (b"www-authenticate", b"Bearer")], body


def response(answer: Answer) -> Response:
    """An answer as a Starlette response (the headers are already complete)."""
    status, headers, body = answer
    reply = Response(body, status_code=status)
    reply.raw_headers = headers
    return reply


def error(status: int, message: str, field: str | None = None) -> Response:
    return response(error_answer(status, message, field))


def failure_answer(exc: BaseException, what: str, retry: str) -> Answer | None:
    """The answer to an exception a route may meet, or None for one it must not swallow.

    Bad input and a client gone are 4xx; Redis down or refusing is 503 (a script is
    atomic, so nothing was written), with ``retry`` telling the client how to retry.
    """
    if isinstance(exc, InvalidInput):
        return error_answer(exc.status, exc.error, exc.field)
    if isinstance(exc, ClientDisconnect):
        return client_gone_answer()
    if isinstance(exc, CorruptRecord):
        # Damaged in Redis (by hand, or a disk): the next script that meets the record
        # moves it to the dead stream; a read can only say so.
        log.error("corrupt record", during=what, uuid=exc.uuid)
        return error_answer(
            500, "the stored record of this message cannot be read (corrupt)", "uuid"
        )
    if isinstance(exc, NotReplicated):
        # The master has it; fewer replicas than EAT_WAIT_REPLICAS confirmed it in time.
        log.warning("change not replicated in time", during=what, error=describe(exc))
        return error_answer(503, f"not replicated in time: {retry}")
    if isinstance(exc, OutcomeUnknown):
        # Sent, reply lost: not retried by the client library, since a second run would
        # answer for itself (a false duplicate, a false conflict). The client retries.
        log.warning("redis reply lost, outcome unknown", during=what)
        return error_answer(503, f"outcome unknown: storage may have applied the request; {retry}")
    if isinstance(exc, RedisConnectionError | RedisTimeoutError | OSError):
        log.warning("redis unavailable", during=what, error=describe(exc))
        return error_answer(503, f"storage unavailable, {retry}")
    if isinstance(exc, RedisError):
        # Redis answered with an error (OOM, LOADING, READONLY, ...): nothing was written.
        log.error("redis refused", during=what, error=describe(exc))
        return error_answer(503, f"storage refused the request, {retry}")
    return None


class NotConnected(RedisConnectionError):
    """The api has not reached Redis since it started (it keeps trying): nothing was sent."""

    def __init__(self) -> None:
        super().__init__("storage not connected yet")


def json_media_type(content_type: str) -> bool:
    """``application/json`` or an ``application/*+json`` subtype, parameters ignored."""
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == "application/json" or (
        media_type.startswith("application/") and media_type.endswith("+json")
    )


def require_json(content_type: bytes | str | None) -> None:
    """Raise 415 unless the Content-Type is JSON."""
    if content_type == b"application/json":
        return
    if isinstance(content_type, bytes):
        content_type = content_type.decode("latin-1")
    if not json_media_type(content_type or ""):
        raise InvalidInput("Content-Type must be application/json", None, 415)


def bearer_matches(header: bytes | str | None, token: bytes) -> bool:
    """Constant-time comparison of the bearer token (no early exit on the first wrong byte)."""
    if isinstance(header, bytes):
        header = header.decode("latin-1")
    scheme, _, provided = (header or "").partition(" ")
    return hmac.compare_digest(provided.strip().encode(), token) and scheme.lower() == "bearer"


class BufferedBytes:
    """Bytes of request bodies one server holds while they arrive in pieces, over every
    connection, against ``limit`` (EAT_HTTP_MAX_BUFFERED_BYTES).

    A body is read whole before it is parsed, and may take EAT_HTTP_BODY_TIMEOUT to
    arrive: without a bound, a thousand connections trickling 16 MiB bulk bodies would
    hold 16 GB. Past the bound a body is answered 503 (retry) and its pieces let go.
    A body that arrives in one piece is not counted: uvicorn holds at most one piece
    (its flow control pauses reading), and nothing is joined.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def take(self, count: int) -> bool:
        if self.held + count > self.limit:
            return False
        self.held += count
        return True

    def give(self, count: int) -> None:
        self.held -= count


BUSY_RECEIVING = "too many request bodies arriving at once: retry"


async def read_body(
    receive: Receive,
    content_length: bytes | str | None,
    limit: int,
    buffered: BufferedBytes | None = None,
) -> bytes:
    """The request body, refusing (413) a declared or streamed size over ``limit`` before
    reading on; 400 for a Content-Length that is not a number; 503 when the pieces of
    the bodies arriving would take ``buffered`` past its limit."""
    if content_length is not None:
        declared = content_length
        if isinstance(declared, bytes):
            declared = declared.decode("latin-1")
        # ASCII digits only ("²".isdigit() is true; int("²") raises); a length longer
        # than 18 digits is over any limit, and int() refuses over 4,300. (isascii() and
        # isdigit(): a third of a regex match's time, on the ingest path.)
        if not (declared.isascii() and declared.isdigit()):
            raise InvalidInput("invalid Content-Length", None, 400)
        if len(declared) > 18 or int(declared) > limit:
            raise InvalidInput(f"body larger than {limit} bytes", None, 413)
    message = await receive()
    # The usual case: the whole body in one message, nothing to join.
    if message["type"] == "http.request" and not message.get("more_body", False):
        body = message.get("body", b"")
        if len(body) > limit:
            raise InvalidInput(f"body larger than {limit} bytes", None, 413)
        return body
    chunks: list[bytes] = []
    size = held = 0
    try:
        while True:
            if message["type"] == "http.request":
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise InvalidInput(f"body larger than {limit} bytes", None, 413)
                if buffered is not None:
                    if not buffered.take(len(chunk)):
                        raise InvalidInput(BUSY_RECEIVING, None, 503)
                    held += len(chunk)
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)
            elif message["type"] == "http.disconnect":
                raise ClientDisconnect()
            message = await receive()
    finally:
        if buffered is not None:
            buffered.give(held)


class RequestMetrics:
    """Counts and times requests by route template, method and status (bounded labels).

    Looks each (route, method, status) up once: ``labels()`` builds and hashes a key
    per call. Shared by the middleware and the ingest path, which bypasses it.
    """

    def __init__(self) -> None:
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def record(self, route: str, method: str, status: int, started: float) -> None:
        key = (route, method, status)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (
                metrics.HTTP_DURATION.labels(route),
                metrics.HTTP_REQUESTS.labels(route, method, str(status)),
            )
        children[0].observe(perf_counter() - started)
        children[1].inc()
