"""Changes the api answers only once ``WAIT k`` confirmed them (``EAT_WAIT_REPLICAS=k``).

Redis replicates asynchronously: a master that fails right after answering takes
the writes its replicas had not received yet with it, and the replica promoted in
its place never saw them. ``WAIT k timeout`` blocks until k replicas acknowledged
every write made *on the connection that sends it*, or the timeout passes, and
answers how many did. On any other connection it answers at once, vacuously
(ENVIRONMENT.md): so the change and its WAIT go out together, pipelined on one
connection, to the master that serves the change's keys (on a cluster: the
master of the partition's slot, found from the cluster client's slot map).

When fewer than k replicas confirm in time, :class:`NotReplicated`: the master
has the change (nothing is undone, nothing is lost while it lives) but it may not
survive a failover; the api answers 503 and the client retries with the same
uuid, which answers the duplicate (and WAITs again) once the replica has it.

What the pipeline meets, and does:

- NOSCRIPT (a restarted master, a promoted replica, SCRIPT FLUSH): the script did
  not run, so WAIT confirmed nothing of it; load it on that node and send again.
- MOVED or ASK (a reshard, a failover): the script did not run there; update the
  slot map (or ask the importing node) and send again. TRYAGAIN (the slot's keys
  half migrated): wait a moment and send again. At most :data:`ATTEMPTS` sends.
- A connection that cannot be made: nothing was sent; on a cluster the slot map
  is refreshed and the change sent again (a failover moves the slot), else the
  error goes up (503, retry).
- A reply lost once the change was sent: :class:`~app.store.client.OutcomeUnknown`
  (the connections are guarded), never a second send.

The sends of one change share one timeout: a send that ran nothing still carried its
WAIT, which blocks for as long as the connection's earlier writes are unconfirmed
(a replica that stopped answering), so each send WAITs only what is left of the
timeout (at least 1 ms). The api answers within about ``EAT_WAIT_TIMEOUT_MS``
however many sends a change took, not once per send.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import (
    AskError,
    ConnectionError,
    MovedError,
    NoScriptError,
    RedisError,
    ResponseError,
    TryAgainError,
)

from app import metrics
from app.store.client import OutcomeUnknown

ATTEMPTS = 5  # sends of one change: NOSCRIPT, a redirection or a refused connection each
TRY_AGAIN_S = 0.05  # pause after TRYAGAIN or a refused connection on a cluster
_READ_MARGIN_S = 5.0  # beyond the WAIT timeout, for the reply itself to arrive

Command = tuple[Any, ...]


class NotReplicated(RedisError):
    """The master applied the change, but fewer than EAT_WAIT_REPLICAS replicas confirmed
    it within EAT_WAIT_TIMEOUT_MS. Retrying with the same uuid is safe (a duplicate)."""


class Replication:
    """Sends a change and ``WAIT replicas timeout_ms`` on one connection to the master
    that serves the change's keys.

    :param client: the store's client (``StoreRedis`` or ``StoreCluster``: guarded
        connections, see ``app.store.client``).
    :param replicas: EAT_WAIT_REPLICAS, at least 1.
    :param timeout_ms: EAT_WAIT_TIMEOUT_MS.
    """

    def __init__(self, client, replicas: int, timeout_ms: int) -> None:
        if replicas < 1:
            raise ValueError("replicas must be at least 1")
        self.client = client
        self.replicas = replicas
        self.timeout_ms = timeout_ms
        self.cluster = isinstance(client, RedisCluster)
        self._confirmed = metrics.REPLICATION_WAITS.labels("replicated")
        self._timed_out = metrics.REPLICATION_WAITS.labels("timed_out")

    async def script(self, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """``script`` on ``keys`` and ``args`` (as ``script(keys=, args=)`` would run it),
        answered only once WAIT confirmed it; its reply."""
        call: Command = ("EVALSHA", script.sha, len(keys), *keys, *args)
        deadline = self._deadline()
        for _ in range(ATTEMPTS):
            reply = await self._send(keys[0], [call], deadline)
            if isinstance(reply[0], NoScriptError):
                await self._load(keys[0], script)
                continue
            if reply[0] is _RESEND:
                continue
            return self._checked(reply)[0]
        raise RedisError(f"script not run after {ATTEMPTS} sends (redirected or not loaded)")

    async def transaction(self, key: Any, commands: Sequence[Command]) -> list[Any]:
        """``commands`` (on ``key``'s slot) in one MULTI/EXEC, answered only once WAIT
        confirmed them; EXEC's replies."""
        batch = [("MULTI",), *commands, ("EXEC",)]
        deadline = self._deadline()
        for _ in range(ATTEMPTS):
            reply = await self._send(key, batch, deadline)
            if any(r is _RESEND for r in reply):
                continue
            return self._checked(reply)[-1]
        raise RedisError(f"transaction not run after {ATTEMPTS} sends (redirected)")

    def _checked(self, replies: list[Any]) -> list[Any]:
        """The replies of the change, once its WAIT counted enough replicas."""
        *change, counted = replies
        for reply in change:
            if isinstance(reply, Exception):
                raise reply
        if isinstance(counted, Exception):
            raise counted
        if int(counted) < self.replicas:
            self._timed_out.inc()
            raise NotReplicated(
                f"{int(counted)} of {self.replicas} replicas confirmed the change within "
                f"{self.timeout_ms} ms"
            )
        self._confirmed.inc()
        return change

    def _deadline(self) -> float:
        return time.monotonic() + self.timeout_ms / 1000

    async def _send(self, key: Any, commands: list[Command], deadline: float) -> list[Any]:
        """``commands`` then WAIT (for what is left until ``deadline``), pipelined on one
        connection to the master of ``key``: every reply (an error reply as its
        exception), or ``[_RESEND]`` when nothing ran and the slot map was updated (the
        caller sends again)."""
        # WAIT 0 would block for ever: a send past the deadline waits 1 ms.
        wait_ms = max(1, int((deadline - time.monotonic()) * 1000))
        commands = [*commands, ("WAIT", self.replicas, wait_ms)]
        if not self.cluster:
            pool = self.client.connection_pool
            connection = await pool.get_connection()
            try:
                return await self._exchange(connection, commands, wait_ms)
            finally:
                await pool.release(connection)
        return await self._send_cluster(key, commands, wait_ms)

    async def _send_cluster(self, key: Any, commands: list[Command], wait_ms: int) -> list[Any]:
        client: RedisCluster = self.client
        node = client.get_node_from_key(key)
        connection = node.acquire_connection()
        try:
            try:
                await connection.connect()
            except (ConnectionError, OSError):
                # Nothing was sent. A master that is gone is replaced by a failover: learn
                # the new slot map, then send again.
                await asyncio.sleep(TRY_AGAIN_S)
                await client.nodes_manager.initialize()
                return [_RESEND]
            replies = await self._exchange(connection, commands, wait_ms)
        finally:
            node.release(connection)
        # A redirection answers the first command that touches a key (the script, or the
        # first command queued after MULTI); what follows it did not run either.
        redirect = next((r for r in replies if isinstance(r, _REDIRECTS)), None)
        if isinstance(redirect, MovedError):
            await client.nodes_manager.move_slot(redirect)
            return [_RESEND]
        if isinstance(redirect, AskError) and len(commands) == 2:
            return await self._asking(redirect, commands, wait_ms)
        if redirect is not None:  # TRYAGAIN, or ASK for a transaction: the migration ends soon
            await asyncio.sleep(TRY_AGAIN_S)
            return [_RESEND]
        return replies

    async def _asking(self, ask: AskError, commands: list[Command], wait_ms: int) -> list[Any]:
        """The slot is migrating and the keys are on the importing node: ASKING there,
        then the change and its WAIT (WAIT on the node that wrote)."""
        client: RedisCluster = self.client
        node = client.get_node(host=ask.host, port=ask.port)
        if node is None:
            await client.nodes_manager.initialize()
            return [_RESEND]
        connection = node.acquire_connection()
        try:
            await connection.connect()
            replies = await self._exchange(connection, [("ASKING",), *commands], wait_ms)
        finally:
            node.release(connection)
        replies = replies[1:]
        if any(isinstance(r, _REDIRECTS) for r in replies):
            return [_RESEND]
        return replies

    async def _exchange(self, connection, commands: list[Command], wait_ms: int) -> list[Any]:
        """Send ``commands`` in one write and read every reply; an error reply is returned
        as its exception, in its place. A lost reply raises OutcomeUnknown (the guarded
        connection's doing)."""
        await connection.connect()  # a refused connection is an error before anything is sent
        await connection.send_packed_command(connection.pack_commands(commands))
        replies: list[Any] = []
        last = len(commands) - 1
        for position in range(len(commands)):
            timeout = None
            if position == last:  # WAIT answers after up to timeout_ms
                timeout = wait_ms / 1000 + _READ_MARGIN_S
            try:
                reply = await connection.read_response(timeout=timeout)
            except ResponseError as exc:
                replies.append(exc)
                continue
            if reply is None and timeout is not None:
                # redis-py answers None when a read given its own timeout expires, and
                # leaves the connection as it is: close it, the reply may still come.
                await connection.disconnect()
                raise OutcomeUnknown("WAIT's reply did not arrive in time")
            replies.append(reply)
        return replies

    async def _load(self, key: Any, script: AsyncScript) -> None:
        """Load ``script`` on the node that answered NOSCRIPT (the master of ``key``)."""
        if self.cluster:
            node = self.client.get_node_from_key(key)
            await self.client.execute_command("SCRIPT LOAD", script.script, target_nodes=node)
        else:
            await self.client.script_load(script.script)


class _Resend:
    def __repr__(self) -> str:
        return "RESEND"


_RESEND: Any = _Resend()
_REDIRECTS = (MovedError, AskError, TryAgainError)
