"""Where ztunnel's memory goes under steady new-connection traffic: ``tracemalloc`` snapshots of
real ztunnels, compared by traceback, beside the process's RSS (issue 24).

    sudo .venv/bin/python benchmarks/soak_memory.py [--connections 20000] [--warmup 2000]
        [--concurrency 8] [--frames 12] [--top 12] [--json FILE]

It builds the in-process mesh of the netns tests (tests/netns/mesh.py: the real discovery server
and two real ztunnels, each fed by its own xDS client; apps in pod namespaces whose connections
the kernel redirects): a client pod on node 1, an echo server on node 1 and one on node 2. The
client opens new TCP connections to both servers in turn (``--concurrency`` at a time), each
sending a few bytes, half-closing and reading the echo: every one is an outbound connection of
ztunnel 1 carried as a CONNECT stream on a pooled HBONE connection, and an inbound one of
ztunnel 1 or 2. After ``--warmup`` connections ``tracemalloc`` starts; snapshots are taken at the
start and after every quarter of ``--connections``, and the growth between the first and each
later one is grouped by traceback (the largest first), with the RSS at each point. Everything
runs in this one process (ztunnels and apps): the groups name what holds the memory.

Also counted at each point: the closed-stream records each HBONE connection's ``h2`` state
keeps (``_closed_streams``): one per stream and end, for 2**16 streams, until issue 24 kept only
the last resets (``mesh.hbone.protocol._ResetStreams``); docs/benchmarks.md, "ztunnel's memory
under steady traffic", has the figures before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mesh.log import configure  # noqa: E402
from tests.netns.mesh import Mesh, echo_keeping_nothing  # noqa: E402
from tests.netns.topology import Topology  # noqa: E402

PORT = 7007


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def h2_closed_streams(m: Mesh) -> tuple[int, int]:
    """(HBONE connections, closed-stream records their h2 state holds) over both ztunnels."""
    conns = records = 0
    for node in m.nodes:
        for pod in node.zt.manager.pods.values():
            protos: list[Any] = list(pod.outbound.pool.connections())
            if pod.inbound.server is not None:
                protos += list(pod.inbound.server.connections)
            for proto in protos:
                conns += 1
                records += len(proto.conn._h2._closed_streams)
    return conns, records


def top(diff: list[tracemalloc.StatisticDiff], n: int) -> list[dict[str, Any]]:
    out = []
    for d in diff[:n]:
        frames = [f"{f.filename.replace(str(ROOT) + '/', '')}:{f.lineno}" for f in d.traceback]
        out.append({"bytes": d.size_diff, "count": d.count_diff, "traceback": frames[-6:]})
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    topo = Topology()
    try:
        topo.add_node()
        topo.add_node()
        topo.connect_nodes()
        cli = topo.add_pod(1, "cli", "soak", "cli", {"app": "cli"})
        servers = [
            topo.add_pod(1, "srv-a", "soak", "srv", {"app": "srv"}),
            topo.add_pod(2, "srv-b", "soak", "srv", {"app": "srv"}),
        ]
        m = Mesh(topo)
        apps: list[asyncio.Server] = []
        try:
            await m.start()
            for srv in servers:
                sock = await m.factory(srv).tcp_listener("0.0.0.0", PORT)
                apps.append(await asyncio.start_server(echo_keeping_nothing, sock=sock))
            await m.converged()
            t0 = time.monotonic()
            failed = await m.exchange_many(cli, servers, PORT, args.warmup, concurrency=args.concurrency)
            gc.collect()
            tracemalloc.start(args.frames)
            first = tracemalloc.take_snapshot()
            start = {"connections": 0, "rss_mib": round(rss_mib(), 1), "traced_mib": 0.0}
            points: list[dict[str, Any]] = [
                {**start, "hbone_connections_and_h2_closed_records": h2_closed_streams(m)}
            ]
            print(
                f"warm-up: {args.warmup} connections in {time.monotonic() - t0:.0f} s; {points[0]}",
                flush=True,
            )
            step = args.connections // 4
            done = 0
            last: list[tracemalloc.StatisticDiff] = []
            for _ in range(4):
                failed += await m.exchange_many(cli, servers, PORT, step, concurrency=args.concurrency)
                done += step
                gc.collect()
                snap = tracemalloc.take_snapshot()
                last = snap.compare_to(first, "traceback")
                grown = sum(d.size_diff for d in last)
                point = {
                    "connections": done,
                    "rss_mib": round(rss_mib(), 1),
                    "traced_mib": round(grown / 2**20, 2),
                    "traced_bytes_per_connection": round(grown / done, 1),
                    "hbone_connections_and_h2_closed_records": h2_closed_streams(m),
                }
                points.append(point)
                print(point, flush=True)
            tracemalloc.stop()
            return {
                "warmup": args.warmup,
                "connections": args.connections,
                "concurrency": args.concurrency,
                "failed": failed,
                "seconds": round(time.monotonic() - t0, 1),
                "points": points,
                "top_growth": top(last, args.top),
            }
        finally:
            for app in apps:
                app.close()
            await m.aclose()
    finally:
        errors = topo.destroy()
        if errors:
            print("netns teardown:", errors, file=sys.stderr)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--connections", type=int, default=20000, help="connections measured (after the warm-up)")
    p.add_argument("--warmup", type=int, default=2000, help="connections before tracemalloc starts")
    p.add_argument("--concurrency", type=int, default=8, help="connections in flight at once")
    p.add_argument("--frames", type=int, default=12, help="traceback depth kept by tracemalloc")
    p.add_argument("--top", type=int, default=12, help="growth groups shown")
    p.add_argument("--json", type=Path, help="write the figures as JSON here")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("soak_memory: builds network namespaces: run it as root", file=sys.stderr)
        return 2
    configure("warning")  # not a line per connection
    try:
        import uvloop

        result = uvloop.run(run(args))
    except KeyboardInterrupt:
        return 130
    for g in result["top_growth"]:
        print(f"{g['bytes']:>10} B {g['count']:>7} blocks")
        for frame in g["traceback"]:
            print(f"      {frame}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0 if not result["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
