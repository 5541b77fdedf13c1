"""Response cache for slow-changing, polled GET routes (`cache:` on a route).

Owns: the cache key (route + path params + the listed query params + the listed claims,
never the raw URL), the stored entry format, freshness (ttl, stale_while_revalidate,
stale_if_error), single flight (one in-process future per key plus a store lock across
replicas), the per-caller authorization memory (allowed / denied per (user hash, key)),
`Cache-Status` (RFC 9211) and `Age` on every response of a cached route, and the
`edge_cache_*` metrics. While the store is down, `on_failure: local` (the default)
serves and single-flights from this process's byte-bounded copies of the entries and
of the callers' records; a caller this process knows nothing of is forwarded.

Placement: auth → ... → cache → breaker → proxy. Upstream answers are obtained by calling
the next handler with a capturing `send`, so a breaker's fast 503 and the proxy's 502/504
JSON look like any other 5xx ("the app failed") to stale_if_error.

Authorization is never bypassed: the cached body goes only to callers known to be
allowed for that key, i.e. (default rule) whose own request got a 200 from the app within
`authz_ttl`, or (with `authorize:`) whose verified claim matches, or everybody when
`public: true`. A caller the app answered 401/403 is remembered as denied for `deny_ttl`
and gets that denial replayed, never the cached body.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import math
import secrets
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote_plus

from cachetools import LRUCache

from gateway.http import (
    CapturedResponse,
    Handler,
    Headers,
    Identity,
    Receive,
    RequestContext,
    Send,
    error_body,
    send_error,
)
from gateway.observability.collectors import fast
from gateway.policies.cache.vary import decode_marker, encode_marker, variant_digest, vary_names
from gateway.store.base import Script, ScriptArg, Store, StoreError
from gateway.tap import Tap

if TYPE_CHECKING:
    from gateway.config import Route
    from gateway.policies.cache.config import CacheConfig
    from gateway.runtime import Runtime
    from gateway.store.base import KeySpace

# --------------------------------------------------------------------------- scripts


def _mget_py(data: KeySpace, keys: list[str], args: list[ScriptArg], now_ms: int) -> Any:
    return [data.get(k) for k in keys]


def _fill_py(data: KeySpace, keys: list[str], args: list[ScriptArg], now_ms: int) -> Any:
    entry, entry_ms, user, user_ms, token = args[:5]
    if entry != b"":
        data.set(keys[0], entry, int(entry_ms) / 1000)
    if user != b"":
        data.set(keys[1], user, int(user_ms) / 1000)
    if token != b"" and data.get(keys[2]) == token:
        data.delete(keys[2])
    if len(keys) > 3 and len(args) > 5 and args[5] != b"":
        data.set(keys[3], args[5], int(entry_ms) / 1000)
    return 1


def _lock_py(data: KeySpace, keys: list[str], args: list[ScriptArg], now_ms: int) -> Any:
    token, px = args
    taken = 0
    if not data.exists(keys[0]):
        data.set(keys[0], token, int(px) / 1000)
        taken = 1
    return [taken, data.get(keys[1])]


_LUA = Path(__file__).parent / "lua"
MGET = Script.from_file("cache_mget", _mget_py, directory=_LUA)
LOCK = Script.from_file("cache_lock", _lock_py, directory=_LUA)
FILL = Script.from_file("cache_fill", _fill_py, directory=_LUA)

# --------------------------------------------------------------------------- entries

# Never kept in an entry: per-response or per-caller headers, and what we recompute.
# Location-type headers are rewritten to the filler's own Host (gateway/redirects.py):
# stored, one caller's Host would be served to everyone.
_UNSTORED = frozenset(
    {
        b"set-cookie",
        b"age",
        b"cache-status",
        b"content-length",
        b"transfer-encoding",
        b"location",
        b"content-location",
        b"refresh",
    }
)
_MAGIC = b"EC1"
_HEAD = struct.Struct(">3sHqH")  # magic, status, stored_at (ms), header count
_HDR = struct.Struct(">HI")  # name length, value length
# A replayed denial keeps at most this much of the app's body.
_DENIAL_BODY_MAX = 4096
_POLL_INTERVAL = 0.02
# Request headers not sent on a fill (see `_forward`).
_FILL_DROP = frozenset(
    {b"accept-encoding", b"if-none-match", b"if-modified-since", b"range", b"if-range"}
)
_FILL_DROP_PUBLIC = _FILL_DROP | {b"authorization", b"cookie", b"apikey"}
# Per route: bytes of entries kept in process memory.
_LOCAL_MAX_BYTES = 32 * 1024 * 1024
# Per route: bytes of caller records kept in process memory (about 60k allowed callers).
_LOCAL_USERS_MAX_BYTES = 8 * 1024 * 1024


@dataclass(slots=True)
class Entry:
    """One stored response: status, filtered headers, body, and when it was stored
    (seconds on the runtime clock)."""

    status: int
    headers: Headers
    body: bytes
    stored_at: float

    def encode(self) -> bytes:
        # A flat binary framing: no JSON/base64 round trip of the body on every hit.
        parts = [_HEAD.pack(_MAGIC, self.status, int(self.stored_at * 1000), len(self.headers))]
        for k, v in self.headers:
            parts.append(_HDR.pack(len(k), len(v)))
            parts.append(k)
            parts.append(v)
        parts.append(self.body)
        return b"".join(parts)

    @classmethod
    def decode(cls, raw: bytes) -> Entry | None:
        try:
            magic, status, stored_ms, count = _HEAD.unpack_from(raw, 0)
            if magic != _MAGIC:
                return None
            pos = _HEAD.size
            headers: Headers = []
            for _ in range(count):
                kl, vl = _HDR.unpack_from(raw, pos)
                pos += _HDR.size
                k = raw[pos : pos + kl]
                pos += kl
                v = raw[pos : pos + vl]
                pos += vl
                headers.append((k, v))
            return cls(status, headers, raw[pos:], stored_ms / 1000)
        except struct.error:
            return None


def _entry_size(entry: Entry) -> int:
    return len(entry.body) + sum(len(k) + len(v) for k, v in entry.headers) + 64


def _stored_headers(headers: Headers) -> Headers:
    return [(k, v) for k, v in headers if k not in _UNSTORED]


def _cache_control(headers: Headers) -> set[str]:
    out: set[str] = set()
    for k, v in headers:
        if k == b"cache-control":
            for part in v.decode("latin-1").split(","):
                name = part.split("=", 1)[0].strip().lower()
                if name:
                    out.add(name)
    return out


def storable(resp: CapturedResponse, ignore_vary: frozenset[bytes] = frozenset()) -> str | None:
    """Why a 200 must not be stored (None when it may be)."""
    if resp.status != 200 or not resp.complete or resp.too_large:
        return "status"
    cc = _cache_control(resp.headers)
    if "no-store" in cc:
        return "no-store"
    if "private" in cc:
        return "private"
    if resp.header(b"set-cookie") is not None:
        return "set-cookie"
    # `Vary` on request headers is honoured with a secondary key (cache_vary.py); an
    # answer that varies on `*` or on credentials is personal and never replayed.
    if vary_names(resp.headers, ignore_vary) is None:
        return "vary"
    if (resp.header(b"content-encoding") or b"identity").strip().lower() != b"identity":
        # Served to callers whatever their Accept-Encoding: only unencoded bodies.
        return "encoded"
    return None


# Caller records: b"A" + until_ms (allowed), b"D" + until_ms + denial entry (denied).
_UNTIL = struct.Struct(">q")


def _allow_record(until: float) -> bytes:
    return b"A" + _UNTIL.pack(int(until * 1000))


def _deny_record(until: float, denial: Entry) -> bytes:
    return b"D" + _UNTIL.pack(int(until * 1000)) + denial.encode()


def _read_record(raw: bytes, now: float) -> tuple[str, Entry | None] | None:
    """("allow", None) / ("deny", denial) while the record is valid by the runtime clock
    (the clock check matters: Redis expires keys by its own time)."""
    if len(raw) < 1 + _UNTIL.size:
        return None
    (until_ms,) = _UNTIL.unpack_from(raw, 1)
    if until_ms / 1000 <= now:
        return None
    if raw[:1] == b"A":
        return "allow", None
    if raw[:1] == b"D":
        return "deny", Entry.decode(raw[1 + _UNTIL.size :])
    return None


def claim_value(claims: dict[str, Any], path: Sequence[str]) -> Any:
    """A dotted claim path (`app_metadata.role`) in verified claims; None if absent."""
    cur: Any = claims
    for part in path:
        if not isinstance(cur, dict):
            return None
        cur = cur.get(part)
    return cur


def _claim_strings(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [str(value)]


# --------------------------------------------------------------------------- policy


@dataclass(slots=True, frozen=True)
class Keys:
    """The store keys of one request. `base` is the primary key (route, params, keyed
    query and claims); `entry` and `lock` add the variant of the request headers named
    by `names` (the route's `Vary`); `marker` is the no-variant slot, where the names
    are recorded; `user` (the caller's allow/deny record) and `check` (the lock of the
    caller's in-flight authorization check) are per primary key: authorization is about
    the resource, not its representation."""

    base: str
    names: tuple[bytes, ...]
    entry: str
    lock: str
    user: str
    check: str

    @property
    def marker(self) -> str:
        return self.base + ":e"


@dataclass(slots=True)
class Outcome:
    """What an in-process leader hands the requests that waited on it."""

    entry: Entry | None = None  # freshly stored: serve as a hit
    stale: Entry | None = None  # stale_if_error copy the leader served
    error: CapturedResponse | None = None  # 5xx with no stale copy: shared, not retried
    fwd_status: int = 0
    cs: bytes = b""  # Cache-Status for `error`, when not a forwarded one
    # Where `entry` was stored: a waiter whose request headers select another variant
    # (under `names`, the answer's Vary) must not be served it.
    key: str = ""
    names: tuple[bytes, ...] = ()
    denial: Entry | None = None  # an authorization check the app refused (same caller)


_STORE_DOWN = CapturedResponse(
    status=503,
    headers=[(b"content-type", b"application/json"), (b"retry-after", b"1")],
    body=bytearray(error_body("store_unavailable", "the cache store is unavailable")),
    complete=True,
)
_STORE_DOWN_CS = b"edge; fwd=bypass; detail=store-unavailable"


_NOTHING = Outcome()


@dataclass(slots=True)
class _Settled:
    """What `_forward` decided from an upstream answer: the result label, what to write
    to the store, and what to send once it is written (`serve`, a stale copy, or else
    the upstream answer itself)."""

    result: str
    cs: bytes = b""
    outcome: Outcome = dataclasses.field(default_factory=Outcome)
    entry_value: bytes = b""
    entry_key: str = ""
    marker: bytes = b""
    user_value: bytes = b""
    serve: Entry | None = None
    age: int | None = None


# How the caller may be served (decided from the route config and verified identity).
_OPEN = 0  # public route, or the `authorize` claim matches
_RECORD = 1  # default rule: needs an allow record for (user, key)
_CLAIM_NO = 2  # `authorize` claim does not match: never the cached body

_RESULTS = ("hit", "miss", "stale", "bypass", "denied", "error")


class CachePolicy:
    def __init__(self, next_handler: Handler, route_cfg: Route, rt: Runtime) -> None:
        cfg = route_cfg.cache
        assert cfg is not None
        self.next = next_handler
        self.cfg: CacheConfig = cfg
        self.rt = rt
        self.store: Store = rt.store
        self.route = route_cfg.name
        self.ttl = cfg.ttl
        self.swr = cfg.stale_while_revalidate
        self.sie = cfg.stale_if_error
        # An entry is useless once past every stale window.
        self.keep_for = cfg.ttl + max(cfg.stale_while_revalidate, cfg.stale_if_error)
        self.entry_px = int((self.keep_for + 1.0) * 1000)
        self.on_failure = cfg.on_failure or rt.config.store.on_failure
        self.public = cfg.public
        self.vary_query = list(cfg.vary_query)
        self._vary_query_set = frozenset(cfg.vary_query)
        self.vary_claims = [(c, c.split(".")) for c in cfg.vary_claims]
        self.authz_claim = cfg.authorize.claim.split(".") if cfg.authorize else None
        self.authz_in = frozenset(cfg.authorize.in_) if cfg.authorize else frozenset()
        # Vary names that never split the key: what fills do not send (so the stored
        # answer is the one for their absence, valid for everyone) and the route's list.
        drop = _FILL_DROP_PUBLIC if cfg.public else _FILL_DROP
        self._fill_drop = drop
        self._ignore_vary = drop | {n.lower().encode("latin-1") for n in cfg.ignore_vary}
        # Learnt from answers (or a store marker): the Vary names of this route's answers,
        # so a request's variant key is computed before the lookup, in one round trip.
        self._vary_names: tuple[bytes, ...] = ()
        m = rt.metrics
        # Lock-free children: one is incremented per request.
        self._results = {r: fast(m.cache.results.labels(self.route, r)) for r in _RESULTS}
        self._refresh = m.cache.fill_latency.labels(self.route)
        self._fallback = m.store_fallbacks.labels("cache", self.on_failure)
        # Shared across requests of this process (not per-request state): the refresh in
        # flight per entry key, so N concurrent requests here cost one upstream call, and
        # the last entry seen per key (a byte-bounded LRU) so callers allowed by config
        # alone get hits without a store round trip.
        self._inflight: dict[str, asyncio.Future[Outcome]] = {}
        # The authorization check in flight per (caller, key): that caller's concurrent
        # requests wait for it instead of each asking the app.
        self._checks: dict[str, asyncio.Future[Outcome]] = {}
        self._local: LRUCache[str, Entry] = LRUCache(
            maxsize=_LOCAL_MAX_BYTES, getsizeof=_entry_size
        )
        # The callers' allow/deny records seen or written here (byte-bounded), so that
        # `on_failure: local` still serves a known caller, and never an unknown one.
        self._users: LRUCache[str, bytes] = LRUCache(
            maxsize=_LOCAL_USERS_MAX_BYTES, getsizeof=lambda raw: len(raw) + 120
        )

    # ------------------------------------------------------------------ keys and rules

    def _rule(self, ident: Identity | None) -> int:
        if self.public:
            # Public data: an identified caller gets no less than an anonymous one.
            return _OPEN
        if self.authz_claim is not None and ident is not None:
            values = _claim_strings(claim_value(ident.claims, self.authz_claim))
            return _OPEN if any(v in self.authz_in for v in values) else _CLAIM_NO
        return _RECORD

    def _keyed_query(self, qs: bytes) -> bytes:
        """The query string a fill sends upstream: only the `vary_query` parameters, the
        ones the key holds (raw bytes kept). Anything else — a cache-buster, or a
        `?range=all` — would otherwise shape an answer stored under the plain key."""
        if not qs:
            return qs
        kept = [
            part
            for part in qs.split(b"&")
            if unquote_plus(part.split(b"=", 1)[0].decode("latin-1")) in self._vary_query_set
        ]
        return b"&".join(kept)

    def keys(self, ctx: RequestContext, ident: Identity | None) -> Keys:
        parts: list[Any] = [self.route, sorted(ctx.params.items())]
        if self.vary_query:
            qs = ctx.scope.get("query_string", b"").decode("latin-1")
            pairs = parse_qsl(qs, keep_blank_values=True)
            parts.append([[n, [v for k, v in pairs if k == n]] for n in self.vary_query])
        if self.vary_claims:
            claims = ident.claims if ident is not None else {}
            parts.append([[n, claim_value(claims, p)] for n, p in self.vary_claims])
        canonical = json.dumps(parts, separators=(",", ":"), default=str, sort_keys=True)
        digest = hashlib.sha256(canonical.encode()).hexdigest()[:32]
        # One hash tag for every key of an entry, so the scripts work on Redis Cluster.
        base = "cache:" + Store.tag(f"{self.route}:{digest}")
        if ident is not None:
            # The store never holds the user id itself.
            sub = hashlib.sha256(b"edge-cache-sub:" + ident.sub.encode()).hexdigest()[:24]
        else:
            sub = "-"
        user = f"{base}:u:{sub}"
        return self.variant(Keys(base, (), "", "", user, user + ":l"), ctx, self._vary_names)

    @staticmethod
    def variant(keys: Keys, ctx: RequestContext, names: tuple[bytes, ...]) -> Keys:
        """`keys` for the variant of this request's headers under `names`."""
        if not names:
            return Keys(keys.base, (), keys.base + ":e", keys.base + ":l", keys.user, keys.check)
        vd = variant_digest(names, ctx.scope["headers"])
        return Keys(
            keys.base, names, f"{keys.base}:e:{vd}", f"{keys.base}:l:{vd}", keys.user, keys.check
        )

    # ------------------------------------------------------------------ request

    async def __call__(self, ctx: RequestContext, receive: Receive, send: Send) -> None:
        method = ctx.scope["method"]
        if method not in ("GET", "HEAD"):
            await self._pass(ctx, receive, send, b"edge; fwd=method", "bypass")
            return
        ident = ctx.identity
        if ident is None and not self.public:
            await self._pass(ctx, receive, send, b"edge; fwd=bypass; detail=anonymous", "bypass")
            return
        head = method == "HEAD"
        rule = self._rule(ident)
        keys = self.keys(ctx, ident)
        if rule == _OPEN:
            await self._open(ctx, receive, send, keys, head)
        else:
            await self._checked(ctx, receive, send, keys, rule, head)

    async def _open(
        self, ctx: RequestContext, receive: Receive, send: Send, keys: Keys, head: bool
    ) -> None:
        """Callers allowed by config alone (public, or the `authorize` claim matches): a
        fresh copy in this process is served without a store round trip, and concurrent
        requests here share one lookup and one refresh."""
        now = self.rt.clock()
        local = self._local.get(keys.entry)
        if local is not None and now - local.stored_at < self.ttl:
            await self._serve(ctx, send, local, now, head, "hit")
            return
        flight = keys.entry
        fut = self._inflight.get(flight)
        if fut is not None:
            await self._join(ctx, receive, send, keys, fut, local, _OPEN, head)
            return
        # Registered before the first await, so the requests that arrive meanwhile wait.
        fut = asyncio.get_running_loop().create_future()
        self._inflight[flight] = fut
        try:
            try:
                keys, raw_entry, _ = await self._lookup(ctx, keys, user=False)
            except StoreError:
                self._fallback.inc()
                if self.on_failure == "closed":
                    self._results["error"].inc()
                    ctx.notes.append("cache=error")
                    outcome = Outcome(error=_STORE_DOWN, cs=_STORE_DOWN_CS)
                    fut.set_result(outcome)
                    await self._send_resp(send, _STORE_DOWN, ctx.response_headers, outcome.cs, head)
                    return
                # open: still one upstream call per process, just no shared entry
                # (counted as `error` by _forward); the process's own copy still serves
                # stale_while_revalidate / stale_if_error.
                if local is not None and now - local.stored_at >= self.keep_for:
                    local = None
                await self._lead(ctx, receive, send, keys, local, _OPEN, head, fut, store_ok=False)
                return
            entry = self._usable(keys.entry, raw_entry, now)
            await self._lead(ctx, receive, send, keys, entry, _OPEN, head, fut, store_ok=True)
        finally:
            _done(self._inflight, flight, fut)

    async def _checked(
        self,
        ctx: RequestContext,
        receive: Receive,
        send: Send,
        keys: Keys,
        rule: int,
        head: bool,
        *,
        again: bool = False,
    ) -> None:
        """Callers who must be known to the store: the entry and the caller's record are
        read in one round trip. `again`: this caller's check just settled elsewhere, so
        an unknown caller now asks the app directly instead of waiting once more."""
        try:
            keys, raw_entry, raw_user = await self._lookup(ctx, keys, user=True)
            store_ok = True
        except StoreError:
            if self.on_failure != "local":
                await self._store_failed(ctx, receive, send)
                return
            store_ok, (raw_entry, raw_user) = False, self._local_lookup(keys)
        now = self.rt.clock()
        entry = self._usable(keys.entry, raw_entry, now)
        record = _read_record(raw_user, now) if raw_user else None
        if record is not None and record[0] == "deny":
            await self._replay_denial(ctx, send, record[1], head)
            return
        if rule != _RECORD or record is None:
            if rule == _RECORD and not again:
                await self._first_check(ctx, receive, send, keys, entry, head, store_ok)
                return
            # Not known to be allowed: this caller's own request must reach the app.
            await self._forward(
                ctx,
                receive,
                send,
                keys,
                fwd=_fwd(entry, now, self.ttl),
                old=None,
                token=b"",
                rule=rule,
                head=head,
                store_ok=store_ok,
            )
            return
        if entry is not None and now - entry.stored_at < self.ttl:
            await self._serve(ctx, send, entry, now, head, "hit")
            return
        fut = self._inflight.get(keys.entry)
        if fut is not None:
            await self._join(ctx, receive, send, keys, fut, entry, rule, head)
            return
        fut = asyncio.get_running_loop().create_future()
        self._inflight[keys.entry] = fut
        try:
            await self._lead(ctx, receive, send, keys, entry, rule, head, fut, store_ok=store_ok)
        finally:
            _done(self._inflight, keys.entry, fut)

    def _local_lookup(self, keys: Keys) -> tuple[bytes | None, bytes | None]:
        """`on_failure: local`: this process's copies of the entry and of the caller's
        record (kept by `_lookup` and `_forward`), in the store's form."""
        self._fallback.inc()
        entry = self._local.get(keys.entry)
        return (None if entry is None else entry.encode()), self._users.get(keys.user)

    async def _lookup(
        self, ctx: RequestContext, keys: Keys, *, user: bool
    ) -> tuple[Keys, bytes | None, bytes | None]:
        """Read the entry (and the caller's record) in one round trip. When the slot
        holds a vary marker naming headers this process had not learnt, learn them and
        read this request's variant: one more round trip, once per process and route."""
        names_keys = [keys.entry, keys.user] if user else [keys.entry]
        raw = list(await self.store.run(MGET, names_keys, []))
        names = decode_marker(raw[0])
        if names is not None and names != keys.names:
            self._vary_names = names
            keys = self.variant(keys, ctx, names)
            (raw[0],) = await self.store.run(MGET, [keys.entry], [])
        if user and raw[1]:
            self._users[keys.user] = raw[1]  # for `on_failure: local` while the store is down
        return keys, raw[0], (raw[1] if user else None)

    # ------------------------------------------------------------------ first checks

    async def _first_check(
        self,
        ctx: RequestContext,
        receive: Receive,
        send: Send,
        keys: Keys,
        entry: Entry | None,
        head: bool,
        store_ok: bool,
    ) -> None:
        """This caller is not yet known to be allowed for this key, so its own request
        must reach the app. Its concurrent requests for the same key (several widgets,
        several tabs) wait for that one check, in this process and, through a lock in
        the store, across replicas, instead of each asking the app. With the store down
        (`on_failure: local`) the flight holds in this process."""
        fut = self._checks.get(keys.check)
        if fut is not None:
            await self._after_check(ctx, receive, send, keys, fut, head)
            return
        fut = asyncio.get_running_loop().create_future()
        self._checks[keys.check] = fut
        try:
            token, settled = await self._check_lock(keys) if store_ok else (b"", False)
            if settled:
                # Another replica's check of this caller landed: read its record.
                await self._checked(ctx, receive, send, keys, _RECORD, head, again=True)
                return
            now = self.rt.clock()
            outcome = await self._forward(
                ctx,
                receive,
                send,
                keys,
                fwd=_fwd(entry, now, self.ttl),
                old=None,
                token=token,
                rule=_RECORD,
                head=head,
                store_ok=store_ok,
                lock_key=keys.check,
            )
            fut.set_result(outcome)
        finally:
            _done(self._checks, keys.check, fut)

    async def _after_check(
        self,
        ctx: RequestContext,
        receive: Receive,
        send: Send,
        keys: Keys,
        fut: asyncio.Future[Outcome],
        head: bool,
    ) -> None:
        """Answer a request that waited for its caller's check: the app's denial is
        replayed, its allowed answer served (same variant), its failure shared;
        otherwise the caller's record is read again."""
        try:
            outcome = await asyncio.wait_for(asyncio.shield(fut), self.cfg.lock_timeout)
        except TimeoutError:
            outcome = _NOTHING
        if outcome.denial is not None:
            await self._replay_denial(ctx, send, outcome.denial, head)
            return
        if not await self._serve_outcome(ctx, send, keys, outcome, head):
            await self._checked(ctx, receive, send, keys, _RECORD, head, again=True)

    async def _check_lock(self, keys: Keys) -> tuple[bytes, bool]:
        """Take the store lock of this caller's check. (token, False): we ask the app
        (token b"" when the store cannot coordinate, or after lock_timeout of waiting);
        (b"", True): another replica's check of this caller settled meanwhile."""
        token = secrets.token_hex(8).encode()
        px = max(1, int(self.cfg.lock_timeout * 1000))
        deadline: float | None = None
        while True:
            try:
                taken, raw = await self.store.run(LOCK, [keys.check, keys.user], [token, px])
            except StoreError:
                return b"", False
            if raw and _read_record(raw, self.rt.clock()) is not None:
                if taken:
                    with contextlib.suppress(StoreError):
                        await self.store.delete_if_equals(keys.check, token)
                return b"", True
            if taken:
                return token, False
            now = self.rt.monotonic()
            if deadline is None:
                deadline = now + self.cfg.lock_timeout
            elif now >= deadline:
                return b"", False
            await asyncio.sleep(_POLL_INTERVAL)

    def _usable(self, key: str, raw: bytes | None, now: float) -> Entry | None:
        """Decode a stored entry unless it is past every stale window; keep a copy in
        this process for the callers `_open` serves without a store round trip."""
        if not raw:
            return None
        entry = Entry.decode(raw)
        if entry is None or now - entry.stored_at >= self.keep_for:
            return None
        self._local[key] = entry
        return entry

    # ------------------------------------------------------------------ single flight

    async def _join(
        self,
        ctx: RequestContext,
        receive: Receive,
        send: Send,
        keys: Keys,
        fut: asyncio.Future[Outcome],
        stale: Entry | None,
        rule: int,
        head: bool,
    ) -> None:
        """A refresh of this entry is in flight in this process: serve the stale copy
        within stale_while_revalidate, else wait for the refresh (bounded by
        lock_timeout); if it produced nothing to share, forward this request itself."""
        now = self.rt.clock()
        if stale is not None and now - stale.stored_at < self.ttl + self.swr:
            await self._serve(ctx, send, stale, now, head, "stale")
            return
        try:
            outcome = await asyncio.wait_for(asyncio.shield(fut), self.cfg.lock_timeout)
        except TimeoutError:
            outcome = _NOTHING
        if await self._serve_outcome(ctx, send, keys, outcome, head):
            return
        await self._forward(
            ctx,
            receive,
            send,
            keys,
            fwd="stale" if stale else "miss",
            old=stale,
            token=b"",
            rule=rule,
            head=head,
        )

    async def _lead(
        self,
        ctx: RequestContext,
        receive: Receive,
        send: Send,
        keys: Keys,
        entry: Entry | None,
        rule: int,
        head: bool,
        fut: asyncio.Future[Outcome],
        *,
        store_ok: bool,
    ) -> None:
        """This request leads the entry's refresh in this process; `fut` gets what the
        requests waiting on it should be answered with. Across replicas the store lock
        decides who calls the app: within stale_while_revalidate the lock holder
        refreshes and the others serve stale; otherwise the others poll the store for
        the holder's entry."""
        now = self.rt.clock()
        if entry is not None and now - entry.stored_at < self.ttl:
            fut.set_result(Outcome(entry=entry))
            await self._serve(ctx, send, entry, now, head, "hit")
            return
        stale_ok = entry is not None and now - entry.stored_at < self.ttl + self.swr
        token, newer = await self._lock(keys, entry) if store_ok else (b"", None)
        if newer is None and token is None:
            if stale_ok and entry is not None:
                # Another replica refreshes; within stale_while_revalidate serve stale.
                fut.set_result(Outcome(stale=entry))
                await self._serve(ctx, send, entry, self.rt.clock(), head, "stale")
                return
            # Otherwise wait for its entry.
            newer, token = await self._wait_remote(keys, entry)
        if newer is not None:
            outcome = Outcome(entry=newer)
            fut.set_result(outcome)
            await self._serve_outcome(ctx, send, keys, outcome, head)
            return
        fut.set_result(
            await self._forward(
                ctx,
                receive,
                send,
                keys,
                fwd="stale" if entry else "miss",
                old=entry,
                token=token or b"",
                rule=rule,
                head=head,
                store_ok=store_ok,
            )
        )

    async def _lock(self, keys: Keys, seen: Entry | None) -> tuple[bytes | None, Entry | None]:
        """Take the refresh lock and read the entry in one round trip. Returns (token,
        None) when we hold the lock, (None, None) when another replica does, and
        (None, entry) when a fresh entry newer than `seen` landed meanwhile (then no
        refresh is needed). A store failure does not block the refresh, it is just not
        coordinated across replicas: (b"", None)."""
        token = secrets.token_hex(8).encode()
        try:
            taken, raw = await self.store.run(
                LOCK, [keys.lock, keys.entry], [token, max(1, int(self.cfg.lock_timeout * 1000))]
            )
        except StoreError:
            return b"", None
        now = self.rt.clock()
        current = self._usable(keys.entry, raw, now)
        if (
            current is not None
            and (seen is None or current.stored_at > seen.stored_at)
            and now - current.stored_at < self.ttl
        ):
            if taken:
                with contextlib.suppress(StoreError):
                    await self.store.delete_if_equals(keys.lock, token)
            return None, current
        return (token if taken else None), None

    async def _wait_remote(self, keys: Keys, old: Entry | None) -> tuple[Entry | None, bytes]:
        """Poll the store until another replica's refresh lands (→ entry), or its lock is
        gone without one (→ we take the lock, token), or lock_timeout passes (→ b"")."""
        seen = old.stored_at if old is not None else None
        deadline = self.rt.monotonic() + self.cfg.lock_timeout
        while self.rt.monotonic() < deadline:
            await asyncio.sleep(_POLL_INTERVAL)
            try:
                raw_entry, raw_lock = await self.store.run(MGET, [keys.entry, keys.lock], [])
            except StoreError:
                return None, b""
            entry = self._usable(keys.entry, raw_entry, self.rt.clock())
            if entry is not None and (seen is None or entry.stored_at > seen):
                return entry, b""
            if raw_lock is None:
                token, newer = await self._lock(keys, old)
                if newer is not None:
                    return newer, b""
                if token is not None:
                    return None, token
        return None, b""

    async def _forward(
        self,
        ctx: RequestContext,
        receive: Receive,
        send: Send,
        keys: Keys,
        *,
        fwd: str,
        old: Entry | None,
        token: bytes,
        rule: int,
        head: bool,
        store_ok: bool = True,
        lock_key: str = "",
    ) -> Outcome:
        """Send this caller's request upstream, answer it, and update the store from the
        answer: a storable 200 becomes the entry (+ the caller's allow record), a 401/403
        the caller's deny record, a 5xx is replaced by `old` when stale_if_error allows.
        `token` is the lock to release (b"" = none; `lock_key`, default the entry's);
        `old` is only given for callers already known to be allowed; a caller
        `authorize` refuses never fills the entry."""
        fwd_b = fwd.encode()
        tee = await self._call(ctx, receive, send, fwd_b, timed=bool(token) or not store_ok)
        if tee.streaming:
            s = _Settled("miss")
        else:
            s = self._settle(ctx, keys, tee.resp, fwd_b, old, rule, store_ok)
        if s.user_value:
            # This process's copy, for `on_failure: local` while the store is down.
            self._users[keys.user] = s.user_value
        result = "error" if not store_ok else s.result
        self._results[result].inc()
        ctx.notes.append("cache=" + result)
        if store_ok and (s.entry_value or s.user_value or token):
            # Written before the answer goes out, so the caller's (or anyone's) next
            # request finds the entry and the lock released. A failed write is counted
            # by the store (edge_store_errors_total) and does not hold the answer back.
            with contextlib.suppress(StoreError):
                await self.store.run(
                    FILL,
                    [s.entry_key or keys.entry, keys.user, lock_key or keys.lock, keys.marker],
                    [
                        s.entry_value,
                        self.entry_px,
                        s.user_value,
                        self._user_px(s.user_value),
                        token,
                        s.marker,
                    ],
                )
        if tee.streaming:
            return _NOTHING
        outer = ctx.response_headers
        if s.serve is not None:
            await self._send_entry(send, s.serve, outer, s.cs, head, s.age or 0)
        else:
            await self._send_resp(send, tee.resp, outer, s.cs, head, age=s.age)
        return s.outcome

    async def _call(
        self, ctx: RequestContext, receive: Receive, send: Send, fwd_b: bytes, *, timed: bool
    ) -> Tap:
        """Call the next handler with the fill's request; the answer is held in the
        returned tee (or streamed through, past max_body_bytes)."""

        async def overflow(tap: Tap, held: bytes, more: bool) -> None:
            # Too big to store: what is held goes out now and the rest streams through.
            status = tap.resp.status
            cs = b"edge; fwd=%b; fwd-status=%d; detail=too-large" % (fwd_b, status)
            start = [*tap.resp.headers, *ctx.response_headers, (b"cache-status", cs)]
            await send({"type": "http.response.start", "status": status, "headers": start})
            await send({"type": "http.response.body", "body": held, "more_body": more})

        tee = Tap(send, self.cfg.max_body_bytes, hold=True, on_overflow=overflow)
        # What goes upstream asks for the whole, unencoded representation (GET for a
        # HEAD, no conditionals, ranges or compression) so the answer can be stored and
        # served to anyone allowed, whatever their own request headers were.
        # A public entry is served to anyone, so it is filled without the filler's
        # credentials or identity: the app cannot personalise what everyone will get.
        drop = self._fill_drop
        scope = {
            **ctx.scope,
            "method": "GET",
            "headers": [(k, v) for k, v in ctx.scope["headers"] if k not in drop],
            "query_string": self._keyed_query(ctx.scope.get("query_string", b"")),
        }
        inner = dataclasses.replace(
            ctx,
            scope=scope,
            response_headers=[],
            upstream_headers=[] if self.public else ctx.upstream_headers,
        )
        t0 = time.perf_counter()
        try:
            await self.next(inner, receive, tee)
        finally:
            ctx.upstream_seconds = inner.upstream_seconds
            if inner.status:
                ctx.status = inner.status
            if timed:
                self._refresh.observe(time.perf_counter() - t0)
        return tee

    def _settle(
        self,
        ctx: RequestContext,
        keys: Keys,
        resp: CapturedResponse,
        fwd_b: bytes,
        old: Entry | None,
        rule: int,
        store_ok: bool,
    ) -> _Settled:
        """Decide from a whole upstream answer what to store and what to send."""
        status = resp.status
        now = self.rt.clock()
        remember = ctx.identity is not None and rule != _OPEN
        if status == 200 and rule != _CLAIM_NO and storable(resp, self._ignore_vary) is None:
            return self._settle_fill(ctx, keys, resp, fwd_b, now, rule, store_ok, remember)
        if status >= 500 and old is not None and now - old.stored_at < self.ttl + self.sie:
            age = max(0, math.floor(now - old.stored_at))
            cs = b"edge; fwd=stale; fwd-status=%d; ttl=%d; detail=stale-if-error" % (
                status,
                self._ttl_left(age),
            )
            return _Settled("stale", cs, Outcome(stale=old, fwd_status=status), serve=old, age=age)
        s = _Settled("miss", b"edge; fwd=%b; fwd-status=%d" % (fwd_b, status))
        if status in (401, 403) and remember:
            denial = _denial(resp)
            s.user_value = _deny_record(now + self.cfg.deny_ttl, denial)
            s.result = "denied"
            s.outcome = Outcome(denial=denial, fwd_status=status)
        elif status >= 500:
            s.outcome = Outcome(error=resp, fwd_status=status)
        return s

    def _settle_fill(
        self,
        ctx: RequestContext,
        keys: Keys,
        resp: CapturedResponse,
        fwd_b: bytes,
        now: float,
        rule: int,
        store_ok: bool,
        remember: bool,
    ) -> _Settled:
        """A storable 200: the entry goes under the variant its own `Vary` selects."""
        names = vary_names(resp.headers, self._ignore_vary) or ()
        if names != keys.names:
            keys = self.variant(keys, ctx, names)
        # Learnt for the next lookups of this process (another process learns it from
        # the marker written beside the entry).
        self._vary_names = names
        entry = Entry(200, _stored_headers(resp.headers), bytes(resp.body), now)
        self._local[keys.entry] = entry
        outcome = Outcome(entry=entry, fwd_status=200, key=keys.entry, names=names)
        if not store_ok:
            cs = b"edge; fwd=%b; fwd-status=200; detail=store-unavailable" % fwd_b
            s = _Settled("miss", cs, outcome, age=0)
        else:
            s = _Settled("miss", b"edge; fwd=%b; fwd-status=200; stored" % fwd_b, outcome, age=0)
            s.entry_value = entry.encode()
            s.entry_key = keys.entry
            s.marker = encode_marker(names) if names else b""
        if remember and rule == _RECORD:
            # Written to the store only when it answers (_forward); kept here either way.
            s.user_value = _allow_record(now + self.cfg.authz_ttl)
        return s

    def _user_px(self, record: bytes) -> int:
        if not record:
            return 0
        ttl = self.cfg.authz_ttl if record[:1] == b"A" else self.cfg.deny_ttl
        return max(1, int(ttl * 1000))

    async def _serve_outcome(
        self, ctx: RequestContext, send: Send, keys: Keys, outcome: Outcome, head: bool
    ) -> bool:
        """Answer a request that waited on another's refresh; False = nothing to serve
        (or an entry of another variant than this request's)."""
        if outcome.entry is not None:
            if outcome.key and self.variant(keys, ctx, outcome.names).entry != outcome.key:
                return False
            await self._serve(ctx, send, outcome.entry, self.rt.clock(), head, "hit")
            return True
        if outcome.stale is not None:
            await self._serve(ctx, send, outcome.stale, self.rt.clock(), head, "stale")
            return True
        if outcome.error is not None:
            # The app (or the store) is failing: the waiters get the same answer rather
            # than retrying it N times.
            cs = outcome.cs or b"edge; fwd=miss; fwd-status=%d; detail=coalesced" % (
                outcome.fwd_status
            )
            await self._send_resp(send, outcome.error, ctx.response_headers, cs, head)
            self._results["miss"].inc()
            ctx.notes.append("cache=miss")
            return True
        return False

    # ------------------------------------------------------------------ answers

    def _ttl_left(self, age: int) -> int:
        return math.floor(self.ttl) - age

    async def _serve(
        self,
        ctx: RequestContext,
        send: Send,
        entry: Entry,
        now: float,
        head: bool,
        result: str,
    ) -> None:
        age = max(0, math.floor(now - entry.stored_at))
        cs = b"edge; hit; ttl=%d" % self._ttl_left(age)
        await self._send_entry(send, entry, ctx.response_headers, cs, head, age)
        self._results[result].inc()
        ctx.notes.append("cache=" + result)

    async def _replay_denial(
        self, ctx: RequestContext, send: Send, denial: Entry | None, head: bool
    ) -> None:
        self._results["denied"].inc()
        ctx.notes.append("cache=denied")
        cs = (b"cache-status", b"edge; hit; detail=denied")
        if denial is None:
            await send_error(send, 403, "forbidden", "access denied", [*ctx.response_headers, cs])
            return
        headers = [*denial.headers, (b"content-length", b"%d" % len(denial.body))]
        headers.extend(ctx.response_headers)
        headers.append(cs)
        await send({"type": "http.response.start", "status": denial.status, "headers": headers})
        await send(
            {"type": "http.response.body", "body": b"" if head else denial.body, "more_body": False}
        )

    @staticmethod
    async def _send_entry(
        send: Send, entry: Entry, outer: Headers, cs: bytes, head: bool, age: int
    ) -> None:
        headers = [
            *entry.headers,
            (b"content-length", b"%d" % len(entry.body)),
            (b"age", b"%d" % age),
            *outer,
            (b"cache-status", cs),
        ]
        await send({"type": "http.response.start", "status": entry.status, "headers": headers})
        await send(
            {"type": "http.response.body", "body": b"" if head else entry.body, "more_body": False}
        )

    @staticmethod
    async def _send_resp(
        send: Send,
        resp: CapturedResponse,
        outer: Headers,
        cs: bytes,
        head: bool,
        age: int | None = None,
    ) -> None:
        headers = [
            (k, v)
            for k, v in resp.headers
            if k not in (b"content-length", b"transfer-encoding", b"cache-status", b"age")
        ]
        headers.append((b"content-length", b"%d" % len(resp.body)))
        if age is not None:
            headers.append((b"age", b"%d" % age))
        headers.extend(outer)
        headers.append((b"cache-status", cs))
        await send({"type": "http.response.start", "status": resp.status, "headers": headers})
        await send(
            {
                "type": "http.response.body",
                "body": b"" if head else bytes(resp.body),
                "more_body": False,
            }
        )

    async def _pass(
        self, ctx: RequestContext, receive: Receive, send: Send, cs: bytes, result: str
    ) -> None:
        """Forward untouched (streamed), only adding Cache-Status."""
        self._results[result].inc()
        ctx.notes.append("cache=" + result)
        ctx.response_headers.append((b"cache-status", cs))
        await self.next(ctx, receive, send)

    async def _store_failed(self, ctx: RequestContext, receive: Receive, send: Send) -> None:
        self._results["error"].inc()
        self._fallback.inc()
        ctx.notes.append("cache=error")
        if self.on_failure == "closed":
            await send_error(
                send,
                503,
                "store_unavailable",
                "the cache store is unavailable",
                [
                    *ctx.response_headers,
                    (b"cache-status", b"edge; fwd=bypass; detail=store-unavailable"),
                    (b"retry-after", b"1"),
                ],
            )
            return
        # open (and local for a caller this process knows nothing of): the app answers
        # every request itself, so authorization still holds.
        ctx.response_headers.append(
            (b"cache-status", b"edge; fwd=bypass; detail=store-unavailable")
        )
        await self.next(ctx, receive, send)


def _done(
    table: dict[str, asyncio.Future[Outcome]], key: str, fut: asyncio.Future[Outcome]
) -> None:
    """End a flight: forget it, and release its waiters if it ended without an outcome."""
    if table.get(key) is fut:
        del table[key]
    if not fut.done():
        fut.set_result(_NOTHING)


def _fwd(entry: Entry | None, now: float, ttl: float) -> str:
    """The `fwd` of a caller's own request: its entry is fresh, stale, or missing."""
    if entry is None:
        return "miss"
    return "request" if now - entry.stored_at < ttl else "stale"


def _denial(resp: CapturedResponse) -> Entry:
    body = bytes(resp.body)
    headers = _stored_headers(resp.headers)
    if len(body) > _DENIAL_BODY_MAX or not resp.complete:
        body = json.dumps({"error": "forbidden", "message": "access denied"}).encode()
        headers = [(b"content-type", b"application/json")]
    return Entry(resp.status, headers, body, 0.0)


__all__ = ["CachePolicy", "Entry", "claim_value", "storable"]
