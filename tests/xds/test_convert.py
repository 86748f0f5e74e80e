"""Proxy state <-> wire: workloads, services and authorizations round-trip; bad input is refused.

The Kubernetes side (what a workload's fields *should* be) is controlplane.lowering's, tested
in tests/controlplane/test_lowering.py; here only the encoding is checked.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

import pytest
from google.protobuf import any_pb2
from google.protobuf.message import Message
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.model import TunnelProtocol, WorkloadStatus
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
    address_from_any,
    address_to_any,
    authorization_from_any,
    authorization_from_proto,
    authorization_to_any,
    authorization_to_proto,
    gateway_from_proto,
    gateway_to_proto,
    resource_name,
    service_from_proto,
    service_to_proto,
    workload_from_proto,
    workload_to_proto,
)
from mesh.xds.state import AppProtocol, GatewayAddress, Port, Service, Workload

names = st.from_regex(r"[a-z][a-z0-9-]{0,12}", fullmatch=True)
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
hostnames = st.builds(lambda n, ns: f"{n}.{ns}.svc.cluster.local", names, names)
keys = st.builds(lambda ns, n: f"{ns}/{n}", names, names)

ports = st.builds(
    Port,
    service_port=st.integers(1, 65535),
    target_port=st.integers(0, 65535),
    app_protocol=st.sampled_from(list(AppProtocol)),
)
port_lists = st.lists(ports, max_size=3).map(tuple)
gateways = st.one_of(
    st.builds(GatewayAddress, namespace=names, hostname=hostnames, hbone_port=st.integers(1, 65535)),
    st.builds(
        GatewayAddress,
        address=st.one_of(ipv4, ipv6),
        network=st.one_of(st.just(""), names),
        hbone_port=st.integers(1, 65535),
    ),
)

workloads = st.builds(
    Workload,
    uid=names.map(lambda n: f"uid-{n}"),
    name=names,
    namespace=names,
    addresses=st.lists(st.one_of(ipv4, ipv6), max_size=3, unique=True).map(tuple),
    node=st.one_of(st.just(""), names),
    network=st.one_of(st.just(""), names),
    tunnel_protocol=st.sampled_from(list(TunnelProtocol)),
    trust_domain=st.sampled_from(["cluster.local", "example.org"]),
    service_account=names,
    waypoint=st.one_of(st.none(), gateways),
    waypoint_strict=st.booleans(),
    waypoint_account_for=st.sampled_from(["", "service", "workload", "all"]),
    services=st.dictionaries(st.builds(lambda ns, h: f"{ns}/{h}", names, hostnames), port_lists, max_size=3),
    authorization_policies=st.lists(keys, max_size=3, unique=True).map(tuple),
    status=st.sampled_from(list(WorkloadStatus)),
    canonical_name=st.one_of(st.just(""), names),
    canonical_revision=st.one_of(st.just(""), names),
    workload_name=st.one_of(st.just(""), names),
    cluster_id=st.sampled_from(["", "Kubernetes"]),
    host_network=st.booleans(),
)
services = st.builds(
    Service,
    name=names,
    namespace=names,
    hostname=hostnames,
    vips=st.lists(st.one_of(ipv4, ipv6), max_size=2, unique=True).map(tuple),
    ports=port_lists,
    waypoint=st.one_of(st.none(), gateways),
)


def pack(pb: workload_pb2.Address) -> any_pb2.Any:
    """An Address as the other end receives it: through its bytes, packed in an Any."""
    packed = any_pb2.Any()
    packed.Pack(workload_pb2.Address.FromString(pb.SerializeToString()))
    return packed


@settings(max_examples=60)
@given(workloads)
def test_workload_round_trip(w: Workload) -> None:
    pb = workload_pb2.Workload.FromString(workload_to_proto(w).SerializeToString())
    back = workload_from_proto(pb)
    assert back == w
    assert workload_to_proto(back).SerializeToString(deterministic=True) == workload_to_proto(
        w
    ).SerializeToString(deterministic=True)
    assert address_from_any(address_to_any(w), resource_name(w)) == w


@settings(max_examples=60)
@given(services)
def test_service_round_trip(s: Service) -> None:
    back = service_from_proto(workload_pb2.Service.FromString(service_to_proto(s).SerializeToString()))
    assert back == s
    assert resource_name(s) == s.key == f"{s.namespace}/{s.hostname}"
    assert address_from_any(address_to_any(s), resource_name(s)) == s


@settings(max_examples=40)
@given(gateways)
def test_gateway_round_trip(gw: GatewayAddress) -> None:
    assert gateway_from_proto(gateway_to_proto(gw), "w") == gw


WEB = Workload(
    uid="uid-web-1",
    name="web-1",
    namespace="shop",
    addresses=("10.0.1.5", "fd00::5"),
    node="node-a",
    tunnel_protocol=TunnelProtocol.HBONE,
    service_account="web",
    waypoint=GatewayAddress(namespace="shop", hostname="waypoint.shop.svc.cluster.local"),
    services={
        "shop/web.shop.svc.cluster.local": (Port(80, 8080, AppProtocol.HTTP11), Port(81, 0)),
        "shop/all.shop.svc.cluster.local": (),
    },
    authorization_policies=("istio-system/istio_converted_static_strict", "shop/allow-web"),
    canonical_name="web",
    canonical_revision="v2",
)
WEB_SVC = Service(
    name="web",
    namespace="shop",
    hostname="web.shop.svc.cluster.local",
    vips=("10.96.0.1", "fd00:96::1"),
    ports=(Port(80, 8080), Port(443, 0, AppProtocol.TLS)),
    waypoint=GatewayAddress(address="10.0.9.9", network="net-1", hbone_port=15009),
)


def test_workload_fields_on_the_wire() -> None:
    pb = workload_to_proto(WEB)
    assert pb.uid == "uid-web-1" and (pb.name, pb.namespace) == ("web-1", "shop")
    assert list(pb.addresses) == [
        ipaddress.ip_address("10.0.1.5").packed,
        ipaddress.ip_address("fd00::5").packed,
    ]
    assert pb.tunnel_protocol == workload_pb2.HBONE and pb.workload_type == workload_pb2.POD
    assert (pb.trust_domain, pb.service_account, pb.node) == ("cluster.local", "web", "node-a")
    assert pb.waypoint.hostname.namespace == "shop"
    assert pb.waypoint.hostname.hostname == "waypoint.shop.svc.cluster.local"
    assert pb.waypoint.hbone_mtls_port == 15008
    web_ports = pb.services["shop/web.shop.svc.cluster.local"].ports
    assert [(p.service_port, p.target_port, p.app_protocol) for p in web_ports] == [
        (80, 8080, workload_pb2.HTTP11),
        (81, 0, workload_pb2.UNKNOWN),
    ]
    assert "shop/all.shop.svc.cluster.local" in pb.services  # listed with no ports is kept
    assert list(pb.authorization_policies) == list(WEB.authorization_policies)
    assert workload_from_proto(pb) == WEB


def test_service_fields_on_the_wire() -> None:
    pb = service_to_proto(WEB_SVC)
    assert (pb.name, pb.namespace, pb.hostname) == ("web", "shop", "web.shop.svc.cluster.local")
    assert [a.address for a in pb.addresses] == [
        ipaddress.ip_address("10.96.0.1").packed,
        ipaddress.ip_address("fd00:96::1").packed,
    ]
    assert [(p.service_port, p.target_port, p.app_protocol) for p in pb.ports] == [
        (80, 8080, workload_pb2.UNKNOWN),
        (443, 0, workload_pb2.TLS),
    ]
    assert pb.waypoint.WhichOneof("destination") == "address"
    assert pb.waypoint.address.address == ipaddress.ip_address("10.0.9.9").packed
    assert (pb.waypoint.address.network, pb.waypoint.hbone_mtls_port) == ("net-1", 15009)
    assert service_from_proto(pb) == WEB_SVC


def test_empty_wire_defaults() -> None:
    """Fields a sender may leave unset get Istio's defaults, not empty strings."""
    w = workload_from_proto(workload_pb2.Workload(uid="u", name="p", namespace="ns"))
    assert (w.trust_domain, w.service_account) == ("cluster.local", "default")
    assert w.tunnel_protocol is TunnelProtocol.NONE and w.status is WorkloadStatus.HEALTHY
    assert w.waypoint is None and w.services == {} and w.addresses == ()
    # A GatewayAddress with no destination is no waypoint.
    pb = workload_pb2.Workload(uid="u", name="p", namespace="ns")
    pb.waypoint.hbone_mtls_port = 15008
    assert workload_from_proto(pb).waypoint is None


