"""Waypoint binding beyond Istio's labels: per-service-account waypoints, strict mode, policy audiences."""

from __future__ import annotations

import dataclasses

from controlplane.lowering import service_state, workload_state
from controlplane.waypoints import (
    is_waypoint_pod,
    policy_audiences,
    service_waypoint,
    waypoint_account,
    workload_binding,
)
from mesh.model import (
    AuthorizationPolicy,
    Gateway,
    MeshObject,
    Namespace,
    Snapshot,
    Store,
    WaypointRef,
)
from mesh.model.policy import PolicyTargetRef, WorkloadSelector
from mesh.xds.state import GatewayAddress
from tests.xds.helpers import namespace, pod, service, waypoint_gateway


def snapshot_of(*objects: MeshObject) -> Snapshot:
    store = Store()
    store.replace_all(objects)
    return store.snapshot()


def account_gateway(name: str, sa: str, waypoint_for: str = "service", ns: str = "shop") -> Gateway:
    gw = waypoint_gateway(name, ns, waypoint_for)
    return dataclasses.replace(gw, annotations={"ambient-mesh.io/for-service-account": sa})


def address(name: str, ns: str = "shop") -> GatewayAddress:
    return GatewayAddress(namespace=ns, hostname=f"{name}.{ns}.svc.cluster.local")


def strict_namespace(ref: WaypointRef | None = None) -> Namespace:
    return Namespace(name="shop", waypoint=ref, annotations={"ambient-mesh.io/waypoint-mode": "strict"})


# --- per-service-account waypoints ----------------------------------------------------------


def test_an_account_waypoint_binds_only_its_accounts_workloads() -> None:
    web = pod("web-1", "10.0.0.1", sa="web", labels={"app": "web"})
    cart = pod("cart-1", "10.0.0.2", sa="cart", labels={"app": "web"})  # same service, other account
    svc = service("web")
    snap = snapshot_of(namespace(), account_gateway("wp-web", "web"), web, cart, svc)
    got = workload_state(web, snap)
    assert got.waypoint == address("wp-web") and got.waypoint_account_for == "service"
    assert workload_state(cart, snap).waypoint is None
    # The service gets no waypoint: the source picks the endpoint first, then its waypoint.
    assert service_state(svc, snap).waypoint is None
    assert service_waypoint(svc, snap) is None


def test_account_waypoint_beats_the_namespace_label_but_not_the_pods() -> None:
    ns_wp = WaypointRef("ns-wp", "shop")
    objects = (
        namespace("shop", ns_wp),
        waypoint_gateway("ns-wp", waypoint_for="all"),
        account_gateway("wp-web", "web", "all"),
    )
    web = pod("web-1", sa="web")
    assert workload_binding(web, snapshot_of(*objects, web)).ref == WaypointRef("wp-web", "shop")
    other = pod("other-1", "10.0.0.3", sa="other")
    assert workload_binding(other, snapshot_of(*objects, other)).ref == ns_wp
    pinned = pod("web-2", "10.0.0.4", sa="web", waypoint=ns_wp)
    b = workload_binding(pinned, snapshot_of(*objects, pinned))
    assert b.ref == ns_wp and b.account_for == ""
    opted_out = pod("web-3", "10.0.0.5", sa="web", waypoint=WaypointRef("none", "shop"))
    assert workload_binding(opted_out, snapshot_of(*objects, opted_out)).ref is None


def test_a_label_naming_another_accounts_waypoint_is_not_used() -> None:
    ref = WaypointRef("wp-web", "shop")
    cart = pod("cart-1", sa="cart", waypoint=ref)
    b = workload_binding(cart, snapshot_of(namespace(), account_gateway("wp-web", "web", "all"), cart))
    assert b.ref is None and b.problem == "waypoint shop/wp-web serves only service account 'web'"


def test_a_service_labelled_with_an_account_waypoint_gets_none() -> None:
    ref = WaypointRef("wp-web", "shop")
    svc = service("web", waypoint=ref)
    assert (
        service_waypoint(svc, snapshot_of(namespace(), account_gateway("wp-web", "web", "all"), svc)) is None
    )


def test_waypoint_pods_and_their_service_are_never_bound() -> None:
    ref = WaypointRef("waypoint", "shop")
    wp_pod = pod("waypoint-0", sa="waypoint", labels={"gateway.networking.k8s.io/gateway-name": "waypoint"})
    wp_svc = service("waypoint", selector={"gateway.networking.k8s.io/gateway-name": "waypoint"})
    snap = snapshot_of(namespace("shop", ref), waypoint_gateway(waypoint_for="all"), wp_pod, wp_svc)
    assert is_waypoint_pod(wp_pod, snap)
    assert workload_binding(wp_pod, snap).ref is None
    assert service_waypoint(wp_svc, snap) is None
    assert waypoint_account(ref) == ("shop", "waypoint")


