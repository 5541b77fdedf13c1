"""Run one command with the VM's guest halt polling set, then put the old value back.

This project's machines are Firecracker VMs that boot with
`haltpoll.guest_halt_poll_ns=0`: an idle vCPU halts at once and exits to the
hypervisor, and waking it costs hundreds of µs. A one-connection latency then measures
those wake-ups (nginx's own p50 swung 0.19-0.75 ms in one run), and a request that
crosses three processes pays for three. Linux's default for a KVM guest is 200000 ns
(poll up to 200 µs before halting), which is what a VM in front of an app usually runs
with. Both figures go in the docs; this script makes the second reproducible:

    sudo .venv/bin/python bench/halt_poll.py 200000 -- \\
        .venv/bin/python bench/ab.py --baseline /tmp/base --auth optional

Needs root (the parameter is a root-writable sysfs file). The old value comes back
whatever happens to the command: exit, failure, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import HALT_POLL_NS


def _terminate(signum: int, _frame: FrameType | None) -> None:
    # Unwind through the finally below (the child got the same signal from the terminal,
    # or is stopped by subprocess.run's own cleanup).
    raise KeyboardInterrupt(signum)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ns", type=int, help="guest_halt_poll_ns while the command runs")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    ap.add_argument("--param", type=Path, default=HALT_POLL_NS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("no command given (halt_poll.py NS -- COMMAND ...)")
    if args.ns < 0:
        ap.error("ns must be >= 0")
    try:
        old = args.param.read_text().strip()
        args.param.write_text(str(args.ns))
    except OSError as exc:
        print(f"cannot set {args.param}: {exc} (a KVM guest with cpuidle-haltpoll, as root)")
        return 2
    print(f"{args.param}: {old} -> {args.ns} for this command", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return subprocess.run(command, check=False).returncode
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        print(f"cannot run {command[0]}: {exc}", file=sys.stderr)
        return 127
    finally:
        args.param.write_text(old)
        print(f"{args.param}: back to {old}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
