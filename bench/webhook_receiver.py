"""B10's receiver: answers every POST 200 at once and writes one line per request,
``<webhook-id> <arrival epoch ms>``, to a file (one write each: nothing buffered to lose).

A raw ASGI app under uvicorn in a process of its own, so that the receiver's cost is
not the benchmark's: ``python -m bench.webhook_receiver --port P --out FILE``.
"""

from __future__ import annotations

import argparse
import os
import time

import uvicorn

_OK_START = {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]}
_OK_BODY = {"type": "http.response.body", "body": b""}


def make_app(fd: int):
    async def app(scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        more = True
        while more:  # read the body whole: the connection is then kept alive
            message = await receive()
            more = message.get("more_body", False)
        now_ms = int(time.time() * 1000)
        webhook_id = b""
        for name, value in scope["headers"]:
            if name == b"webhook-id":
                webhook_id = value
                break
        os.write(fd, b"%s %d\n" % (webhook_id, now_ms))
        await send(_OK_START)
        await send(_OK_BODY)

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    uvicorn.run(
        make_app(fd),
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        access_log=False,
        lifespan="off",
    )


if __name__ == "__main__":
    main()
