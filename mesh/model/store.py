"""The one place mesh state changes, and the immutable snapshots everybody else reads.

Sources (the local YAML file, the Kubernetes API) write; the CA, discovery server, node agent
and ztunnel read. Readers take a :class:`Snapshot` and may keep it as long as they like: it
never changes, so a decision made on it is made on one consistent state, without locks.
Each effective change makes a new snapshot (copy-on-write per kind, indexes rebuilt only for
the kinds that changed, or updated in place for a small workload change) and a :class:`Delta`
for subscribers, numbered by a version that only grows. Applying something already in force
changes nothing and notifies nobody, which makes sources idempotent for free.
"""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType, TracebackType
from typing import TypeAlias, TypeVar, cast

import structlog

from mesh.model.frozen import FrozenMap
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
from mesh.subscribers import Subscribers

log = structlog.get_logger(__name__)

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
)

_T = TypeVar("_T")
_K = TypeVar("_K")
_EMPTY: Mapping[str, MeshObject] = MappingProxyType({})
_NO_KEYS: frozenset[str] = frozenset()


def _readonly(d: dict[str, _T]) -> Mapping[str, _T]:
    return MappingProxyType(d)


def _copy(m: Mapping[_K, _T]) -> dict[_K, _T]:
    """A mutable copy; ``dict(proxy)`` walks a read-only view key by key, ``.copy()`` does not
    (some 25 times faster for the 10,000 entries of a large mesh)."""
    if isinstance(m, MappingProxyType | dict):
        return m.copy()
    return dict(m)


def _claims_removed(claims: dict[_K, tuple[str, ...]], key: _K, uid: str) -> None:
    rest = tuple(u for u in claims.get(key, ()) if u != uid)
    if rest:
        claims[key] = rest
    else:
        claims.pop(key, None)


def _claims_added(claims: dict[_K, tuple[str, ...]], key: _K, uid: str) -> None:
    held = claims.get(key, ())
    if uid not in held:
        claims[key] = tuple(sorted((*held, uid)))


def _by_uid(w: Workload) -> str:
    return w.uid


