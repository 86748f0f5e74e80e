"""Kubernetes model -> what a node proxy is sent: workloads, services, waypoints, policy lists.

The AuthorizationPolicy / PeerAuthentication lowering itself is table-tested in
tests/xds/test_policy.py; here: which of them each workload lists, and every other field.
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.lowering import (
    CLUSTER_ID,
    PeerAuthenticationIndex,
    SelectorPolicy,
    SelectorPolicyIndex,
    app_protocol,
    canonical_name,
    canonical_revision,
    gateway_address,
    service_state,
    workload_state,
)
from controlplane.waypoints import service_waypoint, workload_binding
from mesh.model import (
    Gateway,
    MeshObject,
    MtlsMode,
    PeerAuthentication,
    ServicePort,
    Snapshot,
    Store,
    TunnelProtocol,
    WaypointRef,
    Workload,
    WorkloadSelector,
    WorkloadStatus,
)
from mesh.xds import state
from mesh.xds.state import AppProtocol, GatewayAddress, Port
from tests.xds.helpers import namespace, pod, service, waypoint_gateway

STATIC_STRICT = "istio-system/istio_converted_static_strict"
WEB_KEY = "shop/web.shop.svc.cluster.local"
WP = WaypointRef("waypoint", "shop")
WP_ADDRESS = GatewayAddress(namespace="shop", hostname="waypoint.shop.svc.cluster.local")


def snapshot_of(*objects: MeshObject) -> Snapshot:
    store = Store()
    store.replace_all(objects)
    return store.snapshot()


# --- workloads -----------------------------------------------------------------------------


def test_workload_fields() -> None:
    w = dataclasses.replace(
        pod(
            "web-1", "10.0.1.5", sa="web", labels={"app": "web", "version": "v2"}, named_ports={"http": 8080}
        ),
        ips=("10.0.1.5", "fd00::5"),
        network="net-1",
        trust_domain="example.org",
        status=WorkloadStatus.UNHEALTHY,
        host_network=True,
    )
    got = workload_state(w, snapshot_of(w))
    assert got == state.Workload(
        uid="uid-shop-web-1",
        name="web-1",
        namespace="shop",
        addresses=("10.0.1.5", "fd00::5"),
        node="node-a",
        network="net-1",
        tunnel_protocol=TunnelProtocol.HBONE,
        trust_domain="example.org",
        service_account="web",
        waypoint=None,
        services={},
        authorization_policies=(),
        status=WorkloadStatus.UNHEALTHY,
        canonical_name="web",
        canonical_revision="v2",
        workload_name="web-1",
        cluster_id=CLUSTER_ID,
        host_network=True,
    )
    assert got.identity == w.identity


@pytest.mark.parametrize(
    ("labels", "name", "revision"),
    [
        (
            {
                "service.istio.io/canonical-name": "c",
                "app.kubernetes.io/name": "k",
                "app": "a",
                "service.istio.io/canonical-revision": "r1",
                "app.kubernetes.io/version": "r2",
                "version": "r3",
            },
            "c",
            "r1",
        ),
        (
            {"app.kubernetes.io/name": "k", "app": "a", "app.kubernetes.io/version": "r2", "version": "r3"},
            "k",
            "r2",
        ),
        ({"app": "a", "version": "r3"}, "a", "r3"),
        ({"other": "x"}, "web-1", "latest"),
    ],
)
def test_canonical_names(labels: dict[str, str], name: str, revision: str) -> None:
    w = pod("web-1", labels=labels)
    assert (canonical_name(w), canonical_revision(w)) == (name, revision)
    got = workload_state(w, snapshot_of(w))
    assert (got.canonical_name, got.canonical_revision) == (name, revision)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("http", AppProtocol.HTTP11),
        ("HTTP", AppProtocol.HTTP11),
        ("http2", AppProtocol.HTTP2),
        ("kubernetes.io/h2c", AppProtocol.HTTP2),
        ("grpc", AppProtocol.GRPC),
        ("tcp", AppProtocol.TCP),
        ("tls", AppProtocol.TLS),
        ("mongo", AppProtocol.UNKNOWN),
        (None, AppProtocol.UNKNOWN),
    ],
)
def test_app_protocol(name: str | None, expected: AppProtocol) -> None:
    assert app_protocol(name) is expected


@pytest.mark.parametrize(
    ("app_proto", "port_name", "expected"),
    [
        (None, "http", AppProtocol.HTTP11),
        (None, "http-web", AppProtocol.HTTP11),
        (None, "grpc-api", AppProtocol.GRPC),
        (None, "http2", AppProtocol.HTTP2),
        (None, "tcp-db", AppProtocol.TCP),
        (None, "web", AppProtocol.UNKNOWN),
        (None, "", AppProtocol.UNKNOWN),
        ("tcp", "http-web", AppProtocol.TCP),  # appProtocol wins over the name
        ("mongo", "http", AppProtocol.UNKNOWN),
    ],
)
def test_port_name_prefix_declares_the_protocol_without_app_protocol(
    app_proto: str | None, port_name: str, expected: AppProtocol
) -> None:
    assert app_protocol(app_proto, port_name) is expected


def test_services_map_resolves_named_target_ports_per_pod() -> None:
    a = pod("web-1", "10.0.1.5", labels={"app": "web"}, named_ports={"http": 8080})
    b = pod("web-2", "10.0.1.6", labels={"app": "web"}, named_ports={"http": 9090, "admin": 9901})
    c = pod("db-1", "10.0.1.7", labels={"app": "db"})
    elsewhere = pod("web-9", "10.0.9.9", ns="other", labels={"app": "web"}, named_ports={"http": 8080})
    web = service(
        "web",
        selector={"app": "web"},
        ports=(
            ServicePort(port=80, target_port="http", app_protocol="http"),
            ServicePort(port=81, target_port=9000, app_protocol="grpc"),
            ServicePort(port=82, target_port="admin"),
        ),
    )
    everything = service(
        "all", "10.96.0.2", selector={"app": "web"}, ports=(ServicePort(port=7, target_port=7),)
    )
    snap = snapshot_of(a, b, c, elsewhere, web, everything)

    # The named port resolves from each pod; one the pod does not declare is left out.
    assert workload_state(a, snap).services == {
        WEB_KEY: (Port(80, 8080, AppProtocol.HTTP11), Port(81, 9000, AppProtocol.GRPC)),
        "shop/all.shop.svc.cluster.local": (Port(7, 7),),
    }
    assert workload_state(b, snap).services[WEB_KEY] == (
        Port(80, 9090, AppProtocol.HTTP11),
        Port(81, 9000, AppProtocol.GRPC),
        Port(82, 9901),
    )
    assert workload_state(c, snap).services == {}
    assert workload_state(elsewhere, snap).services == {}  # a service selects in its own namespace

    svc = service_state(web, snap)
    assert svc == state.Service(
        name="web",
        namespace="shop",
        hostname="web.shop.svc.cluster.local",
        vips=("10.96.0.1",),
        # A named target is the workload's to say: 0.
        ports=(Port(80, 0, AppProtocol.HTTP11), Port(81, 9000, AppProtocol.GRPC), Port(82, 0)),
        waypoint=None,
    )
    assert svc.key == WEB_KEY
    # What routing asks of the pair: per-pod target ports.
    wa, wb = workload_state(a, snap), workload_state(b, snap)
    assert (wa.target_port(svc, 80), wb.target_port(svc, 80)) == (8080, 9090)
    assert (wa.target_port(svc, 82), wb.target_port(svc, 82)) == (None, 9901)


def test_headless_and_other_domain_services() -> None:
    svc = dataclasses.replace(service("db", selector={"app": "db"}), vips=(), cluster_domain="example.org")
    got = service_state(svc, snapshot_of(svc))
    assert got.vips == () and got.hostname == "db.shop.svc.example.org"
    assert got.key == "shop/db.shop.svc.example.org"
    w = pod("db-1", labels={"app": "db"})
    assert set(workload_state(w, snapshot_of(svc, w)).services) == {got.key}


# --- waypoints -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("waypoint_for", "for_workloads", "for_services"),
    [("service", False, True), ("workload", True, False), ("all", True, True), ("none", False, False)],
)
def test_gateway_waypoint_for_decides_what_it_serves(
    waypoint_for: str, for_workloads: bool, for_services: bool
) -> None:
    svc, w = service("web"), pod("web-1", labels={"app": "web"})
    snap = snapshot_of(namespace("shop", WP), waypoint_gateway(waypoint_for=waypoint_for), svc, w)
    assert workload_state(w, snap).waypoint == (WP_ADDRESS if for_workloads else None)
    assert service_state(svc, snap).waypoint == (WP_ADDRESS if for_services else None)
    assert (workload_binding(w, snap).ref is not None) is for_workloads
    assert (service_waypoint(svc, snap) is not None) is for_services


def test_own_label_beats_namespace_label() -> None:
    own = WaypointRef("own", "shop")
    snap_objects: tuple[MeshObject, ...] = (
        namespace("shop", WP),
        waypoint_gateway(waypoint_for="all"),
        waypoint_gateway("own", waypoint_for="all"),
    )
    w = pod("web-1", waypoint=own)
    svc = service("web", waypoint=own)
    snap = snapshot_of(*snap_objects, w, svc)
    own_address = GatewayAddress(namespace="shop", hostname="own.shop.svc.cluster.local")
    assert workload_state(w, snap).waypoint == own_address
    assert service_state(svc, snap).waypoint == own_address
    # Without its own label, the namespace's.
    plain = pod("web-2", "10.0.0.2")
    assert workload_state(plain, snapshot_of(*snap_objects, plain)).waypoint == WP_ADDRESS


def test_none_opts_out_of_the_namespace_waypoint() -> None:
    none = WaypointRef("none", "shop")
    w, svc = pod("web-1", waypoint=none), service("web", waypoint=none)
    snap = snapshot_of(namespace("shop", WP), waypoint_gateway(waypoint_for="all"), w, svc)
    assert workload_state(w, snap).waypoint is None
    assert service_state(svc, snap).waypoint is None


def test_waypoint_gateway_must_exist_and_be_a_waypoint() -> None:
    w, svc = pod("web-1"), service("web")
    # Missing: fails open, nothing is sent.
    snap = snapshot_of(namespace("shop", WP), w, svc)
    assert workload_state(w, snap).waypoint is None and service_state(svc, snap).waypoint is None
    # A Gateway of another class is not a waypoint.
    ingress = Gateway(
        namespace="shop", name="waypoint", gateway_class="istio", labels={"istio.io/waypoint-for": "all"}
    )
    snap = snapshot_of(namespace("shop", WP), ingress, w, svc)
    assert workload_state(w, snap).waypoint is None and service_state(svc, snap).waypoint is None
    # A waypoint in another namespace (istio.io/use-waypoint-namespace) is named there.
    ref = WaypointRef("shared", "infra")
    snap = snapshot_of(namespace("shop", ref), waypoint_gateway("shared", "infra", "all"), w, svc)
    shared = GatewayAddress(namespace="infra", hostname="shared.infra.svc.cluster.local")
    assert workload_state(w, snap).waypoint == shared and service_state(svc, snap).waypoint == shared
    assert shared.service_key == "infra/shared.infra.svc.cluster.local"


def test_waypoint_address_is_the_waypoint_services_hostname() -> None:
    wp_svc = dataclasses.replace(
        service("waypoint", "10.96.0.99", ports=(ServicePort(port=15008, target_port=15008),)),
        cluster_domain="example.org",
    )
    snap = snapshot_of(namespace("shop", WP), waypoint_gateway(), wp_svc)
    gw = gateway_address(WP, snap)
    assert gw == GatewayAddress(namespace="shop", hostname="waypoint.shop.svc.example.org", hbone_port=15008)
    # ... which is the key its service is sent under, so the proxy resolves it to the waypoint's pods.
    assert gw.service_key == service_state(wp_svc, snap).key


# --- authorization policies a workload lists ------------------------------------------------


def test_selector_policies_are_listed_by_the_workloads_they_select() -> None:
    w = pod("web-1", labels={"app": "web", "tier": "front"})
    policies = (
        SelectorPolicy("shop/only-web", "shop", WorkloadSelector({"app": "web"})),
        SelectorPolicy("shop/web-front", "shop", WorkloadSelector({"app": "web", "tier": "front"})),
        SelectorPolicy("shop/web-back", "shop", WorkloadSelector({"app": "web", "tier": "back"})),
        SelectorPolicy("shop/only-db", "shop", WorkloadSelector({"app": "db"})),
        SelectorPolicy("istio-system/mesh-web", "istio-system", WorkloadSelector({"app": "web"})),
        SelectorPolicy("other/web", "other", WorkloadSelector({"app": "web"})),
    )
    snap = snapshot_of(w)
    want = ("istio-system/mesh-web", "shop/only-web", "shop/web-front")
    assert workload_state(w, snap, policies).authorization_policies == want
    assert workload_state(w, snap, SelectorPolicyIndex(policies)).authorization_policies == want


@pytest.mark.parametrize(
    ("peer_authentications", "listed"),
    [
        ((), ()),  # default PERMISSIVE
        ((PeerAuthentication("shop", "default", mtls_mode=MtlsMode.STRICT),), (STATIC_STRICT,)),
        ((PeerAuthentication("shop", "default", mtls_mode=MtlsMode.PERMISSIVE),), ()),
        ((PeerAuthentication("istio-system", "default", mtls_mode=MtlsMode.STRICT),), (STATIC_STRICT,)),
        (
            (
                PeerAuthentication("istio-system", "default", mtls_mode=MtlsMode.STRICT),
                PeerAuthentication("shop", "default", mtls_mode=MtlsMode.PERMISSIVE),
            ),
            (),
        ),
        ((PeerAuthentication("other", "default", mtls_mode=MtlsMode.STRICT),), ()),
        (
            (
                PeerAuthentication("shop", "default", mtls_mode=MtlsMode.STRICT),
                PeerAuthentication(
                    "shop",
                    "web",
                    selector=WorkloadSelector({"app": "web"}),
                    port_level_mtls={8080: MtlsMode.PERMISSIVE},
                ),
            ),
            ("shop/converted_peer_authentication_web",),
        ),
        (
            (
                PeerAuthentication(
                    "shop",
                    "web",
                    selector=WorkloadSelector({"app": "web"}),
                    mtls_mode=MtlsMode.STRICT,
                ),
            ),
            (STATIC_STRICT,),
        ),
    ],
)
def test_peer_authentication_lists(
    peer_authentications: tuple[PeerAuthentication, ...], listed: tuple[str, ...]
) -> None:
    w = pod("web-1", labels={"app": "web"})
    index = PeerAuthenticationIndex(peer_authentications)
    got = workload_state(w, snapshot_of(w, *peer_authentications), (), index)
    assert got.authorization_policies == listed
    served = {a.key for a in index.authorizations()}
    assert set(listed) <= served  # every listed policy is served


def test_selector_and_peer_authentication_policies_together_sorted() -> None:
    w = pod("web-1", labels={"app": "web"})
    index = PeerAuthenticationIndex(
        [PeerAuthentication("istio-system", "default", mtls_mode=MtlsMode.STRICT)]
    )
    policies = (SelectorPolicy("shop/allow-web", "shop", WorkloadSelector({"app": "web"})),)
    got = workload_state(w, snapshot_of(w), policies, index)
    assert got.authorization_policies == (STATIC_STRICT, "shop/allow-web")


# The index only narrows the search: it must find exactly what checking every policy finds.
label_maps = st.dictionaries(st.sampled_from(["app", "tier", "v"]), st.sampled_from(["a", "b"]), max_size=3)
namespaces_ = st.sampled_from(["shop", "other", "istio-system"])


@settings(max_examples=60)
@given(
    policies=st.lists(st.tuples(namespaces_, label_maps), max_size=8),
    workload_ns=st.sampled_from(["shop", "other"]),
    labels=label_maps,
)
def test_selector_index_finds_what_a_full_scan_finds(
    policies: list[tuple[str, dict[str, str]]], workload_ns: str, labels: dict[str, str]
) -> None:
    selector_policies = [
        SelectorPolicy(f"{ns}/p{i}", ns, WorkloadSelector(sel)) for i, (ns, sel) in enumerate(policies)
    ]
    w = Workload(uid="u", name="w", namespace=workload_ns, labels=labels)
    assert SelectorPolicyIndex(selector_policies).names_for(w) == {
        p.key for p in selector_policies if p.selects(w)
    }
