"""Control-plane benchmark: xDS initial sync, one-pod delta latency, memory, CreateCertificate rate.

    .venv/bin/python benchmarks/controlplane.py [--quick] [--pods N --services N --policies N]
        [--changes N] [--ca-seconds S] [--ca-clients N] [--profile] [--output FILE]

The control plane runs in a child process (this file with ``--serve``): it generates a
deterministic mesh (seeded), loads it into a :class:`mesh.model.Store`, and serves the CA and
the delta-xDS servicer on one TLS gRPC port with ``controlplane.server.start_server``, exactly
as ``ambient-controlplane`` does. The parent is the node side: one ``XdsClient`` (TLS, mesh
root) writing a ``ProxyState``, as ztunnel's, and ``GrpcCaClient``s with real node tokens.
Parent and child talk over a pipe of JSON lines; the child's RSS is read from /proc. See docs/benchmarks-controlplane.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import dataclasses
import datetime as dt
import io
import json
import logging
import os
import platform
import pstats
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve()
ROOT = SCRIPT.parent.parent
if str(ROOT) not in sys.path:  # run as a script: import the tree this file is in
    sys.path.insert(0, str(ROOT))

import structlog  # noqa: E402

from mesh.model import (  # noqa: E402
    AuthorizationAction,
    AuthorizationPolicy,
    MeshObject,
    Namespace,
    Node,
    Operation,
    Rule,
    RuleFrom,
    RuleTo,
    Service,
    ServicePort,
    Source,
    Store,
    TunnelProtocol,
    Workload,
    WorkloadSelector,
)

SEED = 20261123
MIB = 1024 * 1024
TRUST_DOMAIN = "cluster.local"


@dataclass(frozen=True)
class Shape:
    pods: int
    services: int
    policies: int
    namespaces: int
    nodes: int
    accounts_per_namespace: int = 10


def quiet_logs() -> None:
    """The mesh logs with structlog at info; a benchmark only wants warnings, on stderr."""
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


# --- the mesh -----------------------------------------------------------------------------


def _ip(base: int, i: int) -> str:
    return f"{base}.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"


def generate(shape: Shape) -> list[MeshObject]:
    """A deterministic mesh: pods spread over nodes, ~pods/services pods per service."""
    rng = random.Random(SEED)
    objs: list[MeshObject] = [Node(name=f"node-{n:02d}") for n in range(shape.nodes)]
    namespaces = [f"ns-{i:02d}" for i in range(shape.namespaces)]
    objs += [Namespace(name=ns, labels={"team": f"t{i % 7}"}) for i, ns in enumerate(namespaces)]
    objs.append(Namespace(name="istio-system"))
    services: list[Service] = []
    for s in range(shape.services):
        ns = namespaces[s % len(namespaces)]
        app = f"svc-{s:05d}"
        services.append(
            Service(
                namespace=ns,
                name=app,
                vips=(_ip(10, 0x600000 + s),),  # 10.96.x.y
                ports=(
                    ServicePort(port=80, target_port=8080, name="http"),
                    ServicePort(port=9090, target_port="metrics", name="metrics"),
                ),
                selector={"app": app},
                labels={"app": app},
            )
        )
    objs += services
    for p in range(shape.pods):
        svc = services[p % len(services)] if services else None
        ns = svc.namespace if svc else namespaces[p % len(namespaces)]
        app = svc.name if svc else f"lonely-{p}"
        sa = f"sa-{rng.randrange(shape.accounts_per_namespace)}"
        objs.append(
            Workload(
                uid=f"{p:08d}-0000-4000-8000-{rng.getrandbits(48):012x}",
                name=f"{app}-{p:05d}",
                namespace=ns,
                node=f"node-{rng.randrange(shape.nodes):02d}",
                service_account=sa,
                ips=(_ip(10, 0x10000 + p),),
                labels={"app": app, "version": "v1", "pod-template-hash": f"{rng.getrandbits(32):08x}"},
                tunnel_protocol=TunnelProtocol.HBONE,
                named_ports={"http": 8080, "metrics": 9090},
            )
        )
    for i in range(shape.policies):
        ns = namespaces[i % len(namespaces)]
        other = namespaces[rng.randrange(len(namespaces))]
        principal = f"{TRUST_DOMAIN}/ns/{other}/sa/sa-{rng.randrange(shape.accounts_per_namespace)}"
        kind = i % 4
        if kind == 3:  # namespace-wide DENY from outside the mesh's namespaces
            objs.append(
                AuthorizationPolicy(
                    namespace=ns,
                    name=f"deny-{i:05d}",
                    action=AuthorizationAction.DENY,
                    rules=(Rule(from_=(RuleFrom(Source(not_namespaces=(ns, other))),)),),
                )
            )
            continue
        target = services[rng.randrange(len(services))].name if services else "none"
        objs.append(
            AuthorizationPolicy(
                namespace=ns,
                name=f"allow-{i:05d}",
                selector=WorkloadSelector({"app": target}),
                rules=(
                    Rule(
                        from_=(
                            RuleFrom(Source(principals=(principal,))),
                            RuleFrom(Source(namespaces=(other,))),
                        ),
                        to=(RuleTo(Operation(ports=(8080,) if kind == 0 else (8080, 9090))),),
                    ),
                ),
            )
        )
    return objs


# --- the control plane (child process) -----------------------------------------------------


def _rss_bytes(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _cpu_seconds(pid: int | str = "self") -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _profile_text(prof: cProfile.Profile, limit: int) -> str:
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.strip_dirs().sort_stats("cumulative").print_stats(limit)
    text = out.getvalue()
    # Keep the table only: from the header line on.
    start = text.find("   ncalls")
    return text[start:] if start >= 0 else text


async def serve(args: argparse.Namespace) -> None:
    from controlplane.auth import LocalTokenAuthenticator
    from controlplane.server import start_server
    from controlplane.tokens import TokenIssuer
    from controlplane.xds import register
    from mesh.pki import CertificateAuthority

    quiet_logs()
    shape = Shape(args.pods, args.services, args.policies, args.namespaces, args.nodes)
    state = Path(args.state_dir)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def say(**msg: Any) -> None:
        sys.stdout.write(json.dumps(msg) + "\n")
        sys.stdout.flush()

    rss_empty = _rss_bytes()
    t = time.perf_counter()
    objs = generate(shape)
    t_gen = time.perf_counter() - t
    store = Store()
    prof = cProfile.Profile() if args.profile else None
    t = time.perf_counter()
    store.replace_all(objs)
    t_load = time.perf_counter() - t
    del objs
    ca = CertificateAuthority.generate()
    issuer = TokenIssuer.load_or_create(state)
    nodes = sorted(store.snapshot().nodes)
    issuer.write_node_tokens(state, nodes)
    (state / "root-cert.pem").write_text(ca.roots_pem)
    servicers: list[Any] = []
    t_render = 0.0

    def add_xds(server: Any) -> None:
        nonlocal t_render
        t0 = time.perf_counter()
        if prof is not None:
            prof.enable()
        servicers.append(register(server, store))
        if prof is not None:
            prof.disable()
        t_render = time.perf_counter() - t0

    running = await start_server("127.0.0.1:0", ca, store, LocalTokenAuthenticator(issuer), [add_xds])
    render_profile = _profile_text(prof, args.profile_lines) if prof is not None else ""
    say(
        event="ready",
        address=running.address,
        nodes=nodes,
        generate_s=t_gen,
        load_s=t_load,
        render_s=t_render,
        rss_empty=rss_empty,
        rss_loaded=_rss_bytes(),
        render_profile=render_profile,
    )
    rng = random.Random(SEED + 1)
    uids = sorted(store.snapshot().workloads)
    next_ip = 0x800000
    delta_prof = cProfile.Profile() if args.profile else None
    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            cmd = json.loads(line)
            if cmd["op"] == "change":
                # One pod gets a new IP (a restart in place): what a kubelet status update does.
                uid = uids[rng.randrange(len(uids))]
                pod = store.snapshot().workloads[uid]
                next_ip += 1
                new_ip = _ip(10, next_ip)
                changed = dataclasses.replace(pod, ips=(new_ip,))
                t0 = time.perf_counter()
                if delta_prof is not None:
                    delta_prof.enable()
                store.upsert(changed)
                if delta_prof is not None:
                    delta_prof.disable()
                say(event="changed", uid=uid, ip=new_ip, upsert_s=time.perf_counter() - t0)
            elif cmd["op"] == "stats":
                say(
                    event="stats",
                    rss=_rss_bytes(),
                    cpu=_cpu_seconds(),
                    delta_profile=_profile_text(delta_prof, args.profile_lines)
                    if delta_prof is not None
                    else "",
                )
            elif cmd["op"] == "quit":
                break
    finally:
        await running.stop(grace=None)
        for s in servicers:
            s.close()


# --- the node side (parent) ----------------------------------------------------------------


class ControlPlane:
    """The child process, with request/answer over its stdin/stdout."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"control plane exited ({await self.proc.wait()})")
        msg: dict[str, Any] = json.loads(line)
        return msg

    async def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        await self.proc.stdin.drain()


