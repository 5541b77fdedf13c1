"""Redis's own CPU for the heartbeat record script: this tree's against a baseline's.

Every shed ping ends in `heartbeat_record` on Redis (one call per webinar per loop turn,
up to 128 pings a call). Redis is single-threaded and, on a small machine, shares the
cores with the gateway, so its microseconds a ping count twice: they bound how many pings
one Redis serves and they come out of the gateway's CPU. This script runs both scripts
on the same real Redis with the same inputs (1,000 viewers rotating, one webinar, the
gateway's arguments in sample mode, the clock advancing 1 ms a call so nearly every ping
is absorbed, as on the shed path), alternating short rounds, and reads what Redis itself
accounts for them (`INFO commandstats`: the EVALSHA time, which includes the commands
the script runs). It prints µs of Redis time a ping per batch size and the ratio.

    .venv/bin/python bench/record_script.py --baseline-rev HEAD~1
    .venv/bin/python bench/record_script.py --baseline-lua /tmp/old.lua --batches 1,16,128

Uses Redis database 12 by default (`--redis`) and deletes its keys after.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))

from heartbeat import redis_counters

ROOT = Path(__file__).resolve().parent.parent
LUA = "gateway/policies/heartbeat/lua/heartbeat_record.lua"
PREFIX = "bench:rs:{w}:"
INTERVAL_MS = 300_000
WINDOW_MS = 360_000
T0 = 1_800_000_000_000


def keys(tag: str) -> list[str]:
    p = PREFIX + tag + ":"
    return [p + k for k in ("seen", "fwd:r", "neg:r", "dirty:r", "ix:r", "join:r")]


def run(r: redis.Redis, sha: str, tag: str, batch: int, pings: int, start: int) -> float:
    """Send `pings` heartbeats `batch` a call; returns Redis µs a ping."""
    ks = keys(tag)
    calls0, usec0, _ = redis_counters(r)
    now = T0
    sent = 0
    for call in range(pings // batch):
        now = T0 + call
        items = "\n".join(f"0u:viewer-{(start + sent + i) % 1000}" for i in range(batch))
        sent += batch
        args = [now, INTERVAL_MS, now - INTERVAL_MS, now - WINDOW_MS, 0, 30_000, 3_600_000, items]
        r.evalsha(sha, len(ks), *ks, *args)
    calls1, usec1, _ = redis_counters(r)
    assert calls1 - calls0 == pings // batch
    return (usec1 - usec0) / sent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--baseline-rev", help="a git revision of this repository")
    g.add_argument("--baseline-lua", type=Path, help="a heartbeat_record.lua file")
    p.add_argument("--redis", default="redis://127.0.0.1:6379/12")
    p.add_argument("--batches", default="1,8,32,128")
    p.add_argument("--pings", type=int, default=20_000, help="per round and batch size")
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    if a.baseline_rev:
        base = subprocess.run(
            ["git", "show", f"{a.baseline_rev}:{LUA}"],
            cwd=ROOT, check=True, capture_output=True, text=True,
        ).stdout
    else:
        base = a.baseline_lua.read_text()
    r = redis.Redis.from_url(a.redis)
    shas = {"this tree": r.script_load((ROOT / LUA).read_text()), "baseline": r.script_load(base)}
    print(f"record script, Redis µs a ping (EVALSHA time), {a.rounds} rounds of {a.pings:,}")
    try:
        for batch in (int(x) for x in a.batches.split(",")):
            got: dict[str, list[float]] = {name: [] for name in shas}
            for rnd in range(a.rounds):
                for name, sha in shas.items():
                    # Each script its own webinar: both see the same history.
                    got[name].append(run(r, sha, name.replace(" ", ""), batch, a.pings, rnd))
            this, old = (statistics.median(got[n]) for n in ("this tree", "baseline"))
            pairs = zip(got["this tree"], got["baseline"], strict=True)
            rounds = ", ".join(f"{t / o:.3f}" for t, o in pairs)
            print(
                f"  batch {batch:>4}: this tree {this:6.2f} µs  baseline {old:6.2f} µs"
                f"  ratio {this / old:5.3f}  (rounds: {rounds})"
            )
    finally:
        for name in shas:
            r.delete(*keys(name.replace(" ", "")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
