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

from time import perf_counter

from starlette.requests import ClientDisconnect

from app import metrics
from app.http.answers import (
    Answer,
    BufferedBytes,
    Receive,
    RequestMetrics,
    Scope,
    Send,
    bearer_matches,
    client_gone_answer,
    error_answer,
    failure_answer,
    internal_error_answer,
    json_answer,
    read_body,
    require_json,
    unauthorized_answer,
)
from app.http.batcher import AcceptBatcher, PartitionBatchers
from app.http.wire import LegacyMessage, LegacySaved
from app.log import get_logger
from app.model import InvalidInput, parse_save_message
from app.settings import Settings
from app.targets import TargetPolicy, TargetRefused

log = get_logger("api")

SAVE_PATH = "/api/v1/save-message"

# JSON escapes can make a body up to 6x its decoded text (\uXXXX), plus the other fields.
BODY_OVERHEAD = 4096

# What the app's 500 handler sends for an unhandled exception (see app.http.app).
_500_STATUS, _500_HEADERS, _500_BODY = internal_error_answer()
_START_500 = {"type": "http.response.start", "status": _500_STATUS, "headers": _500_HEADERS}
_BODY_500 = {"type": "http.response.body", "body": _500_BODY}


async def check_target(targets: TargetPolicy, url: str) -> None:
    """A message's target, refused as InvalidInput 422 naming the field ``target``."""
    try:
        await targets.check(url)
    except TargetRefused as exc:
        raise InvalidInput(str(exc), "target") from None


class SaveMessageHandler:
    """Validate one message, accept it through the batcher, answer 201 (200 if a duplicate)."""

    def __init__(
        self,
        settings: Settings,
        request_metrics: RequestMetrics,
        targets: TargetPolicy | None = None,
        buffered: BufferedBytes | None = None,
    ) -> None:
        # A message's webhook target: allowlist and addresses checked before it is stored.
        self.targets = targets or TargetPolicy.of(settings)
        self.max_message_bytes = settings.max_message_bytes
        self.body_limit = settings.max_message_bytes * 6 + BODY_OVERHEAD
        # The server's bound on bodies arriving in pieces, shared with every route.
        self.buffered = buffered or BufferedBytes(settings.http_max_buffered_bytes)
        self.token = settings.api_token.encode() if settings.api_token else None
        self.legacy_http = settings.legacy_http
        # A filtered-out structlog call still costs ~1 µs through its proxy: skip it outright.
        self.log_accepted = settings.log_level == "debug"
        # Set by the app's lifespan, which owns the Redis client: an AcceptBatcher, one per
        # partition (PartitionBatchers), or one that answers 503 until Redis is reached.
        self.batcher: AcceptBatcher | PartitionBatchers | None = None
        self._accepted_due = metrics.ACCEPTED.labels("due")
        self._accepted_delayed = metrics.ACCEPTED.labels("delayed")
        self._accepted_duplicate = metrics.ACCEPTED.labels("duplicate")
        self._accepted_invalid = metrics.ACCEPTED.labels("invalid")
        # The 401 never varies: build it once.
        self._unauthorized = unauthorized_answer()
        # What the middleware records for the requests it sees, which dispatch bypasses.
        self._metrics = request_metrics

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
            self._metrics.record(SAVE_PATH, "POST", status, started)

    async def answer(self, scope: Scope, receive: Receive) -> Answer:
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
        if token is not None and not bearer_matches(authorization, token):
            return self._unauthorized
        try:
            require_json(content_type)
            body = await read_body(receive, content_length, self.body_limit, self.buffered)
            msg = parse_save_message(body, self.max_message_bytes)
            if msg.target is not None:
                await check_target(self.targets, msg.target)
        except InvalidInput as exc:
            self._accepted_invalid.inc()
            return error_answer(exc.status, exc.error, exc.field)
        except ClientDisconnect:
            return client_gone_answer()
        try:
            result = await self.batcher.accept(msg)  # type: ignore[union-attr]
        except Exception as exc:
            answer = failure_answer(exc, "save-message", "retry with the same uuid")
            if answer is None:
                raise
            return answer
        if result.created:
            (self._accepted_due if result.state == "queued" else self._accepted_delayed).inc()
            if self.log_accepted:
                log.debug("accepted", uuid=msg.uuid, run_at=result.run_at, state=result.state)
        else:
            self._accepted_duplicate.inc()
        if self.legacy_http:
            # The original service's answer, whole (its clients compare whole bodies): 200
            # and the message as posted, with the uuid it is stored under; a duplicate alike.
            original = LegacyMessage(msg.message, msg.run_at, msg.uuid)
            return json_answer(LegacySaved(original, True), 200)
        payload = {"uuid": msg.uuid, "runAt": result.run_at, "state": result.state}
        if result.created:
            return json_answer(payload, 201)
        payload["duplicate"] = True
        return json_answer(payload, 200)
