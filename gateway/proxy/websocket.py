"""The WebSocket relay: one client WebSocket to one upstream WebSocket (on aiohttp).

Owns: the upgrade to the upstream (headers rewritten as for HTTP, subprotocols passed
through, refused upgrades answered 502), frames both ways, the close code of whichever
side closes first, and the open-WebSocket gauge and close counter.
"""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
from multidict import CIMultiDict

from gateway.config import ServerConfig
from gateway.http import JSON_CT, Receive, RequestContext, Scope, Send, error_body
from gateway.net import TrustedProxies
from gateway.observability.metrics import Metrics
from gateway.proxy.headers import WS_SKIP, HeaderRewriter
from gateway.proxy.upstream import Upstream, classify_aiohttp


class WebSocketProxy:
    """Relays a WebSocket to the upstream: subprotocol negotiation, text and binary frames
    both ways, and the close code of whichever side closes first."""

    def __init__(
        self,
        upstream: Upstream,
        server: ServerConfig,
        trusted: TrustedProxies,
        metrics: Metrics,
        route_name: str,
    ) -> None:
        self.upstream = upstream
        # The upgrade always names the upstream's own host (no preserve_host).
        self.headers = HeaderRewriter(server, trusted, upstream.host_bytes, False, None)
        self.max_msg = server.max_body_bytes
        self.metrics = metrics
        self.route_name = route_name
        self.open_gauge = metrics.websockets.labels(route_name)

    async def __call__(self, ctx: RequestContext, receive: Receive, send: Send) -> None:
        scope = ctx.scope
        session = self.upstream.session
        assert session is not None
        msg = await receive()
        if msg["type"] != "websocket.connect":
            return
        headers = CIMultiDict(
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in self.headers.request(ctx, WS_SKIP)
        )
        protocols = tuple(scope.get("subprotocols") or ())
        try:
            ws = await session.ws_connect(
                self.upstream.url(scope),
                protocols=protocols,
                headers=headers,
                autoping=True,
                max_msg_size=self.max_msg,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=5.0),
            )
        except aiohttp.WSServerHandshakeError as exc:
            await self._refuse(
                scope,
                send,
                502,
                "upstream_refused_upgrade",
                f"upstream answered {exc.status} to the upgrade",
            )
            ctx.status = 502
            return
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            err = classify_aiohttp(exc)
            await self._refuse(scope, send, err.status, err.code, err.message)
            ctx.status = err.status
            return
        ctx.status = 101
        self.open_gauge.inc()
        closed_by = "client"
        try:
            await send({"type": "websocket.accept", "subprotocol": ws.protocol})
            closed_by = await self._relay(ws, receive, send)
        finally:
            self.open_gauge.dec()
            self.metrics.websocket_closes.labels(self.route_name, closed_by).inc()
            if (obs := self.upstream.observer) is not None:
                obs.ws_closed(ctx, self.route_name, closed_by)
            if not ws.closed:
                await ws.close()

    async def _relay(
        self, ws: aiohttp.ClientWebSocketResponse, receive: Receive, send: Send
    ) -> str:
        """Pump frames both ways until one side closes; returns who closed first."""
        closed_by: list[str] = []

        async def client_to_upstream() -> None:
            while True:
                msg = await receive()
                t = msg["type"]
                if t == "websocket.receive":
                    if msg.get("text") is not None:
                        await ws.send_str(msg["text"])
                    elif msg.get("bytes") is not None:
                        await ws.send_bytes(msg["bytes"])
                elif t == "websocket.disconnect":
                    closed_by.append("client")
                    code = int(msg.get("code", 1000))
                    if not ws.closed:
                        await ws.close(code=code if _sendable_close(code) else 1000)
                    return

        async def upstream_to_client() -> None:
            async for m in ws:
                if m.type == aiohttp.WSMsgType.TEXT:
                    await send({"type": "websocket.send", "text": m.data})
                elif m.type == aiohttp.WSMsgType.BINARY:
                    await send({"type": "websocket.send", "bytes": m.data})
                elif m.type == aiohttp.WSMsgType.ERROR:
                    break
            closed_by.append("upstream")
            code = ws.close_code or 1011
            with contextlib.suppress(Exception):
                await send(
                    {
                        "type": "websocket.close",
                        "code": code if _sendable_close(code) else 1011,
                        "reason": "",
                    }
                )

        a = asyncio.ensure_future(client_to_upstream())
        b = asyncio.ensure_future(upstream_to_client())
        try:
            await asyncio.wait({a, b}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (a, b):
                if not t.done():
                    t.cancel()
            await asyncio.gather(a, b, return_exceptions=True)
        return closed_by[0] if closed_by else "error"

    @staticmethod
    async def _refuse(scope: Scope, send: Send, status: int, code: str, message: str) -> None:
        if "websocket.http.response" in scope.get("extensions", {}):
            body = error_body(code, message)
            await send(
                {
                    "type": "websocket.http.response.start",
                    "status": status,
                    "headers": [JSON_CT, (b"content-length", str(len(body)).encode())],
                }
            )
            await send({"type": "websocket.http.response.body", "body": body})
        else:
            await send({"type": "websocket.close", "code": 1011})


def _sendable_close(code: int) -> bool:
    """Codes an endpoint may put on the wire (RFC 6455 7.4)."""
    return code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011) or 3000 <= code <= 4999
