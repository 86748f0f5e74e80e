"""``ambientctl policy check``: one connection decided as the destination's ztunnel decides it.

In layers: the argument parsing; the command in-process on local-mode files (verdicts, the
deciding policy and rule, the warnings, every kind of bad input with the message a user sees);
once as a separate process; and against a running ztunnel (``--admin``) fed by the real
discovery server from the same file, where both modes must give the same answers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from ambientctl import policy as pc
from ambientctl.main import main
from mesh import log as meshlog
from mesh import zds
from mesh.identity import Identity
from mesh.model import MeshObject
from mesh.netns import HostSocketFactory, SocketFactory
from mesh.xds.dump import authorization_from_json, service_from_json, workload_from_json
from sources.local import assume_local_redirection, parse_manifest
from tests.discovery import Discovery
from tests.netns.agent import FakeAgent
from tests.ztunnel.fakes import FakeCa
from ztunnel.app import Addresses, Ztunnel
from ztunnel.inpod import Ports

REPO = Path(__file__).resolve().parents[1]
UI = "cluster.local/ns/frontend/sa/ui"
LEGACY_IP = "10.0.9.9"

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
kind: Namespace
metadata: {name: frontend, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, uid: shop-web-1, labels: {app: web}}
spec: {nodeName: node-a, serviceAccountName: web}
status: {podIP: 10.0.1.2}
---
apiVersion: v1
kind: Pod
metadata: {name: db-1, namespace: shop, uid: shop-db-1, labels: {app: db}}
spec: {nodeName: node-a, serviceAccountName: db}
status: {podIP: 10.0.1.4}
---
apiVersion: v1
kind: Pod
metadata: {name: ui, namespace: frontend, uid: frontend-ui, labels: {app: ui}}
spec: {nodeName: node-a, serviceAccountName: ui}
status: {podIP: 10.0.1.3}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: legacy, uid: legacy-client}
spec: {nodeName: node-a}
status: {podIP: 10.0.9.9}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.20
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
"""

POLICIES = """\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-from-frontend, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  rules:
  - to: [{operation: {methods: ["GET"]}}]
  - from: [{source: {namespaces: ["frontend"]}}]
    to: [{operation: {ports: ["8080"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin-port, namespace: shop}
spec:
  action: DENY
  rules:
  - to: [{operation: {ports: ["9000"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext-authz, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: CUSTOM
  provider: {name: opa}
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit-db, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  action: AUDIT
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: waypoint-get-only, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: "", name: web}]
  rules:
  - to: [{operation: {methods: ["GET"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: dry-deny-legacy, namespace: shop, annotations: {istio.io/dry-run: "true"}}
spec:
  action: DENY
  rules:
  - from: [{source: {namespaces: ["legacy"]}}]
"""


def call_main(argv: list[str]) -> int:
    """``ambientctl`` in-process. ``main`` configures logging on the stderr of the moment
    (capsys's, closed after the test): put back what was there at once, so that nothing logs
    to a closed file later (a ztunnel fixture's teardown, the next test)."""
    config = structlog.get_config()
    handlers = logging.getLogger().handlers[:]
    level = meshlog._threshold
    try:
        return main(argv)
    finally:
        structlog.configure(**config)
        logging.getLogger().handlers[:] = handlers
        meshlog._threshold = level


