"""Local verification of Supabase access tokens (JWTs), so the app stops asking GoTrue
`/auth/v1/user` who the caller is.

Owns:
- token extraction: `Authorization: Bearer ...`, then the Supabase SSR session cookie
  `sb-<ref>-auth-token` (`base64-` + base64url JSON, or raw / URL-encoded JSON, possibly
  split into `.0`, `.1`, ... chunks);
- the one `Verifier` per process (`get_verifier(rt)`, kept in `rt.services[VERIFIER]`):
  HS256 shared secret and/or a JWKS (ES256, RS256, EdDSA) cached per `Cache-Control`,
  claim checks, and a bounded cache of verified tokens keyed by sha256(token);
- the optional revocation check against GoTrue `/auth/v1/user` (`revalidate`);
- `AuthPolicy` (per-route `required | optional | off`) and `require_identity` (for edge
  endpoints), which put the verified identity in `X-Edge-User-Id`, `X-Edge-User-Role`,
  `X-Edge-Session-Id` and, with `auth.identity_hmac_secret`, `X-Edge-Identity-Signature`.

Security rules kept here: the algorithm is fixed by the key, never chosen by the token
header; `alg: none`, HS256 signed with a public key, and `jku`/`x5u`/`jwk`/`x5c`/`crit`
headers are refused; symmetric keys are never taken from a JWKS; tokens are never logged,
used as labels, or stored in plaintext (the caches key on sha256).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import logging
import math
import re
import struct
from dataclasses import dataclass, field
from typing import Any, Generic, TypeGuard, TypeVar
from urllib.parse import unquote

import httpx
from joserfc.errors import JoseError
from joserfc.jwk import JWKRegistry, Key, OctKey
from joserfc.jws import JWSRegistry

from gateway.config import Route
from gateway.http import (
    Handler,
    Headers,
    Identity,
    Receive,
    RequestContext,
    Scope,
    Send,
    cookies,
    error_body,
    header_value,
    send_json,
)
from gateway.policies.auth.config import AuthSettings
from gateway.policies.auth.metrics import AuthMetrics
from gateway.runtime import Runtime
from gateway.services import ServiceKey

log = logging.getLogger("gateway.auth")

# Larger than any Supabase access token (a few KB with big app_metadata), small enough that
# junk cannot make us hash or decode megabytes.
MAX_TOKEN_BYTES = 16 * 1024
MAX_COOKIE_CHUNKS = 32

# Header parameters that would let the token choose its own key (or demand extensions we
# do not implement). RFC 8725 §3.10 / §2.7.
_FORBIDDEN_HEADERS = frozenset({"jku", "x5u", "jwk", "x5c", "crit", "b64"})
_ASYMMETRIC = frozenset({"RS256", "ES256", "EdDSA", "Ed25519"})
_EDDSA = frozenset({"EdDSA", "Ed25519"})
_PRIVATE_JWK_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")
# Claim values that become header values: printable ASCII, no separators that could
# smuggle a second header.
_SAFE_VALUE = re.compile(r"^[\x21-\x7e]{1,255}$")
_COOKIE_RE = re.compile(r"^(sb-[A-Za-z0-9_-]+-auth-token)(?:\.(\d{1,2}))?$")
_MIN_RSA_BITS = 2048

RESULT_OK = "ok"


class VerifyError(Exception):
    """A refused token. `result` is the metric label (a fixed word), `message` is what
    the client is told (never includes token content)."""

    def __init__(self, result: str, message: str) -> None:
        super().__init__(message)
        self.result = result
        self.message = message
        # False for a token signed by a trusted key that claims no user (a project's anon
        # or service key, whose `iss`/`aud` are not a user session's): it names no caller.
        self.names_user = True


@dataclass(slots=True)
class VerifiedToken:
    """A token whose signature and claims passed. `identity` is None when it has no
    `sub` (e.g. a project's anon key), which only `optional` routes accept (as anonymous).

    Not `frozen`: a frozen dataclass sets each field through `object.__setattr__`, and one
    is unpacked from the token cache on every authenticated request (9 fields: ~4 us of a
    ~100 us heartbeat). Each request gets its own instance, so nothing shares it."""

    digest: bytes
    identity: Identity | None
    exp: float
    kid: str | None
    symmetric: bool
    # Pre-encoded identity headers for the upstream request.
    headers: Headers
    user_id: str
    role: str
    session_id: str


def _verified(
    digest: bytes,
    exp: float,
    kid: str | None,
    symmetric: bool,
    sub: str,
    role: str | None,
    sid: str | None,
    claims: dict[str, Any],
) -> VerifiedToken:
    headers: Headers = []
    identity = None
    if sub:
        identity = Identity(sub, role or None, sid or None, claims, exp)
        headers.append((b"x-edge-user-id", sub.encode()))
        if role:
            headers.append((b"x-edge-user-role", role.encode()))
        if sid:
            headers.append((b"x-edge-session-id", sid.encode()))
    if not sub:
        role = sid = ""
    # Positional: keyword arguments cost a dict lookup each on this per-request path.
    return VerifiedToken(digest, identity, exp, kid, symmetric, headers, sub, role or "", sid or "")


# A cached token: exp, flags (1 symmetric, 2 has a kid), then "kid\0sub\0role\0sid\0claims"
# as UTF-8 (claims as compact JSON, usually empty). One bytes object of ~130 bytes an
# entry instead of ~4 KB of objects (issue 15: 100,000 cached tokens were ~200 MB).
_PACKED = struct.Struct(">dB")


def _pack(vt: VerifiedToken) -> bytes | None:
    """The cache's form of a verified token; None if it cannot be packed (a kid with a
    NUL in it is valid JSON, just not worth a format): such a token is not cached."""
    kid = vt.kid or ""
    if "\0" in kid:
        return None
    claims = vt.identity.claims if vt.identity is not None else {}
    text = "\0".join(
        (
            kid,
            vt.user_id,
            vt.role,
            vt.session_id,
            json.dumps(claims, separators=(",", ":")) if claims else "",
        )
    )
    flags = (1 if vt.symmetric else 0) | (2 if vt.kid is not None else 0)
    return _PACKED.pack(vt.exp, flags) + text.encode()


def _unpack(digest: bytes, raw: bytes) -> VerifiedToken:
    exp, flags = _PACKED.unpack_from(raw)
    kid, sub, role, sid, claims = raw[_PACKED.size :].decode().split("\0")
    return _verified(
        digest,
        exp,
        kid if flags & 2 else None,
        bool(flags & 1),
        sub,
        role,
        sid,
        json.loads(claims) if claims else {},
    )


def claim_names(routes: list[Route]) -> frozenset[str]:
    """Top-level claims some policy reads (cache `vary_claims`, `authorize.claim`)."""
    names: set[str] = set()
    for route in routes:
        if route.cache is not None:
            paths = list(route.cache.vary_claims)
            if route.cache.authorize is not None:
                paths.append(route.cache.authorize.claim)
            names.update(p.split(".", 1)[0] for p in paths)
    return frozenset(names)


@dataclass(slots=True)
class _Key:
    kid: str | None
    alg: str
    key: Key
    model: Any  # joserfc JWSAlgModel (not exported publicly)

    def accepts(self, alg: str) -> bool:
        if self.alg in _EDDSA:
            return alg in _EDDSA
        return alg == self.alg


K = TypeVar("K")
V = TypeVar("V")


class _LRU(Generic[K, V]):
    """A bounded LRU dict. A plain dict whose insertion order is the recency order (a hit
    is re-inserted at the end): about 40 bytes an entry less than an OrderedDict. No
    locking: used from one event loop."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self.data: dict[K, V] = {}

    def get(self, key: K) -> V | None:
        v = self.data.pop(key, None)
        if v is not None:
            self.data[key] = v
        return v

    def put(self, key: K, value: V) -> None:
        if self.maxsize <= 0:
            return
        data = self.data
        data.pop(key, None)
        data[key] = value
        while len(data) > self.maxsize:
            del data[next(iter(data))]

    def pop(self, key: K) -> None:
        self.data.pop(key, None)

    def __len__(self) -> int:
        return len(self.data)


