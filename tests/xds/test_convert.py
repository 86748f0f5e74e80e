"""Model <-> wire conversion of workloads, services and authorizations."""

from __future__ import annotations

import dataclasses
import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.model import (
    Kind,
    MeshObject,
    ServicePort,
    Snapshot,
    Store,
    TunnelProtocol,
    WaypointRef,
    Workload,
    WorkloadSelector,
    WorkloadStatus,
)
from mesh.proto import authorization_pb2, workload_pb2
from mesh.xds.authorization import (
    Action,
    Authorization,
    Clause,
    Match,
    MatchKind,
    Rule,
    Scope,
    ServiceAccountMatch,
    StringMatch,
)
from mesh.xds.convert import (
    ConversionError,
    SelectorPolicy,
    address_from_any,
    address_to_any,
    authorization_from_any,
    authorization_from_proto,
    authorization_to_any,
    authorization_to_proto,
    service_from_proto,
    service_to_proto,
    workload_from_proto,
    workload_to_proto,
)
from tests.xds.helpers import namespace, pod, service, waypoint_gateway

names = st.from_regex(r"[a-z][a-z0-9-]{0,12}", fullmatch=True)
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)


def snapshot_of(*objects: MeshObject) -> Snapshot:
    store = Store()
    store.replace_all(objects)
    return store.snapshot()


def test_workload_fields_on_the_wire() -> None:
    w = pod(
        "web-1",
        "10.0.1.5",
        labels={"app": "web", "version": "v2"},
        named_ports={"http": 8080},
    )
    svc = service(
        "web",
        selector={"app": "web"},
        ports=(
            ServicePort(port=80, target_port="http", app_protocol="http"),
            ServicePort(port=81, target_port=9000),
            ServicePort(port=82, target_port="missing"),
        ),
    )
    snap = snapshot_of(w, svc)
    policy = SelectorPolicy("shop/only-web", "shop", WorkloadSelector({"app": "web"}))
    other = SelectorPolicy("shop/only-db", "shop", WorkloadSelector({"app": "db"}))
    root = SelectorPolicy("istio-system/mesh-web", "istio-system", WorkloadSelector({"app": "web"}))
    pb = workload_to_proto(w, snap, (policy, other, root))

    assert pb.uid == "uid-shop-web-1" and pb.name == "web-1" and pb.namespace == "shop"
    assert list(pb.addresses) == [ipaddress.ip_address("10.0.1.5").packed]
    assert pb.tunnel_protocol == workload_pb2.HBONE
    assert (pb.trust_domain, pb.service_account, pb.node) == ("cluster.local", "default", "node-a")
    assert pb.canonical_name == "web" and pb.canonical_revision == "v2"
    assert pb.workload_type == workload_pb2.POD
    assert list(pb.authorization_policies) == ["istio-system/mesh-web", "shop/only-web"]
    ports = pb.services["shop/web.shop.svc.cluster.local"].ports
    # The named port resolves from the pod; one the pod does not declare is left out.
    assert [(p.service_port, p.target_port, p.app_protocol) for p in ports] == [
        (80, 8080, workload_pb2.HTTP11),
        (81, 9000, workload_pb2.UNKNOWN),
    ]
    assert not pb.HasField("waypoint")


def test_waypoints_follow_labels_namespace_and_gateway_kind() -> None:
    ref = WaypointRef("waypoint", "shop")
    svc = service("web", waypoint=None)
    w = pod("web-1")
    # Namespace label applies to services; the gateway serves services only.
    snap = snapshot_of(namespace("shop", ref), waypoint_gateway(waypoint_for="service"), svc, w)
    s_pb = service_to_proto(svc, snap)
    assert s_pb.waypoint.hostname.hostname == "waypoint.shop.svc.cluster.local"
    assert s_pb.waypoint.hbone_mtls_port == 15008
    assert not workload_to_proto(w, snap).HasField("waypoint")
    # waypoint-for: all applies to workloads too; a pod's own "none" opts out.
    snap = snapshot_of(namespace("shop", ref), waypoint_gateway(waypoint_for="all"), svc, w)
    assert workload_to_proto(w, snap).waypoint.hostname.namespace == "shop"
    opted_out = pod("web-2", waypoint=WaypointRef("none", "shop"))
    assert not workload_to_proto(opted_out, snap).HasField("waypoint")
    # A waypoint that does not exist fails open: nothing is sent.
    snap = snapshot_of(namespace("shop", ref), svc, w)
    assert not service_to_proto(svc, snap).HasField("waypoint")


