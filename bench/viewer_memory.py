"""Memory per viewer (issue 15): RSS of one gateway process before and after 100,000
distinct verified viewers pinged through a heartbeat route.

The gateway (`python -m gateway`, 1 worker, `auth: required` with HS256, `heartbeat:
{forward_interval: 300s}`, default `auth.token_cache_size: 100000` and
`store.memory_max_keys`) sits in front of a static nginx app. After a warm-up of 1,000
viewers (so imports, pools and first-use allocations are in the idle figure), each of
`--viewers` new viewers (its own token, one webinar of 1,000 viewers each) sends one
ping: verified, cached, recorded, forwarded. VmRSS is read from /proc before and after.
Run once per store: `memory://` (presence in the process) and Redis (presence in Redis;
the process keeps the token cache and the `on_failure: local` copy).

    .venv/bin/python bench/viewer_memory.py                       # memory:// and Redis
    .venv/bin/python bench/viewer_memory.py --stores memory --viewers 100000

Target: RSS growth <= 60 MB per 100,000 viewers. Results: bench/results/viewer_memory.json.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, free_port, gateway, run_header, static_upstream, uptime
from bench.store_fault import Redis

SECRET = "viewer-memory-bench-secret-with-32-chars-at-least"  # noqa: S105 - a bench key
ISSUER = "http://bench.test/auth/v1"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def token(i: int, now: int) -> str:
    """A Supabase-shaped access token (the claims GoTrue puts in one), ~900 bytes."""
    sub = f"00000000-0000-4000-8000-{i:012d}"
    claims = {
        "iss": ISSUER,
        "sub": sub,
        "aud": "authenticated",
        "exp": now + 3600,
        "iat": now,
        "email": f"viewer{i}@example.com",
        "phone": "",
        "app_metadata": {"provider": "email", "providers": ["email"]},
        "user_metadata": {"email": f"viewer{i}@example.com", "email_verified": True, "sub": sub},
        "role": "authenticated",
        "aal": "aal1",
        "amr": [{"method": "password", "timestamp": now}],
        "session_id": f"5e55a1d0-0000-4000-8000-{i:012d}",
        "is_anonymous": False,
    }
    head = _b64(b'{"alg":"HS256","typ":"JWT"}')
    body = _b64(json.dumps(claims, separators=(",", ":")).encode())
    sig = hmac.new(SECRET.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(sig)}"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def ping_all(url: str, first: int, count: int, concurrency: int = 64) -> int:
    now = int(time.time())
    next_i = first
    ok = 0

    async def worker(s: aiohttp.ClientSession) -> None:
        nonlocal next_i, ok
        while next_i < first + count:
            i, next_i = next_i, next_i + 1
            path = f"/api/webinars/w-{i // 1000}/presence/ping"
            headers = {"Authorization": f"Bearer {token(i, now)}"}
            async with s.post(url + path, data=b"{}", headers=headers) as r:
                await r.read()
                ok += 200 <= r.status < 300

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as s:
        await asyncio.gather(*(worker(s) for _ in range(concurrency)))
    return ok


def config(app_url: str, store: str) -> dict[str, Any]:
    return {
        "server": {
            "listen": f"127.0.0.1:{free_port()}",
            "admin_listen": f"127.0.0.1:{free_port()}",
            "access_log": False,
            "drain_timeout": "2s",
        },
        "store": {"url": store},
        "upstreams": {"app": {"url": app_url}},
        "auth": {"issuer": ISSUER, "audience": "authenticated", "hs256_secret": SECRET},
        "routes": [
            {
                "name": "presence_ping",
                "match": {"methods": ["POST"], "path": "/api/webinars/{webinar_id}/presence/ping"},
                "upstream": "app",
                "auth": "required",
                "heartbeat": {"forward_interval": "300s"},
            }
        ],
    }


def measure(store: str, viewers: int) -> dict[str, Any]:
    redis = Redis() if store == "redis" else None
    if redis is not None:
        redis.start()
    url = f"redis://127.0.0.1:{redis.port}/0" if redis is not None else "memory://"
    try:
        with static_upstream() as app, gateway(config(app.url, url)) as gw:
            warm = asyncio.run(ping_all(gw.url, 10_000_000, 1000))
            time.sleep(1.0)
            idle = rss_mb(gw.proc.pid)
            t0 = time.monotonic()
            ok = asyncio.run(ping_all(gw.url, 0, viewers))
            seconds = time.monotonic() - t0
            time.sleep(1.0)
            after = rss_mb(gw.proc.pid)
    finally:
        if redis is not None:
            redis.kill()
    growth = after - idle
    return {
        "store": store,
        "viewers": viewers,
        "answered_2xx": ok + warm,
        "rss_idle_mb": round(idle, 1),
        "rss_after_mb": round(after, 1),
        "growth_mb": round(growth, 1),
        "growth_mb_per_100k": round(growth * 100_000 / viewers, 1),
        "seconds": round(seconds, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("--stores", default="memory,redis")
    ap.add_argument("--viewers", type=int, default=100_000)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "viewer_memory.json"))
    args = ap.parse_args()
    started, load_before = time.time(), uptime()
    runs = []
    for store in args.stores.split(","):
        r = measure(store, args.viewers)
        runs.append(r)
        print(json.dumps(r))
    header = run_header("viewer_memory", None, started, load_before, uptime())
    Path(args.out).write_text(json.dumps({**header, "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
