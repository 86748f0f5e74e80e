"""Wire compatibility of our stubs with Istio's and Envoy's definitions.

The tables below are the upstream field numbers (istio/ztunnel proto/*.proto, istio/api
security/v1alpha1/ca.proto, envoyproxy/data-plane-api discovery.proto, googleapis
google/rpc/status.proto). They are checked against the descriptors, and a few messages are
hand-encoded byte by byte so a mistake in both the .proto and the table cannot cancel out.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from google.protobuf import any_pb2, struct_pb2, unknown_fields
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from mesh.proto import (
    authorization_pb2,
    ca_pb2,
    ca_pb2_grpc,
    core_pb2,
    discovery_pb2,
    discovery_pb2_grpc,
    status_pb2,
    workload_pb2,
    zds_pb2,
)


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def tag(field: int, wire_type: int) -> bytes:
    return varint(field << 3 | wire_type)


def ld(field: int, payload: bytes | str) -> bytes:
    """A length-delimited field (wire type 2)."""
    data = payload.encode() if isinstance(payload, str) else payload
    return tag(field, 2) + varint(len(data)) + data


def vi(field: int, value: int) -> bytes:
    """A varint field (wire type 0)."""
    return tag(field, 0) + varint(value)


# --- names and numbers ----------------------------------------------------------------------

EXPECTED_FIELDS: dict[Any, dict[str, int]] = {
    ca_pb2.IstioCertificateRequest: {"csr": 1, "validity_duration": 3, "metadata": 4},
    ca_pb2.IstioCertificateResponse: {"cert_chain": 1},
    workload_pb2.Address: {"workload": 1, "service": 2},
    workload_pb2.Workload: {
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
        "native_tunnel": 14,
        "authorization_policies": 16,
        "status": 17,
        "cluster_id": 18,
        "network_gateway": 19,
        "uid": 20,
        "hostname": 21,
        "services": 22,
        "application_tunnel": 23,
        "locality": 24,
        "network_mode": 25,
        "extensions": 26,
        "capacity": 27,
    },
    workload_pb2.Service: {
        "name": 1,
        "namespace": 2,
        "hostname": 3,
        "addresses": 4,
        "ports": 5,
        "subject_alt_names": 6,
        "waypoint": 7,
        "load_balancing": 8,
        "ip_families": 9,
        "extensions": 10,
        "canonical": 11,
        "ingress_use_waypoint": 12,
        "weighted_waypoints": 13,
        "visibility": 14,
    },
    workload_pb2.LoadBalancing: {"routing_preference": 1, "mode": 2, "health_policy": 3},
    workload_pb2.Locality: {"region": 1, "zone": 2, "subzone": 3},
    workload_pb2.PortList: {"ports": 1},
    workload_pb2.Port: {"service_port": 1, "target_port": 2, "app_protocol": 3},
    workload_pb2.ApplicationTunnel: {"protocol": 1, "port": 2},
    workload_pb2.GatewayAddress: {"hostname": 1, "address": 2, "hbone_mtls_port": 3},
    workload_pb2.WeightedWaypoint: {"destination": 1, "weight": 2},
    workload_pb2.NetworkAddress: {"network": 1, "address": 2, "length": 3},
    workload_pb2.NamespacedHostname: {"namespace": 1, "hostname": 2},
    workload_pb2.Extension: {"name": 1, "config": 2},
    authorization_pb2.Authorization: {
        "name": 1,
        "namespace": 2,
        "scope": 3,
        "action": 4,
        "rules": 5,
        "dry_run": 6,
        "extensions": 7,
    },
    authorization_pb2.Rule: {"clauses": 1},
    authorization_pb2.Clause: {"matches": 2},
    authorization_pb2.Match: {
        "namespaces": 1,
        "not_namespaces": 2,
        "principals": 3,
        "not_principals": 4,
        "source_ips": 5,
        "not_source_ips": 6,
        "destination_ips": 7,
        "not_destination_ips": 8,
        "destination_ports": 9,
        "not_destination_ports": 10,
        "service_accounts": 11,
        "not_service_accounts": 12,
        "extensions": 13,
    },
    authorization_pb2.Address: {"address": 1, "length": 2},
    authorization_pb2.ServiceAccountMatch: {"namespace": 1, "serviceAccount": 2},
    authorization_pb2.StringMatch: {"exact": 1, "prefix": 2, "suffix": 3, "presence": 4},
    zds_pb2.ZdsHello: {"version": 1},
    zds_pb2.WorkloadInfo: {"name": 1, "namespace": 2, "service_account": 3},
    zds_pb2.AddWorkload: {"uid": 1, "workload_info": 2},
    zds_pb2.KeepWorkload: {"uid": 1},
    zds_pb2.DelWorkload: {"uid": 2},
    zds_pb2.SnapshotSent: {},
    zds_pb2.Ack: {"error": 1},
    zds_pb2.WorkloadRequest: {"add": 1, "del": 2, "snapshot_sent": 3, "keep": 5},
    zds_pb2.WorkloadResponse: {"ack": 1},
    discovery_pb2.DeltaDiscoveryRequest: {
        "node": 1,
        "type_url": 2,
        "resource_names_subscribe": 3,
        "resource_names_unsubscribe": 4,
        "initial_resource_versions": 5,
        "response_nonce": 6,
        "error_detail": 7,
    },
    discovery_pb2.DeltaDiscoveryResponse: {
        "system_version_info": 1,
        "resources": 2,
        "type_url": 4,
        "nonce": 5,
        "removed_resources": 6,
        "control_plane": 7,
    },
    discovery_pb2.Resource: {
        "version": 1,
        "resource": 2,
        "name": 3,
        "aliases": 4,
        "ttl": 6,
        "cache_control": 7,
    },
    discovery_pb2.Resource.CacheControl: {"do_not_cache": 1},
    core_pb2.Node: {"id": 1, "cluster": 2, "metadata": 3},
    core_pb2.ControlPlane: {"identifier": 1},
    status_pb2.Status: {"code": 1, "message": 2, "details": 3},
}

EXPECTED_FULL_NAMES = {
    ca_pb2.IstioCertificateRequest: "istio.v1.auth.IstioCertificateRequest",
    workload_pb2.Address: "istio.workload.Address",
    workload_pb2.Workload: "istio.workload.Workload",
    authorization_pb2.Authorization: "istio.security.Authorization",
    zds_pb2.WorkloadRequest: "istio.workload.zds.WorkloadRequest",
    discovery_pb2.DeltaDiscoveryRequest: "envoy.service.discovery.v3.DeltaDiscoveryRequest",
    discovery_pb2.Resource: "envoy.service.discovery.v3.Resource",
    core_pb2.Node: "envoy.config.core.v3.Node",
    status_pb2.Status: "google.rpc.Status",
}

EXPECTED_ENUMS: dict[Any, dict[str, int]] = {
    workload_pb2.TunnelProtocol: {"NONE": 0, "HBONE": 1, "LEGACY_ISTIO_MTLS": 2},
    workload_pb2.WorkloadStatus: {"HEALTHY": 0, "UNHEALTHY": 1},
    workload_pb2.WorkloadType: {"DEPLOYMENT": 0, "CRONJOB": 1, "POD": 2, "JOB": 3},
    workload_pb2.AppProtocol: {
        "UNKNOWN": 0,
        "HTTP11": 1,
        "HTTP2": 2,
        "GRPC": 3,
        "TCP": 4,
        "TLS": 5,
    },
    workload_pb2.NetworkMode: {"STANDARD": 0, "HOST_NETWORK": 1},
    workload_pb2.IPFamilies: {"AUTOMATIC": 0, "IPV4_ONLY": 1, "IPV6_ONLY": 2, "DUAL": 3},
    workload_pb2.LoadBalancing.Mode: {
        "UNSPECIFIED_MODE": 0,
        "STRICT": 1,
        "FAILOVER": 2,
        "PASSTHROUGH": 3,
    },
    workload_pb2.LoadBalancing.Scope: {
        "UNSPECIFIED_SCOPE": 0,
        "REGION": 1,
        "ZONE": 2,
        "SUBZONE": 3,
        "NODE": 4,
        "CLUSTER": 5,
        "NETWORK": 6,
    },
    workload_pb2.LoadBalancing.HealthPolicy: {"ONLY_HEALTHY": 0, "ALLOW_ALL": 1},
    workload_pb2.ApplicationTunnel.Protocol: {"NONE": 0, "PROXY": 1},
    workload_pb2.Service.Visibility: {"PUBLIC": 0, "NAMESPACE": 1},
    authorization_pb2.Scope: {"GLOBAL": 0, "NAMESPACE": 1, "WORKLOAD_SELECTOR": 2},
    authorization_pb2.Action: {"ALLOW": 0, "DENY": 1},
    zds_pb2.Version: {"NOT_USED": 0, "V1": 1},
}


def _descriptor(message_class: Any) -> Descriptor:
    d: Descriptor = message_class.DESCRIPTOR
    return d


@pytest.mark.parametrize("message_class", list(EXPECTED_FIELDS), ids=lambda c: c.__name__)
def test_field_names_and_numbers(message_class: Any) -> None:
    desc = _descriptor(message_class)
    actual = {f.name: f.number for f in desc.fields}
    assert actual == EXPECTED_FIELDS[message_class]


@pytest.mark.parametrize("message_class", list(EXPECTED_FULL_NAMES), ids=lambda c: c.__name__)
def test_full_names(message_class: Any) -> None:
    assert _descriptor(message_class).full_name == EXPECTED_FULL_NAMES[message_class]


@pytest.mark.parametrize("enum", list(EXPECTED_ENUMS), ids=lambda e: e.DESCRIPTOR.full_name)
def test_enum_values(enum: Any) -> None:
    assert {v.name: v.number for v in enum.DESCRIPTOR.values} == EXPECTED_ENUMS[enum]


def test_field_types_that_matter_on_the_wire() -> None:
    w = _descriptor(workload_pb2.Workload).fields_by_name
    assert w["addresses"].type == FieldDescriptor.TYPE_BYTES
    assert w["waypoint"].message_type.full_name == "istio.workload.GatewayAddress"
    assert w["services"].message_type.GetOptions().map_entry
    assert w["capacity"].message_type.full_name == "google.protobuf.UInt32Value"
    req = _descriptor(ca_pb2.IstioCertificateRequest).fields_by_name
    assert req["validity_duration"].type == FieldDescriptor.TYPE_INT64
    assert req["metadata"].message_type.full_name == "google.protobuf.Struct"
    match = _descriptor(authorization_pb2.Match).fields_by_name
    assert match["destination_ports"].type == FieldDescriptor.TYPE_UINT32
    assert match["principals"].message_type.full_name == "istio.security.StringMatch"
    oneofs = _descriptor(zds_pb2.WorkloadRequest).oneofs_by_name
    assert {f.name for f in oneofs["payload"].fields} == {"add", "del", "snapshot_sent", "keep"}


def test_service_method_paths() -> None:
    ca = ca_pb2.DESCRIPTOR.services_by_name["IstioCertificateService"]
    assert ca.methods_by_name["CreateCertificate"].full_name == (
        "istio.v1.auth.IstioCertificateService.CreateCertificate"
    )
    ads = discovery_pb2.DESCRIPTOR.services_by_name["AggregatedDiscoveryService"]
    delta = ads.methods_by_name["DeltaAggregatedResources"]
    assert delta.full_name == (
        "envoy.service.discovery.v3.AggregatedDiscoveryService.DeltaAggregatedResources"
    )
    assert delta.client_streaming and delta.server_streaming


class _RecordingChannel:
    """Stands in for a grpc.Channel: records which method paths a stub binds."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    def _bind(self, path: str, *args: object, **kwargs: object) -> object:
        self.paths.append(path)
        return object()

    unary_unary = unary_stream = stream_unary = stream_stream = _bind


