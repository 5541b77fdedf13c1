"""Heartbeat shedding and live presence.

Owns: the `heartbeat:` route policy (presence pings and access tracks answered at the
edge), the per-webinar presence record in the store, the batch flusher that writes the
recorded last-seen times to a Supabase RPC, and `GET /_edge/webinars/{id}/presence`.

Per heartbeat, ONE store round trip (the `heartbeat_record` script) records the viewer
as seen and decides: forward it to the app (the first one, then at most one per
`forward_interval` in sample mode; only the first in batch mode), absorb it (answer
`local_response` at the edge), record it as a join (batch mode with `join: batch`: the
first heartbeat too is answered at the edge, and the flush registers the viewer or
refuses it), or answer a cached negative (the app, or a flush, refused this viewer within
`negative_ttl`). Times come from the gateway clock and go to the store
as arguments, so replicas, the memory twin and tests with an injected clock all agree.
The heartbeats that arrive in the same event-loop turn share one script call per
webinar (`Recorder`; on Redis the calls of several webinars go in one pipelined round
trip), which is what keeps the shed path fast: on Redis it saves round trips, in memory
the call's fixed cost.
When the store fails, `on_failure: local` (the default) decides from this process's own
bounded copy (`LocalMemory`): a viewer's first heartbeat here is forwarded, the rest
absorbed, so a store outage costs the app at most one heartbeat per viewer per process.

Store layout (every key of one webinar shares its hash tag `{<webinar_id>}`):
  hb:{w}:seen               zset viewer -> last seen ms (all heartbeat routes; presence)
  hb:{w}:fwd:<route>        zset viewer -> last forwarded ms
  hb:{w}:neg:<route>        hash viewer -> "expires_ms|status|content-type|body"
  hb:{w}:dirty:<route>      zset viewer -> last seen ms, not flushed yet (batch)
  hb:{w}:join:<route>       zset viewer -> ms of a join not flushed yet (join: batch)
  hb:{w}:ix:<route>         when the webinar was last announced to the flush index
  hbix:{<route>}:webinars   zset webinar -> sequence (webinars with unflushed entries)
  hbflush:{<route>}:lock    the flush lock (one replica flushes per flush_interval)
A viewer is `u:<sub>` for a verified user; guests are `ip:<addr>`, or `c:`/`h:` plus a
BLAKE2b digest of the cookie/header value, so no cookie value reaches the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import aiohttp

from gateway.http import (
    Handler,
    Headers,
    Receive,
    RequestContext,
    Scope,
    Send,
    cookies,
    send_error,
    send_json,
)
from gateway.negcache import ENTRY_OVERHEAD, NegativeCache
from gateway.observability.collectors import fast
from gateway.services import ServiceKey, StatusFn
from gateway.store import Script, Store, StoreError
from gateway.store.base import KeySpace, ScriptArg
from gateway.store.coalesce import Coalescer
from gateway.tap import Tap

if TYPE_CHECKING:
    from gateway.config import Route
    from gateway.policies.heartbeat.config import HeartbeatConfig, LocalResponse
    from gateway.runtime import Runtime

log = logging.getLogger("gateway.heartbeat")

# A cached negative answer is kept only if its body is at most this big.
NEGATIVE_BODY_LIMIT = 4096
# Viewer entries per flush request (a bigger webinar takes several requests per flush).
FLUSH_PAGE = 5000
# Idle expiry of a webinar's keys (garbage collection only; decisions use stored times).
MIN_GC_SECONDS = 3600.0
# Attempts of the final flush at shutdown, and the pause before the first retry.
STOP_ATTEMPTS = 3
STOP_RETRY_PAUSE = 0.2
# Heartbeats of one webinar sent in one record call at most (networked stores).
MAX_COALESCE = 128
# The memory twin prunes old entries from a set at most this often (Redis prunes each time).
_PRUNE_EVERY_MS = 1000

# Bytes of the app's negative answers kept per process for `on_failure: local`.
LOCAL_NEGATIVE_BYTES = 4 * 1024 * 1024

OUTCOMES = (
    "forwarded",
    "absorbed",
    "joined",
    "negative",
    "unkeyed",
    "failed_open",
    "failed_closed",
    "local_forwarded",
    "local_absorbed",
    "local_negative",
)


# --------------------------------------------------------------------------- scripts
# Python twins of lua/heartbeat_*.lua for the memory backend: same keys,
# same arguments, same Redis-shaped results.


def _b(v: ScriptArg) -> bytes:
    return v if isinstance(v, bytes) else str(v).encode()


_DIGITS = b"0123"
# A heartbeat as the record script takes it: its track-dirty flag, then the viewer id
# (printable ASCII without spaces: `u:<sub>` with a checked `sub`, an IP or a digest).
_TRACK = ("0", "1")


def _item(viewer: str, track: int) -> str:
    return _TRACK[track] + viewer


def _score(v: float) -> bytes:
    return str(int(v)).encode()


def _gc_due(data: KeySpace, mark: str, now: int, gc: float) -> bool:
    """True at most once a second per webinar: then the twin prunes its sets and renews
    their idle expiry, as the Lua script does (every keyspace touch costs a TLRU lookup
    here and a write on Redis, and the pruned entries are garbage either way, since every
    read compares scores with a cut-off)."""
    last = data.get(mark)
    if last is not None and now - int(last) < _PRUNE_EVERY_MS:
        return False
    data.set(mark, now, gc)
    return True


def _prune(z: dict[bytes, float], cut: int) -> None:
    for m in [m for m, s in z.items() if s < cut]:
        del z[m]


def _mark_dirty(
    data: KeySpace, dirty_k: str, join_k: str, v: bytes, score: float, join: bool
) -> tuple[bool, bool]:
    """Batch mode: the viewer's entry for the next flush, and its join if it is one.
    Returns whether each was new (for the memory bound)."""
    dirty = data.zset(dirty_k, create=True)
    assert dirty is not None
    new = v not in dirty
    dirty[v] = score
    if not join:
        return new, False
    pending = data.zset(join_k, create=True)
    assert pending is not None
    new_join = v not in pending
    pending[v] = score
    return new, new_join


def _live_negative(negs: dict[bytes, bytes] | None, v: bytes, now: int) -> bytes | None:
    """The viewer's cached negative answer, unless it has expired (then it is dropped)."""
    if negs is None or v not in negs:
        return None
    blob = negs[v]
    if int(blob.split(b"|", 1)[0]) > now:
        return blob
    del negs[v]
    return None


