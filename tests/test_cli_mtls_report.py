"""``ambientctl policy mtls-report``: what STRICT would break, from running ztunnels.

Two layers: the report built from text captured from real ztunnels (metrics page, access-log
lines, config_dump), and end to end against the netns harness's ztunnels (tests/netns/mesh.py):
a plaintext client (a pod outside the mesh, and a node-local process no workload owns) and an
mTLS client talk to enrolled pods, then the command — a separate process, as a user runs it —
reads those ztunnels' metrics and admin ports and the access log they wrote.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import structlog

from ambientctl import mtls_report as mr
from ambientctl.main import build_parser

REPO = Path(__file__).resolve().parents[1]
STRICT_KEY = "istio-system/istio_converted_static_strict"
CLIENT_ID = "spiffe://cluster.local/ns/shop/sa/client"

# -- captured from the netns harness (test_report_from_running_ztunnels below) --------------------
# node-2's metrics page, trimmed to the connection counters (and one other family).

METRICS_PAGE = """\
# HELP istio_tcp_connections_opened_total TCP connections opened
# TYPE istio_tcp_connections_opened_total counter
istio_tcp_connections_opened_total{connection_security_policy="none",destination_principal="spiffe://cluster.local/ns/shop/sa/web",destination_service="unknown",destination_workload="web",destination_workload_namespace="shop",reporter="destination",response_flags="-",source_principal="unknown",source_workload="legacy",source_workload_namespace="legacy"} 2.0
istio_tcp_connections_opened_total{connection_security_policy="none",destination_principal="spiffe://cluster.local/ns/shop/sa/web",destination_service="unknown",destination_workload="web",destination_workload_namespace="shop",reporter="destination",response_flags="-",source_principal="unknown",source_workload="unknown",source_workload_namespace="unknown"} 1.0
istio_tcp_connections_opened_total{connection_security_policy="mutual_tls",destination_principal="spiffe://cluster.local/ns/shop/sa/web",destination_service="unknown",destination_workload="web",destination_workload_namespace="shop",reporter="destination",response_flags="-",source_principal="spiffe://cluster.local/ns/shop/sa/client",source_workload="client",source_workload_namespace="shop"} 1.0
istio_tcp_connections_opened_total{connection_security_policy="mutual_tls",destination_principal="spiffe://cluster.local/ns/shop/sa/api",destination_service="unknown",destination_workload="api",destination_workload_namespace="shop",reporter="destination",response_flags="-",source_principal="spiffe://cluster.local/ns/shop/sa/client",source_workload="client",source_workload_namespace="shop"} 1.0
istio_tcp_connections_opened_total{connection_security_policy="none",destination_principal="spiffe://cluster.local/ns/shop/sa/api",destination_service="unknown",destination_workload="api",destination_workload_namespace="shop",reporter="destination",response_flags="-",source_principal="unknown",source_workload="legacy",source_workload_namespace="legacy"} 1.0
# HELP istio_tcp_connections_opened_created TCP connections opened
# TYPE istio_tcp_connections_opened_created gauge
istio_tcp_connections_opened_created{connection_security_policy="none",destination_principal="spiffe://cluster.local/ns/shop/sa/web",destination_service="unknown",destination_workload="web",destination_workload_namespace="shop",reporter="destination",response_flags="-",source_principal="unknown",source_workload="legacy",source_workload_namespace="legacy"} 1.796087285940525e+09
# HELP istio_tcp_connections_closed_total TCP connections closed
# TYPE istio_tcp_connections_closed_total counter
istio_tcp_connections_closed_total{connection_security_policy="none",destination_principal="spiffe://cluster.local/ns/shop/sa/web",destination_service="unknown",destination_workload="web",destination_workload_namespace="shop",reporter="destination",response_flags="-",source_principal="unknown",source_workload="legacy",source_workload_namespace="legacy"} 2.0
istio_tcp_connections_closed_total{connection_security_policy="none",destination_principal="spiffe://cluster.local/ns/shop/sa/web",destination_service="unknown",destination_workload="web",destination_workload_namespace="shop",reporter="destination",response_flags="-",source_principal="unknown",source_workload="unknown",source_workload_namespace="unknown"} 1.0
istio_tcp_connections_closed_total{connection_security_policy="mutual_tls",destination_principal="spiffe://cluster.local/ns/shop/sa/web",destination_service="unknown",destination_workload="web",destination_workload_namespace="shop",reporter="destination",response_flags="-",source_principal="spiffe://cluster.local/ns/shop/sa/client",source_workload="client",source_workload_namespace="shop"} 1.0
istio_tcp_connections_closed_total{connection_security_policy="mutual_tls",destination_principal="spiffe://cluster.local/ns/shop/sa/api",destination_service="unknown",destination_workload="api",destination_workload_namespace="shop",reporter="destination",response_flags="-",source_principal="spiffe://cluster.local/ns/shop/sa/client",source_workload="client",source_workload_namespace="shop"} 1.0
istio_tcp_connections_closed_total{connection_security_policy="none",destination_principal="spiffe://cluster.local/ns/shop/sa/api",destination_service="unknown",destination_workload="api",destination_workload_namespace="shop",reporter="destination",response_flags="DENY",source_principal="unknown",source_workload="legacy",source_workload_namespace="legacy"} 1.0
"""

# The same run's log lines, as structlog captured them (production adds "level" and "timestamp").
ACCESS_LOG = """\
{"direction": "inbound_passthrough", "src_addr": "10.0.1.3:34068", "dst_addr": "10.0.2.2:8301", "src_workload": "legacy", "src_namespace": "legacy", "src_identity": "unknown", "dst_workload": "web", "dst_namespace": "shop", "dst_identity": "spiffe://cluster.local/ns/shop/sa/web", "dst_service": "unknown", "security": "none", "bytes_sent": 1, "bytes_recv": 15, "duration_ms": 1.0, "result": "ok", "reason": null, "event": "connection complete", "log_level": "info"}
{"direction": "inbound_passthrough", "src_addr": "10.0.1.3:34078", "dst_addr": "10.0.2.2:8301", "src_workload": "legacy", "src_namespace": "legacy", "src_identity": "unknown", "dst_workload": "web", "dst_namespace": "shop", "dst_identity": "spiffe://cluster.local/ns/shop/sa/web", "dst_service": "unknown", "security": "none", "bytes_sent": 1, "bytes_recv": 15, "duration_ms": 0.7, "result": "ok", "reason": null, "event": "connection complete", "log_level": "info"}
{"direction": "inbound_passthrough", "src_addr": "10.0.2.1:53312", "dst_addr": "10.0.2.2:8301", "src_workload": "unknown", "src_namespace": "unknown", "src_identity": "unknown", "dst_workload": "web", "dst_namespace": "shop", "dst_identity": "spiffe://cluster.local/ns/shop/sa/web", "dst_service": "unknown", "security": "none", "bytes_sent": 2, "bytes_recv": 16, "duration_ms": 1.1, "result": "ok", "reason": null, "event": "connection complete", "log_level": "info"}
{"direction": "inbound", "src_addr": "10.0.1.2", "dst_addr": "10.0.2.2:8301", "src_workload": "client", "src_namespace": "shop", "src_identity": "spiffe://cluster.local/ns/shop/sa/client", "dst_workload": "web", "dst_namespace": "shop", "dst_identity": "spiffe://cluster.local/ns/shop/sa/web", "dst_service": "unknown", "security": "mutual_tls", "bytes_sent": 1, "bytes_recv": 15, "duration_ms": 1.5, "result": "ok", "reason": null, "event": "connection complete", "log_level": "info"}
{"direction": "outbound", "src_addr": "10.0.1.2:55444", "dst_addr": "10.0.2.2:8301", "src_workload": "client", "src_namespace": "shop", "src_identity": "spiffe://cluster.local/ns/shop/sa/client", "dst_workload": "web", "dst_namespace": "shop", "dst_identity": "spiffe://cluster.local/ns/shop/sa/web", "dst_service": "unknown", "security": "mutual_tls", "bytes_sent": 1, "bytes_recv": 15, "duration_ms": 6.6, "result": "ok", "reason": null, "event": "connection complete", "log_level": "info"}
{"direction": "inbound", "src_addr": "10.0.1.2", "dst_addr": "10.0.2.3:8302", "src_workload": "client", "src_namespace": "shop", "src_identity": "spiffe://cluster.local/ns/shop/sa/client", "dst_workload": "api", "dst_namespace": "shop", "dst_identity": "spiffe://cluster.local/ns/shop/sa/api", "dst_service": "unknown", "security": "mutual_tls", "bytes_sent": 1, "bytes_recv": 15, "duration_ms": 1.3, "result": "ok", "reason": null, "event": "connection complete", "log_level": "info"}
{"direction": "outbound", "src_addr": "10.0.1.2:45414", "dst_addr": "10.0.2.3:8302", "src_workload": "client", "src_namespace": "shop", "src_identity": "spiffe://cluster.local/ns/shop/sa/client", "dst_workload": "api", "dst_namespace": "shop", "dst_identity": "spiffe://cluster.local/ns/shop/sa/api", "dst_service": "unknown", "security": "mutual_tls", "bytes_sent": 1, "bytes_recv": 15, "duration_ms": 4.9, "result": "ok", "reason": null, "event": "connection complete", "log_level": "info"}
{"peer": "ipv4:127.0.0.1:46738", "node": "ztunnel~node-1", "type_url": "type.googleapis.com/istio.workload.Address", "nonce": "a8aba18fba0145bbb31bdb6c59ede504", "known_nonce": true, "event": "xds ACK", "log_level": "debug"}
{"peer": "ipv4:127.0.0.1:46738", "node": "ztunnel~node-2", "type_url": "type.googleapis.com/istio.workload.Address", "nonce": "c64c8b7f0bbd437d912f50ce60d5fd34", "known_nonce": true, "event": "xds ACK", "log_level": "debug"}
{"src": "10.0.1.3:53840", "dst": "10.0.2.3:8302", "reason": "denied by DENY policy istio-system/istio_converted_static_strict rule 0", "event": "inbound plaintext refused", "log_level": "info"}
{"direction": "inbound_passthrough", "src_addr": "10.0.1.3:53840", "dst_addr": "10.0.2.3:8302", "src_workload": "legacy", "src_namespace": "legacy", "src_identity": "unknown", "dst_workload": "api", "dst_namespace": "shop", "dst_identity": "spiffe://cluster.local/ns/shop/sa/api", "dst_service": "unknown", "security": "none", "bytes_sent": 0, "bytes_recv": 0, "duration_ms": 0.3, "result": "error", "reason": "denied by DENY policy istio-system/istio_converted_static_strict rule 0", "event": "connection complete", "log_level": "info"}
"""

# A config_dump's fields the report reads (the shape of node-2's; api already STRICT, idle unused).
CONFIG_DUMP: dict[str, Any] = {
    "node": "node-2",
    "ready": True,
    "pods": [
        {"uid": "shop-web", "name": "web", "namespace": "shop", "authorizations": []},
        {"uid": "shop-api", "name": "api", "namespace": "shop", "authorizations": [STRICT_KEY]},
        {"uid": "shop-idle", "name": "idle", "namespace": "shop", "authorizations": []},
    ],
    "workloads": [
        {"uid": "legacy-legacy", "name": "legacy", "namespace": "legacy", "addresses": ["10.0.1.3"]},
        {"uid": "shop-web", "name": "web", "namespace": "shop", "addresses": ["10.0.2.2"]},
        {"uid": "shop-api", "name": "api", "namespace": "shop", "addresses": ["10.0.2.3"]},
        {"uid": "infra-gateway", "name": "gateway", "namespace": "infra", "addresses": ["10.0.2.1"]},
    ],
}

LEGACY_TO_WEB_OPENED = next(
    line
    for line in METRICS_PAGE.splitlines()
    if line.startswith("istio_tcp_connections_opened_total{")
    and 'destination_workload="web"' in line
    and 'source_workload="legacy"' in line
)


def dest(report: mr.Report, workload: str) -> mr.Destination:
    return next(d for d in report.destinations if d.workload == workload)


def rows(rs: list[mr.SourceRow]) -> dict[str, tuple[int, int, int]]:
    """source -> (connections, refused, open)"""
    return {r.source: (r.connections, r.refused, r.open) for r in rs}


# -- pure: parsers and the report -----------------------------------------------------------------


def test_metrics_page() -> None:
    report = mr.build_report(mr.parse_metrics(METRICS_PAGE, "page"))
    web, api = dest(report, "shop/web"), dest(report, "shop/api")
    assert rows(web.plaintext) == {"legacy/legacy": (2, 0, 0), "unknown": (1, 0, 0)}
    assert rows(web.mtls) == {"shop/client": (1, 0, 0)}
    assert web.mtls[0].principals == [CLIENT_ID]
    assert rows(api.plaintext) == {"legacy/legacy": (1, 1, 0)}  # refused (DENY): not accepted
    assert rows(api.mtls) == {"shop/client": (1, 0, 0)}
    assert (web.verdict, api.verdict) == ("plaintext", "mtls_only")
    assert [d.workload for d in report.destinations] == ["shop/web", "shop/api"]


def test_metrics_page_counts_open_connections() -> None:
    assert LEGACY_TO_WEB_OPENED.endswith("} 2.0")
    # The same page with one more legacy -> web connection opened and not closed yet.
    page = METRICS_PAGE.replace(LEGACY_TO_WEB_OPENED, LEGACY_TO_WEB_OPENED[:-3] + "3.0")
    web = dest(mr.build_report(mr.parse_metrics(page, "page")), "shop/web")
    assert rows(web.plaintext)["legacy/legacy"] == (3, 0, 1)
    assert "3 connections from legacy/legacy, 1 open now" in "\n".join(
        mr.render_text(mr.build_report(mr.parse_metrics(page, "page")))
    )


def test_access_log_names_sources_and_policies() -> None:
    parsed = mr.parse_access_log(ACCESS_LOG.splitlines(), "log")
    assert parsed.records == 6 and parsed.warnings == []
    report = mr.build_report(parsed.flows)
    web, api = dest(report, "shop/web"), dest(report, "shop/api")
    assert rows(web.plaintext) == {"legacy/legacy": (2, 0, 0), "10.0.2.1": (1, 0, 0)}
    assert [r.kind for r in web.plaintext] == ["workload", "ip"]
    assert rows(api.plaintext) == {"legacy/legacy": (1, 1, 0)}
    assert api.plaintext[0].reasons == {f"denied by DENY policy {STRICT_KEY} rule 0": 1}
    assert rows(api.mtls) == {"shop/client": (1, 0, 0)}
    # With a config_dump, an address a log line could not name gets its workload.
    names = mr.parse_config_dump(CONFIG_DUMP, "dump").ip_names
    named = mr.build_report(mr.parse_access_log(ACCESS_LOG.splitlines(), "log", names).flows)
    assert rows(dest(named, "shop/web").plaintext) == {"legacy/legacy": (2, 0, 0), "infra/gateway": (1, 0, 0)}


def test_metrics_and_log_together_count_each_connection_once() -> None:
    flows = mr.parse_metrics(METRICS_PAGE, "page") + mr.parse_access_log(ACCESS_LOG.splitlines(), "log").flows
    report = mr.build_report(flows, [mr.parse_config_dump(CONFIG_DUMP, "dump")])
    web = dest(report, "shop/web")
    # legacy: in both, counted once; the metrics' "unknown" source is the log's 10.0.2.1.
    assert rows(web.plaintext) == {"legacy/legacy": (2, 0, 0), "10.0.2.1": (1, 0, 0)}
    assert {r.source: r.seen_in for r in web.plaintext} == {
        "legacy/legacy": ["access_log", "metrics"],
        "10.0.2.1": ["access_log"],
    }
    api = dest(report, "shop/api")
    assert rows(api.plaintext) == {"legacy/legacy": (1, 1, 0)}
    assert (api.mode, api.verdict, web.mode) == ("STRICT", "mtls_only", "PERMISSIVE")
    idle = dest(report, "shop/idle")  # only in the config_dump
    assert (idle.verdict, idle.node) == ("no_traffic", "node-2")
    doc = report.to_json()
    assert doc["summary"] == {
        "plaintext": ["shop/web"],
        "mtls_only": ["shop/api"],
        "no_traffic": ["shop/idle"],
    }
    assert json.loads(json.dumps(doc)) == doc

    text = "\n".join(mr.render_text(report))
    assert text.startswith("mTLS report\n")  # build_report was told of no inputs
    assert (
        "Still receiving plaintext — STRICT would refuse these connections:\n  shop/web  (node node-2, PERMISSIVE)"
        in text
    )
    assert "2 connections from legacy/legacy" in text
    assert "1 connection  from 10.0.2.1 (not a known workload)" in text
    assert "  shop/api  (node node-2, STRICT)" in text
    assert f"1 connection  plaintext from legacy/legacy: denied by DENY policy {STRICT_KEY} rule 0" in text
    assert "No inbound connection seen (no evidence either way):\n  shop/idle" in text
    assert (
        "Summary: 1 destination(s) still accept plaintext (shop/web), from 10.0.2.1, legacy/legacy." in text
    )


def test_already_strict_destination_is_not_listed_as_accepting_plaintext() -> None:
    dump = {**CONFIG_DUMP, "pods": [{"name": "web", "namespace": "shop", "authorizations": [STRICT_KEY]}]}
    report = mr.build_report(mr.parse_metrics(METRICS_PAGE, "page"), [mr.parse_config_dump(dump, "dump")])
    web = dest(report, "shop/web")
    assert (web.mode, web.plaintext_accepted, web.verdict) == ("STRICT", 3, "mtls_only")
    text = "\n".join(mr.render_text(report))
    assert "Still receiving plaintext" not in text
    assert (
        "  shop/web  (node node-2, STRICT)\n      (STRICT now: the plaintext below was accepted before"
        in text
    )
    assert "Summary: no destination accepts plaintext" in text


def test_metrics_unknown_source_says_how_to_find_it() -> None:
    text = "\n".join(mr.render_text(mr.build_report(mr.parse_metrics(METRICS_PAGE, "p"))))
    assert "from an unknown source (metrics carry no client address: add --access-log for it)" in text


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("<html><body>hello</body></html>\n", "page: not a Prometheus metrics page"),
        ("# HELP up 1\n# TYPE up gauge\nup 1\n", "page: no istio_tcp_connections_opened_total in it"),
    ],
)
def test_metrics_that_are_not_a_ztunnel_page(text: str, error: str) -> None:
    with pytest.raises(mr.InputError, match=error):
        mr.parse_metrics(text, "page")


def test_access_log_that_is_not_json() -> None:
    console = "2025-01-01 10:00:00 [info] connection complete direction=inbound src_addr=10.0.1.2\n"
    with pytest.raises(mr.InputError, match=r"^f.log: not a JSON access log \(line 1 is not a JSON object"):
        mr.parse_access_log(console.splitlines(), "f.log")
    half = mr.parse_access_log([*ACCESS_LOG.splitlines(), '{"direction": "inbou'], "f.log")
    assert half.warnings == ["f.log: skipped 1 line(s) that are not valid JSON (first: line 12)"]
    assert half.records == 6
    assert mr.parse_access_log(['{"event": "ready"}'], "f.log").warnings == [
        "f.log: no inbound connection records in it"
    ]
    with pytest.raises(mr.InputError, match=r"not a ztunnel config_dump"):
        mr.parse_config_dump({"hello": 1}, "admin x")


# -- the command's errors (in-process, no network needed) -----------------------------------------


def run_cmd(*argv: str) -> int:
    args = build_parser().parse_args(["policy", "mtls-report", *argv])
    rc: int = args.func(args)
    return rc


def test_cli_errors_name_the_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cmd() == mr.EXIT_USAGE
    assert "give at least one --metrics URL or --access-log FILE" in capsys.readouterr().err
    assert run_cmd("--metrics", "127.0.0.1:9", "--timeout", "2") == mr.EXIT_INPUT
    assert "metrics http://127.0.0.1:9/metrics: cannot connect:" in capsys.readouterr().err
    missing = tmp_path / "nope.log"
    assert run_cmd("--access-log", str(missing)) == mr.EXIT_INPUT
    assert f"access log {missing}: No such file or directory" in capsys.readouterr().err
    bad = tmp_path / "console.log"
    bad.write_text("connection complete direction=inbound\n")
    assert run_cmd("--access-log", str(bad)) == mr.EXIT_INPUT
    assert f"access log {bad}: not a JSON access log (line 1" in capsys.readouterr().err
    good = tmp_path / "zt.log"
    good.write_text(ACCESS_LOG)
    assert run_cmd("--access-log", str(good), "-o", "json") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["summary"]["plaintext"] == ["shop/web"] and out["inputs"]["access_log"] == [str(good)]


# -- end to end against the netns harness ---------------------------------------------------------

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("ip", "nft")), reason="needs root, ip, nft"
)


@pytest.fixture(scope="module")
def topo() -> Iterator[Any]:
    from tests.netns.topology import Topology

    with Topology() as t:
        n1, n2 = t.add_node(), t.add_node()
        t.connect_nodes()
        pods = {
            "client": t.add_pod(n1, "client", "shop", "client"),
            "legacy": t.add_pod(n1, "legacy", "legacy", "legacy", enrolled=False),
            "web": t.add_pod(n2, "web", "shop", "web", {"app": "web"}),
            "api": t.add_pod(n2, "api", "shop", "api", {"app": "api"}),
        }
        yield t, pods


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh(topo: Any) -> AsyncIterator[Any]:
    from tests.netns.mesh import Mesh

    t, pods = topo
    m = Mesh(t)
    try:
        await m.start()
        yield m, pods
    finally:
        await m.aclose()


async def ctl(*argv: str) -> tuple[int, str, str]:
    """The command as a user runs it: a separate process (the ztunnels run in this one's loop)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ambientctl", "policy", "mtls-report", *argv,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO,
    )  # fmt: skip
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def from_node_netns(t: Any, node: int, ip: str, port: int) -> bytes:
    """A plaintext client that is no workload: a process in the node's own netns."""
    code = (
        "import socket,sys;s=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=10);"
        "s.sendall(b'hi');s.shutdown(socket.SHUT_WR);d=b''\n"
        "while (c:=s.recv(65536)): d+=c\n"
        "sys.stdout.buffer.write(d)"
    )
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", t.node_ns(node), sys.executable, "-c", code, ip, str(port),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(20):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err
    return out


