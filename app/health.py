"""Health and metrics over HTTP: the API's own routes, and a small server for
the scheduler and worker processes (``EAT_HEALTH_PORT``).

``/healthz`` answers while the process lives; ``/readyz`` only while its
dependencies answer; ``/metrics`` is the Prometheus exposition, with the queue
gauges read from Redis at scrape time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator, Sequence

import uvicorn
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from app import metrics
from app.httpserver import HttpLimits, server_config

ReadyCheck = Callable[[], Awaitable[dict[str, bool]]]
# The queue's figures, read when /metrics is scraped: each partition's, in partition order
# (``Partitions.each_queue_stats``), so the gauges carry a ``partition`` label; a single
# QueueFigures (``Store.queue_stats``) is partition 0.
QueueFigures = Callable[[], Awaitable[metrics.QueueFigures | Sequence[metrics.QueueFigures]]]


def health_routes(ready: ReadyCheck, figures: QueueFigures) -> list[Route]:
    """``ready`` names each dependency and whether it answers; ``figures`` is asked per scrape."""

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> JSONResponse:
        checks = await ready()
        ok = all(checks.values())
        return JSONResponse(
            {"status": "ok" if ok else "unavailable", **checks}, status_code=200 if ok else 503
        )

    async def metrics_endpoint(request: Request) -> Response:
        with contextlib.suppress(RedisError, OSError):
            metrics.set_queue_gauges(await figures())
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    return [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
    ]


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The process owns SIGTERM and drains its own work; this server only stops when told.
        yield


class HealthServer:
    """Serves the health routes on ``host:port`` inside the running event loop."""

    def __init__(
        self,
        host: str,
        port: int,
        ready: ReadyCheck,
        figures: QueueFigures,
        limits: HttpLimits | None = None,
    ) -> None:
        app = Starlette(routes=health_routes(ready, figures))
        config = server_config(app, host, port, limits or HttpLimits(), lifespan="off")
        self._server = _Server(config)
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve(), name="health")
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises the bind error
                raise RuntimeError("health server stopped at start")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        await self._task


async def maybe_start(
    host: str,
    port: int,
    ready: ReadyCheck,
    figures: QueueFigures,
    limits: HttpLimits | None = None,
) -> HealthServer | None:
    """The health server of a scheduler or worker, started; None when ``port`` is 0 (off).
    ``limits`` bound what its clients may take (the defaults when None)."""
    if not port:
        return None
    server = HealthServer(host, port, ready, figures, limits)
    await server.start()
    return server
