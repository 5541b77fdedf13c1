"""Refresh-token coalescing for `POST /auth/v1/token?grant_type=refresh_token`.

Owns: making a refresh idempotent at the edge. GoTrue rotates the refresh token on every
use and, outside its reuse interval, answers a second use of the parent with
`400 refresh_token_already_used` and revokes the whole session, so racing tabs, middleware
and server components log viewers out. This policy:

- single flight in a process: concurrent requests with one token share one task
  (a dict of tasks keyed by SHA-256 of the token) and all get its answer;
- across replicas: a store lock per token; followers poll the store for the leader's
  answer (bounded by `wait_timeout`) and take the lock over if the leader stops renewing
  it (it died);
- replay cache: a 200 answer is kept for `grace`, never beyond the new access token's
  `expires_at`, and replayed to the same parent token; a later `already_used`/409 for a
  token whose answer is cached is answered from the cache;
- nothing in plaintext: store keys hold SHA-256 of the token, values are AES-GCM
  encrypted under a key HKDF-derived from the refresh token itself, so only a holder of
  the token can read its cached answer;
- errors are passed through unchanged and never cached (followers of the same flight
  share the leader's answer, whatever it is, for a few seconds only);
- an answer goes only to requests with the producer's `apikey` (digest sealed with the
  answer, compared in constant time); others are sent upstream on their own;
- the upstream body is re-encoded from what was parsed (`{"refresh_token": ...}` only),
  and bodies Go's case-insensitive JSON decoder could read differently are refused;
- store down: `on_failure: local` (the default) keeps single flight and the replay
  cache within the process (a byte-bounded copy of the sealed answers).

The upstream call goes through the next handler (the proxy), so header rewriting,
identity stripping and X-Forwarded-* stay the proxy's. `X-Edge-Refresh: leader |
follower | replay` tells how an answer was served.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cachetools import LRUCache
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from gateway.config import Route
from gateway.http import (
    CapturedResponse,
    Handler,
    Headers,
    Message,
    Receive,
    RequestContext,
    Scope,
    Send,
    replay_receive,
    send_captured,
    send_error,
)
from gateway.policies.refresh.config import RefreshConfig
from gateway.proxy import BodyTooLarge, TruncatedResponse, read_body
from gateway.runtime import Runtime
from gateway.services import ServiceKey, StatusFn
from gateway.store import Script, StoreError
from gateway.store.base import KeySpace
from gateway.tap import capture_send

log = logging.getLogger("gateway.refresh")

# A refresh body is `{"refresh_token": "..."}`; anything near this size is not one.
_MAX_BODY = 16 * 1024
_MAX_TOKEN = 4096
# Answers larger than this are passed through but not kept (a token answer is a few KiB).
_MAX_CACHED = 256 * 1024
_CAPTURE_LIMIT = 10 * 1024 * 1024
# Bytes of sealed replay answers kept in process memory (a token answer is ~2-4 KiB).
_LOCAL_MAX_BYTES = 8 * 1024 * 1024
# How long a finished flight's answer stays readable for followers already polling.
_DONE_TTL = 5.0
_BLOB_VERSION = b"r1"
_HKDF_SALT = b"eventlive-edge refresh cache"
_HKDF_INFO = b"aes-256-gcm key v1"
# Not replayed: per-response or recomputed on send.
_DROP_HEADERS = frozenset({b"date", b"content-length", b"transfer-encoding"})
_REUSE_CODES = frozenset({"refresh_token_already_used"})
_TOKEN_MEMBER = "refresh_token"  # noqa: S105 - a JSON member name, not a secret
_TOKEN_MEMBER_FOLDED = _TOKEN_MEMBER.casefold()
# Replaced when the body is re-encoded.
_BODY_HEADERS = frozenset({b"content-length", b"transfer-encoding", b"content-type"})
_GATEWAY_ERRORS = frozenset({"store_closed", "wait_timeout"})


# ------------------------------------------------------------------ scripts (memory twins)


def _s(v: Any) -> bytes:
    return v if isinstance(v, bytes) else str(v).encode()


def _replay_or_lead(
    data: KeySpace, res: str, lock: str, args: list[Any], busy: bytes
) -> list[bytes]:
    """What begin and poll share: the cached answer, else the lock (leader), else `busy`
    and the lock's owner."""
    owner, ttl_ms, use_res = _s(args[0]), int(args[1]), _s(args[2])
    if use_res == b"1":
        cached = data.get(res)
        if cached is not None:
            return [b"replay", _s(cached)]
    current = data.get(lock)
    if current is None:
        data.set(lock, owner, ttl_ms / 1000)
        return [b"leader", owner]
    return [busy, _s(current)]


