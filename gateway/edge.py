"""Endpoints the gateway answers itself on the public port, under /_edge/.

Owns: `GET /_edge/client-config` (the client intervals from config, in ms, switching to
the degraded set while upstream is unhealthy) and the dispatch of
`GET /_edge/webinars/{webinar_id}/presence` to the heartbeat service.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING

from gateway.http import Receive, RequestContext, Scope, Send, send_error, send_json
from gateway.runtime import Runtime

if TYPE_CHECKING:
    from gateway.routing import RouteTable

_PRESENCE = re.compile(r"^/_edge/webinars/([^/]{1,200})/presence$")


class EdgeEndpoints:
    def __init__(self, rt: Runtime, table: RouteTable) -> None:
        self.rt = rt
        self.table = table
        c = rt.config.client

        def ms(v: float) -> int:
            return round(v * 1000)

        normal = {
            "presence_ping_interval_ms": ms(c.presence_ping_interval),
            "access_track_interval_ms": ms(c.access_track_interval),
            "chat_fallback_interval_ms": ms(c.chat_fallback_interval),
            "admin_polling_interval_ms": ms(c.admin_polling_interval),
        }
        d = c.degraded
        degraded = {
            "presence_ping_interval_ms": ms(d.presence_ping_interval),
            "access_track_interval_ms": ms(d.access_track_interval),
            "chat_fallback_interval_ms": ms(d.chat_fallback_interval),
            "admin_polling_interval_ms": ms(d.admin_polling_interval),
        }
        cache = (b"cache-control", f"public, max-age={int(c.cache_max_age)}".encode())
        # Pre-encoded: the endpoint is hit by every viewer on load.
        self._normal = json.dumps({"mode": "normal", **normal}).encode()
        self._degraded = json.dumps({"mode": "degraded", **degraded}).encode()
        self._cache_header = cache
        # A heartbeat route creates the presence service the endpoint answers from.
        self._presence = any(r.heartbeat is not None for r in rt.config.routes)

    async def __call__(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        ctx: RequestContext | None,
        client_ip: str,
    ) -> None:
        path = scope["path"]
        method = scope["method"]
        if path == "/_edge/client-config":
            if method not in ("GET", "HEAD"):
                await send_error(
                    send, 405, "method_not_allowed", "use GET", [(b"allow", b"GET, HEAD")]
                )
                return
            body = self._degraded if self.rt.degraded() else self._normal
            await send_json(send, 200, body, [self._cache_header])
            return
        m = _PRESENCE.match(path)
        if m and self._presence:
            from gateway.policies.heartbeat.policy import presence_endpoint

            await presence_endpoint(self.rt, scope, receive, send, m.group(1), client_ip)
            return
        await send_error(send, 404, "not_found", "no such edge endpoint")
