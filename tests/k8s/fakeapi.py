"""An in-process Kubernetes API server speaking the real list/watch HTTP+JSON protocol.

Just enough of kube-apiserver for a list+watch client, so tests exercise the real
``kubernetes`` client code (URL building, query parameters, urllib3, chunked streaming):

* ``GET <collection>`` lists: ``{"kind": "PodList", "metadata": {"resourceVersion"}, "items"}``,
  built-in items without ``apiVersion``/``kind`` as the real server sends them, paged with
  ``limit``/``continue``.
* ``GET <collection>?watch=true&resourceVersion=N`` streams newline-delimited watch events
  (``Transfer-Encoding: chunked``), held open until there is more to send, ``timeoutSeconds``
  passes, the test drops it or the server closes. Bookmarks go only to watches that asked
  (``allowWatchBookmarks``). A resourceVersion older than the resource's compaction point gets
  410 Gone: an ERROR event with a ``Status`` (the real server's way) or, with
  ``gone_as_http``, an HTTP 410.
* ``PATCH .../{plural}/{name}/status`` merge-patches the status, bumps the resourceVersion,
  emits MODIFIED, and is recorded in :attr:`FakeApiServer.patches`; a ``metadata.resourceVersion``
  in the patch is a precondition (409 Conflict when stale), as on the real server.
* Writes of namespaced objects, as strict as kube-apiserver where a controller can tell:
  ``GET .../namespaces/{ns}/{plural}/{name}`` (404 NotFound with a ``Status``), namespaced lists
  with a ``fieldSelector`` on ``metadata.name`` and an equality ``labelSelector``;
  ``POST`` creates (409 AlreadyExists; 404 when the namespace does not exist, 403 Forbidden
  with the cause ``NamespaceTerminating`` when it is being deleted; a ``resourceVersion`` in the
  body is refused; a Service gets a ``clusterIP`` allocated);
  ``PUT`` replaces (404 when missing; 409 Conflict on a stale ``resourceVersion``, none means
  unconditional; uid, creationTimestamp and the status are the server's; a Deployment's
  ``spec.selector`` and a Service's ``clusterIP`` are immutable, an empty ``clusterIP`` keeps the
  allocated one, and so are the data of a ConfigMap marked ``immutable``); ``PUT .../status``
  replaces only the status; ``DELETE`` (404 when missing; ``preconditions``
  uid/resourceVersion, 409 when they do not hold). Built-in kinds are validated against the
  Kubernetes OpenAPI schema (``kubernetes-validate``, unknown fields refused as with
  ``fieldValidation=Strict``): 422 Invalid; ConfigMaps also as the server validates them
  beyond the schema (config keys, no key in both ``data`` and ``binaryData``, 1 MiB in all).
  ``ownerReferences`` are kept as sent (and checked: at most one controller). Every write is recorded in
  :attr:`FakeApiServer.writes`; :attr:`FakeApiServer.fail_writes` injects refusals.
* Cluster-scoped objects (namespaces, nodes): ``GET /api/v1/{plural}/{name}`` and ``PATCH`` of it
  (merge or strategic-merge patch, as ``kubectl label`` sends; only ``metadata.labels`` and
  ``metadata.annotations`` may change, a ``metadata.resourceVersion`` is a precondition).
  Label keys and values are checked as the real server checks them (422 Invalid), on every write.

One global resourceVersion counter, as etcd has. Thread-safe; everything waits on one
condition variable, so tests wait for things to happen rather than sleep.
"""

from __future__ import annotations

import copy
import json
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

import kubernetes.client


@dataclass(frozen=True)
class FakeResource:
    api_version: str
    kind: str
    plural: str

    @property
    def group(self) -> str:
        return self.api_version.rpartition("/")[0]

    @property
    def builtin(self) -> bool:
        return self.group in _BUILTIN_GROUPS

    @property
    def namespaced(self) -> bool:
        return self.plural not in ("namespaces", "nodes")

    @property
    def has_status(self) -> bool:
        """Has a status subresource: writes of the object itself leave the status alone."""
        return self.plural not in ("serviceaccounts", "namespaces")

    @property
    def collection_path(self) -> str:
        if "/" in self.api_version:
            return f"/apis/{self.api_version}/{self.plural}"
        return f"/api/{self.api_version}/{self.plural}"


_BUILTIN_GROUPS = frozenset({"", "apps", "policy", "discovery.k8s.io"})

FAKE_RESOURCES = (
    FakeResource("v1", "Namespace", "namespaces"),
    FakeResource("v1", "Node", "nodes"),
    FakeResource("v1", "Pod", "pods"),
    FakeResource("v1", "Service", "services"),
    FakeResource("v1", "ConfigMap", "configmaps"),
    FakeResource("discovery.k8s.io/v1", "EndpointSlice", "endpointslices"),
    FakeResource("security.istio.io/v1", "AuthorizationPolicy", "authorizationpolicies"),
    FakeResource("security.istio.io/v1", "PeerAuthentication", "peerauthentications"),
    FakeResource("security.istio.io/v1", "RequestAuthentication", "requestauthentications"),
    FakeResource("gateway.networking.k8s.io/v1", "Gateway", "gateways"),
    # Ours (the base chart's CRD); sources/kubernetes.py watches it.
    FakeResource("extensions.ambient-mesh.io/v1alpha1", "WafPolicy", "wafpolicies"),
    # What the waypoint controller writes.
    FakeResource("v1", "ServiceAccount", "serviceaccounts"),
    FakeResource("apps/v1", "Deployment", "deployments"),
    FakeResource("policy/v1", "PodDisruptionBudget", "poddisruptionbudgets"),
)
_BY_TYPE = {(r.api_version, r.kind): r for r in FAKE_RESOURCES}
_BY_PATH = {r.collection_path: r for r in FAKE_RESOURCES}
_BY_PLURAL = {r.plural: r for r in FAKE_RESOURCES}
_BY_GROUP_PLURAL = {(r.group, r.plural): r for r in FAKE_RESOURCES}
# The Kubernetes version whose OpenAPI schemas writes of built-in kinds are validated against.
SCHEMA_VERSION = "1.35.0"
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