def _record_py(data: KeySpace, keys: list[str], args: list[ScriptArg], _now: int) -> Any:
    seen_k, fwd_k, neg_k, dirty_k, ix_k, join_k = keys
    now = int(args[0])
    interval = int(args[1])
    batch = int(args[4]) != 0
    joins = int(args[4]) == 2
    gc = int(args[6]) / 1000
    negs = data.hash(neg_k)
    seen = data.zset(seen_k, create=True)
    fwd = data.zset(fwd_k, create=True)
    assert seen is not None
    assert fwd is not None
    out: list[Any] = [0, b""]
    codes = bytearray()
    tracked = tracked_new = joined_new = False
    # One float for every score of this call (the sets share it), and the member bytes
    # are shared by seen/fwd/dirty: ~190 bytes a viewer instead of ~270.
    score = float(now)
    n_seen, n_fwd = len(seen), len(fwd)
    for item in _b(args[7]).split(b"\n"):
        if not item:
            continue
        v = item[1:]
        blob = _live_negative(negs, v, now)
        if blob is not None:
            codes.append(_DIGITS[2])
            out.append(blob)
            continue
        seen[v] = score
        last = fwd.get(v)
        decision = 1 if last is None or now - last >= interval else 0
        if decision == 1 or batch:
            fwd[v] = score
        if item[0] == _DIGITS[1]:
            tracked = True
            if decision == 1 and joins:
                decision = 3
            new, new_join = _mark_dirty(data, dirty_k, join_k, v, score, decision == 3)
            tracked_new = tracked_new or new
            joined_new = joined_new or new_join
        codes.append(_DIGITS[decision])
    out[1] = bytes(codes)
    # New viewers count against store.memory_max_keys (members, not just keys).
    grown = (len(seen) > n_seen, len(fwd) > n_fwd, tracked_new, joined_new)
    for key, grew in zip((seen_k, fwd_k, dirty_k, join_k), grown, strict=True):
        if grew:
            data.grew(key)
    if _gc_due(data, fwd_k + "#gc", now, gc):
        _prune(seen, int(args[3]))
        _prune(fwd, int(args[2]))
        data.expire(seen_k, gc)
        data.expire(fwd_k, gc)
    if tracked:
        ix = data.get(ix_k)
        if ix is None or now - int(ix) >= int(args[5]):
            data.set(ix_k, now, gc)
            out[0] = 1
    return out


def _outcome_py(data: KeySpace, keys: list[str], args: list[ScriptArg], _now: int) -> Any:
    seen_k, fwd_k, neg_k, dirty_k, join_k = keys
    v = _b(args[1])
    if _b(args[0]) == b"neg":
        negs = data.hash(neg_k, create=True)
        assert negs is not None
        negs[v] = _b(args[2])
        data.expire(neg_k, int(args[3]) / 1000)
        for k in (seen_k, dirty_k, join_k):
            z = data.zset(k)
            if z is not None:
                z.pop(v, None)
    fwd = data.zset(fwd_k)
    if fwd is not None:
        fwd.pop(v, None)
    return 1


def _flush_py(data: KeySpace, keys: list[str], args: list[ScriptArg], _now: int) -> Any:
    dirty_k, ix_k, join_k = keys
    dirty = data.zset(dirty_k)
    joins = data.zset(join_k)
    if _b(args[0]) == b"take":
        if not dirty:
            return []
        page = sorted(dirty.items(), key=lambda kv: (kv[1], kv[0]))[: int(args[1])]
        out: list[bytes] = []
        for m, s in page:
            j = joins.get(m) if joins else None
            out += [m, _score(s), b"" if j is None else _score(j)]
        return out
    for i in range(1, len(args) - 2, 3):
        m = _b(args[i])
        if dirty is not None and m in dirty and dirty[m] == float(args[i + 1]):
            del dirty[m]
        sent = _b(args[i + 2])
        if sent and joins is not None and joins.get(m) == float(sent):
            del joins[m]
    left = len(dirty) if dirty else 0
    if left == 0:
        data.delete(dirty_k)
        data.delete(ix_k)
    return left


