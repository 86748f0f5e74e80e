"""The node agent: decides enrollment for the pods on its node and makes it so (ARCHITECTURE flow 1).

For each pod the agent knows a netns for (from the CNI plugin's ADD, or reopened from
``state_dir`` after a restart) it keeps an open fd and, from the store's current snapshot, the
enrollment :func:`~cni.enroll.decide` makes:

* enrolled → redirection rules applied in the netns (idempotent), the pod annotated
  ``ambient.istio.io/redirection=enabled`` (Kubernetes mode), ``AddWorkload`` sent to ztunnel;
  the pod is ``pending`` until ztunnel acks (an error ack is retried with backoff), then ``acked``;
* no longer enrolled (label removed) → rules and annotation removed, ``DelWorkload`` sent; the fd
  is kept so the pod can be enrolled again;
* deleted (gone from the store, or CNI DEL) → the same, then the fd is closed and the pod forgotten.

On start the persisted netns are reopened (pods whose netns is gone are forgotten), existing rules
are verified (re-applied only when they differ; stale ones removed for pods no longer enrolled).
Stopping leaves every rule in place: enrolled pods must keep failing closed while the agent is down.

All changes run one at a time under one lock (store changes, plugin calls, retries), so the agent's
view of a pod never interleaves two decisions. Blocking netns work runs in worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from cni import rules
from cni.enroll import Decision, decide
from cni.plugin import AgentReply, AgentRequest
from cni.zds_server import Op
from mesh import zds
from mesh.model import Delta, Store, Workload
from mesh.tasks import Supervisor

log = structlog.get_logger(__name__)

STATE_FILE = "pods.json"
# Annotate(namespace, pod name, enabled): write or remove ambient.istio.io/redirection.
Annotate = Callable[[str, str, bool], Awaitable[None]]

PENDING = "pending"
ACKED = "acked"
NOT_ENROLLED = "not-enrolled"
DEFAULT_OPTIONS = rules.RuleOptions()


@dataclass(frozen=True, slots=True)
class PodStatus:
    """One pod as :meth:`NodeAgent.status` shows it."""

    uid: str
    namespace: str
    name: str
    netns: str
    enrolled: bool
    reason: str
    state: str  # pending | acked | not-enrolled
    last_error: str = ""


def backoff(attempt: int, base: float = 0.2, cap: float = 10.0) -> float:
    return float(min(cap, base * (2**attempt)))


class _Pod:
    """The agent's mutable record of one pod (only the agent's lock holder touches it)."""

    def __init__(self, namespace: str, name: str, uid: str, netns: str, fd: int) -> None:
        self.namespace = namespace
        self.name = name
        self.uid = uid
        self.netns = netns
        self.fd = fd
        self.decision = Decision(False, "not decided yet")
        self.redirected = False  # our rules are in its netns
        self.annotated = False
        self.state = NOT_ENROLLED
        self.last_error = ""
        self.attempts = 0
        self.service_account = "default"
        self.retry: asyncio.Task[None] | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


NS_GET_NSTYPE = 0xB703  # ioctl on an nsfs fd: its namespace type (linux/nsfs.h)
CLONE_NEWNET = 0x40000000


def is_netns(fd: int) -> bool:
    """Whether ``fd`` is a network namespace. (``readlink`` says ``net:[…]`` only for fds opened
    through ``/proc/<pid>/ns/net``; a bind-mounted ``/run/netns/x`` reads as its path.)"""
    try:
        return fcntl.ioctl(fd, NS_GET_NSTYPE) == CLONE_NEWNET
    except OSError:
        return False  # not an nsfs file at all (ENOTTY), e.g. the file left after an unmount


def open_netns(path: str) -> int:
    """An fd on the netns at ``path``; OSError if it is gone or is not a network namespace."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    if not is_netns(fd):
        os.close(fd)
        raise OSError(f"{path} is not a network namespace")
    return fd


