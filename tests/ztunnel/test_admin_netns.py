"""``ambientctl ztunnel-config`` and ``ambientctl check`` against real ztunnels in network namespaces.

Two nodes of the netns harness (tests/netns/mesh.py: the real discovery server, a ztunnel per
node, redirection rules in each pod's netns); a live connection from shop/client (node 1) to
Service web (its pod on node 2) stays open while the CLI reads both nodes' admin ports: the
connection is listed on both sides with identities and the bytes moved so far, the workloads,
services, the policy and each node's certificates are there, ``log --level`` changes the
level, and ``check`` finds the mesh healthy.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio
import structlog

from ambientctl.main import main
from mesh import log as meshlog
from mesh.admin import current_level
from mesh.model import AuthorizationAction, AuthorizationPolicy, Rule, RuleFrom, Source, WorkloadSelector
from tests.netns.mesh import Mesh
from tests.netns.topology import Pod, Topology

pytestmark = [pytest.mark.netns, pytest.mark.asyncio(loop_scope="module")]

WEB_VIP = "10.96.0.11"


class Pods:
    def __init__(self, topo: Topology) -> None:
        n1, n2 = topo.add_node(), topo.add_node()
        topo.connect_nodes()
        self.client = topo.add_pod(n1, "client", "shop", "client")
        self.web = topo.add_pod(n2, "web", "shop", "web", {"app": "web"})
        self.legacy = topo.add_pod(n2, "legacy", "legacy", "legacy", enrolled=False)


@pytest.fixture(scope="module")
def topo() -> Iterator[tuple[Topology, Pods]]:
    with Topology() as t:
        yield t, Pods(t)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh(topo: tuple[Topology, Pods]) -> AsyncIterator[tuple[Mesh, Pods]]:
    t, pods = topo
    # The ztunnels log in this process: to stderr, so that the CLI's stdout stays parseable.
    saved = structlog.get_config()
    meshlog.configure("info", json=True)
    m = Mesh(t, cert_ttl=dt.timedelta(hours=2))
    m.add_service("shop", "web", WEB_VIP, 80, 8090, "web")
    m.extra.append(
        AuthorizationPolicy(
            "shop",
            "allow-shop",
            selector=WorkloadSelector({"app": "web"}),
            action=AuthorizationAction.ALLOW,
            rules=(Rule(from_=(RuleFrom(Source(namespaces=("shop",))),)),),
        )
    )
    try:
        await m.start()
        for node in m.nodes:
            await node.until(lambda s: "shop/allow-shop" in s.authorizations)
            for identity in node.zt.certs.identities():
                await node.zt.certs.get(identity, timeout=30)
        yield m, pods
    finally:
        await m.aclose()
        structlog.configure(**saved)


def call_main(argv: list[str], keep_level: bool = False) -> int:
    """``ambientctl`` in-process, putting back the logging set-up ``main`` changes — but the
    level when ``keep_level``: the ztunnels run in this process, so a level they were told to
    take is this process's level (and ``main`` itself sets the level first)."""
    config = structlog.get_config()
    handlers = logging.getLogger().handlers[:]
    level = meshlog._threshold
    try:
        return main(argv)
    finally:
        structlog.configure(**config)
        logging.getLogger().handlers[:] = handlers
        if not keep_level:
            meshlog._threshold = level


async def cli(
    capsys: pytest.CaptureFixture[str], *argv: str, keep_level: bool = False
) -> tuple[int, str, str]:
    rc = await asyncio.to_thread(call_main, list(argv), keep_level)
    out, err = capsys.readouterr()
    return rc, out, err


def admin(m: Mesh, n: int) -> str:
    host, port = m.nodes[n - 1].zt.bound["admin"]
    return f"{host}:{port}"


async def zc_json(capsys: pytest.CaptureFixture[str], *argv: str, keep_level: bool = False) -> Any:
    rc, out, err = await cli(capsys, "zc", *argv, "-o", "json", keep_level=keep_level)
    assert rc == 0, err
    return json.loads(out)


async def test_workloads_services_policies_of_a_real_ztunnel(
    mesh: tuple[Mesh, Pods], capsys: pytest.CaptureFixture[str]
) -> None:
    m, p = mesh
    rc, out, err = await cli(capsys, "ztunnel-config", "workload", "--admin", admin(m, 1))
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["NAMESPACE", "POD", "NAME", "ADDRESS", "NODE", "WAYPOINT", "PROTOCOL"]
    rows = {tuple(line.split()[:2]): line.split() for line in lines[1:]}
    assert rows[("shop", "client")] == ["shop", "client", p.client.ip, "node-1", "None", "HBONE"]
    assert rows[("shop", "web")] == ["shop", "web", p.web.ip, "node-2", "None", "HBONE"]
    assert rows[("legacy", "legacy")] == ["legacy", "legacy", p.legacy.ip, "node-2", "None", "TCP"]

    only = await zc_json(capsys, "workload", "--admin", admin(m, 1), "--address", p.web.ip)
    assert [(w["namespace"], w["name"], w["node"]) for w in only] == [("shop", "web", "node-2")]
    on2 = await zc_json(capsys, "w", "--admin", admin(m, 1), "--workload-node", "node-2")
    assert sorted(w["name"] for w in on2) == ["legacy", "web"]

    rc, out, _ = await cli(capsys, "zc", "--admin", admin(m, 2), "service")
    assert rc == 0
    assert out.splitlines()[0].split() == [
        "NAMESPACE",
        "SERVICE",
        "NAME",
        "SERVICE",
        "VIP",
        "WAYPOINT",
        "ENDPOINTS",
    ]
    assert out.splitlines()[1].split() == ["shop", "web", WEB_VIP, "None", "1/1"]

    rc, out, _ = await cli(capsys, "zc", "policy", "--admin", admin(m, 2))
    assert rc == 0
    policy_rows = [line.split() for line in out.splitlines()]
    assert policy_rows[0] == ["NAMESPACE", "POLICY", "NAME", "ACTION", "SCOPE"]
    assert ["shop", "allow-shop", "Allow", "WorkloadSelector"] in policy_rows