def _index_py(data: KeySpace, keys: list[str], args: list[ScriptArg], _now: int) -> Any:
    index_k, seq_k = keys
    op = _b(args[0])
    if op == b"add":
        seq = data.incr(seq_k)
        index = data.zset(index_k, create=True)
        assert index is not None
        index[_b(args[1])] = float(seq)
        data.grew(index_k)
        return seq
    index = data.zset(index_k)
    if op == b"list":
        if not index:
            return []
        return [x for m, s in sorted(index.items(), key=lambda kv: kv[1]) for x in (m, _score(s))]
    w = _b(args[1])
    if index is not None and index.get(w) == float(args[2]):
        del index[w]
        return 1
    return 0


def _presence_py(data: KeySpace, keys: list[str], args: list[ScriptArg], _now: int) -> Any:
    seen = data.zset(keys[0])
    if not seen:
        return 0
    since = float(args[0])
    return sum(1 for s in seen.values() if s >= since)


_LUA = Path(__file__).parent / "lua"
RECORD = Script.from_file("heartbeat_record", _record_py, directory=_LUA)
OUTCOME = Script.from_file("heartbeat_outcome", _outcome_py, directory=_LUA)
FLUSH = Script.from_file("heartbeat_flush", _flush_py, directory=_LUA)
INDEX = Script.from_file("heartbeat_index", _index_py, directory=_LUA)
PRESENCE = Script.from_file("heartbeat_presence", _presence_py, directory=_LUA)


# --------------------------------------------------------------------------- keys


def seen_key(webinar: str) -> str:
    return f"hb:{Store.tag(webinar)}:seen"


def _webinar_keys(webinar: str, route: str) -> list[str]:
    """seen, fwd, neg, dirty, ix, join: the record script's keys (one hash tag)."""
    t = Store.tag(webinar)
    return [
        f"hb:{t}:seen",
        f"hb:{t}:fwd:{route}",
        f"hb:{t}:neg:{route}",
        f"hb:{t}:dirty:{route}",
        f"hb:{t}:ix:{route}",
        f"hb:{t}:join:{route}",
    ]


def _outcome_keys(keys: list[str]) -> list[str]:
    """seen, fwd, neg, dirty, join: the outcome script's keys."""
    return [*keys[:4], keys[5]]


def _index_keys(route: str) -> list[str]:
    t = Store.tag(route)
    return [f"hbix:{t}:webinars", f"hbix:{t}:seq"]


def _digest(value: bytes) -> str:
    return hashlib.blake2b(value, digest_size=16).hexdigest()


def _flush_viewers(page: list[tuple[bytes, bytes, bytes]]) -> list[dict[str, str | bool]]:
    """The verified users of a page of (viewer, last seen ms, join ms or b"") entries."""
    out: list[dict[str, str | bool]] = []
    for m, score, joined in page:
        if m.startswith(b"u:"):
            v: dict[str, str | bool] = {
                "user_id": m[2:].decode(),
                "last_seen_at": _iso(int(float(score))),
            }
            if joined:
                v["join"] = True
            out.append(v)
    return out


def _pairs(flat: Sequence[Any]) -> list[tuple[bytes, bytes]]:
    items = [_b(x) for x in flat]
    return list(zip(items[0::2], items[1::2], strict=True))


# --------------------------------------------------------------------------- presence


class PresenceService:
    """Shared by every heartbeat route of the process (rt.services[PRESENCE_SERVICE]): the
    presence window (the widest configured) that both pruning and counting use."""

    def __init__(self) -> None:
        self.window = 0.0

    def widen(self, window: float) -> None:
        self.window = max(self.window, window)


PRESENCE_SERVICE: ServiceKey[PresenceService] = ServiceKey("presence")


def _presence_window(hb: HeartbeatConfig, rt: Runtime) -> float:
    if hb.presence_window is not None:
        return float(hb.presence_window)
    return 3 * float(rt.config.client.presence_ping_interval)


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


async def presence_endpoint(
    rt: Runtime, scope: Scope, receive: Receive, send: Send, webinar_id: str, client_ip: str
) -> None:
    """`GET /_edge/webinars/{webinar_id}/presence` (verified identity required) →
    `{"webinar_id", "online", "window_s"}`: viewers seen within the presence window."""
    if scope["method"] not in ("GET", "HEAD"):
        await send_error(send, 405, "method_not_allowed", "use GET", [(b"allow", b"GET, HEAD")])
        return
    from gateway.policies.auth.policy import require_identity

    identity = await require_identity(rt, scope, send)
    if identity is None:
        return
    svc = rt.services[PRESENCE_SERVICE]
    since = int((rt.clock() - svc.window) * 1000)
    try:
        online = int(await rt.store.run(PRESENCE, [seen_key(webinar_id)], [since]))
    except StoreError:
        # There is no app to fall back to: a count the store cannot give is unavailable.
        rt.metrics.store_fallbacks.labels("heartbeat", "closed").inc()
        await send_error(send, 503, "store_unavailable", "presence is unavailable, retry shortly")
        return
    body = json.dumps(
        {"webinar_id": webinar_id, "online": online, "window_s": _number(svc.window)}
    ).encode()
    await send_json(send, 200, body, [(b"cache-control", b"no-store")])


# --------------------------------------------------------------------------- local state


