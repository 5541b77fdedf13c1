"""The HTTP forwarder: a route's terminal handler.

Owns: one forwarded request from end to end (headers rewritten by
gateway/proxy/headers.py, the body framed by gateway/proxy/body.py, one upstream
exchange with the one resend a stale pooled connection allows, the answer streamed back
with `stream_response`), the upstream metrics and observer, client-disconnect
cancellation (gateway/proxy/watch.py), and the JSON answers for what went wrong
(413/400/501 for the client's faults, 502/504 for the upstream's).
"""

from __future__ import annotations

import asyncio
import time

from gateway.config import ServerConfig
from gateway.http import Receive, RequestContext, Send, send_error
from gateway.net import TrustedProxies
from gateway.observability.collectors import fast
from gateway.observability.metrics import Metrics
from gateway.proxy.body import Body, BodyStream, frame_body
from gateway.proxy.client import UpstreamResponse, request_head
from gateway.proxy.errors import (
    ClientRequestError,
    ConnectionDropped,
    TruncatedResponse,
    UpstreamError,
    UpstreamFailure,
)
from gateway.proxy.headers import REQUEST_REWRITTEN, HeaderRewriter
from gateway.proxy.upstream import Upstream
from gateway.proxy.watch import DisconnectWatch
from gateway.redirects import RedirectRewriter


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
        cfg = upstream.config
        self.read_timeout = read_timeout or cfg.read_timeout
        self.headers = HeaderRewriter(
            server,
            trusted,
            upstream.host_bytes,
            cfg.preserve_host,
            RedirectRewriter(cfg, trusted) if cfg.rewrite_redirects else None,
        )
        self.metrics = metrics
        self._req_counter = metrics.upstream_status
        self._err_counter = metrics.upstream_error
        self._latency = fast(metrics.upstream_latency.labels(upstream.name))
        self._retries = metrics.upstream_retries.labels(upstream.name, "stale_connection")

    async def __call__(self, ctx: RequestContext, receive: Receive, send: Send) -> None:
        """Forward and stream the response to the client; a client that goes away cancels
        the upstream call (the upstream connection is closed, as nginx does)."""
        watch = DisconnectWatch(receive, ctx)
        try:
            try:
                resp = await self.fetch(ctx, receive, watch)
            except ClientRequestError as exc:
                await send_error(send, exc.status, exc.code, str(exc), ctx.response_headers)
                return
            except UpstreamFailure as exc:
                await send_error(send, exc.status, exc.code, str(exc), ctx.response_headers)
                return
            # The request body is fully read once the upstream has answered, so from here
            # a receive() can only report the client going away.
            watch.start()
            await self.stream_response(ctx, resp, send, watch)
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
    ) -> UpstreamResponse:
        """Send the request upstream and return the answer with its body unread (the
        caller releases it). Raises ClientRequestError, ClientGone or UpstreamFailure.
        With a `watch`, a client disconnect after the body was read cancels the call."""
        scope = ctx.scope
        headers = self.headers.request(ctx, REQUEST_REWRITTEN)
        body, length = await frame_body(ctx, receive, self.max_body, watch)
        streamed = isinstance(body, BodyStream)
        if watch is not None:
            if streamed:
                watch.body_done = False
            elif watch.body_done:
                watch.start()
        method = scope["method"].encode("latin-1")
        head = request_head(method, self.upstream.target(scope), headers, body, length)
        t0 = time.perf_counter()
        try:
            resp = await self._send(ctx, head, body, method == b"HEAD")
        except UpstreamError as exc:
            self._err_counter(self.upstream.name, exc.kind).inc()
            ctx.upstream_seconds = time.perf_counter() - t0
            if (obs := self.upstream.observer) is not None:
                # Unreachable counts as the upstream failing (upstream_5xx_per_min).
                obs.answered(ctx, exc.status, None)
            raise exc.failure() from None
        elapsed = time.perf_counter() - t0
        ctx.upstream_seconds = elapsed
        self._latency.observe(elapsed)
        self._req_counter(self.upstream.name, str(resp.status)).inc()
        if (obs := self.upstream.observer) is not None:
            # A streamed request body makes the time partly the client's upload.
            obs.answered(ctx, resp.status, None if streamed else elapsed)
        return resp

    async def _send(
        self, ctx: RequestContext, head: bytes, body: Body, is_head: bool
    ) -> UpstreamResponse:
        """One upstream exchange. A request that a reused connection dropped before any
        answer (the upstream closed it while idle) is sent once more on a new
        connection, whatever its method, when its body can be sent again (none, or
        read whole); a streamed upload that already left cannot be."""
        upstream = self.upstream
        try:
            return await upstream.send(head, body, is_head, self.read_timeout, False)
        except ConnectionDropped as exc:
            if not exc.stale or isinstance(body, BodyStream):
                raise
        self._retries.inc()
        ctx.notes.append("upstream_retry")
        return await upstream.send(head, body, is_head, self.read_timeout, True)

    async def stream_response(
        self, ctx: RequestContext, resp: UpstreamResponse, send: Send, watch: DisconnectWatch
    ) -> None:
        """Send the answer's head, then its body as it arrives; the last piece goes with
        `more_body: False` (a small answer is one send, and one write)."""
        headers = self.headers.response(resp.headers, ctx.scope)
        if ctx.response_headers:
            headers.extend(ctx.response_headers)
        try:
            await send({"type": "http.response.start", "status": resp.status, "headers": headers})
            chunk = await resp.read()
            while True:
                if not chunk or resp.at_eof():
                    watch.done = True
                    await send({"type": "http.response.body", "body": chunk, "more_body": False})
                    break
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                chunk = await resp.read()
        except UpstreamError as exc:
            # Headers are already out: the only honest signal left is to cut the
            # connection, so the client cannot mistake a truncated body for a whole one.
            self._err_counter(self.upstream.name, exc.kind).inc()
            ctx.notes.append("upstream_truncated")
            raise TruncatedResponse from None
        finally:
            resp.release()
