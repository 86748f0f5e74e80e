"""Kubernetes mode's source of truth: list+watch of the API server, written into the store.

Each watched resource has a watcher thread of its own (the ``kubernetes`` client is blocking)
that follows the protocol every Kubernetes controller follows: LIST, make that the whole of
the kind in the store (so deletions that happened while we were away are applied), then
WATCH from the list's resourceVersion with bookmarks; resume a dropped watch from the last
resourceVersion seen, relist when the API server says 410 Gone, back off with jitter on any
other error. Objects go through :func:`sources.convert.convert`, the same conversion the
local file source uses, so a manifest means the same thing in both modes.

Unlike a local file, the API server's state is not ours to refuse as a whole: one object the
mesh cannot use (conversion raises :class:`ConfigError`) is logged with its kind, name, field
and reason and skipped, and everything else keeps flowing. If it was valid before, its last
valid version stays in force, as a refused file keeps the last good state in local mode.

Store writes happen on the watcher threads (the store is thread-safe; its subscribers are
called there too, see :class:`mesh.model.DeltaQueue` for handing deltas to an event loop).
Each model kind has exactly one watcher, so a watcher may compute "what of my kind is no
longer listed" from a snapshot without racing another writer.

Where Istio does, status is written back: an AuthorizationPolicy that ztunnel enforces only
in part (L7 attributes, or an action ztunnel does not implement) gets the ``ZtunnelAccepted``
condition istiod writes, with the same reason and message, so ``kubectl get -o yaml`` says
what POLICY.md says: the policy is not enforced as written.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import random
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType, TracebackType
from typing import Any

import structlog
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines as _iter_resp_lines

from mesh.model import (
    L4_CONDITION_KEYS,
    L7_OPERATION_FIELDS,
    L7_SOURCE_FIELDS,
    AuthorizationAction,
    AuthorizationPolicy,
    Kind,
    MeshObject,
    Store,
)
from mesh.model.meshconfig import MESH_CONFIGMAP
from mesh.model.policy import ROOT_NAMESPACE
from sources import WorkloadSource
from sources.convert import ConfigError, ConvertOptions, convert

log = structlog.get_logger(__name__)

# The client's own chunked-stream line splitter (untyped upstream).
iter_resp_lines: Callable[[Any], Iterator[str]] = _iter_resp_lines

HTTP_GONE = 410
# A watch the server ends sooner than this without any event counts as a failure (backoff).
_MIN_QUIET_WATCH = 1.0

# Istio's AuthorizationPolicy status condition for ztunnel (pilot/.../ambient/authorization.go).
CONDITION_ZTUNNEL_ACCEPTED = "ZtunnelAccepted"
REASON_ACCEPTED = "Accepted"
REASON_UNSUPPORTED = "UnsupportedValue"
MESSAGE_ACCEPTED = "attached to ztunnel"
_HTTP_RULE_FMT = (
    "ztunnel does not support HTTP attributes (found: {found}). "
    "In ambient mode you must use a waypoint proxy to enforce HTTP rules. {boilerplate}"
)
_HTTP_DENY_BOILERPLATE = (
    "DENY policy with HTTP attributes is enforced without the HTTP rules. "
    "This will be more restrictive than requested."
)
_HTTP_ALLOW_BOILERPLATE = (
    "Within an ALLOW policy, rules matching HTTP attributes are omitted. "
    "This will be more restrictive than requested."
)


# --- what is watched ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Resource:
    """One watched collection: where it lives in the API and what it becomes in the store."""

    plural: str  # "pods"; also the name used in logs and metrics
    api_version: str  # "v1", "security.istio.io/v1"
    kind: str  # "Pod"
    model_kind: Kind | None  # None: watched and cached here, not held by the model
    core_method: str = ""  # CoreV1Api / DiscoveryV1Api method; empty for custom resources
    field_selector: str = ""  # watch only these objects of the collection
    namespace: str = ""  # watch only this namespace (a namespaced ``core_method``)
    # A custom resource whose CRD may not be installed (a chart value turns it off): the API
    # server's 404 counts as "listed, none" so the source still syncs; it is listed again later.
    optional: bool = False

    @property
    def group(self) -> str:
        return self.api_version.rpartition("/")[0]

    @property
    def version(self) -> str:
        return self.api_version.rpartition("/")[2]

    def list_call(self, api_client: Any) -> Callable[..., Any]:
        """The ``kubernetes`` client method that lists (and, with ``watch=True``, watches) it."""
        if not self.core_method:
            custom = client.CustomObjectsApi(api_client)
            return functools.partial(custom.list_cluster_custom_object, self.group, self.version, self.plural)
        api: Any = client.DiscoveryV1Api(api_client) if self.group else client.CoreV1Api(api_client)
        method: Callable[..., Any] = getattr(api, self.core_method)
        scope = {"namespace": self.namespace} if self.namespace else {}
        if self.field_selector:
            scope["field_selector"] = self.field_selector
        return functools.partial(method, **scope) if scope else method


NAMESPACES = Resource("namespaces", "v1", "Namespace", Kind.NAMESPACE, "list_namespace")
NODES = Resource("nodes", "v1", "Node", Kind.NODE, "list_node")
PODS = Resource("pods", "v1", "Pod", Kind.WORKLOAD, "list_pod_for_all_namespaces")
SERVICES = Resource("services", "v1", "Service", Kind.SERVICE, "list_service_for_all_namespaces")
ENDPOINT_SLICES = Resource(
    "endpointslices", "discovery.k8s.io/v1", "EndpointSlice", None, "list_endpoint_slice_for_all_namespaces"
)
AUTHORIZATION_POLICIES = Resource(
    "authorizationpolicies", "security.istio.io/v1", "AuthorizationPolicy", Kind.AUTHORIZATION_POLICY
)
PEER_AUTHENTICATIONS = Resource(
    "peerauthentications", "security.istio.io/v1", "PeerAuthentication", Kind.PEER_AUTHENTICATION
)
REQUEST_AUTHENTICATIONS = Resource(
    "requestauthentications", "security.istio.io/v1", "RequestAuthentication", Kind.REQUEST_AUTHENTICATION
)
GATEWAYS = Resource("gateways", "gateway.networking.k8s.io/v1", "Gateway", Kind.GATEWAY)
# The mesh ConfigMap only (its extensionProviders), as istiod reads its own: in the root
# namespace, by name (RBAC: a Role there, not every ConfigMap of the cluster).
MESH_CONFIG_MAPS = Resource(
    "configmaps",
    "v1",
    "ConfigMap",
    Kind.MESH_CONFIG,
    "list_namespaced_config_map",
    field_selector=f"metadata.name={MESH_CONFIGMAP}",
    namespace=ROOT_NAMESPACE,
)

# WafPolicy (ours): the base chart installs its CRD unless crds.wafPolicy is false.
WAF_POLICIES = Resource(
    "wafpolicies", "extensions.ambient-mesh.io/v1alpha1", "WafPolicy", Kind.WAF_POLICY, optional=True
)

RESOURCES: tuple[Resource, ...] = (
    NAMESPACES,
    NODES,
    PODS,
    SERVICES,
    ENDPOINT_SLICES,
    AUTHORIZATION_POLICIES,
    PEER_AUTHENTICATIONS,
    REQUEST_AUTHENTICATIONS,
    GATEWAYS,
    MESH_CONFIG_MAPS,
    WAF_POLICIES,
)


# --- retry timing -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with proportional jitter: ``initial * factor**attempt``, capped at
    ``maximum``, then scaled by a random factor in ``[1 - jitter, 1 + jitter]`` so that many
    control planes (or many watchers) do not retry in lockstep against a struggling API server."""

    initial: float = 0.5
    maximum: float = 30.0
    factor: float = 2.0
    jitter: float = 0.2

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        base = min(self.maximum, self.initial * self.factor ** min(attempt, 64))
        return min(self.maximum, base * (1.0 - self.jitter + 2.0 * self.jitter * rand()))


