"""HTTP/1 connection limits that uvicorn + httptools do not have.

Owns: `EdgeHttpProtocol`, a small subclass of uvicorn's `HttpToolsProtocol` that the
public and admin listeners run (gateway/server.py), and `sweep_heads`, which the server
calls from its tick to expire slow heads. It adds:

- `server.max_header_bytes`: the request line plus all headers of one request. httptools
  grows a header value by concatenating bytes on every read (quadratic: a 128 MB header
  cost 18 s of CPU), so the bytes are counted *before* they reach the parser, and a read
  that would cross the limit is fed only up to it. A head still incomplete at the limit
  gets `431` JSON and the connection is closed after a short lingering read, so the
  client sees the answer instead of a reset. The cost is one comparison per read.
- `server.header_timeout`: from accept (a connection's first request) or from the first
  byte of a later head, until the end of that head; then the connection is closed.
  Idle time between requests stays uvicorn's keep-alive timeout's. Deadlines are plain
  floats checked by `sweep_heads` twice a second, so the hot path arms no timer.
- `server.limit_concurrency` answered as JSON (uvicorn's own 503 is plain text), and
  uvicorn's plain-text 400 for unparsable requests as JSON too.
- One `write()` for a response whose head and (first) body are sent in the same
  event-loop turn (`_Cork`): uvicorn writes the head and the body separately, and on
  loopback each `write()` syscall costs as much as a third of the request's Python work
  (docs/performance.md). A head whose body is not sent in the same turn (SSE, a slow
  upstream) is written at the start of the next turn, so streaming is not delayed.
- The keep-alive idle timeout (`server.keep_alive_timeout`) as a deadline checked by the
  same sweep, not uvicorn's timer armed after every response and cancelled by the next
  request's first read.
- Each request's cycle is an `EdgeCycle` (gateway/cycle.py): uvicorn's, with the common
  case cheap.
- `scope["extensions"]["edge.client_lost"]` (`ClientLost`): the app can ask to be called
  back when the connection closes before its response is complete, instead of keeping a
  task blocked on `receive()` for that (gateway/proxy/watch.py's `DisconnectWatch`).

A head that starts inside a read that also carried the end of the previous request
(pipelining) is counted from the next read: such a head may exceed the limit by at most
that one read (uvloop reads at most 256 KiB), which keeps the cost linear and the memory
bounded without re-parsing.
"""

from __future__ import annotations

import asyncio
import json
import os
import urllib.parse
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import httptools
import uvicorn
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from gateway.cycle import EdgeCycle
from gateway.http import Receive, Scope, Send, send_error

# After a 431, how long and how much the connection keeps reading (and discarding) before
# it closes: closing with unread data makes the kernel send a reset, and a reset can
# destroy the 431 before the client reads it (nginx's lingering close, bounded).
LINGER_SECONDS = 2.0
LINGER_BYTES = 1024 * 1024
# How often (in uvicorn ticks of 0.1 s) the server checks head deadlines.
SWEEP_TICKS = 5
# The scope extension that carries a request's `ClientLost`.
CLIENT_LOST = "edge.client_lost"
# Above this size the held head and the body go out with writelines (no copy).
_JOIN_LIMIT = 16 * 1024


class ClientLost:
    """One request's hook for the loss of its client connection. `callback` (set by the
    app, cleared when it no longer cares) runs from `connection_lost` when the response
    was not complete; `lost` tells a late registrant that it already happened. This is
    what uvicorn reports as `http.disconnect` to a pending `receive()`, without a task."""

    __slots__ = ("callback", "loop", "lost")

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.callback: Callable[[], None] | None = None
        self.lost = False
        # The connection's loop, so the app can find its task without
        # asyncio.get_running_loop() (on Python 3.11 a getpid() syscall per call).
        self.loop = loop

    def fire(self) -> None:
        self.lost = True
        callback = self.callback
        if callback is not None:
            self.callback = None
            callback()


