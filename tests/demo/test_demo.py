"""``ambientctl demo`` end to end: the real processes in network namespaces, then nothing left."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from ambientctl import demo

REPO = Path(__file__).resolve().parents[2]
TOOLS = ("ip", "nft", "tcpdump", "nsenter")

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in TOOLS),
    reason="needs root, ip, nft, tcpdump, nsenter",
)


def run_ctl(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ambientctl.main", "demo", *args],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO,
    )  # fmt: skip


def sh(*args: str) -> str:
    return subprocess.run(args, capture_output=True, text=True, timeout=30).stdout


def host_state() -> dict[str, list[str]]:
    """What the demo must not leave in the root netns."""
    return {
        "links": sorted(
            line.split(":")[1].strip().split("@")[0] for line in sh("ip", "-o", "link").splitlines()
        ),
        "rules": sorted(sh("ip", "rule").splitlines()),
        "nft": sorted(sh("nft", "list", "tables").splitlines()),
    }


@pytest.fixture
def run_root(tmp_path: Path) -> Iterator[dict[str, str]]:
    env = dict(os.environ, AMBIENT_DEMO_RUN_ROOT=str(tmp_path / "runs"))
    yield env
    run_ctl("down", env=env)  # a failed test must not leave a mesh running


def run_id(out: str) -> str:
    m = re.search(r"\(run ([0-9a-f]+)\)", out)
    assert m, out
    return m.group(1)


def assert_nothing_left(rid: str, env: dict[str, str], before: dict[str, list[str]]) -> None:
    assert not [n for n in sh("ip", "netns", "list").splitlines() if n.startswith(f"ambd-{rid}-")]
    procs = sh("ps", "-eo", "args")
    assert env["AMBIENT_DEMO_RUN_ROOT"] not in procs
    assert f"ambd-{rid}-" not in procs
    assert not (Path(env["AMBIENT_DEMO_RUN_ROOT"]) / rid).exists()
    assert host_state() == before


@pytest.mark.netns
@pytest.mark.slow
@needs_root
def test_demo_end_to_end_leaves_nothing(run_root: dict[str, str]) -> None:
    before = host_state()
    p = run_ctl(env=run_root)
    out = p.stdout
    assert p.returncode == 0, out + p.stderr
    for step in range(1, 10):
        assert f"[{step}/9]" in out
    for sa in ("frontend", "web", "cart"):
        assert f"spiffe://cluster.local/ns/shop/sa/{sa}" in out
    assert "shop (enrolled):       TLS only (HBONE on :15008), marker never visible" in out
    assert "legacy (not enrolled): plaintext, marker visible on the wire" in out
    assert_policy_act(out)
    assert_waypoint_act(out)
    assert "Acts: traffic act ok; policy act ok; waypoint act ok" in out
    assert "RESULT: every expected result holds." in out
    assert_nothing_left(run_id(out), run_root, before)


STRICT_KEY = "istio-system/istio_converted_static_strict"


def assert_policy_act(out: str) -> None:
    """The policy act's outcomes, as printed (each line marked ok only if it was checked)."""
    act = out.split("Policy act:", 1)[1].split("Waypoint act:", 1)[0]
    assert "[FAILED]" not in act, act
    for step in range(1, 5):
        assert f"[policy {step}/4]" in act
    # 1. mtls-report names what STRICT would break.
    assert "| Still receiving plaintext — STRICT would refuse these connections:\n      |   shop/web" in act
    assert "plaintext     1 connection  from legacy/old" in act
    assert "=> shop/web accepts plaintext from legacy/old: STRICT would refuse it  [ok]" in act
    # 2. STRICT: legacy's plaintext refused, the converted policy named in web's log and counted.
    a = act.split("[policy 2/4]", 1)[1].split("[policy 3/4]", 1)[0]
    assert f"node-b's ztunnel applies {STRICT_KEY} to shop/web" in a
    assert re.search(r"legacy/old -> http://10\.0\.2\.2:8080/order: refused \(.*\)  \[ok\]", a), a
    assert "inbound_passthrough from 10.0.1.3:" in a
    assert f"result error: 'denied by DENY policy {STRICT_KEY} rule 0'  [ok]" in a
    assert 'connection_security_policy="none",response_flags="DENY"} 1  [ok]' in a
    assert "shop/frontend -> http://10.0.2.2:8080/order: HTTP 200 'hello from shop/web" in a
    # 3. ALLOW only frontend: frontend works, cart refused with the policy named.
    b = act.split("[policy 3/4]", 1)[1].split("[policy 4/4]", 1)[0]
    assert "shop/frontend -> http://10.96.0.20:80/order: HTTP 200 'hello from shop/web" in b
    assert re.search(r"shop/cart -> http://10\.96\.0\.20:80/order: refused \(.*\)  \[ok\]", b), b
    assert "inbound from spiffe://cluster.local/ns/shop/sa/cart, result error: " in b
    assert "'no ALLOW policy matched (shop/web-allow-frontend)'  [ok]" in b
    assert "outbound, result error: 'destination refused with 401'" in b
    # 4. DENY closes the open frontend -> web connection, the policy named.
    c = act.split("[policy 4/4]", 1)[1]
    assert re.search(
        r"open from 10\.0\.1\.2:\d+, web sends a line every 0\.2 s \(\d+ received so far\)  \[ok\]", c
    ), c
    m = re.search(r"the open connection was closed (\d+\.\d) s after the edit", c)
    assert m and float(m.group(1)) < 10, c
    assert (
        '"connection closed by policy" 10.0.1.2 -> 10.0.2.2:8080, policy shop/web-deny-frontend rule 0  [ok]'
        in c
    )
    assert "result error: 'closed by policy: denied by DENY policy shop/web-deny-frontend rule 0'  [ok]" in c
    assert re.search(r"shop/frontend -> http://10\.0\.2\.2:8080/order: refused \(.*\)  \[ok\]", c), c


