"""A load generator cheap enough to share two cores with the service it measures.

The httpx poster it replaces could not hold the rate. With 256 requests in
flight over 64 pooled connections, httpcore re-scans every queued request on
each state change (``_assign_requests_to_connections``: half its profile) and
retries ``import sniffio``, which is not installed, on every request
(``current_async_library``: a fifth). It took a whole core for ~80 posts/s, and
requests waited in its queue for seconds after their runAt was stamped, which
B4 then counted as lateness. Here each keep-alive connection is a bare
``asyncio.Protocol``: a request is one preformatted ``write``, a reply is found
with ``bytes.find`` and only its status line and Content-Length are read; no
task or future per request.

One request at a time per connection (no pipelining): uvicorn answers a
connection's requests in order, so pipelining would serialise them and defeat
the API's coalescing of concurrent accepts.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from urllib.parse import urlsplit

CONNECT_TIMEOUT = 10.0


@dataclass
class PostStats:
    """What the poster saw: everything else counts as not accepted."""

    sent: int = 0
    accepted: set[str] = field(default_factory=set)
    run_ats: dict[str, int] = field(default_factory=dict)  # accepted uuid -> runAt sent
    statuses: collections.Counter = field(default_factory=collections.Counter)
    broken: int = 0  # connection lost with a request outstanding: outcome unknown


class _Connection(asyncio.Protocol):
    def __init__(self, poster: RatePoster) -> None:
        self.poster = poster
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.current: tuple[str, int] | None = None  # (uuid, runAt) awaiting its reply

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, uid: str, run_at: int) -> None:
        self.current = (uid, run_at)
        self.transport.write(self.poster.request(uid, run_at))  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.current is not None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].lower()
            start = head.find(b"\r\ncontent-length:")
            length = int(head[start + 17 : head.find(b"\r\n", start + 2)]) if start >= 0 else 0
            if len(self.buffer) < end + 4 + length:
                return
            self.buffer = self.buffer[end + 4 + length :]
            done, self.current = self.current, None
            self.poster.replied(self, done, int(head[9:12]))

    def connection_lost(self, exc: Exception | None) -> None:
        self.poster.lost(self)


class RatePoster:
    """POSTs save-message requests over ``connections`` keep-alive connections.

    Each message's runAt is stamped when its request is written, ``delay_ms``
    ahead of this host's clock, as a client would.
    """

    def __init__(self, url: str, delay_ms: int, connections: int = 64) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.delay_ms = delay_ms
        self.connections = connections
        self.stats = PostStats()
        self._head = (
            f"POST {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            "Content-Type: application/json\r\nContent-Length: "
        ).encode()
        self._idle: collections.deque[_Connection] = collections.deque()
        self._waiting: collections.deque[str] = collections.deque()
        self._live = 0
        self._outstanding = 0  # sent or waiting, not yet answered or given up
        self._drained: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._all: set[_Connection] = set()

    def request(self, uid: str, run_at: int) -> bytes:
        body = b'{"message":"b4","runAt":%d,"uuid":"%s"}' % (run_at, uid.encode())
        return b"%s%d\r\n\r\n%s" % (self._head, len(body), body)

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        await asyncio.gather(*(self._connect() for _ in range(self.connections)))

    async def _connect(self) -> None:
        _, conn = await asyncio.wait_for(
            self._loop.create_connection(lambda: _Connection(self), self.host, self.port),  # type: ignore[union-attr]
            CONNECT_TIMEOUT,
        )
        self._live += 1
        self._all.add(conn)
        if self._drained is not None:  # a replacement that finished after drain() began
            conn.transport.close()  # type: ignore[union-attr]
            return
        self._ready(conn)

    def post(self) -> None:
        """Send one new message now, or as soon as a connection is free."""
        uid = str(uuidlib.uuid4())
        self._outstanding += 1
        if self._idle:
            self._write(self._idle.popleft(), uid)
        else:
            self._waiting.append(uid)

    def _write(self, conn: _Connection, uid: str) -> None:
        self.stats.sent += 1
        conn.send(uid, int(time.time() * 1000) + self.delay_ms)

    def _ready(self, conn: _Connection) -> None:
        if self._waiting:
            self._write(conn, self._waiting.popleft())
        else:
            self._idle.append(conn)

    def replied(self, conn: _Connection, done: tuple[str, int], status: int) -> None:
        uid, run_at = done
        self.stats.statuses[status] += 1
        if status == 201:
            self.stats.accepted.add(uid)
            self.stats.run_ats[uid] = run_at
        self._settle()
        self._ready(conn)

    def lost(self, conn: _Connection) -> None:
        self._live -= 1
        self._all.discard(conn)
        if conn in self._idle:
            self._idle.remove(conn)
        if conn.current is not None:
            self.stats.broken += 1
            conn.current = None
            self._settle()
        if self._loop is not None and not self._loop.is_closed() and self._drained is None:
            # uvicorn drops connections idle for 5 s: replace them while still posting.
            self._loop.create_task(self._reconnect())

    async def _reconnect(self) -> None:
        try:
            await self._connect()
        except (OSError, TimeoutError):
            if self._live == 0:
                # Nothing can carry what waits: give it up rather than hang.
                self.stats.broken += len(self._waiting)
                self._settle(len(self._waiting))
                self._waiting.clear()

    def _settle(self, count: int = 1) -> None:
        self._outstanding -= count
        if self._outstanding == 0 and self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    async def drain(self, patience: float) -> None:
        """Wait for every reply (at most ``patience`` s), then close the connections."""
        self._drained = self._loop.create_future()  # type: ignore[union-attr]
        if self._outstanding == 0:
            self._drained.set_result(None)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drained, patience)
        for conn in list(self._all):
            conn.transport.close()  # type: ignore[union-attr]
        self._idle.clear()
        await asyncio.sleep(0)  # let connection_lost run before the loop closes


async def send_at_rate(
    url: str,
    rate: float,
    seconds: float,
    delay_ms: int,
    *,
    connections: int = 64,
    patience: float = 10.0,
) -> PostStats:
    """Post ``rate * seconds`` messages, evenly spaced, each due ``delay_ms`` after sending.

    Paced against the start time, not the previous send: a late wake-up sends
    everything that has fallen due, so the rate holds even when this process
    gets the CPU in slices.
    """
    poster = RatePoster(url, delay_ms, connections)
    await poster.open()
    loop = asyncio.get_running_loop()
    total = int(rate * seconds)
    start = loop.time()
    posted = 0
    while posted < total:
        due = min(total, int((loop.time() - start) * rate) + 1)
        while posted < due:
            poster.post()
            posted += 1
        pause = start + posted / rate - loop.time()
        if pause > 0:
            # uvloop rounds timers to whole ms, so a sub-ms sleep there returns at once and
            # this loop would spin; a 1 ms floor costs nothing, the next wake catches up.
            await asyncio.sleep(max(pause, 0.001))
    await poster.drain(patience)
    return poster.stats
