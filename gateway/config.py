"""Typed, validated gateway configuration.

Owns: reading config.yaml, `${VAR}` / `${VAR:-default}` interpolation, the pydantic models
of the top-level sections and of a route, checks across sections, and turning every
problem into a `ConfigIssue` whose `key` is the dotted path (`routes[2].cache.ttl`) an
operator can find in the file. Each policy's section (its model and the checks of what it
asks of the rest of the route) lives in its package, gateway/policies/<name>/config.py;
`Route` mounts them. Nothing here touches the network.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import Field, ValidationError, ValidationInfo, field_validator
from starlette.routing import compile_path

from gateway.model import ConfigIssue as ConfigIssue
from gateway.model import FailureMode, Section
from gateway.policies import POLICIES
from gateway.policies.auth.config import AuthSettings as AuthSettings
from gateway.policies.auth.config import RouteAuth, settings_issues
from gateway.policies.breaker.config import BreakerConfig
from gateway.policies.cache.config import CacheConfig
from gateway.policies.concurrency.config import ConcurrencyConfig
from gateway.policies.heartbeat.config import HeartbeatConfig
from gateway.policies.ratelimit.config import RateLimitList
from gateway.policies.refresh.config import RefreshConfig
from gateway.units import Duration

# --------------------------------------------------------------------------- sections

# RFC 9110 token: what a header name may be.
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")

# Headers some hop or framework believes as the client's address, as the URL that was
# really asked for (IIS/Symfony X-Original-URL, X-Rewrite-URL) or as the method (Express
# method-override, Rack, ASP.NET: a GET the gateway routed, rate-limited or cached as a
# GET must not reach the app as a DELETE): a client must not be able to set them through
# the gateway. X-Real-IP is then set by the gateway itself.
STRIP_REQUEST_HEADERS = (
    "x-real-ip",
    "true-client-ip",
    "cf-connecting-ip",
    "sb-forwarded-for",
    "x-client-ip",
    "client-ip",
    "x-cluster-client-ip",
    "fastly-client-ip",
    "x-originating-ip",
    "x-remote-ip",
    "x-remote-addr",
    "x-forwarded",
    "forwarded-for",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-forwarded-server",
    "x-original-url",
    "x-rewrite-url",
    "x-original-host",
    "x-host",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
)


def _parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    p = int(port)
    if not 0 <= p <= 65535:
        raise ValueError(f"port {p} out of range")
    return host.strip("[]"), p


class ServerConfig(Section):
    listen: str = "127.0.0.1:8080"
    admin_listen: str = "127.0.0.1:9091"
    trusted_proxies: list[str] = Field(default_factory=lambda: ["127.0.0.1/32"])
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=0)
    workers: int = Field(1, ge=1, le=64)
    # With workers > 1 on Linux: one SO_REUSEPORT listener per worker, so the kernel
    # spreads connections instead of the first process to wake taking them all (nginx's
    # `reuse_port`). false = one socket shared by every worker. Restart to change.
    reuse_port: bool = True
    drain_timeout: Duration = 20.0
    keep_alive_timeout: Duration = 75.0
    access_log: bool = True
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Upper bound on open connections (and on requests in progress) per process; above
    # it a request is answered 503 JSON. null = unbounded (docs/security.md).
    limit_concurrency: int | None = Field(4096, ge=1)
    # Largest request head (request line plus all headers) in bytes; 431 JSON above it,
    # decided as the bytes arrive (docs/security.md).
    max_header_bytes: int = Field(32 * 1024, ge=1024, le=16 * 1024 * 1024)
    # Time allowed from accept (first request) or from a head's first byte (later
    # requests) until the end of the head; then the connection is closed.
    header_timeout: Duration = Field(10.0, gt=0)
    # Forward request header names containing `_` (dropped by default, as nginx's
    # underscores_in_headers off). Framing and gateway-set names stay dropped.
    allow_underscore_headers: bool = False
    # Client-IP and URL-override headers dropped from every request before it is
    # forwarded (a client must not choose what the app believes); case-insensitive.
    strip_request_headers: list[str] = Field(default_factory=lambda: list(STRIP_REQUEST_HEADERS))

    @field_validator("listen", "admin_listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        _parse_listen(v)
        return v

    @field_validator("strip_request_headers")
    @classmethod
    def _header_names(cls, v: list[str]) -> list[str]:
        for name in v:
            if not _TOKEN.fullmatch(name):
                raise ValueError(f"{name!r} is not a header name")
        return [name.lower() for name in v]

    @field_validator("trusted_proxies")
    @classmethod
    def _cidrs(cls, v: list[str]) -> list[str]:
        for cidr in v:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError as exc:
                raise ValueError(f"{cidr!r} is not an IP network: {exc}") from None
        return v

    @property
    def listen_addr(self) -> tuple[str, int]:
        return _parse_listen(self.listen)

    @property
    def admin_addr(self) -> tuple[str, int]:
        return _parse_listen(self.admin_listen)


class StoreConfig(Section):
    url: str = "memory://"
    key_prefix: str = "edge:"
    on_failure: FailureMode = "local"
    timeout: Duration = 0.05
    # After this many consecutive failures, stop trying the store for `backoff`.
    failure_threshold: int = Field(3, ge=1)
    backoff: Duration = 2.0
    # While backing off, one call per probe_interval still tries the store; the first
    # that succeeds ends the back-off at once.
    probe_interval: Duration = 0.25
    max_connections: int = Field(64, ge=1)
    memory_max_keys: int = Field(1_000_000, ge=1000)
    # on_failure: local — how many gateway processes share the store (replicas x
    # server.workers; default server.workers): each admits 1/N of every rate limit
    # while the store is down, so the fleet still admits about the configured rate.
    local_processes: int | None = Field(None, ge=1)
    # true: /readyz answers 503 while the store is unreachable (takes this pod out of
    # rotation). Off by default: the store is shared, so an outage would take every
    # replica out at once.
    readiness_check: bool = False

    @field_validator("url")
    @classmethod
    def _scheme(cls, v: str) -> str:
        # Also parses redis+cluster:// and redis+sentinel:// (docs/redis.md).
        from gateway.store.redis import check_store_url

        if not v.strip():
            # Typically `${REDIS_URL-...}` with REDIS_URL set to "": refuse it rather than
            # guess a store (docs/deploy.md).
            raise ValueError("is empty; set memory:// or a redis:// URL")
        check_store_url(v)
        return v

    @field_validator("key_prefix")
    @classmethod
    def _prefix(cls, v: str, info: ValidationInfo) -> str:
        # On a cluster a brace in the prefix would become the keys' hash tag and put
        # every key of the gateway in one slot.
        if str(info.data.get("url", "")).startswith("redis+cluster:") and ("{" in v or "}" in v):
            raise ValueError("must not contain '{' or '}' with a redis+cluster:// store")
        return v

    @property
    def is_memory(self) -> bool:
        return self.url.startswith("memory:")


class UpstreamConfig(Section):
    url: str
    connect_timeout: Duration = 2.0
    read_timeout: Duration = 30.0
    max_connections: int = Field(256, ge=1)
    # How long a request may wait for a free pooled connection (all max_connections busy)
    # before it is answered 504, instead of queueing inside the gateway without limit.
    pool_timeout: Duration = 5.0
    # Idle time before a pooled connection is closed. Below Node's 5 s keep-alive (and
    # uvicorn's), so the gateway retires a connection before the upstream closes it; an
    # upstream's `Keep-Alive: timeout=N` shortens it further (to N - 1 s).
    keepalive_timeout: Duration = 4.0
    # Send the client's Host header upstream instead of the upstream's own host.
    preserve_host: bool = False
    # Rewrite Location / Content-Location / Refresh headers that point at this
    # upstream's own origin to the origin the client used (nginx's `proxy_redirect
    # default`), so redirects never leak the internal address.
    rewrite_redirects: bool = True
    # More origins that count as this upstream's own (scheme://host[:port]), e.g. the
    # name the app believes it has (Next.js builds absolute URLs from its own
    # hostname). Loopback aliases of a loopback upstream are always included.
    redirect_origins: list[str] = Field(default_factory=list)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise ValueError(f"expected an http:// or https:// URL, got {v!r}")
        if parts.query or parts.fragment:
            raise ValueError("an upstream URL takes no query or fragment")
        return v.rstrip("/")

    @field_validator("redirect_origins")
    @classmethod
    def _origins(cls, v: list[str]) -> list[str]:
        for origin in v:
            parts = urlsplit(origin)
            if parts.scheme not in {"http", "https"} or not parts.hostname:
                raise ValueError(f"expected an http:// or https:// origin, got {origin!r}")
            if parts.path.strip("/") or parts.query or parts.fragment:
                raise ValueError(f"an origin is scheme://host[:port] only, got {origin!r}")
        return v


# RFC 9110's methods and PATCH (RFC 5789). Any other name is a typo (`GTE`) that would
# make the route never match and hand its requests to a weaker route.
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE")

_PARAM = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?::[A-Za-z_][A-Za-z0-9_]*)?")


def _template_braces(path: str) -> None:
    """ValueError naming the first brace that does not open or close a `{name}` /
    `{name:convertor}` parameter. Starlette reads a stray brace as a literal character,
    so `/a/{id/b` would compile to a route no request ever matches."""
    i = 0
    while i < len(path):
        ch = path[i]
        if ch == "}":
            raise ValueError(f"stray '}}' at character {i + 1} of {path!r}")
        if ch == "{":
            end = path.find("}", i)
            inner = path[i + 1 : end] if end != -1 else ""
            if end == -1 or "{" in inner or "/" in inner:
                raise ValueError(f"'{{' at character {i + 1} of {path!r} is not closed by '}}'")
            if not _PARAM.fullmatch(inner):
                raise ValueError(
                    f"{{{inner}}} in {path!r} is not a parameter; use {{name}} or "
                    "{name:convertor} (str, int, float, uuid, path)"
                )
            i = end
        i += 1


class RouteMatch(Section):
    methods: list[str] | None = None
    path: str
    query: dict[str, str] | None = None

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return None
        if not v:
            # An empty list compiles to "any method": leaving the key out says that.
            raise ValueError("is empty; leave methods out to match every method")
        out = [m.upper() for m in v]
        for m in out:
            if m not in HTTP_METHODS:
                raise ValueError(f"unknown HTTP method {m!r}; use one of {', '.join(HTTP_METHODS)}")
        return out

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("a path template starts with '/'")
        _template_braces(v)
        try:
            compile_path(v)
        except (ValueError, AssertionError, KeyError) as exc:
            raise ValueError(f"invalid path template: {exc}") from None
        return v


# The policy sections are written out, one typed field per policy, rather than made from
# the registry (gateway/policies/__init__.py) with pydantic.create_model: mypy --strict
# sees `route.cache` as `CacheConfig | None` only if it is declared here, and every
# policy reads its own section through it.
class Route(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    match: RouteMatch
    upstream: str
    auth: RouteAuth = Field(default_factory=RouteAuth)
    heartbeat: HeartbeatConfig | None = None
    cache: CacheConfig | None = None
    refresh: RefreshConfig | None = None
    breaker: BreakerConfig | None = None
    rate_limit: RateLimitList | None = None
    concurrency: ConcurrencyConfig | None = None
    # Per-route override of the upstream read timeout.
    read_timeout: Duration | None = None

    @field_validator("auth", mode="before")
    @classmethod
    def _auth_short(cls, v: Any) -> Any:
        if isinstance(v, str):
            return {"mode": v}
        if v is False or v is None:
            return {"mode": "off"}
        return v


class DegradedIntervals(Section):
    presence_ping_interval: Duration = 300.0
    access_track_interval: Duration = 600.0
    chat_fallback_interval: Duration = 15.0
    admin_polling_interval: Duration = 30.0


class ClientConfig(Section):
    presence_ping_interval: Duration = 120.0
    access_track_interval: Duration = 300.0
    chat_fallback_interval: Duration = 2.0
    admin_polling_interval: Duration = 10.0
    degraded: DegradedIntervals = Field(default_factory=DegradedIntervals)
    # Upstream considered unhealthy above this 5xx/timeout ratio over the last minute.
    degraded_error_ratio: float = Field(0.25, gt=0, le=1)
    cache_max_age: Duration = 30.0


class Webhook(Section):
    kind: Literal["slack", "discord", "generic"]
    url: str

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if urlsplit(v).scheme not in ("http", "https") or not urlsplit(v).netloc:
            raise ValueError("webhook url must be an http:// or https:// URL")
        return v


class AlertRules(Section):
    upstream_400_per_min: float | None = Field(10, gt=0)
    upstream_409_per_min: float | None = Field(50, gt=0)
    upstream_5xx_per_min: float | None = Field(None, gt=0)
    auth_p95: Duration | None = 5.0
    realtime_disconnects_per_min: float | None = Field(100, gt=0)
    breaker_open: bool = True


class AlertsConfig(Section):
    evaluate_every: Duration = Field(15.0, gt=0)
    cooldown: Duration = 600.0
    webhooks: list[Webhook] = Field(default_factory=list)
    rules: AlertRules = Field(default_factory=AlertRules)
    # How often each replica writes its counts to the store (one round trip).
    flush_every: Duration = Field(5.0, gt=0)
    # Webhook delivery: per-attempt timeout, attempts, first back-off (doubles).
    send_timeout: Duration = Field(5.0, gt=0)
    send_attempts: int = Field(4, ge=1, le=10)
    send_backoff: Duration = 1.0

    @field_validator("webhooks", mode="before")
    @classmethod
    def _drop_unset(cls, v: Any) -> Any:
        # `url: ${SLACK_WEBHOOK_URL:-}` with the variable unset or empty turns that
        # webhook off, so one config serves environments with and without each service.
        if isinstance(v, list):
            return [w for w in v if not (isinstance(w, dict) and w.get("url") in ("", None))]
        return v


class GatewayConfig(Section):
    server: ServerConfig = Field(default_factory=ServerConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    upstreams: dict[str, UpstreamConfig]
    auth: AuthSettings = Field(default_factory=AuthSettings)
    routes: list[Route] = Field(min_length=1)
    client: ClientConfig = Field(default_factory=ClientConfig)
    alerts: AlertsConfig = Field(default_factory=AlertsConfig)


# --------------------------------------------------------------------------- loading


class ConfigError(Exception):
    def __init__(self, issues: list[ConfigIssue]) -> None:
        super().__init__("\n".join(str(i) for i in issues))
        self.issues = issues


# `${VAR}`, `${VAR:-default}` (default when unset or empty) and `${VAR-default}` (default
# only when unset), as in POSIX sh.
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)(.*?))?\}")


def dotted(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _interpolate(
    node: Any, env: dict[str, str], loc: tuple[int | str, ...], issues: list[ConfigIssue]
) -> Any:
    """Substitute `${VAR}` and `${VAR:-default}` in string scalars after YAML parsing, so a
    value containing `:` or `#` cannot change the document's structure."""
    if isinstance(node, dict):
        return {k: _interpolate(v, env, (*loc, k), issues) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, env, (*loc, i), issues) for i, v in enumerate(node)]
    if isinstance(node, str) and "${" in node:

        def sub(m: re.Match[str]) -> str:
            name, op, default = m.group(1), m.group(2), m.group(3)
            # Shell semantics: `${VAR:-d}` takes d when VAR is unset *or empty*,
            # `${VAR-d}` only when it is unset.
            if env.get(name):
                return env[name]
            if name in env and op != ":-":
                return ""
            if default is not None:
                return default
            issues.append(
                ConfigIssue(dotted(loc), f"environment variable {name} is not set (no default)")
            )
            return ""

        return _VAR.sub(sub, node)
    return node


