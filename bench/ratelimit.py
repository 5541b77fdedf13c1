"""Rate-limit benchmark: what a GCRA check in Redis costs, and how many Redis round trips
a request makes.

One invocation starts a private `redis-server` (its own free port, no persistence, so
INFO commandstats counts only this run), a static nginx upstream (fixed ~100-byte JSON
body) and one gateway process (1 worker, `store.url` = that Redis) with three routes:

- `/free/...`     no rate limit (the baseline);
- `/limited/...`  two rules, `by: ip` and `by: route`, with a rate so high nothing is
                  refused: every request runs the whole check (one EVALSHA for both rules);
- `/blocked/...`  `by: ip`, 1/h, burst 1: after the first request every request is
                  refused from the local "blocked until" cache (429, no round trip).

Each route gets a warm-up, then wrk -t1 -c50 for `--duration` seconds, in the same run,
one after the other (free and limited twice, interleaved); then free and limited at one
connection (`--duration-c1`), for the p50 the check adds. Redis commands per request =
commands the gateway sent to Redis during the run (INFO commandstats delta, minus the
TIME/GET/SET that gcra.lua runs *inside* Redis, which commandstats also counts, and
minus the counting client's own INFO/HELLO) / rate-limit decisions the gateway counted
(/metrics). Network round trips per request = pipelined writes (/_edge/status) /
decisions. Prints the figures and writes bench/results/ratelimit.json.

    .venv/bin/python bench/ratelimit.py             # ~55 s
    .venv/bin/python bench/ratelimit.py --quick     # ~20 s

Needs /usr/bin/redis-server, /usr/sbin/nginx and /usr/bin/wrk. Everything listens on
127.0.0.1 only and is stopped before the script exits.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))

# bench/ is not a package: common.py is found via sys.path.
from common import (
    BenchError,
    WrkResult,
    free_port,
    gateway,
    gateway_config,
    http_get,
    require_tools,
    run_header,
    run_wrk,
    static_upstream,
    uptime,
    wait_port,
)

RESULTS = Path(__file__).resolve().parent / "results" / "ratelimit.json"
# Commands gcra.lua runs inside Redis (counted by commandstats, but not round trips), and
# the counting client's own.
SCRIPT_INNER = {"cmdstat_time", "cmdstat_get", "cmdstat_set", "cmdstat_info", "cmdstat_hello"}


@contextlib.contextmanager
def private_redis() -> Iterator[str]:
    exe = shutil.which("redis-server")
    if exe is None:
        raise BenchError("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="bench-redis-")
    proc = subprocess.Popen(
        [
            exe,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port, 10.0, proc)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        shutil.rmtree(workdir, ignore_errors=True)


def commandstats(url: str) -> dict[str, int]:
    client = redis.Redis.from_url(url)
    try:
        stats: dict[str, Any] = client.info("commandstats")
    finally:
        client.close()
    return {k: int(v["calls"]) for k, v in stats.items()}


def round_trips(before: dict[str, int], after: dict[str, int]) -> tuple[int, dict[str, int]]:
    delta = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    return sum(v for k, v in delta.items() if k not in SCRIPT_INNER), delta


def gateway_counts(admin_url: str, route: str) -> tuple[int, int, int]:
    """(rate-limit decisions on `route` from /metrics, Redis pipelines sent, checks they
    carried, from /_edge/status): the gateway's own counts, which unlike wrk's include
    the requests still in flight when wrk stops."""
    _, text = http_get(admin_url + "/metrics")
    decisions = 0
    for line in text.decode().splitlines():
        if line.startswith("edge_ratelimit_decisions_total{") and f'route="{route}"' in line:
            decisions += int(float(line.rsplit(" ", 1)[1]))
    _, body = http_get(admin_url + "/_edge/status")
    rl = json.loads(body).get("ratelimit", {})
    return decisions, int(rl.get("redis_batches", 0)), int(rl.get("redis_checks", 0))


def config(upstream: str, redis_url: str) -> dict[str, Any]:
    cfg = gateway_config(upstream, free_port(), free_port())
    cfg["store"] = {"url": redis_url, "timeout": "200ms"}
    unlimited = [
        {"by": "ip", "rate": "1000000/s", "burst": 1000000},
        {"by": "route", "rate": "1000000/s", "burst": 1000000},
    ]
    cfg["routes"] = [
        {
            "name": "limited",
            "match": {"path": "/limited/{p:path}"},
            "upstream": "app",
            "auth": "off",
            "rate_limit": unlimited,
        },
        {
            "name": "blocked",
            "match": {"path": "/blocked/{p:path}"},
            "upstream": "app",
            "auth": "off",
            "rate_limit": [{"by": "ip", "rate": "1/h", "burst": 1}],
        },
        {"name": "free", "match": {"path": "/{p:path}"}, "upstream": "app", "auth": "off"},
    ]
    return cfg


def _line(name: str, r: WrkResult, trips: float | None) -> None:
    lat = r.latency_ms
    cpu = f"{r.cpu_us_per_request:6.1f}" if r.cpu_us_per_request is not None else "     -"
    rt = f"{trips:.3f}" if trips is not None else "-"
    print(
        f"  {name:<10} {r.rps:>9,.0f} req/s   p50 {lat.get('p50', float('nan')):6.2f} ms   "
        f"p99 {lat.get('p99', float('nan')):6.2f} ms   cpu {cpu} us/req   "
        f"redis commands/req {rt}   non-2xx {r.non_2xx}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration", type=float, default=7, help="seconds per route at -c50")
    p.add_argument("--duration-c1", type=float, default=3, help="seconds per route at -c1")
    p.add_argument("--warmup", type=float, default=1, help="warm-up seconds per route")
    p.add_argument("--connections", type=int, default=50)
    p.add_argument("--threads", type=int, default=1, help="wrk threads (the machine has 2 cores)")
    p.add_argument("--quick", action="store_true", help="4 s runs, 1 s warm-up")
    p.add_argument("--python", default=sys.executable, help="interpreter that runs the gateway")
    p.add_argument("--output", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.warmup, args.duration_c1 = 4, 1, 2
    require_tools()

    load_before = uptime()
    started = time.time()
    print(f"ratelimit bench — {os.cpu_count()} CPUs — {load_before}", flush=True)
    results: dict[str, dict[str, Any]] = {}
    try:
        with private_redis() as redis_url, static_upstream() as up:
            cfg = config(up.url, redis_url)
            with gateway(cfg, python=args.python) as gw:
                for name in ("free", "limited", "blocked", "free2", "limited2"):
                    path = name.rstrip("2")
                    url = f"{gw.url}/{path}/item"
                    if path == "blocked":
                        http_get(url)  # the one request its burst admits
                    status, body = http_get(url)
                    want = 429 if path == "blocked" else 200
                    if status != want:
                        raise BenchError(f"{url} answered {status} {body[:200]!r}")
                    run_wrk(url, args.connections, args.threads, args.warmup)
                    # Let requests still in flight when wrk stopped finish, so both counts
                    # below cover the same requests.
                    time.sleep(0.3)
                    before = commandstats(redis_url)
                    d0, b0, c0 = gateway_counts(gw.admin_url, path)
                    r = run_wrk(
                        url, args.connections, args.threads, args.duration, cpu_pid=gw.proc.pid
                    )
                    time.sleep(0.3)
                    d1, b1, c1 = gateway_counts(gw.admin_url, path)
                    trips, delta = round_trips(before, commandstats(redis_url))
                    checked = d1 - d0  # requests the limiter decided (incl. cached 429s)
                    per_req = trips / checked if checked else 0.0
                    batches = b1 - b0
                    _line(name, r, per_req)
                    if batches:
                        print(
                            f"             {checked} decisions, {trips} commands sent to Redis "
                            f"in {batches} pipelined writes (mean batch "
                            f"{(c1 - c0) / batches:.1f}, {batches / checked:.3f} network "
                            "round trips per request)",
                            flush=True,
                        )
                    results[name] = {
                        **r.as_dict(),
                        "ratelimit_decisions": checked,
                        "redis_commands": trips,
                        "redis_commands_per_request": round(per_req, 4),
                        "redis_pipelines": batches,
                        "redis_round_trips_per_request": round(batches / checked, 4)
                        if checked
                        else 0.0,
                        "redis_commandstats_delta": delta,
                    }
                # Latency a lone client sees (1 connection): what the check adds to p50.
                for name in ("free", "limited"):
                    url = f"{gw.url}/{name}/item"
                    run_wrk(url, 1, 1, 1)
                    r = run_wrk(url, 1, 1, args.duration_c1, cpu_pid=gw.proc.pid)
                    _line(name + " c1", r, None)
                    results[name + "_c1"] = r.as_dict()
    except BenchError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    load_after = uptime()

    free = (results["free"]["rps"] + results["free2"]["rps"]) / 2
    limited = (results["limited"]["rps"] + results["limited2"]["rps"]) / 2
    summary = {
        "rps_free": round(free),
        "rps_limited": round(limited),
        "rps_blocked_429": round(results["blocked"]["rps"]),
        "limited_over_free": round(limited / free, 3),
        "redis_commands_per_request_limited": max(
            results["limited"]["redis_commands_per_request"],
            results["limited2"]["redis_commands_per_request"],
        ),
        "round_trips_per_request_limited": max(
            results["limited"]["redis_round_trips_per_request"],
            results["limited2"]["redis_round_trips_per_request"],
        ),
        "redis_commands_per_request_blocked": results["blocked"]["redis_commands_per_request"],
        "added_p50_ms_c1": round(
            results["limited_c1"]["latency_ms"]["p50"] - results["free_c1"]["latency_ms"]["p50"],
            3,
        ),
    }
    summary["round_trips_ok"] = summary["redis_commands_per_request_limited"] <= 1.0
    print()
    print(
        f"limited/free requests/s: {summary['limited_over_free']:.3f} "
        f"({summary['rps_limited']:,} vs {summary['rps_free']:,}); "
        f"Redis commands per limited request: "
        f"{summary['redis_commands_per_request_limited']:.3f} "
        f"({'ok' if summary['round_trips_ok'] else 'MISSED'}: must be <= 1), network round "
        f"trips per request: {summary['round_trips_per_request_limited']:.3f}"
    )
    print(f"p50 added by the check at 1 connection: {summary['added_p50_ms_c1']:+.3f} ms")
    print(f"load: before [{load_before}] after [{load_after}]")
    doc = {
        **run_header("ratelimit", argv, started, load_before, load_after, args.python),
        "settings": {
            "duration_s": args.duration,
            "duration_c1_s": args.duration_c1,
            "warmup_s": args.warmup,
            "wrk": f"-t{args.threads} -c{args.connections} --latency",
            "routes": cfg["routes"],
        },
        "results": results,
        "summary": summary,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0 if summary["round_trips_ok"] else 2


if __name__ == "__main__":
    sys.exit(main())