def test_client_side_store_answers_endpoint_lookups() -> None:
    """Membership and per-pod target ports survive the trip through the wire."""
    a = pod("web-1", "10.0.1.5", labels={"app": "web"}, named_ports={"http": 8080})
    b = pod("web-2", "10.0.1.6", labels={"app": "web"}, named_ports={"http": 9090})
    c = pod("db-1", "10.0.1.7", labels={"app": "db"})
    svc = service("web", selector={"app": "web"}, ports=(ServicePort(port=80, target_port="http"),))
    snap = snapshot_of(a, b, c, svc)

    client = Store()
    received = [
        address_from_any(address_to_any(workload_pb2.Address(workload=workload_to_proto(w, snap))), w.uid)
        for w in (a, b, c)
    ]
    received.append(
        address_from_any(
            address_to_any(workload_pb2.Address(service=service_to_proto(svc, snap))),
            "shop/web.shop.svc.cluster.local",
        )
    )
    client.replace_all(received)
    csnap = client.snapshot()
    got = csnap.service_by_address("10.96.0.1", 80)
    assert got is not None and got.hostname == "web.shop.svc.cluster.local"
    endpoints = csnap.endpoints(got.key)
    assert sorted(w.name for w in endpoints) == ["web-1", "web-2"]
    port = got.port(80)
    assert port is not None
    assert {w.name: port.target_for(w) for w in endpoints} == {"web-1": 8080, "web-2": 9090}
    assert csnap.workload_by_ip("10.0.1.7") is not None
    assert csnap.services_for_workload(c.uid) == ()


@settings(max_examples=40, deadline=None)
@given(
    name=names,
    ns=names,
    node=st.one_of(st.just(""), names),
    sa=names,
    ips=st.lists(st.one_of(ipv4, ipv6), max_size=3, unique=True),
    network=st.one_of(st.just(""), names),
    hbone=st.booleans(),
    unhealthy=st.booleans(),
    host_network=st.booleans(),
    td=st.sampled_from(["cluster.local", "example.org"]),
)
def test_workload_round_trip(
    name: str,
    ns: str,
    node: str,
    sa: str,
    ips: list[str],
    network: str,
    hbone: bool,
    unhealthy: bool,
    host_network: bool,
    td: str,
) -> None:
    w = Workload(
        uid=f"uid-{name}",
        name=name,
        namespace=ns,
        node=node,
        service_account=sa,
        ips=tuple(ips),
        network=network,
        tunnel_protocol=TunnelProtocol.HBONE if hbone else TunnelProtocol.NONE,
        trust_domain=td,
        host_network=host_network,
        status=WorkloadStatus.UNHEALTHY if unhealthy else WorkloadStatus.HEALTHY,
    )
    pb = workload_to_proto(w, snapshot_of(w))
    back = workload_from_proto(workload_pb2.Workload.FromString(pb.SerializeToString()))
    # Labels are not on the wire; the client keeps the canonical name as a label.
    labels = {"service.istio.io/canonical-name": name, "service.istio.io/canonical-revision": "latest"}
    assert back == dataclasses.replace(w, labels=labels)
    assert workload_to_proto(back, snapshot_of(back)).SerializeToString(
        deterministic=True
    ) == pb.SerializeToString(deterministic=True)


@settings(max_examples=40, deadline=None)
@given(
    name=names,
    ns=names,
    vips=st.lists(ipv4, max_size=2, unique=True),
    ports=st.lists(st.integers(1, 65535), max_size=3, unique=True),
)
def test_service_round_trip(name: str, ns: str, vips: list[str], ports: list[int]) -> None:
    svc = service(name, ns=ns, ports=tuple(ServicePort(port=p, target_port=p + 0) for p in ports))
    svc = dataclasses.replace(svc, vips=tuple(vips))
    pb = service_to_proto(svc, snapshot_of(svc))
    back = service_from_proto(pb)
    assert (back.name, back.namespace, back.hostname, back.vips) == (
        svc.name,
        svc.namespace,
        svc.hostname,
        svc.vips,
    )
    assert [p.port for p in back.ports] == ports
    assert service_to_proto(back, snapshot_of(back)).addresses == pb.addresses


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda pb: pb.workload.addresses.append(b"\x01\x02\x03"), "4 or 16 bytes"),
        (lambda pb: setattr(pb.workload, "uid", ""), "uid is empty"),
        (
            lambda pb: setattr(pb.workload, "tunnel_protocol", workload_pb2.LEGACY_ISTIO_MTLS),
            "tunnel_protocol",
        ),
        (lambda pb: pb.workload.waypoint.address.SetInParent(), "hostname waypoints"),
    ],
)
def test_malformed_workloads_are_refused_with_the_field(mutate, message) -> None:  # type: ignore[no-untyped-def]
    w = pod("web-1")
    address = workload_pb2.Address(workload=workload_to_proto(w, snapshot_of(w)))
    mutate(address)
    with pytest.raises(ConversionError, match=message):
        address_from_any(address_to_any(address), w.uid)