def test_grpc_stubs_use_the_istio_and_envoy_paths() -> None:
    channel = _RecordingChannel()
    stubs: list[Any] = [
        ca_pb2_grpc.IstioCertificateServiceStub,  # generated without annotations
        discovery_pb2_grpc.AggregatedDiscoveryServiceStub,
    ]
    for stub in stubs:
        stub(channel)
    assert channel.paths == [
        "/istio.v1.auth.IstioCertificateService/CreateCertificate",
        "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources",
    ]


# --- hand-encoded messages ----------------------------------------------------------------


def test_workload_uid_is_field_20() -> None:
    # (20 << 3) | 2 = 162 -> varint a2 01
    raw = b"\xa2\x01\x07pod-uid"
    w = workload_pb2.Workload.FromString(raw)
    assert w.uid == "pod-uid"
    assert workload_pb2.Workload(uid="pod-uid").SerializeToString() == raw


def test_workload_hand_encoded() -> None:
    ip = ipaddress.ip_address("10.0.1.2").packed
    port_list = ld(1, vi(1, 80) + vi(2, 8080) + vi(3, 1))
    raw = (
        ld(20, "uid-1")
        + ld(1, "web-1")
        + ld(2, "shop")
        + ld(3, ip)
        + vi(5, 1)
        + ld(6, "cluster.local")
        + ld(7, "web")
        + ld(8, ld(1, ld(1, "shop") + ld(2, "wp.shop.svc.cluster.local")) + vi(3, 15008))
        + ld(9, "node-a")
        + vi(17, 1)
        + ld(22, ld(1, "shop/web.shop.svc.cluster.local") + ld(2, port_list))
        + vi(25, 1)
        + ld(27, vi(1, 5))
    )
    assert raw.startswith(b"\xa2\x01")
    w = workload_pb2.Workload.FromString(raw)
    assert (w.uid, w.name, w.namespace, w.node) == ("uid-1", "web-1", "shop", "node-a")
    assert list(w.addresses) == [ip]
    assert w.tunnel_protocol == workload_pb2.HBONE
    assert (w.trust_domain, w.service_account) == ("cluster.local", "web")
    assert w.waypoint.WhichOneof("destination") == "hostname"
    assert w.waypoint.hostname.hostname == "wp.shop.svc.cluster.local"
    assert w.waypoint.hbone_mtls_port == 15008
    assert w.status == workload_pb2.UNHEALTHY
    ports = w.services["shop/web.shop.svc.cluster.local"].ports
    assert [(p.service_port, p.target_port, p.app_protocol) for p in ports] == [
        (80, 8080, workload_pb2.HTTP11)
    ]
    assert w.network_mode == workload_pb2.HOST_NETWORK
    assert w.HasField("capacity") and w.capacity.value == 5
    assert len(unknown_fields.UnknownFieldSet(w)) == 0, "a field number we do not know"
    assert workload_pb2.Workload.FromString(w.SerializeToString()) == w


