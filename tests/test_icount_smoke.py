"""bench/icount.py's drive (what valgrind counts) runs against the real protocol and app:
it builds them through gateway/server.py's own helpers, so a change there that breaks
the bench fails here rather than on the next performance session. valgrind itself is not
needed: this runs one short drive without it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def drive(workload: str) -> subprocess.CompletedProcess[str]:
    # No upstream listens on port 9: the shed drive's forwarded pings get 502, which a
    # count refuses (a broken build answers errors fast); --allow-errors lets it complete.
    # The asgi drive's app always answers 200, so there an error answer still fails.
    args = [workload, "--drive", "200", "--upstream", "http://127.0.0.1:9", "--concurrency", "10"]
    if workload == "shed":
        args.append("--allow-errors")
    return subprocess.run(
        [sys.executable, "bench/icount.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_shed_drive_answers_every_request() -> None:
    proc = drive("shed")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "drive: 200 requests" in proc.stdout


def test_the_asgi_drive_answers_every_request() -> None:
    """The server's share alone: a do-nothing app under the same protocol."""
    proc = drive("asgi")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "drive: 200 requests" in proc.stdout
