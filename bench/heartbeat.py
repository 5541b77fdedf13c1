"""Heartbeat shed-path benchmark: presence pings answered at the edge vs nginx proxy_pass.

One invocation starts a static nginx upstream (fixed JSON body), an nginx `proxy_pass`
in front of it (1 worker, keepalive pool) and the gateway (1 worker) with the shipped
`presence_ping` route: `auth: required` (HS256 tokens verified locally) and
`heartbeat: {forward_interval: 300s}`. wrk then sends `POST
/api/webinars/{id}/presence/ping` with a valid token, rotating over 1,000 viewers (each
its own token): each viewer's first ping goes to the app, every other one is answered at
the edge (the shed path). The same requests go to nginx proxy_pass. It prints
requests/s, p50/p99 and CPU per request, the gateway/nginx requests/s ratio at 50
connections (target >= 0.35, issue 20) and the edge outcome counts read from /metrics, and writes
bench/results/heartbeat.json.

    .venv/bin/python bench/heartbeat.py                         # memory store, ~45 s
    .venv/bin/python bench/heartbeat.py --redis redis://127.0.0.1:6379/12   # + Redis run
    .venv/bin/python bench/heartbeat.py --quick

Needs /usr/sbin/nginx and /usr/bin/wrk. Everything listens on 127.0.0.1 and is stopped
before the script exits.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import hmac
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
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

RESULTS = Path(__file__).resolve().parent / "results" / "heartbeat.json"
# Issue 20: the shed path (verified token, heartbeat absorbed, Redis store).
TARGET_RATIO = 0.35
SECRET = "bench-heartbeat-secret-with-at-least-32-characters"  # noqa: S105 - bench only
ISSUER = "http://bench.invalid/auth/v1"
WEBINAR = "5b1f0c3e-0000-4000-8000-00000000be11"
PATH = f"/api/webinars/{WEBINAR}/presence/ping"
VIEWERS = 1000


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def token(sub: str) -> str:
    now = int(time.time())
    header = _b64(b'{"alg":"HS256","typ":"JWT"}')
    claims = {
        "iss": ISSUER,
        "aud": "authenticated",
        "sub": sub,
        "role": "authenticated",
        "session_id": "bench-" + sub[-6:],
        "iat": now,
        "exp": now + 6 * 3600,
    }
    body = _b64(json.dumps(claims, separators=(",", ":")).encode())
    sig = hmac.new(SECRET.encode(), f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{_b64(sig)}"


def ping_path(viewer: int, webinars: int = 1) -> str:
    """The ping path of viewer `viewer` when the viewers watch `webinars` webinars
    (viewer i watches webinar i mod webinars; webinar 0 is WEBINAR)."""
    n = int(WEBINAR[-4:], 16) + viewer % webinars
    return PATH.replace(WEBINAR, f"{WEBINAR[:-4]}{n:04x}")


def wrk_script(path: Path, webinars: int = 1) -> None:
    """A wrk Lua script: POST the ping, rotating over VIEWERS valid tokens; viewer i
    pings webinar i mod `webinars`. The requests are built once per wrk thread, in
    `init` (after wrk has set the Host header), not per request: formatting each one in
    Lua cost wrk ~29 µs a request (0.31-0.33 of the two cores at 11k pings/s), CPU the
    targets on the same machine then did not get."""
    tokens = ",\n".join(f'"{token(f"00000000-0000-4000-8000-{i:012d}")}"' for i in range(VIEWERS))
    paths = ",\n".join(f'"{ping_path(w, webinars)}"' for w in range(webinars))
    path.write_text(
        f"""
local tokens = {{
{tokens}
}}
local paths = {{
{paths}
}}
local n = #tokens
local w = #paths
local requests = {{}}
local i = 0
init = function(args)
  for k = 0, n - 1 do
    requests[k + 1] = wrk.format("POST", paths[(k % w) + 1], {{
      ["Authorization"] = "Bearer " .. tokens[k + 1],
      ["Content-Type"] = "application/json",
    }}, "{{}}")
  end
end
request = function()
  i = i + 1
  return requests[(i % n) + 1]
