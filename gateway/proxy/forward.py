"""The streaming forwarder: HTTP and WebSocket, to a named upstream.

Owns: one aiohttp ClientSession per upstream (opened in lifespan, `auto_decompress=False`
so bytes pass through untouched), request/response header rewriting (hop-by-hop and
Connection-nominated headers dropped both ways, X-Forwarded-*, X-Request-Id, inbound
X-Edge-* stripped), body streaming in both directions with the `max_body_bytes` cap,
client-disconnect cancellation, and the 502/504 JSON answers when the upstream fails.

The upstream URL is always the configured base plus the request's raw path and query, so
the upstream host never comes from the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from gateway.config import ServerConfig, UpstreamConfig
from gateway.headers import drop_underscore_name, valid_authority
from gateway.http import Headers, Message, Receive, RequestContext, Scope, Send, send_error
from gateway.net import TrustedProxies
from gateway.observability.metrics import Metrics
from gateway.pool import ATTEMPT, Attempt, PoolConnector
from gateway.protocol import CLIENT_LOST, ClientLost
from gateway.redirects import REWRITTEN, RedirectRewriter

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
# Request headers the gateway sets itself (or must never pass on from the client).
_REQUEST_REWRITTEN = HOP_BY_HOP | {
    b"host",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"forwarded",
    b"x-request-id",
    b"content-length",
    b"expect",
}
_WS_SKIP = _REQUEST_REWRITTEN | {
    b"sec-websocket-key",
    b"sec-websocket-version",
    b"sec-websocket-extensions",
    b"sec-websocket-protocol",
    b"sec-websocket-accept",
}
_RESPONSE_SKIP = HOP_BY_HOP | {b"x-request-id"}
_EDGE_PREFIX = b"x-edge-"
# Bodies up to this size (with a Content-Length) are read before the upstream call: one
# receive() in practice, and aiohttp then sends headers and body in one write.
_PREREAD_LIMIT = 64 * 1024


class BodyTooLarge(Exception):
    pass


def _nominated(headers: list[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Header names listed in Connection (RFC 9110 7.6.1) are hop-by-hop too."""
    names: set[bytes] = set()
    for k, v in headers:
        if k.lower() == b"connection":
            names.update(t.strip().lower() for t in v.split(b",") if t.strip())
    return frozenset(names)


class UpstreamObserver(Protocol):
    """Sees upstream answers and WebSocket closes (the alert recorder,
    gateway/observability/alerts.py). None on the Upstream when alerting is off."""

    def answered(self, ctx: RequestContext, status: int, seconds: float | None) -> None: ...

    def ws_closed(self, ctx: RequestContext, route: str, by: str) -> None: ...