@dataclass(frozen=True, slots=True)
class _WorkloadIndexes:
    by_ip: Mapping[str, Workload]
    by_name: Mapping[tuple[str, str], Workload]
    by_node: Mapping[str, tuple[Workload, ...]]
    # node -> namespace -> service account -> number of pods
    accounts: Mapping[str, Mapping[str, Mapping[str, int]]]
    # Every claimant (sorted uids) of an IP / a name, so that an incremental update can tell
    # who wins once the current winner goes away. The winner is always the smallest uid.
    ip_claims: Mapping[str, tuple[str, ...]]
    name_claims: Mapping[tuple[str, str], tuple[str, ...]]

    @classmethod
    def build(cls, workloads: Mapping[str, Workload]) -> _WorkloadIndexes:
        by_ip: dict[str, Workload] = {}
        by_name: dict[tuple[str, str], Workload] = {}
        ip_claims: defaultdict[str, list[str]] = defaultdict(list)
        name_claims: defaultdict[tuple[str, str], list[str]] = defaultdict(list)
        by_node: defaultdict[str, list[Workload]] = defaultdict(list)
        counts: defaultdict[str, defaultdict[str, defaultdict[str, int]]] = defaultdict(
            lambda: defaultdict(lambda: defaultdict(int))
        )
        # Sorted so that when two workloads claim one IP the winner does not depend on the
        # order things arrived in.
        for uid in sorted(workloads):
            w = workloads[uid]
            if not w.host_network:  # a hostNetwork pod shares its node's IP: not its identity
                for ip in w.ips:
                    by_ip.setdefault(ip, w)
                    claims = ip_claims[ip]
                    if not claims or claims[-1] != uid:
                        claims.append(uid)
            by_name.setdefault((w.namespace, w.name), w)
            name_claims[(w.namespace, w.name)].append(uid)
            if w.node:
                by_node[w.node].append(w)
                counts[w.node][w.namespace][w.service_account] += 1
        accounts = {
            node: MappingProxyType({ns: MappingProxyType(dict(sas)) for ns, sas in namespaces.items()})
            for node, namespaces in counts.items()
        }
        return cls(
            by_ip=MappingProxyType(by_ip),
            by_name=MappingProxyType(by_name),
            by_node=MappingProxyType({n: tuple(ws) for n, ws in by_node.items()}),
            accounts=MappingProxyType(accounts),
            ip_claims=MappingProxyType({ip: tuple(us) for ip, us in ip_claims.items()}),
            name_claims=MappingProxyType({n: tuple(us) for n, us in name_claims.items()}),
        )

    def updated(
        self,
        before: Mapping[str, Workload],
        after: Mapping[str, Workload],
        touched: Iterable[str],
    ) -> _WorkloadIndexes:
        """The indexes of ``after``, given that it differs from ``before`` only in ``touched``.

        Equal (``==``) to ``build(after)``; costs O(touched) plus a copy of each top-level
        dictionary, instead of a pass over every workload.
        """
        by_ip = _copy(self.by_ip)
        by_name = _copy(self.by_name)
        ip_claims = _copy(self.ip_claims)
        name_claims = _copy(self.name_claims)
        ips: set[str] = set()
        names: set[tuple[str, str]] = set()
        nodes: set[str] = set()
        touched_set = set(touched)
        for uid in touched_set:
            for w, add in ((before.get(uid), False), (after.get(uid), True)):
                if w is None:
                    continue
                change = _claims_added if add else _claims_removed
                if not w.host_network:
                    for ip in w.ips:
                        change(ip_claims, ip, uid)
                        ips.add(ip)
                name = (w.namespace, w.name)
                change(name_claims, name, uid)
                names.add(name)
                if w.node:
                    nodes.add(w.node)
        for ip in ips:
            ip_owners = ip_claims.get(ip)
            if ip_owners:
                by_ip[ip] = after[ip_owners[0]]
            else:
                by_ip.pop(ip, None)
        for name in names:
            name_owners = name_claims.get(name)
            if name_owners:
                by_name[name] = after[name_owners[0]]
            else:
                by_name.pop(name, None)
        by_node = _copy(self.by_node)
        accounts = _copy(self.accounts)
        for node in nodes:
            on_node = [w for w in self.by_node.get(node, ()) if w.uid not in touched_set]
            on_node += (w for u in touched_set if (w := after.get(u)) is not None and w.node == node)
            if not on_node:
                by_node.pop(node, None)
                accounts.pop(node, None)
                continue
            on_node.sort(key=_by_uid)
            by_node[node] = tuple(on_node)
            counts: defaultdict[str, defaultdict[str, int]] = defaultdict(lambda: defaultdict(int))
            for w in on_node:
                counts[w.namespace][w.service_account] += 1
            accounts[node] = MappingProxyType({ns: MappingProxyType(dict(sas)) for ns, sas in counts.items()})
        return _WorkloadIndexes(
            by_ip=MappingProxyType(by_ip),
            by_name=MappingProxyType(by_name),
            by_node=MappingProxyType(by_node),
            accounts=MappingProxyType(accounts),
            ip_claims=MappingProxyType(ip_claims),
            name_claims=MappingProxyType(name_claims),
        )


@dataclass(frozen=True, slots=True)
class _ServiceIndexes:
    by_address: Mapping[tuple[str, int], Service]
    by_vip: Mapping[str, tuple[Service, ...]]
    by_hostname: Mapping[str, Service]

    @classmethod
    def build(cls, services: Mapping[str, Service]) -> _ServiceIndexes:
        by_address: dict[tuple[str, int], Service] = {}
        by_vip: defaultdict[str, list[Service]] = defaultdict(list)
        by_hostname: dict[str, Service] = {}
        for key in sorted(services):
            s = services[key]
            by_hostname.setdefault(s.hostname, s)
            for vip in s.vips:
                by_vip[vip].append(s)
                for p in s.ports:
                    by_address.setdefault((vip, p.port), s)
        return cls(
            by_address=MappingProxyType(by_address),
            by_vip=MappingProxyType({v: tuple(ss) for v, ss in by_vip.items()}),
            by_hostname=MappingProxyType(by_hostname),
        )