class LocalMemory:
    """This process's own copy of the heartbeat decisions, for `on_failure: local`;
    shared by every heartbeat route (rt.services[LOCAL]). Per viewer of a
    webinar and route: when this process last forwarded its heartbeat (sample mode) or
    last saw it (batch mode), and the app's negative answers. Keys are 64-bit BLAKE2b
    digests and values plain ints (about 100 bytes an entry); beyond `max_keys`
    (store.memory_max_keys) the oldest entry goes, beyond LOCAL_NEGATIVE_BYTES the least
    recently used negative answer (a `NegativeCache`, gateway/negcache.py)."""

    def __init__(self, max_keys: int, clock: Callable[[], float] = time.time) -> None:
        self.max_keys = max_keys
        self.times: dict[int, int] = {}
        # Blobs in the store's record format, each with its own deadline (the blob's
        # expires_ms) on a millisecond clock. Bounded by bytes; the entry bound is what
        # the bytes allow at the smallest entry, so it never binds first.
        self.negatives: NegativeCache[int, bytes] = NegativeCache(
            clock=lambda: int(clock() * 1000),
            max_entries=LOCAL_NEGATIVE_BYTES // ENTRY_OVERHEAD,
            max_bytes=LOCAL_NEGATIVE_BYTES,
            body_limit=NEGATIVE_BODY_LIMIT,
            sizeof=len,
        )

    @staticmethod
    def key(route: str, webinar: str, viewer: str) -> int:
        raw = f"{route}\0{webinar}\0{viewer}".encode("utf-8", "surrogateescape")
        return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "big")

    def put(self, key: int, ms: int) -> None:
        times = self.times
        # Re-inserted at the end, so the dict's order is the eviction order.
        times.pop(key, None)
        times[key] = ms
        if len(times) > self.max_keys:
            del times[next(iter(times))]

    def forget(self, key: int) -> None:
        self.times.pop(key, None)

    def negative(self, key: int) -> bytes | None:
        """The viewer's negative answer (a record blob) while it lasts."""
        return self.negatives.get(key)

    def keep_negative(self, key: int, blob: bytes, body: bytes | bytearray, expires: int) -> None:
        self.negatives.put(key, blob, body, expires)


LOCAL: ServiceKey[LocalMemory] = ServiceKey("heartbeat.local")


def _local_memory(rt: Runtime) -> LocalMemory:
    """The process's LocalMemory, shared by every heartbeat route."""
    local = rt.services.get(LOCAL)
    if local is None:
        local = rt.services[LOCAL] = LocalMemory(rt.config.store.memory_max_keys, rt.clock)
        rt.sizes["heartbeat_local"] = local.times.__len__
        rt.sizes["heartbeat_local_negatives"] = local.negatives.__len__
    return local


# --------------------------------------------------------------------------- policy


@dataclass(frozen=True, slots=True)
class _Source:
    kind: str  # user | ip | cookie | header
    name: str = ""
    header: bytes = b""


def _sources(spec: list[str]) -> list[_Source]:
    out: list[_Source] = []
    for item in spec:
        kind, _, name = item.partition(":")
        out.append(_Source(kind, name, name.lower().encode("latin-1")))
    return out


def _encode_local(resp: LocalResponse) -> bytes:
    body = resp.body
    if isinstance(body, bytes):
        return body
    if isinstance(body, str) and "json" not in resp.content_type:
        return body.encode()
    return json.dumps(body, separators=(",", ":")).encode()