class _Flusher:
    """The event loop's corks holding a head: one callback at the start of the next turn
    writes them all (a `call_soon` per response was a handle per request)."""

    __slots__ = ("corks", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # Weak: the value of a WeakKeyDictionary must not keep its key alive.
        self.loop = weakref.ref(loop)
        self.corks: list[_Cork] = []

    def add(self, cork: _Cork) -> None:
        if not self.corks:
            self.loop().call_soon(self.run)  # type: ignore[union-attr]
        self.corks.append(cork)

    def run(self) -> None:
        corks, self.corks = self.corks, []
        for cork in corks:
            try:
                cork.flush()
            except Exception as exc:  # one connection's failure must not hold the others'
                loop = self.loop()
                if loop is not None:
                    loop.call_exception_handler(
                        {"message": "writing a held response head", "exception": exc}
                    )


_flushers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Flusher] = (
    weakref.WeakKeyDictionary()
)


def _flusher(loop: asyncio.AbstractEventLoop) -> _Flusher:
    flusher = _flushers.get(loop)
    if flusher is None:
        flusher = _flushers[loop] = _Flusher(loop)
    return flusher


class _Cork:
    """The transport as a request cycle sees it. Once armed (when a cycle starts), the
    next write (the response head) is held; the write after it (the body) goes out
    joined with it in one syscall. Whatever is held is written at the start of the next
    event-loop turn at the latest, or before a close."""

    __slots__ = ("armed", "flusher", "held", "transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self.transport = transport
        self.flusher = _flusher(loop)
        self.held: bytes | None = None
        self.armed = False

    def write(self, data: bytes) -> None:
        held = self.held
        if held is not None:
            self.held = None
            if len(data) <= _JOIN_LIMIT:
                self.transport.write(held + data)
            else:
                self.transport.writelines((held, data))
        elif self.armed:
            self.armed = False
            self.held = data
            self.flusher.add(self)
        else:
            self.transport.write(data)

    def flush(self) -> None:
        held = self.held
        if held is not None:
            self.held = None
            if not self.transport.is_closing():
                self.transport.write(held)

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


@dataclass(frozen=True, slots=True)
class HeadLimits:
    """Per-listener limits on request heads (from `server.*`)."""

    max_header_bytes: int = 32 * 1024
    header_timeout: float = 10.0
    # Tests inject a clock; the default is the event loop's monotonic time.
    clock: Callable[[], float] | None = None


class EdgeConfig(uvicorn.Config):
    """uvicorn's Config plus the head limits the protocol reads."""

    def __init__(self, app: Any, *, head_limits: HeadLimits, **kwargs: Any) -> None:
        super().__init__(app, http=EdgeHttpProtocol, **kwargs)
        self.head_limits = head_limits


def _error_response(status: int, code: str, message: str) -> bytes:
    """A complete `Connection: close` response for errors decided below the ASGI app.
    It carries an X-Request-Id like every other answer (there is no inbound one to keep:
    the head was not accepted)."""
    body = json.dumps({"error": code, "message": message}).encode()
    return b"".join(
        (
            STATUS_LINE[status],
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"x-request-id: " + os.urandom(16).hex().encode() + b"\r\n",
            b"connection: close\r\n\r\n",
            body,
        )
    )


async def _busy(scope: Scope, receive: Receive, send: Send) -> None:
    """`server.limit_concurrency` reached: the gateway's own JSON 503."""
    await send_error(
        send,
        503,
        "overloaded",
        "too many concurrent connections; retry shortly",
        [(b"retry-after", b"1"), (b"connection", b"close")],
    )


class EdgeHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a head size limit, a head timeout and JSON
    answers for the errors decided at this level."""

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: Any,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        limits: HeadLimits = getattr(config, "head_limits", None) or HeadLimits()
        self._max_head = limits.max_header_bytes
        self._head_timeout = limits.header_timeout
        self._clock = limits.clock or self.loop.time
        # True from the end of one request until the end of the next one's head.
        self._in_head = True
        self._head_room = self._max_head
        # When the head in progress must be complete (0.0: no head in progress).
        self._deadline = 0.0
        self._lingering = False
        self._lingered = 0
        self._upgraded = False
        # Heads completed on this connection (tells _overflow whether its slice ended one).
        self._heads = 0
        # uvicorn's own check would answer plain text: do it here instead.
        self._limit = self.limit_concurrency
        self.limit_concurrency = None
        self._app = self.app
        self._cork: _Cork | None = None
        self._lost: ClientLost | None = None
        # When an idle keep-alive connection is closed (0.0: not idle).
        self._idle_until = 0.0
        # The current message is a WebSocket upgrade (its body is not the cycle's).
        self._upgrading = False

    # ------------------------------------------------------------------ transport

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._cork = _Cork(transport, self.loop)
        # A connection's first request is timed from accept: an idle new connection is
        # exactly what slowloris and connection floods hold open.
        self._deadline = self._clock() + self._head_timeout

    def connection_lost(self, exc: Exception | None) -> None:
        lost = self._lost
        cycle = self.cycle
        super().connection_lost(exc)
        # As uvicorn marks the current cycle disconnected: only an incomplete response.
        if lost is not None and cycle is not None and not cycle.response_complete:
            self._lost = None
            lost.fire()

    def _flush(self) -> None:
        """Write a held response head before writing on the transport directly."""
        if self._cork is not None:
            self._cork.flush()

    def shutdown(self) -> None:
        # uvicorn closes an idle connection at once: a head still held goes out first.
        self._flush()
        super().shutdown()

    def data_received(self, data: bytes) -> None:
        self._idle_until = 0.0
        if self._in_head:
            if self._lingering:
                self._linger(len(data))
                return
            if not self._deadline:
                self._deadline = self._clock() + self._head_timeout
            if len(data) > self._head_room:
                self._overflow(data)
                return
            self._head_room -= len(data)
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        """uvicorn's data_received, minus cancelling a keep-alive timer never armed."""
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self.send_400_response(msg)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()

    def _overflow(self, data: bytes) -> None:
        """Feed only as much as the head may still use; whatever follows the end of the
        head (a body, a pipelined request) is fed afterwards as a read of its own."""
        room = self._head_room
        heads = self._heads
        self._head_room = 0
        if room:
            self._feed(data[:room])
        if self._upgraded or self.transport.is_closing():
            return
        if self._heads == heads:
            self._refuse_head()
            return
        self.data_received(data[room:])

    def _refuse_head(self) -> None:
        self._flush()
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined head behind a response still being written: a 431 now would
            # land inside that response.
            self.transport.close()
            return
        self.transport.write(
            _error_response(
                431,
                "header_too_large",
                f"the request line and headers exceed {self._max_head} bytes",
            )
        )
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()
        self._lingering = True
        self._deadline = self._clock() + min(LINGER_SECONDS, self._head_timeout)

    def _linger(self, n: int) -> None:
        self._lingered += n
        if self._lingered > LINGER_BYTES:
            self.transport.close()

    def expire(self, now: float) -> None:
        """Close the connection if its head (or its lingering close) is overdue, or if it
        has been idle between requests for the keep-alive timeout."""
        overdue = (self._deadline and now >= self._deadline) or (
            self._idle_until and now >= self._idle_until
        )
        if overdue and not self.transport.is_closing():
            self._flush()
            self.transport.close()

    def handle_websocket_upgrade(self) -> None:
        self._upgraded = True
        self._deadline = 0.0
        super().handle_websocket_upgrade()

    def send_400_response(self, msg: str) -> None:
        # `msg` is uvicorn's fixed text; the parser's detail is not echoed to the client.
        self._flush()
        self.transport.write(_error_response(400, "bad_request", "invalid HTTP request"))
        self.transport.close()

    # ------------------------------------------------------------------ parser callbacks

    def on_message_begin(self) -> None:
        # uvicorn's, inline (one call less a request).
        self.url = b""
        self.expect_100_continue = False
        self.headers = []
        self.scope = {  # type: ignore[typeddict-item]
            "type": "http",
            "asgi": {"version": self.asgi_version, "spec_version": "2.3"},
            "http_version": "1.1",
            "server": self.server,
            "client": self.client,
            "scheme": self.scheme,  # type: ignore[typeddict-item]
            "root_path": self.root_path,
            "headers": self.headers,
            "state": self.app_state.copy(),
        }
        if not self._deadline:
            self._deadline = self._clock() + self._head_timeout

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._deadline = 0.0
        self._heads += 1
        lost = self._lost = ClientLost(self.loop)
        scope = self.scope
        # uvicorn's scope is typed with the ASGI spec's extensions; this one is the edge's.
        scope["extensions"] = {CLIENT_LOST: lost}  # type: ignore[dict-item]
        parser = self.parser
        http_version = parser.get_http_version()
        scope["method"] = parser.get_method().decode("ascii")
        if http_version != "1.1":
            scope["http_version"] = http_version
        self._upgrading = parser.should_upgrade() and self._should_upgrade()
        if self._upgrading:
            return
        self._set_path(scope)
        limit = self._limit
        busy = limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit)
        # uvicorn types its app with its own scope types; ours is the gateway's Scope.
        app: Any = _busy if busy else self._app
        prev = self.cycle
        cycle = self.cycle = EdgeCycle(
            scope,
            self.transport,
            self.flow,
            self,
            asyncio.Event(),
            self.expect_100_continue,
            http_version != "1.0" and parser.should_keep_alive(),
            self.on_response_complete,
        )
        if prev is None or prev.response_complete:
            # Only a cycle started now is corked (a pipelined one waits its turn).
            if self._cork is not None:
                cycle.transport = self._cork  # type: ignore[assignment]
                self._cork.armed = True
            self._start_asgi_task(cycle, app)
        else:
            self.flow.pause_reading()
            self.pipeline.appendleft((cycle, app))

    def _set_path(self, scope: Any) -> None:
        """path, raw_path and query_string, as uvicorn sets them."""
        # Any: httptools' stub types `query` as bytes, and it is None without a query (a
        # build compiled with mypyc checks declared types, and failed there).
        parsed: Any = httptools.parse_url(self.url)
        raw_path: bytes = parsed.path
        path = raw_path.decode("ascii")
        if "%" in path:
            path = urllib.parse.unquote(path)
        scope["path"] = self.root_path + path
        scope["raw_path"] = self.root_path.encode("ascii") + raw_path
        scope["query_string"] = parsed.query or b""

    def on_response_complete(self) -> None:
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        else:
            # Idle from now: `expire` closes the connection after the keep-alive timeout.
            self._idle_until = self._clock() + self.timeout_keep_alive

    def on_body(self, body: bytes) -> None:
        # uvicorn's, with the upgrade decided once in on_headers_complete.
        cycle = self.cycle
        if self._upgrading or cycle.response_complete:
            return
        cycle.body += body
        if len(cycle.body) > HIGH_WATER_LIMIT:
            self.flow.pause_reading()
        cycle.message_event.set()

    def on_message_complete(self) -> None:
        cycle = self.cycle
        if not self._upgrading:
            if not cycle.response_complete:
                cycle.more_body = False
                cycle.message_event.set()
            elif not self.pipeline:
                # Answered before its body was all read (an early 401 or 413): the rest
                # of the body cleared the idle deadline, so it starts again here
                # (uvicorn's timer, cancelled by the same reads, never came back).
                self._idle_until = self._clock() + self.timeout_keep_alive
        # The next byte on this connection starts the next head.
        self._in_head = True
        self._head_room = self._max_head


def sweep_heads(connections: Iterable[Any]) -> None:
    """Expire overdue heads; called by the server a few times a second."""
    for conn in list(connections):
        if isinstance(conn, EdgeHttpProtocol):
            conn.expire(conn._clock())
