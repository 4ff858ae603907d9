"""The Redis and ZooKeeper that ``echo-at-time up`` starts when none is configured.

Each server is a child process (:class:`~app.ops.child.ChildProcess`) bound to
127.0.0.1, with its data and log under a directory of its own, so that a second
``up`` finds every message again. Standard library only.

Facts this module relies on (see ENVIRONMENT.md):

* ``/usr/bin/redis-server`` is called by full path: pip packages that embed a
  server put their own ``redis-server`` first on a virtualenv's PATH.
* Redis is ready when a raw ``PING`` answers ``+PONG`` (~15 ms). AOF is on, so a
  restart keeps every acknowledged write.
* ZooKeeper is ready when the four-letter word ``srvr`` answers with a ``Mode:``
  line. ``ruok`` answers ``imok`` before the server serves clients, so it is not
  used. After SIGTERM ZooKeeper exits with code 143, which is a clean stop.

Servers left running when the interpreter exits are stopped by an ``atexit``
hook; the kernel's parent-death signal covers a parent that dies uncleanly.
The tests extend these classes (a ZooKeeper ensemble, crash and restart) in
``tests/servers.py``.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import shutil
import signal
import socket
import threading
import time
from collections import deque
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self

from app.ops.child import STDOUT, ChildProcess

__all__ = [
    "JAVA_BIN",
    "REDIS_SERVER_BIN",
    "SLF4J_SIMPLE_JAR",
    "ZOOKEEPER_JAR",
    "MissingBinaryError",
    "RedisServer",
    "Server",
    "ServerStartError",
    "ZooKeeperServer",
    "four_letter_word",
    "free_port",
    "redis_answers_ping",
    "zookeeper_mode",
]

LOCALHOST = "127.0.0.1"

# Default locations (Debian packages). A constructor argument points a server at
# another path (a test simulates a missing binary that way).
REDIS_SERVER_BIN = Path("/usr/bin/redis-server")
JAVA_BIN = Path("/usr/bin/java")
ZOOKEEPER_JAR = Path("/usr/share/java/zookeeper.jar")
SLF4J_SIMPLE_JAR = Path("/usr/share/java/slf4j-simple.jar")

_POLL_INTERVAL = 0.01
_PROBE_TIMEOUT = 0.25
_LOG_TAIL_LINES = 40
_ADDRESS_IN_USE = "address already in use"


class MissingBinaryError(RuntimeError):
    """A binary or jar the server needs is not installed; names the Debian package."""


class ServerStartError(RuntimeError):
    """The server exited, or was not ready in time; the message ends with its log's tail."""

    def __init__(self, message: str, *, exited: bool, log_text: str = "") -> None:
        super().__init__(message)
        self.exited = exited
        self.log_text = log_text


