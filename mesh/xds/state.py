"""What a node proxy knows about the mesh: exactly what discovery carries it, nothing more.

Istio's ztunnel keeps workloads, services and authorizations as istiod sends them
(``istio.workload.Address``, ``istio.security.Authorization``) and decides everything from
those; so do we. A workload says which services it backs (and on which target ports), which
waypoint its traffic must pass, and which selector-bound authorizations name it; a service
says its VIPs, ports and waypoint; an authorization says its scope. Nothing here is inferred
from Kubernetes kinds (labels, selectors, namespaces, PeerAuthentications): the control plane
already turned those into these fields, and what a test feeds a proxy over discovery is what
production feeds it.

One writer (the discovery client) applies each response as one atomic step; readers take a
:class:`ProxySnapshot` per decision and keep it as long as they like: its maps are never
changed after it is published.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TypeVar

import structlog

from mesh.identity import Identity
from mesh.model.frozen import FrozenMap, freeze_fields, tuple_fields
from mesh.model.meshconfig import ExtensionProvider
from mesh.model.objects import DEFAULT_SERVICE_ACCOUNT, DEFAULT_TRUST_DOMAIN, TunnelProtocol, WorkloadStatus
from mesh.model.policy import AuthorizationPolicy, RequestAuthentication
from mesh.model.waf import WafPolicy
from mesh.subscribers import Subscribers
from mesh.xds.authorization import Authorization, Scope

log = structlog.get_logger(__name__)

_NO_POLICIES: Mapping[str, AuthorizationPolicy] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class WaypointAuthentication:
    """A waypoint-bound RequestAuthentication as written, with the JWKS documents the control
    plane fetched for its ``jwksUri`` rules (by URI; a URI missing was never fetched)."""

    policy: RequestAuthentication
    jwks_by_uri: Mapping[str, str] = field(default_factory=FrozenMap)

    def __post_init__(self) -> None:
        freeze_fields(self, "jwks_by_uri")

    @property
    def key(self) -> str:
        return self.policy.key


_NO_AUTHNS: Mapping[str, WaypointAuthentication] = MappingProxyType({})
_NO_PROVIDERS: Mapping[str, ExtensionProvider] = MappingProxyType({})
_NO_WAF: Mapping[str, WafPolicy] = MappingProxyType({})

HBONE_PORT = 15008


class AppProtocol(enum.StrEnum):
    """``istio.workload.AppProtocol``: what the control plane knows a port speaks."""

    UNKNOWN = "UNKNOWN"
    HTTP11 = "HTTP11"
    HTTP2 = "HTTP2"
    GRPC = "GRPC"
    TCP = "TCP"
    TLS = "TLS"


@dataclass(frozen=True, slots=True)
class GatewayAddress:
    """Where a waypoint is (``istio.workload.GatewayAddress``).

    Either by ``hostname`` (a service ``namespace``/``hostname`` the proxy resolves to the
    waypoint's pods, what istiod sends) or by ``address`` (an IP, used as it is).
    """

    namespace: str = ""
    hostname: str = ""
    address: str = ""
    network: str = ""
    hbone_port: int = HBONE_PORT

    @property
    def service_key(self) -> str:
        """The resource name of the waypoint's service (hostname form only)."""
        return f"{self.namespace}/{self.hostname}"

    def __str__(self) -> str:
        return self.service_key if self.hostname else f"{self.address}:{self.hbone_port}"


@dataclass(frozen=True, slots=True)
class Port:
    """``istio.workload.Port``. On a service a ``target_port`` of 0 means "ask the workload"."""

    service_port: int
    target_port: int
    app_protocol: AppProtocol = AppProtocol.UNKNOWN


@dataclass(frozen=True, slots=True)
class Workload:
    """``istio.workload.Workload``: one pod as discovery describes it. Resource name: ``uid``."""

    uid: str
    name: str
    namespace: str
    addresses: tuple[str, ...] = ()  # canonical text form
    node: str = ""
    network: str = ""
    tunnel_protocol: TunnelProtocol = TunnelProtocol.NONE
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    service_account: str = DEFAULT_SERVICE_ACCOUNT
    waypoint: GatewayAddress | None = None
    # Ours, carried in a Workload extension (mesh/proto/waypoint.proto): strict waypoint mode, and
    # for a per-account waypoint which traffic it takes ("service" / "workload" / "all"); "" is
    # Istio's meaning of ``waypoint`` (pod-addressed traffic only).
    waypoint_strict: bool = False
    waypoint_account_for: str = ""
    # "<namespace>/<hostname>" of each service it backs -> the ports it serves for it
    services: Mapping[str, tuple[Port, ...]] = field(default_factory=FrozenMap)
    authorization_policies: tuple[str, ...] = ()  # "<namespace>/<name>" of selector policies
    status: WorkloadStatus = WorkloadStatus.HEALTHY
    canonical_name: str = ""
    canonical_revision: str = ""
    workload_name: str = ""
    cluster_id: str = ""
    host_network: bool = False

    def __post_init__(self) -> None:
        tuple_fields(self, "addresses", "authorization_policies")
        freeze_fields(self, "services")
        if any(not isinstance(v, tuple) for v in self.services.values()):
            object.__setattr__(self, "services", FrozenMap({k: tuple(v) for k, v in self.services.items()}))

    @property
    def identity(self) -> Identity:
        return Identity(self.trust_domain, self.namespace, self.service_account)

    def target_port(self, service: Service, service_port: int) -> int | None:
        """The port to dial on this workload for ``service:service_port``; None: not served."""
        for p in self.services.get(service.key, ()):
            if p.service_port == service_port:
                if p.target_port:
                    return p.target_port
                sp = service.port(service_port)
                return sp.target_port if sp is not None and sp.target_port else service_port
        return None


@dataclass(frozen=True, slots=True)
class Service:
    """``istio.workload.Service``. Resource name (and key): ``<namespace>/<hostname>``."""

    name: str
    namespace: str
    hostname: str
    vips: tuple[str, ...] = ()  # empty for headless services
    ports: tuple[Port, ...] = ()
    waypoint: GatewayAddress | None = None

    def __post_init__(self) -> None:
        tuple_fields(self, "vips", "ports")

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.hostname}"

    def port(self, number: int) -> Port | None:
        for p in self.ports:
            if p.service_port == number:
                return p
        return None