def test_address_oneof_and_service() -> None:
    vip = ipaddress.ip_address("10.96.0.20").packed
    svc = (
        ld(1, "web")
        + ld(2, "shop")
        + ld(3, "web.shop.svc.cluster.local")
        + ld(4, ld(1, "") + ld(2, vip))
        + ld(5, vi(1, 80) + vi(2, 8080))
    )
    addr = workload_pb2.Address.FromString(ld(2, svc))
    assert addr.WhichOneof("type") == "service"
    assert addr.service.addresses[0].address == vip
    assert not addr.service.addresses[0].HasField("length")
    assert addr.service.ports[0].target_port == 8080
    addr = workload_pb2.Address.FromString(ld(1, ld(20, "u")))
    assert addr.WhichOneof("type") == "workload"
    assert addr.workload.uid == "u"


def test_certificate_request_hand_encoded() -> None:
    value = ld(3, "spiffe://cluster.local/ns/shop/sa/web")  # Value.string_value = 3
    entry = ld(1, "ImpersonatedIdentity") + ld(2, value)
    raw = ld(1, "-----BEGIN CERTIFICATE REQUEST-----\n") + vi(3, 86400) + ld(4, ld(1, entry))
    assert raw[0] == 0x0A
    req = ca_pb2.IstioCertificateRequest.FromString(raw)
    assert req.csr.startswith("-----BEGIN CERTIFICATE REQUEST")
    assert req.validity_duration == 86400
    assert req.metadata["ImpersonatedIdentity"] == "spiffe://cluster.local/ns/shop/sa/web"
    resp = ca_pb2.IstioCertificateResponse.FromString(ld(1, "leaf") + ld(1, "root"))
    assert list(resp.cert_chain) == ["leaf", "root"]