def test_wire_field_numbers_are_istios() -> None:
    """An Istio ztunnel decodes our messages: the numbers of the fields we use are Istio's."""
    expected: dict[type[Message], dict[str, int]] = {
        workload_pb2.Address: {"workload": 1, "service": 2},
        workload_pb2.Workload: {
            "uid": 20,
            "name": 1,
            "namespace": 2,
            "addresses": 3,
            "network": 4,
            "tunnel_protocol": 5,
            "trust_domain": 6,
            "service_account": 7,
            "waypoint": 8,
            "node": 9,
            "canonical_name": 10,
            "canonical_revision": 11,
            "workload_type": 12,
            "workload_name": 13,
            "authorization_policies": 16,
            "status": 17,
            "cluster_id": 18,
            "services": 22,
            "network_mode": 25,
        },
        workload_pb2.Service: {
            "name": 1,
            "namespace": 2,
            "hostname": 3,
            "addresses": 4,
            "ports": 5,
            "waypoint": 7,
        },
        workload_pb2.Port: {"service_port": 1, "target_port": 2, "app_protocol": 3},
        workload_pb2.GatewayAddress: {"hostname": 1, "address": 2, "hbone_mtls_port": 3},
        workload_pb2.NetworkAddress: {"network": 1, "address": 2},
        workload_pb2.NamespacedHostname: {"namespace": 1, "hostname": 2},
    }
    for message, fields in expected.items():
        numbers = {name: message.DESCRIPTOR.fields_by_name[name].number for name in fields}
        assert numbers == fields, message.DESCRIPTOR.full_name
    # And on the bytes: uid is field 20 (tag 0xa2 0x01), a length-delimited string.
    raw = workload_to_proto(Workload(uid="u", name="p", namespace="ns")).SerializeToString()
    assert b"\xa2\x01\x01u" in raw


