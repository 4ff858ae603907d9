"""The operator's dashboard, served by the api under ``/ui`` (docs/dashboard.md).

:func:`install` is all the api does for it: requests under ``/ui`` go to the
dashboard's own Starlette app (its pages are not API operations, so they stay out
of the OpenAPI document), and the api's lifespan, once it has its Redis client,
also gives the dashboard its data source and runs the per-minute history
recorder (``app.store.history``) that the dashboard's charts read.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette

from app.http.ui.pages import BASE, Dashboard
from app.http.ui.source import Source
from app.log import get_logger
from app.settings import Settings
from app.store.history import HistoryRecorder

log = get_logger("ui")


class _Branch:
    """Sends ``/ui`` and what lies under it to the dashboard, the rest to the api."""

    def __init__(self, app, dashboard) -> None:
        self.app = app
        self.dashboard = dashboard

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and (path == BASE or path.startswith(BASE + "/")):
            await self.dashboard(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _recorder_ended(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("history recorder died", exc_info=task.exception())


def install(app: Starlette, settings: Settings) -> Dashboard | None:
    """Serve the dashboard under ``/ui`` unless EAT_UI is false, and record this api's
    per-minute history either way. Call before the app first serves."""
    dashboard = Dashboard(settings) if settings.ui else None
    if dashboard is not None:
        app.add_middleware(_Branch, dashboard=dashboard.app())
    serve = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(api: Starlette) -> AsyncIterator[None]:
        async with serve(api) as state:
            # Made now, so that it files what this api counts from its start, even while
            # Redis is not reached yet (the api reaches it at start or later).
            recorder = HistoryRecorder(None, settings.prefix)
            stopping = asyncio.Event()

            async def record_once_attached() -> None:
                attached = asyncio.ensure_future(api.state.attached.wait())
                stopped = asyncio.ensure_future(stopping.wait())
                await asyncio.wait({attached, stopped}, return_when=asyncio.FIRST_COMPLETED)
                attached.cancel()
                stopped.cancel()
                if stopping.is_set():
                    return
                recorder.client = api.state.partitions.client
                if dashboard is not None:
                    dashboard.source = Source.of(api.state)
                await recorder.run(stopping)

            recording = asyncio.create_task(record_once_attached(), name="history")
            recording.add_done_callback(_recorder_ended)
            try:
                yield state
            finally:
                stopping.set()
                await asyncio.wait({recording}, timeout=2.0)
                recording.cancel()
                if recorder.client is not None:
                    await recorder.close()  # what the last requests counted

    app.router.lifespan_context = lifespan
    return dashboard
