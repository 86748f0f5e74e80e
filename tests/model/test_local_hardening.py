"""The local-mode file as hostile or careless input (issue 24): bounded, strict, and partial.

* YAML: alias bombs and oversized documents refused before they are built, keys given twice
  refused, nothing unbounded rendered into a message;
* names, labels, annotations and apiVersions validated exactly as the API server does;
* unknown fields refused with the field named (Kubernetes and istio/api schemas), while every
  field those schemas define is accepted;
* one bad object never freezes the rest of an edit, and never deletes its last good version.
"""

from __future__ import annotations

import glob
import json
import os
import textwrap
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import yaml
from structlog.testing import capture_logs

from mesh.model import AuthorizationAction, Store, Workload
from sources import local, validation
from sources.convert import ConfigError, ConvertOptions, convert
from sources.local import LoadResult, LocalSource, parse_manifest, read_manifest

NODES = """\
apiVersion: v1
kind: Node
metadata: {name: node-a}
---
apiVersion: v1
kind: Node
metadata: {name: node-b}
"""
POD = """\
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec: {nodeName: node-a, serviceAccountName: web}
status: {podIP: 10.0.1.2}
"""
DENY = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-evil, namespace: shop}
spec:
  action: DENY
  rules:
  - from: [{source: {namespaces: [evil]}}]
"""
SERVICE = """\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.20, selector: {app: web}, ports: [{name: http, port: 80, targetPort: 8080}]}
"""
BASE = "---\n".join([NODES, POD, DENY, SERVICE])
MAX_MESSAGE = 600  # characters: what any error about the file may take


def docs(*parts: str) -> str:
    return "---\n".join(textwrap.dedent(p) for p in parts)


def rejected_of(text: str) -> list[local.Rejected]:
    return list(read_manifest(text, source="f.yaml").rejected)


def only_error(text: str) -> ConfigError:
    [r] = rejected_of(text)
    assert len(str(r.error)) < MAX_MESSAGE
    return r.error


class Loads:
    """A LocalSource on a file, and the results of its loads (no waiting: load() is synchronous)."""

    def __init__(self, tmp_path: Path, text: str) -> None:
        self.path = tmp_path / "mesh.yaml"
        self.store = Store()
        self.results: list[LoadResult] = []
        self.source = LocalSource(self.path, self.store, on_load=self.results.append)
        self.write(text)
        self.source.load()

    def write(self, text: str) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.path)

    def reload(self, text: str) -> LoadResult:
        self.write(text)
        try:
            self.source.load()
        except ConfigError:
            pass
        return self.results[-1]


# --- YAML: bounded -------------------------------------------------------------------------------


def bomb(levels: int, width: int = 9, indent: str = "    ") -> str:
    """A "billion laughs": ``width ** levels`` strings from a few hundred bytes."""
    items = ", ".join(["lol"] * width)
    lines = [f"{indent}l0: &l0 [{items}]"]
    for i in range(1, levels):
        lines.append(f"{indent}l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_in_a_label_is_refused_before_it_is_built(tmp_path: Path) -> None:
    """Before: the label's error message rendered 9**9 strings with !r, memory without bound."""
    text = (
        BASE
        + "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: boom\n  namespace: shop\n  labels:\n"
        + bomb(9)
    )
    tracemalloc.start()
    started = time.monotonic()
    try:
        loads = Loads(tmp_path, BASE)
        result = loads.reload(text)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.monotonic() - started < 10
    assert peak < 50 * 1024 * 1024
    [r] = result.rejected
    assert (r.error.document_index, r.error.kind, r.error.name) == (5, "Pod", "shop/boom")
    assert "more than 1000000 YAML nodes once aliases are expanded" in r.error.reason
    assert "metadata.labels" in r.error.reason and len(str(r.error)) < MAX_MESSAGE
    assert result.applied and loads.store.snapshot().workload_by_name("shop", "web") is not None