FRONTEND_ID = "spiffe://cluster.local/ns/shop/sa/frontend"
WAYPOINT_ID = "spiffe://cluster.local/ns/shop/sa/waypoint"


def assert_waypoint_act(out: str) -> None:
    """The waypoint act's outcomes, as printed."""
    act = out.split("Waypoint act:", 1)[1].split("\nActs:", 1)[0]
    assert "[FAILED]" not in act, act
    for step in range(1, 5):
        assert f"[waypoint {step}/4]" in act
    # 1. The policy act's L4 leftovers are adjusted, and said so.
    a = act.split("[waypoint 1/4]", 1)[1].split("[waypoint 2/4]", 1)[0]
    assert "shop/web-deny-frontend deleted from mesh.yaml" in a
    assert '["cluster.local/ns/shop/sa/frontend", "cluster.local/ns/shop/sa/waypoint"]' in a
    assert "no longer shop/web-deny-frontend" in a
    # 2. The supervisor runs the Gateway's waypoint on node-b, at the top of its pod CIDR.
    b = act.split("[waypoint 2/4]", 1)[1].split("[waypoint 3/4]", 1)[0]
    assert "| kind: Gateway" in b and "|   gatewayClassName: istio-waypoint" in b
    assert "labels: {istio.io/use-waypoint: waypoint}" in b
    assert re.search(
        r"waypoint supervisor: shop/waypoint ready on node-b 10\.0\.2\.254 \(netns ambd-[0-9a-f]+-wp-shop-waypoint-0",
        b,
    ), b
    assert "supervisor log: 'waypoint shop/waypoint: started on node-b 10.0.2.254, ready'" in b
    assert f"the waypoint's config_dump: identity {WAYPOINT_ID}, knows service shop/web" in b
    assert "service shop/web has waypoint waypoint.shop.svc.cluster.local (HBONE :15008)  [ok]" in b
    # 3. The L7 policy reaches the waypoint.
    c = act.split("[waypoint 3/4]", 1)[1].split("[waypoint 4/4]", 1)[0]
    assert '|   targetRefs: [{kind: Service, group: "", name: web}]' in c
    assert "the waypoint applies shop/web-deny-post-admin" in c
    # 4. GET passes, POST /admin is refused by the waypoint, with identities and the metric.
    d = act.split("[waypoint 4/4]", 1)[1]
    assert "shop/frontend -> GET http://10.96.0.20:80/order: HTTP 200 'hello from shop/web" in d
    assert "shop/frontend -> POST http://10.96.0.20:80/order: HTTP 200 'hello from shop/web" in d
    assert "shop/frontend -> POST http://10.96.0.20:80/admin: HTTP 403 'RBAC: access denied'  [ok]" in d
    assert re.search(
        rf"\| POST /admin 403 src={FRONTEND_ID} dst_service=web\.shop\.svc\.cluster\.local .* "
        r"policy=shop/web-deny-post-admin reason='denied by DENY policy shop/web-deny-post-admin rule 0'",
        d,
    ), d
    assert f"| GET /order 200 src={FRONTEND_ID} dst_service=web.shop.svc.cluster.local" in d
    assert f"decided at the waypoint ({WAYPOINT_ID})  [ok]" in d
    assert "forwarded to spiffe://cluster.local/ns/shop/sa/web  [ok]" in d
    assert (
        f"web's ztunnel (node-b) access log: inbound from {WAYPOINT_ID} to spiffe://cluster.local/ns/shop/sa/web"
        in d
    )
    assert (
        f'istio_requests_total{{reporter="waypoint",source_principal="{FRONTEND_ID}",'
        'destination_service="web.shop.svc.cluster.local",response_code="403",response_flags="RBAC"} 1  [ok]'
    ) in d