def test_resource_names_must_match_content() -> None:
    w = pod("web-1")
    packed = address_to_any(workload_pb2.Address(workload=workload_to_proto(w, snapshot_of(w))))
    with pytest.raises(ConversionError, match="named by its uid"):
        address_from_any(packed, "someone-else")
    with pytest.raises(ConversionError, match="neither workload nor service"):
        address_from_any(address_to_any(workload_pb2.Address()), "x")
    with pytest.raises(ConversionError, match="expected istio.security.Authorization"):
        authorization_from_any(packed, "shop/x")
    bad = workload_pb2.Service(name="x", namespace="shop", hostname="example.com")
    with pytest.raises(ConversionError, match="only Kubernetes services"):
        service_from_proto(bad)
    assert Kind.WORKLOAD  # the store kinds are what the client writes


# --- authorization values <-> wire ----------------------------------------------------------

string_matches = st.one_of(
    st.builds(StringMatch, st.sampled_from([MatchKind.EXACT, MatchKind.PREFIX, MatchKind.SUFFIX]), names),
    st.just(StringMatch(MatchKind.PRESENCE)),
)
networks = st.one_of(
    st.builds(lambda ip, n: ipaddress.ip_network(f"{ip}/{n}", strict=False), ipv4, st.integers(0, 32)),
    st.builds(lambda ip, n: ipaddress.ip_network(f"{ip}/{n}", strict=False), ipv6, st.integers(0, 128)),
)

matches = st.builds(
    Match,
    namespaces=st.lists(string_matches, max_size=2).map(tuple),
    not_namespaces=st.lists(string_matches, max_size=2).map(tuple),
    principals=st.lists(string_matches, max_size=2).map(tuple),
    not_principals=st.lists(string_matches, max_size=2).map(tuple),
    source_ips=st.lists(networks, max_size=2).map(tuple),
    not_source_ips=st.lists(networks, max_size=2).map(tuple),
    destination_ips=st.lists(networks, max_size=2).map(tuple),
    not_destination_ips=st.lists(networks, max_size=2).map(tuple),
    destination_ports=st.lists(st.integers(1, 65535), max_size=2).map(tuple),
    not_destination_ports=st.lists(st.integers(1, 65535), max_size=2).map(tuple),
    service_accounts=st.lists(st.builds(ServiceAccountMatch, names, names), max_size=2).map(tuple),
    not_service_accounts=st.lists(st.builds(ServiceAccountMatch, names, names), max_size=2).map(tuple),
)
authorizations = st.builds(
    Authorization,
    name=names,
    namespace=names,
    scope=st.sampled_from(list(Scope)),
    action=st.sampled_from(list(Action)),
    rules=st.lists(
        st.builds(
            Rule, st.lists(st.builds(Clause, st.lists(matches, max_size=2).map(tuple)), max_size=2).map(tuple)
        ),
        max_size=2,
    ).map(tuple),
    dry_run=st.booleans(),
)


@settings(max_examples=40, deadline=None)
@given(authorizations)
def test_authorization_round_trip(a: Authorization) -> None:
    wire = authorization_pb2.Authorization.FromString(authorization_to_proto(a).SerializeToString())
    assert authorization_from_proto(wire) == a
    assert authorization_from_any(authorization_to_any(a), a.key) == a


def test_authorization_wire_field_numbers() -> None:
    """Spot-check the encoding against the numbers ztunnel expects (name 1 ... dry_run 6)."""
    a = Authorization(name="n", namespace="s", scope=Scope.NAMESPACE, action=Action.DENY, dry_run=True)
    assert authorization_to_proto(a).SerializeToString() == b"\x0a\x01n\x12\x01s\x18\x01\x20\x01\x30\x01"


def test_malformed_authorization_refused() -> None:
    pb = authorization_to_proto(
        Authorization(name="n", namespace="s", rules=(Rule((Clause((Match(destination_ports=(80,)),)),)),))
    )
    pb.rules[0].clauses[0].matches[0].principals.add()  # StringMatch with no match_type
    with pytest.raises(ConversionError, match=r"rules\[0\]\.clauses\[0\]\.matches\[0\]\.principals"):
        authorization_from_proto(pb)