def test_aliases_within_bounds_are_fine_and_their_errors_are_short() -> None:
    # 9**4 strings: built (shared, so small), refused by the label check, rendered in brief.
    error = only_error("apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  labels:\n" + bomb(5))
    assert error.field == "metadata.labels[l0]" and "must be a string, got list" in error.reason
    # Aliases and merge keys used as YAML means them.
    [pod] = parse_manifest(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: a, annotations: &l {app: web}, labels: {<<: *l, x: y}}\n"
    )
    assert isinstance(pod, Workload) and dict(pod.labels) == {"app": "web", "x": "y"}


def test_a_merge_key_bomb_is_bounded_too() -> None:
    # "<<" copies the merged pairs into each mapping when built: counted before building.
    lines = [
        "apiVersion: v1",
        "kind: Pod",
        "metadata:",
        "  name: p",
        "  annotations:",
        "    m0: &m0 {a: b, c: d}",
    ]
    lines += [f"    m{i}: &m{i} {{<<: [*m{i - 1}, *m{i - 1}, *m{i - 1}, *m{i - 1}]}}" for i in range(1, 14)]
    error = only_error("\n".join(lines) + "\n")
    assert "once aliases are expanded" in error.reason


def test_a_recursive_alias_is_refused() -> None:
    error = only_error("apiVersion: v1\nkind: Pod\nmetadata: &m {name: p, labels: {self: *m}}\n")
    assert "an alias refers to a node that contains it" in error.reason
    assert error.document_index == 0


def test_a_file_over_the_size_limit_is_refused_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loads = Loads(tmp_path, BASE)
    monkeypatch.setattr(local, "MAX_FILE_BYTES", len(BASE) + 10)
    result = loads.reload(BASE + "# " + "x" * 100 + "\n")
    assert result.error is not None and "larger than" in result.error.reason
    assert loads.store.version == 1


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("2001-02-30", "day is out of range"),  # PyYAML raises ValueError for these
        ("!!int x", "invalid literal"),
        ("!!float x", "could not convert"),
        ("!!timestamp x", "invalid YAML value"),
        ("!!binary zz=", "base64"),
        ("!!python/name:os.system", "could not determine a constructor"),
    ],
)
def test_values_yaml_cannot_build_are_errors_of_their_document(value: str, reason: str) -> None:
    """Before: a ValueError from PyYAML's constructors escaped load() as a traceback."""
    manifest = read_manifest(NODES + f"---\napiVersion: v1\nkind: Node\nmetadata:\n  name: n\n  x: {value}\n")
    [r] = manifest.rejected
    assert r.error.document_index == 2 and reason in r.error.reason
    assert r.object is None and manifest.removals_held
    assert len(manifest.objects) == 2


# --- keys given twice -------------------------------------------------------------------------------


def test_a_key_given_twice_is_refused_naming_document_object_and_key(tmp_path: Path) -> None:
    """Before: nodeName given twice silently moved the pod to node-b (what the CA trusts)."""
    loads = Loads(tmp_path, BASE)
    moved = BASE.replace("spec: {nodeName: node-a,", "spec: {nodeName: node-a, nodeName: node-b,")
    result = loads.reload(moved)
    [r] = result.rejected
    e = r.error
    assert (e.document_index, e.kind, e.name, e.field) == (2, "Pod", "shop/web", "spec.nodeName")
    assert "key 'nodeName' is given twice (line 12)" in e.reason
    assert r.kept  # the pod stays where it was
    web = loads.store.snapshot().workload_by_name("shop", "web")
    assert web is not None and web.node == "node-a"


def test_keys_given_twice_in_block_style_and_in_list_items() -> None:
    e = only_error(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\nspec:\n  nodeName: a\n  hostNetwork: true\n  nodeName: b\n"
    )
    assert (e.field, e.name) == ("spec.nodeName", "default/p")
    assert "(lines 6 and 8)" in e.reason
    e = only_error(
        "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Node, metadata: {name: a}}\n"
        "- {apiVersion: v1, kind: Node, metadata: {name: b, labels: {x: '1', x: '2'}}}\n"
    )
    assert (e.field, e.kind, e.name) == ("items[1].metadata.labels.x", "Node", "b")
    # Quoting does not make it another key.
    e = only_error(
        "apiVersion: v1\nkind: Node\nmetadata: {name: a}\nspec: {podCIDR: 10.0.0.0/24, 'podCIDR': 10.1.0.0/24}\n"
    )
    assert e.field == "spec.podCIDR"


