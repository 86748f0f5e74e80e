"""Every benchmark behind docs/benchmarks.md, one after another, with their reports in one folder.

    sudo .venv/bin/python benchmarks/run_all.py [--quick] [--output DIR] [--only NAME[,NAME]]
    bash scripts/dev.sh bench-all [--quick] [--output DIR]     # the same, installing what is missing

Runs, in this order (each as its own process, as its own documented command would):

- ``datapath``: the five configurations, with py-spy profiles (``datapath.py --profile``);
- ``controlplane``: 10,000 pods / 2,000 services / 1,000 policies, initial sync, deltas, churn
  with 100 nodes, CA rate, with cProfile (``controlplane.py --profile``);
- ``memory``: what a ztunnel's RSS is made of, and running ztunnels idle / with 1,000 held
  connections (``ztunnel_memory.py`` then ``ztunnel_memory.py --mesh``);
- ``waypoint``: HTTP/1.1 and gRPC through the waypoint, JWT, ext_authz, the WAF
  (``waypoint.py --profile``);
- ``authz`` and ``waf``: ztunnel's per-connection decision and the WAF engine alone.

The soak (``soak.py``, 30 minutes) is not included: it is a separate run. ``--quick`` passes
``--quick`` to each (a smoke run of every harness, not a measurement). The machine's load average
is recorded before and after each benchmark in ``DIR/summary.md``, with each one's exit code,
time and command; a benchmark that fails does not stop the others, and the exit code is 1 if
any failed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


@dataclass(frozen=True)
class Run:
    name: str
    script: str
    args: tuple[str, ...]
    quick: bool = True  # the script has --quick
    report: bool = True  # the script writes its report with --output/--json


def runs(out: Path) -> list[Run]:
    return [
        Run("datapath", "datapath.py", ("--profile",)),
        Run("controlplane", "controlplane.py", ("--profile",)),
        Run("memory-imports", "ztunnel_memory.py", ("--json", str(out / "memory-imports.json")), False, False),
        Run("memory-mesh", "ztunnel_memory.py", ("--mesh", "--json", str(out / "memory-mesh.json")), False, False),
        Run("waypoint", "waypoint.py", ("--profile",)),
        Run("authz", "authz.py", (), True, False),
        Run("waf", "waf.py", (), True, False),
    ]


GROUPS = {"datapath", "controlplane", "memory", "waypoint", "authz", "waf"}


def command(run: Run, out: Path, quick: bool) -> list[str]:
    cmd = [sys.executable, str(HERE / run.script), *run.args]
    if quick and run.quick:
        cmd.append("--quick")
    if quick and run.name in ("memory-imports", "memory-mesh"):
        cmd += ["--repeat", "1"]
    if run.report:
        cmd += ["--output", str(out / f"{run.name}.md"), "--json", str(out / f"{run.name}.json")]
    return cmd


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--quick", action="store_true", help="a smoke run of every harness (not a measurement)")
    p.add_argument("--output", type=Path, help="folder for the reports (default: bench-<UTC time>)")
    p.add_argument("--only", help=f"run only these ({', '.join(sorted(GROUPS))}; default all)")
    args = p.parse_args(argv)
    only = {n for n in (args.only or "").split(",") if n} or GROUPS
    if only - GROUPS:
        p.error(f"--only: unknown benchmark {', '.join(sorted(only - GROUPS))} (known: {', '.join(sorted(GROUPS))})")
    if os.geteuid() != 0:
        print("run_all: the data-path and memory benchmarks build network namespaces: run as root", file=sys.stderr)
        return 2
    out = args.output or Path(f"bench-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}")
    out.mkdir(parents=True, exist_ok=True)
    todo = [r for r in runs(out) if r.name.split("-")[0] in only]
    summary = [
        f"# Benchmarks, {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC" + (" (QUICK: not a measurement)" if args.quick else ""),
        "",
        f"Commit: {_git('rev-parse', '--short', 'HEAD')}{' (with uncommitted changes)' if _git('status', '--porcelain') else ''};"
        f" {os.cpu_count()} CPUs. Load average (1/5/15 min) before and after each.",
        "",
        "| benchmark | exit | minutes | load before | load after | report | command |",
        "|---|---:|---:|---|---|---|---|",
    ]
    failed = []
    for i, run in enumerate(todo, 1):
        cmd = command(run, out, args.quick)
        before, t0 = load(), time.monotonic()
        print(f"[run_all] {i}/{len(todo)} {run.name}: {shlex.join(cmd)}", file=sys.stderr, flush=True)
        log = out / f"{run.name}.log"
        with log.open("w") as f:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
        minutes = (time.monotonic() - t0) / 60
        print(f"[run_all] {run.name}: exit {rc} after {minutes:.1f} min (log: {log})", file=sys.stderr, flush=True)
        if rc != 0:
            failed.append(run.name)
        report = f"{run.name}.md" if run.report else f"{run.name}.log"
        rel = shlex.join(["python", os.path.relpath(cmd[1], ROOT), *cmd[2:]])
        summary.append(f"| {run.name} | {rc} | {minutes:.1f} | {before} | {load()} | {report} | `{rel}` |")
    (out / "summary.md").write_text("\n".join(summary) + "\n")
    print(f"[run_all] reports in {out}/ (summary.md); failed: {', '.join(failed) or 'none'}", file=sys.stderr)
    return 1 if failed else 0


def _git(*args: str) -> str:
    p = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    return p.stdout.strip() if p.returncode == 0 else "unknown"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
