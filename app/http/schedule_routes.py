"""The schedule routes under /api/v1/schedules: create or replace, list, show, delete,
pause, resume. Like the lifecycle routes (``app.http.routes``): every input validated
before Redis is touched, errors as ``{"error", "field"}``, the same bearer token, each
route documented where it is declared. The store side is ``app.store.schedules``."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from app.http.answers import (
    NotConnected,
    bearer_matches,
    error,
    failure_answer,
    json_answer,
    response,
    unauthorized_answer,
)
from app.http.ingest import BODY_OVERHEAD
from app.http.openapi import MALFORMED, NOT_JSON, UNAUTHORIZED, UNAVAILABLE, Doc, Operation, Reply
from app.http.routes import json_body, query_limit
from app.http.schedule_wire import (
    NAME_PATTERN,
    NEXT_SHOWN,
    PRODUCED_SHOWN,
    SCHEDULE_PAGE_DEFAULT,
    SCHEDULE_PAGE_MAX,
    Produced,
    ScheduleBody,
    ScheduleDeleted,
    SchedulePage,
    ScheduleView,
)
from app.log import get_logger
from app.model import RUN_AT_MAX, BodyDecoder, InvalidInput
from app.recurrence import check_name, every_text, occurrences, validate
from app.settings import Settings
from app.store.schedules import Schedules, Stored, UnreadableSchedule

log = get_logger("api")

Handler = Callable[[Request, Schedules], Awaitable[Response]]
_decoder = BodyDecoder(ScheduleBody)
PAUSE_TRIES = 5  # read-modify-write attempts of pause/resume against concurrent changes
TAG = "schedules"


def respond(value: msgspec.Struct, status: int = 200) -> Response:
    return response(json_answer(value, status))


def view(stored: Stored) -> ScheduleView:
    d = stored.definition
    out = ScheduleView(
        name=stored.name,
        message=d.message,
        timezone=d.timezone,
        paused=d.paused,
        generation=stored.generation,
        createdAt=stored.created_ms,
        materialisedThrough=stored.progress_ms,
    )
    if d.cron is not None:
        out.cron = d.cron
    if d.every_ms is not None:
        out.every = every_text(d.every_ms)
    if d.start_at is not None:
        out.startAt = d.start_at
    if d.end_at is not None:
        out.endAt = d.end_at
    return out


def path_name(request: Request) -> str:
    return check_name(request.path_params["name"])


def schedule_routes(settings: Settings) -> list[Operation]:
    """The routes; their handlers find the Schedules in ``app.state.schedules`` (None until
    the api has reached Redis: 503)."""
    token = settings.api_token.encode() if settings.api_token else None
    body_limit = settings.max_message_bytes * 6 + BODY_OVERHEAD  # as save-message's
    min_interval_ms = max(1, round(settings.schedule_min_interval * 1000))

    def guarded(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        @functools.wraps(handler)
        async def endpoint(request: Request) -> Response:
            if token is not None and not bearer_matches(
                request.headers.get("authorization"), token
            ):
                return response(unauthorized_answer())
            try:
                schedules = request.app.state.schedules
                if schedules is None:
                    raise NotConnected()
                return await handler(request, schedules)
            except UnreadableSchedule as exc:
                return error(409, f"{exc}: PUT a new definition or DELETE it", "name")
            except Exception as exc:
                answer = failure_answer(exc, request.url.path, "retry")
                if answer is None:
                    raise
                return response(answer)

        return endpoint

    def not_found(name: str) -> Response:
        return error(404, f"no schedule {name}", "name")

    async def put_schedule(request: Request, s: Schedules) -> Response:
        name = path_name(request)
        body: ScheduleBody = _decoder.decode(await json_body(request, body_limit))
        definition = validate(
            message=body.message,
            cron=body.cron,
            every=body.every,
            timezone=body.timezone,
            start_at=body.startAt,
            end_at=body.endAt,
            paused=body.paused,
            max_message_bytes=settings.max_message_bytes,
            min_interval_ms=min_interval_ms,
        )
        result = await s.put(name, definition)
        stored = await s.get(name)
        if stored is None:  # deleted between the two calls
            return not_found(name)
        if result.kind != "unchanged":
            log.info(
                "schedule stored", schedule=name, outcome=result.kind, generation=result.generation
            )
        out = view(stored)
        out.outcome = result.kind  # type: ignore[assignment]
        return respond(out, 201 if result.kind == "created" else 200)

    async def list_schedules(request: Request, s: Schedules) -> Response:
        limit = query_limit(request, SCHEDULE_PAGE_DEFAULT, SCHEDULE_PAGE_MAX)
        cursor = request.query_params.get("cursor") or None
        if cursor is not None:
            try:
                check_name(cursor)
            except InvalidInput:
                raise InvalidInput(
                    "cursor must be the `next` of a previous page", "cursor"
                ) from None
        page = await s.page(cursor, limit)
        return respond(
            SchedulePage(
                items=[view(i) for i in page.items], next=page.next, unreadable=page.unreadable
            )
        )

    async def get_schedule(request: Request, s: Schedules) -> Response:
        name = path_name(request)
        stored = await s.get(name)
        if stored is None:
            return not_found(name)
        now, _, _ = await s.clock()
        out = view(stored)
        d = stored.definition
        out.next = (
            []
            if d.paused
            else list(
                occurrences(
                    d, stored.created_ms, max(now, stored.created_ms), RUN_AT_MAX, NEXT_SHOWN
                )
            )
        )
        out.produced = [
            Produced(uuid=uuid, runAt=at, state=None if rec is None else rec.state.value)  # type: ignore[arg-type]
            for at, uuid, rec in await s.produced(stored, PRODUCED_SHOWN)
        ]
        return respond(out)

    async def delete_schedule(request: Request, s: Schedules) -> Response:
        name = path_name(request)
        if not await s.delete(name):
            return not_found(name)
        log.info("schedule deleted", schedule=name)
        return respond(ScheduleDeleted(name=name, deleted=True))

    def set_paused(paused: bool) -> Handler:
        async def handler(request: Request, s: Schedules) -> Response:
            name = path_name(request)
            for _ in range(PAUSE_TRIES):
                stored = await s.get(name)
                if stored is None:
                    return not_found(name)
                if stored.definition.paused == paused:
                    return respond(view(stored))
                changed = msgspec.structs.replace(stored.definition, paused=paused)
                result = await s.put(name, changed, expect=stored.generation)
                if result.kind != "conflict":
                    log.info("schedule paused" if paused else "schedule resumed", schedule=name)
                    current = await s.get(name)
                    return respond(view(current)) if current is not None else not_found(name)
            return error(409, "the schedule kept changing; retry", "name")

        handler.__name__ = "pause_schedule" if paused else "resume_schedule"
        return handler

    base = "/api/v1/schedules"
    one = f"{base}/{{name}}"
    bad_name = Reply("Bad name (charset or length).")
    missing = Reply("No schedule of that name.")
    unreadable = Reply(
        "The stored definition cannot be read by this release (another release or a hand "
        "wrote it): PUT a new definition or DELETE it."
    )
    return [
        Operation(
            "PUT",
            one,
            guarded(put_schedule),
            Doc(
                "Create or replace a schedule (idempotent)",
                {
                    201: Reply("Created.", ScheduleView),
                    200: Reply(
                        "Replaced (a new generation: its not-yet-due occurrences of the old "
                        "definition are cancelled) or unchanged (the same definition).",
                        ScheduleView,
                    ),
                    400: MALFORMED,
                    401: UNAUTHORIZED,
                    413: Reply(
                        "Body too large, or `message` over "
                        f"{settings.max_message_bytes} UTF-8 bytes."
                    ),
                    415: NOT_JSON,
                    422: Reply(
                        "Bad name, cron expression, timezone, interval (or below "
                        "EAT_SCHEDULE_MIN_INTERVAL), startAt/endAt (endAt before startAt), an "
                        "unknown field; `field` names it."
                    ),
                    503: UNAVAILABLE,
                },
                tag=TAG,
                request=ScheduleBody,
            ),
        ),
        Operation(
            "GET",
            base,
            guarded(list_schedules),
            Doc(
                "Schedules by name, a page at a time",
                {
                    200: Reply("A page.", SchedulePage),
                    401: UNAUTHORIZED,
                    422: Reply("Bad `limit` or `cursor`."),
                    503: UNAVAILABLE,
                },
                tag=TAG,
                query=(
                    {
                        "name": "limit",
                        "in": "query",
                        "required": False,
                        "schema": {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": SCHEDULE_PAGE_MAX,
                            "default": SCHEDULE_PAGE_DEFAULT,
                        },
                    },
                    {
                        "name": "cursor",
                        "in": "query",
                        "required": False,
                        "description": "The `next` of the previous page.",
                        "schema": {"type": "string", "pattern": NAME_PATTERN},
                    },
                ),
            ),
        ),
        Operation(
            "GET",
            one,
            guarded(get_schedule),
            Doc(
                "A schedule: definition, next occurrences, last produced messages",
                {
                    200: Reply("The schedule.", ScheduleView),
                    401: UNAUTHORIZED,
                    404: missing,
                    409: unreadable,
                    422: bad_name,
                    503: UNAVAILABLE,
                },
                tag=TAG,
            ),
        ),
        Operation(
            "DELETE",
            one,
            guarded(delete_schedule),
            Doc(
                "Delete a schedule; its not-yet-due occurrences are cancelled",
                {
                    200: Reply("Deleted.", ScheduleDeleted),
                    401: UNAUTHORIZED,
                    404: missing,
                    422: bad_name,
                    503: UNAVAILABLE,
                },
                tag=TAG,
            ),
        ),
        *(
            Operation(
                "POST",
                f"{one}/{action}",
                guarded(set_paused(action == "pause")),
                Doc(
                    summary,
                    {
                        200: Reply(answer, ScheduleView),
                        401: UNAUTHORIZED,
                        404: missing,
                        409: Reply(
                            "The schedule changed under each of several attempts, or its "
                            "stored definition cannot be read by this release (PUT a new "
                            "definition or DELETE it)."
                        ),
                        422: bad_name,
                        503: UNAVAILABLE,
                    },
                    tag=TAG,
                ),
            )
            for action, summary, answer in (
                (
                    "pause",
                    "Pause a schedule",
                    "Paused (a new generation): its not-yet-due occurrences are cancelled, none "
                    "is produced until it resumes. Already paused: unchanged.",
                ),
                (
                    "resume",
                    "Resume a schedule",
                    "Resumed (a new generation) from now: occurrences that fell while it was "
                    "paused are not produced. Not paused: unchanged.",
                ),
            )
        ),
    ]
