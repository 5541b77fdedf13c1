"""Rate limiting: GCRA in the store, one round trip.

Owns:
- `RateLimitPolicy`: the route's `rate_limit: [rules]`. Every rule that applies to a
  request is checked *and* updated by one `gcra` Script (one EVALSHA on Redis, time from
  Redis `TIME`; the Python twin on memory://). All-or-nothing: a request refused by one
  rule consumes nothing from the others. Answers 429 JSON with `Retry-After` and the IETF
  httpapi draft-11 fields `RateLimit-Policy` / `RateLimit`; admitted requests carry them
  too (via `ctx.response_headers`). A per-process "blocked until T" cache lets a client
  that keeps hammering past its limit cost no store round trip until T. When the store
  fails, each rule's `on_failure` decides: open (skip the rule), closed (503), or local
  (the default: the same GCRA on an in-process keyspace, with this process's share of
  the rate, 1/`store.local_processes`).
- `gcra_coalescer`: on a store that batches (Redis), the checks of concurrent requests
  travel in one pipelined write (still one EVALSHA per request), which saves most of
  redis-py's per-command CPU.

Keys: `rl:{rl:<route>}:<rule digest>:<blake2b(value)>`. The Redis Cluster hash tag is the
route name, because every KEY of one script must live in one slot and the rules of one
request share nothing else (user, IP and webinar differ per rule). The cost: all limiter
keys of one route live on one shard. Raw request values (user ids, IPs, webinar ids,
header values) never appear in keys: they are hashed to a fixed 24 hex characters.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cachetools import TLRUCache

from gateway.http import Handler, Headers, Receive, RequestContext, Send, error_body, send_json
from gateway.observability.collectors import fast
from gateway.services import ServiceKey, StatusFn
from gateway.store import Script, Store, StoreError
from gateway.store.base import KeySpace
from gateway.store.coalesce import Coalescer
from gateway.store.memory import MemoryData

if TYPE_CHECKING:
    from gateway.config import Route
    from gateway.policies.ratelimit.config import RateLimitRule
    from gateway.runtime import Runtime
    from gateway.store.base import ScriptArg

log = logging.getLogger("gateway.ratelimit")

# Bounds of the per-process structures shared by all routes (rt.services).
BLOCKED_MAX_KEYS = 100_000
LOCAL_MAX_KEYS = 100_000

RESULTS = (
    "allowed",
    "limited",
    "limited_cached",
    "local_allowed",
    "local_limited",
    "store_open",
    "store_closed",
)


# --------------------------------------------------------------------------- GCRA twin


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def gcra_py(data: KeySpace, keys: list[str], args: list[ScriptArg], now_ms: int) -> list[int]:
    """Python twin of lua/gcra.lua (same arguments, same reply); see the Lua for the
    contract. Times in microseconds, TATs stored as integer strings."""
    now = now_ms * 1000
    n = len(keys)
    tats: list[int] = []
    news: list[int] = []
    admitted = 1
    for i in range(n):
        interval = int(args[2 * i])
        limit = int(args[2 * i + 1]) * interval
        raw = data.get(keys[i])
        tat = max(int(raw) if raw is not None else 0, now)
        new = tat + interval
        tats.append(tat)
        news.append(new)
        if new - now > limit:
            admitted = 0
    out = [admitted]
    for i in range(n):
        interval = int(args[2 * i])
        limit = int(args[2 * i + 1]) * interval
        tat, new = tats[i], news[i]
        if new - now > limit:
            r, reset, retry = 0, tat - now, new - limit - now
        elif admitted:
            r, reset, retry = (now + limit - new) // interval, new - now, 0
            data.set(keys[i], str(new).encode(), _ceil_div(reset, 1000) / 1000)
        else:
            r, reset, retry = (now + limit - tat) // interval, tat - now, 0
        out += [r, _ceil_div(reset, 1000), _ceil_div(retry, 1000)]
    return out


_LUA = Path(__file__).parent / "lua"
GCRA = Script.from_file("gcra", gcra_py, directory=_LUA)


GcraCall = tuple[list[str], list["ScriptArg"]]


def gcra_coalescer(store: Store) -> Coalescer[None, GcraCall, Any]:
    """Sends the GCRA checks of concurrent requests to the store together: one pipelined
    write of N EVALSHAs and one read of N replies, instead of N separate commands,
    through `Store.run_many` (on Redis Cluster: one pipeline per master touched,
    concurrently). For a store that `batches`.

    Each request still costs exactly one EVALSHA (<= 1 round trip, atomic per request);
    what is shared is redis-py's per-command overhead (about 60 us of CPU per awaited
    command on the 2-core dev machine, against ~15 us per command in a batch of 10),
    which is most of what a rate-limited request costs over an unlimited one. Checks
    made while 2 pipelines are already out wait for the next one, so the batches grow
    with load and nothing waits at low load. The wait of each request is bounded by
    `store.timeout`, stretched by event-loop lag (`Store.queue_budget`); failures follow
    the store's FailureGuard (one timeout or connection error per batch, then the
    back-off with probes). A check whose request already gave up is not sent."""

    async def send(_key: None, calls: list[GcraCall]) -> list[Any]:
        return await store.run_many(GCRA, calls)

    return Coalescer(
        send,
        max_batch=128,
        max_inflight=2,
        budget=store.queue_budget,
        what="rate-limit check",
        log=log,
    )


@dataclass(frozen=True, slots=True)
class Decision:
    """One rule's answer: `remaining` requests still admitted now, `reset_ms` until its
    full burst is back, `retry_ms` until it admits one request (0 = admits this one)."""

    remaining: int
    reset_ms: int
    retry_ms: int


def parse_reply(reply: Sequence[Any]) -> tuple[bool, list[Decision]]:
    admitted = int(reply[0]) == 1
    out = [
        Decision(int(reply[i]), int(reply[i + 1]), int(reply[i + 2]))
        for i in range(1, len(reply), 3)
    ]
    return admitted, out


# --------------------------------------------------------------------------- rules


def hash_value(value: str) -> str:
    """Bound and hide a request-supplied value before it becomes part of a store key."""
    return hashlib.blake2b(value.encode("utf-8", "surrogateescape"), digest_size=12).hexdigest()


def sf_string(value: str) -> str:
    """An RFC 8941 sf-string (the names here are ASCII from a validated config)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _ceil_s(ms: int) -> int:
    return max(0, _ceil_div(ms, 1000))


