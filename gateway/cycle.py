"""One request's ASGI cycle on the edge's HTTP/1 connections.

Owns: `EdgeCycle`, the `receive`/`send` pair the ASGI app gets for one request on an
`EdgeHttpProtocol` connection (gateway/protocol.py). It is uvicorn's
`RequestResponseCycle` with the common case made cheap, and every other case handed to
uvicorn's own code unchanged:

- `send` of a response head validates the header names and values with one regex
  search each over all of them joined (uvicorn runs two searches per header: on a
  five-header answer that was ten), and builds the head in one pass. A body that
  completes a Content-Length response is written and the response finished here.
  Chunked, HEAD, streamed (`more_body`), length mismatches, a paused transport, a gone
  client, and uvicorn's access log go to uvicorn's `send`, which raises or frames
  exactly as before.
- `receive` of a body that is already complete returns it without suspending on the
  message event (uvicorn awaits `Event.wait()` even when the event is set).

docs/performance.md ("The ASGI cycle") has the counts: a do-nothing ASGI app cost
~150k instructions a request under uvicorn's cycle against ~75k for a minimal one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, NoReturn

from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import (
    HEADER_RE,
    HEADER_VALUE_RE,
    STATUS_LINE,
    RequestResponseCycle,
)

# Response headers besides Content-Length that uvicorn's framing rules act on.
_FRAMING = frozenset((b"transfer-encoding", b"connection"))
_NO_BODY = (204, 304)


class EdgeCycle(RequestResponseCycle):
    """uvicorn's request cycle with a cheap path for a complete body and a
    Content-Length response (see the module docstring)."""

    def __init__(
        self,
        scope: Any,
        transport: asyncio.Transport,
        flow: FlowControl,
        proto: Any,
        message_event: asyncio.Event,
        expect_100_continue: bool,
        keep_alive: bool,
        on_response: Callable[[], None],
    ) -> None:
        # The same attributes uvicorn's __init__ sets (its send/receive and the
        # protocol read them), without its eleven keyword arguments per request.
        self.scope = scope
        self.transport = transport
        self.flow = flow
        self.logger = proto.logger
        self.access_logger = proto.access_logger
        self.access_log = proto.access_log
        self.default_headers = proto.server_state.default_headers
        self.message_event = message_event
        self.on_response = on_response
        self.disconnected = False
        self.keep_alive = keep_alive
        self.waiting_for_100_continue = expect_100_continue
        self.body = bytearray()
        self.more_body = True
        self.response_started = False
        self.response_complete = False
        self.chunked_encoding: bool | None = None
        self.expected_content_length = 0

    async def send(self, message: Any) -> None:
        if self.disconnected or self.flow.write_paused or self.access_log:
            await super().send(message)
        elif not self.response_started:
            if message["type"] != "http.response.start":
                await super().send(message)  # raises uvicorn's error
                return
            self._start(message["status"], message.get("headers", ()))
        elif self.response_complete or not self._finish(message):
            await super().send(message)

    def _start(self, status: int, headers: Any) -> None:
        """Write the response head (as uvicorn does, with the validation batched)."""
        self.response_started = True
        self.waiting_for_100_continue = False
        if self.default_headers:
            headers = [*self.default_headers, *headers]
        content = [STATUS_LINE[status]]
        length = None
        framing = False
        for name, value in headers:
            name = name.lower()
            content += (name, b": ", value, b"\r\n")
            if name == b"content-length":
                if length is None:
                    length = value
            elif name in _FRAMING:
                framing = True
        # The same checks as uvicorn's, over all names and all values at once: a
        # forbidden byte is in the join exactly when it is in one of them.
        if HEADER_RE.search(b"".join(content[1::4])) or HEADER_VALUE_RE.search(
            b"".join(content[3::4])
        ):
            self._invalid(content)
        close = False
        if framing:
            close = self._framing(content)
        elif length is not None:
            # Only Content-Length (the usual answer): uvicorn's first one counts.
            self.expected_content_length = int(length.decode())
            self.chunked_encoding = False
        if not self.keep_alive and not close:
            content.append(b"connection: close\r\n")
        if (
            self.chunked_encoding is None
            and self.scope["method"] != "HEAD"
            and status not in _NO_BODY
        ):
            # Neither Content-Length nor Transfer-Encoding: uvicorn chunks it.
            self.chunked_encoding = True
            content.append(b"transfer-encoding: chunked\r\n")
        content.append(b"\r\n")
        self.transport.write(b"".join(content))

    def _invalid(self, content: list[bytes]) -> NoReturn:
        """A head that fails validation: raise what uvicorn's in-order loop raises first
        (the error path only, so the common case keeps its two searches)."""
        for i in range(1, len(content), 4):
            name, value = content[i], content[i + 2]
            if HEADER_RE.search(name):
                raise RuntimeError("Invalid HTTP header name.")
            if HEADER_VALUE_RE.search(value):
                raise RuntimeError("Invalid HTTP header value.")
            self._frame(name, value)  # a bad Content-Length raises here, as in uvicorn
        raise AssertionError("unreachable: one of the joined searches matched")

    def _framing(self, content: list[bytes]) -> bool:
        """uvicorn's framing rules over the head's (name, value) pairs, in order, when
        it has Transfer-Encoding or Connection; returns whether the app asked for
        `Connection: close`."""
        close = False
        for i in range(1, len(content), 4):
            close = self._frame(content[i], content[i + 2]) or close
        return close

    def _frame(self, name: bytes, value: bytes) -> bool:
        """uvicorn's framing rule for one (lowercased) header; True for a
        `Connection: close`."""
        if name == b"content-length" and self.chunked_encoding is None:
            self.expected_content_length = int(value.decode())
            self.chunked_encoding = False
        elif name == b"transfer-encoding" and value.lower() == b"chunked":
            self.expected_content_length = 0
            self.chunked_encoding = True
        elif name == b"connection" and b"close" in [
            token.lower().strip() for token in value.split(b",")
        ]:
            self.keep_alive = False
            return True
        return False

    def _finish(self, message: Any) -> bool:
        """The one body of a Content-Length response: write it and complete the
        response. False (nothing done) for anything uvicorn's send must handle."""
        if message["type"] != "http.response.body" or message.get("more_body", False):
            return False
        body = message.get("body", b"")
        if (
            self.chunked_encoding is not False
            or len(body) != self.expected_content_length
            or self.scope["method"] == "HEAD"
        ):
            return False
        self.expected_content_length = 0
        self.transport.write(body)
        self.response_complete = True
        self.message_event.set()
        if not self.keep_alive:
            self.transport.close()
        self.on_response()
        return True

    async def receive(self) -> Any:
        event = self.message_event
        if (
            self.more_body
            or self.waiting_for_100_continue
            or self.disconnected
            or self.response_complete
            or not event.is_set()
        ):
            return await super().receive()
        # The whole body is here (on_message_complete set the event): no wait.
        if self.flow.read_paused:
            self.flow.resume_reading()
        event.clear()
        message = {"type": "http.request", "body": bytes(self.body), "more_body": False}
        self.body = bytearray()
        return message
