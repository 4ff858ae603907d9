"""The HTTP API (Starlette): validate, then one accept script call per message.

``POST /api/v1/save-message`` is served by ``app.http.ingest`` ahead of Starlette's
routing and middleware (see there why); every other route is plain Starlette.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response

from app.backoff import Backoff, describe
from app.health import health_routes
from app.http import openapi
from app.http.answers import NotConnected, RequestMetrics, error, internal_error_answer, response
from app.http.batcher import AcceptBatcher, PartitionBatchers
from app.http.ingest import BODY_OVERHEAD as BODY_OVERHEAD  # re-exported: tests size bodies by it
from app.http.ingest import SAVE_PATH, SaveMessageHandler
from app.http.openapi import INVALID, MALFORMED, NOT_JSON, UNAUTHORIZED, Doc, Operation, Reply
from app.http.routes import lifecycle_routes
from app.http.schedule_routes import schedule_routes
from app.http.ui import install as install_dashboard
from app.http.wire import Health, LegacySaved, Ready, Saved, SaveMessageBody
from app.log import get_logger
from app.settings import Settings
from app.store import Accepted, QueueStats, StorageFormatError, open_client
from app.store.lifecycles import Lifecycles
from app.store.memory import EvictingPolicyError, MemoryPolicy
from app.store.partitions import Partitions
from app.store.schedules import Schedules
from app.targets import TargetPolicy

log = get_logger("api")

FORMAT_CHECK_S = 2.0  # at start-up; Redis slower than this is treated as down

# The shared health routes (app.health knows no HTTP layer), documented where they are
# mounted. Open: no bearer token, like the probes and scrapers that call them.
HEALTH_DOCS = {
    "/healthz": Doc(
        "Liveness: answers while the process lives",
        {200: Reply("Alive.", Health)},
        tag="operations",
        secured=False,
    ),
    "/readyz": Doc(
        "Readiness: 200 only while Redis answers and its maxmemory-policy cannot evict",
        {
            200: Reply("Ready.", Ready),
            503: Reply(
                "Redis does not answer, or its maxmemory-policy may evict this service's "
                "data (and EAT_ALLOW_EVICTION is not set).",
                Ready,
            ),
        },
        tag="operations",
        secured=False,
    ),
    "/metrics": Doc(
        "Prometheus metrics",
        {200: Reply("Prometheus text exposition.", None, "text/plain")},
        tag="operations",
        secured=False,
    ),
}


def _watch_ended(task: asyncio.Task) -> None:
    """The api's periodic maxmemory-policy check ends only at shutdown; anything else is a
    bug, logged here, and the api answers not ready from then on."""
    if not task.cancelled() and task.exception() is not None:
        log.error("maxmemory-policy check died", exc_info=task.exception())


class HttpMetrics:
    """Counts and times every request by route template (bounded label values)."""

    def __init__(self, app, routes: set[str], recorder: RequestMetrics) -> None:
        self.app = app
        self.routes = routes
        self.recorder = recorder

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        route = path if path in self.routes else "other"
        status = 500
        started = time.perf_counter()

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
            self.recorder.record(route, scope["method"], status, started)


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


def _accepted_replies(settings: Settings) -> dict[int, Reply]:
    if settings.legacy_http:
        return {
            200: Reply(
                "Accepted now or before (EAT_LEGACY_HTTP: the original service's answer, "
                "the message as posted with the uuid it is stored under).",
                LegacySaved,
            )
        }
    return {
        201: Reply("Accepted: `queued` (due now) or `scheduled`.", Saved),
        200: Reply("The uuid was accepted before; nothing changed.", Saved),
    }


class _NotConnected:
    """The batcher until the api has reached Redis: every accept answers 503."""

    async def accept(self, msg) -> Accepted:
        raise NotConnected()


def create_app(
    settings: Settings | None = None,
    stop: Callable[[], None] | None = None,
    targets: TargetPolicy | None = None,
) -> ApiApp:
    """Build the API. ``settings`` defaults to the environment's (validated); ``stop``
    (the server's, from ``run_api``) ends the process when a check made after start-up
    refuses Redis' data (see the lifespan); ``targets`` checks a message's webhook target
    (default: from the settings, with the system's resolver; tests give another)."""
    settings = settings or Settings.from_env()
    recorder = RequestMetrics()
    targets = targets or TargetPolicy.of(settings)
    ingest = SaveMessageHandler(settings, recorder, targets)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        """Reach Redis (``open_client``: one Redis or a cluster), check its data
        (``Partitions.check``: storage format, partition count) and its maxmemory-policy,
        then serve. Refused data or an evicting policy ends the start-up
        (``app.state.refused`` tells run_api to exit 2).

        The api must start while Redis is down, so the first try is bounded
        (FORMAT_CHECK_S); after that a background task keeps trying with a backoff and
        every route that needs Redis answers 503 (``NotConnected``) until it succeeds.
        Nothing is written before the data was checked. A refusal found by that task
        (Redis came up holding data of another format or partition count) is logged,
        keeps the api unready and answering 503, and calls ``stop``: the process exits 2.
        """
        state = app.state
        state.client = state.store = state.partitions = state.lifecycle = None
        state.memory_policy = state.refused = None
        state.schedules = None
        state.memory_policy_watch = None
        # Set once Redis is reached and its data checked: what else needs the client
        # (the dashboard, its history recorder) waits for it.
        state.attached = asyncio.Event()
        ingest.batcher = _NotConnected()  # type: ignore[assignment]
        stopping = asyncio.Event()
        tasks: list[asyncio.Task] = []

        async def attach() -> None:
            client = await open_client(settings)
            try:
                partitions = Partitions(client, settings, wait_replicas=settings.wait_replicas)
                await partitions.check()
                memory_policy = MemoryPolicy(
                    client, settings.allow_eviction, settings.memory_policy_interval
                )
                await memory_policy.require()
            except BaseException:
                await client.aclose()
                raise
            state.client = client
            state.partitions = partitions
            state.store = partitions.stores[0]
            state.memory_policy = memory_policy
            if partitions.count == 1:
                ingest.batcher = AcceptBatcher(partitions.stores[0])
            else:
                ingest.batcher = PartitionBatchers(partitions)  # type: ignore[assignment]
            state.lifecycle = Lifecycles(partitions)
            state.schedules = Schedules(partitions)
            watch = state.memory_policy_watch = asyncio.create_task(
                memory_policy.watch(stopping), name="memory-policy"
            )
            watch.add_done_callback(_watch_ended)
            tasks.append(watch)
            state.attached.set()

        async def attach_later() -> None:
            backoff = Backoff(0.1, 2.0, jitter=True)
            while not stopping.is_set():
                await backoff.wait(stopping)
                if stopping.is_set():
                    return
                try:
                    await asyncio.wait_for(attach(), FORMAT_CHECK_S * 5)
                except (RedisError, OSError, TimeoutError) as exc:
                    log.warning("redis not reached yet, retrying", error=describe(exc))
                    continue
                except (StorageFormatError, EvictingPolicyError) as exc:
                    log.error("redis refused after start-up: stopping", error=str(exc))
                    state.refused = exc
                    if stop is not None:
                        stop()
                    return
                log.info("redis reached", partitions=settings.partitions)
                return

        try:
            try:
                await asyncio.wait_for(attach(), FORMAT_CHECK_S)
            except (RedisError, OSError, TimeoutError) as exc:
                log.warning("redis not reached at start, retrying meanwhile", error=describe(exc))
                tasks.append(asyncio.create_task(attach_later(), name="redis-connect"))
            except (StorageFormatError, EvictingPolicyError) as exc:
                state.refused = exc
                raise
            yield
        finally:
            stopping.set()
            if tasks:
                await asyncio.wait(tasks, timeout=FORMAT_CHECK_S)
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task  # an exception was logged when it ended
            if state.client is not None:
                await state.client.aclose()

    app_ref: list[Starlette] = []

    async def ready() -> dict[str, bool]:
        state = app_ref[0].state
        if state.partitions is None:  # Redis not reached (or refused) since the start
            return {"redis": False, "memory_policy": False}
        # A check that died (a bug: it is logged) must not leave the api looking ready.
        watching = not state.memory_policy_watch.done()
        return {
            "redis": await state.partitions.answers(),
            "memory_policy": state.memory_policy.ready and watching,
        }

    async def queue_figures() -> list[QueueStats]:
        partitions = app_ref[0].state.partitions
        if partitions is None:
            raise NotConnected()
        return await partitions.each_queue_stats()

    async def not_found(request: Request, exc: Exception) -> Response:
        return error(404, "not found")

    async def method_not_allowed(request: Request, exc: Exception) -> Response:
        return error(405, "method not allowed")

    async def internal_error(request: Request, exc: Exception) -> Response:
        # Starlette's ServerErrorMiddleware calls this, then re-raises for the server's log.
        return response(internal_error_answer())

    routes = [
        # Reached through Starlette only for what ApiApp does not dispatch itself.
        Operation(
            "POST",
            SAVE_PATH,
            ingest,
            Doc(
                "Accept one message",
                {
                    **_accepted_replies(settings),
                    400: MALFORMED,
                    401: UNAUTHORIZED,
                    413: Reply(
                        "Body too large, or `message` over "
                        f"{settings.max_message_bytes} UTF-8 bytes."
                    ),
                    415: NOT_JSON,
                    422: INVALID,
                    503: Reply(
                        "Nothing was written, or its answer was lost (`outcome unknown`): "
                        "retry with the same uuid."
                    ),
                },
                request=SaveMessageBody,
            ),
            name="save_message",
        ),
        *lifecycle_routes(settings, targets),
        *schedule_routes(settings),
        *openapi.documented(health_routes(ready, queue_figures), HEALTH_DOCS),
    ]
    app = ApiApp(
        routes=routes,
        exception_handlers={404: not_found, 405: method_not_allowed, 500: internal_error},
        lifespan=lifespan,
        ingest=ingest,
    )
    # Starlette answers a path with one slash too many (or too few) with a redirect to the
    # URL built from the Host header: anyone could point it elsewhere. A 404 instead.
    app.router.redirect_slashes = False
    # Refuses an undocumented route, so the API cannot start with one.
    app.state.openapi = openapi.encoded(app.routes)
    app.state.buffered = ingest.buffered  # one bound on bodies arriving, every route
    app_ref.append(app)
    install_dashboard(app, settings)  # /ui (EAT_UI) and the per-minute history it charts
    app.add_middleware(HttpMetrics, routes={r.path for r in routes}, recorder=recorder)
    return app
