"""What compiling the request path with mypyc would buy, counted in instructions.

mypyc (part of mypy, already a dev dependency) compiles type-annotated modules to C
extensions. This script copies this tree's `gateway` package to a scratch directory,
compiles `MODULES` there, checks that the copy imports, and runs bench/icount.py on each
workload with the compiled copy as the baseline: "this tree against baseline" is then
what the interpreted code costs more than the compiled one (+17.5 % there is the
compiled copy's -14.9 %).

It is a measurement, not a build the project ships: the compiled copy only exists in the
scratch directory, and the test suite runs on the interpreted package (see
docs/performance.md, "Compiling the request path with mypyc", for the figures and what
shipping it would take).

    .venv/bin/python bench/compiled.py                       # ~10 min: compile + counts
    .venv/bin/python bench/compiled.py --workloads passthrough --keep /tmp/compiled
    .venv/bin/python bench/compiled.py --add gateway/protocol.py --add gateway/cycle.py
    .venv/bin/python bench/compiled.py --workloads shed --store redis://127.0.0.1:6379/12

Modules left out, and why (mypy 2.4.1, 2026-12-03):
  gateway/protocol.py, gateway/cycle.py  they compile and pass their tests (`--add`), but
      cost more compiled: 147k instructions a request for a do-nothing app against 139k
      (they subclass uvicorn's interpreted classes, so attribute access goes through
      generic lookups that CPython 3.11's interpreter specializes). The first attempt also
      showed that compiled code checks declared types at run time: httptools' stub types
      `parse_url(url).query` as bytes while it is None without a query, and every such
      request failed (the source now reads it as Any).
  gateway/store/coalesce.py   a Generic dataclass with slots: "attribute '__dict__' of
      'type' objects is not writable" at import.
  gateway/proxy/body.py       async generators are not implemented by mypyc.
One edit is made to the copy: `RequestContext.route` (gateway/http.py) is annotated with
`CompiledRoute`, imported only for type checking; compiled in the same group as
gateway/routing.py, importing gateway.http segfaults (the class object is still NULL when
the dataclass's annotations are built), so the copy annotates it `Any`.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MODULES = (
    "gateway/app.py",
    "gateway/http.py",
    "gateway/routing.py",
    "gateway/headers.py",
    "gateway/policies/auth/policy.py",
    "gateway/policies/heartbeat/policy.py",
    "gateway/observability/logging.py",
    "gateway/observability/collectors.py",
    "gateway/proxy/forward.py",
    "gateway/proxy/client.py",
    "gateway/proxy/pool.py",
    "gateway/proxy/headers.py",
    "gateway/proxy/upstream.py",
)

_ROUTE_ANNOTATION = ("    route: CompiledRoute\n", "    route: Any\n")


def _copy(dest: Path) -> None:
    shutil.copytree(
        ROOT / "gateway", dest / "gateway", ignore=shutil.ignore_patterns("__pycache__", "*.so")
    )
    http = dest / "gateway" / "http.py"
    text = http.read_text()
    old, new = _ROUTE_ANNOTATION
    if old not in text:
        raise SystemExit(f"{http}: the RequestContext.route annotation moved; update this script")
    http.write_text(text.replace(old, new))


def _compile(dest: Path, python: str, modules: list[str]) -> None:
    out = subprocess.run(
        [python, "-m", "mypyc", *modules], cwd=dest, capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        errors = [line for line in out.stdout.splitlines() if ": error:" in line]
        tail = [out.stdout[-2000:], out.stderr[-2000:]]  # the C compiler's errors: stderr
        raise SystemExit("mypyc failed:\n" + "\n".join(errors or tail))
    names = [m[:-3].replace("/", ".") for m in modules]
    check = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    imp = subprocess.run(
        [python, "-c", check, *names], cwd=dest, capture_output=True, text=True, check=False
    )
    if imp.returncode != 0:
        raise SystemExit(f"the compiled copy does not import (rc {imp.returncode}):\n{imp.stderr}")
    count = sum(1 for _ in (dest / "gateway").rglob("*.so"))
    print(f"compiled {count} modules in {dest}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--python", default=sys.executable, help="interpreter to compile for and run")
    p.add_argument("--workloads", default="passthrough,shed", help="comma-separated")
    p.add_argument("--runs", type=int, default=2, help="counts per tree and workload")
    p.add_argument("--store", default="memory://", help="shed: memory:// or a Redis URL")
    p.add_argument("--keep", type=Path, help="compile into this directory and keep it")
    p.add_argument(
        "--add", action="append", default=[], metavar="MODULE", help="compile this module too"
    )
    args = p.parse_args(argv)
    if args.keep is not None and args.keep.exists():
        raise SystemExit(f"{args.keep} exists; give a new directory")
    dest = args.keep or Path(tempfile.mkdtemp(prefix="bench-compiled-"))
    try:
        _copy(dest)
        _compile(dest, args.python, [*MODULES, *args.add])
        for workload in args.workloads.split(","):
            cmd = [
                args.python,
                str(ROOT / "bench" / "icount.py"),
                workload,
                "--baseline",
                str(dest),
                "--runs",
                str(args.runs),
                "--store",
                args.store,
                "--python",
                args.python,
            ]
            subprocess.run(cmd, check=True)
    finally:
        if args.keep is None:
            shutil.rmtree(dest, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
