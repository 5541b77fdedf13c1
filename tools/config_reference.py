"""Generates docs/config-reference.md from the pydantic config models, so the reference
cannot drift from what the gateway accepts.

Owns: walking `GatewayConfig` (gateway/config.py, with the per-route policy sections from
gateway/policies/configs.py) into one row per key: dotted path, type, default and
description. A description is the field's `Field(description=...)`, else the comment lines
right above the field (or at the end of its line) in the model's source, else an entry in
`EXTRA` below. tests/test_config_reference.py fails when a key has no description or the
committed file differs from this output.

    .venv/bin/python tools/config_reference.py          # rewrite docs/config-reference.md
    .venv/bin/python tools/config_reference.py --check  # exit 1 if it is stale
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gateway.config import GatewayConfig  # noqa: E402
from gateway.units import (  # noqa: E402
    Duration,
    Rate,
    format_duration,
    parse_duration,
    parse_rate,
)

OUTPUT = ROOT / "docs" / "config-reference.md"

# Descriptions of keys whose model carries no comment or Field description
# ("Class.field"). A key the model documents itself does not belong here.
EXTRA: dict[str, str] = {
    "GatewayConfig.server": "Listeners, workers, draining, logging.",
    "GatewayConfig.store": "Shared state for locks, limits, caches (docs/redis.md).",
    "GatewayConfig.upstreams": "Named upstreams routes send to (`upstream: <name>`).",
    "GatewayConfig.auth": "Supabase JWT verification settings (docs/auth.md).",
    "GatewayConfig.routes": "Ordered route table; the first match wins.",
    "GatewayConfig.client": "Intervals handed to the web app via the client config endpoint.",
    "GatewayConfig.alerts": "Alert rules and webhooks.",
    "ServerConfig.listen": "Public HOST:PORT.",
    "ServerConfig.admin_listen": "Admin HOST:PORT (/healthz, /readyz, /metrics, /_edge/*).",
    "ServerConfig.trusted_proxies": "CIDRs whose X-Forwarded-For is believed for the client IP.",
    "ServerConfig.max_body_bytes": "Largest request body the gateway reads (413 above).",
    "ServerConfig.workers": "Worker processes sharing the listeners (restart to change).",
    "ServerConfig.drain_timeout": "On SIGTERM, how long in-flight requests may finish.",
    "ServerConfig.keep_alive_timeout": "Idle keep-alive timeout for client connections.",
    "ServerConfig.access_log": "Write one JSON access log line per request.",
    "ServerConfig.log_level": "Minimum log level.",
    "StoreConfig.url": "memory://, redis://, rediss://, unix://, redis+cluster://h:p[,h:p], "
    "redis+sentinel://h:p[,h:p]/service[/db].",
    "StoreConfig.key_prefix": "Prepended to every key (no braces on Redis Cluster).",
    "StoreConfig.on_failure": "When the store fails: local = decide with this process's own "
    "bounded state (docs/redis.md#when-the-store-fails), open = as if there were no edge, "
    "closed = 503. Each policy may override it.",
    "StoreConfig.timeout": "Bound on every store call (no retries).",
    "StoreConfig.max_connections": (
        "Connections per process (per master on a cluster). On one server, script calls "
        "(every hot path's) and plain commands each have up to this many."
    ),
    "StoreConfig.memory_max_keys": "Key bound of the memory:// store (LRU beyond it).",
    "UpstreamConfig.url": "http(s) base URL, no query.",
    "UpstreamConfig.connect_timeout": "TCP/TLS connect timeout.",
    "UpstreamConfig.read_timeout": "Time to the response head (routes may override).",
    "UpstreamConfig.max_connections": "Connection pool size to this upstream.",
    "UpstreamConfig.keepalive_timeout": "Idle time before a pooled connection is closed.",
    "AuthSettings.issuer": "Expected `iss` (e.g. https://<ref>.supabase.co/auth/v1).",
    "AuthSettings.audience": "Accepted `aud` value(s).",
    "AuthSettings.hs256_secret": "Legacy HS256 JWT secret (use ${SUPABASE_JWT_SECRET}).",
    "AuthSettings.jwks_url": "JWKS endpoint for asymmetric (ES256/RS256) signing keys.",
    "AuthSettings.jwks_min_refetch": "Least time between JWKS fetches (unknown kid).",
    "AuthSettings.jwks_max_age": "Refetch the JWKS after this long.",
    "AuthSettings.jwks_timeout": "Timeout of one JWKS fetch.",
    "AuthSettings.leeway": "Clock skew allowed on exp/nbf/iat.",
    "AuthSettings.cookie_name": "Session cookie to read when there is no Authorization header.",
    "AuthSettings.token_cache_size": "Verified tokens remembered per process.",
    "AuthSettings.identity_hmac_secret": "Signs the identity headers sent upstream.",
    "AuthSettings.user_url": "GoTrue /auth/v1/user, for `revalidate`.",
    "AuthSettings.apikey": "Supabase anon key sent with revalidation calls.",
    "RouteMatch.methods": "HTTP methods (any when unset).",
    "RouteMatch.path": "Path template, e.g. /api/webinars/{id}.",
    "RouteMatch.query": "Query parameters that must equal these values.",
    "Route.name": "Unique route name (metrics label, key part).",
    "Route.match": "What requests this route takes.",
    "Route.upstream": "Name of an entry under `upstreams`.",
    "Route.auth": "Auth mode or section; a string is shorthand for `{mode: ...}`.",
    "Route.heartbeat": "Heartbeat coalescing (docs/heartbeat.md).",
    "Route.cache": "Response cache (docs/cache.md).",
    "Route.refresh": "Refresh-token coalescing (docs/refresh.md).",
    "Route.breaker": "Circuit breaker (docs/breaker.md).",
    "Route.rate_limit": "GCRA rate-limit rules, all checked at once (docs/ratelimit.md).",
    "Route.concurrency": "Per-key cap on in-flight upstream requests.",
    "DegradedIntervals.presence_ping_interval": "Presence ping interval while degraded.",
    "DegradedIntervals.access_track_interval": "Access tracking interval while degraded.",
    "DegradedIntervals.chat_fallback_interval": "Chat polling interval while degraded.",
    "DegradedIntervals.admin_polling_interval": "Admin polling interval while degraded.",
    "ClientConfig.presence_ping_interval": "Presence ping interval.",
    "ClientConfig.access_track_interval": "Access tracking interval.",
    "ClientConfig.chat_fallback_interval": "Chat polling interval when realtime is down.",
    "ClientConfig.admin_polling_interval": "Admin dashboard polling interval.",
    "ClientConfig.degraded": "Slower intervals served while the upstream is unhealthy.",
    "ClientConfig.cache_max_age": "Cache-Control max-age of the client config answer.",
    "Webhook.kind": "Message format.",
    "Webhook.url": "Webhook URL; an empty value (e.g. `${SLACK_URL:-}` with SLACK_URL unset "
    "or empty) drops the webhook.",
    "AlertRules.upstream_400_per_min": "Alert above this many upstream 400s a minute.",
    "AlertRules.upstream_409_per_min": "Alert above this many upstream 409s a minute.",
    "AlertRules.upstream_5xx_per_min": "Alert above this many upstream 5xx a minute.",
    "AlertRules.auth_p95": "Alert when the auth upstream's p95 latency exceeds this.",
    "AlertRules.realtime_disconnects_per_min": "Alert above this many realtime disconnects.",
    "AlertRules.breaker_open": "Alert when a breaker opens.",
    "AlertsConfig.evaluate_every": "How often the rules are evaluated.",
    "AlertsConfig.cooldown": "Least time between two alerts of one rule.",
    "AlertsConfig.webhooks": "Where alerts are sent.",
    "AlertsConfig.rules": "Thresholds (null turns a rule off).",
    "AlertsConfig.send_attempts": "Delivery attempts per alert.",
    "AlertsConfig.send_backoff": "Wait before the second attempt (doubles after).",
    "StoreConfig.backoff": "After failure_threshold failures, fail fast for this long.",
    "RouteAuth.mode": "required = 401 without a valid token; optional; off = not checked.",
    "LocalResponse.status": "Status of the edge's answer to an absorbed heartbeat.",
    "LocalResponse.body": "Body (non-strings are JSON-encoded).",
    "LocalResponse.content_type": "Content-Type of the edge's answer.",
    "HeartbeatConfig.mode": "sample: forward one per forward_interval; batch: flush to flush_url.",
    "HeartbeatConfig.forward_interval": "Sample mode: at most one heartbeat per viewer per "
    "webinar per interval reaches the app.",
    "HeartbeatConfig.local_response": "The edge's answer to an absorbed heartbeat.",
    "HeartbeatConfig.key": "Viewer identity without a verified token: user, ip, cookie:NAME, "
    "header:NAME (first present).",
    "HeartbeatConfig.negative_ttl": "How long an app's negative answer is replayed per viewer.",
    "HeartbeatConfig.negative_statuses": "App statuses cached per viewer (400-599).",
    "HeartbeatConfig.presence_window": "Online if seen within it (default 3 x "
    "client.presence_ping_interval).",
    "HeartbeatConfig.flush_interval": "Batch mode: how often a flush runs.",
    "HeartbeatConfig.flush_url": "Batch mode: path on flush_upstream (or absolute URL).",
    "HeartbeatConfig.flush_upstream": "Batch mode: the upstream the flush goes to.",
    "HeartbeatConfig.flush_headers": "Headers of the flush request (use ${ENV} for keys).",
    "HeartbeatConfig.on_failure": "Store failure: local = forward a viewer's first heartbeat "
    "in this process, absorb the rest; open = forward; closed = 503 (default "
    "store.on_failure).",
    "CacheAuthorize.claim": "Verified claim (dotted path) that decides access.",
    "CacheAuthorize.in_": "Values of `claim` that may read the cached answer.",
    "CacheConfig.ttl": "How long a stored answer is fresh (> 0).",
    "CacheConfig.stale_while_revalidate": "After ttl: one request refreshes, others get the "
    "stale copy.",
    "CacheConfig.stale_if_error": "After ttl: serve the last good copy if the refresh fails.",
    "CacheConfig.vary_query": "Query parameters that are part of the key.",
    "CacheConfig.vary_claims": "Verified claims (dotted paths) that are part of the key.",
    "CacheConfig.authz_ttl": "How long a caller the app answered 200 may read the cache.",
    "CacheConfig.deny_ttl": "How long a caller the app answered 401/403 is remembered denied.",
    "CacheConfig.authorize": "Decide access from a verified claim instead of asking the app.",
    "CacheConfig.lock_timeout": "Refresh lock lifetime and longest wait for another's refresh.",
    "CacheConfig.max_body_bytes": "Larger answers stream through and are not stored.",
    "CacheConfig.on_failure": "Store failure: local = serve and single-flight from this "
    "process's copy; open = the app answers; closed = 503.",
    "RefreshConfig.poll_interval": "How often a follower looks for the leader's answer.",
    "RefreshConfig.on_failure": "Store failure: local = single flight and replay in this "
    "process; open = call GoTrue anyway; closed = 503.",
    "BreakerConfig.group": "Breaker name; routes naming one group share one breaker.",
    "BreakerConfig.failure_threshold": "Open after this many consecutive failures.",
    "BreakerConfig.failure_ratio": "...or when failures/requests over window reach this.",
    "BreakerConfig.window": "Sliding window of the ratio.",
    "BreakerConfig.min_requests": "Least requests in the window for the ratio to count.",
    "BreakerConfig.cooldown": "How long the breaker stays open the first time (doubles).",
    "BreakerConfig.max_cooldown": "Cap of the cooldown and of an upstream Retry-After.",
    "BreakerConfig.half_open_probes": "Requests let through after the cooldown.",
    "BreakerConfig.jitter": "Retry-After = remaining cooldown x uniform(1-jitter, 1+jitter).",
    "BreakerConfig.negative_ttl": "How long a caller's 4xx answer is replayed (0 = off).",
    "BreakerConfig.negative_statuses": "Statuses the negative cache keeps.",
    "RateLimitRule.by": "user, ip, webinar, route or header:NAME.",
    "RateLimitRule.rate": "Sustained rate.",
    "RateLimitRule.burst": "Requests that may arrive at once (bucket size).",
    "RateLimitRule.on_failure": "Store failure: open (skip), closed (503), local (this "
    "process's share, see store.local_processes).",
    "ConcurrencyConfig.by": "Key of the cap (anonymous user -> IP).",
    "ConcurrencyConfig.max": "In-flight requests per key, per process.",
    "ConcurrencyConfig.retry_after": "Retry-After on the 503.",
}

_FIELD = re.compile(r"^\s+([A-Za-z_][A-Za-z0-9_]*)\s*:")


def _source_comments(cls: type) -> dict[str, str]:
    """field name -> the comment right above it (or trailing on its line)."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    out: dict[str, str] = {}
    above: list[str] = []
    for line in lines[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("#").strip())
            continue
        m = _FIELD.match(line)
        if m and not stripped.startswith(("def ", "@")) and "(" not in line.split(":")[0]:
            text = " ".join(above)
            if "#" in line and not text:
                text = line.split("#", 1)[1].strip()
            if text:
                out.setdefault(m.group(1), text)
        above = []
    return out


