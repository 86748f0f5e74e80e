"""The discovery server: delta xDS (``DeltaAggregatedResources``) over the mesh store.

Serves ``istio.workload.Address`` (workloads by uid, services by ``namespace/hostname``) and
``istio.security.Authorization`` (``namespace/name``) as istiod does, so an Istio ztunnel
can use it as well as ours (docs/discovery.md); and to waypoints, ``WaypointPolicy``
(``namespace/name``): each waypoint-bound AuthorizationPolicy as written, served only to the
streams authenticated as a waypoint it binds to (:func:`controlplane.waypoints.policy_audiences`),
and in the same way ``WafPolicy`` (ours, :mod:`mesh.xds.waf`).

How it works, and why:

* One :class:`ResourceCache` per server turns store snapshots into ready-to-send resources,
  each with a version that is a hash of its serialized bytes. A version is therefore the same
  across control-plane restarts for the same content, which is what lets a reconnecting
  client that sends ``initial_resource_versions`` get only what really changed. A change
  re-renders only what it can alter, so a one-object change costs about one object: a pod its
  own entry; an AuthorizationPolicy its authorization and the workloads whose policy list it
  enters or leaves; a Service its entry and the workloads it selected or selects; a namespace
  or PeerAuthentication the workloads of that namespace. Only a Gateway change (it can rebind
  anything) or a change to a large part of the mesh re-renders everything. Each result names
  the resources that differ from the previous one (``Resources.changed``).
* Each stream remembers, per type, the version it last sent of each resource and pushes the
  difference with the cache whenever the store changes, looking only at the names changed
  since the state it last caught up with. The stream never replays the store's deltas itself:
  diffing against the latest state coalesces bursts and cannot miss anything.
* ACK/NACK: a NACK is logged loudly and the stream keeps serving; what was sent stays recorded
  as sent, so the refused version is not sent again (only a newer one will be).
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeVar

import grpc
import structlog

from controlplane.jwks import JwksCache
from controlplane.lowering import (
    PeerAuthenticationIndex,
    SelectorPolicy,
    SelectorPolicyIndex,
    lower_authorization_policy,
    selector_policy,
    service_state,
    workload_state,
)
from controlplane.waypoints import WaypointBinding, policy_audiences, workload_binding
from mesh.log import ThrottledLog
from mesh.model import (
    DEFAULT_CLUSTER_DOMAIN,
    ROOT_NAMESPACE,
    Delta,
    Kind,
    Snapshot,
    Store,
    Workload,
)
from mesh.proto import discovery_pb2, discovery_pb2_grpc
from mesh.xds.convert import (
    ADDRESS_TYPE_URL,
    AUTHORIZATION_TYPE_URL,
    address_to_any,
    authorization_to_any,
)
from mesh.xds.meshconfig import EXTENSION_PROVIDER_TYPE_URL, extension_provider_to_any
from mesh.xds.state import WaypointAuthentication
from mesh.xds.waf import WAF_POLICY_TYPE_URL, waf_policy_to_any
from mesh.xds.waypoint_policy import (
    WAYPOINT_AUTHN_TYPE_URL,
    WAYPOINT_POLICY_TYPE_URL,
    waypoint_authn_to_any,
    waypoint_policy_to_any,
)

log = structlog.get_logger(__name__)

Metadata = Sequence[tuple[str, str | bytes]]
# Verifies a stream's credentials; returns the caller's "<namespace>/<service account>", which
# decides the waypoint policies it may receive (None: unscoped, for tests without credentials).
Authenticator = Callable[[Metadata], Awaitable[str | None]]
TYPES = (
    ADDRESS_TYPE_URL,
    AUTHORIZATION_TYPE_URL,
    WAYPOINT_POLICY_TYPE_URL,
    WAYPOINT_AUTHN_TYPE_URL,
    EXTENSION_PROVIDER_TYPE_URL,
    WAF_POLICY_TYPE_URL,
)
# served only to the waypoints they bind to
_SCOPED = (WAYPOINT_POLICY_TYPE_URL, WAYPOINT_AUTHN_TYPE_URL, WAF_POLICY_TYPE_URL)

WILDCARD = "*"
# Kinds whose changes cannot alter any served resource.
_IRRELEVANT_KINDS = frozenset({Kind.NODE, Kind.SERVICE_ACCOUNT})


MAX_NAMES_PER_TYPE = 100_000  # names one stream may subscribe to per type (a mesh of 10k pods: ~12k)
MAX_PENDING_REQUESTS = 64  # requests read ahead of handling; then gRPC flow control holds the client
MAX_NACK_REASON = 512  # characters of a client's NACK message that reach the log
_NACKS = ThrottledLog(log, interval=60.0)


class StreamLimit(Exception):
    """A client exceeded what one stream may hold; the stream ends with RESOURCE_EXHAUSTED."""


class AuthenticationFailed(Exception):
    """Raised by an authenticate hook to refuse a stream; the message goes to the client."""

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.UNAUTHENTICATED) -> None:
        super().__init__(message)
        self.code = code


def resource_version(payload: bytes) -> str:
    """Stable across processes and restarts: a content hash, not a counter."""
    return hashlib.blake2b(payload, digest_size=8).hexdigest()


@dataclass(frozen=True, slots=True)
class Entry:
    version: str
    resource: discovery_pb2.Resource  # never mutated once built; copied into responses


def _entry(name: str, packed: Any) -> Entry:
    version = resource_version(packed.value)
    return Entry(version, discovery_pb2.Resource(name=name, version=version, resource=packed))


@dataclass(frozen=True, slots=True)
class Resources:
    """Everything served, at one store version: type URL -> resource name -> entry.

    ``generation`` numbers the Resources a cache publishes (new keys make a new one at the
    same store version). ``changed`` lists, per type, the names whose entry or audience differs
    from those of generation ``parent_generation`` (None: not known), so a stream that diffed
    against the parent only looks at those instead of at every resource.
    """

    version: int
    by_type: Mapping[str, Mapping[str, Entry]]
    generation: int = 0
    parent_generation: int | None = None
    changed: Mapping[str, frozenset[str]] | None = None
    # Per waypoint type: resource name -> the waypoint accounts ("ns/name", a waypoint runs as
    # the service account named after its Gateway) that may receive it; no other stream sees it.
    audiences: Mapping[str, Mapping[str, frozenset[str]]] = field(default_factory=dict)

    def visible(self, type_url: str, caller: str | None) -> Mapping[str, Entry]:
        """What of ``type_url`` a stream authenticated as ``caller`` is served."""
        current = self.by_type[type_url]
        if type_url not in _SCOPED or caller is None:
            return current
        audience = self.audiences.get(type_url, {})
        return {name: e for name, e in current.items() if caller in audience.get(name, ())}


def _workload_entry(
    uid: str,
    snapshot: Snapshot,
    selector_policies: SelectorPolicyIndex,
    peer_authentications: PeerAuthenticationIndex,
) -> tuple[Entry, WaypointBinding]:
    """The workload's resource, and its waypoint binding (resolved once, for the log too)."""
    workload = snapshot.workloads[uid]
    binding = workload_binding(workload, snapshot)
    w = workload_state(workload, snapshot, selector_policies, peer_authentications, binding)
    return _entry(uid, address_to_any(w)), binding


