"""Upstream connection reuse: which pooled connection may carry a request, and whether a
request that failed on one may be sent again.

Owns: the `Keep-Alive: timeout=N` rule (a pooled connection is retired before the
upstream's advertised idle timeout), the bound of the wait for a pooled connection
(`pool_timeout`), and the per-request record of whether the connection was reused,
which decides the one retry of a request that failed before any response arrived.

Why: Node closes an idle keep-alive socket about a second after its advertised
`Keep-Alive: timeout=5`. A request written into a pooled socket the upstream is closing
at that moment fails with "server disconnected" although the upstream never saw it;
aiohttp retries that only for idempotent methods, so POSTs got 502 (nginx users know it
as "upstream prematurely closed connection").
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import time
import weakref
from dataclasses import dataclass
from typing import Any

import aiohttp


@dataclass(slots=True)
class Attempt:
    """One request's view of its upstream connection (set by `PoolConnector.connect`)."""

    # The connection came from the pool (so the upstream may have closed it meanwhile).
    reused: bool = False
    # The connection's protocol, so the response's Keep-Alive can be noted on it.
    protocol: Any = None
    # Set for a retry: pooled connections are closed until a new one is opened.
    fresh: bool = False


# Per task: `Proxy.fetch` sets it around one upstream call; the connector fills it in.
ATTEMPT: contextvars.ContextVar[Attempt | None] = contextvars.ContextVar(
    "edge_upstream_attempt", default=None
)


def idle_budget(keep_alive: bytes | str | None) -> float | None:
    """How long a connection may sit idle under the upstream's `Keep-Alive: timeout=N`
    (None: no such parameter). One second of margin: the close and our next request
    cross on the wire, and a server's timer is not ours."""
    if not keep_alive:
        return None
    text = keep_alive.decode("latin-1") if isinstance(keep_alive, bytes) else keep_alive
    for part in text.split(","):
        name, _, value = part.strip().partition("=")
        if name.strip().lower() == "timeout":
            try:
                seconds = float(value.strip().strip('"'))
            except ValueError:
                return None
            if not math.isfinite(seconds) or seconds < 0:
                return None
            return max(0.0, seconds - 1.0)
    return None


class PoolConnector(aiohttp.TCPConnector):
    """A TCPConnector that knows which connections it handed out before, retires them
    by the upstream's Keep-Alive timeout, and opens a fresh one for a retry. Its wait
    for a free connection (all `max_connections` busy) is bounded by `pool_timeout` on
    its own: aiohttp has one `connect` budget for that wait and the TCP connect
    together, so a full pool used to answer 504 only after pool_timeout +
    connect_timeout."""

    def __init__(self, *, pool_timeout: float | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pool_timeout = pool_timeout
        # Protocols handed out at least once → monotonic time after which they must not
        # carry another request (inf: no Keep-Alive timeout advertised).
        self._retire: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()

    async def connect(
        self,
        req: aiohttp.ClientRequest,
        traces: list[Any],
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 - aiohttp's signature
    ) -> aiohttp.connector.Connection:
        attempt = ATTEMPT.get()
        fresh = attempt is not None and attempt.fresh
        while True:
            conn = await super().connect(req, traces, timeout)
            proto = conn.protocol
            if proto is None:
                return conn
            retire_at = self._retire.get(proto)
            if retire_at is not None and (fresh or time.monotonic() >= retire_at):
                # Closed, not pooled: the next round takes another or opens a new one.
                conn.close()
                continue
            if retire_at is None:
                self._retire[proto] = math.inf
            if attempt is not None:
                attempt.reused = retire_at is not None
                attempt.protocol = proto
            return conn

    async def _wait_for_available_connection(self, key: Any, traces: Any) -> None:
        # aiohttp's private hook, where the pool wait happens (pinned by
        # tests/test_proxy.py::test_waiting_for_a_pooled_connection_is_bounded).
        if self.pool_timeout is None:
            await super()._wait_for_available_connection(key, traces)
            return
        try:
            async with asyncio.timeout(self.pool_timeout):
                await super()._wait_for_available_connection(key, traces)
        except TimeoutError:
            raise aiohttp.ConnectionTimeoutError("no free upstream connection") from None

    def note_keep_alive(self, protocol: Any, keep_alive: bytes | str | None) -> None:
        """An answer on `protocol` advertised `Keep-Alive` (timeout=N): retire the
        connection before the upstream closes it."""
        budget = idle_budget(keep_alive)
        if budget is not None and protocol is not None:
            self._retire[protocol] = time.monotonic() + budget


__all__ = ["ATTEMPT", "Attempt", "PoolConnector", "idle_budget"]