def _type(ann: Any) -> str:
    if ann is Duration:
        return "duration"
    if ann is Rate:
        return "rate"
    origin = typing.get_origin(ann)
    args = typing.get_args(ann)
    if origin is typing.Annotated:
        return _type(args[0])
    if origin in (Union, types.UnionType):
        parts = [_type(a) for a in args if a is not type(None)]
        return " | ".join(parts) + (" | null" if type(None) in args else "")
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin is list:
        return f"list[{_type(args[0])}]"
    if origin is dict:
        return f"map[{_type(args[0])}, {_type(args[1])}]"
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return "section"
    return getattr(ann, "__name__", str(ann))


def _field_type(field: FieldInfo) -> str:
    # pydantic moves a top-level Annotated's metadata off the annotation: find the unit
    # by its parser.
    for meta in field.metadata:
        func = getattr(meta, "func", None)
        if func is parse_duration:
            return "duration" + (" | null" if _type(field.annotation).endswith("null") else "")
        if func is parse_rate:
            return "rate"
    return _type(field.annotation)


def _default(field: FieldInfo, *, duration: bool = False) -> str:
    if field.is_required():
        return "required"
    factory = field.default_factory
    value = factory() if factory is not None else field.default  # type: ignore[call-arg]
    if value is PydanticUndefined:
        return "required"
    if isinstance(value, BaseModel):
        return "(section)"
    if value is None:
        return "null"
    if duration and isinstance(value, int | float):
        return f"`{format_duration(value)}`"
    return "`" + json.dumps(value) + "`"