_K = TypeVar("_K")


def _discard(index: dict[_K, set[str]], key: _K, uid: str) -> None:
    uids = index.get(key)
    if uids is not None:
        uids.discard(uid)
        if not uids:
            del index[key]


class _WorkloadIndex:
    """Workload uids by namespace and by label, over the snapshot last rendered: which
    workloads a selector or a namespace change can reach, without looking at all 10,000."""

    def __init__(self, workloads: Iterable[Workload] = ()) -> None:
        self.by_namespace: dict[str, set[str]] = {}
        self.by_label: dict[tuple[str, str], set[str]] = {}
        for w in workloads:
            self.add(w)

    def add(self, w: Workload) -> None:
        self.by_namespace.setdefault(w.namespace, set()).add(w.uid)
        for item in w.labels.items():
            self.by_label.setdefault(item, set()).add(w.uid)

    def remove(self, w: Workload) -> None:
        _discard(self.by_namespace, w.namespace, w.uid)
        for item in w.labels.items():
            _discard(self.by_label, item, w.uid)

    def in_namespace(self, namespace: str, workloads: Mapping[str, Workload]) -> Iterable[str]:
        """The uids a namespace-wide policy of ``namespace`` reaches (the root's: all)."""
        return workloads.keys() if namespace == ROOT_NAMESPACE else self.by_namespace.get(namespace, ())

    def selected(self, policy: SelectorPolicy, workloads: Mapping[str, Workload]) -> set[str]:
        first = next(iter(policy.selector.match_labels.items()), None)
        candidates = (
            self.in_namespace(policy.namespace, workloads) if first is None else self.by_label.get(first, ())
        )
        return {uid for uid in candidates if policy.selects(workloads[uid])}


# Changes of these kinds re-render everything: a Gateway can rebind any workload or service.
_FULL_KINDS = frozenset({Kind.GATEWAY})
_INCREMENTAL_KINDS = frozenset(
    {
        Kind.WORKLOAD,
        Kind.SERVICE,
        Kind.NAMESPACE,
        Kind.AUTHORIZATION_POLICY,
        Kind.PEER_AUTHENTICATION,
        Kind.REQUEST_AUTHENTICATION,
        Kind.MESH_CONFIG,
        Kind.WAF_POLICY,
    }
)
# Above one touched object in this many workloads (a resync), render everything instead.
_INCREMENTAL_FRACTION = 4
_HISTORY = 64  # generations whose changed names are kept