class HeartbeatPolicy:
    """`heartbeat:` on a route: record every heartbeat, forward a sample (or the first
    only, in batch mode), answer the rest at the edge."""

    def __init__(self, next_handler: Handler, route_cfg: Route, rt: Runtime) -> None:
        hb = route_cfg.heartbeat
        assert hb is not None
        self.next = next_handler
        self.rt = rt
        self.store = rt.store
        self.clock = rt.clock
        self.route = route_cfg.name
        self.batch = hb.mode == "batch"
        # The record script's mode argument: 0 sample, 1 batch, 2 batch with bulk joins.
        self.mode_arg = (2 if hb.join == "batch" else 1) if self.batch else 0
        self.interval_ms = int(hb.forward_interval * 1000)
        self.sources = _sources(hb.key)
        self.negative_statuses = frozenset(hb.negative_statuses)
        self.negative_ttl_ms = int(hb.negative_ttl * 1000)
        self.failure_mode = hb.on_failure or rt.config.store.on_failure
        # A store that never fails (memory://) needs no second copy.
        keep_copy = self.failure_mode == "local" and self.store.fails
        self.local = _local_memory(rt) if keep_copy else None
        # When a store call of this route last failed (seconds, runtime clock).
        self.failed_at = float("-inf")
        self.fallbacks = rt.metrics.store_fallbacks
        counter = rt.metrics.heartbeat.outcomes
        # Lock-free children: one of these is incremented per heartbeat.
        self.count = {o: fast(counter.labels(self.route, o)) for o in OUTCOMES}
        if "{webinar_id" not in route_cfg.match.path:
            log.warning(
                "heartbeat route has no {webinar_id} in its path; all its viewers share one "
                "presence record",
                extra={"route": self.route},
            )
        window = _presence_window(hb, rt)
        svc = rt.services.get_or_create(PRESENCE_SERVICE, PresenceService)
        svc.widen(window)
        self.presence = svc
        self.gc_ms = int(max(MIN_GC_SECONDS, 2 * window, 2 * hb.forward_interval) * 1000)
        local = _encode_local(hb.local_response)
        self.local_status = hb.local_response.status
        self.local_body = local
        self.local_headers: Headers = [
            (b"content-type", hb.local_response.content_type.encode("latin-1")),
            (b"content-length", str(len(local)).encode()),
            (b"cache-control", b"no-store"),
        ]
        # Heartbeats arriving in the same loop turn share one script call per webinar, on
        # every store: on Redis that saves round trips, and in memory the call's fixed
        # cost (keys, arguments, the namespace checks, the GC check) is most of a ping's
        # store work: 367k instructions a shed ping one call each, 268k coalesced.
        self.recorder = Recorder(self)
        self.flusher: Flusher | None = None
        if self.batch:
            self.flusher = Flusher(rt, self.route, hb, self.gc_ms)
            # A webinar re-announces itself to the flush index this often at most (and
            # at once after a flush drained it); a lost announcement heals within it.
            self.reindex_ms = int(max(3 * hb.flush_interval, 1.0) * 1000)
        else:
            self.reindex_ms = 0

    def viewer(self, ctx: RequestContext) -> str | None:
        """The verified user, else the first configured key source present."""
        if ctx.identity is not None:
            return "u:" + ctx.identity.sub
        for src in self.sources:
            if src.kind == "ip":
                if ctx.client_ip:
                    return "ip:" + ctx.client_ip
            elif src.kind == "cookie":
                value = cookies(ctx.scope).get(src.name)
                if value:
                    return "c:" + _digest(value.encode("latin-1", "replace"))
            elif src.kind == "header":
                raw = ctx.header(src.header)
                if raw:
                    return "h:" + _digest(raw)
        return None

    async def __call__(self, ctx: RequestContext, receive: Receive, send: Send) -> None:
        viewer = self.viewer(ctx)
        if viewer is None:
            # Nobody to record: behave as if there were no edge.
            self.count["unkeyed"].inc()
            ctx.notes.append("hb=unkeyed")
            await self.next(ctx, receive, send)
            return
        webinar = ctx.params.get("webinar_id", "_")
        track = 1 if self.batch and viewer.startswith("u:") else 0
        prefix = ""
        try:
            # The coalescer directly (not Recorder.submit): one call less per heartbeat.
            decision, blob = await self.recorder.calls.submit(
                Recorder.GROUP, (webinar, viewer, track)
            )
        except StoreError:
            if self.local is None:
                await self._store_failed(ctx, receive, send)
                return
            self.failed_at = self.clock()
            self.fallbacks.labels("heartbeat", "local").inc()
            decision, blob = self._decide_local(self.local.key(self.route, webinar, viewer))
            prefix = "local_"
        else:
            # An absorbed heartbeat in sample mode leaves the local copy as it is (the
            # common case: no digest of the viewer's key for it).
            if self.local is not None and (decision == 1 or (self.batch and decision != 2)):
                lk = self.local.key(self.route, webinar, viewer)
                decision = self._remember(lk, decision)
        if decision == 0 or decision == 3:
            # 3: a join recorded for the next flush, answered like any absorbed heartbeat.
            outcome = prefix + ("absorbed" if decision == 0 else "joined")
            self.count[outcome].inc()
            ctx.notes.append("hb=" + outcome)
            await self._answer(ctx, send, self.local_status, self.local_headers, self.local_body)
        elif decision == 2:
            self.count[prefix + "negative"].inc()
            ctx.notes.append(f"hb={prefix}negative")
            await self._negative(ctx, send, blob)
        else:
            self.count[prefix + "forwarded"].inc()
            ctx.notes.append(f"hb={prefix}forwarded")
            await self._forward(ctx, receive, send, webinar, viewer)

    def _decide_local(self, lk: int) -> tuple[int, bytes]:
        """The store failed: decide from this process's memory. A viewer this process
        has not forwarded within forward_interval (batch: not seen within it) goes to the
        app, once; the rest are absorbed, or get their cached negative answer."""
        assert self.local is not None
        now = int(self.clock() * 1000)
        blob = self.local.negative(lk)
        if blob is not None:
            return 2, blob
        last = self.local.times.get(lk)
        if last is not None and now - last < self.interval_ms:
            if self.batch:
                self.local.put(lk, now)
            return 0, b""
        self.local.put(lk, now)
        return 1, b""

    def _remember(self, lk: int, decision: int) -> int:
        """The store decided: keep this process's copy current. A forward the store asks
        for shortly after it failed, for a viewer this process forwarded within the
        interval, means the store lost its state (a restarted Redis): absorbing it
        avoids sending every viewer to the app again at once when the store returns."""
        assert self.local is not None
        now_s = self.clock()
        now = int(now_s * 1000)
        if decision == 1:
            last = self.local.times.get(lk)
            recent_failure = (now_s - self.failed_at) * 1000 < self.interval_ms
            if recent_failure and last is not None and now - last < self.interval_ms:
                return 0
            self.local.put(lk, now)
        elif decision in (0, 3) and self.batch:
            self.local.put(lk, now)
        return decision

    async def record_many(
        self, batch: dict[str, list[str]]
    ) -> list[list[tuple[int, bytes]] | StoreError]:
        """One store round trip for the heartbeats of several webinars (`batch`: webinar
        -> its `_item`s): one script call each, pipelined (`run_many`). Returns each
        webinar's decisions, or the StoreError of its call alone; raises StoreError when
        the round trip as a whole failed."""
        calls = [(_webinar_keys(w, self.route), self._args(v)) for w, v in batch.items()]
        replies = await self.store.run_many(RECORD, calls)
        out: list[list[tuple[int, bytes]] | StoreError] = []
        for (webinar, items), res in zip(batch.items(), replies, strict=True):
            if not isinstance(res, StoreError):
                try:
                    res = await self._decisions(webinar, res, len(items))
                except StoreError as exc:  # an answer that does not match its call
                    res = exc
            out.append(res)
        return out

    def _args(self, items: list[str]) -> list[ScriptArg]:
        now = int(self.clock() * 1000)
        return [
            now,
            self.interval_ms,
            now - self.interval_ms,
            now - int(self.presence.window * 1000),
            self.mode_arg,
            self.reindex_ms,
            self.gc_ms,
            "\n".join(items),
        ]

    async def _decisions(self, webinar: str, res: Any, n: int) -> list[tuple[int, bytes]]:
        """The record script's answer as (decision, negative blob) per heartbeat: one
        digit each, the blobs of the negative ones (2) after them in order."""
        codes = _b(res[1])
        negative, zero = _DIGITS[2], _DIGITS[0]
        if len(codes) != n or len(res) != 2 + codes.count(negative):
            raise StoreError("error", f"heartbeat_record answered {len(codes)} of {n} heartbeats")
        if int(res[0]) and self.flusher is not None:
            await self.flusher.announce(webinar)
        blobs = iter(res[2:])
        return [(2, _b(next(blobs))) if c == negative else (c - zero, b"") for c in codes]

    async def _answer(
        self, ctx: RequestContext, send: Send, status: int, headers: Headers, body: bytes
    ) -> None:
        ctx.status = status
        if ctx.response_headers:
            headers = [*headers, *ctx.response_headers]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _negative(self, ctx: RequestContext, send: Send, blob: bytes) -> None:
        _exp, status, ctype, body = blob.split(b"|", 3)
        headers: Headers = [
            (b"content-type", ctype or b"application/octet-stream"),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
        ]
        await self._answer(ctx, send, int(status), headers, body)

    async def _forward(
        self, ctx: RequestContext, receive: Receive, send: Send, webinar: str, viewer: str
    ) -> None:
        keys = _webinar_keys(webinar, self.route)
        lk = -1 if self.local is None else self.local.key(self.route, webinar, viewer)
        written = False

        async def keep(tap: Tap) -> None:
            # Called before the last chunk goes out, so the viewer's very next heartbeat
            # already meets the negative answer.
            nonlocal written
            resp = tap.resp
            ctype = b""
            for k, v in resp.headers:
                if bytes(k).lower() == b"content-type":
                    ctype = bytes(v).replace(b"|", b"")
            expires = int(self.clock() * 1000) + self.negative_ttl_ms
            blob = b"%d|%d|%s|" % (expires, resp.status, ctype) + bytes(resp.body)
            if self.local is not None:
                self.local.keep_negative(lk, blob, resp.body, expires)
                self.local.forget(lk)
            await self._outcome(keys, "neg", viewer, blob)
            written = True

        # Passes the app's answer through untouched; keeps a small negative body.
        tap = Tap(send, NEGATIVE_BODY_LIMIT, on_start=self._is_negative, on_complete=keep)
        try:
            await self.next(ctx, receive, tap)
        finally:
            status = tap.resp.status
            if not written and not 200 <= status < 400:
                # The app did not take it (5xx, timeout, client gone, or a negative too
                # big to keep): the viewer's next heartbeat goes through, not absorbed.
                if self.local is not None:
                    self.local.forget(lk)
                await self._outcome(keys, "fail", viewer, b"")

    def _is_negative(self, tap: Tap) -> bool:
        return tap.resp.status in self.negative_statuses

    async def _outcome(self, keys: list[str], op: str, viewer: str, blob: bytes) -> None:
        with contextlib.suppress(StoreError):
            await self.store.run(OUTCOME, _outcome_keys(keys), [op, viewer, blob, self.gc_ms])

    async def _store_failed(self, ctx: RequestContext, receive: Receive, send: Send) -> None:
        mode = self.failure_mode
        self.fallbacks.labels("heartbeat", mode).inc()
        if mode == "open":
            self.count["failed_open"].inc()
            ctx.notes.append("hb=store_open")
            await self.next(ctx, receive, send)
            return
        self.count["failed_closed"].inc()
        ctx.notes.append("hb=store_closed")
        ctx.status = 503
        await send_error(
            send,
            503,
            "store_unavailable",
            "heartbeats are unavailable, retry shortly",
            [(b"retry-after", b"5"), *ctx.response_headers],
        )


