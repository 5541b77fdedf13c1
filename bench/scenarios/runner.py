"""Scenario runner: `python -m bench s1|s2|s3|all [--quick] [--viewers N] [--minutes M]
[--time-scale X] [--json F] [--out DIR]`.

Owns the scenario definitions (S1 normal load, S2 Realtime outage, S3 two webinars + a
join surge, each with a full and a `--quick` size of the same shape) and one run of a
scenario: for each side (`direct`, `gateway` with bulk joins, and in S1 also
`gateway_join_forward`, where each viewer's first heartbeat reaches the app) a fresh
PostgreSQL database with bench/schema.sql + sql/edge_{presence,access}_batch.sql and the
same seeded population, the sim app (bench/sim_app.py) as a subprocess, on the gateway
sides `python -m gateway` with the Redis store in front of it, the same client behaviours
(bench/scenarios/clients.py), a sampler of the sim app's counters for the time series,
the S2 fault injection, the `pg_stat_database` reading that cross-checks the query count,
and the database's last-seen per viewer against the client's (no heartbeat lost). Then it
writes the JSON report, the Markdown summary and the PNG chart (bench/scenarios/report.py,
chart.py).

All time-based things are compressed by the time scale X: the client rhythm, the
scenario's phases, and the gateway's own intervals and TTLs (a 10 s cache TTL becomes
10/X s), so the ratios the targets are about stay those of real time. Rates are reported
per *scenario* minute.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import multiprocessing
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from joserfc import jwt
from joserfc.jwk import OctKey

from bench import common
from bench.scenarios import report
from bench.scenarios.clients import Admin, Clock, Env, Recorder, Viewer, admin, viewer

ROOT = common.ROOT
SCHEMA = ROOT / "bench" / "schema.sql"
BATCH_SQL = ROOT / "sql" / "edge_presence_batch.sql"
ACCESS_SQL = ROOT / "sql" / "edge_access_batch.sql"
ISSUER = "http://127.0.0.1:9999/auth/v1"
DEFAULT_PG = os.environ.get("BENCH_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
DEFAULT_REDIS = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/8")


# ------------------------------------------------------------------ scenarios


@dataclass
class Phase:
    name: str
    start: float  # scenario minutes
    end: float
    db_latency_ms: float = 0.0
    db_down: bool = False
    realtime_down: bool = False


@dataclass
class Spec:
    name: str
    viewers: int
    minutes: float
    time_scale: float
    quick: bool = False
    webinars: list[str] = field(default_factory=lambda: ["webinar-a"])
    join_window: float = 2.0  # minutes
    admins: int = 0
    surge: int = 0  # extra viewers joining the last webinar
    surge_at: float = 0.0  # minutes
    surge_window: float = 0.5
    phases: list[Phase] = field(default_factory=list)
    chat: bool = False  # 5 % of the signed-in viewers post a chat message every minute
    # Gateway: access/track heartbeat forward_interval in scenario seconds (shipped: 900;
    # in batch mode a viewer silent this long joins again).
    track_forward: float = 900.0
    # Gateway: how often each batch route flushes, scenario seconds (shipped: 30).
    flush_interval: float = 30.0
    # Gateway sides to run: side name -> heartbeat `join` mode.
    gateway_sides: dict[str, str] = field(default_factory=lambda: {"gateway": "batch"})
    auth_latency_ms: float = 50.0
    # The sim app's database budget: pool size and cost per statement (S3 constrains it).
    pool_size: int = 10
    statement_ms: float = 0.0
    # Gateway: per-webinar cap on in-flight requests to the app (0: none).
    bulkhead: int = 0

    @property
    def duration_s(self) -> float:
        return self.minutes * 60

    @property
    def wall_s(self) -> float:
        return self.duration_s / self.time_scale


QUICK = {  # viewers, minutes, time scale: ~30 s of wall time per side
    "s1": (150, 62.0, 120.0),
    "s2": (50, 6.0, 12.0),
    "s3": (200, 10.0, 20.0),
}
FULL = {"s1": (1000, 62.0, 1.0), "s2": (1000, 20.0, 1.0), "s3": (1000, 30.0, 1.0)}


def build_spec(
    name: str,
    quick: bool = False,
    viewers: int | None = None,
    minutes: float | None = None,
    time_scale: float | None = None,
) -> Spec:
    n, m, x = (QUICK if quick else FULL)[name]
    n = viewers or n
    m = minutes or m
    x = time_scale or x
    spec = Spec(name, n, m, x, quick)
    if name == "s1":
        # 1,000 viewers join within 2 minutes and watch for 60; through the gateway with
        # bulk joins and, beside it, with each viewer's first heartbeat forwarded.
        spec.join_window = min(2.0, m / 4)
        spec.gateway_sides = {"gateway": "batch", "gateway_join_forward": "forward"}
    elif name == "s2":
        # Realtime drops: every client falls back to chat polling; the app slows (DB
        # latency), then fails, then recovers.
        spec.join_window = min(2.0, m * 0.1)
        spec.chat = True
        f = [0.0, 0.15, 0.35, 0.55, 0.75, 1.0]
        spec.phases = [
            Phase("normal", f[0] * m, f[1] * m),
            Phase("realtime_down", f[1] * m, f[2] * m, realtime_down=True),
            Phase("app_slow", f[2] * m, f[3] * m, db_latency_ms=150, realtime_down=True),
            Phase("app_failing", f[3] * m, f[4] * m, db_down=True, realtime_down=True),
            Phase("recovered", f[4] * m, f[5] * m, realtime_down=True),
        ]
    elif name == "s3":
        # Two webinars of N/2, 5 admin dashboards; the second webinar gets a join surge
        # of another N/2 viewers within 30 s.
        spec.webinars = ["webinar-a", "webinar-b"]
        spec.join_window = min(2.0, m * 0.1)
        spec.admins = 5
        spec.chat = True
        spec.surge = n // 2
        spec.surge_at = m * 0.4
        spec.surge_window = min(0.5, m * 0.05)
        # A database with a budget (5 connections, 4 ms a statement at the quick size:
        # ~1,000 statements/s) that carries the two webinars but not the surge's join
        # burst, so the direct run shows what the surge does to the other webinar. The
        # wall-clock load grows with viewers x time scale: the cost per statement shrinks
        # with it, so every size saturates alike. Through the gateway a per-webinar
        # bulkhead keeps one webinar's admin polls and chat posts to 3 in flight.
        spec.pool_size = 5
        spec.statement_ms = round(4.0 * (200 * 20.0) / (n * x), 3)
        spec.bulkhead = 3
    else:
        raise ValueError(f"unknown scenario {name!r}")
    return spec


# ------------------------------------------------------------------ population


@dataclass
class Population:
    secret: str
    viewers: list[Viewer]
    admins: list[Admin]


def _token(key: OctKey, uid: str, role: str = "authenticated") -> str:
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "aud": "authenticated",
        "sub": uid,
        "role": role,
        "iat": now,
        "exp": now + 6 * 3600,
        "session_id": str(uuid.uuid4()),
    }
    return jwt.encode({"alg": "HS256"}, claims, key)


def build_population(spec: Spec, seed: int = 42) -> Population:
    """The same browsers for both sides: 20 % guests, 40 % signed in and registered,
    40 % signed in without a registration (auto-registered by ping/track); in S2/S3 5 %
    of the signed-in post chat messages."""
    rnd = random.Random(seed)
    secret = secrets.token_urlsafe(32)
    key = OctKey.import_key(secret)
    viewers: list[Viewer] = []

    def add(i: int, webinar: str, join_at: float) -> None:
        kind = i % 10
        if kind < 2:
            viewers.append(Viewer(webinar, join_at, guest_id=f"guest-{i}-{rnd.getrandbits(32):x}"))
            return
        uid = str(uuid.UUID(int=rnd.getrandbits(128), version=4))
        viewers.append(
            Viewer(
                webinar,
                join_at,
                uid=uid,
                token=_token(key, uid),
                registered=kind < 6,
                chatter=spec.chat and i % 20 == 2,
            )
        )

    for i in range(spec.viewers):
        add(i, spec.webinars[i % len(spec.webinars)], rnd.uniform(0, spec.join_window * 60))
    for j in range(spec.surge):
        t = spec.surge_at * 60 + rnd.uniform(0, spec.surge_window * 60)
        add(spec.viewers + j, spec.webinars[-1], t)
    admins = []
    for k in range(spec.admins):
        uid = str(uuid.UUID(int=rnd.getrandbits(128), version=4))
        admins.append(Admin(uid, _token(key, uid), spec.webinars[k % len(spec.webinars)]))
    return Population(secret, viewers, admins)


# ------------------------------------------------------------------ database


def _dsn_with_db(dsn: str, db: str) -> str:
    base, _, _ = dsn.rpartition("/")
    return f"{base}/{db}"


async def create_database(admin_dsn: str, name: str, spec: Spec, pop: Population) -> str:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'drop database if exists "{name}" with (force)')
        await conn.execute(f'create database "{name}"')
    finally:
        await conn.close()
    dsn = _dsn_with_db(admin_dsn, name)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(SCHEMA.read_text())
        await conn.execute(BATCH_SQL.read_text())
        await conn.execute(ACCESS_SQL.read_text())
        await conn.executemany(
            "insert into webinars (id, title) values ($1, $2)",
            [(w, f"Bench {w}") for w in spec.webinars],
        )
        users = [(v.uid, "viewer") for v in pop.viewers if v.uid] + [
            (a.uid, "admin") for a in pop.admins
        ]
        await conn.copy_records_to_table(
            "auth_users",
            records=[(u, f"{u[:8]}@bench.test") for u, _ in users],
            columns=["id", "email"],
        )
        await conn.copy_records_to_table(
            "profiles",
            records=[(u, f"User {u[:8]}", r) for u, r in users],
            columns=["id", "full_name", "role"],
        )
        await conn.copy_records_to_table(
            "registrations",
            records=[(v.webinar, v.uid, "form") for v in pop.viewers if v.uid and v.registered],
            columns=["webinar_id", "user_id", "source"],
        )
        await conn.copy_records_to_table(
            "chat_messages",
            records=[(w, "seed", f"message {i}") for w in spec.webinars for i in range(30)],
            columns=["webinar_id", "user_id", "body"],
        )
    finally:
        await conn.close()
    return dsn


async def drop_database(admin_dsn: str, name: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'drop database if exists "{name}" with (force)')
    finally:
        await conn.close()


async def pg_xact(admin_dsn: str, name: str) -> dict[str, int]:
    """Transactions of the bench database, read from another database's connection so the
    reading does not count itself."""
    conn = await asyncpg.connect(admin_dsn)
    try:
        row = await conn.fetchrow(
            "select xact_commit, xact_rollback from pg_stat_database where datname = $1", name
        )
    finally:
        await conn.close()
    return {"xact_commit": int(row["xact_commit"]), "xact_rollback": int(row["xact_rollback"])}


async def db_last_seen(dsn: str) -> dict[str, dict[str, float]]:
    """Per signed-in viewer: presence last_seen_at, session last_seen and watch time."""
    conn = await asyncpg.connect(dsn)
    try:
        pres = await conn.fetch(
            "select user_id, extract(epoch from max(last_seen_at))::float8 as t"
            " from webinar_live_presence group by user_id"
        )
        sess = await conn.fetch(
            "select user_id, extract(epoch from max(last_seen))::float8 as t,"
            " sum(watch_seconds)::float8 as w from webinar_user_sessions"
            " where user_id is not null group by user_id"
        )
    finally:
        await conn.close()
    out: dict[str, dict[str, float]] = {r["user_id"]: {"presence": r["t"]} for r in pres}
    for r in sess:
        out.setdefault(r["user_id"], {}).update({"session": r["t"], "watch_s": r["w"]})
    return out


# ------------------------------------------------------------------ processes


@dataclass
class SimProcess:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.contextmanager
def sim_app(dsn: str, secret: str, spec: Spec) -> Iterator[SimProcess]:
    port = common.free_port()
    workdir = Path(tempfile.mkdtemp(prefix="bench-sim-"))
    log_path = workdir / "sim.log"
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.sim_app",
            "--port",
            str(port),
            "--dsn",
            dsn,
            "--auth-latency-ms",
            str(spec.auth_latency_ms),
            "--pool-size",
            str(spec.pool_size),
            "--statement-ms",
            str(spec.statement_ms),
        ],
        cwd=ROOT,
        env={**os.environ, "SIM_JWT_SECRET": secret},
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
    )
    sim = SimProcess(proc, port, log_path)
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                raise common.BenchError(f"sim app exited: {log_path.read_text()[-2000:]}")
            with contextlib.suppress(OSError):
                if common.http_get(sim.url + "/healthz", 1.0)[0] == 200:
                    break
            if time.monotonic() > deadline:
                raise common.BenchError(f"sim app not ready: {log_path.read_text()[-2000:]}")
            time.sleep(0.1)
        yield sim
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        log.close()
        with contextlib.suppress(OSError):
            log_path.unlink()
            workdir.rmdir()


def _d(seconds: float, scale: float) -> str:
    """A scenario duration as a gateway duration in wall time."""
    return f"{max(1, round(seconds / scale * 1000))}ms"


def gateway_config(
    app_url: str,
    redis_url: str,
    prefix: str,
    secret: str,
    spec: Spec,
    join: str = "batch",
) -> dict[str, Any]:
    """The shipped config.yaml's routes, intervals divided by the time scale, the Redis
    store, presence pings and access tracks in batch mode with `join` (their flushes go
    to the sim app's RPC endpoint, i.e. edge_access_batch on PostgreSQL), the chat poll
    micro-cache of docs/breaker.md, and (`spec.bulkhead`) a per-webinar concurrency cap
    on the routes whose requests reach the app."""
    port, admin_port = common.free_port(), common.free_port()

    def d(seconds: float) -> str:
        return _d(seconds, spec.time_scale)

    routes = _heartbeat_routes(spec, join) + _app_routes(spec)
    if spec.bulkhead:
        # Only where requests reach the app: the concurrency policy runs before heartbeat
        # and cache, so on those routes it would also count what the edge answers.
        for r in routes:
            if r["name"] in ("admin_stats", "chat_post"):
                r["concurrency"] = {"by": "webinar", "max": spec.bulkhead, "retry_after": "1s"}
    routes.append(
        {
            "name": "default",
            "match": {"path": "/{path:path}"},
            "upstream": "app",
            "auth": "optional",
        }
    )
    return {
        "server": {
            "listen": f"127.0.0.1:{port}",
            "admin_listen": f"127.0.0.1:{admin_port}",
            "access_log": False,
            "log_level": "warning",
            "drain_timeout": "2s",
        },
        # A store call on this busy 2-core box can take longer than the 50 ms default.
        "store": {"url": redis_url, "key_prefix": prefix, "timeout": "250ms"},
        "upstreams": {
            "app": {"url": app_url, "read_timeout": "15s"},
            "supabase": {"url": app_url, "read_timeout": "15s"},
        },
        "auth": {"issuer": ISSUER, "audience": "authenticated", "hs256_secret": secret},
        "client": {
            "presence_ping_interval": d(120),
            "access_track_interval": d(300),
            "chat_fallback_interval": d(2),
            "admin_polling_interval": d(10),
        },
        "routes": routes,
    }


API = "/api/webinars/{webinar_id}"


def _heartbeat_routes(spec: Spec, join: str) -> list[dict[str, Any]]:
    """presence_ping and access_track as shipped: batch mode, flushed to edge_access_batch."""

    def d(seconds: float) -> str:
        return _d(seconds, spec.time_scale)

    batch = {
        "mode": "batch",
        "join": join,
        "flush_interval": d(spec.flush_interval),
        "flush_upstream": "supabase",
        "flush_url": "/rest/v1/rpc/edge_access_batch",
    }
    return [
        {
            "name": "presence_ping",
            "match": {"methods": ["POST"], "path": f"{API}/presence/ping"},
            "upstream": "app",
            "auth": "required",
            "heartbeat": {**batch, "forward_interval": d(300)},
        },
        {
            "name": "access_track",
            "match": {"methods": ["POST"], "path": f"{API}/access/track"},
            "upstream": "app",
            "auth": "optional",
            "heartbeat": {
                **batch,
                "forward_interval": d(spec.track_forward),
                "key": ["user", "cookie:el_guest", "ip"],
            },
        },
    ]


def _app_routes(spec: Spec) -> list[dict[str, Any]]:
    """admin_stats (cached), chat_poll (micro-cache + breaker + rate limit), chat_post."""

    def d(seconds: float) -> str:
        return _d(seconds, spec.time_scale)

    return [
        {
            "name": "admin_stats",
            "match": {"methods": ["GET"], "path": f"{API}/stats/access"},
            "upstream": "app",
            "auth": "required",
            "cache": {
                "ttl": d(10),
                "stale_while_revalidate": d(20),
                "stale_if_error": d(300),
                "authz_ttl": d(300),
                "deny_ttl": d(30),
            },
        },
        {
            "name": "chat_poll",
            "match": {"methods": ["GET"], "path": f"{API}/chat/messages"},
            "upstream": "app",
            "auth": "required",
            "cache": {
                "ttl": d(1),
                "stale_if_error": d(300),
                "authz_ttl": d(300),
                "authorize": {"claim": "role", "in": ["authenticated"]},
            },
            "breaker": {
                "group": "chat",
                "failure_threshold": 5,
                "window": d(10),
                "cooldown": d(30),
                "max_cooldown": d(300),
            },
            "rate_limit": [{"by": "user", "rate": f"{2 * spec.time_scale:g}/s", "burst": 5}],
        },
        {
            "name": "chat_post",
            "match": {"methods": ["POST"], "path": f"{API}/chat/messages"},
            "upstream": "app",
            "auth": "required",
        },
    ]


async def _delete_prefix(redis_url: str, prefix: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.from_url(redis_url)
    try:
        batch: list[bytes] = []
        async for k in client.scan_iter(match=prefix + "*", count=1000):
            batch.append(k)
            if len(batch) >= 1000:
                await client.delete(*batch)
                batch = []
        if batch:
            await client.delete(*batch)
    finally:
        await client.aclose()


# ------------------------------------------------------------------ one side


@dataclass
class SideRaw:
    side: str
    samples: list[Any]
    timeline: list[dict[str, Any]]  # [{"t": scenario s, "stats": sim counters}]
    final: dict[str, Any]
    pg: dict[str, int]
    wall_s: float
    cpu_s: dict[str, float]
    gateway_metrics: dict[str, float] = field(default_factory=dict)
    # Signed-in viewers: user id -> what the database holds (epoch seconds) ...
    db_viewers: dict[str, dict[str, float]] = field(default_factory=dict)
    # ... and the wall time of their first and last heartbeat the app or edge accepted.
    client_viewers: dict[str, tuple[float, float]] = field(default_factory=dict)


async def _get_json(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with http.get(url) as resp:
        data: dict[str, Any] = await resp.json()
        return data


def drive_all(
    spec: Spec, pop: Population, base_url: str, sim_url: str
) -> tuple[Recorder, list[dict[str, Any]], float]:
    """Run the scenario's clients. With a surge (S3), the surging webinar's browsers run
    in a second process: in one event loop the surge's client work would delay the
    other webinar's requests and show up in its measured p95 (real browsers do not
    share a CPU). Both processes start at the same monotonic instant."""
    if not spec.surge:
        return asyncio.run(drive(spec, pop, base_url, sim_url))
    surging = spec.webinars[-1]
    rest = Population(pop.secret, [v for v in pop.viewers if v.webinar != surging], pop.admins)
    surge = Population(pop.secret, [v for v in pop.viewers if v.webinar == surging], [])
    # fork: nothing is running in this process yet, and the child needs no re-import.
    ctx = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        t0 = time.monotonic() + 2.0
        other = pool.submit(_drive_process, spec, surge, base_url, sim_url, t0)
        rec, timeline, wall = asyncio.run(drive(spec, rest, base_url, sim_url, t0=t0))
        part = other.result()
    rec.samples += part.samples
    rec.hb_first.update(part.hb_first)
    rec.hb_last.update(part.hb_last)
    return rec, timeline, wall


def _drive_process(spec: Spec, pop: Population, base_url: str, sim_url: str, t0: float) -> Any:
    rec, _, _ = asyncio.run(drive(spec, pop, base_url, sim_url, t0=t0, sample=False))
    return rec


async def drive(
    spec: Spec,
    pop: Population,
    base_url: str,
    sim_url: str,
    *,
    t0: float | None = None,
    sample: bool = True,
) -> tuple[Recorder, list[dict[str, Any]], float]:
    """Run the given clients against base_url from monotonic time t0 (default: now);
    with `sample`, also sample the sim's counters and run the fault phases."""
    rec = Recorder()
    timeout = aiohttp.ClientTimeout(total=15)
    connector = aiohttp.TCPConnector(limit=2000, limit_per_host=0, force_close=False)
    timeline: list[dict[str, Any]] = []
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as control,
        aiohttp.ClientSession(connector=connector, timeout=timeout) as http,
    ):
        if t0 is not None:
            await asyncio.sleep(max(0.0, t0 - time.monotonic()))
        clock = Clock(spec.time_scale, t0)
        env = Env(base_url, http, clock, spec.duration_s, rec)
        tasks = []
        if sample:
            tasks = [
                asyncio.create_task(_sampler(spec, clock, control, sim_url, timeline)),
                asyncio.create_task(_controller(spec, env, control, sim_url)),
            ]
        start = time.monotonic()
        await asyncio.gather(
            *(viewer(env, v) for v in pop.viewers),
            *(
                admin(env, a, start=(i / max(1, len(pop.admins))) * 5)
                for i, a in enumerate(pop.admins)
            ),
        )
        wall = time.monotonic() - start
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if sample:
            timeline.append(
                {"t": clock.now(), "stats": await _get_json(control, sim_url + "/_sim/stats")}
            )
            async with control.post(
                sim_url + "/_sim/control", json={"db_latency_ms": 0, "db_down": False}
            ) as resp:
                await resp.read()
    return rec, timeline, wall


