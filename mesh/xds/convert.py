"""Model objects <-> the discovery wire messages (``istio.workload``, ``istio.security``).

Pure functions, no I/O: the discovery server calls the ``*_to_proto`` side on snapshots of the
store, a node proxy's discovery client calls the ``*_from_proto`` side on what it receives.
The wire messages are what Istio's ztunnel consumes, so what they carry (and how resources are
named) follows istiod, not our model: a workload's effective waypoint and the services it backs
are computed from the snapshot here, because on the wire they are part of the workload.

Receiving is validation at the edge: every malformed field raises :class:`ConversionError`
naming the resource and the field, and the client NACKs the response that carried it.

Two things the wire does not carry are rebuilt on the client so the ordinary
:class:`~mesh.model.Snapshot` lookups keep working there:

* service membership. The wire says "workload W backs service S on these ports" (the
  workload's ``services`` map); the model says "service S selects pods with these labels".
  A received workload gets one label ``SERVICE_MEMBERSHIP_PREFIX + "<ns>/<hostname>"`` per
  service it backs, and a received service selects on its label, so ``Snapshot.endpoints()``
  and ``services_for_workload()`` answer as on the control plane.
* per-workload target ports. A received service port's ``target_port`` is the name
  ``"<ns>/<hostname>:<port>"``, and each workload's ``named_ports`` maps that name to the
  target port the control plane resolved for it, so ``ServicePort.target_for(workload)``
  gives the right port even where pods name their ports differently.

L4 authorization lowering (:func:`lower_authorization_policy`) follows POLICY.md: only what a
node proxy can enforce survives, and every dropped part comes back as a warning.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from google.protobuf import any_pb2

from mesh.model import (
    DEFAULT_CLUSTER_DOMAIN,
    DEFAULT_SERVICE_ACCOUNT,
    DEFAULT_TRUST_DOMAIN,
    ROOT_NAMESPACE,
    AuthorizationAction,
    AuthorizationPolicy,
    Condition,
    MtlsMode,
    PeerAuthentication,
    Service,
    ServicePort,
    Snapshot,
    TunnelProtocol,
    WaypointRef,
    Workload,
    WorkloadSelector,
    WorkloadStatus,
    oldest_first,
)
from mesh.model import Rule as PolicyRule
from mesh.proto import authorization_pb2, workload_pb2
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

ADDRESS_TYPE_URL = "type.googleapis.com/istio.workload.Address"
AUTHORIZATION_TYPE_URL = "type.googleapis.com/istio.security.Authorization"
TYPE_URLS = (ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL)

HBONE_PORT = 15008
CLUSTER_ID = "Kubernetes"  # istiod's default cluster id

LABEL_CANONICAL_NAME = "service.istio.io/canonical-name"
LABEL_CANONICAL_REVISION = "service.istio.io/canonical-revision"
# Labels only a discovery client puts on the workloads it receives (see the module docstring).
SERVICE_MEMBERSHIP_PREFIX = "xds.mesh/service."

# The `when` keys a node proxy can evaluate; everything else needs a waypoint.
L4_CONDITION_KEYS = frozenset(
    {"source.ip", "source.namespace", "source.principal", "destination.ip", "destination.port"}
)

_APP_PROTOCOLS: Mapping[str, workload_pb2.AppProtocol] = {
    "http": workload_pb2.HTTP11,
    "http2": workload_pb2.HTTP2,
    "h2c": workload_pb2.HTTP2,
    "kubernetes.io/h2c": workload_pb2.HTTP2,
    "grpc": workload_pb2.GRPC,
    "tcp": workload_pb2.TCP,
    "tls": workload_pb2.TLS,
}
_APP_PROTOCOL_NAMES: Mapping[int, str] = {
    workload_pb2.HTTP11: "http",
    workload_pb2.HTTP2: "http2",
    workload_pb2.GRPC: "grpc",
    workload_pb2.TCP: "tcp",
    workload_pb2.TLS: "tls",
}


class ConversionError(ValueError):
    """A received resource cannot be represented; the message names the resource and field."""


# --- small pieces --------------------------------------------------------------------------


def ip_to_bytes(ip: str) -> bytes:
    return ipaddress.ip_address(ip).packed


def ip_from_bytes(raw: bytes, where: str) -> str:
    if len(raw) not in (4, 16):
        raise ConversionError(f"{where}: an IP address is 4 or 16 bytes, not {len(raw)}")
    return str(ipaddress.ip_address(raw))


def service_resource_name(service: Service) -> str:
    """Istio names a service resource ``<namespace>/<hostname>``."""
    return f"{service.namespace}/{service.hostname}"


def _membership_label(service_name: str) -> str:
    return SERVICE_MEMBERSHIP_PREFIX + service_name


def _target_port_name(service_name: str, port: int) -> str:
    return f"{service_name}:{port}"


def canonical_name(workload: Workload) -> str:
    """Istio's telemetry name: the canonical-name label, else the app labels, else the pod."""
    labels = workload.labels
    return (
        labels.get(LABEL_CANONICAL_NAME)
        or labels.get("app.kubernetes.io/name")
        or labels.get("app")
        or workload.name
    )


