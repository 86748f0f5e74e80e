"""The immutable snapshots of mesh state that everybody reads, and the deltas between them.

A :class:`Snapshot` holds every object at one version, with the indexes the lookups need
(mesh.model.indexes); a :class:`Delta` says what one change did. Only the store makes them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TypeAlias, TypeVar, cast

from mesh.model.indexes import EndpointIndexes, ServiceIndexes, WorkloadIndexes
from mesh.model.meshconfig import ExtensionProvider, MeshConfig
from mesh.model.objects import (
    Gateway,
    Kind,
    Namespace,
    Node,
    Service,
    ServiceAccount,
    Workload,
)
from mesh.model.policy import AuthorizationPolicy, PeerAuthentication, RequestAuthentication
from mesh.model.waf import WafPolicy

MeshObject: TypeAlias = (
    Node
    | Namespace
    | ServiceAccount
    | Workload
    | Service
    | Gateway
    | PeerAuthentication
    | AuthorizationPolicy
    | RequestAuthentication
    | MeshConfig
    | WafPolicy
)

_T = TypeVar("_T")
_EMPTY: Mapping[str, MeshObject] = MappingProxyType({})
_NO_KEYS: frozenset[str] = frozenset()


def _readonly(d: dict[str, _T]) -> Mapping[str, _T]:
    return MappingProxyType(d)


# Above one touched object in this many of its kind, a full rebuild is cheaper than an update.
_INCREMENTAL_FRACTION = 4


def _few_touched(
    before: Mapping[str, object] | None, touched: Mapping[Kind, frozenset[str]] | None, kind: Kind
) -> frozenset[str] | None:
    """The keys of ``kind`` a write touched, if there are few enough to update the previous
    snapshot's indexes for them; None when they must be rebuilt."""
    if before is None or touched is None:
        return None
    keys = touched.get(kind)
    if keys is None or len(keys) * _INCREMENTAL_FRACTION > len(before):
        return None
    return keys


_EMPTY_WORKLOAD_INDEXES = WorkloadIndexes.build({})
_EMPTY_SERVICE_INDEXES = ServiceIndexes.build({})
_EMPTY_ENDPOINT_INDEXES = EndpointIndexes.build({}, {})


