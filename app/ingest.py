"""``POST /api/v1/save-message`` as a raw ASGI handler: the ingest hot path.

Profiled under B1, Starlette's per-request machinery (three middleware layers
each wrapping ``send`` in a closure, routing by regex over every route,
Request/Headers/Response objects) cost more of an api process' time than the
endpoint itself did. This handler answers exactly like the Starlette route did
(same checks in the same order, same statuses, bodies, headers, metrics) but
reads ``scope`` and ``receive`` directly. The app dispatches to it before
Starlette for that one method and path; every other request, and this route
under a ``root_path``, still goes through Starlette, where the same handler is
mounted as the route's ASGI endpoint.
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

from app import metrics
from app.batcher import AcceptBatcher
from app.logging import get_logger
from app.model import InvalidInput, parse_save_message
from app.settings import Settings

log = get_logger("api")

SAVE_PATH = "/api/v1/save-message"

# JSON escapes can make a body up to 6x its decoded text (\uXXXX), plus the other fields.
BODY_OVERHEAD = 4096

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

_json = msgspec.json.Encoder()
_CONTENT_TYPE_JSON = (b"content-type", b"application/json")


def json_media_type(content_type: str) -> bool:
    """``application/json`` or an ``application/*+json`` subtype, parameters ignored."""
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == "application/json" or (
        media_type.startswith("application/") and media_type.endswith("+json")
    )


def bearer_matches(header: str, token: bytes) -> bool:
    """Constant-time comparison of the bearer token (no early exit on the first wrong byte)."""
    scheme, _, provided = header.partition(" ")
    return hmac.compare_digest(provided.strip().encode(), token) and scheme.lower() == "bearer"


def json_answer(payload: dict, status: int) -> tuple[int, Headers, bytes]:
    body = _json.encode(payload)
    return status, [(b"content-length", b"%d" % len(body)), _CONTENT_TYPE_JSON], body


def error_answer(status: int, message: str, field: str | None = None) -> tuple[int, Headers, bytes]:
    return json_answer({"error": message, "field": field}, status)


# What Starlette's ServerErrorMiddleware sends for an unhandled exception.
_INTERNAL_ERROR = b"Internal Server Error"
_START_500 = {
    "type": "http.response.start",
    "status": 500,
    "headers": [
        (b"content-length", b"%d" % len(_INTERNAL_ERROR)),
        (b"content-type", b"text/plain; charset=utf-8"),
    ],
}
_BODY_500 = {"type": "http.response.body", "body": _INTERNAL_ERROR}


class SaveMessageHandler:
    """Validate one message, accept it through the batcher, answer 201 (200 if a duplicate)."""

    def __init__(self, settings: Settings) -> None:
        self.max_message_bytes = settings.max_message_bytes
        self.body_limit = settings.max_message_bytes * 6 + BODY_OVERHEAD
        self.token = settings.api_token.encode() if settings.api_token else None
        # A filtered-out structlog call still costs ~1 µs through its proxy: skip it outright.
        self.log_accepted = settings.log_level == "debug"
        # Set by the app's lifespan, which owns the Redis client.
        self.batcher: AcceptBatcher | None = None
        self._accepted_due = metrics.ACCEPTED.labels("due")
        self._accepted_delayed = metrics.ACCEPTED.labels("delayed")
        self._accepted_duplicate = metrics.ACCEPTED.labels("duplicate")
        self._accepted_invalid = metrics.ACCEPTED.labels("invalid")
        # The 401 never varies: build it once.
        status, headers, body = error_answer(401, "missing or wrong bearer token", "Authorization")
        self._unauthorized = (status, [*headers, (b"www-authenticate", b"Bearer")], body)
        # (duration, requests) children per status: what the HttpMetrics middleware records
        # for the requests it sees, which the direct dispatch bypasses.
        self._http: dict[int, tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The Starlette route's endpoint: its middleware counts it and handles exceptions."""
        status, headers, body = await self.answer(scope, receive)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Direct from the app, bypassing Starlette: do what its middleware would have done."""
        started = perf_counter()
        status = 500
        try:
            try:
                answer = await self.answer(scope, receive)
            except Exception:
                await send(_START_500)
                await send(_BODY_500)
                raise  # as Starlette does: the server logs it, a test client re-raises it
            status = answer[0]
            await send({"type": "http.response.start", "status": status, "headers": answer[1]})
            await send({"type": "http.response.body", "body": answer[2]})
        finally:
            children = self._http.get(status)
            if children is None:
                children = self._http[status] = (
                    metrics.HTTP_DURATION.labels(SAVE_PATH),
                    metrics.HTTP_REQUESTS.labels(SAVE_PATH, "POST", str(status)),
                )
            children[0].observe(perf_counter() - started)
            children[1].inc()

    async def answer(self, scope: Scope, receive: Receive) -> tuple[int, Headers, bytes]:
        # Starlette's Headers.get returns the first occurrence of a name: so do these.
        authorization = content_type = content_length = None
        for name, value in scope["headers"]:
            if name == b"content-type":
                if content_type is None:
                    content_type = value
            elif name == b"content-length":
                if content_length is None:
                    content_length = value
            elif name == b"authorization" and authorization is None:
                authorization = value
        token = self.token
        if token is not None and not bearer_matches(
            authorization.decode("latin-1") if authorization is not None else "", token
        ):
            return self._unauthorized
        try:
            if content_type != b"application/json" and not json_media_type(
                content_type.decode("latin-1") if content_type is not None else ""
            ):
                raise InvalidInput("Content-Type must be application/json", None, 415)
            body = await self._read_body(receive, content_length)
            msg = parse_save_message(body, self.max_message_bytes)
        except InvalidInput as exc:
            self._accepted_invalid.inc()
            return error_answer(exc.status, exc.error, exc.field)
        except ClientDisconnect:
            return error_answer(400, "client disconnected before the body was read")
        try:
            result = await self.batcher.accept(msg)  # type: ignore[union-attr]
        except (RedisConnectionError, RedisTimeoutError, OSError):
            log.warning("redis unavailable", uuid=msg.uuid)
            return error_answer(503, "storage unavailable, retry with the same uuid")
        except RedisError as exc:
            # Redis answered with an error (e.g. OOM, LOADING, READONLY): nothing was written.
            log.error("accept failed", uuid=msg.uuid, error=str(exc)[:200])
            return error_answer(503, "storage refused the write, retry with the same uuid")
        payload = {"uuid": msg.uuid, "runAt": result.run_at, "state": result.state}
        if result.created:
            (self._accepted_due if result.state == "queued" else self._accepted_delayed).inc()
            if self.log_accepted:
                log.debug("accepted", uuid=msg.uuid, run_at=result.run_at, state=result.state)
            return json_answer(payload, 201)
        self._accepted_duplicate.inc()
        payload["duplicate"] = True
        return json_answer(payload, 200)

    async def _read_body(self, receive: Receive, content_length: bytes | None) -> bytes:
        """The body, refusing (413) a declared or streamed size over the limit before reading on."""
        limit = self.body_limit
        if content_length is not None:
            declared = content_length.decode("latin-1")
            if not declared.isdigit():
                raise InvalidInput("invalid Content-Length", None, 400)
            if int(declared) > limit:
                raise InvalidInput(f"body larger than {limit} bytes", None, 413)
        message = await receive()
        # The usual case: the whole body in one message, nothing to join.
        if message["type"] == "http.request" and not message.get("more_body", False):
            body = message.get("body", b"")
            if len(body) > limit:
                raise InvalidInput(f"body larger than {limit} bytes", None, 413)
            return body
        chunks: list[bytes] = []
        size = 0
        while True:
            if message["type"] == "http.request":
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise InvalidInput(f"body larger than {limit} bytes", None, 413)
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)
            elif message["type"] == "http.disconnect":
                raise ClientDisconnect()
            message = await receive()
