"""Node authorization as a pure function: every rule of PROTOCOLS.md, one row each."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import pytest

from controlplane.auth import Caller
from controlplane.ca import authorize
from mesh.identity import Identity
from mesh.model import Store
from tests.controlplane.meshdata import CACHE, DB, TD, WEB, ZTUNNEL, load, manifest, pod

OK = grpc.StatusCode.OK
DENIED = grpc.StatusCode.PERMISSION_DENIED

LOCAL_A = Caller("istio-system", "ztunnel", node="node-a", source="local")
LOCAL_B = Caller("istio-system", "ztunnel", node="node-b", source="local")
K8S_A = Caller("istio-system", "ztunnel", "ztunnel-a", "uid-zt-a", "node-a", source="kubernetes")
WEB_CALLER = Caller("shop", "web", node="node-a", source="local")
K8S_WEB = Caller("shop", "web", "web-1", "some-uid", "node-a", source="kubernetes")


@dataclass(frozen=True)
class Case:
    name: str
    caller: Caller
    requested: Identity
    code: grpc.StatusCode
    reason: str = ""  # a fragment the reason must contain
    node: str | None = None


CASES = [
    # Local mode: the node comes from the verified token.
    Case("local node gets a pod on its node", LOCAL_A, WEB, OK, "node 'node-a'", "node-a"),
    Case("local node gets an SA running on both nodes", LOCAL_A, CACHE, OK, node="node-a"),
    Case("local node B gets its own pods", LOCAL_B, DB, OK, node="node-b"),
    Case("identity only on another node", LOCAL_A, DB, DENIED, "scheduled on node 'node-a'", "node-a"),
    Case("identity on no node at all", LOCAL_A, Identity(TD, "shop", "ghost"), DENIED, "'ghost'"),
    Case("other namespace, same SA name", LOCAL_A, Identity(TD, "other", "web"), DENIED, "'other'"),
    Case(
        "node not in the mesh",
        Caller("istio-system", "ztunnel", node="node-z", source="local"),
        WEB,
        DENIED,
        "'node-z' is not part of the mesh",
    ),
    Case(
        "local node token without a node",
        Caller("istio-system", "ztunnel", source="local"),
        WEB,
        DENIED,
        "names no node",
    ),
    Case("node proxy's own identity", LOCAL_A, ZTUNNEL, OK, "own identity"),
    Case("other trust domain", LOCAL_A, Identity("evil.org", "shop", "web"), DENIED, "trust domain"),
    # Non-node callers: only their own identity.
    Case("workload gets its own identity", WEB_CALLER, WEB, OK, "own identity"),
    Case("workload asks for another SA", WEB_CALLER, CACHE, DENIED, "may only obtain its own identity"),
    Case("k8s workload asks for another SA", K8S_WEB, DB, DENIED, "may only obtain its own identity"),
    Case(
        "an SA named ztunnel elsewhere is not trusted",
        Caller("shop", "ztunnel", node="node-a", source="local"),
        WEB,
        DENIED,
        "may only obtain its own identity",
    ),
    # Kubernetes mode: the node is the caller pod's spec.nodeName.
    Case("k8s node gets a pod on its node", K8S_A, WEB, OK, node="node-a"),
    Case("k8s node, identity on another node", K8S_A, DB, DENIED, "scheduled on node 'node-a'", "node-a"),
    Case(
        "k8s caller pod missing",
        Caller("istio-system", "ztunnel", "ztunnel-x", "uid-x", "node-a", source="kubernetes"),
        WEB,
        DENIED,
        "ztunnel-x does not exist",
    ),
    Case(
        "k8s caller pod recreated (uid differs)",
        Caller("istio-system", "ztunnel", "ztunnel-a", "uid-old", "node-a", source="kubernetes"),
        WEB,
        DENIED,
        "uid",
    ),
    Case(
        "k8s token claims a node its pod is not on",
        Caller("istio-system", "ztunnel", "ztunnel-b", "uid-zt-b", "node-a", source="kubernetes"),
        WEB,
        DENIED,
        "token says node 'node-a'",
    ),
    Case(
        "k8s node claim is never trusted: pod's node decides",
        Caller("istio-system", "ztunnel", "ztunnel-b", "uid-zt-b", None, source="kubernetes"),
        WEB,
        DENIED,
        "scheduled on node 'node-b'",
        "node-b",
    ),
    Case(
        "k8s token without pod binding",
        Caller("istio-system", "ztunnel", node="node-a", source="kubernetes"),
        WEB,
        DENIED,
        "not bound to a pod",
    ),
    Case(
        "k8s token with pod name but no uid",
        Caller("istio-system", "ztunnel", "ztunnel-a", None, "node-a", source="kubernetes"),
        WEB,
        DENIED,
        "lacks its name or uid",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_authorize(case: Case, store: Store) -> None:
    d = authorize(case.caller, case.requested, store.snapshot(), trust_domain=TD)
    assert d.code == case.code, d.reason
    assert d.allowed == (case.code == OK)
    assert case.reason in d.reason
    if case.node is not None:
        assert d.node == case.node


def test_caller_pod_with_wrong_service_account(store: Store) -> None:
    load(
        store,
        manifest(
            **{"ztunnel-a": pod("ztunnel-a", "node-a", "default", "10.0.1.100", "istio-system", "uid-zt-a")}
        ),
    )
    d = authorize(K8S_A, WEB, store.snapshot(), trust_domain=TD)
    assert not d.allowed and "service account 'default'" in d.reason


def test_deleted_pod_takes_the_permission_with_it(store: Store) -> None:
    assert authorize(LOCAL_A, WEB, store.snapshot(), trust_domain=TD).allowed
    load(store, manifest(**{"web-1": None}))
    assert not authorize(LOCAL_A, WEB, store.snapshot(), trust_domain=TD).allowed


def test_pod_moving_between_nodes_moves_the_permission(store: Store) -> None:
    load(store, manifest(**{"web-1": pod("web-1", "node-b", "web", "10.0.1.2")}))
    snap = store.snapshot()
    assert not authorize(LOCAL_A, WEB, snap, trust_domain=TD).allowed
    assert authorize(LOCAL_B, WEB, snap, trust_domain=TD).allowed


def test_one_of_two_pods_leaving_keeps_the_other_nodes_permission(store: Store) -> None:
    load(store, manifest(**{"cache-a": None}))
    snap = store.snapshot()
    assert not authorize(LOCAL_A, CACHE, snap, trust_domain=TD).allowed
    assert authorize(LOCAL_B, CACHE, snap, trust_domain=TD).allowed


def test_trusted_node_accounts_are_configurable(store: Store) -> None:
    custom = Caller("mesh-system", "node-proxy", node="node-a", source="local")
    snap = store.snapshot()
    assert not authorize(custom, WEB, snap, trust_domain=TD).allowed
    assert authorize(
        custom, WEB, snap, trust_domain=TD, trusted_node_accounts=frozenset({("mesh-system", "node-proxy")})
    ).allowed
    # ... and the default account loses its power when not listed.
    assert not authorize(
        LOCAL_A, WEB, snap, trust_domain=TD, trusted_node_accounts=frozenset({("mesh-system", "node-proxy")})
    ).allowed


def test_unscheduled_caller_pod(store: Store) -> None:
    text = manifest().replace(
        "metadata: {name: ztunnel-a, namespace: istio-system, uid: uid-zt-a}\nspec: {nodeName: node-a, ",
        "metadata: {name: ztunnel-a, namespace: istio-system, uid: uid-zt-a}\nspec: {",
    )
    load(store, text)
    d = authorize(K8S_A, WEB, store.snapshot(), trust_domain=TD)
    assert not d.allowed and "not scheduled" in d.reason