def canonical_revision(workload: Workload) -> str:
    labels = workload.labels
    return (
        labels.get(LABEL_CANONICAL_REVISION)
        or labels.get("app.kubernetes.io/version")
        or labels.get("version")
        or "latest"
    )


def app_protocol_to_proto(name: str | None) -> workload_pb2.AppProtocol:
    return _APP_PROTOCOLS.get((name or "").lower(), workload_pb2.UNKNOWN)


# --- waypoints -----------------------------------------------------------------------------


def _usable_waypoint(
    ref: WaypointRef | None, snapshot: Snapshot, kinds: frozenset[str]
) -> WaypointRef | None:
    """``ref`` when it names an existing waypoint Gateway that serves this kind of traffic.

    A missing waypoint fails open to direct delivery (PROTOCOLS.md), so it is simply not sent.
    """
    if ref is None or ref.opts_out:
        return None
    gw = snapshot.gateways.get(ref.key)
    if gw is None or not gw.is_waypoint or gw.waypoint_for not in kinds:
        return None
    return ref


def _own_or_namespace(own: WaypointRef | None, namespace: str, snapshot: Snapshot) -> WaypointRef | None:
    if own is not None:  # includes an explicit opt-out ("none")
        return own
    ns = snapshot.namespaces.get(namespace)
    return ns.waypoint if ns is not None else None


def workload_waypoint(workload: Workload, snapshot: Snapshot) -> WaypointRef | None:
    """The waypoint inbound traffic to ``workload`` must pass: its label, else its namespace's."""
    ref = _own_or_namespace(workload.waypoint, workload.namespace, snapshot)
    return _usable_waypoint(ref, snapshot, frozenset({"workload", "all"}))


def service_waypoint(service: Service, snapshot: Snapshot) -> WaypointRef | None:
    ref = _own_or_namespace(service.waypoint, service.namespace, snapshot)
    return _usable_waypoint(ref, snapshot, frozenset({"service", "all"}))


def gateway_address(ref: WaypointRef, snapshot: Snapshot) -> workload_pb2.GatewayAddress:
    """By hostname (which ztunnel resolves to the waypoint's service), so it survives VIP changes."""
    svc = snapshot.services.get(ref.key)
    domain = svc.cluster_domain if svc is not None else DEFAULT_CLUSTER_DOMAIN
    return workload_pb2.GatewayAddress(
        hostname=workload_pb2.NamespacedHostname(
            namespace=ref.namespace, hostname=f"{ref.name}.{ref.namespace}.svc.{domain}"
        ),
        hbone_mtls_port=HBONE_PORT,
    )


def _waypoint_from_proto(gw: workload_pb2.GatewayAddress, where: str) -> WaypointRef | None:
    kind = gw.WhichOneof("destination")
    if kind is None:
        return None
    if kind != "hostname":
        raise ConversionError(f"{where}.waypoint: only hostname waypoints are supported, got {kind}")
    name = gw.hostname.hostname.split(".", 1)[0]
    if not name or not gw.hostname.namespace:
        raise ConversionError(f"{where}.waypoint: empty hostname or namespace")
    return WaypointRef(name=name, namespace=gw.hostname.namespace)


