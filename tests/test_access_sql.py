"""sql/edge_access_batch.sql on the local PostgreSQL: the file loads onto a Supabase-shaped
schema (uuid ids, no watch_seconds column yet), and the function, fed the exact body the
gateway's flush sends, registers joining viewers, refuses the ones it must, and
accumulates watch time exactly once under duplicate, retried, late and concurrent
flushes. Runs in a scratch schema that is dropped afterwards."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from gateway.policies.heartbeat.policy import flush_body

SQL = Path(__file__).resolve().parent.parent / "sql" / "edge_access_batch.sql"
DSN = os.environ.get(
    "TEST_PG_DSN",
    f"postgresql://postgres@{os.environ.get('PGHOST', '127.0.0.1')}:5432/"
    f"{os.environ.get('PGDATABASE', 'test')}",
)
LIVE = "11111111-1111-4111-8111-111111111111"
ENDED = "22222222-2222-4222-8222-222222222222"
UNKNOWN = "33333333-3333-4333-8333-333333333333"
U1 = "00000000-0000-4000-8000-000000000001"
U2 = "00000000-0000-4000-8000-000000000002"
U3 = "00000000-0000-4000-8000-000000000003"

# Supabase-shaped tables (uuid ids) as the review describes them.
TABLES = """
create table webinars (id uuid primary key, title text, status text not null default 'live');
create table profiles (id uuid primary key, full_name text);
create table registrations (
  webinar_id uuid not null references webinars (id), user_id uuid not null,
  full_name text, source text not null default 'form',
  created_at timestamptz not null default now(), primary key (webinar_id, user_id));
create table webinar_user_sessions (
  webinar_id uuid not null, session_key text not null, user_id uuid,
  first_seen timestamptz not null default now(), last_seen timestamptz not null default now(),
  hits integer not null default 1, primary key (webinar_id, session_key));
create table event_access_logs (
  id bigserial primary key, webinar_id uuid not null, user_id uuid,
  session_key text not null, event text not null default 'view',
  created_at timestamptz not null default now());
create table webinar_live_presence (
  id bigserial primary key, webinar_id uuid not null, user_id uuid not null,
  last_seen_at timestamptz not null, unique (webinar_id, user_id));
