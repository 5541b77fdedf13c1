"""Fleet-wide alerting to Slack, Discord and generic webhooks.

Owns: the `alerts:` section's behaviour — the `AlertRecorder` (in `rt.services[ALERTS]`,
the observer on every `Upstream`), the per-minute counts in the store, the evaluation
that one replica per `evaluate_every` runs, the per-rule firing/cooldown state, the
payloads in each service's own format, their delivery (retried with back-off, counted)
and the `edge_alerts_*` metrics.

Hot path: `Proxy.fetch` calls `answered()` with every real upstream answer (a 401/429/503
the gateway produced itself never reaches it) and `WebSocketProxy` calls `ws_closed()`;
both only add to an in-process dict. Every `flush_every` each replica sends its deltas in
one round trip (`alerts_tick.lua`): a Redis call per request would cost more than the
request. The same call claims the slot's evaluation lock, so across N replicas exactly
one evaluates each `evaluate_every` and the fleet sends one message, not N.

Store layout (all keys share the `{alerts}` hash tag, one Cluster slot):
  alerts:{alerts}:m:<minute>    hash  `c|<code>|<route>` counts (code 400, 409, 5xx, rt),
                                      `a|<i>` auth latency histogram bucket i,
                                      `as|<route>` auth calls slower than auth_p95
  alerts:{alerts}:breakers      hash  breaker group -> last time a replica saw it open (ms)
  alerts:{alerts}:lock:<slot>   string  evaluation lock of one slot (floor(now/every))
  alerts:{alerts}:state         string  JSON: per rule {firing, last_sent, since}

Times come from `rt.clock` of the caller (one injected clock drives both backends in
tests); replicas are NTP-synced, and a skew of a second only moves a bucket boundary.
A per-minute rate is the current minute plus the previous one weighted by how much of
it is still inside the last 60 s (a sliding window over two fixed buckets).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import datetime
import email.utils
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from gateway.config import AlertsConfig, Webhook
from gateway.http import RequestContext
from gateway.runtime import Runtime
from gateway.services import ServiceKey
from gateway.store import Store
from gateway.store.base import KeySpace, Script, ScriptArg, StoreError

log = logging.getLogger("gateway")

WINDOW_S = 60
AUTH_PREFIX = "/auth/v1/"
REALTIME_PATH = "/realtime/v1/websocket"
# p95 over fewer calls than this says nothing (one slow call would be "the p95").
AUTH_MIN_CALLS = 5
# Auth latency histogram bounds (s); the configured auth_p95 is added as a bound so
# "p95 above the threshold" is exact: more than 5 % of calls took longer than it.
AUTH_BOUNDS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TOP_ROUTES = 3
# Bounded per-webhook queue: an unreachable webhook must not grow memory without end.
QUEUE_MAX = 100
MAX_BACKOFF_S = 60.0
STATE_TTL_S = 7 * 86400.0

COUNT_RULES = {
    "upstream_400_per_min": "400",
    "upstream_409_per_min": "409",
    "upstream_5xx_per_min": "5xx",
    "realtime_disconnects_per_min": "rt",
}
RULES = (*COUNT_RULES, "auth_p95", "breaker_open")
DESCRIPTIONS = {
    "upstream_400_per_min": "upstream 400 answers per minute",
    "upstream_409_per_min": "upstream 409 answers per minute",
    "upstream_5xx_per_min": "upstream 5xx answers per minute",
    "realtime_disconnects_per_min": "Realtime WebSocket closes not initiated by the client "
    "per minute",
    "auth_p95": "p95 latency of Supabase auth calls",
    "breaker_open": "circuit breaker groups not closed",
}

_TAG = Store.tag("alerts")


def _b(v: Any) -> bytes:
    return v if isinstance(v, bytes) else str(v).encode()


def _tick_py(data: KeySpace, keys: list[str], args: list[ScriptArg], now_ms: int) -> Any:
    """Memory twin of alerts_tick.lua."""
    a = [_b(x) for x in args]
    i = 6

    def apply(key: str) -> None:
        nonlocal i
        n = int(a[i])
        i += 1
        if n:
            h = data.hash(key, create=True)
            assert h is not None
            for _ in range(n):
                h[a[i]] = str(int(h.get(a[i], b"0")) + int(a[i + 1])).encode()
                i += 2
            data.expire(key, int(a[1]) / 1000)

    apply(keys[3])
    apply(keys[4])
    groups = int(a[i])
    i += 1
    if groups:
        h = data.hash(keys[2], create=True)
        assert h is not None
        for _ in range(groups):
            h[a[i]] = a[0]
            i += 1
        data.expire(keys[2], int(a[2]) / 1000)
    state = data.get(keys[1])
    state_b = b"" if state is None else _b(state)
    if a[3] == b"1" and not data.exists(keys[0]):
        data.set(keys[0], a[4], int(a[5]) / 1000)

        def flat(key: str) -> list[bytes]:
            h = data.hash(key) or {}
            return [x for kv in h.items() for x in kv]

        return [1, state_b, flat(keys[2]), flat(keys[3]), flat(keys[4])]
    return [0, state_b]


_LUA = Path(__file__).parent / "lua"
TICK = Script.from_file("alerts_tick", _tick_py, directory=_LUA)


def _pairs(flat: Sequence[Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for k, v in zip(flat[::2], flat[1::2], strict=True):
        key = k.decode() if isinstance(k, bytes) else str(k)
        out[key] = int(v)
    return out


# --------------------------------------------------------------------------- evaluation


@dataclass
class Observation:
    """One rule's value over the window, as the evaluator saw it."""

    rule: str
    value: float
    threshold: float
    breached: bool
    top: list[tuple[str, float]] = field(default_factory=list)
    calls: float = 0.0  # auth_p95: the calls the p95 is over

    def show(self, v: float) -> str:
        if self.rule == "auth_p95":
            if v == float("inf"):
                return f"> {AUTH_BOUNDS[-1]:g} s"
            return f"{v:.2f} s" if v < 10 else f"{v:.1f} s"
        if self.rule == "breaker_open":
            return f"{int(v)} open" if v else "none open"
        return f"{v:.0f}/min" if v >= 10 or v == int(v) else f"{v:.1f}/min"

    @property
    def window(self) -> str:
        return "now" if self.rule == "breaker_open" else f"last {WINDOW_S} s"


