"""The HTTP server of every process: uvicorn, with the limits it lacks.

Of what a client controls, uvicorn bounds only the idle time between two
requests (``timeout_keep_alive``). With httptools it reads a request head of any
size (a 200 MB header grew an api by 200 MB), waits for a head or a body for
ever (a slowloris, a chunked body never finished), and accepts connections
until file descriptors run out (about 20,000 idle sockets locked every other
client out). :func:`server_config` builds the uvicorn ``Config`` of the api and
of the health servers with :class:`LimitedProtocol`, uvicorn's httptools
protocol plus those limits (:class:`HttpLimits`), each answered the way HTTP
expects:

- a head (request line and headers) over ``max_header_bytes``: ``431``, closed;
- a head not complete ``header_timeout`` s after its first byte: ``408``, closed;
- a body not complete ``body_timeout`` s after its head: ``408``, closed, and
  the app's ``receive()`` reports a disconnect;
- a response that cannot be written for ``send_timeout`` s (the client stopped
  reading: uvicorn paused writing, its buffers full): the connection is aborted
  (nothing more can reach that client), and the app's ``send`` sees it gone;
- a connection that carries no request for ``idle_timeout`` s, a fresh one or
  one kept alive after a response: closed (uvicorn's keep-alive timer, also
  armed on a fresh connection here);
- a connection beyond ``max_connections``: the open connection that has waited
  longest for a request (idle, or still sending its head) is closed to make room
  (``503`` if it had sent part of a head); when every connection is busy with a
  request, the new one is answered ``503`` and closed.

An answer is the API's error shape (``{"error", "field"}``) with
``connection: close``; the server then shuts its sending side and discards
what still arrives for at most :data:`LINGER_S` s or :data:`LINGER_BYTES`, so
the kernel does not reset the connection before the client has read it. A
request already answered (the app may answer before reading a body) is closed
without a second answer.

States of a connection (``phase``)::

    DONE --first byte of a request--> HEAD --head parsed--> BODY --body read--> DONE
    HEAD, BODY or DONE --refused (431, 408, 503) or evicted--> CLOSING

A fresh connection starts in DONE, like one between two requests; while DONE
the app may still be answering. Deadlines are checked by one sweep over the
open connections every :attr:`HttpLimits.tick` s, not by a timer per request:
the ingest hot path pays a clock read and a few attribute stores per request.
A deadline fires between its limit and its limit plus one tick.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import resource
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import httptools
import msgspec
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app import metrics
from app.log import get_logger
from app.settings import Settings

log = get_logger("http")

# After a refusal: how long, and how many bytes, the server keeps reading (and dropping)
# what the client still sends, so that its answer is read rather than lost to a reset.
LINGER_S = 1.0
LINGER_BYTES = 1 << 20
# File descriptors a process needs besides its HTTP connections (Redis, logs, listeners).
RESERVED_FDS = 128

HEAD, BODY, DONE, CLOSING = range(4)
# What a request line adds to its target ("DELETE " ... " HTTP/1.1\r\n"), and the blank line.
HEAD_LINE_OVERHEAD = len(b"DELETE  HTTP/1.1\r\n\r\n")


class _Refused(Exception):
    """Raised from a parser callback after a refusal, to stop httptools parsing on."""


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """What one client may take of an HTTP server (``EAT_HTTP_*``)."""

    max_header_bytes: int = 65536
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    send_timeout: float = 30.0
    idle_timeout: float = 5.0
    max_connections: int = 1000

    @classmethod
    def of(cls, settings: Settings) -> HttpLimits:
        return cls(
            max_header_bytes=settings.http_max_header_bytes,
            header_timeout=settings.http_header_timeout,
            body_timeout=settings.http_body_timeout,
            send_timeout=settings.http_send_timeout,
            idle_timeout=settings.http_idle_timeout,
            max_connections=settings.http_max_connections,
        )

    @property
    def tick(self) -> float:
        """Seconds between two sweeps: a fifth of the shortest time limit, 50 ms to 1 s."""
        shortest = min(self.header_timeout, self.body_timeout, self.send_timeout, self.idle_timeout)
        return min(1.0, max(0.05, shortest / 5))


def fit_open_files(limits: HttpLimits) -> HttpLimits:
    """``limits`` with a connection cap this process' file descriptors can hold.

    Raises the soft ``RLIMIT_NOFILE`` towards the hard one when the cap needs it;
    past the hard limit, lowers the cap (and says so) rather than let ``accept``
    fail for every client once descriptors run out.
    """
    need = limits.max_connections + RESERVED_FDS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return limits
    wanted = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if wanted > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    if soft >= need:
        return limits
    cap = max(1, soft - RESERVED_FDS)
    log.warning(
        "EAT_HTTP_MAX_CONNECTIONS lowered to fit the open files limit",
        asked=limits.max_connections,
        cap=cap,
        open_files=soft,
    )
    return dataclasses.replace(limits, max_connections=cap)


def _answer(status: int, reason: bytes, error: str, *extra: bytes) -> bytes:
    body = msgspec.json.encode({"error": error, "field": None})
    head = [
        b"HTTP/1.1 %d %s" % (status, reason),
        b"content-type: application/json",
        b"content-length: %d" % len(body),
        b"connection: close",
        *extra,
    ]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


class _Guard:
    """The open connections of one server, their cap, and the sweep of their deadlines."""

    def __init__(self, limits: HttpLimits) -> None:
        self.limits = limits
        self.open: set[LimitedProtocol] = set()
        self.made = 0  # connections made so far: each one's number
        self._sweep: asyncio.TimerHandle | None = None
        self.too_large = _answer(
            431,
            b"Request Header Fields Too Large",
            f"request head larger than {limits.max_header_bytes} bytes",
        )
        self.head_late = _answer(
            408, b"Request Timeout", f"request head not received within {limits.header_timeout:g} s"
        )
        self.body_late = _answer(
            408, b"Request Timeout", f"request body not received within {limits.body_timeout:g} s"
        )
        self.busy = _answer(
            503,
            b"Service Unavailable",
            f"server at its limit of {limits.max_connections} connections, retry later",
            b"retry-after: 1",
        )
        closed = metrics.HTTP_CONNECTIONS_CLOSED
        self.closed_header_too_large = closed.labels("header_too_large")
        self.closed_header_timeout = closed.labels("header_timeout")
        self.closed_body_timeout = closed.labels("body_timeout")
        self.closed_send_timeout = closed.labels("send_timeout")
        self.closed_evicted = closed.labels("evicted")
        self.closed_over_limit = closed.labels("over_limit")

    def admit(self, conn: LimitedProtocol) -> bool:
        """Count ``conn`` in, making room by evicting the longest-waiting one at the cap."""
        if len(self.open) >= self.limits.max_connections:
            victim = self._longest_waiting()
            if victim is None:
                return False
            victim.evict()
        self.open.add(conn)
        if self._sweep is None:
            self._sweep = conn.loop.call_later(self.limits.tick, self._sweep_deadlines, conn.loop)
        return True

    def _longest_waiting(self) -> LimitedProtocol | None:
        # Linear, and only at the cap: a scan costs less than keeping an order per request.
        # The loop's clock counts milliseconds: among equal times the older connection goes.
        victim = None
        oldest = (math.inf, 0)
        for conn in self.open:
            key = (conn.since, conn.number)
            if key < oldest and conn.waiting():
                victim, oldest = conn, key
        return victim

    def _sweep_deadlines(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        header_timeout = self.limits.header_timeout
        body_timeout = self.limits.body_timeout
        send_timeout = self.limits.send_timeout
        for conn in list(self.open):
            phase = conn.phase
            stalled = conn.write_paused_at
            if stalled is not None and now - stalled > send_timeout:
                self.closed_send_timeout.inc()
                conn.abandon()
            elif phase == HEAD and now - conn.since > header_timeout:
                self.closed_header_timeout.inc()
                conn.refuse(self.head_late)
            elif phase == BODY and now - conn.since > body_timeout:
                self.closed_body_timeout.inc()
                conn.refuse(self.body_late)
        # Runs only while there are connections: a stopped server leaves no timer behind.
        self._sweep = (
            loop.call_later(self.limits.tick, self._sweep_deadlines, loop) if self.open else None
        )


class LimitedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with :class:`HttpLimits` (see the module)."""

    guard: ClassVar[_Guard]
    max_header_bytes: ClassVar[int]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.phase = DONE
        self.since = 0.0  # when the current phase began (loop time)
        self.number = 0  # in the order connections were made
        self._head_bytes = 0
        self._linger_left = 0
        self._linger: asyncio.TimerHandle | None = None
        self.write_paused_at: float | None = None  # since when the transport is full

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.since = self.loop.time()
        self.guard.made += 1
        self.number = self.guard.made
        if not self.guard.admit(self):
            self.guard.closed_over_limit.inc()
            self.refuse(self.guard.busy)
            return
        # uvicorn arms its idle timer only after a response: a silent new connection too.
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.write_paused_at is None:
            self.write_paused_at = self.loop.time()

    def resume_writing(self) -> None:
        super().resume_writing()
        self.write_paused_at = None

    def abandon(self) -> None:
        """Close at once, discarding what is buffered: the client does not read it."""
        self.guard.open.discard(self)
        self.write_paused_at = None
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.open.discard(self)
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # Bytes of the head so far, counted per read before parsing: httptools keeps an
        # unfinished header in its own buffer, so a callback's count would come too late.
        # A read that finishes one request and starts the next leaves the phase DONE: that
        # head counts from its next read.
        phase = self.phase
        if phase == DONE:
            self.phase = HEAD
            self.since = self.loop.time()
            self._head_bytes = len(data)
        elif phase == HEAD:
            self._head_bytes += len(data)
        elif phase == CLOSING:
            self._drop(data)
            return
        # uvicorn's data_received, except that a refusal from a parser callback (which
        # raises to stop the parser) is not answered a second time with a 400.
        keep_alive = self.timeout_keep_alive_task
        if keep_alive is not None:
            keep_alive.cancel()
            self.timeout_keep_alive_task = None
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.phase == CLOSING:
                return
            message = "Invalid HTTP request received."
            self.logger.warning(message)
            self.send_400_response(message)
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        if (
            self.phase == HEAD
            and self._head_bytes > self.max_header_bytes
            and not self.transport.is_closing()
        ):
            self.guard.closed_header_too_large.inc()
            self.refuse(self.guard.too_large)

    def on_headers_complete(self) -> None:
        # Only when the reads of this head were that large can the head be: measure it.
        if self._head_bytes > self.max_header_bytes and self._head_size() > self.max_header_bytes:
            self.guard.closed_header_too_large.inc()
            self.refuse(self.guard.too_large)
            raise _Refused  # stops the parser: nothing of this request reaches the app
        self.phase = BODY
        self.since = self.loop.time()
        HttpToolsProtocol.on_headers_complete(self)

    def _head_size(self) -> int:
        """The parsed head's size: request line and header lines, as received less spaces."""
        size = len(self.url) + HEAD_LINE_OVERHEAD
        for name, value in self.headers:
            size += len(name) + len(value) + 4  # ": " and CRLF
        return size

    def on_message_complete(self) -> None:
        self.phase = DONE
        HttpToolsProtocol.on_message_complete(self)

    def waiting(self) -> bool:
        """Waiting for a request (idle, or sending its head), not being served one."""
        if self.phase == HEAD:
            return True
        return (
            self.phase == DONE
            and (self.cycle is None or self.cycle.response_complete)
            and not self.pipeline
        )

    def evict(self) -> None:
        """Make room for a new connection: close this one, answering 503 to a partial head."""
        self.guard.closed_evicted.inc()
        if self.phase == HEAD:
            self.refuse(self.guard.busy)
        else:
            self.guard.open.discard(self)
            self.phase = CLOSING
            self.transport.close()

    def refuse(self, answer: bytes) -> None:
        """Answer, unless this request was answered or an earlier one's answer is under way
        (pipelined), and close, lingering to be read."""
        phase, self.phase = self.phase, CLOSING
        self.guard.open.discard(self)
        self._unset_keepalive_if_required()
        # While a body arrives, the cycle is this request's; while a head does, the last one's.
        cycle = self.cycle
        can_answer = not self.pipeline and not (
            cycle is not None
            and cycle.response_started
            and (phase == BODY or not cycle.response_complete)
        )
        if cycle is not None and not cycle.response_complete:
            # The app may wait in receive(): it now reads a disconnect, its answer is dropped.
            cycle.disconnected = True
            cycle.message_event.set()
        transport = self.transport
        if transport.is_closing():
            return
        if can_answer:
            transport.write(answer)
        if not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        self.flow.resume_reading()
        self._linger_left = LINGER_BYTES
        self._linger = self.loop.call_later(LINGER_S, transport.close)

    def _drop(self, data: bytes) -> None:
        self._linger_left -= len(data)
        if self._linger_left < 0:
            self.transport.close()


def limited_protocol(limits: HttpLimits) -> type[LimitedProtocol]:
    """A protocol class for one server: its connections share one guard."""
    return type(
        "LimitedProtocol",
        (LimitedProtocol,),
        {"guard": _Guard(limits), "max_header_bytes": limits.max_header_bytes},
    )


def server_config(
    app: Callable[..., Any], host: str, port: int, limits: HttpLimits, **options: Any
) -> uvicorn.Config:
    """uvicorn's Config for ``app`` with ``limits``; ``options`` are further Config arguments."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=limited_protocol(limits),
        ws="none",  # no route speaks WebSocket: refuse upgrades rather than parse them
        timeout_keep_alive=limits.idle_timeout,  # type: ignore[arg-type]  # a float works
        log_config=None,
        access_log=False,
        **options,
    )
