"""gateway/cycle.py against uvicorn's own request cycle: the same app answering the same
request must put the same bytes on the wire and leave the connection in the same state
through `EdgeHttpProtocol` (EdgeCycle) as through uvicorn's `HttpToolsProtocol`
(RequestResponseCycle), for the common case EdgeCycle does itself and for every case it
hands back to uvicorn."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from gateway.cycle import EdgeCycle
from gateway.http import Message, Receive, Scope, Send
from gateway.protocol import EdgeConfig, EdgeHttpProtocol, HeadLimits
from tests.fakes.clock import FakeClock
from tests.fakes.transport import FakeTransport

GET = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"
POST = b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"


def answering(*messages: Message, seen: list[Message] | None = None) -> Any:
    """An app that reads the whole request body, then sends `messages`."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        more = True
        while more:
            msg = await receive()
            if seen is not None:
                seen.append(msg)
            more = msg.get("more_body", False)
        for message in messages:
            await send(dict(message))

    return app


def start(status: int, *headers: tuple[bytes, bytes]) -> Message:
    return {"type": "http.response.start", "status": status, "headers": list(headers)}


def body(data: bytes, more: bool = False) -> Message:
    return {"type": "http.response.body", "body": data, "more_body": more}


async def serve(
    edge: bool, app: Any, request: bytes, defaults: list[tuple[bytes, bytes]], **config: Any
) -> FakeTransport:
    """Feed `request` to a fresh connection and wait for the app's task to end."""
    # access_log=False as gateway/server.py runs it (uvicorn's access log would send every
    # response through uvicorn's own send).
    kwargs: dict[str, Any] = {
        "loop": "none",
        "log_config": None,
        "lifespan": "off",
        "access_log": False,
        **config,
    }
    cfg: uvicorn.Config
    if edge:
        cfg = EdgeConfig(app, head_limits=HeadLimits(clock=FakeClock()), **kwargs)
    else:
        cfg = uvicorn.Config(app, http=HttpToolsProtocol, **kwargs)
    state = ServerState()
    state.default_headers = defaults  # uvicorn's Server sets these at start-up
    proto = (EdgeHttpProtocol if edge else HttpToolsProtocol)(cfg, state, {})
    transport = FakeTransport()
    proto.connection_made(transport)
    proto.data_received(request)
    while state.tasks:
        await asyncio.gather(*state.tasks, return_exceptions=True)
    await asyncio.sleep(0)  # a held head is written at the start of the next turn
    if edge and proto.cycle is not None:
        assert isinstance(proto.cycle, EdgeCycle)
        assert not proto.cycle.access_log
    return transport


async def same(
    app: Any, request: bytes = GET, defaults: list[tuple[bytes, bytes]] | None = None
) -> FakeTransport:
    edge = await serve(True, app, request, defaults or [])
    plain = await serve(False, app, request, defaults or [])
    assert bytes(edge.written) == bytes(plain.written)
    assert edge.closed == plain.closed
    return edge


CASES = {
    "content-length": (start(200, (b"content-length", b"2")), body(b"ok")),
    "mixed-case framing header": (start(200, (b"Content-Length", b"2")), body(b"ok")),
    "several headers": (
        start(
            201, (b"content-type", b"application/json"), (b"x-a", b"1"), (b"content-length", b"2")
        ),
        body(b"{}"),
    ),
    "no framing: chunked": (start(200), body(b"abc")),
    "streamed chunks": (start(200), body(b"a", more=True), body(b"b", more=True), body(b"")),
    "streamed content-length": (
        start(200, (b"content-length", b"2")),
        body(b"a", more=True),
        body(b"b"),
    ),
    "transfer-encoding from the app": (
        start(200, (b"transfer-encoding", b"chunked")),
        body(b"abc"),
    ),
    "two content-lengths: the first counts": (
        start(200, (b"content-length", b"2"), (b"content-length", b"5")),
        body(b"ok"),
    ),
    "content-length beside connection": (
        start(200, (b"connection", b"keep-alive"), (b"content-length", b"2")),
        body(b"ok"),
    ),
    "content-length after transfer-encoding": (
        start(200, (b"transfer-encoding", b"chunked"), (b"content-length", b"2")),
        body(b"ok"),
    ),
    "204 has no body": (start(204), body(b"")),
    "304 has no body": (start(304, (b"etag", b'"x"')), body(b"")),
    "app closes": (
        start(200, (b"connection", b"keep-alive, Close"), (b"content-length", b"0")),
        body(b""),
    ),
    "body longer than content-length": (start(200, (b"content-length", b"1")), body(b"ab")),
    "body shorter than content-length": (start(200, (b"content-length", b"3")), body(b"ab")),
    "invalid header name": (start(200, (b"x y", b"1"), (b"content-length", b"0")), body(b"")),
    "invalid header value": (
        start(200, (b"x-a", b"1\r\nx-b: 2"), (b"content-length", b"0")),
        body(b""),
    ),
    "body before start": (body(b"x"),),
    "a message after the end": (start(200, (b"content-length", b"0")), body(b""), body(b"")),
    "no response": (),
}


