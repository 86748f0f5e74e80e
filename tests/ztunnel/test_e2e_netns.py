"""End to end in real network namespaces: two nodes, pods, redirection rules, a ztunnel per node.

Needs root (CI runs it). One mesh per module keeps the time down; each test uses its own ports.
Every ztunnel gets its state from the real discovery server over gRPC (tests/netns/mesh.py):
a test changes the control plane's objects and waits for discovery to bring them.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import re
import signal
import socket
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
import structlog

from mesh import zds
from mesh.hbone.client import ConnectRefused, open_connection
from mesh.hbone.server import HboneServer, InboundStream
from mesh.hbone.stream import BufferedSink
from mesh.identity import Identity
from mesh.model import (
    WAYPOINT_GATEWAY_CLASS,
    AuthorizationAction,
    AuthorizationPolicy,
    Gateway,
    MtlsMode,
    PeerAuthentication,
    Rule,
    RuleFrom,
    Source,
    WaypointRef,
    WorkloadSelector,
)
from mesh.tls import client_context, server_context
from tests.netns.mesh import Mesh
from tests.netns.topology import WIRE, WIRE_NET, Pod, Topology

pytestmark = [pytest.mark.netns, pytest.mark.asyncio(loop_scope="module")]

MARKER = b"PLAINTEXT-MARKER-7f3a"
STATIC_STRICT = "istio-system/istio_converted_static_strict"


class Pods:
    def __init__(self, topo: Topology) -> None:
        n1, n2 = topo.add_node(), topo.add_node()
        topo.connect_nodes()
        self.client = topo.add_pod(n1, "client", "shop", "client")
        self.local_web = topo.add_pod(n1, "web-a", "shop", "web", {"app": "web"})
        self.remote_web = topo.add_pod(n2, "web-b", "shop", "web", {"app": "web"})
        self.api = topo.add_pod(n2, "api", "shop", "api", {"app": "api"})
        self.outside = topo.add_pod(n2, "legacy", "legacy", "legacy", enrolled=False)
        # A waypoint is not captured by ztunnel: it terminates HBONE itself.
        self.waypoint = topo.add_pod(n2, "wp", "shop", "wp", {"app": "wp"}, enrolled=False)


@pytest.fixture(scope="module")
def topo() -> Iterator[tuple[Topology, Pods]]:
    with Topology() as t:
        pods = Pods(t)
        yield t, pods


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh(topo: tuple[Topology, Pods]) -> AsyncIterator[tuple[Mesh, Pods]]:
    t, pods = topo
    m = Mesh(t, cert_ttl=dt.timedelta(hours=1))
    m.add_service("shop", "api", "10.96.0.10", 80, 8080, "api")
    m.add_service("shop", "web", "10.96.0.11", 80, 8090, "web")
    m.add_service("shop", "wp", "10.96.0.99", 15008, 15008, "wp")
    m.add_service("shop", "reviews", "10.96.0.12", 80, 8300, "api", waypoint=WaypointRef("wp", "shop"))
    m.extra.append(Gateway("shop", "wp", WAYPOINT_GATEWAY_CLASS))
    try:
        await m.start()
        yield m, pods
    finally:
        await m.aclose()


async def check_echo(m: Mesh, src: Pod, ip: str, port: int, server_ip: str) -> None:
    payload = b"hello " + MARKER + b" " + os.urandom(8).hex().encode()
    got = await m.exchange(src, ip, port, payload)
    assert got == f"peer={src.ip}\n".encode() + payload, got[:200]


async def test_cross_node_by_pod_ip(mesh: tuple[Mesh, Pods]) -> None:
    m, p = mesh
    srv = await m.serve(p.remote_web, 8001)
    await check_echo(m, p.client, p.remote_web.ip, 8001, p.remote_web.ip)
    assert srv.peers == [p.client.ip]


class Capture:
    """tcpdump on the node-to-node wire (inside node 1's netns), printing packets with payloads.

    ``sync()`` sends a sentinel SYN across the wire and waits until tcpdump printed it, so every
    packet before it is in ``text`` — no sleeping for buffers to flush.
    """

    SENTINEL = f"> {WIRE_NET}.2.9:"

    def __init__(self, topo: Topology) -> None:
        self.topo = topo
        self.proc: asyncio.subprocess.Process | None = None
        self.text = ""
        self._grew = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Capture:
        self.proc = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", self.topo.node_ns(1), "tcpdump", "-i", WIRE, "-l", "-n", "-A",
            "--immediate-mode", "tcp",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert self.proc.stderr is not None and self.proc.stdout is not None
        async with asyncio.timeout(10):
            while b"listening on" not in (line := await self.proc.stderr.readline()):
                assert line, "tcpdump exited before it was listening"
        self._reader = asyncio.create_task(self._read(self.proc.stdout))
        return self

    async def _read(self, stdout: asyncio.StreamReader) -> None:
        while chunk := await stdout.read(65536):
            self.text += chunk.decode("latin-1")
            self._grew.set()

    async def sync(self) -> None:
        probe = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", self.topo.node_ns(1), "bash", "-c", f"echo > /dev/tcp/{WIRE_NET}.2/9",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        await probe.wait()
        async with asyncio.timeout(10):
            while self.SENTINEL not in self.text:
                self._grew.clear()
                await self._grew.wait()

    async def __aexit__(self, *exc: object) -> None:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(10):
            await self.proc.wait()
        if self._reader is not None:
            await self._reader


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            total += float(m.group(2))
    return total


async def test_cross_node_is_mtls_on_the_wire_and_reported(mesh: tuple[Mesh, Pods]) -> None:
    m, p = mesh
    await m.serve(p.remote_web, 8011)
    async with Capture(m.topo) as cap:
        await check_echo(m, p.client, p.remote_web.ip, 8011, p.remote_web.ip)
        await cap.sync()
    summary = cap.text
    assert MARKER.decode() not in summary
    assert f"{p.client.ip}." in summary and f"{p.remote_web.ip}.15008" in summary, summary
    assert ".8011" not in summary  # the app port never appears on the wire, only HBONE

    src_id, dst_id = "spiffe://cluster.local/ns/shop/sa/client", "spiffe://cluster.local/ns/shop/sa/web"
    _, out_metrics = await m.nodes[0].fetch("stats", "/metrics")
    _, in_metrics = await m.nodes[1].fetch("stats", "/stats/prometheus")
    labels = {
        "source_principal": src_id,
        "destination_principal": dst_id,
        "connection_security_policy": "mutual_tls",
    }
    assert metric(out_metrics, "istio_tcp_connections_opened_total", reporter="source", **labels) >= 1
    assert metric(in_metrics, "istio_tcp_connections_closed_total", reporter="destination", **labels) >= 1
    assert metric(in_metrics, "istio_tcp_received_bytes_total", reporter="destination", **labels) > 0
    assert (
        metric(out_metrics, "istio_tcp_sent_bytes_total", reporter="source", destination_workload="web-b") > 0
    )


async def test_same_node_by_pod_ip_with_access_log(mesh: tuple[Mesh, Pods]) -> None:
    m, p = mesh
    srv = await m.serve(p.local_web, 8012)
    metrics = m.nodes[0].zt.metrics
    before = metrics.connections_closed
    with structlog.testing.capture_logs() as logs:
        await check_echo(m, p.client, p.local_web.ip, 8012, p.local_web.ip)
        async with asyncio.timeout(5):
            await metrics.wait_closed(before + 2)  # outbound and inbound, both on node 1
    assert srv.peers == [p.client.ip]
    lines = [e for e in logs if e["event"] == "connection complete"]
    by_dir = {e["direction"]: e for e in lines}
    for e in by_dir.values():
        assert e["src_identity"] == "spiffe://cluster.local/ns/shop/sa/client"
        assert e["dst_identity"] == "spiffe://cluster.local/ns/shop/sa/web"
        assert e["result"] == "ok" and e["bytes_sent"] > 0 and e["bytes_recv"] > 0
    assert set(by_dir) == {"outbound", "inbound"}


async def test_service_vip_cross_node(mesh: tuple[Mesh, Pods]) -> None:
    m, p = mesh
    srv = await m.serve(p.api, 8080)  # Service shop/api 10.96.0.10:80 -> 8080
    await check_echo(m, p.client, "10.96.0.10", 80, p.api.ip)
    assert srv.peers == [p.client.ip]
    _, text = await m.nodes[0].fetch("stats", "/metrics")
    assert (
        metric(
            text,
            "istio_tcp_connections_closed_total",
            reporter="source",
            destination_service="api.shop.svc.cluster.local",
            destination_principal="spiffe://cluster.local/ns/shop/sa/api",
        )
        >= 1
    )


async def test_service_vip_prefers_same_node(mesh: tuple[Mesh, Pods]) -> None:
    m, p = mesh
    local = await m.serve(p.local_web, 8090)
    remote = await m.serve(p.remote_web, 8090)
    for _ in range(3):
        await check_echo(m, p.client, "10.96.0.11", 80, p.local_web.ip)
    assert local.peers == [p.client.ip] * 3 and remote.peers == []


async def test_passthrough_outside_the_mesh(mesh: tuple[Mesh, Pods]) -> None:
    m, p = mesh
    srv = await m.serve(p.outside, 9090)
    metrics = m.nodes[0].zt.metrics
    before = metrics.connections_closed
    with structlog.testing.capture_logs() as logs:
        async with Capture(m.topo) as cap:
            await check_echo(m, p.client, p.outside.ip, 9090, p.outside.ip)
            await cap.sync()
        async with asyncio.timeout(5):
            await metrics.wait_closed(before + 1)
    assert srv.peers == [p.client.ip]
    assert MARKER.decode() in cap.text  # not in the mesh: plaintext, as expected
    line = next(e for e in logs if e["event"] == "connection complete")
    assert line["direction"] == "passthrough" and line["security"] == "none" and line["result"] == "ok"


async def test_plaintext_from_outside_reaches_a_mesh_pod_via_15006(mesh: tuple[Mesh, Pods]) -> None:
    m, p = mesh
    srv = await m.serve(p.api, 8095)
    metrics = m.nodes[1].zt.metrics
    before = metrics.connections_closed
    with structlog.testing.capture_logs() as logs:
        await check_echo(m, p.outside, p.api.ip, 8095, p.api.ip)
        async with asyncio.timeout(5):
            await metrics.wait_closed(before + 1)
    assert srv.peers == [p.outside.ip]
    line = next(e for e in logs if e["event"] == "connection complete")
    assert line["direction"] == "inbound_passthrough" and line["dst_workload"] == "api"


async def test_unreachable_app_closes_the_client_with_a_reason(mesh: tuple[Mesh, Pods]) -> None:
    m, p = mesh
    metrics = m.nodes[0].zt.metrics
    before = metrics.connections_closed
    with structlog.testing.capture_logs() as logs:
        for ip, port in ((p.api.ip, 8999), ("10.96.0.10", 81)):  # no app there; no such service port
            try:
                got = await m.exchange(p.client, ip, port, b"x")
            except ConnectionResetError:
                got = b""
            assert got == b""
        async with asyncio.timeout(5):
            await metrics.wait_closed(before + 2)
    reasons = [e["reason"] for e in logs if e["event"] == "connection complete" and e["result"] == "error"]
    assert any("503" in r for r in reasons), reasons
    assert any("has no port 81" in r for r in reasons), reasons


async def test_service_with_waypoint_goes_to_the_waypoint(mesh: tuple[Mesh, Pods]) -> None:
    m, p = mesh
    seen: list[tuple[str, str, str | None]] = []

    async def waypoint(inbound: InboundStream) -> None:
        req = inbound.request
        seen.append((req.authority, str(inbound.peer), req.header("forwarded")))
        st = inbound.accept()
        st.write(f"waypoint got {req.authority}\n".encode())
        st.write_eof()
        await st.done

    cred = m.ca.issue(m.workload(p.waypoint).identity)
    server = HboneServer(waypoint, server_context(cred), "cluster.local")
    await server.listen(sock=await m.factory(p.waypoint).tcp_listener("0.0.0.0", 15008))
    try:
        reader, writer = await m.connect(p.client, "10.96.0.12", 80)
        try:
            writer.write_eof()
            async with asyncio.timeout(10):
                assert await reader.read() == b"waypoint got 10.96.0.12:80\n"
        finally:
            writer.close()
    finally:
        await server.close()
    assert seen == [("10.96.0.12:80", "spiffe://cluster.local/ns/shop/sa/client", seen[0][2])]
    assert seen[0][2] is not None and seen[0][2].startswith(f'for="{p.client.ip}:')


async def refused(m: Mesh, src: Pod, ip: str, port: int) -> bytes:
    """What a client gets from a connection ztunnel refuses (nothing, or a reset)."""
    try:
        return await m.exchange(src, ip, port, b"x")
    except ConnectionResetError:
        return b""


async def test_strict_refuses_plaintext_and_permissive_allows_it(mesh: tuple[Mesh, Pods]) -> None:
    m, p = mesh
    node2 = m.nodes[1]
    srv = await m.serve(p.api, 8096)
    await check_echo(m, p.outside, p.api.ip, 8096, p.api.ip)  # no PeerAuthentication: PERMISSIVE
    strict = PeerAuthentication("shop", "default", mtls_mode=MtlsMode.STRICT)
    m.extra.append(strict)
    m.publish()
    try:
        await node2.until(lambda s: STATIC_STRICT in s.workloads[p.api.uid].authorization_policies)
        before = node2.zt.metrics.connections_closed
        with structlog.testing.capture_logs() as logs:
            assert await refused(m, p.outside, p.api.ip, 8096) == b""
            async with asyncio.timeout(5):
                await node2.zt.metrics.wait_closed(before + 1)
        line = next(e for e in logs if e["event"] == "connection complete")
        assert line["direction"] == "inbound_passthrough" and line["result"] == "error", line
        assert STATIC_STRICT in line["reason"], line
        # mTLS from an enrolled pod is still allowed under STRICT.
        await check_echo(m, p.client, p.api.ip, 8096, p.api.ip)
        # config_dump shows what this node enforces for the pod, and why.
        dump = await node2.config_dump()
        pod = next(x for x in dump["pods"] if x["uid"] == p.api.uid)  # type: ignore[union-attr]
        assert STATIC_STRICT in pod["authorizations"] and pod["missing_authorizations"] == []
        # A PERMISSIVE workload-selector policy beats the namespace's STRICT.
        permissive = PeerAuthentication(
            "shop", "api-permissive", selector=WorkloadSelector({"app": "api"}), mtls_mode=MtlsMode.PERMISSIVE
        )
        m.extra.append(permissive)
        m.publish()
        try:
            await node2.until(lambda s: STATIC_STRICT not in s.workloads[p.api.uid].authorization_policies)
            await check_echo(m, p.outside, p.api.ip, 8096, p.api.ip)
        finally:
            m.extra.remove(permissive)
    finally:
        m.extra.remove(strict)
        m.publish()
    await node2.until(lambda s: STATIC_STRICT not in s.workloads[p.api.uid].authorization_policies)
    await check_echo(m, p.outside, p.api.ip, 8096, p.api.ip)
    assert srv.peers == [p.outside.ip, p.client.ip, p.outside.ip, p.outside.ip]


async def test_config_dump_lists_the_authorizations_the_node_received(mesh: tuple[Mesh, Pods]) -> None:
    m, _ = mesh
    deny = AuthorizationPolicy(
        "shop",
        "deny-legacy",
        selector=WorkloadSelector({"app": "web"}),
        action=AuthorizationAction.DENY,
        rules=(Rule(from_=(RuleFrom(Source(namespaces=("legacy",))),)),),
    )
    m.extra.append(deny)
    m.publish()
    try:
        for node in m.nodes:
            await node.until(lambda s: "shop/deny-legacy" in s.authorizations)
            dump = await node.config_dump()
            keys = {f"{a['namespace']}/{a['name']}" for a in dump["authorizations"]}  # type: ignore[union-attr]
            assert {"shop/deny-legacy", STATIC_STRICT} <= keys
            web = [x for x in dump["pods"] if x["name"] in ("web-a", "web-b")]  # type: ignore[union-attr]
            assert web and all("shop/deny-legacy" in x["authorizations"] for x in web)
            others = [x for x in dump["pods"] if x["name"] not in ("web-a", "web-b")]  # type: ignore[union-attr]
            assert all("shop/deny-legacy" not in x["authorizations"] for x in others)
    finally:
        m.extra.remove(deny)
        m.publish()
    await m.converged()


async def wait_listed(m: Mesh, uid: str, key: str, listed: bool = True) -> None:
    """Until every node knows ``key`` and whether workload ``uid`` lists it."""
    for node in m.nodes:
        await node.until(
            lambda s: key in s.authorizations and (key in s.workloads[uid].authorization_policies) == listed
        )


async def test_deny_policy_refuses_new_connections_and_closes_open_ones(mesh: tuple[Mesh, Pods]) -> None:
    m, p = mesh
    await m.serve(p.api, 8097)
    reader, writer = await m.connect(p.client, p.api.ip, 8097)
    writer.write(b"before\n")
    await writer.drain()
    assert await reader.readline() == f"peer={p.client.ip}\n".encode()
    assert await reader.readline() == b"before\n"
    deny = AuthorizationPolicy(
        "shop",
        "deny-client",
        selector=WorkloadSelector({"app": "api"}),
        action=AuthorizationAction.DENY,
        rules=(Rule(from_=(RuleFrom(Source(principals=("cluster.local/ns/shop/sa/client",))),)),),
    )
    node2 = m.nodes[1]
    try:
        with structlog.testing.capture_logs() as logs:
            m.extra.append(deny)
            m.publish()
            # ztunnel closes the open connection as soon as the policy arrives.
            try:
                async with asyncio.timeout(30):
                    rest = await reader.read()
            except ConnectionResetError:
                rest = b""
            assert rest == b""
            writer.close()
            closed = [e for e in logs if e["event"] == "connection closed by policy"]
            assert closed and closed[0]["policy"] == "shop/deny-client", closed
            # A new connection is refused by the destination with 401, the policy named there.
            before = node2.zt.metrics.connections_closed
            assert await refused(m, p.client, p.api.ip, 8097) == b""
            async with asyncio.timeout(10):
                await node2.zt.metrics.wait_closed(before + 1)
        lines = [e for e in logs if e["event"] == "connection complete"]
        reasons = {(e["direction"], e["reason"]) for e in lines}
        assert ("inbound", "closed by policy: denied by DENY policy shop/deny-client rule 0") in reasons, reasons
        assert ("inbound", "denied by DENY policy shop/deny-client rule 0") in reasons, reasons
        assert any(d == "outbound" and r and "401" in r for d, r in reasons), reasons
        _, text = await node2.fetch("stats", "/metrics")
        assert metric(text, "istio_tcp_connections_closed_total", reporter="destination", response_flags="DENY") >= 2
    finally:
        if deny in m.extra:
            m.extra.remove(deny)
        m.publish()
    await m.converged()
    await check_echo(m, p.client, p.api.ip, 8097, p.api.ip)


async def test_a_peer_that_forges_forwarded_gains_nothing(mesh: tuple[Mesh, Pods]) -> None:
    """The source IP for policy and for the app is the HBONE peer's, whatever ``forwarded`` says
    (only the destination's own waypoint is believed)."""
    m, p = mesh
    srv = await m.serve(p.api, 8098)
    trusted = "10.0.9.9"
    allow = AuthorizationPolicy(
        "shop",
        "api-from-trusted-ip",
        selector=WorkloadSelector({"app": "api"}),
        rules=(Rule(from_=(RuleFrom(Source(ip_blocks=(f"{trusted}/32",))),)),),
    )
    # A peer outside the mesh with a stolen mesh certificate, dialing api's HBONE port itself.
    cred = m.ca.issue(Identity("cluster.local", "shop", "client"))

    async def forge() -> bytes:
        sock = await m.factory(p.outside).tcp_socket(socket.AF_INET)
        proto = await open_connection(
            p.api.ip, 15008, client_context(cred), "cluster.local", Identity("cluster.local", "shop", "api"),
            sock=sock,
        )  # fmt: skip
        try:
            st = await proto.open_stream(f"{p.api.ip}:8098", [("forwarded", f'for="{trusted}:4242"')])
            sink = BufferedSink(st)
            st.write_eof()
            async with asyncio.timeout(10):
                return await sink.read_all()
        finally:
            proto.close()

    m.extra.append(allow)
    m.publish()
    try:
        await wait_listed(m, p.api.uid, "shop/api-from-trusted-ip")
        with pytest.raises(ConnectRefused) as refused_with:
            await forge()
        assert refused_with.value.status == 401
    finally:
        m.extra.remove(allow)
        m.publish()
    await m.converged()
    # Allowed again, and the app sees the peer's real address, not the forged one.
    assert await forge() == f"peer={p.outside.ip}\n".encode()
    assert srv.peers == [p.outside.ip]


async def test_certificates_only_for_pods_on_the_node(mesh: tuple[Mesh, Pods]) -> None:
    m, _ = mesh
    want = {
        "node-1": {"spiffe://cluster.local/ns/shop/sa/client", "spiffe://cluster.local/ns/shop/sa/web"},
        "node-2": {"spiffe://cluster.local/ns/shop/sa/web", "spiffe://cluster.local/ns/shop/sa/api"},
    }
    for node in m.nodes:
        dump = await node.config_dump()
        certs = dump["certificates"]
        assert isinstance(certs, list)
        assert {c["identity"] for c in certs} == want[node.name]
        assert all(c["state"] == "available" and c["not_after"] for c in certs)
        assert {str(i.uri) for i in node.ca.calls} <= want[node.name]
        assert len(dump["workloads"]) == len(m.topo.pods)  # type: ignore[arg-type]
        status, _ = await node.fetch("readiness", "/healthz/ready")
        assert status == 200


async def test_rotation_during_long_transfer_drops_nothing(mesh: tuple[Mesh, Pods]) -> None:
    m, p = mesh
    await m.serve(p.remote_web, 8100)
    reader, writer = await m.connect(p.client, p.remote_web.ip, 8100)
    chunk = os.urandom(64 * 1024)
    sent = 0
    received = bytearray()

    async def read_all() -> None:
        while data := await reader.read(65536):
            received.extend(data)

    rd = asyncio.create_task(read_all())
    try:
        certs = [(n, n.zt.certs.current(i)) for n in m.nodes for i in n.zt.certs.identities()]
        for i in range(40):
            writer.write(chunk)
            sent += len(chunk)
            await writer.drain()
            if i == 10:
                for n in m.nodes:
                    for ident in n.zt.certs.identities():
                        n.zt.certs.refresh_now(ident)
        async with asyncio.timeout(10):
            for n, old in certs:
                assert old is not None
                while n.zt.certs.current(old.credential.identity) is old:
                    await n.zt.certs.changed.wait()
        for _ in range(10):
            writer.write(chunk)
            sent += len(chunk)
            await writer.drain()
        writer.write_eof()
        async with asyncio.timeout(20):
            await rd
    finally:
        rd.cancel()
        writer.close()
    header = f"peer={p.client.ip}\n".encode()
    assert bytes(received[: len(header)]) == header
    assert len(received) - len(header) == sent
    # New connections after the rotation use the new certificates and work.
    await check_echo(m, p.client, p.remote_web.ip, 8100, p.remote_web.ip)
    dump = await m.nodes[1].config_dump()
    assert all(c["rotations"] >= 1 for c in dump["certificates"])  # type: ignore[union-attr]


async def test_malformed_zds_message_gets_error_ack(mesh: tuple[Mesh, Pods]) -> None:
    m, p = mesh
    agent = m.nodes[0].agent
    assert "undecodable" in await agent.raw(b"\xff\xff\xff")
    assert "exactly one netns fd" in await agent.raw(
        zds.encode_request(zds.AddWorkload("u", "n", "ns", "sa", -1))
    )
    # The session survives: traffic still flows and the agent can still talk.
    await check_echo(m, p.client, p.local_web.ip, 8012, p.local_web.ip)
    assert await agent.snapshot_sent() == ""


async def test_removing_a_pod_drains_its_connections(mesh: tuple[Mesh, Pods]) -> None:
    """Runs last: it takes web-b out of the mesh."""
    m, p = mesh
    await m.serve(p.remote_web, 8200)
    reader, writer = await m.connect(p.client, p.remote_web.ip, 8200)
    writer.write(b"before ")
    await writer.drain()
    assert await reader.readline() == f"peer={p.client.ip}\n".encode()
    node2 = m.nodes[1]
    assert await node2.agent.delete(p.remote_web) == ""
    # The open connection keeps working during the drain period …
    writer.write(b"after")
    writer.write_eof()
    async with asyncio.timeout(5):
        assert await reader.read() == b"before after"
    writer.close()
    # The pod is deleted, so discovery drops it too: its certificate is gone, it was the last
    # pod with the identity on node 2 (web-a is on node 1). Until then ztunnel kept it, as it
    # prefetches the certificates of every workload discovery places on its node.
    m.store.replace_all(
        [*(m.workload(x) for x in m.topo.pods if x is not p.remote_web), *m.services, *m.extra]
    )
    await m.converged()
    dump = await node2.config_dump()
    assert {c["identity"] for c in dump["certificates"]} == {"spiffe://cluster.local/ns/shop/sa/api"}  # type: ignore[union-attr]
    assert p.remote_web.uid not in {pod["uid"] for pod in dump["pods"]}  # type: ignore[union-attr]