async def _sampler(
    spec: Spec,
    clock: Clock,
    control: aiohttp.ClientSession,
    sim_url: str,
    timeline: list[dict[str, Any]],
) -> None:
    """The sim app's counters, ~60 points per run, at most 4 a second."""
    bucket_wall = max(0.25, spec.wall_s / 60)
    while True:
        t = clock.now()
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
            timeline.append({"t": t, "stats": await _get_json(control, sim_url + "/_sim/stats")})
        await asyncio.sleep(bucket_wall)


async def _controller(spec: Spec, env: Env, control: aiohttp.ClientSession, sim_url: str) -> None:
    """S2's phases: Realtime down for the clients, DB latency / outage in the sim app."""
    for ph in spec.phases:
        await env.clock.sleep_until(ph.start * 60)
        if ph.realtime_down:
            env.realtime_down.set()
        async with control.post(
            sim_url + "/_sim/control",
            json={"db_latency_ms": ph.db_latency_ms, "db_down": ph.db_down},
        ) as resp:
            await resp.read()
    # Stays until cancelled at the end of the run, like the sampler.
    await asyncio.Event().wait()


def _gateway_metrics(admin_url: str) -> dict[str, float]:
    """A few edge_* counters summed per metric and result label (what the gateway did)."""
    status, body = common.http_get(admin_url + "/metrics", 5.0)
    out: dict[str, float] = {}
    if status != 200:
        return out
    wanted = (
        "edge_store_fallbacks_total",
        "edge_heartbeat",
        "edge_cache_results_total",
        "edge_breaker_transitions_total",
        "edge_ratelimit",
        "edge_concurrency",
    )
    for line in body.decode().splitlines():
        if line.startswith("#") or not line.startswith(wanted):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        if name.endswith(("_created", "_bucket", "_sum", "_count")):
            continue
        labels = name_labels[len(name) :].strip("{}")
        keep = [
            p for p in labels.split(",") if p.split("=")[0] in ("result", "outcome", "to", "mode")
        ]
        key = name + ("{" + ",".join(keep) + "}" if keep else "")
        with contextlib.suppress(ValueError):
            out[key] = out.get(key, 0.0) + float(value)
    return {k: v for k, v in out.items() if v}