# --- workloads -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SelectorPolicy:
    """A WORKLOAD_SELECTOR-scoped authorization that is served, for listing on workloads."""

    key: str
    namespace: str
    selector: WorkloadSelector

    def selects(self, workload: Workload) -> bool:
        in_scope = self.namespace in (workload.namespace, ROOT_NAMESPACE)
        return in_scope and self.selector.matches(workload.labels)


class SelectorPolicyIndex:
    """Selector policies by namespace and by one of their labels, so a workload only checks
    the few that could select it (with 10,000 pods and 1,000 policies, checking all of them
    per pod is most of a full render)."""

    def __init__(self, policies: Iterable[SelectorPolicy] = ()) -> None:
        # namespace -> (label key, value) or None for an empty selector -> policies
        self._index: dict[str, dict[tuple[str, str] | None, list[SelectorPolicy]]] = {}
        for p in policies:
            first = next(iter(p.selector.match_labels.items()), None)
            self._index.setdefault(p.namespace, {}).setdefault(first, []).append(p)

    def names_for(self, workload: Workload) -> set[str]:
        found: set[str] = set()
        labels = workload.labels
        for ns in {workload.namespace, ROOT_NAMESPACE}:
            by_label = self._index.get(ns)
            if not by_label:
                continue
            for item in (None, *labels.items()):
                for p in by_label.get(item, ()):
                    if p.selector.matches(labels):
                        found.add(p.key)
        return found


def workload_to_proto(
    workload: Workload,
    snapshot: Snapshot,
    selector_policies: SelectorPolicyIndex | Sequence[SelectorPolicy] = (),
    peer_authentications: PeerAuthenticationIndex | None = None,
) -> workload_pb2.Workload:
    """The workload as istiod would send it, with what the snapshot says about it."""
    w = workload
    if not isinstance(selector_policies, SelectorPolicyIndex):
        selector_policies = SelectorPolicyIndex(selector_policies)
    policies = selector_policies.names_for(w)
    if peer_authentications is not None:
        policies.update(peer_authentications.policies_for(w))
    pb = workload_pb2.Workload(
        uid=w.uid,
        name=w.name,
        namespace=w.namespace,
        addresses=[ip_to_bytes(ip) for ip in w.ips],
        network=w.network,
        tunnel_protocol=workload_pb2.HBONE
        if w.tunnel_protocol is TunnelProtocol.HBONE
        else workload_pb2.NONE,
        trust_domain=w.trust_domain,
        service_account=w.service_account,
        node=w.node,
        canonical_name=canonical_name(w),
        canonical_revision=canonical_revision(w),
        workload_type=workload_pb2.POD,
        workload_name=w.name,
        status=workload_pb2.UNHEALTHY if w.status is WorkloadStatus.UNHEALTHY else workload_pb2.HEALTHY,
        cluster_id=CLUSTER_ID,
        network_mode=workload_pb2.HOST_NETWORK if w.host_network else workload_pb2.STANDARD,
        authorization_policies=sorted(policies),
    )
    waypoint = workload_waypoint(w, snapshot)
    if waypoint is not None:
        pb.waypoint.CopyFrom(gateway_address(waypoint, snapshot))
    for svc in snapshot.services_for_workload(w.uid):
        ports = pb.services[service_resource_name(svc)].ports
        for p in svc.ports:
            target = p.target_for(w)
            if target is not None:  # a named port this pod does not declare cannot be dialed
                ports.add(
                    service_port=p.port,
                    target_port=target,
                    app_protocol=app_protocol_to_proto(p.app_protocol),
                )
    return pb


