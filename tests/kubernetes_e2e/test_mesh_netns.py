"""Kubernetes mode end to end, without a cluster: the production processes against the fake API
server, pods as network namespaces on this host.

Everything a cluster would run is a real process started as the charts start it: the control
plane (``--kubernetes``, its state from list/watch of tests/k8s/fakeapi.py, callers checked
with TokenReview), and per node the cni agent (``--kubernetes``) and ztunnel (its root from the
ConfigMap ``istio-ca-root-cert`` the control plane published, its credential a token the fake
TokenReview binds to its pod and node, exactly as a projected token on a cluster). The test plays
the kubelet: it makes each pod's netns (tests/netns/topology.py), creates the Pod in the API and
runs the CNI plugin chain for it. Nothing writes a process's state: pods, labels and policies go
through the API, and the processes find out as they would on a cluster.

The control plane runs its waypoint controller: a Gateway of class ``istio-waypoint`` created in
the API becomes a ServiceAccount, Deployment and Service, and the test plays the rest of the
cluster for that Deployment (ReplicaSet controller, scheduler, kubelet, the Deployment's status):
it runs the real ``waypoint`` with the pod template's command, args, env and volumes (the token a
projected one TokenReview binds to that pod with the template's audience, the root from the
``istio-ca-root-cert`` ConfigMap) in a pod netns, and reports the Deployment ready only once the
template's readiness probe passes.

Needs root (CI runs it). One mesh per module; each test uses its own ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_asyncio

from mesh.caclient import CaError, GrpcCaClient
from mesh.identity import Identity
from mesh.netns import NetnsSocketFactory
from tests.k8s.fakeapi import FakeApiServer
from tests.k8s.helpers import authorization_policy, namespace, node, pod
from tests.netns.mesh import EchoServer
from tests.netns.topology import WIRE_NET, Pod, Topology, ns_run
from tests.waypoint.conftest import H1Backend, H1Client
from waypoint.bytestream import TcpByteStream

pytestmark = [pytest.mark.slow, pytest.mark.netns, pytest.mark.asyncio(loop_scope="module")]

T = TypeVar("T")
TIMEOUT = 60.0
TRUST_DOMAIN = "cluster.local"
AMBIENT = {"istio.io/dataplane-mode": "ambient"}
REDIRECTION = "ambient.istio.io/redirection"
CLIENT_ID = f"spiffe://{TRUST_DOMAIN}/ns/shop/sa/client"
WEB_ID = f"spiffe://{TRUST_DOMAIN}/ns/shop/sa/web"
WAYPOINT_IMAGE = "registry.example/ambient-mesh:e2e"


def python_main(module: str) -> list[str]:
    return [sys.executable, "-c", f"import sys; from {module} import main; sys.exit(main())"]


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def records(self) -> list[dict[str, Any]]:
        """The process's JSON log lines (structlog renders JSON when not on a terminal)."""
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if isinstance(rec, dict):
                    out.append(rec)
        return out


@dataclass
class Node:
    index: int
    name: str
    dir: Path
    admin: int = 0
    agent: Proc | None = None
    ztunnel: Proc | None = None

    @property
    def plugin_socket(self) -> Path:
        return self.dir / "cni.sock"

    @property
    def zds_socket(self) -> Path:
        return self.dir / "zds.sock"