def _py_begin(data: KeySpace, keys: list[str], args: list[Any], _now: int) -> list[bytes]:
    res, lock = keys
    return _replay_or_lead(data, res, lock, args, b"follower")


def _py_poll(data: KeySpace, keys: list[str], args: list[Any], _now: int) -> list[bytes]:
    res, lock, done = keys
    finished = data.get(done)
    if finished is not None:
        return [b"done", _s(finished)]
    return _replay_or_lead(data, res, lock, args, b"wait")


def _py_commit(data: KeySpace, keys: list[str], args: list[Any], _now: int) -> int:
    res, lock, done = keys
    owner, blob, res_ms, done_ms = _s(args[0]), _s(args[1]), int(args[2]), int(args[3])
    if res_ms > 0:
        data.set(res, blob, res_ms / 1000)
    data.set(done, blob, done_ms / 1000)
    if data.get(lock) == owner:
        data.delete(lock)
    return 1


def _py_renew(data: KeySpace, keys: list[str], args: list[Any], _now: int) -> int:
    (lock,) = keys
    if data.get(lock) == _s(args[0]):
        data.expire(lock, int(args[1]) / 1000)
        return 1
    return 0


_LUA = Path(__file__).parent / "lua"
BEGIN = Script.from_file("refresh_begin", _py_begin, directory=_LUA)
POLL = Script.from_file("refresh_poll", _py_poll, directory=_LUA)
COMMIT = Script.from_file("refresh_commit", _py_commit, directory=_LUA)
RENEW = Script.from_file("refresh_renew", _py_renew, directory=_LUA)


# ------------------------------------------------------------------ answers and sealing


@dataclass(frozen=True, slots=True)
class Answer:
    """A whole response, as sent to every request of one flight. `apikey` is the digest
    of the producing request's `apikey` header(s): the answer is served only to requests
    whose digest matches (GoTrue, behind Kong, would have refused the others)."""

    status: int
    headers: Headers
    body: bytes
    apikey: bytes = b""

    def captured(self) -> CapturedResponse:
        return CapturedResponse(self.status, list(self.headers), bytearray(self.body), True)


@dataclass(frozen=True, slots=True)
class _Keys:
    digest: str
    res: str
    lock: str

    def done(self, flight: str) -> str:
        return f"{self.lock}:done:{flight}"


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _keys(digest: str) -> _Keys:
    # One hash tag per token so every key of a script lands on one Cluster slot.
    tag = "refresh:{" + digest + "}"
    return _Keys(digest, f"{tag}:res", f"{tag}:lock")


