"""``ambientctl ztunnel-config`` (``zc``) against a fake ztunnel admin port serving a config dump.

The dump is built with the codec ztunnel's ``/config_dump`` uses (:func:`mesh.xds.dump.to_json`)
plus the certificate and connection entries in the form ``ztunnel/app.py`` writes (the netns
test, tests/ztunnel/test_admin_netns.py, reads a real one). Every subcommand, filter and output
format, the flags before and after the subcommand, and every error with its exit status; then
how the running local mesh is found (run directories under a temporary root).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml

from ambientctl import ztunnel_config as zc
from ambientctl.localmesh.state import RunState
from ambientctl.main import main
from mesh import log as meshlog
from mesh.admin import HttpServer, Response, json_response
from mesh.model import TunnelProtocol, WorkloadStatus
from mesh.xds.authorization import Action, Authorization, Scope
from mesh.xds.dump import to_json
from mesh.xds.state import GatewayAddress, Port, Service, Workload

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)


def iso(delta: dt.timedelta) -> str:
    return (NOW + delta).isoformat()


def make_dump(node: str = "node-a") -> dict[str, Any]:
    """A node's ``/config_dump``: four workloads on two nodes, three services (one a waypoint),
    two policies, certificates in each state, an inbound and an outbound connection."""
    wp = GatewayAddress(namespace="shop", hostname="waypoint.shop.svc.cluster.local")
    web_key, wp_key, db_key = (
        "shop/web.shop.svc.cluster.local",
        "shop/waypoint.shop.svc.cluster.local",
        "shop/db.shop.svc.cluster.local",
    )
    workloads = [
        Workload(uid="shop-web-1", name="web-1", namespace="shop", addresses=("10.0.1.2",), node="node-a",
                 tunnel_protocol=TunnelProtocol.HBONE, service_account="web", waypoint=wp,
                 services={web_key: (Port(80, 8080),)}),
        Workload(uid="shop-waypoint-1", name="waypoint-1", namespace="shop", addresses=("10.0.1.9",),
                 node="node-a", services={wp_key: (Port(15008, 15008),)}),
        Workload(uid="shop-db-1", name="db-1", namespace="shop", addresses=("10.0.2.3",), node="node-b",
                 tunnel_protocol=TunnelProtocol.HBONE, status=WorkloadStatus.UNHEALTHY,
                 services={db_key: (Port(5432, 5432),)}),
        Workload(uid="legacy-old", name="old", namespace="legacy", addresses=("10.0.2.4",), node="node-b"),
    ]  # fmt: skip
    services = [
        Service(name="web", namespace="shop", hostname="web.shop.svc.cluster.local", vips=("10.96.0.10",),
                ports=(Port(80, 8080),), waypoint=wp),
        Service(name="waypoint", namespace="shop", hostname="waypoint.shop.svc.cluster.local",
                vips=("10.96.0.99",), ports=(Port(15008, 15008),)),
        Service(name="db", namespace="shop", hostname="db.shop.svc.cluster.local", vips=("10.96.0.20",),
                ports=(Port(5432, 5432),)),
    ]  # fmt: skip
    auths = [
        Authorization(name="allow-web", namespace="shop", scope=Scope.WORKLOAD_SELECTOR, action=Action.ALLOW),
        Authorization(name="deny-legacy", namespace="legacy", scope=Scope.NAMESPACE, action=Action.DENY,
                      dry_run=True),
    ]  # fmt: skip
    root = {"serial": "a1", "subject": "O=cluster.local", "uris": [], "not_before": iso(-dt.timedelta(days=1)),
            "not_after": iso(dt.timedelta(days=3650))}  # fmt: skip
    leaf = {"serial": "b2", "subject": "", "uris": ["spiffe://cluster.local/ns/shop/sa/web"],
            "not_before": iso(-dt.timedelta(hours=1)), "not_after": iso(dt.timedelta(hours=23))}  # fmt: skip
    inter = {**root, "serial": "c3", "subject": "O=intermediate"}
    return {
        "node": node,
        "trust_domain": "cluster.local",
        "version": 4,
        "ready": True,
        "pods": [
            {
                "uid": "shop-web-1",
                "name": "web-1",
                "namespace": "shop",
                "identity": "spiffe://cluster.local/ns/shop/sa/web",
                "listeners": {"inbound": "0.0.0.0:15008"},
                "workload_known": True,
                "authorizations": ["shop/allow-web"],
                "missing_authorizations": [],
            },
        ],
        "workloads": [{**to_json(w), "local": w.uid == "shop-web-1"} for w in workloads],
        "services": [to_json(s) for s in services],
        "authorizations": [to_json(a) for a in auths],
        "certificates": [
            {
                "identity": "spiffe://cluster.local/ns/shop/sa/web",
                "pods": 1,
                "rotations": 0,
                "state": "available",
                "serial": "b2",
                "not_before": leaf["not_before"],
                "not_after": leaf["not_after"],
                "cert_chain": [leaf, inter, root],
                "root_certs": [root],
            },
            {
                "identity": "spiffe://cluster.local/ns/shop/sa/new",
                "pods": 1,
                "rotations": 0,
                "state": "pending",
            },
            {
                "identity": "spiffe://cluster.local/ns/shop/sa/bad",
                "pods": 1,
                "rotations": 0,
                "state": "pending",
                "last_error": "CA refused: no pod with that identity on node-a",
            },
        ],
        "connections": [
            {
                "direction": "outbound",
                "pod": {"uid": "shop-web-1", "namespace": "shop", "name": "web-1"},
                "src": "10.0.1.2:40000",
                "original_dst": "10.96.0.20:5432",
                "actual_dst": "10.0.2.3:15008",
                "protocol": "HBONE",
                "src_workload": "shop/web-1",
                "src_identity": "spiffe://cluster.local/ns/shop/sa/web",
                "dst_workload": "shop/db-1",
                "dst_identity": "spiffe://cluster.local/ns/shop/sa/default",
                "service": "db.shop.svc.cluster.local",
                "bytes_sent": 2048,
                "bytes_received": 5 * 1024 * 1024,
                "started": iso(-dt.timedelta(seconds=75)),
                "duration_s": 75.0,
                "result": "ok",
            },
            {
                "direction": "inbound_passthrough",
                "pod": {"uid": "shop-web-1", "namespace": "shop", "name": "web-1"},
                "src": "10.0.2.4:50000",
                "original_dst": "10.0.1.2:8080",
                "actual_dst": "10.0.1.2:8080",
                "protocol": "TCP",
                "src_workload": "legacy/old",
                "src_identity": None,
                "dst_workload": "shop/web-1",
                "dst_identity": "spiffe://cluster.local/ns/shop/sa/web",
                "service": "web.shop.svc.cluster.local",
                "bytes_sent": 10,
                "bytes_received": 0,
                "started": iso(-dt.timedelta(seconds=3)),
                "duration_s": 3.2,
                "result": "ok",
            },
        ],
    }


class FakeAdmin:
    """A ztunnel admin port: ``/config_dump`` and ``/logging`` (level kept here)."""

    def __init__(self, dump: dict[str, Any]) -> None:
        self.dump = dump
        self.level = "info"
        self.requests: list[dict[str, str]] = []
        self.server = HttpServer(
            {"/config_dump": lambda _: json_response(self.dump), "/logging": self.logging}, "admin"
        )
        self.address = ""

    def logging(self, query: dict[str, str]) -> Response:
        self.requests.append(query)
        if "reset" in query:
            self.level = "info"
        elif "level" in query:
            if query["level"] not in meshlog.LEVELS:
                return Response(400, b"bad level\n")
            self.level = query["level"]
        return Response(200, f"current log level is {self.level}\n".encode())

    async def start(self) -> str:
        host, port = await self.server.start("127.0.0.1", 0)
        self.address = f"{host}:{port}"
        return self.address


@pytest.fixture
async def admin() -> AsyncIterator[FakeAdmin]:
    fa = FakeAdmin(make_dump())
    await fa.start()
    try:
        yield fa
    finally:
        await fa.server.close()


def call_main(argv: list[str]) -> int:
    """``ambientctl`` in-process (argparse's exit status too), logging set-up put back after."""
    config = structlog.get_config()
    handlers = logging.getLogger().handlers[:]
    level = meshlog._threshold
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code or 0)
    finally:
        structlog.configure(**config)
        logging.getLogger().handlers[:] = handlers
        meshlog._threshold = level