def _models(ann: Any) -> list[tuple[str, type[BaseModel]]]:
    """Section models inside an annotation, with the path suffix that reaches them."""
    origin = typing.get_origin(ann)
    args = typing.get_args(ann)
    if origin is typing.Annotated:
        return _models(args[0])
    if origin in (Union, types.UnionType):
        return [m for a in args for m in _models(a)]
    if origin is list:
        return [("[]" + s, m) for s, m in _models(args[0])]
    if origin is dict:
        return [(".<name>" + s, m) for s, m in _models(args[1])]
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return [("", ann)]
    return []


Row = tuple[str, str, str, str]


def rows(model: type[BaseModel] = GatewayConfig, prefix: str = "") -> list[Row]:
    comments = _source_comments(model)
    out: list[Row] = []
    for name, field in model.model_fields.items():
        key = field.alias or name
        path = f"{prefix}.{key}" if prefix else key
        desc = (
            field.description
            or comments.get(name)
            or EXTRA.get(f"{model.__name__}.{name}")
            # A field inherited by a subclass keeps its base class's comment.
            or next(
                (
                    _source_comments(base).get(name)
                    for base in model.__mro__[1:]
                    if isinstance(base, type)
                    and issubclass(base, BaseModel)
                    and _source_comments(base).get(name)
                ),
                "",
            )
        )
        typ = _field_type(field)
        out.append((path, typ, _default(field, duration=typ.startswith("duration")), desc or ""))
        for suffix, sub in _models(field.annotation):
            out.extend(rows(sub, path + suffix))
    return out


