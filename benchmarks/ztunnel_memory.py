"""What ztunnel's resident memory is made of: the RSS each group of imports adds, in the order a
ztunnel process loads them, each measured in a fresh interpreter.

    .venv/bin/python benchmarks/ztunnel_memory.py [--repeat N] [--json FILE]
    .venv/bin/python benchmarks/ztunnel_memory.py --mesh [--hold N] [--repeat N]   # root, ip, nft

Every step imports its modules on top of the previous steps' (cumulative), so the figures add up
to what ``import``-ing everything costs (RSS, and the anonymous part of it: the rest are pages of
shared libraries and files, which processes share); the last steps are ztunnel's own modules (what
``ztunnel.main`` imports at start, then the gRPC CA and xDS clients it imports in ``run``) and what
those pull in beyond the libraries above. VmRSS from /proc/self/status, MiB, median of the
repeats.

``--mesh`` measures running ztunnels instead: it builds the local mesh of ``ambientctl demo``
(as configuration 5 of benchmarks/datapath.py does) and reads both ztunnels' VmRSS and RssAnon
idle (after enrollment, certificates fetched, no traffic), while N connections from shop/frontend
to shop/web are held through them, after they are closed, and after a burst of new connections
— the same steps for every variant compared, a fresh mesh per repeat. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

STEPS: list[tuple[str, list[str]]] = [
    ("interpreter", []),
    ("ssl + asyncio", ["ssl", "asyncio"]),
    ("uvloop", ["uvloop"]),
    ("h2", ["h2.connection", "h2.config", "h2.events"]),
    ("structlog", ["structlog"]),
    (
        "protobuf",
        ["google.protobuf.message", "google.protobuf.descriptor_pool", "google.protobuf.struct_pb2"],
    ),
    # ztunnel's xDS and CA clients run on grpclib since issue 23 (grpcio: 9.1 MiB at this step).
    ("grpclib", ["grpclib.client", "grpclib.config", "grpclib.protocol"]),
    (
        "cryptography (x509, ec, serialization)",
        [
            "cryptography.x509",
            "cryptography.hazmat.primitives.asymmetric.ec",
            "cryptography.hazmat.primitives.serialization",
        ],
    ),
    ("prometheus-client", ["prometheus_client"]),
    ("pyyaml (ztunnel does not import it)", ["yaml"]),
    ("ztunnel.main (its start-up imports)", ["ztunnel.main"]),
    ("mesh.caclient + mesh.xds.client (imported in run)", ["mesh.caclient", "mesh.xds.client"]),
]

CHILD = r"""
import importlib, json, sys
def rss():
    got = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "RssAnon:")):
                got[line.split(":")[0]] = int(line.split()[1]) / 1024
    return got["VmRSS"], got["RssAnon"]
steps = json.loads(sys.argv[1])
out = []
for name, mods in steps:
    for m in mods:
        importlib.import_module(m)
    out.append([name, *rss(), len(sys.modules)])