def test_a_name_given_twice_cannot_be_told_apart_so_nothing_is_removed(tmp_path: Path) -> None:
    loads = Loads(tmp_path, BASE)
    renamed = BASE.replace(
        "metadata: {name: deny-evil, namespace: shop}", "metadata: {name: deny-evil, name: x}"
    )
    result = loads.reload(renamed.replace(POD, POD.replace("10.0.1.2", "10.0.1.9")))
    [r] = result.rejected
    assert r.object is None and r.error.field == "metadata.name"
    snap = loads.store.snapshot()
    assert snap.authorization_policies["shop/deny-evil"].action is AuthorizationAction.DENY
    assert snap.workload_by_ip("10.0.1.9") is not None  # the rest applied


# --- names and values, as the API server checks them ------------------------------------------------

_POD_HEAD = "apiVersion: v1\nkind: Pod\n"


@pytest.mark.parametrize(
    ("text", "field", "reason"),
    [
        (_POD_HEAD + "metadata: {name: p}\nspec: {serviceAccountName: " + "a" * 100_000 + "}\n",
         "spec.serviceAccountName", "no more than 253 characters (got 100000)"),
        (_POD_HEAD + "metadata: {name: p, labels: {app: " + "v" * 100_000 + "}}\n",
         "metadata.labels[app]", "no more than 63 characters (got 100000)"),
        (_POD_HEAD + "metadata: {name: p, labels: {app: wéb}}\n", "metadata.labels[app]", "must be empty or consist"),
        (_POD_HEAD + "metadata: {name: p, labels: {app: -web}}\n", "metadata.labels[app]", "starting and ending"),
        (_POD_HEAD + "metadata: {name: p, labels: {Example.com/app: web}}\n", "metadata.labels", "prefix part must be"),
        (_POD_HEAD + "metadata: {name: p, labels: {a/b/c: web}}\n", "metadata.labels", "optional DNS subdomain prefix"),
        (_POD_HEAD + "metadata: {name: p, labels: {/app: web}}\n", "metadata.labels", "prefix part must not be empty"),
        (_POD_HEAD + "metadata: {name: p, labels: {" + "k" * 64 + ": web}}\n", "metadata.labels", "name part must be no more than 63"),
        (_POD_HEAD + "metadata: {name: p, annotations: {'bad key': x}}\n", "metadata.annotations", "name part must consist"),
        (_POD_HEAD + "metadata: {name: p, annotations: {a: " + "x" * (256 * 1024) + "}}\n",
         "metadata.annotations", "may not have more than 262144 bytes in all (got 262145)"),
        (_POD_HEAD + "metadata: {name: " + "p" * 254 + "}\n", "metadata.name", "no more than 253 characters"),
        (_POD_HEAD + "metadata: {name: Web}\n", "metadata.name", "DNS-1123 subdomain"),
        (_POD_HEAD + "metadata: {name: p, namespace: " + "n" * 64 + "}\n", "metadata.namespace", "no more than 63"),
        (_POD_HEAD + "metadata: {name: p}\nspec: {nodeName: Node_A}\n", "spec.nodeName", "not a valid node name"),
        (_POD_HEAD + "metadata: {name: p}\nspec: {serviceAccount: Bad}\n", "spec.serviceAccount", "not a valid service account"),
        (_POD_HEAD + "metadata: {name: p}\nspec: {containers: [{name: c, ports: [{containerPort: 80, name: web--x}]}]}\n",
         "spec.containers[0].ports[0].name", "consecutive '-'"),
        (_POD_HEAD + "metadata: {name: p}\nspec: {containers: [{name: c, ports: [{containerPort: 80, name: '8080'}]}]}\n",
         "spec.containers[0].ports[0].name", "at least one letter"),
        ("apiVersion: v1\nkind: Service\nmetadata: {name: 1web}\n", "metadata.name", "DNS-1035 label"),
        ("apiVersion: v1\nkind: Service\nmetadata: {name: web.x}\n", "metadata.name", "DNS-1035 label"),
        ("apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{name: Http, port: 80}]}\n",
         "spec.ports[0].name", "DNS-1123 label"),
        ("apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 80, targetPort: a--b}]}\n",
         "spec.ports[0].targetPort", "neither a port number nor a port name"),
        ("apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 80, appProtocol: 'a b'}]}\n",
         "spec.ports[0].appProtocol", "name part must consist"),
        ("apiVersion: v1\nkind: Namespace\nmetadata: {name: a.b}\n", "metadata.name", "DNS-1123 label"),
        ("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: Deny}\n", "metadata.name", "DNS-1123 subdomain"),
    ],
)  # fmt: skip
def test_names_labels_and_annotations_as_the_api_server_checks_them(
    text: str, field: str, reason: str
) -> None:
    """Before: 100 KB names and label values, non-ASCII labels and bad keys were accepted."""
    e = only_error(text)
    assert e.field == field
    assert reason in e.reason


