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
  emits MODIFIED, and is recorded in :attr:`FakeApiServer.patches`.

One global resourceVersion counter, as etcd has. Thread-safe; everything waits on one
condition variable, so tests wait for things to happen rather than sleep.
"""

from __future__ import annotations

import copy
import json
import socket
import threading
import time
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
    def builtin(self) -> bool:
        return "/" not in self.api_version or self.api_version.startswith("discovery.k8s.io/")

    @property
    def collection_path(self) -> str:
        if "/" in self.api_version:
            return f"/apis/{self.api_version}/{self.plural}"
        return f"/api/{self.api_version}/{self.plural}"


FAKE_RESOURCES = (
    FakeResource("v1", "Namespace", "namespaces"),
    FakeResource("v1", "Node", "nodes"),
    FakeResource("v1", "Pod", "pods"),
    FakeResource("v1", "Service", "services"),
    FakeResource("discovery.k8s.io/v1", "EndpointSlice", "endpointslices"),
    FakeResource("security.istio.io/v1", "AuthorizationPolicy", "authorizationpolicies"),
    FakeResource("security.istio.io/v1", "PeerAuthentication", "peerauthentications"),
    FakeResource("security.istio.io/v1", "RequestAuthentication", "requestauthentications"),
    FakeResource("gateway.networking.k8s.io/v1", "Gateway", "gateways"),
)
_BY_TYPE = {(r.api_version, r.kind): r for r in FAKE_RESOURCES}
_BY_PATH = {r.collection_path: r for r in FAKE_RESOURCES}
_BY_PLURAL = {r.plural: r for r in FAKE_RESOURCES}


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
        # token -> the TokenReview ``status.user`` it authenticates as (absent: not authenticated)
        self.token_users: dict[str, dict[str, Any]] = {}
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
            items = []
            for ref in refs[start:end]:
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
        self, res: FakeResource, since: int, allow_bookmarks: bool, timeout: float | None
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
                elif e.type != "BOOKMARK" or allow_bookmarks:
                    yield json.dumps({"type": e.type, "object": e.obj}).encode()
                with self._cond:
                    self.delivered[res.plural] = max(self.delivered[res.plural], e.rv)
                    self._cond.notify_all()

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
            if self.fail_patches:
                self.fail_patches -= 1
                return 500, _status(500, "InternalError", "injected failure")
            coll = self._collections.get(plural)
            obj = coll.objects.get(f"{ns}/{name}") if coll else None
            if coll is None or obj is None:
                return 404, _status(404, "NotFound", f"{plural} {ns}/{name} not found")
            merge_types = ("application/merge-patch+json", "application/strategic-merge-patch+json")
            if content_type not in merge_types or not isinstance(body, Mapping):
                return 415, _status(415, "UnsupportedMediaType", content_type)
            patched = _merge(obj, {field: body.get(field)})
            self._rv += 1
            patched["metadata"]["resourceVersion"] = str(self._rv)
            coll.objects[f"{ns}/{name}"] = patched
            coll.events.append(_Event(self._rv, "MODIFIED", patched))
            self._cond.notify_all()
            return 200, copy.deepcopy(patched)


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


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

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        res = _BY_PATH.get(url.path)
        if res is None:
            self._send_json(404, _status(404, "NotFound", f"no route {url.path}"))
            return
        if self._failing(res.plural):
            self._send_json(500, _status(500, "InternalError", "injected failure"))
            return
        if query.get("watch", ["false"])[0] not in ("true", "1"):
            self._send_json(200, self.fake._list(res, query))
            return
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
            for line in fake._watch_events(res, since, allow, timeout):
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

    def do_POST(self) -> None:
        """Only TokenReview: answers from ``fake.token_users``, with the requested audiences."""
        length = int(self.headers.get("Content-Length", "0"))
        try:
            body = json.loads(self.rfile.read(length))
        except ValueError:
            self._send_json(400, _status(400, "BadRequest", "body is not JSON"))
            return
        if urlsplit(self.path).path != "/apis/authentication.k8s.io/v1/tokenreviews":
            self._send_json(404, _status(404, "NotFound", f"no POST handler for {self.path}"))
            return
        spec = body.get("spec") or {}
        user = self.fake.token_users.get(spec.get("token", ""))
        status: dict[str, Any] = {"authenticated": user is not None}
        if user is None:
            status["error"] = "invalid bearer token"
        else:
            status["user"] = user
            status["audiences"] = spec.get("audiences") or []
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
        code, out = self.fake._patch_status(urlsplit(self.path).path, content_type, body)
        self._send_json(code, out)