def _moved(
    new: Mapping[str, Mapping[str, frozenset[str]]],
    old: Mapping[str, Mapping[str, frozenset[str]]],
    type_url: str,
) -> set[str]:
    """Names whose audience differs: visible to other streams than before."""
    n, o = new.get(type_url, {}), old.get(type_url, {})
    return {k for k in n.keys() | o.keys() if n.get(k) != o.get(k)}


def _differing(new: Mapping[str, Entry], old: Mapping[str, Entry], names: Iterable[str]) -> set[str]:
    out: set[str] = set()
    for name in names:
        a, b = new.get(name), old.get(name)
        if (a.version if a is not None else None) != (b.version if b is not None else None):
            out.add(name)
    return out


class ResourceCache:
    """Renders the store's state as xDS resources once, for every stream.

    Store writes may come from any thread; the callback only queues the delta, and rendering
    happens lazily on the event loop when a stream asks for :meth:`current`. A change re-renders
    only what it can alter (:meth:`_update`): a pod its entry, a policy the workloads whose
    policy list it enters or leaves, a service its entry and the workloads it selects; only a
    Gateway change, or a change touching a large part of the mesh, re-renders everything.
    Either way the result is identical to a full render of the same snapshot
    (tests/controlplane/test_xds_incremental.py checks it), and ``changed`` lists exactly the
    names whose entry (or audience) differs from the previous version's.
    """

    def __init__(self, store: Store, jwks: JwksCache | None = None) -> None:
        self._jwks = jwks
        self._jwks_version = jwks.version if jwks is not None else 0
        self._lock = threading.Lock()
        self._pending: list[Delta] = []
        self._warned: dict[str, tuple[str, ...]] = {}
        self._waypoint_problems: dict[str, str] = {}
        self._waf_unbound: frozenset[str] = frozenset()  # WafPolicies that reach no waypoint (logged)
        self._store = store
        self._unsubscribe = store.subscribe(self._on_delta)
        # What the incremental updates start from; set by every full render.
        self._selector_policies = SelectorPolicyIndex()
        self._peer_auth = PeerAuthenticationIndex(())
        self._selectors: dict[str, SelectorPolicy] = {}  # AuthorizationPolicy key -> its selector policy
        self._policy_authz: dict[str, Entry] = {}  # Authorization entries lowered from AuthorizationPolicies
        self._peer_authz: dict[str, Entry] = {}  # ... from PeerAuthentications (they win on a name clash)
        self._service_names: dict[str, str] = {}  # Service key -> its resource name
        self._workload_index = _WorkloadIndex()
        # generation -> (its parent's, its changed names): for streams a few generations behind
        self._history: dict[int, tuple[int | None, Mapping[str, frozenset[str]] | None]] = {}
        self._generation = 0
        self.full_renders = 0  # for tests and the benchmark: how often everything was re-rendered
        snapshot = store.snapshot()
        self._snapshot = snapshot
        self._resources = self._render(snapshot, None)

    def close(self) -> None:
        self._unsubscribe()

    def _on_delta(self, delta: Delta) -> None:
        with self._lock:
            self._pending.append(delta)

    def current(self) -> Resources:
        with self._lock:
            pending, self._pending = self._pending, []
        pending = [d for d in pending if d.version > self._resources.version]
        keys_changed = False
        if self._jwks is not None and self._jwks.version != self._jwks_version:
            self._jwks_version = self._jwks.version
            keys_changed = True  # new keys: the RequestAuthentication resources carry them
        if not pending and not keys_changed:
            return self._resources
        latest = pending[-1].snapshot if pending else self._snapshot
        touched: dict[Kind, set[str]] = {}
        for d in pending:
            for kind in d.kinds - _IRRELEVANT_KINDS:
                touched.setdefault(kind, set()).update(d.upserted_keys(kind), d.removed_keys(kind))
        contiguous = not pending or pending[0].previous.version == self._snapshot.version
        resources = self._update(latest, touched, keys_changed) if contiguous else None
        if resources is None:
            resources = self._render(latest, self._resources)
        self._snapshot = latest
        self._resources = resources
        return resources

    def changed_since(
        self, resources: Resources, type_url: str, generation: int | None
    ) -> Iterable[str] | None:
        """The names of ``type_url`` that may differ between ``generation`` and ``resources``
        (a stream that diffed ``generation`` need look only at those), None when not known."""
        if generation is None:
            return None
        names: set[str] = set()
        at = resources.generation
        while at != generation:
            link = self._history.get(at)
            if link is None or link[0] is None or link[1] is None or link[0] >= at:
                return None
            names.update(link[1][type_url])
            at = link[0]
        return names

    def _publish(
        self,
        snapshot: Snapshot,
        by_type: Mapping[str, Mapping[str, Entry]],
        changed: Mapping[str, frozenset[str]] | None,
        audiences: Mapping[str, Mapping[str, frozenset[str]]],
        previous: Resources | None,
    ) -> Resources:
        self._generation += 1
        resources = Resources(
            snapshot.version,
            MappingProxyType(dict(by_type)),
            generation=self._generation,
            parent_generation=previous.generation if previous is not None else None,
            changed=MappingProxyType(dict(changed)) if changed is not None else None,
            audiences=audiences,
        )
        self._history[resources.generation] = (resources.parent_generation, resources.changed)
        while len(self._history) > _HISTORY:
            del self._history[next(iter(self._history))]
        return resources

    def _log_waypoint_problems(
        self, snapshot: Snapshot, bindings: Mapping[str, WaypointBinding | None], *, everything: bool
    ) -> None:
        """Say once why a workload's named waypoint is not used (fails open, or closed in strict
        mode). ``bindings``: uid -> binding of the workloads rendered (None: removed); with
        ``everything`` they are all the workloads, else only those that changed."""
        problems: dict[str, str] = {} if everything else dict(self._waypoint_problems)
        for uid, b in bindings.items():
            problems.pop(uid, None)
            if b is None or b.problem is None:
                continue
            problem = b.problem + (" (strict mode: fails closed)" if b.strict else "")
            problems[uid] = problem
            if self._waypoint_problems.get(uid) != problem:
                w = snapshot.workloads[uid]
                log.warning("waypoint binding not used", workload=f"{w.namespace}/{w.name}", reason=problem)
        self._waypoint_problems = problems

    def _warn(self, key: str, warnings: tuple[str, ...]) -> None:
        """Log a policy's warnings when they are new for it; remember them."""
        if not warnings:
            self._warned.pop(key, None)
            return
        if self._warned.get(key) != warnings:
            for warning in warnings:
                log.warning("policy not fully enforceable by ztunnel", policy=key, detail=warning)
        self._warned[key] = warnings

    def _update(
        self, snapshot: Snapshot, touched: Mapping[Kind, set[str]], keys_changed: bool
    ) -> Resources | None:
        """The resources of ``snapshot``, which differs from the one last rendered in the
        ``touched`` keys (and in the JWKS documents if ``keys_changed``), re-rendering only what
        those can alter; None when a full render is due instead."""
        old = self._snapshot
        if touched.keys() - _INCREMENTAL_KINDS:
            return None
        if sum(map(len, touched.values())) * _INCREMENTAL_FRACTION > max(len(snapshot.workloads), 64):
            return None
        index = self._workload_index
        uids: set[str] = set()  # workloads to re-render
        services: set[str] = set()  # Service keys to re-render

        for uid in touched.get(Kind.WORKLOAD, ()):
            before, after = old.workloads.get(uid), snapshot.workloads.get(uid)
            if before is not None:
                index.remove(before)
            if after is not None:
                index.add(after)
            uids.add(uid)

        for key in touched.get(Kind.SERVICE, ()):
            before_svc, after_svc = old.services.get(key), snapshot.services.get(key)
            if key in old.gateways or key in snapshot.gateways or any(
                s is not None and s.cluster_domain != DEFAULT_CLUSTER_DOMAIN for s in (before_svc, after_svc)
            ):
                return None  # possibly a waypoint's address, which other resources carry
            services.add(key)
            uids.update(w.uid for w in old.endpoints(key))
            uids.update(w.uid for w in snapshot.endpoints(key))

        for ns in touched.get(Kind.NAMESPACE, ()):
            # Its waypoint label and strict mode: the bindings of its workloads and services.
            uids.update(index.by_namespace.get(ns, ()))
            services.update(k for k, s in snapshot.services.items() if s.namespace == ns)

        authz_names: set[str] = set()
        selectors_changed = False
        for key in touched.get(Kind.AUTHORIZATION_POLICY, ()):
            policy = snapshot.authorization_policies.get(key)
            lowered = lower_authorization_policy(policy) if policy is not None else None
            self._warn(key, lowered.warnings if lowered is not None else ())
            a = lowered.authorization if lowered is not None else None
            authz_names.add(key)
            if a is not None:
                self._policy_authz[key] = _entry(key, authorization_to_any(a))
            else:
                self._policy_authz.pop(key, None)
            listed_before = self._selectors.pop(key, None)
            listed = selector_policy(policy, a) if policy is not None else None
            if listed is not None:
                self._selectors[key] = listed
            if listed_before != listed:
                # The workloads it selected or selects now: their policy list changes.
                selectors_changed = True
                for sel in (listed_before, listed):
                    if sel is not None:
                        uids.update(index.selected(sel, snapshot.workloads))
        if selectors_changed:
            self._selector_policies = SelectorPolicyIndex(self._selectors.values())

        if Kind.PEER_AUTHENTICATION in touched:
            peer_auth = PeerAuthenticationIndex(snapshot.peer_authentications.values())
            self._warn("PeerAuthentication", peer_auth.warnings)
            self._peer_auth = peer_auth
            peer_authz = {a.key: _entry(a.key, authorization_to_any(a)) for a in peer_auth.authorizations()}
            authz_names.update(self._peer_authz.keys() | peer_authz.keys())
            self._peer_authz = peer_authz
            for key in touched[Kind.PEER_AUTHENTICATION]:
                for pa in (old.peer_authentications.get(key), snapshot.peer_authentications.get(key)):
                    if pa is not None:
                        uids.update(index.in_namespace(pa.namespace, snapshot.workloads))
        return self._updated(snapshot, touched, keys_changed, uids, services, authz_names)

    def _updated(
        self,
        snapshot: Snapshot,
        touched: Mapping[Kind, set[str]],
        keys_changed: bool,
        uids: set[str],
        services: set[str],
        authz_names: set[str],
    ) -> Resources:
        """:meth:`_update`, second half: render what it found affected, and diff."""
        previous = self._resources
        by_type = dict(previous.by_type)
        changed: dict[str, frozenset[str]] = dict.fromkeys(TYPES, frozenset())

        if uids or services:
            current = previous.by_type[ADDRESS_TYPE_URL]
            addresses = current.copy() if isinstance(current, MappingProxyType) else dict(current)
            names = set(uids)
            bindings: dict[str, WaypointBinding | None] = {}
            for uid in uids:
                if uid in snapshot.workloads:
                    addresses[uid], bindings[uid] = _workload_entry(
                        uid, snapshot, self._selector_policies, self._peer_auth
                    )
                else:
                    addresses.pop(uid, None)
                    bindings[uid] = None
            self._log_waypoint_problems(snapshot, bindings, everything=False)
            for key in services:
                before_name = self._service_names.pop(key, None)
                if before_name is not None:
                    addresses.pop(before_name, None)
                    names.add(before_name)
                service = snapshot.services.get(key)
                if service is not None:
                    svc = service_state(service, snapshot)
                    addresses[svc.key] = _entry(svc.key, address_to_any(svc))
                    self._service_names[key] = svc.key
                    names.add(svc.key)
            changed[ADDRESS_TYPE_URL] = frozenset(_differing(addresses, current, names))
            by_type[ADDRESS_TYPE_URL] = MappingProxyType(addresses)

        if authz_names:
            current = previous.by_type[AUTHORIZATION_TYPE_URL]
            authorizations = current.copy() if isinstance(current, MappingProxyType) else dict(current)
            for name in authz_names:
                entry = self._peer_authz.get(name) or self._policy_authz.get(name)
                if entry is not None:
                    authorizations[name] = entry
                else:
                    authorizations.pop(name, None)
            changed[AUTHORIZATION_TYPE_URL] = frozenset(_differing(authorizations, current, authz_names))
            by_type[AUTHORIZATION_TYPE_URL] = MappingProxyType(authorizations)

        # The waypoint types are few resources each: rendered whole when their inputs change.
        waypoint_maps: dict[str, Mapping[str, Entry]] = {}
        if Kind.AUTHORIZATION_POLICY in touched:
            waypoint_maps[WAYPOINT_POLICY_TYPE_URL] = _waypoint_policies(snapshot)
        if Kind.REQUEST_AUTHENTICATION in touched or keys_changed:
            waypoint_maps[WAYPOINT_AUTHN_TYPE_URL] = self._waypoint_authns(snapshot)
        if Kind.MESH_CONFIG in touched:
            waypoint_maps[EXTENSION_PROVIDER_TYPE_URL] = _providers(snapshot)
        if Kind.WAF_POLICY in touched:
            waypoint_maps[WAF_POLICY_TYPE_URL] = _waf_policies(snapshot)
        for type_url, entries in waypoint_maps.items():
            current = previous.by_type[type_url]
            changed[type_url] = frozenset(_differing(entries, current, entries.keys() | current.keys()))
            by_type[type_url] = MappingProxyType(dict(entries))

        # Which waypoints handle a service can follow its pods (per-account waypoints).
        audiences = self._audiences(snapshot)
        for type_url in _SCOPED:
            moved = _moved(audiences, previous.audiences, type_url)
            if moved:
                changed[type_url] = changed[type_url] | moved
        return self._publish(snapshot, by_type, changed, audiences, previous)

    def _waypoint_authns(self, snapshot: Snapshot) -> dict[str, Entry]:
        docs = self._jwks.documents() if self._jwks is not None else {}
        return {
            ra.key: _entry(
                ra.key,
                waypoint_authn_to_any(
                    WaypointAuthentication(
                        ra, {r.jwks_uri: docs[r.jwks_uri] for r in ra.jwt_rules if r.jwks_uri in docs}
                    )
                ),
            )
            for ra in snapshot.request_authentications.values()
            if ra.target_refs
        }

    def _render(self, snapshot: Snapshot, previous: Resources | None) -> Resources:
        """Everything, from scratch (``changed``: what differs from ``previous``); also sets
        what the incremental updates start from.

        Policies are lowered one by one with the functions :func:`lower_policies` uses, so
        each AuthorizationPolicy's entry is kept apart from the PeerAuthentication ones."""
        self.full_renders += 1
        self._warned = {}
        self._selectors = {}
        self._policy_authz = {}
        for key, policy in sorted(snapshot.authorization_policies.items()):
            lowered = lower_authorization_policy(policy)
            self._warn(key, lowered.warnings)
            a = lowered.authorization
            if a is None:
                continue
            self._policy_authz[key] = _entry(key, authorization_to_any(a))
            listed = selector_policy(policy, a)
            if listed is not None:
                self._selectors[key] = listed
        self._selector_policies = SelectorPolicyIndex(self._selectors.values())
        self._peer_auth = PeerAuthenticationIndex(snapshot.peer_authentications.values())
        self._warn("PeerAuthentication", self._peer_auth.warnings)
        self._peer_authz = {
            a.key: _entry(a.key, authorization_to_any(a)) for a in self._peer_auth.authorizations()
        }
        authorizations = {**self._policy_authz, **self._peer_authz}

        addresses: dict[str, Entry] = {}
        bindings: dict[str, WaypointBinding | None] = {}
        for uid in snapshot.workloads:
            addresses[uid], bindings[uid] = _workload_entry(
                uid, snapshot, self._selector_policies, self._peer_auth
            )
        self._log_waypoint_problems(snapshot, bindings, everything=True)
        self._workload_index = _WorkloadIndex(snapshot.workloads.values())
        self._service_names = {}
        for key, service in snapshot.services.items():
            svc = service_state(service, snapshot)
            addresses[svc.key] = _entry(svc.key, address_to_any(svc))
            self._service_names[key] = svc.key
        by_type: dict[str, Mapping[str, Entry]] = {
            ADDRESS_TYPE_URL: MappingProxyType(addresses),
            AUTHORIZATION_TYPE_URL: MappingProxyType(authorizations),
            WAYPOINT_POLICY_TYPE_URL: MappingProxyType(_waypoint_policies(snapshot)),
            WAYPOINT_AUTHN_TYPE_URL: MappingProxyType(self._waypoint_authns(snapshot)),
            EXTENSION_PROVIDER_TYPE_URL: MappingProxyType(_providers(snapshot)),
            WAF_POLICY_TYPE_URL: MappingProxyType(_waf_policies(snapshot)),
        }
        audiences = self._audiences(snapshot)
        changed: dict[str, frozenset[str]] | None = None
        if previous is not None:
            # Diffed once here rather than by every stream.
            changed = {}
            for t in TYPES:
                new, old = by_type[t], previous.by_type[t]
                moved = _moved(audiences, previous.audiences, t) if t in _SCOPED else set()
                changed[t] = frozenset(_differing(new, old, new.keys() | old.keys()) | moved)
        return self._publish(snapshot, by_type, changed, audiences, previous)

    def _audiences(self, snapshot: Snapshot) -> Mapping[str, Mapping[str, frozenset[str]]]:
        """:func:`_audiences`, saying once when a WafPolicy reaches no waypoint (it inspects
        nothing: a Gateway that is not a waypoint, a Service without one)."""
        audiences = _audiences(snapshot)
        waf = audiences[WAF_POLICY_TYPE_URL]
        unbound = frozenset(k for k, to in waf.items() if not to)
        for key in sorted(unbound - self._waf_unbound):
            p = snapshot.waf_policies[key]
            targets = ", ".join(f"{t.kind}/{t.name}" for t in p.target_refs)
            log.warning("WafPolicy applies to no waypoint: it inspects nothing", policy=key, targets=targets)
        self._waf_unbound = unbound
        return audiences


