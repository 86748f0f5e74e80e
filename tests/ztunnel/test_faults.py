"""What an operator sees of faults (issue 24), through discovery -> ztunnel on loopback (no netns):
certificates prefetched concurrently for the node's workloads, readiness lost when a certificate
cannot be renewed before it expires, and the fault metrics on the stats endpoint."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import socket
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from mesh import zds
from mesh.admin import MAX_CONNECTIONS
from mesh.model import TunnelProtocol, Workload
from mesh.netns import HostSocketFactory, SocketFactory
from tests.discovery import Discovery, Subscriber
from tests.netns.agent import FakeAgent
from tests.ztunnel.fakes import FakeCa
from ztunnel.app import Addresses, Ztunnel
from ztunnel.inpod import Ports
from ztunnel.metrics import ConnectionRecord, Metrics

ACCOUNTS = ("a", "b", "c", "d")


def host_factory(fd: int, name: str) -> SocketFactory:
    return HostSocketFactory()


@dataclass
class Node:
    zt: Ztunnel
    agent: FakeAgent
    ca: FakeCa
    discovery: Discovery
    sub: Subscriber

    def get(self, which: str, path: str) -> tuple[int, str]:
        host, port = self.zt.bound[which]
        try:
            with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            with e:
                return e.code, e.read().decode()

    async def fetch(self, which: str, path: str) -> tuple[int, str]:
        return await asyncio.to_thread(self.get, which, path)

    async def add(self, uid: str) -> str:
        fd = os.open("/dev/null", os.O_RDONLY)
        try:
            return await self.agent.request(zds.AddWorkload(uid, uid, "ns", uid, fd), [fd])
        finally:
            os.close(fd)

    async def until_certs(self, predicate: Callable[[], bool], timeout: float = 30.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                await self.zt.certs.changed.wait()


async def start_node(tmp_path: Path, ca: FakeCa) -> Node:
    discovery = Discovery()
    discovery.store.replace_all(
        [
            Workload(uid=u, name=u, namespace="ns", node="n1", service_account=u, ips=(f"127.0.0.{i}",),
                     tunnel_protocol=TunnelProtocol.HBONE)
            for i, u in enumerate(ACCOUNTS, start=2)
        ]
        + [Workload(uid="elsewhere", name="elsewhere", namespace="ns", node="n2", service_account="e",
                    ips=("127.0.1.2",), tunnel_protocol=TunnelProtocol.HBONE)]
    )  # fmt: skip
    await discovery.start()
    sub = await discovery.subscribe("n1")
    path = str(tmp_path / "zds.sock")
    zt = Ztunnel(
        node="n1",
        trust_domain="cluster.local",
        state=sub.state,
        ca=ca,
        zds_path=path,
        ports=Ports(0, 0, 0, "127.0.0.1"),
        addresses=Addresses(("127.0.0.1", 0), ("127.0.0.1", 0), ("127.0.0.1", 0)),
        make_factory=host_factory,
        drain_seconds=0,
    )
    zt.follow(sub.client)  # as ztunnel.main wires its discovery client
    await zt.start()
    agent = FakeAgent(path)
    await agent.accept()
    return Node(zt, agent, ca, discovery, sub)


@pytest.fixture
async def stopper() -> AsyncIterator[list[Node]]:
    nodes: list[Node] = []
    try:
        yield nodes
    finally:
        for n in nodes:
            n.agent.close()
            await n.zt.shutdown(0)
            await n.discovery.aclose()


async def test_a_restarted_ztunnel_fetches_its_pods_certificates_concurrently(
    tmp_path: Path, stopper: list[Node]
) -> None:
    """The agent acks pods one at a time, each once its certificate is in: the fetches for every
    workload discovery places on the node start together, before the first add, not one per add."""
    ca = FakeCa()
    ca.gate = asyncio.Event()  # a CA that takes its time
    node = await start_node(tmp_path, ca)
    stopper.append(node)
    async with asyncio.timeout(10):
        await ca.wait_in_flight(len(ACCOUNTS))  # all at once, and no add has been sent yet
    assert sorted(i.service_account for i in ca.calls) == list(ACCOUNTS)  # never another node's
    ca.gate.set()
    for uid in ACCOUNTS:
        assert await node.add(uid) == ""
    assert await node.agent.snapshot_sent() == ""
    assert len(ca.calls) == len(ACCOUNTS)  # the adds found their certificates there
    assert node.zt.ready


async def test_unready_when_a_certificate_cannot_be_renewed_before_it_expires(
    tmp_path: Path, stopper: list[Node]
) -> None:
    ca = FakeCa(ttl=dt.timedelta(seconds=3))  # renewed after 1.5 s
    node = await start_node(tmp_path, ca)
    stopper.append(node)
    assert await node.agent.snapshot_sent() == ""
    await node.until_certs(lambda: node.zt.ready)
    assert (await node.fetch("readiness", "/healthz/ready"))[0] == 200
    _, metrics = await node.fetch("stats", "/metrics")
    expiry = metric(metrics, "ambient_certificate_expiry_seconds", identity="spiffe://cluster.local/ns/ns/sa/a")
    assert 0 < expiry <= 3
    assert metric(metrics, "ambient_certificate_fetch_failures_total", identity="spiffe://cluster.local/ns/ns/sa/a") == 0

    ca.fail_next = 10**9  # the CA refuses every renewal from now on
    await node.until_certs(lambda: not node.zt.ready)  # the renewals fail until expiry is near
    assert (await node.fetch("readiness", "/healthz/ready"))[0] == 503
    _, metrics = await node.fetch("stats", "/metrics")
    assert metric(metrics, "ambient_certificate_fetch_failures_total", identity="spiffe://cluster.local/ns/ns/sa/a") >= 1

    ca.fail_next = 0  # the CA is back: a sign of life makes the failing renewals retry at once
    node.zt.certs.retry_failed()
    await node.until_certs(lambda: node.zt.ready)
    assert (await node.fetch("readiness", "/healthz/ready"))[0] == 200


async def test_xds_connection_metrics(tmp_path: Path, stopper: list[Node]) -> None:
    node = await start_node(tmp_path, FakeCa())
    stopper.append(node)
    _, metrics = await node.fetch("stats", "/metrics")
    assert metric(metrics, "ambient_xds_connected") == 1
    assert metric(metrics, "ambient_xds_last_update_timestamp_seconds") > 0
    node.sub.client.stop()
    await node.sub.task
    _, metrics = await node.fetch("stats", "/metrics")
    assert metric(metrics, "ambient_xds_connected") == 0


def test_failed_connections_are_counted() -> None:
    m = Metrics()
    for result in ("ok", "error"):
        rec = ConnectionRecord(reporter="source", direction="outbound", src_addr="a:1", dst_addr="b:2")
        with m.connection(rec):
            if result == "error":
                rec.fail("hbone to b:15008 failed: refused", "UF")
    failed = m.registry.get_sample_value(
        "istio_tcp_connections_failed_total", {**rec.labels()}
    )
    assert failed == 1
    opened = sum(
        s.value for f in m.registry.collect() if f.name == "istio_tcp_connections_opened" for s in f.samples
        if s.name.endswith("_total")
    )
    assert opened == 2


def metric(text: str, name: str, **labels: str) -> float:
    """The value of ``name`` with exactly these labels in a Prometheus text page."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if key == (f"{name}{{{want}}}" if labels else name):
            return float(value)
    raise AssertionError(f"{name}{labels} not in metrics")


