"""Client-disconnect cancellation of a forwarded request.

Owns: `DisconnectWatch`, which cancels the request task when the client goes away once
its request body is consumed (an upstream call whose client left does not run on), on the
gateway server's `ClientLost` hook or, elsewhere, a task waiting on receive().
"""

from __future__ import annotations

import asyncio

from gateway.http import Message, Receive, RequestContext
from gateway.protocol import CLIENT_LOST, ClientLost


class DisconnectWatch:
    """Per request: once the request body is consumed, watches for the client going
    away and then cancels the request task, so an upstream call whose client left does
    not run on. `done` is set before the final send so the normal end of a response
    (which uvicorn also reports as a disconnect) cancels nothing.

    Under the gateway's own server (gateway/protocol.py) the watch is a callback on the
    connection (`ClientLost`); elsewhere (other ASGI servers) it is a task waiting on
    receive() for http.disconnect. The callback saves a task, two event-loop turns and
    a cancellation per request (docs/performance.md)."""

    __slots__ = ("body_done", "done", "gone", "lost", "receive", "started", "task", "watcher")

    def __init__(self, receive: Receive, ctx: RequestContext | None = None) -> None:
        self.receive = receive
        # False while a streamed request body is still being read by the upstream
        # writer: a second receive() then would steal body chunks.
        self.body_done = True
        self.watcher: asyncio.Future[None] | None = None
        # The connection's hook only for the connection's own receive (see RequestContext).
        ext = ctx.scope.get("extensions") if ctx is not None and receive is ctx.receive else None
        lost: ClientLost | None = ext.get(CLIENT_LOST) if ext else None
        self.lost = lost
        # With the connection's loop at hand, current_task() skips get_running_loop(),
        # whose fork check is a getpid() syscall on Python 3.11: 5.6 % of the
        # passthrough's py-spy samples were that one syscall. (None: it asks, as before.)
        self.task = asyncio.current_task(lost.loop if lost is not None else None)
        self.started = False
        self.done = False
        self.gone = False

    def start(self) -> None:
        if self.started or self.done or not self.body_done:
            return
        self.started = True
        lost = self.lost
        if lost is None:
            self.watcher = asyncio.ensure_future(self._run())
        elif lost.lost:
            self._client_lost()
        else:
            # Cleared by stop() (or by firing): no reference cycle outlives the request.
            lost.callback = self._client_lost

    def _client_lost(self) -> None:
        if not self.done and self.task is not None:
            self.gone = True
            self.task.cancel()

    async def _run(self) -> None:
        try:
            while True:
                msg: Message = await self.receive()
                if msg["type"] == "http.disconnect":
                    self._client_lost()
                    return
        except asyncio.CancelledError:
            # stop() cancels us at the end of every request. Ending normally instead of
            # letting CancelledError out matters: the stored exception's traceback holds
            # this frame -> self -> the request task, a reference cycle per request that
            # only the cyclic GC can free (bench/passthrough.py: ~23 objects/request,
            # 15 % of CPU in gc_collect_main and 30-60 ms gen-2 pauses at p99).
            return

    def uncancel(self) -> None:
        if self.task is not None:
            self.task.uncancel()

    def stop(self) -> None:
        self.done = True
        if self.lost is not None and self.lost.callback == self._client_lost:
            self.lost.callback = None
        if self.watcher is not None:
            self.watcher.cancel()