def _b64decode(segment: str) -> bytes:
    # Strict: characters outside the base64url alphabet are an error, not skipped.
    return base64.b64decode(segment + "=" * (-len(segment) % 4), altchars=b"-_", validate=True)


class _DuplicateMember(ValueError):
    pass


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise _DuplicateMember("duplicate member name")
    return out


def _b64json(segment: str) -> Any:
    """A JWT segment's JSON; None if it is not JSON or names a member twice (RFC 7515
    §5.2: parsers that keep the first and the last would read different tokens)."""
    try:
        return json.loads(_b64decode(segment), object_pairs_hook=_unique_members)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return None


def _is_number(v: Any) -> TypeGuard[int | float]:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


# --------------------------------------------------------------------------- JWKS


def _jwk_alg(jwk: dict[str, Any]) -> str | None:
    """The one algorithm a published key may verify: its `alg` member when present,
    else implied by kty/crv. Symmetric (`oct`) keys are never accepted from a JWKS."""
    kty = jwk.get("kty")
    if kty == "oct":
        return None
    alg = jwk.get("alg")
    if alg is not None:
        return alg if alg in _ASYMMETRIC else None
    if kty == "RSA":
        return "RS256"
    if kty == "EC" and jwk.get("crv") == "P-256":
        return "ES256"
    if kty == "OKP" and jwk.get("crv") == "Ed25519":
        return "EdDSA"
    return None