def write(tmp_path: Path, *docs: str, name: str = "mesh.yaml") -> str:
    path = tmp_path / name
    path.write_text("---\n".join(textwrap.dedent(d) for d in docs))
    return str(path)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = call_main(["policy", "check", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def args(config: str, frm: str, ip: str, to: str, port: int, *more: str) -> list[str]:
    return ["--config", config, "--from", frm, "--from-ip", ip, "--to", to, "--port", str(port), *more]


@pytest.fixture
def config(tmp_path: Path) -> str:
    return write(tmp_path, MESH, POLICIES)


# --- the question ---------------------------------------------------------------------------


def test_principals_as_policies_write_them() -> None:
    sa = Identity("cluster.local", "frontend", "ui")
    assert pc.parse_principal(UI) == sa
    assert pc.parse_principal("spiffe://" + UI) == sa
    assert pc.parse_principal("none") is None
    with pytest.raises(pc.InputError, match=r"--from 'frontend/ui': .*not of the form"):
        pc.parse_principal("frontend/ui")
    with pytest.raises(
        pc.InputError, match=r"--from 'cluster.local/ns/a b/sa/c': namespace 'a b' has illegal"
    ):
        pc.parse_principal("cluster.local/ns/a b/sa/c")


def test_request_normalizes_the_ip() -> None:
    r = pc.parse_request("none", "FD00::0:1", "shop/web-1", 8080)
    assert (r.principal, r.src_ip, r.namespace, r.pod, r.port) == (None, "fd00::1", "shop", "web-1", 8080)


# --- verdicts -------------------------------------------------------------------------------


def test_allow_names_the_policy_and_the_rule_as_written(
    capsys: pytest.CaptureFixture[str], config: str
) -> None:
    rc, out, err = run(capsys, *args(config, UI, "10.0.1.3", "shop/web-1", 8080))
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0] == "ALLOW"
    # spec.rules[0] (methods only) was dropped: ztunnel's rule 0 is the policy's second rule.
    assert lines[1] == (
        "  decided by:  ALLOW policy shop/web-from-frontend, rule 0 "
        "(spec.rules[1] as written: ztunnel never got the L7 rules before it)"
    )
    assert (
        "cluster.local/ns/frontend/sa/ui (mTLS) from 10.0.1.3 to shop/web-1 (10.0.1.2) port 8080" in lines[2]
    )
    assert f"evaluated:   config {config}" in lines[3]
    applied = out.split("policies applied (3):\n", 1)[1].split("dry run", 1)[0]
    assert "istio-system/istio_converted_static_strict" in applied and "PeerAuthentication STRICT" in applied
    assert "shop/deny-admin-port" in applied and "namespace-wide" in applied
    assert "rule 0 (spec.rules[1]) matched  selector matches shop/web-1" in applied
    assert "dry run, evaluated but not enforced (1):" in out
    assert "with the dry-run policies enforced the answer would be: ALLOW" in out
    warnings = out.split("WARNINGS (", 1)[1]
    assert "AuthorizationPolicy shop/web-from-frontend: rules[0] uses L7 attributes" in warnings
    assert "the rule is dropped and allows nothing" in warnings
    assert "AuthorizationPolicy shop/ext-authz: CUSTOM is enforced by waypoints only" in warnings
    assert "(it selects shop/web-1: it enforces nothing for this pod)" in warnings
    assert "AuthorizationPolicy shop/audit-db: AUDIT is not enforced by ztunnel" in warnings
    assert "(it does not select shop/web-1)" in warnings
    assert "AuthorizationPolicy shop/waypoint-get-only: bound by targetRefs (Service shop/web)" in warnings


def test_deny_by_a_deny_policy(capsys: pytest.CaptureFixture[str], config: str) -> None:
    rc, out, _ = run(capsys, *args(config, UI, "10.0.1.3", "shop/web-1", 9000))
    assert rc == 1
    assert out.splitlines()[:2] == ["DENY", "  decided by:  DENY policy shop/deny-admin-port, rule 0"]


def test_deny_when_no_allow_matches(capsys: pytest.CaptureFixture[str], config: str) -> None:
    rc, out, _ = run(capsys, *args(config, "cluster.local/ns/shop/sa/db", "10.0.1.4", "shop/web-1", 8080))
    assert rc == 1
    assert out.splitlines()[1] == "  decided by:  no ALLOW policy matched (shop/web-from-frontend)"


def test_plaintext_under_strict_and_the_dry_run(capsys: pytest.CaptureFixture[str], config: str) -> None:
    rc, out, _ = run(capsys, *args(config, "none", LEGACY_IP, "shop/web-1", 8080, "-o", "json"))
    assert rc == 1
    got = json.loads(out)
    assert got["decision"] == "DENY" and got["allow"] is False
    assert (got["policy"], got["rule"], got["spec_rule"]) == (
        "istio-system/istio_converted_static_strict",
        0,
        None,
    )
    assert got["source"] == {"principal": None, "ip": LEGACY_IP}
    assert got["destination"] == {
        "namespace": "shop",
        "name": "web-1",
        "uid": "shop-web-1",
        "ip": "10.0.1.2",
        "port": 8080,
        "node": "node-a",
        "identity": "cluster.local/ns/shop/sa/web",
    }
    assert got["dry_run"] == [
        {"policy": "shop/dry-deny-legacy", "action": "DENY", "rule": None, "matched": False}
    ]
    assert got["dry_run_decision"] == "DENY"  # still denied by STRICT
    by_key = {p["key"]: p for p in got["policies"]}
    assert by_key["shop/dry-deny-legacy"]["dry_run"] is True
    assert by_key["shop/web-from-frontend"] == {
        "key": "shop/web-from-frontend",
        "action": "ALLOW",
        "scope": "WORKLOAD_SELECTOR",
        "applies_because": "selector matches shop/web-1",
        "dry_run": False,
        "matched_rule": None,
        "matched_spec_rule": None,
    }
    assert any("shop/web-from-frontend: rules[0]" in w for w in got["warnings"])


def test_no_policy_applies(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cfg = write(tmp_path, MESH)
    rc, out, _ = run(capsys, *args(cfg, "none", LEGACY_IP, "shop/web-1", 8080))
    assert rc == 0
    assert out.splitlines()[1] == "  decided by:  no policy applies"
    assert "policies applied: none" in out and "WARNINGS" not in out and "dry run" not in out


def test_only_deny_policies_that_do_not_match(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    deny = """\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: deny-legacy, namespace: shop}
        spec:
          action: DENY
          rules: [{from: [{source: {namespaces: ["legacy"]}}]}]
        """
    cfg = write(tmp_path, MESH, deny)
    rc, out, _ = run(capsys, *args(cfg, UI, "10.0.1.3", "shop/web-1", 8080))
    assert rc == 0
    assert out.splitlines()[1] == "  decided by:  no ALLOW policy applies and no DENY policy matched"


def test_warnings_for_what_is_not_enforced(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    extra = """\
        apiVersion: security.istio.io/v1
        kind: PeerAuthentication
        metadata: {name: no-mtls, namespace: shop}
        spec: {mtls: {mode: DISABLE}}
        ---
        apiVersion: security.istio.io/v1
        kind: RequestAuthentication
        metadata: {name: jwt, namespace: shop}
        spec:
          selector: {matchLabels: {app: web}}
          jwtRules: [{issuer: "https://issuer.example"}]
        ---
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: custom-elsewhere, namespace: other}
        spec: {action: CUSTOM, provider: {name: opa}, rules: [{}]}
        ---
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: deny-post-from-legacy, namespace: shop}
        spec:
          action: DENY
          rules:
          - from: [{source: {namespaces: ["legacy"]}}]
            to: [{operation: {ports: ["8080"], methods: ["POST"]}}]
        """
    cfg = write(tmp_path, MESH, extra)
    legacy = "cluster.local/ns/legacy/sa/default"
    rc, out, _ = run(capsys, *args(cfg, legacy, LEGACY_IP, "shop/web-1", 8080, "-o", "json"))
    got = json.loads(out)
    assert rc == 1 and got["decided_by"] == "DENY policy shop/deny-post-from-legacy, rule 0"  # any method
    text = "\n".join(got["warnings"])
    assert "PeerAuthentication shop/no-mtls: mode DISABLE is not supported in ambient; ignored" in text
    assert "RequestAuthentication shop/jwt: bound by selector, which applies nowhere in ambient" in text
    assert "only its L4 part is enforced, so it denies more widely than written" in text
    assert "custom-elsewhere" not in text  # another namespace's policy is not this pod's business


def test_not_enrolled_and_waypoint_warnings(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    waypoint = """\
        apiVersion: gateway.networking.k8s.io/v1
        kind: Gateway
        metadata: {name: waypoint, namespace: shop}
        spec:
          gatewayClassName: istio-waypoint
          listeners: [{name: mesh, port: 15008, protocol: HBONE}]
        ---
        apiVersion: v1
        kind: Pod
        metadata: {name: wp, namespace: shop, uid: shop-wp, labels: {gateway.networking.k8s.io/gateway-name: waypoint}}
        spec: {nodeName: node-a, serviceAccountName: waypoint}
        status: {podIP: 10.0.1.9}
        ---
        apiVersion: v1
        kind: Service
        metadata: {name: waypoint, namespace: shop}
        spec:
          clusterIP: 10.96.0.99
          selector: {gateway.networking.k8s.io/gateway-name: waypoint}
          ports: [{name: mesh, port: 15008}]
        """
    mesh = MESH.replace(
        "metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}",
        "metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}",
    )
    cfg = write(tmp_path, mesh, waypoint)
    rc, out, _ = run(capsys, *args(cfg, UI, "10.0.1.3", "shop/web-1", 8080, "-o", "json"))
    assert rc == 0
    assert any(
        "has a waypoint: shop/waypoint.shop.svc.cluster.local (service shop/web.shop.svc.cluster.local)" in w
        for w in json.loads(out)["warnings"]
    )
    rc, out, _ = run(capsys, *args(cfg, UI, "10.0.1.3", "legacy/client", 8080, "-o", "json"))
    assert rc == 0
    assert json.loads(out)["warnings"][0] == (
        "legacy/client is not enrolled (istio.io/dataplane-mode): no ztunnel sees its inbound traffic, "
        "so none of this is enforced"
    )


# --- bad input: exit 2, one line naming what to fix -----------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--from", "frontend/ui"], r"--from 'frontend/ui': 'frontend/ui' is not of the form"),
        (["--from", "spiffe://cluster.local/ns/x/sa/"], r"--from .*: empty service account"),
        (["--from-ip", "10.0.0.256"], r"--from-ip '10.0.0.256': not an IP address"),
        (["--port", "0"], r"--port 0: out of range \(1-65535\)"),
        (["--port", "65536"], r"--port 65536: out of range"),
        (["--to", "web-1"], r"--to 'web-1': write NAMESPACE/POD"),
        (
            ["--to", "shop/web-9"],
            r"--to shop/web-9: no such pod; pods in namespace shop in config .*: db-1, web-1$",
        ),
        (
            ["--to", "nowhere/x"],
            r"--to nowhere/x: no such pod; config .* has no pod in namespace nowhere "
            r"\(namespaces with pods: frontend, legacy, shop\)",
        ),
    ],
)
def test_bad_arguments(
    capsys: pytest.CaptureFixture[str], config: str, argv: list[str], message: str
) -> None:
    base = dict(
        zip(["--from", "--from-ip", "--to", "--port"], [UI, "10.0.1.3", "shop/web-1", "8080"], strict=True)
    )
    base.update(dict(zip(argv[::2], argv[1::2], strict=True)))
    rc, out, err = run(capsys, "--config", config, *[x for kv in base.items() for x in kv])
    assert (rc, out) == (2, "")
    assert err.startswith("ambientctl policy check: ")
    assert len(err.strip().splitlines()) == 1
    assert re.search(message, err.strip()), err


def test_config_errors_name_file_object_and_field(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = """\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: typo, namespace: shop}
        spec:
          rules:
          - from: [{source: {ipBlocks: ["10.0.0.0/33"]}}]
        """
    cfg = write(tmp_path, MESH, bad)
    rc, out, err = run(capsys, *args(cfg, UI, "10.0.1.3", "shop/web-1", 8080))
    assert (rc, out) == (2, "")
    assert f"ambientctl policy check: --config: {cfg}: document[9] (AuthorizationPolicy shop/typo): " in err
    assert "spec.rules[0].from[0].source.ipBlocks[0]" in err
    cfg = write(tmp_path, MESH, "kind: [\n", name="broken.yaml")
    rc, _, err = run(capsys, *args(cfg, UI, "10.0.1.3", "shop/web-1", 8080))
    assert rc == 2 and f"{cfg}: document[9]: invalid YAML" in err
    rc, _, err = run(capsys, *args(str(tmp_path / "missing.yaml"), UI, "10.0.1.3", "shop/web-1", 8080))
    assert rc == 2 and "missing.yaml: cannot read the file: No such file or directory" in err


def test_argparse_refuses_missing_and_conflicting_sources(
    capsys: pytest.CaptureFixture[str], config: str
) -> None:
    with pytest.raises(SystemExit) as info:
        call_main(["policy", "check", "--from", "none", "--from-ip", "1.2.3.4", "--to", "a/b", "--port", "1"])
    assert info.value.code == 2
    assert "one of the arguments --config --admin is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        call_main(["policy", "check", "--config", config, "--admin", "x:1", "--from", "none", "--from-ip", "1.2.3.4",
              "--to", "a/b", "--port", "1"])  # fmt: skip
    assert "not allowed with argument" in capsys.readouterr().err


def test_unreachable_admin_address(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(
        capsys,
        "--admin",
        "127.0.0.1:1",
        "--from",
        "none",
        "--from-ip",
        "1.2.3.4",
        "--to",
        "a/b",
        "--port",
        "1",
    )
    assert (rc, out) == (2, "")
    assert err.startswith("ambientctl policy check: --admin http://127.0.0.1:1/config_dump: cannot connect:")


def test_bad_config_dumps_name_the_field() -> None:
    with pytest.raises(pc.InputError, match=r"^admin x: not a ztunnel config_dump"):
        pc.target_from_dump({"pods": []}, "shop", "web", "admin x")
    dump: dict[str, Any] = {
        "node": "n",
        "workloads": [{"uid": "u", "name": "web", "namespace": "shop", "addresses": ["nope"], "local": True}],
        "authorizations": [],
    }
    with pytest.raises(
        pc.InputError, match=r"^admin x \(node n\): bad config_dump: workloads\[0\]\.addresses\[0\]"
    ):
        pc.target_from_dump(dump, "shop", "web", "admin x")
    dump["workloads"][0]["addresses"] = ["10.0.0.1"]
    dump["authorizations"] = [{"name": "a", "namespace": "shop", "scope": "NAMESPACE", "action": "MAYBE"}]
    with pytest.raises(pc.InputError, match=r"authorizations\[0\]\.action: must be one of ALLOW, DENY"):
        pc.target_from_dump(dump, "shop", "web", "admin x")
    dump["authorizations"] = []
    with pytest.raises(pc.InputError, match=r"pods in namespace shop in admin x \(node n\): web$"):
        pc.target_from_dump(dump, "shop", "api", "admin x")
    dump["workloads"][0]["addresses"] = []
    target = pc.target_from_dump(dump, "shop", "web", "admin x")
    with pytest.raises(pc.InputError, match=r"the pod has no IP"):
        pc.check(target, pc.parse_request("none", "1.2.3.4", "shop/web", 80))


# --- as a user runs it ----------------------------------------------------------------------


def test_as_a_separate_process(config: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "ambientctl",
        "policy",
        "check",
        *args(config, "none", LEGACY_IP, "shop/db-1", 5432),
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 1, p.stderr
    assert p.stdout.splitlines()[:2] == [
        "DENY",
        "  decided by:  DENY policy istio-system/istio_converted_static_strict, rule 0",
    ]
    bad = subprocess.run([*cmd[:-1], "99999"], capture_output=True, text=True, env=env, timeout=60)
    assert (bad.returncode, bad.stdout) == (2, "")
    assert "--port 99999: out of range" in bad.stderr


# --- against a running ztunnel ----------------------------------------------------------------


def host_factory(fd: int, name: str) -> SocketFactory:
    return HostSocketFactory()


def mesh_objects(path: str) -> list[MeshObject]:
    """What the control plane's local source puts in its store for ``path``."""
    return assume_local_redirection(parse_manifest(Path(path).read_text(), source=path))


@pytest.fixture
async def ztunnel(tmp_path: Path, config: str) -> AsyncIterator[tuple[Ztunnel, Discovery]]:
    """node-a's ztunnel, fed by the real discovery server from ``config``, serving shop/web-1."""
    discovery = Discovery()
    discovery.store.replace_all(mesh_objects(config))
    await discovery.start()
    zds_path = str(tmp_path / "zds.sock")
    z = Ztunnel(
        node="node-a",
        trust_domain="cluster.local",
        state=(await discovery.subscribe("node-a")).state,
        ca=FakeCa(),
        zds_path=zds_path,
        ports=Ports(0, 0, 0, "127.0.0.1"),
        addresses=Addresses(("127.0.0.1", 0), ("127.0.0.1", 0), ("127.0.0.1", 0)),
        make_factory=host_factory,
        drain_seconds=0,
    )
    await z.start()
    agent = FakeAgent(zds_path)
    try:
        await agent.accept()
        fd = os.open("/dev/null", os.O_RDONLY)
        try:
            assert await agent.request(zds.AddWorkload("shop-web-1", "web-1", "shop", "web", fd), [fd]) == ""
        finally:
            os.close(fd)
        assert await agent.snapshot_sent() == ""
        yield z, discovery
    finally:
        agent.close()
        await z.shutdown(0)
        await discovery.aclose()


def _json(argv: list[str]) -> tuple[int, dict[str, Any]]:
    p = subprocess.run(
        [sys.executable, "-m", "ambientctl", "policy", "check", *argv, "-o", "json"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=60,
    )
    assert p.returncode in (0, 1), p.stderr
    return p.returncode, json.loads(p.stdout)


CONNECTIONS = [
    (UI, "10.0.1.3", "shop/web-1", 8080),
    (UI, "10.0.1.3", "shop/web-1", 9000),
    (UI, "10.0.1.3", "shop/web-1", 8081),
    ("none", LEGACY_IP, "shop/web-1", 8080),
    ("cluster.local/ns/shop/sa/db", "10.0.1.4", "shop/db-1", 5432),
    ("none", LEGACY_IP, "shop/db-1", 5432),
]


async def test_admin_answers_what_the_node_holds(ztunnel: tuple[Ztunnel, Discovery], config: str) -> None:
    z, _ = ztunnel
    admin = "127.0.0.1:{}".format(z.bound["admin"][1])
    # The dump carries the node's state exactly: decoding it gives back what ztunnel holds.
    dump = z.config_dump()
    snap = z.state.snapshot()
    assert {
        w["uid"]: workload_from_json({k: v for k, v in w.items() if k != "local"}) for w in dump["workloads"]
    } == dict(snap.workloads)
    assert {s.key: s for s in map(service_from_json, dump["services"])} == dict(snap.services)
    assert {a.key: a for a in map(authorization_from_json, dump["authorizations"])} == dict(
        snap.authorizations
    )
    assert [w["local"] for w in dump["workloads"] if w["uid"] == "shop-web-1"] == [True]

    for frm, ip, to, port in CONNECTIONS:
        argv = ["--from", frm, "--from-ip", ip, "--to", to, "--port", str(port)]
        (rc_cfg, from_config), (rc_admin, from_admin) = await asyncio.gather(
            asyncio.to_thread(_json, ["--config", config, *argv]),
            asyncio.to_thread(_json, ["--admin", admin, *argv]),
        )
        assert rc_cfg == rc_admin, (argv, from_config, from_admin)
        for key in (
            "decision",
            "policy",
            "rule",
            "reason",
            "dry_run",
            "dry_run_decision",
            "destination",
            "source",
        ):
            assert from_config[key] == from_admin[key], (argv, key)
        assert [p["key"] for p in from_config["policies"]] == [p["key"] for p in from_admin["policies"]]
        assert from_admin["evaluated"] == f"admin http://{admin}/config_dump (node node-a)"
        served = to == "shop/web-1"
        assert any("is not a pod this ztunnel serves" in w for w in from_admin["warnings"]) is not served
        assert any("after lowering" in w for w in from_admin["warnings"])


async def test_admin_in_process_text_and_a_non_dump_address(
    ztunnel: tuple[Ztunnel, Discovery], capsys: pytest.CaptureFixture[str]
) -> None:
    z, _ = ztunnel
    argv = [
        "policy",
        "check",
        "--from",
        "none",
        "--from-ip",
        LEGACY_IP,
        "--to",
        "shop/web-1",
        "--port",
        "8080",
    ]
    rc = await asyncio.to_thread(call_main, [*argv, "--admin", f"127.0.0.1:{z.bound['admin'][1]}"])
    out, _ = capsys.readouterr()
    assert rc == 1
    assert out.splitlines()[:2] == [
        "DENY",
        "  decided by:  DENY policy istio-system/istio_converted_static_strict, rule 0",
    ]
    rc = await asyncio.to_thread(
        call_main, [*argv, "--admin", f"http://127.0.0.1:{z.bound['stats'][1]}/metrics"]
    )
    _, err = capsys.readouterr()
    assert rc == 2 and "/metrics: not JSON: is this a ztunnel admin port (15000)?" in err
    rc = await asyncio.to_thread(call_main, [*argv, "--admin", f"127.0.0.1:{z.bound['stats'][1]}"])
    _, err = capsys.readouterr()
    assert rc == 2 and "/config_dump: HTTP 404" in err