def test_what_the_api_server_accepts_is_accepted() -> None:
    """Not stricter than Kubernetes: the edges of each rule load."""
    objs = parse_manifest(
        docs(
            f"""\
            apiVersion: v1
            kind: Pod
            metadata:
              name: {"a" * 63}.{"b" * 63}.{"c" * 63}.{"d" * 61}
              namespace: {"n" * 63}
              labels:
                example.com/Name_x.y-z: A.b_c-9
                empty: ""
                {"k" * 63}: {"v" * 63}
              annotations:
                Example.COM/Some_Key: anything at all, ünïcode too
                big: "{"x" * (256 * 1024 - 100)}"
            spec:
              nodeName: node-1.example.com
              serviceAccountName: sa.with.dots
              containers: [{{name: c, ports: [{{containerPort: 80, name: http-alt2}}]}}]
            """,
            """\
            apiVersion: v1
            kind: Service
            metadata: {name: web-1}
            spec: {ports: [{name: http, port: 80, targetPort: metrics, appProtocol: kubernetes.io/h2c}]}
            """,
            "apiVersion: v1\nkind: Node\nmetadata: {name: node-1.example.com}\n",
        )
    )
    assert len(objs) == 3


def test_pods_in_namespaces_the_file_does_not_declare_are_accepted() -> None:
    """Namespaces are implicit in local mode, as ServiceAccounts are (kept: tests and the demo
    rely on it, e.g. kube-system pods and istio-system policies without a Namespace object)."""
    objs = parse_manifest(NODES + "---\n" + POD)
    assert any(isinstance(o, Workload) and o.namespace == "shop" for o in objs)


# --- unknown fields --------------------------------------------------------------------------------


def test_a_typo_in_a_deny_is_refused_and_the_deny_stays_in_force(tmp_path: Path) -> None:
    """Before: `rulez:` was ignored, and the DENY with no rules matched nothing: a no-op."""
    loads = Loads(tmp_path, BASE)
    result = loads.reload(BASE.replace("  rules:\n", "  rulez:\n").replace("10.0.1.2", "10.0.1.3"))
    [r] = result.rejected
    e = r.error
    assert (e.document_index, e.kind, e.name, e.field) == (
        3,
        "AuthorizationPolicy",
        "shop/deny-evil",
        "spec.rulez",
    )
    assert e.reason == "unknown field 'rulez' of AuthorizationPolicy spec (did you mean 'rules'?)"
    assert r.kept
    snap = loads.store.snapshot()
    deny = snap.authorization_policies["shop/deny-evil"]
    assert deny.action is AuthorizationAction.DENY and deny.rules[0].from_[0].source.namespaces == ("evil",)
    assert snap.workload_by_ip("10.0.1.3") is not None  # the rest of the edit applied
    assert loads.source.last_error is e


