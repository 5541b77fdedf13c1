"""Interleaved A/B of the gateway against a baseline checkout and nginx, for a busy machine.

bench/passthrough.py runs each target once, one after the other: when other processes
come and go on the machine, one target gets a quiet minute and another a loaded one.
This script starts all three at once (the static upstream, nginx `proxy_pass`, the
gateway of this tree and the gateway of `--baseline`, each 1 worker, access log on,
`--auth` as in bench/passthrough.py) and alternates short wrk runs between them for
`--rounds` rounds, so each target sees the same load on average. It prints, per target,
the median and the spread of requests/s and CPU per request at 50 connections and of
p50 at 1 connection, and the ratios to nginx computed within each round.

`--workload heartbeat` does the same for the shed path of bench/heartbeat.py (presence
pings with verified HS256 tokens over 1,000 viewers, answered at the edge) on the store
`--store` (default: Redis database 12); nginx proxies the same pings to the upstream.

    .venv/bin/python bench/ab.py --baseline /path/to/older/checkout   # ~2 min
    .venv/bin/python bench/ab.py --baseline /path/to/older/checkout --workload heartbeat
    # one tree, two interpreters: a venv on a PGO+LTO build (as the Docker image's;
    # Debian's /usr/bin/python3.11 is one) against .venv's
    /usr/bin/python3.11 -m venv /tmp/venv-pgo && /tmp/venv-pgo/bin/pip install -e '.[dev]'
    .venv/bin/python bench/ab.py --baseline . --python /tmp/venv-pgo/bin/python \
        --baseline-python .venv/bin/python --workload heartbeat
"""

from __future__ import annotations

import argparse
import contextlib
import operator
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    gateway,
    interleave,
    nginx_proxy,
    per_round,
    print_spread,
    require_tools,
    run_wrk,
    static_upstream,
    uptime,
    versions,
)
from heartbeat import PATH as PING_PATH
from heartbeat import hb_config, wrk_script
from passthrough import _config as passthrough_config


def _target_config(args: argparse.Namespace, upstream: str, name: str) -> dict[str, Any]:
    if args.workload == "passthrough":
        return passthrough_config(upstream, args.access_log == "on", args.auth)
    cfg = hb_config(upstream, args.store)
    # Each target its own keys: both gateways start within the same second.
    cfg["store"]["key_prefix"] = f"{cfg['store']['key_prefix']}{name}:"
    return cfg


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--baseline", type=Path, required=True)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--seconds", type=float, default=3)
    p.add_argument("--access-log", choices=("on", "off"), default="on")
    p.add_argument("--auth", choices=("off", "optional"), default="off")
    p.add_argument("--python", default=sys.executable)
    p.add_argument(
        "--baseline-python",
        help="the baseline's interpreter (default --python): with --baseline . this compares"
        " interpreters on one tree",
    )
    p.add_argument("--workload", choices=("passthrough", "heartbeat"), default="passthrough")
    p.add_argument("--store", default="redis://127.0.0.1:6379/12")
    p.add_argument("--webinars", type=int, default=1, help="heartbeat: webinars pinged")
    args = p.parse_args(argv)
    require_tools()
    print(f"ab bench — {uptime()}", flush=True)
    pythons = {"gateway": args.python, "baseline": args.baseline_python or args.python}
    for name, python in pythons.items():
        v = versions(python)
        print(f"  {name}: python {v.get('python')} ({v.get('python_executable')})", flush=True)
    with contextlib.ExitStack() as stack:
        up = stack.enter_context(static_upstream())
        px = stack.enter_context(nginx_proxy(up.url))
        targets = {"nginx": (px.url, px.proc.pid)}
        for name, cwd in (("gateway", None), ("baseline", args.baseline.resolve())):
            cfg = _target_config(args, up.url, name)
            gw = stack.enter_context(gateway(cfg, python=pythons[name], cwd=cwd))
            targets[name] = (gw.url, gw.proc.pid)
        path, script = "/bench/item", None
        if args.workload == "heartbeat":
            path, script = PING_PATH, Path(stack.enter_context(tempfile.TemporaryDirectory()))
            script = script / "ping.lua"
            wrk_script(script, args.webinars)
        for url, _ in targets.values():
            run_wrk(url + path, 50, 2, 2, script=script)

        def measure(url: str, pid: int) -> dict[str, float]:
            c50 = run_wrk(url + path, 50, 2, args.seconds, cpu_pid=pid, script=script)
            c1 = run_wrk(url + path, 1, 1, max(1, args.seconds - 1), script=script)
            return {
                "rps_c50": c50.rps,
                "cpu_us_c50": c50.cpu_us_per_request or 0.0,
                "p50_ms_c1": c1.latency_ms["p50"],
            }

        rows = interleave(targets, args.rounds, measure)
    ng = rows["nginx"]
    for name in ("gateway", "baseline"):
        row = rows[name]
        row["ratio"] = per_round(row["rps_c50"], ng["rps_c50"], operator.truediv)
        row["cpu_ratio"] = per_round(ng["cpu_us_c50"], row["cpu_us_c50"], operator.truediv)
        row["added_p50_ms"] = per_round(row["p50_ms_c1"], ng["p50_ms_c1"], operator.sub)
    setup = f"{args.rounds} rounds, access log {args.access_log}, auth {args.auth}"
    if args.workload == "heartbeat":
        setup = f"{args.rounds} rounds, heartbeat shed path, store {args.store}"
        setup += f", {args.webinars} webinar(s)"
    print(f"after — {uptime()}  ({setup})")
    print_spread(rows, 9, 13)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