@dataclass(frozen=True, slots=True)
class WatchTiming:
    """Timeouts of API calls. ``watch_timeout`` is the server-side ``timeoutSeconds`` of a
    watch (the API server ends it cleanly, we re-watch from the last resourceVersion); the
    client-side read timeout is a little longer, to notice a connection that silently died."""

    watch_timeout: int = 300
    read_grace: float = 30.0
    connect_timeout: float = 10.0
    list_timeout: float = 60.0
    page_size: int = 500


class _Gone(Exception):
    """The resourceVersion we hold is too old (410): relist."""


class _WatchFailed(Exception):
    """The watch stream said something we cannot continue from (an ERROR event, bad JSON)."""


def _ref(obj: Mapping[str, Any]) -> str:
    md = obj.get("metadata")
    if not isinstance(md, Mapping):
        return ""
    ns, name = md.get("namespace"), md.get("name")
    return f"{ns}/{name}" if ns else str(name)


def _meta(obj: Mapping[str, Any], key: str) -> Any:
    md = obj.get("metadata")
    return md.get(key) if isinstance(md, Mapping) else None


# --- AuthorizationPolicy status ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ZtunnelCondition:
    """The ``ZtunnelAccepted`` condition istiod would write for a policy."""

    status: str  # "True" / "False"
    reason: str
    message: str

    def matches(self, cond: Mapping[str, Any]) -> bool:
        return (
            cond.get("status") == self.status
            and cond.get("reason") == self.reason
            and cond.get("message") == self.message
        )


