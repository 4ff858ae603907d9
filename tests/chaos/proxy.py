"""A pausable TCP proxy on loopback: the simplest network partition.

One process's connections to ZooKeeper or Redis go through a proxy of its own
(point its ``EAT_ZK_HOSTS`` / ``EAT_REDIS_URL`` at :attr:`PausableProxy.address`).
Then:

* :meth:`~PausableProxy.pause` stops forwarding bytes in one or both directions.
  Connections stay open and new ones are accepted, but nothing gets through, as
  when a network path silently drops packets: the client only finds out through
  its own timeouts. Paused bytes wait in the kernel's buffers and flow again on
  :meth:`~PausableProxy.resume`, as after a healed partition.
* Pausing only ``down`` (server to client) lets requests reach the server while
  the replies are held: the server acts, the client never hears about it.
* :meth:`~PausableProxy.cut` closes every connection at once (a reset).

One thread per proxy runs a selector loop; it only ever touches its own sockets.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

LOCALHOST = "127.0.0.1"
CHUNK = 65536


@dataclass(eq=False)
class _Pair:
    client: socket.socket
    server: socket.socket
    closed: bool = field(default=False)


class PausableProxy:
    """Forward ``127.0.0.1:<port>`` to ``target_host:target_port``.

    :param target_host: where connections go.
    :param target_port: the server's port.
    :param name: for ``repr`` and thread names.
    """

    def __init__(self, target_host: str, target_port: int, name: str = "proxy") -> None:
        self.target = (target_host, target_port)
        self.name = name
        self._listener = socket.create_server((LOCALHOST, 0))
        self._listener.setblocking(False)
        self.port = int(self._listener.getsockname()[1])
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._lock = threading.Lock()
        self._pairs: list[_Pair] = []
        self._paused_up = False  # client -> server
        self._paused_down = False  # server -> client
        self._cut_requested = False
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name=f"proxy-{name}", daemon=True)
        self.connections = 0  # accepted so far

    def __repr__(self) -> str:
        return f"<PausableProxy {self.name} :{self.port} -> {self.target[0]}:{self.target[1]}>"

    @property
    def address(self) -> str:
        return f"{LOCALHOST}:{self.port}"

    @property
    def paused(self) -> bool:
        return self._paused_up or self._paused_down

    @property
    def open_connections(self) -> int:
        """Connections currently forwarded (or held)."""
        return len(self._pairs)

    # -- control (any thread) ------------------------------------------------------

    def start(self) -> Self:
        self._selector.register(self._listener, selectors.EVENT_READ, "accept")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread.start()
        return self

    def pause(self, *, up: bool = True, down: bool = True) -> None:
        """Stop forwarding client->server (``up``) and/or server->client (``down``)."""
        with self._lock:
            self._paused_up = self._paused_up or up
            self._paused_down = self._paused_down or down
        self._wake()

    def resume(self) -> None:
        with self._lock:
            self._paused_up = self._paused_down = False
        self._wake()

    def cut(self) -> None:
        """Close every open connection (the proxy keeps accepting new ones)."""
        with self._lock:
            self._cut_requested = True
        self._wake()

    def close(self) -> None:
        with self._lock:
            self._closing = True
        self._wake()
        self._thread.join(5.0)
        for sock in (self._listener, self._wake_r, self._wake_w):
            sock.close()
        self._selector.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    # -- the loop (proxy thread only) --------------------------------------------

    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._closing:
                        break
                    cut, self._cut_requested = self._cut_requested, False
                if cut:
                    for pair in list(self._pairs):
                        self._close(pair)
                self._register_all()
                for key, _ in self._selector.select(timeout=0.5):
                    if key.data == "accept":
                        self._accept()
                    elif key.data == "wake":
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(4096)
                    else:
                        pair, upward = key.data
                        if not pair.closed:
                            self._forward(pair, upward)
        finally:
            for pair in list(self._pairs):
                self._close(pair)

    def _register_all(self) -> None:
        with self._lock:
            up, down = not self._paused_up, not self._paused_down
        for pair in self._pairs:
            self._want(pair.client, up, (pair, True))
            self._want(pair.server, down, (pair, False))

    def _want(self, sock: socket.socket, readable: bool, data: object) -> None:
        try:
            self._selector.get_key(sock)
            registered = True
        except KeyError:
            registered = False
        if readable and not registered:
            self._selector.register(sock, selectors.EVENT_READ, data)
        elif not readable and registered:
            self._selector.unregister(sock)

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except BlockingIOError:
            return
        self.connections += 1
        try:
            server = socket.create_connection(self.target, timeout=1.0)
        except OSError:
            client.close()  # the server is down: the client sees its connection closed
            return
        for sock in (client, server):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(5.0)
        self._pairs.append(_Pair(client, server))

    def _forward(self, pair: _Pair, upward: bool) -> None:
        source, sink = (pair.client, pair.server) if upward else (pair.server, pair.client)
        try:
            data = source.recv(CHUNK)
            if not data:
                self._close(pair)
                return
            sink.sendall(data)
        except OSError:
            self._close(pair)

    def _close(self, pair: _Pair) -> None:
        if pair.closed:
            return
        pair.closed = True
        for sock in (pair.client, pair.server):
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(sock)
            with contextlib.suppress(OSError):
                sock.close()
        with contextlib.suppress(ValueError):
            self._pairs.remove(pair)


class ProxyGroup:
    """One proxy per server of a list (a ZooKeeper ensemble's connect string)."""

    def __init__(self, hosts: str, name: str = "group") -> None:
        self.proxies: list[PausableProxy] = []
        for i, host_port in enumerate(hosts.split(",")):
            host, _, port = host_port.rpartition(":")
            self.proxies.append(PausableProxy(host, int(port), f"{name}-{i + 1}"))

    @property
    def hosts(self) -> str:
        """The connect string to give the client instead of the real one."""
        return ",".join(p.address for p in self.proxies)

    def start(self) -> Self:
        for proxy in self.proxies:
            proxy.start()
        return self

    def pause(self, *, up: bool = True, down: bool = True) -> None:
        for proxy in self.proxies:
            proxy.pause(up=up, down=down)

    def resume(self) -> None:
        for proxy in self.proxies:
            proxy.resume()

    def cut(self) -> None:
        for proxy in self.proxies:
            proxy.cut()

    def close(self) -> None:
        for proxy in self.proxies:
            proxy.close()
