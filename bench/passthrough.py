"""Passthrough benchmark: the gateway against an nginx `proxy_pass` anchor.

One invocation starts a static nginx upstream (a fixed ~100-byte JSON body), an nginx
proxy in front of it (1 worker, keepalive pool to the upstream) and the gateway in front
of the same upstream (1 worker, memory store, one catch-all route, auth off; once with
the access log off and once with it on), then runs wrk against each at 50 connections
(2 threads) and at 1 connection (1 thread), after a warm-up. It prints requests/s, p50,
p99 and CPU per request for each, the gateway/nginx requests/s ratio at 50 connections
and the p50 the gateway adds at 1 connection, checks them against the targets of issue 20,
and writes bench/results/passthrough.json.

    .venv/bin/python bench/passthrough.py            # ~70 s
    .venv/bin/python bench/passthrough.py --quick    # ~25 s, shorter runs

Needs /usr/sbin/nginx and /usr/bin/wrk (`apt-get install nginx-light wrk`). Every process
listens on 127.0.0.1 only and is stopped before the script exits.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

# The bench runs as a script (bench/ is not a package), so common.py is found via sys.path.
from common import (
    UPSTREAM_BODY,
    BenchError,
    WrkResult,
    free_port,
    gateway,
    gateway_config,
    http_get,
    nginx_proxy,
    print_result,
    require_tools,
    run_header,
    run_wrk,
    static_upstream,
    uptime,
)

RESULTS = Path(__file__).resolve().parent / "results" / "passthrough.json"
# Targets from issue 20 (issue 2's were 0.08 and 0.5 ms); meant for `--auth optional`
# with the access log on.
TARGET_RATIO = 0.15
TARGET_ADDED_P50_MS = 0.15


def _check_body(url: str) -> None:
    status, body = http_get(url + "/bench/item?x=1")
    if status != 200 or body.decode() != UPSTREAM_BODY:
        raise BenchError(f"{url} answered {status} {body[:200]!r}, not the upstream body")


def _measure(
    name: str, url: str, pid: int | None, args: argparse.Namespace
) -> dict[str, WrkResult]:
    target = url + "/bench/item"
    _check_body(url)
    # Warm-up: opens the pools, fills caches, lets the CPU frequency settle.
    run_wrk(target, 50, 2, args.warmup)
    out: dict[str, WrkResult] = {}
    out["c50"] = run_wrk(target, 50, 2, args.duration, cpu_pid=pid)
    print_result(name, out["c50"])
    run_wrk(target, 1, 1, 1)
    out["c1"] = run_wrk(target, 1, 1, args.duration_c1, cpu_pid=pid)
    print_result(name, out["c1"])
    return out


def _config(upstream: str, access_log: bool, auth: str) -> dict[str, Any]:
    cfg = gateway_config(upstream, free_port(), free_port(), access_log=access_log)
    if auth != "off":
        # No token is sent: every request takes the anonymous path of `optional`.
        cfg["auth"] = {
            "issuer": "http://bench.invalid/auth/v1",
            "audience": "authenticated",
            "hs256_secret": "bench-passthrough-secret-with-at-least-32-characters",
        }
        cfg["routes"][0]["auth"] = auth
    return cfg


def _report(results: dict[str, dict[str, WrkResult]]) -> dict[str, Any]:
    """Print the ratios and the target checks; return the summary for the JSON."""

    gwr, ng, direct = results["gateway"], results["nginx_proxy"], results["upstream_direct"]
    ratio = gwr["c50"].rps / ng["c50"].rps
    added = gwr["c1"].latency_ms["p50"] - ng["c1"].latency_ms["p50"]
    added_direct = gwr["c1"].latency_ms["p50"] - direct["c1"].latency_ms["p50"]
    ng_added = ng["c1"].latency_ms["p50"] - direct["c1"].latency_ms["p50"]
    # CPU per request is far less disturbed by other load on the machine than requests/s:
    # nginx's CPU/request over the gateway's is the requests/s ratio each would reach
    # with one whole core to itself.
    ng_cpu, gw_cpu = ng["c50"].cpu_us_per_request, gwr["c50"].cpu_us_per_request
    cpu_ratio = ng_cpu / gw_cpu if ng_cpu and gw_cpu else None
    summary: dict[str, Any] = {
        "ratio_rps_c50_gateway_over_nginx": round(ratio, 4),
        "ratio_cpu_per_request_c50_nginx_over_gateway": (
            round(cpu_ratio, 4) if cpu_ratio is not None else None
        ),
        "added_p50_ms_c1_vs_nginx_proxy": round(added, 3),
        "added_p50_ms_c1_vs_direct": round(added_direct, 3),
        "nginx_proxy_added_p50_ms_c1_vs_direct": round(ng_added, 3),
        "target_ratio": TARGET_RATIO,
        "target_added_p50_ms": TARGET_ADDED_P50_MS,
        "ratio_ok": ratio >= TARGET_RATIO,
        "added_p50_ok": added < TARGET_ADDED_P50_MS,
    }
    if "gateway_access_log" in results:
        gl = results["gateway_access_log"]
        summary["ratio_rps_c50_gateway_access_log_over_nginx"] = round(
            gl["c50"].rps / ng["c50"].rps, 4
        )
        summary["added_p50_ms_c1_access_log_vs_nginx_proxy"] = round(
            gl["c1"].latency_ms["p50"] - ng["c1"].latency_ms["p50"], 3
        )
        gl_cpu = gl["c50"].cpu_us_per_request
        summary["ratio_cpu_per_request_c50_nginx_over_gateway_access_log"] = (
            round(ng_cpu / gl_cpu, 4) if ng_cpu and gl_cpu else None
        )
        # Issue 20's targets are stated with the access log on.
        summary["access_log_ratio_ok"] = (
            summary["ratio_rps_c50_gateway_access_log_over_nginx"] >= TARGET_RATIO
        )
        summary["access_log_added_p50_ok"] = (
            summary["added_p50_ms_c1_access_log_vs_nginx_proxy"] <= TARGET_ADDED_P50_MS
        )

    def ok(flag: bool) -> str:
        return "ok" if flag else "MISSED"

    print()
    print(
        f"gateway/nginx requests/s at 50 connections: {ratio:.3f} "
        f"(target >= {TARGET_RATIO}: {ok(summary['ratio_ok'])})"
    )
    if cpu_ratio is not None:
        print(
            f"CPU per request at 50 connections: nginx {ng_cpu} us, gateway {gw_cpu} us "
            f"-> ratio {cpu_ratio:.3f} (the requests/s ratio with a core each)"
        )
    print(
        f"added p50 at 1 connection: {added:+.3f} ms vs nginx proxy "
        f"(target < {TARGET_ADDED_P50_MS} ms: {ok(summary['added_p50_ok'])}), "
        f"{added_direct:+.3f} ms vs direct upstream (nginx proxy itself adds {ng_added:+.3f} ms)"
    )
    if "baseline_access_log" in results:
        bl = results["baseline_access_log"]
        summary["ratio_rps_c50_baseline_access_log_over_nginx"] = round(
            bl["c50"].rps / ng["c50"].rps, 4
        )
        summary["added_p50_ms_c1_baseline_access_log_vs_nginx_proxy"] = round(
            bl["c1"].latency_ms["p50"] - ng["c1"].latency_ms["p50"], 3
        )
        bl_cpu = bl["c50"].cpu_us_per_request
        summary["ratio_cpu_per_request_c50_nginx_over_baseline_access_log"] = (
            round(ng_cpu / bl_cpu, 4) if ng_cpu and bl_cpu else None
        )
    if "ratio_rps_c50_gateway_access_log_over_nginx" in summary:
        print(
            "with access_log on: ratio "
            f"{summary['ratio_rps_c50_gateway_access_log_over_nginx']:.3f} "
            f"({ok(summary['access_log_ratio_ok'])}), CPU ratio "
            f"{summary['ratio_cpu_per_request_c50_nginx_over_gateway_access_log']}, added p50 "
            f"{summary['added_p50_ms_c1_access_log_vs_nginx_proxy']:+.3f} ms "
            f"({ok(summary['access_log_added_p50_ok'])})"
        )
    if "ratio_rps_c50_baseline_access_log_over_nginx" in summary:
        print(
            "baseline with access_log on: ratio "
            f"{summary['ratio_rps_c50_baseline_access_log_over_nginx']:.3f}, CPU ratio "
            f"{summary['ratio_cpu_per_request_c50_nginx_over_baseline_access_log']}, added p50 "
            f"{summary['added_p50_ms_c1_baseline_access_log_vs_nginx_proxy']:+.3f} ms"
        )
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration", type=float, default=10, help="seconds at 50 connections")
    p.add_argument("--duration-c1", type=float, default=5, help="seconds at 1 connection")
    p.add_argument("--warmup", type=float, default=2, help="warm-up seconds per target")
    p.add_argument("--quick", action="store_true", help="4 s / 3 s / 1 s runs")
    p.add_argument(
        "--no-access-log-run", action="store_true", help="skip the gateway run with access_log on"
    )
    p.add_argument(
        "--auth",
        choices=("off", "optional"),
        default="off",
        help="auth mode of the catch-all route (optional: no token sent, anonymous)",
    )
    p.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="also run the gateway package found in this directory (e.g. an older checkout)",
    )
    p.add_argument("--python", default=sys.executable, help="interpreter that runs the gateway")
    p.add_argument("--output", type=Path, default=RESULTS, help="where to write the JSON")
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.duration_c1, args.warmup = 4, 3, 1
    require_tools()

    load_before = uptime()
    started = time.time()
    print(f"passthrough bench — {os.cpu_count()} CPUs — {load_before}", flush=True)
    results: dict[str, dict[str, WrkResult]] = {}
    try:
        with static_upstream() as up:
            print(f"upstream nginx on {up.url} (body {len(UPSTREAM_BODY)} bytes)", flush=True)
            results["upstream_direct"] = _measure("upstream (direct)", up.url, up.proc.pid, args)
            with nginx_proxy(up.url) as px:
                results["nginx_proxy"] = _measure("nginx proxy_pass", px.url, px.proc.pid, args)
            runs: list[tuple[str, bool, Path | None]] = [("gateway", False, None)]
            if not args.no_access_log_run:
                runs.append(("gateway_access_log", True, None))
            if args.baseline is not None:
                runs.append(("baseline_access_log", True, args.baseline.resolve()))
            for key, access_log, cwd in runs:
                cfg = _config(up.url, access_log, args.auth)
                with gateway(cfg, python=args.python, cwd=cwd) as gw:
                    label = ("baseline" if cwd else "gateway") + (
                        " +access_log" if access_log else ""
                    )
                    results[key] = _measure(label, gw.url, gw.proc.pid, args)
    except BenchError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    load_after = uptime()
    summary = _report(results)
    errors = sum(r.errors for runs in results.values() for r in runs.values())
    if errors:
        print(f"WARNING: {errors} wrk errors (non-2xx or socket errors); see the JSON")
    print(f"load: before [{load_before}] after [{load_after}]")

    doc = {
        **run_header("passthrough", argv, started, load_before, load_after, args.python),
        "settings": {
            "auth": args.auth,
            "baseline": str(args.baseline) if args.baseline else None,
            "duration_c50_s": args.duration,
            "duration_c1_s": args.duration_c1,
            "warmup_s": args.warmup,
            "body_bytes": len(UPSTREAM_BODY),
            "wrk": {"c50": "-t2 -c50 --latency", "c1": "-t1 -c1 --latency"},
        },
        "results": {
            name: {k: r.as_dict() for k, r in runs.items()} for name, runs in results.items()
        },
        "summary": summary,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        args.output.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
