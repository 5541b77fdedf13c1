"""A fake upstream app (aiohttp.web) that reports what it received, so tests can assert
what the gateway forwarded: raw path, query, headers, body size; plus streaming, large,
slow, status and WebSocket endpoints."""

from __future__ import annotations

import asyncio
import json
import socket
from collections import Counter
from typing import Any

from aiohttp import WSMsgType, web


class FakeApp:
    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.requests: list[dict[str, Any]] = []
        self.slow_release = asyncio.Event()
        self.cancelled = 0
        self.status_override: dict[str, tuple[int, Any]] = {}
        self.runner: web.AppRunner | None = None
        self.url = ""
        self.ws_closed_codes: list[int | None] = []

    def app(self) -> web.Application:
        a = web.Application(client_max_size=64 * 1024 * 1024)
        a.router.add_route("*", "/stream", self.stream)
        a.router.add_get("/big", self.big)
        a.router.add_get("/slow", self.slow)
        a.router.add_get("/hang", self.hang)
        a.router.add_get("/ws", self.ws)
        a.router.add_get("/realtime/v1/websocket", self.ws)
        a.router.add_route("*", "/{tail:.*}", self.echo)
        return a

    async def start(self) -> str:
        self.runner = web.AppRunner(self.app(), access_log=None, handler_cancellation=True)
        await self.runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        site = web.SockSite(self.runner, sock)
        await site.start()
        port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        if self.runner:
            await self.runner.cleanup()

    async def echo(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        info = {
            "method": request.method,
            "raw_path": request.raw_path,
            "path": request.path,
            "query_string": request.query_string,
            "headers": [[k, v] for k, v in request.headers.items()],
            "body_len": len(body),
            "body": body.decode("utf-8", "replace") if len(body) < 4096 else None,
        }
        self.requests.append(info)
        self.hits[request.path] += 1
        override = self.status_override.get(request.path)
        if override is not None:
            status, payload = override
            return web.json_response(payload, status=status)
        resp = web.json_response(info)
        resp.headers["Connection"] = "keep-alive, X-Secret-Hop"
        resp.headers["X-Secret-Hop"] = "must-not-pass"
        resp.headers["Keep-Alive"] = "timeout=5"
        resp.headers["X-Upstream"] = "fake"
        return resp

    async def stream(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: one event, then waits for the test to release the next."""
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: one\n\n")
        await self.slow_release.wait()
        await resp.write(b"data: two\n\n")
        await resp.write_eof()
        return resp

    async def big(self, request: web.Request) -> web.StreamResponse:
        size = int(request.query.get("mb", "20")) * 1024 * 1024
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = size
        await resp.prepare(request)
        chunk = b"x" * 65536
        sent = 0
        while sent < size:
            await resp.write(chunk)
            sent += len(chunk)
        await resp.write_eof()
        return resp

    async def slow(self, request: web.Request) -> web.Response:
        self.hits["/slow"] += 1
        await asyncio.sleep(float(request.query.get("s", "5")))
        return web.json_response({"slow": True})

    async def hang(self, request: web.Request) -> web.Response:
        self.hits["/hang"] += 1
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return web.json_response({})  # pragma: no cover

    async def ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=("chat.v2", "chat.v1"))
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                if msg.data.startswith("close:"):
                    await ws.close(code=int(msg.data.split(":", 1)[1]), message=b"bye")
                    break
                await ws.send_str("echo:" + msg.data)
            elif msg.type == WSMsgType.BINARY:
                await ws.send_bytes(msg.data[::-1])
        self.ws_closed_codes.append(ws.close_code)
        return ws


def dumps(obj: Any) -> str:
    return json.dumps(obj)