@dataclass(frozen=True, slots=True)
class CompiledRule:
    name: str  # policy name in the RateLimit fields
    by: str
    header: bytes | None  # for by: header:NAME, the lower-cased header name
    interval_us: int
    burst: int
    on_failure: str
    key_prefix: str
    policy_item: str  # `"name";q=Q;w=W`

    def value(self, ctx: RequestContext) -> str | None:
        """The partition value for this request; None = the rule does not apply."""
        by = self.by
        if by == "user":
            if ctx.identity is not None:
                return "u:" + ctx.identity.sub
            return "ip:" + ctx.client_ip
        if by == "ip":
            return "ip:" + ctx.client_ip
        if by == "webinar":
            w = ctx.params.get("webinar_id")
            return None if w is None else "w:" + w
        if by == "route":
            return ""
        assert self.header is not None
        raw = ctx.header(self.header)
        return None if raw is None else "h:" + raw.decode("latin-1")

    def key(self, value: str) -> str:
        return self.key_prefix + (hash_value(value) if value else "-")


def policy_window(rate: float, burst: int) -> tuple[int, int]:
    """The draft's (q, w) for a GCRA rule: `burst` requests per the whole seconds it takes
    to earn them back. A client that sends q at once, or paces at q/w, is never refused;
    rounding w up makes the advertised rate a little lower than the real one, never
    higher (the draft allows advertising a more restrictive policy, not a looser one)."""
    return burst, max(1, math.ceil(burst / rate - 1e-9))