@dataclass
class Message:
    """A firing, reminder or resolved notice for one rule."""

    status: str  # firing | resolved
    obs: Observation
    at: float
    since: float
    reminder: bool = False

    @property
    def summary(self) -> str:
        o = self.obs
        if self.status == "resolved":
            return (
                f"RESOLVED {o.rule}: {o.show(o.value)} (threshold {o.show(o.threshold)}, "
                f"{o.window})"
            )
        head = "STILL FIRING" if self.reminder else "FIRING"
        return f"{head} {o.rule}: {o.show(o.value)} > {o.show(o.threshold)} ({o.window})"

    def top_lines(self) -> list[str]:
        if self.obs.rule == "breaker_open":
            return [name for name, _ in self.obs.top] or ["(none)"]
        return [f"{name}: {n:.0f}" for name, n in self.obs.top] or ["(none in the window)"]

    def iso(self, t: float) -> str:
        return datetime.datetime.fromtimestamp(t, datetime.UTC).isoformat(timespec="seconds")


def slack_payload(m: Message) -> dict[str, Any]:
    o = m.obs
    title = f"{'Resolved' if m.status == 'resolved' else 'Firing'}: {o.rule}"
    top = "\n".join(m.top_lines())
    return {
        "text": m.summary,
        "blocks": [
            {"type": "header", "text": {"type": "plain_text", "text": title[:150]}},
            {
                "type": "section",
                "text": {"type": "mrkdwn", "text": DESCRIPTIONS[o.rule]},
                "fields": [
                    {"type": "mrkdwn", "text": f"*Observed*\n{o.show(o.value)}"},
                    {"type": "mrkdwn", "text": f"*Threshold*\n{o.show(o.threshold)}"},
                    {"type": "mrkdwn", "text": f"*Window*\n{o.window}"},
                    {
                        "type": "mrkdwn",
                        "text": f"*Top {'groups' if o.rule == 'breaker_open' else 'routes'}*"
                        f"\n{top}",
                    },
                ],
            },
            {
                "type": "context",
                "elements": [
                    {
                        "type": "mrkdwn",
                        "text": f"EventLive Edge, fleet-wide · since {m.iso(m.since)}"
                        f" · {m.iso(m.at)}",
                    }
                ],
            },
        ],
    }