def _cipher(token: str) -> AESGCM:
    """The cache key for one token's answer, derived from the token itself: a store dump
    without the token cannot be decrypted, and the key is never stored anywhere."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=_HKDF_SALT, info=_HKDF_INFO)
    return AESGCM(hkdf.derive(token.encode()))


def seal(aes: AESGCM, digest: str, answer: Answer, until: float) -> bytes:
    doc = {
        "s": answer.status,
        "h": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in answer.headers],
        "b": base64.b64encode(answer.body).decode(),
        "u": until,
        "k": answer.apikey.hex(),
    }
    nonce = os.urandom(12)
    plain = json.dumps(doc, separators=(",", ":")).encode()
    # The digest is authenticated data: a blob moved under another key fails to open.
    return _BLOB_VERSION + nonce + aes.encrypt(nonce, plain, digest.encode())


def unseal(aes: AESGCM, digest: str, blob: bytes) -> tuple[Answer, float] | None:
    if not blob.startswith(_BLOB_VERSION) or len(blob) < len(_BLOB_VERSION) + 12 + 16:
        return None
    start = len(_BLOB_VERSION)
    nonce, ct = blob[start : start + 12], blob[start + 12 :]
    try:
        doc = json.loads(aes.decrypt(nonce, ct, digest.encode()))
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in doc["h"]]
        # A blob from before the apikey binding has no "k": it then matches no request.
        apikey = bytes.fromhex(doc.get("k", ""))
        answer = Answer(int(doc["s"]), headers, base64.b64decode(doc["b"]), apikey)
        return answer, float(doc["u"])
    except (InvalidTag, ValueError, KeyError, TypeError):
        return None


def _error_answer(status: int, code: str, message: str) -> Answer:
    body = json.dumps({"error": code, "message": message}).encode()
    return Answer(status, [(b"content-type", b"application/json")], body)


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def _member_names(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Refuse what GoTrue could read differently: Go's JSON decoder matches member names
    case-insensitively (Unicode simple folding: `Refresh_Token`, or a long s, U+017F, for `s`) and
    keeps the last of duplicates, so such a body could be keyed on one token here and
    rotate another upstream."""
    matches = [k for k, _ in pairs if k.casefold() == _TOKEN_MEMBER_FOLDED]
    if matches and matches != [_TOKEN_MEMBER]:
        raise ValueError("refresh_token given twice or spelled with other case")
    return dict(pairs)


def parse_refresh_body(body: bytes) -> str | None:
    """The refresh token of a GoTrue refresh body, or None if the body is not one (or is
    one GoTrue might read differently, see `_member_names`)."""
    try:
        doc = json.loads(body, object_pairs_hook=_member_names)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict):
        return None
    token = doc.get(_TOKEN_MEMBER)
    if not isinstance(token, str) or not token or len(token) > _MAX_TOKEN:
        return None
    return token


def refresh_request(scope: Scope, token: str) -> tuple[Scope, bytes]:
    """The request sent upstream, re-encoded from what was parsed: exactly
    `{"refresh_token": token}` (GoTrue's refresh grant reads nothing else), with its own
    Content-Length, so what GoTrue rotates is what the flight was keyed on."""
    body = json.dumps({_TOKEN_MEMBER: token}, separators=(",", ":")).encode()
    headers = [(k, v) for k, v in scope["headers"] if k not in _BODY_HEADERS]
    headers.append((b"content-type", b"application/json"))
    headers.append((b"content-length", str(len(body)).encode()))
    return {**scope, "headers": headers}, body


def apikey_digest(scope: Scope) -> bytes:
    """SHA-256 over the request's `apikey` header lines (absent is its own value)."""
    values = [bytes(v) for k, v in scope["headers"] if k == b"apikey"]
    seen = b"\n".join(b"v:" + v for v in values) if values else b"absent"
    return hashlib.sha256(seen).digest()


def _upstream_code(answer: Answer) -> str | None:
    """GoTrue's error code: `code` (API version >= 2024-01-01) or `error_code` (older)."""
    doc = _json_object(answer.body)
    if doc is None:
        return None
    code = doc.get("code") if isinstance(doc.get("code"), str) else doc.get("error_code")
    return code if isinstance(code, str) else None


def _is_reuse_refusal(answer: Answer) -> bool:
    if answer.status == 409:
        return True
    return answer.status == 400 and _upstream_code(answer) in _REUSE_CODES


async def _no_disconnect() -> Message:
    # The shared upstream call must not end because the leader's client went away: the
    # other requests of the flight still want the answer.
    await asyncio.Event().wait()
    raise AssertionError("unreachable")  # pragma: no cover


# ------------------------------------------------------------------ the policy


# Flights in progress and the on_failure: local replay copies, shared by every route.
FLIGHTS: ServiceKey[dict[str, asyncio.Task[tuple[Answer, str]]]] = ServiceKey("refresh_flights")
LOCAL: ServiceKey[LRUCache[str, bytes]] = ServiceKey("refresh.local")


