"""sql/edge_presence_batch.sql on the local PostgreSQL: the file loads, and the function
upserts exactly what the gateway's flush sends. Runs in a scratch schema that is dropped
afterwards."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.policies.heartbeat.policy import flush_body

SQL = Path(__file__).resolve().parent.parent / "sql" / "edge_presence_batch.sql"
PSQL = ["psql", "-h", os.environ.get("PGHOST", "127.0.0.1"), "-U", "postgres", "-X", "-q"]
DB = os.environ.get("PGDATABASE", "test")
W = "11111111-1111-4111-8111-111111111111"
U1 = "00000000-0000-4000-8000-000000000001"
U2 = "00000000-0000-4000-8000-000000000002"


async def psql(script: str, **variables: str) -> tuple[int, str, str]:
    args = [*PSQL, "-v", "ON_ERROR_STOP=1", "-At", "-d", DB]
    for k, v in variables.items():
        args += ["-v", f"{k}={v}"]
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(script.encode()), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture
async def schema() -> AsyncIterator[str]:
    name = "hb_scratch_" + uuid.uuid4().hex[:12]
    code, _, err = await psql(
        f"create schema {name};\n"
        f"set search_path = {name};\n"
        "create table webinar_live_presence (\n"
        "  id bigserial primary key,\n"
        "  webinar_id uuid not null,\n"
        "  user_id uuid not null,\n"
        "  last_seen_at timestamptz not null,\n"
        "  created_at timestamptz not null default now(),\n"
        "  unique (webinar_id, user_id));\n"
        f"\\i {SQL}\n"
    )
    assert code == 0, err
    try:
        yield name
    finally:
        code, _, err = await psql(f"drop schema {name} cascade;")
        assert code == 0, err


async def call(schema: str, body: bytes) -> tuple[int, str, str]:
    # PostgREST hands the request body's `payload` member to the function's parameter.
    payload = json.dumps(json.loads(body)["payload"])
    return await psql(
        f"set search_path = {schema};\nselect edge_presence_batch(:'payload'::jsonb);\n",
        payload=payload,
    )


async def rows(schema: str) -> list[str]:
    # `schema` is our own generated name, never input.
    query = (
        f"set search_path = {schema};\n"
        "select user_id, to_char(last_seen_at at time zone 'UTC', 'HH24:MI:SS.MS') "
        "from webinar_live_presence order by user_id;"
    )
    code, out, err = await psql(query)
    assert code == 0, err
    return out.split()


async def test_flush_payload_upserts_one_row_per_viewer(schema: str) -> None:
    body = flush_body(
        W,
        [
            {"user_id": U1, "last_seen_at": "2026-11-26T10:00:00.000+00:00"},
            {"user_id": U2, "last_seen_at": "2026-11-26T10:00:01.500+00:00"},
        ],
    )
    code, out, err = await call(schema, body)
    assert (code, out.strip()) == (0, "2"), err
    assert await rows(schema) == [f"{U1}|10:00:00.000", f"{U2}|10:00:01.500"]
    # The next flush moves U1 forward; a late, older entry for U2 cannot move it back.
    body = flush_body(
        W,
        [
            {"user_id": U1, "last_seen_at": "2026-11-26T10:02:00.000+00:00"},
            {"user_id": U2, "last_seen_at": "2026-11-26T09:00:00.000+00:00"},
        ],
    )
    code, out, err = await call(schema, body)
    assert (code, out.strip()) == (0, "2"), err
    assert await rows(schema) == [f"{U1}|10:02:00.000", f"{U2}|10:00:01.500"]


async def test_repeated_viewer_and_empty_batch(schema: str) -> None:
    body = flush_body(
        W,
        [
            {"user_id": U1, "last_seen_at": "2026-11-26T10:00:00.000+00:00"},
            {"user_id": U1, "last_seen_at": "2026-11-26T10:00:05.000+00:00"},
        ],
    )
    code, out, err = await call(schema, body)
    assert (code, out.strip()) == (0, "1"), err
    assert await rows(schema) == [f"{U1}|10:00:05.000"]
    code, out, err = await call(schema, flush_body(W, []))
    assert (code, out.strip()) == (0, "0"), err


async def test_malformed_payload_is_refused(schema: str) -> None:
    code, _, err = await psql(
        f"set search_path = {schema};\nselect edge_presence_batch('{{\"webinar_id\": 1}}');\n"
    )
    assert code != 0
    assert "payload.viewers must be an array" in err