async def test_certificates_of_each_node(mesh: tuple[Mesh, Pods], capsys: pytest.CaptureFixture[str]) -> None:
    m, _ = mesh
    rc, out, err = await cli(capsys, "zc", "certificate", "--admin", admin(m, 2))
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["CERTIFICATE", "NAME", "TYPE"]
    rows = [line.split() for line in lines[1:]]
    web = [r for r in rows if r[0] == "spiffe://cluster.local/ns/shop/sa/web"]
    assert web[0][1] == "Leaf" and web[-1][1] == "Root"
    assert all(r[2:4] == ["Available", "true"] for r in web)
    # Node 2 holds only the identities of its own pods.
    assert {r[0] for r in rows} == {"spiffe://cluster.local/ns/shop/sa/web"}
    certs = await zc_json(capsys, "cert", "--admin", admin(m, 2))
    [web_cert] = certs
    assert web_cert["state"] == "available"
    leaf = web_cert["cert_chain"][0]
    assert leaf["uris"] == ["spiffe://cluster.local/ns/shop/sa/web"]
    assert leaf["serial"] == web_cert["serial"]
    end = dt.datetime.fromisoformat(leaf["not_after"])
    assert dt.timedelta(hours=1) < end - dt.datetime.now(dt.UTC) <= dt.timedelta(hours=2)
    assert web_cert["root_certs"] and web_cert["root_certs"][0]["subject"]


async def test_a_live_connection_on_both_sides(
    mesh: tuple[Mesh, Pods], capsys: pytest.CaptureFixture[str]
) -> None:
    m, p = mesh
    srv = await m.serve(p.web, 8090)
    node1 = m.nodes[0]
    closed_before = node1.zt.metrics.connections_closed
    reader, writer = await m.connect(p.client, WEB_VIP, 80)
    try:
        payload = b"x" * 5000
        writer.write(payload)
        await writer.drain()
        want = len(f"peer={p.client.ip}\n") + len(payload)
        async with asyncio.timeout(15):
            got = await reader.readexactly(want)
        assert got.endswith(payload)
        # The echo came back through both ztunnels: each lists the connection now.
        out1 = await zc_json(capsys, "connections", "--admin", admin(m, 1))
        [c1] = [c for c in out1 if c["src_workload"] == "shop/client"]
        assert c1["direction"] == "outbound"
        assert c1["pod"]["name"] == "client"
        assert c1["original_dst"] == f"{WEB_VIP}:80"
        assert c1["actual_dst"] == f"{p.web.ip}:15008"
        assert c1["protocol"] == "HBONE"
        assert c1["src_identity"] == "spiffe://cluster.local/ns/shop/sa/client"
        assert c1["dst_identity"] == "spiffe://cluster.local/ns/shop/sa/web"
        assert c1["dst_workload"] == "shop/web" and c1["service"] == "web.shop.svc.cluster.local"
        assert c1["bytes_sent"] >= len(payload) and c1["bytes_received"] >= want  # live counts
        assert c1["duration_s"] >= 0 and c1["started"].endswith("+00:00")

        out2 = await zc_json(capsys, "cons", "--admin", admin(m, 2), "--direction", "inbound")
        [c2] = [c for c in out2 if c["src_workload"] == "shop/client"]
        assert c2["direction"] == "inbound" and c2["pod"]["name"] == "web"
        assert c2["src_identity"] == "spiffe://cluster.local/ns/shop/sa/client"
        assert c2["dst_identity"] == "spiffe://cluster.local/ns/shop/sa/web"
        assert c2["actual_dst"] == f"{p.web.ip}:8090"
        assert await zc_json(capsys, "cons", "--admin", admin(m, 2), "--direction", "outbound") == []

        rc, out, _ = await cli(capsys, "zc", "connections", "--admin", admin(m, 1))
        assert rc == 0
        header, *rows = out.splitlines()
        assert header.split()[:7] == [
            "WORKLOAD",
            "DIRECTION",
            "LOCAL",
            "REMOTE",
            "REMOTE",
            "TARGET",
            "PROTOCOL",
        ]
        row = next(r.split() for r in rows if r.startswith("client.shop"))
        assert row[1] == "Outbound"
        assert row[3] == "web.shop:15008"  # names, not addresses (istioctl's lookup)
        assert row[4] == "web.shop.svc.cluster.local:80"
        assert row[5:7] == ["HBONE", "spiffe://cluster.local/ns/shop/sa/web"]
        rc, out, _ = await cli(capsys, "zc", "connections", "--admin", admin(m, 1), "--raw")
        row = next(r.split() for r in out.splitlines() if r.startswith("client.shop"))
        assert row[3:5] == [f"{p.web.ip}:15008", f"{WEB_VIP}:80"]

        # all -o json is the whole dump, live connection included.
        dump = await zc_json(capsys, "all", "--admin", admin(m, 2))
        assert {"workloads", "services", "authorizations", "certificates", "connections"} <= dump.keys()
        assert any(c["src_workload"] == "shop/client" for c in dump["connections"])
    finally:
        writer.close()
        await writer.wait_closed()
    # Once closed, the connection leaves the list.
    await asyncio.wait_for(node1.zt.metrics.wait_closed(closed_before + 1), 15)
    assert await zc_json(capsys, "connections", "--admin", admin(m, 1)) == []
    assert srv.received >= 5000