# --- strict waypoint mode -------------------------------------------------------------------


def test_strict_mode_sends_the_waypoint_for_every_kind_of_traffic() -> None:
    ref = WaypointRef("waypoint", "shop")
    web = pod("web-1")
    # A service-only waypoint: pod-addressed traffic would skip it in Istio; strict mode does not.
    snap = snapshot_of(strict_namespace(ref), waypoint_gateway(waypoint_for="service"), web)
    got = workload_state(web, snap)
    assert got.waypoint == address("waypoint") and got.waypoint_strict
    plain = snapshot_of(namespace("shop", ref), waypoint_gateway(waypoint_for="service"), web)
    assert workload_state(web, plain).waypoint is None and not workload_state(web, plain).waypoint_strict


def test_strict_mode_fails_closed_when_the_waypoint_is_missing() -> None:
    ref = WaypointRef("waypoint", "shop")
    web = pod("web-1")
    b = workload_binding(web, snapshot_of(strict_namespace(ref), web))
    assert b.ref == ref and b.strict and b.problem == "waypoint shop/waypoint does not exist"
    # Without strict mode a missing waypoint fails open: nothing is sent.
    assert workload_binding(web, snapshot_of(namespace("shop", ref), web)).ref is None


def test_the_pods_annotation_overrides_the_namespaces_mode() -> None:
    ref = WaypointRef("waypoint", "shop")
    web = dataclasses.replace(pod("web-1"), annotations={"ambient-mesh.io/waypoint-mode": "default"})
    snap = snapshot_of(strict_namespace(ref), waypoint_gateway(waypoint_for="all"), web)
    assert not workload_binding(web, snap).strict
    lone = dataclasses.replace(
        pod("web-2", "10.0.0.2"), annotations={"ambient-mesh.io/waypoint-mode": "strict"}
    )
    b = workload_binding(lone, snapshot_of(namespace(), lone))
    assert b.strict and b.ref is None and b.problem == "strict waypoint mode without a waypoint"


# --- which waypoints receive which policy ---------------------------------------------------------


def targeted(name: str, *refs: PolicyTargetRef, ns: str = "shop") -> AuthorizationPolicy:
    return AuthorizationPolicy(namespace=ns, name=name, target_refs=refs)


def test_policy_audiences() -> None:
    web, cart = pod("web-1", sa="web"), pod("cart-1", "10.0.0.2", sa="cart", labels={"app": "cart"})
    objects = (
        namespace("shop", WaypointRef("waypoint", "shop")),
        waypoint_gateway(waypoint_for="service"),
        account_gateway("wp-cart", "cart"),
        waypoint_gateway("other", "other"),
        web,
        cart,
        service("web"),
        service("cart", "10.96.0.2"),
    )
    policies = (
        targeted("on-gw", PolicyTargetRef("Gateway", "waypoint", "gateway.networking.k8s.io")),
        targeted("on-web", PolicyTargetRef("Service", "web")),
        targeted("on-cart", PolicyTargetRef("Service", "cart")),
        targeted("elsewhere", PolicyTargetRef("Gateway", "other", namespace="other")),
        targeted("mesh", PolicyTargetRef("GatewayClass", "istio-waypoint"), ns="istio-system"),
        AuthorizationPolicy(namespace="shop", name="selector", selector=WorkloadSelector({"app": "web"})),
    )
    got = policy_audiences(policies, snapshot_of(*objects))
    assert got == {
        "shop/on-gw": {"shop/waypoint"},
        "shop/on-web": {"shop/waypoint"},
        # cart's endpoints run as cart: its account waypoint takes cart's service traffic.
        "shop/on-cart": {"shop/waypoint", "shop/wp-cart"},
        "shop/elsewhere": set(),  # a target in another namespace binds nothing
        "istio-system/mesh": {"shop/waypoint", "shop/wp-cart", "other/other"},
    }


def test_the_control_plane_says_once_why_a_named_waypoint_is_not_used() -> None:
    from structlog.testing import capture_logs

    from controlplane.xds import ResourceCache

    store = Store()
    ref = WaypointRef("ghost", "shop")
    store.replace_all([namespace("shop", ref), pod("web-1")])
    with capture_logs() as logs:
        cache = ResourceCache(store)
        store.upsert(pod("web-2", "10.0.0.2"))
        cache.current()
    cache.close()
    lines = [(e["workload"], e["reason"]) for e in logs if e["event"] == "waypoint binding not used"]
    assert lines == [(f"shop/web-{i}", "waypoint shop/ghost does not exist") for i in (1, 2)]
