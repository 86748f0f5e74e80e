"""Keeps the data-path benchmark harness working: ``benchmarks/datapath.py --quick`` must produce
every figure for every configuration. It asserts presence, never speed.

Configuration 5 (two ztunnels between two network-namespace nodes, its baseline — direct TCP
between the same two pod netns before they are enrolled — and its C reference — a stunnel pair
between the same two pod netns) builds the local mesh of ambientctl/localmesh, so it needs root,
``ip`` and ``nft``. No figure of it is "n/a": the baseline has no pair processes, so — like
direct loopback TCP — it has no CPU or RSS figures.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ["direct", "stunnel", "haproxy", "ours", "netns-direct", "netns-stunnel", "ztunnel"]
NO_PAIR = {"direct", "netns-direct"}  # no processes in between: no CPU-s/GB or RSS figures
ALL_FIGURES = ["tput1_gbps", "tput4_gbps", "p50_us", "p99_us", "conn_per_s"]
PAIR_FIGURES = [
    "cpu_s_per_gb",
    "rss_idle_mib",
    "rss_1000_mib",
    "cpu_user_us_per_rt",
    "cpu_sys_us_per_rt",
    "cpu_user_us_per_conn",
    "cpu_sys_us_per_conn",
]
# Configuration 5 only: new connections with a full TLS handshake each (the ztunnels also with a
# resumed one), and many kept-alive connections doing round trips at once.
NETNS_FIGURES = {
    "netns-direct": ["many_p50_us", "many_p99_us", "many_rt_per_s", "many_dropped"],
    "netns-stunnel": [
        "conn_per_s_cold",
        "cpu_user_us_per_conn_cold",
        "cpu_sys_us_per_conn_cold",
        "many_p50_us",
        "many_p99_us",
        "many_rt_per_s",
        "many_cpu_us_per_rt",
        "many_dropped",
    ],
    "ztunnel": [
        "conn_per_s_resumed",
        "cpu_user_us_per_conn_resumed",
        "cpu_sys_us_per_conn_resumed",
        "conn_per_s_cold",
        "cpu_user_us_per_conn_cold",
        "cpu_sys_us_per_conn_cold",
        "many_p50_us",
        "many_p99_us",
        "many_rt_per_s",
        "many_cpu_us_per_rt",
        "many_dropped",
    ],
}
NETNS_LABELS = {
    "netns-direct": "direct TCP, pod netns node-a → node-b",
    "netns-stunnel": "stunnel pair, pod netns node-a → node-b",
    "ztunnel": "two ztunnels (netns nodes)",
}
NUMBER = re.compile(r"^-?\d+(\.\d+)?\u00d7?$")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not all(shutil.which(t) for t in ("iperf3", "stunnel4"))
        or not shutil.which("haproxy", path="/usr/sbin:/usr/bin"),
        reason="needs iperf3, stunnel4 and haproxy (bash scripts/dev.sh installs them)",
    ),
    pytest.mark.skipif(
        os.geteuid() != 0 or not all(shutil.which(t) for t in ("ip", "nft")),
        reason="configuration 5 builds network namespaces and nft rules: needs root, ip and nft",
    ),
]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, list[dict[str, float]]]]:
    out = tmp_path_factory.mktemp("bench")
    report, raw = out / "report.md", out / "raw.json"
    proc = subprocess.run(
        [
            sys.executable,
            "benchmarks/datapath.py",
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
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return report.read_text(), json.loads(raw.read_text())["runs"]


def test_every_configuration_produced_every_figure(
    quick_run: tuple[str, dict[str, list[dict[str, float]]]],
) -> None:
    _, runs = quick_run
    assert sorted(runs) == sorted(CONFIGS)
    for config in CONFIGS:
        assert len(runs[config]) == 1, config
        figures = runs[config][0]
        wanted = ALL_FIGURES + (PAIR_FIGURES if config not in NO_PAIR else []) + NETNS_FIGURES.get(config, [])
        for key in wanted:
            value = figures.get(key)
            assert isinstance(value, (int, float)), (config, key, value)
        for key in (
            "tput1_gbps",
            "tput4_gbps",
            "p50_us",
            "p99_us",
            "conn_per_s",
            "cpu_s_per_gb",
            "conn_per_s_resumed",
            "conn_per_s_cold",
            "many_rt_per_s",
        ):
            if key in figures:
                assert figures[key] > 0, (config, key)
        if config in NO_PAIR:
            assert not set(PAIR_FIGURES) & set(figures), (config, figures)


def test_markdown_table_has_numbers_and_ratios(
    quick_run: tuple[str, dict[str, list[dict[str, float]]]],
) -> None:
    report, _ = quick_run
    assert "command: `python benchmarks/datapath.py --quick" in report
    assert "cores" in report and "CPU:" in report and "commit:" in report
    rows = {}
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 9:
            rows.setdefault(cells[0], []).append(cells[1:])
    # absolute table, ratio-to-direct table, ratio-to-stunnel table
    for label in ("stunnel pair", "haproxy pair", "ours (hbone forward → serve)"):
        absolute, to_direct, to_stunnel = rows[label]
        assert all(NUMBER.match(c) for c in absolute), (label, absolute)
        assert all(NUMBER.match(c) for c in to_direct[:5]), (label, to_direct)
        assert all(NUMBER.match(c) for c in to_stunnel), (label, to_stunnel)
    for label in ("direct TCP", "direct TCP, pod netns node-a → node-b"):
        (absolute,) = rows[label]
        assert all(NUMBER.match(c) for c in absolute[:5]), (label, absolute)
        assert absolute[5:] == ["—"] * 3, (label, absolute)
    # configuration 5: absolute figures, and ratios to its own baseline (not to loopback direct)
    for label in ("two ztunnels (netns nodes)", "stunnel pair, pod netns node-a → node-b"):
        (absolute,) = rows[label]
        assert all(NUMBER.match(c) for c in absolute), (label, absolute)
    (to_netns,) = rows["two ztunnels ÷ direct TCP between the same pod netns"]
    assert all(NUMBER.match(c) for c in to_netns[:5]), to_netns
    assert "not measured" not in report
    # CPU per round trip and per connection, for every configuration with processes in between
    cpu_rows = {}
    for line in report.split("## CPU per operation", 1)[1].split("## Targets", 1)[0].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and all(NUMBER.match(c) for c in cells[1:]):
            cpu_rows[cells[0]] = cells[1:]
    assert sorted(cpu_rows) == sorted(
        [
            "stunnel pair",
            "haproxy pair",
            "ours (hbone forward → serve)",
            "stunnel pair, pod netns node-a → node-b",
            "two ztunnels (netns nodes)",
        ]
    )


def test_ztunnels_against_a_stunnel_pair_between_the_same_pods(
    quick_run: tuple[str, dict[str, list[dict[str, float]]]],
) -> None:
    report, _ = quick_run
    title = "## Configuration 5: two ztunnels ÷ a stunnel pair between the same two pods"
    section = report.split(title, 1)[1].split("\n## ", 1)[0]
    table, targets = section.split("### Targets from issue 23", 1)
    rows = {}
    for line in table.splitlines():
        if line.startswith("| "):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    heads = rows.pop("configuration")
    widths = {len(cells) for cells in rows.values()}
    assert len(widths) == 1 and widths.pop() >= 15, rows
    for config in ("netns-stunnel", "ztunnel"):
        cells = rows[NETNS_LABELS[config]]
        assert all(NUMBER.match(c) for c in cells), (config, cells)
    ratios = rows["two ztunnels ÷ stunnel pair"]
    stunnel = rows[NETNS_LABELS["netns-stunnel"]]
    # Not divided: the "dropped" column, and (tiny quick-mode counts) a stunnel figure of 0.
    for head, ratio, ref in zip(heads, ratios, stunnel, strict=True):
        assert (ratio == "—") == (head.endswith("dropped") or float(ref) == 0), (head, ratio, ref)
    assert all(NUMBER.match(c) for c in ratios if c != "—"), ratios
    for target in ("throughput", "CPU-s/GB", "warm", "resumed", "cold", "RSS idle"):
        assert re.search(rf"^\| [^|]*{re.escape(target)}[^|]*\| -?\d+\.\d+", targets, re.M), target
    assert "nothing dropped | 0.00 | yes" in targets


def test_profiles_of_our_pair_and_of_the_ztunnels(
    quick_run: tuple[str, dict[str, list[dict[str, float]]]],
) -> None:
    report, _ = quick_run
    profiles = report.split("## Profiles under single-stream load", 1)[1]
    for title in (
        "`hbone forward`",
        "`hbone serve`",
        "ztunnel node-a (client side)",
        "ztunnel node-b (server side)",
    ):
        for mode in ("python", "native"):
            head = f"### {title}, {mode} frames ("
            assert head in profiles, head
            table = profiles.split(head, 1)[1].split("###", 1)[0]
            assert re.search(r"^\| 1 \| `.+` \| \d+\.\d \| \d+\.\d \|$", table, re.M), (title, mode)
    ops = report.split("## Profiles of the two ztunnels per operation", 1)[1]
    for title in ("ztunnel node-a (client side)", "ztunnel node-b (server side)"):
        for what in ("round trips", "new connections", "cold new connections"):
            for mode in ("python", "native"):
                head = f"### {title}, {what}, {mode} frames ("
                assert head in ops, head
                table = ops.split(head, 1)[1].split("###", 1)[0]
                assert re.search(r"^\| 1 \| `.+` \| \d+\.\d \| \d+\.\d \|$", table, re.M), head