@pytest.mark.parametrize(
    ("text", "field"),
    [
        (_POD_HEAD + "metadata: {name: p}\nspecs: {}\n", "specs"),
        (_POD_HEAD + "metadata: {name: p, lables: {a: b}}\n", "metadata.lables"),
        (_POD_HEAD + "metadata: {name: p}\nspec: {nodename: a}\n", "spec.nodename"),
        (_POD_HEAD + "metadata: {name: p}\nstatus: {podIp: 10.0.0.1}\n", "status.podIp"),
        (_POD_HEAD + "metadata: {name: p}\nstatus: {podIPs: [{ip: 10.0.0.1, family: v4}]}\n", "status.podIPs[0].family"),
        (_POD_HEAD + "metadata: {name: p}\nspec: {containers: [{name: c, ports: [{port: 80}]}]}\n",
         "spec.containers[0].ports[0].port"),
        ("apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 80, targetport: 8080}]}\n",
         "spec.ports[0].targetport"),
        ("apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: s}\nspec: {}\n", "spec"),
        ("apiVersion: v1\nkind: Node\nmetadata: {name: n}\nspec: {podCidr: 10.0.0.0/24}\n", "spec.podCidr"),
        ("apiVersion: v1\nkind: Namespace\nmetadata: {name: n}\nspec: {finalizer: []}\n", "spec.finalizer"),
        ("apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: g}\n"
         "spec: {gatewayClassName: c, listeners: [{name: m, port: 1, protocol: HBONE, hostName: x}]}\n",
         "spec.listeners[0].hostName"),
        ("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p}\nspec: {mtls: {mod: STRICT}}\n",
         "spec.mtls.mod"),
        ("apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata: {name: p}\n"
         "spec: {selector: {matchLabels: {a: b}}, portLevelMtls: {'80': {mode: STRICT, x: 1}}}\n",
         "spec.portLevelMtls.80.x"),
        ("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\n"
         "spec: {rules: [{from: [{source: {principal: [a]}}]}]}\n", "spec.rules[0].from[0].source.principal"),
        ("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\n"
         "spec: {rules: [{to: [{operation: {method: [GET]}}]}]}\n", "spec.rules[0].to[0].operation.method"),
        ("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\n"
         "spec: {selector: {matchlabels: {a: b}}}\n", "spec.selector.matchlabels"),
        ("apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: r}\n"
         "spec: {jwtRules: [{issuer: i, jwksURI: x}]}\n", "spec.jwtRules[0].jwksURI"),
        ("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec: {}\n1: x\n", "1"),
    ],
)  # fmt: skip
def test_unknown_fields_are_refused_by_name(text: str, field: str) -> None:
    e = only_error(text)
    assert e.field == field
    assert e.reason.startswith("unknown field")


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ("{rules: [{from: [{source: {principals: [a], trustDomains: [td]}}]}]}", "spec.rules[0].from[0].source.trustDomains"),
        ("{rules: [{from: [{source: {principals: [a], notTrustDomains: [td]}}]}]}",
         "spec.rules[0].from[0].source.notTrustDomains"),
    ],
)  # fmt: skip
def test_istio_fields_we_cannot_honour_are_refused_not_ignored(spec: str, field: str) -> None:
    e = only_error(
        f"apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p}}\nspec: {spec}\n"
    )
    assert e.field == field and "does not implement" in e.reason
    # From the API server (Kubernetes mode) the object is stored already: converted as before.
    obj = yaml.safe_load(
        f"apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p}}\nspec: {spec}\n"
    )
    assert convert(obj) is not None


@pytest.mark.parametrize(
    ("rule", "field", "reason"),
    [
        ("timeout: soon", "spec.jwtRules[0].timeout", "is not a duration"),
        ("jwks: '{}'", "spec.jwtRules[0].jwks", "at most one of jwksUri, jwks_uri and jwks"),
        ("jwks_uri: https://x", "spec.jwtRules[0].jwks_uri", "at most one of"),
    ],
)
def test_request_authentication_fields_refused(rule: str, field: str, reason: str) -> None:
    e = only_error(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: r}\n"
        f"spec: {{jwtRules: [{{issuer: i, jwksUri: https://i/jwks, {rule}}}]}}\n"
    )
    assert e.field == field and reason in e.reason


