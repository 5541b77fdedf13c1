"""Who is the client: the trusted-proxy walk over X-Forwarded-For.

Owns: deciding the client IP (the rightmost address in the chain that is not one of
`server.trusted_proxies`) and the X-Forwarded-* values sent upstream. Inbound forwarding
headers are believed only when the TCP peer itself is a trusted proxy.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class TrustedProxies:
    def __init__(self, cidrs: list[str]) -> None:
        self.networks: tuple[IPNetwork, ...] = tuple(
            ipaddress.ip_network(c, strict=False) for c in cidrs
        )
        # Peer addresses repeat (the ingress pods), so memoise the membership test.
        self.is_trusted = lru_cache(maxsize=4096)(self._is_trusted)

    def _is_trusted(self, addr: str) -> bool:
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return False
        return any(ip in net for net in self.networks)

    def client_ip(self, peer: str, xff: str | None) -> str:
        """The client address: the peer, unless the peer is trusted, in which case walk
        X-Forwarded-For from the right past trusted hops."""
        if not xff or not self.is_trusted(peer):
            return peer
        hops = [h.strip() for h in xff.split(",") if h.strip()]
        for hop in reversed(hops):
            if not self.is_trusted(hop):
                return _clean(hop)
        return _clean(hops[0]) if hops else peer


def _clean(hop: str) -> str:
    """Accept only a literal address (an X-Forwarded-For entry can hold anything)."""
    h = hop
    if h.startswith("[") and "]" in h:
        h = h[1 : h.index("]")]
    elif h.count(":") == 1:  # IPv4 with a port
        h = h.split(":", 1)[0]
    try:
        return str(ipaddress.ip_address(h))
    except ValueError:
        return "unknown"
