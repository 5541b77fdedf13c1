"""Builds the public ASGI app from config.

Owns: the request pipeline's shape and the order of the policies (the one place it is
written down): route match → auth → rate limit → concurrency → route policy (refresh |
heartbeat | cache | breaker) → proxy. Also: request ids, the per-request context, the
access log and request metrics, edge endpoints under /_edge/, lifespan.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

from gateway.config import GatewayConfig
from gateway.edge import EdgeEndpoints
from gateway.http import (
    Handler,
    Message,
    Receive,
    RequestContext,
    Scope,
    Send,
    send_error,
)
from gateway.observability import logging as logs
from gateway.proxy import ClientGone, Proxy, TruncatedResponse, WebSocketProxy
from gateway.routing import CompiledRoute, RouteTable
from gateway.runtime import Runtime

log = logging.getLogger("gateway")

_SANE_ID = re.compile(rb"^[A-Za-z0-9._:\-]{1,128}$")


def build_chain(route: CompiledRoute, rt: Runtime) -> Handler:
    """Compose one route's handlers, innermost (proxy) first. Each policy is built once
    here and keeps no per-request state on itself."""
    cfg = route.config
    upstream = rt.upstreams[cfg.upstream]
    proxy = Proxy(upstream, rt.config.server, rt.trusted, rt.metrics, cfg.read_timeout)
    handler: Handler = proxy
    # Imported here so a config without a policy never loads its module.
    if cfg.breaker is not None:
        from gateway.policies.breaker import BreakerPolicy

        handler = BreakerPolicy(handler, cfg, rt, proxy)
    if cfg.cache is not None:
        from gateway.policies.cache import CachePolicy

        handler = CachePolicy(handler, cfg, rt, proxy)
    if cfg.heartbeat is not None:
        from gateway.policies.heartbeat import HeartbeatPolicy

        handler = HeartbeatPolicy(handler, cfg, rt, proxy)
    if cfg.refresh is not None:
        from gateway.policies.refresh import RefreshPolicy

        handler = RefreshPolicy(handler, cfg, rt, proxy)
    if cfg.concurrency is not None:
        from gateway.policies.ratelimit import ConcurrencyPolicy

        handler = ConcurrencyPolicy(handler, cfg, rt)
    if cfg.rate_limit:
        from gateway.policies.ratelimit import RateLimitPolicy

        handler = RateLimitPolicy(handler, cfg, rt)
    if cfg.auth.mode != "off":
        from gateway.policies.auth import AuthPolicy

        handler = AuthPolicy(handler, cfg, rt)
    return handler


def build_ws_chain(route: CompiledRoute, rt: Runtime) -> Handler:
    cfg = route.config
    handler: Handler = WebSocketProxy(
        rt.upstreams[cfg.upstream], rt.config.server, rt.trusted, rt.metrics, cfg.name
    )
    if cfg.auth.mode != "off":
        from gateway.policies.auth import AuthPolicy

        handler = AuthPolicy(handler, cfg, rt)
    return handler


class Gateway:
    """The public ASGI application."""

    def __init__(self, config: GatewayConfig, runtime: Runtime | None = None) -> None:
        self.rt = runtime or Runtime(config)
        self.config = config
        self.table = RouteTable(config.routes)
        self.ws_handlers: dict[str, Handler] = {}
        for route in self.table.routes:
            route.handler = build_chain(route, self.rt)
            self.ws_handlers[route.name] = build_ws_chain(route, self.rt)
        self.edge = EdgeEndpoints(self.rt, self.table)
        m = self.rt.metrics
        self._requests = m.requests
        self._latency = m.latency
        self._in_flight = m.in_flight
        self._access_log = config.server.access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self.http(scope, receive, send)
        elif kind == "websocket":
            await self.websocket(scope, receive, send)
        elif kind == "lifespan":
            await self.lifespan(receive, send)

    async def lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                try:
                    await self.rt.start()
                except Exception as exc:
                    log.exception("startup failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await self.rt.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _context(self, scope: Scope) -> tuple[RequestContext | None, str, str]:
        rid = None
        xff = None
        for k, v in scope["headers"]:
            if k == b"x-request-id":
                rid = v
            elif k == b"x-forwarded-for":
                xff = v
        request_id = rid.decode() if rid and _SANE_ID.match(rid) else uuid.uuid4().hex
        client = scope.get("client")
        peer = client[0] if client else "unknown"
        client_ip = self.rt.trusted.client_ip(peer, xff.decode("latin-1") if xff else None)
        matched = self.table.match(scope)
        if matched is None:
            return None, request_id, client_ip
        route, params = matched
        return RequestContext(scope, route, params, request_id, client_ip), request_id, client_ip

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = time.perf_counter()
        ctx, request_id, client_ip = self._context(scope)
        rid_header = (b"x-request-id", request_id.encode())
        status = 0

        async def send_with_id(msg: Message) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
                msg["headers"] = [*msg.get("headers", ()), rid_header]
            await send(msg)

        if scope["path"].startswith("/_edge/"):
            await self.edge(scope, receive, send_with_id, ctx, client_ip)
            self._finish("_edge", scope, status, start, request_id, client_ip, None, [])
            return
        if ctx is None:
            await send_error(send_with_id, 404, "no_route", "no route matches this request")
            self._finish("none", scope, 404, start, request_id, client_ip, None, [])
            return
        route = ctx.route
        handler = route.handler
        assert handler is not None
        self._in_flight.inc()
        try:
            await handler(ctx, receive, send_with_id)
        except ClientGone:
            status = 499
            ctx.notes.append("client_gone")
        except TruncatedResponse:
            raise
        except Exception:
            log.exception("unhandled error", extra={"request_id": request_id, "route": route.name})
            if status == 0:
                await send_error(
                    send_with_id, 500, "internal_error", "the gateway failed to handle this request"
                )
                status = 500
            else:
                raise
        finally:
            self._in_flight.dec()
            self._finish(
                route.name,
                scope,
                ctx.status or status,
                start,
                request_id,
                client_ip,
                ctx.upstream_seconds,
                ctx.notes,
            )

    def _finish(
        self,
        route: str,
        scope: Scope,
        status: int,
        start: float,
        request_id: str,
        client_ip: str,
        upstream: float | None,
        notes: list[str],
    ) -> None:
        duration = time.perf_counter() - start
        method = scope.get("method", "GET")
        self._requests.labels(route, method, str(status)).inc()
        self._latency.labels(route).observe(duration)
        if self._access_log:
            logs.access(
                request_id=request_id,
                route=route,
                method=method,
                path=scope["path"],
                status=status,
                duration=duration,
                upstream=upstream,
                client_ip=client_ip,
                notes=notes,
            )

    async def websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = time.perf_counter()
        ctx, request_id, client_ip = self._context(scope)
        if ctx is None:
            await send({"type": "websocket.close", "code": 1008})
            return
        handler = self.ws_handlers[ctx.route.name]
        try:
            await handler(ctx, receive, _ws_send_adapter(send, ctx))
        finally:
            self._finish(
                ctx.route.name, scope, ctx.status, start, request_id, client_ip, None, ctx.notes
            )


def _ws_send_adapter(send: Send, ctx: RequestContext) -> Send:
    """Policies answer with http.response.* messages; on a WebSocket scope those become
    the websocket.http.response extension (or a plain close if unsupported)."""
    supports = "websocket.http.response" in ctx.scope.get("extensions", {})

    async def wrapped(msg: Message) -> None:
        t = msg["type"]
        if t == "http.response.start":
            ctx.status = msg["status"]
            if supports:
                await send({**msg, "type": "websocket.http.response.start"})
            else:
                await send({"type": "websocket.close", "code": 1008})
            return
        if t == "http.response.body":
            if supports:
                await send(
                    {
                        "type": "websocket.http.response.body",
                        "body": msg.get("body", b""),
                        "more_body": msg.get("more_body", False),
                    }
                )
            return
        await send(msg)

    return wrapped


def create_app(config: GatewayConfig, **runtime_kwargs: Any) -> Gateway:
    return Gateway(config, Runtime(config, **runtime_kwargs))