async def test_a_flood_of_idle_connections_does_not_starve_readiness(tmp_path: Path, stopper: list[Node]) -> None:
    """Each of the admin/stats/readiness servers holds at most MAX_CONNECTIONS: past that the
    oldest idle one is reset, so the flood is bounded and a real probe is still answered."""
    node = await start_node(tmp_path, FakeCa())
    stopper.append(node)
    assert await node.agent.snapshot_sent() == ""
    await node.until_certs(lambda: node.zt.ready)
    loop = asyncio.get_running_loop()
    flood: list[socket.socket] = []
    try:
        for _ in range(3 * MAX_CONNECTIONS):  # connect and say nothing
            s = socket.socket()
            s.setblocking(False)
            flood.append(s)
            async with asyncio.timeout(30):
                await loop.sock_connect(s, node.zt.bound["readiness"])
        # A probe while the flood is held: answered.
        async with asyncio.timeout(30):
            assert (await node.fetch("readiness", "/healthz/ready"))[0] == 200

        async def ended(s: socket.socket) -> str:
            try:
                return "eof" if await loop.sock_recv(s, 1) == b"" else "data"
            except ConnectionResetError:
                return "reset"

        # Every flood connection but the newest MAX_CONNECTIONS - 1 (the probe took one slot)
        # was reset at the cap, not held until the request timeout.
        async with asyncio.timeout(30):
            ends = await asyncio.gather(*(ended(s) for s in flood[: 2 * MAX_CONNECTIONS]))
        assert ends == ["reset"] * (2 * MAX_CONNECTIONS)
    finally:
        for s in flood:
            s.close()