class Snapshot:
    """All mesh state at one version, with the lookups the data and control planes need.

    Immutable: mappings are read-only views of dictionaries no one else holds. IP arguments
    must be in canonical ``str(ipaddress.ip_address(...))`` form, as the model stores them.
    """

    __slots__ = ("_endpoint_idx", "_objects", "_service_idx", "_version", "_workload_idx")

    _version: int
    _objects: Mapping[Kind, Mapping[str, MeshObject]]
    _workload_idx: WorkloadIndexes
    _service_idx: ServiceIndexes
    _endpoint_idx: EndpointIndexes

    def __init__(
        self,
        version: int = 0,
        objects: Mapping[Kind, Mapping[str, MeshObject]] | None = None,
        *,
        _previous: Snapshot | None = None,
        _changed: frozenset[Kind] = frozenset(),
        _touched: Mapping[Kind, frozenset[str]] | None = None,
    ) -> None:
        """Build a snapshot; ``_previous``/``_changed`` let the store reuse unchanged indexes.

        ``_touched`` (keys upserted or removed, per kind, relative to ``_previous``; given by
        the store's writes) lets a small workload or service change update the indexes in place
        of rebuilding them over every pod and service.
        """
        by_kind = dict.fromkeys(Kind, _EMPTY)
        for kind, objs in (objects or {}).items():
            by_kind[kind] = objs if isinstance(objs, MappingProxyType) else _readonly(dict(objs))
        self._version = version
        self._objects = MappingProxyType(by_kind)
        workloads = cast(Mapping[str, Workload], by_kind[Kind.WORKLOAD])
        services = cast(Mapping[str, Service], by_kind[Kind.SERVICE])
        prev = _previous
        workloads_changed = Kind.WORKLOAD in _changed
        services_changed = Kind.SERVICE in _changed
        # Per kind: the keys to update the previous indexes for (None: rebuild them in full).
        touched_workloads = _few_touched(prev.workloads if prev else None, _touched, Kind.WORKLOAD)
        touched_services = _few_touched(prev.services if prev else None, _touched, Kind.SERVICE)
        if prev is not None and not workloads_changed:
            self._workload_idx = prev._workload_idx
        elif prev is not None and touched_workloads is not None and workloads:
            self._workload_idx = prev._workload_idx.updated(prev.workloads, workloads, touched_workloads)
        else:
            self._workload_idx = WorkloadIndexes.build(workloads) if workloads else _EMPTY_WORKLOAD_INDEXES
        if prev is not None and not services_changed:
            self._service_idx = prev._service_idx
        elif prev is not None and touched_services is not None and services:
            self._service_idx = prev._service_idx.updated(prev.services, services, touched_services)
        else:
            self._service_idx = ServiceIndexes.build(services) if services else _EMPTY_SERVICE_INDEXES
        if prev is not None and not (workloads_changed or services_changed):
            self._endpoint_idx = prev._endpoint_idx
        elif not (services and workloads):
            self._endpoint_idx = _EMPTY_ENDPOINT_INDEXES
        elif (
            prev is not None
            and prev.services  # else the previous index is the shared empty one, not prev's
            and prev.workloads
            and (touched_workloads is not None or not workloads_changed)
            and (touched_services is not None or not services_changed)
        ):
            # Pods first, against the old services; then the changed services against the new pods.
            endpoint_idx = prev._endpoint_idx
            if workloads_changed and touched_workloads is not None:
                endpoint_idx = endpoint_idx.workloads_updated(prev.workloads, workloads, touched_workloads)
            if services_changed and touched_services is not None:
                endpoint_idx = endpoint_idx.services_updated(
                    prev.services, services, touched_services, workloads
                )
            self._endpoint_idx = endpoint_idx
        else:
            self._endpoint_idx = EndpointIndexes.build(services, workloads)

    def __repr__(self) -> str:
        counts = ", ".join(f"{k.value}={len(v)}" for k, v in self._objects.items() if v)
        return f"<Snapshot v{self._version} {counts}>"

    @property
    def version(self) -> int:
        return self._version

    # --- by kind ---------------------------------------------------------------------------

    def objects(self, kind: Kind) -> Mapping[str, MeshObject]:
        return self._objects[kind]

    def get(self, kind: Kind, key: str) -> MeshObject | None:
        return self._objects[kind].get(key)

    @property
    def nodes(self) -> Mapping[str, Node]:
        return cast(Mapping[str, Node], self._objects[Kind.NODE])

    @property
    def namespaces(self) -> Mapping[str, Namespace]:
        return cast(Mapping[str, Namespace], self._objects[Kind.NAMESPACE])

    @property
    def service_accounts(self) -> Mapping[str, ServiceAccount]:
        return cast(Mapping[str, ServiceAccount], self._objects[Kind.SERVICE_ACCOUNT])

    @property
    def workloads(self) -> Mapping[str, Workload]:
        """By uid."""
        return cast(Mapping[str, Workload], self._objects[Kind.WORKLOAD])

    @property
    def services(self) -> Mapping[str, Service]:
        """By ``namespace/name``, like every namespaced kind below."""
        return cast(Mapping[str, Service], self._objects[Kind.SERVICE])

    @property
    def gateways(self) -> Mapping[str, Gateway]:
        return cast(Mapping[str, Gateway], self._objects[Kind.GATEWAY])

    @property
    def peer_authentications(self) -> Mapping[str, PeerAuthentication]:
        return cast(Mapping[str, PeerAuthentication], self._objects[Kind.PEER_AUTHENTICATION])

    @property
    def authorization_policies(self) -> Mapping[str, AuthorizationPolicy]:
        return cast(Mapping[str, AuthorizationPolicy], self._objects[Kind.AUTHORIZATION_POLICY])

    @property
    def request_authentications(self) -> Mapping[str, RequestAuthentication]:
        return cast(Mapping[str, RequestAuthentication], self._objects[Kind.REQUEST_AUTHENTICATION])

    @property
    def mesh_configs(self) -> Mapping[str, MeshConfig]:
        """The mesh ConfigMap (at most one: ``<root namespace>/istio``)."""
        return cast(Mapping[str, MeshConfig], self._objects[Kind.MESH_CONFIG])

    @property
    def waf_policies(self) -> Mapping[str, WafPolicy]:
        return cast(Mapping[str, WafPolicy], self._objects[Kind.WAF_POLICY])

    def extension_provider(self, name: str) -> ExtensionProvider | None:
        """MeshConfig ``extensionProviders`` entry ``name`` (what a CUSTOM policy names)."""
        for mc in self.mesh_configs.values():
            found = mc.provider(name)
            if found is not None:
                return found
        return None

    # --- lookups ---------------------------------------------------------------------------

    def workload_by_ip(self, ip: str) -> Workload | None:
        """The pod that owns ``ip``; hostNetwork pods are never returned (shared IP)."""
        return self._workload_idx.by_ip.get(ip)

    def workload_by_name(self, namespace: str, name: str) -> Workload | None:
        return self._workload_idx.by_name.get((namespace, name))

    def workloads_on_node(self, node: str) -> tuple[Workload, ...]:
        return self._workload_idx.by_node.get(node, ())

    def service_accounts_on_node(self, node: str) -> Mapping[str, Mapping[str, int]]:
        """namespace -> service account -> pods on ``node``: what the CA may issue there."""
        return self._workload_idx.accounts.get(node, MappingProxyType({}))

    def pods_on_node(self, node: str, namespace: str, service_account: str) -> int:
        return self.service_accounts_on_node(node).get(namespace, {}).get(service_account, 0)

    def service_by_address(self, vip: str, port: int) -> Service | None:
        """The service reached by dialing ``vip:port`` (TCP)."""
        return self._service_idx.by_address.get((vip, port))

    def services_by_vip(self, vip: str) -> tuple[Service, ...]:
        return self._service_idx.by_vip.get(vip, ())

    def service_by_hostname(self, hostname: str) -> Service | None:
        return self._service_idx.by_hostname.get(hostname)

    def endpoints(self, service_key: str) -> tuple[Workload, ...]:
        """Workloads the service's selector picks, by uid; healthy or not, IP or not."""
        return self._endpoint_idx.endpoints.get(service_key, ())

    def services_for_workload(self, uid: str) -> tuple[Service, ...]:
        return self._endpoint_idx.services_of.get(uid, ())


@dataclass(frozen=True, slots=True)
class Delta:
    """What one change did: keys upserted (added or changed) and removed, per kind.

    Carries both snapshots so a subscriber can look at the old value of what changed (e.g.
    to retract the IPs a deleted pod had) without keeping its own copy of the state.
    """

    version: int
    upserted: Mapping[Kind, frozenset[str]]
    removed: Mapping[Kind, frozenset[str]]
    previous: Snapshot
    snapshot: Snapshot

    @property
    def kinds(self) -> frozenset[Kind]:
        return frozenset(self.upserted) | frozenset(self.removed)

    def upserted_keys(self, kind: Kind) -> frozenset[str]:
        return self.upserted.get(kind, _NO_KEYS)

    def removed_keys(self, kind: Kind) -> frozenset[str]:
        return self.removed.get(kind, _NO_KEYS)
