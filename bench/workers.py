"""Worker scaling: the same gateway with `server.workers: 1` and `2`, side by side.

One invocation starts a static nginx upstream and, in turn, the gateway with one and
with two workers (Redis store, the catch-all route with `auth: optional`, access log on),
runs wrk (-t2 -c100) against each after a warm-up, in `--rounds` rounds that alternate
which goes first, and prints requests/s, CPU µs per request (the whole process tree:
supervisor and workers) and the median round's two-worker / one-worker requests/s ratio
with the spread over the rounds (issue 20's target: >= 1.8 on two cores). With --shed the
request is bench/heartbeat.py's presence ping (verified token, heartbeat absorbed) instead.

    .venv/bin/python bench/workers.py --redis redis://127.0.0.1:6379/12
    .venv/bin/python bench/workers.py --redis redis://127.0.0.1:6379/12 --shed --quick

Needs nginx and wrk. wrk, nginx and the gateway share the machine's cores, so on a
2-core machine the ratio measures the gateway's scaling under that sharing. It also
prints the cores the gateway used in each run and, from the CPU per request, the ratio a
core per worker would give with the load generator elsewhere (a projection, not a
measurement: it says whether two workers cost more CPU a request than one).

`--worker-cpu SHARE` measures that instead of projecting it: every worker, in both runs,
is held to SHARE of one core (bench/cpucap.py, cgroup CPU bandwidth; needs root), so wrk,
nginx and Redis keep the rest of the cores and the ratio is the gateway's own scaling:

    .venv/bin/python bench/workers.py --quick --worker-cpu 0.5
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
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
from cpucap import CpuCap, CpuCapError, find_root, worker_pids
from heartbeat import ISSUER, SECRET, hb_config, wrk_script

TARGET = 1.8
# One round: (one worker's run, two workers' run).
_Pair = tuple[WrkResult, WrkResult]


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


@contextlib.contextmanager
def _held(pid: int, workers: int, share: float | None) -> Iterator[list[int]]:
    """With a share (--worker-cpu), each of the gateway's serving processes in its own
    capped group (the supervisor, which serves nothing, stays free); yields the held pids."""
    if share is None:
        yield []
        return
    with CpuCap(share) as cap:
        pids = worker_pids(pid, workers)
        for worker in pids:
            cap.hold(worker)
        yield pids


def _measure(args: argparse.Namespace, upstream: str, script: Path | None) -> list[_Pair]:
    """Both gateways up at once (the idle one costs nothing), measured in alternating
    order round by round, so that a drift of the machine hits both alike."""
    pairs: list[_Pair] = []
    with contextlib.ExitStack() as stack:
        gws = {}
        for workers in (1, 2):
            gw = stack.enter_context(
                gateway(_config(upstream, args.redis, workers, args.shed), python=args.python)
            )
            held = stack.enter_context(_held(gw.proc.pid, workers, args.worker_cpu))
            if held:
                print(f"  {workers} worker(s): held pids {held}")
            gws[workers] = gw
        urls = {w: gw.url + ("" if script else "/bench/item") for w, gw in gws.items()}
        for workers in (1, 2):
            run_wrk(urls[workers], 100, 2, args.warmup, script=script)
        for i in range(args.rounds):
            got = {}
            for workers in (1, 2) if i % 2 == 0 else (2, 1):
                pid = gws[workers].proc.pid
                got[workers] = run_wrk(
                    urls[workers], 100, 2, args.duration, cpu_pid=pid, script=script
                )
                print_result(f"round {i + 1}, {workers} worker(s)", got[workers], width=24)
            if not got[1].rps:
                raise BenchError("one worker served nothing: no ratio to take")
            pairs.append((got[1], got[2]))
    return pairs


def summary(pairs: list[_Pair], cpus: int) -> list[str]:
    """The verdict on the median round's ratio, with the spread over all rounds, and what
    that round's CPU figures say (scaling())."""
    ranked = sorted(pairs, key=lambda pair: pair[1].rps / pair[0].rps)
    ratios = [two.rps / one.rps for one, two in ranked]
    mid = (len(ranked) - 1) // 2
    verdict = "ok" if ratios[mid] >= TARGET else "MISSED"
    return [
        f"two workers / one: {ratios[mid]:.3f} x requests/s, median of {len(ratios)} round(s) "
        f"[{ratios[0]:.3f} .. {ratios[-1]:.3f}] (target >= {TARGET}: {verdict})",
        *scaling(*ranked[mid], cpus),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--redis", default="redis://127.0.0.1:6379/12")
    p.add_argument("--shed", action="store_true", help="presence pings answered at the edge")
    p.add_argument("--duration", type=float, default=8)
    p.add_argument("--warmup", type=float, default=2)
    p.add_argument("--rounds", type=int, default=3, help="alternating measurements of each")
    p.add_argument("--quick", action="store_true", help="4 s runs, 1 s warm-up")
    p.add_argument("--python", default=sys.executable, help="interpreter that runs the gateway")
    p.add_argument(
        "--worker-cpu",
        type=float,
        metavar="SHARE",
        help="hold each worker to this share of a core (e.g. 0.5; cgroups, root)",
    )
    args = p.parse_args(argv)
    if args.worker_cpu is not None and not 0 < args.worker_cpu <= 1:
        p.error("--worker-cpu must be in (0, 1]")
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    if args.quick:
        args.duration, args.warmup = 4, 1
    require_tools()
    print(f"workers bench — {os.cpu_count()} CPUs — {uptime()}", flush=True)
    if args.worker_cpu is not None:
        try:
            # Before nginx and the gateways start: a machine that cannot hold them says so.
            print(f"each worker held to {args.worker_cpu} of a core (cgroups in {find_root()})")
        except CpuCapError as exc:
            print(f"bench failed: {exc}", file=sys.stderr)
            return 1
    tmp = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    script = None
    if args.shed:
        script = tmp / "ping.lua"
        wrk_script(script)
    try:
        with static_upstream() as up:
            pairs = _measure(args, up.url, script)
    except (BenchError, CpuCapError) as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    for line in summary(pairs, os.cpu_count() or 1):
        print(line)
    print(f"load: {uptime()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
