"""Keeps the soak benchmark harness working: ``benchmarks/soak.py --quick`` (a local mesh from
``ambientctl mesh up``, traffic from two client pods, four kills: ztunnel, cni agent, control
plane, ztunnel) must report every figure — each kill with its recovery time, RSS and fd samples
of every daemon, error counts per kind and over time. It asserts presence, never speed.

The harness runs ``ambientctl mesh down`` in a ``finally``; this test runs it again (for a run
killed half way) and checks no netns or process of the run is left.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
KINDS = ["connect_fail", "reset", "eof", "timeout", "http_fail", "mismatch"]
DAEMONS = ["controlplane", "ztunnel-node-a", "ztunnel-node-b", "cni-node-a", "cni-node-b"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(600),
    pytest.mark.skipif(
        os.geteuid() != 0 or not all(shutil.which(t) for t in ("ip", "nft", "nsenter")),
        reason="ambientctl mesh up builds network namespaces and nft rules: needs root, ip, nft, nsenter",
    ),
]


def _netns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    out = tmp_path_factory.mktemp("soak")
    runs = out / "runs"
    env = dict(os.environ, AMBIENT_DEMO_RUN_ROOT=str(runs))
    report, raw = out / "report.md", out / "report.json"
    try:
        proc = subprocess.run(
            [sys.executable, "benchmarks/soak.py", "--quick", "--run-root", str(runs), "--output", str(report),
             "--json", str(raw)],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=540,
        )  # fmt: skip
    finally:
        # The harness downs its mesh in a finally; a harness killed outright (the timeout) leaves
        # the run's state.json under the run root, where `mesh down --all` finds it.
        subprocess.run([sys.executable, "-m", "ambientctl", "mesh", "down", "--all"], cwd=ROOT, env=env,
                       capture_output=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    r = json.loads(raw.read_text())
    assert r["run_id"], r["run_id"]
    left = {n for n in _netns() if n.startswith(f"ambd-{r['run_id']}-")}
    assert not left, left
    for root in (runs, Path(r["work_dir"])):  # the daemons; the pods' commands and the load generators
        assert not _processes_under(root), _processes_under(root)
    assert not list(runs.glob("*/state.json"))
    return r, report.read_text()


def _processes_under(root: Path) -> list[str]:
    """Live processes whose command line names a path under ``root``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(root) in cmd:
            found.append(f"{proc.name}: {cmd[:200]}")
    return found


def test_every_kill_has_a_recovery_time_and_error_counts(quick: tuple[dict[str, Any], str]) -> None:
    r, _ = quick
    kills = r["kills"]
    assert [k["component"] for k in kills] == [
        "ztunnel-node-a",
        "cni-node-a",
        "controlplane",
        "ztunnel-node-b",
    ]
    for k in kills:
        for figure in ("at_s", "restarted_s", "back_s", "traffic_s", "recovery_s", "errors_total"):
            assert _number(k[figure]), (k["component"], figure, k[figure])
        assert k["recovered"] is True, k
        assert k["new_pid"] != k["pid"], k
        assert sorted(k["errors"]) == sorted(KINDS), k
        assert all(_number(n) for n in k["errors"].values()), k


def test_errors_per_kind_over_time_and_traffic_totals(quick: tuple[dict[str, Any], str]) -> None:
    r, _ = quick
    assert sorted(r["errors_total"]) == sorted(KINDS)
    assert all(_number(n) for n in r["errors_total"].values())
    rows = r["errors_over_time"]
    assert len(rows) >= 5, rows
    for row in rows:
        for figure in ("from_s", "http_ok", "conn_ok", "stream_kib", *KINDS):
            assert _number(row[figure]), (row, figure)
    assert sum(len(row["kills"]) for row in rows) == len(r["kills"])
    assert r["ok_total"]["http"] > 0 and r["ok_total"]["conn"] > 0 and r["ok_total"]["stream_mib"] > 0


def test_rss_and_fds_sampled_for_every_daemon_and_its_replacement(quick: tuple[dict[str, Any], str]) -> None:
    r, _ = quick
    procs = r["processes"]
    for name in DAEMONS:
        rows = [p for p in procs if p["process"] == name]
        assert rows, name
        for p in rows:
            for figure in ("start", "max", "end"):
                assert _number(p["rss_mib"][figure]) and p["rss_mib"][figure] > 0, p
                assert _number(p["fds"][figure]) and p["fds"][figure] > 0, p
    killed = {k["component"] for k in r["kills"]}
    for name in killed:  # the process before the kill and the one the supervisor started
        assert len({p["pid"] for p in procs if p["process"] == name}) >= 2, name
    assert {s["process"] for s in r["samples"]} >= set(DAEMONS)
    assert {s["pod"] for s in r["pod_sockets"]} == {"soak/srv-a", "soak/srv-b", "soak/cli-a", "soak/cli-b"}


def test_markdown_report_has_the_tables(quick: tuple[dict[str, Any], str]) -> None:
    _, md = quick
    assert "command: `python benchmarks/soak.py --quick" in md
    for head in ("| # | at s | killed |", "| from s | kills |", "| process | pid |", "| pod | open start |"):
        assert head in md, head
    assert "**not recovered**" not in md
