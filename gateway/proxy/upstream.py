"""A configured upstream and its connections.

Owns: `Upstream` (the URL split once into what a request needs: host, port, TLS, base
path, Host header), its keep-alive pool for proxied HTTP (gateway/proxy/pool.py and the
proxy's own client, gateway/proxy/client.py), its aiohttp session for what stays on
aiohttp (WebSockets, the heartbeat flush), and the one upstream exchange `send`.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

import aiohttp
from yarl import URL

from gateway.config import UpstreamConfig
from gateway.http import RequestContext, Scope
from gateway.proxy.body import Body
from gateway.proxy.client import UpstreamResponse
from gateway.proxy.errors import ConnectFailed, ConnectTimeout, ReadTimeout, UpstreamError
from gateway.proxy.pool import ConnectionPool, PoolConnector


class UpstreamObserver(Protocol):
    """Sees upstream answers and WebSocket closes (the alert recorder,
    gateway/observability/alerts.py). None on the Upstream when alerting is off."""

    def answered(self, ctx: RequestContext, status: int, seconds: float | None) -> None: ...

    def ws_closed(self, ctx: RequestContext, route: str, by: str) -> None: ...


@dataclass
class Upstream:
    """A configured upstream and its connection pools."""

    name: str
    config: UpstreamConfig
    session: aiohttp.ClientSession | None = None
    observer: UpstreamObserver | None = None

    def __post_init__(self) -> None:
        self.base = self.config.url
        url = URL(self.base)
        self.host_header = url.raw_authority
        self.host_bytes = self.host_header.encode("latin-1")
        parts = urlsplit(self.base)
        self.tls = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.tls else 80)
        self.base_path = parts.path.encode("latin-1")
        self.pool: ConnectionPool | None = None

    async def open(self) -> None:
        cfg = self.config
        if self.pool is None:
            self.pool = ConnectionPool(
                self.host,
                self.port,
                ssl.create_default_context() if self.tls else None,
                limit=cfg.max_connections,
                pool_timeout=cfg.pool_timeout,
                connect_timeout=cfg.connect_timeout,
                keepalive_timeout=cfg.keepalive_timeout,
            )
        if self.session is not None:
            return
        connector = PoolConnector(
            pool_timeout=cfg.pool_timeout,
            limit=cfg.max_connections,
            limit_per_host=cfg.max_connections,
            keepalive_timeout=cfg.keepalive_timeout,
            ttl_dns_cache=30,
            enable_cleanup_closed=False,
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            timeout=aiohttp.ClientTimeout(
                total=None,
                connect=cfg.pool_timeout + cfg.connect_timeout,
                sock_connect=cfg.connect_timeout,
                sock_read=cfg.read_timeout,
            ),
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )

    async def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        if self.session is not None:
            await self.session.close()
            self.session = None

    def target(self, scope: Scope) -> bytes:
        """The request target upstream: the base path plus the request's raw path and
        query, so the upstream host never comes from the request."""
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        # Some servers put the query in raw_path; the query string is appended once.
        path = self.base_path + raw_path.split(b"?", 1)[0] or b"/"
        qs: bytes = scope.get("query_string", b"")
        return path + b"?" + qs if qs else path

    def url(self, scope: Scope) -> URL:
        """The same target as a URL (for the aiohttp WebSocket upgrade)."""
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        raw = raw_path.split(b"?", 1)[0].decode("latin-1")
        qs: bytes = scope.get("query_string", b"")
        return URL(self.base + raw + ("?" + qs.decode("latin-1") if qs else ""), encoded=True)

    async def send(
        self, head: bytes, body: Body, is_head: bool, read_timeout: float, fresh: bool
    ) -> UpstreamResponse:
        """One exchange on a pooled (or, `fresh`, a new) connection, up to the answer's
        head. Raises UpstreamError; a client fault while sending the body propagates."""
        pool = self.pool
        assert pool is not None, "upstream pool not opened (lifespan not run?)"
        conn = await pool.acquire(fresh)
        try:
            return await conn.exchange(head, body, is_head, read_timeout)
        except BaseException:
            conn.abort()
            raise


def classify_aiohttp(exc: BaseException) -> UpstreamError:
    """What an aiohttp failure (the WebSocket upgrade) means for the client."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return ConnectTimeout()
    if isinstance(exc, (aiohttp.ServerTimeoutError, asyncio.TimeoutError)):
        return ReadTimeout()
    if isinstance(exc, aiohttp.ClientConnectorError):
        return ConnectFailed()
    return UpstreamError()
