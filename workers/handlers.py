"""Handlers: what a worker does with a due message.

A handler is ``callable(delivery) -> None`` or an async function. Raising means
failure (retried with backoff, then dead-lettered). Sync handlers run in a
thread so they cannot stall the worker's event loop, except those marked
``inline`` (fast, non-blocking, and order-preserving, like ``echo``).
"""

from __future__ import annotations

import importlib
import inspect
import os
import time
from collections.abc import Awaitable, Callable

import msgspec

from app.store import Delivery

Handler = Callable[[Delivery], "Awaitable[None] | None"]

_encoder = msgspec.json.Encoder()


def write_line(fd: int, line: bytes) -> None:
    """One write per line straight to the fd: no buffer to lose on kill -9."""
    view = memoryview(line)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def make_echo(worker: str, fd: int = 1, clock: Callable[[], float] = time.time) -> Handler:
    """The default handler: one JSON line on stdout per handled message."""

    def echo(delivery: Delivery) -> None:
        now_ms = int(clock() * 1000)
        line = _encoder.encode(
            {
                "event": "echo",
                "uuid": delivery.uuid,
                "message": delivery.message,
                "runAt": delivery.run_at,
                "lateness_ms": now_ms - delivery.run_at,
                "handledAt": now_ms,
                "worker": worker,
                "attempt": delivery.attempts + 1,
            }
        )
        write_line(fd, line + b"\n")

    echo.inline = True  # type: ignore[attr-defined]
    return echo


class HandlerSpecError(ValueError):
    pass


def load_handler(spec: str, worker: str) -> Handler:
    """``echo`` or ``package.module:callable``."""
    if spec == "echo":
        return make_echo(worker)
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise HandlerSpecError(f"--handler must be 'echo' or 'module:callable', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise HandlerSpecError(f"--handler: cannot import {module_name!r}: {exc}") from None
    handler = getattr(module, attr, None)
    if not callable(handler):
        raise HandlerSpecError(f"--handler: {module_name!r} has no callable {attr!r}")
    return handler


def is_async(handler: Handler) -> bool:
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
        getattr(handler, "__call__", None)  # noqa: B004 - an object with an async __call__
    )
