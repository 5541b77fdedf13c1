"""`python -m gateway explain` and `python -m gateway routes`: what the gateway would do
with a request, read from the config alone.

Owns: matching a request line (+ headers) against the route table exactly as the public
app does (bad Host or path, `/_edge/*`, first match wins), and describing the chain of the
matched route in the order app.py builds it (the registry in gateway/policies), with each
policy's settings and the key parts this request would use. Nothing here opens a socket
or touches the store: tokens are found, never verified, and keys are shown as the parts
they are made of.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote, urlsplit

from gateway.config import GatewayConfig, Route
from gateway.headers import host_problem
from gateway.http import Scope
from gateway.net import TrustedProxies
from gateway.policies import POLICIES
from gateway.policies import POLICY_ORDER as POLICY_ORDER
from gateway.policies.spec import PolicySpec
from gateway.routing import RouteTable, unsafe_path
from gateway.units import format_duration as dur

# POLICY_ORDER (re-exported): the route keys in the order app.build_chain composes the
# policies, outermost first (the proxy is last); it comes from the registry both walk.


@dataclass(frozen=True, slots=True)
class Step:
    name: str
    lines: list[str]


@dataclass(slots=True)
class Explanation:
    request: str
    outcome: str  # "route" | "edge" | "bad_host" | "bad_path" | "no_route"
    summary: str
    route_index: int | None = None
    params: dict[str, str] = field(default_factory=dict)
    client_ip: str = ""
    steps: list[Step] = field(default_factory=list)

    def render(self) -> str:
        out = [self.request, f"  {self.summary}"]
        if self.params:
            out.append("  params: " + ", ".join(f"{k}={v}" for k, v in self.params.items()))
        if self.client_ip:
            out.append(f"  client ip: {self.client_ip}")
        for n, step in enumerate(self.steps, 1):
            out.append(f"  {n}. {step.name}")
            out.extend(f"       {line}" for line in step.lines)
        return "\n".join(out) + "\n"


def parse_header(text: str) -> tuple[str, str]:
    """`Name: value` as given to `-H`; ValueError when there is no name or colon."""
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise ValueError(f"expected 'Name: value', got {text!r}")
    return name.strip(), value.strip()


def _scope(method: str, target: str, headers: list[tuple[str, str]], peer: str, host: str) -> Scope:
    path, _, query = target.partition("?")
    hdrs = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]
    if not any(k == b"host" for k, _ in hdrs):
        # What a client sends by default; -H 'Host: ...' shows another.
        hdrs.insert(0, (b"host", host.encode("latin-1")))
    upgrade = dict(hdrs).get(b"upgrade", b"").lower() == b"websocket"
    return {
        "type": "websocket" if upgrade else "http",
        "method": method.upper(),
        "path": unquote(path),
        "raw_path": path.encode("latin-1"),
        "query_string": query.encode("latin-1"),
        "headers": hdrs,
        "client": (peer, 0),
    }


def explain(
    cfg: GatewayConfig,
    method: str,
    target: str,
    headers: list[tuple[str, str]] | None = None,
    peer: str = "127.0.0.1",
) -> Explanation:
    """What the public port would do with `METHOD target` from `peer`."""
    scope = _scope(method, target, headers or [], peer, cfg.server.listen)
    request = f"{scope['method']} {target}" + (" (WebSocket)" if scope["type"] != "http" else "")
    if not target.startswith("/"):
        return Explanation(request, "bad_path", "the path must start with '/'")
    # The refusals app.py makes before routing, in its order (app._refusal).
    problem = host_problem(scope)
    if problem is not None:
        return Explanation(request, "bad_host", f"400 bad_host: {problem}")
    if unsafe_path(scope):
        return Explanation(
            request,
            "bad_path",
            "400 bad_path: dot segments, empty segments and encoded "
            "slashes are refused before routing",
        )
    xff = dict(scope["headers"]).get(b"x-forwarded-for")
    client_ip = TrustedProxies(cfg.server.trusted_proxies).client_ip(
        peer, xff.decode("latin-1") if xff else None
    )
    if scope["path"].startswith("/_edge/") and scope["type"] == "http":
        return Explanation(request, "edge", _edge(cfg, scope["path"]), client_ip=client_ip)
    table = RouteTable(cfg.routes)
    found = table.match(scope)
    if found is None:
        return Explanation(
            request, "no_route", "404 no_route: no route matches", client_ip=client_ip
        )
    compiled, params = found
    index = table.routes.index(compiled)
    route = compiled.config
    summary = (
        f"route routes[{index}] {route.name!r}: "
        f"{','.join(route.match.methods or ['any method'])} {route.match.path}"
        + (f" with query {route.match.query}" if route.match.query else "")
    )
    req = _Request(scope, params, client_ip)
    steps = _chain(cfg, route, req)
    return Explanation(request, "route", summary, index, params, client_ip, steps)


def _edge(cfg: GatewayConfig, path: str) -> str:
    if path == "/_edge/client-config":
        return "answered by the gateway: the client intervals from `client:` (GET, HEAD)"
    parts = path.split("/")
    presence = len(parts) == 5 and parts[2] == "webinars" and parts[4] == "presence"
    # The presence endpoint exists only when a heartbeat route records presence.
    if presence and parts[3] and any(r.heartbeat for r in cfg.routes):
        return (
            f"answered by the gateway: live presence of webinar {parts[3]!r} from the "
            "store (a verified token is required)"
        )
    return "404 not_found: no such edge endpoint"


@dataclass(frozen=True, slots=True)
class _Request:
    scope: Scope
    params: dict[str, str]
    client_ip: str

    def header(self, name: str) -> str | None:
        for k, v in self.scope["headers"]:
            if k == name.lower().encode("latin-1"):
                return str(v.decode("latin-1"))
        return None

    def cookie(self, name: str) -> str | None:
        from gateway.http import cookies

        return cookies(self.scope).get(name)

    def query(self) -> list[tuple[str, str]]:
        return parse_qsl(self.scope["query_string"].decode("latin-1"), keep_blank_values=True)


def _chain(cfg: GatewayConfig, route: Route, req: _Request) -> list[Step]:
    steps: list[Step] = []
    websocket = req.scope["type"] == "websocket"
    for spec in POLICIES:
        # The WebSocket chain holds only the policies that declare it (app.build_ws_chain).
        if websocket and not spec.websocket:
            continue
        describe = _DESCRIBE.get(spec.key)
        step = describe(cfg, route, req) if describe else _settings(spec, route)
        if step is not None:
            steps.append(step)
    steps.append(_proxy(cfg, route, req))
    return steps


def _auth(cfg: GatewayConfig, route: Route, req: _Request) -> Step | None:
    from gateway.policies.auth.policy import bearer_token, cookie_token

    mode = route.auth.mode
    if mode == "off":
        return Step("auth off", ["tokens are not checked; inbound X-Edge-* headers are stripped"])
    a = cfg.auth
    keys = [
        k for k, on in (("HS256 secret", a.hs256_secret), (f"JWKS {a.jwks_url}", a.jwks_url)) if on
    ]
    if bearer_token(req.scope):
        source = "Authorization: Bearer (found; explain does not verify it)"
    elif cookie_token(req.scope, a.cookie_name):
        source = "Supabase session cookie (found; explain does not verify it)"
    else:
        source = "none in this request"
    lines = [
        "required: no valid token -> 401 invalid_token"
        if mode == "required"
        else "optional: a valid token adds the identity; otherwise anonymous",
        "token: " + source,
        "keys: " + (", ".join(keys) or "none"),
        "a verified caller's X-Edge-User-Id, -Role, -Session-Id go upstream",
    ]
    if route.auth.revalidate:
        lines.append(f"revalidated with {a.user_url} at most every {dur(route.auth.revalidate)}")
    return Step(f"auth {mode}", lines)


def _rate_limit(cfg: GatewayConfig, route: Route, req: _Request) -> Step | None:
    if not route.rate_limit:
        return None
    from gateway.policies.ratelimit.policy import compile_rules

    compiled = compile_rules(route.name, route.rate_limit, cfg.store.on_failure)
    lines = []
    for rule, c in zip(route.rate_limit, compiled, strict=True):
        lines.append(
            f"{c.policy_item}: {_rate(rule.rate)}, burst {rule.burst}, key "
            f"{_limit_key(rule.by, req)}, on store failure {c.on_failure}"
        )
    return Step("rate_limit (GCRA, one store call for all rules)", lines)


def _rate(per_second: float) -> str:
    for unit, seconds in (("s", 1), ("min", 60), ("h", 3600)):
        if per_second * seconds >= 1:
            return f"{per_second * seconds:g}/{unit}"
    return f"{per_second * 86400:g}/day"


def _limit_key(by: str, req: _Request) -> str:
    if by == "user":
        return f"u:<verified sub>, anonymous ip:{req.client_ip}"
    if by == "ip":
        return f"ip:{req.client_ip}"
    if by == "webinar":
        w = req.params.get("webinar_id")
        return f"w:{w}" if w is not None else "(no webinar_id: rule skipped)"
    if by == "route":
        return "one bucket for the whole route"
    name = by.split(":", 1)[1]
    value = req.header(name)
    return f"h:{value}" if value is not None else f"({name} header absent: rule skipped)"


def _concurrency(cfg: GatewayConfig, route: Route, req: _Request) -> Step | None:
    c = route.concurrency
    if c is None:
        return None
    key = {
        "webinar": f"webinar {req.params.get('webinar_id')}",
        "route": "the route",
        "user": f"u:<verified sub>, anonymous ip:{req.client_ip}",
        "ip": f"ip:{req.client_ip}",
    }[c.by]
    return Step(
        "concurrency",
        [f"at most {c.max} in flight per {key} per process; 503 Retry-After {dur(c.retry_after)}"],
    )


def _refresh(cfg: GatewayConfig, route: Route, req: _Request) -> Step | None:
    r = route.refresh
    if r is None:
        return None
    return Step(
        "refresh",
        [
            "one upstream call per refresh token (keyed by its hash, across replicas)",
            f"answer replayed for {dur(r.grace)}; lock {dur(r.lock_ttl)}; "
            f"on store failure {r.on_failure or cfg.store.on_failure}",
        ],
    )


def _heartbeat(cfg: GatewayConfig, route: Route, req: _Request) -> Step | None:
    hb = route.heartbeat
    if hb is None:
        return None
    if hb.mode == "sample":
        mode = f"sample: at most one per viewer per {dur(hb.forward_interval)} reaches the app"
    else:
        mode = f"batch: the first reaches the app; flushed to {hb.flush_upstream} {hb.flush_url}"
    sources = []
    for src in hb.key:
        kind, _, name = src.partition(":")
        value = {
            "user": "<verified sub>",
            "ip": req.client_ip,
            "cookie": req.cookie(name) and "present",
            "header": req.header(name) and "present",
        }[kind]
        sources.append(f"{src}={value or 'absent'}")
    return Step(
        "heartbeat",
        [
            mode,
            f"webinar: {req.params.get('webinar_id', '(no webinar_id)')}; viewer: first of "
            + ", ".join(sources),
            f"others answered {hb.local_response.status} at the edge; app "
            f"{'/'.join(map(str, hb.negative_statuses))} replayed for {dur(hb.negative_ttl)}",
            f"on store failure {hb.on_failure or cfg.store.on_failure}",
        ],
    )


def _cache(cfg: GatewayConfig, route: Route, req: _Request) -> Step | None:
    c = route.cache
    if c is None:
        return None
    parts = [f"route {route.name}"] + [f"{k}={v}" for k, v in sorted(req.params.items())]
    query = req.query()
    parts += [f"query {n}={[v for k, v in query if k == n]}" for n in c.vary_query]
    parts += [f"claim {n}" for n in c.vary_claims]
    if c.authorize is not None:
        who = f"callers whose claim {c.authorize.claim} is in {c.authorize.in_}"
    elif c.public:
        who = "everybody (public: true)"
    else:
        who = f"callers the app answered 200 within {dur(c.authz_ttl)}; anonymous ones bypass"
    return Step(
        "cache",
        [
            f"ttl {dur(c.ttl)}, stale_while_revalidate {dur(c.stale_while_revalidate)}, "
            f"stale_if_error {dur(c.stale_if_error)}",
            "key: " + ", ".join(parts),
            "the answer's Vary headers add a secondary key"
            + (f", except {', '.join(c.ignore_vary)}" if c.ignore_vary else ""),
            f"served to: {who}",
        ],
    )


def _breaker(cfg: GatewayConfig, route: Route, req: _Request) -> Step | None:
    b = route.breaker
    if b is None:
        return None
    return Step(
        f"breaker group {b.group!r}",
        [
            f"opens after {b.failure_threshold} consecutive failures or a failure ratio of "
            f"{b.failure_ratio:g} over {dur(b.window)} (at least {b.min_requests} requests)",
            f"open for {dur(b.cooldown)} (doubling up to {dur(b.max_cooldown)}): 503 with "
            "Retry-After",
        ],
    )


def _settings(spec: PolicySpec, route: Route) -> Step | None:
    """A policy this module has no words for: its section as configured."""
    if not spec.enabled(route):
        return None
    return Step(spec.key, [str(getattr(route, spec.key))])


def _proxy(cfg: GatewayConfig, route: Route, req: _Request) -> Step:
    up = cfg.upstreams[route.upstream]
    raw = req.scope["raw_path"].decode("latin-1")
    query = req.scope["query_string"].decode("latin-1")
    url = up.url + raw + (f"?{query}" if query else "")
    kind = "proxy"
    if req.scope["type"] == "websocket":
        kind = "WebSocket proxy"
        url = "ws" + url[len("http") :]
    read = route.read_timeout if route.read_timeout is not None else up.read_timeout
    return Step(
        f"{kind} to upstream {route.upstream!r}",
        [
            url,
            f"connect timeout {dur(up.connect_timeout)}, read timeout {dur(read)}, Host: "
            + ("the client's" if up.preserve_host else urlsplit(up.url).netloc),
            "redirects to the upstream's own origin are rewritten to the client's"
            if up.rewrite_redirects
            else "redirects pass unchanged",
        ],
    )


_DESCRIBE: dict[str, Callable[[GatewayConfig, Route, _Request], Step | None]] = {
    "auth": _auth,
    "rate_limit": _rate_limit,
    "concurrency": _concurrency,
    "refresh": _refresh,
    "heartbeat": _heartbeat,
    "cache": _cache,
    "breaker": _breaker,
}


def route_table(cfg: GatewayConfig) -> str:
    """The route table as aligned text, one route a line, in match order."""
    rows = [("#", "name", "methods", "path", "query", "upstream", "auth", "policies")]
    for i, r in enumerate(cfg.routes):
        rows.append(
            (
                str(i),
                r.name,
                ",".join(r.match.methods or ["*"]),
                r.match.path,
                "&".join(f"{k}={v}" for k, v in (r.match.query or {}).items()) or "-",
                r.upstream,
                r.auth.mode,
                ",".join(p.key for p in POLICIES if p.key != "auth" and p.enabled(r)) or "-",
            )
        )
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    return "".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() + "\n"
        for row in rows
    )