def compile_rules(
    route_name: str, rules: Sequence[RateLimitRule], default_failure: str
) -> list[CompiledRule]:
    out: list[CompiledRule] = []
    seen: dict[str, int] = {}
    tag = Store.tag("rl:" + route_name)
    for i, rule in enumerate(rules):
        by = rule.by.lower()
        n = seen.get(by, 0) + 1
        seen[by] = n
        name = by if n == 1 else f"{by}#{n}"
        # The digest names the rule's state: a change of rate or burst starts it afresh
        # instead of reading a TAT computed with another interval.
        digest = hashlib.blake2b(
            f"{i}|{by}|{rule.rate!r}|{rule.burst}".encode(), digest_size=4
        ).hexdigest()
        q, w = policy_window(rule.rate, rule.burst)
        out.append(
            CompiledRule(
                name=name,
                by=by.split(":", 1)[0],
                header=by.split(":", 1)[1].encode() if by.startswith("header:") else None,
                interval_us=max(1, round(1_000_000 / rule.rate)),
                burst=rule.burst,
                on_failure=rule.on_failure or default_failure,
                key_prefix=f"rl:{tag}:{digest}:",
                policy_item=f"{sf_string(name)};q={q};w={w}",
            )
        )
    return out


# --------------------------------------------------------------------------- the policy


def _blocked_ttu(_key: str, until: float, _now: float) -> float:
    return until


# The per-process structures shared by every route (bounded by the constants above).
BLOCKED: ServiceKey[TLRUCache[str, float]] = ServiceKey("ratelimit.blocked")
LOCAL: ServiceKey[MemoryData] = ServiceKey("ratelimit.local")
BATCHER: ServiceKey[Coalescer[None, GcraCall, Any] | None] = ServiceKey("ratelimit.batcher")


