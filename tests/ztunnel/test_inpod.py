"""ZDS session semantics against a fake agent, with plain sockets on loopback (no netns)."""

from __future__ import annotations

import asyncio
import json
import os
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mesh import zds
from mesh.model import TunnelProtocol, Workload
from mesh.netns import HostSocketFactory, SocketFactory
from tests.discovery import Discovery
from tests.netns.agent import FakeAgent
from tests.ztunnel.fakes import FakeCa
from ztunnel.app import Addresses, Ztunnel
from ztunnel.inpod import Ports


def host_factory(fd: int, name: str) -> SocketFactory:
    return HostSocketFactory()


def pod_fd() -> int:
    return os.open("/dev/null", os.O_RDONLY)


@pytest.fixture
async def zt(tmp_path: Path) -> AsyncIterator[tuple[Ztunnel, FakeAgent, FakeCa]]:
    discovery = Discovery()
    discovery.store.replace_all(
        [
            Workload(uid=u, name=u, namespace="ns", node="n1", service_account=u, ips=(f"127.0.0.{i}",),
                     tunnel_protocol=TunnelProtocol.HBONE)
            for i, u in ((2, "a"), (3, "b"))
        ]
    )  # fmt: skip
    await discovery.start()
    path = str(tmp_path / "zds.sock")
    ca = FakeCa()
    z = Ztunnel(
        node="n1",
        trust_domain="cluster.local",
        state=(await discovery.subscribe("n1")).state,
        ca=ca,
        zds_path=path,
        ports=Ports(0, 0, 0, "127.0.0.1"),
        addresses=Addresses(("127.0.0.1", 0), ("127.0.0.1", 0), ("127.0.0.1", 0)),
        make_factory=host_factory,
        drain_seconds=0,
    )
    await z.start()  # the agent is not there yet: ztunnel keeps retrying
    agent = FakeAgent(path)
    try:
        await agent.accept()
        yield z, agent, ca
    finally:
        agent.close()
        await z.shutdown(0)
        await discovery.aclose()


async def add(agent: FakeAgent, uid: str) -> str:
    fd = pod_fd()
    try:
        return await agent.request(zds.AddWorkload(uid, uid, "ns", uid, fd), [fd])
    finally:
        os.close(fd)


async def test_snapshot_keep_and_stale_removal(zt: tuple[Ztunnel, FakeAgent, FakeCa]) -> None:
    z, agent, _ca = zt
    assert not z.ready
    assert await add(agent, "a") == ""
    assert await add(agent, "b") == ""
    assert await agent.snapshot_sent() == ""
    assert set(z.manager.pods) == {"a", "b"}
    assert z.ready
    assert {str(i) for i in z.certs.identities()} == {
        "spiffe://cluster.local/ns/ns/sa/a",
        "spiffe://cluster.local/ns/ns/sa/b",
    }

    # The agent restarts: it only knows "a" (kept) now.
    assert agent.conn is not None
    agent.conn.close()
    agent.conn = None
    await agent.accept()
    assert await agent.request(zds.KeepWorkload("a")) == ""
    assert "unknown pod" in await agent.request(zds.KeepWorkload("zzz"))
    assert await add(agent, "a") == ""  # already running: no second proxy
    assert await agent.snapshot_sent() == ""
    assert set(z.manager.pods) == {"a"}
    # "b" is still a workload of this node in discovery: its certificate stays (prefetched).
    assert z.certs.dump()[1]["identity"] == "spiffe://cluster.local/ns/ns/sa/b"
    assert [e["pods"] for e in z.certs.dump()] == [2, 1]  # a: its pod + discovery; b: discovery
    assert await agent.request(zds.DelWorkload("a")) == ""
    assert await agent.request(zds.DelWorkload("never-there")) == ""
    assert z.manager.pods == {}


async def test_malformed_messages_get_error_acks(zt: tuple[Ztunnel, FakeAgent, FakeCa]) -> None:
    _, agent, _ = zt
    assert "undecodable" in await agent.raw(b"\xff\xff")
    assert "exactly one netns fd" in await agent.raw(
        zds.encode_request(zds.AddWorkload("x", "x", "ns", "x", -1))
    )
    assert await add(agent, "a") == ""


async def test_add_fails_cleanly_when_no_certificate(zt: tuple[Ztunnel, FakeAgent, FakeCa]) -> None:
    z, agent, ca = zt
    ca.gate = asyncio.Event()  # the CA never answers
    z.manager.cert_timeout = 0.2
    try:
        err = await add(agent, "c")  # not in discovery (yet): no certificate was prefetched
    finally:
        ca.gate.set()
    assert "timeout waiting for certificate" in err
    assert "c" not in z.manager.pods
    assert "spiffe://cluster.local/ns/ns/sa/c" not in {str(i) for i in z.certs.identities()}


def http_get(addr: tuple[str, int], path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{addr[0]}:{addr[1]}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.read().decode()


async def test_admin_readiness_and_logging(zt: tuple[Ztunnel, FakeAgent, FakeCa]) -> None:
    z, agent, _ = zt
    status, _ = await asyncio.to_thread(http_get, z.bound["readiness"], "/healthz/ready")
    assert status == 503  # no snapshot from the agent yet
    assert await add(agent, "a") == ""
    assert await agent.snapshot_sent() == ""
    status, _ = await asyncio.to_thread(http_get, z.bound["readiness"], "/healthz/ready")
    assert status == 200
    status, body = await asyncio.to_thread(http_get, z.bound["admin"], "/logging?level=loud")
    assert status == 400 and "loud" in body
    status, body = await asyncio.to_thread(http_get, z.bound["admin"], "/logging?level=info")
    assert status == 200
    status, body = await asyncio.to_thread(http_get, z.bound["admin"], "/nope")
    assert status == 404 and "/config_dump" in body
    status, body = await asyncio.to_thread(http_get, z.bound["admin"], "/config_dump")
    dump = json.loads(body)
    assert [p["uid"] for p in dump["pods"]] == ["a"]
    assert dump["certificates"][0]["identity"] == "spiffe://cluster.local/ns/ns/sa/a"
    status, body = await asyncio.to_thread(http_get, z.bound["stats"], "/metrics")
    assert status == 200 and "# HELP istio_tcp_connections_opened_total" in body