print(json.dumps({"steps": out, "modules": sorted(sys.modules)}))
"""


def measure_once() -> tuple[list[tuple[str, float, float, int]], list[str]]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("PYTHONSTARTUP", None)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(STEPS)], capture_output=True, text=True, env=env, check=True
    )
    data = json.loads(proc.stdout)
    return [tuple(s) for s in data["steps"]], data["modules"]


def top_level_counts(modules: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for m in modules:
        top = m.split(".", 1)[0]
        counts[top] = counts.get(top, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def proc_mem(pid: int) -> tuple[float, float]:
    """(VmRSS, RssAnon) of ``pid`` in MiB."""
    got: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "RssAnon:")):
                got[line.split(":")[0]] = int(line.split()[1]) / 1024
    return got["VmRSS"], got["RssAnon"]


def mesh_once(hold: int, settle: float, probe_trim: bool = False) -> dict[str, float]:
    """One fresh local mesh: both ztunnels' memory at each step (MiB, per ztunnel: node-a is the
    client side, node-b the server side)."""
    import signal
    import tempfile
    import time

    sys.path.insert(0, str(ROOT))
    sys.path.append(str(ROOT / "benchmarks"))  # after ROOT: benchmarks/controlplane.py is no package
    import datapath as dp

    from ambientctl.localmesh import spec
    from ambientctl.localmesh.mesh import LocalMesh
    from ambientctl.localmesh.state import RunState, teardown

    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="ztmem-") as tmp:
        work = Path(tmp)
        (work / "logs").mkdir()
        procs = dp.Processes(work / "logs")
        state = RunState.create(work / "mesh")
        try:
            settings = dp.Settings(hold_count=hold, settle=settle)
            bench = dp.Bench(settings, work, procs, dp.Creds(work, work, ""))
            mesh = LocalMesh(state, lambda msg: None)
            saved = dict(os.environ)
            if probe_trim:  # the mesh's processes inherit this environment
                os.environ["BENCH_ZTUNNEL_TRIM_ON_SIGUSR2"] = "1"
                os.environ["PYTHONPATH"] = os.pathsep.join(
                    filter(None, [str(dp.COLD_SITE_DIR), saved.get("PYTHONPATH")])
                )
            try:
                mesh.build(enroll=True)
            finally:
                os.environ.clear()
                os.environ.update(saved)
            pids = {node: mesh.procs.pid(f"ztunnel-{node}") for node in ("node-a", "node-b")}
            site = dp.Site(
                server_prefix=tuple(mesh.exec_argv(dp.DST_POD, [])),
                client_prefix=tuple(mesh.exec_argv(dp.SRC_POD, [])),
                bind="0.0.0.0",
                connect=dp.DST_IP,
                echo_port=dp.NETNS_ECHO_PORT,
            )
            subprocess.run(
                mesh.exec_argv(dp.SRC_POD, ["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"]),
                check=True,
                timeout=10,
            )

            def read(step: str) -> None:
                for node, pid in pids.items():
                    out[f"{step}_rss_{node}"], out[f"{step}_anon_{node}"] = proc_mem(pid)

            time.sleep(3 * settle)
            read("idle")
            backend, port = bench.echo_backend(site)
            pair = dp.Pair(port, fixed_pids=list(pids.values()))
            ready = work / "hold.ready"
            argv = [*site.client_prefix, dp.PYTHON, str(dp.WORKLOAD), "hold", "--host", site.connect]
            holder = procs.start(
                "hold", [*argv, "--port", str(port), "--count", str(hold), "--ready-file", str(ready)]
            )
            dp.wait_for(ready.exists, "hold client", [holder], timeout=180)
            out["held"] = json.loads(ready.read_text())["open"]
            time.sleep(settle)
            read("held")
            procs.stop(holder)
            time.sleep(3 * settle)
            read("released")
            rate = bench.run_json("connrate", bench.connrate_argv(pair, site, 5.0), timeout=90)
            out["burst_connections"] = rate["connections"]
            time.sleep(3 * settle)
            read("after_burst")
            if probe_trim:
                for pid in pids.values():
                    os.kill(pid, signal.SIGUSR2)  # benchmarks/hbone_cold/sitecustomize.py: malloc_trim(0)
                time.sleep(settle)
                read("trimmed")
            procs.stop(backend)
        finally:
            old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                procs.stop_all()
                errors = teardown(state)
            finally:
                for sig, handler in old.items():
                    signal.signal(sig, handler)
        if errors:
            raise RuntimeError("local mesh teardown: " + "; ".join(errors))
    del spec
    return out


def main_mesh(args: argparse.Namespace) -> int:
    runs = [mesh_once(args.hold, 1.0, args.probe_trim) for _ in range(args.repeat)]
    keys = list(runs[0])
    med = {k: statistics.median(r[k] for r in runs) for k in keys}
    print("| step | VmRSS node-a (client) | VmRSS node-b (server) | RssAnon node-a | RssAnon node-b |")
    print("|---|---:|---:|---:|---:|")
    for step, title in (
        ("idle", "idle (enrolled, certificates fetched)"),
        ("held", f"{args.hold} connections held"),
        ("released", "after they closed"),
        ("after_burst", f"after a burst of {med['burst_connections']:.0f} new connections"),
        ("trimmed", "then malloc_trim(0) in each ztunnel (SIGUSR2, benchmark-only hook)"),
    ):
        if f"{step}_rss_node-a" not in med:
            continue
        cells = [med[f"{step}_{kind}_{node}"] for kind in ("rss", "anon") for node in ("node-a", "node-b")]
        print(f"| {title} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    per_1000 = (
        sum(med[f"held_rss_{n}"] - med[f"idle_rss_{n}"] for n in ("node-a", "node-b")) * 1000 / args.hold
    )
    print(f"\nboth ztunnels, per 1,000 held connections: +{per_1000:.1f} MiB (held {med['held']:.0f})")
    print("every repeat:", json.dumps(runs))
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "median": med}, indent=1))
    return 0


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--mesh", action="store_true", help="measure running ztunnels in the local mesh (root)")
    p.add_argument("--hold", type=int, default=1000, help="--mesh: connections held (default 1000)")
    p.add_argument(
        "--probe-trim", action="store_true", help="--mesh: finally malloc_trim(0) each ztunnel (gdb)"
    )
    args = p.parse_args(argv)
    if args.mesh:
        return main_mesh(args)
    runs = []
    modules: list[str] = []
    for _ in range(args.repeat):
        steps, modules = measure_once()
        runs.append(steps)
    names = [s[0] for s in runs[0]]
    totals = [statistics.median(r[i][1] for r in runs) for i in range(len(names))]
    anon = [statistics.median(r[i][2] for r in runs) for i in range(len(names))]
    print("| step (cumulative) | adds RSS MiB | of which anonymous | RSS after MiB | modules loaded |")
    print("|---|---:|---:|---:|---:|")
    prev = prev_anon = 0.0
    for i, name in enumerate(names):
        print(
            f"| {name} | {totals[i] - prev:.1f} | {anon[i] - prev_anon:.1f} | {totals[i]:.1f} | {runs[0][i][3]} |"
        )
        prev, prev_anon = totals[i], anon[i]
    counts = top_level_counts(modules)
    print()
    print("modules by top-level package:", ", ".join(f"{k} {v}" for k, v in list(counts.items())[:20]))
    if args.json:
        Path(args.json).write_text(
            json.dumps({"names": names, "rss_mib": totals, "anon_mib": anon, "modules": counts}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
