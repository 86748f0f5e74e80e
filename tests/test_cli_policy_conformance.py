"""Istio's policy semantics, end to end through ``ambientctl policy check``.

tests/authz/test_engine.py checks the engine on hand-built L4 values; here each case is an Istio
manifest as a user writes it (the examples of istio.io's AuthorizationPolicy and
PeerAuthentication references and security tasks, restated in the shape of Istio's
``foo``/``bar``/``legacy`` + ``httpbin``/``sleep`` samples), read by the control plane's
source, lowered as discovery lowers it, and decided on the path ztunnel takes. The expected
answer is Istio's, with ztunnel's L4 reading where L7 is involved (POLICY.md).

The mesh: ``foo`` and ``bar`` are ambient, ``legacy`` is not (its clients speak plaintext).
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.test_cli_policy import call_main

MESH = """\
apiVersion: v1
kind: Node
metadata: {name: node-1}
---
apiVersion: v1
kind: Namespace
metadata: {name: istio-system}
---
apiVersion: v1
kind: Namespace
metadata: {name: foo, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: bar, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: Pod
metadata: {name: httpbin, namespace: foo, labels: {app: httpbin, version: v1}}
spec: {nodeName: node-1, serviceAccountName: httpbin}
status: {podIP: 10.0.1.10}
---
apiVersion: v1
kind: Pod
metadata: {name: sleep, namespace: foo, labels: {app: sleep}}
spec: {nodeName: node-1, serviceAccountName: sleep}
status: {podIP: 10.0.1.11}
---
apiVersion: v1
kind: Pod
metadata: {name: sleep, namespace: bar, labels: {app: sleep}}
spec: {nodeName: node-1, serviceAccountName: sleep}
status: {podIP: 10.0.2.11}
---
apiVersion: v1
kind: Pod
metadata: {name: sleep, namespace: legacy, labels: {app: sleep}}
spec: {nodeName: node-1, serviceAccountName: sleep}
status: {podIP: 10.0.3.11}
"""

# Clients: the enrolled ones connect with their identity (mTLS); legacy's are plaintext.
CLIENTS = {
    "foo/sleep": ("cluster.local/ns/foo/sa/sleep", "10.0.1.11"),
    "bar/sleep": ("cluster.local/ns/bar/sa/sleep", "10.0.2.11"),
    "legacy/sleep": ("none", "10.0.3.11"),
}
STRICT = "istio-system/istio_converted_static_strict"


@dataclass(frozen=True)
class Case:
    manifests: str
    client: str
    port: int
    decision: str
    policy: str | None = None
    rule: int | None = None
    warning: str | None = None  # a substring one of the warnings must contain
    dry_run_decision: str | None = None
    to: str = "foo/httpbin"


def case(
    id: str,
    manifests: str,
    client: str,
    decision: str,
    policy: str | None = None,
    *,
    port: int = 8000,
    rule: int | None = None,
    warning: str | None = None,
    dry_run: str | None = None,
    to: str = "foo/httpbin",
    marks: Any = (),
) -> Any:
    if policy is not None and rule is None:
        rule = 0
    c = Case(textwrap.dedent(manifests), client, port, decision, policy, rule, warning, dry_run, to)
    return pytest.param(c, id=id, marks=marks)


def ap(name: str, spec: str, ns: str = "foo", *, dry_run: bool = False) -> str:
    """An AuthorizationPolicy with ``spec`` (YAML); ``dry_run``: the ``istio.io/dry-run`` annotation."""
    annotations = ', annotations: {istio.io/dry-run: "true"}' if dry_run else ""
    meta = f"{{name: {name}, namespace: {ns}{annotations}}}"
    body = textwrap.indent(textwrap.dedent(spec).strip(), "  ")
    return f"apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {meta}\nspec:\n{body}\n"


def pa(name: str, spec: str, ns: str = "foo") -> str:
    body = textwrap.indent(textwrap.dedent(spec).strip(), "  ")
    return (
        f"apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: {ns}}}\n"
        f"spec:\n{body}\n"
    )


def docs(*objects: str) -> str:
    return "---\n".join(objects)


HTTPBIN = "selector: {matchLabels: {app: httpbin}}"
ALLOW_NOTHING = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow-nothing, namespace: foo}\nspec: {}\n"  # fmt: skip
DENY_ALL = ap("deny-all", "action: DENY\nrules: [{}]")
ALLOW_ALL = ap("allow-all", "rules: [{}]")
FROM_BAR = ap("from-bar", f"{HTTPBIN}\nrules:\n- from: [{{source: {{namespaces: [bar]}}}}]")
FROM_FOO_SLEEP = ap("from-sleep", f'{HTTPBIN}\nrules:\n- from: [{{source: {{principals: ["cluster.local/ns/foo/sa/sleep"]}}}}]')  # fmt: skip
FROM_SPIFFE = ap("from-sleep-uri", f'{HTTPBIN}\nrules:\n- from: [{{source: {{principals: ["spiffe://cluster.local/ns/bar/sa/sleep"]}}}}]')  # fmt: skip
ANY_PRINCIPAL = ap("require-mtls", f'{HTTPBIN}\nrules:\n- from: [{{source: {{principals: ["*"]}}}}]')
DENY_NO_PRINCIPAL = ap("deny-plaintext", 'action: DENY\nrules:\n- from: [{source: {notPrincipals: ["*"]}}]')
NS_PATTERNS = ap("ns-patterns", f'{HTTPBIN}\nrules:\n- from: [{{source: {{namespaces: ["ba*", "*oo"]}}}}]')
FROM_BAR_IPS = ap("bar-subnet", f'{HTTPBIN}\nrules:\n- from: [{{source: {{ipBlocks: ["10.0.2.0/24"]}}}}]')
NOT_LEGACY_IPS = ap("not-legacy-subnet", 'action: DENY\nrules:\n- from: [{source: {notIpBlocks: ["10.0.1.0/24", "10.0.2.0/24"]}}]')  # fmt: skip
PORT_8000 = ap("port-8000", f'{HTTPBIN}\nrules:\n- to: [{{operation: {{ports: ["8000"]}}}}]')
NOT_PORT_9000 = ap("deny-not-8000", 'action: DENY\nrules:\n- to: [{operation: {notPorts: ["8000"]}}]')
DENY_NOT_FOO = ap("deny-outsiders", 'action: DENY\nrules:\n- from: [{source: {notNamespaces: ["foo"]}}]')
BAR_ON_8000 = ap("bar-on-8000", f'{HTTPBIN}\nrules:\n- from: [{{source: {{namespaces: [bar]}}}}]\n  to: [{{operation: {{ports: ["8000"]}}}}]')  # fmt: skip
TWO_RULES = ap("two-rules", f'{HTTPBIN}\nrules:\n- from: [{{source: {{namespaces: [legacy]}}}}]\n- from: [{{source: {{namespaces: [bar]}}}}]')  # fmt: skip
MESH_DENY_LEGACY_IPS = ap("deny-legacy-subnet", 'action: DENY\nrules:\n- from: [{source: {ipBlocks: ["10.0.3.0/24"]}}]', ns="istio-system")  # fmt: skip
MESH_ALLOW_NOTHING = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow-nothing, namespace: istio-system}\nspec: {}\n"  # fmt: skip
MESH_HTTPBIN_FROM_FOO = ap("httpbin-from-foo", f"{HTTPBIN}\nrules:\n- from: [{{source: {{namespaces: [foo]}}}}]", ns="istio-system")  # fmt: skip
WHEN_SOURCE_IP = ap("when-ip", f'{HTTPBIN}\nrules:\n- when: [{{key: source.ip, values: ["10.0.2.11"]}}]')
WHEN_NOT_PORT = ap("when-not-9000", f'{HTTPBIN}\nrules:\n- when: [{{key: destination.port, notValues: ["9000"]}}]')  # fmt: skip
WHEN_NS = ap("when-ns", f"{HTTPBIN}\nrules:\n- when: [{{key: source.namespace, values: [bar]}}]")
WHEN_PRINCIPAL_DENY = ap("when-principal", 'action: DENY\nrules:\n- when: [{key: source.principal, values: ["cluster.local/ns/bar/*"]}]')  # fmt: skip
WHEN_L7 = ap("when-header", f'{HTTPBIN}\nrules:\n- when: [{{key: "request.headers[x-user]", values: ["admin"]}}]')  # fmt: skip
MESH_STRICT = pa("default", "mtls: {mode: STRICT}", ns="istio-system")
FOO_PERMISSIVE = pa("default", "mtls: {mode: PERMISSIVE}")
FOO_STRICT = pa("default", "mtls: {mode: STRICT}")
HTTPBIN_PERMISSIVE = pa("httpbin", f"{HTTPBIN}\nmtls: {{mode: PERMISSIVE}}")
HTTPBIN_STRICT_8000_OPEN = pa("httpbin", f"{HTTPBIN}\nmtls: {{mode: STRICT}}\nportLevelMtls: {{8000: {{mode: PERMISSIVE}}}}")  # fmt: skip
HTTPBIN_9000_STRICT = pa("httpbin", f"{HTTPBIN}\nportLevelMtls: {{9000: {{mode: STRICT}}}}")
DISABLE = pa("default", "mtls: {mode: DISABLE}")
L7_ALLOW = ap("get-only", f'{HTTPBIN}\nrules:\n- to: [{{operation: {{methods: ["GET"]}}}}]')
L7_ALLOW_BESIDE_L4 = ap("get-or-bar", f'{HTTPBIN}\nrules:\n- to: [{{operation: {{methods: ["GET"]}}}}]\n- from: [{{source: {{namespaces: [bar]}}}}]')  # fmt: skip
L7_DENY_METHODS = ap("deny-post", 'action: DENY\nrules:\n- to: [{operation: {methods: ["POST"]}}]')
L7_DENY_PORT_METHODS = ap("deny-post-8000", 'action: DENY\nrules:\n- to: [{operation: {ports: ["8000"], methods: ["POST"]}}]')  # fmt: skip
L7_DENY_PATHS_FROM_BAR = ap("deny-admin-from-bar", 'action: DENY\nrules:\n- from: [{source: {namespaces: [bar]}}]\n  to: [{operation: {paths: ["/admin*"]}}]')  # fmt: skip
L7_ALLOW_REQUEST_PRINCIPALS = ap("require-jwt", f'{HTTPBIN}\nrules:\n- from: [{{source: {{requestPrincipals: ["*"]}}}}]')  # fmt: skip
CUSTOM = ap("ext-authz", f"{HTTPBIN}\naction: CUSTOM\nprovider: {{name: my-ext-authz}}\nrules: [{{}}]")
AUDIT = ap("audit-all", "action: AUDIT\nrules: [{}]")
WAYPOINT_BOUND = ap("waypoint-deny-all", "targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]\naction: DENY\nrules: [{}]")  # fmt: skip
DRY_DENY_ALL = ap("dry-deny-all", "action: DENY\nrules: [{}]", dry_run=True)
DRY_ALLOW_BAR = ap(
    "dry-from-bar", f"{HTTPBIN}\nrules:\n- from: [{{source: {{namespaces: [bar]}}}}]", dry_run=True
)

# fmt: off
CASES = [
    # no policy: everything is allowed (PERMISSIVE, no ALLOW policy)
    case("no-policy-mtls", "", "bar/sleep", "ALLOW"),
    case("no-policy-plaintext", "", "legacy/sleep", "ALLOW"),
    # the spec idioms
    case("allow-nothing", ALLOW_NOTHING, "foo/sleep", "DENY"),
    case("allow-nothing-plaintext", ALLOW_NOTHING, "legacy/sleep", "DENY"),
    case("allow-all", ALLOW_ALL, "legacy/sleep", "ALLOW", "foo/allow-all"),
    case("deny-all", DENY_ALL, "foo/sleep", "DENY", "foo/deny-all"),
    case("deny-all-beats-allow-all", docs(ALLOW_ALL, DENY_ALL), "bar/sleep", "DENY", "foo/deny-all"),
    case("allow-nothing-other-namespace-untouched", ALLOW_NOTHING, "foo/sleep", "ALLOW", to="bar/sleep"),
    # source.namespaces, principals, ipBlocks
    case("namespace-allowed", FROM_BAR, "bar/sleep", "ALLOW", "foo/from-bar"),
    case("namespace-other", FROM_BAR, "foo/sleep", "DENY"),
    case("namespace-plaintext", FROM_BAR, "legacy/sleep", "DENY"),
    case("namespace-selector-other-pod", FROM_BAR, "legacy/sleep", "ALLOW", to="foo/sleep"),
    case("namespace-patterns-prefix", NS_PATTERNS, "bar/sleep", "ALLOW", "foo/ns-patterns"),
    case("namespace-patterns-suffix", NS_PATTERNS, "foo/sleep", "ALLOW", "foo/ns-patterns"),
    case("namespace-patterns-plaintext", NS_PATTERNS, "legacy/sleep", "DENY"),
    case("principal-allowed", FROM_FOO_SLEEP, "foo/sleep", "ALLOW", "foo/from-sleep"),
    case("principal-other-namespace", FROM_FOO_SLEEP, "bar/sleep", "DENY"),
    case("principal-written-with-spiffe", FROM_SPIFFE, "bar/sleep", "ALLOW", "foo/from-sleep-uri"),
    case("any-principal-mtls", ANY_PRINCIPAL, "bar/sleep", "ALLOW", "foo/require-mtls"),
    case("any-principal-plaintext", ANY_PRINCIPAL, "legacy/sleep", "DENY"),
    case("deny-not-principals-plaintext", DENY_NO_PRINCIPAL, "legacy/sleep", "DENY", "foo/deny-plaintext"),
    case("deny-not-principals-mtls", DENY_NO_PRINCIPAL, "bar/sleep", "ALLOW"),
    case("ip-blocks-inside", FROM_BAR_IPS, "bar/sleep", "ALLOW", "foo/bar-subnet"),
    case("ip-blocks-outside", FROM_BAR_IPS, "legacy/sleep", "DENY"),
    case("not-ip-blocks-deny", NOT_LEGACY_IPS, "legacy/sleep", "DENY", "foo/not-legacy-subnet"),
    case("not-ip-blocks-inside", NOT_LEGACY_IPS, "foo/sleep", "ALLOW"),
    # ports, notPorts, from AND to, rules ORed
    case("port-allowed", PORT_8000, "legacy/sleep", "ALLOW", "foo/port-8000"),
    case("port-other", PORT_8000, "bar/sleep", "DENY", port=9000),
    case("not-ports-deny", NOT_PORT_9000, "bar/sleep", "DENY", "foo/deny-not-8000", port=9000),
    case("not-ports-deny-spared", NOT_PORT_9000, "bar/sleep", "ALLOW"),
    case("from-and-to-both", BAR_ON_8000, "bar/sleep", "ALLOW", "foo/bar-on-8000"),
    case("from-and-to-wrong-port", BAR_ON_8000, "bar/sleep", "DENY", port=9000),
    case("from-and-to-wrong-source", BAR_ON_8000, "foo/sleep", "DENY"),
    case("second-rule-matches", TWO_RULES, "bar/sleep", "ALLOW", "foo/two-rules", rule=1),
    # notNamespaces in DENY: plaintext has no namespace, so it is "not foo" too
    case("deny-not-namespaces-outsider", DENY_NOT_FOO, "bar/sleep", "DENY", "foo/deny-outsiders"),
    case("deny-not-namespaces-plaintext", DENY_NOT_FOO, "legacy/sleep", "DENY", "foo/deny-outsiders"),
    case("deny-not-namespaces-insider", DENY_NOT_FOO, "foo/sleep", "ALLOW"),
    # the root namespace: mesh-wide, and a selector there selects in every namespace
    case("mesh-deny", MESH_DENY_LEGACY_IPS, "legacy/sleep", "DENY", "istio-system/deny-legacy-subnet"),
    case("mesh-deny-other-pod", MESH_DENY_LEGACY_IPS, "legacy/sleep", "DENY", "istio-system/deny-legacy-subnet", to="bar/sleep"),
    case("mesh-deny-spares-others", MESH_DENY_LEGACY_IPS, "bar/sleep", "ALLOW"),
    case("mesh-allow-nothing", MESH_ALLOW_NOTHING, "foo/sleep", "DENY", to="bar/sleep"),
    case("mesh-allow-nothing-and-namespace-allow", docs(MESH_ALLOW_NOTHING, FROM_BAR), "bar/sleep", "ALLOW", "foo/from-bar"),
    case("mesh-selector", MESH_HTTPBIN_FROM_FOO, "foo/sleep", "ALLOW", "istio-system/httpbin-from-foo"),
    case("mesh-selector-denies", MESH_HTTPBIN_FROM_FOO, "bar/sleep", "DENY"),
    case("mesh-selector-other-workload", MESH_HTTPBIN_FROM_FOO, "bar/sleep", "ALLOW", to="foo/sleep"),
    # when: the L4 keys
    case("when-source-ip", WHEN_SOURCE_IP, "bar/sleep", "ALLOW", "foo/when-ip"),
    case("when-source-ip-other", WHEN_SOURCE_IP, "foo/sleep", "DENY"),
    case("when-destination-port-not", WHEN_NOT_PORT, "legacy/sleep", "ALLOW", "foo/when-not-9000"),
    case("when-destination-port-not-9000", WHEN_NOT_PORT, "legacy/sleep", "DENY", port=9000),
    case("when-source-namespace", WHEN_NS, "bar/sleep", "ALLOW", "foo/when-ns"),
    case("when-source-namespace-plaintext", WHEN_NS, "legacy/sleep", "DENY"),
    case("when-source-principal-deny", WHEN_PRINCIPAL_DENY, "bar/sleep", "DENY", "foo/when-principal"),
    case("when-source-principal-deny-other", WHEN_PRINCIPAL_DENY, "foo/sleep", "ALLOW"),
    case("when-l7-key-allow-denies", WHEN_L7, "bar/sleep", "DENY", warning="when[0] (when key 'request.headers[x-user]')"),
    # PeerAuthentication
    case("mesh-strict-plaintext", MESH_STRICT, "legacy/sleep", "DENY", STRICT),
    case("mesh-strict-mtls", MESH_STRICT, "bar/sleep", "ALLOW"),
    case("namespace-permissive-beats-mesh-strict", docs(MESH_STRICT, FOO_PERMISSIVE), "legacy/sleep", "ALLOW"),
    case("namespace-strict", FOO_STRICT, "legacy/sleep", "DENY", STRICT),
    case("namespace-strict-other-namespace", FOO_STRICT, "legacy/sleep", "ALLOW", to="bar/sleep"),
    case("workload-permissive-beats-namespace-strict", docs(FOO_STRICT, HTTPBIN_PERMISSIVE), "legacy/sleep", "ALLOW"),
    case("workload-permissive-only-its-pods", docs(FOO_STRICT, HTTPBIN_PERMISSIVE), "legacy/sleep", "DENY", STRICT, to="foo/sleep"),
    case("port-level-permissive-port", HTTPBIN_STRICT_8000_OPEN, "legacy/sleep", "ALLOW"),
    case("port-level-strict-elsewhere", HTTPBIN_STRICT_8000_OPEN, "legacy/sleep", "DENY", "foo/converted_peer_authentication_httpbin", port=9000),
    case("port-level-strict-port", HTTPBIN_9000_STRICT, "legacy/sleep", "DENY", "foo/converted_peer_authentication_httpbin", port=9000),
    case("port-level-strict-port-mtls", HTTPBIN_9000_STRICT, "bar/sleep", "ALLOW", port=9000),
    case("port-level-other-port-permissive", HTTPBIN_9000_STRICT, "legacy/sleep", "ALLOW"),
    case("disable-is-ignored", docs(MESH_STRICT, DISABLE), "legacy/sleep", "DENY", STRICT, warning="mode DISABLE is not supported in ambient"),
    case("strict-and-allow", docs(MESH_STRICT, FROM_BAR), "bar/sleep", "ALLOW", "foo/from-bar"),
    # L7 attributes at L4
    case("l7-allow-allows-nothing", L7_ALLOW, "bar/sleep", "DENY", warning="the rule is dropped and allows nothing"),
    case("l7-allow-beside-l4-rule", L7_ALLOW_BESIDE_L4, "bar/sleep", "ALLOW", "foo/get-or-bar", warning="rules[0] uses L7"),
    case("l7-allow-beside-l4-rule-other", L7_ALLOW_BESIDE_L4, "foo/sleep", "DENY"),
    case("l7-allow-request-principals", L7_ALLOW_REQUEST_PRINCIPALS, "bar/sleep", "DENY", warning="from[0].source.requestPrincipals"),
    case("l7-deny-methods-never-fires", L7_DENY_METHODS, "bar/sleep", "ALLOW", warning="this DENY rule never fires"),
    case("l7-deny-port-and-methods-denies-the-port", L7_DENY_PORT_METHODS, "bar/sleep", "DENY", "foo/deny-post-8000", warning="denies more widely than written"),
    case("l7-deny-port-and-methods-other-port", L7_DENY_PORT_METHODS, "bar/sleep", "ALLOW", port=9000),
    case("l7-deny-paths-from-bar-never-fires", L7_DENY_PATHS_FROM_BAR, "bar/sleep", "ALLOW", warning="never fires"),
    # not sent to ztunnel at all
    case("custom-enforces-nothing", CUSTOM, "legacy/sleep", "ALLOW", warning="CUSTOM is enforced by waypoints only; not sent to ztunnel (it selects foo/httpbin: it enforces nothing for this pod)"),
    case("audit-changes-nothing", AUDIT, "legacy/sleep", "ALLOW", warning="AUDIT is not enforced by ztunnel"),
    case("waypoint-bound-not-ztunnels", WAYPOINT_BOUND, "legacy/sleep", "ALLOW", warning="bound by targetRefs (Gateway foo/waypoint)"),
    # dry run: evaluated and reported, never enforced
    case("dry-run-deny-all", DRY_DENY_ALL, "bar/sleep", "ALLOW", dry_run="DENY"),
    case("dry-run-allow-would-deny", DRY_ALLOW_BAR, "foo/sleep", "ALLOW", dry_run="DENY"),
    case("dry-run-allow-would-allow", DRY_ALLOW_BAR, "bar/sleep", "ALLOW", dry_run="ALLOW"),
    case("dry-run-beside-enforced-deny", docs(DENY_ALL, DRY_ALLOW_BAR), "bar/sleep", "DENY", "foo/deny-all", dry_run="DENY"),
]
# fmt: on


@pytest.mark.parametrize("c", CASES)
def test_istio_manifests(c: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(MESH + ("---\n" + c.manifests if c.manifests.strip() else ""))
    principal, ip = CLIENTS[c.client]
    argv = ["policy", "check", "--config", str(path), "--from", principal, "--from-ip", ip]
    rc = call_main([*argv, "--to", c.to, "--port", str(c.port), "-o", "json"])
    out, err = capsys.readouterr()
    assert rc in (0, 1), err
    got = json.loads(out)
    assert (got["decision"], got["policy"], got["rule"]) == (c.decision, c.policy, c.rule), got["decided_by"]
    assert rc == (0 if c.decision == "ALLOW" else 1)
    if c.warning is not None:
        assert any(c.warning in w for w in got["warnings"]), got["warnings"]
    assert got["dry_run_decision"] == c.dry_run_decision
    if c.dry_run_decision is not None:
        assert got["dry_run"] and all(d["policy"].startswith("foo/dry-") for d in got["dry_run"])