def _waypoint_policies(snapshot: Snapshot) -> dict[str, Entry]:
    """Each waypoint-bound AuthorizationPolicy, as written."""
    return {
        p.key: _entry(p.key, waypoint_policy_to_any(p))
        for p in snapshot.authorization_policies.values()
        if p.target_refs
    }


def _providers(snapshot: Snapshot) -> dict[str, Entry]:
    """MeshConfig extensionProviders: the external authorizers CUSTOM policies name (waypoints)."""
    return {
        p.name: _entry(p.name, extension_provider_to_any(p))
        for mc in snapshot.mesh_configs.values()
        for p in mc.extension_providers
        if p.ext_authz is not None
    }


def _waf_policies(snapshot: Snapshot) -> dict[str, Entry]:
    """WafPolicies (ours): each to the waypoints its targetRefs reach, as written."""
    return {p.key: _entry(p.key, waf_policy_to_any(p)) for p in snapshot.waf_policies.values()}


def _audiences(snapshot: Snapshot) -> Mapping[str, Mapping[str, frozenset[str]]]:
    """Per waypoint type, resource name -> accounts of the waypoints it binds to (a waypoint runs
    as its Gateway's name)."""
    policies = (p for p in snapshot.authorization_policies.values() if p.target_refs)
    authns = (a for a in snapshot.request_authentications.values() if a.target_refs)
    return MappingProxyType(
        {
            WAYPOINT_POLICY_TYPE_URL: MappingProxyType(dict(policy_audiences(policies, snapshot))),
            WAYPOINT_AUTHN_TYPE_URL: MappingProxyType(dict(policy_audiences(authns, snapshot))),
            WAF_POLICY_TYPE_URL: MappingProxyType(
                dict(policy_audiences(snapshot.waf_policies.values(), snapshot))
            ),
        }
    )