class Recorder:
    """Coalesces the heartbeats that reach the policy in the same event-loop turn into
    one store round trip (up to MAX_COALESCE heartbeats): one `heartbeat_record` call per
    webinar, and the calls of several webinars pipelined together (`run_many`). Each
    script handles its webinar's heartbeats in arrival order, exactly as one call each
    would, and each request still waits for its own decision. On Redis the client's
    per-call cost, not Redis, bounds the shed path, so this is what keeps it fast under
    concurrency, with one webinar or many. A request whose client went away is
    recorded all the same; a round trip is not held back behind one already out (no
    in-flight bound, as each has its own store.timeout)."""

    # All of a route's heartbeats share one group: webinars are split per call. A
    # ClassVar, as it is read through the class (mypyc refuses that of an instance field).
    GROUP: ClassVar[str] = "all"

    def __init__(self, policy: HeartbeatPolicy) -> None:
        self.policy = policy
        self.calls: Coalescer[str, tuple[str, str, int], tuple[int, bytes]] = Coalescer(
            self._record,
            max_batch=MAX_COALESCE,
            max_inflight=None,
            keep_abandoned=True,
            what="heartbeat record",
            log=log,
            extra={"route": policy.route},
        )

    def submit(self, webinar: str, viewer: str, track: int) -> asyncio.Future[tuple[int, bytes]]:
        """Queue one heartbeat; the future gets its (decision, negative blob)."""
        return self.calls.submit(self.GROUP, (webinar, viewer, track))

    async def _record(
        self, _group: str, items: list[tuple[str, str, int]]
    ) -> list[tuple[int, bytes] | StoreError]:
        # Each webinar's heartbeats (`_item`s) in arrival order, and where
        # each of its heartbeats sits in `items`.
        batch: dict[str, list[str]] = {}
        where: dict[str, list[int]] = {}
        for i, (webinar, viewer, track) in enumerate(items):
            viewers = batch.get(webinar)
            if viewers is None:
                viewers = batch[webinar] = []
                where[webinar] = []
            viewers.append(_item(viewer, track))
            where[webinar].append(i)
        # One webinar (the usual turn) still goes out as a plain EVALSHA: run_many sends a
        # batch of one call without a pipeline.
        out: list[tuple[int, bytes] | StoreError] = [StoreError("error", "unanswered")] * len(items)
        for webinar, answer in zip(batch, await self.policy.record_many(batch), strict=True):
            for n, i in enumerate(where[webinar]):
                out[i] = answer if isinstance(answer, StoreError) else answer[n]
        return out