@pytest.mark.netns
@pytest.mark.slow
@needs_root
def test_keep_then_down(run_root: dict[str, str]) -> None:
    before = host_state()
    p = run_ctl("--keep", env=run_root)
    assert p.returncode == 0, p.stdout + p.stderr
    rid = run_id(p.stdout)
    assert "ambientctl demo down" in p.stdout
    assert f"ip netns exec ambd-{rid}-shop-frontend" in p.stdout
    m = re.search(r"node-a ztunnel config:\s+curl -s (http://127.0.0.1:\d+/config_dump)", p.stdout)
    assert m, p.stdout
    # Still running: its netns exist and ztunnel answers.
    assert f"ambd-{rid}-shop-web" in sh("ip", "netns", "list")
    with urllib.request.urlopen(m.group(1), timeout=5) as r:
        assert b"spiffe://cluster.local/ns/shop/sa/frontend" in r.read()
    # What the acts added stays applied, and mtls-report works on the kept mesh.
    assert (
        "objects added:          shop/default, shop/web-allow-frontend, shop/waypoint, shop/web-deny-post-admin"
        in p.stdout
    )
    yaml_text = (Path(run_root["AMBIENT_DEMO_RUN_ROOT"]) / rid / "mesh.yaml").read_text()
    assert "kind: PeerAuthentication" in yaml_text and "name: web-deny-post-admin" in yaml_text
    assert "kind: Gateway" in yaml_text and "name: web-deny-frontend" not in yaml_text
    # The waypoint keeps running too, in its own netns, and answers.
    assert (
        f"waypoint shop/waypoint: ready on node-b 10.0.2.254 (netns ambd-{rid}-wp-shop-waypoint-0)"
        in p.stdout
    )
    assert f"ambd-{rid}-wp-shop-waypoint-0" in sh("ip", "netns", "list")
    m = re.search(r"    config:\s+curl -s (http://127.0.0.1:\d+/config_dump)", p.stdout)
    assert m, p.stdout
    with urllib.request.urlopen(m.group(1), timeout=5) as r:
        wp = json.loads(r.read())
    assert wp["identity"] == WAYPOINT_ID and [x["name"] for x in wp["policies"]] == ["web-deny-post-admin"]
    m = re.search(r"node-b ztunnel config:\s+curl -s (http://127.0.0.1:\d+/config_dump)", p.stdout)
    assert m, p.stdout
    with urllib.request.urlopen(m.group(1), timeout=5) as r:
        dump = json.loads(r.read())
    web = next(x for x in dump["pods"] if x["name"] == "web")
    assert {STRICT_KEY, "shop/web-allow-frontend"} <= set(web["authorizations"])
    assert "shop/web-deny-frontend" not in web["authorizations"]
    m = re.search(r"mTLS report:\s+ambientctl (policy mtls-report .*)", p.stdout)
    assert m, p.stdout
    r = subprocess.run(
        [sys.executable, "-m", "ambientctl", *m.group(1).split()],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "  shop/web  (node node-b, STRICT)" in r.stdout, r.stdout
    assert "refused       1 connection  plaintext from legacy/old" in r.stdout, r.stdout
    d = run_ctl("down", env=run_root)
    assert d.returncode == 0, d.stdout + d.stderr
    assert f"removing local mesh {rid}" in d.stdout
    assert_nothing_left(rid, run_root, before)


@pytest.mark.netns
@pytest.mark.slow
@needs_root
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_while_building_leaves_nothing(run_root: dict[str, str], sig: signal.Signals) -> None:
    before = host_state()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ambientctl.main", "demo"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=run_root, cwd=REPO,
    )  # fmt: skip
    assert proc.stdout is not None
    lines = []
    try:
        for line in proc.stdout:  # blocks until the demo prints: its progress is the signal to act on
            lines.append(line)
            if line.startswith("[5/9]"):  # processes up, netns made, pods being enrolled
                proc.send_signal(sig)
                break
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = "".join(lines) + rest
    assert proc.returncode == 130, out
    assert "interrupted" in out and "torn down: nothing left behind" in out
    assert_nothing_left(run_id(out), run_root, before)


def test_missing_tool_exits_2(tmp_path: Path) -> None:
    env = dict(os.environ, PATH=str(tmp_path), AMBIENT_DEMO_RUN_ROOT=str(tmp_path / "runs"))
    p = run_ctl(env=env, timeout=30)
    assert p.returncode == 2
    assert "missing tool(s): ip, nft, tcpdump, nsenter" in p.stderr
    assert not (tmp_path / "runs").exists()


def test_not_root_exits_2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda tool: f"/usr/sbin/{tool}")  # the modules demo uses
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    problem = demo.preflight()
    assert problem is not None and "run it as root" in problem
