"""The HTTP API (Starlette): validate, then one accept script call per message.

``POST /api/v1/save-message`` is served by ``app.ingest`` ahead of Starlette's
routing and middleware (see there why); every other route is plain Starlette.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import msgspec
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from app import metrics
from app.batcher import AcceptBatcher
from app.health import health_routes, redis_ready
from app.ingest import BODY_OVERHEAD as BODY_OVERHEAD  # re-exported: tests size bodies by it
from app.ingest import SAVE_PATH, SaveMessageHandler, bearer_matches, json_media_type
from app.lifecycle_store import Lifecycle
from app.logging import get_logger
from app.model import InvalidInput
from app.settings import Settings
from app.store import Store, connect

log = get_logger("api")

FORMAT_CHECK_S = 2.0  # at start-up; Redis slower than this is treated as down

_json = msgspec.json.Encoder()


def json_response(payload: dict, status: int = 200) -> Response:
    """Like Starlette's JSONResponse, with msgspec's encoder (the hot path's serialiser)."""
    return Response(_json.encode(payload), status_code=status, media_type="application/json")


def error(status: int, message: str, field: str | None = None) -> Response:
    return json_response({"error": message, "field": field}, status)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) as soon as it exceeds ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise InvalidInput("invalid Content-Length", None, 400)
        if int(declared) > limit:
            raise InvalidInput(f"body larger than {limit} bytes", None, 413)
        # The server delivers no more than the declared length, so it cannot exceed the limit.
        return await request.body()
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise InvalidInput(f"body larger than {limit} bytes", None, 413)
        chunks.append(chunk)
    return b"".join(chunks)


def is_json(request: Request) -> bool:
    return json_media_type(request.headers.get("content-type", ""))


def authorized(request: Request, token: bytes) -> bool:
    return bearer_matches(request.headers.get("authorization", ""), token)


class HttpMetrics:
    """Counts and times every request by route template (bounded label values)."""

    def __init__(self, app, routes: set[str]) -> None:
        self.app = app
        self.routes = routes
        self._children: dict[tuple[str, str, int], tuple] = {}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        route = path if path in self.routes else "other"
        status = 500
        start = time.perf_counter()

        async def send_wrapper(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            # A path with parameters counts under its template (the router put it in scope).
            template = getattr(scope.get("route"), "path", None)
            if route == "other" and template in self.routes:
                route = template
            key = (route, scope["method"], status)
            children = self._children.get(key)
            if children is None:
                # labels() builds and hashes a key each call: look each child up once.
                children = self._children[key] = (
                    metrics.HTTP_DURATION.labels(route),
                    metrics.HTTP_REQUESTS.labels(route, scope["method"], str(status)),
                )
            children[0].observe(time.perf_counter() - start)
            children[1].inc()


class ApiApp(Starlette):
    """Starlette, except that ``POST /api/v1/save-message`` goes straight to its handler."""

    def __init__(self, *args, ingest: SaveMessageHandler, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ingest = ingest

    async def __call__(self, scope, receive, send) -> None:
        # Under a root_path the route path differs from scope["path"]: Starlette resolves it.
        if (
            scope["type"] == "http"
            and scope["path"] == SAVE_PATH
            and scope["method"] == "POST"
            and not scope.get("root_path")
        ):
            await self.ingest.dispatch(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def create_app(settings: Settings | None = None) -> ApiApp:
    """Build the API. ``settings`` defaults to the environment's (validated)."""
    settings = settings or Settings.from_env()
    ingest = SaveMessageHandler(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        client = connect(settings)
        app.state.store = Store(client, settings)
        app.state.batcher = ingest.batcher = AcceptBatcher(app.state.store)
        app.state.lifecycle = Lifecycle(app.state.store)
        try:
            # Refuse to start on data of another storage format (StorageFormatError ends
            # the start-up); an api must still start while Redis is down: that only warns.
            try:
                await asyncio.wait_for(app.state.store.check_format(), FORMAT_CHECK_S)
            except (RedisError, OSError, TimeoutError) as exc:
                log.warning("storage format not checked", error=type(exc).__name__)
            yield
        finally:
            await client.aclose()

    app_ref: list[Starlette] = []

    def store_of() -> Store:
        return app_ref[0].state.store

    async def ready() -> dict[str, bool]:
        return {"redis": await redis_ready(store_of())}

    async def not_found(request: Request, exc: Exception) -> JSONResponse:
        return error(404, "not found")

    async def method_not_allowed(request: Request, exc: Exception) -> JSONResponse:
        return error(405, "method not allowed")

    # Imported here: the lifecycle routes build on this module's helpers (error, read_body...).
    from app.routes_lifecycle import lifecycle_routes

    routes = [
        # Reached through Starlette only for what ApiApp does not dispatch itself.
        Route(SAVE_PATH, ingest, methods=["POST"], name="save_message"),
        *lifecycle_routes(settings),
        *health_routes(store_of, ready),
    ]
    app = ApiApp(
        routes=routes,
        exception_handlers={404: not_found, 405: method_not_allowed},
        lifespan=lifespan,
        ingest=ingest,
    )
    app_ref.append(app)
    app.add_middleware(HttpMetrics, routes={r.path for r in routes})
    return app