def render() -> str:
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by tools/config_reference.py from the config models; do not edit."
        " Run `.venv/bin/python tools/config_reference.py` after changing a model. -->",
        "",
        "Every key `config.yaml` accepts (unknown keys are errors). Types: `duration` is a"
        " number with a unit (`50ms`, `2s`, `5m`; a bare number other than 0 is refused);"
        " `rate` is `N/s`, `N/min`, `N/h`; `section` is a nested mapping whose keys follow;"
        " `[]` marks a list item and `<name>` a key you choose. Any value may use `${VAR}`,"
        " `${VAR:-default}` or `${VAR-default}`. The exact rules, with examples, are under"
        " [Value rules](#value-rules).",
        "",
    ]
    current = None
    for path, typ, default, desc in rows():
        top = path.split(".", 1)[0].split("[", 1)[0]
        if top != current:
            current = top
            lines += ["", f"## `{top}`", "", "| Key | Type | Default | Description |"]
            lines.append("|---|---|---|---|")
        cell = desc.replace("|", "\\|")
        typ_cell = typ.replace("|", "\\|")
        default_cell = default.replace("|", "\\|")
        lines.append(f"| `{path}` | {typ_cell} | {default_cell} | {cell} |")
    return "\n".join(lines + render_rules()) + "\n"


