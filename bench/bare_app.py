"""The B1 baseline: a bare Starlette endpoint that parses the body and answers 201.

No Redis, no validation beyond decoding: the ceiling one uvicorn process
(uvloop, httptools) reaches on this machine, measured in the same run.
"""

from __future__ import annotations

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

_decode = msgspec.json.decode
_encode = msgspec.json.encode


async def save_message(request: Request) -> Response:
    body = _decode(await request.body())
    reply = {"uuid": body.get("uuid"), "runAt": body.get("runAt"), "state": "scheduled"}
    return Response(_encode(reply), status_code=201, media_type="application/json")


app = Starlette(routes=[Route("/api/v1/save-message", save_message, methods=["POST"])])