def discord_payload(m: Message) -> dict[str, Any]:
    o = m.obs
    resolved = m.status == "resolved"
    return {
        "content": m.summary,
        "allowed_mentions": {"parse": []},
        "embeds": [
            {
                "title": f"{'Resolved' if resolved else 'Firing'}: {o.rule}"[:256],
                "description": DESCRIPTIONS[o.rule],
                "color": 0x2EB67D if resolved else 0xE01E5A,
                "fields": [
                    {"name": "Observed", "value": o.show(o.value), "inline": True},
                    {"name": "Threshold", "value": o.show(o.threshold), "inline": True},
                    {"name": "Window", "value": o.window, "inline": True},
                    {
                        "name": "Top groups" if o.rule == "breaker_open" else "Top routes",
                        "value": "\n".join(m.top_lines())[:1024],
                        "inline": False,
                    },
                ],
                "footer": {"text": "EventLive Edge, fleet-wide"},
                "timestamp": m.iso(m.at),
            }
        ],
    }


def generic_payload(m: Message) -> dict[str, Any]:
    o = m.obs
    value: float | None = None if o.value == float("inf") else round(o.value, 4)
    return {
        "source": "eventlive-edge",
        "status": m.status,
        "reminder": m.reminder,
        "rule": o.rule,
        "description": DESCRIPTIONS[o.rule],
        "value": value,
        "threshold": o.threshold,
        "unit": "seconds"
        if o.rule == "auth_p95"
        else "groups"
        if o.rule == "breaker_open"
        else "per_minute",
        "window_s": 0 if o.rule == "breaker_open" else WINDOW_S,
        "top": [{"name": n, "count": round(c, 2)} for n, c in o.top],
        "summary": m.summary,
        "since": m.iso(m.since),
        "at": m.iso(m.at),
    }


FORMATS = {"slack": slack_payload, "discord": discord_payload, "generic": generic_payload}


def _top(values: dict[str, float]) -> list[tuple[str, float]]:
    ranked = sorted(((n, v) for n, v in values.items() if v > 0), key=lambda x: (-x[1], x[0]))
    return ranked[:TOP_ROUTES]


