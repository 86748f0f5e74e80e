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

Needs root (CI runs it). One mesh per module; each test uses its own ports.
"""

from __future__ import annotations

import asyncio
import contextlib
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

from mesh.netns import NetnsSocketFactory
from tests.k8s.fakeapi import FakeApiServer
from tests.k8s.helpers import authorization_policy, namespace, node, pod
from tests.netns.mesh import EchoServer
from tests.netns.topology import Pod, Topology, ns_run

pytestmark = [pytest.mark.slow, pytest.mark.netns, pytest.mark.asyncio(loop_scope="module")]

T = TypeVar("T")
TIMEOUT = 60.0
TRUST_DOMAIN = "cluster.local"
AMBIENT = {"istio.io/dataplane-mode": "ambient"}
REDIRECTION = "ambient.istio.io/redirection"
CLIENT_ID = f"spiffe://{TRUST_DOMAIN}/ns/shop/sa/client"
WEB_ID = f"spiffe://{TRUST_DOMAIN}/ns/shop/sa/web"


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
            f"K8S_POD_UID={obj['metadata']['uid']}",
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
    t = Topology()
    try:
        yield t
    finally:
        errors = t.destroy()
        assert not errors, errors


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
        (d / "istio-token").write_text(f"token-ztunnel-{i}")

    state, ready = c.tmp / "controlplane", c.tmp / "controlplane.ready"
    c.controlplane = c.spawn(
        "controlplane",
        [*python_main("controlplane.main"), "--kubernetes", "--kubeconfig", str(c.kubeconfig),
         "--state-dir", str(state), "--listen", "127.0.0.1:0", "--ready-file", str(ready)],
    )  # fmt: skip
    c.cp_address = (
        await c.poll("the control plane ready", lambda: ready.read_text() if ready.exists() else None)
    ).strip()

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
    # The source ztunnel logged the same connection as outbound, over HBONE.
    out = [r for r in c.access_log(c.nodes[0]) if r.get("direction") == "outbound"]
    assert any(r["dst_identity"] == WEB_ID and r["security"] == "mutual_tls" for r in out), out


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
        assert (len(c.access_log(c.nodes[0])), len(c.access_log(c.nodes[1]))) == logged
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
