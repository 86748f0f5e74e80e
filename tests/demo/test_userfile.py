"""``localmesh.userfile``: a user's YAML → what ``mesh up`` builds (pure, no root needed)."""

from __future__ import annotations

import pytest
import yaml

from ambientctl.localmesh.userfile import NOBODY, doc_key, load_documents, merge, plan
from sources.convert import ConfigError

NODES = """\
apiVersion: v1
kind: Node
metadata: {name: node-a}
---
apiVersion: v1
kind: Node
metadata: {name: node-b}
spec: {podCIDR: 10.20.0.0/16}
---
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
"""


def pod(name: str, node: str = "node-a", extra: str = "", ns: str = "shop") -> str:
    return f"---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  nodeName: {node}\n{extra}"


def test_fills_in_node_cidrs_and_pod_addresses_and_reads_containers() -> None:
    extra = (
        "  securityContext: {runAsUser: 1000}\n"
        "  containers:\n"
        "  - name: a\n    command: [python3, -m, http.server]\n    args: ['8080']\n"
        "    env: [{name: X, value: 'y'}]\n"
        "  - name: b\n    command: [sleep, '1']\n    securityContext: {runAsUser: 0}\n"
    )
    text = NODES + pod("web", extra=extra) + pod("db", "node-b") + pod("old", ns="legacy")
    p = plan(text, "f.yaml")
    assert [(n.name, n.cidr) for n in p.nodes] == [("node-a", "10.0.1.0/24"), ("node-b", "10.20.0.0/16")]
    web, db, old = p.pods
    assert (web.ip, db.ip, old.ip) == ("10.0.1.2", "10.20.0.2", "10.0.1.3")
    assert web.enrolled and db.enrolled and not old.enrolled
    a, b = web.containers
    assert a.argv == ("python3", "-m", "http.server", "8080") and (a.uid, a.gid) == (1000, NOBODY)
    assert a.env == (("X", "y"),)
    assert (b.uid, b.gid) == (0, 0)  # the container's runAsUser wins over the pod's
    assert web.user == (1000, NOBODY)
    assert db.containers == () and db.user == (NOBODY, NOBODY)
    # The mesh's copy carries what was filled in, for the control plane and the supervisor.
    docs = list(yaml.safe_load_all(p.text))
    assert docs[0]["spec"]["podCIDR"] == "10.0.1.0/24"
    assert [d["status"]["podIP"] for d in docs if d["kind"] == "Pod"] == ["10.0.1.2", "10.20.0.2", "10.0.1.3"]


def test_a_pod_keeps_its_address_when_applied_again() -> None:
    first = plan(NODES + pod("a") + pod("b"), "f")
    again = plan(NODES + pod("b"), "f", previous=first)
    assert again.pod("shop/b") is not None and again.pod("shop/b").ip == first.pod("shop/b").ip  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("text", "where"),
    [
        (NODES + pod("w", extra="  containers:\n  - {name: c, command: sleep 1}\n"),
         "document[3] (Pod shop/w): spec.containers[0].command: must be a list of strings"),
        (NODES + pod("w", extra="  containers:\n  - {name: c, args: ['1']}\n"),
         "document[3] (Pod shop/w): spec.containers[0].command: args without command"),
        (NODES + pod("w", extra="  securityContext: {runAsUser: root}\n"),
         "document[3] (Pod shop/w): spec.securityContext.runAsUser"),
        (NODES + pod("w", extra="  containers:\n  - {name: c, command: [x], env: [{name: A, valueFrom: {}}]}\n"),
         "spec.containers[0].env[0].valueFrom: valueFrom is not supported"),
        (NODES + pod("w", "node-c"), "document[3] (Pod shop/w): spec.nodeName"),
        (NODES + pod("w").replace("metadata: {name: w", "status: {podIP: 10.9.9.9}\nmetadata: {name: w"),
         "document[3] (Pod shop/w): status.podIP: 10.9.9.9 is not a pod address of node node-a"),
        (NODES.replace("10.20.0.0/16", "10.0.254.0/24"), "document[1] (Node node-b): spec.podCIDR: 10.0.254.0/24 overlaps"),
        (NODES + pod("w", extra="  hostNetwork: true\n"), "spec.hostNetwork"),
    ],
)  # fmt: skip
def test_bad_input_names_document_and_field(text: str, where: str) -> None:
    with pytest.raises(ConfigError) as e:
        plan(text, "f.yaml")
    assert where in str(e.value)
    assert str(e.value).startswith("f.yaml: ")


def test_apply_cannot_change_the_nodes() -> None:
    first = plan(NODES, "f")
    with pytest.raises(ConfigError, match="cannot add, remove or change Nodes"):
        plan(NODES.replace("10.20.0.0/16", "10.30.0.0/16"), "f", previous=first)


def test_merge_replaces_by_kind_namespace_name_and_appends_the_rest() -> None:
    current = load_documents(NODES + pod("a") + pod("b"), "f")
    new = load_documents(pod("b", "node-b") + pod("c"), "g")
    merged = merge(current, new)
    assert [doc_key(d) for d in merged][3:] == [
        ("Pod", "shop", "a"),
        ("Pod", "shop", "b"),
        ("Pod", "shop", "c"),
    ]
    assert merged[4]["spec"]["nodeName"] == "node-b"
    assert doc_key({"kind": "Namespace", "metadata": {"name": "x", "namespace": "y"}}) == (
        "Namespace",
        "",
        "x",
    )
    assert doc_key({"kind": "Pod", "metadata": {"name": "x"}}) == ("Pod", "default", "x")
