"""The discovery wire messages (``istio.workload``, ``istio.security``) <-> the proxy state.

Pure functions, no I/O, and no Kubernetes: the control plane builds :mod:`mesh.xds.state`
values from its model (:mod:`controlplane.lowering`) and sends them with the ``*_to_proto``
side; a node proxy's discovery client reads them back with the ``*_from_proto`` side. One
type on both ends, so ``from_proto(to_proto(x)) == x`` for every value.

Receiving is validation at the edge: every malformed field raises :class:`ConversionError`
naming the resource and the field, and the client NACKs the response that carried it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping

from google.protobuf import any_pb2

from mesh.model.objects import DEFAULT_SERVICE_ACCOUNT, DEFAULT_TRUST_DOMAIN, TunnelProtocol, WorkloadStatus
from mesh.proto import authorization_pb2, waypoint_pb2, workload_pb2
from mesh.xds.authorization import (
    Action,
    Authorization,
    Clause,
    IPNetwork,
    Match,
    MatchKind,
    Rule,
    Scope,
    ServiceAccountMatch,
    StringMatch,
)
from mesh.xds.state import Address, AppProtocol, GatewayAddress, Port, Service, Workload

ADDRESS_TYPE_URL = "type.googleapis.com/istio.workload.Address"
AUTHORIZATION_TYPE_URL = "type.googleapis.com/istio.security.Authorization"
TYPE_URLS = (ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL)

_APP_PROTOCOLS: Mapping[AppProtocol, workload_pb2.AppProtocol] = {
    AppProtocol.UNKNOWN: workload_pb2.UNKNOWN,
    AppProtocol.HTTP11: workload_pb2.HTTP11,
    AppProtocol.HTTP2: workload_pb2.HTTP2,
    AppProtocol.GRPC: workload_pb2.GRPC,
    AppProtocol.TCP: workload_pb2.TCP,
    AppProtocol.TLS: workload_pb2.TLS,
}
_APP_PROTOCOL_OF: Mapping[int, AppProtocol] = {v: k for k, v in _APP_PROTOCOLS.items()}


class ConversionError(ValueError):
    """A received resource cannot be represented; the message names the resource and field."""


# --- small pieces --------------------------------------------------------------------------


def ip_to_bytes(ip: str) -> bytes:
    return ipaddress.ip_address(ip).packed


def ip_from_bytes(raw: bytes, where: str) -> str:
    if len(raw) not in (4, 16):
        raise ConversionError(f"{where}: an IP address is 4 or 16 bytes, not {len(raw)}")
    return str(ipaddress.ip_address(raw))


def resource_name(address: Address) -> str:
    """Istio names a workload resource by its uid, a service ``<namespace>/<hostname>``."""
    return address.uid if isinstance(address, Workload) else address.key


def _port_number(value: int, where: str, *, zero_ok: bool = False) -> int:
    if not (0 <= value < 65536 if zero_ok else 0 < value < 65536):
        raise ConversionError(f"{where}: port {value} is out of range")
    return value


def _ports_to_proto(ports: tuple[Port, ...]) -> list[workload_pb2.Port]:
    return [
        workload_pb2.Port(
            service_port=p.service_port, target_port=p.target_port, app_protocol=_APP_PROTOCOLS[p.app_protocol]
        )
        for p in ports
    ]


def _ports_from_proto(ports: Iterable[workload_pb2.Port], where: str) -> tuple[Port, ...]:
    out: list[Port] = []
    for i, p in enumerate(ports):
        out.append(
            Port(
                service_port=_port_number(p.service_port, f"{where}[{i}].service_port"),
                target_port=_port_number(p.target_port, f"{where}[{i}].target_port", zero_ok=True),
                app_protocol=_APP_PROTOCOL_OF.get(p.app_protocol, AppProtocol.UNKNOWN),
            )
        )
    return tuple(out)


# --- waypoints -----------------------------------------------------------------------------


def gateway_to_proto(gw: GatewayAddress) -> workload_pb2.GatewayAddress:
    pb = workload_pb2.GatewayAddress(hbone_mtls_port=gw.hbone_port)
    if gw.hostname:
        pb.hostname.CopyFrom(workload_pb2.NamespacedHostname(namespace=gw.namespace, hostname=gw.hostname))
    else:
        pb.address.CopyFrom(workload_pb2.NetworkAddress(network=gw.network, address=ip_to_bytes(gw.address)))
    return pb


def gateway_from_proto(pb: workload_pb2.GatewayAddress, where: str) -> GatewayAddress | None:
    kind = pb.WhichOneof("destination")
    if kind is None:
        return None
    port = _port_number(pb.hbone_mtls_port, f"{where}.hbone_mtls_port")
    if kind == "hostname":
        if not pb.hostname.hostname or not pb.hostname.namespace:
            raise ConversionError(f"{where}.hostname: empty hostname or namespace")
        return GatewayAddress(namespace=pb.hostname.namespace, hostname=pb.hostname.hostname, hbone_port=port)
    return GatewayAddress(
        address=ip_from_bytes(pb.address.address, f"{where}.address"),
        network=pb.address.network,
        hbone_port=port,
    )


# --- workloads -----------------------------------------------------------------------------

WAYPOINT_EXTENSION = "ambient-mesh.io/waypoint"  # Workload.extensions entry (mesh/proto/waypoint.proto)
_ACCOUNT_WAYPOINT_FOR = frozenset({"", "service", "workload", "all", "none"})


def _waypoint_binding(pb: workload_pb2.Workload, where: str) -> tuple[bool, str]:
    """(strict, account_waypoint_for) from our extension; other extensions are not ours: skipped."""
    for i, ext in enumerate(pb.extensions):
        if ext.name != WAYPOINT_EXTENSION:
            continue
        binding = waypoint_pb2.WaypointBinding()
        if not ext.config.Unpack(binding):
            raise ConversionError(f"{where}.extensions[{i}]: {WAYPOINT_EXTENSION} holds {ext.config.type_url}")
        if binding.account_waypoint_for not in _ACCOUNT_WAYPOINT_FOR:
            raise ConversionError(
                f"{where}.extensions[{i}].account_waypoint_for: {binding.account_waypoint_for!r} "
                "is not service, workload, all or none"
            )
        return binding.strict, binding.account_waypoint_for
    return False, ""


def workload_to_proto(w: Workload) -> workload_pb2.Workload:
    pb = workload_pb2.Workload(
        uid=w.uid,
        name=w.name,
        namespace=w.namespace,
        addresses=[ip_to_bytes(ip) for ip in w.addresses],
        network=w.network,
        tunnel_protocol=workload_pb2.HBONE if w.tunnel_protocol is TunnelProtocol.HBONE else workload_pb2.NONE,
        trust_domain=w.trust_domain,
        service_account=w.service_account,
        node=w.node,
        canonical_name=w.canonical_name,
        canonical_revision=w.canonical_revision,
        workload_type=workload_pb2.POD,
        workload_name=w.workload_name,
        status=workload_pb2.UNHEALTHY if w.status is WorkloadStatus.UNHEALTHY else workload_pb2.HEALTHY,
        cluster_id=w.cluster_id,
        network_mode=workload_pb2.HOST_NETWORK if w.host_network else workload_pb2.STANDARD,
        authorization_policies=list(w.authorization_policies),
    )
    if w.waypoint is not None:
        pb.waypoint.CopyFrom(gateway_to_proto(w.waypoint))
    if w.waypoint_strict or w.waypoint_account_for:
        binding = waypoint_pb2.WaypointBinding(strict=w.waypoint_strict, account_waypoint_for=w.waypoint_account_for)
        ext = pb.extensions.add(name=WAYPOINT_EXTENSION)
        ext.config.Pack(binding)
    for key, ports in w.services.items():
        pb.services[key].ports.extend(_ports_to_proto(ports))
    return pb


def workload_from_proto(pb: workload_pb2.Workload) -> Workload:
    where = f"workload {pb.uid or '?'}"
    if not pb.uid:
        raise ConversionError(f"{where}: uid is empty")
    if not pb.name or not pb.namespace:
        raise ConversionError(f"{where}: name and namespace are required")
    if pb.tunnel_protocol not in (workload_pb2.NONE, workload_pb2.HBONE):
        raise ConversionError(f"{where}.tunnel_protocol: {pb.tunnel_protocol} is not supported")
    for key in pb.authorization_policies:
        if key.count("/") != 1 or key.startswith("/") or key.endswith("/"):
            raise ConversionError(f"{where}.authorization_policies: {key!r} is not <namespace>/<name>")
    strict, account_for = _waypoint_binding(pb, where)
    services: dict[str, tuple[Port, ...]] = {}
    for key, port_list in pb.services.items():
        if "/" not in key:
            raise ConversionError(f"{where}.services: key {key!r} is not <namespace>/<hostname>")
        services[key] = _ports_from_proto(port_list.ports, f"{where}.services[{key!r}].ports")
    return Workload(
        uid=pb.uid,
        name=pb.name,
        namespace=pb.namespace,
        addresses=tuple(ip_from_bytes(raw, f"{where}.addresses[{i}]") for i, raw in enumerate(pb.addresses)),
        node=pb.node,
        network=pb.network,
        tunnel_protocol=TunnelProtocol.HBONE if pb.tunnel_protocol == workload_pb2.HBONE else TunnelProtocol.NONE,
        trust_domain=pb.trust_domain or DEFAULT_TRUST_DOMAIN,
        service_account=pb.service_account or DEFAULT_SERVICE_ACCOUNT,
        waypoint=gateway_from_proto(pb.waypoint, f"{where}.waypoint") if pb.HasField("waypoint") else None,
        waypoint_strict=strict,
        waypoint_account_for=account_for,
        services=services,
        authorization_policies=tuple(pb.authorization_policies),
        status=WorkloadStatus.UNHEALTHY if pb.status == workload_pb2.UNHEALTHY else WorkloadStatus.HEALTHY,
        canonical_name=pb.canonical_name,
        canonical_revision=pb.canonical_revision,
        workload_name=pb.workload_name,
        cluster_id=pb.cluster_id,
        host_network=pb.network_mode == workload_pb2.HOST_NETWORK,
    )


# --- services ------------------------------------------------------------------------------


def service_to_proto(s: Service) -> workload_pb2.Service:
    pb = workload_pb2.Service(
        name=s.name,
        namespace=s.namespace,
        hostname=s.hostname,
        addresses=[workload_pb2.NetworkAddress(address=ip_to_bytes(vip)) for vip in s.vips],
        ports=_ports_to_proto(s.ports),
    )
    if s.waypoint is not None:
        pb.waypoint.CopyFrom(gateway_to_proto(s.waypoint))
    return pb


def service_from_proto(pb: workload_pb2.Service) -> Service:
    where = f"service {pb.namespace}/{pb.hostname}"
    if not pb.name or not pb.namespace or not pb.hostname:
        raise ConversionError(f"{where}: name, namespace and hostname are required")
    return Service(
        name=pb.name,
        namespace=pb.namespace,
        hostname=pb.hostname,
        vips=tuple(ip_from_bytes(a.address, f"{where}.addresses[{i}]") for i, a in enumerate(pb.addresses)),
        ports=_ports_from_proto(pb.ports, f"{where}.ports"),
        waypoint=gateway_from_proto(pb.waypoint, f"{where}.waypoint") if pb.HasField("waypoint") else None,
    )


def address_to_any(address: Address) -> any_pb2.Any:
    pb = (
        workload_pb2.Address(workload=workload_to_proto(address))
        if isinstance(address, Workload)
        else workload_pb2.Address(service=service_to_proto(address))
    )
    packed = any_pb2.Any()
    packed.Pack(pb)
    return packed


def address_from_any(packed: any_pb2.Any, name: str) -> Address:
    """Unpack one ``istio.workload.Address`` resource named ``name``."""
    address = workload_pb2.Address()
    if not packed.Unpack(address):
        raise ConversionError(f"resource {name!r}: expected istio.workload.Address, got {packed.type_url!r}")
    kind = address.WhichOneof("type")
    value: Address
    if kind == "workload":
        value = workload_from_proto(address.workload)
        if value.uid != name:
            raise ConversionError(f"resource {name!r}: a workload resource is named by its uid {value.uid!r}")
        return value
    if kind == "service":
        value = service_from_proto(address.service)
        if value.key != name:
            raise ConversionError(f"resource {name!r}: a service resource is named <namespace>/<hostname>")
        return value
    raise ConversionError(f"resource {name!r}: Address has neither workload nor service")


# --- authorization: frozen values <-> wire -------------------------------------------------

_SCOPES: Mapping[Scope, authorization_pb2.Scope] = {
    Scope.GLOBAL: authorization_pb2.GLOBAL,
    Scope.NAMESPACE: authorization_pb2.NAMESPACE,
    Scope.WORKLOAD_SELECTOR: authorization_pb2.WORKLOAD_SELECTOR,
}
_SCOPE_OF: Mapping[int, Scope] = {v: k for k, v in _SCOPES.items()}
_STRING_FIELDS = ("namespaces", "not_namespaces", "principals", "not_principals")
_IP_FIELDS = ("source_ips", "not_source_ips", "destination_ips", "not_destination_ips")
_PORT_FIELDS = ("destination_ports", "not_destination_ports")
_SA_FIELDS = ("service_accounts", "not_service_accounts")


def _string_match_to_proto(m: StringMatch) -> authorization_pb2.StringMatch:
    if m.kind is MatchKind.PRESENCE:
        pb = authorization_pb2.StringMatch()
        pb.presence.SetInParent()
        return pb
    return authorization_pb2.StringMatch(**{m.kind.value: m.value})


def _string_match_from_proto(pb: authorization_pb2.StringMatch, where: str) -> StringMatch:
    kind = pb.WhichOneof("match_type")
    if kind is None:
        raise ConversionError(f"{where}: StringMatch with no match_type")
    if kind == "presence":
        return StringMatch(MatchKind.PRESENCE)
    return StringMatch(MatchKind(kind), getattr(pb, kind))


def _match_to_proto(m: Match) -> authorization_pb2.Match:
    pb = authorization_pb2.Match()
    for attr in _STRING_FIELDS:
        getattr(pb, attr).extend(_string_match_to_proto(s) for s in getattr(m, attr))
    for attr in _IP_FIELDS:
        getattr(pb, attr).extend(
            authorization_pb2.Address(address=n.network_address.packed, length=n.prefixlen)
            for n in getattr(m, attr)
        )
    for attr in _PORT_FIELDS:
        getattr(pb, attr).extend(getattr(m, attr))
    for attr in _SA_FIELDS:
        getattr(pb, attr).extend(
            authorization_pb2.ServiceAccountMatch(namespace=s.namespace, serviceAccount=s.service_account)
            for s in getattr(m, attr)
        )
    return pb


def _network_from_proto(pb: authorization_pb2.Address, where: str) -> IPNetwork:
    ip = ip_from_bytes(pb.address, where)
    try:
        return ipaddress.ip_network(f"{ip}/{pb.length}", strict=False)
    except ValueError as e:
        raise ConversionError(f"{where}: {e}") from None


def _match_from_proto(pb: authorization_pb2.Match, where: str) -> Match:
    values: dict[str, object] = {}
    for attr in _STRING_FIELDS:
        values[attr] = tuple(_string_match_from_proto(s, f"{where}.{attr}") for s in getattr(pb, attr))
    for attr in _IP_FIELDS:
        values[attr] = tuple(_network_from_proto(a, f"{where}.{attr}") for a in getattr(pb, attr))
    for attr in _PORT_FIELDS:
        ports = tuple(getattr(pb, attr))
        if not all(0 < port < 65536 for port in ports):
            raise ConversionError(f"{where}.{attr}: port out of range in {ports}")
        values[attr] = ports
    for attr in _SA_FIELDS:
        values[attr] = tuple(ServiceAccountMatch(s.namespace, s.serviceAccount) for s in getattr(pb, attr))
    return Match(**values)  # type: ignore[arg-type]


def authorization_to_proto(a: Authorization) -> authorization_pb2.Authorization:
    return authorization_pb2.Authorization(
        name=a.name,
        namespace=a.namespace,
        scope=_SCOPES[a.scope],
        action=authorization_pb2.ALLOW if a.action is Action.ALLOW else authorization_pb2.DENY,
        rules=[
            authorization_pb2.Rule(
                clauses=[
                    authorization_pb2.Clause(matches=[_match_to_proto(m) for m in c.matches])
                    for c in r.clauses
                ]
            )
            for r in a.rules
        ],
        dry_run=a.dry_run,
    )


def authorization_from_proto(pb: authorization_pb2.Authorization) -> Authorization:
    where = f"authorization {pb.namespace}/{pb.name}"
    if not pb.name or not pb.namespace:
        raise ConversionError(f"{where}: name and namespace are required")
    if pb.scope not in _SCOPE_OF:
        raise ConversionError(f"{where}.scope: unknown value {pb.scope}")
    if pb.action not in (authorization_pb2.ALLOW, authorization_pb2.DENY):
        raise ConversionError(f"{where}.action: unknown value {pb.action}")
    return Authorization(
        name=pb.name,
        namespace=pb.namespace,
        scope=_SCOPE_OF[pb.scope],
        action=Action.ALLOW if pb.action == authorization_pb2.ALLOW else Action.DENY,
        rules=tuple(
            Rule(
                tuple(
                    Clause(
                        tuple(
                            _match_from_proto(m, f"{where}.rules[{i}].clauses[{j}].matches[{k}]")
                            for k, m in enumerate(c.matches)
                        )
                    )
                    for j, c in enumerate(r.clauses)
                )
            )
            for i, r in enumerate(pb.rules)
        ),
        dry_run=pb.dry_run,
    )


def authorization_to_any(a: Authorization) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(authorization_to_proto(a))
    return packed


def authorization_from_any(packed: any_pb2.Any, name: str) -> Authorization:
    pb = authorization_pb2.Authorization()
    if not packed.Unpack(pb):
        raise ConversionError(
            f"resource {name!r}: expected istio.security.Authorization, got {packed.type_url!r}"
        )
    a = authorization_from_proto(pb)
    if a.key != name:
        raise ConversionError(f"resource {name!r}: an authorization resource is named <namespace>/<name>")
    return a