@dataclass
class Upstream:
    """A configured upstream and its connection pool."""

    name: str
    config: UpstreamConfig
    session: aiohttp.ClientSession | None = None
    observer: UpstreamObserver | None = None

    def __post_init__(self) -> None:
        url = URL(self.config.url)
        self.base = self.config.url
        self.host_header = url.raw_authority
        self.timeout = _timeout(self.config, self.config.read_timeout)

    async def open(self) -> None:
        if self.session is not None:
            return
        connector = PoolConnector(
            pool_timeout=self.config.pool_timeout,
            limit=self.config.max_connections,
            limit_per_host=self.config.max_connections,
            keepalive_timeout=self.config.keepalive_timeout,
            ttl_dns_cache=30,
            enable_cleanup_closed=False,
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            timeout=self.timeout,
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    def note_keep_alive(self, protocol: Any, resp: aiohttp.ClientResponse) -> None:
        """Retire the answer's connection before the upstream's Keep-Alive timeout."""
        keep_alive = resp.headers.get("Keep-Alive")
        if keep_alive is not None and self.session is not None:
            connector = self.session.connector
            if isinstance(connector, PoolConnector):
                connector.note_keep_alive(protocol, keep_alive)

    def url(self, scope: Scope) -> URL:
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        # Some servers put the query in raw_path; the query string is appended once.
        raw = raw_path.split(b"?", 1)[0].decode("latin-1")
        qs: bytes = scope.get("query_string", b"")
        target = self.base + raw + ("?" + qs.decode("latin-1") if qs else "")
        return URL(target, encoded=True)


def _classify(exc: BaseException) -> tuple[int, str, str]:
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return 504, "upstream_timeout", "upstream connect timed out"
    if isinstance(exc, (aiohttp.ServerTimeoutError, asyncio.TimeoutError)):
        return 504, "upstream_timeout", "upstream did not answer in time"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return 502, "upstream_unavailable", "upstream refused or unreachable"
    return 502, "bad_gateway", "upstream connection failed"


def _timeout(cfg: UpstreamConfig, read_timeout: float) -> aiohttp.ClientTimeout:
    """`connect` is the outer bound of the pool wait (`pool_timeout`, PoolConnector)
    plus the TCP connect (`connect_timeout`, sock_connect), so a saturated pool cannot
    queue requests inside the gateway without limit."""
    return aiohttp.ClientTimeout(
        total=None,
        connect=cfg.pool_timeout + cfg.connect_timeout,
        sock_connect=cfg.connect_timeout,
        sock_read=read_timeout,
    )


class UpstreamFailure(Exception):
    """Raised by `Proxy.fetch` when no upstream response was obtained."""

    def __init__(self, status: int, code: str, message: str, kind: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.kind = kind


class Proxy:
    """Terminal handler of a route: forwards to one upstream and streams the answer."""

    def __init__(
        self,
        upstream: Upstream,
        server: ServerConfig,
        trusted: TrustedProxies,
        metrics: Metrics,
        read_timeout: float | None = None,
    ) -> None:
        self.upstream = upstream
        self.max_body = server.max_body_bytes
        # Client-IP / URL-override headers (GoTrue rate-limits by Sb-Forwarded-For, IIS
        # and Symfony route by X-Original-URL): a client must not set them through us.
        self.strip = frozenset(h.encode() for h in server.strip_request_headers)
        self.allow_underscore = server.allow_underscore_headers
        self.underscore_forbidden = _WS_SKIP | self.strip
        # Client request headers never passed on, per skip set (with `strip` folded in).
        self._drop: dict[frozenset[bytes], frozenset[bytes]] = {}
        # X-Real-IP is the gateway's to set unless the config lets the client's through.
        self._own_real_ip = b"x-real-ip" in self.strip
        self.trusted = trusted
        self.metrics = metrics
        self.timeout = _timeout(upstream.config, read_timeout) if read_timeout else None
        self.redirects = (
            RedirectRewriter(upstream.config, trusted)
            if upstream.config.rewrite_redirects
            else None
        )
        self._req_counter = metrics.upstream_status
        self._err_counter = metrics.upstream_error
        self._latency = metrics.upstream_latency.labels(upstream.name)
        self._retries = metrics.upstream_retries.labels(upstream.name, "stale_connection")

    # ------------------------------------------------------------------ headers

    def request_headers(self, ctx: RequestContext, skip: frozenset[bytes]) -> CIMultiDict[str]:
        """The upstream request's headers: one pass over the client's, one CIMultiDict
        built from a list (4-5 µs for a browser's 15 headers instead of 8)."""
        scope = ctx.scope
        drop = self._drop.get(skip)
        if drop is None:
            drop = self._drop[skip] = skip | self.strip
        pairs: list[tuple[str, str]] = []
        xff: list[bytes] = []
        conn: list[bytes] = []
        proto = fhost = host = None
        for k, v in scope["headers"]:
            if (
                k in drop
                or k.startswith(_EDGE_PREFIX)
                # CGI-style frameworks read Transfer_Encoding as Transfer-Encoding.
                or (
                    b"_" in k
                    and drop_underscore_name(k, self.allow_underscore, self.underscore_forbidden)
                )
            ):
                if k == b"x-forwarded-for":
                    xff.append(v)  # several lines form one list, in order
                elif k == b"x-forwarded-proto":
                    proto = v
                elif k == b"x-forwarded-host":
                    fhost = v
                elif k == b"host":
                    host = v
                elif k == b"connection":
                    conn.append(v)
                continue
            pairs.append((k.decode("latin-1"), v.decode("latin-1")))
        if conn:
            nominated = _nominated([(b"connection", v) for v in conn]) - drop
            if nominated:
                pairs = [(k, v) for k, v in pairs if k.encode("latin-1") not in nominated]
        peer = scope["client"][0] if scope.get("client") else ctx.client_ip
        self._forwarded(pairs, ctx, peer, xff, proto, fhost, host)
        out: CIMultiDict[str] = CIMultiDict(pairs)
        if not self._own_real_ip:
            out["X-Real-IP"] = ctx.client_ip
        for k, v in ctx.upstream_headers:
            out[k.decode("latin-1")] = v.decode("latin-1")
        return out

    def _forwarded(
        self,
        pairs: list[tuple[str, str]],
        ctx: RequestContext,
        peer: str,
        xff: list[bytes],
        proto: bytes | None,
        fhost: bytes | None,
        host: bytes | None,
    ) -> None:
        """Append X-Forwarded-*, X-Real-IP, Host and X-Request-Id (every one of these
        names was dropped from the client's headers)."""
        trusted_peer = self.trusted.is_trusted(peer)
        if trusted_peer and xff:
            pairs.append(("X-Forwarded-For", b", ".join(xff).decode("latin-1") + ", " + peer))
        else:
            pairs.append(("X-Forwarded-For", peer))
        if self._own_real_ip:
            pairs.append(("X-Real-IP", ctx.client_ip))
        pairs.append(
            (
                "X-Forwarded-Proto",
                proto.decode("latin-1")
                if trusted_peer and proto
                else ctx.scope.get("scheme", "http"),
            )
        )
        # Only a valid host[:port] becomes X-Forwarded-Host (app.py already refused a bad
        # Host). From a trusted proxy the first of a list is the client's (as redirects.py
        # reads it); an invalid one falls back to the Host.
        if fhost is not None:
            fhost = fhost.split(b",", 1)[0].strip()
        fwd_host = fhost if trusted_peer and fhost and valid_authority(fhost) else host
        if fwd_host and valid_authority(fwd_host):
            pairs.append(("X-Forwarded-Host", fwd_host.decode("latin-1")))
        if self.upstream.config.preserve_host and host:
            pairs.append(("Host", host.decode("latin-1")))
        else:
            pairs.append(("Host", self.upstream.host_header))
        pairs.append(("X-Request-Id", ctx.request_id))

    def response_headers(self, resp: aiohttp.ClientResponse, scope: Scope) -> Headers:
        raw = resp.raw_headers
        nominated = _nominated(list(raw))
        out: Headers = []
        redirect = False
        for k, v in raw:
            lk = k.lower()
            if lk in _RESPONSE_SKIP or lk in nominated:
                continue
            redirect = redirect or lk in REWRITTEN
            out.append((lk, v))
        if redirect and self.redirects is not None:
            return self.redirects.rewrite(out, scope)
        return out

    # ------------------------------------------------------------------ HTTP

    async def __call__(self, ctx: RequestContext, receive: Receive, send: Send) -> None:
        """Forward and stream the response to the client; a client that goes away cancels
        the upstream call (the upstream connection is closed, as nginx does)."""
        watch = DisconnectWatch(receive, ctx)
        try:
            try:
                resp = await self.fetch(ctx, receive, watch)
            except BodyTooLarge:
                await send_error(
                    send,
                    413,
                    "payload_too_large",
                    f"request body exceeds {self.max_body} bytes",
                    ctx.response_headers,
                )
                return
            except UpstreamFailure as exc:
                await send_error(send, exc.status, exc.code, str(exc), ctx.response_headers)
                return
            await self.stream_response(ctx, resp, receive, send, watch=watch)
        except asyncio.CancelledError:
            if not watch.gone:
                raise
            watch.uncancel()
            ctx.notes.append("client_gone")
            ctx.status = 499
        finally:
            watch.stop()

    async def fetch(
        self, ctx: RequestContext, receive: Receive, watch: DisconnectWatch | None = None
    ) -> aiohttp.ClientResponse:
        """Send the request upstream and return the response with its body unread. Raises
        BodyTooLarge or UpstreamFailure. The caller must release the response. With a
        `watch`, a client disconnect after the body was read cancels the call."""
        headers = self.request_headers(ctx, _REQUEST_REWRITTEN)
        data = await self._request_body(ctx, receive, headers, watch)
        streamed = isinstance(data, AsyncIterator)
        if watch is not None and streamed:
            watch.body_done = False
        if watch is not None and watch.body_done:
            watch.start()
        t0 = time.perf_counter()
        name = self.upstream.name
        try:
            resp = await self._send(ctx, headers, data)
        except (BodyTooLarge, ClientGone):
            raise
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            if _caused_by(exc, BodyTooLarge):
                raise BodyTooLarge from None
            if _caused_by(exc, ClientGone):
                raise ClientGone from None
            status, code, message = _classify(exc)
            kind = code.removeprefix("upstream_")
            self._err_counter(name, kind).inc()
            ctx.upstream_seconds = time.perf_counter() - t0
            if (obs := self.upstream.observer) is not None:
                # Unreachable counts as the upstream failing (upstream_5xx_per_min).
                obs.answered(ctx, status, None)
            raise UpstreamFailure(status, code, message, kind) from None
        elapsed = time.perf_counter() - t0
        ctx.upstream_seconds = elapsed
        self._latency.observe(elapsed)
        self._req_counter(name, str(resp.status)).inc()
        if (obs := self.upstream.observer) is not None:
            # A streamed request body makes the time partly the client's upload.
            obs.answered(ctx, resp.status, None if streamed else elapsed)
        return resp

    async def _request_body(
        self,
        ctx: RequestContext,
        receive: Receive,
        headers: CIMultiDict[str],
        watch: DisconnectWatch | None,
    ) -> Any:
        """The body to send: None, the whole of a small one (bytes), or a stream."""
        length = ctx.header(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                raise UpstreamFailure(400, "bad_request", "invalid Content-Length", "") from None
            if n > self.max_body:
                raise BodyTooLarge
            headers["Content-Length"] = str(n)
            if n <= _PREREAD_LIMIT:
                return await read_body(receive, self.max_body)
            return _stream_body(receive, self.max_body, watch)
        chunked = ctx.header(b"transfer-encoding")
        if chunked is not None:
            if chunked.strip().lower() != b"chunked":
                # A transfer coding we would silently drop (gzip, chunked) corrupts the
                # body upstream; refuse it as Envoy does.
                raise UpstreamFailure(501, "not_implemented", "unsupported Transfer-Encoding", "")
            return _stream_body(receive, self.max_body, watch)
        return None

    async def _send(
        self, ctx: RequestContext, headers: CIMultiDict[str], data: Any
    ) -> aiohttp.ClientResponse:
        """One upstream call. A request that failed on a reused connection before any
        answer (the upstream closed it while idle) is sent once more on a new
        connection, whatever its method, when its body can be sent again (none, or
        read whole); a streamed upload that already left cannot be."""
        session = self.upstream.session
        assert session is not None, "upstream session not opened (lifespan not run?)"
        scope = ctx.scope
        kwargs: dict[str, Any] = {"timeout": self.timeout} if self.timeout else {}
        attempt = Attempt()
        token = ATTEMPT.set(attempt)
        try:
            while True:
                try:
                    resp = await session.request(
                        scope["method"],
                        self.upstream.url(scope),
                        headers=headers,
                        data=data,
                        allow_redirects=False,
                        **kwargs,
                    )
                except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                    if (
                        attempt.fresh
                        or not attempt.reused
                        or isinstance(exc, aiohttp.ClientConnectorError)
                        or isinstance(data, AsyncIterator)
                    ):
                        raise
                    attempt.fresh = True
                    self._retries.inc()
                    ctx.notes.append("upstream_retry")
                    continue
                self.upstream.note_keep_alive(attempt.protocol, resp)
                return resp
        finally:
            ATTEMPT.reset(token)

    async def stream_response(
        self,
        ctx: RequestContext,
        resp: aiohttp.ClientResponse,
        receive: Receive,
        send: Send,
        extra_headers: Headers | None = None,
        watch: DisconnectWatch | None = None,
    ) -> None:
        headers = self.response_headers(resp, ctx.scope)
        if ctx.response_headers:
            headers.extend(ctx.response_headers)
        if extra_headers:
            headers.extend(extra_headers)
        own_watch = watch is None
        if watch is None:
            watch = DisconnectWatch(receive, ctx)
        # The request body is fully read once the upstream has answered, so from here
        # a receive() can only report the client going away.
        watch.start()
        try:
            await send({"type": "http.response.start", "status": resp.status, "headers": headers})
            content = resp.content
            chunk = b"" if ctx.scope["method"] == "HEAD" else await content.readany()
            while True:
                if not chunk or content.at_eof():
                    watch.done = True
                    await send({"type": "http.response.body", "body": chunk, "more_body": False})
                    break
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                chunk = await content.readany()
        except asyncio.CancelledError:
            if not own_watch or not watch.gone:
                raise
            watch.uncancel()
            ctx.notes.append("client_gone")
            ctx.status = 499
        except (TimeoutError, aiohttp.ClientError) as exc:
            # Headers are already out: the only honest signal left is to cut the
            # connection, so the client cannot mistake a truncated body for a whole one.
            kind = _classify(exc)[1].removeprefix("upstream_")
            self._err_counter(self.upstream.name, kind).inc()
            ctx.notes.append("upstream_truncated")
            raise TruncatedResponse from None
        finally:
            if own_watch:
                watch.stop()
            resp.release()


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
        self.task = asyncio.current_task()
        self.watcher: asyncio.Future[None] | None = None
        # The connection's hook only for the connection's own receive (see RequestContext).
        ext = ctx.scope.get("extensions") if ctx is not None and receive is ctx.receive else None
        self.lost: ClientLost | None = ext.get(CLIENT_LOST) if ext else None
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


class TruncatedResponse(Exception):
    """The upstream failed after the response started; app.py closes the connection."""


def _caused_by(exc: BaseException, cls: type[BaseException]) -> bool:
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return False
        if isinstance(seen, cls):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


async def read_body(receive: Receive, limit: int) -> bytes:
    """Read a whole request body (for small bodies and policies that must see it)."""
    chunks = [chunk async for chunk in _stream_body(receive, limit)]
    if len(chunks) == 1:
        return chunks[0]
    return b"".join(chunks)


class ClientGone(Exception):
    """The client disconnected before its request body arrived."""


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
                raise BodyTooLarge
            yield body
        if not msg.get("more_body", False):
            if watch is not None:
                watch.body_done = True
                watch.start()
            return


# ---------------------------------------------------------------------- WebSocket


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
        self.http = Proxy(upstream, server, trusted, metrics)
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
        headers = self.http.request_headers(ctx, _WS_SKIP)
        headers.popall("Host", None)
        headers["Host"] = self.upstream.host_header
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
            status, code, message = _classify(exc)
            await self._refuse(scope, send, status, code, message)
            ctx.status = status
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
            from gateway.http import JSON_CT, error_body

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
