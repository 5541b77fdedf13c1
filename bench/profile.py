"""Where a request's microseconds go: py-spy samples of the gateway under wrk, grouped.

One invocation starts a static nginx upstream and the gateway (1 worker) in one of two
setups, runs wrk at 50 connections, and samples the gateway process with py-spy meanwhile
(`--native`, so time inside C extensions and syscalls shows under the Python frame that
called them). It then prints

- the share of samples per layer: server (uvicorn + httptools + the event loop), ASGI
  dispatch (gateway/app.py), routing, auth, policies, upstream client (aiohttp +
  gateway/proxy/), logging, metrics, GC, other; each sample is
  charged to the innermost frame whose file belongs to a layer;
- the top functions by self time and by inclusive time.

Setups:
  passthrough  the catch-all route with `auth: optional` (no token sent), access log on
  shed         the presence ping with a verified HS256 token, heartbeat absorbed
               (bench/heartbeat.py's script), on the Redis store given by --redis

    .venv/bin/pip install py-spy          # not a project dependency
    .venv/bin/python bench/profile.py passthrough
    .venv/bin/python bench/profile.py shed --redis redis://127.0.0.1:6379/12
    .venv/bin/python bench/profile.py analyse --input raw.txt     # a saved --raw file

Needs nginx, wrk and py-spy (ptrace rights on the gateway process).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    free_port,
    gateway,
    gateway_config,
    print_result,
    require_tools,
    run_wrk,
    static_upstream,
    uptime,
)
from heartbeat import ISSUER, PATH, SECRET, hb_config, wrk_script

# (layer, substrings of a frame's file); the first layer whose pattern matches wins.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("metrics", ("prometheus_client",)),
    ("logging", ("gateway/observability/logging.py", "/logging/", "json/")),
    ("auth", ("gateway/policies/auth.py", "joserfc")),
    ("routing", ("gateway/routing.py",)),
    (
        "policies",
        ("gateway/policies/", "gateway/store/", "redis/", "hiredis"),
    ),
    ("upstream client", ("aiohttp", "gateway/proxy/", "yarl", "multidict")),
    ("ASGI dispatch", ("gateway/app.py", "gateway/http.py", "gateway/headers.py", "gateway/net")),
    (
        "server",
        ("uvicorn", "httptools", "gateway/protocol.py", "gateway/cycle.py", "uvloop", "asyncio"),
    ),
]


def _frame_file(frame: str) -> str:
    # py-spy raw frames look like "function (path/file.py:123)".
    start = frame.rfind(" (")
    return frame[start + 2 : -1] if start >= 0 else frame


_SYSCALLS = ("write", "writev", "read", "epoll_pwait", "epoll_wait", "getpid", "getrandom")


def _layer(frame: str) -> str | None:
    if "gc_collect" in frame or "collect_with_callback" in frame:
        return "GC"
    if "(libc" in frame and frame.split(" (", 1)[0] in _SYSCALLS:
        return "syscalls"
    path = _frame_file(frame)
    for name, patterns in LAYERS:
        if any(p in path for p in patterns):
            return name
    return None


def _func(frame: str) -> str:
    name, _, rest = frame.partition(" (")
    path = rest.rsplit(":", 1)[0]
    return f"{name} ({'/'.join(path.split('/')[-2:])})" if path else name


def analyse(raw: Path, top: int) -> None:
    layers: collections.Counter[str] = collections.Counter()
    self_t: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        n = int(count_s)
        frames = [f for f in stack.split(";") if f and not f.startswith("process ")]
        frames = [f for f in frames if not f.startswith("thread ")]
        if not frames:
            continue
        total += n
        self_t[_func(frames[-1])] += n
        for f in {_func(f) for f in frames}:
            incl[f] += n
        layer = next((x for x in map(_layer, reversed(frames)) if x), "other")
        layers[layer] += n
    if not total:
        print("no samples")
        return
    print(f"\n{total} samples")
    print("\nby layer (innermost frame that belongs to one):")
    for name, n in layers.most_common():
        print(f"  {name:<18} {100 * n / total:5.1f} %")
    for title, counter in (("self", self_t), ("inclusive", incl)):
        print(f"\ntop {top} by {title} time:")
        for name, n in counter.most_common(top):
            print(f"  {100 * n / total:5.1f} %  {name}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("setup", choices=("passthrough", "shed", "analyse"))
    p.add_argument("--input", type=Path, default=None, help="with `analyse`: a saved --raw file")
    p.add_argument("--redis", default="redis://127.0.0.1:6379/12", help="store for `shed`")
    p.add_argument("--duration", type=float, default=10, help="seconds sampled")
    p.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--raw", type=Path, default=None, help="keep py-spy's raw output here")
    p.add_argument("--python", default=sys.executable, help="interpreter that runs the gateway")
    args = p.parse_args(argv)
    if args.setup == "analyse":
        analyse(args.input, args.top)
        return 0
    require_tools()
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    tmp = Path(tempfile.mkdtemp(prefix="bench-profile-"))
    raw = args.raw or tmp / "raw.txt"
    print(f"profile {args.setup} — {uptime()}", flush=True)
    try:
        with static_upstream() as up:
            script = None
            url = None
            if args.setup == "passthrough":
                cfg = gateway_config(up.url, free_port(), free_port(), access_log=True)
                cfg["auth"] = {
                    "issuer": ISSUER,
                    "audience": "authenticated",
                    "hs256_secret": SECRET,
                }
                cfg["routes"][0]["auth"] = "optional"
            else:
                cfg = hb_config(up.url, args.redis)
                cfg["server"]["access_log"] = True
                script = tmp / "ping.lua"
                wrk_script(script)
            with gateway(cfg, python=args.python) as gw:
                url = gw.url + ("/bench/item" if script is None else "")
                run_wrk(url, 50, 2, 2, script=script)  # warm-up (and first pings)
                spy_proc = subprocess.Popen(
                    [
                        spy,
                        "record",
                        "-p",
                        str(gw.proc.pid),
                        "-d",
                        str(int(args.duration)),
                        "-r",
                        str(args.rate),
                        "--native",
                        "-f",
                        "raw",
                        "-o",
                        str(raw),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                )
                time.sleep(0.5)
                res = run_wrk(url, 50, 2, args.duration, cpu_pid=gw.proc.pid, script=script)
                print_result(args.setup, res)
                _, err = spy_proc.communicate(timeout=args.duration + 60)
                if spy_proc.returncode != 0:
                    print(err.decode(errors="replace"), file=sys.stderr)
                    return 1
        analyse(raw, args.top)
        print(f"\nload: {uptime()}  (PATH {PATH})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