def workload_from_proto(pb: workload_pb2.Workload) -> Workload:
    where = f"workload {pb.uid or '?'}"
    if not pb.uid:
        raise ConversionError(f"{where}: uid is empty")
    if not pb.name or not pb.namespace:
        raise ConversionError(f"{where}: name and namespace are required")
    ips = tuple(ip_from_bytes(raw, f"{where}.addresses[{i}]") for i, raw in enumerate(pb.addresses))
    labels: dict[str, str] = {}
    if pb.canonical_name:
        labels[LABEL_CANONICAL_NAME] = pb.canonical_name
    if pb.canonical_revision:
        labels[LABEL_CANONICAL_REVISION] = pb.canonical_revision
    named_ports: dict[str, int] = {}
    for svc_name, port_list in pb.services.items():
        labels[_membership_label(svc_name)] = "true"
        for port in port_list.ports:
            if port.target_port:
                named_ports[_target_port_name(svc_name, port.service_port)] = port.target_port
    if pb.tunnel_protocol not in (workload_pb2.NONE, workload_pb2.HBONE):
        raise ConversionError(f"{where}.tunnel_protocol: {pb.tunnel_protocol} is not supported")
    return Workload(
        uid=pb.uid,
        name=pb.name,
        namespace=pb.namespace,
        node=pb.node,
        service_account=pb.service_account or DEFAULT_SERVICE_ACCOUNT,
        ips=ips,
        labels=labels,
        network=pb.network,
        tunnel_protocol=TunnelProtocol.HBONE
        if pb.tunnel_protocol == workload_pb2.HBONE
        else TunnelProtocol.NONE,
        waypoint=_waypoint_from_proto(pb.waypoint, where) if pb.HasField("waypoint") else None,
        trust_domain=pb.trust_domain or DEFAULT_TRUST_DOMAIN,
        host_network=pb.network_mode == workload_pb2.HOST_NETWORK,
        status=WorkloadStatus.UNHEALTHY if pb.status == workload_pb2.UNHEALTHY else WorkloadStatus.HEALTHY,
        named_ports=named_ports,
    )


# --- services ------------------------------------------------------------------------------


def service_to_proto(service: Service, snapshot: Snapshot) -> workload_pb2.Service:
    s = service
    pb = workload_pb2.Service(
        name=s.name,
        namespace=s.namespace,
        hostname=s.hostname,
        addresses=[workload_pb2.NetworkAddress(address=ip_to_bytes(vip)) for vip in s.vips],
        ports=[
            workload_pb2.Port(
                service_port=p.port,
                # A named target is resolved per workload (Workload.services); 0 = "ask the workload".
                target_port=p.target_port if isinstance(p.target_port, int) else 0,
                app_protocol=app_protocol_to_proto(p.app_protocol),
            )
            for p in s.ports
        ],
    )
    waypoint = service_waypoint(s, snapshot)
    if waypoint is not None:
        pb.waypoint.CopyFrom(gateway_address(waypoint, snapshot))
    return pb


def service_from_proto(pb: workload_pb2.Service) -> Service:
    where = f"service {pb.namespace}/{pb.hostname}"
    prefix = f"{pb.name}.{pb.namespace}.svc."
    if not pb.name or not pb.namespace or not pb.hostname.startswith(prefix) or pb.hostname == prefix:
        raise ConversionError(
            f"{where}: hostname {pb.hostname!r} is not <name>.<namespace>.svc.<domain> "
            "(only Kubernetes services are supported)"
        )
    name = f"{pb.namespace}/{pb.hostname}"
    vips = tuple(ip_from_bytes(a.address, f"{where}.addresses[{i}]") for i, a in enumerate(pb.addresses))
    ports = []
    for p in pb.ports:
        if not 0 < p.service_port < 65536:
            raise ConversionError(f"{where}.ports: service_port {p.service_port} is out of range")
        ports.append(
            ServicePort(
                port=p.service_port,
                target_port=_target_port_name(name, p.service_port),
                app_protocol=_APP_PROTOCOL_NAMES.get(p.app_protocol),
            )
        )
    return Service(
        namespace=pb.namespace,
        name=pb.name,
        vips=vips,
        ports=tuple(ports),
        selector={_membership_label(name): "true"},
        waypoint=_waypoint_from_proto(pb.waypoint, where) if pb.HasField("waypoint") else None,
        cluster_domain=pb.hostname[len(prefix) :],
    )


def address_to_any(address: workload_pb2.Address) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(address)
    return packed


