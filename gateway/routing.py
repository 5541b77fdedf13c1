"""The route table of the public port: method + path template (Starlette convertors) +
optional query match. First match wins; the route named `default` (or any catch-all
template) takes the rest. HTTP requests under /_edge/ match only the gateway's own
endpoints (gateway/edge.py), which the table holds as entries before the config's.

Owns: compiling the templates once and matching a scope to (route, path params). The
handler chain of each config route is attached by app.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from starlette.convertors import Convertor, PathConvertor, StringConvertor
from starlette.routing import compile_path

from gateway.config import Route
from gateway.http import Handler, Scope

# The path prefix reserved for the gateway's own endpoints on the public port.
EDGE_PREFIX = "/_edge/"

# Paths whose meaning differs between the gateway's router (decoded, segments as
# written) and the app's (WHATWG URL parsing resolves dot segments; %2F inside a segment
# is a different route): refused, so no request can match a lax route here and a strict
# handler there. Dot segments (also %2e), empty segments, encoded slash/backslash, NUL.
_UNSAFE_PATH = re.compile(rb"(?:^|/)(?:\.|%2e){1,2}(?:/|$)|//|%2f|%5c|\\|%00|\x00", re.IGNORECASE)


def unsafe_path(scope: Scope) -> bool:
    raw: bytes = scope.get("raw_path") or scope["path"].encode()
    # Every pattern needs ".", "%", "\\", NUL or "//"; most paths have none, and these
    # scans cost less than the regex trying each position. An int's membership is a plain
    # byte scan, while `b"." in raw` goes through the buffer protocol (~10x the cost on
    # CPython 3.11). "//" is looked for in the decoded path: a raw "//" is one there too
    # (decoding only adds slashes), so the filter still lets every unsafe path through.
    if not (46 in raw or 37 in raw or 92 in raw or 0 in raw or "//" in scope["path"]):
        return False
    return _UNSAFE_PATH.search(raw.split(b"?", 1)[0]) is not None


@dataclass(eq=False)
class CompiledRoute:
    config: Route
    regex: re.Pattern[str]
    convertors: dict[str, Convertor[Any]]
    methods: frozenset[str] | None
    query: tuple[tuple[str, str], ...]
    handler: Handler | None = None
    # Every parameter is a str or path one (their convert() is the identity): the
    # regex's groupdict is the params as is.
    plain: bool = False

    @property
    def name(self) -> str:
        return self.config.name


def compile_route(route: Route) -> CompiledRoute:
    regex, _fmt, convertors = compile_path(route.match.path)
    methods = frozenset(route.match.methods) if route.match.methods else None
    if methods and "GET" in methods:
        methods = methods | {"HEAD"}
    query = tuple(sorted((route.match.query or {}).items()))
    plain = all(type(c) in (StringConvertor, PathConvertor) for c in convertors.values())
    return CompiledRoute(route, regex, convertors, methods, query, plain=plain)


class RouteTable:
    def __init__(self, routes: list[Route], edge: list[CompiledRoute] | None = None) -> None:
        # The config's routes, in order (what explain and routecheck walk).
        self.routes = [compile_route(r) for r in routes]
        # The /_edge/ endpoints, handlers attached; HTTP only (a WebSocket upgrade under
        # the prefix is routed as any other path).
        self.edge = edge or []

    def match(self, scope: Scope) -> tuple[CompiledRoute, dict[str, str]] | None:
        path: str = scope["path"]
        is_ws = scope["type"] == "websocket"
        routes = self.routes
        # One prefix test keeps the edge entries off every other request's path (inline,
        # no helper call: this runs for every request).
        if path.startswith(EDGE_PREFIX) and self.edge and not is_ws:
            routes = self.edge
        method: str = scope.get("method", "GET")
        parsed_qs: dict[str, str] | None = None
        for route in routes:
            if route.methods is not None and not is_ws and method not in route.methods:
                continue
            m = route.regex.match(path)
            if m is None:
                continue
            if route.query:
                if parsed_qs is None:
                    qs = scope.get("query_string", b"").decode("latin-1")
                    # The first value of a repeated key wins, as GoTrue's FormValue does.
                    parsed_qs = {}
                    for k, v in parse_qsl(qs, keep_blank_values=True):
                        parsed_qs.setdefault(k, v)
                if any(parsed_qs.get(k) != v for k, v in route.query):
                    continue
            if route.plain:
                return route, m.groupdict()
            params = {k: str(route.convertors[k].convert(v)) for k, v in m.groupdict().items()}
            return route, params
        return None
