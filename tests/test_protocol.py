"""gateway/protocol.py driven directly: bytes in, answer out, through a fake transport and
an injected clock (the socket-level behaviour is in tests/test_edge_attacks.py)."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import weakref
from typing import Any

import pytest
import uvicorn
from uvicorn.server import ServerState

from gateway.http import Receive, Scope, Send, send_json
from gateway.protocol import (
    CLIENT_LOST,
    LINGER_BYTES,
    EdgeConfig,
    EdgeHttpProtocol,
    HeadLimits,
    _flusher,
    sweep_heads,
)
from tests.fakes.clock import FakeClock
from tests.fakes.transport import FakeTransport

LIMIT = 4096


class Recorder:
    """An ASGI app that answers 200 with the head it saw."""

    def __init__(self) -> None:
        self.scopes: list[Scope] = []
        self.done = asyncio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scopes.append(scope)
        more = True
        while more:
            msg = await receive()
            more = msg.get("more_body", False)
        await send_json(send, 200, b"{}")
        self.done.set()


class CountingParser:
    """Wraps the httptools parser to count the bytes it is fed (the quadratic cost is in
    the parser, so what matters is that it never sees more than the limit)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.fed = 0

    def feed_data(self, data: bytes) -> None:
        self.fed += len(data)
        self.inner.feed_data(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def connect(
    app: Any = None,
    *,
    clock: FakeClock | None = None,
    limit: int = LIMIT,
    timeout: float = 10.0,
    limit_concurrency: int | None = None,
    keep_alive: int = 75,
) -> tuple[EdgeHttpProtocol, FakeTransport, CountingParser, ServerState]:
    cfg = EdgeConfig(
        app or Recorder(),
        head_limits=HeadLimits(limit, timeout, clock or FakeClock()),
        loop="none",
        log_config=None,
        lifespan="off",
        limit_concurrency=limit_concurrency,
        timeout_keep_alive=keep_alive,
    )
    state = ServerState()
    proto = EdgeHttpProtocol(cfg, state, {})
    parser = CountingParser(proto.parser)
    proto.parser = parser  # type: ignore[assignment]
    transport = FakeTransport()
    proto.connection_made(transport)
    return proto, transport, parser, state


def head(size: int) -> bytes:
    """A GET head of exactly `size` bytes (request line, Host, one padding header)."""
    base = b"GET /x HTTP/1.1\r\nHost: a\r\nX-Pad: \r\n\r\n"
    return base.replace(b"X-Pad: ", b"X-Pad: " + b"p" * (size - len(base)))


def later(clock: FakeClock, state: ServerState, seconds: float) -> None:
    """Move the clock, then run the server's sweep of head and idle deadlines."""
    clock.advance(seconds)
    sweep_heads(state.connections)


def body_of(transport: FakeTransport) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(bytes(transport.written).split(b"\r\n\r\n", 1)[1])
    return doc


async def test_a_head_exactly_at_the_limit_is_served() -> None:
    app = Recorder()
    proto, transport, _, _ = connect(app)
    data = head(LIMIT)
    for i in range(0, len(data), 100):  # many small reads
        proto.data_received(data[i : i + 100])
    await asyncio.wait_for(app.done.wait(), 5)
    assert transport.status() == 200


async def test_one_byte_over_is_431_json_and_the_parser_never_sees_more() -> None:
    proto, transport, parser, _ = connect()
    data = head(LIMIT + 1)
    for i in range(0, len(data), 1000):
        proto.data_received(data[i : i + 1000])
    assert transport.status() == 431
    doc = body_of(transport)
    assert doc["error"] == "header_too_large"
    assert str(LIMIT) in doc["message"]
    assert b"connection: close" in transport.written
    assert b"x-request-id: " in transport.written
    assert parser.fed == LIMIT
    # Lingering: the answer is out and the write side shut; the rest is read and dropped.
    assert transport.eof_written and not transport.closed


async def test_a_huge_header_costs_only_the_limit_then_the_connection_closes() -> None:
    proto, transport, parser, _ = connect()
    proto.data_received(b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: ")
    chunk = b"x" * 65536
    reads = 0
    while not transport.closed:
        proto.data_received(chunk)
        reads += 1
        assert reads < 1000, "the connection was never closed"
    assert transport.status() == 431
    assert parser.fed == LIMIT
    # Closed once the lingering read passed its byte bound, long before 64 MB.
    assert reads * len(chunk) <= LINGER_BYTES + 2 * len(chunk)


async def test_head_and_body_in_one_read_counts_only_the_head() -> None:
    app = Recorder()
    proto, transport, _, _ = connect(app)
    body = b"b" * (3 * LIMIT)
    proto.data_received(
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    )
    await asyncio.wait_for(app.done.wait(), 5)
    assert transport.status() == 200


async def test_the_limit_is_per_request_on_a_keep_alive_connection() -> None:
    app = Recorder()
    proto, transport, _, _ = connect(app)
    for _ in range(3):
        app.done.clear()
        transport.written.clear()
        proto.data_received(head(LIMIT - 10))
        await asyncio.wait_for(app.done.wait(), 5)
        assert transport.status() == 200
    transport.written.clear()
    proto.data_received(head(LIMIT + 10))
    assert transport.status() == 431


async def test_an_idle_new_connection_is_closed_at_the_header_timeout() -> None:
    clock = FakeClock()
    proto, transport, _, state = connect(clock=clock, timeout=10)
    state.connections.add(proto)
    later(clock, state, 9.9)
    assert not transport.closed
    later(clock, state, 0.2)
    assert transport.closed
    assert transport.written == b""  # closed, not answered


async def test_a_slow_head_is_closed_even_while_bytes_keep_coming() -> None:
    clock = FakeClock()
    proto, transport, _, state = connect(clock=clock, timeout=10)
    state.connections.add(proto)
    proto.data_received(b"GET / HTTP/1.1\r\n")
    for _ in range(11):  # slowloris: one header line a second
        clock.advance(1)
        proto.data_received(b"X-A: b\r\n")
        sweep_heads(state.connections)
    assert transport.closed


async def test_keep_alive_idle_is_not_the_header_timeout_and_the_next_head_is_timed() -> None:
    clock = FakeClock()
    app = Recorder()
    proto, transport, _, state = connect(app, clock=clock, timeout=10)
    state.connections.add(proto)
    proto.data_received(head(200))
    await asyncio.wait_for(app.done.wait(), 5)
    # Idle between requests: the keep-alive timeout (75 s here), not the head's 10 s.
    later(clock, state, 60)
    assert not transport.closed
    # The next head is timed from its first byte.
    proto.data_received(b"GET /y HTTP/1.1\r\nHost: a\r\n")
    later(clock, state, 9)
    assert not transport.closed
    later(clock, state, 2)
    assert transport.closed


async def test_an_idle_keep_alive_connection_is_closed_after_the_keep_alive_timeout() -> None:
    clock = FakeClock()
    app = Recorder()
    proto, transport, _, state = connect(app, clock=clock, timeout=10, keep_alive=30)
    state.connections.add(proto)
    proto.data_received(head(200))
    await asyncio.wait_for(app.done.wait(), 5)
    later(clock, state, 29)
    assert not transport.closed
    # A new request restarts the idle clock from the end of its response.
    app.done.clear()
    proto.data_received(head(200))
    await asyncio.wait_for(app.done.wait(), 5)
    later(clock, state, 29)
    assert not transport.closed
    later(clock, state, 2)
    assert transport.closed
    assert transport.written.count(b"HTTP/1.1 200") == 2


async def test_a_request_in_progress_is_not_timed_out() -> None:
    """The timeout covers the head only: a slow upload or a long response is not cut."""
    clock = FakeClock()
    app = Recorder()
    proto, transport, _, state = connect(app, clock=clock, timeout=10)
    state.connections.add(proto)
    proto.data_received(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n12345")
    later(clock, state, 600)
    assert not transport.closed
    proto.data_received(b"67890")
    await asyncio.wait_for(app.done.wait(), 5)
    assert transport.status() == 200


async def test_an_early_answer_then_the_rest_of_the_body_still_times_out_idle() -> None:
    """An app that answers before reading the body (an early 401 or 413): the rest of
    the body arrives after the response, and the connection is then idle like any
    other (uvicorn's own timer was cancelled by those reads and never re-armed)."""

    async def early(scope: Scope, receive: Receive, send: Send) -> None:
        await send_json(send, 401, b"{}")

    clock = FakeClock()
    proto, transport, _, state = connect(early, clock=clock, keep_alive=30)
    state.connections.add(proto)
    proto.data_received(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n12345")
    for _ in range(100):
        if transport.status() is not None:
            break
        await asyncio.sleep(0)  # let the answering task run (no wall-clock wait)
    assert transport.status() == 401
    proto.data_received(b"67890")
    later(clock, state, 29)
    assert not transport.closed
    later(clock, state, 2)
    assert transport.closed


async def test_an_unparsable_request_is_logged_and_answered_400(
    caplog: pytest.LogCaptureFixture,
) -> None:
    proto, transport, _, _ = connect()
    with caplog.at_level(logging.WARNING, logger="uvicorn.error"):
        proto.data_received(b"GET /x HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n")
    assert transport.status() == 400
    assert body_of(transport)["error"] == "bad_request"
    assert transport.closed
    assert "Invalid HTTP request received." in caplog.text


def test_the_head_flusher_does_not_keep_a_closed_loop_alive() -> None:
    loop = asyncio.new_event_loop()
    _flusher(loop)
    ref = weakref.ref(loop)
    loop.close()
    del loop
    gc.collect()
    assert ref() is None


async def test_over_limit_concurrency_is_503_json() -> None:
    proto, transport, _, state = connect(limit_concurrency=1)
    state.connections.add(proto)
    proto.data_received(head(100))
    for _ in range(100):
        if transport.closed:
            break
        await asyncio.sleep(0)  # let the answering task run (no wall-clock wait)
    assert transport.status() == 503
    assert body_of(transport)["error"] == "overloaded"
    assert b"retry-after: 1" in transport.written


async def test_unparsable_request_is_400_json() -> None:
    proto, transport, _, _ = connect()
    proto.data_received(b"GET / HTTP/1.1\r\nBad Header\r\n\r\n")
    assert transport.status() == 400
    assert body_of(transport) == {"error": "bad_request", "message": "invalid HTTP request"}
    assert transport.closed


def test_the_uvicorn_config_runs_this_protocol() -> None:
    cfg = EdgeConfig(Recorder(), head_limits=HeadLimits(), loop="none", log_config=None)
    cfg.load()
    assert cfg.http_protocol_class is EdgeHttpProtocol
    assert isinstance(cfg, uvicorn.Config)


# ---------------------------------------------------------------- one write per response


class Streamer:
    """An ASGI app that sends its head, then its body only when `release` is set."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.done = asyncio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await self.release.wait()
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": False})
        self.done.set()


async def test_a_head_and_body_sent_in_one_turn_leave_in_one_write() -> None:
    app = Recorder()
    proto, transport, _, _ = connect(app)
    proto.data_received(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    await asyncio.wait_for(app.done.wait(), 5)
    assert len(transport.writes) == 1
    assert transport.writes[0].startswith(b"HTTP/1.1 200 ")
    assert transport.writes[0].endswith(b"\r\n\r\n{}")


async def test_a_head_whose_body_comes_later_is_written_on_the_next_turn() -> None:
    app = Streamer()
    proto, transport, _, _ = connect(app)
    proto.data_received(b"GET /events HTTP/1.1\r\nHost: a\r\n\r\n")
    for _ in range(5):  # a few loop turns: the task starts, sends its head, waits
        await asyncio.sleep(0)
    assert transport.status() == 200
    assert transport.written.endswith(b"\r\n\r\n")  # the head alone, not held back
    app.release.set()
    await asyncio.wait_for(app.done.wait(), 5)
    assert len(transport.writes) == 2
    assert transport.writes[1].endswith(b"data: 1\n\n\r\n0\r\n\r\n")


async def test_every_request_on_a_connection_is_answered_in_order() -> None:
    app = Recorder()
    proto, transport, _, _ = connect(app)
    for i in range(3):
        app.done.clear()
        proto.data_received(b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n" % i)
        await asyncio.wait_for(app.done.wait(), 5)
    assert bytes(transport.written).count(b"HTTP/1.1 200 ") == 3
    assert len(transport.writes) == 3
    assert [s["path"] for s in app.scopes] == ["/0", "/1", "/2"]


class Hanger:
    """An ASGI app that registers for the loss of its client, then waits forever."""

    def __init__(self) -> None:
        self.lost = 0
        self.registered = asyncio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        hook = scope["extensions"][CLIENT_LOST]
        hook.callback = self.on_lost
        self.registered.set()
        await asyncio.Event().wait()

    def on_lost(self) -> None:
        self.lost += 1


async def test_client_lost_calls_back_an_incomplete_response() -> None:
    app = Hanger()
    proto, _, _, _ = connect(app)
    proto.data_received(b"GET /hang HTTP/1.1\r\nHost: a\r\n\r\n")
    await asyncio.wait_for(app.registered.wait(), 5)
    proto.connection_lost(None)
    assert app.lost == 1
    for task in list(proto.tasks):
        task.cancel()


async def test_client_lost_is_silent_after_a_complete_response() -> None:
    calls: list[int] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        scope["extensions"][CLIENT_LOST].callback = lambda: calls.append(1)
        await send_json(send, 200, b"{}")

    proto, transport, _, _ = connect(app)
    proto.data_received(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    for _ in range(5):
        await asyncio.sleep(0)
    assert transport.status() == 200
    proto.connection_lost(None)
    assert calls == []
