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
  client that sends ``initial_resource_versions`` get only what really changed. A pod change
  re-renders only that pod; any other change (services, namespaces, gateways, policies) can
  alter many workloads (their services map, waypoint, policy list), so it re-renders all.
* Each stream remembers, per type, the version it last sent of each resource and pushes the
  difference with the cache whenever the store changes. The stream never replays the store's
  deltas itself: diffing against the latest state coalesces bursts and cannot miss anything.
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
from typing import Any

import grpc
import structlog

from controlplane.jwks import JwksCache
from controlplane.lowering import (
    PeerAuthenticationIndex,
    SelectorPolicyIndex,
    lower_policies,
    service_state,
    workload_state,
)
from controlplane.waypoints import WaypointBinding, policy_audiences, workload_binding
from mesh.log import ThrottledLog
from mesh.model import Delta, Kind, Snapshot, Store
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

    ``changed`` lists, per type, the names that may differ from the resources of
    ``parent_version`` (None after a full re-render), so a stream that diffed against the
    parent only looks at those instead of at every resource.
    """

    version: int
    by_type: Mapping[str, Mapping[str, Entry]]
    parent_version: int | None = None
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


class ResourceCache:
    """Renders the store's state as xDS resources once, for every stream.

    Store writes may come from any thread; the callback only queues the delta, and rendering
    happens lazily on the event loop when a stream asks for :meth:`current`.
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
        self._selector_policies = SelectorPolicyIndex()
        self._peer_auth = PeerAuthenticationIndex(())
        self._resources = self._render(store.snapshot())

    def close(self) -> None:
        self._unsubscribe()

    def _on_delta(self, delta: Delta) -> None:
        with self._lock:
            self._pending.append(delta)

    def current(self) -> Resources:
        with self._lock:
            pending, self._pending = self._pending, []
        pending = [d for d in pending if d.version > self._resources.version]
        if self._jwks is not None and self._jwks.version != self._jwks_version:
            # New keys: re-render (rare: once per fetch that changed a document).
            self._jwks_version = self._jwks.version
            latest = pending[-1].snapshot if pending else self._store.snapshot()
            self._resources = self._render(latest)
            return self._resources
        if not pending:
            return self._resources
        kinds = frozenset().union(*(d.kinds for d in pending)) - _IRRELEVANT_KINDS
        latest = pending[-1].snapshot
        if kinds <= {Kind.WORKLOAD}:
            self._resources = self._update_workloads(latest, pending)
        else:
            self._resources = self._render(latest)
        return self._resources

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

    def _update_workloads(self, snapshot: Snapshot, deltas: Sequence[Delta]) -> Resources:
        current = self._resources.by_type[ADDRESS_TYPE_URL]
        # MappingProxyType.copy() copies the dict underneath in C; dict(view) walks it in Python.
        addresses = current.copy() if isinstance(current, MappingProxyType) else dict(current)
        touched = set().union(
            *(d.upserted_keys(Kind.WORKLOAD) | d.removed_keys(Kind.WORKLOAD) for d in deltas)
        )
        bindings: dict[str, WaypointBinding | None] = {}
        for uid in touched:
            if uid in snapshot.workloads:
                addresses[uid], bindings[uid] = _workload_entry(
                    uid, snapshot, self._selector_policies, self._peer_auth
                )
            else:
                addresses.pop(uid, None)
                bindings[uid] = None
        self._log_waypoint_problems(snapshot, bindings, everything=False)
        by_type = dict(self._resources.by_type)
        by_type[ADDRESS_TYPE_URL] = MappingProxyType(addresses)
        # Which waypoints handle a service can follow its pods (per-account waypoints).
        audiences = self._audiences(snapshot)

        def moved(type_url: str) -> frozenset[str]:
            new, old = audiences.get(type_url, {}), self._resources.audiences.get(type_url, {})
            return frozenset(k for k in new.keys() | old.keys() if new.get(k) != old.get(k))

        return Resources(
            snapshot.version,
            MappingProxyType(by_type),
            parent_version=self._resources.version,
            changed=MappingProxyType(
                {
                    ADDRESS_TYPE_URL: frozenset(touched),
                    AUTHORIZATION_TYPE_URL: frozenset(),
                    WAYPOINT_POLICY_TYPE_URL: moved(WAYPOINT_POLICY_TYPE_URL),
                    WAYPOINT_AUTHN_TYPE_URL: moved(WAYPOINT_AUTHN_TYPE_URL),
                    EXTENSION_PROVIDER_TYPE_URL: frozenset(),
                    WAF_POLICY_TYPE_URL: moved(WAF_POLICY_TYPE_URL),
                }
            ),
            audiences=audiences,
        )

    def _render(self, snapshot: Snapshot) -> Resources:
        lowered = lower_policies(snapshot)
        for key, warnings in lowered.warnings.items():
            if self._warned.get(key) != warnings:
                for warning in warnings:
                    log.warning("policy not fully enforceable by ztunnel", policy=key, detail=warning)
        self._warned = dict(lowered.warnings)
        self._selector_policies = lowered.selector_policies
        self._peer_auth = lowered.peer_authentications
        authorizations = {a.key: _entry(a.key, authorization_to_any(a)) for a in lowered.authorizations}

        addresses: dict[str, Entry] = {}
        bindings: dict[str, WaypointBinding | None] = {}
        for uid in snapshot.workloads:
            addresses[uid], bindings[uid] = _workload_entry(
                uid, snapshot, self._selector_policies, self._peer_auth
            )
        self._log_waypoint_problems(snapshot, bindings, everything=True)
        for service in snapshot.services.values():
            svc = service_state(service, snapshot)
            addresses[svc.key] = _entry(svc.key, address_to_any(svc))
        waypoint_policies = {
            p.key: _entry(p.key, waypoint_policy_to_any(p))
            for p in snapshot.authorization_policies.values()
            if p.target_refs
        }
        docs = self._jwks.documents() if self._jwks is not None else {}
        waypoint_authns = {
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
        # MeshConfig extensionProviders: the external authorizers CUSTOM policies name (waypoints).
        providers = {
            p.name: _entry(p.name, extension_provider_to_any(p))
            for mc in snapshot.mesh_configs.values()
            for p in mc.extension_providers
            if p.ext_authz is not None
        }
        # WafPolicies (ours): each to the waypoints its targetRefs reach, as written.
        waf = {p.key: _entry(p.key, waf_policy_to_any(p)) for p in snapshot.waf_policies.values()}
        return Resources(
            snapshot.version,
            MappingProxyType(
                {
                    ADDRESS_TYPE_URL: MappingProxyType(addresses),
                    AUTHORIZATION_TYPE_URL: MappingProxyType(authorizations),
                    WAYPOINT_POLICY_TYPE_URL: MappingProxyType(waypoint_policies),
                    WAYPOINT_AUTHN_TYPE_URL: MappingProxyType(waypoint_authns),
                    EXTENSION_PROVIDER_TYPE_URL: MappingProxyType(providers),
                    WAF_POLICY_TYPE_URL: MappingProxyType(waf),
                }
            ),
            audiences=self._audiences(snapshot),
        )


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
    diffed_version: int | None = None  # the Resources version `sent` was last compared with


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
        await self._push(type_url, sub, force=first, absent=absent, full=True)

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
        changed = resources.changed
        if not full and changed is not None and resources.parent_version == sub.diffed_version:
            # Only what changed since the state this stream last caught up with.
            candidates: Iterable[str] = changed[type_url]
        else:
            candidates = set(wanted) | set(sub.sent)
        sub.diffed_version = resources.version
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
