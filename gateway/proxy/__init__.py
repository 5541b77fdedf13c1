"""The streaming forwarder, split by concern (docs/architecture.md):

- `forward`: `Proxy`, a route's terminal handler (one upstream call, then streaming);
- `upstream`: `Upstream`, a configured upstream and its connections;
- `websocket`: `WebSocketProxy`, the WebSocket relay.

Callers import from here; the modules are the package's own business.
"""

from gateway.proxy.forward import (
    BodyTooLarge,
    ClientGone,
    DisconnectWatch,
    Proxy,
    TruncatedResponse,
    Upstream,
    UpstreamFailure,
    UpstreamObserver,
    WebSocketProxy,
    read_body,
)

__all__ = [
    "BodyTooLarge",
    "ClientGone",
    "DisconnectWatch",
    "Proxy",
    "TruncatedResponse",
    "Upstream",
    "UpstreamFailure",
    "UpstreamObserver",
    "WebSocketProxy",
    "read_body",
]
