"""``ambientctl check``: the checks as a pure function of the facts, then the command against fake
ztunnel admin ports (tests/test_cli_ztunnel_config.py), a listening "control plane" and a
local-mode YAML — table, JSON shape, colours, exit status 0 / 1 / 2 — and on a local-mesh run
directory found without flags. tests/ztunnel/test_admin_netns.py runs it on real ztunnels.
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import json
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ambientctl import check as ck
from ambientctl import ztunnel_config as zc
from tests.test_cli_ztunnel_config import NOW, FakeAdmin, FakeRun, iso, make_dump, run

MESH = """\
apiVersion: v1
kind: Node
metadata: {name: node-a}
---
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec: {nodeName: node-a, serviceAccountName: web}
status: {podIP: 10.0.1.2}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-shop, namespace: shop}
spec:
  action: ALLOW
  rules:
  - from: [{source: {namespaces: ["shop"]}}]
"""

L7 = """\
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-get-only, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules:
  - to: [{operation: {methods: ["GET"]}}]
"""


def healthy_dump() -> dict[str, Any]:
    """node-a serving web-1 with one good certificate."""
    d = make_dump()
    d["certificates"] = d["certificates"][:1]
    return d


def facts(*dumps: dict[str, Any], **kw: Any) -> ck.Facts:
    f = ck.Facts(origin="test", now=NOW, **kw)
    for i, d in enumerate(dumps):
        f.ztunnels.append(ck.ZtunnelFacts(zc.ZtunnelRef(f"127.0.0.1:{1000 + i}", str(d["node"])), dump=d))
    return f


def by(findings: list[ck.Finding], check: str) -> list[tuple[str, str, str]]:
    return [(f.target, f.status.value, f.detail) for f in findings if f.check == check]


# --- the checks, pure -------------------------------------------------------------------------


def test_a_healthy_node() -> None:
    out = ck.evaluate(facts(healthy_dump(), controlplane="127.0.0.1:15012"))
    assert [(f.check, f.status) for f in out] == [
        ("control plane", ck.Status.OK),
        ("ztunnel", ck.Status.OK),
        ("certificate", ck.Status.OK),
        ("enrollment", ck.Status.OK),
        ("policy", ck.Status.SKIP),
    ]
    assert by(out, "control plane") == [
        ("127.0.0.1:15012", "OK", "reachable; 1/1 ztunnels hold discovery state")
    ]
    assert by(out, "ztunnel") == [
        ("node-a (http://127.0.0.1:1000)", "OK", "ready; 1 pods, state version 4, 2 open connections")
    ]
    [(target, _, detail)] = by(out, "certificate")
    assert target == "spiffe://cluster.local/ns/shop/sa/web (node-a)"
    end = (NOW + dt.timedelta(hours=23)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert detail == f"valid, expires {end} (in 23h00m), serial b2"
    assert by(out, "enrollment") == [("node-a", "OK", "1 enrolled pods, all served")]


def test_certificates_pending_failing_expired_and_overdue() -> None:
    d = make_dump()
    d["certificates"].append(
        {"identity": "spiffe://cluster.local/ns/shop/sa/old", "state": "available", "serial": "d4",
         "not_before": iso(-dt.timedelta(hours=24)), "not_after": iso(-dt.timedelta(minutes=5))}
    )  # fmt: skip
    d["certificates"].append(
        {"identity": "spiffe://cluster.local/ns/shop/sa/late", "state": "available", "serial": "e5",
         "not_before": iso(-dt.timedelta(hours=20)), "not_after": iso(dt.timedelta(hours=4))}
    )  # fmt: skip
    out = by(ck.evaluate(facts(d)), "certificate")
    status = {t.split(" ")[0].rsplit("/", 1)[1]: (s, detail) for t, s, detail in out}
    assert status["web"][0] == "OK"
    assert status["new"] == ("FAIL", "not issued: waiting for the CA's first answer")
    assert status["bad"] == ("FAIL", "not issued: CA refused: no pod with that identity on node-a")
    assert status["old"][0] == "FAIL" and status["old"][1].startswith("expired 5m00s ago (")
    assert status["late"][0] == "WARN" and status["late"][1].endswith("past half-life, not renewed")


def test_a_ztunnel_not_ready_or_not_readable() -> None:
    d = make_dump()
    d.update(ready=False, version=0)
    f = facts(d)
    f.ztunnels.append(
        ck.ZtunnelFacts(zc.ZtunnelRef("127.0.0.1:9", "node-b"), error="cannot connect: refused")
    )
    f.ztunnels.append(
        ck.ZtunnelFacts(
            zc.ZtunnelRef("127.0.0.1:8", "node-c", pid=42, running=False),
            error="its process (pid 42) is not running",
        )
    )
    out = by(ck.evaluate(f), "ztunnel")
    assert out[0][1] == "FAIL" and out[0][2].startswith(
        "not ready: no discovery state yet; certificates pending: spiffe://cluster.local/ns/shop/sa/new, "
        "spiffe://cluster.local/ns/shop/sa/bad"
    )
    assert out[1] == ("node-b (http://127.0.0.1:9)", "FAIL", "admin not readable: cannot connect: refused")
    assert out[2][2] == "admin not readable: its process (pid 42) is not running"
    # /healthz/ready disagreeing with the dump is not ready either.
    g = facts(healthy_dump())
    g.ztunnels[0].readiness = 503
    assert by(ck.evaluate(g), "ztunnel")[0][2].startswith("not ready: /healthz/ready answers 503")


def test_control_plane_states() -> None:
    d = healthy_dump()
    assert by(ck.evaluate(facts(d)), "control plane")[0][1] == "OK"  # address unknown, every node has state
    assert by(ck.evaluate(facts()), "control plane")[0][1] == "SKIP"
    cp = by(
        ck.evaluate(facts(d, controlplane="127.0.0.1:1", controlplane_error="Connection refused")),
        "control plane",
    )
    assert cp == [
        ("127.0.0.1:1", "FAIL", "unreachable: Connection refused; 1/1 ztunnels hold discovery state")
    ]
    down = by(ck.evaluate(facts(d, controlplane="127.0.0.1:1", controlplane_running=False)), "control plane")
    assert down[0][1:] == ("FAIL", "its process is not running; 1/1 ztunnels hold discovery state")
    stale = copy.deepcopy(d)
    stale["version"] = 0
    assert by(ck.evaluate(facts(stale, controlplane="127.0.0.1:1")), "control plane")[0][1] == "FAIL"


def test_enrolled_but_not_served_and_other_enrollment_findings() -> None:
    d = healthy_dump()
    d["workloads"].append(
        {**d["workloads"][0], "uid": "shop-web-2", "name": "web-2", "addresses": ["10.0.1.3"]}
    )
    [(node, status, detail)] = by(ck.evaluate(facts(d)), "enrollment")
    assert (node, status) == ("node-a", "FAIL")
    assert detail.startswith("enrolled but not served by this node's ztunnel: shop/web-2 (10.0.1.3)")
    e = healthy_dump()
    e["pods"][0].update(workload_known=False, missing_authorizations=["shop/gone"])
    [(_, status, detail)] = by(ck.evaluate(facts(e)), "enrollment")
    assert status == "WARN"
    assert detail == (
        "1 enrolled pods, all served; served but not in discovery yet: shop/web-1; "
        "pods list policies this node does not hold: shop/gone"
    )
    # A node the config has enrolled pods on, with no ztunnel checked.
    out = ck.evaluate(facts(healthy_dump(), expected_nodes=["node-a", "node-b"]))
    assert ("node-b", "FAIL", "the config has enrolled pods on it, but no ztunnel was checked") in by(
        out, "ztunnel"
    )


def test_policy_findings() -> None:
    f = facts(healthy_dump(), config="mesh.yaml", policy_count=2, policy_warnings={"shop/x": ("a", "b")})
    assert by(ck.evaluate(f), "policy") == [("shop/x", "WARN", "a; b")]
    f = facts(healthy_dump(), config="mesh.yaml", policy_count=2)
    assert by(ck.evaluate(f), "policy") == [("mesh.yaml", "OK", "2 AuthorizationPolicies, no field ignored")]
    f = facts(healthy_dump(), config="mesh.yaml", config_error="mesh.yaml: document 3: bad")
    assert by(ck.evaluate(f), "policy") == [("mesh.yaml", "FAIL", "cannot read: mesh.yaml: document 3: bad")]


def test_report_json_and_render() -> None:
    r = ck.Report("test", tuple(ck.evaluate(facts(healthy_dump()))))
    j = r.to_json()
    assert set(j) == {"mesh", "status", "checks", "summary"}
    assert j["status"] == "ok" and j["summary"] == {"ok": 4, "warn": 0, "fail": 0, "skip": 1}
    assert set(j["checks"][0]) == {"check", "target", "status", "detail"}
    lines = r.render(color=True)
    assert lines[0] == "mesh: test"
    assert lines[1].split() == ["CHECK", "TARGET", "STATUS", "DETAIL"]
    assert "\x1b[32mOK\x1b[0m" in lines[2] and "\x1b[2mSKIP\x1b[0m" in lines[-2]
    assert lines[-1] == "healthy: 4 ok, 0 warnings, 0 failed, 1 skipped"
    plain = r.render(color=False)
    assert "\x1b" not in "".join(plain)
    # STATUS starts in the same column on every row.
    col = plain[1].index("STATUS")
    assert all(line[col:].split()[0] in ("OK", "SKIP") for line in plain[2:-1])


# --- the command ------------------------------------------------------------------------------


@pytest.fixture
async def nodes() -> AsyncIterator[tuple[FakeAdmin, FakeAdmin, str]]:
    """Two ztunnel admin ports (node-a serves web-1; node-b serves db-1) and a listening port
    standing in for the control plane."""
    a = FakeAdmin(healthy_dump())
    b_dump = make_dump("node-b")
    b_dump["certificates"] = []
    b_dump["pods"] = [{"uid": "shop-db-1", "name": "db-1", "namespace": "shop", "workload_known": True}]
    b = FakeAdmin(b_dump)
    await a.start()
    await b.start()
    cp = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    host, port = cp.sockets[0].getsockname()[:2]
    try:
        yield a, b, f"{host}:{port}"
    finally:
        cp.close()
        await cp.wait_closed()
        await a.server.close()
        await b.server.close()


def write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "mesh.yaml"
    p.write_text(textwrap.dedent(text))
    return str(p)


async def test_check_healthy_then_red(
    nodes: tuple[FakeAdmin, FakeAdmin, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b, cp = nodes
    argv = [
        "check",
        "--admin",
        a.address,
        "--admin",
        b.address,
        "--controlplane",
        cp,
        "--config",
        write(tmp_path, MESH),
    ]
    rc, out, err = await run(capsys, *argv, "-o", "json")
    assert rc == 0, out + err
    report = json.loads(out)
    assert report["status"] == "ok" and report["summary"] == {"ok": 7, "warn": 0, "fail": 0, "skip": 0}
    assert [c["check"] for c in report["checks"]] == [
        "control plane", "ztunnel", "ztunnel", "certificate", "enrollment", "enrollment", "policy"
    ]  # fmt: skip
    assert report["checks"][-1]["detail"] == "1 AuthorizationPolicies, no field ignored"

    rc, out, _ = await run(capsys, *argv, "--color", "never")
    assert rc == 0
    lines = out.splitlines()
    assert lines[0] == f"mesh: --admin {a.address}, --admin {b.address}"
    assert lines[1].split() == ["CHECK", "TARGET", "STATUS", "DETAIL"]
    assert lines[2].split()[:3] == ["CONTROL", "PLANE", cp]
    assert lines[-1] == "healthy: 7 ok, 0 warnings, 0 failed"

    # A policy with L7 fields: a warning naming it, still exit 0.
    argv[-1] = write(tmp_path, MESH + L7)
    rc, out, _ = await run(capsys, *argv, "-o", "json")
    assert rc == 0
    [warn] = [c for c in json.loads(out)["checks"] if c["status"] == "WARN"]
    assert warn["check"] == "policy" and warn["target"] == "shop/web-get-only"
    assert "to[0].operation.methods" in warn["detail"] and "attach the policy to a waypoint" in warn["detail"]

    # node-b stops serving db-1: red, exit 1.
    b.dump["pods"] = []
    rc, out, _ = await run(capsys, *argv, "--color", "always")
    assert rc == 1
    assert (
        "\x1b[31mFAIL\x1b[0m" in out
        and "enrolled but not served by this node's ztunnel: shop/db-1 (10.0.2.3)" in out
    )
    assert out.splitlines()[-1] == "FAILED: 5 ok, 1 warnings, 1 failed"


async def test_check_unreachable_parts_are_red_not_errors(
    nodes: tuple[FakeAdmin, FakeAdmin, str], capsys: pytest.CaptureFixture[str]
) -> None:
    a, b, _ = nodes
    await b.server.close()
    rc, out, _ = await run(
        capsys, "check", "--admin", a.address, "--admin", b.address, "--controlplane", b.address, "-o", "json"
    )
    assert rc == 1
    checks = json.loads(out)["checks"]
    cp = checks[0]
    assert (cp["status"], cp["target"]) == ("FAIL", b.address) and cp["detail"].startswith("unreachable: ")
    [zt] = [c for c in checks if c["check"] == "ztunnel" and c["status"] == "FAIL"]
    assert zt["target"] == f"http://{b.address}" and "cannot connect" in zt["detail"]


async def test_check_bad_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(ck, "RUNS_ROOT", tmp_path / "none")
    rc, out, err = await run(capsys, "check")
    assert (rc, out) == (2, "")
    assert err.startswith(f"ambientctl check: no local mesh is running under {tmp_path / 'none'}")
    rc, _, err = await run(capsys, "check", "--admin", "127.0.0.1:1", "--config", str(tmp_path / "nope.yaml"))
    assert rc == 2 and f"--config {tmp_path / 'nope.yaml'}: no such file" in err
    rc, _, err = await run(capsys, "check", "-o", "yaml")
    assert rc == 2 and "argument -o/--output: invalid choice: 'yaml'" in err
    # A config that does not parse is a red row, not bad input: the mesh reads the same file.
    bad = write(tmp_path, "apiVersion: v1\nkind: Pod\nmetadata: {name: x}\nspec: 3\n")
    rc, out, _ = await run(capsys, "check", "--admin", "127.0.0.1:1", "--config", bad, "-o", "json")
    assert rc == 1
    assert [c["status"] for c in json.loads(out)["checks"] if c["check"] == "policy"] == ["FAIL"]


async def test_check_the_local_mesh_without_flags(
    nodes: tuple[FakeAdmin, FakeAdmin, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    a, b, cp = nodes
    root = tmp_path / "runs"
    monkeypatch.setattr(ck, "RUNS_ROOT", root)
    r = FakeRun(root)
    try:
        (r.state.path / "controlplane.ready").write_text(cp + "\n")
        (r.state.path / "mesh.yaml").write_text(MESH)
        r.add("controlplane", "--local-config", str(r.state.path / "mesh.yaml"))
        r.add_ztunnel("node-a", a.address)
        r.add_ztunnel("node-b", b.address)
        rc, out, err = await run(capsys, "check", "-o", "json")
        assert rc == 0, out + err
        report = json.loads(out)
        assert report["mesh"] == f"local mesh {r.state.run_id} ({r.state.path})"
        assert report["checks"][0]["target"] == cp
        assert [c["target"].split(" ")[0] for c in report["checks"] if c["check"] == "ztunnel"] == [
            "node-a",
            "node-b",
        ]
        assert report["checks"][-1]["target"] == str(r.state.path / "mesh.yaml")
        # node-b's ztunnel process dies: red, without asking its port.
        node_b = r.procs[-1]
        assert node_b.stdin is not None
        node_b.stdin.close()
        node_b.wait(timeout=30)
        rc, out, _ = await run(capsys, "check", "-o", "json")
        assert rc == 1
        [dead] = [c for c in json.loads(out)["checks"] if c["status"] == "FAIL"]
        assert dead["target"].startswith("node-b") and f"pid {node_b.pid}) is not running" in dead["detail"]
    finally:
        r.stop()