@dataclass(slots=True)
class _Subscription:
    """One type on one stream: what the client asked for and what it has been sent."""

    wildcard: bool = False
    names: set[str] = field(default_factory=set)
    sent: dict[str, str] = field(default_factory=dict)  # name -> version the client holds
    nonces: set[str] = field(default_factory=set)  # sent, not yet ACKed/NACKed
    diffed_generation: int | None = None  # the Resources generation `sent` was last compared with


_CHANGED = object()


class _Stream:
    """The state of one DeltaAggregatedResources call."""

    def __init__(
        self, cache: ResourceCache, context: grpc.aio.ServicerContext[Any, Any], peer: str, caller: str | None
    ) -> None:
        self._cache = cache
        self._caller = caller
        self._peer = peer
        self._context = context
        self._subs: dict[str, _Subscription] = {}
        self._log = log.bind(peer=peer)

    async def on_request(self, req: discovery_pb2.DeltaDiscoveryRequest) -> None:
        type_url = req.type_url
        if req.HasField("node") and req.node.id:
            self._log = self._log.bind(node=req.node.id)
        if type_url not in TYPES:
            self._log.warning("xds request for an unknown type ignored", type_url=type_url)
            return
        sub = self._subs.get(type_url)
        first = sub is None
        if sub is None:
            sub = self._subs[type_url] = _Subscription(sent=dict(req.initial_resource_versions))
            sub.wildcard = not req.resource_names_subscribe
            self._log.info(
                "xds subscribe",
                type_url=type_url,
                wildcard=sub.wildcard,
                known=len(req.initial_resource_versions),
            )

        if req.response_nonce:
            nonce = req.response_nonce
            known = nonce in sub.nonces
            sub.nonces.discard(nonce)
            if req.HasField("error_detail"):
                # A client may NACK as often as it likes: one line per stream and type a minute.
                _NACKS.log(
                    "error",
                    (self._peer, type_url),
                    "xds NACK: the client refused a response",
                    peer=self._peer,
                    type_url=type_url,
                    nonce=nonce,
                    code=req.error_detail.code,
                    reason=req.error_detail.message[:MAX_NACK_REASON],
                    known_nonce=known,
                )
            else:
                self._log.debug("xds ACK", type_url=type_url, nonce=nonce, known_nonce=known)

        absent: list[str] = []
        current = self._cache.current().visible(type_url, self._caller)
        if len(sub.names) + len(req.resource_names_subscribe) > MAX_NAMES_PER_TYPE:
            raise StreamLimit(
                f"more than {MAX_NAMES_PER_TYPE} resource names subscribed for {type_url} on one stream"
            )
        for name in req.resource_names_subscribe:
            if name == WILDCARD:
                sub.wildcard = True
            elif name not in sub.names:
                sub.names.add(name)
                if name not in current and not sub.wildcard:
                    absent.append(name)  # tell the client it does not exist
        for name in req.resource_names_unsubscribe:
            if name == WILDCARD:
                sub.wildcard = False
            else:
                sub.names.discard(name)
                sub.sent.pop(name, None)
        if not sub.wildcard:
            for name in list(sub.sent):
                if name not in sub.names:
                    sub.sent.pop(name)
        # A plain ACK/NACK changes no subscription: only what changed since this stream's last
        # diff can need sending (usually nothing), so it does not diff every resource again.
        resubscribed = first or bool(req.resource_names_subscribe or req.resource_names_unsubscribe)
        await self._push(type_url, sub, force=first, absent=absent, full=resubscribed)

    async def on_change(self) -> None:
        for type_url, sub in self._subs.items():
            await self._push(type_url, sub)

    async def _push(
        self,
        type_url: str,
        sub: _Subscription,
        *,
        force: bool = False,
        absent: Sequence[str] = (),
        full: bool = False,
    ) -> None:
        resources = self._cache.current()
        current = resources.visible(type_url, self._caller)
        wanted: Mapping[str, Entry] = (
            current if sub.wildcard else {n: current[n] for n in sub.names if n in current}
        )
        # Only what changed since the state this stream last caught up with, when known.
        changed = None if full else self._cache.changed_since(resources, type_url, sub.diffed_generation)
        candidates: Iterable[str] = changed if changed is not None else set(wanted) | set(sub.sent)
        sub.diffed_generation = resources.generation
        upserts: list[str] = []
        removed_set = set(absent)
        for name in candidates:
            entry = wanted.get(name)
            if entry is None:
                if name in sub.sent:
                    removed_set.add(name)
            elif sub.sent.get(name) != entry.version:
                upserts.append(name)
        upserts.sort()
        removed = sorted(removed_set)
        if not upserts and not removed and not force:
            return
        nonce = uuid.uuid4().hex
        resp = discovery_pb2.DeltaDiscoveryResponse(
            type_url=type_url,
            nonce=nonce,
            system_version_info=str(resources.version),
            resources=[wanted[name].resource for name in upserts],
            removed_resources=removed,
        )
        for name in upserts:
            sub.sent[name] = wanted[name].version
        for name in removed:
            sub.sent.pop(name, None)
        sub.nonces.add(nonce)
        self._log.debug(
            "xds push",
            type_url=type_url,
            nonce=nonce,
            version=resources.version,
            upserts=len(upserts),
            removed=len(removed),
        )
        await self._context.write(resp)


