"""Circuit breakers per route group, and error-loop damping.

Owns: the `breaker:` route policy, the per-process registry of breakers (one per `group`,
shared by every route naming it, in `rt.services[BREAKERS]`), the closed → open →
half-open state machine, the fast 503 answer while open (`Retry-After` with jitter so
clients do not come back in lockstep), the per-caller negative cache of repeated 4xx
(what it keys, keeps and answers; the cache itself is gateway/negcache.py's
`NegativeCache`), the breaker part of `/readyz` detail, `/_edge/status` and the degraded
client intervals, and the `edge_breaker_*` / `edge_negative_cache_hits_total` metrics.

State is per replica on purpose: each replica sees its own upstream connections fail, the
decision must cost nothing on the hot path (no store round trip), and N replicas each
letting `half_open_probes` through is still a trickle.

This policy sits innermost, just outside the proxy, so what it observes is exactly the
upstream's answer (the proxy turns timeouts and connect errors into 504/502 JSON). The
cache policy sits outside it and may answer a `circuit_open` 503 with a stale copy.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import logging
import random
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from gateway.config import Route
from gateway.http import (
    Handler,
    Headers,
    Receive,
    RequestContext,
    Send,
    error_body,
    send_json,
)
from gateway.negcache import ENTRY_OVERHEAD, NegativeCache
from gateway.observability.metrics import Metrics
from gateway.policies.breaker.config import BreakerConfig
from gateway.proxy import ClientGone
from gateway.runtime import Runtime
from gateway.services import ServiceKey
from gateway.tap import Tap

log = logging.getLogger("gateway")

State = Literal["closed", "open", "half_open"]
STATE_VALUE: dict[State, int] = {"closed": 0, "half_open": 1, "open": 2}

# Sliding window resolution: the window is kept as this many buckets of counts, so memory
# and work per request stay constant whatever the request rate.
_BUCKETS = 10
# Negative answers larger than this are passed on but not kept (error bodies are small).
_NEGATIVE_BODY_LIMIT = 16 * 1024
# Bound on remembered (caller, request) pairs per route; least recently used go past it.
_NEGATIVE_MAX_ENTRIES = 10_000
# Bytes of one route's negative answers (bodies; the few kept headers ride in the entry
# overhead): as many full-size entries as the entry bound allows, so it never binds first.
_NEGATIVE_MAX_BYTES = _NEGATIVE_MAX_ENTRIES * (_NEGATIVE_BODY_LIMIT + ENTRY_OVERHEAD)
# Which breaker currently owns each group's state gauge. Metrics outlive a config reload
# while breakers start fresh: the retired breaker (still finishing in-flight requests)
# must not overwrite the gauge of its successor.
_GAUGE_OWNER: weakref.WeakKeyDictionary[Metrics, dict[str, Breaker]] = weakref.WeakKeyDictionary()


def is_failure(status: int) -> bool:
    """Upstream trouble: 5xx (incl. the proxy's 502/504 for connect errors and timeouts)
    and 429. Other 4xx mean the upstream is up and answering; they count as success."""
    return status >= 500 or status == 429


def parse_retry_after(value: bytes | None, now_wall: float) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date), None if absent,
    unparsable or not in the future."""
    if not value:
        return None
    text = value.decode("latin-1").strip()
    if text.isdigit():
        seconds = float(int(text))
    else:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None
        seconds = when.timestamp() - now_wall
    return seconds if seconds > 0 else None


@dataclass(slots=True)
class Ticket:
    """What admission decided for one request; handed back with its outcome."""

    generation: int
    probe: bool


class _Window:
    """Requests and failures over the last `window` seconds, in `_BUCKETS` buckets."""

    __slots__ = ("buckets", "width")

    def __init__(self, window: float) -> None:
        self.width = max(window, 0.001) / _BUCKETS
        # [bucket index, total, failures]
        self.buckets: deque[list[int]] = deque()

    def _trim(self, idx: int) -> None:
        while self.buckets and self.buckets[0][0] <= idx - _BUCKETS:
            self.buckets.popleft()

    def add(self, now: float, failed: bool) -> None:
        idx = int(now / self.width)
        self._trim(idx)
        if self.buckets and self.buckets[-1][0] == idx:
            b = self.buckets[-1]
        else:
            b = [idx, 0, 0]
            self.buckets.append(b)
        b[1] += 1
        if failed:
            b[2] += 1

    def counts(self, now: float) -> tuple[int, int]:
        self._trim(int(now / self.width))
        return sum(b[1] for b in self.buckets), sum(b[2] for b in self.buckets)

    def clear(self) -> None:
        self.buckets.clear()


class Breaker:
    """One group's circuit breaker. All methods run on the event loop thread and never
    await, so no lock is needed."""

    def __init__(
        self,
        group: str,
        cfg: BreakerConfig,
        monotonic: Callable[[], float],
        metrics: Metrics,
    ) -> None:
        self.group = group
        self.cfg = cfg
        self.monotonic = monotonic
        self.state: State = "closed"
        # Bumped on every transition: outcomes of requests admitted under an older state
        # (e.g. slow requests still in flight when the breaker opened) are ignored.
        self.generation = 0
        self.consecutive = 0
        self.window = _Window(cfg.window)
        self.cooldown = cfg.cooldown
        self.open_until = 0.0
        self.reason = ""
        self.probes_in_flight = 0
        self.probe_successes = 0
        self.opened_total = 0
        self._timer: asyncio.TimerHandle | None = None
        self._owners = _GAUGE_OWNER.setdefault(metrics, {})
        self._owners[group] = self
        self._gauge = metrics.breaker.state.labels(group)
        self._gauge.set(0)
        self._transitions = metrics.breaker.transitions
        self._shed = metrics.breaker.shed.labels(group)

    # ------------------------------------------------------------------ transitions

    def _go(self, to: State) -> None:
        self.state = to
        self.generation += 1
        self.probes_in_flight = 0
        self.probe_successes = 0
        if self._owners.get(self.group) is self:
            self._gauge.set(STATE_VALUE[to])
        self._transitions.labels(self.group, to).inc()

    def _open(self, seconds: float, reason: str) -> None:
        now = self.monotonic()
        self.open_until = now + seconds
        self.reason = reason
        self.opened_total += 1
        self.consecutive = 0
        self.window.clear()
        self._go("open")
        log.warning(
            "circuit opened",
            extra={"group": self.group, "reason": reason, "open_for_s": round(seconds, 3)},
        )
        self._schedule(seconds)

    def _close(self) -> None:
        self.cooldown = self.cfg.cooldown
        self.consecutive = 0
        self.window.clear()
        self.reason = ""
        self._go("closed")
        log.info("circuit closed", extra={"group": self.group})

    def poll(self) -> State:
        """The state now: an open breaker whose cooldown has run out becomes half-open."""
        if self.state == "open" and self.monotonic() >= self.open_until:
            self._go("half_open")
            log.info("circuit half-open", extra={"group": self.group})
        return self.state

    def _schedule(self, seconds: float) -> None:
        """Wake up when the cooldown ends so the state gauge reads half-open even without
        traffic. Time is re-checked against `monotonic` then (it may be a test clock)."""
        self.cancel_timer()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._timer = loop.call_later(max(seconds, 0.001), self._wake)

    def _wake(self) -> None:
        self._timer = None
        if self.poll() == "open":
            self._schedule(self.open_until - self.monotonic())

    def cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # ------------------------------------------------------------------ requests

    def admit(self) -> Ticket | None:
        """A ticket to go upstream, or None: shed this request."""
        state = self.poll()
        if state == "closed":
            return Ticket(self.generation, probe=False)
        if state == "half_open" and (
            self.probes_in_flight + self.probe_successes < self.cfg.half_open_probes
        ):
            self.probes_in_flight += 1
            return Ticket(self.generation, probe=True)
        self._shed.inc()
        return None

    def retry_after(self) -> float:
        """Seconds until the next probe may go (0 while half-open)."""
        return max(0.0, self.open_until - self.monotonic()) if self.state == "open" else 0.0

    def record(self, ticket: Ticket, status: int, retry_after: float | None) -> None:
        failed = is_failure(status) and (status != 429 or self.cfg.count_429)
        if failed and retry_after is not None and status in (429, 503):
            # The app said explicitly when to come back: honour it whatever our state,
            # but never for longer than max_cooldown.
            seconds = min(retry_after, self.cfg.max_cooldown)
            now = self.monotonic()
            if ticket.probe and ticket.generation == self.generation:
                self.cooldown = min(self.cooldown * 2, self.cfg.max_cooldown)
            if self.poll() != "open":
                self._open(seconds, f"upstream_{status}_retry_after")
            elif now + seconds > self.open_until:
                # Already open: extend it, which is not a new transition.
                self.open_until = now + seconds
                self.reason = f"upstream_{status}_retry_after"
                self._schedule(seconds)
            return
        if ticket.generation != self.generation:
            return
        if ticket.probe:
            self.probes_in_flight -= 1
            if failed:
                self.cooldown = min(self.cooldown * 2, self.cfg.max_cooldown)
                self._open(self.cooldown, "probe_failed")
            else:
                self.probe_successes += 1
                if self.probe_successes >= self.cfg.half_open_probes:
                    self._close()
            return
        if self.state != "closed":
            return
        now = self.monotonic()
        self.window.add(now, failed)
        if not failed:
            self.consecutive = 0
            return
        self.consecutive += 1
        if self.consecutive >= self.cfg.failure_threshold:
            self._open(self.cooldown, "consecutive_failures")
            return
        total, failures = self.window.counts(now)
        if total >= self.cfg.min_requests and failures / total >= self.cfg.failure_ratio:
            self._open(self.cooldown, "failure_ratio")

    def abandon(self, ticket: Ticket) -> None:
        """The request ended without an upstream answer we can judge (client gone): free
        its probe slot without counting it either way."""
        if ticket.probe and ticket.generation == self.generation:
            self.probes_in_flight = max(0, self.probes_in_flight - 1)

    def snapshot(self) -> dict[str, Any]:
        state = self.poll()
        total, failures = self.window.counts(self.monotonic())
        return {
            "state": state,
            "reason": self.reason or None,
            "retry_in_s": round(self.retry_after(), 3),
            "cooldown_s": self.cooldown,
            "consecutive_failures": self.consecutive,
            "window_requests": total,
            "window_failures": failures,
            "probes_in_flight": self.probes_in_flight,
            "opened_total": self.opened_total,
        }


class BreakerRegistry:
    """The per-process breakers, by group. Also the hook into status, readiness detail
    and the degraded client intervals."""

    name = "breakers"  # its section of /_edge/status and /readyz

    def __init__(self, rt: Runtime, rng: random.Random | None = None) -> None:
        self.rt = rt
        self.breakers: dict[str, Breaker] = {}
        # Replaceable (tests seed it) — jitter needs no cryptographic randomness.
        self.rng = rng or random.Random()

    @classmethod
    def of(cls, rt: Runtime) -> BreakerRegistry:
        reg = rt.services.get(BREAKERS)
        if reg is not None:
            return reg
        reg = rt.services[BREAKERS] = cls(rt)
        rt.services.add_status(reg)
        rt.degraded_checks.append(reg.unhealthy)

        async def stop() -> None:
            for b in reg.breakers.values():
                b.cancel_timer()

        rt.on_stop(stop)
        return reg

    def get(self, cfg: BreakerConfig) -> Breaker:
        b = self.breakers.get(cfg.group)
        if b is None:
            b = Breaker(cfg.group, cfg, self.rt.monotonic, self.rt.metrics)
            self.breakers[cfg.group] = b
        elif _thresholds(b.cfg) != _thresholds(cfg):
            log.warning(
                "routes share a breaker group with different thresholds; the first wins",
                extra={"group": cfg.group},
            )
        return b

    def status(self) -> dict[str, dict[str, Any]]:
        return {g: b.snapshot() for g, b in self.breakers.items()}

    def unhealthy(self) -> bool:
        return any(b.poll() != "closed" for b in self.breakers.values())

    def jittered(self, seconds: float, jitter: float) -> int:
        """Retry-After value: `seconds` ± `jitter` (a fraction), whole seconds, at least 1."""
        factor = self.rng.uniform(1 - jitter, 1 + jitter) if jitter else 1.0
        return max(1, round(seconds * factor))


BREAKERS: ServiceKey[BreakerRegistry] = ServiceKey("breakers")


def _thresholds(cfg: BreakerConfig) -> tuple[Any, ...]:
    return (
        cfg.failure_threshold,
        cfg.failure_ratio,
        cfg.window,
        cfg.min_requests,
        cfg.cooldown,
        cfg.max_cooldown,
        cfg.half_open_probes,
        cfg.jitter,
    )


@dataclass(slots=True)
class _Negative:
    status: int
    headers: Headers
    body: bytes


def _negative_size(entry: _Negative) -> int:
    return len(entry.body)


_NEGATIVE_KEEP_HEADERS = frozenset({b"content-type", b"cache-control", b"content-language"})


class BreakerPolicy:
    """Route policy: negative cache → breaker admission → next (the proxy)."""

    def __init__(self, next_handler: Handler, route_cfg: Route, rt: Runtime) -> None:
        assert route_cfg.breaker is not None
        self.next = next_handler
        self.cfg = route_cfg.breaker
        self.route = route_cfg.name
        self.rt = rt
        self.registry = BreakerRegistry.of(rt)
        self.breaker = self.registry.get(self.cfg)
        self.negative_statuses = frozenset(self.cfg.negative_statuses)
        # In-process and per replica: a client stuck in a 4xx loop keeps hitting the same
        # replica (keep-alive) or spreads over a few; each replica letting one through per
        # negative_ttl is already a cut of orders of magnitude, without a store round trip
        # on the hot path or storing error bodies in Redis.
        self.negative: NegativeCache[bytes, _Negative] | None = (
            NegativeCache(
                clock=rt.monotonic,
                ttl=self.cfg.negative_ttl,
                max_entries=_NEGATIVE_MAX_ENTRIES,
                max_bytes=_NEGATIVE_MAX_BYTES,
                body_limit=_NEGATIVE_BODY_LIMIT,
                sizeof=_negative_size,
            )
            if self.cfg.negative_ttl > 0 and self.negative_statuses
            else None
        )
        self._neg_hits = rt.metrics.breaker.negative_hits.labels(self.route)
        self._open_header = (b"x-edge-breaker", b"open")

    # ------------------------------------------------------------------ negative cache

    def _negative_key(self, ctx: RequestContext) -> bytes | None:
        scope = ctx.scope
        method = scope["method"]
        # Only requests without a body: a POST that got 400 may succeed with another body.
        if method not in ("GET", "HEAD"):
            return None
        if ctx.identity is not None:
            caller = b"u\0" + ctx.identity.sub.encode()
        else:
            # Anonymous: the IP, plus whatever credentials the upstream itself may read,
            # so two callers behind one NAT with different sessions do not share answers.
            caller = b"ip\0" + ctx.client_ip.encode()
            for name in (b"authorization", b"cookie"):
                v = ctx.header(name)
                if v:
                    caller += b"\0" + name + b"=" + v
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        h = hashlib.blake2b(digest_size=16)
        for part in (caller, method.encode(), raw_path, scope.get("query_string", b"")):
            h.update(part)
            h.update(b"\0\1")
        return h.digest()

    async def _answer_negative(self, ctx: RequestContext, hit: _Negative, send: Send) -> None:
        self._neg_hits.inc()
        ctx.notes.append("negcache=hit")
        headers = [
            *hit.headers,
            (b"content-length", str(len(hit.body)).encode()),
            (b"x-edge-negative-cache", b"hit"),
            *ctx.response_headers,
        ]
        head = ctx.scope["method"] == "HEAD"
        await send({"type": "http.response.start", "status": hit.status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if head else hit.body})

    # ------------------------------------------------------------------ request path

    async def __call__(self, ctx: RequestContext, receive: Receive, send: Send) -> None:
        neg_key = self._negative_key(ctx) if self.negative is not None else None
        if neg_key is not None and self.negative is not None:
            hit = self.negative.get(neg_key)
            if hit is not None:
                await self._answer_negative(ctx, hit, send)
                return

        breaker = self.breaker
        ticket = breaker.admit()
        if ticket is None:
            await self._shed(ctx, send)
            return

        keep: _Negative | None = None

        def judge(tap: Tap) -> bool:
            # Judged at the headers: a long stream must not hold a probe slot.
            nonlocal keep
            keep = self._judge(ticket, tap.resp.status, tap.resp.headers, neg_key)
            return keep is not None

        async def store(tap: Tap) -> None:
            if keep is not None and neg_key is not None and self.negative is not None:
                keep.body = bytes(tap.resp.body)
                self.negative.put(neg_key, keep, keep.body)

        tap = Tap(send, _NEGATIVE_BODY_LIMIT, on_start=judge, on_complete=store)
        try:
            await self.next(ctx, receive, tap)
        except (ClientGone, asyncio.CancelledError):
            if not tap.resp.status:
                breaker.abandon(ticket)
            raise
        except Exception:
            # Failed before any answer (or mid-stream): an upstream-side failure.
            if not tap.resp.status:
                breaker.record(ticket, 502, None)
            raise
        else:
            if not tap.resp.status:
                breaker.abandon(ticket)

    def _judge(
        self, ticket: Ticket, status: int, headers: Headers, neg_key: bytes | None
    ) -> _Negative | None:
        """Record the answer's status on the breaker; the negative entry to fill from the
        body if the answer is one the route replays."""
        ra = None
        if status in (429, 503):
            for k, v in headers:
                if bytes(k).lower() == b"retry-after":
                    ra = parse_retry_after(bytes(v), self.rt.clock())
                    break
        self.breaker.record(ticket, status, ra)
        if neg_key is None or status not in self.negative_statuses:
            return None
        kept = [(bytes(k).lower(), bytes(v)) for k, v in headers]
        if any(k == b"cache-control" and b"no-store" in v.lower() for k, v in kept):
            return None
        return _Negative(status, [(k, v) for k, v in kept if k in _NEGATIVE_KEEP_HEADERS], b"")

    async def _shed(self, ctx: RequestContext, send: Send) -> None:
        breaker = self.breaker
        retry = self.registry.jittered(breaker.retry_after(), self.cfg.jitter)
        ctx.notes.append("breaker=open")
        body = error_body(
            "circuit_open",
            f"upstream group {breaker.group!r} is failing; retry later",
            group=breaker.group,
            retry_after=retry,
        )
        await send_json(
            send,
            503,
            body,
            [
                (b"retry-after", str(retry).encode()),
                self._open_header,
                (b"cache-control", b"no-store"),
                *ctx.response_headers,
            ],
        )
