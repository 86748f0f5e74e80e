"""Keeps the waypoint benchmark harness working: ``benchmarks/waypoint.py --quick --profile`` must
produce every figure for every path and protocol (and, on ``direct``, ``waypoint`` and the WAF
paths, the WAF's request shapes), the added-cost tables and the profile summary. It asserts
presence, never speed.

``--quick`` uses the harness's Python load generators and backend, so neither wrk, h2load nor
nginx is needed; the haproxy reference runs when haproxy is installed (CI installs it) and is
reported as not run otherwise. The mesh (nodes and pods as network namespaces, nft redirection)
needs root, ``ip`` and ``nft``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
HAPROXY = shutil.which("haproxy", path="/usr/sbin:/usr/bin") is not None
WAF_PATHS = ["waypoint+waf-disabled", "waypoint+waf-detect", "waypoint+waf-enforce"]
WAYPOINT_PATHS = ["waypoint", "waypoint+jwt", "waypoint+ext_authz", *WAF_PATHS]
PATHS = ["direct", "mesh", *WAYPOINT_PATHS] + (["haproxy"] if HAPROXY else [])
PROTOCOLS, SHAPES = ["http1", "grpc"], ["get1k", "post16k"]
LABELS = {
    "direct": "direct TCP (pod → pod)",
    "mesh": "two ztunnels, no waypoint",
    "waypoint": "ztunnel → waypoint → ztunnel",
    "waypoint+jwt": "waypoint + JWT (RS256, cached keys)",
    "waypoint+ext_authz": "waypoint + ext_authz (gRPC Check)",
    "waypoint+waf-disabled": "waypoint + WAF Disabled",
    "waypoint+waf-detect": "waypoint + WAF DetectOnly (PL 1)",
    "waypoint+waf-enforce": "waypoint + WAF Enforce (PL 1)",
    "haproxy": "haproxy chain (mode http, TLS)",
}
WAF_MODES = {  # the WAF table's first cell
    "waypoint+waf-disabled": "Disabled",
    "waypoint+waf-detect": "DetectOnly, PL 1",
    "waypoint+waf-enforce": "Enforce, PL 1",
}
SHAPE_TITLES = {
    "get1k": "HTTP/1.1, 1 KiB GET (clean query)",
    "post16k": "HTTP/1.1, 16 KiB JSON POST (clean, inspected)",
}


def workloads(path: str) -> list[str]:
    if path in WAF_PATHS:
        return SHAPES
    return PROTOCOLS + SHAPES if path in ("direct", "waypoint") else PROTOCOLS


ADDED_LABELS = {
    "waypoint+jwt": "JWT validation, one token per client (RS256, inline JWKS)",
    "waypoint+ext_authz": "ext_authz gRPC round trip (authorizer in the mesh)",
}
EVERY = ["rps", "p50_us", "p99_us", "load_p50_us", "load_p99_us", "errors"]
PROXIED = ["cpu_us_per_req"]
MIDDLE = ["mid_cpu_us_per_req", "mid_cpu_user_us_per_req", "mid_cpu_sys_us_per_req", "mid_rss_mib"]
NUMBER = re.compile(r"^-?[\d,]+(\.\d+)?\u00d7?$")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.geteuid() != 0 or not all(shutil.which(t) for t in ("ip", "nft")),
        reason="builds network namespaces and nft rules: needs root, ip and nft",
    ),
]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    out = tmp_path_factory.mktemp("bench")
    report, raw = out / "report.md", out / "raw.json"
    proc = subprocess.run(
        [
            sys.executable,
            "benchmarks/waypoint.py",
            "--quick",
            "--profile",
            "--output",
            str(report),
            "--json",
            str(raw),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return report.read_text(), json.loads(raw.read_text())


def test_every_path_and_protocol_produced_every_figure(quick_run: tuple[str, dict[str, Any]]) -> None:
    _, raw = quick_run
    assert raw["tools"]["load"] == "python" and raw["tools"]["backend"] == "python"
    runs = raw["runs"]
    for path in PATHS:
        assert sorted(runs[path]) == sorted(workloads(path)), (path, list(runs[path]))
        for protocol in workloads(path):
            (figures,) = runs[path][protocol]
            wanted = (
                EVERY
                + (PROXIED if path != "direct" else [])
                + (MIDDLE if path in (*WAYPOINT_PATHS, "haproxy") else [])
                + (["authz_cpu_us_per_req"] if path == "waypoint+ext_authz" else [])
                + (["waf_inspected_per_req"] if path in WAF_PATHS else [])
            )
            for key in wanted:
                assert isinstance(figures.get(key), (int, float)), (path, protocol, key, figures)
            assert figures["rps"] > 0 and figures["p50_us"] > 0, (path, protocol)
            # The harness checks that requests on the waypoint paths went through the waypoint.
            through = figures["waypoint_requests_per_client_request"]
            assert (through > 0) == (path in WAYPOINT_PATHS), (path, protocol, through)
            if path in WAF_PATHS:  # every request inspected, but on Disabled none
                inspected = figures["waf_inspected_per_req"]
                assert (inspected >= 0.9) == (path != "waypoint+waf-disabled"), (path, protocol, inspected)
    micro = raw["jwt_microbench"]
    assert micro["new_token_us"] > 0 and micro["cached_token_us"] > 0, micro
    waf = raw["waf_microbench"]
    assert waf["rules"] > 900 and len(waf) >= 7 and all(v > 0 for v in waf.values()), waf
    if not HAPROXY:
        assert runs["haproxy"] == {"http1": [], "grpc": []}


def test_markdown_tables_have_numbers_and_ratios(quick_run: tuple[str, dict[str, Any]]) -> None:
    report, _ = quick_run
    assert "command: `python benchmarks/waypoint.py --quick --profile" in report
    assert "cores" in report and "CPU:" in report and "commit:" in report
    if not HAPROXY:
        assert "not run: haproxy not found" in report
    rows: dict[str, list[list[str]]] = {}
    for line in report.split("## On Istio's basis", 1)[0].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] in LABELS.values():
            rows.setdefault(cells[0], []).append(cells[1:])
    for path in PATHS:
        tables = rows[LABELS[path]]
        # per protocol and shape: the absolute table, then (but for direct) the ratio table
        assert len(tables) == len(workloads(path)) * (1 if path == "direct" else 2), (path, tables)
        for absolute in tables[:: 1 if path == "direct" else 2]:
            assert all(NUMBER.match(c) for c in absolute[:3]), (path, absolute)
        if path != "direct":
            for ratios in tables[1::2]:
                assert all(NUMBER.match(c) for c in ratios[:3]), (path, ratios)
    istio = report.split("## On Istio's basis", 1)[1].split("## Every repeat", 1)[0]
    waypoint_rows = [line for line in istio.splitlines() if line.startswith("| waypoint |")]
    assert len(waypoint_rows) == 2, istio
    for line in waypoint_rows:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert all(NUMBER.match(c) for c in cells[2:]), cells


def test_added_cost_of_jwt_and_ext_authz(quick_run: tuple[str, dict[str, Any]]) -> None:
    """One row per added path and protocol, every figure a number (a signed difference for the
    added ones), and the statement per path, from the same run."""
    report, _ = quick_run
    section = report.split("## Added cost over the plain waypoint path (same run)", 1)[1]
    section = section.split("## On Istio's basis", 1)[0]
    signed = re.compile(r"^[+-][\d,]+$")
    for path, label in ADDED_LABELS.items():
        rows = [
            [c.strip() for c in line.strip().strip("|").split("|")]
            for line in section.splitlines()
            if line.startswith(f"| {label} |")
        ]
        assert [r[1] for r in rows] == ["http1", "grpc"], (path, rows)
        for cells in rows:
            assert NUMBER.match(cells[2]), cells  # the waypoint's p50
            assert all(signed.match(c) for c in cells[3:7]), cells  # added p50, p99, CPU
            assert NUMBER.match(cells[8]), cells  # req/s ratio
            assert (cells[7] != "—") == (path == "waypoint+ext_authz"), cells  # authorizer CPU
        statement = re.search(rf"^- \*\*{re.escape(label)}\*\* — HTTP/1.1: (.+)$", section, re.M)
        assert statement and "µs p50" in statement[1] and "gRPC:" in statement[1], section
    assert re.search(r"for a token not seen before \(signature checked\), [\d.,]+ µs for a cached", section)


def test_added_cost_of_the_waf(quick_run: tuple[str, dict[str, Any]]) -> None:
    """Per shape, the plain waypoint's row and one row per mode, every figure a number (a signed
    difference for the added ones); the statement per mode; the engine alone, per request shape."""
    report, _ = quick_run
    section = report.split("## The WAF: added cost over the plain waypoint path (same run)", 1)[1]
    section = section.split("## On Istio's basis", 1)[0]
    signed = re.compile(r"^[+-][\d,]+$")
    rows = [
        [c.strip() for c in line.strip().strip("|").split("|")]
        for line in section.splitlines()
        if line.startswith("| ") and not line.startswith(("| WafPolicy", "| request"))
    ]
    table = [r for r in rows if len(r) == 12]
    assert [(r[0], r[1]) for r in table] == [
        (mode, shape) for shape in SHAPES for mode in ("none (`waypoint`)", *WAF_MODES.values())
    ], table
    for cells in table:
        assert all(NUMBER.match(c) for c in cells[2:6]), cells  # req/s, ratio, p50, p99
        assert NUMBER.match(cells[8]), cells  # the waypoint's CPU
        if cells[0] == "none (`waypoint`)":
            assert cells[6:8] + cells[9:] == ["—"] * 5, cells
        else:
            assert all(signed.match(c) for c in cells[6:8] + cells[9:11]), cells
            assert (float(cells[11]) >= 0.9) == (cells[0] != "Disabled"), cells  # inspected per request
    for path in WAF_PATHS:
        label = LABELS[path].removeprefix("waypoint + ")
        statement = re.search(rf"^- \*\*{re.escape(label)}\*\* — 1 KiB GET (.+)$", section, re.M)
        assert statement and "µs p50" in statement[1] and "16 KiB JSON POST" in statement[1], section
    assert "gRPC is not measured through the WAF" in section
    micro = [r for r in rows if len(r) == 3]  # the engine alone: request, wall µs, CPU µs
    assert len(micro) >= 7 and all(NUMBER.match(c) for r in micro for c in r[1:]), micro


def test_profile_of_the_waypoint(quick_run: tuple[str, dict[str, Any]]) -> None:
    report, _ = quick_run
    profile = report.split("## Profile of the waypoint under load", 1)[1]
    for title in ("HTTP/1.1, 1 KiB POST", "gRPC-shaped HTTP/2 unary, 1 KiB"):
        by_component = profile.split(f"### {title}: by component (", 1)[1].split("###", 1)[0]
        assert re.search(r"^\| .+ \| \d+\.\d \|$", by_component, re.M), title
        top = profile.split(f"### {title}: top functions", 1)[1].split("###", 1)[0]
        assert re.search(r"^\| 1 \| `.+` \| \d+\.\d \| \d+\.\d \|$", top, re.M), title
    added = profile.split("## Where the added time goes", 1)[1]
    number, delta = r"[\d,.]+", r"[+-][\d,.]+"
    for title in ("HTTP/1.1, 1 KiB POST", "gRPC-shaped HTTP/2 unary, 1 KiB"):
        table = added.split(f"### {title}: by component", 1)[1].split("###", 1)[0]
        total = (
            rf"^\| \*\*all \(busy samples\)\*\* \| {number} \| {number} \| {delta} \| {number} \| {delta} \|$"
        )
        assert re.search(total, table, re.M), table
        for path in ADDED_LABELS:
            grew = added.split(f"### {title}: {path}, the functions that grew most", 1)[1].split("###", 1)[0]
            assert re.search(rf"^\| 1 \| `.+` \| {number} \| {delta} \|$", grew, re.M), (path, grew)
    for title in SHAPE_TITLES.values():
        # where the WAF's time goes: the Enforce recording by component, its C time named
        by_component = profile.split(f"### WAF Enforce (PL 1), {title}: by component (", 1)[1]
        by_component = by_component.split("###", 1)[0]
        assert re.search(r"^\| WAF: libmodsecurity, C .+ \| \d+\.\d \|$", by_component, re.M), title
        table = added.split(f"### {title}: by component", 1)[1].split("###", 1)[0]
        total = rf"^\| \*\*all \(busy samples\)\*\* \| {number}" + rf" \| {number} \| {delta}" * 3 + r" \|$"
        assert re.search(total, table, re.M), table
        for path in WAF_PATHS:
            grew = added.split(f"### {title}: {path}, the functions that grew most", 1)[1].split("###", 1)[0]
            assert re.search(rf"^\| 1 \| `.+` \| {number} \| {delta} \|$", grew, re.M), (path, grew)