# --------------------------------------------------------------------------- batch flush


@dataclass
class FlushReport:
    """What one flush did (returned for tests and the status page)."""

    skipped: bool = False
    requests: int = 0
    entries: int = 0
    failed: int = 0
    store_errors: int = 0
    joins: int = 0
    refused: int = 0


def refused_ids(answer: bytes) -> list[str]:
    """The ids a flush answer refused: edge_access_batch returns `{"written": n,
    "refused": [...]}`; any other 2xx answer (edge_presence_batch's count) refuses none."""
    try:
        doc = json.loads(answer)
    except ValueError:
        return []
    refused = doc.get("refused") if isinstance(doc, dict) else None
    return [str(x) for x in refused] if isinstance(refused, list) else []


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds")


def flush_body(webinar: str, viewers: list[dict[str, str | bool]]) -> bytes:
    """The RPC request body: PostgREST passes `payload` to edge_presence_batch(payload)
    or edge_access_batch(payload) (sql/). A viewer's first heartbeat under `join: batch`
    carries `"join": true`."""
    doc = {"payload": {"webinar_id": webinar, "viewers": viewers}}
    return json.dumps(doc, separators=(",", ":")).encode()


# The flusher of each batch-mode route, by route name.
FLUSHERS: ServiceKey[dict[str, Flusher]] = ServiceKey("heartbeat.flushers")


