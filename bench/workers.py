"""Worker scaling: the same gateway with `server.workers: 1` and `2`, side by side.

One invocation starts a static nginx upstream and, in turn, the gateway with one and
with two workers (Redis store, the catch-all route with `auth: optional`, access log on),
runs wrk (-t2 -c100) against each after a warm-up, and prints requests/s, CPU µs per
request (the whole process tree: supervisor and workers) and the two-worker / one-worker
requests/s ratio (issue 20's target: >= 1.8 on two cores). With --shed the request is
bench/heartbeat.py's presence ping (verified token, heartbeat absorbed) instead.

    .venv/bin/python bench/workers.py --redis redis://127.0.0.1:6379/12
    .venv/bin/python bench/workers.py --redis redis://127.0.0.1:6379/12 --shed --quick

Needs nginx and wrk. wrk, nginx and the gateway share the machine's cores, so on a
2-core machine the ratio measures the gateway's scaling under that sharing. It also
prints the cores the gateway used in each run and, from the CPU per request, the ratio a
core per worker would give with the load generator elsewhere (a projection, not a
measurement: it says whether two workers cost more CPU a request than one).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    BenchError,
    WrkResult,
    free_port,
    gateway,
    gateway_config,
    print_result,
    require_tools,
    run_wrk,
    static_upstream,
    uptime,
)
from heartbeat import ISSUER, SECRET, hb_config, wrk_script

TARGET = 1.8


def _config(upstream: str, redis: str, workers: int, shed: bool) -> dict[str, object]:
    prefix = f"bench-workers-{os.getpid()}-{int(time.time())}-{workers}:"
    if shed:
        cfg = hb_config(upstream, redis)
    else:
        cfg = gateway_config(upstream, free_port(), free_port())
        cfg["auth"] = {"issuer": ISSUER, "audience": "authenticated", "hs256_secret": SECRET}
        cfg["routes"][0]["auth"] = "optional"
    cfg["store"] = {"url": redis, "key_prefix": prefix, "timeout": "200ms"}
    cfg["server"]["workers"] = workers
    cfg["server"]["access_log"] = True
    return cfg


def scaling(one: WrkResult, two: WrkResult, cpus: int) -> list[str]:
    """What the CPU figures say beyond the requests/s ratio: how many cores the gateway
    used in each run, and the ratio if each worker had a core of its own and the load
    generator were elsewhere (2 x CPU per request of one worker / of two). On a machine
    whose cores wrk, nginx and Redis share, the measured ratio cannot reach that
    projection once one worker saturates its core."""
    if not one.cpu_us_per_request or not two.cpu_us_per_request:
        return []
    c1, c2 = one.cpu_us_per_request, two.cpu_us_per_request
    used1, used2 = one.rps * c1 / 1e6, two.rps * c2 / 1e6
    return [
        f"cores the gateway used: one worker {used1:.2f}, two workers {used2:.2f} (of {cpus}, "
        "shared with wrk, nginx and Redis)",
        f"CPU per request, two workers / one: {c2 / c1:.3f}; a core per worker, load elsewhere "
        f"(projection): {2 * c1 / c2:.2f} x",
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--redis", default="redis://127.0.0.1:6379/12")
    p.add_argument("--shed", action="store_true", help="presence pings answered at the edge")
    p.add_argument("--duration", type=float, default=8)
    p.add_argument("--warmup", type=float, default=2)
    p.add_argument("--quick", action="store_true", help="4 s runs, 1 s warm-up")
    p.add_argument("--python", default=sys.executable, help="interpreter that runs the gateway")
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.warmup = 4, 1
    require_tools()
    print(f"workers bench — {os.cpu_count()} CPUs — {uptime()}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    script = None
    if args.shed:
        script = tmp / "ping.lua"
        wrk_script(script)
    results: dict[int, WrkResult] = {}
    try:
        with static_upstream() as up:
            for workers in (1, 2):
                cfg = _config(up.url, args.redis, workers, args.shed)
                with gateway(cfg, python=args.python) as gw:
                    url = gw.url + ("" if script else "/bench/item")
                    run_wrk(url, 100, 2, args.warmup, script=script)
                    r = run_wrk(url, 100, 2, args.duration, cpu_pid=gw.proc.pid, script=script)
                    results[workers] = r
                    print_result(f"{workers} worker(s)", r)
    except BenchError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ratio = results[2].rps / results[1].rps
    verdict = "ok" if ratio >= TARGET else "MISSED"
    print(f"\ntwo workers / one: {ratio:.3f} x requests/s (target >= {TARGET}: {verdict})")
    for line in scaling(results[1], results[2], os.cpu_count() or 1):
        print(line)
    print(f"load: {uptime()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