@dataclass(frozen=True, slots=True)
class _EndpointIndexes:
    endpoints: Mapping[str, tuple[Workload, ...]]  # service key -> selected workloads
    services_of: Mapping[str, tuple[Service, ...]]  # workload uid -> services selecting it
    # namespace -> its services that have a selector, by key: the only candidates for a pod.
    selecting: Mapping[str, tuple[Service, ...]]

    @classmethod
    def build(cls, services: Mapping[str, Service], workloads: Mapping[str, Workload]) -> _EndpointIndexes:
        by_namespace: defaultdict[str, list[Workload]] = defaultdict(list)
        for uid in sorted(workloads):
            w = workloads[uid]
            by_namespace[w.namespace].append(w)
        endpoints: dict[str, tuple[Workload, ...]] = {}
        services_of: defaultdict[str, list[Service]] = defaultdict(list)
        selecting: defaultdict[str, list[Service]] = defaultdict(list)
        for key in sorted(services):
            s = services[key]
            if s.selector:
                selecting[s.namespace].append(s)
            selected = tuple(w for w in by_namespace.get(s.namespace, ()) if s.selects(w))
            if selected:
                endpoints[key] = selected
            for w in selected:
                services_of[w.uid].append(s)
        return cls(
            endpoints=MappingProxyType(endpoints),
            services_of=MappingProxyType({u: tuple(ss) for u, ss in services_of.items()}),
            selecting=MappingProxyType({ns: tuple(ss) for ns, ss in selecting.items()}),
        )

    def workloads_updated(
        self,
        before: Mapping[str, Workload],
        after: Mapping[str, Workload],
        touched: Iterable[str],
    ) -> _EndpointIndexes:
        """The indexes for ``after`` (same services), which differs from ``before`` only in
        ``touched``: only the services that selected or now select a touched workload are
        looked at, instead of every service against every pod. Equal to a full ``build``."""
        endpoints = _copy(self.endpoints)
        services_of = _copy(self.services_of)
        touched_set = set(touched)
        affected: dict[str, Service] = {}
        for uid in touched_set:
            for s in self.services_of.get(uid, ()):
                affected[s.key] = s
            w = after.get(uid)
            selected = (
                tuple(s for s in self.selecting.get(w.namespace, ()) if s.selects(w)) if w is not None else ()
            )
            if selected:
                services_of[uid] = selected
                for s in selected:
                    affected[s.key] = s
            else:
                services_of.pop(uid, None)
        for key, s in affected.items():
            members = [w for w in self.endpoints.get(key, ()) if w.uid not in touched_set]
            members += (w for u in touched_set if (w := after.get(u)) is not None and s.selects(w))
            if members:
                members.sort(key=_by_uid)
                endpoints[key] = tuple(members)
            else:
                endpoints.pop(key, None)
        return _EndpointIndexes(
            endpoints=MappingProxyType(endpoints),
            services_of=MappingProxyType(services_of),
            selecting=self.selecting,
        )


# Above one touched workload in this many, a full rebuild is cheaper than updating in place.
_INCREMENTAL_FRACTION = 4

_EMPTY_WORKLOAD_INDEXES = _WorkloadIndexes.build({})
_EMPTY_SERVICE_INDEXES = _ServiceIndexes.build({})
_EMPTY_ENDPOINT_INDEXES = _EndpointIndexes.build({}, {})


