"""Keeps benchmarks/hbone_connect.py working and measuring what it says: resumed connections do
resume, cold ones never do (never a speed check)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("extra", "resumed"), [((), 20), (("--cold",), 0)])
def test_hbone_connect_quick(extra: tuple[str, ...], resumed: int) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "hbone_connect.py"), "--connections", "20", *extra],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    m = re.search(r"20 new HBONE connections \(.*: (\d+) resumed\): (\d+) µs of CPU", proc.stdout)
    assert m is not None, proc.stdout
    assert int(m.group(1)) == resumed and int(m.group(2)) > 0
