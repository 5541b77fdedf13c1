"""Request-body framing: what body goes upstream, and how it is delimited.

Owns: the choice between no body, a small body read whole before the upstream call (one
write with the head, and safe to resend), and a stream (Content-Length or chunked), the
`max_body_bytes` cap, and the refusal of framings the gateway will not pass on (an
invalid Content-Length, a transfer coding other than chunked). A stream records the
client fault raised while sending it reaches the caller as raised.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from gateway.http import Receive, RequestContext
from gateway.proxy.errors import BodyTooLarge, ClientGone, ClientRequestError

if TYPE_CHECKING:
    from gateway.proxy.watch import DisconnectWatch

# Bodies up to this size (with a Content-Length) are read before the upstream call: one
# receive() in practice, then head and body leave in one write.
PREREAD_LIMIT = 64 * 1024


class BodyStream:
    """A request body read from the client while it is sent upstream: Content-Length
    framed (`length`) or chunked (None). Iterating raises BodyTooLarge or ClientGone,
    in the task that sends it, so they reach the proxy unwrapped."""

    __slots__ = ("length", "limit", "receive", "watch")

    def __init__(
        self,
        receive: Receive,
        limit: int,
        watch: DisconnectWatch | None = None,
        length: int | None = None,
    ) -> None:
        self.receive = receive
        self.limit = limit
        self.watch = watch
        self.length = length

    def __aiter__(self) -> AsyncIterator[bytes]:
        return _stream_body(self.receive, self.limit, self.watch)


Body = bytes | BodyStream | None


async def frame_body(
    ctx: RequestContext, receive: Receive, limit: int, watch: DisconnectWatch | None
) -> tuple[Body, int | None]:
    """(body, Content-Length to send or None). Raises ClientRequestError."""
    length = ctx.header(b"content-length")
    if length is not None:
        try:
            n = int(length)
        except ValueError:
            raise ClientRequestError("invalid Content-Length") from None
        if n > limit:
            raise BodyTooLarge(limit)
        if n <= PREREAD_LIMIT:
            return await read_body(receive, limit), n
        return BodyStream(receive, limit, watch, n), n
    chunked = ctx.header(b"transfer-encoding")
    if chunked is not None:
        if chunked.strip().lower() != b"chunked":
            # A transfer coding we would silently drop (gzip, chunked) corrupts the
            # body upstream; refuse it as Envoy does.
            raise ClientRequestError(
                "unsupported Transfer-Encoding", status=501, code="not_implemented"
            )
        return BodyStream(receive, limit, watch), None
    return None, None


async def read_body(receive: Receive, limit: int) -> bytes:
    """Read a whole request body (for small bodies and policies that must see it)."""
    chunks = [chunk async for chunk in _stream_body(receive, limit)]
    if len(chunks) == 1:
        return chunks[0]
    return b"".join(chunks)


async def _stream_body(
    receive: Receive, limit: int, watch: DisconnectWatch | None = None
) -> AsyncIterator[bytes]:
    size = 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise ClientGone
        body: bytes = msg.get("body", b"")
        if body:
            size += len(body)
            if size > limit:
                raise BodyTooLarge(limit)
            yield body
        if not msg.get("more_body", False):
            if watch is not None:
                watch.body_done = True
                watch.start()
            return
