"""Warnings about a route table that is valid but does not do what its author meant.

Owns: finding routes that can never match because an earlier route takes every request
they would (first match wins), and `{x:path}` prefix routes whose bare prefix (`/a/b`
for `/a/b/{rest:path}`, which needs the slash) falls to a route with weaker protection.
Both are warnings, not errors (`gateway check` exits 0, prints them, and the server logs
them at startup): the table works, just not as written. Also: a batch heartbeat route
whose flush credentials are empty. Nothing here touches the network.

Path inclusion is decided by probing: each template is instantiated with a fixed set of
values per convertor (chosen to differ in first and last character, digits, dots and
slashes), and a later route counts as shadowed when the earlier one matches every probe
that the later one matches. A template is a short regular expression over a handful of
convertors, so a set of probes that differ in every way a convertor can tell apart finds
the difference whenever there is one in practice.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from urllib.parse import urlencode

from starlette.routing import PARAM_REGEX

from gateway.config import ConfigIssue, GatewayConfig, Route
from gateway.routing import CompiledRoute, RouteTable, unsafe_path

# Values each convertor's regex accepts, as different from each other as the convertor
# allows: an earlier route narrower than a later one rejects at least one of them.
PROBES: dict[str, tuple[str, ...]] = {
    "str": ("x", "Zz-9_.~", "0", "12.5", "0123abcd-0123-4567-89ab-0123456789ab", "a%20b"),
    "int": ("0", "42", "007"),
    "float": ("0", "1.5", "42"),
    "uuid": ("0123abcd-0123-4567-89ab-0123456789ab", "ffffffff-ffff-ffff-ffff-ffffffffffff"),
    "path": ("", "x", "x/y", "0", "a.b/c-d/", "Z~"),
}
# At most this many probes per template (a template with many parameters is cut short;
# the cut can only make a shadow go unreported, never report a false one).
MAX_PROBES = 512
_AUTH_RANK = {"off": 0, "optional": 1, "required": 2}
# Policies that protect the app; a route without one the prefix route has is weaker.
_GUARDS = ("rate_limit", "concurrency", "breaker")


def template_parts(path: str) -> list[tuple[str, str | None]]:
    """The template as (literal, None) and (name, convertor) pieces, in order."""
    parts: list[tuple[str, str | None]] = []
    pos = 0
    for m in PARAM_REGEX.finditer(path):
        if m.start() > pos:
            parts.append((path[pos : m.start()], None))
        parts.append((m.group(1), (m.group(2) or ":str")[1:]))
        pos = m.end()
    if pos < len(path):
        parts.append((path[pos:], None))
    return parts


def probe_paths(path: str, limit: int = MAX_PROBES) -> list[str]:
    """Concrete paths the template matches, built from PROBES; paths the gateway refuses
    before routing (empty or dot segments, `400 bad_path`) are left out."""
    parts = template_parts(path)
    choices = [PROBES.get(conv, PROBES["str"]) if conv else (text,) for text, conv in parts]
    out: list[str] = []
    for combo in itertools.islice(itertools.product(*choices), limit):
        candidate = "".join(combo)
        if not unsafe_path({"path": candidate}):
            out.append(candidate)
    return out


def _methods_cover(earlier: CompiledRoute, later: CompiledRoute) -> bool:
    if earlier.methods is None:
        return True
    return later.methods is not None and later.methods <= earlier.methods


def _query_covers(earlier: CompiledRoute, later: CompiledRoute) -> bool:
    return set(earlier.query) <= set(later.query)


def _shadowed_by(later: CompiledRoute, earlier: list[CompiledRoute]) -> int | None:
    """Index of the first earlier route that takes every request `later` would match."""
    probes = [p for p in probe_paths(later.config.match.path) if later.regex.match(p)]
    if not probes:
        return None
    for i, route in enumerate(earlier):
        if not (_methods_cover(route, later) and _query_covers(route, later)):
            continue
        if all(route.regex.match(p) for p in probes):
            return i
    return None


def _describe(route: Route) -> str:
    guards = [g for g in _GUARDS if getattr(route, g)]
    return f"{route.name!r} (auth {route.auth.mode}, {', '.join(guards) or 'no rate_limit'})"


def _weaker(taker: Route, prefix_route: Route) -> bool:
    if _AUTH_RANK[taker.auth.mode] < _AUTH_RANK[prefix_route.auth.mode]:
        return True
    return any(getattr(prefix_route, g) and not getattr(taker, g) for g in _GUARDS)


def _bare_prefix(path: str) -> str | None:
    """`/a/b` for `/a/b/{rest:path}`; None when the template does not end that way."""
    parts = template_parts(path)
    if len(parts) < 2 or parts[-1][1] != "path" or parts[-2][1] is not None:
        return None
    literal = parts[-2][0]
    if not literal.endswith("/") or (len(parts) == 2 and literal == "/"):
        return None
    head = "".join(f"{{{n}:{c}}}" if c else n for n, c in parts[:-2])
    return head + literal[:-1]


def _prefix_issues(table: RouteTable) -> Iterator[ConfigIssue]:
    for i, route in enumerate(table.routes):
        cfg = route.config
        bare = _bare_prefix(cfg.match.path)
        if bare is None:
            continue
        probes = probe_paths(bare, limit=1)
        if not probes:
            continue
        query = urlencode(sorted((cfg.match.query or {}).items())).encode()
        for method in sorted(route.methods or {"GET"}):
            scope = {"type": "http", "path": probes[0], "method": method, "query_string": query}
            found = table.match(scope)
            if found is None or found[0] is route or not _weaker(found[0].config, cfg):
                continue
            j = table.routes.index(found[0])
            yield ConfigIssue(
                f"routes[{i}].match.path",
                f"{method} {probes[0]} (the bare prefix) does not match {cfg.match.path!r}; "
                f"it goes to routes[{j}] {_describe(found[0].config)}, weaker than "
                f"{_describe(cfg)}: add a route for {bare!r} or match it here",
            )
            break


def _flush_issues(routes: list[Route]) -> Iterator[ConfigIssue]:
    """A batch heartbeat route whose flush credentials came out empty (an unset
    `${SUPABASE_SERVICE_ROLE_KEY:-}`): every flush would be refused, and its entries
    would wait in the store until someone notices the failed-flush metric."""
    for i, route in enumerate(routes):
        hb = route.heartbeat
        if hb is None or hb.mode != "batch":
            continue
        for name, value in sorted(hb.flush_headers.items()):
            credential = value.strip().removeprefix("Bearer").strip()
            if not credential:
                yield ConfigIssue(
                    f"routes[{i}].heartbeat.flush_headers.{name}",
                    "is empty: the batch flush will be refused and heartbeats will wait in "
                    "the store (set the service role key, e.g. SUPABASE_SERVICE_ROLE_KEY)",
                )


def route_warnings(cfg: GatewayConfig) -> list[ConfigIssue]:
    """Every warning about the route table, each naming the dotted key to change."""
    table = RouteTable(cfg.routes)
    issues: list[ConfigIssue] = []
    for j, later in enumerate(table.routes):
        i = _shadowed_by(later, table.routes[:j])
        if i is not None:
            issues.append(
                ConfigIssue(
                    f"routes[{j}].match.path",
                    f"route {later.name!r} never matches: routes[{i}] {table.routes[i].name!r} "
                    "comes first and takes every request it would (first match wins); move "
                    f"it above routes[{i}] or narrow routes[{i}]",
                )
            )
    issues.extend(_prefix_issues(table))
    issues.extend(_flush_issues(cfg.routes))
    return issues
