"""bench/halt_poll.py sets the VM's guest halt polling for one command and always puts
the old value back; bench/common.idle_policy says in every report what it was. Run
against a stand-in file: the real sysfs parameter is the machine's, not a test's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from common import idle_policy

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "halt_poll.py"


def _run(param: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--param", str(param), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_command_runs_with_the_value_and_the_old_one_comes_back(tmp_path: Path) -> None:
    param = tmp_path / "guest_halt_poll_ns"
    param.write_text("0\n")
    show = f"import sys; print(open({str(param)!r}).read()); sys.exit(3)"
    out = _run(param, "200000", "--", sys.executable, "-c", show)
    assert out.stdout.strip() == "200000"
    assert out.returncode == 3  # the command's own exit status
    assert param.read_text() == "0"


def test_the_old_value_comes_back_when_the_command_cannot_start(tmp_path: Path) -> None:
    param = tmp_path / "guest_halt_poll_ns"
    param.write_text("50000")
    out = _run(param, "200000", "--", str(tmp_path / "no-such-command"))
    assert out.returncode == 127
    assert "cannot run" in out.stderr and "Traceback" not in out.stderr
    assert param.read_text() == "50000"


def test_a_machine_without_the_parameter_gets_a_clear_error(tmp_path: Path) -> None:
    out = _run(tmp_path / "absent" / "guest_halt_poll_ns", "200000", "--", "true")
    assert out.returncode == 2
    assert "cannot set" in out.stdout and "cpuidle-haltpoll" in out.stdout


def test_idle_policy_names_the_driver_and_the_halt_polling(tmp_path: Path) -> None:
    driver, param = tmp_path / "current_driver", tmp_path / "guest_halt_poll_ns"
    assert idle_policy(driver, param) == "cpuidle: unknown"
    driver.write_text("haltpoll\n")
    assert idle_policy(driver, param) == "cpuidle: haltpoll"
    param.write_text("0\n")
    assert idle_policy(driver, param) == "cpuidle: haltpoll, guest_halt_poll_ns=0"