async def test_log_level_shown_and_set(mesh: tuple[Mesh, Pods], capsys: pytest.CaptureFixture[str]) -> None:
    m, _ = mesh
    before = meshlog._threshold
    try:
        rc, out, err = await cli(capsys, "zc", "log", "--admin", admin(m, 1))
        assert rc == 0, err
        assert out.splitlines()[1] == f"current log level is {current_level()}"
        rc, out, err = await cli(
            capsys, "zc", "log", "--admin", admin(m, 1), "--level", "debug", keep_level=True
        )
        assert rc == 0, err
        assert out.splitlines() == [f"http://{admin(m, 1)}:", "current log level is debug"]
        assert current_level() == "debug"  # the in-process ztunnel's level changed
        [res] = await zc_json(capsys, "log", "--admin", admin(m, 1), "--level", "warn", keep_level=True)
        assert res["level"] == "warning" and current_level() == "warning"
        assert res["node"] is None and res["admin"] == f"http://{admin(m, 1)}"
        [res] = await zc_json(capsys, "log", "--admin", admin(m, 1), "--level", "error", keep_level=True)
        assert current_level() == "error"
        [res] = await zc_json(capsys, "log", "--admin", admin(m, 1), "-r", keep_level=True)
        assert res["level"] == "info" and current_level() == "info"
        rc, _, err = await cli(capsys, "zc", "log", "--admin", admin(m, 1), "--level", "trace")
        assert rc == 2 and "--level 'trace': unrecognized logging level" in err
    finally:
        meshlog._threshold = before


async def test_check_finds_the_mesh_healthy(
    mesh: tuple[Mesh, Pods], capsys: pytest.CaptureFixture[str]
) -> None:
    m, _ = mesh
    argv = ["check", "--admin", admin(m, 1), "--admin", admin(m, 2), "--controlplane", m.discovery.address]
    rc, out, err = await cli(capsys, *argv, "-o", "json")
    assert rc == 0, out + err
    report = json.loads(out)
    by = {(c["check"], c["target"].split(" ")[0]): c for c in report["checks"]}
    assert by[("control plane", m.discovery.address)]["status"] == "OK"
    assert "2/2 ztunnels hold discovery state" in by[("control plane", m.discovery.address)]["detail"]
    assert by[("ztunnel", "node-1")]["status"] == by[("ztunnel", "node-2")]["status"] == "OK"
    assert by[("enrollment", "node-2")]["detail"].startswith("1 enrolled pods, all served")
    certs = [c for c in report["checks"] if c["check"] == "certificate"]
    assert len(certs) == 2 and all(c["status"] == "OK" and "expires" in c["detail"] for c in certs)
    assert by[("policy", "-")]["status"] == "SKIP"
    rc, out, _ = await cli(capsys, *argv)
    assert rc == 0
    assert out.splitlines()[1].split() == ["CHECK", "TARGET", "STATUS", "DETAIL"]
    assert out.splitlines()[-1].startswith("healthy: ")


async def test_check_goes_red_when_a_pod_is_enrolled_but_not_served(
    mesh: tuple[Mesh, Pods], capsys: pytest.CaptureFixture[str]
) -> None:
    m, p = mesh
    node2 = m.nodes[1]
    web: Pod = p.web
    assert await node2.agent.delete(web) == ""
    try:
        rc, out, _ = await cli(capsys, "check", "--admin", admin(m, 1), "--admin", admin(m, 2), "-o", "json")
        assert rc == 1
        [enr] = [
            c for c in json.loads(out)["checks"] if c["check"] == "enrollment" and c["target"] == "node-2"
        ]
        assert enr["status"] == "FAIL"
        assert f"enrolled but not served by this node's ztunnel: shop/web ({web.ip})" in enr["detail"]
    finally:
        assert await node2.agent.add(web) == ""
