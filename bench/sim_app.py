"""Simulated EventLive app for the load scenarios: the hot-path API routes with the
query patterns the incident review measured, run for real against PostgreSQL (asyncpg),
plus the two Supabase endpoints those routes and the gateway talk to.

Owns:
- `POST /api/webinars/{id}/presence/ping` — 5-8 queries: the broken
  `select id from registrations` (42703, ignored: the error loop), webinar select,
  auto-registration INSERT (23505 for everyone already registered, then a re-select),
  presence upsert, session update (+ insert when the session is new);
- `POST /api/webinars/{id}/access/track` — guest 3 queries, signed-in with a
  registration 4, without one 7 (registration select, profile select, registration
  INSERT; a 23505 from a racing ping is followed by a re-select);
- `GET /api/webinars/{id}/stats/access` — admin check + the dashboard aggregate over
  presence and access logs;
- `GET|POST /api/webinars/{id}/chat/messages` — polling read (latest 50) and post;
- `GET /auth/v1/user` — a fake GoTrue: added latency, HS256 check, one `auth_users`
  lookup (GoTrue reads auth.users on every call, so it is counted as a DB query);
- `POST /rest/v1/rpc/edge_presence_batch` and `/rest/v1/rpc/edge_access_batch` —
  PostgREST's RPC calls of sql/edge_presence_batch.sql and sql/edge_access_batch.sql,
  the gateway's batch-mode heartbeat flushes (1 query each);
- `GET /_sim/stats` (counters) and `POST /_sim/control` (inject DB latency / failure).

Identity: `X-Edge-User-Id` when present (the gateway verified the token); otherwise the
app does what it does today and asks `/auth/v1/user` with the caller's token.

Every statement goes through `Db.run`, which counts it per route and maps SQL errors to
the status PostgREST would have logged (42703 → 400, 23505 → 409), so the runner can
report DB queries and the review's 400/409 error loops, and cross-check the count with
`pg_stat_database`.

Run: `SIM_JWT_SECRET=S python -m bench.sim_app --port 3000 --dsn
postgresql://postgres@127.0.0.1/edge_bench` (the runner starts it as a subprocess).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import asyncpg
import uvicorn
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import OctKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

# PostgREST's HTTP status for the SQL errors the review found in its logs.
POSTGREST_STATUS = {"42703": "400", "23505": "409"}


class DbDown(Exception):
    """Injected failure: the database is unreachable (the app answers 500)."""


class Stats:
    """Cumulative counters; the runner samples them to build its time series."""

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()
        self.queries: Counter[str] = Counter()
        self.db_errors: Counter[str] = Counter()
        self.responses: Counter[str] = Counter()
        # Pool checkouts: asyncpg resets a connection when it goes back to the pool (one
        # simple-query transaction), which pg_stat_database counts beside the statements.
        self.acquires = 0
        self.in_flight = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": dict(self.requests),
            "queries": dict(self.queries),
            "queries_total": sum(self.queries.values()),
            "db_errors": dict(self.db_errors),
            "acquires": self.acquires,
            "responses": dict(self.responses),
            "in_flight": self.in_flight,
            "monotonic": time.monotonic(),
        }


class Db:
    """The pool plus the counting wrapper every query goes through."""

    def __init__(self, pool: asyncpg.Pool, stats: Stats, statement_s: float = 0.0) -> None:
        self.pool = pool
        self.stats = stats
        # The database's cost of one statement, held on the connection (S3: a database
        # with a CPU budget, so a small pool saturates at a join surge).
        self.statement_s = statement_s
        self.latency_s = 0.0  # injected per-query latency (S2: the app slows down)
        self.down = False  # injected outage (S2: the app fails)

    @contextlib.asynccontextmanager
    async def conn(self) -> AsyncIterator[asyncpg.Connection]:
        if self.down:
            raise DbDown
        async with self.pool.acquire(timeout=10) as c:
            self.stats.acquires += 1
            yield c

    async def run(
        self, c: asyncpg.Connection, route: str, kind: str, sql: str, *args: Any
    ) -> list[asyncpg.Record]:
        """Run one statement (one round trip, one implicit transaction) and count it.
        kind: fetch (rows) or execute (status string discarded)."""
        if self.down:
            raise DbDown
        if self.latency_s or self.statement_s:
            # Held while owning the connection: a slow database exhausts the pool, the
            # way it does in production.
            await asyncio.sleep(self.latency_s + self.statement_s)
        self.stats.queries[route] += 1
        try:
            if kind == "fetch":
                return list(await c.fetch(sql, *args))
            await c.execute(sql, *args)
            return []
        except asyncpg.PostgresError as exc:
            code = str(getattr(exc, "sqlstate", "") or "")
            self.stats.db_errors[POSTGREST_STATUS.get(code, code or "other")] += 1
            raise


class SimApp:
    def __init__(
        self,
        dsn: str,
        jwt_secret: str,
        auth_latency_s: float,
        gotrue_url: str,
        pool_size: int,
        statement_s: float = 0.0,
    ) -> None:
        self.dsn = dsn
        self.statement_s = statement_s
        self.key = OctKey.import_key(jwt_secret)
        self.auth_latency_s = auth_latency_s
        self.gotrue_url = gotrue_url.rstrip("/")
        self.pool_size = pool_size
        self.stats = Stats()
        self.db: Db | None = None
        self.http: aiohttp.ClientSession | None = None

    # ------------------------------------------------------------------ lifecycle

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        pool = await asyncpg.create_pool(
            self.dsn, min_size=min(2, self.pool_size), max_size=self.pool_size
        )
        self.db = Db(pool, self.stats, self.statement_s)
        self.http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=200), timeout=aiohttp.ClientTimeout(total=10)
        )
        try:
            yield
        finally:
            await self.http.close()
            await pool.close()

    def app(self) -> Starlette:
        w = "/api/webinars/{webinar_id}"
        routes = [
            Route(
                f"{w}/presence/ping", self.endpoint("presence_ping", self.ping), methods=["POST"]
            ),
            Route(f"{w}/access/track", self.endpoint("access_track", self.track), methods=["POST"]),
            Route(f"{w}/stats/access", self.endpoint("admin_stats", self.admin_stats)),
            Route(f"{w}/chat/messages", self.endpoint("chat", self.chat), methods=["GET", "POST"]),
            Route("/auth/v1/user", self.endpoint("auth_user", self.auth_user)),
            Route(
                "/rest/v1/rpc/edge_presence_batch",
                self.endpoint("presence_batch", self.presence_batch),
                methods=["POST"],
            ),
            Route(
                "/rest/v1/rpc/edge_access_batch",
                self.endpoint("access_batch", self.access_batch),
                methods=["POST"],
            ),
            Route("/_sim/stats", self.sim_stats),
            Route("/_sim/control", self.sim_control, methods=["POST"]),
            Route("/healthz", lambda _r: JSONResponse({"ok": True})),
        ]
        return Starlette(routes=routes, lifespan=self.lifespan)

    def endpoint(
        self, name: str, fn: Callable[[Request, str], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        """Wrap a route: count its requests and answers; unhandled failures → 500."""

        async def handler(request: Request) -> Response:
            route = name
            if name == "chat":
                route = "chat_poll" if request.method == "GET" else "chat_post"
            self.stats.requests[route] += 1
            self.stats.in_flight += 1
            try:
                resp: Response = await fn(request, route)
            except DbDown:
                resp = JSONResponse({"error": "db_unavailable"}, status_code=500)
            except (TimeoutError, asyncpg.PostgresError, aiohttp.ClientError, OSError) as exc:
                # An unhandled error in the app: Next.js answers 500.
                resp = JSONResponse({"error": type(exc).__name__}, status_code=500)
            finally:
                self.stats.in_flight -= 1
            self.stats.responses[f"{route}:{resp.status_code}"] += 1
            return resp

        return handler

    # ------------------------------------------------------------------ identity

    async def identity(self, request: Request) -> str | None:
        """The caller's user id: the gateway's header, else GoTrue's answer (today's way)."""
        uid = request.headers.get("x-edge-user-id")
        if uid:
            return uid
        auth = request.headers.get("authorization", "")
        if not auth.lower().startswith("bearer "):
            return None
        assert self.http is not None
        async with self.http.get(
            self.gotrue_url + "/auth/v1/user", headers={"Authorization": auth}
        ) as resp:
            if resp.status != 200:
                return None
            body = await resp.json()
            return str(body["id"])

    def session_key(self, request: Request, uid: str | None) -> str:
        if uid:
            return uid
        guest = request.cookies.get("el_guest")
        if guest:
            return "g:" + guest
        return "ip:" + (request.client.host if request.client else "?")

    # ------------------------------------------------------------------ routes

    async def ping(self, request: Request, route: str) -> Response:
        uid = await self.identity(request)
        if uid is None:
            return JSONResponse({"error": "unauthorized"}, status_code=401)
        wid = request.path_params["webinar_id"]
        db = self.db
        assert db is not None
        async with db.conn() as c:
            # 1. The schema mismatch: `registrations.id` does not exist. The error is
            #    ignored and the viewer is taken for unregistered (the error loop).
            with contextlib.suppress(asyncpg.PostgresError):
                await db.run(
                    c,
                    route,
                    "fetch",
                    "select id from registrations where webinar_id = $1 and user_id = $2",
                    wid,
                    uid,
                )
            # 2. The webinar, for the auto-registration.
            rows = await db.run(
                c, route, "fetch", "select id, status from webinars where id = $1", wid
            )
            if not rows:
                return JSONResponse({"error": "not_found"}, status_code=404)
            # 3. Auto-registration; 23505 for everyone already registered ...
            try:
                await db.run(
                    c,
                    route,
                    "execute",
                    "insert into registrations (webinar_id, user_id, source)"
                    " values ($1, $2, 'auto')",
                    wid,
                    uid,
                )
            except asyncpg.UniqueViolationError:
                # 4. ... followed by a re-select.
                await db.run(
                    c,
                    route,
                    "fetch",
                    "select webinar_id, user_id from registrations"
                    " where webinar_id = $1 and user_id = $2",
                    wid,
                    uid,
                )
            # 5. Presence upsert.
            await db.run(
                c,
                route,
                "execute",
                "insert into webinar_live_presence (webinar_id, user_id, last_seen_at)"
                " values ($1, $2, now()) on conflict (webinar_id, user_id)"
                " do update set last_seen_at = excluded.last_seen_at",
                wid,
                uid,
            )
            # 6. Session update, 7. insert when it is new.
            updated = await db.run(
                c,
                route,
                "fetch",
                "update webinar_user_sessions set last_seen = now(), hits = hits + 1"
                " where webinar_id = $1 and session_key = $2 returning 1",
                wid,
                uid,
            )
            if not updated:
                await db.run(
                    c,
                    route,
                    "execute",
                    "insert into webinar_user_sessions (webinar_id, session_key, user_id)"
                    " values ($1, $2, $2) on conflict do nothing",
                    wid,
                    uid,
                )
        return JSONResponse({"success": True})

    async def track(self, request: Request, route: str) -> Response:
        uid = await self.identity(request)
        wid = request.path_params["webinar_id"]
        key = self.session_key(request, uid)
        db = self.db
        assert db is not None
        async with db.conn() as c:
            if uid is None:
                rows = await db.run(
                    c, route, "fetch", "select id, status from webinars where id = $1", wid
                )
            else:
                rows = await db.run(
                    c,
                    route,
                    "fetch",
                    "select w.id, w.status, exists (select 1 from registrations r"
                    " where r.webinar_id = w.id and r.user_id = $2) as registered"
                    " from webinars w where w.id = $1",
                    wid,
                    uid,
                )
            if not rows:
                return JSONResponse({"error": "not_found"}, status_code=404)
            if uid is not None and not rows[0]["registered"]:
                # Signed in without a registration: +3 queries.
                await db.run(
                    c,
                    route,
                    "fetch",
                    "select webinar_id, user_id from registrations"
                    " where webinar_id = $1 and user_id = $2",
                    wid,
                    uid,
                )
                prof = await db.run(
                    c, route, "fetch", "select full_name from profiles where id = $1", uid
                )
                try:
                    await db.run(
                        c,
                        route,
                        "execute",
                        "insert into registrations (webinar_id, user_id, full_name, source)"
                        " values ($1, $2, $3, 'auto')",
                        wid,
                        uid,
                        prof[0]["full_name"] if prof else None,
                    )
                except asyncpg.UniqueViolationError:
                    # A concurrent ping registered the viewer first (23505, PostgREST's
                    # 409): re-select and go on, as the app does.
                    await db.run(
                        c,
                        route,
                        "fetch",
                        "select webinar_id, user_id from registrations"
                        " where webinar_id = $1 and user_id = $2",
                        wid,
                        uid,
                    )
            await db.run(
                c,
                route,
                "execute",
                "insert into webinar_user_sessions (webinar_id, session_key, user_id)"
                " values ($1, $2, $3) on conflict (webinar_id, session_key)"
                " do update set last_seen = now(), hits = webinar_user_sessions.hits + 1",
                wid,
                key,
                uid,
            )
            await db.run(
                c,
                route,
                "execute",
                "insert into event_access_logs (webinar_id, user_id, session_key)"
                " values ($1, $2, $3)",
                wid,
                uid,
                key,
            )
            if uid is not None:
                await db.run(
                    c,
                    route,
                    "execute",
                    "insert into webinar_live_presence (webinar_id, user_id, last_seen_at)"
                    " values ($1, $2, now()) on conflict (webinar_id, user_id)"
                    " do update set last_seen_at = excluded.last_seen_at",
                    wid,
                    uid,
                )
        return JSONResponse({"tracked": True})

    async def admin_stats(self, request: Request, route: str) -> Response:
        uid = await self.identity(request)
        if uid is None:
            return JSONResponse({"error": "unauthorized"}, status_code=401)
        wid = request.path_params["webinar_id"]
        db = self.db
        assert db is not None
        async with db.conn() as c:
            prof = await db.run(c, route, "fetch", "select role from profiles where id = $1", uid)
            if not prof or prof[0]["role"] not in ("admin", "host"):
                return JSONResponse({"error": "forbidden"}, status_code=403)
            rows = await db.run(
                c,
                route,
                "fetch",
                "select"
                " (select count(*) from webinar_live_presence p where p.webinar_id = $1"
                "   and p.last_seen_at > now() - interval '6 minutes') as online,"
                " (select count(*) from event_access_logs a where a.webinar_id = $1) as accesses,"
                " (select count(distinct a.session_key) from event_access_logs a"
                "   where a.webinar_id = $1) as unique_viewers,"
                " (select count(*) from registrations r where r.webinar_id = $1) as registrations",
                wid,
            )
        return JSONResponse({"webinar_id": wid, **{k: int(v) for k, v in dict(rows[0]).items()}})

    async def chat(self, request: Request, route: str) -> Response:
        uid = await self.identity(request)
        if uid is None:
            return JSONResponse({"error": "unauthorized"}, status_code=401)
        wid = request.path_params["webinar_id"]
        db = self.db
        assert db is not None
        if request.method == "POST":
            body = await request.json()
            async with db.conn() as c:
                rows = await db.run(
                    c,
                    route,
                    "fetch",
                    "insert into chat_messages (webinar_id, user_id, body) values ($1, $2, $3)"
                    " returning id",
                    wid,
                    uid,
                    str(body.get("body", ""))[:500],
                )
            return JSONResponse({"id": rows[0]["id"]}, status_code=201)
        async with db.conn() as c:
            rows = await db.run(
                c,
                route,
                "fetch",
                "select id, user_id, body, created_at from chat_messages where webinar_id = $1"
                " order by id desc limit 50",
                wid,
            )
        return JSONResponse(
            {
                "messages": [
                    {
                        "id": r["id"],
                        "user_id": r["user_id"],
                        "body": r["body"],
                        "created_at": r["created_at"].isoformat(),
                    }
                    for r in reversed(rows)
                ]
            }
        )

    async def auth_user(self, request: Request, route: str) -> Response:
        """Fake GoTrue GET /auth/v1/user: latency, signature + exp, one auth_users read."""
        await asyncio.sleep(self.auth_latency_s)
        auth = request.headers.get("authorization", "")
        token = auth[7:] if auth.lower().startswith("bearer ") else ""
        try:
            claims = jwt.decode(token, self.key, algorithms=["HS256"]).claims
        except (JoseError, ValueError):
            return JSONResponse({"code": 401, "msg": "invalid JWT"}, status_code=401)
        if float(claims.get("exp", 0)) < time.time():
            return JSONResponse({"code": 401, "msg": "token is expired"}, status_code=401)
        db = self.db
        assert db is not None
        async with db.conn() as c:
            rows = await db.run(
                c,
                route,
                "fetch",
                "select id, email, role from auth_users where id = $1",
                str(claims.get("sub", "")),
            )
        if not rows:
            return JSONResponse({"code": 404, "msg": "user not found"}, status_code=404)
        return JSONResponse(dict(rows[0]))

    async def presence_batch(self, request: Request, route: str) -> Response:
        body = await request.body()
        payload = json.loads(body).get("payload")
        db = self.db
        assert db is not None
        async with db.conn() as c:
            rows = await db.run(
                c, route, "fetch", "select edge_presence_batch($1::jsonb) as n", json.dumps(payload)
            )
        return JSONResponse(rows[0]["n"])

    async def access_batch(self, request: Request, route: str) -> Response:
        """PostgREST's answer for a jsonb function is the JSON value itself:
        `{"written": n, "refused": [...]}`."""
        payload = json.loads(await request.body()).get("payload")
        db = self.db
        assert db is not None
        async with db.conn() as c:
            rows = await db.run(
                c, route, "fetch", "select edge_access_batch($1::jsonb) as r", json.dumps(payload)
            )
        return Response(rows[0]["r"], media_type="application/json")

    # ------------------------------------------------------------------ control

    async def sim_stats(self, _request: Request) -> Response:
        return JSONResponse(self.stats.as_dict())

    async def sim_control(self, request: Request) -> Response:
        body = await request.json()
        db = self.db
        assert db is not None
        if "db_latency_ms" in body:
            db.latency_s = float(body["db_latency_ms"]) / 1000
        if "db_down" in body:
            db.down = bool(body["db_down"])
        return JSONResponse({"db_latency_ms": db.latency_s * 1000, "db_down": db.down})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--dsn", required=True)
    # From the environment by default: a secret on the command line shows in `ps`.
    p.add_argument("--jwt-secret", default=os.environ.get("SIM_JWT_SECRET"))
    p.add_argument("--auth-latency-ms", type=float, default=50.0)
    p.add_argument("--gotrue-url", default=None, help="default: this process (/auth/v1/user)")
    p.add_argument("--pool-size", type=int, default=10)
    p.add_argument(
        "--statement-ms",
        type=float,
        default=0.0,
        help="database cost per statement, held on the connection (S3's constrained app)",
    )
    a = p.parse_args(argv)
    if not a.jwt_secret:
        p.error("--jwt-secret or SIM_JWT_SECRET is required")
    sim = SimApp(
        a.dsn,
        a.jwt_secret,
        a.auth_latency_ms / 1000,
        a.gotrue_url or f"http://127.0.0.1:{a.port}",
        a.pool_size,
        a.statement_ms / 1000,
    )
    uvicorn.run(
        sim.app(),
        host="127.0.0.1",
        port=a.port,
        log_level="warning",
        access_log=False,
        backlog=4096,
        timeout_keep_alive=75,
    )


if __name__ == "__main__":
    main()
