"""Kubernetes mode: the mesh root published as the ConfigMap ``istio-ca-root-cert`` (key
``root-cert.pem``, label ``istio.io/config: "true"``) in every namespace, as istiod's namespace
controller does: ztunnel and the waypoints mount it to verify the control plane's :15012
certificate, and workloads may use it to verify mesh certificates.

* **Which namespaces**: every Namespace the control plane's source has put in the store, except
  the Kubernetes system namespaces istiod skips too (``kube-system``, ``kube-public``,
  ``kube-node-lease``, ``local-path-storage``).
* **Triggers**: a namespace appearing in the store; an event of a ConfigMap of that name (its
  own list+watch, narrowed by ``fieldSelector=metadata.name=istio-ca-root-cert``: a ConfigMap
  edited to something else, or deleted, is put back); all namespaces at start and every
  ``resync`` seconds (which also covers events missed across a relist).
* **Writes only when different**: each reconcile reads the ConfigMap; a missing one is created,
  one without our root or without the label is replaced with the resourceVersion read (a
  concurrent writer makes it a 409 and a retry), keeping every other key, label and annotation
  (as istiod keeps other data keys). Several control-plane replicas converge.
* **Failures**: a namespace being deleted (403 ``NamespaceTerminating``) or already gone (404)
  is skipped; any other refusal is logged with the namespace and retried with backoff.

The published root is the CA's (``roots_pem``: the generated root, or ``root-cert.pem`` of the
plugged-in ``cacerts``). A new root (a restart with another ``cacerts``) is published everywhere
by the start-up pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import Callable, Mapping
from typing import Any

import structlog

from controlplane.kubeapi import ApiError, KubeApi, ObjectKind
from controlplane.workqueue import WorkQueue
from mesh.model import Delta, Kind, Store
from sources.kubernetes import Backoff, KubernetesSource, Resource

log = structlog.get_logger(__name__)

ROOT_CERT_CONFIGMAP = "istio-ca-root-cert"
ROOT_CERT_KEY = "root-cert.pem"
CONFIG_LABEL = "istio.io/config"
CONFIG_LABEL_VALUE = "true"
# Istio's inject.IgnoredNamespaces: istiod publishes nothing there.
IGNORED_NAMESPACES = frozenset({"kube-system", "kube-public", "kube-node-lease", "local-path-storage"})
CAUSE_NAMESPACE_TERMINATING = "NamespaceTerminating"
DEFAULT_RESYNC = 600.0

CONFIG_MAP = ObjectKind("v1", "ConfigMap", "configmaps")
# The ConfigMaps of that name in every namespace, and no other (RBAC: list/watch of configmaps).
ROOT_CERT_CONFIG_MAPS = Resource(
    "configmaps",
    "v1",
    "ConfigMap",
    None,
    "list_config_map_for_all_namespaces",
    field_selector=f"metadata.name={ROOT_CERT_CONFIGMAP}",
)


# --- pure --------------------------------------------------------------------------------------


def render(namespace: str, root_pem: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": ROOT_CERT_CONFIGMAP,
            "namespace": namespace,
            "labels": {CONFIG_LABEL: CONFIG_LABEL_VALUE},
        },
        "data": {ROOT_CERT_KEY: root_pem},
    }


def up_to_date(live: Mapping[str, Any], root_pem: str) -> bool:
    """``live`` carries our root under its key and our label (anything else on it is not ours)."""
    data = live.get("data")
    labels = (live.get("metadata") or {}).get("labels")
    return (
        isinstance(data, Mapping)
        and data.get(ROOT_CERT_KEY) == root_pem
        and isinstance(labels, Mapping)
        and labels.get(CONFIG_LABEL) == CONFIG_LABEL_VALUE
    )


def replacement(live: Mapping[str, Any], root_pem: str) -> dict[str, Any]:
    """The PUT body: ``live`` (its resourceVersion, other keys, labels, annotations) with our root
    and label. Not ``binaryData`` under our key: a key may be in only one of the two."""
    out = copy.deepcopy(dict(live))
    out["apiVersion"], out["kind"] = "v1", "ConfigMap"
    md = out.setdefault("metadata", {})
    md["labels"] = {**(md.get("labels") or {}), CONFIG_LABEL: CONFIG_LABEL_VALUE}
    out["data"] = {**(out.get("data") or {}), ROOT_CERT_KEY: root_pem}
    binary = out.get("binaryData")
    if isinstance(binary, dict) and ROOT_CERT_KEY in binary:
        del binary[ROOT_CERT_KEY]
        if not binary:
            del out["binaryData"]
    return out


def published_in(namespace: str) -> bool:
    return namespace not in IGNORED_NAMESPACES


# --- one reconcile (blocking) ------------------------------------------------------------------


class Publisher:
    """Makes one namespace hold the root ConfigMap. Blocking; raises :class:`ApiError` for the
    queue to log and retry."""

    def __init__(self, api: KubeApi, root_pem: str, namespaces: Callable[[], Mapping[str, object]]) -> None:
        self.api = api
        self.root_pem = root_pem
        self._namespaces = namespaces

    def publish(self, namespace: str) -> float | None:
        if not published_in(namespace) or namespace not in self._namespaces():
            return None
        live = self.api.get(CONFIG_MAP, namespace, ROOT_CERT_CONFIGMAP)
        what = f"ConfigMap {namespace}/{ROOT_CERT_CONFIGMAP}"
        try:
            if live is None:
                self.api.create(CONFIG_MAP, render(namespace, self.root_pem))
                log.info("published the root certificate", object=what)
            elif not up_to_date(live, self.root_pem):
                self.api.replace(CONFIG_MAP, replacement(live, self.root_pem))
                log.info("repaired the published root certificate", object=what)
        except ApiError as e:
            gone = e.status == 404 and live is None  # the namespace went meanwhile
            if gone or (e.status == 403 and CAUSE_NAMESPACE_TERMINATING in e.causes):
                log.debug("namespace going away: root certificate not published", namespace=namespace)
                return None
            raise
        return None


# --- the controller (asyncio) ------------------------------------------------------------------


def _describe(key: str, e: Exception) -> tuple[dict[str, Any], bool]:
    fields: dict[str, Any] = {"namespace": key}
    if isinstance(e, ApiError):
        fields.update(object=e.what, method=e.method, status=e.status, reason=e.reason, error=e.message)
        return fields, True
    fields["error"] = f"{type(e).__name__}: {e}"
    return fields, False


def new_namespaces(delta: Delta) -> set[str]:
    return set(delta.upserted_keys(Kind.NAMESPACE)) - set(delta.previous.namespaces)


class RootCertController:
    """Queues namespaces (store deltas, the ConfigMap watch, start and resync) and publishes
    the root in each, one at a time on a worker thread.

    ``start()`` (in the event loop, after the source's first full list) subscribes, starts the
    ConfigMap watch and queues every namespace; ``aclose()`` stops all of it.
    """

    def __init__(
        self,
        store: Store,
        api_client: Any,
        root_pem: str,
        *,
        resync: float = DEFAULT_RESYNC,
        backoff: Backoff | None = None,
        timeout: tuple[float, float] = (10.0, 30.0),
    ) -> None:
        self._store = store
        self._resync = resync
        self.publisher = Publisher(
            KubeApi(api_client, timeout=timeout), root_pem, lambda: store.snapshot().namespaces
        )
        self.queue = WorkQueue(
            "root-cert-publisher",
            self.publisher.publish,
            subject="root certificate",
            backoff=backoff or Backoff(initial=1.0, maximum=60.0),
            describe=_describe,
        )
        # Its own store is never filled: a ConfigMap is no model object; the events are the point.
        self._watch = KubernetesSource(
            api_client,
            Store(),
            resources=(ROOT_CERT_CONFIG_MAPS,),
            write_status=False,
            on_event=self.on_watch_event,
        )
        self._unsubscribe: Callable[[], None] | None = None
        self._resync_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.queue.start()
        self._unsubscribe = self._store.subscribe(lambda delta: self.queue.hand_over(new_namespaces(delta)))
        self._watch.start()
        self._resync_task = asyncio.create_task(self._resync_loop(), name="root-cert-resync")
        log.info("root certificate publisher started", configmap=ROOT_CERT_CONFIGMAP)

    async def aclose(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        task, self._resync_task = self._resync_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._watch.astop()
        await self.queue.aclose()
        log.info("root certificate publisher stopped")

    async def _resync_loop(self) -> None:
        while True:
            self.queue.enqueue(self._store.snapshot().namespaces)
            await asyncio.sleep(self._resync)

    def on_watch_event(self, plural: str, etype: str, obj: Mapping[str, Any]) -> None:
        """The ConfigMap watch's hook (its thread): a deleted one, or one not (or no longer)
        holding our root, queues its namespace."""
        if plural != CONFIG_MAP.plural or etype not in ("ADDED", "MODIFIED", "DELETED"):
            return
        md = obj.get("metadata") or {}
        if md.get("name") != ROOT_CERT_CONFIGMAP or not isinstance(md.get("namespace"), str):
            return
        if etype == "DELETED" or not up_to_date(obj, self.publisher.root_pem):
            self.queue.hand_over({md["namespace"]})
