"""Control-plane benchmark: xDS initial sync, one-pod delta latency, churn, memory, CreateCertificate rate.

    .venv/bin/python benchmarks/controlplane.py [--quick] [--pods N --services N --policies N]
        [--changes N] [--churn-clients N --churn-changes N] [--ca-seconds S] [--ca-clients N]
        [--profile] [--output FILE]

The control plane runs in a child process (this file with ``--serve``): it generates a
deterministic mesh (seeded), loads it into a :class:`mesh.model.Store`, and serves the CA and
the delta-xDS servicer on one TLS gRPC port with ``controlplane.server.start_server``, exactly
as ``ambient-controlplane`` does. The parent is the node side: one ``XdsClient`` (TLS, mesh
root) writing a ``ProxyState``, as ztunnel's, and ``GrpcCaClient``s with real node tokens.
Churn: ``--churn-clients`` lightweight delta-xDS streams (raw grpc.aio, one TLS connection each,
subscribed as ztunnel is) while the control plane makes one change of each kind at a time; the
time from the store write until every stream has it, and the bytes pushed for it.
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
    Kind,
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


def _profile_text(prof: cProfile.Profile, limit: int, sort: str = "cumulative") -> str:
    out = io.StringIO()
    try:
        stats = pstats.Stats(prof, stream=out)
    except TypeError:  # never enabled
        return ""
    stats.strip_dirs().sort_stats(sort).print_stats(limit)
    text = out.getvalue()
    # Keep the table only: from the header line on.
    start = text.find("   ncalls")
    return text[start:] if start >= 0 else text


CHURN_KINDS = (
    "pod_added",  # a new pod of an existing service: one workload (an endpoint added)
    "pod_removed",  # a pod deleted: one workload removed (an endpoint removed)
    "pod_relabelled",  # a pod moves to another service of its namespace (endpoints of both change)
    "policy_edited",  # an AuthorizationPolicy's rules change: one authorization
    "policy_retargeted",  # a selector policy selects another app: the workloads of both apps
    "service_edited",  # a Service gains or loses a port: the service and the workloads it selects
)
ADDRESS = "address"
AUTHORIZATION = "authorization"
# (type, resource name, upserted (else removed)): what a change must deliver to every stream.
Marker = tuple[str, str, bool]


class Churn:
    """One change of a kind at a time, and what each must deliver (worked out here from what
    the change is, not from the discovery server, so a server that pushes too little is caught
    waiting and one that pushes too much shows in the bytes)."""

    def __init__(self, store: Store, rng: random.Random) -> None:
        self.store = store
        self.rng = rng
        self.n = 0
        snap = store.snapshot()
        self.original = sorted(snap.workloads)
        self.added: list[str] = []
        self.services_in: dict[str, list[str]] = {}
        for s in snap.services.values():
            self.services_in.setdefault(s.namespace, []).append(s.name)
        for names in self.services_in.values():
            names.sort()
        self.policies = sorted(snap.authorization_policies)
        self.selector_policies = [k for k in self.policies if snap.authorization_policies[k].selector]

    def _app_pods(self, namespace: str, app: str) -> list[str]:
        svc = f"{namespace}/{app}"
        return [w.uid for w in self.store.snapshot().endpoints(svc)]

    def next(self, kind: str) -> tuple[list[MeshObject], list[tuple[Kind, str]], list[Marker]]:
        from controlplane.lowering import service_key

        snap = self.store.snapshot()
        rng = self.rng
        self.n += 1
        n = self.n
        if kind == "pod_added":
            svc = snap.services[sorted(snap.services)[rng.randrange(len(snap.services))]]
            uid = f"churn-{n:06d}-4000-8000-{rng.getrandbits(48):012x}"
            pod = Workload(
                uid=uid,
                name=f"{svc.name}-churn-{n:05d}",
                namespace=svc.namespace,
                node=f"node-{rng.randrange(len(snap.nodes)):02d}",
                service_account=f"sa-{rng.randrange(10)}",
                ips=(_ip(10, 0xC00000 + n),),
                labels={"app": svc.name, "version": "v1", "pod-template-hash": f"{rng.getrandbits(32):08x}"},
                tunnel_protocol=TunnelProtocol.HBONE,
                named_ports={"http": 8080, "metrics": 9090},
            )
            self.added.append(uid)
            return [pod], [], [(ADDRESS, uid, True)]
        if kind == "pod_removed":
            if self.added:
                uid = self.added.pop(rng.randrange(len(self.added)))
            else:
                uid = self.original.pop(rng.randrange(len(self.original)))
            return [], [(Kind.WORKLOAD, uid)], [(ADDRESS, uid, False)]
        if kind == "pod_relabelled":
            while True:
                uid = self.original[rng.randrange(len(self.original))]
                w = snap.workloads[uid]
                apps = [a for a in self.services_in.get(w.namespace, ()) if a != w.labels.get("app")]
                if apps:
                    break
            labels = {**w.labels, "app": apps[rng.randrange(len(apps))]}
            return [dataclasses.replace(w, labels=labels)], [], [(ADDRESS, uid, True)]
        if kind == "policy_edited":
            p = snap.authorization_policies[self.policies[rng.randrange(len(self.policies))]]
            rule = Rule(
                from_=(RuleFrom(Source(principals=(f"{TRUST_DOMAIN}/ns/churn/sa/edit-{n}",))),),
                to=(RuleTo(Operation(ports=(8080 + n % 100,))),),
            )
            return [dataclasses.replace(p, rules=(rule,))], [], [(AUTHORIZATION, p.key, True)]
        if kind == "policy_retargeted":
            while True:
                key = self.selector_policies[rng.randrange(len(self.selector_policies))]
                p = snap.authorization_policies[key]
                assert p.selector is not None
                old = p.selector.match_labels.get("app", "")
                apps = [a for a in self.services_in.get(p.namespace, ()) if a != old]
                if not apps:
                    continue
                new = apps[rng.randrange(len(apps))]
                moved = set(self._app_pods(p.namespace, old)) | set(self._app_pods(p.namespace, new))
                if moved:
                    break
            changed = dataclasses.replace(p, selector=WorkloadSelector({"app": new}))
            return [changed], [], [(ADDRESS, uid, True) for uid in sorted(moved)]
        if kind == "service_edited":
            while True:
                svc = snap.services[sorted(snap.services)[rng.randrange(len(snap.services))]]
                selected = [w.uid for w in snap.endpoints(svc.key)]
                if selected:
                    break
            extra = ServicePort(port=8443, target_port=8443, name="https")
            ports = tuple(p for p in svc.ports if p.port != extra.port)
            if len(ports) == len(svc.ports):
                ports = (*ports, extra)
            markers = [(ADDRESS, service_key(svc), True), *((ADDRESS, uid, True) for uid in selected)]
            return [dataclasses.replace(svc, ports=ports)], [], markers
        raise ValueError(f"unknown change kind {kind!r}")


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
    churn = Churn(store, random.Random(SEED + 2))
    churn_prof = cProfile.Profile() if args.profile else None
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
            elif cmd["op"] == "churn":
                ups, dels, markers = churn.next(cmd["kind"])
                t0 = time.monotonic()  # CLOCK_MONOTONIC: the parent's clock too
                delta = store.apply(upserts=ups, deletes=dels)
                upsert_s = time.monotonic() - t0
                assert delta is not None, cmd
                say(event="churned", t0=t0, version=delta.version, markers=markers, upsert_s=upsert_s)
            elif cmd["op"] == "churn_profile":  # on: profile the whole event loop during churn
                if churn_prof is not None:
                    churn_prof.enable() if cmd["on"] else churn_prof.disable()
                say(event="ok", cpu=_cpu_seconds())
            elif cmd["op"] == "stats":
                say(
                    event="stats",
                    rss=_rss_bytes(),
                    cpu=_cpu_seconds(),
                    delta_profile=_profile_text(delta_prof, args.profile_lines)
                    if delta_prof is not None
                    else "",
                    churn_profile=_profile_text(churn_prof, args.profile_lines)
                    if churn_prof is not None
                    else "",
                    churn_profile_own=_profile_text(churn_prof, args.profile_lines, "tottime")
                    if churn_prof is not None
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


@dataclass(slots=True)
class _Arrival:
    at: float  # time.monotonic()
    version: int
    type: str  # ADDRESS / AUTHORIZATION
    upserted: list[str]
    removed: list[str]


class SimClient:
    """A node proxy's xDS stream and nothing else: subscribes as ztunnel does (wildcard Address
    and Authorization, delta xDS, its node in the first request), ACKs every response, and
    records when each arrived and its serialized size. Applies nothing: the point is what the
    control plane sends and when, for many nodes on a machine that fits one real ztunnel."""

    def __init__(self, index: int, address: str, root: bytes, node: str) -> None:
        import grpc

        self.index = index
        self.node = node
        creds = grpc.ssl_channel_credentials(root_certificates=root)
        self.channel = grpc.aio.secure_channel(
            address,
            creds,
            options=[
                ("grpc.ssl_target_name_override", "controlplane.istio-system.svc"),
                ("grpc.max_receive_message_length", 256 * MIB),
                # One connection per client, as separate nodes would have (grpc would share one).
                ("grpc.use_local_subchannel_pool", 1),
            ],
        )
        self.synced = asyncio.Event()
        self.sync_done = 0.0
        self.sync_bytes = 0
        self.sync_resources = 0
        self._first: set[str] = set()
        # store version -> [bytes, resources, responses] received for it (after the first sync)
        self.by_version: dict[int, list[int]] = {}
        self._log: list[_Arrival] = []
        self._waiting: set[tuple[str, str, bool]] = set()
        self._version = 0
        self.done = asyncio.Event()
        self.done_at = 0.0

    def expect(self, version: int, markers: list[tuple[str, str, bool]]) -> None:
        """Watch for ``markers`` in responses for store ``version`` or later (some may be here)."""
        self._version = version
        self._waiting = set(markers)
        self.done.clear()
        self._log = [a for a in self._log if a.version >= version]
        for a in self._log:
            self._match(a)

    def _match(self, a: _Arrival) -> None:
        if not self._waiting or a.version < self._version:
            return
        for name in a.upserted:
            self._waiting.discard((a.type, name, True))
        for name in a.removed:
            self._waiting.discard((a.type, name, False))
        if not self._waiting:
            self.done_at = a.at
            self.done.set()

    async def run(self) -> None:
        from mesh.proto import core_pb2, discovery_pb2
        from mesh.xds.convert import ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL

        short = {ADDRESS_TYPE_URL: ADDRESS, AUTHORIZATION_TYPE_URL: AUTHORIZATION}
        Request = discovery_pb2.DeltaDiscoveryRequest
        Response = discovery_pb2.DeltaDiscoveryResponse

        def raw(data: bytes) -> tuple[int, Any]:
            return len(data), Response.FromString(data)

        method = self.channel.stream_stream(
            "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources",
            request_serializer=Request.SerializeToString,
            response_deserializer=raw,
        )
        call = method()
        ip = f"10.255.{self.index >> 8}.{self.index & 255}"
        pod = f"ztunnel-{self.index}.istio-system"
        node = core_pb2.Node(id=f"ztunnel~{ip}~{pod}~istio-system.svc.cluster.local")
        node.metadata.update({"NODE_NAME": self.node})
        for type_url in short:
            await call.write(Request(node=node, type_url=type_url))
        while True:
            msg = await call.read()
            if not isinstance(msg, tuple):  # EOF
                return
            size, resp = msg
            now = time.monotonic()
            await call.write(Request(type_url=resp.type_url, response_nonce=resp.nonce))
            if not self.synced.is_set():
                self.sync_bytes += size
                self.sync_resources += len(resp.resources)
                self._first.add(resp.type_url)
                if len(self._first) == len(short):
                    self.sync_done = now
                    self.synced.set()
                continue
            version = int(resp.system_version_info or 0)
            acc = self.by_version.setdefault(version, [0, 0, 0])
            acc[0] += size
            acc[1] += len(resp.resources) + len(resp.removed_resources)
            acc[2] += 1
            a = _Arrival(
                now, version, short.get(resp.type_url, resp.type_url), [r.name for r in resp.resources],
                list(resp.removed_resources),
            )
            self._log.append(a)
            self._match(a)

    async def close(self) -> None:
        await self.channel.close()


async def churn_phase(
    cp: ControlPlane, args: argparse.Namespace, address: str, root: bytes, nodes: list[str]
) -> dict[str, Any]:
    """``--churn-clients`` streams; ``--churn-changes`` changes of each kind, one at a time,
    each timed from the control plane's store write until the last stream has all of it."""
    clients = [SimClient(i, address, root, nodes[i % len(nodes)]) for i in range(args.churn_clients)]
    out: dict[str, Any] = {"churn_clients": len(clients)}
    try:
        async with asyncio.TaskGroup() as tg:
            t0 = time.monotonic()
            tasks = [tg.create_task(c.run()) for c in clients]
            await asyncio.wait_for(asyncio.gather(*(c.synced.wait() for c in clients)), args.timeout)
            out["churn_sync_s"] = max(c.sync_done for c in clients) - t0
            out["churn_sync_bytes_per_client"] = statistics.median(c.sync_bytes for c in clients)
            out["churn_sync_resources_per_client"] = statistics.median(c.sync_resources for c in clients)

            await cp.send(op="churn_profile", on=True)
            cpu0 = (await cp.read())["cpu"]
            cpu_parent0 = _cpu_seconds()
            t_start = time.monotonic()
            changes: list[dict[str, Any]] = []
            order = [k for _ in range(args.churn_changes) for k in CHURN_KINDS]
            for kind in order:
                await cp.send(op="churn", kind=kind)
                msg = await cp.read()
                markers = [(t, n, bool(u)) for t, n, u in msg["markers"]]
                for c in clients:
                    c.expect(msg["version"], markers)
                await asyncio.wait_for(asyncio.gather(*(c.done.wait() for c in clients)), args.timeout)
                arrivals = sorted(c.done_at - msg["t0"] for c in clients)
                changes.append(
                    {
                        "kind": kind,
                        "version": msg["version"],
                        "markers": len(markers),
                        "upsert_s": msg["upsert_s"],
                        "all_s": arrivals[-1],
                        "median_client_s": statistics.median(arrivals),
                    }
                )
            elapsed = time.monotonic() - t_start
            await cp.send(op="churn_profile", on=False)
            cpu1 = (await cp.read())["cpu"]
            out["churn_cp_cpu_s"] = cpu1 - cpu0
            out["churn_client_cpu_s"] = _cpu_seconds() - cpu_parent0
            out["churn_elapsed_s"] = elapsed
            # A response without markers may still be on its way (another type of the same
            # push): counted by the store version it carries, so give it a moment to arrive.
            await asyncio.sleep(0.2)
            for t in tasks:
                t.cancel()
            for ch in changes:
                per_client = [c.by_version.get(ch["version"], [0, 0, 0]) for c in clients]
                ch["bytes_per_client"] = statistics.median(b for b, _, _ in per_client)
                ch["bytes_total"] = sum(b for b, _, _ in per_client)
                ch["resources_per_client"] = statistics.median(r for _, r, _ in per_client)
                ch["responses_per_client"] = statistics.median(n for _, _, n in per_client)
    finally:
        for c in clients:
            await c.close()
    by_kind: dict[str, Any] = {}
    for kind in CHURN_KINDS:
        chs = [c for c in changes if c["kind"] == kind]
        all_s = [c["all_s"] for c in chs]
        by_kind[kind] = {
            "changes": len(chs),
            "p50_s": statistics.median(all_s),
            "p99_s": _pct(all_s, 0.99),
            "max_s": max(all_s),
            "median_client_p50_s": statistics.median(c["median_client_s"] for c in chs),
            "upsert_p50_s": statistics.median(c["upsert_s"] for c in chs),
            "markers": statistics.median(c["markers"] for c in chs),
            "resources_per_client": statistics.median(c["resources_per_client"] for c in chs),
            "responses_per_client": statistics.median(c["responses_per_client"] for c in chs),
            "bytes_per_client": statistics.median(c["bytes_per_client"] for c in chs),
            "bytes_total": statistics.median(c["bytes_total"] for c in chs),
        }
    out["churn"] = by_kind
    out["churn_changes"] = changes
    all_changes = [c["all_s"] for c in changes]
    out["churn_p99_s"] = _pct(all_changes, 0.99)
    return out


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

            if args.churn_clients > 0:
                results.update(await churn_phase(cp, args, address, root, ready["nodes"]))
                await cp.send(op="stats")
                end = await cp.read()
                results["churn_profile"] = end["churn_profile"]
                results["churn_profile_own"] = end["churn_profile_own"]
                results["rss_cp_churn"] = end["rss"]
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
    if "churn" in r:
        lines += _churn_report(args, r)
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
        if r.get("churn_profile"):
            lines += [
                "",
                "### Profile: the control plane's event loop during churn (cProfile, cumulative)",
                "",
                "```",
                r["churn_profile"].rstrip(),
                "```",
                "",
                "### Profile: the same, by own time",
                "",
                "```",
                r["churn_profile_own"].rstrip(),
                "```",
            ]
    return "\n".join(lines) + "\n"


