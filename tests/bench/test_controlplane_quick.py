"""Keeps benchmarks/controlplane.py working: --quick must produce every figure (never a speed check)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_controlplane_benchmark_quick(tmp_path: Path) -> None:
    out = tmp_path / "cp.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "controlplane.py"), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "one-pod change" in proc.stdout
    figures = json.loads(out.read_text())
    for key in (
        "sync_s",
        "delta_p50_s",
        "delta_p99_s",
        "upsert_p50_s",
        "ca_rps",
        "rss_loaded",
        "rss_client_synced",
    ):
        assert isinstance(figures.get(key), int | float) and figures[key] > 0, key
    # Correctness of what was measured, not speed: every change arrived, every CSR was signed.
    assert figures["changes_ok"] == figures["changes"] > 0
    assert not figures["ca_errors"] and figures["ca_requests"] > 0  # ca_errors lists the failures
    assert figures["client_workloads"] > 0 and figures["client_services"] > 0
    # Churn: every kind of change reached every simulated node stream (the phase waits for all
    # of them, so getting figures means each change arrived), with bytes counted for it.
    assert "change | store write" in proc.stdout
    assert figures["churn_clients"] > 0 and figures["churn_sync_bytes_per_client"] > 0
    kinds = figures["churn"]
    assert set(kinds) == {
        "pod_added",
        "pod_removed",
        "pod_relabelled",
        "policy_edited",
        "policy_retargeted",
        "service_edited",
    }
    for kind, k in kinds.items():
        assert k["changes"] > 0 and k["p99_s"] > 0, kind
        assert k["bytes_per_client"] > 0 and k["resources_per_client"] >= 1, kind
    # What is pushed is what changed: no stream got more resources than the change altered.
    for change in figures["churn_changes"]:
        assert change["resources_per_client"] == change["markers"], change
