"""Hold each gateway worker to a share of one core, with the kernel's CPU bandwidth control.

Issue 20 asks that two workers serve >= 1.8 x what one serves on the machine's two cores.
With wrk, nginx and Redis on the same two cores that cannot be measured once one worker
saturates a core: the second worker gets what is left after the load generator and the
upstream (bench/workers.py's "cores the gateway used": 1.00 for one worker, 1.35-1.41 for
two). Holding every worker to, say, half a core (the same cap in both runs) leaves the
load generator the rest, so the two-worker / one-worker ratio measures how the gateway
scales (shared listener, shared Redis, the supervisor) rather than how the machine is
shared. It is the smaller-scale version of "a core per worker, load elsewhere".

Each held process gets a cgroup of its own under the CPU controller (cgroup v1's
`cpu.cfs_quota_us`/`cpu.cfs_period_us`, or v2's `cpu.max`), with the kernel's default
100 ms period. Needs root. `CpuCap.close()` moves any process still held back to the root
group and removes the groups it made.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
from pathlib import Path

from common import children

# cgroup v1's CPU controller (hybrid hierarchies) and the v2 unified mount.
V1_ROOTS = (Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup/cpu,cpuacct"))
V2_ROOTS = (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified"))
# The kernel's default period. A 10 ms one throttles ten times as often, and a lone
# worker held to half a core then spent 60 µs a shed ping against 48 µs (with the VM's
# halt polling off; 49 against 43 with it on): more time descheduled, colder caches.
# Two held workers lost far less, which made the ratio look better than it is.
PERIOD_US = 100_000
# Group names unique within this process, whichever CpuCap makes them.
_serial = itertools.count()


class CpuCapError(Exception):
    """The machine cannot hold a process to a CPU share (no controller, not root)."""


def find_root(v1: tuple[Path, ...] = V1_ROOTS, v2: tuple[Path, ...] = V2_ROOTS) -> Path:
    """The cgroup directory whose children can carry a CPU limit."""
    for root in v1:
        if (root / "cpu.cfs_quota_us").is_file():
            return root
    for root in v2:
        controllers = root / "cgroup.subtree_control"
        if controllers.is_file() and "cpu" in controllers.read_text().split():
            return root
    raise CpuCapError(
        "no cgroup CPU controller to hold workers with (cgroup v1 cpu or v2 cpu.max, as root)"
    )


class CpuCap:
    """Puts processes, one cgroup each, under a limit of `share` of one core."""

    def __init__(self, share: float, root: Path | None = None) -> None:
        if not 0 < share <= 1:
            raise ValueError("share must be in (0, 1]")
        self.share = share
        self.root = root if root is not None else find_root()
        # find_root's test for v1: its groups take a period and a quota, v2's cpu.max.
        self.v1 = (self.root / "cpu.cfs_quota_us").exists()
        self.groups: list[Path] = []

    def hold(self, pid: int) -> None:
        group = self.root / f"edge-bench-{os.getpid()}-{next(_serial)}"
        try:
            group.mkdir()
        except OSError as exc:
            raise CpuCapError(f"cannot make {group}: {exc}") from exc
        self.groups.append(group)
        quota = max(1000, round(self.share * PERIOD_US))
        try:
            if self.v1:
                # The period first (a quota above the old period's is fine either way).
                (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
                (group / "cpu.cfs_quota_us").write_text(str(quota))
            else:
                (group / "cpu.max").write_text(f"{quota} {PERIOD_US}")
            (group / "cgroup.procs").write_text(str(pid))
        except OSError as exc:  # e.g. the process is gone (ESRCH)
            raise CpuCapError(f"cannot hold pid {pid} in {group}: {exc}") from exc

    def close(self) -> None:
        """Move every held process back to the root group and remove the groups; a group
        that cannot be removed is named on stderr (it would stay on the machine)."""
        left = []
        for group in self.groups:
            with contextlib.suppress(OSError):
                for pid in (group / "cgroup.procs").read_text().split():
                    with contextlib.suppress(OSError):  # one that exited meanwhile
                        (self.root / "cgroup.procs").write_text(pid)
            try:
                group.rmdir()
            except OSError:
                left.append(str(group))
        self.groups = []
        if left:
            print(f"cpucap: could not remove {', '.join(left)}", file=sys.stderr)

    def __enter__(self) -> CpuCap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def worker_pids(pid: int, expected: int) -> list[int]:
    """The gateway's `expected` serving processes: its `multiprocessing` spawn children
    when it supervises workers (`server.workers > 1`), else the process itself. Anything
    else is an error: holding the supervisor while its workers run free would make the
    two-worker figure look better than it is, silently."""
    workers = []
    for child in children(pid):
        with contextlib.suppress(OSError):
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                workers.append(child)
    if expected == 1 and not workers:
        return [pid]
    if expected > 1 and len(workers) == expected:
        return workers
    raise CpuCapError(
        f"expected {expected} serving process(es) under pid {pid}, found spawned workers "
        f"{workers}"
    )
