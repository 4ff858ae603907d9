"""The OpenAPI 3.1 document of the whole HTTP API, built from the app's routes.

Every route the API serves is an ``Operation``: a Starlette route with one method
and its ``Doc`` (summary, status codes, request struct, query parameters), written
where the route is declared. ``build`` walks the app's routes and refuses one
without documentation, so a route cannot be served undocumented and a documented
operation cannot be missing from the routes. Request and response bodies are the
msgspec structs of ``app.http.wire`` (the routes encode their responses with
them), turned into JSON Schema by ``msgspec.json.schema_components``.
schemathesis checks the running app against the document.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import metadata
from typing import Any

import msgspec
from starlette.routing import BaseRoute, Route

from app.http.wire import (
    BULK_MAX_ITEMS,
    UUID_PATTERN,
    ConflictBody,
    ErrorBody,
    SaveMessageBody,
)

JSON = "application/json"


@dataclass(frozen=True)
class Reply:
    description: str
    body: type | None = ErrorBody
    media: str = JSON


@dataclass(frozen=True)
class Doc:
    """What the OpenAPI document says about one operation, beyond its method and path."""

    summary: str
    responses: dict[int, Reply]
    tag: str = "messages"
    request: type | str | None = None  # a struct, or "bulk" for the save-messages shapes
    query: tuple[dict[str, Any], ...] = ()
    secured: bool = True  # behind the optional bearer token (every /api/* path)
    description: str = ""


class Operation(Route):
    """A route with one method and its documentation."""

    def __init__(
        self,
        method: str,
        path: str,
        endpoint: Callable[..., Any],
        doc: Doc,
        *,
        name: str | None = None,
    ) -> None:
        super().__init__(path, endpoint, methods=[method], name=name)
        self.method = method.lower()
        self.doc = doc


def documented(routes: Sequence[BaseRoute], docs: Mapping[str, Doc]) -> list[Operation]:
    """Routes declared where no documentation can be (the health routes of the shared
    layer), each as an Operation with the doc of its path. A route without a doc, or a
    doc without a route, is an error."""
    operations = []
    for route in routes:
        methods = (route.methods or set()) - {"HEAD"} if isinstance(route, Route) else set()
        if len(methods) != 1 or route.path not in docs:
            raise ValueError(f"no documentation for one method of the route {route!r}")
        (method,) = methods
        operations.append(
            Operation(method, route.path, route.endpoint, docs[route.path], name=route.name)
        )
    missing = docs.keys() - {op.path for op in operations}
    if missing:
        raise ValueError(f"documented paths that are not routes: {sorted(missing)}")
    return operations


# Answers several routes give.
UNAUTHORIZED = Reply("Missing or wrong bearer token (only when EAT_API_TOKEN is set).")
UNAVAILABLE = Reply(
    "Redis unreachable or refusing: nothing changed; or the answer was lost "
    "(`outcome unknown`): read the state, then retry."
)
BAD_UUID = Reply("The path's uuid is not a canonical UUID (`field`: uuid).")
UNKNOWN = Reply("No such message (`field`: uuid).")
CONFLICT = Reply(
    "The message is not scheduled or retrying; `state` says which state it is in.", ConflictBody
)
MALFORMED = Reply("Malformed JSON (nested too deeply included), or a bad Content-Length.")
NOT_JSON = Reply("Content-Type is not application/json.")
INVALID = Reply(
    "Wrong type, missing, unknown or repeated field, value out of range; `field` names it."
)

# The path parameters routes may have, by name.
PATH_PARAMETERS = {
    "uuid": {
        "name": "uuid",
        "in": "path",
        "required": True,
        "description": "Canonical UUID of the message (any case).",
        "schema": {"type": "string", "pattern": UUID_PATTERN},
    },
    "name": {
        "name": "name",
        "in": "path",
        "required": True,
        "description": "Name of the schedule.",
        "schema": {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"},
    },
}


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


def operations(routes: Iterable[BaseRoute]) -> list[Operation]:
    """The routes, each checked to be a documented Operation, once, with documented path
    parameters."""
    out: list[Operation] = []
    seen = set()
    for route in routes:
        if not isinstance(route, Operation):
            raise ValueError(f"route without OpenAPI documentation: {route!r}")
        if (route.method, route.path) in seen:
            raise ValueError(f"{route.method.upper()} {route.path} is routed twice")
        undocumented = route.param_convertors.keys() - PATH_PARAMETERS.keys()
        if undocumented:
            raise ValueError(f"{route.path}: no documentation for {sorted(undocumented)}")
        seen.add((route.method, route.path))
        out.append(route)
    return out


def build(routes: Iterable[BaseRoute]) -> dict[str, Any]:
    """The document of ``routes`` (an app's ``routes``), every one of which is documented."""
    ops = operations(routes)
    refs = _Refs()
    for op in ops:
        for reply in op.doc.responses.values():
            if reply.body is not None and reply.body not in refs.types:
                refs.types.append(reply.body)
        if isinstance(op.doc.request, type) and op.doc.request not in refs.types:
            refs.types.append(op.doc.request)
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
    for op in ops:
        doc = op.doc
        spec: dict[str, Any] = {
            "summary": doc.summary,
            "operationId": f"{op.method}_{op.path.strip('/').replace('/', '_')}".replace(
                "{uuid}", "uuid"
            )
            .replace("{name}", "name")
            .replace("-", "_")
            .replace(".", "_"),
            "tags": [doc.tag],
            "responses": {
                str(status): {"description": reply.description, "content": _content(reply, refs)}
                for status, reply in sorted(doc.responses.items())
            },
        }
        if doc.description:
            spec["description"] = doc.description
        parameters = [PATH_PARAMETERS[name] for name in op.param_convertors] + list(doc.query)
        if parameters:
            spec["parameters"] = parameters
        if doc.request is not None:
            schema = bulk if doc.request == "bulk" else refs.refs[doc.request]
            spec["requestBody"] = {"required": True, "content": {JSON: {"schema": schema}}}
        if doc.secured:
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


def encoded(routes: Iterable[BaseRoute]) -> bytes:
    return msgspec.json.encode(build(routes))