class DiscoveryServicer:
    """``AggregatedDiscoveryService`` for grpc.aio; one instance serves every stream."""

    def __init__(
        self, store: Store, *, authenticate: Authenticator | None = None, jwks: JwksCache | None = None
    ) -> None:
        self._store = store
        self._authenticate = authenticate
        self._jwks = jwks
        self.cache = ResourceCache(store, jwks)

    def close(self) -> None:
        """Stop following the store (the gRPC server ends the streams themselves)."""
        self.cache.close()

    async def DeltaAggregatedResources(
        self,
        request_iterator: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        peer = context.peer()
        caller: str | None = None
        if self._authenticate is not None:
            try:
                caller = await self._authenticate(tuple(context.invocation_metadata() or ()))
            except AuthenticationFailed as e:
                log.warning("xds stream refused", peer=peer, code=e.code.name, reason=str(e))
                await context.abort(e.code, str(e))
        stream = _Stream(self.cache, context, peer, caller)
        inbox: asyncio.Queue[object] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        change_pending = False

        def mark_changed() -> None:
            nonlocal change_pending
            if not change_pending:
                change_pending = True
                inbox.put_nowait(_CHANGED)

        def on_delta(delta: Delta) -> None:
            if delta.kinds - _IRRELEVANT_KINDS:
                loop.call_soon_threadsafe(mark_changed)

        unsubscribe = self._store.subscribe(on_delta)

        def on_keys(_version: int) -> None:
            loop.call_soon_threadsafe(mark_changed)

        unsubscribe_jwks = self._jwks.subscribe(on_keys) if self._jwks is not None else None
        slots = asyncio.Semaphore(MAX_PENDING_REQUESTS)  # requests read but not yet handled
        try:
            async with asyncio.TaskGroup() as tg:
                reader = tg.create_task(
                    self._read(request_iterator, inbox, peer, slots), name=f"xds-read {peer}"
                )
                while True:
                    item = await inbox.get()
                    if item is None:
                        break
                    if item is _CHANGED:
                        change_pending = False
                        await stream.on_change()
                    else:
                        assert isinstance(item, discovery_pb2.DeltaDiscoveryRequest)
                        slots.release()
                        await stream.on_request(item)
                reader.cancel()
        except* StreamLimit as group:
            reason = str(group.exceptions[0])
            log.warning("xds stream ended: over its limits", peer=peer, reason=reason)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, reason)
        finally:
            unsubscribe()
            if unsubscribe_jwks is not None:
                unsubscribe_jwks()
            log.info("xds stream closed", peer=peer)

    @staticmethod
    async def _read(
        requests: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest],
        inbox: asyncio.Queue[object],
        peer: str,
        slots: asyncio.Semaphore,
    ) -> None:
        try:
            async for req in requests:
                # At most MAX_PENDING_REQUESTS ahead: past that, stop reading and let gRPC's flow
                # control hold the client back instead of queueing without bound.
                await slots.acquire()
                inbox.put_nowait(req)
        except Exception as e:  # the call broke: end the stream, nothing to answer
            log.info("xds stream read failed", peer=peer, error=repr(e))
        finally:
            inbox.put_nowait(None)


def register(
    server: grpc.aio.Server,
    store: Store,
    *,
    authenticate: Authenticator | None = None,
    jwks: JwksCache | None = None,
) -> DiscoveryServicer:
    """Add the discovery service to ``server``; call ``close()`` on the result at shutdown."""
    servicer = DiscoveryServicer(store, authenticate=authenticate, jwks=jwks)
    discovery_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(servicer, server)
    return servicer
