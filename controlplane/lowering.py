"""Kubernetes model -> what a node proxy is sent: the one place policy and routing are lowered.

istiod decides, for each workload and service, everything a ztunnel needs so that ztunnel
never looks at Kubernetes objects; so does this module, from a :class:`~mesh.model.Snapshot`:

* the waypoint a workload's or service's traffic must pass (:mod:`controlplane.waypoints`:
  Istio's labels, per-account waypoints and strict waypoint mode),
* the services a workload backs and the target port it serves each on (named ports resolved),
* the authorizations a workload lists: the selector-bound AuthorizationPolicies that select
  it, and its effective PeerAuthentication (POLICY.md precedence) as istiod encodes it,
* each AuthorizationPolicy lowered to what L4 can enforce, with a warning for every part lost.

The results are :mod:`mesh.xds.state` values; :mod:`mesh.xds.convert` puts them on the wire.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from controlplane.waypoints import WaypointBinding, service_waypoint, workload_binding
from mesh.model import (
    DEFAULT_CLUSTER_DOMAIN,
    L4_CONDITION_KEYS,
    L7_OPERATION_FIELDS,
    L7_SOURCE_FIELDS,
    ROOT_NAMESPACE,
    AuthorizationAction,
    AuthorizationPolicy,
    Condition,
    MtlsMode,
    PeerAuthentication,
    Service,
    Snapshot,
    WaypointRef,
    Workload,
    WorkloadSelector,
    oldest_first,
)
from mesh.model import Rule as PolicyRule
from mesh.xds import state
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

CLUSTER_ID = "Kubernetes"  # istiod's default cluster id

LABEL_CANONICAL_NAME = "service.istio.io/canonical-name"
LABEL_CANONICAL_REVISION = "service.istio.io/canonical-revision"


_APP_PROTOCOLS = {
    "http": state.AppProtocol.HTTP11,
    "http2": state.AppProtocol.HTTP2,
    "h2c": state.AppProtocol.HTTP2,
    "kubernetes.io/h2c": state.AppProtocol.HTTP2,
    "grpc": state.AppProtocol.GRPC,
    "tcp": state.AppProtocol.TCP,
    "tls": state.AppProtocol.TLS,
}


def app_protocol(name: str | None, port_name: str = "") -> state.AppProtocol:
    """A service port's protocol as istiod derives it: ``appProtocol``, else the port name's
    prefix (``http``, ``http-web``, ``grpc-api``, ``tcp-db``…); unknown means "sniff"."""
    if name:
        return _APP_PROTOCOLS.get(name.lower(), state.AppProtocol.UNKNOWN)
    prefix = port_name.lower().split("-", 1)[0]
    return _APP_PROTOCOLS.get(prefix, state.AppProtocol.UNKNOWN) if "/" not in prefix else state.AppProtocol.UNKNOWN


# --- names ---------------------------------------------------------------------------------


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



# --- waypoints -----------------------------------------------------------------------------


def gateway_address(ref: WaypointRef, snapshot: Snapshot) -> state.GatewayAddress:
    """By hostname (which the proxy resolves to the waypoint's service), so it survives VIP changes."""
    svc = snapshot.services.get(ref.key)
    domain = svc.cluster_domain if svc is not None else DEFAULT_CLUSTER_DOMAIN
    return state.GatewayAddress(namespace=ref.namespace, hostname=f"{ref.name}.{ref.namespace}.svc.{domain}")


# --- selector policies and workloads -------------------------------------------------------


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



def workload_state(
    workload: Workload,
    snapshot: Snapshot,
    selector_policies: SelectorPolicyIndex | Sequence[SelectorPolicy] = (),
    peer_authentications: PeerAuthenticationIndex | None = None,
    binding: WaypointBinding | None = None,
) -> state.Workload:
    """The workload as istiod would send it, with what the snapshot says about it (``binding``:
    its waypoint binding when the caller resolved it already)."""
    w = workload
    if not isinstance(selector_policies, SelectorPolicyIndex):
        selector_policies = SelectorPolicyIndex(selector_policies)
    policies = selector_policies.names_for(w)
    if peer_authentications is not None:
        policies.update(peer_authentications.policies_for(w))
    services: dict[str, tuple[state.Port, ...]] = {}
    for svc in snapshot.services_for_workload(w.uid):
        ports = []
        for p in svc.ports:
            target = p.target_for(w)
            if target is not None:  # a named port this pod does not declare cannot be dialed
                ports.append(state.Port(p.port, target, app_protocol(p.app_protocol, p.name)))
        services[service_key(svc)] = tuple(ports)
    if binding is None:
        binding = workload_binding(w, snapshot)
    return state.Workload(
        uid=w.uid,
        name=w.name,
        namespace=w.namespace,
        addresses=w.ips,
        node=w.node,
        network=w.network,
        tunnel_protocol=w.tunnel_protocol,
        trust_domain=w.trust_domain,
        service_account=w.service_account,
        waypoint=gateway_address(binding.ref, snapshot) if binding.ref is not None else None,
        waypoint_strict=binding.strict,
        waypoint_account_for=binding.account_for,
        services=services,
        authorization_policies=tuple(sorted(policies)),
        status=w.status,
        canonical_name=canonical_name(w),
        canonical_revision=canonical_revision(w),
        workload_name=w.name,
        cluster_id=CLUSTER_ID,
        host_network=w.host_network,
    )


def service_key(service: Service) -> str:
    """The resource name of a service: ``<namespace>/<hostname>``."""
    return f"{service.namespace}/{service.hostname}"


def service_state(service: Service, snapshot: Snapshot) -> state.Service:
    s = service
    waypoint = service_waypoint(s, snapshot)
    return state.Service(
        name=s.name,
        namespace=s.namespace,
        hostname=s.hostname,
        vips=s.vips,
        # A named target is resolved per workload (Workload.services); 0 = "ask the workload".
        ports=tuple(
            state.Port(
                p.port, p.target_port if isinstance(p.target_port, int) else 0, app_protocol(p.app_protocol, p.name)
            )
            for p in s.ports
        ),
        waypoint=gateway_address(waypoint, snapshot) if waypoint is not None else None,
    )


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
    """The L4 part of ``rule`` and the names of the parts that are not L4.

    As istiod: a ``from``/``to`` entry or ``when`` condition is kept even when nothing L4 is
    left of it, as an empty Match — which a node proxy never matches (Istio's ztunnel skips
    empty matches), so such a part can only make its rule match less, never more.
    """
    dropped: list[str] = []
    clauses: list[Clause] = []

    if rule.from_:
        matches: list[Match] = []
        for i, f in enumerate(rule.from_):
            s = f.source
            for attr, api in L7_SOURCE_FIELDS:
                if getattr(s, attr):
                    dropped.append(f"from[{i}].source.{api}")
            matches.append(
                Match(
                    principals=tuple(map(_principal, s.principals)),
                    not_principals=tuple(map(_principal, s.not_principals)),
                    namespaces=tuple(map(StringMatch.parse, s.namespaces)),
                    not_namespaces=tuple(map(StringMatch.parse, s.not_namespaces)),
                    service_accounts=_service_accounts(s.service_accounts),
                    not_service_accounts=_service_accounts(s.not_service_accounts),
                    source_ips=_networks(s.ip_blocks),
                    not_source_ips=_networks(s.not_ip_blocks),
                )
            )
        clauses.append(Clause(tuple(matches)))

    if rule.to:
        matches = []
        for i, t in enumerate(rule.to):
            o = t.operation
            for attr, api in L7_OPERATION_FIELDS:
                if getattr(o, attr):
                    dropped.append(f"to[{i}].operation.{api}")
            matches.append(Match(destination_ports=o.ports, not_destination_ports=o.not_ports))
        clauses.append(Clause(tuple(matches)))

    for i, cond in enumerate(rule.when):
        match = _condition_match(cond)
        if isinstance(match, str):
            dropped.append(f"when[{i}] ({match})")
            match = Match()
        clauses.append(Clause((match,)))
    return Rule(tuple(clauses)), dropped


def _never_matches(rule: Rule) -> bool:
    """Whether a lowered rule has a clause made only of empty matches (it can never match)."""
    return any(c.matches and all(m == Match() for m in c.matches) for c in rule.clauses)


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
        elif _never_matches(lowered):
            rules.append(lowered)
            warnings.append(
                f"{where}: rules[{i}] uses L7 attributes ztunnel cannot enforce ({', '.join(dropped)}); "
                "a part made only of them matches nothing at L4, so this DENY rule never fires "
                "(attach the policy to a waypoint)"
            )
        else:
            rules.append(lowered)
            warnings.append(
                f"{where}: rules[{i}] uses L7 attributes ztunnel cannot enforce ({', '.join(dropped)}); "
                "only its L4 part is enforced, so it denies more widely than written "
                "(attach the policy to a waypoint)"
            )

    if p.selector is not None:
        scope = Scope.WORKLOAD_SELECTOR
    elif p.namespace == ROOT_NAMESPACE:
        scope = Scope.GLOBAL
    else:
        scope = Scope.NAMESPACE
    return LoweredPolicy(
        Authorization(
            name=p.name, namespace=p.namespace, scope=scope, action=action, rules=tuple(rules), dry_run=p.dry_run
        ),
        tuple(warnings),
    )


# --- PeerAuthentication: mTLS modes lowered to authorizations, as istiod does -------------

STATIC_STRICT_NAME = "istio_converted_static_strict"
_PRESENCE = StringMatch(MatchKind.PRESENCE)
def _service_accounts(values: tuple[str, ...]) -> tuple[ServiceAccountMatch, ...]:
    """``<namespace>/<name>`` (the source normalised a bare name) as the wire's match."""
    return tuple(ServiceAccountMatch(*v.split("/", 1)) for v in values)


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


# --- everything at once ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoweredPolicies:
    """Every authorization a node proxy is sent for one snapshot, and how workloads list them.

    ``warnings`` maps ``namespace/name`` of each AuthorizationPolicy (and ``PeerAuthentication``
    for the mTLS ones) to what could not be enforced by a node proxy.
    """

    authorizations: tuple[Authorization, ...]
    selector_policies: SelectorPolicyIndex
    peer_authentications: PeerAuthenticationIndex
    warnings: Mapping[str, tuple[str, ...]]

    def workload(self, workload: Workload, snapshot: Snapshot) -> state.Workload:
        return workload_state(workload, snapshot, self.selector_policies, self.peer_authentications)


def selector_policy(
    policy: AuthorizationPolicy, authorization: Authorization | None
) -> SelectorPolicy | None:
    """How workloads list ``policy``, lowered to ``authorization`` (None: none of them do)."""
    if authorization is None or authorization.scope is not Scope.WORKLOAD_SELECTOR or policy.selector is None:
        return None
    return SelectorPolicy(authorization.key, authorization.namespace, policy.selector)


def lower_policies(snapshot: Snapshot) -> LoweredPolicies:
    """Lower every AuthorizationPolicy and PeerAuthentication of ``snapshot`` (``ambientctl
    policy check``). The discovery server keeps the same results per policy, to update them one
    at a time, from the same pieces (:func:`lower_authorization_policy`, :func:`selector_policy`,
    :class:`PeerAuthenticationIndex`), so the two cannot disagree."""
    authorizations: list[Authorization] = []
    selector_policies: list[SelectorPolicy] = []
    warnings: dict[str, tuple[str, ...]] = {}
    for key, policy in sorted(snapshot.authorization_policies.items()):
        lowered = lower_authorization_policy(policy)
        if lowered.warnings:
            warnings[key] = lowered.warnings
        a = lowered.authorization
        if a is None:
            continue
        authorizations.append(a)
        listed = selector_policy(policy, a)
        if listed is not None:
            selector_policies.append(listed)
    peer_auth = PeerAuthenticationIndex(snapshot.peer_authentications.values())
    if peer_auth.warnings:
        warnings["PeerAuthentication"] = peer_auth.warnings
    authorizations.extend(peer_auth.authorizations())
    return LoweredPolicies(tuple(authorizations), SelectorPolicyIndex(selector_policies), peer_auth, warnings)
