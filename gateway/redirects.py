"""Redirects that point at the gateway, not at the upstream behind it.

Owns: which origins count as an upstream's own (its configured URL, loopback aliases of
a loopback upstream, `upstreams.<name>.redirect_origins`), the public origin of a
request (scheme and host as the client used them; `X-Forwarded-Proto/-Host` believed
only from `server.trusted_proxies`), and the rewrite of `Location`, `Content-Location`
and `Refresh` answers (nginx's `proxy_redirect default`).

Why: Next.js builds absolute URLs from its own hostname, so `NextResponse.redirect(new
URL(p, req.url))` answers `Location: http://localhost:3000/...` and the browser would
be sent to the app's internal address. Relative locations and other hosts pass as they
are. A Host that is not a plain `host[:port]` never becomes part of a Location: the
rewrite then keeps only the path (a relative reference), which the client resolves
against the URL it used.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from gateway.config import UpstreamConfig
from gateway.headers import valid_authority
from gateway.http import Headers, Scope
from gateway.net import TrustedProxies

REWRITTEN = frozenset({b"location", b"content-location", b"refresh"})
_LOOPBACK = ("localhost", "127.0.0.1", "::1", "0.0.0.0")
_DEFAULT_PORT = {"http": 80, "https": 443}
_REFRESH_URL = re.compile(rb"(?i)(url\s*=\s*['\"]?)([^'\"]*)")


def _origin(url: str) -> tuple[str, str, int] | None:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in _DEFAULT_PORT or not parts.hostname:
        return None
    return parts.scheme, parts.hostname.lower(), port or _DEFAULT_PORT[parts.scheme]


class RedirectRewriter:
    """Built once per upstream; `rewrite` runs only on answers carrying one of the
    headers in REWRITTEN."""

    def __init__(self, cfg: UpstreamConfig, trusted: TrustedProxies) -> None:
        self.trusted = trusted
        own = _origin(cfg.url)
        assert own is not None  # the config validated it
        origins = {own}
        _scheme, host, port = own
        if host in _LOOPBACK:
            origins.update((s, alias, port) for s in _DEFAULT_PORT for alias in _LOOPBACK)
        for extra in cfg.redirect_origins:
            if (o := _origin(extra)) is not None:
                origins.add(o)
        self.origins = frozenset(origins)

    def rewrite(self, headers: Headers, scope: Scope) -> Headers:
        public: bytes | None = None
        out: Headers = []
        for k, v in headers:
            if k in REWRITTEN:
                if public is None:
                    public = self.public_origin(scope)
                v = self._rewrite_value(k, v, public)
            out.append((k, v))
        return out

    def _rewrite_value(self, name: bytes, value: bytes, public: bytes) -> bytes:
        if name == b"refresh":
            m = _REFRESH_URL.search(value)
            if m is None:
                return value
            url = self._rewrite_url(m.group(2), public)
            return value[: m.start(2)] + url + value[m.end(2) :]
        return self._rewrite_url(value, public)

    def _rewrite_url(self, url: bytes, public: bytes) -> bytes:
        text = url.strip().decode("latin-1")
        if "://" not in text[:10]:
            return url  # relative: the client resolves it against the gateway's URL
        if _origin(text) not in self.origins:
            return url
        parts = urlsplit(text)
        rest = parts.path or "/"
        if parts.query:
            rest += "?" + parts.query
        if parts.fragment:
            rest += "#" + parts.fragment
        return public + rest.encode("latin-1")

    def public_origin(self, scope: Scope) -> bytes:
        """scheme://host as the client used them; b"" (a relative reference) when the
        host is missing or not a plain authority."""
        host: bytes | None = None
        fproto = fhost = None
        for k, v in scope["headers"]:
            if k == b"host" and host is None:
                host = v
            elif k == b"x-forwarded-host" and fhost is None:
                fhost = v.split(b",", 1)[0].strip()
            elif k == b"x-forwarded-proto" and fproto is None:
                fproto = v.split(b",", 1)[0].strip().lower()
        scheme: bytes = str(scope.get("scheme", "http")).encode()
        peer = scope["client"][0] if scope.get("client") else ""
        if (fhost or fproto) and self.trusted.is_trusted(peer):
            host = fhost or host
            if fproto in (b"http", b"https"):
                scheme = fproto
        if host is None or not valid_authority(bytes(host)):
            return b""
        return scheme + b"://" + host


__all__ = ["REWRITTEN", "RedirectRewriter"]