def test_authorization_hand_encoded() -> None:
    match = (
        ld(1, ld(1, "shop"))  # namespaces: exact
        + ld(3, ld(2, "cluster.local/ns/"))  # principals: prefix
        + ld(4, ld(4, b""))  # not_principals: presence
        + ld(5, ld(1, bytes([10, 0, 0, 0])) + vi(2, 8))  # source_ips 10.0.0.0/8
        + ld(9, varint(80) + varint(443))  # destination_ports, packed
        + vi(10, 22)  # not_destination_ports, unpacked form is also legal
        + ld(11, ld(1, "shop") + ld(2, "web"))  # service_accounts
        + ld(12, ld(1, "shop") + ld(2, "db"))  # not_service_accounts: tag 0x62
    )
    raw = ld(1, "allow-web") + ld(2, "shop") + vi(3, 2) + vi(4, 1) + ld(5, ld(1, ld(2, match))) + vi(6, 1)
    authz = authorization_pb2.Authorization.FromString(raw)
    assert (authz.name, authz.namespace) == ("allow-web", "shop")
    assert authz.scope == authorization_pb2.WORKLOAD_SELECTOR
    assert authz.action == authorization_pb2.DENY
    assert authz.dry_run
    m = authz.rules[0].clauses[0].matches[0]
    assert m.namespaces[0].exact == "shop"
    assert m.principals[0].prefix == "cluster.local/ns/"
    assert m.not_principals[0].WhichOneof("match_type") == "presence"
    assert (m.source_ips[0].address, m.source_ips[0].length) == (bytes([10, 0, 0, 0]), 8)
    assert list(m.destination_ports) == [80, 443]
    assert list(m.not_destination_ports) == [22]
    assert (m.service_accounts[0].namespace, m.service_accounts[0].serviceAccount) == (
        "shop",
        "web",
    )
    assert m.not_service_accounts[0].serviceAccount == "db"
    assert b"\x62" in raw