def observe_rules(
    cfg: AlertsConfig,
    bounds: Sequence[float],
    now: float,
    current: dict[str, int],
    previous: dict[str, int],
    open_groups: Sequence[str],
) -> list[Observation]:
    """Every enabled rule's value over the last minute, fleet-wide. Pure: tests call it."""
    rules = cfg.rules
    minute_start = (now // WINDOW_S) * WINDOW_S
    weight = max(0.0, (WINDOW_S - (now - minute_start)) / WINDOW_S)
    merged: dict[str, float] = {k: float(v) for k, v in current.items()}
    for k, v in previous.items():
        merged[k] = merged.get(k, 0.0) + v * weight
    out: list[Observation] = []
    for rule, code in COUNT_RULES.items():
        threshold = getattr(rules, rule)
        if threshold is None:
            continue
        prefix = f"c|{code}|"
        per_route = {k[len(prefix) :]: v for k, v in merged.items() if k.startswith(prefix)}
        total = sum(per_route.values())
        out.append(Observation(rule, total, threshold, total > threshold, _top(per_route)))
    if rules.auth_p95 is not None:
        counts = [merged.get(f"a|{i}", 0.0) for i in range(len(bounds) + 1)]
        calls = sum(counts)
        slow_from = bisect.bisect_right(bounds, rules.auth_p95)
        slow = sum(counts[slow_from:])
        p95 = _quantile(0.95, bounds, counts)
        slow_routes = {k[3:]: v for k, v in merged.items() if k.startswith("as|")}
        breached = calls >= AUTH_MIN_CALLS and slow > 0.05 * calls
        out.append(Observation("auth_p95", p95, rules.auth_p95, breached, _top(slow_routes), calls))
    if rules.breaker_open:
        groups = sorted(set(open_groups))
        out.append(
            Observation(
                "breaker_open", float(len(groups)), 0.0, bool(groups), [(g, 1.0) for g in groups]
            )
        )
    return out


def _quantile(q: float, bounds: Sequence[float], counts: Sequence[float]) -> float:
    """histogram_quantile as Prometheus computes it: linear inside the bucket."""
    total = sum(counts)
    if total <= 0:
        return 0.0
    rank = q * total
    seen = 0.0
    lower = 0.0
    for i, c in enumerate(counts):
        if seen + c >= rank and c > 0:
            if i == len(bounds):
                return float("inf")
            upper = bounds[i]
            return lower + (upper - lower) * (rank - seen) / c
        seen += c
        if i < len(bounds):
            lower = bounds[i]
    return float("inf")


# --------------------------------------------------------------------------- recorder


# The process's recorder, when alerts.webhooks is set.
ALERTS: ServiceKey[AlertRecorder] = ServiceKey("alerts")


class AlertRecorder:
    """Per process (per config): counts in memory, flushes, evaluates, delivers."""

    name = "alerts"  # its section of /_edge/status and /readyz

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.cfg = rt.config.alerts
        self.clock = rt.clock
        self.owner = os.urandom(8).hex()
        rules = self.cfg.rules
        self._status_codes: dict[int, str] = {}
        if rules.upstream_400_per_min is not None:
            self._status_codes[400] = "400"
        if rules.upstream_409_per_min is not None:
            self._status_codes[409] = "409"
        self._count_5xx = rules.upstream_5xx_per_min is not None
        self._count_rt = rules.realtime_disconnects_per_min is not None
        self._auth = rules.auth_p95
        self.bounds: tuple[float, ...] = tuple(
            sorted({*AUTH_BOUNDS, *((rules.auth_p95,) if rules.auth_p95 else ())})
        )
        # minute -> field -> count, swapped out by each flush.
        self._pending: dict[int, dict[str, int]] = {}
        self._last_slot: int | None = None
        self._firing: set[str] = set()
        self.last_evaluation: float | None = None
        self.queues: dict[int, asyncio.Queue[dict[str, Any]]] = {}
        self._tasks: list[asyncio.Task[Any]] = []
        self._loop_task: asyncio.Task[Any] | None = None
        self.client: httpx.AsyncClient | None = None
        m = rt.metrics
        self._sent = m.alerts_sent
        self._gauge = m.alerts_firing

    @classmethod
    def install(cls, rt: Runtime) -> AlertRecorder:
        rec = cls(rt)
        rt.services[ALERTS] = rec
        rt.services.add_status(rec)
        for up in rt.upstreams.values():
            up.observer = rec
        rt.on_start(rec.start)
        rt.on_stop(rec.stop)
        return rec

    # ------------------------------------------------------------------ hot path

    def _add(self, name: str, n: int = 1) -> None:
        minute = int(self.clock() // WINDOW_S)
        bucket = self._pending.get(minute)
        if bucket is None:
            bucket = self._pending[minute] = {}
        bucket[name] = bucket.get(name, 0) + n

    def answered(self, ctx: RequestContext, status: int, seconds: float | None) -> None:
        """An upstream answer reached the gateway (from Proxy.fetch), or the upstream
        could not be reached (502/504). `seconds` is None when the time is not the
        upstream's alone (a request body streamed from the client)."""
        if status >= 500:
            if self._count_5xx:
                self._add(f"c|5xx|{ctx.route.name}")
        elif (code := self._status_codes.get(status)) is not None:
            self._add(f"c|{code}|{ctx.route.name}")
        if (
            seconds is not None
            and self._auth is not None
            and ctx.scope["path"].startswith(AUTH_PREFIX)
        ):
            self._add(f"a|{bisect.bisect_left(self.bounds, seconds)}")
            if seconds > self._auth:
                self._add(f"as|{ctx.route.name}")

    def ws_closed(self, ctx: RequestContext, route: str, by: str) -> None:
        """A proxied WebSocket ended; `by` is who closed first (client, upstream, error)."""
        if self._count_rt and by != "client" and ctx.scope["path"] == REALTIME_PATH:
            self._add(f"c|rt|{route}")

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self.client = httpx.AsyncClient(
            timeout=self.cfg.send_timeout, follow_redirects=False, trust_env=False
        )
        for i, hook in enumerate(self.cfg.webhooks):
            q: asyncio.Queue[dict[str, Any]] = asyncio.Queue(QUEUE_MAX)
            self.queues[i] = q
            self._tasks.append(
                self.rt.spawn(self._worker(hook, q), f"alerts-webhook-{i}-{hook.kind}")
            )
        self._loop_task = self.rt.spawn(self._loop(), "alerts-tick")

    async def stop(self) -> None:
        # Stop the periodic flush first: a tick cancelled half-way would lose the deltas
        # it had taken. Then the last deltas of this process reach the fleet's counts.
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._loop_task
        with contextlib.suppress(Exception):
            await self.tick(evaluate=False)
        # Give deliveries in flight a moment, then stop the workers before the client
        # closes (a worker in back-off would otherwise fail on a closed client).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.drain(), 2.0)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for up in self.rt.upstreams.values():
            if up.observer is self:
                up.observer = None
        if self.client is not None:
            await self.client.aclose()

    async def drain(self) -> None:
        """Wait until every queued webhook delivery is done (tests, shutdown)."""
        for q in self.queues.values():
            await q.join()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.flush_every)
            try:
                await self.tick()
            except Exception:
                log.exception("alert tick failed")

    def status(self) -> dict[str, Any]:
        return {
            "firing": sorted(self._firing),
            "webhooks": [h.kind for h in self.cfg.webhooks],
            "queued": sum(q.qsize() for q in self.queues.values()),
            "last_evaluation": self.last_evaluation,
        }

    # ------------------------------------------------------------------ flush + evaluate

    @staticmethod
    def keys(slot: int, minute: int) -> list[str]:
        """The tick script's keys: one `{alerts}` hash tag, so one Redis Cluster slot."""
        return [
            f"alerts:{_TAG}:lock:{slot}",
            f"alerts:{_TAG}:state",
            f"alerts:{_TAG}:breakers",
            f"alerts:{_TAG}:m:{minute}",
            f"alerts:{_TAG}:m:{minute - 1}",
        ]

    def _open_groups(self) -> list[str]:
        if not self.cfg.rules.breaker_open:
            return []
        # Imported here: a config without breakers never loads the breaker module.
        from gateway.policies.breaker.policy import BREAKERS

        reg = self.rt.services.get(BREAKERS)
        if reg is None:
            return []
        try:
            snap: dict[str, dict[str, Any]] = reg.status()
        except Exception:
            log.exception("breaker status failed")
            return []
        return sorted(g for g, s in snap.items() if s.get("state", "closed") != "closed")

    async def tick(self, *, evaluate: bool = True) -> bool:
        """Flush this process's counts and, if this replica wins the slot's lock, evaluate
        and queue the messages. One store round trip (two when evaluating: the state
        write). Returns True when this replica evaluated."""
        now = self.clock()
        slot = int(now // self.cfg.evaluate_every)
        minute = int(now // WINDOW_S)
        pending, self._pending = self._pending, {}
        # Deltas older than the previous minute fall outside every window: dropped.
        cur = pending.get(minute, {})
        prev = pending.get(minute - 1, {})
        groups = self._open_groups()
        want = evaluate and slot != self._last_slot
        args = self._tick_args(now, want, cur, prev, groups)
        try:
            res = await self.rt.store.run(TICK, self.keys(slot, minute), args)
        except StoreError as exc:
            # Keep the counts for the next turn when the call was (almost certainly) never
            # run: backing off, or no connection. After a timeout the script may have run,
            # and re-sending would count everything twice (a false page); losing one
            # flush's deltas is the lesser error.
            if exc.kind in ("backoff", "connection"):
                self._requeue({minute: cur, minute - 1: prev})
            self.rt.metrics.store_fallbacks.labels("alerts", "open").inc()
            log.warning("alert counts not flushed: store %s", exc.kind)
            return False
        if want:
            self._last_slot = slot
        state = _load_state(res[1])
        if int(res[0]) != 1:
            self._show(state)
            return False
        return await self._evaluate(now, state, res, groups)

    def _tick_args(
        self,
        now: float,
        want: bool,
        cur: dict[str, int],
        prev: dict[str, int],
        groups: list[str],
    ) -> list[ScriptArg]:
        """The tick script's arguments: times and TTLs, whether to try for the slot's
        lock, this minute's and the previous minute's deltas, the open breaker groups."""
        every = self.cfg.evaluate_every
        args: list[ScriptArg] = [
            int(now * 1000),
            int(3 * WINDOW_S * 1000),
            int(max(4 * self.cfg.flush_every, 2 * every, 60) * 1000),
            "1" if want else "0",
            self.owner,
            int(2 * every * 1000),
        ]
        for delta in (cur, prev):
            args.append(len(delta))
            for k, v in delta.items():
                args.extend((k, v))
        args.append(len(groups))
        args.extend(groups)
        return args

    def _requeue(self, by_minute: dict[int, dict[str, int]]) -> None:
        """Add unflushed deltas back to the pending counts."""
        for m, delta in by_minute.items():
            bucket = self._pending.setdefault(m, {})
            for k, v in delta.items():
                bucket[k] = bucket.get(k, 0) + v

    async def _evaluate(
        self, now: float, state: dict[str, Any], res: Sequence[Any], groups: list[str]
    ) -> bool:
        """This replica won the slot: observe the rules over the store's windows, save
        the new state, then queue the messages it implies."""
        every = self.cfg.evaluate_every
        seen_open = [
            g
            for g, ms in _pairs(res[2]).items()
            if now * 1000 - ms <= max(3 * self.cfg.flush_every, every) * 1000
        ]
        observations = observe_rules(
            self.cfg, self.bounds, now, _pairs(res[3]), _pairs(res[4]), [*seen_open, *groups]
        )
        messages = self._transitions(state, observations, now)
        try:
            await self.rt.store.set(
                f"alerts:{_TAG}:state",
                json.dumps(state).encode(),
                # Refreshed every evaluation; long enough never to forget a firing rule.
                ttl=max(2 * self.cfg.cooldown, STATE_TTL_S),
            )
        except StoreError as exc:
            # Unsaved, the next evaluator would not know these messages went out and
            # would send them again past the cooldown: send nothing this turn instead.
            log.warning("alert state not saved, messages held: store %s", exc.kind)
            return True
        self.last_evaluation = now
        self._show(state)
        for msg in messages:
            self._enqueue(msg)
        return True

    def _transitions(
        self, state: dict[str, Any], observations: list[Observation], now: float
    ) -> list[Message]:
        """Update `state` in place; return the messages to send. Per rule: the first breach
        fires; while it lasts, a reminder once per cooldown; when the value falls back, a
        resolved message. A new breach within cooldown of the last message stays quiet."""
        out: list[Message] = []
        cooldown = self.cfg.cooldown
        enabled = {o.rule for o in observations}
        for rule, old in state.items():
            # A rule turned off (config reload) while firing: forgotten, not "resolved".
            if rule not in enabled and isinstance(old, dict):
                old["firing"] = False
        for o in observations:
            st: dict[str, Any] = state.setdefault(o.rule, {})
            firing = bool(st.get("firing"))
            last_sent = float(st.get("last_sent", 0.0))
            if o.breached:
                if now - last_sent >= cooldown:
                    since = float(st.get("since", now)) if firing else now
                    out.append(Message("firing", o, now, since, reminder=firing))
                    st.update(firing=True, last_sent=now, since=since)
            elif firing:
                out.append(Message("resolved", o, now, float(st.get("since", now))))
                st.update(firing=False)
        return out

    def _show(self, state: dict[str, Any]) -> None:
        firing = {r for r, st in state.items() if isinstance(st, dict) and st.get("firing")}
        for rule in RULES:
            self._gauge.labels(rule).set(1 if rule in firing else 0)
        self._firing = firing

    # ------------------------------------------------------------------ delivery

    def _enqueue(self, msg: Message) -> None:
        log.warning("alert %s", msg.summary, extra={"rule": msg.obs.rule, "alert": msg.status})
        for i, hook in enumerate(self.cfg.webhooks):
            q = self.queues.get(i)
            if q is None:
                continue
            try:
                q.put_nowait(FORMATS[hook.kind](msg))
            except asyncio.QueueFull:
                self._sent.labels(hook.kind, "dropped").inc()

    async def _worker(self, hook: Webhook, q: asyncio.Queue[dict[str, Any]]) -> None:
        """One per webhook, so a slow service delays only its own messages, in order."""
        while True:
            payload = await q.get()
            try:
                await self._deliver(hook, payload)
            except Exception:
                log.exception("alert delivery failed", extra={"kind": hook.kind})
            finally:
                q.task_done()

    async def _deliver(self, hook: Webhook, payload: dict[str, Any]) -> None:
        """POST with retries: connection errors, timeouts, 429 and 5xx are retried with a
        doubling back-off (a 429's Retry-After wins when longer); other answers are final.
        The URL holds the service's secret, so it is never logged."""
        client = self.client
        assert client is not None
        delay = self.cfg.send_backoff
        attempts = self.cfg.send_attempts
        for attempt in range(1, attempts + 1):
            wait = 0.0
            try:
                r = await client.post(hook.url, json=payload)
            except httpx.HTTPError as exc:
                reason, retryable = type(exc).__name__, True
            else:
                if r.status_code < 300:
                    self._sent.labels(hook.kind, "ok").inc()
                    return
                reason = f"HTTP {r.status_code}"
                retryable = r.status_code == 429 or r.status_code >= 500
                wait = _retry_after(r.headers.get("retry-after"), self.clock())
            if not retryable or attempt == attempts:
                self._sent.labels(hook.kind, "failed").inc()
                log.warning(
                    "alert webhook failed",
                    extra={"kind": hook.kind, "reason": reason, "attempts": attempt},
                )
                return
            self._sent.labels(hook.kind, "retry").inc()
            await asyncio.sleep(min(max(delay, wait), MAX_BACKOFF_S))
            delay *= 2


def _retry_after(value: str | None, now: float) -> float:
    if not value:
        return 0.0
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return 0.0
    return max(0.0, when - now)


def _load_state(raw: Any) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        state = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return {}
    return state if isinstance(state, dict) else {}