@pytest.mark.netns
@pytest.mark.asyncio(loop_scope="module")
@needs_root
async def test_report_from_running_ztunnels(mesh: Any, tmp_path: Path) -> None:
    from mesh.model import MtlsMode, PeerAuthentication

    m, p = mesh
    t = m.topo
    await m.serve(p["web"], 8301)
    await m.serve(p["api"], 8302)
    node2 = m.nodes[1]
    before = node2.zt.metrics.connections_closed
    with structlog.testing.capture_logs() as logs:
        for _ in range(2):
            assert (
                await m.exchange(p["legacy"], p["web"].ip, 8301, b"x") == f"peer={p['legacy'].ip}\nx".encode()
            )
        assert await from_node_netns(t, 2, p["web"].ip, 8301) == b"peer=10.0.2.1\nhi"
        assert await m.exchange(p["client"], p["web"].ip, 8301, b"y") == f"peer={p['client'].ip}\ny".encode()
        assert await m.exchange(p["client"], p["api"].ip, 8302, b"z") == f"peer={p['client'].ip}\nz".encode()
        async with asyncio.timeout(10):
            await node2.zt.metrics.wait_closed(before + 5)
    log_file = tmp_path / "ztunnel-node-2.log"
    log_file.write_text("".join(json.dumps(e) + "\n" for e in logs))

    def addr(node: Any, which: str) -> str:
        host, port = node.zt.bound[which]
        return f"{host}:{port}"

    metrics = [a for n in m.nodes for a in ("--metrics", f"http://{addr(n, 'stats')}/metrics")]
    admin = [a for n in m.nodes for a in ("--admin", addr(n, "admin"))]

    rc, out, err = await ctl(*metrics, *admin, "-o", "json")
    assert rc == 0, err
    doc = json.loads(out)
    by = {d["workload"]: d for d in doc["destinations"]}
    web, api, client = by["shop/web"], by["shop/api"], by["shop/client"]
    plain = {r["source"]: r for r in web["plaintext"]}
    assert plain["legacy/legacy"]["accepted"] == 2 and plain["unknown"]["accepted"] == 1, web
    assert web["mtls"][0]["source"] == "shop/client" and web["mtls"][0]["principals"] == [CLIENT_ID]
    assert (web["verdict"], web["node"], web["mode"]) == ("plaintext", "node-2", "PERMISSIVE")
    assert (api["verdict"], [r["source"] for r in api["mtls"]]) == ("mtls_only", ["shop/client"])
    assert client["verdict"] == "no_traffic" and client["node"] == "node-1"
    assert doc["summary"]["plaintext"] == ["shop/web"]

    # The access log adds the address metrics cannot give; together nothing is counted twice.
    rc, out, err = await ctl(*metrics, *admin, "--access-log", str(log_file), "-o", "json")
    assert rc == 0, err
    web = {d["workload"]: d for d in json.loads(out)["destinations"]}["shop/web"]
    assert {r["source"]: r["connections"] for r in web["plaintext"]} == {"legacy/legacy": 2, "10.0.2.1": 1}

    rc, text, err = await ctl(*metrics, "--access-log", str(log_file))
    assert rc == 0, err
    assert "Still receiving plaintext — STRICT would refuse these connections:\n  shop/web" in text
    assert "2 connections from legacy/legacy" in text and "1 connection  from 10.0.2.1" in text

    # STRICT for shop: legacy's next attempt is refused, and the report says so (refused, named).
    strict = PeerAuthentication("shop", "default", mtls_mode=MtlsMode.STRICT)
    m.extra.append(strict)
    m.publish()
    try:
        await node2.until(lambda s: STRICT_KEY in s.workloads[p["api"].uid].authorization_policies)
        before = node2.zt.metrics.connections_closed
        with structlog.testing.capture_logs() as logs:
            try:
                got = await m.exchange(p["legacy"], p["api"].ip, 8302, b"x")
            except ConnectionResetError:
                got = b""
            assert got == b""
            async with asyncio.timeout(10):
                await node2.zt.metrics.wait_closed(before + 1)
        log_file.write_text("".join(json.dumps(e) + "\n" for e in logs))
        rc, out, err = await ctl(*metrics, *admin, "--access-log", str(log_file), "-o", "json")
        assert rc == 0, err
        api = {d["workload"]: d for d in json.loads(out)["destinations"]}["shop/api"]
        assert (api["mode"], api["verdict"]) == ("STRICT", "mtls_only")
        (row,) = api["plaintext"]
        assert (row["source"], row["accepted"], row["refused"]) == ("legacy/legacy", 0, 1)
        assert row["refused_reasons"] == {f"denied by DENY policy {STRICT_KEY} rule 0": 1}
    finally:
        m.extra.remove(strict)
        m.publish()
    await m.converged()


@pytest.mark.netns
@pytest.mark.asyncio(loop_scope="module")
@needs_root
async def test_wrong_port_is_named(mesh: Any) -> None:
    m, _ = mesh
    host, port = m.nodes[0].zt.bound["admin"]
    rc, _, err = await ctl("--metrics", f"http://{host}:{port}/config_dump")
    assert rc == mr.EXIT_INPUT
    assert f"metrics http://{host}:{port}/config_dump: " in err
    stats_host, stats_port = m.nodes[0].zt.bound["stats"]
    rc, _, err = await ctl("--metrics", f"{stats_host}:{stats_port}", "--admin", f"{stats_host}:{stats_port}")
    assert rc == mr.EXIT_INPUT
    assert f"admin http://{stats_host}:{stats_port}/config_dump: " in err