# --------------------------------------------------------------------------- value rules
# Each example is put at its rule's key in an otherwise valid config and run through
# `gateway check` by tests/test_config_reference.py: the rules printed in the reference
# are the rules the code applies.


@dataclasses.dataclass(frozen=True)
class Example:
    yaml: str  # the value exactly as written in config.yaml
    env: dict[str, str] = dataclasses.field(default_factory=dict)  # the environment (others unset)
    result: Any = None  # accepted: the value the gateway reads
    error: str = ""  # refused: what `check` says after the dotted key
    at: str = ""  # where `result` is read, when not at the rule's key
    shown: str = ""  # how the result is shown, when not as the value itself


@dataclasses.dataclass(frozen=True)
class Rule:
    title: str
    key: str  # where the examples go (a key of BASE_CONFIG)
    text: str
    examples: tuple[Example, ...]


def _ok(yaml_text: str, result: Any, **kw: Any) -> Example:
    return Example(yaml_text, result=result, **kw)


def _refused(yaml_text: str, error: str, **kw: Any) -> Example:
    return Example(yaml_text, error=error, **kw)


BASE_CONFIG: dict[str, Any] = {
    "store": {"url": "memory://"},
    "upstreams": {"app": {"url": "http://127.0.0.1:3000"}},
    "routes": [
        {
            "name": "chat",
            "match": {"methods": ["GET"], "path": "/chat"},
            "upstream": "app",
            "auth": "off",
            "breaker": {"group": "chat", "cooldown": "30s"},
            "rate_limit": [{"by": "ip", "rate": "2/s"}],
        }
    ],
    "alerts": {"webhooks": [{"kind": "slack", "url": "https://hooks.example/x"}]},
}

_URL_ERROR = "expected an http:// or https:// URL, got "
RULES: tuple[Rule, ...] = (
    Rule(
        "Durations",
        "routes[0].breaker.cooldown",
        "A number and a unit: `ms`, `s`, `m`, `h`, `d`; decimals allowed. A bare number is"
        " refused (is `30` seconds or milliseconds?), except `0`.",
        (
            _ok("50ms", 0.05),
            _ok("10s", 10.0),
            _ok("1.5m", 90.0),
            _ok("2h", 7200.0),
            _ok("1d", 86400.0),
            _ok("0", 0.0),
            _refused("30", "duration 30 has no unit; write e.g. '30s' or '30ms'"),
            _refused(
                "10 sec", "invalid duration '10 sec'; use a number and a unit: ms, s, m, h, d"
            ),
            _refused("-1s", "invalid duration '-1s'; use a number and a unit: ms, s, m, h, d"),
        ),
    ),
    Rule(
        "Rates",
        "routes[0].rate_limit[0].rate",
        "`N/unit` or `N/Munit` (N events per M units), N > 0; units `ms`, `s` or `sec`, `m` or"
        " `min`, `h` or `hour`, `d` or `day`. Shown here in events per second.",
        (
            _ok("5/s", 5.0),
            _ok("100/min", 100 / 60),
            _ok("10/5m", 10 / 300),
            _ok("3/h", 3 / 3600),
            _refused("5", "expected a rate like 5/s or 100/min"),
            _refused("0/s", "rate '0/s' must be positive"),
            _refused("fast", "invalid rate 'fast'; use N/s, N/min, N/h (e.g. 100/min)"),
        ),
    ),
    Rule(
        "Upstream URLs",
        "upstreams.app.url",
        "`http://` or `https://` with a host, no query or fragment; a trailing `/` is dropped.",
        (
            _ok("http://127.0.0.1:3000", "http://127.0.0.1:3000"),
            _ok("https://app.internal/", "https://app.internal"),
            _refused("ftp://files.internal", _URL_ERROR + "'ftp://files.internal'"),
            _refused("app.internal:3000", _URL_ERROR + "'app.internal:3000'"),
            _refused("http://app.internal/?v=1", "an upstream URL takes no query or fragment"),
        ),
    ),
    Rule(
        "Store URLs",
        "store.url",
        "`memory://`, `redis://`, `rediss://`, `unix://`, `redis+cluster://h:p[,h:p]`,"
        " `redis+sentinel://h:p[,h:p]/service[/db]` (docs/redis.md). An empty URL is refused.",
        (
            _ok("memory://", "memory://"),
            _ok("rediss://:pw@redis.internal:6380/0", "rediss://:pw@redis.internal:6380/0"),
            _ok(
                "redis+cluster://10.0.0.1:7000,10.0.0.2:7000",
                "redis+cluster://10.0.0.1:7000,10.0.0.2:7000",
            ),
            _refused('""', "is empty; set memory:// or a redis:// URL"),
            _refused(
                "mysql://db.internal",
                "unsupported store scheme 'mysql'; use memory://, redis://, rediss://, unix://,"
                " redis+cluster:// or redis+sentinel://",
            ),
        ),
    ),
    Rule(
        "Webhook URLs",
        "alerts.webhooks[0].url",
        "`http://` or `https://` with a host. An empty URL drops that webhook (so one config"
        " serves environments with and without it).",
        (
            _ok("https://hooks.example/T/B/X", "https://hooks.example/T/B/X"),
            _ok('""', [], at="alerts.webhooks", shown="webhook dropped"),
            _refused("hooks.example/T/B/X", "webhook url must be an http:// or https:// URL"),
        ),
    ),
    Rule(
        "Environment variables",
        "upstreams.app.url",
        "Substituted in string values after the YAML is parsed, so a value with `:` or `#`"
        " cannot change the document (quote a `${...}` inside a `{...}` flow mapping)."
        " `${VAR}` must be set (an empty value stays empty); `${VAR:-default}` takes the"
        " default when VAR is unset or empty, `${VAR-default}` only when it is unset, as in"
        " sh. An empty webhook URL from `${VAR:-}` drops the webhook (above).",
        (
            _ok('"${APP_URL}"', "http://app:3000", env={"APP_URL": "http://app:3000"}),
            _refused('"${APP_URL}"', "environment variable APP_URL is not set (no default)"),
            _refused('"${APP_URL}"', _URL_ERROR + "''", env={"APP_URL": ""}),
            _ok('"${APP_URL:-http://app:3000}"', "http://app:3000"),
            _ok('"${APP_URL:-http://app:3000}"', "http://app:3000", env={"APP_URL": ""}),
            _ok('"${APP_URL-http://app:3000}"', "http://app:3000"),
            _refused('"${APP_URL-http://app:3000}"', _URL_ERROR + "''", env={"APP_URL": ""}),
            _ok('"http://${APP_HOST}:3000"', "http://app:3000", env={"APP_HOST": "app"}),
        ),
    ),
)