end
"""
    )


def redis_side(url: str | None) -> tuple[int, int, float] | None:
    """Redis's own account, to difference around a run: EVALSHA calls, their µs (the
    scripts' time, commands inside included) and the server's CPU seconds. None for the
    memory store."""
    if url is None or not url.startswith("redis://"):
        return None
    import redis  # the gateway's dependency; only the Redis runs need it

    with redis.Redis.from_url(url) as r:
        return redis_counters(r)


def redis_counters(r: Any) -> tuple[int, int, float]:
    """EVALSHA calls, their µs and the server's CPU seconds, from client `r`."""
    stats: Any = r.info("commandstats")
    cpu: Any = r.info("cpu")
    row = stats.get("cmdstat_evalsha", {"calls": 0, "usec": 0})
    return int(row["calls"]), int(row["usec"]), cpu["used_cpu_user"] + cpu["used_cpu_sys"]


def print_redis_side(
    before: tuple[int, int, float] | None, after: tuple[int, int, float] | None, pings: int
) -> None:
    """How many pings shared a record call, and what Redis spent a ping: the store's
    part of the shed path that the gateway's CPU figure does not show."""
    if before is None or after is None or not pings:
        return
    calls = after[0] - before[0]
    print(
        f"    redis: {calls:,} script calls ({pings / max(calls, 1):.1f} pings a call), "
        f"{(after[1] - before[1]) / pings:.1f} µs of script time and "
        f"{(after[2] - before[2]) * 1e6 / pings:.1f} µs of Redis CPU a ping",
        flush=True,
    )


def _measure(
    name: str,
    url: str,
    pid: int,
    script: Path,
    args: argparse.Namespace,
    store: str | None = None,
) -> dict[str, WrkResult]:
    run_wrk(url, 50, 2, args.warmup, script=script)
    before = redis_side(store)
    out = {"c50": run_wrk(url, 50, 2, args.duration, cpu_pid=pid, script=script)}
    print_result(name, out["c50"])
    print_redis_side(before, redis_side(store), out["c50"].requests)
    out["c1"] = run_wrk(url, 1, 1, args.duration_c1, cpu_pid=pid, script=script)
    print_result(name, out["c1"])
    return out


_SAMPLE = re.compile(r'^edge_heartbeats_total\{outcome="(\w+)",route="(\w+)"\} ([\d.e+]+)$', re.M)


def outcomes(admin_url: str) -> dict[str, int]:
    status, body = http_get(admin_url + "/metrics")
    if status != 200:
        return {}
    out: dict[str, int] = {}
    for m in _SAMPLE.finditer(body.decode()):
        out[m.group(1)] = out.get(m.group(1), 0) + int(float(m.group(3)))
    return out


def hb_config(upstream: str, store: str) -> dict[str, Any]:
    cfg = gateway_config(upstream, free_port(), free_port())
    # A fresh prefix per run, so each viewer's first ping is forwarded again (old keys
    # expire on their own).
    prefix = f"bench-hb-{os.getpid()}-{int(time.time())}:"
    cfg["store"] = {"url": store, "key_prefix": prefix, "timeout": "200ms"}
    cfg["auth"] = {"issuer": ISSUER, "audience": "authenticated", "hs256_secret": SECRET}
    cfg["routes"] = [
        {
            "name": "presence_ping",
            "match": {"methods": ["POST"], "path": "/api/webinars/{webinar_id}/presence/ping"},
            "upstream": "app",
            "auth": "required",
            "heartbeat": {"forward_interval": "300s"},
        },
        {"name": "default", "match": {"path": "/{path:path}"}, "upstream": "app", "auth": "off"},
    ]
    return cfg