def _reference_issues(data: dict[str, Any]) -> list[ConfigIssue]:
    """Names that must be unique or refer to something (route names, upstreams), read from
    the raw data so they are reported in the same pass as type errors."""
    issues: list[ConfigIssue] = []
    ups = data.get("upstreams")
    known = set(ups) if isinstance(ups, dict) else None
    routes = data.get("routes")
    seen: dict[str, int] = {}
    for i, route in enumerate(routes if isinstance(routes, list) else []):
        if not isinstance(route, dict):
            continue
        name = route.get("name")
        if isinstance(name, str):
            if name in seen:
                issues.append(
                    ConfigIssue(
                        f"routes[{i}].name",
                        f"duplicate route name {name!r} (also routes[{seen[name]}])",
                    )
                )
            seen.setdefault(name, i)
        if known is None:
            continue  # `upstreams` itself is missing or malformed: reported as such
        refs = [("upstream", route.get("upstream"))]
        for spec in POLICIES:
            section = route.get(spec.key)
            if isinstance(section, dict):
                refs += [(f"{spec.key}.{k}", section.get(k)) for k in spec.upstream_refs]
        for key, ref in refs:
            if isinstance(ref, str) and ref and ref not in known:
                issues.append(ConfigIssue(f"routes[{i}].{key}", f"unknown upstream {ref!r}"))
    return issues


