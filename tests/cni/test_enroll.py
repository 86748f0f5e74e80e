"""Enrollment decisions: a table of cases, plus a property test that decide() never raises."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cni.enroll import REDIRECTION_ANNOTATION, Decision, decide, decide_node
from mesh.model import Namespace, Store, Workload
from sources.local import parse_manifest

NODE = "node-a"
AMBIENT = {"istio.io/dataplane-mode": "ambient"}
NONE = {"istio.io/dataplane-mode": "none"}
SIDECAR = {"sidecar.istio.io/status": '{"containers":["istio-proxy"]}'}


def pod(
    *,
    ns: str = "shop",
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    node: str = NODE,
    host_network: bool = False,
) -> Workload:
    return Workload(
        uid=f"{ns}-web",
        name="web",
        namespace=ns,
        node=node,
        labels=labels or {},
        annotations=annotations or {},
        host_network=host_network,
    )


CASES = [
    # (id, namespace labels or None for no Namespace object, pod kwargs, enrolled, reason fragment)
    ("ns-ambient", AMBIENT, {}, True, "namespace label"),
    ("pod-ambient-plain-ns", {}, {"labels": AMBIENT}, True, "pod label"),
    ("pod-ambient-no-ns-object", None, {"labels": AMBIENT}, True, "pod label"),
    ("nothing-labelled", {}, {}, False, "neither"),
    ("no-ns-object-no-label", None, {}, False, "neither"),
    ("pod-none-in-ambient-ns", AMBIENT, {"labels": NONE}, False, "opts out"),
    ("pod-none-plain-ns", {}, {"labels": NONE}, False, "opts out"),
    ("ns-none-pod-ambient", NONE, {"labels": AMBIENT}, True, "pod label"),
    ("ns-other-value", {"istio.io/dataplane-mode": "sidecar"}, {}, False, "neither"),
    ("pod-other-value-ambient-ns", AMBIENT, {"labels": {"istio.io/dataplane-mode": "x"}}, True, "namespace"),
    ("host-network", AMBIENT, {"host_network": True}, False, "hostNetwork"),
    ("host-network-pod-label", {}, {"host_network": True, "labels": AMBIENT}, False, "hostNetwork"),
    ("sidecar", AMBIENT, {"annotations": SIDECAR}, False, "sidecar"),
    ("sidecar-pod-label", {}, {"annotations": SIDECAR, "labels": AMBIENT}, False, "sidecar"),
    ("tlsmode-label-only", AMBIENT, {"labels": {"security.istio.io/tlsMode": "istio"}}, True, "namespace"),
    ("kube-system", AMBIENT, {"ns": "kube-system"}, False, "kube-system"),
    ("kube-system-pod-label", AMBIENT, {"ns": "kube-system", "labels": AMBIENT}, False, "kube-system"),
    ("other-node", AMBIENT, {"node": "node-b"}, False, "node-b"),
    ("unscheduled", AMBIENT, {"node": ""}, False, "unscheduled"),
    (
        "redirection-disabled",
        AMBIENT,
        {"annotations": {REDIRECTION_ANNOTATION: "disabled"}},
        False,
        "disabled",
    ),
    ("already-enabled", AMBIENT, {"annotations": {REDIRECTION_ANNOTATION: "enabled"}}, True, "namespace"),
]


@pytest.mark.parametrize(
    ("ns_labels", "pod_kwargs", "enrolled", "reason"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_decide(
    ns_labels: dict[str, str] | None, pod_kwargs: dict[str, object], enrolled: bool, reason: str
) -> None:
    p = pod(**pod_kwargs)  # type: ignore[arg-type]
    namespace = None if ns_labels is None else Namespace(name=p.namespace, labels=ns_labels)
    d = decide(namespace, p, NODE)
    assert d.enrolled is enrolled
    assert reason in d.reason
    assert d.annotations == ({REDIRECTION_ANNOTATION: "enabled"} if enrolled else {})


def test_decision_is_frozen() -> None:
    d = Decision(True, "x")
    with pytest.raises(AttributeError):
        d.enrolled = False  # type: ignore[misc]


_keys = st.sampled_from(
    [
        "istio.io/dataplane-mode",
        "sidecar.istio.io/status",
        "security.istio.io/tlsMode",
        REDIRECTION_ANNOTATION,
        "app",
    ]
)
_values = st.one_of(
    st.sampled_from(["ambient", "none", "enabled", "disabled", "istio", ""]), st.text(max_size=8)
)
_maps = st.dictionaries(_keys, _values, max_size=5)


@given(
    ns_labels=st.one_of(st.none(), _maps),
    labels=_maps,
    annotations=_maps,
    ns=st.sampled_from(["shop", "kube-system", "istio-system"]),
    node=st.sampled_from([NODE, "node-b", ""]),
    host_network=st.booleans(),
)
def test_decide_never_raises(
    ns_labels: dict[str, str] | None,
    labels: dict[str, str],
    annotations: dict[str, str],
    ns: str,
    node: str,
    host_network: bool,
) -> None:
    p = pod(ns=ns, labels=labels, annotations=annotations, node=node, host_network=host_network)
    namespace = None if ns_labels is None else Namespace(name=ns, labels=ns_labels)
    d = decide(namespace, p, NODE)
    assert isinstance(d.enrolled, bool) and d.reason
    if d.enrolled:  # no label can pull an excluded pod in
        assert node == NODE and not host_network and ns != "kube-system"
        assert "sidecar.istio.io/status" not in annotations
        assert labels.get("istio.io/dataplane-mode") != "none"


MANIFEST = """
apiVersion: v1
kind: Node
metadata: {name: node-a}
---
apiVersion: v1
kind: Node
metadata: {name: node-b}
---
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, uid: u-web}
spec: {nodeName: node-a}
status: {podIP: 10.0.1.2}
---
apiVersion: v1
kind: Pod
metadata: {name: opt-out, namespace: shop, uid: u-opt, labels: {istio.io/dataplane-mode: none}}
spec: {nodeName: node-a}
status: {podIP: 10.0.1.3}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: plain, uid: u-db}
spec: {nodeName: node-a}
status: {podIP: 10.0.1.4}
---
apiVersion: v1
kind: Pod
metadata: {name: web-b, namespace: shop, uid: u-web-b}
spec: {nodeName: node-b}
status: {podIP: 10.0.2.2}
"""


def test_decide_node_from_local_yaml() -> None:
    store = Store()
    store.replace_all(parse_manifest(MANIFEST))
    decisions = decide_node(store.snapshot(), NODE)
    assert {uid: d.enrolled for uid, d in decisions.items()} == {"u-web": True, "u-opt": False, "u-db": False}