def import_jwk(jwk: Any) -> _Key | None:
    """A verification key from one JWKS member, or None if it is unusable for signatures
    (wrong use/key_ops, unsupported kty/alg/curve, weak RSA, malformed)."""
    if not isinstance(jwk, dict):
        return None
    if jwk.get("use", "sig") != "sig":
        return None
    ops = jwk.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        return None
    alg = _jwk_alg(jwk)
    if alg is None:
        return None
    kid = jwk.get("kid")
    if kid is not None and not isinstance(kid, str):
        return None
    # Only the public half is ever needed; drop private members a misconfigured issuer
    # might publish so they are never held in memory.
    public = {k: v for k, v in jwk.items() if k not in _PRIVATE_JWK_MEMBERS}
    public["key_ops"] = ["verify"]
    try:
        key = JWKRegistry.import_key(public)
        model = JWSRegistry.algorithms[alg]
        model.check_key(key)
        if alg == "RS256" and key.get_op_key("verify").key_size < _MIN_RSA_BITS:  # type: ignore[union-attr]
            return None
    except (JoseError, ValueError, TypeError, KeyError, AttributeError):
        return None
    return _Key(kid, alg, key, model)


def _max_age(cache_control: str | None, default: float) -> float:
    """`max-age` from Cache-Control; 0 for no-store/no-cache; `default` when absent."""
    if not cache_control:
        return default
    directives = [d.strip().lower() for d in cache_control.split(",")]
    if "no-store" in directives or "no-cache" in directives:
        return 0.0
    for d in directives:
        name, _, value = d.partition("=")
        if name.strip() == "max-age":
            try:
                return max(0.0, float(value.strip().strip('"')))
            except ValueError:
                return default
    return default