@dataclass
class WatchRequest:
    plural: str
    resource_version: str | None
    allow_bookmarks: bool
    timeout_seconds: int | None


@dataclass
class Patch:
    path: str
    content_type: str
    body: Any


@dataclass
class Write:
    """One write request as the server saw it (refused ones too)."""

    method: str  # POST, PUT, PATCH, DELETE
    plural: str
    ref: str  # namespace/name
    subresource: str = ""  # "status" for status writes
    code: int = 0  # the HTTP status answered


@dataclass
class _Event:
    rv: int
    type: str
    obj: dict[str, Any]
    raw: bytes | None = None  # sent as is instead of the JSON event (a broken line)


@dataclass
class _Collection:
    objects: dict[str, dict[str, Any]] = field(default_factory=dict)
    events: list[_Event] = field(default_factory=list)
    compacted: int = 0  # watches from a resourceVersion below this get 410
    gone_generation: int = 0  # bumped to send 410 to open watches


def _ref(obj: Mapping[str, Any]) -> str:
    md = obj["metadata"]
    ns = md.get("namespace")
    return f"{ns}/{md['name']}" if ns else md["name"]


def _merge(target: dict[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """RFC 7386 JSON merge patch."""
    out = dict(target)
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # nine watchers connect at once; the default 5 drops SYNs
    daemon_threads = False
    block_on_close = True  # server_close() joins every handler thread: nothing outlives a test


class FakeApiServer:
    """Start with ``with FakeApiServer() as fake:``; ``fake.api_client()`` points a real
    ``kubernetes.client.ApiClient`` at it (close it, or let the server close the ones it made)."""

    def __init__(self, *, gone_as_http: bool = False) -> None:
        self.gone_as_http = gone_as_http
        self._cond = threading.Condition()
        self._rv = 100
        self._collections = {r.plural: _Collection() for r in FAKE_RESOURCES}
        self._drop_generation = 0
        self._closing = False
        self._sockets: set[socket.socket] = set()
        self._clients: list[kubernetes.client.ApiClient] = []
        self.watch_requests: list[WatchRequest] = []
        self.list_requests: list[tuple[str, dict[str, list[str]]]] = []
        self.patches: list[Patch] = []
        self.delivered: dict[str, int] = {r.plural: 0 for r in FAKE_RESOURCES}  # highest rv streamed
        self.fail_next: dict[str, int] = {}  # plural -> number of GETs to answer with 500
        self.fail_patches = 0  # number of PATCHes to answer with 500 (still recorded)
        # plural -> HTTP codes to answer its next writes (POST/PUT/PATCH/DELETE) with, in order
        self.fail_writes: dict[str, list[int]] = {}
        self.writes: list[Write] = []
        self.validate_schemas = True  # built-in kinds against the Kubernetes OpenAPI schema
        self._next_ip = 1
        # token -> the TokenReview ``status.user`` it authenticates as (absent: not authenticated)
        self.token_users: dict[str, dict[str, Any]] = {}
        # token -> the audiences it was issued for (a projected token's ``audience``): a review
        # for none of them is refused, as kube-apiserver refuses it (absent: any audience)
        self.token_audiences: dict[str, list[str]] = {}
        handler = type("_Handler", (_Handler,), {"fake": self})
        self._server = _Server(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="fake-apiserver", daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def api_client(self) -> kubernetes.client.ApiClient:
        config = kubernetes.client.Configuration(host=self.url)
        api = kubernetes.client.ApiClient(config)
        self._clients.append(api)
        return api

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        for api in self._clients:
            api.close()
        self._server.shutdown()
        with self._cond:
            socks = list(self._sockets)
        for s in socks:  # idle keep-alive connections: wake their handler threads
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> FakeApiServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- state changes driven by tests ---------------------------------------------------

    @property
    def resource_version(self) -> int:
        with self._cond:
            return self._rv

    def _resource(self, obj: Mapping[str, Any]) -> FakeResource:
        return _BY_TYPE[obj["apiVersion"], obj["kind"]]

    def _store(self, obj: Mapping[str, Any], etype: str, *, silent: bool = False) -> dict[str, Any]:
        res = self._resource(obj)
        coll = self._collections[res.plural]
        with self._cond:
            self._rv += 1
            new = copy.deepcopy(dict(obj))
            md = new.setdefault("metadata", {})
            ref = _ref(new)
            old = coll.objects.get(ref)
            if etype == "ADDED" and old is not None:
                raise KeyError(f"{res.kind} {ref} already exists")
            if etype == "MODIFIED" and old is None:
                raise KeyError(f"{res.kind} {ref} does not exist")
            md["resourceVersion"] = str(self._rv)
            md.setdefault("uid", (old or {}).get("metadata", {}).get("uid") or f"uid-{res.plural}-{ref}")
            md.setdefault("creationTimestamp", "2024-05-01T12:00:00Z")
            generation = (old or {}).get("metadata", {}).get("generation", 0)
            if old is None or old.get("spec") != new.get("spec"):
                generation += 1
            md["generation"] = generation
            if etype == "MODIFIED" and "status" not in obj and old is not None and "status" in old:
                new["status"] = old["status"]  # like the real server: spec updates keep status
            coll.objects[ref] = new
            if not silent:
                coll.events.append(_Event(self._rv, etype, new))
            self._cond.notify_all()
            return copy.deepcopy(new)

    def add(self, obj: Mapping[str, Any], *, silent: bool = False) -> dict[str, Any]:
        """Create ``obj``. ``silent``: no watch event, as if it happened in history that was
        compacted away (only a relist finds out)."""
        return self._store(obj, "ADDED", silent=silent)

    def modify(self, obj: Mapping[str, Any], *, silent: bool = False) -> dict[str, Any]:
        return self._store(obj, "MODIFIED", silent=silent)

    def put(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Add or modify."""
        res = self._resource(obj)
        with self._cond:
            exists = _ref(obj) in self._collections[res.plural].objects
        return self._store(obj, "MODIFIED" if exists else "ADDED")

    def delete(self, obj: Mapping[str, Any], *, silent: bool = False) -> None:
        res = self._resource(obj)
        coll = self._collections[res.plural]
        with self._cond:
            old = coll.objects.pop(_ref(obj))
            self._rv += 1
            gone = copy.deepcopy(old)
            gone["metadata"]["resourceVersion"] = str(self._rv)
            if not silent:
                coll.events.append(_Event(self._rv, "DELETED", gone))
            self._cond.notify_all()

    def get(self, plural: str, ref: str) -> dict[str, Any] | None:
        with self._cond:
            obj = self._collections[plural].objects.get(ref)
            return copy.deepcopy(obj) if obj is not None else None

    def set_status(self, plural: str, ref: str, status: Mapping[str, Any]) -> dict[str, Any]:
        """Replace the status of an object, as its controller would (a Deployment's ready
        replicas); emits MODIFIED."""
        with self._cond:
            obj = copy.deepcopy(self._collections[plural].objects[ref])
        obj["status"] = copy.deepcopy(dict(status))
        return self.modify(obj)

    def objects(self, plural: str) -> dict[str, dict[str, Any]]:
        """namespace/name -> object, a copy."""
        with self._cond:
            return copy.deepcopy(self._collections[plural].objects)

    def writes_of(self, plural: str | None = None) -> list[Write]:
        with self._cond:
            return [w for w in self.writes if plural is None or w.plural == plural]

    def bookmark(self, plural: str) -> int:
        """Send a BOOKMARK (to watches that allow them) at a new resourceVersion."""
        res = _BY_PLURAL[plural]
        with self._cond:
            self._rv += 1
            obj = {
                "apiVersion": res.api_version,
                "kind": res.kind,
                "metadata": {"resourceVersion": str(self._rv)},
            }
            self._collections[plural].events.append(_Event(self._rv, "BOOKMARK", obj))
            self._cond.notify_all()
            return self._rv

    def send_raw(self, plural: str, line: bytes) -> None:
        """Put a raw line (e.g. not JSON) into the watch streams of ``plural``."""
        with self._cond:
            self._rv += 1
            self._collections[plural].events.append(_Event(self._rv, "RAW", {}, raw=line))
            self._cond.notify_all()

    def drop_watches(self) -> None:
        """Abort every open watch connection mid-stream, as a network failure would."""
        with self._cond:
            self._drop_generation += 1
            self._cond.notify_all()

    def expire(self, plural: str, *, notify: bool = True) -> None:
        """Compact history: every resourceVersion so far is too old for ``plural``.

        With ``notify`` open watches get an ERROR 410 event at once; otherwise only the next
        watch (say after :meth:`drop_watches`) is refused.
        """
        with self._cond:
            coll = self._collections[plural]
            self._rv += 1
            coll.compacted = self._rv
            coll.events.clear()
            if notify:
                coll.gone_generation += 1
            self._cond.notify_all()

    # --- waiting ----------------------------------------------------------------------------

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Wait until ``predicate()`` (called under the server lock) holds."""
        with self._cond:
            if not self._cond.wait_for(predicate, timeout):
                raise TimeoutError("fake API server: condition not reached")

    def watches(self, plural: str) -> list[WatchRequest]:
        with self._cond:
            return [w for w in self.watch_requests if w.plural == plural]

    def wait_for_watches(self, plural: str, count: int, timeout: float = 5.0) -> list[WatchRequest]:
        self.wait_for(lambda: sum(w.plural == plural for w in self.watch_requests) >= count, timeout)
        return self.watches(plural)

    def wait_for_patches(self, count: int, timeout: float = 5.0) -> list[Patch]:
        self.wait_for(lambda: len(self.patches) >= count, timeout)
        with self._cond:
            return list(self.patches)

    # --- request handling (server threads) ------------------------------------------------

    def _list(self, res: FakeResource, query: Mapping[str, list[str]]) -> dict[str, Any]:
        with self._cond:
            self.list_requests.append((res.plural, dict(query)))
            self._cond.notify_all()
            coll = self._collections[res.plural]
            refs = sorted(coll.objects)
            start = int(query["continue"][0]) if "continue" in query else 0
            limit = int(query["limit"][0]) if "limit" in query else 0
            end = start + limit if limit else len(refs)
            chosen = _field_filter(query)
            items = []
            for ref in refs[start:end]:
                if not chosen(coll.objects[ref]):
                    continue
                item = copy.deepcopy(coll.objects[ref])
                if res.builtin:
                    item.pop("apiVersion", None)
                    item.pop("kind", None)
                items.append(item)
            md: dict[str, Any] = {"resourceVersion": str(self._rv)}
            if end < len(refs):
                md["continue"] = str(end)
            return {"kind": f"{res.kind}List", "apiVersion": res.api_version, "metadata": md, "items": items}

    def _watch_events(
        self,
        res: FakeResource,
        since: int,
        allow_bookmarks: bool,
        timeout: float | None,
        chosen: Callable[[Mapping[str, Any]], bool] = lambda obj: True,
    ) -> Iterator[bytes | None]:
        """Lines to send; None means "drop the connection now"; ends on timeout/close."""
        deadline = time.monotonic() + timeout if timeout else None
        coll = self._collections[res.plural]
        with self._cond:
            drop_gen = self._drop_generation
            gone_gen = coll.gone_generation
        sent = since
        while True:
            action: bytes | str | None = ""
            with self._cond:
                while True:
                    if self._closing:
                        return
                    if self._drop_generation != drop_gen:
                        action = None
                        break
                    if coll.gone_generation != gone_gen:
                        action = _status_event(410, "Expired", "too old resource version")
                        break
                    pending = [e for e in coll.events if e.rv > sent]
                    if pending:
                        break
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return
                    self._cond.wait(remaining)
            if action is None or isinstance(action, bytes):
                yield action
                return
            for e in pending:
                sent = e.rv
                if e.raw is not None:
                    with self._cond:  # a transport glitch: happens once, not on replay
                        if e in coll.events:
                            coll.events.remove(e)
                    yield e.raw
                elif allow_bookmarks if e.type == "BOOKMARK" else chosen(e.obj):
                    yield json.dumps({"type": e.type, "object": e.obj}).encode()
                with self._cond:
                    self.delivered[res.plural] = max(self.delivered[res.plural], e.rv)
                    self._cond.notify_all()

    # --- namespaced object requests (server threads) --------------------------------------

    def _record(self, method: str, target: _Target, code: int) -> None:
        self.writes.append(Write(method, target.res.plural, target.ref, target.subresource, code))
        self._cond.notify_all()

    def _injected(self, method: str, target: _Target) -> tuple[int, dict[str, Any]] | None:
        """A refusal a test asked for (under the lock); recorded like any write."""
        codes = self.fail_writes.get(target.res.plural)
        if not codes:
            return None
        code = codes.pop(0)
        self._record(method, target, code)
        return code, _status(code, _REASONS.get(code, "InternalError"), "injected failure")

    def _get_object(self, target: _Target) -> tuple[int, dict[str, Any]]:
        with self._cond:
            obj = self._collections[target.res.plural].objects.get(target.ref)
            if obj is None:
                return _not_found(target)
            return 200, copy.deepcopy(obj)

    def _list_namespaced(self, target: _Target, query: Mapping[str, list[str]]) -> tuple[int, dict[str, Any]]:
        fields = _selector(query.get("fieldSelector", [""])[0])
        labels = _selector(query.get("labelSelector", [""])[0])
        if fields is None or labels is None or set(fields) - {"metadata.name", "metadata.namespace"}:
            return 400, _status(
                400, "BadRequest", "the fake supports equality selectors on metadata.name only"
            )
        out = self._list(target.res, {})
        items = []
        for item in out["items"]:
            md = item["metadata"]
            if md.get("namespace") != target.namespace:
                continue
            if fields.get("metadata.name", md["name"]) != md["name"]:
                continue
            if any((md.get("labels") or {}).get(k) != v for k, v in labels.items()):
                continue
            items.append(item)
        out["items"] = items
        out["metadata"].pop("continue", None)
        return 200, out

    def _invalid(self, target: _Target, obj: Mapping[str, Any]) -> str | None:
        """Why kube-apiserver would refuse ``obj`` (422), or None."""
        md = obj.get("metadata")
        if not isinstance(md, Mapping):
            return "metadata: Required value"
        name = md.get("name")
        if not isinstance(name, str) or not _DNS1123_SUBDOMAIN.match(name) or len(name) > 253:
            return f"metadata.name: Invalid value: {name!r}: a lowercase RFC 1123 subdomain is required"
        bad_label = _label_problem(md.get("labels"))
        if bad_label is not None:
            return bad_label
        owners = md.get("ownerReferences") or []
        if sum(bool(o.get("controller")) for o in owners if isinstance(o, Mapping)) > 1:
            return (
                "metadata.ownerReferences: Invalid value: only one reference can have Controller set to true"
            )
        if target.res.plural == "configmaps":
            why = _configmap_problem(obj)
            if why is not None:
                return why
        if self.validate_schemas and target.res.builtin:
            import kubernetes_validate  # type: ignore[import-untyped]

            try:
                kubernetes_validate.validate(dict(obj), SCHEMA_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                return f"{'.'.join(str(p) for p in e.path) or '<root>'}: {e.message}"
        return None

    def _check_body(self, target: _Target, body: Any) -> tuple[int, dict[str, Any]] | None:
        """400 for a body that does not name what the URL names, as the real server."""
        res = target.res
        if not isinstance(body, Mapping):
            return 400, _status(400, "BadRequest", "body is not a JSON object")
        if body.get("apiVersion") != res.api_version or body.get("kind") != res.kind:
            return 400, _status(
                400,
                "BadRequest",
                f"the body is {body.get('apiVersion')}/{body.get('kind')}, not {res.api_version}/{res.kind}",
            )
        md = body.get("metadata")
        ns = md.get("namespace") if isinstance(md, Mapping) else None
        if ns not in (None, target.namespace):
            return 400, _status(
                400,
                "BadRequest",
                "the namespace of the provided object does not match the namespace sent on the request",
            )
        return None

    def _create(self, target: _Target, body: Any) -> tuple[int, dict[str, Any]]:
        with self._cond:
            injected = self._injected("POST", target)
            if injected is not None:
                return injected
            bad = self._check_body(target, body)
            ns = self._collections["namespaces"].objects.get(target.namespace)
            if bad is None and ns is None:
                bad = 404, _status(404, "NotFound", f'namespaces "{target.namespace}" not found')
            elif bad is None and ns is not None and _terminating(ns):
                target = _Target(
                    target.res, target.namespace, str((body.get("metadata") or {}).get("name", ""))
                )
                bad = 403, _forbidden_terminating(target)
            if bad is not None:
                self._record("POST", target, bad[0])
                return bad
            obj = copy.deepcopy(dict(body))
            md = obj["metadata"] = dict(obj.get("metadata") or {})
            md["namespace"] = target.namespace
            target = _Target(target.res, target.namespace, str(md.get("name", "")), "")
            code, out = self._do_create(target, obj)
            self._record("POST", target, code)
            return code, out

    def _do_create(self, target: _Target, obj: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        coll = self._collections[target.res.plural]
        md = obj["metadata"]
        if md.get("resourceVersion"):
            return 500, _status(
                500, "InternalError", "resourceVersion should not be set on objects to be created"
            )
        why = self._invalid(target, obj)
        if why is not None:
            return 422, _status(422, "Invalid", f'{target.res.kind} "{md.get("name")}" is invalid: {why}')
        if target.ref in coll.objects:
            return 409, _status(
                409, "AlreadyExists", f'{target.res.plural} "{target.name}" already exists', target
            )
        if target.res.plural == "services":
            spec = obj.setdefault("spec", {})
            if not spec.get("clusterIP"):
                spec["clusterIP"] = f"10.96.{self._next_ip // 250}.{self._next_ip % 250 + 1}"
                spec["clusterIPs"] = [spec["clusterIP"]]
                self._next_ip += 1
        if target.res.has_status:
            obj.pop("status", None)  # the server's to write, through the status subresource
        self._rv += 1
        md["uid"] = str(uuid.uuid4())
        md["resourceVersion"] = str(self._rv)
        md["creationTimestamp"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        md["generation"] = 1
        coll.objects[target.ref] = obj
        coll.events.append(_Event(self._rv, "ADDED", obj))
        return 201, copy.deepcopy(obj)

    def _replace(self, target: _Target, body: Any) -> tuple[int, dict[str, Any]]:
        method = "PUT"
        with self._cond:
            injected = self._injected(method, target)
            if injected is not None:
                return injected
            code, out = self._do_replace(target, body)
            self._record(method, target, code)
            return code, out

    def _do_replace(self, target: _Target, body: Any) -> tuple[int, dict[str, Any]]:
        bad = self._check_body(target, body)
        if bad is not None:
            return bad
        coll = self._collections[target.res.plural]
        old = coll.objects.get(target.ref)
        if old is None:
            return _not_found(target)
        new = copy.deepcopy(dict(body))
        md = new["metadata"] = dict(new.get("metadata") or {})
        if md.get("name") != target.name:
            return 400, _status(
                400, "BadRequest", "the name of the object does not match the name on the URL"
            )
        old_md = old["metadata"]
        rv = md.get("resourceVersion")
        if rv and rv != old_md["resourceVersion"]:
            return 409, _conflict(target)
        if md.get("uid") and md["uid"] != old_md["uid"]:
            return 409, _status(
                409,
                "Conflict",
                f"Precondition failed: UID in precondition: {md['uid']}, UID in object meta: {old_md['uid']}",
            )
        md["namespace"] = target.namespace
        if target.subresource == "status":
            replaced = copy.deepcopy(old)
            replaced["status"] = new.get("status")
            new = replaced
            md = new["metadata"]
        else:
            immutable = self._immutable(target, old, new)
            if immutable is not None:
                return 422, _status(
                    422, "Invalid", f'{target.res.kind} "{target.name}" is invalid: {immutable}'
                )
            why = self._invalid(target, new)
            if why is not None:
                return 422, _status(422, "Invalid", f'{target.res.kind} "{target.name}" is invalid: {why}')
            if target.res.has_status:
                new.pop("status", None)
                if "status" in old:
                    new["status"] = copy.deepcopy(old["status"])
            md["generation"] = old_md.get("generation", 1) + (old.get("spec") != new.get("spec"))
        md["uid"] = old_md["uid"]
        md["creationTimestamp"] = old_md.get("creationTimestamp")
        self._rv += 1
        md["resourceVersion"] = str(self._rv)
        coll.objects[target.ref] = new
        coll.events.append(_Event(self._rv, "MODIFIED", new))
        return 200, copy.deepcopy(new)

    @staticmethod
    def _immutable(target: _Target, old: Mapping[str, Any], new: dict[str, Any]) -> str | None:
        """Refuse changes of immutable fields; fill the ones the server allocated when left out."""
        old_spec = old.get("spec") or {}
        spec = new.get("spec")
        if (
            target.res.plural == "deployments"
            and isinstance(spec, Mapping)
            and spec.get("selector") != old_spec.get("selector")
        ):
            return "spec.selector: Invalid value: field is immutable"
        if target.res.plural == "configmaps" and old.get("immutable"):
            if not new.get("immutable"):
                return "immutable: Forbidden: field is immutable when `immutable` is set"
            if new.get("data") != old.get("data") or new.get("binaryData") != old.get("binaryData"):
                return "data: Forbidden: field is immutable when `immutable` is set"
        if target.res.plural == "services" and isinstance(spec, dict):
            if not spec.get("clusterIP"):
                spec["clusterIP"] = old_spec.get("clusterIP")
                spec["clusterIPs"] = old_spec.get("clusterIPs")
            elif spec["clusterIP"] != old_spec.get("clusterIP"):
                return "spec.clusterIP: Invalid value: field is immutable"
        return None

    def _delete_request(self, target: _Target, body: Any) -> tuple[int, dict[str, Any]]:
        with self._cond:
            injected = self._injected("DELETE", target)
            if injected is not None:
                return injected
            code, out = self._do_delete(target, body)
            self._record("DELETE", target, code)
            return code, out

    def _do_delete(self, target: _Target, body: Any) -> tuple[int, dict[str, Any]]:
        coll = self._collections[target.res.plural]
        old = coll.objects.get(target.ref)
        if old is None:
            return _not_found(target)
        pre = (body or {}).get("preconditions") if isinstance(body, Mapping) else None
        if isinstance(pre, Mapping):
            md = old["metadata"]
            if pre.get("uid") and pre["uid"] != md["uid"]:
                return 409, _status(
                    409,
                    "Conflict",
                    f"Precondition failed: UID in precondition: {pre['uid']}, UID in object meta: {md['uid']}",
                )
            if pre.get("resourceVersion") and pre["resourceVersion"] != md["resourceVersion"]:
                return 409, _conflict(target)
        del coll.objects[target.ref]
        self._rv += 1
        gone = copy.deepcopy(old)
        gone["metadata"]["resourceVersion"] = str(self._rv)
        coll.events.append(_Event(self._rv, "DELETED", gone))
        self._cond.notify_all()
        out = _status(200, "", "")
        out["status"] = "Success"
        out["details"] = {"name": target.name, "kind": target.res.plural, "uid": old["metadata"]["uid"]}
        return 200, out

    def _get_cluster_object(self, res: FakeResource, name: str) -> tuple[int, dict[str, Any]]:
        with self._cond:
            obj = self._collections[res.plural].objects.get(name)
            if obj is None:
                return 404, _status(404, "NotFound", f'{res.plural} "{name}" not found')
            out = copy.deepcopy(obj)
            out.setdefault("apiVersion", res.api_version)
            out.setdefault("kind", res.kind)
            return 200, out

    def _patch_cluster_object(
        self, res: FakeResource, name: str, content_type: str, body: Any
    ) -> tuple[int, dict[str, Any]]:
        """A merge patch of a namespace's or node's labels/annotations (``kubectl label``)."""
        merge_types = ("application/merge-patch+json", "application/strategic-merge-patch+json")
        with self._cond:
            self.patches.append(Patch(f"/api/v1/{res.plural}/{name}", content_type, body))

            def answer(code: int, out: dict[str, Any]) -> tuple[int, dict[str, Any]]:
                self.writes.append(Write("PATCH", res.plural, name, "", code))
                self._cond.notify_all()
                return code, out

            coll = self._collections[res.plural]
            obj = coll.objects.get(name)
            if content_type not in merge_types:
                return answer(415, _status(415, "UnsupportedMediaType", content_type))
            if not isinstance(body, Mapping):
                return answer(400, _status(400, "BadRequest", "body is not a JSON object"))
            if obj is None:
                return answer(404, _status(404, "NotFound", f'{res.plural} "{name}" not found'))
            md = body.get("metadata") or {}
            if set(body) - {"metadata", "apiVersion", "kind"} or not isinstance(md, Mapping):
                return answer(422, _status(422, "Invalid", "the fake patches metadata only"))
            if set(md) - {"labels", "annotations", "resourceVersion", "name"} or md.get("name", name) != name:
                return answer(
                    422, _status(422, "Invalid", f"{res.kind} {name!r}: only labels/annotations may change")
                )
            rv = md.get("resourceVersion")
            if rv and rv != obj["metadata"]["resourceVersion"]:
                return answer(
                    409,
                    _status(
                        409,
                        "Conflict",
                        f'Operation cannot be fulfilled on {res.plural} "{name}": the object has been modified; '
                        "please apply your changes to the latest version and try again",
                    ),
                )
            patched = _merge(
                obj, {"metadata": {k: v for k, v in md.items() if k in ("labels", "annotations")}}
            )
            bad = _label_problem(patched["metadata"].get("labels"))
            if bad is not None:
                return answer(422, _status(422, "Invalid", f'{res.kind} "{name}" is invalid: {bad}'))
            self._rv += 1
            patched["metadata"]["resourceVersion"] = str(self._rv)
            coll.objects[name] = patched
            coll.events.append(_Event(self._rv, "MODIFIED", patched))
            return answer(200, copy.deepcopy(patched))

    def _patch_status(self, path: str, content_type: str, body: Any) -> tuple[int, dict[str, Any]]:
        # /apis/{group}/{version}/namespaces/{ns}/{plural}/{name}/status, or a pod's metadata:
        # /api/v1/namespaces/{ns}/pods/{name} (the cni agent's redirection annotation)
        parts = path.strip("/").split("/")
        if len(parts) == 6 and parts[:2] == ["api", "v1"] and parts[2] == "namespaces" and parts[4] == "pods":
            ns, plural, name, field = parts[3], "pods", parts[5], "metadata"
        elif len(parts) == 8 and parts[0] == "apis" and parts[3] == "namespaces" and parts[7] == "status":
            ns, plural, name, field = parts[4], parts[5], parts[6], "status"
        else:
            return 404, _status(404, "NotFound", f"no route {path}")
        with self._cond:
            self.patches.append(Patch(path, content_type, body))
            self._cond.notify_all()
            res = _BY_PLURAL.get(plural)
            target = _Target(res, ns, name, field if field == "status" else "") if res else None
            if target is not None:
                injected = self._injected("PATCH", target)
                if injected is not None:
                    return injected
            if self.fail_patches:
                self.fail_patches -= 1
                return 500, _status(500, "InternalError", "injected failure")
            coll = self._collections.get(plural)
            obj = coll.objects.get(f"{ns}/{name}") if coll else None
            if coll is None or obj is None or target is None:
                return 404, _status(404, "NotFound", f"{plural} {ns}/{name} not found")
            merge_types = ("application/merge-patch+json", "application/strategic-merge-patch+json")
            if content_type not in merge_types or not isinstance(body, Mapping):
                return 415, _status(415, "UnsupportedMediaType", content_type)
            wanted_rv = (body.get("metadata") or {}).get("resourceVersion")
            if wanted_rv and wanted_rv != obj["metadata"]["resourceVersion"]:
                self._record("PATCH", target, 409)
                return 409, _conflict(target)
            self._record("PATCH", target, 200)
            patched = _merge(obj, {field: body.get(field)})
            self._rv += 1
            patched["metadata"]["resourceVersion"] = str(self._rv)
            coll.objects[f"{ns}/{name}"] = patched
            coll.events.append(_Event(self._rv, "MODIFIED", patched))
            self._cond.notify_all()
            return 200, copy.deepcopy(patched)


@dataclass(frozen=True)
class _Target:
    """What a request URL names: one object (or, without a name, a namespaced collection)."""

    res: FakeResource
    namespace: str
    name: str
    subresource: str = ""

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


_LABEL_NAME = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")


def _label_problem(labels: Any) -> str | None:
    """Why kube-apiserver refuses these ``metadata.labels`` (qualified-name keys, values of at
    most 63 characters), or None."""
    if labels is None:
        return None
    if not isinstance(labels, Mapping):
        return "metadata.labels: Invalid value: must be a map of strings"
    for k, v in labels.items():
        prefix, _, name = str(k).rpartition("/")
        if (
            not name
            or len(name) > 63
            or not _LABEL_NAME.match(name)
            or (prefix and (len(prefix) > 253 or not _DNS1123_SUBDOMAIN.match(prefix)))
        ):
            return f"metadata.labels: Invalid value: {k!r}: name part must consist of alphanumeric characters"
        if not isinstance(v, str) or len(v) > 63 or not _LABEL_NAME.match(v):
            return (
                f"metadata.labels: Invalid value: {v!r}: a valid label must be an empty string or consist of "
                "alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character"
            )
    return None


_CONFIG_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
CONFIGMAP_MAX_BYTES = 1024 * 1024


def _configmap_problem(obj: Mapping[str, Any]) -> str | None:
    """What kube-apiserver's ConfigMap validation refuses beyond the schema: keys that are not
    config keys, a key in both ``data`` and ``binaryData``, more than 1 MiB in all."""
    data = obj.get("data") or {}
    binary = obj.get("binaryData") or {}
    if not isinstance(data, Mapping) or not isinstance(binary, Mapping):
        return None  # the schema says it
    size = 0
    for where, values in (("data", data), ("binaryData", binary)):
        for k, v in values.items():
            if not _CONFIG_KEY.match(k) or len(k) > 253 or k in (".", ".."):
                return (
                    f"{where}[{k}]: Invalid value: {k!r}: a valid config key must consist of alphanumeric "
                    "characters, '-', '_' or '.'"
                )
            size += len(str(v))
    both = set(data) & set(binary)
    if both:
        return f"data[{min(both)}]: Invalid value: {min(both)!r}: duplicate of key present in binaryData"
    if size > CONFIGMAP_MAX_BYTES:
        return f"[]: Too long: must have at most {CONFIGMAP_MAX_BYTES} bytes"
    return None


def _terminating(namespace: Mapping[str, Any]) -> bool:
    return bool((namespace.get("metadata") or {}).get("deletionTimestamp")) or (
        (namespace.get("status") or {}).get("phase") == "Terminating"
    )


def _forbidden_terminating(target: _Target) -> dict[str, Any]:
    out = _status(
        403,
        "Forbidden",
        f'{target.res.plural} "{target.name}" is forbidden: unable to create new content in namespace '
        f"{target.namespace} because it is being terminated",
        target,
    )
    out["details"]["causes"] = [
        {
            "type": "NamespaceTerminating",
            "message": f"namespace {target.namespace} is being terminated",
            "field": "metadata.namespace",
        }
    ]
    return out


def _cluster_route(path: str) -> tuple[FakeResource, str] | None:
    """``/api/v1/{namespaces|nodes}/{name}``: one cluster-scoped object."""
    parts = path.strip("/").split("/")
    if len(parts) == 4 and parts[:2] == ["api", "v1"] and parts[2] in ("namespaces", "nodes"):
        return _BY_PLURAL[parts[2]], parts[3]
    return None


def _route(path: str) -> _Target | None:
    """``/api/v1/namespaces/{ns}/{plural}[/{name}[/status]]`` or the same under
    ``/apis/{group}/{version}``; None for anything else."""
    parts = path.strip("/").split("/")
    if parts[:2] == ["api", "v1"]:
        group, rest = "", parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        group, rest = parts[1], parts[3:]
    else:
        return None
    if len(rest) < 3 or rest[0] != "namespaces" or len(rest) > 5:
        return None
    res = _BY_GROUP_PLURAL.get((group, rest[2]))
    if res is None or not res.namespaced:
        return None
    sub = rest[4] if len(rest) == 5 else ""
    if sub not in ("", "status"):
        return None
    return _Target(res, rest[1], rest[3] if len(rest) >= 4 else "", sub)


def _field_filter(
    query: Mapping[str, list[str]], in_namespace: str | None = None
) -> Callable[[Mapping[str, Any]], bool]:
    """A list/watch's ``fieldSelector`` (``metadata.name``/``metadata.namespace`` equality, which
    kube-apiserver supports on every resource), and the namespace of a namespaced request."""
    fields = _selector(query.get("fieldSelector", [""])[0]) or {}
    name, namespace = fields.get("metadata.name"), fields.get("metadata.namespace")
    if in_namespace is not None:
        if namespace not in (None, in_namespace):
            return lambda obj: False
        namespace = in_namespace

    def chosen(obj: Mapping[str, Any]) -> bool:
        md = obj.get("metadata") or {}
        return (name is None or md.get("name") == name) and (
            namespace is None or md.get("namespace") == namespace
        )

    return chosen


def _selector(text: str) -> dict[str, str] | None:
    """``a=b,c==d`` -> {a: b, c: d}; None for what the fake does not understand (``!=``, ``in``)."""
    out: dict[str, str] = {}
    for term in filter(None, (t.strip() for t in text.split(","))):
        if "!=" in term or "=" not in term:
            return None
        k, _, v = term.replace("==", "=").partition("=")
        out[k.strip()] = v.strip()
    return out


_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    409: "Conflict",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
}


def _status(code: int, reason: str, message: str, target: _Target | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if target is not None:
        out["details"] = {"name": target.name, "group": target.res.group, "kind": target.res.plural}
    return out


def _not_found(target: _Target) -> tuple[int, dict[str, Any]]:
    return 404, _status(404, "NotFound", f'{target.res.plural} "{target.name}" not found', target)


def _conflict(target: _Target) -> dict[str, Any]:
    return _status(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {target.res.plural} "{target.name}": the object has been '
        "modified; please apply your changes to the latest version and try again",
        target,
    )


def _status_event(code: int, reason: str, message: str) -> bytes:
    return json.dumps({"type": "ERROR", "object": _status(code, reason, message)}).encode()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: FakeApiServer

    def setup(self) -> None:
        super().setup()
        with self.fake._cond:
            self.fake._sockets.add(self.connection)

    def finish(self) -> None:
        with self.fake._cond:
            self.fake._sockets.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send_json(self, code: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _failing(self, plural: str) -> bool:
        with self.fake._cond:
            n = self.fake.fail_next.get(plural, 0)
            if n:
                self.fake.fail_next[plural] = n - 1
                return True
        return False

    def _body(self) -> tuple[bool, Any]:
        length = int(self.headers.get("Content-Length", "0"))
        raw = self.rfile.read(length) if length else b""
        if not raw:
            return True, None
        try:
            return True, json.loads(raw)
        except ValueError:
            self._send_json(400, _status(400, "BadRequest", "body is not JSON"))
            return False, None

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        res = _BY_PATH.get(url.path)
        cluster = _cluster_route(url.path)
        if cluster is not None:
            self._send_json(*self.fake._get_cluster_object(*cluster))
            return
        if res is None:
            target = _route(url.path)
            if target is None:
                self._send_json(404, _status(404, "NotFound", f"no route {url.path}"))
            elif self._failing(target.res.plural):
                self._send_json(500, _status(500, "InternalError", "injected failure"))
            elif target.name:
                self._send_json(*self.fake._get_object(target))
            elif query.get("watch", ["false"])[0] in ("true", "1"):
                self._watch(target.res, query, target.namespace)
            else:
                self._send_json(*self.fake._list_namespaced(target, query))
            return
        if self._failing(res.plural):
            self._send_json(500, _status(500, "InternalError", "injected failure"))
            return
        if query.get("watch", ["false"])[0] not in ("true", "1"):
            self._send_json(200, self.fake._list(res, query))
            return
        self._watch(res, query)

    def _watch(self, res: FakeResource, query: Mapping[str, list[str]], namespace: str | None = None) -> None:
        """A watch of a collection, or of its objects in ``namespace``."""
        rv_text = query.get("resourceVersion", [""])[0]
        allow = query.get("allowWatchBookmarks", ["false"])[0] in ("true", "True", "1")
        timeout = int(query["timeoutSeconds"][0]) if "timeoutSeconds" in query else None
        fake = self.fake
        with fake._cond:
            fake.watch_requests.append(WatchRequest(res.plural, rv_text or None, allow, timeout))
            fake._cond.notify_all()
            coll = fake._collections[res.plural]
            explicit = bool(rv_text) and rv_text != "0"
            since = int(rv_text) if explicit else fake._rv
            too_old = explicit and since < coll.compacted
        if too_old and fake.gone_as_http:
            self._send_json(410, _status(410, "Expired", "too old resource version"))
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        if too_old:
            self._chunk(_status_event(410, "Expired", "too old resource version") + b"\n")
            self._end()
            return
        try:
            for line in fake._watch_events(res, since, allow, timeout, _field_filter(query, namespace)):
                if line is None:  # drop: no terminating chunk, connection cut
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self._chunk(line + b"\n")
            self._end()
        except OSError:
            self.close_connection = True

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _end(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def do_PUT(self) -> None:
        ok, body = self._body()
        if not ok:
            return
        target = _route(urlsplit(self.path).path)
        if target is None or not target.name:
            self._send_json(404, _status(404, "NotFound", f"no PUT handler for {self.path}"))
            return
        self._send_json(*self.fake._replace(target, body))

    def do_DELETE(self) -> None:
        ok, body = self._body()
        if not ok:
            return
        target = _route(urlsplit(self.path).path)
        if target is None or not target.name or target.subresource:
            self._send_json(404, _status(404, "NotFound", f"no DELETE handler for {self.path}"))
            return
        self._send_json(*self.fake._delete_request(target, body))

    def do_POST(self) -> None:
        """TokenReview (answered from ``fake.token_users``, with the requested audiences), and
        creation of namespaced objects."""
        ok, body = self._body()
        if not ok:
            return
        path = urlsplit(self.path).path
        if path != "/apis/authentication.k8s.io/v1/tokenreviews":
            target = _route(path)
            if target is None or target.name:
                self._send_json(404, _status(404, "NotFound", f"no POST handler for {self.path}"))
                return
            self._send_json(*self.fake._create(target, body))
            return
        if not isinstance(body, dict):
            self._send_json(400, _status(400, "BadRequest", "body is not a JSON object"))
            return
        spec = body.get("spec") or {}
        user = self.fake.token_users.get(spec.get("token", ""))
        wanted = spec.get("audiences") or []
        issued = self.fake.token_audiences.get(spec.get("token", ""))
        granted = wanted if issued is None else [a for a in wanted if a in issued]
        status: dict[str, Any] = {"authenticated": user is not None and (issued is None or bool(granted))}
        if user is None:
            status["error"] = "invalid bearer token"
        elif not status["authenticated"]:
            status["error"] = f"token audiences {issued} is invalid for the target audiences {wanted}"
        else:
            status["user"] = user
            status["audiences"] = granted
        self._send_json(201, {**body, "status": status})

    def do_PATCH(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw)
        except ValueError:
            self._send_json(400, _status(400, "BadRequest", "body is not JSON"))
            return
        content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip()
        cluster = _cluster_route(urlsplit(self.path).path)
        if cluster is not None:
            self._send_json(*self.fake._patch_cluster_object(*cluster, content_type, body))
            return
        code, out = self.fake._patch_status(urlsplit(self.path).path, content_type, body)
        self._send_json(code, out)
