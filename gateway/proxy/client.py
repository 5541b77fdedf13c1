"""The upstream HTTP/1.1 client: one connection as an asyncio protocol, httptools parsing
the answer.

Owns: writing a request (head and a small body in one write; a streamed body with
Content-Length or chunked framing, paced by the transport's flow control), reading the
answer (1xx skipped; bodies framed by Content-Length, chunked, or the connection's close;
none for HEAD, 204 and 304), the read timeout (time spent waiting for the upstream, not
for a slow client), and whether the connection may carry another request. Failures are
raised as `UpstreamError` subclasses (gateway/proxy/errors.py), classified here where they
happen.

Why not aiohttp's ClientSession: per request it builds request and response objects,
copies header multidicts twice and re-arms timers per read, 50-75 µs of CPU against
8-12 µs for this (docs/performance.md). aiohttp still carries WebSockets and the
heartbeat flush.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from typing import TYPE_CHECKING

import httptools

from gateway.http import Headers
from gateway.proxy.body import Body, BodyStream
from gateway.proxy.errors import ConnectionDropped, ReadTimeout, UpstreamError

if TYPE_CHECKING:
    from gateway.proxy.pool import ConnectionPool

# Past this many unread body bytes the connection stops reading from the upstream until
# the client has taken some (the client's pace bounds the gateway's memory).
_HIGH_WATER = 256 * 1024
_LOW_WATER = 64 * 1024
# Response head bytes accepted from the upstream before the answer is refused as broken.
_MAX_HEAD = 64 * 1024
_NO_BODY_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"CONNECT"})


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


def request_head(
    method: bytes, target: bytes, headers: Headers, body: Body, length: int | None
) -> bytes:
    """The request line and headers, framing included (as aiohttp frames them: a body-less
    POST says Content-Length: 0, a stream without a length goes chunked)."""
    parts = [method, b" ", target, b" HTTP/1.1\r\n"]
    for k, v in headers:
        parts += (k, b": ", v, b"\r\n")
    if length is not None:
        parts += (b"Content-Length: ", b"%d" % length, b"\r\n\r\n")
    elif isinstance(body, BodyStream):
        parts.append(b"Transfer-Encoding: chunked\r\n\r\n")
    elif body is None and method not in _NO_BODY_METHODS:
        parts.append(b"Content-Length: 0\r\n\r\n")
    else:
        parts.append(b"\r\n")
    return b"".join(parts)


class UpstreamResponse:
    """An answer whose head has arrived; `read()` yields its body as it comes."""

    __slots__ = ("chunks", "conn", "eof", "error", "headers", "size", "status", "waiter")

    def __init__(self, conn: UpstreamConnection) -> None:
        self.conn = conn
        self.status = 0
        self.headers: Headers = []
        self.chunks: deque[bytes] = deque()
        self.size = 0
        self.eof = False
        self.error: UpstreamError | None = None
        self.waiter: asyncio.Future[None] | None = None

    def at_eof(self) -> bool:
        return self.eof and not self.chunks

    async def read(self) -> bytes:
        """What has arrived (waiting for some if nothing has); b"" at the end."""
        while not self.chunks:
            if self.error is not None:
                raise self.error
            if self.eof:
                return b""
            self.waiter = self.conn.loop.create_future()
            self.conn.wait_start = self.conn.loop.time()
            try:
                await self.waiter
            finally:
                self.waiter = None
        chunks = self.chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.size = 0
        if self.conn.reading_paused:
            self.conn.resume_reading()
        return data

    def release(self) -> None:
        """Done with the answer: a whole one frees its connection for the next request,
        anything else closes it."""
        self.conn.finish(self.at_eof() and self.error is None)

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection to an upstream, carrying one request at a time."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        # Carried a request before (so the upstream may have closed it while idle).
        self.reused = False
        self.retire_at = math.inf
        self.idle_since = 0.0
        # Counted in the pool's size (cleared exactly once, when it leaves the pool).
        self.counted = False
        self.reading_paused = False
        self.drain: asyncio.Future[None] | None = None
        self.write_paused = False
        self._reset(None, 0.0)

    def _reset(self, resp: UpstreamResponse | None, read_timeout: float) -> None:
        self.resp = resp
        self.head: asyncio.Future[UpstreamResponse] | None = None
        # An exchange is under way: bytes from the upstream belong to its answer.
        self.active = False
        self.read_timeout = read_timeout
        self.wait_start: float | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.received = False
        self.head_bytes = 0
        self.headers: Headers = []
        self.is_head = False
        self.sent_whole = False
        self.keep_alive = False
        self.until_close = False

    # ------------------------------------------------------------------ the exchange

    async def exchange(
        self, head: bytes, body: Body, is_head: bool, read_timeout: float
    ) -> UpstreamResponse:
        """Send one request; return once the answer's head has arrived."""
        resp = UpstreamResponse(self)
        self._reset(resp, read_timeout)
        self.is_head = is_head
        answer: asyncio.Future[UpstreamResponse] = self.loop.create_future()
        self.head = answer
        self.active = True
        transport = self.transport
        assert transport is not None
        if isinstance(body, BodyStream):
            transport.write(head)
            await self._send_stream(body, answer)
        else:
            transport.write(head + body if body else head)
            self.sent_whole = True
        if not answer.done():
            self.wait_start = self.loop.time()
            self.timer = self.loop.call_at(self.wait_start + read_timeout, self._on_timer)
        return await answer

    async def _send_stream(
        self, body: BodyStream, answer: asyncio.Future[UpstreamResponse]
    ) -> None:
        chunked = body.length is None
        transport = self.transport
        assert transport is not None
        async for chunk in body:
            if answer.done():
                return  # answered (or failed) before the upload ended: stop sending
            transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
            if self.write_paused:
                await self._drained(answer)
        if answer.done():
            return
        if chunked:
            transport.write(b"0\r\n\r\n")
        self.sent_whole = True

    async def _drained(self, answer: asyncio.Future[UpstreamResponse]) -> None:
        self.drain = self.loop.create_future()
        try:
            await self.drain
        finally:
            self.drain = None
        if self.closed and not answer.done():
            raise self._lost_error()

    def finish(self, whole: bool) -> None:
        """The answer was read whole (reuse the connection if the upstream allows) or
        not (close it: the rest of it would be read as the next answer)."""
        if self.timer is not None:
            self.timer.cancel()
        reusable = whole and self.keep_alive and self.sent_whole and not self.closed
        self._reset(None, 0.0)
        if reusable:
            self.pool.release(self)
        else:
            self.abort()

    def abort(self) -> None:
        """Close now. Whoever aborts has already said what failed (or no one waits)."""
        self.active = False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.pool.forget(self)
        if self.transport is not None and not self.closed:
            self.transport.abort()

    # ------------------------------------------------------------------ timeouts

    def _on_timer(self) -> None:
        """The read timeout: fires once per exchange at the earliest due time, and
        re-arms itself while the wait keeps being interrupted by data or by the client
        not reading."""
        self.timer = None
        if self.closed or not self.active:
            return
        start = self.wait_start
        now = self.loop.time()
        if start is None:  # not waiting for the upstream now
            self.timer = self.loop.call_at(now + self.read_timeout, self._on_timer)
            return
        due = start + self.read_timeout
        if now + 0.001 < due:
            self.timer = self.loop.call_at(due, self._on_timer)
            return
        self._fail(ReadTimeout())
        self.abort()

    def _fail(self, exc: UpstreamError) -> None:
        head = self.head
        if head is not None and not head.done():
            head.set_exception(exc)
            return
        resp = self.resp
        if resp is not None and not resp.eof and resp.error is None:
            resp.error = exc
            resp.wake()

    def _lost_error(self) -> UpstreamError:
        # Nothing of an answer on a connection that carried requests before: the
        # upstream closed it while idle and never saw this request.
        return ConnectionDropped(stale=self.reused and not self.received)

    # ------------------------------------------------------------------ protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        if self.drain is not None and not self.drain.done():
            self.drain.set_result(None)
        resp = self.resp
        if not self.active:
            pass
        elif self.until_close and resp is not None and self.head is not None and self.head.done():
            # An answer without Content-Length or chunked framing ends with the connection.
            resp.eof = True
            resp.wake()
        else:
            self._fail(self._lost_error())
        if self.timer is not None:
            self.timer.cancel()

    def data_received(self, data: bytes) -> None:
        if not self.active:
            # Bytes while idle (or after a HEAD's answer) belong to no request: the
            # connection's framing is lost.
            self.abort()
            return
        self.received = True
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            self._fail(ConnectionDropped("invalid response from upstream"))
            self.abort()
            return
        if self.head is not None and not self.head.done():
            self.head_bytes += len(data)
            if self.head_bytes > _MAX_HEAD:
                self._fail(ConnectionDropped("upstream response head too large"))
                self.abort()
                return
            self.wait_start = self.loop.time()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.drain is not None and not self.drain.done():
            self.drain.set_result(None)

    def resume_reading(self) -> None:
        self.reading_paused = False
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    # ------------------------------------------------------------------ httptools

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        head = self.head
        resp = self.resp
        if head is None or resp is None or head.done():
            return
        if 100 <= status < 200:
            self.headers = []  # informational (103 Early Hints): the answer follows
            return
        resp.status = status
        resp.headers = self.headers
        framed = status in (204, 304)
        for k, v in self.headers:
            lk = k.lower()
            if lk == b"content-length" or lk == b"transfer-encoding":
                framed = True
            elif lk == b"keep-alive":
                budget = idle_budget(v)
                if budget is not None:
                    self.retire_at = self.loop.time() + budget
        if self.is_head:
            # No body follows, whatever the head says. llhttp cannot be told so: the
            # next answer gets a fresh parser.
            self.keep_alive = self.parser.should_keep_alive()
            self.parser = httptools.HttpResponseParser(self)
            resp.eof = True
            self.active = False
        else:
            self.until_close = not framed
        self.wait_start = None
        head.set_result(resp)

    def on_body(self, body: bytes) -> None:
        resp = self.resp
        if resp is None or not self.active:
            return
        resp.chunks.append(body)
        resp.size += len(body)
        self.wait_start = None
        if resp.size > _HIGH_WATER and not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()
        resp.wake()

    def on_message_complete(self) -> None:
        resp = self.resp
        if resp is None or not self.active or self.head is None or not self.head.done():
            return  # a 1xx answer's end
        self.keep_alive = self.parser.should_keep_alive() and not self.until_close
        resp.eof = True
        self.active = False
        self.wait_start = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        resp.wake()


__all__ = ["UpstreamConnection", "UpstreamResponse", "idle_budget", "request_head"]
