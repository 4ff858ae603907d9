"""Real Redis and ZooKeeper servers as child processes of the current process.

Used by the all-in-one ``echo-at-time up`` command and by the test fixtures, on
machines without a container engine. Standard library only.

Facts this module relies on (see ENVIRONMENT.md):

* ``/usr/bin/redis-server`` is called by full path: pip packages that embed a
  server put their own ``redis-server`` first on a virtualenv's PATH.
* Redis is ready when a raw ``PING`` answers ``+PONG`` (~15 ms). With AOF on,
  ``kill()`` followed by ``restart()`` keeps every acknowledged write.
* ZooKeeper is ready when the four-letter word ``srvr`` answers with a ``Mode:``
  line. ``ruok`` answers ``imok`` before the server serves clients, so it is not
  used. After SIGTERM ZooKeeper exits with code 143, which is a clean stop.

Every server binds 127.0.0.1 only. Child processes are reaped by ``stop()`` /
``kill()``, by an ``atexit`` hook for any left running, and, when started from
the main thread, they also get SIGTERM from the kernel if this process dies
without cleaning up (``setpriv --pdeathsig``; no ``preexec_fn``).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self

__all__ = [
    "JAVA_BIN",
    "REDIS_SERVER_BIN",
    "SLF4J_SIMPLE_JAR",
    "ZOOKEEPER_JAR",
    "MissingBinaryError",
    "RedisServer",
    "ServerStartError",
    "ZooKeeperEnsemble",
    "ZooKeeperPeer",
    "ZooKeeperServer",
    "four_letter_word",
    "free_port",
    "redis_answers_ping",
    "write_zoo_cfg",
    "zookeeper_mode",
]

LOCALHOST = "127.0.0.1"

# Default locations (Debian packages). Tests may point a server at another path
# through its constructor to simulate a missing binary.
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


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        return int(sock.getsockname()[1])


def _distinct_free_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


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


# --- process bookkeeping -----------------------------------------------------

_LIVE: set[_ChildServer] = set()
_LIVE_LOCK = threading.Lock()


@atexit.register
def _stop_servers_left_running() -> None:
    with _LIVE_LOCK:
        servers = list(_LIVE)
    for server in servers:
        with contextlib.suppress(Exception):
            server.stop(timeout=5.0)


def _parent_death_prefix() -> list[str]:
    """``setpriv --pdeathsig TERM --`` so the child gets SIGTERM if we die uncleanly.

    The kernel sends the signal when the *thread* that forked the child exits, so
    it is only used from the main thread (which lives as long as the process).
    """
    if threading.current_thread() is not threading.main_thread():
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return []
    return [setpriv, "--pdeathsig", "TERM", "--"]


class _ChildServer:
    """Spawn, probe, stop and restart one server process."""

    name: ClassVar[str] = "server"
    log_name: ClassVar[str] = "server.log"
    #: Exit codes that mean "stopped as asked" (negative: killed by that signal).
    CLEAN_EXIT_CODES: ClassVar[frozenset[int]] = frozenset({0, -signal.SIGTERM})
    default_start_timeout: ClassVar[float] = 10.0

    def __init__(self, data_dir: Path, port: int | None) -> None:
        self.data_dir = Path(data_dir).absolute()
        self._auto_port = port is None
        self._port = free_port() if port is None else port
        self._proc: subprocess.Popen[bytes] | None = None
        self.last_exit_code: int | None = None

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
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

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
            return self
        raise AssertionError("unreachable")  # pragma: no cover

    def spawn(self) -> None:
        """Start the process without waiting for it to be ready."""
        if self.running:
            raise RuntimeError(f"{self.name} on port {self._port} is already running")
        command = self._command()  # raises MissingBinaryError before any side effect
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._prepare()
        self.last_exit_code = None
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [*_parent_death_prefix(), *command],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                close_fds=True,
                # Out of our process group: a terminal's Ctrl-C reaches only us, and we stop
                # the servers last, after everything that uses them.
                start_new_session=True,
            )
        with _LIVE_LOCK:
            _LIVE.add(self)

    def wait_until_ready(self, timeout: float | None = None) -> None:
        """Poll every ~10 ms until ready; on exit or timeout raise ServerStartError.

        On timeout the process is killed, so a failed start leaves nothing running.
        """
        if timeout is None:
            timeout = self.default_start_timeout
        proc = self._proc
        if proc is None:
            raise RuntimeError(f"{self.name} was not spawned")
        deadline = time.monotonic() + timeout
        while True:
            code = proc.poll()
            if code is not None:
                self._forget(code)
                raise self._start_error(
                    f"{self.name} on port {self._port} exited with code {code} before it was ready",
                    exited=True,
                )
            if self._is_ready():
                return
            if time.monotonic() >= deadline:
                self.kill()
                raise self._start_error(
                    f"{self.name} on port {self._port} was not ready within {timeout:g} s",
                    exited=False,
                )
            time.sleep(_POLL_INTERVAL)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL. Returns the exit code
        (see ``CLEAN_EXIT_CODES``), or None if it was not started."""
        proc = self._proc
        if proc is None:
            return self.last_exit_code
        if proc.poll() is None:
            self.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()
        self._forget(proc.returncode)
        return self.last_exit_code

    def terminate(self) -> None:
        """Send SIGTERM without waiting; ``stop()`` then reaps it."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)

    def kill(self) -> int | None:
        """SIGKILL and reap, to simulate a crash. Returns the exit code."""
        proc = self._proc
        if proc is None:
            return self.last_exit_code
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
        self._forget(proc.returncode)
        return self.last_exit_code

    def restart(self, timeout: float | None = None) -> Self:
        """Start again on the same port with the same data dir (stops it first if running)."""
        if self.running:
            self.stop()
        auto, self._auto_port = self._auto_port, False
        try:
            return self.start(timeout)
        finally:
            self._auto_port = auto

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
        state = f"pid={self.pid}" if self.running else "stopped"
        return f"<{type(self).__name__} port={self._port} {state} dir={self.data_dir}>"

    # -- helpers --------------------------------------------------------------

    def _forget(self, code: int | None) -> None:
        self.last_exit_code = code
        self._proc = None
        with _LIVE_LOCK:
            _LIVE.discard(self)

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


class RedisServer(_ChildServer):
    """``redis-server`` with AOF on, bound to 127.0.0.1, logging to ``<data_dir>/redis.log``."""

    name = "redis-server"
    log_name = "redis.log"

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        appendfsync: str = "everysec",
        extra_args: Sequence[str] = (),
        *,
        binary: Path | str | None = None,
    ) -> None:
        if appendfsync not in ("always", "everysec", "no"):
            raise ValueError(f"appendfsync must be always, everysec or no, not {appendfsync!r}")
        super().__init__(data_dir, port)
        self.appendfsync = appendfsync
        self.extra_args = tuple(extra_args)
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
            "--appendfsync", self.appendfsync,
            "--logfile", str(self.log_path),
            *self.extra_args,
        ]  # fmt: skip

    def _is_ready(self) -> bool:
        return redis_answers_ping(LOCALHOST, self._port)


# --- ZooKeeper -------------------------------------------------------------------


@dataclass(frozen=True)
class ZooKeeperPeer:
    """One member of an ensemble: ``server.<server_id>=<host>:<peer_port>:<election_port>``."""

    server_id: int
    peer_port: int
    election_port: int
    host: str = LOCALHOST

    def cfg_line(self) -> str:
        return f"server.{self.server_id}={self.host}:{self.peer_port}:{self.election_port}"


def write_zoo_cfg(
    path: Path,
    *,
    data_dir: Path,
    client_port: int,
    tick_time_ms: int = 500,
    peers: Sequence[ZooKeeperPeer] = (),
    server_id: int | None = None,
) -> Path:
    """Write a zoo.cfg for a standalone server, or for one node of an ensemble when
    ``peers`` is given (then ``server_id`` is required and ``<data_dir>/myid`` is written).
    """
    lines = [
        f"tickTime={tick_time_ms}",
        "initLimit=10",
        "syncLimit=5",
        f"dataDir={data_dir}",
        f"clientPort={client_port}",
        f"clientPortAddress={LOCALHOST}",
        "admin.enableServer=false",
        "4lw.commands.whitelist=*",
    ]
    data_dir.mkdir(parents=True, exist_ok=True)
    if peers:
        ids = [peer.server_id for peer in peers]
        if server_id is None or server_id not in ids:
            raise ValueError(f"server_id {server_id!r} must be one of the peers' ids {ids}")
        lines += [peer.cfg_line() for peer in peers]
        (data_dir / "myid").write_text(f"{server_id}\n")
    path.write_text("\n".join(lines) + "\n")
    return path


class ZooKeeperServer(_ChildServer):
    """ZooKeeper (QuorumPeerMain) on a JVM, output to ``<data_dir>/zookeeper.log``."""

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
        peers: Sequence[ZooKeeperPeer] = (),
        server_id: int | None = None,
        java: Path | str | None = None,
        zookeeper_jar: Path | str | None = None,
        slf4j_jar: Path | str | None = None,
    ) -> None:
        super().__init__(data_dir, port)
        self.tick_time_ms = tick_time_ms
        self.peers = tuple(peers)
        self.server_id = server_id
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
    def mode(self) -> str | None:
        """``srvr``'s Mode (standalone, leader, follower), None while not serving."""
        return zookeeper_mode(LOCALHOST, self._port)

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

    def _prepare(self) -> None:
        write_zoo_cfg(
            self.cfg_path,
            data_dir=self.data_dir / "data",
            client_port=self._port,
            tick_time_ms=self.tick_time_ms,
            peers=self.peers,
            server_id=self.server_id,
        )

    def _is_ready(self) -> bool:
        return self.mode is not None