class Snapshot:
    """All mesh state at one version, with the lookups the data and control planes need.

    Immutable: mappings are read-only views of dictionaries no one else holds. IP arguments
    must be in canonical ``str(ipaddress.ip_address(...))`` form, as the model stores them.
    """

    __slots__ = ("_endpoint_idx", "_objects", "_service_idx", "_version", "_workload_idx")

    _version: int
    _objects: Mapping[Kind, Mapping[str, MeshObject]]
    _workload_idx: _WorkloadIndexes
    _service_idx: _ServiceIndexes
    _endpoint_idx: _EndpointIndexes

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
        :meth:`Store.apply`) lets a small workload change update the workload and endpoint
        indexes in place of rebuilding them over every pod and service.
        """
        by_kind = dict.fromkeys(Kind, _EMPTY)
        for kind, objs in (objects or {}).items():
            by_kind[kind] = objs if isinstance(objs, MappingProxyType) else _readonly(dict(objs))
        self._version = version
        self._objects = MappingProxyType(by_kind)
        workloads = cast(Mapping[str, Workload], by_kind[Kind.WORKLOAD])
        services = cast(Mapping[str, Service], by_kind[Kind.SERVICE])
        prev = _previous
        touched_workloads = _touched.get(Kind.WORKLOAD) if _touched is not None else None
        incremental = (
            prev is not None
            and touched_workloads is not None
            and Kind.SERVICE not in _changed
            and len(touched_workloads) * _INCREMENTAL_FRACTION <= len(prev.workloads)
        )
        if prev is not None and Kind.WORKLOAD not in _changed:
            self._workload_idx = prev._workload_idx
        elif incremental and prev is not None and touched_workloads is not None:
            self._workload_idx = (
                prev._workload_idx.updated(prev.workloads, workloads, touched_workloads)
                if workloads
                else _EMPTY_WORKLOAD_INDEXES
            )
        else:
            self._workload_idx = _WorkloadIndexes.build(workloads) if workloads else _EMPTY_WORKLOAD_INDEXES
        if prev is not None and Kind.SERVICE not in _changed:
            self._service_idx = prev._service_idx
        else:
            self._service_idx = _ServiceIndexes.build(services) if services else _EMPTY_SERVICE_INDEXES
        if prev is not None and not {Kind.WORKLOAD, Kind.SERVICE} & _changed:
            self._endpoint_idx = prev._endpoint_idx
        elif incremental and prev is not None and touched_workloads is not None and services and workloads:
            self._endpoint_idx = prev._endpoint_idx.workloads_updated(
                prev.workloads, workloads, touched_workloads
            )
        else:
            self._endpoint_idx = (
                _EndpointIndexes.build(services, workloads)
                if services and workloads
                else _EMPTY_ENDPOINT_INDEXES
            )

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


Unsubscribe: TypeAlias = Callable[[], None]


class DeltaQueue:
    """An asyncio queue of deltas for one subscriber; close it (or use ``with``) when done.

    Bound to the event loop it was created on; deltas committed from another thread are
    handed over with ``call_soon_threadsafe`` so the store can be written from anywhere.
    """

    def __init__(self, store: Store) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Delta] = asyncio.Queue()
        self._unsubscribe = store.subscribe(self._deliver)

    def _deliver(self, delta: Delta) -> None:
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._queue.put_nowait(delta)
        else:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, delta)

    async def get(self) -> Delta:
        return await self._queue.get()

    def get_nowait(self) -> Delta:
        """Raises ``asyncio.QueueEmpty`` when nothing is pending."""
        return self._queue.get_nowait()

    def empty(self) -> bool:
        return self._queue.empty()

    def close(self) -> None:
        self._unsubscribe()

    def __enter__(self) -> DeltaQueue:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __aiter__(self) -> AsyncIterator[Delta]:
        return self

    async def __anext__(self) -> Delta:
        return await self._queue.get()


class StoreError(ValueError):
    """A write the store refuses as a whole (nothing of it was applied)."""


class Store:
    """Holds the current :class:`Snapshot`; every write goes through here.

    Writes are atomic: a batch either commits as one new version or raises and changes
    nothing. Subscribers are called synchronously, in version order, after each commit and
    before the write returns; they must not write to the store themselves.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._snapshot = Snapshot()
        self._subscribers: Subscribers[Delta] = Subscribers()
        self._notifying = False

    @property
    def version(self) -> int:
        return self._snapshot.version

    def snapshot(self) -> Snapshot:
        return self._snapshot

    # --- writes ----------------------------------------------------------------------------

    def replace_all(self, objects: Iterable[MeshObject]) -> Delta | None:
        """Make ``objects`` the whole state: anything not among them is deleted."""
        new: dict[Kind, dict[str, MeshObject]] = {k: {} for k in Kind}
        for obj in objects:
            bucket = new[obj.KIND]
            if obj.key in bucket:
                raise StoreError(f"duplicate {obj.KIND.value} {obj.key!r}")
            bucket[obj.key] = obj
        with self._write():
            current = self._snapshot
            upserted: dict[Kind, frozenset[str]] = {}
            removed: dict[Kind, frozenset[str]] = {}
            for kind in Kind:
                old, want = current.objects(kind), new[kind]
                ups = frozenset(k for k, v in want.items() if old.get(k) != v)
                gone = frozenset(k for k in old if k not in want)
                if ups:
                    upserted[kind] = ups
                if gone:
                    removed[kind] = gone
            return self._commit({k: new[k] for k in set(upserted) | set(removed)}, upserted, removed)

    def upsert(self, *objects: MeshObject) -> Delta | None:
        return self.apply(upserts=objects)

    def delete(self, kind: Kind, *keys: str) -> Delta | None:
        """Delete by key; keys not present are ignored (deletes are idempotent)."""
        return self.apply(deletes=[(kind, k) for k in keys])

    def apply(
        self,
        upserts: Iterable[MeshObject] = (),
        deletes: Iterable[tuple[Kind, str]] = (),
    ) -> Delta | None:
        """Upsert and delete in one atomic step. Returns None when nothing changed."""
        ups: dict[Kind, dict[str, MeshObject]] = defaultdict(dict)
        for obj in upserts:
            if obj.key in ups[obj.KIND]:
                raise StoreError(f"{obj.KIND.value} {obj.key!r} upserted twice in one batch")
            ups[obj.KIND][obj.key] = obj
        dels: dict[Kind, set[str]] = defaultdict(set)
        for kind, key in deletes:
            if key in ups.get(kind, {}):
                raise StoreError(f"{kind.value} {key!r} both upserted and deleted in one batch")
            dels[kind].add(key)
        with self._write():
            current = self._snapshot
            changed: dict[Kind, dict[str, MeshObject]] = {}
            upserted: dict[Kind, frozenset[str]] = {}
            removed: dict[Kind, frozenset[str]] = {}
            for kind in set(ups) | set(dels):
                old = current.objects(kind)
                k_ups = frozenset(k for k, v in ups.get(kind, {}).items() if old.get(k) != v)
                k_dels = frozenset(k for k in dels.get(kind, ()) if k in old)
                if not k_ups and not k_dels:
                    continue
                d = _copy(old)
                for k in k_ups:
                    d[k] = ups[kind][k]
                for k in k_dels:
                    del d[k]
                changed[kind] = d
                if k_ups:
                    upserted[kind] = k_ups
                if k_dels:
                    removed[kind] = k_dels
            return self._commit(changed, upserted, removed, incremental=True)

    def _write(self) -> _WriteGuard:
        return _WriteGuard(self)

    def _commit(
        self,
        changed: Mapping[Kind, dict[str, MeshObject]],
        upserted: dict[Kind, frozenset[str]],
        removed: dict[Kind, frozenset[str]],
        *,
        incremental: bool = False,
    ) -> Delta | None:
        """Called with the lock held. ``incremental``: the objects not among ``upserted`` and
        ``removed`` are the previous snapshot's own, so its indexes can be updated in place."""
        if not changed:
            return None
        previous = self._snapshot
        objects = {k: previous.objects(k) for k in Kind}
        for kind, d in changed.items():
            objects[kind] = _readonly(d)
        touched = (
            {k: upserted.get(k, _NO_KEYS) | removed.get(k, _NO_KEYS) for k in changed}
            if incremental
            else None
        )
        snapshot = Snapshot(
            previous.version + 1, objects, _previous=previous, _changed=frozenset(changed), _touched=touched
        )
        self._snapshot = snapshot
        delta = Delta(
            version=snapshot.version,
            upserted=FrozenMap(upserted),
            removed=FrozenMap(removed),
            previous=previous,
            snapshot=snapshot,
        )
        self._notify(delta)
        return delta

    def _notify(self, delta: Delta) -> None:
        self._notifying = True
        try:
            for callback in self._subscribers.snapshot:
                try:
                    callback(delta)
                except Exception:
                    # One broken subscriber must not keep the others (or the writer) from
                    # seeing the change; it is its job to recover from the snapshot.
                    log.exception("store subscriber failed", version=delta.version)
        finally:
            self._notifying = False

    # --- subscriptions ---------------------------------------------------------------------

    def subscribe(self, callback: Callable[[Delta], None]) -> Unsubscribe:
        """Call ``callback`` with every future delta; returns the function that stops it."""
        return self._subscribers.add(callback)

    def subscribe_queue(self) -> DeltaQueue:
        """An asyncio queue of future deltas (call from inside the event loop)."""
        return DeltaQueue(self)


class _WriteGuard:
    """Takes the store lock and refuses writes made from inside a subscriber callback,
    which would otherwise reorder the deltas other subscribers see."""

    __slots__ = ("_store",)

    def __init__(self, store: Store) -> None:
        self._store = store

    def __enter__(self) -> None:
        self._store._lock.acquire()
        if self._store._notifying:
            self._store._lock.release()
            raise RuntimeError("the store was written to from one of its subscribers")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._store._lock.release()