@pytest.mark.parametrize("name", CASES)
async def test_the_bytes_on_the_wire_are_uvicorns(name: str) -> None:
    await same(answering(*CASES[name]))


async def test_a_head_request_gets_no_body() -> None:
    wire = await same(
        answering(start(200, (b"content-length", b"5")), body(b"")),
        b"HEAD /x HTTP/1.1\r\nHost: a\r\n\r\n",
    )
    assert wire.written.endswith(b"content-length: 5\r\n\r\n")


async def test_http_1_0_is_closed_after_the_response() -> None:
    wire = await same(
        answering(start(200, (b"content-length", b"2")), body(b"ok")),
        b"GET /x HTTP/1.0\r\nHost: a\r\n\r\n",
    )
    assert b"connection: close\r\n" in wire.written
    assert wire.closed


async def test_server_default_headers_come_first() -> None:
    wire = await same(
        answering(start(200, (b"content-length", b"2")), body(b"ok")),
        defaults=[(b"server", b"edge")],
    )
    assert wire.written.startswith(b"HTTP/1.1 200 OK\r\nserver: edge\r\ncontent-length: 2")


async def test_the_body_arrives_whole_and_then_the_disconnect_is_awaited() -> None:
    seen: list[Message] = []
    await same(answering(start(200, (b"content-length", b"0")), body(b""), seen=seen), POST)
    # Once per protocol: the body in one message, complete.
    assert seen == [{"type": "http.request", "body": b"hello", "more_body": False}] * 2


async def test_expect_100_continue_is_answered_before_the_body_is_read() -> None:
    request = (
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\nhello"
    )
    wire = await same(answering(start(200, (b"content-length", b"0")), body(b"")), request)
    assert wire.written.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n")


async def test_the_common_case_is_edge_cycles_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """A complete body in, a Content-Length answer out: uvicorn's send and receive are
    not called (what makes the cycle cheap), and the head and body go out in one write."""

    async def refuse(*_: Any) -> None:
        raise AssertionError("uvicorn's cycle was used")

    monkeypatch.setattr(RequestResponseCycle, "send", refuse)
    monkeypatch.setattr(RequestResponseCycle, "receive", refuse)
    app = answering(start(200, (b"content-length", b"2"), (b"x-a", b"1")), body(b"ok"))
    wire = await serve(True, app, POST, [])
    assert wire.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-a: 1\r\n\r\nok"]
    assert not wire.closed


@pytest.mark.parametrize(
    "headers",
    [
        [(b"x-a", b"1\nx"), (b"x y", b"1")],
        [(b"x y", b"1"), (b"x-a", b"1\nx")],
        [(b"content-length", b"abc"), (b"x-a", b"1\r\nx-b: 2")],
        [(b"x-a", b"1\r\nx-b: 2"), (b"content-length", b"abc")],
        [(b"content-length", b"abc")],
    ],
)
async def test_an_invalid_head_raises_what_uvicorn_raises(
    headers: list[tuple[bytes, bytes]],
) -> None:
    """The app sees the same exception from send() as under uvicorn: the first bad
    header in order decides it, whatever the batched check found."""
    raised: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        try:
            await send(start(200, *headers))
        except Exception as exc:
            raised.append(repr(exc))
            raise

    await same(app)
    assert len(raised) == 2
    assert raised[0] == raised[1]