class ZooKeeperEnsemble:
    """``size`` ZooKeeper nodes on 127.0.0.1, each in ``<base_dir>/zk<N>``."""

    def __init__(self, base_dir: Path, size: int = 3, tick_time_ms: int = 500) -> None:
        if size < 1:
            raise ValueError("an ensemble needs at least one node")
        self.base_dir = Path(base_dir).absolute()
        ports = _distinct_free_ports(3 * size)
        peers = [
            ZooKeeperPeer(server_id=n, peer_port=ports[3 * i + 1], election_port=ports[3 * i + 2])
            for i, n in enumerate(range(1, size + 1))
        ]
        self.nodes = [
            ZooKeeperServer(
                self.base_dir / f"zk{peer.server_id}",
                port=ports[3 * i],
                tick_time_ms=tick_time_ms,
                peers=peers,
                server_id=peer.server_id,
            )
            for i, peer in enumerate(peers)
        ]

    @property
    def hosts(self) -> str:
        return ",".join(node.hosts for node in self.nodes)

    def start(self, timeout: float = 30.0) -> Self:
        """Spawn every node, then wait until each answers ``srvr`` as leader or follower."""
        deadline = time.monotonic() + timeout
        try:
            for node in self.nodes:
                node.spawn()
            for node in self.nodes:
                node.wait_until_ready(max(0.0, deadline - time.monotonic()))
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 10.0) -> None:
        for node in self.nodes:  # signal all first: they shut down in parallel
            node.terminate()
        for node in self.nodes:
            node.stop(timeout)

    def leader(self) -> ZooKeeperServer | None:
        for node in self.nodes:
            if node.running and node.mode == "leader":
                return node
        return None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