def run_side(
    side: str, spec: Spec, pop: Population, admin_dsn: str, redis_url: str, tag: str
) -> SideRaw:
    dbname = f"edge_bench_{tag}_{side}"
    dsn = asyncio.run(create_database(admin_dsn, dbname, spec, pop))
    try:
        with sim_app(dsn, pop.secret, spec) as sim:
            pg0 = asyncio.run(pg_xact(admin_dsn, dbname))
            cpu0 = {"sim_app": common.tree_cpu_seconds(sim.proc.pid)}
            gw_metrics: dict[str, float] = {}
            if side == "direct":
                rec, timeline, wall = drive_all(spec, pop, sim.url, sim.url)
                cpu = {"sim_app": common.tree_cpu_seconds(sim.proc.pid) - cpu0["sim_app"]}
            else:
                prefix = f"edge-bench:{tag}:"
                cfg = gateway_config(
                    sim.url, redis_url, prefix, pop.secret, spec, spec.gateway_sides[side]
                )
                try:
                    with common.gateway(cfg) as gw:
                        cpu0["gateway"] = common.tree_cpu_seconds(gw.proc.pid)
                        rec, timeline, wall = drive_all(spec, pop, gw.url, sim.url)
                        cpu = {
                            "sim_app": common.tree_cpu_seconds(sim.proc.pid) - cpu0["sim_app"],
                            "gateway": common.tree_cpu_seconds(gw.proc.pid) - cpu0["gateway"],
                        }
                        gw_metrics = _gateway_metrics(gw.admin_url)
                    # The gateway flushed its last batches on SIGTERM.
                finally:
                    asyncio.run(_delete_prefix(redis_url, prefix))
            final = json.loads(common.http_get(sim.url + "/_sim/stats", 5.0)[1])
        # The sim app's connections are closed: their statistics are flushed.
        time.sleep(0.6)
        pg1 = asyncio.run(pg_xact(admin_dsn, dbname))
        # Read after pg1, so the check does not count in the cross-check.
        seen = asyncio.run(db_last_seen(dsn))
    finally:
        asyncio.run(drop_database(admin_dsn, dbname))
    pg = {k: pg1[k] - pg0[k] for k in pg0}
    raw = SideRaw(side, rec.samples, timeline, final, pg, wall, cpu, gw_metrics)
    raw.db_viewers = seen
    raw.client_viewers = {u: (rec.hb_first[u], t) for u, t in rec.hb_last.items()}
    return raw