@contextlib.asynccontextmanager
async def control_plane(args: argparse.Namespace, state: Path) -> AsyncIterator[ControlPlane]:
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--serve",
        "--state-dir",
        str(state),
        *(f"--{k}={getattr(args, k)}" for k in ("pods", "services", "policies", "namespaces", "nodes")),
        f"--profile-lines={args.profile_lines}",
        *(["--profile"] if args.profile else []),
    ]
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, limit=64 * MIB
    )
    try:
        yield ControlPlane(proc)
    finally:
        if proc.returncode is None:
            with contextlib.suppress(Exception):
                await ControlPlane(proc).send(op="quit")
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from mesh.caclient import GrpcCaClient
    from mesh.identity import Identity
    from mesh.xds.client import AppliedUpdate, XdsClient, secure_channel_factory
    from mesh.xds.state import ProxyState

    quiet_logs()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="cp-bench-") as tmp:
        state = Path(tmp)
        t_spawn = time.perf_counter()
        async with control_plane(args, state) as cp:
            ready = await cp.read()
            results["cp_start_s"] = time.perf_counter() - t_spawn
            for k in ("generate_s", "load_s", "render_s", "rss_empty", "rss_loaded", "render_profile"):
                results[k] = ready[k]
            address = ready["address"]
            root = (state / "root-cert.pem").read_bytes()

            # Initial sync.
            rss_client_before = _rss_bytes()
            pending: dict[str, asyncio.Future[float]] = {}

            def on_update(update: AppliedUpdate) -> None:
                now = time.perf_counter()
                for name in update.upserted:
                    fut = pending.pop(name, None)
                    if fut is not None and not fut.done():
                        fut.set_result(now)

            client = XdsClient(
                ProxyState(),
                node_id="ztunnel~bench",
                node_name=ready["nodes"][0],
                channel_factory=secure_channel_factory(address, root, "controlplane.istio-system.svc"),
                on_update=on_update,
            )
            t0 = time.perf_counter()
            task = asyncio.create_task(client.run())
            await asyncio.wait_for(client.synced.wait(), args.timeout)
            results["sync_s"] = time.perf_counter() - t0
            snap = client.state.snapshot()
            results["client_workloads"] = len(snap.workloads)
            results["client_services"] = len(snap.services)
            results["client_authorizations"] = len(snap.authorizations)
            results["rss_client_before"] = rss_client_before
            results["rss_client_synced"] = _rss_bytes()

            # Delta latency: store write in the control plane -> applied in the client's state.
            totals: list[float] = []
            upserts: list[float] = []
            client_ok = 0
            for _ in range(args.changes):
                loop = asyncio.get_running_loop()
                t_send = time.perf_counter()
                await cp.send(op="change")
                msg = await cp.read()
                uid = msg["uid"]
                fut = pending.get(uid)
                if fut is None:  # not applied yet (the usual case): wait for it
                    fut = pending[uid] = loop.create_future()
                    # It may already be there if the update raced the pipe answer.
                    w = client.state.snapshot().workloads.get(uid)
                    if w is not None and msg["ip"] in w.addresses:
                        pending.pop(uid, None)
                        fut.set_result(time.perf_counter())
                t_applied = await asyncio.wait_for(fut, args.timeout)
                w = client.state.snapshot().workloads[uid]
                client_ok += msg["ip"] in w.addresses
                totals.append(t_applied - t_send)
                upserts.append(msg["upsert_s"])
            results["changes"] = args.changes
            results["changes_ok"] = client_ok
            results["delta_p50_s"] = statistics.median(totals)
            results["delta_p99_s"] = _pct(totals, 0.99)
            results["delta_max_s"] = max(totals)
            results["upsert_p50_s"] = statistics.median(upserts)
            results["upsert_p99_s"] = _pct(upserts, 0.99)

            # CreateCertificate rate: a few node proxies, each asking for identities on its node.
            snap = client.state.snapshot()
            per_node: dict[str, list[Identity]] = {}
            for w in snap.workloads.values():
                per_node.setdefault(w.node, [])
            for node in per_node:
                ids = {(w.namespace, w.service_account) for w in snap.workloads.values() if w.node == node}
                per_node[node] = [Identity(TRUST_DOMAIN, ns, sa) for ns, sa in sorted(ids)]
            nodes = sorted(per_node)[: args.ca_clients]
            clients = [
                GrpcCaClient(address, root, state / "tokens" / f"{node}.token", ttl=dt.timedelta(hours=1))
                for node in nodes
            ]
            await cp.send(op="stats")
            before = await cp.read()
            cpu_parent0 = _cpu_seconds()
            counts = [0] * len(clients)
            errors: list[str] = []
            deadline = time.perf_counter() + args.ca_seconds

            async def hammer(i: int) -> None:
                ids = per_node[nodes[i]]
                rng = random.Random(i)
                while time.perf_counter() < deadline:
                    try:
                        await clients[i].fetch_certificate(ids[rng.randrange(len(ids))])
                    except Exception as e:
                        errors.append(repr(e))
                        return
                    counts[i] += 1

            t0 = time.perf_counter()
            async with asyncio.TaskGroup() as tg:
                for i in range(len(clients)):
                    for _ in range(args.ca_concurrency):
                        tg.create_task(hammer(i))
            elapsed = time.perf_counter() - t0
            await cp.send(op="stats")
            after = await cp.read()
            for c in clients:
                await c.close()
            results["ca_clients"] = len(clients)
            results["ca_concurrency"] = args.ca_concurrency
            results["ca_requests"] = sum(counts)
            results["ca_errors"] = errors[:3]
            results["ca_rps"] = sum(counts) / elapsed
            results["ca_cp_cpu_util"] = (after["cpu"] - before["cpu"]) / elapsed
            results["ca_client_cpu_util"] = (_cpu_seconds() - cpu_parent0) / elapsed
            results["rss_cp_after"] = after["rss"]
            results["delta_profile"] = after["delta_profile"]
            results["rss_client_after"] = _rss_bytes()

            client.stop()
            await task
    return results


