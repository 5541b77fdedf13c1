"""Header rewriting between the client and the upstream, both ways.

Owns: the hop-by-hop set (and names a `Connection` header nominates), the request
headers the gateway sets itself (X-Forwarded-*, X-Real-IP, Host, X-Request-Id) and the
client headers it never passes on (inbound X-Edge-*, `server.strip_request_headers`,
underscore spellings of protected names), and the response headers the client gets
(hop-by-hop dropped, redirects pointed back at the gateway).
"""

from __future__ import annotations

import re

from gateway.config import ServerConfig
from gateway.headers import drop_underscore_name, valid_authority
from gateway.http import Headers, RequestContext, Scope
from gateway.net import TrustedProxies
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
REQUEST_REWRITTEN = HOP_BY_HOP | {
    b"host",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"forwarded",
    b"x-request-id",
    b"content-length",
    b"expect",
}
WS_SKIP = REQUEST_REWRITTEN | {
    b"sec-websocket-key",
    b"sec-websocket-version",
    b"sec-websocket-extensions",
    b"sec-websocket-protocol",
    b"sec-websocket-accept",
}
_RESPONSE_SKIP = HOP_BY_HOP | {b"x-request-id"}
_EDGE_PREFIX = b"x-edge-"
_BREAKS_LINE = re.compile(rb"[\r\n\x00]")


def nominated(headers: Headers) -> frozenset[bytes]:
    """Header names listed in Connection (RFC 9110 7.6.1) are hop-by-hop too."""
    names: set[bytes] = set()
    for k, v in headers:
        if k.lower() != b"connection":
            continue
        if 44 in v:  # "," (as an int: a byte scan, not the buffer protocol)
            names.update(t.strip().lower() for t in v.split(b",") if t.strip())
        else:  # one name, the usual case (`keep-alive`, `close`, `upgrade`)
            name = v.strip()
            if name:
                names.add(name.lower())
    return frozenset(names)


class HeaderRewriter:
    """One upstream's header rules, built once per route."""

    def __init__(
        self,
        server: ServerConfig,
        trusted: TrustedProxies,
        host_header: bytes,
        preserve_host: bool,
        redirects: RedirectRewriter | None,
    ) -> None:
        # Client-IP / URL-override headers (GoTrue rate-limits by Sb-Forwarded-For, IIS
        # and Symfony route by X-Original-URL): a client must not set them through us.
        self.strip = frozenset(h.encode() for h in server.strip_request_headers)
        self.allow_underscore = server.allow_underscore_headers
        self.underscore_forbidden = WS_SKIP | self.strip
        # Client request headers never passed on, per skip set (with `strip` folded in).
        self._drop: dict[frozenset[bytes], frozenset[bytes]] = {}
        # X-Real-IP is the gateway's to set unless the config lets the client's through.
        self._own_real_ip = b"x-real-ip" in self.strip
        self.trusted = trusted
        self.host_header = host_header
        self.preserve_host = preserve_host
        self.redirects = redirects

    def request(self, ctx: RequestContext, skip: frozenset[bytes]) -> Headers:
        """The upstream request's headers, in one pass over the client's."""
        scope = ctx.scope
        drop = self._drop.get(skip)
        if drop is None:
            drop = self._drop[skip] = skip | self.strip
        pairs: Headers = []
        xff: list[bytes] = []
        conn: list[bytes] = []
        proto = fhost = host = None
        for k, v in scope["headers"]:
            if (
                k in drop
                or k.startswith(_EDGE_PREFIX)
                # CGI-style frameworks read Transfer_Encoding as Transfer-Encoding. (95 is
                # "_": an int's membership is a byte scan, b"_" in k ~10x the cost.)
                or (
                    95 in k
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
            pairs.append((k, v))
        if conn:
            named = nominated([(b"connection", v) for v in conn]) - drop
            if named:
                pairs = [(k, v) for k, v in pairs if k not in named]
        if not self._own_real_ip:
            # The gateway's X-Real-IP replaces one the config let through.
            pairs = [(k, v) for k, v in pairs if k != b"x-real-ip"]
            pairs.append((b"X-Real-IP", ctx.client_ip.encode("latin-1")))
        peer = scope["client"][0] if scope.get("client") else ctx.client_ip
        self._forwarded(pairs, ctx, peer, xff, proto, fhost, host)
        if ctx.upstream_headers:
            own = {k.lower() for k, _ in ctx.upstream_headers}
            pairs = [(k, v) for k, v in pairs if k.lower() not in own]
            for k, v in ctx.upstream_headers:
                # The client's lines were checked by the server's parser; these are the
                # policies' own, written into the head as they are.
                if _BREAKS_LINE.search(k + v):
                    raise ValueError(f"line break in upstream header {k!r}")
                pairs.append((k, v))
        return pairs

    def _forwarded(
        self,
        pairs: Headers,
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
        bpeer = peer.encode("latin-1")
        if trusted_peer and xff:
            pairs.append((b"X-Forwarded-For", b", ".join(xff) + b", " + bpeer))
        else:
            pairs.append((b"X-Forwarded-For", bpeer))
        if self._own_real_ip:
            pairs.append((b"X-Real-IP", ctx.client_ip.encode("latin-1")))
        pairs.append(
            (
                b"X-Forwarded-Proto",
                proto if trusted_peer and proto else ctx.scope.get("scheme", "http").encode(),
            )
        )
        # Only a valid host[:port] becomes X-Forwarded-Host (app.py already refused a bad
        # Host). From a trusted proxy the first of a list is the client's (as redirects.py
        # reads it); an invalid one falls back to the Host.
        if fhost is not None:
            fhost = fhost.split(b",", 1)[0].strip()
        fwd_host = fhost if trusted_peer and fhost and valid_authority(fhost) else host
        if fwd_host and valid_authority(fwd_host):
            pairs.append((b"X-Forwarded-Host", fwd_host))
        pairs.append((b"Host", host if self.preserve_host and host else self.host_header))
        pairs.append((b"X-Request-Id", ctx.request_id.encode("latin-1")))

    def response(self, raw: Headers, scope: Scope) -> Headers:
        """The upstream's answer headers as the client gets them, in one pass (names a
        Connection header nominates are taken out afterwards, when there are any)."""
        out: Headers = []
        conn: Headers = []
        redirect = False
        for k, v in raw:
            lk = k.lower()
            if lk in _RESPONSE_SKIP:
                if lk == b"connection":
                    conn.append((lk, v))
                continue
            redirect = redirect or lk in REWRITTEN
            out.append((lk, v))
        if conn:
            # Hop-by-hop names are out already: `Connection: keep-alive` needs no pass.
            named = nominated(conn) - _RESPONSE_SKIP
            if named:
                out = [(k, v) for k, v in out if k not in named]
        if redirect and self.redirects is not None:
            return self.redirects.rewrite(out, scope)
        return out
