"""Endpoints the gateway answers itself on the public port, under /_edge/.

Owns: `GET /_edge/client-config` (the client intervals from config, in ms, switching to
the degraded set while upstream is unhealthy), the dispatch of
`GET /_edge/webinars/{webinar_id}/presence` to the heartbeat service (when a route has a
heartbeat), and the 404 for any other path under the prefix. They are entries of the
route table (`edge_routes`), matched before the config's routes for HTTP requests.
"""

from __future__ import annotations

import json
import re
from typing import Any

from starlette.convertors import Convertor, StringConvertor

from gateway.config import ClientConfig, DegradedIntervals, Route, RouteMatch
from gateway.http import Handler, Receive, RequestContext, Send, send_error, send_json
from gateway.routing import EDGE_PREFIX, CompiledRoute
from gateway.runtime import Runtime

# The route label of every edge endpoint in metrics and the access log.
EDGE_ROUTE = "_edge"
_CLIENT_CONFIG = re.compile(r"^/_edge/client-config$")
_REST = re.compile(f"^{re.escape(EDGE_PREFIX)}")
# A webinar id of at most 200 characters; a longer one is not an edge endpoint (404).
_PRESENCE = re.compile(r"^/_edge/webinars/(?P<webinar_id>[^/]{1,200})/presence$")


def _intervals(c: ClientConfig | DegradedIntervals) -> dict[str, int]:
    def ms(v: float) -> int:
        return round(v * 1000)

    return {
        "presence_ping_interval_ms": ms(c.presence_ping_interval),
        "access_track_interval_ms": ms(c.access_track_interval),
        "chat_fallback_interval_ms": ms(c.chat_fallback_interval),
        "admin_polling_interval_ms": ms(c.admin_polling_interval),
    }


class ClientConfigEndpoint:
    """`GET /_edge/client-config`: pre-encoded, the endpoint is hit by every viewer on load."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        c = rt.config.client
        self._normal = json.dumps({"mode": "normal", **_intervals(c)}).encode()
        self._degraded = json.dumps({"mode": "degraded", **_intervals(c.degraded)}).encode()
        self._cache_header = (b"cache-control", f"public, max-age={int(c.cache_max_age)}".encode())

    async def __call__(self, ctx: RequestContext, receive: Receive, send: Send) -> None:
        if ctx.scope["method"] not in ("GET", "HEAD"):
            await send_error(send, 405, "method_not_allowed", "use GET", [(b"allow", b"GET, HEAD")])
            return
        body = self._degraded if self.rt.degraded() else self._normal
        await send_json(send, 200, body, [self._cache_header])


def _presence(rt: Runtime) -> Handler:
    from gateway.policies.heartbeat.policy import presence_endpoint

    async def presence(ctx: RequestContext, receive: Receive, send: Send) -> None:
        webinar_id = ctx.params["webinar_id"]
        await presence_endpoint(rt, ctx.scope, receive, send, webinar_id, ctx.client_ip)

    return presence


async def _not_found(ctx: RequestContext, receive: Receive, send: Send) -> None:
    await send_error(send, 404, "not_found", "no such edge endpoint")


def _entry(template: str, regex: re.Pattern[str], handler: Handler) -> CompiledRoute:
    # Not a config route: the record carries the name and the template (for readers);
    # `upstream` is empty because an edge endpoint never goes upstream. The regex is
    # its own, not compiled from the template, to keep the presence id's length bound.
    cfg = Route(name=EDGE_ROUTE, match=RouteMatch(path=template), upstream="")
    convertors: dict[str, Convertor[Any]] = {name: StringConvertor() for name in regex.groupindex}
    return CompiledRoute(cfg, regex, convertors, None, (), handler)


def edge_routes(rt: Runtime) -> list[CompiledRoute]:
    """The route table's entries for /_edge/*, in match order; the last takes the rest
    of the prefix so no edge path falls through to a config route."""
    client_config = ClientConfigEndpoint(rt)
    routes = [_entry("/_edge/client-config", _CLIENT_CONFIG, client_config)]
    if any(r.heartbeat is not None for r in rt.config.routes):
        routes.append(_entry("/_edge/webinars/{webinar_id}/presence", _PRESENCE, _presence(rt)))
    routes.append(_entry("/_edge/{rest:path}", _REST, _not_found))
    return routes