# ------------------------------------------------------------------ scenario


def run_scenario(
    spec: Spec,
    out_dir: Path | None = None,
    json_path: Path | None = None,
    *,
    admin_dsn: str = DEFAULT_PG,
    redis_url: str = DEFAULT_REDIS,
    chart: bool = True,
) -> dict[str, Any]:
    """Run both sides and write the report files; returns the JSON report."""
    pop = build_population(spec)
    tag = f"{spec.name}_{os.getpid()}_{secrets.token_hex(3)}"
    t0 = time.monotonic()
    sides = ["direct", *spec.gateway_sides]
    raws = [run_side(side, spec, pop, admin_dsn, redis_url, tag) for side in sides]
    rep = report.build(spec, pop, raws)
    rep["env"] = {
        "uptime": common.uptime(),
        "cpus": os.cpu_count(),
        "wall_s": round(time.monotonic() - t0, 1),
    }
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        suffix = "-quick" if spec.quick else ""
        if spec.track_forward != 900.0:
            suffix += f"-track{spec.track_forward:g}s"
        stem = f"{spec.name}{suffix}"
        json_path = json_path or out_dir / f"{stem}.json"
        if chart:
            from bench.scenarios import chart as chart_mod

            png = out_dir / f"{stem}.png"
            rep["chart"] = _rel(png) if chart_mod.render(rep, png) else None
        (out_dir / f"{stem}.md").write_text(report.markdown(rep))
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(rep, indent=2) + "\n")
    return rep


