"""The script calls' own way to one Redis server, past redis-py's per-command machinery.

Owns: `ScriptLane`, the connections that carry the EVALSHA calls (one, or several
pipelined in one write) of the one-server and the Sentinel stores (RedisStore.lane; a
cluster's calls keep redis-py's routing). Every hot path of the gateway ends in a script call
(heartbeat record, rate-limit GCRA, refresh, cache), and redis-py's `execute_command`
spent ~115-130 µs of Python on one EVALSHA (docs/performance.md, ninth session): the
pool's lock and observability counters, the retry wrapper (the store allows no retries),
the pure-Python command packer, a `wait_for` around the write and a timeout context around
the read (the store's CallBudget already bounds the whole call), response callbacks.

The lane keeps what matters from redis-py: its Connection (connect, HELLO/AUTH, SELECT,
TLS, unix sockets, the hiredis reader, error replies as ResponseError/NoScriptError), made
from the pool's own class and arguments, so a URL means the same here. Around it, only:

- at most `size` connections; a caller finding none free waits in line, inside its
  budget (the store's `store.timeout`), and gets the next one released;
- hiredis's C packer (the one redis-py's synchronous client uses);
- a connection whose call did not end cleanly (cancelled by the budget, a connection
  error, a reply that did not parse) is closed and never reused: a reply may still be on
  its way. An error *reply* leaves it good. One found closed by the server while idle
  (a Redis restart) is replaced before the call is sent, as redis-py's pool does.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Sequence
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, ResponseError

# One command: the arguments of one EVALSHA (name included).
Command = Sequence[Any]


def pack(commands: Sequence[Command]) -> bytes:
    """The RESP bytes of `commands`, byte for byte what redis-py's packer writes."""
    try:
        return b"".join([hiredis.pack_command(tuple(c)) for c in commands])
    except TypeError as exc:  # a bool or None argument: redis-py's error for it
        raise DataError(str(exc)) from None


class ScriptLane:
    """Connections for script calls to the server of `pool` (whose class and arguments
    make them), at most `size` at once."""

    def __init__(
        self,
        pool: aioredis.ConnectionPool,
        size: int,
        *,
        drop_idle_on_failure: bool = False,
    ) -> None:
        # No socket timeouts: the store's CallBudget bounds (and cancels) every call.
        kwargs = {**pool.connection_kwargs, "socket_timeout": None}
        cls: Any = pool.connection_class  # redis-py's connect() is untyped
        self._make: Callable[[], Any] = lambda: cls(**kwargs)
        # hiredis encodes str as strict UTF-8: a URL that asks for another encoding keeps
        # redis-py's packer (an unconnected connection's, with the pool's encoder).
        self._pack: Callable[[Sequence[Command]], bytes] = pack
        if (kwargs.get("encoding", "utf-8"), kwargs.get("encoding_errors", "strict")) != (
            "utf-8",
            "strict",
        ):
            proto = self._make()
            self._pack = lambda cmds: b"".join(
                bytes(part) for c in cmds for part in proto.pack_command(*c)
            )
        self.size = size
        # Sentinel: a call that failed suggests the master is gone, and so are the idle
        # connections to it; the next call connects afresh, asking the sentinels, instead
        # of spending a budget on each idle one (redis-py's pool reconnects the same way).
        self._drop_idle = drop_idle_on_failure
        self._free: list[AbstractConnection] = []
        self._open = 0  # connections that exist or are being made
        # Callers waiting for a connection: each gets one, or None (= make one).
        self._line: collections.deque[asyncio.Future[AbstractConnection | None]] = (
            collections.deque()
        )
        self._closing: set[asyncio.Future[None]] = set()  # disconnects under way
        self._closed = False

    async def call(self, commands: Sequence[Command]) -> list[Any]:
        """Send `commands` in one write and read their replies in order: each reply, or
        the ResponseError the server answered for that command alone."""
        data = self._pack(commands)
        conn = await self._take()
        clean = False
        try:
            await conn.send_packed_command(data, check_health=False)
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(await conn.read_response())
                except ResponseError as exc:
                    replies.append(exc)
            clean = True
            return replies
        finally:
            self._give(conn, clean)

    async def one(self, command: Command) -> Any:
        """One command's reply; an error reply (ResponseError, NoScriptError) raised."""
        (reply,) = await self.call([command])
        if isinstance(reply, Exception):
            raise reply
        return reply

    async def close(self) -> None:
        """Close every connection: the free ones now, the ones in use when their call
        ends; callers in line (and later ones) get redis-py's ConnectionError (an
        outage). Never raises: a server that does not answer the close does not keep
        the rest open."""
        self._closed = True
        while self._line:
            waiter = self._line.popleft()
            if not waiter.done():
                waiter.set_exception(RedisConnectionError("the store is closed"))
        self._drop_free()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    # ------------------------------------------------------------ connections

    async def _take(self) -> AbstractConnection:
        conn: AbstractConnection | None
        if self._closed:
            raise RedisConnectionError("the store is closed")
        while self._free:
            conn = self._free.pop()
            if _usable(conn):
                return conn
            self._open -= 1
            self._discard(conn)
        if self._open < self.size:
            self._open += 1
            return await self._connect()
        waiter: asyncio.Future[AbstractConnection | None]
        waiter = asyncio.get_running_loop().create_future()
        self._line.append(waiter)
        try:
            conn = await waiter
        except asyncio.CancelledError:
            # Handed something just as the budget ran out: pass it on.
            if waiter.done() and not waiter.cancelled():
                self._pass_on(waiter.result())
            raise
        return conn if conn is not None else await self._connect()

    async def _connect(self) -> AbstractConnection:
        """Make a connection in a slot already counted in `_open`."""
        conn: Any = self._make()
        try:
            await conn.connect()
        except BaseException:
            self._pass_on(None)
            await conn.disconnect(nowait=True)
            raise
        made: AbstractConnection = conn
        return made

    def _give(self, conn: AbstractConnection, clean: bool) -> None:
        if clean:
            self._pass_on(conn)
            return
        # The reply may still come: nobody may read it as theirs.
        self._discard(conn)
        self._pass_on(None)
        if self._drop_idle:
            self._drop_free()

    def _drop_free(self) -> None:
        free, self._free = self._free, []
        self._open -= len(free)
        for conn in free:
            self._discard(conn)

    def _discard(self, conn: AbstractConnection) -> None:
        task = asyncio.ensure_future(conn.disconnect(nowait=True))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _pass_on(self, conn: AbstractConnection | None) -> None:
        """A connection (or, None, its slot) to the first in line, or back."""
        while self._line:
            waiter = self._line.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        if conn is None:
            self._open -= 1
        elif self._closed:
            self._open -= 1
            self._discard(conn)
        else:
            self._free.append(conn)


def _usable(conn: AbstractConnection) -> bool:
    """False when the server closed or reset it while it sat idle (redis-py's pool finds
    a close with a read before it hands a connection out; the stream's EOF flag and its
    error say the same without one)."""
    reader = getattr(conn, "_reader", None)
    return reader is not None and not reader.at_eof() and reader.exception() is None