"""


@pytest.fixture
async def db() -> AsyncIterator[asyncpg.Pool]:
    name = "access_scratch_" + uuid.uuid4().hex[:12]
    admin = await asyncpg.connect(DSN)
    try:
        await admin.execute(f"create schema {name}")
    finally:
        await admin.close()
    pool = await asyncpg.create_pool(
        DSN, min_size=2, max_size=2, server_settings={"search_path": name}
    )
    try:
        async with pool.acquire() as c:
            await c.execute(TABLES)
            await c.executemany(
                "insert into webinars (id, title, status) values ($1, $2, $3)",
                [(uuid.UUID(LIVE), "live one", "live"), (uuid.UUID(ENDED), "over", "ended")],
            )
            await c.executemany(
                "insert into profiles (id, full_name) values ($1, $2)",
                [(uuid.UUID(U1), "Ada"), (uuid.UUID(U2), "Grace")],
            )
            await c.execute(SQL.read_text())
        yield pool
    finally:
        await pool.close()
        admin = await asyncpg.connect(DSN)
        try:
            await admin.execute(f"drop schema {name} cascade")
        finally:
            await admin.close()


def at(minute: int, second: float = 0.0) -> str:
    return f"2026-11-26T10:{minute:02d}:{second:06.3f}+00:00"


async def call(pool: asyncpg.Pool, body: bytes) -> dict[str, Any]:
    # PostgREST hands the request body's `payload` member to the function's parameter.
    payload = json.dumps(json.loads(body)["payload"])
    async with pool.acquire() as c:
        out = await c.fetchval("select edge_access_batch($1::jsonb)", payload)
    result: dict[str, Any] = json.loads(out)
    return result


async def sessions(pool: asyncpg.Pool) -> dict[str, tuple[str, int, float]]:
    """user id -> (last_seen HH:MM:SS, hits, watch_seconds)."""
    async with pool.acquire() as c:
        rows = await c.fetch(
            "select user_id::text as u, to_char(last_seen at time zone 'UTC', 'HH24:MI:SS') as t,"
            " hits, watch_seconds from webinar_user_sessions"
        )
    return {r["u"]: (r["t"], r["hits"], r["watch_seconds"]) for r in rows}


async def scalar(pool: asyncpg.Pool, sql: str) -> Any:
    async with pool.acquire() as c:
        return await c.fetchval(sql)


async def test_join_registers_writes_and_logs_the_entry(db: asyncpg.Pool) -> None:
    body = flush_body(
        LIVE,
        [
            {"user_id": U1, "last_seen_at": at(0), "join": True},
            {"user_id": U2, "last_seen_at": at(0, 1.5)},
        ],
    )
    assert await call(db, body) == {"written": 2, "refused": []}
    assert await sessions(db) == {U1: ("10:00:00", 1, 0.0), U2: ("10:00:01", 1, 0.0)}
    # Only the joining viewer is registered, with the profile's name and no 23505.
    regs = await scalar(
        db, "select json_agg(json_build_array(user_id, full_name, source)) from registrations"
    )
    assert json.loads(regs) == [[U1, "Ada", "auto"]]
    assert await scalar(db, "select count(*) from webinar_live_presence") == 2
    # One access-log row per session created (the viewer's entry).
    assert await scalar(db, "select count(*) from event_access_logs") == 2
    # A viewer already registered joins again: nothing new, no error.
    body = flush_body(LIVE, [{"user_id": U1, "last_seen_at": at(1), "join": True}])
    assert await call(db, body) == {"written": 1, "refused": []}
    assert await scalar(db, "select count(*) from registrations") == 1
    assert await scalar(db, "select count(*) from event_access_logs") == 2


async def test_watch_time_is_counted_once(db: asyncpg.Pool) -> None:
    first = flush_body(LIVE, [{"user_id": U1, "last_seen_at": at(0), "join": True}])
    second = flush_body(LIVE, [{"user_id": U1, "last_seen_at": at(5)}])
    third = flush_body(LIVE, [{"user_id": U1, "last_seen_at": at(10)}])
    await call(db, first)
    await call(db, second)
    assert (await sessions(db))[U1] == ("10:05:00", 2, 300.0)
    # A duplicate flush (two replicas) and a retry after a timeout that did reach the
    # database add nothing.
    await call(db, second)
    await call(db, second)
    assert (await sessions(db))[U1] == ("10:05:00", 2, 300.0)
    # A late, older flush neither moves last_seen back nor adds time.
    await call(db, first)
    assert (await sessions(db))[U1] == ("10:05:00", 2, 300.0)
    await call(db, third)
    assert (await sessions(db))[U1] == ("10:10:00", 3, 600.0)
    # Out of order: the newer flush lands first and covers the whole gap.
    await call(db, flush_body(LIVE, [{"user_id": U1, "last_seen_at": at(20)}]))
    await call(db, flush_body(LIVE, [{"user_id": U1, "last_seen_at": at(15)}]))
    assert (await sessions(db))[U1] == ("10:20:00", 4, 1200.0)


async def test_gap_longer_than_max_gap_counts_max_gap(db: asyncpg.Pool) -> None:
    await call(db, flush_body(LIVE, [{"user_id": U1, "last_seen_at": at(0)}]))
    # 45 minutes away: the viewer left and came back; 600 s (the default) count.
    await call(db, flush_body(LIVE, [{"user_id": U1, "last_seen_at": at(45)}]))
    assert (await sessions(db))[U1] == ("10:45:00", 2, 600.0)
    payload = {
        "webinar_id": LIVE,
        "max_gap_s": 60,
        "viewers": [{"user_id": U1, "last_seen_at": at(50)}],
    }
    await call(db, json.dumps({"payload": payload}).encode())
    assert (await sessions(db))[U1] == ("10:50:00", 3, 660.0)


async def test_concurrent_duplicate_flushes_add_once(db: asyncpg.Pool) -> None:
    await call(db, flush_body(LIVE, [{"user_id": U1, "last_seen_at": at(0)}]))
    body = flush_body(LIVE, [{"user_id": U1, "last_seen_at": at(2)}])
    # Two connections at once: ON CONFLICT's row lock serialises them, whichever wins.
    await asyncio.gather(call(db, body), call(db, body))
    assert (await sessions(db))[U1] == ("10:02:00", 2, 120.0)


async def test_refused_viewers_come_back_and_nothing_is_written(db: asyncpg.Pool) -> None:
    # Unknown webinar: every viewer is refused, joining or not.
    body = flush_body(
        UNKNOWN,
        [
            {"user_id": U2, "last_seen_at": at(0), "join": True},
            {"user_id": U1, "last_seen_at": at(0)},
        ],
    )
    assert await call(db, body) == {"written": 0, "refused": [U1, U2]}
    # Ended webinar: a joining viewer without a registration is refused; a registered
    # one and a viewer already watching are written.
    async with db.acquire() as c:
        await c.execute(
            "insert into registrations (webinar_id, user_id) values ($1, $2)",
            uuid.UUID(ENDED),
            uuid.UUID(U1),
        )
    body = flush_body(
        ENDED,
        [
            {"user_id": U1, "last_seen_at": at(1), "join": True},
            {"user_id": U2, "last_seen_at": at(1), "join": True},
            {"user_id": U3, "last_seen_at": at(1)},
        ],
    )
    assert await call(db, body) == {"written": 2, "refused": [U2]}
    assert set(await sessions(db)) == {U1, U3}
    assert await scalar(db, "select count(*) from registrations") == 1


async def test_repeated_viewer_and_empty_and_malformed(db: asyncpg.Pool) -> None:
    body = flush_body(
        LIVE,
        [
            {"user_id": U1, "last_seen_at": at(0, 5)},
            {"user_id": U1, "last_seen_at": at(0), "join": True},
        ],
    )
    assert await call(db, body) == {"written": 1, "refused": []}
    assert (await sessions(db))[U1] == ("10:00:05", 1, 0.0)
    assert await scalar(db, "select count(*) from registrations") == 1
    assert await call(db, flush_body(LIVE, [])) == {"written": 0, "refused": []}
    with pytest.raises(asyncpg.PostgresError, match=r"payload\.viewers must be an array"):
        await call(db, b'{"payload": {"webinar_id": 1}}')