Address = Workload | Service


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A workload backing a service, with the ports it serves for it."""

    workload: Workload
    ports: tuple[Port, ...]


@dataclass(frozen=True, slots=True)
class _Indexes:
    """Lookups derived from the resources; rebuilt incrementally, never mutated once published."""

    # workload IP -> uids claiming it, the most recently changed last (it wins)
    by_ip: Mapping[str, tuple[str, ...]] = field(default_factory=FrozenMap)
    by_vip: Mapping[str, tuple[str, ...]] = field(default_factory=FrozenMap)  # VIP -> service keys
    # service key -> uid -> the ports that workload lists for it
    endpoints: Mapping[str, Mapping[str, tuple[Port, ...]]] = field(default_factory=FrozenMap)
    global_policies: tuple[str, ...] = ()
    namespace_policies: Mapping[str, tuple[str, ...]] = field(default_factory=FrozenMap)


class ProxySnapshot:
    """One consistent view of the proxy's state. Cheap to take, safe to keep."""

    __slots__ = (
        "_authorizations",
        "_extension_providers",
        "_ix",
        "_services",
        "_version",
        "_waf_policies",
        "_waypoint_authentications",
        "_waypoint_policies",
        "_workloads",
    )

    def __init__(
        self,
        version: int,
        workloads: Mapping[str, Workload],
        services: Mapping[str, Service],
        authorizations: Mapping[str, Authorization],
        indexes: _Indexes,
        waypoint_policies: Mapping[str, AuthorizationPolicy] = _NO_POLICIES,
        waypoint_authentications: Mapping[str, WaypointAuthentication] = _NO_AUTHNS,
        extension_providers: Mapping[str, ExtensionProvider] = _NO_PROVIDERS,
        waf_policies: Mapping[str, WafPolicy] = _NO_WAF,
    ) -> None:
        self._version = version
        self._extension_providers = extension_providers
        self._waf_policies = waf_policies
        self._waypoint_authentications = waypoint_authentications
        self._workloads = workloads
        self._services = services
        self._authorizations = authorizations
        self._ix = indexes
        self._waypoint_policies = waypoint_policies

    @property
    def version(self) -> int:
        return self._version

    @property
    def workloads(self) -> Mapping[str, Workload]:
        """uid -> workload."""
        return self._workloads

    @property
    def services(self) -> Mapping[str, Service]:
        """``namespace/hostname`` -> service."""
        return self._services

    @property
    def waypoint_authentications(self) -> Mapping[str, WaypointAuthentication]:
        """``namespace/name`` -> waypoint-bound RequestAuthentication with its keys (waypoints only)."""
        return self._waypoint_authentications

    @property
    def waypoint_policies(self) -> Mapping[str, AuthorizationPolicy]:
        """``namespace/name`` -> the waypoint-bound AuthorizationPolicy as written (waypoints only)."""
        return self._waypoint_policies

    @property
    def extension_providers(self) -> Mapping[str, ExtensionProvider]:
        """MeshConfig ``extensionProviders`` by name: the external authorizers (waypoints only)."""
        return self._extension_providers

    @property
    def waf_policies(self) -> Mapping[str, WafPolicy]:
        """``namespace/name`` -> the WafPolicies bound to this waypoint (waypoints only)."""
        return self._waf_policies

    @property
    def authorizations(self) -> Mapping[str, Authorization]:
        """``namespace/name`` -> authorization."""
        return self._authorizations

    def workload_by_ip(self, ip: str) -> Workload | None:
        uids = self._ix.by_ip.get(ip)
        return self._workloads.get(uids[-1]) if uids else None

    def services_by_vip(self, vip: str) -> tuple[Service, ...]:
        return tuple(self._services[k] for k in self._ix.by_vip.get(vip, ()))

    def service_by_address(self, vip: str, port: int) -> Service | None:
        """The service with ``vip`` that has ``port`` (the first, by key, if several do)."""
        for svc in self.services_by_vip(vip):
            if svc.port(port) is not None:
                return svc
        return None

    def endpoints(self, service_key: str) -> tuple[Endpoint, ...]:
        """The workloads that back ``service_key`` (they name it in their ``services`` map)."""
        members = self._ix.endpoints.get(service_key)
        if not members:
            return ()
        return tuple(Endpoint(self._workloads[uid], ports) for uid, ports in members.items())

    def waypoint_endpoints(self, gw: GatewayAddress) -> tuple[Endpoint, ...]:
        """The pods of a waypoint: its service's endpoints, or the workload at its address."""
        if gw.hostname:
            return self.endpoints(gw.service_key)
        w = self.workload_by_ip(gw.address)
        return (Endpoint(w, ()),) if w is not None else ()

    def policy_keys_for(self, workload: Workload) -> tuple[str, ...]:
        """Keys of the authorizations that apply to ``workload``: global, its namespace's, and
        the selector policies it lists (as Istio's ztunnel), each once."""
        keys = (
            *self._ix.global_policies,
            *self._ix.namespace_policies.get(workload.namespace, ()),
            *workload.authorization_policies,
        )
        return tuple(dict.fromkeys(keys))

    def policies_for(self, workload: Workload) -> tuple[Authorization, ...]:
        """The authorizations that apply to ``workload``. A listed policy not received (yet)
        is skipped; :meth:`missing_policies` names those."""
        auths = self._authorizations
        return tuple(auths[k] for k in self.policy_keys_for(workload) if k in auths)

    def missing_policies(self, workload: Workload) -> tuple[str, ...]:
        return tuple(k for k in workload.authorization_policies if k not in self._authorizations)