def test_every_field_of_the_schemas_is_accepted() -> None:
    """Newer manifests still load: a kubectl-style Pod, and Istio objects with every field."""
    objs = parse_manifest(
        docs(
            """\
            apiVersion: v1
            kind: Pod
            metadata:
              name: web
              namespace: shop
              uid: 4f1e3c1a-0000-4000-8000-000000000001
              resourceVersion: "123"
              generation: 1
              generateName: web-
              creationTimestamp: "2024-05-01T12:00:00Z"
              ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: web-1, uid: x}]
              finalizers: [x]
              managedFields: [{manager: kubectl, operation: Apply}]
            spec:
              nodeName: node-a
              containers:
              - name: app
                image: app:1
                command: [serve]
                ports: [{containerPort: 8080, name: http, protocol: TCP}]
                resources: {limits: {cpu: "1"}}
              restartPolicy: Always
              dnsPolicy: ClusterFirst
              tolerations: []
              hostUsers: false
              resources: {limits: {cpu: "2"}}
              schedulingGates: []
            status:
              phase: Running
              podIP: 10.0.1.2
              podIPs: [{ip: 10.0.1.2}]
              hostIP: 192.168.0.1
              hostIPs: [{ip: 192.168.0.1}]
              conditions: [{type: Ready, status: "True"}]
              qosClass: Burstable
              startTime: "2024-05-01T12:00:00Z"
              observedGeneration: 1
            """,
            "apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\nspec: {podCIDR: 10.0.1.0/24, taints: []}\n"
            "status: {addresses: [], nodeInfo: {}, capacity: {}}\n",
            """\
            apiVersion: security.istio.io/v1beta1
            kind: AuthorizationPolicy
            metadata: {name: every, namespace: shop}
            spec:
              action: DENY
              selector: {matchLabels: {app: web}}
              rules:
              - from:
                - source:
                    principals: [a]
                    notPrincipals: [b]
                    requestPrincipals: [c]
                    notRequestPrincipals: [d]
                    namespaces: [e]
                    notNamespaces: [f]
                    ipBlocks: [10.0.0.0/8]
                    notIpBlocks: [10.1.0.0/16]
                    remoteIpBlocks: [10.2.0.0/16]
                    notRemoteIpBlocks: [10.3.0.0/16]
                to:
                - operation: {hosts: [h], notHosts: [i], ports: ["80"], notPorts: ["81"], methods: [GET],
                              notMethods: [POST], paths: [/a], notPaths: [/b]}
                when: [{key: source.ip, values: [10.0.0.1], notValues: [10.0.0.2]}]
            status: {anything: [goes, here]}
            """,
            """\
            apiVersion: security.istio.io/v1
            kind: RequestAuthentication
            metadata: {name: jwt, namespace: shop}
            spec:
              targetRef: {kind: Gateway, group: gateway.networking.k8s.io, name: waypoint, namespace: shop}
              jwtRules:
              - issuer: i
                audiences: [a]
                jwks_uri: https://issuer.example/jwks
                fromHeaders: [{name: x-jwt, prefix: "Bearer "}]
                fromParams: [token]
                outputPayloadToHeader: x-payload
                forwardOriginalToken: true
                outputClaimToHeaders: [{header: x-sub, claim: sub}]
                timeout: 5s
            """,
            """\
            apiVersion: gateway.networking.k8s.io/v1
            kind: Gateway
            metadata: {name: waypoint, namespace: shop}
            spec:
              gatewayClassName: istio-waypoint
              listeners: [{name: mesh, port: 15008, protocol: HBONE, allowedRoutes: {namespaces: {from: Same}}}]
              addresses: [{type: IPAddress, value: 10.0.0.9}]
              infrastructure: {labels: {a: b}}
            status: {conditions: [], listeners: [], addresses: []}
            """,
        )
    )
    ra = next(o for o in objs if o.KIND.value == "RequestAuthentication")
    assert ra.jwt_rules[0].jwks_uri == "https://issuer.example/jwks"  # type: ignore[attr-defined]
    assert len(objs) == 5


def _k8s_schema_fields(name: str) -> set[str]:
    """Every field the Kubernetes OpenAPI schemas of kubernetes-validate define (all versions)."""
    import kubernetes_validate  # type: ignore[import-untyped]

    root = os.path.join(os.path.dirname(kubernetes_validate.__file__), "kubernetes-json-schema")
    out: set[str] = set()
    for path in glob.glob(os.path.join(root, "*-local-strict", name)):
        with open(path) as f:
            out |= set(json.load(f).get("properties", {}))
    assert out, name
    return out


def _fields(shape: Any) -> set[str]:
    assert isinstance(shape, validation.Struct)
    return set(shape.fields)