def address_from_any(packed: any_pb2.Any, name: str) -> Workload | Service:
    """Unpack one ``istio.workload.Address`` resource named ``name``."""
    address = workload_pb2.Address()
    if not packed.Unpack(address):
        raise ConversionError(f"resource {name!r}: expected istio.workload.Address, got {packed.type_url!r}")
    kind = address.WhichOneof("type")
    if kind == "workload":
        workload = workload_from_proto(address.workload)
        if workload.uid != name:
            raise ConversionError(
                f"resource {name!r}: a workload resource is named by its uid {workload.uid!r}"
            )
        return workload
    if kind == "service":
        service = service_from_proto(address.service)
        if service_resource_name(service) != name:
            raise ConversionError(f"resource {name!r}: a service resource is named <namespace>/<hostname>")
        return service
    raise ConversionError(f"resource {name!r}: Address has neither workload nor service")


# --- authorization: the CRD lowered to L4 --------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoweredPolicy:
    """What a node proxy is sent for one AuthorizationPolicy (None: nothing), and what was lost."""

    authorization: Authorization | None
    warnings: tuple[str, ...] = ()


def _principal(value: str) -> StringMatch:
    return StringMatch.parse(value.removeprefix("spiffe://"))


def _networks(values: Iterable[str]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(v, strict=False) for v in values)


def _condition_match(cond: Condition) -> Match | str:
    """The Match for an L4 ``when`` condition, or why it cannot be enforced at L4."""
    key = cond.key
    if key not in L4_CONDITION_KEYS:
        return f"when key {key!r}"
    try:
        if key == "source.ip":
            return Match(source_ips=_networks(cond.values), not_source_ips=_networks(cond.not_values))
        if key == "destination.ip":
            return Match(
                destination_ips=_networks(cond.values), not_destination_ips=_networks(cond.not_values)
            )
        if key == "destination.port":
            ports, not_ports = tuple(map(int, cond.values)), tuple(map(int, cond.not_values))
            if not all(0 < p < 65536 for p in (*ports, *not_ports)):
                raise ValueError("port out of range")
            return Match(destination_ports=ports, not_destination_ports=not_ports)
    except ValueError as e:
        return f"when {key!r} with an invalid value ({e})"
    if key == "source.namespace":
        return Match(
            namespaces=tuple(map(StringMatch.parse, cond.values)),
            not_namespaces=tuple(map(StringMatch.parse, cond.not_values)),
        )
    # source.principal
    return Match(
        principals=tuple(map(_principal, cond.values)), not_principals=tuple(map(_principal, cond.not_values))
    )


def _lower_rule(rule: PolicyRule) -> tuple[Rule, list[str]]:
    """The L4 part of ``rule`` and the names of the parts that are not L4."""
    dropped: list[str] = []
    clauses: list[Clause] = []

    if rule.from_:
        matches: list[Match] = []
        for i, f in enumerate(rule.from_):
            s = f.source
            for attr in (
                "request_principals",
                "not_request_principals",
                "remote_ip_blocks",
                "not_remote_ip_blocks",
            ):
                if getattr(s, attr):
                    dropped.append(f"from[{i}].source.{attr}")
            matches.append(
                Match(
                    principals=tuple(map(_principal, s.principals)),
                    not_principals=tuple(map(_principal, s.not_principals)),
                    namespaces=tuple(map(StringMatch.parse, s.namespaces)),
                    not_namespaces=tuple(map(StringMatch.parse, s.not_namespaces)),
                    source_ips=_networks(s.ip_blocks),
                    not_source_ips=_networks(s.not_ip_blocks),
                )
            )
        # One source left with nothing L4 in it matches everyone, and so does the OR of them all.
        if Match() not in matches:
            clauses.append(Clause(tuple(matches)))

    if rule.to:
        matches = []
        for i, t in enumerate(rule.to):
            o = t.operation
            for attr in ("hosts", "not_hosts", "methods", "not_methods", "paths", "not_paths"):
                if getattr(o, attr):
                    dropped.append(f"to[{i}].operation.{attr}")
            matches.append(Match(destination_ports=o.ports, not_destination_ports=o.not_ports))
        if Match() not in matches:
            clauses.append(Clause(tuple(matches)))

    for i, cond in enumerate(rule.when):
        match = _condition_match(cond)
        if isinstance(match, str):
            dropped.append(f"when[{i}] ({match})")
        else:
            clauses.append(Clause((match,)))
    return Rule(tuple(clauses)), dropped


