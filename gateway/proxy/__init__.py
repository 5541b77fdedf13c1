"""The streaming forwarder, split by concern:

- `forward`: `Proxy`, a route's terminal handler (one upstream exchange, then the
  answer streamed back);
- `headers`: header rewriting both ways (hop-by-hop, X-Forwarded-*, redirects);
- `body`: request-body framing (no body, read whole, or streamed; the size cap);
- `client`: the upstream HTTP/1.1 client (asyncio protocol + httptools);
- `pool`: the keep-alive pool (reuse, retirement, the wait for a connection);
- `upstream`: `Upstream`, a configured upstream, its pool and its
  aiohttp session (WebSockets, heartbeat flush);
- `errors`: client faults, upstream failures, classified where they are raised;
- `watch`: client-disconnect cancellation;
- `websocket`: `WebSocketProxy`, the WebSocket relay (on aiohttp).

Callers import from here.
"""

from gateway.proxy.body import read_body
from gateway.proxy.errors import (
    BodyTooLarge,
    ClientGone,
    ClientRequestError,
    TruncatedResponse,
    UpstreamFailure,
)
from gateway.proxy.forward import Proxy
from gateway.proxy.upstream import Upstream, UpstreamObserver
from gateway.proxy.watch import DisconnectWatch
from gateway.proxy.websocket import WebSocketProxy

__all__ = [
    "BodyTooLarge",
    "ClientGone",
    "ClientRequestError",
    "DisconnectWatch",
    "Proxy",
    "TruncatedResponse",
    "Upstream",
    "UpstreamFailure",
    "UpstreamObserver",
    "WebSocketProxy",
    "read_body",
]