@pytest.mark.parametrize(
    ("schema", "ours"),
    [
        ("objectmeta-meta-v1.json", lambda: _fields(validation.OBJECT_META)),
        ("podspec-v1.json", lambda: set(validation.POD_SPEC)),
        ("podstatus-v1.json", lambda: set(validation.POD_STATUS)),
        ("container-v1.json", lambda: _fields(validation.POD_SPEC["containers"].item)),  # type: ignore[union-attr]
        ("containerport-v1.json", lambda: _fields(validation.CONTAINER_PORT)),
        ("servicespec-v1.json", lambda: set(validation.SERVICE_SPEC)),
        ("serviceport-v1.json", lambda: _fields(validation.SERVICE_SPEC["ports"].item)),  # type: ignore[union-attr]
        ("servicestatus-v1.json", lambda: _fields(validation.SCHEMAS["Service"].fields["status"])),
        ("nodespec-v1.json", lambda: set(validation.NODE_SPEC)),
        ("nodestatus-v1.json", lambda: set(validation.NODE_STATUS)),
        ("namespacespec-v1.json", lambda: _fields(validation.SCHEMAS["Namespace"].fields["spec"])),
        ("namespacestatus-v1.json", lambda: _fields(validation.SCHEMAS["Namespace"].fields["status"])),
        ("serviceaccount-v1.json", lambda: _fields(validation.SCHEMAS["ServiceAccount"])),
        ("pod-v1.json", lambda: _fields(validation.SCHEMAS["Pod"])),
    ],
)
def test_core_field_lists_match_the_kubernetes_schemas(schema: str, ours: Any) -> None:
    """Exactly the fields Kubernetes 1.25-1.37 define: none missing (never stricter), none made up."""
    assert ours() == _k8s_schema_fields(schema)


def test_kubernetes_mode_still_ignores_unknown_fields() -> None:
    """From the API server the schemas did the pruning; a newer server's fields must not be refused."""
    obj = yaml.safe_load(_POD_HEAD + "metadata: {name: p, newField: 1}\nspec: {futureField: x}\n")
    assert convert(obj) is not None
    with pytest.raises(ConfigError, match="unknown field 'newField'"):
        convert(obj, ConvertOptions(reject_unknown_fields=True))


# --- one bad object never freezes the rest, nor deletes its last good version -----------------------


def test_a_new_bad_object_is_not_added_and_the_rest_applies(tmp_path: Path) -> None:
    loads = Loads(tmp_path, BASE)
    bad = DENY.replace("deny-evil", "deny-more").replace("action: DENY", "action: DENIED")
    result = loads.reload(BASE.replace("10.0.1.2", "10.0.1.5") + "---\n" + bad)
    [r] = result.rejected
    assert r.object == ("AuthorizationPolicy", "shop/deny-more") and not r.kept
    assert r.error.field == "spec.action"
    snap = loads.store.snapshot()
    assert "shop/deny-more" not in snap.authorization_policies
    assert snap.workload_by_ip("10.0.1.5") is not None
    # Fixed: added, and the error is gone.
    result = loads.reload(BASE + "---\n" + bad.replace("DENIED", "DENY"))
    assert result.ok and loads.source.last_error is None
    assert "shop/deny-more" in loads.store.snapshot().authorization_policies


def test_a_syntax_error_in_one_document_holds_removals_and_the_rest_applies(tmp_path: Path) -> None:
    """Other documents are still read (split where the YAML parser splits); since the broken
    one may be where an object in force is declared, nothing is removed in that load."""
    loads = Loads(tmp_path, BASE)
    broken = BASE.replace(
        DENY, "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: [\n"
    )
    with capture_logs() as logs:
        result = loads.reload(broken.replace("10.0.1.2", "10.0.1.6"))
    [r] = result.rejected
    assert r.object is None and "invalid YAML at line" in r.error.reason and r.error.document_index == 3
    snap = loads.store.snapshot()
    assert "shop/deny-evil" in snap.authorization_policies  # held
    assert snap.workload_by_ip("10.0.1.6") is not None  # applied
    assert any("nothing removed" in e["event"] for e in logs)
    # Clean again: now the file's removals apply.
    result = loads.reload("---\n".join([NODES, POD, SERVICE]))
    assert result.ok
    assert "shop/deny-evil" not in loads.store.snapshot().authorization_policies


