"""Handlers: what a worker does with a due message.

A handler is ``callable(delivery) -> None`` or an async function. Raising means
failure (retried with backoff, then dead-lettered). Sync handlers run in a
thread so they cannot stall the worker's event loop, except those marked
``inline`` (fast, non-blocking, and order-preserving, like ``echo``).

A handler that knows more than "it failed" raises :class:`DeliveryFailed`: with
``retry=False`` the message is dead-lettered now (the receiver refused it for good),
with ``not_before`` its retry waits at least that long (a receiver's ``Retry-After``);
its ``reason`` is what the dead letter says. The webhook handler (``workers.webhook``)
uses it; any custom handler may.
"""

from __future__ import annotations

import importlib
import inspect
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from app.settings import LEGACY_QUEUE, Settings
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

    def line(delivery: Delivery, now_ms: int) -> bytes:
        return _encoder.encode(
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

    def echo(delivery: Delivery) -> None:
        write_line(fd, line(delivery, int(clock() * 1000)) + b"\n")

    def batch(deliveries: list[Delivery]) -> None:
        """All lines of one read in one write: a syscall per read, not per message."""
        now_ms = int(clock() * 1000)
        write_line(fd, b"".join(line(d, now_ms) + b"\n" for d in deliveries))

    echo.inline = True  # type: ignore[attr-defined]
    echo.batch = batch  # type: ignore[attr-defined]
    return echo


def make_list_handler(redis_factory: Callable[[], Any], list_name: str) -> Handler:
    """Push each due message, as the original service's JSON, onto a list (LPUSH).

    An old consumer doing ``RPOPLPUSH <list> <in-flight>`` keeps working. The
    Redis client comes from ``redis_factory``, asked once, on first use.
    """
    client: list[Any] = []

    async def push(delivery: Delivery) -> None:
        if not client:
            client.append(redis_factory())
        item = _encoder.encode(
            {"message": delivery.message, "runAt": delivery.run_at, "uuid": delivery.uuid}
        )
        await client[0].lpush(list_name, item)

    return push


class DeliveryFailed(Exception):
    """Raised by a handler: this delivery failed, and how to go on.

    :param reason: what the log and, if it ends there, the dead letter say.
    :param retry: False: dead-letter it now, whatever attempts are left.
    :param not_before: seconds: the retry waits at least this long (the backoff when that
        is longer; capped by EAT_RETRY_MAX).
    """

    def __init__(self, reason: str, *, retry: bool = True, not_before: float = 0.0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry = retry
        self.not_before = not_before


class HandlerSpecError(ValueError):
    pass


def load_handler(
    spec: str,
    worker: str,
    *,
    redis_factory: Callable[[], Any] | None = None,
    list_name: str | None = None,
    settings: Settings | None = None,
) -> Handler:
    """``echo``, ``list`` (needs ``redis_factory``), ``webhook`` (needs ``settings`` with
    EAT_WEBHOOK_SECRET) or ``package.module:callable``."""
    if list_name is not None and spec != "list":
        raise HandlerSpecError("--list-name goes with --handler list only")
    if spec == "echo":
        return make_echo(worker)
    if spec == "webhook":
        if settings is None or not settings.webhook_secret:
            raise HandlerSpecError(
                "--handler webhook needs EAT_WEBHOOK_SECRET (whsec_ and base64) to sign with"
            )
        from workers.webhook import WebhookHandler  # httpx and the signer, for this one only

        return WebhookHandler.of(settings)
    if spec == "list":
        if redis_factory is None:
            raise HandlerSpecError("--handler list needs a Redis client")
        return make_list_handler(redis_factory, list_name or LEGACY_QUEUE)
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise HandlerSpecError(
            f"--handler must be 'echo', 'list', 'webhook' or 'module:callable', got {spec!r}"
        )
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
