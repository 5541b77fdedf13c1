"""Builds the public ASGI app from config.

Owns: the request pipeline's shape: route match → the route's policy chain, built by
walking the registry in gateway/policies/__init__.py (auth → rate limit → refresh |
heartbeat | cache → concurrency → breaker; the order is written down there) → proxy.
Also: request ids, the per-request context, the access log and request metrics, edge
endpoints under /_edge/, lifespan.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from dataclasses import dataclass, field
from random import getrandbits as _randbits
from typing import Any

from gateway.config import GatewayConfig
from gateway.edge import edge_routes
from gateway.headers import host_problem
from gateway.health import ErrorRatio
from gateway.http import (
    Handler,
    Message,
    Receive,
    RequestContext,
    Scope,
    Send,
    send_error,
)
from gateway.observability.collectors import fast
from gateway.policies import POLICIES
from gateway.proxy import ClientGone, Proxy, TruncatedResponse, WebSocketProxy
from gateway.routing import CompiledRoute, RouteTable, unsafe_path
from gateway.runtime import Runtime

log = logging.getLogger("gateway")

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_SANE_ID = re.compile(rb"^[A-Za-z0-9._:\-]{1,128}$")


def build_chain(route: CompiledRoute, rt: Runtime) -> Handler:
    """Compose one route's handlers, innermost (proxy) first, walking the policy registry
    (gateway/policies/__init__.py) from its end. Each policy is built once here and keeps
    no per-request state on itself."""
    cfg = route.config
    upstream = rt.upstreams[cfg.upstream]
    handler: Handler = Proxy(upstream, rt.config.server, rt.trusted, rt.metrics, cfg.read_timeout)
    for spec in reversed(POLICIES):
        if spec.enabled(cfg):
            handler = spec.build(handler, cfg, rt)
    return handler


def build_ws_chain(route: CompiledRoute, rt: Runtime) -> Handler:
    """The WebSocket chain: the policies that declare `websocket`, then the proxy."""
    cfg = route.config
    handler: Handler = WebSocketProxy(
        rt.upstreams[cfg.upstream], rt.config.server, rt.trusted, rt.metrics, cfg.name
    )
    for spec in reversed(POLICIES):
        if spec.websocket and spec.enabled(cfg):
            handler = spec.build(handler, cfg, rt)
    return handler


@dataclass(slots=True)
class Outcome:
    """What the access log and the request metrics record about one request, filled in
    as the request goes (status from the response start, route once matched)."""

    start: float
    route: str = "none"
    status: int = 0
    request_id: str = ""
    client_ip: str = ""
    # Seconds spent on the upstream call; None when the proxy was not reached.
    upstream: float | None = None
    notes: list[str] = field(default_factory=list)


@dataclass(eq=False)
class _State:
    """One config's worth of pipeline. Requests read `Gateway.state` once, so a reload
    swaps it atomically and in-flight requests finish on the state they started with."""

    rt: Runtime
    table: RouteTable
    ws_handlers: dict[str, Handler]
    health: ErrorRatio
    in_flight: int = 0
    # Set by a reload: fires when the last in-flight request of this state finishes.
    idle: asyncio.Event | None = None

    def leave(self) -> None:
        self.in_flight -= 1
        if self.idle is not None and self.in_flight == 0:
            self.idle.set()


class Gateway:
    """The public ASGI application."""

    def __init__(self, config: GatewayConfig, runtime: Runtime | None = None) -> None:
        self.state = self._build(runtime or Runtime(config))
        m = self.rt.metrics
        self._requests = m.requests
        self._latency = m.latency
        self._in_flight = fast(m.in_flight)  # lock-free: one event-loop thread
        self._retired: set[asyncio.Task[None]] = set()
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    @property
    def rt(self) -> Runtime:
        return self.state.rt

    @property
    def config(self) -> GatewayConfig:
        return self.state.rt.config

    @staticmethod
    def _build(rt: Runtime) -> _State:
        table = RouteTable(rt.config.routes, edge_routes(rt))
        ws_handlers: dict[str, Handler] = {}
        for route in table.routes:
            route.handler = build_chain(route, rt)
            ws_handlers[route.name] = build_ws_chain(route, rt)
        if rt.config.alerts.webhooks:
            from gateway.observability.alerts import AlertRecorder

            AlertRecorder.install(rt)
        return _State(rt, table, ws_handlers, rt.upstream_health)

    async def reload(self, config: GatewayConfig) -> list[str]:
        """Swap in a validated config for new requests. Returns the changes that only a
        restart applies (listeners, workers). The store and metrics carry over when the
        store section is unchanged; per-process policy state (breakers, caches of
        verified tokens) starts fresh with the new policies."""
        old = self.state
        old_cfg = old.rt.config
        restart = [
            key
            for key, a, b in (
                ("server.listen", old_cfg.server.listen, config.server.listen),
                ("server.admin_listen", old_cfg.server.admin_listen, config.server.admin_listen),
                ("server.workers", old_cfg.server.workers, config.server.workers),
                ("server.reuse_port", old_cfg.server.reuse_port, config.server.reuse_port),
            )
            if a != b
        ]
        share_store = config.store == old_cfg.store
        rt = Runtime(
            config,
            store=old.rt.store if share_store else None,
            metrics=old.rt.metrics,
            clock=old.rt.clock,
            monotonic=old.rt.monotonic,
        )
        rt.owns_store = not share_store
        state = self._build(rt)
        await rt.start()
        rt.draining = old.rt.draining
        self.state = state
        task = asyncio.ensure_future(self._retire(old, keep_store=share_store))
        self._retired.add(task)
        task.add_done_callback(self._retired.discard)
        return restart

    async def _retire(self, old: _State, keep_store: bool) -> None:
        """Stop the previous state once its in-flight requests are done (bounded by the
        drain timeout), running its shutdown hooks (e.g. a final heartbeat flush)."""
        old.idle = asyncio.Event()
        if old.in_flight:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(old.idle.wait(), old.rt.config.server.drain_timeout)
        if keep_store:
            old.rt.owns_store = False
        await old.rt.stop()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The HTTP pipeline, inline: every suspension of a request's task passes through
        each coroutine frame of its chain, so the hot path keeps that chain short."""
        if scope["type"] != "http":
            await self.other(scope, receive, send)
            return
        state = self.state
        out = Outcome(time.perf_counter())
        ctx, out.request_id, out.client_ip = self._context(state, scope, receive)
        rid_header = (b"x-request-id", out.request_id.encode())

        async def send_with_id(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                out.status = msg["status"]
                msg["headers"] = [*msg.get("headers", ()), rid_header]
            await send(msg)

        refused = _refusal(scope)
        if refused is not None or ctx is None:
            await send_error(send_with_id, *(refused or _NO_ROUTE))
            self._finish(state, scope, out)
            return
        route = ctx.route
        out.route = route.name
        handler = route.handler
        assert handler is not None
        self._in_flight.inc()
        state.in_flight += 1
        try:
            await handler(ctx, receive, send_with_id)
        except ClientGone:
            out.status = 499
            ctx.notes.append("client_gone")
        except TruncatedResponse:
            raise
        except Exception:
            log.exception(
                "unhandled error", extra={"request_id": out.request_id, "route": route.name}
            )
            if out.status != 0:
                raise
            await send_error(
                send_with_id, 500, "internal_error", "the gateway failed to handle this request"
            )
            out.status = 500
        finally:
            # Whatever happened, the outcome is recorded.
            self._in_flight.dec()
            state.leave()
            out.status = ctx.status or out.status
            out.upstream = ctx.upstream_seconds
            out.notes = ctx.notes
            self._finish(state, scope, out)

    async def other(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI scopes other than http."""
        kind = scope["type"]
        if kind == "websocket":
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
                for task in list(self._retired):
                    await task
                await self.rt.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _context(
        self, state: _State, scope: Scope, receive: Receive | None = None
    ) -> tuple[RequestContext | None, str, str]:
        rid = None
        xff = None
        for k, v in scope["headers"]:
            if k == b"x-request-id":
                rid = v
            elif k == b"x-forwarded-for":
                xff = v
        # A request id needs to be unique, not secret: the Mersenne Twister's 128 bits
        # (reseeded in every forked worker) skip the getrandom() syscall of os.urandom.
        request_id = rid.decode() if rid and _SANE_ID.match(rid) else f"{_randbits(128):032x}"
        client = scope.get("client")
        peer = client[0] if client else "unknown"
        client_ip = state.rt.trusted.client_ip(peer, xff.decode("latin-1") if xff else None)
        matched = state.table.match(scope)
        if matched is None:
            return None, request_id, client_ip
        route, params = matched
        ctx = RequestContext(scope, route, params, request_id, client_ip, receive=receive)
        return ctx, request_id, client_ip

    def _finish(self, state: _State, scope: Scope, out: Outcome) -> None:
        duration = time.perf_counter() - out.start
        method = scope.get("method", "GET")
        if method not in _METHODS:
            method = "OTHER"  # the method is the client's: keep label cardinality bounded
        # Children are cached: labels() costs a lock and a dict build per call.
        key = (out.route, method, out.status)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (
                fast(self._requests.labels(out.route, method, str(out.status))),
                fast(self._latency.labels(out.route)),
            )
        children[0].inc()
        children[1].observe(duration)
        if out.upstream is not None:  # the proxy reached (or tried) the upstream
            state.health.record(out.status)
        access_log = state.rt.access_log
        if access_log is not None:
            access_log.write(
                request_id=out.request_id,
                route=out.route,
                method=method,
                path=scope["path"],
                status=out.status,
                duration=duration,
                upstream=out.upstream,
                client_ip=out.client_ip,
                notes=out.notes,
            )

    async def websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = self.state
        out = Outcome(time.perf_counter())
        ctx, out.request_id, out.client_ip = self._context(state, scope)
        if ctx is None or _refusal(scope) is not None:
            await send({"type": "websocket.close", "code": 1008})
            return
        out.route = ctx.route.name
        handler = state.ws_handlers[ctx.route.name]
        state.in_flight += 1
        try:
            await handler(ctx, receive, _ws_send_adapter(send, ctx))
        finally:
            state.leave()
            out.status = ctx.status
            out.notes = ctx.notes
            self._finish(state, scope, out)


_VERSIONS = frozenset(("1.0", "1.1"))
_NO_ROUTE = (404, "no_route", "no route matches this request")


def _refusal(scope: Scope) -> tuple[int, str, str] | None:
    """(status, code, message) of an answer decided before routing: an HTTP version the
    gateway does not speak, a Host the app could read differently, or a path its URL
    parser could."""
    if scope.get("http_version", "1.1") not in _VERSIONS:
        # llhttp accepts `GET /` (HTTP/0.9: no headers, so no Host and no framing) and
        # any `HTTP/x.y` line; the upstream call is HTTP/1.1 whatever the client said.
        # Envoy refuses 0.9 and nginx answers 505 to 2.0 and above on this framing.
        return 505, "http_version_not_supported", "only HTTP/1.0 and HTTP/1.1 are served"
    problem = host_problem(scope)
    if problem is not None:
        return 400, "bad_host", problem
    if unsafe_path(scope):
        return 400, "bad_path", "dot segments, empty segments and encoded slashes are refused"
    return None


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