# --- refused input -------------------------------------------------------------------------

Mutation = Callable[[workload_pb2.Address], object]


def _set_port(pb: workload_pb2.Address, service_port: int, target_port: int) -> None:
    port = pb.workload.services["shop/web.shop.svc.cluster.local"].ports[0]
    port.service_port, port.target_port = service_port, target_port


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda pb: pb.workload.addresses.append(b"\x01\x02\x03"), r"addresses\[2\]: .*4 or 16 bytes, not 3"),
        (lambda pb: setattr(pb.workload, "uid", ""), "uid is empty"),
        (lambda pb: setattr(pb.workload, "name", ""), "name and namespace are required"),
        (
            lambda pb: setattr(pb.workload, "tunnel_protocol", workload_pb2.LEGACY_ISTIO_MTLS),
            r"uid-web-1\.tunnel_protocol: 2 is not supported",
        ),
        (
            lambda pb: pb.workload.authorization_policies.append("no-namespace"),
            r"uid-web-1\.authorization_policies: 'no-namespace'",
        ),
        (lambda pb: pb.workload.authorization_policies.append("a/b/c"), r"authorization_policies: 'a/b/c'"),
        (lambda pb: pb.workload.authorization_policies.append("/x"), r"authorization_policies: '/x'"),
        (lambda pb: pb.workload.services["no-slash"].SetInParent(), r"\.services: key 'no-slash'"),
        (
            lambda pb: _set_port(pb, 80, 70000),
            r"services\['shop/web\.shop\.svc\.cluster\.local'\]\.ports\[0\]\.target_port: port 70000",
        ),
        (
            lambda pb: _set_port(pb, 0, 8080),
            r"services\['shop/web\.shop\.svc\.cluster\.local'\]\.ports\[0\]\.service_port: port 0",
        ),
        (
            lambda pb: setattr(pb.workload.waypoint, "hbone_mtls_port", 0),
            r"waypoint\.hbone_mtls_port: port 0",
        ),
        (lambda pb: setattr(pb.workload.waypoint.hostname, "namespace", ""), r"waypoint\.hostname: empty"),
        (
            lambda pb: pb.workload.waypoint.address.SetInParent(),  # switches the oneof: empty IP
            r"waypoint\.address: .*4 or 16 bytes, not 0",
        ),
    ],
)
def test_malformed_workloads_are_refused_with_the_field(mutate: Mutation, message: str) -> None:
    address = workload_pb2.Address(workload=workload_to_proto(WEB))
    mutate(address)
    with pytest.raises(ConversionError, match=message):
        address_from_any(pack(address), WEB.uid)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda pb: setattr(pb.service, "hostname", ""), "name, namespace and hostname are required"),
        (lambda pb: pb.service.addresses.add(address=b"\x0a"), r"addresses\[2\]: .*not 1"),
        (
            lambda pb: setattr(pb.service.ports[0], "service_port", 65536),
            r"ports\[0\]\.service_port: port 65536",
        ),
        (
            lambda pb: setattr(pb.service.ports[1], "target_port", 99999),
            r"ports\[1\]\.target_port: port 99999",
        ),
        (lambda pb: setattr(pb.service.waypoint.address, "address", b"\x01\x02"), r"waypoint\.address: "),
    ],
)
def test_malformed_services_are_refused_with_the_field(mutate: Mutation, message: str) -> None:
    address = workload_pb2.Address(service=service_to_proto(WEB_SVC))
    mutate(address)
    with pytest.raises(ConversionError, match=message):
        address_from_any(pack(address), WEB_SVC.key)


