"""Cache benchmark: requests/s of a gateway cache hit against nginx `proxy_pass`, in the
same run.

Starts a static nginx upstream (fixed ~100-byte JSON), an nginx proxy in front of it
(1 worker, keepalive pool) and the gateway (1 worker) in front of the same upstream with
three routes: a `public: true` cached route (hit served from the process's copy, no
store round trip), an `auth: required` cached route under the default rule (HS256 token
verified, then one store round trip for the entry + the caller's allow record), and the
plain pass-through for reference. With Redis reachable, the authenticated hit is also
measured on a Redis store. Each target gets a warm-up, a check that the answer really is
a cache hit, then wrk at 50 connections (2 threads).

    .venv/bin/python bench/cache.py                  # ~55 s
    .venv/bin/python bench/cache.py --duration 3     # ~25 s
    .venv/bin/python bench/cache.py --json out.json  # also write the figures

Needs /usr/sbin/nginx and /usr/bin/wrk. Everything listens on 127.0.0.1 and is stopped
before the script exits; the Redis keys it writes (own prefix) are deleted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # bench/ is not a package: common.py is found via sys.path
    BenchError,
    WrkResult,
    free_port,
    gateway,
    gateway_config,
    nginx_proxy,
    require_tools,
    run_wrk,
    static_upstream,
    uptime,
    versions,
)

SECRET = "bench-cache-secret-0123456789abcdef0123456789"  # noqa: S105 - throwaway, bench only
PUBLIC = "/api/webinars/w1/stats/public"
ADMIN = "/api/webinars/w1/stats/access"
CONNECTIONS, THREADS = 50, 2


def _token() -> str:
    from joserfc import jwt
    from joserfc.jwk import OctKey

    now = int(time.time())
    claims = {
        "sub": "bench-admin",
        "aud": "authenticated",
        "role": "authenticated",
        "iat": now,
        "exp": now + 3600,
        "app_metadata": {"role": "admin"},
    }
    return str(jwt.encode({"alg": "HS256"}, claims, OctKey.import_key(SECRET)))


def _config(upstream: str, store_url: str, prefix: str) -> dict[str, Any]:
    cfg = gateway_config(upstream, free_port(), free_port())
    cfg["store"] = {"url": store_url, "key_prefix": prefix, "timeout": "200ms"}
    cfg["auth"] = {"hs256_secret": SECRET, "audience": "authenticated"}
    cached = {"methods": ["GET"], "path": "/api/webinars/{webinar_id}/stats/"}
    cfg["routes"] = [
        {
            "name": "stats_public",
            "match": {**cached, "path": cached["path"] + "public"},
            "upstream": "app",
            "auth": "off",
            "cache": {"ttl": "1h", "public": True},
        },
        {
            "name": "admin_stats",
            "match": {**cached, "path": cached["path"] + "access"},
            "upstream": "app",
            "auth": "required",
            "cache": {"ttl": "1h"},
        },
        *cfg["routes"],
    ]
    return cfg


def _get(url: str, headers: dict[str, str]) -> tuple[int, str]:
    req = urllib.request.Request(url, headers=headers)  # noqa: S310 - loopback only
    with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310
        return int(resp.status), resp.headers.get("Cache-Status", "")


def _wrk(url: str, duration: float, headers: dict[str, str], cpu_pid: int) -> WrkResult:
    return run_wrk(url, CONNECTIONS, THREADS, duration, cpu_pid=cpu_pid, headers=headers)


def _measure(
    name: str, url: str, duration: float, cpu_pid: int, headers: dict[str, str] | None = None
) -> tuple[str, WrkResult]:
    hdrs = headers or {}
    # Warm-up: fills the cache entry (and the allow record / verified-token cache).
    for _ in range(3):
        _get(url, hdrs)
    status, cache_status = _get(url, hdrs)
    if status != 200:
        raise BenchError(f"{name}: {url} answered {status}")
    if name.startswith("gateway cache") and not cache_status.startswith("edge; hit"):
        raise BenchError(f"{name}: expected a cache hit, got Cache-Status {cache_status!r}")
    _wrk(url, 1, hdrs, cpu_pid)  # 1 s under load before measuring
    return name, _wrk(url, duration, hdrs, cpu_pid)


@contextlib.contextmanager
def _redis_prefix() -> Iterator[tuple[str, str] | None]:
    """A Redis URL and a key prefix of our own, or None when Redis is not reachable."""
    url = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
    prefix = f"bench-cache-{os.getpid()}:"
    try:
        import redis
    except ImportError:
        yield None
        return
    client = redis.Redis.from_url(url)
    try:
        client.ping()
    except redis.RedisError:
        yield None
        return
    try:
        yield url, prefix
    finally:
        keys = list(client.scan_iter(prefix + "*"))
        if keys:
            client.delete(*keys)
        client.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=7.0, help="seconds per wrk run")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    require_tools()
    auth = {"Authorization": "Bearer " + _token()}
    results: list[tuple[str, WrkResult]] = []
    with static_upstream() as up, nginx_proxy(up.url) as proxy:
        pid = proxy.proc.pid
        results.append(_measure("nginx proxy_pass", proxy.url + ADMIN, args.duration, pid))
        with gateway(_config(up.url, "memory://", "bench:")) as gw:
            pid = gw.proc.pid
            results.append(
                _measure("gateway cache hit, public", gw.url + PUBLIC, args.duration, pid)
            )
            results.append(
                _measure(
                    "gateway cache hit, token + memory store",
                    gw.url + ADMIN,
                    args.duration,
                    pid,
                    auth,
                )
            )
            results.append(
                _measure("gateway pass-through (no cache)", gw.url + "/x", args.duration, pid)
            )
        with _redis_prefix() as redis_target:
            if redis_target is not None:
                with gateway(_config(up.url, *redis_target)) as gw:
                    results.append(
                        _measure(
                            "gateway cache hit, token + Redis store",
                            gw.url + ADMIN,
                            args.duration,
                            gw.proc.pid,
                            auth,
                        )
                    )
    anchor = results[0][1].rps
    print(f"\n{uptime()}")
    print(f"wrk -t{THREADS} -c{CONNECTIONS} -d{args.duration:g}s, 1 nginx worker, 1 gateway worker")
    print("| target | req/s | vs nginx | p50 ms | p99 ms | CPU µs/req | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results:
        print(
            f"| {name} | {r.rps:,.0f} | {r.rps / anchor:.2f}x | {r.latency_ms.get('p50', 0):.2f} "
            f"| {r.latency_ms.get('p99', 0):.2f} | {r.cpu_us_per_request or 0:.0f} | {r.errors} |"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "uptime": uptime(),
                    "versions": versions(),
                    "results": {n: r.as_dict() for n, r in results},
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        sys.exit(1)