class JwksCache:
    """The issuer's published keys, refreshed in the background when `Cache-Control`
    says they are stale, and on demand (rate-limited) when an unknown `kid` arrives.
    A failed fetch keeps the last good set."""

    def __init__(self, url: str, settings: AuthSettings, rt: Runtime, verifier: Verifier) -> None:
        self.url = url
        self.settings = settings
        self.rt = rt
        self.verifier = verifier
        self.keys: dict[str, _Key] = {}
        self.unnamed: list[_Key] = []
        self.loaded = False
        self.fetched_at: float | None = None
        self.expires_at = 0.0
        self.last_attempt = -math.inf
        self.last_error: str | None = None
        self.fetches = 0
        self._inflight: asyncio.Task[None] | None = None

    def get(self, kid: str) -> _Key | None:
        return self.keys.get(kid)

    def has_keys(self) -> bool:
        return bool(self.keys or self.unnamed)

    def candidates(self, alg: str) -> list[_Key]:
        return [k for k in (*self.keys.values(), *self.unnamed) if k.accepts(alg)]

    def _may_fetch(self, now: float) -> bool:
        return now - self.last_attempt >= self.settings.jwks_min_refetch

    def maybe_refresh(self, now: float) -> None:
        """Called on the request path: start a background refresh when the set is stale.
        Requests keep being served with the current keys meanwhile."""
        if now >= self.expires_at and self._inflight is None and self._may_fetch(now):
            self._start()

    async def refresh(self) -> None:
        """Fetch now (joining a fetch already in flight)."""
        task = self._inflight or self._start()
        await asyncio.shield(task)

    async def refresh_for_unknown_kid(self) -> bool:
        """At most one fetch per `jwks_min_refetch` however many unknown kids arrive;
        callers that arrive while one is in flight wait for it. True if a fetch ran."""
        if self._inflight is not None:
            await asyncio.shield(self._inflight)
            return True
        if not self._may_fetch(self.rt.clock()):
            return False
        await self.refresh()
        return True

    def _start(self) -> asyncio.Task[None]:
        # Set before the task runs so concurrent callers see the attempt.
        self.last_attempt = self.rt.clock()
        task = self.rt.spawn(self._fetch(), "jwks-fetch")
        self._inflight = task

        def done(_: asyncio.Task[None]) -> None:
            if self._inflight is task:
                self._inflight = None

        task.add_done_callback(done)
        return task

    async def _fetch(self) -> None:
        s = self.settings
        headers = {"accept": "application/json"}
        if s.apikey:
            headers["apikey"] = s.apikey
        outcome = "ok"
        try:
            resp = await self.verifier.http().get(self.url, headers=headers, timeout=s.jwks_timeout)
            if resp.status_code != 200:
                raise _FetchFailed("error", f"HTTP {resp.status_code}")
            try:
                doc = resp.json()
            except ValueError:
                raise _FetchFailed("invalid", "response is not JSON") from None
            if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
                raise _FetchFailed("invalid", "response has no 'keys' list")
            named: dict[str, _Key] = {}
            unnamed: list[_Key] = []
            for jwk in doc["keys"]:
                k = import_jwk(jwk)
                if k is None:
                    continue
                if k.kid is None:
                    unnamed.append(k)
                else:
                    named[k.kid] = k
            if doc["keys"] and not (named or unnamed):
                raise _FetchFailed("invalid", "no usable signing key in the set")
            now = self.rt.clock()
            age = _max_age(resp.headers.get("cache-control"), s.jwks_max_age)
            ttl = min(max(age, s.jwks_min_refetch), s.jwks_max_age)
            self.keys, self.unnamed = named, unnamed
            self.loaded = True
            self.fetched_at = now
            self.expires_at = now + ttl
            self.last_error = None
        except _FetchFailed as failed:
            outcome = failed.outcome
            self.last_error = failed.detail
        except httpx.TimeoutException:
            outcome = "timeout"
            self.last_error = "timeout"
        except httpx.HTTPError as exc:  # not `failed`: mypyc types a name once (TypeError)
            outcome = "error"
            self.last_error = type(exc).__name__
        self.fetches += 1
        self.rt.metrics.auth.jwks_fetches.labels(outcome).inc()
        if outcome != "ok":
            # Say what is in force: an earlier key set, or none (then only HS256 tokens,
            # if a secret is set, can verify until a fetch succeeds).
            msg = (
                "JWKS fetch failed; keeping the last good key set"
                if self.has_keys()
                else "JWKS fetch failed; no key set loaded yet"
            )
            log.warning(
                msg,
                extra={"outcome": outcome, "detail": self.last_error, "keys": len(self.keys)},
            )

    def status(self) -> dict[str, Any]:
        now = self.rt.clock()
        return {
            "loaded": self.loaded,
            "kids": sorted(self.keys),
            "unnamed_keys": len(self.unnamed),
            "age_s": round(now - self.fetched_at, 1) if self.fetched_at is not None else None,
            "fresh_for_s": round(max(0.0, self.expires_at - now), 1),
            "last_error": self.last_error,
            "fetches": self.fetches,
        }


class _FetchFailed(Exception):
    def __init__(self, outcome: str, detail: str) -> None:
        super().__init__(detail)
        self.outcome = outcome
        self.detail = detail


# --------------------------------------------------------------------------- verifier


@dataclass(slots=True)
class _Revalidation:
    ok: bool
    checked_at: float