async def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = await asyncio.to_thread(call_main, list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


async def ok(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    rc, out, err = await run(capsys, *argv)
    assert rc == 0, err
    assert err == ""
    return out


async def as_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    return json.loads(await ok(capsys, *argv, "-o", "json"))


# --- the tables ---------------------------------------------------------------------------------


async def test_workload_table_as_istioctl(admin: FakeAdmin, capsys: pytest.CaptureFixture[str]) -> None:
    out = await ok(capsys, "ztunnel-config", "workload", "--admin", admin.address)
    assert out.splitlines() == [
        "NAMESPACE POD NAME   ADDRESS  NODE   WAYPOINT PROTOCOL",
        "legacy    old        10.0.2.4 node-b None     TCP",
        "shop      db-1       10.0.2.3 node-b None     HBONE",
        "shop      waypoint-1 10.0.1.9 node-a None     TCP",
        "shop      web-1      10.0.1.2 node-a waypoint HBONE",
    ]
    # The alias, and the common flags before the subcommand.
    assert await ok(capsys, "zc", "--admin", admin.address, "w") == out
    assert await ok(capsys, "zc", "-o", "short", "--admin", admin.address, "workloads") == out


async def test_workload_filters_and_formats(admin: FakeAdmin, capsys: pytest.CaptureFixture[str]) -> None:
    a = ["zc", "workload", "--admin", admin.address]

    def names(ws: list[dict[str, Any]]) -> list[str]:
        return [w["name"] for w in ws]

    assert names(await as_json(capsys, *a, "--workload-namespace", "legacy")) == ["old"]
    assert names(await as_json(capsys, *a, "--workload-node", "node-a")) == ["waypoint-1", "web-1"]
    [web] = await as_json(capsys, *a, "--address", "10.0.1.2")
    assert web == admin.dump["workloads"][0]  # the dump's own form, "local" included
    assert await as_json(capsys, *a, "--address", "10.9.9.9") == []
    assert (await ok(capsys, *a, "--address", "10.9.9.9")).splitlines() == [
        "NAMESPACE POD NAME ADDRESS NODE WAYPOINT PROTOCOL"
    ]
    assert yaml.safe_load(await ok(capsys, *a, "-o", "yaml")) == await as_json(capsys, *a)
    rc, out, err = await run(capsys, *a, "--address", "web-1")
    assert (rc, out) == (2, "")
    assert err == "ambientctl ztunnel-config workload: --address 'web-1': not an IP address\n"


async def test_service_and_policy_tables(admin: FakeAdmin, capsys: pytest.CaptureFixture[str]) -> None:
    out = await ok(capsys, "zc", "service", "--admin", admin.address)
    assert out.splitlines() == [
        "NAMESPACE SERVICE NAME SERVICE VIP WAYPOINT ENDPOINTS",
        "shop      db           10.96.0.20  None     0/1",  # its only endpoint is unhealthy
        "shop      waypoint     10.96.0.99  None     1/1",
        "shop      web          10.96.0.10  waypoint 1/1",
    ]
    svcs = await as_json(capsys, "zc", "svc", "--admin", admin.address, "--service-namespace", "shop")
    assert [s["name"] for s in svcs] == ["db", "waypoint", "web"]
    assert set(svcs[0]) == {"name", "namespace", "hostname", "addresses", "ports", "waypoint"}
    assert await as_json(capsys, "zc", "svc", "--admin", admin.address, "--service-namespace", "none") == []

    out = await ok(capsys, "zc", "policy", "--admin", admin.address)
    assert out.splitlines() == [
        "NAMESPACE POLICY NAME ACTION         SCOPE",
        "legacy    deny-legacy Deny (dry-run) Namespace",
        "shop      allow-web   Allow          WorkloadSelector",
    ]
    pols = await as_json(capsys, "zc", "pol", "--admin", admin.address, "--policy-namespace", "shop")
    assert [(p["name"], p["action"], p["scope"]) for p in pols] == [
        ("allow-web", "ALLOW", "WORKLOAD_SELECTOR")
    ]


async def test_certificate_table(admin: FakeAdmin, capsys: pytest.CaptureFixture[str]) -> None:
    out = await ok(capsys, "zc", "certificate", "--admin", admin.address)
    rows = [line.split() for line in out.splitlines()]
    assert rows[0] == ["CERTIFICATE", "NAME", "TYPE", "STATUS", "VALID", "CERT", "SERIAL", "NUMBER", "NOT", "AFTER",
                       "NOT", "BEFORE"]  # fmt: skip
    web = "spiffe://cluster.local/ns/shop/sa/web"

    def not_after(d: dt.timedelta) -> str:
        return (NOW + d).strftime("%Y-%m-%dT%H:%M:%SZ")

    assert rows[1:] == [
        [web, "Leaf", "Available", "true", "b2", not_after(dt.timedelta(hours=23)), not_after(-dt.timedelta(hours=1))],
        [web, "Intermediate", "Available", "true", "c3", not_after(dt.timedelta(days=3650)),
         not_after(-dt.timedelta(days=1))],
        [web, "Root", "Available", "true", "a1", not_after(dt.timedelta(days=3650)), not_after(-dt.timedelta(days=1))],
        ["spiffe://cluster.local/ns/shop/sa/new", "NA", "Initializing", "false", "NA", "NA", "NA"],
        ["spiffe://cluster.local/ns/shop/sa/bad", "NA", "Unavailable", "false", "NA", "NA", "NA"],
    ]  # fmt: skip
    # The root the chain ends in is listed once, as Root; the columns are 5 apart (istioctl's).
    assert re.search(r"\n\S+ {5,}Leaf {5,}Available {5,}true {5,}b2 {5,}", out)
    certs = await as_json(capsys, "zc", "certs", "--admin", admin.address)
    assert certs == admin.dump["certificates"]


async def test_an_expired_certificate_is_not_valid(
    admin: FakeAdmin, capsys: pytest.CaptureFixture[str]
) -> None:
    c = admin.dump["certificates"][0]
    c["cert_chain"][0]["not_after"] = iso(-dt.timedelta(minutes=1))
    out = await ok(capsys, "zc", "cert", "--admin", admin.address)
    leaf = next(line.split() for line in out.splitlines() if " Leaf " in line)
    assert leaf[2:4] == ["Available", "false"]


async def test_connections_table_filters_and_json(
    admin: FakeAdmin, capsys: pytest.CaptureFixture[str]
) -> None:
    a = ["zc", "connections", "--admin", admin.address]
    out = await ok(capsys, *a)
    assert out.splitlines() == [
        "WORKLOAD   DIRECTION LOCAL            REMOTE           REMOTE TARGET                  PROTOCOL "
        "PEER IDENTITY                             SENT   RECEIVED AGE",
        "web-1.shop Inbound   web-1.shop:8080  old.legacy:50000 web.shop.svc.cluster.local     TCP      "
        "-                                         10B    0B       3s",
        "web-1.shop Outbound  web-1.shop:40000 db-1.shop:15008  db.shop.svc.cluster.local:5432 HBONE    "
        "spiffe://cluster.local/ns/shop/sa/default 2.0KiB 5.0MiB   1m15s",
    ]
    raw = await ok(capsys, *a, "--raw")
    assert "10.0.1.2:40000" in raw and "10.0.2.3:15008" in raw and "10.96.0.20:5432" in raw
    inbound = await as_json(capsys, *a, "--direction", "inbound")
    assert [c["direction"] for c in inbound] == ["inbound_passthrough"]
    outbound = await as_json(capsys, "zc", "cons", "--admin", admin.address, "--direction", "outbound")
    assert outbound == [admin.dump["connections"][0]]
    assert set(outbound[0]) == {
        "direction", "pod", "src", "original_dst", "actual_dst", "protocol", "src_workload", "src_identity",
        "dst_workload", "dst_identity", "service", "bytes_sent", "bytes_received", "started", "duration_s", "result",
    }  # fmt: skip
    assert await as_json(capsys, *a, "--workload-namespace", "legacy") == []
    rc, _, err = await run(capsys, *a, "--direction", "sideways")
    assert rc == 2 and "argument --direction: invalid choice: 'sideways'" in err


async def test_all_short_and_json(admin: FakeAdmin, capsys: pytest.CaptureFixture[str]) -> None:
    out = await ok(capsys, "zc", "all", "--admin", admin.address, "--with-headers")
    titles = [line for line in out.splitlines() if line.startswith("------")]
    assert titles == [
        f"------ {t} INFO ------" for t in ("WORKLOAD", "SERVICE", "POLICY", "SECRET", "CONNECTIONS")
    ]
    heads = [zc.WORKLOAD_HEADER, zc.SERVICE_HEADER, zc.POLICY_HEADER, zc.CERT_HEADER, zc.CONNECTION_HEADER]
    starts = [
        line.split()[:2]
        for line in out.splitlines()
        if line and line.split()[0] in {h[0].split()[0] for h in heads}
    ]
    assert [x for x in starts if x[1] in ("POD", "SERVICE", "POLICY", "NAME", "DIRECTION")] == [
        ["NAMESPACE", "POD"], ["NAMESPACE", "SERVICE"], ["NAMESPACE", "POLICY"], ["CERTIFICATE", "NAME"],
        ["WORKLOAD", "DIRECTION"],
    ]  # fmt: skip
    plain = await ok(capsys, "zc", "all", "--admin", admin.address)
    assert "------" not in plain and plain.startswith("\nNAMESPACE POD NAME")
    assert await as_json(capsys, "zc", "all", "--admin", admin.address) == admin.dump
    assert yaml.safe_load(await ok(capsys, "zc", "all", "--admin", admin.address, "-o", "yaml")) == admin.dump


async def test_file_instead_of_admin(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "dump.json"
    f.write_text(json.dumps(make_dump()))
    assert [w["name"] for w in await as_json(capsys, "zc", "workload", "-f", str(f))] == [
        "old", "db-1", "waypoint-1", "web-1"
    ]  # fmt: skip
    rc, _, err = await run(capsys, "zc", "workload", "-f", str(tmp_path / "nope.json"))
    assert rc == 2 and f"--file {tmp_path / 'nope.json'}: No such file or directory" in err
    (tmp_path / "bad.json").write_text("{}")
    rc, _, err = await run(capsys, "zc", "workload", "--file", str(tmp_path / "bad.json"))
    assert rc == 2 and "not a ztunnel config_dump (no workloads list)" in err


# --- log ----------------------------------------------------------------------------------------


async def test_log_show_set_reset(admin: FakeAdmin, capsys: pytest.CaptureFixture[str]) -> None:
    a = ["zc", "log", "--admin", admin.address]
    assert (await ok(capsys, *a)).splitlines() == [f"http://{admin.address}:", "current log level is info"]
    assert (await ok(capsys, *a, "--level", "debug")).splitlines()[1] == "current log level is debug"
    assert admin.level == "debug"
    [res] = await as_json(capsys, *a, "--level", "WARN")
    assert res == {"node": None, "admin": f"http://{admin.address}", "level": "warning",
                   "response": "current log level is warning"}  # fmt: skip
    [res] = await as_json(capsys, *a, "-r")
    assert res["level"] == "info" and admin.requests[-1] == {"reset": ""}
    before = len(admin.requests)
    for bad, msg in (
        (
            ["--level", "trace"],
            "--level 'trace': unrecognized logging level (one of debug, info, warning, error)",
        ),
        (["--level", "access:debug"], "--level 'access:debug': ztunnel has one level for all its loggers"),
        (["--level", "debug", "--reset"], "--level cannot be combined with --reset"),
    ):
        rc, out, err = await run(capsys, *a, *bad)
        assert (rc, out) == (2, "") and msg in err, err
    assert len(admin.requests) == before  # nothing was sent


# --- errors -------------------------------------------------------------------------------------


async def test_unreachable_or_wrong_admin(admin: FakeAdmin, capsys: pytest.CaptureFixture[str]) -> None:
    await admin.server.close()
    rc, out, err = await run(capsys, "zc", "workload", "--admin", admin.address)
    assert (rc, out) == (1, "")
    assert err.startswith(
        f"ambientctl ztunnel-config workload: --admin {admin.address}: http://{admin.address}/config_dump: cannot connect"
    )
    other = HttpServer({"/metrics": lambda _: Response(200, b"# nothing\n")}, "stats")
    host, port = await other.start("127.0.0.1", 0)
    try:
        rc, _, err = await run(capsys, "zc", "service", "--admin", f"{host}:{port}")
        assert rc == 1 and "/config_dump: HTTP 404 Not Found: no such page; try /metrics" in err
        other.routes["/config_dump"] = lambda _: Response(200, b"<html>")
        rc, _, err = await run(capsys, "zc", "service", "--admin", f"http://{host}:{port}/")
        assert rc == 1 and "not JSON: is this a ztunnel admin port (15000)?" in err
    finally:
        await other.close()


async def test_bad_flags(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = await run(capsys, "zc", "workload", "--admin", "127.0.0.1:1", "--node", "node-a")
    assert rc == 2 and "give at most one of --admin, --node, --file (got --admin and --node)" in err
    rc, _, err = await run(capsys, "zc", "workload", "-o", "xml")
    assert rc == 2 and "argument -o/--output: invalid choice: 'xml'" in err
    rc, _, err = await run(capsys, "zc")
    assert rc == 2 and "SUBCOMMAND" in err


def test_table_layout() -> None:
    assert zc.table(("A", "BB", "C"), [("xxx", "y", "z"), ("", "", "")]) == [
        "A   BB C",
        "xxx y  z",
        "       ",
    ]
    assert zc.table(("A", "B"), [], padding=5) == ["A     B"]
    assert zc.human_bytes(1023) == "1023B" and zc.human_bytes(1536) == "1.5KiB"
    assert (
        zc.human_duration(59.9) == "59s"
        and zc.human_duration(3725) == "1h2m"
        and zc.human_duration(90000) == "1d1h"
    )


# --- the running local mesh ---------------------------------------------------------------------


class FakeRun:
    """A local-mesh run directory whose "ztunnel" processes are live stand-ins carrying the
    command line a real one has (``--node-name``, ``--admin-port``, ``--readiness-port``)."""

    def __init__(self, root: Path) -> None:
        self.state = RunState.create(root)
        self.procs: list[subprocess.Popen[bytes]] = []

    def add(self, name: str, *args: str) -> None:
        p = subprocess.Popen(
            [sys.executable, "-c", "import sys; sys.stdin.read()", *args], stdin=subprocess.PIPE
        )
        self.procs.append(p)
        self.state.add_proc(name, p.pid)

    def add_ztunnel(self, node: str, admin: str, readiness: str | None = None) -> None:
        port = admin.rsplit(":", 1)[1]
        more = ["--readiness-port", readiness.rsplit(":", 1)[1]] if readiness else []
        self.add(f"ztunnel-{node}", "--node-name", node, "--admin-port", port, *more)

    def stop(self) -> None:
        for p in self.procs:
            assert p.stdin is not None
            p.stdin.close()
            p.wait(timeout=30)
        self.procs.clear()


@pytest.fixture
def runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[FakeRun]]:
    root = tmp_path / "runs"
    monkeypatch.setattr(zc, "RUNS_ROOT", root)  # read when the parser is built
    made: list[FakeRun] = []
    try:
        yield made
    finally:
        for r in made:
            r.stop()


async def test_local_mesh_found_without_flags(
    runs: list[FakeRun], admin: FakeAdmin, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = zc.RUNS_ROOT  # type: ignore[attr-defined]
    rc, _, err = await run(capsys, "zc", "workload")
    assert rc == 2
    assert (
        f"no local mesh is running under {root} (start one with `ambientctl mesh up -f FILE` or `ambientctl demo --keep`), "
        "or give --admin ADDR"
        in err
    )

    b = FakeAdmin(make_dump("node-b"))
    await b.start()
    try:
        r = FakeRun(root)
        runs.append(r)
        r.add_ztunnel("node-a", admin.address)
        r.add_ztunnel("node-b", b.address)
        # Workloads: any node's ztunnel (every node holds the same), no flag needed.
        assert [w["name"] for w in await as_json(capsys, "zc", "workload")][-1] == "web-1"
        # Certificates differ per node: say which.
        rc, _, err = await run(capsys, "zc", "certificate")
        assert rc == 2
        assert (
            f"each node's ztunnel has its own certificates; give --node NAME (local mesh {r.state.run_id}: "
            "node-a, node-b) or --admin ADDR"
        ) in err
        b.dump["certificates"] = []
        assert await as_json(capsys, "zc", "certificate", "--node", "node-b") == []
        assert await as_json(capsys, "zc", "--node", "node-a", "certificate") == admin.dump["certificates"]
        rc, _, err = await run(capsys, "zc", "connections", "--node", "node-c")
        assert rc == 2
        assert f"--node node-c: no such node in local mesh {r.state.run_id} (nodes: node-a, node-b)" in err
        # log without --node: every node's ztunnel.
        out = await ok(capsys, "zc", "log", "--level", "error")
        assert out.splitlines() == [
            "node-a:",
            "current log level is error",
            "node-b:",
            "current log level is error",
        ]
        assert admin.level == b.level == "error"

        # A second run: the user must pick one.
        r2 = FakeRun(root)
        runs.append(r2)
        r2.add_ztunnel("node-x", b.address)
        rc, _, err = await run(capsys, "zc", "workload")
        assert rc == 2 and "2 local meshes are running; pick one with --run ID:" in err
        assert r.state.run_id in err and r2.state.run_id in err and "nodes: node-a, node-b" in err
        assert await as_json(capsys, "zc", "workload", "--run", r2.state.run_id, "--node", "node-x")
        rc, _, err = await run(capsys, "zc", "workload", "--run", "zzzz")
        assert rc == 2 and "--run zzzz: no such local mesh" in err

        # A node whose ztunnel process is gone: said so, without trying a port.
        r2.stop()
        node_b = r.procs[1]
        assert node_b.stdin is not None
        node_b.stdin.close()
        node_b.wait(timeout=30)
        rc, out, err = await run(capsys, "zc", "workload", "--node", "node-b")
        assert (rc, out) == (1, "")
        assert err == (
            f"ambientctl ztunnel-config workload: --node node-b: its ztunnel process (pid {node_b.pid}) "
            "is not running\n"
        )
        # A run whose processes are all gone is not "running".
        r.stop()
        rc, _, err = await run(capsys, "zc", "workload")
        assert rc == 2 and "no process left (ambientctl demo down removes it)" in err
    finally:
        await b.server.close()


def test_local_mesh_record(tmp_path: Path) -> None:
    """``info`` in state.json, when a run records its ztunnels there, wins over command lines."""
    st = RunState.create(tmp_path)
    (st.path / "controlplane.ready").write_text("127.0.0.1:15012\n")
    (st.path / "mesh.yaml").write_text("")
    st.info = {"ztunnels": {"node-z": {"admin": 41000, "readiness": "127.0.0.1:41001"}}}
    st.save()
    [m] = zc.local_meshes(tmp_path)
    assert m.ztunnels == {"node-z": zc.ZtunnelRef("127.0.0.1:41000", "node-z", "127.0.0.1:41001")}
    assert (m.controlplane, m.config, m.running) == ("127.0.0.1:15012", st.path / "mesh.yaml", False)
    assert m.ztunnels["node-z"].origin == "--node node-z (ztunnel admin http://127.0.0.1:41000)"