def test_zds_hand_encoded() -> None:
    assert zds_pb2.ZdsHello(version=zds_pb2.V1).SerializeToString() == b"\x08\x01"
    info = ld(1, "web-1") + ld(2, "shop") + ld(3, "web")
    req = zds_pb2.WorkloadRequest.FromString(ld(1, ld(1, "uid-1") + ld(2, info)))
    assert req.WhichOneof("payload") == "add"
    assert (req.add.uid, req.add.workload_info.service_account) == ("uid-1", "web")
    req = zds_pb2.WorkloadRequest.FromString(ld(2, ld(2, "uid-2")))
    assert req.WhichOneof("payload") == "del"
    assert getattr(req, "del").uid == "uid-2"
    req = zds_pb2.WorkloadRequest.FromString(b"\x1a\x00")
    assert req.WhichOneof("payload") == "snapshot_sent"
    req = zds_pb2.WorkloadRequest.FromString(ld(5, ld(1, "uid-3")))
    assert req.WhichOneof("payload") == "keep"
    assert req.keep.uid == "uid-3"
    resp = zds_pb2.WorkloadResponse.FromString(ld(1, ld(1, "no such netns")))
    assert resp.ack.error == "no such netns"
    assert zds_pb2.WorkloadResponse(ack=zds_pb2.Ack()).SerializeToString() == b"\x0a\x00"


def test_delta_discovery_hand_encoded() -> None:
    node = ld(1, "ztunnel~10.0.1.1") + ld(2, "Kubernetes")
    raw = (
        ld(1, node)
        + ld(2, "type.googleapis.com/istio.workload.Address")
        + ld(3, "*")
        + ld(5, ld(1, "uid-1") + ld(2, "v7"))
        + ld(6, "nonce-1")
        + ld(7, vi(1, 3) + ld(2, "bad resource"))
    )
    req = discovery_pb2.DeltaDiscoveryRequest.FromString(raw)
    assert req.node.id == "ztunnel~10.0.1.1"
    assert req.node.cluster == "Kubernetes"
    assert req.type_url.endswith("istio.workload.Address")
    assert list(req.resource_names_subscribe) == ["*"]
    assert dict(req.initial_resource_versions) == {"uid-1": "v7"}
    assert req.response_nonce == "nonce-1"
    assert (req.error_detail.code, req.error_detail.message) == (3, "bad resource")

    payload = workload_pb2.Address(workload=workload_pb2.Workload(uid="uid-1"))
    any_raw = ld(1, "type.googleapis.com/istio.workload.Address") + ld(2, payload.SerializeToString())
    resource = ld(1, "v8") + ld(2, any_raw) + ld(3, "uid-1") + ld(4, "/10.0.1.2")
    raw = ld(1, "sys-1") + ld(2, resource) + ld(4, "t") + ld(5, "n-2") + ld(6, "uid-0")
    resp = discovery_pb2.DeltaDiscoveryResponse.FromString(raw)
    r = resp.resources[0]
    assert (r.version, r.name, list(r.aliases)) == ("v8", "uid-1", ["/10.0.1.2"])
    got = workload_pb2.Address()
    assert r.resource.Unpack(got)
    assert got == payload
    assert (resp.nonce, list(resp.removed_resources)) == ("n-2", ["uid-0"])