@dataclass(slots=True)
class Verifier:
    """One per process (see `get_verifier`). All methods run on the event loop."""

    settings: AuthSettings
    rt: Runtime
    hs_key: _Key | None = None
    jwks: JwksCache | None = None
    cache: _LRU[bytes, bytes] = field(default_factory=lambda: _LRU(0))
    revalidations: _LRU[bytes, _Revalidation] = field(default_factory=lambda: _LRU(0))
    _revalidating: dict[bytes, asyncio.Task[bool]] = field(default_factory=dict)
    _client: httpx.AsyncClient | None = None
    _audience: frozenset[str] = frozenset()
    _hmac_key: bytes = b""
    _claim_names: frozenset[str] = frozenset()
    # Bound once: verify() counts on every request.
    metrics: AuthMetrics = field(init=False)
    # The two counters a cache hit increments (the common case), looked up once.
    _hit_counts: tuple[Any, Any] = field(init=False)

    def __post_init__(self) -> None:
        s = self.settings
        self.metrics = self.rt.metrics.auth
        self._hit_counts = (self.metrics.cache("hit"), self.metrics.result(RESULT_OK))
        if s.hs256_secret:
            key = OctKey.import_key(s.hs256_secret.encode())
            self.hs_key = _Key(None, "HS256", key, JWSRegistry.algorithms["HS256"])
        if s.jwks_url:
            self.jwks = JwksCache(s.jwks_url, s, self.rt, self)
        self.cache = _LRU(s.token_cache_size)
        self.revalidations = _LRU(max(s.token_cache_size, 1000))
        aud = [s.audience] if isinstance(s.audience, str) else list(s.audience)
        self._audience = frozenset(a for a in aud if a)
        self._hmac_key = s.identity_hmac_secret.encode()
        self._claim_names = claim_names(self.rt.config.routes)

    # ---------------------------------------------------------------- lifecycle

    def http(self) -> httpx.AsyncClient:
        """The control-plane client (JWKS, GoTrue /user): low volume, so httpx."""
        if self._client is None:
            self._client = httpx.AsyncClient(follow_redirects=False)
        return self._client

    async def start(self) -> None:
        """Load the JWKS at startup; an unreachable issuer is logged, not fatal (HS256
        tokens still verify, and unknown kids retry on demand)."""
        if self.jwks is not None:
            await self.jwks.refresh()

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def readiness(self) -> str | None:
        """Why no token can be verified now, or None. With the JWKS the only key source
        and no key loaded, every token is refused, so the process is not ready. Each
        probe also retries the fetch (at most once per jwks_min_refetch): a pod that
        started while the issuer was down becomes ready without taking traffic first."""
        jwks = self.jwks
        if self.hs_key is not None or (jwks is not None and jwks.has_keys()):
            return None
        if jwks is None:
            return "no verification key: auth.hs256_secret and auth.jwks_url are empty"
        jwks.maybe_refresh(self.rt.clock())
        if jwks.loaded:
            why = f"the JWKS at {jwks.url} lists no usable key"
        else:
            why = f"the JWKS fetch from {jwks.url} failed ({jwks.last_error or 'not yet run'})"
        return f"no verification key loaded: {why}, and auth.hs256_secret is empty"

    name = "auth"  # its section of /_edge/status and /readyz

    def status(self) -> dict[str, Any]:
        return {
            "hs256": self.hs_key is not None,
            "jwks": self.jwks.status() if self.jwks is not None else None,
            "token_cache": len(self.cache),
        }

    # ---------------------------------------------------------------- verify

    async def verify(self, token: str) -> VerifiedToken:
        """Verify signature and claims (cached until `exp`); raises VerifyError."""
        metrics = self.metrics
        now = self.rt.clock()
        if self.jwks is not None:
            self.jwks.maybe_refresh(now)
        if len(token) > MAX_TOKEN_BYTES or not token.isascii():
            metrics.result("malformed").inc()
            raise VerifyError("malformed", "the access token is malformed")
        digest = hashlib.sha256(token.encode()).digest()
        raw = self.cache.get(digest)
        if raw is not None:
            hit = _unpack(digest, raw)
            if now <= hit.exp + self.settings.leeway and self._key_still_trusted(hit):
                cached, ok = self._hit_counts
                cached.inc()
                ok.inc()
                return hit
            self.cache.pop(digest)
        metrics.cache("miss").inc()
        try:
            vt = await self._verify(token, digest, now)
        except VerifyError as exc:
            metrics.result(exc.result).inc()
            raise
        metrics.result(RESULT_OK).inc()
        packed = _pack(vt)
        if packed is not None:
            self.cache.put(digest, packed)
        return vt

    def _key_still_trusted(self, vt: VerifiedToken) -> bool:
        # A key removed from the JWKS (revoked after rotation) stops cached tokens too.
        if vt.symmetric or vt.kid is None or self.jwks is None:
            return True
        return vt.kid in self.jwks.keys

    async def _verify(self, token: str, digest: bytes, now: float) -> VerifiedToken:
        parts = token.split(".")
        if len(parts) != 3:
            raise VerifyError("malformed", "the access token is malformed")
        header = _b64json(parts[0])
        if not isinstance(header, dict):
            raise VerifyError("malformed", "the access token header is malformed")
        alg = header.get("alg")
        kid = header.get("kid")
        if not isinstance(alg, str) or (kid is not None and not isinstance(kid, str)):
            raise VerifyError("malformed", "the access token header is malformed")
        if alg.lower() == "none":
            raise VerifyError("bad_alg", "unsigned tokens are refused")
        if _FORBIDDEN_HEADERS.intersection(header):
            raise VerifyError("bad_header", "the token header names its own key or extensions")
        keys = await self._keys_for(alg, kid)
        try:
            sig = _b64decode(parts[2])
        except (ValueError, binascii.Error):
            raise VerifyError("malformed", "the access token signature is malformed") from None
        signing_input = f"{parts[0]}.{parts[1]}".encode("ascii")
        if not any(self._check(k, signing_input, sig) for k in keys):
            raise VerifyError("bad_signature", "the access token signature is invalid")
        claims = _b64json(parts[1])
        if not isinstance(claims, dict):
            raise VerifyError("malformed", "the access token payload is malformed")
        try:
            return self._claims(claims, digest, now, kid, keys[0].alg == "HS256")
        except VerifyError as exc:
            exc.names_user = claims.get("sub") is not None
            raise

    @staticmethod
    def _check(key: _Key, signing_input: bytes, sig: bytes) -> bool:
        try:
            return bool(key.model.verify(signing_input, sig, key.key))
        except (JoseError, ValueError, TypeError):
            return False

    async def _keys_for(self, alg: str, kid: str | None) -> list[_Key]:
        """The key(s) that may verify a token with this header. The header only *selects*;
        the key decides the algorithm, so a mismatch is refused, not accommodated."""
        jwks = self.jwks
        if alg == "HS256":
            if kid is not None and jwks is not None and kid in jwks.keys:
                # HS256 "signed" with a published public key: the classic confusion attack.
                raise VerifyError("bad_alg", "the token algorithm does not match its key")
            if self.hs_key is None:
                raise VerifyError("bad_alg", "HS256 tokens are not accepted")
            return [self.hs_key]
        if alg not in _ASYMMETRIC:
            raise VerifyError("bad_alg", "the token algorithm is not accepted")
        if jwks is None:
            raise VerifyError("bad_alg", "the token algorithm is not accepted")
        if kid is None:
            found = jwks.candidates(alg)
            if not found and not jwks.loaded and await jwks.refresh_for_unknown_kid():
                found = jwks.candidates(alg)
            if not found:
                raise VerifyError("unknown_kid", "no key is known for this token")
            return found
        key = jwks.get(kid)
        if key is None and await jwks.refresh_for_unknown_kid():
            key = jwks.get(kid)
        if key is None:
            raise VerifyError("unknown_kid", "no key is known for this token")
        if not key.accepts(alg):
            raise VerifyError("bad_alg", "the token algorithm does not match its key")
        return [key]

    def _claims(
        self, claims: dict[str, Any], digest: bytes, now: float, kid: str | None, symmetric: bool
    ) -> VerifiedToken:
        leeway = self.settings.leeway
        exp = claims.get("exp")
        if not _is_number(exp):
            raise VerifyError("bad_claims", "the access token has no valid exp")
        if now > exp + leeway:
            raise VerifyError("expired", "the access token has expired")
        nbf = claims.get("nbf")
        if nbf is not None:
            if not _is_number(nbf):
                raise VerifyError("bad_claims", "the access token has an invalid nbf")
            if nbf > now + leeway:
                raise VerifyError("not_yet_valid", "the access token is not valid yet")
        iat = claims.get("iat")
        if iat is not None:
            if not _is_number(iat):
                raise VerifyError("bad_claims", "the access token has an invalid iat")
            # A token from the future was minted with a wrong clock or a stolen key.
            if iat > now + leeway:
                raise VerifyError("not_yet_valid", "the access token was issued in the future")
        issuer = self.settings.issuer
        if issuer and claims.get("iss") != issuer:
            raise VerifyError("bad_claims", "the access token was issued by someone else")
        if self._audience:
            aud = claims.get("aud")
            auds = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
            if not any(isinstance(a, str) and a in self._audience for a in auds):
                raise VerifyError("bad_claims", "the access token is for another audience")
        sub, role, sid = claims.get("sub"), claims.get("role"), claims.get("session_id")
        for value in (sub, role, sid):
            if value is not None and not (isinstance(value, str) and _SAFE_VALUE.match(value)):
                raise VerifyError("bad_claims", "the access token has invalid identity claims")
        # Only the claims a policy reads (cache vary_claims / authorize) are kept: the
        # rest (email, user_metadata, amr, ...) would be most of every cached entry.
        kept = {k: claims[k] for k in self._claim_names if k in claims}
        return _verified(digest, float(exp), kid, symmetric, sub or "", role, sid, kept)

    # ---------------------------------------------------------------- identity signature

    def sign_identity(self, vt: VerifiedToken | None) -> tuple[bytes, bytes] | None:
        """`X-Edge-Identity-Signature: t=<unix>,v1=<hex>`, HMAC-SHA256 over
        "<t>\\n<user_id>\\n<role>\\n<session_id>" (empty strings when anonymous), so the
        app can refuse requests that did not come through the gateway."""
        if not self._hmac_key:
            return None
        t = int(self.rt.clock())
        who = ("", "", "") if vt is None else (vt.user_id, vt.role, vt.session_id)
        msg = "\n".join((str(t), *who))
        mac = hmac.new(self._hmac_key, msg.encode(), hashlib.sha256).hexdigest()
        return (b"x-edge-identity-signature", f"t={t},v1={mac}".encode())

    # ---------------------------------------------------------------- revalidation

    async def revalidate(self, token: str, digest: bytes, interval: float) -> bool:
        """Is the session still alive at GoTrue? Asked at most once per token per
        `interval` (concurrent requests share one call); both answers are cached. If
        GoTrue cannot answer, the local verification stands (fail open) for the interval,
        so an outage of GoTrue does not become an outage of the app."""
        now = self.rt.clock()
        known = self.revalidations.get(digest)
        if known is not None and now - known.checked_at < interval:
            return known.ok
        task = self._revalidating.get(digest)
        if task is None:
            task = self.rt.spawn(self._ask_gotrue(token, digest), "auth-revalidate")
            self._revalidating[digest] = task
            task.add_done_callback(lambda _t: self._revalidating.pop(digest, None))
        return await asyncio.shield(task)

    async def _ask_gotrue(self, token: str, digest: bytes) -> bool:
        s = self.settings
        assert s.user_url, "config validation requires auth.user_url with revalidate"
        headers = {"authorization": f"Bearer {token}", "accept": "application/json"}
        if s.apikey:
            headers["apikey"] = s.apikey
        try:
            resp = await self.http().get(s.user_url, headers=headers, timeout=s.jwks_timeout)
            status = resp.status_code
        except httpx.HTTPError:
            status = 0
        if status == 200:
            ok, outcome = True, "ok"
        elif status in (401, 403, 404) or (400 <= status < 500 and status != 429):
            ok, outcome = False, "revoked"
        else:
            ok, outcome = True, "error"
        self.rt.metrics.auth.revalidations.labels(outcome).inc()
        self.revalidations.put(digest, _Revalidation(ok, self.rt.clock()))
        return ok