def _add(index: dict[str, tuple[str, ...]], key: str, value: str) -> None:
    current = index.get(key, ())
    if value not in current:
        index[key] = tuple(sorted((*current, value)))


def _remove(index: dict[str, tuple[str, ...]], key: str, value: str) -> None:
    current = index.get(key, ())
    if value in current:
        rest = tuple(v for v in current if v != value)
        if rest:
            index[key] = rest
        else:
            del index[key]


class ProxyState:
    """The state a node proxy's discovery client writes, one response at a time.

    Addresses (workloads by uid, services by ``namespace/hostname``) and authorizations (by
    ``namespace/name``) are named exactly as their discovery resources, so a removal names
    what to drop. ``version`` grows with every change (0: nothing received yet).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._snapshot = ProxySnapshot(
            0, MappingProxyType({}), MappingProxyType({}), MappingProxyType({}), _Indexes()
        )
        self._subscribers: Subscribers[int] = Subscribers()

    @property
    def version(self) -> int:
        return self._snapshot.version

    def snapshot(self) -> ProxySnapshot:
        return self._snapshot

    def subscribe(self, callback: Callable[[int], None]) -> Callable[[], None]:
        """Call ``callback(version)`` after every change; returns the function that stops it."""
        return self._subscribers.add(callback)

    def apply(
        self,
        *,
        addresses: Iterable[tuple[str, Address]] = (),
        removed_addresses: Iterable[str] = (),
        authorizations: Iterable[Authorization] = (),
        removed_authorizations: Iterable[str] = (),
        waypoint_policies: Iterable[AuthorizationPolicy] = (),
        removed_waypoint_policies: Iterable[str] = (),
        waypoint_authentications: Iterable[WaypointAuthentication] = (),
        removed_waypoint_authentications: Iterable[str] = (),
        extension_providers: Iterable[ExtensionProvider] = (),
        removed_extension_providers: Iterable[str] = (),
        waf_policies: Iterable[WafPolicy] = (),
        removed_waf_policies: Iterable[str] = (),
    ) -> bool:
        """Apply one batch atomically; returns whether anything changed.

        ``addresses`` are (resource name, value): a name that held a workload and now holds a
        service (or the reverse) replaces it.
        """
        with self._lock:
            old = self._snapshot
            workloads = dict(old.workloads)
            services = dict(old.services)
            auths = dict(old.authorizations)
            ix = old._ix
            by_ip = dict(ix.by_ip)
            by_vip = dict(ix.by_vip)
            endpoints = dict(ix.endpoints)
            touched_endpoints: dict[str, dict[str, tuple[Port, ...]]] = {}
            changed = False

            def members(key: str) -> dict[str, tuple[Port, ...]]:
                m = touched_endpoints.get(key)
                if m is None:
                    m = touched_endpoints[key] = dict(endpoints.get(key, {}))
                return m

            def drop_workload(uid: str) -> None:
                w = workloads.pop(uid)
                for ip in w.addresses:
                    rest = tuple(u for u in by_ip.get(ip, ()) if u != uid)
                    if rest:
                        by_ip[ip] = rest
                    else:
                        by_ip.pop(ip, None)
                for key in w.services:
                    members(key).pop(uid, None)

            def drop_service(key: str) -> None:
                s = services.pop(key)
                for vip in s.vips:
                    _remove(by_vip, vip, key)

            def drop(name: str) -> bool:
                if name in workloads:
                    drop_workload(name)
                    return True
                if name in services:
                    drop_service(name)
                    return True
                return False

            for name in removed_addresses:
                changed |= drop(name)
            for name, value in addresses:
                if isinstance(value, Workload):
                    if workloads.get(name) == value:
                        continue
                    drop(name)
                    workloads[name] = value
                    for ip in value.addresses:
                        others = tuple(u for u in by_ip.get(ip, ()) if u != name)
                        if others:
                            log.warning(
                                "two workloads claim one IP; the newer wins", ip=ip, old=others[-1], new=name
                            )
                        by_ip[ip] = (*others, name)
                    for key, ports in value.services.items():
                        members(key)[name] = ports
                else:
                    if services.get(name) == value:
                        continue
                    drop(name)
                    services[name] = value
                    for vip in value.vips:
                        _add(by_vip, vip, name)
                changed = True
            auth_changed = False
            for key in removed_authorizations:
                auth_changed |= auths.pop(key, None) is not None
            for a in authorizations:
                if auths.get(a.key) != a:
                    auths[a.key] = a
                    auth_changed = True
            wp_policies = _merged(old.waypoint_policies, waypoint_policies, removed_waypoint_policies)
            wp_authns = _merged(
                old.waypoint_authentications, waypoint_authentications, removed_waypoint_authentications
            )
            providers = _merged(old.extension_providers, extension_providers, removed_extension_providers)
            waf = _merged(old.waf_policies, waf_policies, removed_waf_policies)
            wp_changed = (
                wp_policies is not old.waypoint_policies
                or wp_authns is not old.waypoint_authentications
                or providers is not old.extension_providers
                or waf is not old.waf_policies
            )
            if not (changed or auth_changed or wp_changed):
                return False
            for key, m in touched_endpoints.items():
                if m:
                    endpoints[key] = MappingProxyType(m)
                else:
                    endpoints.pop(key, None)
            global_policies, namespace_policies = ix.global_policies, ix.namespace_policies
            if auth_changed:
                global_policies, namespace_policies = _policy_scopes(auths)
            self._snapshot = ProxySnapshot(
                old.version + 1,
                MappingProxyType(workloads),
                MappingProxyType(services),
                MappingProxyType(auths),
                _Indexes(
                    MappingProxyType(by_ip),
                    MappingProxyType(by_vip),
                    MappingProxyType(endpoints),
                    global_policies,
                    namespace_policies,
                ),
                wp_policies,
                wp_authns,
                providers,
                waf,
            )
            version, subscribers = self._snapshot.version, self._subscribers.snapshot
        for callback in subscribers:
            try:
                callback(version)
            except Exception:
                log.exception("proxy state subscriber failed", version=version)
        return True


_V = TypeVar("_V", AuthorizationPolicy, WaypointAuthentication, ExtensionProvider, WafPolicy)


def _merged(current: Mapping[str, _V], upserts: Iterable[_V], removed: Iterable[str]) -> Mapping[str, _V]:
    """``current`` with ``removed`` dropped and ``upserts`` set (by key); ``current`` itself when
    nothing changes, so callers can tell by identity."""
    gone = [k for k in removed if k in current]
    new = [v for v in upserts if current.get(v.key) != v]
    if not gone and not new:
        return current
    out = dict(current)
    for k in gone:
        del out[k]
    for v in new:
        out[v.key] = v
    return MappingProxyType(out)


def _policy_scopes(
    auths: Mapping[str, Authorization],
) -> tuple[tuple[str, ...], Mapping[str, tuple[str, ...]]]:
    global_keys: list[str] = []
    by_namespace: dict[str, list[str]] = {}
    for key in sorted(auths):
        a = auths[key]
        if a.scope is Scope.GLOBAL:
            global_keys.append(key)
        elif a.scope is Scope.NAMESPACE:
            by_namespace.setdefault(a.namespace, []).append(key)
    return tuple(global_keys), MappingProxyType({ns: tuple(keys) for ns, keys in by_namespace.items()})