def _rel(p: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(p.resolve().relative_to(ROOT))
    return str(p)


def _spec_from_args(name: str, a: argparse.Namespace) -> Spec:
    spec = build_spec(name, a.quick, a.viewers, a.minutes, a.time_scale)
    spec.track_forward = a.track_forward
    spec.flush_interval = a.flush_interval
    if a.join in ("batch", "forward"):
        spec.gateway_sides = {"gateway": a.join}
    elif a.join == "both":
        spec.gateway_sides = {"gateway": "batch", "gateway_join_forward": "forward"}
    return spec


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench", description="EventLive load scenarios S1-S3"
    )
    p.add_argument("scenario", choices=["s1", "s2", "s3", "all"])
    p.add_argument("--quick", action="store_true", help="same shape, < 90 s of wall time each")
    p.add_argument("--viewers", type=int)
    p.add_argument("--minutes", type=float, help="scenario minutes")
    p.add_argument("--time-scale", type=float, help="scenario seconds per wall second")
    p.add_argument("--json", type=Path, help="JSON report path (default: OUT/<scenario>.json)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument(
        "--track-forward",
        type=float,
        default=900.0,
        help="gateway access_track forward_interval, scenario seconds (shipped config: 900)",
    )
    p.add_argument(
        "--flush-interval",
        type=float,
        default=30.0,
        help="gateway heartbeat flush_interval, scenario seconds (shipped config: 30)",
    )
    p.add_argument(
        "--join",
        choices=["batch", "forward", "both"],
        help="gateway heartbeat join mode(s) to run (default: both in s1, batch otherwise)",
    )
    p.add_argument("--no-chart", action="store_true")
    p.add_argument(
        "--pg",
        default=DEFAULT_PG,
        help="DSN of an existing database (bench DBs are created beside it)",
    )
    p.add_argument("--redis", default=DEFAULT_REDIS)
    a = p.parse_args(argv)
    names = ["s1", "s2", "s3"] if a.scenario == "all" else [a.scenario]
    for name in names:
        spec = _spec_from_args(name, a)
        print(
            f"{name}: {spec.viewers} viewers, {spec.minutes:g} scenario min, time scale "
            f"{spec.time_scale:g} (~{spec.wall_s:.0f} s per side)",
            flush=True,
        )
        rep = run_scenario(
            spec,
            a.out,
            a.json if len(names) == 1 else None,
            admin_dsn=a.pg,
            redis_url=a.redis,
            chart=not a.no_chart,
        )
        print(report.markdown(rep), flush=True)
    return 0