def example_config(rule: Rule, example: Example) -> str:
    """BASE_CONFIG as YAML with the example's text at the rule's key."""
    data = json.loads(json.dumps(BASE_CONFIG))
    node: Any = data
    parts = re.findall(r"[^.\[\]]+|\[\d+\]", rule.key)
    for part in parts[:-1]:
        node = node[int(part[1:-1])] if part.startswith("[") else node[part]
    node[parts[-1]] = "__VALUE__"
    text = yaml.safe_dump(data, sort_keys=False)
    assert text.count("__VALUE__") == 1
    return text.replace("__VALUE__", example.yaml)


def _result(rule: Rule, example: Example) -> str:
    if example.error:
        return f"refused: `{rule.key}: {example.error}`"
    if example.shown:
        return f"ok: {example.shown}"
    if isinstance(example.result, float):
        unit = "/s" if rule.title == "Rates" else " s"
        return f"ok: {example.result:.6g}{unit}"
    return f"ok: `{example.result}`"


def render_rules() -> list[str]:
    lines = [
        "",
        "## Value rules",
        "",
        "Each example below is checked with `gateway check` by"
        " tests/test_config_reference.py, so these rules are the ones the code applies.",
    ]
    for rule in RULES:
        lines += ["", f"### {rule.title}", "", f"{rule.text} Checked at `{rule.key}`.", ""]
        with_env = any(ex.env for ex in rule.examples)
        lines.append("| value | " + ("environment | " if with_env else "") + "`gateway check` |")
        lines.append("|---|---|---|" if with_env else "|---|---|")
        for ex in rule.examples:
            cells = [f"`{ex.yaml}`", _result(rule, ex)]
            if with_env:
                env = ", ".join(f"`{k}={v}`" for k, v in ex.env.items()) or "(unset)"
                cells.insert(1, env)
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return lines


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not OUTPUT.exists() or OUTPUT.read_text() != text:
            print(f"{OUTPUT} is stale: run .venv/bin/python tools/config_reference.py")
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT.relative_to(ROOT)} ({len(rows())} keys)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