def test_a_file_nothing_can_be_read_from_is_refused_whole(tmp_path: Path) -> None:
    loads = Loads(tmp_path, BASE)
    before = loads.store.snapshot()
    result = loads.reload("kind: [\n---\n- a list\n")
    assert result.error is not None and not result.applied and len(result.rejected) == 2
    assert loads.store.snapshot() is before


def test_a_garbled_kind_in_security_istio_io_never_deletes_the_policy(tmp_path: Path) -> None:
    loads = Loads(tmp_path, BASE)
    result = loads.reload(BASE.replace("kind: AuthorizationPolicy", "kind: AuthorisationPolicy"))
    [r] = result.rejected
    assert r.error.field == "kind" and "has no kind 'AuthorisationPolicy'" in r.error.reason
    assert "shop/deny-evil" in loads.store.snapshot().authorization_policies


def test_a_garbled_api_version_keeps_the_last_good_version(tmp_path: Path) -> None:
    loads = Loads(tmp_path, BASE)
    result = loads.reload(BASE.replace("security.istio.io/v1\n", "security.istio.io/v1beta\n"))
    [r] = result.rejected
    assert r.error.field == "apiVersion" and r.kept
    assert "shop/deny-evil" in loads.store.snapshot().authorization_policies


def test_the_newer_of_two_duplicates_is_rejected_and_the_one_in_force_stays(tmp_path: Path) -> None:
    loads = Loads(tmp_path, BASE)
    # A second DENY of the same name, placed first in the file, and changed: it is the newer.
    other = DENY.replace("[evil]", "[other]")
    result = loads.reload(other + "---\n" + BASE)
    [r] = result.rejected
    assert (r.error.document_index, r.error.field) == (0, "metadata.name")
    assert "duplicate of AuthorizationPolicy shop/deny-evil (document[4])" in r.error.reason
    deny = loads.store.snapshot().authorization_policies["shop/deny-evil"]
    assert deny.rules[0].from_[0].source.namespaces == ("evil",)


def test_a_pod_taking_another_pods_ip_is_rejected_and_keeps_its_own(tmp_path: Path) -> None:
    second = POD.replace("name: web,", "name: api,").replace("10.0.1.2", "10.0.1.3")
    loads = Loads(tmp_path, BASE + "---\n" + second)
    # api moves onto web's IP, and comes first in the file: web, unchanged, keeps it.
    result = loads.reload(second.replace("10.0.1.3", "10.0.1.2") + "---\n" + BASE)
    [r] = result.rejected
    assert r.error.name == "shop/api" and r.error.field == "status.podIP" and r.kept
    assert "10.0.1.2 is already the IP of Pod shop/web (document[3])" in r.error.reason
    snap = loads.store.snapshot()
    api, web = snap.workload_by_name("shop", "api"), snap.workload_by_name("shop", "web")
    assert api is not None and api.ips == ("10.0.1.3",)
    assert web is not None and web.ips == ("10.0.1.2",)


def test_a_pod_moved_to_an_unknown_node_keeps_its_last_good_node(tmp_path: Path) -> None:
    loads = Loads(tmp_path, BASE)
    result = loads.reload(BASE.replace("spec: {nodeName: node-a,", "spec: {nodeName: node-q,"))
    [r] = result.rejected
    assert r.error.field == "spec.nodeName" and "no Node named 'node-q'" in r.error.reason and r.kept
    web = loads.store.snapshot().workload_by_name("shop", "web")
    assert web is not None and web.node == "node-a"
    # The node it was on removed too: nowhere to keep it, so it goes (not a policy: fail closed).
    without_a = BASE.replace("apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\n---\n", "")
    result = loads.reload(without_a)
    [r] = result.rejected
    assert not r.kept and loads.store.snapshot().workload_by_name("shop", "web") is None


def test_parse_manifest_stays_all_or_nothing() -> None:
    with pytest.raises(ConfigError, match="unknown field 'rulez'"):
        parse_manifest(BASE.replace("  rules:\n", "  rulez:\n"))