def test_resource_names_must_match_content() -> None:
    with pytest.raises(ConversionError, match=r"resource 'someone-else': .*named by its uid 'uid-web-1'"):
        address_from_any(address_to_any(WEB), "someone-else")
    with pytest.raises(ConversionError, match=r"resource 'shop/web': .*<namespace>/<hostname>"):
        address_from_any(address_to_any(WEB_SVC), "shop/web")  # the service's name, not its hostname
    with pytest.raises(ConversionError, match=r"resource 'x': Address has neither workload nor service"):
        address_from_any(pack(workload_pb2.Address()), "x")
    with pytest.raises(ConversionError, match="expected istio.security.Authorization"):
        authorization_from_any(address_to_any(WEB), "shop/x")
    a = Authorization(name="n", namespace="s")
    with pytest.raises(ConversionError, match="expected istio.workload.Address"):
        address_from_any(authorization_to_any(a), "s/n")
    with pytest.raises(ConversionError, match=r"resource 's/other': .*<namespace>/<name>"):
        authorization_from_any(authorization_to_any(a), "s/other")


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


@settings(max_examples=40)
@given(authorizations)
def test_authorization_round_trip(a: Authorization) -> None:
    wire_pb = authorization_pb2.Authorization.FromString(authorization_to_proto(a).SerializeToString())
    assert authorization_from_proto(wire_pb) == a
    assert authorization_from_any(authorization_to_any(a), a.key) == a


def test_authorization_wire_field_numbers() -> None:
    """Spot-check the encoding against the numbers ztunnel expects (name 1 ... dry_run 6)."""
    a = Authorization(name="n", namespace="s", scope=Scope.NAMESPACE, action=Action.DENY, dry_run=True)
    assert authorization_to_proto(a).SerializeToString() == b"\x0a\x01n\x12\x01s\x18\x01\x20\x01\x30\x01"


def _one_match() -> authorization_pb2.Authorization:
    return authorization_to_proto(
        Authorization(name="n", namespace="s", rules=(Rule((Clause((Match(destination_ports=(80,)),)),)),))
    )


def test_malformed_authorization_refused() -> None:
    pb = _one_match()
    pb.rules[0].clauses[0].matches[0].principals.add()  # StringMatch with no match_type
    with pytest.raises(ConversionError, match=r"rules\[0\]\.clauses\[0\]\.matches\[0\]\.principals"):
        authorization_from_proto(pb)

    pb = _one_match()
    pb.rules[0].clauses[0].matches[0].destination_ports.append(70000)
    with pytest.raises(ConversionError, match=r"matches\[0\]\.destination_ports: port out of range"):
        authorization_from_proto(pb)

    pb = _one_match()
    pb.rules[0].clauses[0].matches[0].source_ips.add(address=b"\x0a\x00\x00")
    with pytest.raises(ConversionError, match=r"matches\[0\]\.source_ips: .*4 or 16 bytes"):
        authorization_from_proto(pb)

    pb = _one_match()
    pb.rules[0].clauses[0].matches[0].destination_ips.add(address=b"\x0a\x00\x00\x00", length=33)
    with pytest.raises(ConversionError, match=r"matches\[0\]\.destination_ips: "):
        authorization_from_proto(pb)

    pb = _one_match()
    pb.name = ""
    with pytest.raises(ConversionError, match="name and namespace are required"):
        authorization_from_proto(pb)

    pb = _one_match()
    pb.scope = 7  # type: ignore[assignment]
    with pytest.raises(ConversionError, match=r"s/n\.scope: unknown value 7"):
        authorization_from_proto(pb)

    pb = _one_match()
    pb.action = 9  # type: ignore[assignment]
    with pytest.raises(ConversionError, match=r"s/n\.action: unknown value 9"):
        authorization_from_proto(pb)
