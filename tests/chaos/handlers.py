"""Handlers for chaos workers (``--handler tests.chaos.handlers:poison``).

``poison`` echoes like the default handler, except that a message whose text
starts with ``poison`` fails: it writes a ``{"event": "poison", ...}`` line (so
the test sees every attempt and when it ran) and raises. Once the file named by
``EAT_CHAOS_CURED`` exists, the bug is "fixed": poison messages are echoed too,
which is what makes a replay from the dead stream observable.

The worker process imports this module, so it must be started with the
repository root on ``PYTHONPATH`` (the chaos fixtures do that).
"""

from __future__ import annotations

import os
import socket
import time

import msgspec

from app.store import Delivery
from workers.handlers import make_echo, write_line

_WORKER = os.environ.get("EAT_CHAOS_WORKER") or f"{socket.gethostname()}-{os.getpid()}"
_CURED = os.environ.get("EAT_CHAOS_CURED", "")
_echo = make_echo(_WORKER)
_encoder = msgspec.json.Encoder()


class PoisonError(RuntimeError):
    """The handler's deliberate failure."""


def poison(delivery: Delivery) -> None:
    if delivery.message.startswith("poison") and not (_CURED and os.path.exists(_CURED)):
        now_ms = int(time.time() * 1000)
        line = {
            "event": "poison",
            "uuid": delivery.uuid,
            "runAt": delivery.run_at,
            "handledAt": now_ms,
            "attempt": delivery.attempts + 1,
            "worker": _WORKER,
        }
        write_line(1, _encoder.encode(line) + b"\n")
        raise PoisonError(f"cannot handle {delivery.message[:20]!r}")
    _echo(delivery)


# Fast and non-blocking like echo: run on the event loop, in stream order.
poison.inline = True  # type: ignore[attr-defined]