class NodeAgent:
    """See the module docstring. Its :meth:`handle_plugin` is the :class:`~cni.plugin.PluginServer`
    handler and it is the :class:`~cni.zds_server.ZdsPeer` of a :class:`~cni.zds_server.ZdsServer`
    (attach it with :meth:`attach_zds`)."""

    def __init__(
        self,
        node: str,
        store: Store,
        *,
        zds_path: str = zds.DEFAULT_SOCKET_PATH,
        plugin_socket: str = "",
        state_dir: str,
        annotate: Annotate | None = None,
        options: rules.RuleOptions = DEFAULT_OPTIONS,
        pod_wait: float = 5.0,
    ) -> None:
        self.node = node
        self.store = store
        self.zds_path = zds_path
        self.plugin_socket = plugin_socket
        self.state_dir = Path(state_dir)
        self._annotate = annotate
        self._options = options
        self._pod_wait = pod_wait
        self._pods: dict[str, _Pod] = {}  # by namespace/name
        self._lock = asyncio.Lock()
        self._tasks = Supervisor("cni-agent")
        self._dirty = asyncio.Event()
        self._store_changed = asyncio.Event()
        self._unsubscribe: Callable[[], None] | None = None
        self._zds: Any = None  # a ZdsServer once attached
        self._loop: asyncio.AbstractEventLoop | None = None
        self.changed = asyncio.Event()  # set whenever a pod's state may have changed (status watchers)

    # -- lifecycle ------------------------------------------------------------------------------

    def attach_zds(self, server: Any) -> None:
        """``server`` has ``add(uid)`` and ``delete(uid)`` (a :class:`~cni.zds_server.ZdsServer`)."""
        self._zds = server

    async def start(self) -> None:
        """Reopen persisted netns, reconcile them with the store (verifying rules), follow the store."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._load_state()
        async with self._lock:
            await self._reconcile(verify=True)
            self._save_state()
        self._loop = asyncio.get_running_loop()
        self._unsubscribe = self.store.subscribe(self._on_delta)
        self._tasks.spawn(self._reconcile_loop(), name="reconcile")
        log.info("cni agent started", node=self.node, pods=len(self._pods))
        self.log_status()

    async def stop(self) -> None:
        """Stop following the store and close every fd; rules stay (pods keep failing closed)."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        await self._tasks.aclose()
        async with self._lock:
            for pod in self._pods.values():
                self._cancel_retry(pod)
                with contextlib.suppress(OSError):
                    os.close(pod.fd)
            self._pods.clear()
        log.info("cni agent stopped; redirection rules left in place")

    async def __aenter__(self) -> NodeAgent:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- status ---------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        pods = [
            PodStatus(
                p.uid,
                p.namespace,
                p.name,
                p.netns,
                p.decision.enrolled,
                p.decision.reason,
                p.state,
                p.last_error,
            )
            for p in sorted(self._pods.values(), key=lambda p: p.key)
        ]
        return {
            "node": self.node,
            "ztunnel_connected": bool(self._zds is not None and self._zds.connected.is_set()),
            "ztunnel_snapshots_sent": int(self._zds.snapshots_sent) if self._zds is not None else 0,
            "pods": {
                p.uid or f"{p.namespace}/{p.name}": {
                    "namespace": p.namespace,
                    "name": p.name,
                    "netns": p.netns,
                    "enrolled": p.enrolled,
                    "reason": p.reason,
                    "state": p.state,
                    **({"last_error": p.last_error} if p.last_error else {}),
                }
                for p in pods
            },
        }

    def log_status(self) -> None:
        log.info("cni agent status", **self.status())

    # -- persisted netns ------------------------------------------------------------------------

    @property
    def _state_path(self) -> Path:
        return self.state_dir / STATE_FILE

    def _load_state(self) -> None:
        try:
            doc = json.loads(self._state_path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            log.error("cni agent state unreadable; starting empty", path=str(self._state_path), error=str(e))
            return
        entries = doc.get("pods", []) if isinstance(doc, dict) else []
        for entry in entries:
            try:
                ns, name, uid, netns = (str(entry[k]) for k in ("namespace", "name", "uid", "netns"))
            except (KeyError, TypeError):
                log.warning("cni agent state: bad entry skipped", entry=entry)
                continue
            try:
                fd = open_netns(netns)
            except OSError as e:
                log.info(
                    "pod netns is gone; forgetting the pod", pod=f"{ns}/{name}", netns=netns, error=str(e)
                )
                continue
            self._pods[f"{ns}/{name}"] = _Pod(ns, name, uid, netns, fd)

    def _save_state(self) -> None:
        doc = {
            "pods": [
                {"namespace": p.namespace, "name": p.name, "uid": p.uid, "netns": p.netns}
                for p in sorted(self._pods.values(), key=lambda p: p.key)
            ]
        }
        tmp = self._state_path.with_name(f".{STATE_FILE}.tmp")
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        tmp.replace(self._state_path)

    # -- store changes --------------------------------------------------------------------------

    def _on_delta(self, delta: Delta) -> None:
        # The Kubernetes source writes the store from its watcher threads.
        loop = self._loop
        if loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._mark_dirty()
        else:
            loop.call_soon_threadsafe(self._mark_dirty)

    def _mark_dirty(self) -> None:
        self._store_changed.set()
        self._dirty.set()

    async def _reconcile_loop(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            async with self._lock:
                try:
                    await self._reconcile(verify=False)
                finally:
                    self._save_state()
                    self.changed.set()

    def _workload(self, pod: _Pod) -> Workload | None:
        snap = self.store.snapshot()
        w = snap.workloads.get(pod.uid) if pod.uid else None
        return w if w is not None else snap.workload_by_name(pod.namespace, pod.name)

    async def _reconcile(self, *, verify: bool) -> None:
        """Bring every known pod in line with the store; ``verify`` also checks rules on disk."""
        snap = self.store.snapshot()
        for pod in list(self._pods.values()):
            w = self._workload(pod)
            if w is None:
                log.info("pod deleted", pod=pod.key, uid=pod.uid)
                await self._forget(pod)
                continue
            pod.uid = w.uid
            pod.service_account = w.service_account
            decision = decide(snap.namespaces.get(w.namespace), w, self.node)
            changed = decision.enrolled != pod.decision.enrolled
            pod.decision = decision
            try:
                if verify:
                    await self._verify(pod)
                unannotated = self._annotate is not None and not pod.annotated
                if decision.enrolled and (changed or not pod.redirected or verify or unannotated):
                    await self._enroll(pod)
                elif not decision.enrolled and (pod.redirected or pod.state != NOT_ENROLLED):
                    await self._unenroll(pod)
            except (rules.RulesError, OSError) as e:
                pod.last_error = str(e)
                log.error("pod reconcile failed", pod=pod.key, error=str(e))

    async def _verify(self, pod: _Pod) -> None:
        state = await asyncio.to_thread(rules.read, pod.fd)
        problems = rules.diff(state, self._options)
        pod.redirected = not state.empty
        if pod.decision.enrolled:
            if problems and not state.empty:
                log.warning(
                    "redirection differs from the wanted rules; re-applying", pod=pod.key, problems=problems
                )
            pod.redirected = not problems
        elif not state.empty:
            log.info("stale redirection for a pod no longer enrolled", pod=pod.key)

    async def _enroll(self, pod: _Pod) -> None:
        if not pod.redirected:
            await asyncio.to_thread(rules.apply, pod.fd, self._options)
            pod.redirected = True
        if self._annotate is not None and not pod.annotated:
            pod.annotated = await self._set_annotation(pod, True)
        if pod.state == NOT_ENROLLED:
            log.info("pod enrolled", pod=pod.key, uid=pod.uid, reason=pod.decision.reason)
        if pod.state != ACKED:
            pod.state = PENDING
            pod.attempts = 0
            self._cancel_retry(pod)
            if self._zds is not None:
                self._zds.add(pod.uid)

    async def _unenroll(self, pod: _Pod) -> None:
        was_sent = pod.state != NOT_ENROLLED
        self._cancel_retry(pod)
        pod.state = NOT_ENROLLED
        pod.last_error = ""
        if pod.redirected:
            await asyncio.to_thread(rules.remove, pod.fd)
            pod.redirected = False
        if self._annotate is not None and not await self._set_annotation(pod, False):
            pod.last_error = "annotation not removed"
        pod.annotated = False
        if was_sent and self._zds is not None:
            self._zds.delete(pod.uid)
        log.info("pod not enrolled", pod=pod.key, uid=pod.uid, reason=pod.decision.reason)

    async def _set_annotation(self, pod: _Pod, enabled: bool) -> bool:
        """Write or remove the redirection annotation; a failure is logged, never blocks ZDS."""
        assert self._annotate is not None
        try:
            await self._annotate(pod.namespace, pod.name, enabled)
        except Exception as e:
            log.warning(
                "pod annotation failed; retried on the next change",
                pod=pod.key,
                enabled=enabled,
                error=str(e),
            )
            return False
        return True

    async def _forget(self, pod: _Pod) -> None:
        """Un-enroll (best effort; our open fd keeps the netns reachable) and drop the pod and its fd."""
        pod.decision = Decision(False, "pod deleted")
        try:
            await self._unenroll(pod)
        except (rules.RulesError, OSError) as e:
            log.warning("cleanup of a deleted pod failed", pod=pod.key, error=str(e))
        with contextlib.suppress(OSError):
            os.close(pod.fd)
        self._pods.pop(pod.key, None)

    # -- ZDS peer -------------------------------------------------------------------------------

    def _by_uid(self, uid: str) -> _Pod | None:
        for p in self._pods.values():
            if p.uid == uid:
                return p
        return None

    def snapshot_uids(self) -> list[str]:
        return [p.uid for p in self._pods.values() if p.decision.enrolled and p.redirected and p.uid]

    def add_request(self, uid: str) -> zds.AddWorkload | None:
        p = self._by_uid(uid)
        if p is None or not p.decision.enrolled or not p.redirected:
            return None
        return zds.AddWorkload(uid, p.name, p.namespace, p.service_account, p.fd)

    def zds_connected(self, connected: bool) -> None:
        for p in self._pods.values():
            if p.state == ACKED:
                p.state = PENDING  # the new ztunnel must ack it again
            if connected:
                p.attempts = 0
                self._cancel_retry(p)

    def zds_result(self, uid: str, op: Op, error: str) -> None:
        self.changed.set()
        p = self._by_uid(uid)
        if p is None or op == "del" or not p.decision.enrolled:
            return
        if not error:
            p.state, p.last_error, p.attempts = ACKED, "", 0
            log.info("pod acked by ztunnel", pod=p.key, uid=uid)
            return
        p.state, p.last_error = PENDING, error
        delay = backoff(p.attempts)
        p.attempts += 1
        log.warning("ztunnel refused the pod; retrying", pod=p.key, uid=uid, error=error, retry_in=delay)
        self._cancel_retry(p)
        with contextlib.suppress(RuntimeError):  # the agent is stopping: no more retries
            p.retry = self._tasks.spawn(self._retry(uid, delay), name=f"retry-{uid}")

    async def _retry(self, uid: str, delay: float) -> None:
        await asyncio.sleep(delay)  # a backoff timer, not a wait for a condition
        p = self._by_uid(uid)
        if p is not None:
            p.retry = None
            if p.state == PENDING and p.decision.enrolled and self._zds is not None:
                self._zds.add(uid)

    @staticmethod
    def _cancel_retry(pod: _Pod) -> None:
        if pod.retry is not None and pod.retry is not asyncio.current_task():
            pod.retry.cancel()
        pod.retry = None

    # -- CNI plugin calls -----------------------------------------------------------------------

    async def handle_plugin(self, req: AgentRequest) -> AgentReply:
        """ADD: redirection is in place before the reply (the runtime starts the app after it)."""
        if req.command == "STATUS":
            return AgentReply(True)
        if req.command == "DEL":
            async with self._lock:
                pod = self._pods.get(f"{req.pod_namespace}/{req.pod_name}")
                if pod is not None and (not req.pod_uid or not pod.uid or pod.uid == req.pod_uid):
                    log.info("CNI DEL", pod=pod.key)
                    await self._forget(pod)
                    self._save_state()
            return AgentReply(True)
        return await self._plugin_add(req)

    async def _wait_for_pod(self, req: AgentRequest) -> Workload | None:
        """The pod as the store knows it; the CNI ADD may race the watch, so wait a little."""
        try:
            async with asyncio.timeout(self._pod_wait):
                while True:
                    self._store_changed.clear()
                    snap = self.store.snapshot()
                    w = snap.workloads.get(req.pod_uid) if req.pod_uid else None
                    w = w or snap.workload_by_name(req.pod_namespace, req.pod_name)
                    if w is not None:
                        return w
                    await self._store_changed.wait()
        except TimeoutError:
            return None

    async def _plugin_add(self, req: AgentRequest) -> AgentReply:
        key = f"{req.pod_namespace}/{req.pod_name}"
        w = await self._wait_for_pod(req)
        if w is None:
            return AgentReply(False, f"pod {key} is not known to the agent yet; try again")
        try:
            fd = open_netns(req.netns)
        except OSError as e:
            return AgentReply(False, f"cannot open the pod netns {req.netns}: {e}")
        async with self._lock:
            old = self._pods.get(key)
            if old is not None:
                if old.netns == req.netns and old.uid == w.uid:
                    os.close(fd)  # a repeated ADD: keep what we have
                    fd = -1
                else:
                    await self._forget(old)  # a new sandbox for the same pod
            if fd != -1:
                self._pods[key] = _Pod(req.pod_namespace, req.pod_name, w.uid, req.netns, fd)
            self._save_state()
            pod = self._pods[key]
            await self._reconcile_one(pod)
            if pod.decision.enrolled and not pod.redirected:
                return AgentReply(False, f"redirection for {key} failed: {pod.last_error}")
        return AgentReply(True)

    async def _reconcile_one(self, pod: _Pod) -> None:
        w = self._workload(pod)
        if w is None:
            return
        pod.uid, pod.service_account = w.uid, w.service_account
        decision = decide(self.store.snapshot().namespaces.get(w.namespace), w, self.node)
        pod.decision = decision
        try:
            if decision.enrolled:
                await self._enroll(pod)
            elif pod.redirected or pod.state != NOT_ENROLLED:
                await self._unenroll(pod)
            else:
                log.info("pod not enrolled", pod=pod.key, reason=decision.reason)
        except (rules.RulesError, OSError) as e:
            pod.last_error = str(e)
            log.error("pod enrollment failed", pod=pod.key, error=str(e))
