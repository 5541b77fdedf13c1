"""Upstream connection reuse: which pooled connection may carry a request, and how long
a request waits for one.

Owns: `ConnectionPool`, the keep-alive pool of one upstream for the proxy's own client
(gateway/proxy/client.py): `max_connections`, the bound of the wait for a free connection
(`pool_timeout`), the TCP/TLS connect and its `connect_timeout`, idle connections closed
after `keepalive_timeout`, and the `Keep-Alive: timeout=N` rule (a connection is retired
N - 1 s after the answer that advertised it). Also `PoolConnector`, the same wait bound
for the aiohttp session that carries WebSockets and the heartbeat flush.

Why the Keep-Alive rule: Node closes an idle keep-alive socket about a second after its
advertised `Keep-Alive: timeout=5`. A request written into a pooled socket the upstream
is closing at that moment fails although the upstream never saw it (nginx users know it
as "upstream prematurely closed connection"); the proxy sends such a request once more
on a new connection (`Proxy._send`), and retiring connections early makes that rare.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from typing import Any

import aiohttp

from gateway.proxy.client import UpstreamConnection, idle_budget
from gateway.proxy.errors import ConnectFailed, ConnectTimeout


class ConnectionPool:
    """Keep-alive connections to one upstream (host, port, TLS or not)."""

    def __init__(
        self,
        host: str,
        port: int,
        tls: ssl.SSLContext | None,
        *,
        limit: int,
        pool_timeout: float,
        connect_timeout: float,
        keepalive_timeout: float,
    ) -> None:
        self.host = host
        self.port = port
        self.tls = tls
        self.limit = limit
        self.pool_timeout = pool_timeout
        self.connect_timeout = connect_timeout
        self.keepalive_timeout = keepalive_timeout
        # Most recently used last: reused first, so the others age out.
        self.idle: list[UpstreamConnection] = []
        # Open or opening connections, idle or busy (at most `limit`).
        self.size = 0
        self.waiters: deque[asyncio.Future[None]] = deque()
        self.sweeper: asyncio.TimerHandle | None = None
        self.closed = False
        # Made in the loop that uses it (Upstream.open); asking for the running loop is
        # a getpid() per call on Python 3.11.
        self.loop = asyncio.get_running_loop()

    async def acquire(self, fresh: bool = False) -> UpstreamConnection:
        """A connection for one request: a pooled one still fit to carry it, else a new
        one (`fresh`: always a new one, for the resend of a request a reused connection
        dropped). Raises ConnectTimeout or ConnectFailed."""
        while True:
            if not fresh:
                now = self.loop.time()
                while self.idle:
                    conn = self.idle.pop()
                    if self._fit(conn, now):
                        conn.reused = True
                        return conn
                    conn.abort()
            if self.size < self.limit:
                self.size += 1
                return await self._connect()
            if fresh and self.idle:
                self.idle.pop(0).abort()  # makes room for the new one
                continue
            await self._wait()

    def _fit(self, conn: UpstreamConnection, now: float) -> bool:
        return (
            not conn.closed
            and now < conn.retire_at
            and now - conn.idle_since < self.keepalive_timeout
        )

    async def _connect(self) -> UpstreamConnection:
        conn = UpstreamConnection(self)
        conn.counted = True
        try:
            async with asyncio.timeout(self.connect_timeout):
                await self.loop.create_connection(
                    lambda: conn,
                    self.host,
                    self.port,
                    ssl=self.tls,
                    server_hostname=self.host if self.tls is not None else None,
                )
        except TimeoutError:
            self.forget(conn)
            raise ConnectTimeout() from None
        except OSError as exc:
            self.forget(conn)
            raise ConnectFailed(str(exc)) from None
        except BaseException:
            self.forget(conn)
            raise
        return conn

    async def _wait(self) -> None:
        """Wait for a connection to come back or close (bounded by pool_timeout)."""
        waiter = self.loop.create_future()
        self.waiters.append(waiter)
        try:
            async with asyncio.timeout(self.pool_timeout):
                await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self._wake()  # woken, but leaving anyway: pass the turn on
            if isinstance(exc, TimeoutError):
                raise ConnectTimeout("no free upstream connection") from None
            raise

    def _wake(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def release(self, conn: UpstreamConnection) -> None:
        """A connection whose answer was read whole, fit for another request."""
        if self.closed or conn.closed:
            conn.abort()
            return
        conn.idle_since = self.loop.time()
        self.idle.append(conn)
        if self.sweeper is None:
            self.sweeper = self.loop.call_later(self.keepalive_timeout, self._sweep)
        self._wake()

    def forget(self, conn: UpstreamConnection) -> None:
        """The connection leaves the pool (closed or closing): its slot is free."""
        if conn.counted:
            conn.counted = False
            self.size -= 1
            if conn in self.idle:
                self.idle.remove(conn)
            self._wake()

    def _sweep(self) -> None:
        """Close idle connections past their keep-alive (a connection that is never
        asked for again must not stay open)."""
        self.sweeper = None
        now = self.loop.time()
        for conn in [c for c in self.idle if not self._fit(c, now)]:
            conn.abort()
        if self.idle:
            self.sweeper = self.loop.call_later(self.keepalive_timeout, self._sweep)

    def close(self) -> None:
        self.closed = True
        if self.sweeper is not None:
            self.sweeper.cancel()
            self.sweeper = None
        for conn in list(self.idle):
            conn.abort()
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_exception(ConnectFailed("upstream pool closed"))


class PoolConnector(aiohttp.TCPConnector):
    """A TCPConnector whose wait for a free connection (all `max_connections` busy) is
    bounded by `pool_timeout` on its own: aiohttp has one `connect` budget for that wait
    and the TCP connect together, so a full pool would answer only after pool_timeout +
    connect_timeout."""

    def __init__(self, *, pool_timeout: float | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pool_timeout = pool_timeout

    async def _wait_for_available_connection(self, key: Any, traces: Any) -> None:
        # aiohttp's private hook, where the pool wait happens.
        if self.pool_timeout is None:
            await super()._wait_for_available_connection(key, traces)
            return
        try:
            async with asyncio.timeout(self.pool_timeout):
                await super()._wait_for_available_connection(key, traces)
        except TimeoutError:
            raise aiohttp.ConnectionTimeoutError("no free upstream connection") from None


__all__ = ["ConnectionPool", "PoolConnector", "idle_budget"]