def get_verifier(rt: Runtime) -> Verifier:
    """The process's shared Verifier, created on first use (its JWKS is loaded by
    rt.on_start when created before startup)."""
    v = rt.services.get(VERIFIER)
    if v is None:
        v = rt.services[VERIFIER] = Verifier(rt.config.auth, rt)
        rt.on_start(v.start)
        rt.on_stop(v.close)
        rt.services.add_status(v)
        rt.readiness["auth_keys"] = v.readiness
        rt.sizes["token_cache"] = v.cache.__len__
    return v


VERIFIER: ServiceKey[Verifier] = ServiceKey("verifier")


# --------------------------------------------------------------------------- extraction


def bearer_token(scope: Scope) -> str | None:
    value = header_value(scope, b"authorization")
    return None if value is None else _bearer(value)


def _bearer(value: bytes) -> str | None:
    scheme, _, token = value.decode("latin-1").strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def _authorization(scope: Scope) -> tuple[int, bytes | None]:
    """How many Authorization headers the request has, and the first one's value (one
    pass over the headers: this runs on every request of an authenticated route)."""
    count = 0
    first = None
    for k, v in scope["headers"]:
        if k == b"authorization":
            count += 1
            if first is None:
                first = v
    return count, first


def session_access_token(value: str) -> str | None:
    """The access token inside an @supabase/ssr session cookie value."""
    value = value.strip().strip('"')
    if value.startswith("base64-"):
        raw = value[len("base64-") :].translate(str.maketrans("+/", "-_")).rstrip("=")
        try:
            text = _b64decode(raw).decode("utf-8")
        except (ValueError, binascii.Error, UnicodeDecodeError):
            return None
    else:
        text = unquote(value) if "%" in value else value
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    if isinstance(doc, dict):
        token = doc.get("access_token")
    elif isinstance(doc, list) and doc:
        # Older auth-helpers stored [access_token, refresh_token, ...].
        token = doc[0]
    else:
        return None
    return token if isinstance(token, str) and token else None