def test_unknown_upstream_fields_survive_a_round_trip() -> None:
    # Node.user_agent_name (6) is not in our minimal Node; a relay must not drop it.
    raw = ld(1, "id") + ld(6, "envoy")
    node = core_pb2.Node.FromString(raw)
    assert len(unknown_fields.UnknownFieldSet(node)) == 1
    assert node.SerializeToString() == raw


# --- round trips ------------------------------------------------------------------------------


def test_round_trips() -> None:
    metadata = struct_pb2.Struct()
    metadata.update({"ImpersonatedIdentity": "spiffe://cluster.local/ns/a/sa/b"})
    messages: list[Any] = [
        ca_pb2.IstioCertificateRequest(csr="csr", validity_duration=3600, metadata=metadata),
        ca_pb2.IstioCertificateResponse(cert_chain=["a", "b", "c"]),
        workload_pb2.Address(
            service=workload_pb2.Service(
                name="web",
                namespace="shop",
                hostname="web.shop.svc.cluster.local",
                addresses=[workload_pb2.NetworkAddress(address=b"\x0a\x60\x00\x14", length=32)],
                ports=[workload_pb2.Port(service_port=80, target_port=8080)],
                waypoint=workload_pb2.GatewayAddress(
                    address=workload_pb2.NetworkAddress(address=b"\x0a\x00\x00\x09"),
                    hbone_mtls_port=15008,
                ),
            )
        ),
        workload_pb2.Workload(
            uid="u",
            addresses=[b"\x0a\x00\x01\x02"],
            tunnel_protocol=workload_pb2.HBONE,
            services={
                "shop/web.shop.svc.cluster.local": workload_pb2.PortList(
                    ports=[workload_pb2.Port(service_port=80, target_port=8080)]
                )
            },
            authorization_policies=["shop/allow"],
            locality=workload_pb2.Locality(region="r", zone="z"),
        ),
        authorization_pb2.Authorization(
            name="p",
            namespace="ns",
            scope=authorization_pb2.NAMESPACE,
            rules=[
                authorization_pb2.Rule(
                    clauses=[
                        authorization_pb2.Clause(matches=[authorization_pb2.Match(destination_ports=[8080])])
                    ]
                )
            ],
        ),
        zds_pb2.WorkloadRequest(
            add=zds_pb2.AddWorkload(uid="u", workload_info=zds_pb2.WorkloadInfo(name="n"))
        ),
        discovery_pb2.DeltaDiscoveryRequest(
            node=core_pb2.Node(id="n", metadata=metadata),
            initial_resource_versions={"a": "1"},
            error_detail=status_pb2.Status(code=13, details=[any_pb2.Any()]),
        ),
        discovery_pb2.DeltaDiscoveryResponse(
            resources=[
                discovery_pb2.Resource(
                    name="a",
                    cache_control=discovery_pb2.Resource.CacheControl(do_not_cache=True),
                )
            ],
            control_plane=core_pb2.ControlPlane(identifier="cp"),
        ),
    ]
    for message in messages:
        again = type(message).FromString(message.SerializeToString())
        assert again == message, type(message).__name__


def test_any_type_urls_match_the_discovery_type_urls() -> None:
    packed = any_pb2.Any()
    packed.Pack(workload_pb2.Address())
    assert packed.type_url == "type.googleapis.com/istio.workload.Address"
    packed.Pack(authorization_pb2.Authorization())
    assert packed.type_url == "type.googleapis.com/istio.security.Authorization"