# --- report --------------------------------------------------------------------------------


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def report(args: argparse.Namespace, r: dict[str, Any], command: str) -> str:
    ms = 1000.0
    lines = [
        f"## Control plane: {args.pods:,} pods / {args.services:,} services / {args.policies:,} policies",
        "",
        f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- CPU: {_cpu_model()}, {os.cpu_count()} cores; Python {platform.python_version()}",
        f"- command: `{command}`",
        f"- shape: {args.namespaces} namespaces, {args.nodes} nodes, seed {SEED}",
        "",
        "| measure | value |",
        "|---|---|",
        f"| generate mesh (control plane) | {r['generate_s'] * ms:,.0f} ms |",
        f"| `Store.replace_all` of everything | {r['load_s'] * ms:,.0f} ms |",
        f"| first full xDS render (`ResourceCache`) | {r['render_s'] * ms:,.0f} ms |",
        f"| control plane ready (spawn → serving) | {r['cp_start_s']:,.1f} s |",
        f"| initial sync, `XdsClient` start → `synced` (TLS) | {r['sync_s'] * ms:,.0f} ms |",
        f"| resources at the client | {r['client_workloads']:,} workloads, {r['client_services']:,} services, "
        f"{r['client_authorizations']:,} authorizations |",
        f"| one-pod change, store write → client state: median | {r['delta_p50_s'] * ms:,.1f} ms |",
        f"| one-pod change, store write → client state: p99 (max) | {r['delta_p99_s'] * ms:,.1f} ms "
        f"({r['delta_max_s'] * ms:,.1f} ms) |",
        f"| of which `Store.upsert` in the control plane: median / p99 | {r['upsert_p50_s'] * ms:,.2f} ms / "
        f"{r['upsert_p99_s'] * ms:,.2f} ms |",
        f"| changes applied correctly | {r['changes_ok']} / {r['changes']} |",
        f"| control-plane RSS: empty → loaded+rendered → end | {r['rss_empty'] / MIB:,.0f} → "
        f"{r['rss_loaded'] / MIB:,.0f} → {r['rss_cp_after'] / MIB:,.0f} MiB |",
        f"| client process RSS: before → synced → end | {r['rss_client_before'] / MIB:,.0f} → "
        f"{r['rss_client_synced'] / MIB:,.0f} → {r['rss_client_after'] / MIB:,.0f} MiB |",
        f"| CreateCertificate/s ({r['ca_clients']} node clients x {r['ca_concurrency']} concurrent, "
        f"{args.ca_seconds:g} s) | {r['ca_rps']:,.0f} ({r['ca_requests']:,} requests, "
        f"{len(r['ca_errors'])} errors) |",
        f"| CPU use during the CA phase: control plane / clients | {r['ca_cp_cpu_util']:.0%} / "
        f"{r['ca_client_cpu_util']:.0%} of one core |",
    ]
    if r["ca_errors"]:
        lines += ["", f"CA errors (first): `{r['ca_errors'][0]}`"]
    if args.profile:
        lines += [
            "",
            "### Profile: first full render (control plane, cProfile, cumulative)",
            "",
            "```",
            r["render_profile"].rstrip(),
            "```",
            "",
            f"### Profile: {r['changes']} one-pod `Store.upsert` calls (control plane, cProfile, cumulative)",
            "",
            "Only the store write itself (and its synchronous subscribers); rendering and pushing",
            "happen afterwards on the event loop.",
            "",
            "```",
            r["delta_profile"].rstrip(),
            "```",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    p.add_argument("--pods", type=int, default=10_000)
    p.add_argument("--services", type=int, default=2_000)
    p.add_argument("--policies", type=int, default=1_000)
    p.add_argument("--namespaces", type=int, default=50)
    p.add_argument("--nodes", type=int, default=20)
    p.add_argument("--changes", type=int, default=100, help="one-pod changes for the delta latency")
    p.add_argument("--ca-seconds", type=float, default=10.0)
    p.add_argument("--ca-clients", type=int, default=4, help="node proxies asking for certificates")
    p.add_argument("--ca-concurrency", type=int, default=4, help="requests in flight per node proxy")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--quick", action="store_true", help="tiny run (< 30 s): keeps the harness working")
    p.add_argument("--profile", action="store_true", help="cProfile the render and the store writes")
    p.add_argument("--profile-lines", type=int, default=25)
    p.add_argument("--output", type=Path)
    p.add_argument("--json", type=Path, help="also write the raw figures as JSON")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--state-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        asyncio.run(serve(args))
        return 0
    if args.quick:
        explicit = set(argv if argv is not None else sys.argv[1:])
        defaults = {"pods": 500, "services": 100, "policies": 50, "namespaces": 10, "nodes": 4, "changes": 20}
        for k, v in defaults.items():
            if not any(a.startswith(f"--{k}") for a in explicit):
                setattr(args, k, v)
        args.ca_seconds = min(args.ca_seconds, 2.0)
    command = shlex.join(
        ["python", "benchmarks/controlplane.py", *(argv if argv is not None else sys.argv[1:])]
    )
    results = asyncio.run(run(args))
    text = report(args, results, command)
    if args.output:
        args.output.write_text(text)
    sys.stdout.write(text)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