def _route_issues(i: int, route: Route) -> list[ConfigIssue]:
    """Policy combinations one route's valid settings do not allow: each policy's own
    checks (its package's config.py), in chain order."""
    return [issue for spec in POLICIES for issue in spec.route_issues(f"routes[{i}]", route)]


@dataclass(frozen=True, slots=True)
class _Parts:
    """The sections that validated, so cross-section checks run even when another
    section has errors (every error in one pass)."""

    server: ServerConfig | None
    store: StoreConfig | None
    auth: AuthSettings | None
    routes: list[tuple[int, Route]]


def _valid_parts(data: dict[str, Any]) -> _Parts:
    def one(model: type[Section], value: Any) -> Any:
        try:
            return model.model_validate({} if value is None else value)
        except ValidationError:
            return None

    raw_routes = data.get("routes")
    routes: list[tuple[int, Route]] = []
    for i, raw in enumerate(raw_routes if isinstance(raw_routes, list) else []):
        route = one(Route, raw)
        if route is not None:
            routes.append((i, route))
    return _Parts(
        one(ServerConfig, data.get("server")),
        one(StoreConfig, data.get("store")),
        one(AuthSettings, data.get("auth")),
        routes,
    )


def _cross_issues(parts: _Parts) -> list[ConfigIssue]:
    issues = [issue for i, route in parts.routes for issue in _route_issues(i, route)]
    server, store, auth = parts.server, parts.store, parts.auth
    if store is not None and server is not None and store.is_memory and server.workers > 1:
        issues.append(
            ConfigIssue(
                "store.url",
                "memory:// is per process; with server.workers > 1 use redis:// so the "
                "workers share limits, caches and locks",
            )
        )
    if server is not None and server.listen_addr == server.admin_addr:
        issues.append(ConfigIssue("server.admin_listen", "must differ from server.listen"))
    if auth is not None:
        issues.extend(settings_issues(auth, [r for _, r in parts.routes]))
    return issues