def _report(
    results: dict[str, dict[str, WrkResult]], edge: dict[str, dict[str, int]], keys: list[str]
) -> dict[str, Any]:
    """Print each gateway run against nginx (req/s and CPU ratios, edge outcomes)."""
    ng = results["nginx_proxy"]
    summary: dict[str, Any] = {"target_ratio": TARGET_RATIO}
    print()
    for key in keys:
        r = results[key]
        ratio = r["c50"].rps / ng["c50"].rps
        summary[f"ratio_rps_c50_{key}_over_nginx"] = round(ratio, 4)
        summary[f"{key}_ok"] = ratio >= TARGET_RATIO
        o = edge.get(key, {})
        total = sum(o.values()) or 1
        summary[f"{key}_absorbed_share"] = round(o.get("absorbed", 0) / total, 4)
        verdict = "ok" if ratio >= TARGET_RATIO else "MISSED"
        ng_cpu, gw_cpu = ng["c50"].cpu_us_per_request, r["c50"].cpu_us_per_request
        if ng_cpu and gw_cpu:
            summary[f"ratio_cpu_per_request_c50_nginx_over_{key}"] = round(ng_cpu / gw_cpu, 4)
            print(
                f"{key}: CPU per request nginx {ng_cpu} us, gateway {gw_cpu} us "
                f"-> {ng_cpu / gw_cpu:.3f}"
            )
        print(
            f"{key}: {r['c50'].rps:,.0f} req/s vs nginx proxy_pass {ng['c50'].rps:,.0f} "
            f"= {ratio:.3f} (target >= {TARGET_RATIO}: {verdict}); "
            f"{o.get('absorbed', 0):,} absorbed / {o.get('forwarded', 0):,} forwarded"
        )
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration", type=float, default=8, help="seconds at 50 connections")
    p.add_argument("--duration-c1", type=float, default=3, help="seconds at 1 connection")
    p.add_argument("--warmup", type=float, default=2, help="warm-up seconds per target")
    p.add_argument("--quick", action="store_true", help="4 s / 2 s / 1 s runs")
    p.add_argument("--redis", default=None, help="also run the gateway on this Redis URL")
    p.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="also run (on the last store) the gateway package found in this directory",
    )
    p.add_argument("--python", default=sys.executable, help="interpreter that runs the gateway")
    p.add_argument("--output", type=Path, default=RESULTS, help="where to write the JSON")
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.duration_c1, args.warmup = 4, 2, 1
    require_tools()

    load_before = uptime()
    started = time.time()
    print(f"heartbeat bench — {os.cpu_count()} CPUs — {load_before}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-heartbeat-"))
    script = tmp / "ping.lua"
    wrk_script(script)
    results: dict[str, dict[str, WrkResult]] = {}
    edge: dict[str, dict[str, int]] = {}
    stores: list[tuple[str, str, Path | None]] = [("gateway_memory", "memory://", None)]
    if args.redis:
        stores.append(("gateway_redis", args.redis, None))
    if args.baseline is not None:
        last = stores[-1]
        stores.append(("baseline_" + last[0].split("_", 1)[1], last[1], args.baseline.resolve()))
    try:
        with static_upstream() as up:
            with nginx_proxy(up.url) as px:
                results["nginx_proxy"] = _measure(
                    "nginx proxy_pass", px.url, px.proc.pid, script, args
                )
            for key, store, cwd in stores:
                with gateway(hb_config(up.url, store), python=args.python, cwd=cwd) as gw:
                    label = key.split("_")[0] + " shed (" + store.split(":", 1)[0] + ")"
                    results[key] = _measure(label, gw.url, gw.proc.pid, script, args, store)
                    edge[key] = outcomes(gw.admin_url)
                    print(f"    edge outcomes: {edge[key]}", flush=True)
    except BenchError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load_after = uptime()

    summary = _report(results, edge, [key for key, _, _ in stores])
    errors = sum(r.errors for runs in results.values() for r in runs.values())
    if errors:
        print(f"WARNING: {errors} wrk errors (non-2xx or socket errors); see the JSON")
    print(f"load: before [{load_before}] after [{load_after}]")

    doc = {
        **run_header("heartbeat", argv, started, load_before, load_after, args.python),
        "settings": {
            "duration_c50_s": args.duration,
            "duration_c1_s": args.duration_c1,
            "warmup_s": args.warmup,
            "viewers": VIEWERS,
            "baseline": str(args.baseline) if args.baseline else None,
            "request": f"POST {PATH} (Bearer HS256, body {{}})",
            "wrk": {"c50": "-t2 -c50 --latency -s ping.lua", "c1": "-t1 -c1 --latency"},
        },
        "results": {
            name: {k: r.as_dict() for k, r in runs.items()} for name, runs in results.items()
        },
        "edge_outcomes": edge,
        "summary": summary,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        args.output.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
