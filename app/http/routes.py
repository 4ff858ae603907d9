"""The lifecycle routes under /api/v1: look a message up, cancel or move it, send
many at once, inspect and replay the dead letters, read the queue's figures,
and the OpenAPI document of the whole API.

Each handler validates every input (path uuid, query, body size and shape)
before it touches Redis, answers errors as ``{"error", "field"}`` like
save-message, and sits behind the same optional bearer token.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Awaitable, Callable

import msgspec
from msgspec import UNSET
from starlette.requests import Request
from starlette.responses import Response

from app import metrics
from app.http.answers import (
    NotConnected,
    bearer_matches,
    error,
    failure_answer,
    json_answer,
    read_body,
    require_json,
    response,
    unauthorized_answer,
)
from app.http.ingest import check_target
from app.http.openapi import (
    BAD_UUID,
    CONFLICT,
    MALFORMED,
    NOT_JSON,
    UNAUTHORIZED,
    UNAVAILABLE,
    UNKNOWN,
    Doc,
    Operation,
    Reply,
)
from app.http.wire import (
    BULK_MAX_ITEMS,
    DEAD_PAGE_DEFAULT,
    DEAD_PAGE_MAX,
    RESCHEDULE_BODY_LIMIT,
    BulkEnvelope,
    BulkItem,
    BulkResult,
    ConflictBody,
    DeadItem,
    DeadPage,
    DeletedAll,
    DeletedOne,
    MessageRef,
    MessageStatus,
    Replayed,
    ReplayedAll,
    Reschedule,
    Stats,
)
from app.log import get_logger
from app.model import (
    BodyDecoder,
    InvalidInput,
    field_names,
    normalize_uuid,
    parse_save_message,
)
from app.settings import Settings
from app.store.lifecycle import Outcome
from app.store.lifecycles import Cursor, Lifecycles, Report, parse_cursor
from app.targets import TargetPolicy

log = get_logger("api")

Handler = Callable[[Request, Lifecycles], Awaitable[Response]]

_LIMIT = re.compile(r"[0-9]{1,4}\Z")  # ASCII digits only: int() reads every script's
_reschedule_decoder = BodyDecoder(Reschedule)
_bulk_decoder = BodyDecoder(list[msgspec.Raw] | BulkEnvelope, field_names(BulkEnvelope))


def respond(value: msgspec.Struct, status: int = 200) -> Response:
    return response(json_answer(value, status))


def conflict(uuid: str, state: str, action: str) -> Response:
    body = ConflictBody(
        error=f"message {uuid} is {state}; only a scheduled or retrying message can be {action}",
        field="state",
        state=state,  # type: ignore[arg-type]
    )
    return respond(body, 409)


def not_found(uuid: str, where: str = "") -> Response:
    return error(404, f"no message {uuid}{where}", "uuid")


def path_uuid(request: Request) -> str:
    return normalize_uuid(request.path_params["uuid"])


async def json_body(request: Request, limit: int) -> bytes:
    """The body of a JSON request: 415 for another Content-Type, 413 over ``limit``."""
    require_json(request.headers.get("content-type"))
    return await read_body(
        request.receive,
        request.headers.get("content-length"),
        limit,
        getattr(request.app.state, "buffered", None),
    )


def query_limit(
    request: Request, default: int = DEAD_PAGE_DEFAULT, most: int = DEAD_PAGE_MAX
) -> int:
    """The ``limit`` of a paged list: 1 to ``most``, ``default`` when absent."""
    raw = request.query_params.get("limit")
    if raw is None:
        return default
    if not _LIMIT.match(raw) or not 1 <= int(raw) <= most:
        raise InvalidInput(f"limit must be an integer from 1 to {most}", "limit")
    return int(raw)


def query_cursor(request: Request, partitions: int) -> Cursor | None:
    raw = request.query_params.get("cursor")
    if raw is None or raw == "":
        return None
    try:
        return parse_cursor(raw, partitions)
    except ValueError:
        raise InvalidInput("cursor must be the `next` of a previous page", "cursor") from None


def lifecycle_routes(settings: Settings, targets: TargetPolicy | None = None) -> list[Operation]:
    """The routes, each with its documentation; their handlers find the Lifecycles in
    ``app.state.lifecycle`` (None until the api has reached Redis: 503) and the OpenAPI
    document in ``app.state.openapi``."""
    token = settings.api_token.encode() if settings.api_token else None
    targets = targets or TargetPolicy.of(settings)
    bulk_limit = settings.max_batch_bytes
    max_message = settings.max_message_bytes
    accepted_due = metrics.ACCEPTED.labels("due")
    accepted_delayed = metrics.ACCEPTED.labels("delayed")
    accepted_duplicate = metrics.ACCEPTED.labels("duplicate")
    accepted_invalid = metrics.ACCEPTED.labels("invalid")

    def guarded(handler: Handler, retry: str = "retry") -> Callable[[Request], Awaitable[Response]]:
        """Token check, then the handler; bad input and an unavailable Redis become errors
        (``retry`` tells the client how to retry)."""

        @functools.wraps(handler)
        async def endpoint(request: Request) -> Response:
            authorization = request.headers.get("authorization")
            if token is not None and not bearer_matches(authorization, token):
                return response(unauthorized_answer())
            try:
                lifecycles = request.app.state.lifecycle
                if lifecycles is None:
                    raise NotConnected()
                return await handler(request, lifecycles)
            except Exception as exc:
                answer = failure_answer(exc, request.url.path, retry)
                if answer is None:
                    raise
                return response(answer)

        return endpoint

    async def get_message(request: Request, lc: Lifecycles) -> Response:
        uuid = path_uuid(request)
        view = await lc.message(uuid)
        if view is None:
            return not_found(uuid)
        record = view.record
        target = view.body.target if view.body is not None else None
        return respond(
            MessageStatus(
                uuid=uuid,
                state=record.state.value,
                runAt=record.run_at,
                attempts=record.attempts,
                acceptedAt=record.accepted_at,
                updatedAt=record.updated_at,
                transitions=record.transitions,
                target=UNSET if target is None else target,
            )
        )

    def changed(uuid: str, outcome: Outcome, action: str) -> Response:
        if outcome.kind == "missing":
            return not_found(uuid)
        if outcome.kind == "conflict":
            return conflict(uuid, outcome.state or "", action)
        assert outcome.state is not None and outcome.run_at is not None
        return respond(MessageRef(uuid=uuid, runAt=outcome.run_at, state=outcome.state))  # type: ignore[arg-type]

    async def cancel_message(request: Request, lc: Lifecycles) -> Response:
        uuid = path_uuid(request)
        outcome = await lc.cancel(uuid)
        if outcome.kind == "done":
            log.info("cancelled", uuid=uuid)
        return changed(uuid, outcome, "cancelled")

    async def reschedule_message(request: Request, lc: Lifecycles) -> Response:
        uuid = path_uuid(request)
        body = await json_body(request, RESCHEDULE_BODY_LIMIT)
        run_at = _reschedule_decoder.decode(body).runAt  # type: ignore[attr-defined]
        outcome = await lc.reschedule(uuid, run_at)
        if outcome.kind == "done":
            log.info("rescheduled", uuid=uuid, run_at=run_at, state=outcome.state)
        return changed(uuid, outcome, "rescheduled")

    async def save_messages(request: Request, lc: Lifecycles) -> Response:
        body = await json_body(request, bulk_limit)
        try:
            decoded = _bulk_decoder.decode(body)
        except InvalidInput as exc:
            if exc.status != 422:
                raise
            shape = 'the body must be an array of messages, or {"messages": [...]}'
            raise InvalidInput(f"{exc.error}; {shape}", exc.field) from None
        raws = decoded.messages if isinstance(decoded, BulkEnvelope) else decoded
        assert isinstance(raws, list)
        if len(raws) > BULK_MAX_ITEMS:
            raise InvalidInput(f"at most {BULK_MAX_ITEMS} messages per request", None, 413)
        results: list[BulkItem | None] = [None] * len(raws)
        valid = []
        for index, raw in enumerate(raws):
            try:
                msg = parse_save_message(bytes(raw), max_message)
                if msg.target is not None:
                    await check_target(targets, msg.target)
                valid.append((index, msg))
            except InvalidInput as exc:
                results[index] = BulkItem(
                    index=index, status="invalid", error=exc.error, field=exc.field
                )
        stored = await lc.accept_many([msg for _, msg in valid])
        for (index, msg), got in zip(valid, stored, strict=True):
            results[index] = BulkItem(
                index=index,
                status="accepted" if got.created else "duplicate",
                uuid=msg.uuid,
                runAt=got.run_at,
                state=got.state,  # type: ignore[arg-type]
            )
        done = [r for r in results if r is not None]
        tally = Counter((r.status, r.state) for r in done)
        counts = {
            s: sum(n for (status, _), n in tally.items() if status == s)
            for s in ("accepted", "duplicate")
        }
        invalid = len(done) - counts["accepted"] - counts["duplicate"]
        # One increment per kind, not per message: each costs a lock round.
        accepted_invalid.inc(invalid)
        accepted_duplicate.inc(counts["duplicate"])
        accepted_due.inc(tally[("accepted", "queued")])
        accepted_delayed.inc(tally[("accepted", "scheduled")])
        log.info(
            "bulk accepted",
            accepted=counts["accepted"],
            duplicates=counts["duplicate"],
            invalid=invalid,
        )
        return respond(
            BulkResult(
                results=done,
                accepted=counts["accepted"],
                duplicates=counts["duplicate"],
                invalid=invalid,
            )
        )

    async def list_dead(request: Request, lc: Lifecycles) -> Response:
        limit, cursor = query_limit(request), query_cursor(request, lc.count)
        rows, next_cursor = await lc.dead_page(limit, cursor)
        items = [msgspec.convert(row.entry, DeadItem, from_attributes=True) for row in rows]
        for item in items:
            if item.target is None:
                item.target = UNSET
        if lc.count > 1:
            for item, row in zip(items, rows, strict=True):
                item.partition = row.partition
        return respond(DeadPage(items=items, next=next_cursor))

    async def replay_dead(request: Request, lc: Lifecycles) -> Response:
        uuid = path_uuid(request)
        outcome = await lc.replay(uuid)
        if outcome.kind == "missing":
            return not_found(uuid, " in the dead stream")
        if outcome.kind == "conflict":
            body = ConflictBody(
                error=f"message {uuid} is {outcome.state}, not dead: replaying its dead entry "
                "would run it twice",
                field="state",
                state=outcome.state,  # type: ignore[arg-type]
            )
            return respond(body, 409)
        log.info("replayed", uuid=uuid)
        return respond(Replayed(uuid=uuid, state="queued"))

    async def replay_all(request: Request, lc: Lifecycles) -> Response:
        replayed, skipped = await lc.replay_all()
        log.info("replayed dead letters", replayed=replayed, skipped=skipped)
        return respond(ReplayedAll(replayed=replayed, skipped=skipped))

    async def delete_dead(request: Request, lc: Lifecycles) -> Response:
        uuid = path_uuid(request)
        if not await lc.drop_dead(uuid):
            return not_found(uuid, " in the dead stream")
        log.info("dead letter deleted", uuid=uuid)
        return respond(DeletedOne(uuid=uuid, deleted=True))

    async def purge_dead(request: Request, lc: Lifecycles) -> Response:
        deleted = await lc.purge_dead()
        log.info("dead letters purged", deleted=deleted)
        return respond(DeletedAll(deleted=deleted))

    async def stats(request: Request, lc: Lifecycles) -> Response:
        body = stats_body(await lc.stats(), lc.count)
        schedules = getattr(request.app.state, "schedules", None)
        if schedules is not None and (count := await schedules.count()):
            body.schedules = count
        return respond(body)

    async def openapi_json(request: Request, lc: Lifecycles) -> Response:
        # Built by create_app from every route of the app, this one's included.
        return Response(request.app.state.openapi, media_type="application/json")

    v1 = "/api/v1"
    dead = "dead letters"
    return [
        Operation(
            "GET",
            f"{v1}/messages/{{uuid}}",
            guarded(get_message),
            Doc(
                "A message's state, times and transitions",
                {
                    200: Reply("The record.", MessageStatus),
                    401: UNAUTHORIZED,
                    404: UNKNOWN,
                    422: BAD_UUID,
                    503: UNAVAILABLE,
                },
            ),
        ),
        Operation(
            "DELETE",
            f"{v1}/messages/{{uuid}}",
            guarded(cancel_message),
            Doc(
                "Cancel a scheduled or retrying message",
                {
                    200: Reply(
                        "Cancelled: out of the sorted set, never promoted; the record is kept, "
                        "cancelled, for the retention window.",
                        MessageRef,
                    ),
                    401: UNAUTHORIZED,
                    404: UNKNOWN,
                    409: CONFLICT,
                    422: BAD_UUID,
                    503: UNAVAILABLE,
                },
            ),
        ),
        Operation(
            "PATCH",
            f"{v1}/messages/{{uuid}}",
            guarded(reschedule_message),
            Doc(
                "Move a scheduled or retrying message to a new runAt",
                {
                    200: Reply(
                        "Moved. `state` is `queued` when the new runAt has passed by Redis' "
                        "clock (it is in the stream now), else the unchanged "
                        "`scheduled`/`retrying`.",
                        MessageRef,
                    ),
                    400: MALFORMED,
                    401: UNAUTHORIZED,
                    404: UNKNOWN,
                    409: CONFLICT,
                    413: Reply(f"Body over {RESCHEDULE_BODY_LIMIT} bytes."),
                    415: NOT_JSON,
                    422: Reply(
                        "Bad uuid, or runAt missing, repeated, not an integer or out of range."
                    ),
                    503: UNAVAILABLE,
                },
                request=Reschedule,
            ),
        ),
        Operation(
            "POST",
            f"{v1}/save-messages",
            guarded(save_messages, "retry with the same uuids"),
            Doc(
                f"Accept up to {BULK_MAX_ITEMS} messages in one request",
                {
                    200: Reply(
                        "One result per item, by index. Valid items are accepted even when "
                        "others are invalid; the valid items of one partition are stored in "
                        "one atomic script call (with one partition: all of them).",
                        BulkResult,
                    ),
                    400: MALFORMED,
                    401: UNAUTHORIZED,
                    413: Reply(
                        f"More than {BULK_MAX_ITEMS} items, or a body over {bulk_limit} bytes."
                    ),
                    415: NOT_JSON,
                    422: Reply(
                        'The body is neither an array nor {"messages": [...]}, or repeats '
                        '"messages".'
                    ),
                    503: Reply(
                        "Nothing was written, or its answer was lost (`outcome unknown`): "
                        "retry with the same uuids."
                    ),
                },
                request="bulk",
                description="The body is a JSON array of save-message bodies, or "
                '`{"messages": [...]}`. A uuid repeated inside one request is accepted once; '
                "its later items answer `duplicate`.",
            ),
        ),
        Operation(
            "GET",
            f"{v1}/dead",
            guarded(list_dead),
            Doc(
                "Dead-lettered messages, oldest first, a page at a time",
                {
                    200: Reply("A page.", DeadPage),
                    401: UNAUTHORIZED,
                    422: Reply("Bad `limit` or `cursor`."),
                    503: UNAVAILABLE,
                },
                tag=dead,
                query=(
                    {
                        "name": "limit",
                        "in": "query",
                        "required": False,
                        "schema": {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": DEAD_PAGE_MAX,
                            "default": DEAD_PAGE_DEFAULT,
                        },
                    },
                    {
                        "name": "cursor",
                        "in": "query",
                        "required": False,
                        "description": "The `next` of the previous page.",
                        "schema": {
                            "type": "string",
                            "pattern": r"^[0-9]{1,20}-[0-9]{1,20}(-[0-9]{1,4})?$",
                        },
                    },
                ),
            ),
        ),
        Operation(
            "DELETE",
            f"{v1}/dead",
            guarded(purge_dead),
            Doc(
                "Purge the dead stream",
                {
                    200: Reply("How many entries went.", DeletedAll),
                    401: UNAUTHORIZED,
                    503: UNAVAILABLE,
                },
                tag=dead,
            ),
        ),
        Operation(
            "POST",
            f"{v1}/dead/replay",
            guarded(replay_all),
            Doc(
                "Replay every dead-lettered message",
                {
                    200: Reply(
                        "Replayed in batches, each atomic; entries dead-lettered meanwhile wait "
                        "for the next call.",
                        ReplayedAll,
                    ),
                    401: UNAUTHORIZED,
                    503: Reply("Redis failed part way: the batches before it are replayed."),
                },
                tag=dead,
            ),
        ),
        Operation(
            "POST",
            f"{v1}/dead/{{uuid}}/replay",
            guarded(replay_dead),
            Doc(
                "Replay one dead-lettered message",
                {
                    200: Reply(
                        "Back in the stream with attempts reset, record queued, entry removed "
                        "from the dead stream.",
                        Replayed,
                    ),
                    401: UNAUTHORIZED,
                    404: Reply("Not in the dead stream."),
                    409: Reply(
                        "A dead entry exists but the uuid's record is live (not dead): "
                        "replaying would run it twice.",
                        ConflictBody,
                    ),
                    422: BAD_UUID,
                    503: UNAVAILABLE,
                },
                tag=dead,
            ),
        ),
        Operation(
            "DELETE",
            f"{v1}/dead/{{uuid}}",
            guarded(delete_dead),
            Doc(
                "Delete one dead-lettered message",
                {
                    200: Reply("Deleted from the dead stream.", DeletedOne),
                    401: UNAUTHORIZED,
                    404: Reply("Not in the dead stream."),
                    422: BAD_UUID,
                    503: UNAVAILABLE,
                },
                tag=dead,
            ),
        ),
        Operation(
            "GET",
            f"{v1}/stats",
            guarded(stats),
            Doc(
                "Queue figures, consumers and the current leader",
                {
                    200: Reply("Read in one round trip per partition, all at once.", Stats),
                    401: UNAUTHORIZED,
                    503: UNAVAILABLE,
                },
                tag="operations",
            ),
        ),
        Operation(
            "GET",
            f"{v1}/openapi.json",
            guarded(openapi_json),
            Doc(
                "This document",
                {200: Reply("OpenAPI 3.1.", None), 401: UNAUTHORIZED},
                tag="operations",
            ),
        ),
    ]


def stats_body(report: Report, partitions: int) -> Stats:
    """``/stats``: the sums, and with several partitions each partition's figures."""
    body = msgspec.convert(report, Stats, from_attributes=True)
    if partitions == 1:  # the figures above are the one partition's
        body.partitions = msgspec.UNSET
    return body
