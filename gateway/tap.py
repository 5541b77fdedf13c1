"""The response tap: the one way a policy watches an answer go out.

Owns: `Tap`, a `send` wrapper that records the status and headers of the answer, keeps a
copy of its body up to a bound and awaits a completion callback once the last chunk came
within the bound, before that chunk goes on (so what the callback stores is in place by
the time the client sees the end). Passing through is the default (the breaker records
the status, the breaker and heartbeat keep negative answers); a held tap sends nothing
itself (`capture_send` for refresh, the cache's fill) and may hand over to its owner past
the bound (the cache then streams the rest).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from gateway.http import CapturedResponse, Message, Send

# At the response start: copy the body (True) or only pass it through.
OnStart = Callable[["Tap"], bool]
# The whole body arrived within the bound (tap.resp.body holds it).
OnComplete = Callable[["Tap"], Awaitable[None]]
# A held answer outgrew the bound: (tap, the body held so far plus this chunk, more_body).
# The owner sends it on; the tap then passes the rest through.
OnOverflow = Callable[["Tap", bytes, bool], Awaitable[None]]


async def _nowhere(msg: Message) -> None:
    """The `send` of a held tap that never passes anything on."""


class Tap:
    """`resp` is filled as the answer goes: status and headers at the start (names
    lowered when held, as sent otherwise), the body while within `limit` bytes;
    `resp.complete` once the whole body was copied, `resp.too_large` past the bound
    (the copy is then dropped)."""

    __slots__ = ("copy", "hold", "limit", "on_complete", "on_overflow", "on_start", "resp", "send")

    def __init__(
        self,
        send: Send | None,
        limit: int,
        *,
        hold: bool = False,
        on_start: OnStart | None = None,
        on_complete: OnComplete | None = None,
        on_overflow: OnOverflow | None = None,
    ) -> None:
        self.send = send if send is not None else _nowhere
        self.limit = limit
        self.hold = hold
        self.on_start = on_start
        self.on_complete = on_complete
        self.on_overflow = on_overflow
        self.resp = CapturedResponse()
        self.copy = True

    @property
    def streaming(self) -> bool:
        """A held answer that outgrew the bound and is being passed on by now."""
        return self.resp.too_large and self.on_overflow is not None

    async def __call__(self, msg: Message) -> None:
        t = msg["type"]
        resp = self.resp
        if t == "http.response.start":
            resp.status = msg["status"]
            headers = msg.get("headers", ())
            # A held answer is sent later by its owner, who looks names up: lowered once.
            resp.headers = (
                [(bytes(k).lower(), bytes(v)) for k, v in headers] if self.hold else headers
            )
            if self.on_start is not None:
                self.copy = self.on_start(self)
        elif t == "http.response.body" and self.copy:
            body = msg.get("body", b"")
            more = msg.get("more_body", False)
            if len(resp.body) + len(body) > self.limit:
                self.copy = False
                resp.too_large = True
                if self.on_overflow is not None:
                    held = bytes(resp.body) + body
                    resp.body = bytearray()
                    self.hold = False
                    await self.on_overflow(self, held, more)
                    return
                resp.body.clear()
            else:
                resp.body.extend(body)
                if not more:
                    resp.complete = True
                    if self.on_complete is not None:
                        await self.on_complete(self)
        if not self.hold:
            await self.send(msg)


def capture_send(limit: int = 10 * 1024 * 1024) -> tuple[Send, CapturedResponse]:
    """A send that records the response instead of sending it. Past `limit` bytes the body
    is dropped and `too_large` is set (the caller should then not keep it)."""
    tap = Tap(None, limit, hold=True)
    return tap, tap.resp