# The ports free_port() handed out lately: two servers started together (two apis of
# one test) must not be given one port.
_RECENT_PORTS: deque[int] = deque(maxlen=4096)
# Ports are picked below the kernel's ephemeral range (32768-60999 on Linux), where no
# outgoing connection takes a local port: a port the OS picks with bind(0) comes from
# that range, and between the pick and the server's bind any client connection on the
# machine could take it (an api then failed to bind under a chaos test's load). The
# range leaves port + 10000 below 32768 too, for a Redis Cluster node's bus port.
_PICK_FROM, _PICK_TO = 12_000, 22_000
_random = random.Random()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((LOCALHOST, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port free on 127.0.0.1 a moment ago, outside the ephemeral range when the
    system's range allows it, and not one this process was handed lately."""
    if _ephemeral_low() > _PICK_TO + 10_000:
        for _ in range(200):
            port = _random.randrange(_PICK_FROM, _PICK_TO)
            if port not in _RECENT_PORTS and _bindable(port):
                _RECENT_PORTS.append(port)
                return port
    while True:  # a system whose ephemeral range covers ours: let the OS pick
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((LOCALHOST, 0))
            port = int(sock.getsockname()[1])
        if port not in _RECENT_PORTS:
            _RECENT_PORTS.append(port)
            return port


def redis_answers_ping(host: str, port: int, timeout: float = _PROBE_TIMEOUT) -> bool:
    """True if a Redis server at host:port answers a raw ``PING``.

    ``+PONG``, or ``-NOAUTH`` from a server with a password: it serves either way.
    (While loading its AOF it answers ``-LOADING``, which is not ready.)
    """
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            reply = b""
            while b"\r\n" not in reply:
                chunk = sock.recv(64)
                if not chunk:
                    break
                reply += chunk
    except OSError:
        return False
    return reply.startswith((b"+PONG", b"-NOAUTH"))


def four_letter_word(host: str, port: int, word: str, timeout: float = _PROBE_TIMEOUT) -> str:
    """Send a ZooKeeper four-letter word and return the whole answer ("" on any error)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(word.encode("ascii"))
            chunks: list[bytes] = []
            while True:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                chunks.append(chunk)
    except OSError:
        return ""
    return b"".join(chunks).decode("utf-8", errors="replace")


def zookeeper_mode(host: str, port: int, timeout: float = _PROBE_TIMEOUT) -> str | None:
    """The ``Mode:`` a ZooKeeper server reports through ``srvr`` (standalone, leader,
    follower, ...), or None while it does not serve clients."""
    for line in four_letter_word(host, port, "srvr", timeout).splitlines():
        if line.startswith("Mode:"):
            return line.partition(":")[2].strip()
    return None


def _missing(what: str, package: str) -> MissingBinaryError:
    return MissingBinaryError(
        f"{what} not found; install the Debian package {package!r} "
        f"(apt-get install -y --no-install-recommends {package})"
    )


# --- one server ------------------------------------------------------------------

_LIVE: set[Server] = set()
_LIVE_LOCK = threading.Lock()


@atexit.register
def _stop_servers_left_running() -> None:
    with _LIVE_LOCK:
        servers = list(_LIVE)
    for server in servers:
        with contextlib.suppress(Exception):
            server.stop(timeout=5.0)


class Server:
    """Spawn one server process, wait until it serves, stop it.

    The port, if not given, is chosen free; once the server has served on it, it
    is kept (clients and the data refer to it), so a later ``start()`` reuses it.
    """

    name: ClassVar[str] = "server"
    log_name: ClassVar[str] = "server.log"
    #: Exit codes that mean "stopped as asked" (negative: killed by that signal).
    CLEAN_EXIT_CODES: ClassVar[frozenset[int]] = frozenset({0, -signal.SIGTERM})
    default_start_timeout: ClassVar[float] = 10.0

    def __init__(self, data_dir: Path, port: int | None) -> None:
        self.data_dir = Path(data_dir).absolute()
        self._auto_port = port is None
        self._port = free_port() if port is None else port
        self._process: ChildProcess | None = None

    # -- to implement ---------------------------------------------------------

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _prepare(self) -> None:
        """Write config files before each spawn."""

    def _is_ready(self) -> bool:
        raise NotImplementedError

    # -- properties ---------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def process(self) -> ChildProcess | None:
        """The latest process spawned (running or exited), None before the first."""
        return self._process

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.running

    @property
    def log_path(self) -> Path:
        return self.data_dir / self.log_name

    # -- lifecycle ------------------------------------------------------------

    def start(self, timeout: float | None = None) -> Self:
        """Spawn the server and wait until it serves clients.

        If the port was chosen automatically and another process took it in the
        meantime, retry once on a new port.
        """
        if timeout is None:
            timeout = self.default_start_timeout
        for attempt in (1, 2):
            offset = self._log_size()
            self.spawn()
            try:
                self.wait_until_ready(timeout)
            except ServerStartError as exc:
                collided = exc.exited and _ADDRESS_IN_USE in self._log_since(offset).lower()
                if attempt == 1 and collided and self._auto_port:
                    self._port = free_port()
                    continue
                raise
            self._auto_port = False
            return self
        raise AssertionError("unreachable")  # pragma: no cover

    def spawn(self) -> None:
        """Start the process without waiting for it to be ready."""
        if self.running:
            raise RuntimeError(f"{self.name} on port {self._port} is already running")
        command = self._command()  # raises MissingBinaryError before any side effect
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._prepare()
        # Own session: Ctrl-C reaches only our process, which stops the servers last,
        # after everything that uses them.
        self._process = ChildProcess(
            command, cwd=self.data_dir, stdout=self.log_path, stderr=STDOUT
        )
        with _LIVE_LOCK:
            _LIVE.add(self)

    def wait_until_ready(self, timeout: float | None = None) -> None:
        """Poll every ~10 ms until ready; on exit or timeout raise ServerStartError.

        On timeout the process is killed, so a failed start leaves nothing running.
        """
        if timeout is None:
            timeout = self.default_start_timeout
        process = self._process
        if process is None:
            raise RuntimeError(f"{self.name} was not spawned")
        deadline = time.monotonic() + timeout
        while True:
            code = process.poll()
            if code is not None:
                raise self._start_error(
                    f"{self.name} on port {self._port} exited with code {code} before it was ready",
                    exited=True,
                )
            if self._is_ready():
                return
            if time.monotonic() >= deadline:
                process.kill()
                raise self._start_error(
                    f"{self.name} on port {self._port} was not ready within {timeout:g} s",
                    exited=False,
                )
            time.sleep(_POLL_INTERVAL)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL. Returns the exit code
        (see ``CLEAN_EXIT_CODES``), or None if it was never started."""
        with _LIVE_LOCK:
            _LIVE.discard(self)
        return None if self._process is None else self._process.stop(timeout)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid={self._process.pid}" if self.running and self._process else "stopped"
        return f"<{type(self).__name__} port={self._port} {state} dir={self.data_dir}>"

    # -- helpers --------------------------------------------------------------

    def _log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def _log_since(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(offset)
                return log.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def _start_error(self, message: str, *, exited: bool) -> ServerStartError:
        size = self._log_size()
        text = self._log_since(max(0, size - 16384))
        tail = "\n".join(text.splitlines()[-_LOG_TAIL_LINES:])
        return ServerStartError(
            f"{message}\n--- tail of {self.log_path} ---\n{tail}", exited=exited, log_text=text
        )


# --- Redis ---------------------------------------------------------------------


class RedisServer(Server):
    """``redis-server`` with AOF on, bound to 127.0.0.1, logging to ``<data_dir>/redis.log``."""

    name = "redis-server"
    log_name = "redis.log"

    def __init__(
        self, data_dir: Path, port: int | None = None, *, binary: Path | str | None = None
    ) -> None:
        super().__init__(data_dir, port)
        self.binary = None if binary is None else Path(binary)

    @property
    def url(self) -> str:
        return f"redis://{LOCALHOST}:{self._port}/0"

    def _resolve_binary(self) -> str:
        if self.binary is not None:  # explicit: no fallback
            if self.binary.is_file():
                return str(self.binary)
            raise _missing(f"redis-server ({self.binary})", "redis-server")
        if REDIS_SERVER_BIN.is_file():
            return str(REDIS_SERVER_BIN)
        found = shutil.which("redis-server")
        if found is None:
            raise _missing(f"redis-server ({REDIS_SERVER_BIN})", "redis-server")
        return found

    def _command(self) -> list[str]:
        return [
            self._resolve_binary(),
            "--port", str(self._port),
            "--bind", LOCALHOST,
            "--daemonize", "no",
            "--dir", str(self.data_dir),
            "--save", "",
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--logfile", str(self.log_path),
        ]  # fmt: skip

    def _is_ready(self) -> bool:
        return redis_answers_ping(LOCALHOST, self._port)


# --- ZooKeeper -------------------------------------------------------------------


class ZooKeeperServer(Server):
    """A standalone ZooKeeper (QuorumPeerMain) on a JVM, output to ``<data_dir>/zookeeper.log``,
    its znodes in ``<data_dir>/data``."""

    name = "zookeeper"
    log_name = "zookeeper.log"
    CLEAN_EXIT_CODES = frozenset({0, 128 + signal.SIGTERM, -signal.SIGTERM})
    default_start_timeout = 30.0

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        tick_time_ms: int = 500,
        *,
        java: Path | str | None = None,
        zookeeper_jar: Path | str | None = None,
        slf4j_jar: Path | str | None = None,
    ) -> None:
        super().__init__(data_dir, port)
        self.tick_time_ms = tick_time_ms
        self.java = None if java is None else Path(java)
        self.zookeeper_jar = Path(zookeeper_jar) if zookeeper_jar is not None else ZOOKEEPER_JAR
        self.slf4j_jar = Path(slf4j_jar) if slf4j_jar is not None else SLF4J_SIMPLE_JAR

    @property
    def hosts(self) -> str:
        return f"{LOCALHOST}:{self._port}"

    @property
    def cfg_path(self) -> Path:
        return self.data_dir / "zoo.cfg"

    @property
    def znode_dir(self) -> Path:
        return self.data_dir / "data"

    def _resolve_java(self) -> str:
        if self.java is not None:
            if self.java.is_file() and os.access(self.java, os.X_OK):
                return str(self.java)
            raise _missing(f"java ({self.java})", "default-jre-headless")
        found = shutil.which("java")
        if found is not None:
            return found
        if JAVA_BIN.is_file():
            return str(JAVA_BIN)
        raise _missing("java", "default-jre-headless")

    def _command(self) -> list[str]:
        java = self._resolve_java()
        if not self.zookeeper_jar.is_file():
            raise _missing(f"ZooKeeper jar ({self.zookeeper_jar})", "zookeeper")
        if not self.slf4j_jar.is_file():
            raise _missing(f"SLF4J simple binding ({self.slf4j_jar})", "libslf4j-java")
        return [
            java,
            "-Xmx256m",
            "-cp",
            f"{self.zookeeper_jar}:{self.slf4j_jar}",
            "-Dorg.slf4j.simpleLogger.defaultLogLevel=warn",
            "org.apache.zookeeper.server.quorum.QuorumPeerMain",
            str(self.cfg_path),
        ]

    def _cfg_lines(self) -> list[str]:
        """zoo.cfg: tickTime bounds the session timeouts clients may ask for (2-20 ticks);
        no admin server (it would take :8080); every four-letter word (``srvr`` is the
        readiness probe)."""
        return [
            f"tickTime={self.tick_time_ms}",
            "initLimit=10",
            "syncLimit=5",
            f"dataDir={self.znode_dir}",
            f"clientPort={self._port}",
            f"clientPortAddress={LOCALHOST}",
            "admin.enableServer=false",
            "4lw.commands.whitelist=*",
        ]

    def _prepare(self) -> None:
        self.znode_dir.mkdir(parents=True, exist_ok=True)
        self.cfg_path.write_text("\n".join(self._cfg_lines()) + "\n")

    def _is_ready(self) -> bool:
        return zookeeper_mode(LOCALHOST, self._port) is not None