def l7_attributes(policy: AuthorizationPolicy) -> list[str]:
    """The attributes of ``policy`` ztunnel cannot evaluate, named as in the Istio API."""
    found: set[str] = set()
    for rule in policy.rules:
        for f in rule.from_:
            found.update(api for attr, api in L7_SOURCE_FIELDS if getattr(f.source, attr))
        for t in rule.to:
            found.update(api for attr, api in L7_OPERATION_FIELDS if getattr(t.operation, attr))
        found.update(w.key for w in rule.when if w.key not in L4_CONDITION_KEYS)
    return sorted(found)


def ztunnel_condition(policy: AuthorizationPolicy) -> ZtunnelCondition | None:
    """What istiod reports about ``policy`` in ztunnel; None for waypoint-bound policies
    (``targetRefs``), which ztunnel never sees."""
    if policy.target_refs:
        return None
    if policy.action not in (AuthorizationAction.ALLOW, AuthorizationAction.DENY):
        return ZtunnelCondition(
            "False", REASON_UNSUPPORTED, f"ztunnel does not support the {policy.action.value} action"
        )
    found = l7_attributes(policy)
    if found:
        boilerplate = (
            _HTTP_DENY_BOILERPLATE if policy.action is AuthorizationAction.DENY else _HTTP_ALLOW_BOILERPLATE
        )
        return ZtunnelCondition(
            "True", REASON_UNSUPPORTED, _HTTP_RULE_FMT.format(found=", ".join(found), boilerplate=boilerplate)
        )
    return ZtunnelCondition("True", REASON_ACCEPTED, MESSAGE_ACCEPTED)


def _conditions_of(obj: Mapping[str, Any]) -> list[dict[str, Any]]:
    status = obj.get("status")
    if not isinstance(status, Mapping):
        return []
    conds = status.get("conditions")
    if not isinstance(conds, list):
        return []
    return [dict(c) for c in conds if isinstance(c, Mapping)]


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --- the source -------------------------------------------------------------------------------