@dataclass
class Cluster:
    fake: FakeApiServer
    topo: Topology
    tmp: Path
    kubeconfig: Path
    procs: list[Proc] = field(default_factory=list)
    nodes: list[Node] = field(default_factory=list)
    controlplane: Proc | None = None
    cp_address: str = ""
    pods: dict[str, Pod] = field(default_factory=dict)  # name -> netns pod
    _factories: dict[str, NetnsSocketFactory] = field(default_factory=dict)
    _servers: list[asyncio.Server] = field(default_factory=list)

    # --- processes ----------------------------------------------------------------------------

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        log = self.tmp / f"{name}.log"
        with log.open("wb") as f:
            popen = subprocess.Popen(
                argv, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=REPO
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    async def poll(self, what: str, probe: Callable[[], T | None], timeout: float = TIMEOUT) -> T:
        """Wait until ``probe()`` returns something (state of other processes: their files, admin
        ports; there is nothing to await, so it is looked at every 50 ms). Fails at once, with
        its log, when one of our processes died."""
        deadline = time.monotonic() + timeout
        while True:
            got = await asyncio.to_thread(probe)
            if got is not None and got is not False:
                return got
            for p in self.procs:
                if p.popen.poll() is not None:
                    raise AssertionError(f"{p.name} exited {p.popen.returncode} before {what}:\n{p.tail()}")
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {p.name}\n{p.tail(15)}" for p in self.procs)
                raise AssertionError(f"not reached within {timeout:g}s: {what}\n{logs}")
            await asyncio.sleep(0.05)

    async def api_wait(self, what: str, predicate: Callable[[], bool], timeout: float = TIMEOUT) -> None:
        """Wait on the fake API server's own condition variable (no polling)."""
        try:
            await asyncio.to_thread(self.fake.wait_for, predicate, timeout)
        except TimeoutError:
            logs = "\n".join(f"--- {p.name}\n{p.tail(15)}" for p in self.procs)
            raise AssertionError(f"API never reached: {what}\n{logs}") from None

    def stop_all(self) -> list[str]:
        problems = []
        for p in reversed(self.procs):
            if p.popen.poll() is None:
                p.popen.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait(timeout=10)
                problems.append(f"{p.name} did not stop on SIGTERM")
        return problems

    # --- the kubelet's part -------------------------------------------------------------------

    def run_pod(self, net: Pod, node_name: str, labels: dict[str, str]) -> None:
        """Create the Pod in the API, then run the CNI plugin chain for its sandbox (ours last)."""
        obj = pod(net.name, net.ip, ns=net.namespace, node_name=node_name, labels=labels)
        obj["spec"]["serviceAccountName"] = net.service_account
        obj["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
        self.fake.add(obj)
        self.cni_add(net, obj["metadata"]["uid"])

    def cni_add(self, net: Pod, uid: str) -> None:
        """The kubelet's CNI ADD for the pod's sandbox: the plugin chain, ours last."""
        n = self.nodes[net.node - 1]
        conf = {
            "cniVersion": "1.0.0",
            "name": "k8s-e2e",
            "type": "ambient-cni-plugin",
            "agent_socket": str(n.plugin_socket),
            "agent_timeout": 30,
            "prevResult": {
                "cniVersion": "1.0.0",
                "interfaces": [{"name": "eth0", "sandbox": net.netns_path}],
                "ips": [{"address": f"{net.ip}/24", "gateway": f"10.0.{net.node}.1", "interface": 0}],
            },
        }
        env = {
            "PATH": os.environ.get("PATH", ""),
            "CNI_COMMAND": "ADD",
            "CNI_CONTAINERID": f"e2e-{net.namespace}-{net.name}",
            "CNI_NETNS": net.netns_path,
            "CNI_IFNAME": "eth0",
            "CNI_PATH": "",
            "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={net.namespace};K8S_POD_NAME={net.name};"
            f"K8S_POD_UID={uid}",
        }
        r = subprocess.run(
            [sys.executable, "-m", "cni.plugin_main"],
            input=json.dumps(conf).encode(),
            capture_output=True,
            env=env,
            timeout=60,
            cwd=REPO,
        )
        assert r.returncode == 0, f"CNI ADD {net.name}: {r.stdout.decode()} {r.stderr.decode()}"

    # --- looking at the mesh ------------------------------------------------------------------

    def config_dump(self, n: Node) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{n.admin}/config_dump", timeout=5) as r:
                out: dict[str, Any] = json.loads(r.read())
                return out
        except (OSError, ValueError):
            return None

    def served(self, n: Node) -> dict[str, dict[str, Any]]:
        """namespace/name -> the pod entry of a ztunnel's /config_dump it has listeners for."""
        dump = self.config_dump(n) or {}
        return {f"{p['namespace']}/{p['name']}": p for p in dump.get("pods", []) if p.get("listeners")}

    def annotated(self, name: str) -> bool:
        obj = self.fake.get("pods", f"shop/{name}") or {}
        return (obj.get("metadata", {}).get("annotations") or {}).get(REDIRECTION) == "enabled"

    def access_log(self, n: Node) -> list[dict[str, Any]]:
        assert n.ztunnel is not None
        return [r for r in n.ztunnel.records() if r.get("event") == "connection complete"]

    # --- apps (sockets made inside the pods' netns) -------------------------------------------

    def factory(self, p: Pod) -> NetnsSocketFactory:
        f = self._factories.get(p.netns)
        if f is None:
            fd = os.open(p.netns_path, os.O_RDONLY)
            try:
                f = self._factories[p.netns] = NetnsSocketFactory(fd, p.name)
            finally:
                os.close(fd)
        return f

    async def serve(self, p: Pod, port: int) -> EchoServer:
        sock = await self.factory(p).tcp_listener("0.0.0.0", port)
        echo = EchoServer(server=None)  # type: ignore[arg-type]
        echo.server = await asyncio.start_server(echo.handle, sock=sock)
        self._servers.append(echo.server)
        return echo

    async def connect(
        self, src: Pod, ip: str, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        sock = await self.factory(src).tcp_socket(socket.AF_INET)
        try:
            async with asyncio.timeout(TIMEOUT):
                await asyncio.get_running_loop().sock_connect(sock, (ip, port))
                return await asyncio.open_connection(sock=sock)
        except BaseException:
            sock.close()
            raise

    async def exchange(self, src: Pod, ip: str, port: int, payload: bytes, timeout: float = 20.0) -> bytes:
        """Connect from ``src``, send ``payload``, half-close, read everything back ("" when the
        connection is refused or reset: what a denied client sees)."""
        sock = await self.factory(src).tcp_socket(socket.AF_INET)
        try:
            async with asyncio.timeout(timeout):
                await asyncio.get_running_loop().sock_connect(sock, (ip, port))
                reader, writer = await asyncio.open_connection(sock=sock)
        except OSError:
            sock.close()
            return b""
        try:
            async with asyncio.timeout(timeout):
                writer.write(payload)
                await writer.drain()
                writer.write_eof()
                return await reader.read()
        except OSError:
            return b""
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def aclose_apps(self) -> None:
        for srv in self._servers:
            srv.close()
            await srv.wait_closed()
        for f in self._factories.values():
            f.close()


REPO = Path(__file__).resolve().parents[2]


def kubeconfig(fake: FakeApiServer, path: Path) -> Path:
    path.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: fake\n"
        f"clusters: [{{name: fake, cluster: {{server: '{fake.url}'}}}}]\n"
        "users: [{name: fake, user: {token: admin}}]\n"
        "contexts: [{name: fake, context: {cluster: fake, user: fake}}]\n"
    )
    return path


def free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture(scope="module")
def topo() -> Iterator[Topology]:
    with Topology() as t:
        yield t


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster(topo: Topology, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Cluster]:
    tmp = tmp_path_factory.mktemp("k8s-e2e")
    with FakeApiServer() as fake:
        c = Cluster(fake, topo, tmp, kubeconfig(fake, tmp / "kubeconfig"))
        try:
            await start(c)
            yield c
        finally:
            await c.aclose_apps()
            problems = c.stop_all()
            assert not problems, problems


async def start(c: Cluster) -> None:
    fake, topo = c.fake, c.topo
    n1, n2 = topo.add_node(), topo.add_node()
    topo.connect_nodes()
    fake.add(namespace("istio-system"))
    fake.add(namespace("shop", **AMBIENT))
    for i in (n1, n2):
        name = f"node-{i}"
        fake.add(node(name))
        d = c.tmp / name
        d.mkdir()
        c.nodes.append(Node(i, name, d))
        # ztunnel's own pod (the DaemonSet's), and what TokenReview says about its projected token.
        zt = pod(
            f"ztunnel-{i}", f"10.0.{i}.250", ns="istio-system", node_name=name, labels={"app": "ztunnel"}
        )
        zt["spec"]["serviceAccountName"] = "ztunnel"
        fake.add(zt)
        fake.token_users[f"token-ztunnel-{i}"] = {
            "username": "system:serviceaccount:istio-system:ztunnel",
            "extra": {
                "authentication.kubernetes.io/pod-name": [f"ztunnel-{i}"],
                "authentication.kubernetes.io/pod-uid": [zt["metadata"]["uid"]],
                "authentication.kubernetes.io/node-name": [name],
            },
        }
        fake.token_audiences[f"token-ztunnel-{i}"] = ["istio-ca"]  # the chart's projected token
        (d / "istio-token").write_text(f"token-ztunnel-{i}")

    state, ready = c.tmp / "controlplane", c.tmp / "controlplane.ready"
    # With the waypoint controller, as the chart runs it. Waypoint Deployments are told where the
    # CA is (the chart: controlplane.<ns>.svc:15012; here, where it listens: no cluster DNS), so
    # the port is chosen before it starts.
    (port,) = free_ports(1)
    c.controlplane = c.spawn(
        "controlplane",
        [*python_main("controlplane.main"), "--kubernetes", "--kubeconfig", str(c.kubeconfig),
         "--state-dir", str(state), "--listen", f"127.0.0.1:{port}", "--ready-file", str(ready),
         "--waypoint-image", WAYPOINT_IMAGE, "--waypoint-ca-address", f"127.0.0.1:{port}"],
    )  # fmt: skip
    c.cp_address = (
        await c.poll("the control plane ready", lambda: ready.read_text() if ready.exists() else None)
    ).strip()
    assert c.cp_address == f"127.0.0.1:{port}", c.cp_address

    # ztunnel verifies :15012 with the root the control plane published (the chart mounts it).
    def root_published() -> bool:
        return fake.get("configmaps", "istio-system/istio-ca-root-cert") is not None

    await c.api_wait("istio-ca-root-cert published in istio-system", root_published)
    published = fake.get("configmaps", "istio-system/istio-ca-root-cert")
    assert published is not None
    root_file = c.tmp / "root-cert.pem"
    root_file.write_text(published["data"]["root-cert.pem"])
    assert published["data"]["root-cert.pem"] == (state / "root-cert.pem").read_text()

    for n in c.nodes:
        agent_ready, zt_ready = n.dir / "cni.ready", n.dir / "ztunnel.ready"
        n.agent = c.spawn(
            f"cni-{n.name}",
            [*python_main("cni.main"), "--node", n.name, "--kubernetes", "--zds-socket", str(n.zds_socket),
             "--plugin-socket", str(n.plugin_socket), "--state-dir", str(n.dir / "cni"),
             "--ready-file", str(agent_ready)],
            {"KUBECONFIG": str(c.kubeconfig)},
        )  # fmt: skip
        await c.poll(f"the cni agent of {n.name} ready", agent_ready.exists)
        admin, stats, readiness = free_ports(3)
        n.admin = admin
        n.ztunnel = c.spawn(
            f"ztunnel-{n.name}",
            [*python_main("ztunnel.main"), "--node-name", n.name, "--ca-address", c.cp_address,
             "--xds-address", c.cp_address, "--zds-socket", str(n.zds_socket), "--admin-port", str(admin),
             "--stats-port", str(stats), "--readiness-port", str(readiness), "--drain-seconds", "1",
             "--ready-file", str(zt_ready)],
            {"CA_ROOT_CERT": str(root_file), "TOKEN_FILE": str(n.dir / "istio-token")},
        )  # fmt: skip
        await c.poll(f"ztunnel of {n.name} started", zt_ready.exists)

    # The kubelet runs the pods: client on node 1, web on node 2 (cross-node traffic).
    c.pods["client"] = topo.add_pod(n1, "client", "shop", "client", enrolled=False)
    c.pods["web"] = topo.add_pod(n2, "web", "shop", "web", enrolled=False)
    await asyncio.to_thread(c.run_pod, c.pods["client"], "node-1", {"app": "client"})
    await asyncio.to_thread(c.run_pod, c.pods["web"], "node-2", {"app": "web"})
    await wait_enrolled(c, True)


async def wait_enrolled(c: Cluster, enrolled: bool) -> None:
    """Both pods in (or out of) the mesh as every component sees it: the agent's annotation in
    the API, and each pod's ztunnel serving it (listeners, its certificate) or not."""
    await c.api_wait(
        f"pods annotated {REDIRECTION}={enrolled}",
        lambda: c.annotated("client") == enrolled and c.annotated("web") == enrolled,
    )
    for n, name, identity in ((c.nodes[0], "client", CLIENT_ID), (c.nodes[1], "web", WEB_ID)):

        def state(n: Node = n, name: str = name, identity: str = identity) -> bool:
            dump = c.config_dump(n)
            if dump is None or not dump.get("ready"):
                return False
            served = f"shop/{name}" in c.served(n)
            if not enrolled:
                return not served
            certs = {x.get("identity") for x in dump.get("certificates", []) if x.get("cert_chain")}
            return served and identity in certs

        await c.poll(f"ztunnel of {n.name} {'serving' if enrolled else 'not serving'} {name}", state)


def redirected(p: Pod) -> bool:
    return "ambient" in ns_run(p.netns, "nft", "list", "tables")


async def mtls_exchange(c: Cluster, port: int) -> dict[str, Any]:
    """client -> web:port through both ztunnels; returns the destination ztunnel's access-log
    record of it."""
    client, web = c.pods["client"], c.pods["web"]
    before = len(c.access_log(c.nodes[1]))
    payload = os.urandom(8).hex().encode()
    got = await c.exchange(client, web.ip, port, payload)
    assert got == f"peer={client.ip}\n".encode() + payload, got[:200]

    def record() -> dict[str, Any] | None:
        new = c.access_log(c.nodes[1])[before:]
        return next((r for r in new if r.get("direction") == "inbound"), None)

    return await c.poll("the destination ztunnel's access-log record", record)


async def test_traffic_between_enrolled_pods_is_mutual_tls(cluster: Cluster) -> None:
    c = cluster
    await c.serve(c.pods["web"], 8001)
    rec = await mtls_exchange(c, 8001)
    assert rec["security"] == "mutual_tls", rec
    assert (rec["src_identity"], rec["dst_identity"]) == (CLIENT_ID, WEB_ID), rec
    assert rec["src_addr"] == c.pods["client"].ip, rec
    assert rec["result"] == "ok", rec
    # Certificates came from the control plane's CA, issued to each node for its own pods only.
    cp = c.controlplane
    assert cp is not None
    issued = [r for r in cp.records() if r.get("event") == "certificate issued"]
    assert {(r.get("identity"), r.get("node")) for r in issued} >= {(CLIENT_ID, "node-1"), (WEB_ID, "node-2")}
    # The source ztunnel logged the same connection as outbound, over HBONE (its line is written
    # when its side of the connection ends, which may come after the destination's: wait for it).
    def outbound() -> dict[str, Any] | None:
        out = [r for r in c.access_log(c.nodes[0]) if r.get("direction") == "outbound"]
        return next((r for r in out if r.get("dst_identity") == WEB_ID), None)

    sent = await c.poll("the source ztunnel's outbound access-log record", outbound)
    assert sent["security"] == "mutual_tls", sent


async def test_authorization_policy_created_in_the_api_denies(cluster: Cluster) -> None:
    c = cluster
    await c.serve(c.pods["web"], 8002)
    # DENY client -> web:8002 for POST. ztunnel cannot see the method: it enforces the rule's L4
    # part (client, port 8002), which denies more widely than written, and the policy gets
    # Istio's ZtunnelAccepted condition saying so.
    policy = authorization_policy(
        "deny-client",
        action="DENY",
        rules=[{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/client"]}}],
                "to": [{"operation": {"ports": ["8002"], "methods": ["POST"]}}]}],
    )  # fmt: skip
    c.fake.add(policy)
    try:

        def enforced() -> bool:
            web = c.served(c.nodes[1]).get("shop/web") or {}
            return any("deny-client" in k for k in web.get("authorizations", []))

        await c.poll("the policy reaching the web pod's ztunnel", enforced)
        got = await c.exchange(c.pods["client"], c.pods["web"].ip, 8002, b"let me in")
        assert b"let me in" not in got

        def denied() -> dict[str, Any] | None:
            return next(
                (
                    r
                    for r in c.access_log(c.nodes[1])
                    if r.get("direction") == "inbound" and r.get("result") == "error"
                    and r.get("src_identity") == CLIENT_ID and "denied by DENY" in str(r.get("reason"))
                ),
                None,
            )  # fmt: skip

        rec = await c.poll("the denial in the destination ztunnel's access log", denied)
        assert "deny-client" in str(rec.get("reason")), rec

        def condition() -> dict[str, Any] | None:
            obj = c.fake.get("authorizationpolicies", "shop/deny-client") or {}
            conds = (obj.get("status") or {}).get("conditions") or []
            return next((x for x in conds if x.get("type") == "ZtunnelAccepted"), None)

        await c.api_wait("the policy's ZtunnelAccepted status", lambda: condition() is not None)
        cond = condition()
        assert cond is not None and cond["reason"] == "UnsupportedValue" and "methods" in cond["message"]
    finally:
        c.fake.delete(policy)
    await c.poll("the policy gone from the web pod's ztunnel", lambda: not enforced())
    assert (await mtls_exchange(c, 8002))["result"] == "ok"


def label_namespace(c: Cluster, labels: dict[str, str | None]) -> None:
    """What ``kubectl label namespace shop ...`` sends: a merge patch through the API."""
    req = urllib.request.Request(
        f"{c.fake.url}/api/v1/namespaces/shop",
        data=json.dumps({"metadata": {"labels": labels}}).encode(),
        method="PATCH",
        headers={"Content-Type": "application/merge-patch+json"},
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200


async def test_namespace_label_unenrolls_and_enrolls(cluster: Cluster) -> None:
    c = cluster
    client, web = c.pods["client"], c.pods["web"]
    await c.serve(web, 8003)
    await asyncio.to_thread(label_namespace, c, {"istio.io/dataplane-mode": None})
    try:
        await wait_enrolled(c, False)
        assert not redirected(client) and not redirected(web)
        # Plain TCP now, straight to the pod: neither ztunnel sees the connection.
        logged = len(c.access_log(c.nodes[0])), len(c.access_log(c.nodes[1]))
        payload = b"plain " + os.urandom(4).hex().encode()
        got = await c.exchange(client, web.ip, 8003, payload)
        assert got == f"peer={client.ip}\n".encode() + payload
        dumps = [c.config_dump(n) or {} for n in c.nodes]
        assert not any(d.get("connections") for d in dumps), dumps
        # (Lines of earlier tests' connections may still arrive: only this port's count.)
        seen = [
            r
            for n, since in zip(c.nodes, logged, strict=True)
            for r in c.access_log(n)[since:]
            if str(r.get("dst_addr", "")).endswith(":8003")
        ]
        assert not seen, seen
    finally:
        await asyncio.to_thread(label_namespace, c, dict(AMBIENT))
    await wait_enrolled(c, True)
    assert redirected(client) and redirected(web)
    rec = await mtls_exchange(c, 8003)
    assert (rec["security"], rec["src_identity"], rec["dst_identity"]) == ("mutual_tls", CLIENT_ID, WEB_ID)


async def test_root_certificate_in_every_namespace(cluster: Cluster) -> None:
    c = cluster
    root = (c.tmp / "root-cert.pem").read_text()

    def everywhere() -> bool:
        cms = c.fake.objects("configmaps")
        return all(
            (cms.get(f"{ns}/istio-ca-root-cert") or {}).get("data") == {"root-cert.pem": root}
            for ns in ("istio-system", "shop", "payments")
        )

    c.fake.add(namespace("payments"))
    await c.api_wait("istio-ca-root-cert in every namespace", everywhere)


# --- a Gateway becomes a running waypoint --------------------------------------------------------

GATEWAY = "waypoint"
GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"
USE_WAYPOINT = "istio.io/use-waypoint"
WAYPOINT_ID = f"spiffe://{TRUST_DOMAIN}/ns/shop/sa/{GATEWAY}"
WEB_SERVICE = "web.shop.svc.cluster.local"


def kube(c: Cluster, method: str, path: str, body: Any = None) -> dict[str, Any]:
    """One API request as a controller or kubectl sends it; anything but a 2xx fails the test."""
    req = urllib.request.Request(
        f"{c.fake.url}{path}",
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers={"Content-Type": "application/json", "Authorization": "Bearer admin"},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            out: dict[str, Any] = json.loads(r.read())
            return out
    except urllib.error.HTTPError as e:
        raise AssertionError(f"{method} {path}: {e.code} {e.read().decode(errors='replace')}") from None


def http_get(url: str) -> tuple[int, str] | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, ""
    except OSError:
        return None


def condition(obj: dict[str, Any] | None, kind: str) -> dict[str, Any] | None:
    conds = ((obj or {}).get("status") or {}).get("conditions") or []
    return next((x for x in conds if x.get("type") == kind), None)


@dataclass
class RunningPod:
    """A pod of a Deployment as the test (scheduler and kubelet) runs it."""

    net: Pod
    obj: dict[str, Any]
    proc: Proc
    admin: int  # host loopback ports: the admin server's, and where the metrics port went
    metrics: int

    def dump(self) -> dict[str, Any] | None:
        got = http_get(f"http://127.0.0.1:{self.admin}/config_dump")
        return json.loads(got[1]) if got is not None and got[0] == 200 else None

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a Prometheus sample over the series that have ``labels`` (from the pod's
        metrics port, as Prometheus scrapes it)."""
        got = http_get(f"http://127.0.0.1:{self.metrics}/stats/prometheus")
        assert got is not None and got[0] == 200, got
        from prometheus_client.parser import text_string_to_metric_families

        return sum(
            s.value
            for fam in text_string_to_metric_families(got[1])
            for s in fam.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )


def projected_token(c: Cluster, obj: dict[str, Any], audience: str) -> str:
    """A service-account token bound to the pod ``obj`` and its node, for ``audience``: what
    TokenReview says about it, and only for that audience (as kube-apiserver)."""
    md, spec = obj["metadata"], obj["spec"]
    token = f"projected-{md['uid']}-{audience}"
    c.fake.token_users[token] = {
        "username": f"system:serviceaccount:{md['namespace']}:{spec['serviceAccountName']}",
        "extra": {
            "authentication.kubernetes.io/pod-name": [md["name"]],
            "authentication.kubernetes.io/pod-uid": [md["uid"]],
            "authentication.kubernetes.io/node-name": [spec["nodeName"]],
        },
    }
    c.fake.token_audiences[token] = [audience]
    return token


def kubelet_volumes(c: Cluster, obj: dict[str, Any]) -> dict[str, Path]:
    """Volume name -> a host directory holding what the kubelet would mount: a projected
    service-account token (bound to the pod and its node, so TokenReview says so), a ConfigMap's
    keys as files, an empty dir. Any other kind of volume fails: the test would not make it."""
    md, spec = obj["metadata"], obj["spec"]
    root = c.tmp / "kubelet" / md["name"]
    out = {}
    for v in spec.get("volumes") or []:
        d = out[v["name"]] = root / v["name"]
        d.mkdir(parents=True)
        if "projected" in v:
            for src in v["projected"]["sources"]:
                sat = src["serviceAccountToken"]
                (d / sat["path"]).write_text(projected_token(c, obj, sat["audience"]))
        elif "configMap" in v:
            cm = c.fake.get("configmaps", f"{md['namespace']}/{v['configMap']['name']}")
            assert cm is not None, f"volume {v['name']}: ConfigMap {v['configMap']['name']} missing"
            for key, value in cm["data"].items():
                (d / key).write_text(value)
        else:
            assert "emptyDir" in v, f"volume {v['name']}: a kind the test's kubelet does not make"
    return out


def container_env(container: dict[str, Any], obj: dict[str, Any], mounts: dict[str, Path]) -> dict[str, str]:
    """The container's environment as the kubelet resolves it (values, and the pod's fields by
    ``fieldRef``), with paths under a volume mount translated to where the volume is on the host
    (what the container's mount namespace does)."""
    fields = {
        "metadata.name": obj["metadata"]["name"],
        "metadata.namespace": obj["metadata"]["namespace"],
        "spec.nodeName": obj["spec"]["nodeName"],
        "spec.serviceAccountName": obj["spec"]["serviceAccountName"],
    }
    env = {}
    for e in container.get("env") or []:
        value = e["value"] if "value" in e else fields[e["valueFrom"]["fieldRef"]["fieldPath"]]
        for mount, host in sorted(mounts.items(), key=lambda m: -len(m[0])):  # the innermost mount
            if value.startswith(mount.rstrip("/") + "/"):
                value = str(host) + value[len(mount.rstrip("/")) :]
                break
        env[e["name"]] = value
    return env


async def run_deployment_pod(c: Cluster, deployment: dict[str, Any], node: int) -> RunningPod:
    """What the ReplicaSet controller, the scheduler and the kubelet do for one replica of
    ``deployment``: the Pod (the template's labels, annotations and spec, bound to ``node``)
    created through the API, its sandbox (a netns) with the CNI plugin chain run for it, its
    status, and its one container run as the template says: command, args, env, volumes.

    Where a process on this host cannot be what a container is, the difference is in flags the
    process has for it: ``--netns`` puts its data path in the pod's netns (HBONE on the pod IP),
    and the ports it serves from its own netns (status, metrics, admin) are moved to free ones.
    """
    md, spec = deployment["metadata"], deployment["spec"]
    template = spec["template"]
    ns = md["namespace"]
    template_hash = hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]
    name = f"{md['name']}-{template_hash}-0"
    labels = {**template["metadata"]["labels"], "pod-template-hash": template_hash}
    net = await asyncio.to_thread(
        c.topo.add_pod, node, name, ns, template["spec"]["serviceAccountName"], labels, False
    )
    c.pods[name] = net
    node_name = c.nodes[node - 1].name
    pod_path = f"/api/v1/namespaces/{ns}/pods"
    obj = kube(
        c, "POST", pod_path,
        {"apiVersion": "v1", "kind": "Pod",
         "metadata": {"name": name, "namespace": ns, "labels": labels,
                      "annotations": template["metadata"].get("annotations") or {}},
         "spec": {**json.loads(json.dumps(template["spec"])), "nodeName": node_name}},
    )  # fmt: skip
    await asyncio.to_thread(c.cni_add, net, obj["metadata"]["uid"])

    def pod_status(ready: bool) -> None:
        status = {
            "phase": "Running",
            "podIP": net.ip,
            "podIPs": [{"ip": net.ip}],
            "hostIP": f"{WIRE_NET}.{node}",
            "conditions": [
                {"type": "Ready", "status": str(ready)},
                {"type": "ContainersReady", "status": str(ready)},
            ],
        }
        live = kube(c, "GET", f"{pod_path}/{name}")
        kube(c, "PUT", f"{pod_path}/{name}/status", {**live, "status": status})

    pod_status(False)
    (container,) = obj["spec"]["containers"]
    volumes = kubelet_volumes(c, obj)
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container.get("volumeMounts") or []}
    env = container_env(container, obj, mounts)
    command = Path(sys.executable).parent / container["command"][0]  # the image's console script
    by_name = {p["name"]: p["containerPort"] for p in container["ports"]}
    admin, status_port, metrics_port = free_ports(3)
    ports = {by_name["status-port"]: status_port, by_name["metrics"]: metrics_port}
    proc = c.spawn(
        name,
        [str(command), *container["args"], "--netns", net.netns_path, "--admin-port", str(admin),
         "--readiness-port", str(status_port), "--stats-port", str(metrics_port)],
        env,
    )  # fmt: skip
    running = RunningPod(net, obj, proc, admin, metrics_port)
    # The kubelet's readiness probe, then the Pod's Ready condition.
    probe = container["readinessProbe"]["httpGet"]
    url = f"http://127.0.0.1:{ports[probe['port']]}{probe['path']}"
    await c.poll(f"the readiness probe of pod {name}", lambda: (http_get(url) or (0, ""))[0] == 200)
    pod_status(True)
    return running


async def test_a_gateway_becomes_a_running_waypoint(cluster: Cluster) -> None:
    c = cluster
    base = "/apis/gateway.networking.k8s.io/v1/namespaces/shop/gateways"
    kube(
        c, "POST", base,
        {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
         "metadata": {"name": GATEWAY, "namespace": "shop", "labels": {"istio.io/waypoint-for": "service"}},
         "spec": {"gatewayClassName": "istio-waypoint",
                  "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}},
    )  # fmt: skip
    ref = f"shop/{GATEWAY}"

    # The controller's objects, and a Gateway not yet Programmed (no replica ready).
    def made() -> bool:
        return all(c.fake.get(kind, ref) for kind in ("serviceaccounts", "deployments", "services"))

    await c.api_wait("the waypoint's ServiceAccount, Deployment and Service", made)
    await c.api_wait(
        "the Gateway Programmed=False (Pending)",
        lambda: (condition(c.fake.get("gateways", ref), "Programmed") or {}).get("reason") == "Pending",
    )
    deployment = c.fake.get("deployments", ref)
    service_obj = c.fake.get("services", ref)
    assert deployment is not None and service_obj is not None
    template = deployment["spec"]["template"]
    (container,) = template["spec"]["containers"]
    assert container["image"] == WAYPOINT_IMAGE and container["command"] == ["waypoint"], container
    assert {e["name"]: e.get("value") for e in container["env"]}["CA_ADDRESS"] == c.cp_address
    assert template["metadata"]["labels"]["istio.io/dataplane-mode"] == "none"
    assert template["spec"]["serviceAccountName"] == GATEWAY
    token = next(v for v in template["spec"]["volumes"] if "projected" in v)
    assert token["projected"]["sources"][0]["serviceAccountToken"]["audience"] == "istio-ca"
    assert service_obj["spec"]["selector"] == {GATEWAY_NAME_LABEL: GATEWAY}

    # One replica on node 1: the pod, the real waypoint process in its netns.
    wp = await run_deployment_pod(c, deployment, 1)
    assert not redirected(wp.net)  # dataplane-mode none: the cni agent left it alone
    dump = await c.poll("the waypoint's config dump", wp.dump)
    assert dump["identity"] == WAYPOINT_ID and dump["ready"], dump
    cp = c.controlplane
    assert cp is not None
    issued = [r for r in cp.records() if r.get("event") == "certificate issued"]
    assert any(r.get("identity") == WAYPOINT_ID for r in issued), issued
    # Only for the audience the template asks for: the same pod's token for the API server gets
    # no certificate from the CA.
    api_token = c.tmp / "kubelet" / "api-token"
    api_token.write_text(projected_token(c, wp.obj, "https://kubernetes.default.svc.cluster.local"))
    async with GrpcCaClient(c.cp_address, (c.tmp / "root-cert.pem").read_bytes(), api_token) as ca:
        with pytest.raises(CaError, match="UNAUTHENTICATED.*audiences"):
            await ca.fetch_certificate(Identity.parse(WAYPOINT_ID))

    # The kube controller-manager's part: the Deployment's status counts the ready replica.
    live = kube(c, "GET", f"/apis/apps/v1/namespaces/shop/deployments/{GATEWAY}")
    kube(
        c, "PUT", f"/apis/apps/v1/namespaces/shop/deployments/{GATEWAY}/status",
        {**live, "status": {"observedGeneration": live["metadata"]["generation"], "replicas": 1,
                            "updatedReplicas": 1, "readyReplicas": 1, "availableReplicas": 1}},
    )  # fmt: skip
    await c.api_wait(
        "the Gateway Programmed=True",
        lambda: (condition(c.fake.get("gateways", ref), "Programmed") or {}).get("status") == "True",
    )
    gw = c.fake.get("gateways", ref)
    assert gw is not None
    assert gw["status"]["addresses"] == [{"type": "IPAddress", "value": service_obj["spec"]["clusterIP"]}]

    # A real HTTP server in the web pod, its Service, then the Service labelled to use the waypoint.
    backend = await H1Backend().start(await c.factory(c.pods["web"]).tcp_listener("0.0.0.0", 8080))
    svc_path = "/api/v1/namespaces/shop/services"
    web_svc = kube(
        c, "POST", svc_path,
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop"},
         "spec": {"selector": {"app": "web"},
                  "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}},
    )  # fmt: skip
    vip = web_svc["spec"]["clusterIP"]
    policy_path = "/apis/security.istio.io/v1/namespaces/shop/authorizationpolicies"
    try:
        labelled = {**web_svc, "metadata": {**web_svc["metadata"], "labels": {USE_WAYPOINT: GATEWAY}}}
        kube(c, "PUT", f"{svc_path}/web", labelled)
        kube(
            c, "POST", policy_path,
            {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
             "metadata": {"name": "web-no-admin", "namespace": "shop"},
             "spec": {"targetRefs": [{"kind": "Service", "group": "", "name": "web"}], "action": "DENY",
                      "rules": [{"to": [{"operation": {"paths": ["/admin"]}}]}]}},
        )  # fmt: skip

        def client_side() -> dict[str, Any] | None:
            services = (c.config_dump(c.nodes[0]) or {}).get("services", [])
            web = next((s for s in services if s.get("name") == "web" and s.get("namespace") == "shop"), None)
            return (web or {}).get("waypoint")

        def waypoint_side() -> bool:
            return any(p.get("name") == "web-no-admin" for p in (wp.dump() or {}).get("policies", []))

        # The waypoint as istiod names it: its Service, which the controller made.
        waypoint = await c.poll("the client's ztunnel sending web's traffic to a waypoint", client_side)
        assert waypoint == {
            "hostname": {"namespace": "shop", "hostname": f"{GATEWAY}.shop.svc.cluster.local"},
            "hbone_mtls_port": 15008,
        }, waypoint
        await c.poll("the policy at the waypoint", waypoint_side)

        def requests_total(code: str) -> float:
            return wp.metric("istio_requests_total", destination_service=WEB_SERVICE, response_code=code)

        before = requests_total("200"), requests_total("403")
        r, w = await c.connect(c.pods["client"], vip, 80)
        client = H1Client(TcpByteStream(r, w))
        try:
            resp, body = await client.request("GET", "/")
            assert (resp.status_code, body) == (200, b"GET / 0")
            resp, body = await client.request("GET", "/admin")
            assert (resp.status_code, body) == (403, b"RBAC: access denied")
        finally:
            await client.close()
        assert [r.target for r in backend.requests] == ["/"]
        # The app sees the client's address (the waypoint forwarded it), and the server's ztunnel
        # got the request from the waypoint, over mutual TLS.
        assert set(backend.listener.peers) == {c.pods["client"].ip}

        def from_waypoint() -> dict[str, Any] | None:
            return next(
                (
                    r
                    for r in c.access_log(c.nodes[1])
                    if r.get("direction") == "inbound" and r.get("src_identity") == WAYPOINT_ID
                ),
                None,
            )

        rec = await c.poll("the server's ztunnel logging the waypoint's connection", from_waypoint)
        assert (rec["security"], rec["dst_identity"]) == ("mutual_tls", WEB_ID), rec
        # The waypoint handled both: its metrics and its access log.
        assert (requests_total("200") - before[0], requests_total("403") - before[1]) == (1, 1)
        seen = {
            (r.get("method"), r.get("path"), r.get("status"), r.get("src"), r.get("dst_service"))
            for r in wp.proc.records()
            if r.get("event") == "request"
        }
        assert seen == {
            ("GET", "/", 200, CLIENT_ID, WEB_SERVICE),
            ("GET", "/admin", 403, CLIENT_ID, WEB_SERVICE),
        }, seen
    finally:
        await backend.close()
        with contextlib.suppress(AssertionError):
            kube(c, "DELETE", f"{policy_path}/web-no-admin")
        kube(c, "DELETE", f"{svc_path}/web")

    # Deleting the Gateway takes its objects with it; then the kubelet stops the pod.
    kube(c, "DELETE", f"{base}/{GATEWAY}")
    await c.api_wait(
        "the waypoint's objects deleted",
        lambda: not any(c.fake.get(kind, ref) for kind in ("serviceaccounts", "deployments", "services")),
    )
    # The kubelet: SIGTERM, and the pod's grace period to drain and exit (else SIGKILL).
    grace = wp.obj["spec"]["terminationGracePeriodSeconds"]
    wp.proc.popen.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(wp.proc.popen.wait, grace) == 0, wp.proc.tail()
    kube(c, "DELETE", f"/api/v1/namespaces/shop/pods/{wp.obj['metadata']['name']}")