class RateLimitPolicy:
    def __init__(self, next_handler: Handler, route_cfg: Route, rt: Runtime) -> None:
        self.next = next_handler
        self.route = route_cfg.name
        self.rules = compile_rules(route_cfg.name, route_cfg.rate_limit or [], _default(rt))
        self.store = rt.store
        self.clock = rt.clock
        self.fallbacks = rt.metrics.store_fallbacks
        self.full_policy = ", ".join(r.policy_item for r in self.rules).encode()
        decisions = rt.metrics.ratelimit.decisions
        # Lock-free children: one is incremented per request.
        self.count = {res: fast(decisions.labels(self.route, res)) for res in RESULTS}
        self.closed_retry = str(max(1, math.ceil(rt.config.store.backoff))).encode()
        store_cfg = rt.config.store
        self.share = store_cfg.local_processes or rt.config.server.workers
        # Per-process structures shared by every route: one bound for the whole process.
        services = rt.services
        if BLOCKED not in services:
            blocked: TLRUCache[str, float] = TLRUCache(
                maxsize=BLOCKED_MAX_KEYS, ttu=_blocked_ttu, timer=rt.clock
            )
            local = MemoryData(min(LOCAL_MAX_KEYS, store_cfg.memory_max_keys), rt.clock)
            batcher = gcra_coalescer(rt.store) if rt.store.batches else None
            services[BLOCKED] = blocked
            services[LOCAL] = local
            services[BATCHER] = batcher
            rt.sizes["ratelimit_blocked"] = blocked.__len__
            rt.sizes["ratelimit_local"] = lambda: local.size

            def status() -> dict[str, Any]:
                out: dict[str, Any] = {"blocked_keys": len(blocked), "local_keys": len(local)}
                if batcher is not None:
                    # Pipelines sent and checks they carried (mean batch = checks/batches).
                    out["redis_batches"] = batcher.batches
                    out["redis_checks"] = batcher.batched
                return out

            services.add_status(StatusFn("ratelimit", status))
        self.blocked = services[BLOCKED]
        self.local = services[LOCAL]
        self.batcher = services[BATCHER]

    async def __call__(self, ctx: RequestContext, receive: Receive, send: Send) -> None:
        now = self.clock()
        rules: list[CompiledRule] = []
        keys: list[str] = []
        for rule in self.rules:
            value = rule.value(ctx)
            if value is None:
                continue
            key = rule.key(value)
            until = self.blocked.get(key)
            if until is not None and until > now:
                # Still refused for sure (TATs only move forward): no store round trip.
                self.count["limited_cached"].inc()
                ctx.notes.append("rl=cached")
                wait_ms = math.ceil((until - now) * 1000)
                await self._reject(ctx, send, [rule], [Decision(0, wait_ms, wait_ms)])
                return
            rules.append(rule)
            keys.append(key)
        if not rules:
            await self.next(ctx, receive, send)
            return
        args: list[ScriptArg] = []
        for rule in rules:
            args += [rule.interval_us, rule.burst]
        local = False
        try:
            if self.batcher is not None:
                # Backing off: fail now, queue nothing.
                self.store.fail_fast(GCRA.name)
                reply = await self.batcher.call(None, (keys, args))
            else:
                reply = await self.store.run(GCRA, keys, args)
            admitted, decisions = parse_reply(reply)
        except StoreError:
            fallback = self._fallback(rules, keys)
            if fallback is None:
                await self._store_closed(ctx, send)
                return
            rules, keys, args = fallback
            if not rules:
                await self.next(ctx, receive, send)
                return
            local = True
            now_ms = int(self.clock() * 1000)
            admitted, decisions = parse_reply(gcra_py(self.local, keys, args, now_ms))
        if admitted:
            self.count["local_allowed" if local else "allowed"].inc()
            ctx.response_headers += self._headers(rules, decisions)
            await self.next(ctx, receive, send)
            return
        self.count["local_limited" if local else "limited"].inc()
        ctx.notes.append("rl=limited")
        for key, d in zip(keys, decisions, strict=True):
            if d.retry_ms > 0:
                self.blocked[key] = now + d.retry_ms / 1000
        await self._reject(ctx, send, rules, decisions)

    async def _store_closed(self, ctx: RequestContext, send: Send) -> None:
        """`on_failure: closed` while the store is down: 503, retry after the back-off."""
        await send_json(
            send,
            503,
            error_body("store_unavailable", "rate limiter unavailable, retry shortly"),
            [(b"retry-after", self.closed_retry), *ctx.response_headers],
        )

    def _fallback(
        self, rules: list[CompiledRule], keys: list[str]
    ) -> tuple[list[CompiledRule], list[str], list[ScriptArg]] | None:
        """Apply each rule's on_failure. None = answer 503 (a `closed` rule); otherwise
        the rules to check in process (possibly none: all `open`)."""
        modes = {r.on_failure for r in rules}
        for mode in modes:
            self.fallbacks.labels("rate_limit", mode).inc()
        if "closed" in modes:
            self.count["store_closed"].inc()
            return None
        kept = [(r, k) for r, k in zip(rules, keys, strict=True) if r.on_failure == "local"]
        if not kept:
            self.count["store_open"].inc()
        # This process's share of each rule: the N processes that share the store each
        # admit 1/N, so the fleet as a whole stays near the configured rate.
        n = self.share
        args: list[ScriptArg] = []
        for r, _ in kept:
            args += [r.interval_us * n, max(1, math.ceil(r.burst / n))]
        return [r for r, _ in kept], [k for _, k in kept], args

    def _policy(self, rules: list[CompiledRule]) -> bytes:
        if len(rules) == len(self.rules):
            return self.full_policy
        return ", ".join(r.policy_item for r in rules).encode()

    def _headers(self, rules: list[CompiledRule], decisions: list[Decision]) -> Headers:
        items = []
        for rule, d in zip(rules, decisions, strict=True):
            t = _ceil_s(d.retry_ms) if d.retry_ms > 0 else _ceil_s(d.reset_ms)
            items.append(f"{sf_string(rule.name)};r={d.remaining};t={t}")
        return [
            (b"ratelimit-policy", self._policy(rules)),
            (b"ratelimit", ", ".join(items).encode()),
        ]

    async def _reject(
        self,
        ctx: RequestContext,
        send: Send,
        rules: list[CompiledRule],
        decisions: list[Decision],
    ) -> None:
        retry = max(1, max(_ceil_s(d.retry_ms) for d in decisions))
        body = error_body(
            "rate_limited",
            f"too many requests; retry in {retry}s",
            retry_after=retry,
        )
        headers = [
            (b"retry-after", str(retry).encode()),
            *self._headers(rules, decisions),
            *ctx.response_headers,
        ]
        ctx.status = 429
        await send_json(send, 429, body, headers)


def _default(rt: Runtime) -> str:
    return rt.config.store.on_failure