def _churn_report(args: argparse.Namespace, r: dict[str, Any]) -> list[str]:
    ms = 1000.0
    n = r["churn_clients"]
    lines = [
        "",
        f"### Churn: {n} subscribed node streams, {args.churn_changes} changes of each kind, one at a time",
        "",
        f"Initial sync of the {n} streams (all of them): {r['churn_sync_s'] * ms:,.0f} ms, "
        f"{r['churn_sync_bytes_per_client'] / MIB:,.1f} MiB and "
        f"{r['churn_sync_resources_per_client']:,.0f} resources each.",
        "",
        f"| change | store write → all {n} have it: p50 / p99 / max | median stream | `Store.apply` "
        "| resources expected / sent / responses, per stream | bytes per stream | bytes, all streams |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, k in r["churn"].items():
        lines.append(
            f"| {kind} | {k['p50_s'] * ms:,.1f} / {k['p99_s'] * ms:,.1f} / {k['max_s'] * ms:,.1f} ms "
            f"| {k['median_client_p50_s'] * ms:,.1f} ms | {k['upsert_p50_s'] * ms:,.2f} ms "
            f"| {k['markers']:,.0f} / {k['resources_per_client']:,.0f} / {k['responses_per_client']:,.0f} "
            f"| {k['bytes_per_client']:,.0f} B | {k['bytes_total'] / 1024:,.1f} KiB |"
        )
    changes = len(r["churn_changes"])
    lines += [
        "",
        f"All {changes} changes: p99 {r['churn_p99_s'] * ms:,.1f} ms; CPU per change: control plane "
        f"{r['churn_cp_cpu_s'] / changes * ms:,.1f} ms, the {n} streams' process "
        f"{r['churn_client_cpu_s'] / changes * ms:,.1f} ms ({r['churn_elapsed_s']:,.1f} s in all). "
        f"Control-plane RSS after churn: {r['rss_cp_churn'] / MIB:,.0f} MiB.",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    p.add_argument("--pods", type=int, default=10_000)
    p.add_argument("--services", type=int, default=2_000)
    p.add_argument("--policies", type=int, default=1_000)
    p.add_argument("--namespaces", type=int, default=50)
    p.add_argument("--nodes", type=int, default=20)
    p.add_argument("--changes", type=int, default=100, help="one-pod changes for the delta latency")
    p.add_argument(
        "--churn-clients", type=int, default=100, help="simulated node proxies for churn (0: none)"
    )
    p.add_argument("--churn-changes", type=int, default=30, help="churn changes of each kind")
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
        defaults = {
            "pods": 500,
            "services": 100,
            "policies": 50,
            "namespaces": 10,
            "nodes": 4,
            "changes": 20,
            "churn-clients": 5,
            "churn-changes": 3,
        }
        for k, v in defaults.items():
            if not any(a.startswith(f"--{k}") for a in explicit):
                setattr(args, k.replace("-", "_"), v)
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
