"""bench/cpucap.py holds a process to a share of a core (bench/workers.py --worker-cpu)
and finds the gateway's serving processes. The groups are made in stand-in directories:
the machine's real cgroup tree is not a test's to change."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from cpucap import PERIOD_US, CpuCap, CpuCapError, find_root, worker_pids


def _v1_root(tmp_path: Path) -> Path:
    root = tmp_path / "cpu"
    root.mkdir()
    (root / "cpu.cfs_quota_us").write_text("-1\n")
    (root / "cgroup.procs").write_text("")
    return root


def test_v1_group_gets_period_quota_and_the_process(tmp_path: Path) -> None:
    root = _v1_root(tmp_path)
    cap = CpuCap(0.5, root=root)
    cap.hold(4242)
    (group,) = cap.groups
    assert (group / "cpu.cfs_period_us").read_text() == str(PERIOD_US)
    assert (group / "cpu.cfs_quota_us").read_text() == str(PERIOD_US // 2)
    assert (group / "cgroup.procs").read_text() == "4242"


def test_v2_group_gets_cpu_max(tmp_path: Path) -> None:
    root = tmp_path / "unified"
    root.mkdir()
    (root / "cgroup.subtree_control").write_text("cpu memory\n")
    assert find_root(v1=(tmp_path / "absent",), v2=(root,)) == root
    cap = CpuCap(0.25, root=root)
    cap.hold(7)
    assert (cap.groups[0] / "cpu.max").read_text() == f"{PERIOD_US // 4} {PERIOD_US}"


def test_close_moves_held_processes_back_to_the_root_group(tmp_path: Path) -> None:
    root = _v1_root(tmp_path)
    with CpuCap(0.5, root=root) as cap:
        cap.hold(11)
    assert (root / "cgroup.procs").read_text() == "11"
    # (A real group is removed too; a stand-in directory with files in it cannot be, and
    # close() goes on quietly, as it must for a group the kernel still holds.)
    assert cap.groups == []


def test_no_cpu_controller_is_a_clear_error(tmp_path: Path) -> None:
    unified = tmp_path / "unified"
    unified.mkdir()
    (unified / "cgroup.subtree_control").write_text("memory pids\n")
    with pytest.raises(CpuCapError, match="no cgroup CPU controller"):
        find_root(v1=(tmp_path / "cpu",), v2=(unified,))


def test_a_share_outside_one_core_is_refused(tmp_path: Path) -> None:
    root = _v1_root(tmp_path)
    for share in (0, 1.5):
        with pytest.raises(ValueError, match="share must be in"):
            CpuCap(share, root=root)


def test_worker_pids_are_the_spawned_children_or_the_process_itself() -> None:
    child = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(30,))
    child.start()
    lone = subprocess.Popen(["sleep", "30"])
    try:
        # The supervisor's workers are multiprocessing spawn children.
        assert child.pid in worker_pids(os.getpid())
        assert lone.pid not in worker_pids(os.getpid())
        # A single-process gateway serves itself.
        assert worker_pids(lone.pid) == [lone.pid]
    finally:
        child.kill()
        lone.kill()
        child.join(5)
        lone.wait(5)


def test_two_caps_in_one_process_make_distinct_groups(tmp_path: Path) -> None:
    # bench/workers.py holds the one-worker and the two-worker gateway at once.
    root = _v1_root(tmp_path)
    with CpuCap(0.5, root=root) as one, CpuCap(0.5, root=root) as two:
        one.hold(1)
        two.hold(2)
        two.hold(3)
        assert len({*one.groups, *two.groups}) == 3
