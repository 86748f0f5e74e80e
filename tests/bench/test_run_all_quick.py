"""Keeps benchmarks/run_all.py working: it runs each benchmark as its own command and writes a
summary with each one's exit code, load and command (never a speed check)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RUN_ALL = REPO / "benchmarks" / "run_all.py"


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="run_all needs root (network namespaces)")
def test_run_all_quick_writes_a_summary(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, str(RUN_ALL), "--quick", "--only", "authz,waf", "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = (out / "summary.md").read_text()
    assert "QUICK" in summary
    rows = [line for line in summary.splitlines() if line.startswith("| authz |") or line.startswith("| waf |")]
    assert len(rows) == 2 and all(row.split("|")[2].strip() == "0" for row in rows), summary
    assert "`python benchmarks/authz.py --quick`" in summary
    assert (out / "authz.log").read_text().strip() and (out / "waf.log").read_text().strip()


def test_run_all_names_an_unknown_benchmark(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(RUN_ALL), "--only", "datapath,bogus", "--output", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "unknown benchmark bogus" in proc.stderr
