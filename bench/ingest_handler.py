"""CPU per request of the ingest handler itself, in-process, Redis stubbed out.

Not a target of its own: the part of B1 that is ours rather than uvicorn's or
Redis'. Calls ``SaveMessageHandler.answer`` (headers, token, Content-Type, body
read, decode, checks, accept, answer) on one event loop with a batcher that
answers at once, for bodies of a few shapes: B1's own body, one whose message
has JSON escapes, one written with ``\\u`` escapes (what Python's ``json.dumps``
sends for any non-ASCII text), and a 60 KiB message. Prints the best of
``--rounds`` rounds of ``--count`` requests each, in µs per request.

``python -m bench.ingest_handler [--count N] [--rounds N]``
"""

from __future__ import annotations

import argparse
import asyncio
import time

from app.http.answers import RequestMetrics
from app.http.ingest import SAVE_PATH, SaveMessageHandler
from app.model import NewMessage
from app.settings import Settings
from app.store import Accepted
from bench.common import print_table

RUN_AT = 253402300799999
UUID = "123e4567-e89b-12d3-a456-426614174000"
BODIES = {
    "B1's body": (
        b'{"message":"bench message of a typical small size","runAt":%d,"uuid":"%s"}'
        % (RUN_AT, UUID.encode())
    ),
    'escapes (\\n, \\")': (
        b'{"message":"line one\\nline \\"two\\"","runAt":%d,"uuid":"%s"}' % (RUN_AT, UUID.encode())
    ),
    "\\u escapes": (
        b'{"message":"caf\\u00e9 cr\\u00e8me","runAt":%d,"uuid":"%s"}' % (RUN_AT, UUID.encode())
    ),
    "60 KiB message": (
        b'{"message":"%s","runAt":%d,"uuid":"%s"}' % (b"x" * 61_440, RUN_AT, UUID.encode())
    ),
}


class InstantBatcher:
    """Answers every accept at once, as a created scheduled message."""

    async def accept(self, msg: NewMessage) -> Accepted:
        return Accepted(created=True, state="scheduled", run_at=msg.run_at)


async def per_request_us(handler: SaveMessageHandler, body: bytes, count: int) -> float:
    scope = {
        "type": "http",
        "method": "POST",
        "path": SAVE_PATH,
        "headers": [
            (b"host", b"127.0.0.1"),
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(body)),
        ],
    }
    message = {"type": "http.request", "body": body, "more_body": False}

    async def receive() -> dict:
        return message

    started = time.perf_counter()
    for _ in range(count):
        status, _, _ = await handler.answer(scope, receive)
    elapsed = time.perf_counter() - started
    assert status == 201, status
    return elapsed / count * 1e6


async def measure(count: int, rounds: int) -> dict[str, float]:
    handler = SaveMessageHandler(Settings(), RequestMetrics())
    handler.batcher = InstantBatcher()  # type: ignore[assignment]
    best: dict[str, float] = {}
    for _ in range(rounds):
        for name, body in BODIES.items():
            n = count if len(body) < 1000 else max(count // 20, 100)
            us = await per_request_us(handler, body, n)
            best[name] = min(best.get(name, us), us)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000, help="requests per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; the best is shown")
    args = parser.parse_args(argv)
    best = asyncio.run(measure(args.count, args.rounds))
    print_table(
        "ingest handler in-process, Redis stubbed (best round)",
        ["body", "µs per request"],
        [[name, f"{us:.2f}"] for name, us in best.items()],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
