"""The HTTP API (Starlette): validate, then one accept script call per message."""

from __future__ import annotations

import contextlib
import hmac
import time
from collections.abc import AsyncIterator

import msgspec
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from app import metrics
from app.batcher import AcceptBatcher
from app.health import health_routes, redis_ready
from app.lifecycle_store import Lifecycle
from app.logging import get_logger
from app.model import InvalidInput, parse_save_message
from app.settings import Settings
from app.store import Store, connect

log = get_logger("api")

# JSON escapes can make a body up to 6x its decoded text (\uXXXX), plus the other fields.
BODY_OVERHEAD = 4096


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
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    return media_type == "application/json" or (
        media_type.startswith("application/") and media_type.endswith("+json")
    )


def authorized(request: Request, token: bytes) -> bool:
    """Constant-time comparison of the bearer token (no early exit on the first wrong byte)."""
    header = request.headers.get("authorization", "")
    scheme, _, provided = header.partition(" ")
    return hmac.compare_digest(provided.strip().encode(), token) and scheme.lower() == "bearer"


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
                # labels() takes a lock and builds a tuple each call: look each child up once.
                children = self._children[key] = (
                    metrics.HTTP_DURATION.labels(route),
                    metrics.HTTP_REQUESTS.labels(route, scope["method"], str(status)),
                )
            children[0].observe(time.perf_counter() - start)
            children[1].inc()


def create_app(settings: Settings | None = None) -> Starlette:
    """Build the API. ``settings`` defaults to the environment's (validated)."""
    settings = settings or Settings.from_env()
    body_limit = settings.max_message_bytes * 6 + BODY_OVERHEAD
    token = settings.api_token.encode() if settings.api_token else None
    accepted_due = metrics.ACCEPTED.labels("due")
    accepted_delayed = metrics.ACCEPTED.labels("delayed")
    accepted_duplicate = metrics.ACCEPTED.labels("duplicate")
    accepted_invalid = metrics.ACCEPTED.labels("invalid")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        client = connect(settings)
        app.state.store = Store(client, settings)
        app.state.batcher = AcceptBatcher(app.state.store)
        app.state.lifecycle = Lifecycle(app.state.store)
        try:
            yield
        finally:
            await client.aclose()

    async def save_message(request: Request) -> JSONResponse:
        if token is not None and not authorized(request, token):
            return unauthorized()
        try:
            if not is_json(request):
                raise InvalidInput("Content-Type must be application/json", None, 415)
            body = await read_body(request, body_limit)
            msg = parse_save_message(body, settings.max_message_bytes)
        except InvalidInput as exc:
            accepted_invalid.inc()
            return error(exc.status, exc.error, exc.field)
        except ClientDisconnect:
            return error(400, "client disconnected before the body was read")
        try:
            result = await request.app.state.batcher.accept(msg)
        except (RedisConnectionError, RedisTimeoutError, OSError):
            log.warning("redis unavailable", uuid=msg.uuid)
            return error(503, "storage unavailable, retry with the same uuid")
        except RedisError as exc:
            # Redis answered with an error (e.g. OOM, LOADING, READONLY): nothing was written.
            log.error("accept failed", uuid=msg.uuid, error=str(exc)[:200])
            return error(503, "storage refused the write, retry with the same uuid")
        payload = {"uuid": msg.uuid, "runAt": result.run_at, "state": result.state}
        if result.created:
            (accepted_due if result.state == "queued" else accepted_delayed).inc()
            log.debug("accepted", uuid=msg.uuid, run_at=result.run_at, state=result.state)
            return json_response(payload, 201)
        accepted_duplicate.inc()
        payload["duplicate"] = True
        return json_response(payload, 200)

    def unauthorized() -> JSONResponse:
        response = error(401, "missing or wrong bearer token", "Authorization")
        response.headers["WWW-Authenticate"] = "Bearer"
        return response

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
        Route("/api/v1/save-message", save_message, methods=["POST"]),
        *lifecycle_routes(settings),
        *health_routes(store_of, ready),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={404: not_found, 405: method_not_allowed},
        lifespan=lifespan,
    )
    app_ref.append(app)
    app.add_middleware(HttpMetrics, routes={r.path for r in routes})
    return app