def lower_authorization_policy(policy: AuthorizationPolicy) -> LoweredPolicy:
    """Lower an AuthorizationPolicy to the L4 Authorization ztunnel enforces (POLICY.md).

    Fail closed: an ALLOW rule that needs L7 attributes is dropped (it can never match at L4,
    so what it would have allowed is denied); a DENY rule loses only its L7 parts (it then
    denies more). Waypoint-bound (``targetRefs``), AUDIT and CUSTOM policies are not for a
    node proxy at all.
    """
    p = policy
    where = f"AuthorizationPolicy {p.namespace}/{p.name}"
    if p.target_refs:
        return LoweredPolicy(None)  # bound to a waypoint (Gateway/Service): L7, the waypoint's
    if p.action is AuthorizationAction.CUSTOM:
        return LoweredPolicy(None, (f"{where}: CUSTOM is enforced by waypoints only; not sent to ztunnel",))
    if p.action is AuthorizationAction.AUDIT:
        return LoweredPolicy(None, (f"{where}: AUDIT is not enforced by ztunnel; not sent",))

    action = Action.ALLOW if p.action is AuthorizationAction.ALLOW else Action.DENY
    rules: list[Rule] = []
    warnings: list[str] = []
    for i, rule in enumerate(p.rules):
        lowered, dropped = _lower_rule(rule)
        if not dropped:
            rules.append(lowered)
        elif action is Action.ALLOW:
            warnings.append(
                f"{where}: rules[{i}] uses L7 attributes ztunnel cannot enforce ({', '.join(dropped)}); "
                "the rule is dropped and allows nothing (attach the policy to a waypoint)"
            )
        else:
            rules.append(lowered)
            warnings.append(
                f"{where}: rules[{i}] uses L7 attributes ztunnel cannot enforce ({', '.join(dropped)}); "
                "only its L4 part is enforced, so it denies more (attach the policy to a waypoint)"
            )

    if p.selector is not None:
        scope = Scope.WORKLOAD_SELECTOR
    elif p.namespace == ROOT_NAMESPACE:
        scope = Scope.GLOBAL
    else:
        scope = Scope.NAMESPACE
    return LoweredPolicy(
        Authorization(name=p.name, namespace=p.namespace, scope=scope, action=action, rules=tuple(rules)),
        tuple(warnings),
    )


# --- PeerAuthentication: mTLS modes lowered to authorizations, as istiod does -------------

STATIC_STRICT_NAME = "istio_converted_static_strict"
_PRESENCE = StringMatch(MatchKind.PRESENCE)
_NO_PEER = Match(not_principals=(_PRESENCE,))  # a connection without a peer identity


def static_strict_authorization() -> Authorization:
    """Served always; every workload whose effective mode is plain STRICT lists it."""
    return Authorization(
        name=STATIC_STRICT_NAME,
        namespace=ROOT_NAMESPACE,
        scope=Scope.WORKLOAD_SELECTOR,
        action=Action.DENY,
        rules=(Rule((Clause((_NO_PEER,)),)),),
    )


def _mode(pa: PeerAuthentication | None) -> MtlsMode:
    # DISABLE is not supported in ambient: it is ignored, i.e. inherits like UNSET.
    if pa is None or pa.mtls_mode is MtlsMode.DISABLE:
        return MtlsMode.UNSET
    return pa.mtls_mode