def cookie_token(scope: Scope, cookie_name: str | None) -> str | None:
    """The access token from the Supabase SSR cookie, reassembling `.0`, `.1`, ... chunks."""
    jar = cookies(scope)
    if not jar:
        return None
    bases: set[str] = set()
    for name in jar:
        m = _COOKIE_RE.match(name)
        if m and (cookie_name is None or m.group(1) == cookie_name):
            bases.add(m.group(1))
    for base in sorted(bases):
        if base in jar:
            value = jar[base]
        else:
            chunks = []
            for i in range(MAX_COOKIE_CHUNKS):
                chunk = jar.get(f"{base}.{i}")
                if chunk is None:
                    break
                chunks.append(chunk)
            value = "".join(chunks)
        if value:
            token = session_access_token(value)
            if token:
                return token
    return None


async def authenticate(verifier: Verifier, scope: Scope) -> tuple[str, VerifiedToken] | VerifyError:
    """The caller's verified user token, or why there is none.

    An `Authorization` header, when present, decides alone: if it is not one valid Bearer
    token the request has no identity whatever its cookies say, because the header is
    forwarded and the app would otherwise see one caller while the gateway vouches for
    another. The one exception keeps browsers working: a Bearer token signed by a trusted
    key that names no user (the project's anon key, which supabase-js sends when it has
    no session in memory; its `iss` and `aud` are not a session's) claims no identity,
    so the session cookie is tried next."""
    metrics = verifier.metrics
    count, value = _authorization(scope)
    if count > 1:
        metrics.result("malformed").inc()
        return VerifyError("malformed", "more than one Authorization header")
    bearer = _bearer(value) if value is not None else None
    if count and bearer is None:
        metrics.result("malformed").inc()
        return VerifyError("malformed", "the Authorization header is not a Bearer token")
    if bearer is not None:
        try:
            vt = await verifier.verify(bearer)
        except VerifyError as exc:
            if exc.names_user:  # False only after the signature checked out
                return exc
        else:
            if vt.identity is not None:
                return bearer, vt
    cookie = cookie_token(scope, verifier.settings.cookie_name)
    if cookie is None or cookie == bearer:
        if bearer is not None:
            return VerifyError("bad_claims", "the access token names no user")
        metrics.result("missing").inc()
        return VerifyError("missing", "an access token is required")
    try:
        vt = await verifier.verify(cookie)
    except VerifyError as exc:
        return exc
    if vt.identity is None:
        return VerifyError("bad_claims", "the access token names no user")
    return cookie, vt


