"""Request header hygiene: what the gateway refuses or drops before anything is forwarded.

Owns: the `Host` rule (exactly one, a valid `host[:port]`, required on HTTP/1.1; app.py
answers 400 `bad_host` otherwise), the authority check that also guards
`X-Forwarded-Host`, and the rule for header names containing `_` (dropped unless
`server.allow_underscore_headers`; even then a name that reads as a framing, forwarding
or identity header once `_` becomes `-` is dropped, because CGI-style servers and some
frameworks make exactly that substitution). The list of client-IP / URL-override headers
is config (`server.strip_request_headers`, default in gateway/config.py).
"""

from __future__ import annotations

import ipaddress
import re
from functools import lru_cache

from gateway.http import Scope

# host[:port]. Stricter than RFC 3986's reg-name on purpose: no sub-delims (`,` splits
# X-Forwarded-Host lists, `;` and quotes split other parsers), no userinfo (`a@evil`),
# no pct-encoding, no path or query. IP literals are checked by `ipaddress` below.
_AUTHORITY = re.compile(
    rb"(?P<host>[A-Za-z0-9_](?:[A-Za-z0-9._-]{0,252})|\[(?P<ip6>[0-9A-Fa-f:.]{2,45})\])"
    rb"(?::(?P<port>[0-9]{1,5}))?"
)
_EDGE_PREFIX = b"x-edge-"


@lru_cache(maxsize=1024)
def valid_authority(value: bytes) -> bool:
    """Is `value` a `host[:port]` the gateway will pass on as X-Forwarded-Host? Cached:
    a deployment sees a handful of distinct Host values."""
    m = _AUTHORITY.fullmatch(value)
    if m is None:
        return False
    port = m.group("port")
    if port is not None and not 0 < int(port) <= 65535:
        return False
    ip6 = m.group("ip6")
    if ip6 is not None:
        try:
            ipaddress.IPv6Address(ip6.decode("ascii"))
        except ValueError:
            return False
    return True


def host_problem(scope: Scope) -> str | None:
    """Why the request's Host header is refused, or None when it is acceptable. Two Host
    lines would let the gateway and the app each pick a different one."""
    host: bytes | None = None
    count = 0
    for k, v in scope["headers"]:
        if k == b"host":
            count += 1
            host = v
    if count > 1:
        return "more than one Host header"
    if host is None:
        if scope.get("http_version", "1.1") == "1.1":
            return "HTTP/1.1 requires a Host header"
        return None
    if not valid_authority(bytes(host)):
        return "the Host header is not a valid host[:port]"
    return None


def drop_underscore_name(name: bytes, allow: bool, forbidden: frozenset[bytes]) -> bool:
    """Called only for names containing `_`: drop it unless allowed, and even when
    allowed if it reads as a forbidden name (framing, forwarding, stripped, X-Edge-*)
    with `_` taken as `-` (`Transfer_Encoding`, `X_Forwarded_For`, `x_edge_user_id`)."""
    if not allow:
        return True
    dashed = name.replace(b"_", b"-")
    return dashed in forbidden or dashed.startswith(_EDGE_PREFIX)