def _validation_issues(exc: ValidationError) -> Iterator[ConfigIssue]:
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling)"
        yield ConfigIssue(dotted(loc), msg)


def parse_config(text: str, env: dict[str, str] | None = None) -> GatewayConfig:
    """Parse and validate; raises ConfigError listing every issue found."""
    env = dict(os.environ) if env is None else env
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([ConfigIssue("", f"YAML syntax error at {where}{problem}")]) from None
    if not isinstance(raw, dict):
        raise ConfigError([ConfigIssue("", "the config must be a YAML mapping")])
    issues: list[ConfigIssue] = []
    data = _interpolate(raw, env, (), issues)
    try:
        cfg = GatewayConfig.model_validate(data)
    except ValidationError as exc:
        issues.extend(_validation_issues(exc))
        issues.extend(_reference_issues(data))
        issues.extend(_cross_issues(_valid_parts(data)))
        raise ConfigError(issues) from None
    issues.extend(_reference_issues(data))
    issues.extend(
        _cross_issues(_Parts(cfg.server, cfg.store, cfg.auth, list(enumerate(cfg.routes))))
    )
    if issues:
        raise ConfigError(issues)
    return cfg


def load_config(path: str | Path, env: dict[str, str] | None = None) -> GatewayConfig:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([ConfigIssue("", f"cannot read {path}: {exc.strerror}")]) from None
    return parse_config(text, env)


def config_digest(cfg: GatewayConfig) -> str:
    """A digest that changes when the effective config changes; secrets are hashed in,
    never shown."""
    return hashlib.sha256(cfg.model_dump_json(by_alias=True).encode()).hexdigest()[:16]