class Flusher:
    """Batch mode of one route: every `flush_interval` one replica (the holder of the
    route's flush lock) sends each webinar's changed last-seen times in one POST to
    `flush_upstream` + `flush_url` (a Supabase RPC taking `{"payload": {...}}`). Entries
    leave the store only once a POST carrying them succeeded; failures are retried on the
    next flush. At shutdown a final flush runs (with a few retries) before pools close."""

    def __init__(self, rt: Runtime, route: str, hb: HeartbeatConfig, gc_ms: int) -> None:
        assert hb.flush_upstream
        assert hb.flush_url
        self.rt = rt
        self.gc_ms = gc_ms
        self.negative_ttl_ms = int(hb.negative_ttl * 1000)
        refused = hb.refused_response
        # The cached answer's fields, as heartbeat_outcome.lua stores them (after expiry).
        self.refused_blob = b"%d|%s|" % (
            refused.status,
            refused.content_type.replace("|", "").encode("latin-1"),
        ) + _encode_local(refused)
        self.store = rt.store
        self.route = route
        self.interval = float(hb.flush_interval)
        self.upstream = rt.upstreams[hb.flush_upstream]
        url = hb.flush_url
        self.url = url if "://" in url else self.upstream.base + "/" + url.lstrip("/")
        self.headers = {"Content-Type": "application/json", **hb.flush_headers}
        self.timeout = aiohttp.ClientTimeout(
            total=max(self.upstream.config.read_timeout, 1.0),
            sock_connect=self.upstream.config.connect_timeout,
        )
        self.index_keys = _index_keys(route)
        self.lock_key = f"hbflush:{Store.tag(route)}:lock"
        m = rt.metrics.heartbeat
        self.flushed = m.outcomes.labels(route, "flushed")
        self.refused = m.outcomes.labels(route, "refused")
        self.results = {r: m.flushes.labels(r) for r in ("ok", "failed", "store_error")}
        self.batch_size = m.flush_batch
        self.latency = m.flush_latency
        self.task: asyncio.Task[Any] | None = None
        self._running = asyncio.Lock()
        self.last: dict[str, Any] = {}
        flushers = rt.services.setdefault(FLUSHERS, {})
        flushers[route] = self
        rt.services.add_status(
            StatusFn("heartbeat", lambda: {name: f.last for name, f in flushers.items()})
        )
        rt.on_start(self.start)
        rt.on_stop(self.stop)

    async def start(self) -> None:
        self.task = self.rt.spawn(self._loop(), f"heartbeat-flush-{self.route}")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.flush()
            except Exception:
                log.exception("heartbeat flush failed", extra={"route": self.route})

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task
            self.task = None
        pause = STOP_RETRY_PAUSE
        for attempt in range(STOP_ATTEMPTS):
            try:
                report = await self.flush(force=True)
            except Exception:
                log.exception("final heartbeat flush failed", extra={"route": self.route})
                report = FlushReport(failed=1)
            if not (report.failed or report.store_errors):
                return
            if attempt + 1 < STOP_ATTEMPTS:
                await asyncio.sleep(pause)
                pause *= 2
        log.error(
            "heartbeats left unflushed at shutdown (they stay in the store for another "
            "replica when the store is shared)",
            extra={"route": self.route},
        )

    async def announce(self, webinar: str) -> None:
        """Put a webinar with unflushed entries on the route's flush index."""
        try:
            await self.store.run(INDEX, self.index_keys, ["add", webinar])
        except StoreError:
            # Its ix marker is set, so the next announcement comes after reindex_ms.
            log.warning("could not index a webinar for flushing", extra={"route": self.route})

    async def flush(self, *, force: bool = False) -> FlushReport:
        """One flush of every indexed webinar. Unless `force`d, only if this replica
        takes the route's flush lock (held for `flush_interval`, so replicas take turns)."""
        async with self._running:
            report = FlushReport()
            token = os.urandom(12).hex().encode()
            try:
                if not force and not await self.store.set(
                    self.lock_key, token, self.interval, nx=True
                ):
                    report.skipped = True
                    return report
                listing = _pairs(await self.store.run(INDEX, self.index_keys, ["list"]))
            except StoreError:
                report.store_errors += 1
                self.results["store_error"].inc()
                self._remember(report)
                return report
            for webinar_b, seq in listing:
                webinar = webinar_b.decode()
                try:
                    drained = await self._flush_webinar(webinar, report)
                    if drained:
                        await self.store.run(INDEX, self.index_keys, ["ack", webinar, seq])
                except StoreError:
                    report.store_errors += 1
                    self.results["store_error"].inc()
            if (report.failed or report.store_errors) and not force:
                # Let any replica retry at its next tick rather than wait out the lock.
                with contextlib.suppress(StoreError):
                    await self.store.delete_if_equals(self.lock_key, token)
            self._remember(report)
            return report

    def _remember(self, report: FlushReport) -> None:
        self.last = {
            "mode": "batch",
            "last_flush_at": round(self.rt.clock(), 3),
            "requests": report.requests,
            "entries": report.entries,
            "failed": report.failed,
            "store_errors": report.store_errors,
            "skipped": report.skipped,
            "joins": report.joins,
            "refused": report.refused,
        }

    async def _flush_webinar(self, webinar: str, report: FlushReport) -> bool:
        """Send the webinar's entries page by page. True once nothing is left."""
        keys = _webinar_keys(webinar, self.route)
        fkeys = [keys[3], keys[4], keys[5]]
        while True:
            flat = [_b(x) for x in await self.store.run(FLUSH, fkeys, ["take", FLUSH_PAGE])]
            page = list(zip(flat[0::3], flat[1::3], flat[2::3], strict=True))
            if not page:
                return True
            viewers = _flush_viewers(page)
            answer = await self._post(webinar, viewers)
            report.requests += 1
            if answer is None:
                report.failed += 1
                self.results["failed"].inc()
                return False
            self.results["ok"].inc()
            self.batch_size.observe(len(viewers))
            self.flushed.inc(len(viewers))
            report.entries += len(viewers)
            report.joins += sum(1 for v in viewers if v.get("join"))
            ack: list[ScriptArg] = ["ack"]
            for m, score, joined in page:
                ack += [m, score, joined]
            left = int(await self.store.run(FLUSH, fkeys, ack))
            await self._refuse(keys, page, refused_ids(answer), report)
            if left == 0:
                return True
            if len(page) < FLUSH_PAGE:
                # What is left arrived during this flush: it goes next time.
                return False

    async def _refuse(
        self,
        keys: list[str],
        page: list[tuple[bytes, bytes, bytes]],
        ids: list[str],
        report: FlushReport,
    ) -> None:
        """Viewers the flush target refused (join: batch): the edge answers them with
        `refused_response` for negative_ttl, as it does a negative answer of the app, and
        takes them out of presence and of the next flush. Only viewers of this page can be
        refused (PostgreSQL may print a uuid in another case than the token had it)."""
        if not ids:
            return
        sent = {m[2:].decode().lower(): m for m, _s, _j in page if m.startswith(b"u:")}
        members = [sent[i.lower()] for i in ids if i.lower() in sent]
        expires = int(self.rt.clock() * 1000) + self.negative_ttl_ms
        blob = b"%d|" % expires + self.refused_blob
        for m in members:
            await self.store.run(OUTCOME, _outcome_keys(keys), ["neg", m, blob, self.gc_ms])
        report.refused += len(members)
        self.refused.inc(len(members))

    async def _post(self, webinar: str, viewers: list[dict[str, str | bool]]) -> bytes | None:
        """POST one page; the answer's body if it is a 2xx, else None."""
        session = self.upstream.session
        if session is None:
            return None
        body = flush_body(webinar, viewers)
        t0 = time.perf_counter()
        answer: bytes | None = None
        try:
            async with session.post(
                self.url, data=body, headers=self.headers, timeout=self.timeout
            ) as resp:
                data = await resp.read()
                if 200 <= resp.status < 300:
                    answer = data
                else:
                    log.warning(
                        "heartbeat flush rejected",
                        extra={"route": self.route, "status": resp.status},
                    )
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            log.warning(
                "heartbeat flush failed",
                extra={"route": self.route, "error": type(exc).__name__},
            )
        self.latency.observe(time.perf_counter() - t0)
        return answer