class PeerAuthenticationIndex:
    """Effective mTLS mode per workload (POLICY.md precedence), as L4 DENY authorizations.

    Like istiod: plain STRICT is one shared static policy the workload lists; a
    workload-selector policy with port-level modes becomes its own policy
    ``<ns>/converted_peer_authentication_<name>`` listed by the workloads it governs.
    """

    def __init__(self, peer_authentications: Iterable[PeerAuthentication]) -> None:
        ordered = sorted(peer_authentications, key=oldest_first)
        self._namespace: dict[str, PeerAuthentication] = {}
        self._selectors: dict[str, list[PeerAuthentication]] = {}
        for pa in ordered:
            if pa.selector is None:
                self._namespace.setdefault(pa.namespace, pa)  # among equals the oldest wins
            else:
                self._selectors.setdefault(pa.namespace, []).append(pa)
        self.warnings: tuple[str, ...] = tuple(
            f"PeerAuthentication {pa.namespace}/{pa.name}: mode DISABLE is not supported in ambient; ignored"
            for pa in ordered
            if pa.mtls_mode is MtlsMode.DISABLE or MtlsMode.DISABLE in pa.port_level_mtls.values()
        )
        self._converted: dict[str, Authorization | None] = {}

    def _base_mode(self, namespace: str) -> MtlsMode:
        for pa in (self._namespace.get(namespace), self._namespace.get(ROOT_NAMESPACE)):
            mode = _mode(pa)
            if mode is not MtlsMode.UNSET:
                return mode
        return MtlsMode.PERMISSIVE

    def _workload_policy(self, workload: Workload) -> PeerAuthentication | None:
        for pa in self._selectors.get(workload.namespace, ()):
            if pa.selector is not None and pa.selector.matches(workload.labels):
                return pa
        return None

    def _convert(self, pa: PeerAuthentication, base: MtlsMode) -> Authorization | None:
        ports = {p: m for p, m in pa.port_level_mtls.items() if m in (MtlsMode.STRICT, MtlsMode.PERMISSIVE)}
        if base is MtlsMode.STRICT:
            open_ports = tuple(sorted(p for p, m in ports.items() if m is MtlsMode.PERMISSIVE))
            match = Match(not_principals=(_PRESENCE,), not_destination_ports=open_ports)
        else:
            strict_ports = tuple(sorted(p for p, m in ports.items() if m is MtlsMode.STRICT))
            if not strict_ports:
                return None
            match = Match(not_principals=(_PRESENCE,), destination_ports=strict_ports)
        return Authorization(
            name=f"converted_peer_authentication_{pa.name}",
            namespace=pa.namespace,
            scope=Scope.WORKLOAD_SELECTOR,
            action=Action.DENY,
            rules=(Rule((Clause((match,)),)),),
        )

    def _converted_for(self, pa: PeerAuthentication, base: MtlsMode) -> Authorization | None:
        if pa.key not in self._converted:
            self._converted[pa.key] = self._convert(pa, base)
        return self._converted[pa.key]

    def _mode_under(self, pa: PeerAuthentication) -> MtlsMode:
        own = _mode(pa)
        return own if own is not MtlsMode.UNSET else self._base_mode(pa.namespace)

    @staticmethod
    def _has_port_modes(pa: PeerAuthentication) -> bool:
        return any(m in (MtlsMode.STRICT, MtlsMode.PERMISSIVE) for m in pa.port_level_mtls.values())

    def policies_for(self, workload: Workload) -> tuple[str, ...]:
        """Names of the mTLS authorizations ``workload`` must list."""
        pa = self._workload_policy(workload)
        if pa is None:
            mode = self._base_mode(workload.namespace)
        elif self._has_port_modes(pa):
            converted = self._converted_for(pa, self._mode_under(pa))
            return (converted.key,) if converted is not None else ()
        else:
            mode = self._mode_under(pa)
        return (f"{ROOT_NAMESPACE}/{STATIC_STRICT_NAME}",) if mode is MtlsMode.STRICT else ()

    def authorizations(self) -> tuple[Authorization, ...]:
        """The static STRICT policy plus one per workload-selector policy with port-level modes.

        Computed for every such policy, selecting anything or not, so a pod added later
        never lists a policy that is not served.
        """
        converted: list[Authorization] = []
        for policies in self._selectors.values():
            for pa in policies:
                if self._has_port_modes(pa):
                    a = self._converted_for(pa, self._mode_under(pa))
                    if a is not None:
                        converted.append(a)
        return (static_strict_authorization(), *sorted(converted, key=lambda a: a.key))


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
