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


def test_close_moves_held_processes_back_and_removes_the_groups(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _v1_root(tmp_path)
    removed: list[Path] = []
    # A real group is removed with its control files in it; a stand-in directory is not.
    monkeypatch.setattr(Path, "rmdir", lambda self: removed.append(self))
    with CpuCap(0.5, root=root) as cap:
        cap.hold(11)
        groups = list(cap.groups)
    assert (root / "cgroup.procs").read_text() == "11"
    assert removed == groups
    assert cap.groups == []


def test_a_group_left_behind_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cap = CpuCap(0.5, root=_v1_root(tmp_path))
    cap.hold(12)
    group = cap.groups[0]
    cap.close()  # the stand-in still holds files: rmdir fails, as for a busy real group
    assert f"could not remove {group}" in capsys.readouterr().err


def test_a_process_that_cannot_be_held_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cap = CpuCap(0.5, root=_v1_root(tmp_path))
    real_mkdir = Path.mkdir

    def group_with_unwritable_procs(self: Path) -> None:
        # The write into cgroup.procs fails, as the kernel's does for a pid that is gone.
        real_mkdir(self)
        real_mkdir(self / "cgroup.procs")

    monkeypatch.setattr(Path, "mkdir", group_with_unwritable_procs)
    with pytest.raises(CpuCapError, match="cannot hold pid 13"):
        cap.hold(13)


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


def test_worker_pids_are_the_spawned_workers_and_nothing_else() -> None:
    ctx = multiprocessing.get_context("spawn")
    # A semaphore makes multiprocessing start its resource tracker, as the supervisor's
    # Events do: a child that must not be taken for a worker.
    ready = ctx.Event()
    workers = [ctx.Process(target=time.sleep, args=(30,)) for _ in range(2)]
    for w in workers:
        w.start()
    lone = subprocess.Popen(["sleep", "30"])
    try:
        assert sorted(worker_pids(os.getpid(), 2)) == sorted(w.pid for w in workers)
        # Not what the caller expects: an error, not a guess.
        with pytest.raises(CpuCapError, match="expected 3"):
            worker_pids(os.getpid(), 3)
        with pytest.raises(CpuCapError, match="expected 1"):
            worker_pids(os.getpid(), 1)
        # A single-process gateway serves itself.
        assert worker_pids(lone.pid, 1) == [lone.pid]
        with pytest.raises(CpuCapError):
            worker_pids(lone.pid, 2)
    finally:
        ready.set()
        for w in workers:
            w.kill()
            w.join(5)
        lone.kill()
        lone.wait(5)