class RefreshPolicy:
    """Route policy `refresh: {grace, lock_ttl, wait_timeout, poll_interval, on_failure}`."""

    def __init__(self, next_handler: Handler, route_cfg: Route, rt: Runtime) -> None:
        assert route_cfg.refresh is not None
        self.next = next_handler
        self.cfg: RefreshConfig = route_cfg.refresh
        self.rt = rt
        self.store = rt.store
        up = rt.config.upstreams[route_cfg.upstream]
        read = route_cfg.read_timeout or up.read_timeout
        self.wait_timeout = self.cfg.wait_timeout or (up.connect_timeout + read)
        self.lock_ms = max(1, int(self.cfg.lock_ttl * 1000))
        self.on_failure = self.cfg.on_failure or rt.config.store.on_failure
        m = rt.metrics
        self.m_outcome = m.refresh.outcomes
        self.m_latency = m.refresh.upstream_latency
        self.m_waiting = m.refresh.waiting
        self.m_takeovers = m.refresh.takeovers
        self.m_fallbacks = m.store_fallbacks
        # Flights in progress in this process, shared by every refresh route: process-wide
        # by design (that is what single flight is), so it lives in rt.services.
        self.flights = rt.services.setdefault(FLIGHTS, {})
        # on_failure: local — this process's copy of the sealed replay answers (only a
        # holder of the token can open one), so a repeated refresh is replayed here
        # while the store is down. Byte-bounded, shared by every refresh route.
        self.local: LRUCache[str, bytes] | None = None
        if self.on_failure == "local":
            self.local = rt.services.setdefault(
                LOCAL,
                LRUCache(maxsize=_LOCAL_MAX_BYTES, getsizeof=lambda blob: len(blob) + 150),
            )
            rt.sizes["refresh_local"] = self.local.__len__
        flights = self.flights
        rt.services.add_status(StatusFn("refresh", lambda: {"ok": True, "in_flight": len(flights)}))

    async def __call__(self, ctx: RequestContext, receive: Receive, send: Send) -> None:
        try:
            body = await read_body(receive, _MAX_BODY)
        except BodyTooLarge:
            self.m_outcome.labels("invalid_request").inc()
            await send_error(
                send,
                413,
                "payload_too_large",
                f"a refresh body is at most {_MAX_BODY} bytes",
                ctx.response_headers,
            )
            return
        token = parse_refresh_body(body)
        if token is None:
            self.m_outcome.labels("invalid_request").inc()
            await send_error(
                send,
                400,
                "invalid_request",
                'expected a JSON body {"refresh_token": "<token>"}',
                ctx.response_headers,
            )
            return
        ctx.scope, body = refresh_request(ctx.scope, token)
        digest = token_digest(token)
        task = self.flights.get(digest)
        joined = task is not None
        if task is None:
            task = self.rt.spawn(self._flight(ctx, body, token, digest), "refresh-flight")
            self.flights[digest] = task
            task.add_done_callback(self._forget(digest))
        # Shielded: a waiter whose client leaves does not cancel the others' answer.
        answer, how = await asyncio.shield(task)
        own = how == "leader" and not joined
        if not (own or how in _GATEWAY_ERRORS) and not hmac.compare_digest(
            answer.apikey, apikey_digest(ctx.scope)
        ):
            # Someone else's answer for a request with other credentials: let GoTrue
            # decide this one itself (uncoalesced, not cached).
            await self._pass_through(ctx, body, receive, send)
            return
        extra = list(ctx.response_headers)
        if how in _GATEWAY_ERRORS:
            # The gateway's own answer (store closed, leader wait timed out): not a refresh.
            outcome = how
        else:
            if joined and how != "replay":
                how = "follower"
            outcome = "upstream_error" if how == "leader" and answer.status != 200 else how
            extra.append((b"x-edge-refresh", how.encode()))
        self.m_outcome.labels(outcome).inc()
        ctx.notes.append(f"refresh={outcome}")
        await send_captured(send, answer.captured(), extra)

    async def _pass_through(
        self, ctx: RequestContext, body: bytes, receive: Receive, send: Send
    ) -> None:
        self.m_outcome.labels("passthrough").inc()
        ctx.notes.append("refresh=passthrough")
        await self.next(ctx, replay_receive(body, receive), send)

    def _forget(self, digest: str) -> Any:
        def done(t: asyncio.Task[tuple[Answer, str]]) -> None:
            if self.flights.get(digest) is t:
                del self.flights[digest]

        return done

    # -------------------------------------------------------------- one flight

    async def _flight(
        self, ctx: RequestContext, body: bytes, token: str, digest: str
    ) -> tuple[Answer, str]:
        keys = _keys(digest)
        aes = _cipher(token)
        me = secrets.token_hex(12)
        use_res = True
        try:
            state, value = await self._script(BEGIN, [keys.res, keys.lock], me, use_res)
            if state == "replay":
                fresh = self._fresh(aes, keys, value)
                if fresh is not None:
                    return fresh, "replay"
                # Expired by our clock (ahead of the store's TTL): look past it.
                use_res = False
                state, value = await self._script(BEGIN, [keys.res, keys.lock], me, use_res)
        except StoreError as exc:
            return await self._without_store(ctx, body, keys, aes, me, exc)
        if state == "leader":
            return await self._lead(ctx, body, keys, aes, me)
        return await self._follow(ctx, body, keys, aes, me, value.decode(), use_res)

    async def _script(
        self, script: Script, keys: list[str], me: str, use_res: bool
    ) -> tuple[str, bytes]:
        result = await self.store.run(script, keys, [me, self.lock_ms, "1" if use_res else "0"])
        return _s(result[0]).decode(), _s(result[1])

    def _fresh(self, aes: AESGCM, keys: _Keys, blob: bytes) -> Answer | None:
        opened = unseal(aes, keys.digest, blob)
        if opened is None:
            return None
        answer, until = opened
        return answer if self.rt.clock() < until else None

    async def _without_store(
        self,
        ctx: RequestContext,
        body: bytes,
        keys: _Keys,
        aes: AESGCM,
        me: str,
        exc: StoreError,
    ) -> tuple[Answer, str]:
        self.m_fallbacks.labels("refresh", self.on_failure).inc()
        if self.on_failure == "closed":
            log.warning("refresh refused: store unavailable", extra={"kind": exc.kind})
            answer = _error_answer(503, "store_unavailable", "token refresh is unavailable")
            return answer, "store_closed"
        if self.local is not None:
            cached = self._local_replay(keys, aes)
            if cached is not None:
                return cached, "replay"
        # open/local: still coalesced within this process, not across replicas. The answer
        # is still offered to the store afterwards: a timed-out call may have taken the
        # lock after all, and publishing releases it instead of making other replicas
        # wait out lock_ttl.
        return await self._lead(ctx, body, keys, aes, me)

    async def _follow(
        self,
        ctx: RequestContext,
        body: bytes,
        keys: _Keys,
        aes: AESGCM,
        me: str,
        leader: str,
        use_res: bool,
    ) -> tuple[Answer, str]:
        deadline = self.rt.monotonic() + self.wait_timeout
        self.m_waiting.inc()
        try:
            while True:
                await asyncio.sleep(self.cfg.poll_interval)
                if self.rt.monotonic() >= deadline:
                    return _error_answer(
                        504,
                        "upstream_timeout",
                        "timed out waiting for the refresh in progress on another replica",
                    ), "wait_timeout"
                try:
                    state, value = await self._script(
                        POLL, [keys.res, keys.lock, keys.done(leader)], me, use_res
                    )
                except StoreError as exc:
                    # One slow call is no reason to call upstream beside the leader; a
                    # store the guard has given up on (backing off) is.
                    if exc.kind != "backoff":
                        continue
                    return await self._without_store(ctx, body, keys, aes, me, exc)
                if state in ("done", "replay"):
                    opened = unseal(aes, keys.digest, value)
                    if opened is not None and (state == "done" or self.rt.clock() < opened[1]):
                        return opened[0], "follower"
                    if state == "replay":
                        use_res = False
                elif state == "leader":
                    # The leader stopped renewing its lock (it died): we call upstream.
                    self.m_takeovers.inc()
                    break
                else:
                    leader = value.decode()
        finally:
            self.m_waiting.dec()
        return await self._lead(ctx, body, keys, aes, me)

    async def _lead(
        self, ctx: RequestContext, body: bytes, keys: _Keys, aes: AESGCM, me: str
    ) -> tuple[Answer, str]:
        renew = self.rt.spawn(self._renew(keys.lock, me), "refresh-lock-renew")
        t0 = time.perf_counter()
        try:
            answer = await self._call_upstream(ctx, body)
        finally:
            renew.cancel()
        answer = dataclasses.replace(answer, apikey=apikey_digest(ctx.scope))
        self.m_latency.observe(time.perf_counter() - t0)
        res_ms = 0
        until = 0.0
        if answer.status == 200:
            until = self._replay_until(answer)
            res_ms = int((until - self.rt.clock()) * 1000)
            if len(answer.body) > _MAX_CACHED:
                res_ms = 0
        elif _is_reuse_refusal(answer):
            # GoTrue refused a reuse, but this token's answer may have been cached meanwhile
            # (a slow leader whose lock was taken over, a store blip): serve that instead.
            cached = await self._cached(keys, aes)
            if cached is not None:
                await self._commit(keys, me, seal(aes, keys.digest, cached, 0.0), 0)
                return cached, "replay"
        await self._commit(keys, me, seal(aes, keys.digest, answer, until), max(res_ms, 0))
        return answer, "leader"

    async def _cached(self, keys: _Keys, aes: AESGCM) -> Answer | None:
        try:
            blob = await self.store.get(keys.res)
        except StoreError:
            return self._local_replay(keys, aes)
        return None if blob is None else self._fresh(aes, keys, blob)

    def _local_replay(self, keys: _Keys, aes: AESGCM) -> Answer | None:
        blob = None if self.local is None else self.local.get(keys.digest)
        return None if blob is None else self._fresh(aes, keys, blob)

    async def _commit(self, keys: _Keys, me: str, blob: bytes, res_ms: int) -> None:
        done_ms = int(min(_DONE_TTL, self.wait_timeout) * 1000) + 1000
        if self.local is not None and res_ms > 0:
            self.local[keys.digest] = blob
        try:
            await self.store.run(
                COMMIT, [keys.res, keys.lock, keys.done(me)], [me, blob, res_ms, done_ms]
            )
        except StoreError as exc:
            # The answer is served anyway; the lock expires on its own.
            self.m_fallbacks.labels("refresh", "open").inc()
            log.warning("refresh answer not stored", extra={"kind": exc.kind})

    async def _renew(self, lock: str, me: str) -> None:
        while True:
            await asyncio.sleep(self.cfg.lock_ttl / 3)
            with contextlib.suppress(StoreError):
                if not await self.store.run(RENEW, [lock], [me, self.lock_ms]):
                    return

    def _replay_until(self, answer: Answer) -> float:
        """Wall time until which this 200 may be replayed: `grace`, never past the new
        access token's expiry. 0 if the answer is not a token answer."""
        doc = _json_object(answer.body)
        if doc is None or not isinstance(doc.get("access_token"), str):
            return 0.0
        now = self.rt.clock()
        until = now + self.cfg.grace
        expires_at = doc.get("expires_at")
        expires_in = doc.get("expires_in")
        if isinstance(expires_at, int | float) and not isinstance(expires_at, bool):
            until = min(until, float(expires_at))
        elif isinstance(expires_in, int | float) and not isinstance(expires_in, bool):
            until = min(until, now + float(expires_in))
        return until if until > now else 0.0

    async def _call_upstream(self, ctx: RequestContext, body: bytes) -> Answer:
        # A private context: the answer is shared, so it must not carry the leader's own
        # response headers (RateLimit, ...); each request adds its own when it sends.
        sub = dataclasses.replace(ctx, response_headers=[], notes=[])
        capture, resp = capture_send(_CAPTURE_LIMIT)
        try:
            await self.next(sub, replay_receive(body, _no_disconnect), capture)
        except TruncatedResponse:
            return _error_answer(502, "bad_gateway", "upstream response was cut short")
        except Exception:
            log.exception("refresh upstream call failed", extra={"request_id": ctx.request_id})
            return _error_answer(502, "bad_gateway", "token refresh failed upstream")
        finally:
            ctx.upstream_seconds = sub.upstream_seconds
        if not resp.complete or resp.too_large or resp.status == 0:
            return _error_answer(502, "bad_gateway", "upstream response was incomplete")
        headers = [(k, v) for k, v in resp.headers if k not in _DROP_HEADERS]
        return Answer(resp.status, headers, bytes(resp.body))