def _www_authenticate(err: VerifyError) -> bytes:
    return f'Bearer error="invalid_token", error_description="{err.message}"'.encode()


async def send_unauthorized(send: Send, err: VerifyError) -> None:
    await send_json(
        send,
        401,
        error_body("invalid_token", err.message),
        [(b"www-authenticate", _www_authenticate(err)), (b"cache-control", b"no-store")],
    )


async def require_identity(rt: Runtime, scope: Scope, send: Send) -> Identity | None:
    """For edge endpoints outside the route chain: the verified identity, or None after
    sending the 401 itself."""
    verifier = get_verifier(rt)
    res = await authenticate(verifier, scope)
    if isinstance(res, VerifyError):
        await send_unauthorized(send, res)
        return None
    return res[1].identity


# --------------------------------------------------------------------------- policy


class AuthPolicy:
    """`auth: required | optional` on a route (app.py skips `off`). Also wraps the
    WebSocket proxy: the upgrade request is verified the same way and a 401 is sent as
    http.response.* messages, which app.py turns into a WebSocket denial."""

    def __init__(self, next_handler: Handler, route_cfg: Route, rt: Runtime) -> None:
        self.next = next_handler
        self.required = route_cfg.auth.mode == "required"
        self.revalidate = route_cfg.auth.revalidate
        self.verifier = get_verifier(rt)

    async def __call__(self, ctx: RequestContext, receive: Receive, send: Send) -> None:
        verifier = self.verifier
        res = await authenticate(verifier, ctx.scope)
        if not isinstance(res, VerifyError) and self.revalidate > 0:
            token, vt = res
            if not await verifier.revalidate(token, vt.digest, self.revalidate):
                verifier.rt.metrics.auth.result("revoked").inc()
                res = VerifyError("revoked", "the session has ended")
        if isinstance(res, VerifyError):
            if self.required:
                ctx.notes.append(f"auth={res.result}")
                await send_unauthorized(send, res)
                return
            ctx.notes.append("auth=anonymous")
            signature = verifier.sign_identity(None)
        else:
            vt = res[1]
            ctx.identity = vt.identity
            ctx.upstream_headers.extend(vt.headers)
            signature = verifier.sign_identity(vt)
        if signature is not None:
            ctx.upstream_headers.append(signature)
        await self.next(ctx, receive, send)
