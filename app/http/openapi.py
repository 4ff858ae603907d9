"""The OpenAPI 3.1 document of the whole HTTP API, built from the code.

Request and response bodies are the msgspec structs of ``app.http.wire`` (the
lifecycle routes encode their responses with them), turned into JSON Schema by
``msgspec.json.schema_components``; this module adds only what a struct cannot
say: paths, parameters, status codes. A test checks that every route the app
serves is documented here and nothing else, and schemathesis checks the
running app against the document.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from importlib import metadata
from typing import Any

import msgspec

from app.http.wire import (
    BULK_MAX_ITEMS,
    DEAD_PAGE_DEFAULT,
    DEAD_PAGE_MAX,
    RESCHEDULE_BODY_LIMIT,
    UUID_PATTERN,
    BulkResult,
    ConflictBody,
    DeadPage,
    DeletedAll,
    DeletedOne,
    ErrorBody,
    Health,
    MessageRef,
    MessageStatus,
    Ready,
    Replayed,
    ReplayedAll,
    Reschedule,
    Saved,
    SaveMessageBody,
    Stats,
)
from app.settings import Settings

JSON = "application/json"


@dataclass(frozen=True)
class Reply:
    description: str
    body: type | None = ErrorBody
    media: str = JSON


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    summary: str
    responses: dict[int, Reply]
    tag: str = "messages"
    request: type | str | None = None  # a struct, or "bulk" for the save-messages shapes
    query: tuple[dict[str, Any], ...] = ()
    secured: bool = True  # behind the optional bearer token (every /api/* path)
    description: str = ""

    @property
    def path_params(self) -> list[dict[str, Any]]:
        if "{uuid}" not in self.path:
            return []
        return [
            {
                "name": "uuid",
                "in": "path",
                "required": True,
                "description": "Canonical UUID of the message (any case).",
                "schema": {"type": "string", "pattern": UUID_PATTERN},
            }
        ]


UNAUTHORIZED = Reply("Missing or wrong bearer token (only when EAT_API_TOKEN is set).")
UNAVAILABLE = Reply("Redis unreachable or refusing: nothing changed, retry.")
BAD_UUID = Reply("The path's uuid is not a canonical UUID (`field`: uuid).")
UNKNOWN = Reply("No such message (`field`: uuid).")
CONFLICT = Reply(
    "The message is not scheduled or retrying; `state` says which state it is in.", ConflictBody
)
MALFORMED = Reply("Malformed JSON.")
NOT_JSON = Reply("Content-Type is not application/json.")
INVALID = Reply("Wrong type, missing or unknown field, value out of range; `field` names it.")


def _operations(settings: Settings) -> list[Operation]:
    v1 = "/api/v1"
    return [
        Operation(
            "post",
            f"{v1}/save-message",
            "Accept one message",
            {
                201: Reply("Accepted: `queued` (due now) or `scheduled`.", Saved),
                200: Reply("The uuid was accepted before; nothing changed.", Saved),
                400: MALFORMED,
                401: UNAUTHORIZED,
                413: Reply(
                    f"Body too large, or `message` over {settings.max_message_bytes} UTF-8 bytes."
                ),
                415: NOT_JSON,
                422: INVALID,
                503: Reply("Nothing was written: retry with the same uuid."),
            },
            request=SaveMessageBody,
        ),
        Operation(
            "post",
            f"{v1}/save-messages",
            f"Accept up to {BULK_MAX_ITEMS} messages in one request",
            {
                200: Reply(
                    "One result per item, by index. Valid items are accepted even when others "
                    "are invalid; all valid items are stored in one atomic script call.",
                    BulkResult,
                ),
                400: MALFORMED,
                401: UNAUTHORIZED,
                413: Reply(
                    f"More than {BULK_MAX_ITEMS} items, or a body over "
                    f"{settings.max_batch_bytes} bytes."
                ),
                415: NOT_JSON,
                422: Reply('The body is neither an array nor {"messages": [...]}.'),
                503: Reply("Nothing was written: retry with the same uuids."),
            },
            request="bulk",
            description="The body is a JSON array of save-message bodies, or "
            '`{"messages": [...]}`. A uuid repeated inside one request is accepted once; '
            "its later items answer `duplicate`.",
        ),
        Operation(
            "get",
            f"{v1}/messages/{{uuid}}",
            "A message's state, times and transitions",
            {
                200: Reply("The record.", MessageStatus),
                401: UNAUTHORIZED,
                404: UNKNOWN,
                422: BAD_UUID,
                503: UNAVAILABLE,
            },
        ),
        Operation(
            "delete",
            f"{v1}/messages/{{uuid}}",
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
        Operation(
            "patch",
            f"{v1}/messages/{{uuid}}",
            "Move a scheduled or retrying message to a new runAt",
            {
                200: Reply(
                    "Moved. `state` is `queued` when the new runAt has passed by Redis' clock "
                    "(it is in the stream now), else the unchanged `scheduled`/`retrying`.",
                    MessageRef,
                ),
                400: MALFORMED,
                401: UNAUTHORIZED,
                404: UNKNOWN,
                409: CONFLICT,
                413: Reply(f"Body over {RESCHEDULE_BODY_LIMIT} bytes."),
                415: NOT_JSON,
                422: Reply("Bad uuid, or runAt missing, not an integer or out of range."),
                503: UNAVAILABLE,
            },
            request=Reschedule,
        ),
        Operation(
            "get",
            f"{v1}/dead",
            "Dead-lettered messages, oldest first, a page at a time",
            {
                200: Reply("A page.", DeadPage),
                401: UNAUTHORIZED,
                422: Reply("Bad `limit` or `cursor`."),
                503: UNAVAILABLE,
            },
            tag="dead letters",
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
                    "schema": {"type": "string", "pattern": r"^\d{1,20}-\d{1,20}$"},
                },
            ),
        ),
        Operation(
            "delete",
            f"{v1}/dead",
            "Purge the dead stream",
            {200: Reply("How many entries went.", DeletedAll), 401: UNAUTHORIZED, 503: UNAVAILABLE},
            tag="dead letters",
        ),
        Operation(
            "post",
            f"{v1}/dead/replay",
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
            tag="dead letters",
        ),
        Operation(
            "post",
            f"{v1}/dead/{{uuid}}/replay",
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
                    "A dead entry exists but the uuid's record is live (not dead): replaying "
                    "would run it twice.",
                    ConflictBody,
                ),
                422: BAD_UUID,
                503: UNAVAILABLE,
            },
            tag="dead letters",
        ),
        Operation(
            "delete",
            f"{v1}/dead/{{uuid}}",
            "Delete one dead-lettered message",
            {
                200: Reply("Deleted from the dead stream.", DeletedOne),
                401: UNAUTHORIZED,
                404: Reply("Not in the dead stream."),
                422: BAD_UUID,
                503: UNAVAILABLE,
            },
            tag="dead letters",
        ),
        Operation(
            "get",
            f"{v1}/stats",
            "Queue figures, consumers and the current leader",
            {200: Reply("Read in one round trip.", Stats), 401: UNAUTHORIZED, 503: UNAVAILABLE},
            tag="operations",
        ),
        Operation(
            "get",
            f"{v1}/openapi.json",
            "This document",
            {200: Reply("OpenAPI 3.1.", None), 401: UNAUTHORIZED},
            tag="operations",
        ),
        Operation(
            "get",
            "/healthz",
            "Liveness: answers while the process lives",
            {200: Reply("Alive.", Health)},
            tag="operations",
            secured=False,
        ),
        Operation(
            "get",
            "/readyz",
            "Readiness: 200 only while Redis answers",
            {200: Reply("Ready.", Ready), 503: Reply("Redis does not answer.", Ready)},
            tag="operations",
            secured=False,
        ),
        Operation(
            "get",
            "/metrics",
            "Prometheus metrics",
            {200: Reply("Prometheus text exposition.", None, "text/plain")},
            tag="operations",
            secured=False,
        ),
    ]


@dataclass
class _Refs:
    """Struct -> {"$ref": ...}, filled by one schema_components call over every struct."""

    types: list[type] = field(default_factory=list)
    refs: dict[type, dict[str, Any]] = field(default_factory=dict)
    components: dict[str, Any] = field(default_factory=dict)

    def build(self) -> None:
        schemas, self.components = msgspec.json.schema_components(
            self.types, ref_template="#/components/schemas/{name}"
        )
        self.refs = dict(zip(self.types, schemas, strict=True))


def _content(reply: Reply, refs: _Refs) -> dict[str, Any]:
    if reply.media != JSON:
        return {reply.media: {"schema": {"type": "string"}}}
    schema = refs.refs[reply.body] if reply.body is not None else {"type": "object"}
    return {JSON: {"schema": schema}}


def build(settings: Settings) -> dict[str, Any]:
    operations = _operations(settings)
    refs = _Refs()
    for op in operations:
        for reply in op.responses.values():
            if reply.body is not None and reply.body not in refs.types:
                refs.types.append(reply.body)
        if isinstance(op.request, type) and op.request not in refs.types:
            refs.types.append(op.request)
    if SaveMessageBody not in refs.types:
        refs.types.append(SaveMessageBody)
    refs.build()
    items = {
        "type": "array",
        "maxItems": BULK_MAX_ITEMS,
        "items": refs.refs[SaveMessageBody],
    }
    bulk = {
        "anyOf": [
            items,
            {
                "type": "object",
                "properties": {"messages": items},
                "required": ["messages"],
                "additionalProperties": False,
            },
        ]
    }
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        spec: dict[str, Any] = {
            "summary": op.summary,
            "operationId": f"{op.method}_{op.path.strip('/').replace('/', '_')}".replace(
                "{uuid}", "uuid"
            )
            .replace("-", "_")
            .replace(".", "_"),
            "tags": [op.tag],
            "responses": {
                str(status): {"description": reply.description, "content": _content(reply, refs)}
                for status, reply in sorted(op.responses.items())
            },
        }
        if op.description:
            spec["description"] = op.description
        parameters = op.path_params + list(op.query)
        if parameters:
            spec["parameters"] = parameters
        if op.request is not None:
            schema = bulk if op.request == "bulk" else refs.refs[op.request]
            spec["requestBody"] = {"required": True, "content": {JSON: {"schema": schema}}}
        if op.secured:
            # Optional: the token is required only when EAT_API_TOKEN is set.
            spec["security"] = [{"bearer": []}, {}]
        paths.setdefault(op.path, {})[op.method] = spec
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "echo-at-time",
            "version": _version(),
            "description": "Delayed messages on Redis: accepted over HTTP, handled once at "
            'their time. Every error is {"error": "...", "field": "<name>" | null}.',
        },
        "paths": paths,
        "components": {
            "schemas": refs.components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


@cache
def _version() -> str:
    try:
        return metadata.version("echo-at-time")
    except metadata.PackageNotFoundError:
        return "0.0.0"


def encoded(settings: Settings) -> bytes:
    return msgspec.json.encode(build(settings))