class KubernetesSource:
    """Keeps the store equal to what the API server holds, for the kinds the mesh uses.

    ``start()`` launches one watcher thread per resource; ``synced`` is set once every
    resource has been listed (``await wait_synced()`` from asyncio); ``stop()`` ends the
    watches promptly (in-flight streams are shut down, not waited out) and joins the threads.
    The ``api_client`` belongs to the caller, who closes it after ``stop()``.
    """

    def __init__(
        self,
        api_client: Any,
        store: Store,
        *,
        options: ConvertOptions | None = None,
        backoff: Backoff | None = None,
        timing: WatchTiming | None = None,
        resources: Iterable[Resource] = RESOURCES,
        write_status: bool = True,
        rand: Callable[[], float] = random.random,
        on_event: Callable[[str, str, Mapping[str, Any]], None] | None = None,
    ) -> None:
        self._api_client = api_client
        self._store = store
        self._options = options or ConvertOptions()
        self._backoff = backoff or Backoff()
        self._timing = timing or WatchTiming()
        self._write_status = write_status
        self._rand = rand
        # Called on the watcher thread after each watch event is applied (plural, type,
        # object): a hook for metrics, and for tests to wait on resources the store lacks.
        self._on_event = on_event
        self._stopping = threading.Event()
        self.synced = threading.Event()
        self._lock = threading.Lock()
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._watchers = tuple(_Watcher(self, r) for r in resources)
        kinds = [w.resource.model_kind for w in self._watchers if w.resource.model_kind is not None]
        if len(kinds) != len(set(kinds)):
            raise ValueError("each model kind must come from exactly one resource")
        self._threads: list[threading.Thread] = []
        self._custom = client.CustomObjectsApi(api_client)
        # (namespace/name) -> (uid, condition) last written, so a watch event that still shows
        # the old status (ours is on its way) does not make us write again.
        self._status_written: dict[str, tuple[str, ZtunnelCondition | None]] = {}

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        if self._threads:
            raise RuntimeError("KubernetesSource already started")
        if self._stopping.is_set():
            raise RuntimeError("KubernetesSource cannot be restarted")
        for w in self._watchers:
            t = threading.Thread(target=w.run, name=f"k8s-watch:{w.resource.plural}", daemon=True)
            self._threads.append(t)
            t.start()
        log.info("kubernetes source started", resources=[w.resource.plural for w in self._watchers])

    def stop(self, timeout: float = 5.0) -> None:
        """End every watch and join the threads (each gets what is left of ``timeout``)."""
        self._stopping.set()
        for w in self._watchers:
            w.interrupt()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                log.warning("kubernetes watcher did not stop in time", thread=t.name)
        self._wake_async_waiters()
        log.info("kubernetes source stopped")

    async def astop(self, timeout: float = 5.0) -> None:
        await asyncio.to_thread(self.stop, timeout)

    def __enter__(self) -> KubernetesSource:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    @property
    def store(self) -> Store:
        return self._store

    # --- sync state ---------------------------------------------------------------------------

    def resource_versions(self) -> Mapping[str, str | None]:
        """plural -> the resourceVersion each watcher would resume from (for debugging)."""
        return MappingProxyType({w.resource.plural: w.resource_version for w in self._watchers})

    def endpoint_slices(self) -> Mapping[str, Mapping[str, Any]]:
        """EndpointSlices by ``namespace/name``, as last seen (the model has no place for them yet)."""
        for w in self._watchers:
            if w.resource is ENDPOINT_SLICES:
                with w.raw_lock:
                    return MappingProxyType(dict(w.raw))
        return MappingProxyType({})

    async def wait_synced(self, timeout: float | None = None) -> bool:
        """Wait (without blocking the loop) until every resource was listed once.

        Returns False on timeout, or if the source stopped before that.
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if self.synced.is_set() or self._stopping.is_set():
                return self.synced.is_set()
            self._async_waiters.append((loop, fut))
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            return False
        finally:
            with self._lock, contextlib.suppress(ValueError):
                self._async_waiters.remove((loop, fut))
        return self.synced.is_set()

    def _watcher_listed(self) -> None:
        if self.synced.is_set() or not all(w.listed for w in self._watchers):
            return
        self.synced.set()
        log.info("kubernetes source synced", version=self._store.version)
        self._wake_async_waiters()

    def _wake_async_waiters(self) -> None:
        with self._lock:
            waiters, self._async_waiters = self._async_waiters, []
        for loop, fut in waiters:
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(_resolve, fut)

    # --- status write-back --------------------------------------------------------------------

    def write_policy_status(self, namespace: str, name: str, conditions: list[dict[str, Any]]) -> None:
        """Merge-patch ``status.conditions`` of an AuthorizationPolicy (the status subresource).

        A JSON merge patch replaces lists whole, so ``conditions`` must be the complete list.
        """
        group, _, version = AUTHORIZATION_POLICIES.api_version.partition("/")
        self._custom.patch_namespaced_custom_object_status(
            group,
            version,
            namespace,
            AUTHORIZATION_POLICIES.plural,
            name,
            {"status": {"conditions": conditions}},
            _content_type="application/merge-patch+json",
            _request_timeout=(self._timing.connect_timeout, self._timing.list_timeout),
        )

    def _check_policy_status(self, obj: Mapping[str, Any], policy: AuthorizationPolicy) -> None:
        """Write the ``ZtunnelAccepted`` condition if (and only if) it differs from what the
        object already carries, or from what we last wrote for it: no write loops."""
        if not self._write_status:
            return
        desired = ztunnel_condition(policy)
        conditions = _conditions_of(obj)
        current = next((c for c in conditions if c.get("type") == CONDITION_ZTUNNEL_ACCEPTED), None)
        others = [c for c in conditions if c.get("type") != CONDITION_ZTUNNEL_ACCEPTED]
        ref = policy.key
        uid = str(_meta(obj, "uid") or "")
        if current is None and (desired is None or desired.reason != REASON_UNSUPPORTED):
            # Only policies ztunnel does not enforce as written get a condition; one already
            # carrying ours is kept up to date (flipped back to Accepted once fixed, removed
            # once the policy moves to a waypoint with targetRefs).
            self._status_written.pop(ref, None)
            return
        if current is not None and desired is not None and desired.matches(current):
            self._status_written[ref] = (uid, desired)
            return
        if self._status_written.get(ref) == (uid, desired):
            return  # written already; this event predates it
        if desired is None:
            new_conditions = others
        else:
            if desired.reason == REASON_UNSUPPORTED:
                log.warning(
                    "authorization policy is not enforced as written by ztunnel",
                    policy=ref,
                    status=desired.status,
                    message=desired.message,
                )
            same_status = current is not None and current.get("status") == desired.status
            new_cond: dict[str, Any] = {
                "type": CONDITION_ZTUNNEL_ACCEPTED,
                "status": desired.status,
                "reason": desired.reason,
                "message": desired.message,
                # Kubernetes convention: the time the status last changed, not the message.
                "lastTransitionTime": (current or {}).get("lastTransitionTime") if same_status else _now(),
            }
            generation = _meta(obj, "generation")
            if isinstance(generation, int):
                new_cond["observedGeneration"] = generation
            new_conditions = [*others, new_cond]
        try:
            self.write_policy_status(policy.namespace, policy.name, new_conditions)
        except Exception as e:
            # Not fatal: the next event for this policy (or the next relist) tries again.
            self._status_written.pop(ref, None)
            log.warning(
                "could not write authorization policy status",
                policy=ref,
                status=e.status if isinstance(e, ApiException) else None,
                error=_describe_error(e),
            )
            return
        self._status_written[ref] = (uid, desired)
        log.info(
            "wrote authorization policy status",
            policy=ref,
            condition=CONDITION_ZTUNNEL_ACCEPTED,
            reason=desired.reason if desired is not None else "removed",
        )

    def _forget_policy(self, ref: str) -> None:
        self._status_written.pop(ref, None)


def _conforms(source: KubernetesSource) -> WorkloadSource:
    """Never called: where mypy checks that KubernetesSource satisfies the seam."""
    return source


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class _Watcher:
    """List+watch of one resource, on its own thread."""

    def __init__(self, source: KubernetesSource, resource: Resource) -> None:
        self.source = source
        self.resource = resource
        self.resource_version: str | None = None
        self.listed = False
        # namespace/name -> the model object it last converted to (the last valid version)
        self.known: dict[str, MeshObject] = {}
        # namespace/name -> raw object, for resources the model does not hold
        self.raw: dict[str, Mapping[str, Any]] = {}
        self.raw_lock = threading.Lock()
        self._call = resource.list_call(source._api_client)
        self._resp_lock = threading.Lock()
        self._resp: Any = None
        self._log = log.bind(resource=resource.plural)

    # --- control ---------------------------------------------------------------------------

    def interrupt(self) -> None:
        """Unblock a read in progress (called from the stopping thread)."""
        with self._resp_lock:
            resp = self._resp
        if resp is None:
            return
        conn = getattr(resp, "connection", None)
        sock = getattr(conn, "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def run(self) -> None:
        stopping = self.source._stopping
        attempt = 0
        need_list = True
        while not stopping.is_set():
            try:
                if need_list:
                    if not self._list():
                        if not self.listed:
                            self.listed = True
                            self.source._watcher_listed()
                        stopping.wait(self.source._backoff.maximum)
                        continue
                    need_list = False
                    if not self.listed:
                        self.listed = True
                        self.source._watcher_listed()
                started = time.monotonic()
                if self._watch() or time.monotonic() - started >= _MIN_QUIET_WATCH:
                    attempt = 0
                elif not stopping.is_set():
                    # Ended at once, empty and cleanly (a proxy cutting long requests?): do not
                    # spin on the API server.
                    delay = self.source._backoff.delay(attempt, self.source._rand)
                    attempt += 1
                    self._log.debug("watch ended at once without events", retry_in=round(delay, 3))
                    stopping.wait(delay)
            except _Gone as e:
                if stopping.is_set():
                    break
                self._log.info(
                    "resourceVersion expired, relisting",
                    resource_version=self.resource_version,
                    reason=str(e),
                )
                need_list = True
            except Exception as e:
                if stopping.is_set():
                    break
                delay = self.source._backoff.delay(attempt, self.source._rand)
                attempt += 1
                self._log.warning(
                    "kubernetes watch failed, retrying",
                    phase="list" if need_list else "watch",
                    resource_version=self.resource_version,
                    error=_describe_error(e),
                    attempt=attempt,
                    retry_in=round(delay, 3),
                )
                stopping.wait(delay)
        self._log.debug("watcher stopped")

    # --- list -----------------------------------------------------------------------------

    def _list(self) -> bool:
        """List the collection into the store; False when an optional resource is not served."""
        timing = self.source._timing
        items: list[Any] = []
        cont: str | None = None
        while True:
            kwargs: dict[str, Any] = {"limit": timing.page_size}
            if cont:
                kwargs["_continue"] = cont
            try:
                resp = self._call(
                    _preload_content=False,
                    _request_timeout=(timing.connect_timeout, timing.list_timeout),
                    **kwargs,
                )
            except ApiException as e:
                if e.status == HTTP_GONE and cont:
                    # The continue token expired mid-list: start the list over.
                    items, cont = [], None
                    continue
                if e.status == 404 and self.resource.optional and not cont:
                    if self.listed is False or self.known:
                        self._log.warning("resource not served (CRD not installed?), none in force")
                    self._replace([])
                    return False
                raise
            try:
                body = json.loads(resp.data)
            finally:
                resp.release_conn()
            if not isinstance(body, Mapping) or not isinstance(body.get("metadata", {}), Mapping):
                raise _WatchFailed("list response is not a Kubernetes list")
            items.extend(body.get("items") or [])
            md = body.get("metadata") or {}
            cont = md.get("continue") or None
            if cont is None:
                rv = md.get("resourceVersion")
                break
            if self.source._stopping.is_set():
                return True
        self._replace(items)
        self.resource_version = str(rv) if rv else None
        self._log.info("listed", objects=len(items), resource_version=self.resource_version)
        return True

    def _replace(self, items: list[Any]) -> None:
        """Make ``items`` the whole of this resource's kind in the store."""
        known: dict[str, MeshObject] = {}
        raw: dict[str, Mapping[str, Any]] = {}
        by_key: dict[str, MeshObject] = {}
        policies: list[tuple[Mapping[str, Any], AuthorizationPolicy]] = []
        for item in items:
            if not isinstance(item, dict):
                self._log.error("kubernetes object rejected", reason="not a JSON object")
                continue
            obj = self._complete(item)
            ref = _ref(obj)
            if self.resource.model_kind is None:
                raw[ref] = obj
                continue
            converted = self._convert(obj, "LIST")
            if converted is None:
                converted = self.known.get(ref)  # invalid now: the last valid version stays
                if converted is None:
                    continue
            if converted.key in by_key:
                self._log.error(
                    "kubernetes object rejected", name=ref, reason=f"duplicate key {converted.key}"
                )
                continue
            known[ref] = converted
            by_key[converted.key] = converted
            if isinstance(converted, AuthorizationPolicy):
                policies.append((obj, converted))
        with self.raw_lock:
            self.raw = raw
        self.known = known
        kind = self.resource.model_kind
        if kind is None:
            return
        current = self.source._store.snapshot().objects(kind)
        deletes = [(kind, k) for k in current if k not in by_key]
        delta = self.source._store.apply(upserts=by_key.values(), deletes=deletes)
        if delta is not None:
            self._log.info(
                "replaced from list",
                version=delta.version,
                upserted=len(delta.upserted_keys(kind)),
                removed=len(delta.removed_keys(kind)),
            )
        for raw_policy, policy in policies:
            self.source._check_policy_status(raw_policy, policy)

    # --- watch ----------------------------------------------------------------------------

    def _watch(self) -> int:
        """One watch request, until the server ends it; returns how many events it brought."""
        timing = self.source._timing
        kwargs: dict[str, Any] = {
            "watch": True,
            "allow_watch_bookmarks": True,
            "timeout_seconds": timing.watch_timeout,
            "_preload_content": False,
            "_request_timeout": (timing.connect_timeout, timing.watch_timeout + timing.read_grace),
        }
        if self.resource_version:
            kwargs["resource_version"] = self.resource_version
        try:
            resp = self._call(**kwargs)
        except ApiException as e:
            if e.status == HTTP_GONE:
                raise _Gone(e.reason or "Gone") from None
            raise
        with self._resp_lock:
            self._resp = resp
        received = 0
        try:
            if self.source._stopping.is_set():
                return received
            for line in iter_resp_lines(resp):
                if self.source._stopping.is_set():
                    break
                if not line.strip():
                    continue
                try:
                    event = json.loads(line)
                except ValueError:
                    raise _WatchFailed(f"undecodable watch event {line[:200]!r}") from None
                self._handle(event)
                received += 1
        finally:
            with self._resp_lock:
                self._resp = None
            resp.close()
            resp.release_conn()
        return received

    def _handle(self, event: Any) -> None:
        if not isinstance(event, Mapping):
            raise _WatchFailed("watch event is not a JSON object")
        etype = event.get("type")
        obj = event.get("object")
        if not isinstance(obj, dict):
            raise _WatchFailed(f"watch event {etype} without an object")
        if etype == "ERROR":
            code = obj.get("code")
            message = f"{obj.get('reason', '')}: {obj.get('message', '')}"
            if code == HTTP_GONE:
                raise _Gone(message)
            raise _WatchFailed(f"watch ERROR event {code} {message}")
        rv = _meta(obj, "resourceVersion")
        if etype in ("ADDED", "MODIFIED"):
            self._upsert(self._complete(obj), str(etype))
        elif etype == "DELETED":
            self._delete(self._complete(obj))
        elif etype != "BOOKMARK":
            self._log.warning("unknown watch event type ignored", type=etype)
        if rv:
            self.resource_version = str(rv)
        if self.source._on_event is not None:
            try:
                self.source._on_event(self.resource.plural, str(etype), obj)
            except Exception:
                self._log.exception("on_event callback failed", type=etype)

    def _upsert(self, obj: dict[str, Any], etype: str) -> None:
        ref = _ref(obj)
        if self.resource.model_kind is None:
            with self.raw_lock:
                self.raw[ref] = obj
            return
        converted = self._convert(obj, etype)
        if converted is None:
            return
        old = self.known.get(ref)
        deletes = [(old.KIND, old.key)] if old is not None and old.key != converted.key else []
        self.source._store.apply(upserts=[converted], deletes=deletes)
        self.known[ref] = converted
        if isinstance(converted, AuthorizationPolicy):
            self.source._check_policy_status(obj, converted)

    def _delete(self, obj: dict[str, Any]) -> None:
        ref = _ref(obj)
        if self.resource.model_kind is None:
            with self.raw_lock:
                self.raw.pop(ref, None)
            return
        old = self.known.pop(ref, None)
        if old is not None:
            self.source._store.delete(old.KIND, old.key)
        if self.resource is AUTHORIZATION_POLICIES:
            self.source._forget_policy(ref)

    # --- conversion -----------------------------------------------------------------------

    def _complete(self, obj: dict[str, Any]) -> dict[str, Any]:
        """The API server leaves apiVersion/kind out of the items of built-in lists."""
        if "apiVersion" not in obj or "kind" not in obj:
            obj = {"apiVersion": self.resource.api_version, "kind": self.resource.kind, **obj}
        return obj

    def _convert(self, obj: Mapping[str, Any], etype: str) -> MeshObject | None:
        try:
            converted = convert(obj, self.source._options)
        except ConfigError as e:
            md = obj.get("metadata")
            self._log.error(
                "kubernetes object rejected",
                kind=e.kind or self.resource.kind,
                namespace=md.get("namespace") if isinstance(md, Mapping) else None,
                name=md.get("name") if isinstance(md, Mapping) else None,
                field=e.field,
                reason=e.reason,
                watch_event=etype,
                kept_last_valid=_ref(obj) in self.known,
            )
            return None
        if converted is None:
            self._log.warning(
                "object of an unexpected type ignored",
                api_version=obj.get("apiVersion"),
                kind=obj.get("kind"),
            )
        return converted


def _describe_error(e: BaseException) -> str:
    if isinstance(e, ApiException):
        return f"HTTP {e.status} {e.reason}"
    return f"{type(e).__name__}: {e}"
