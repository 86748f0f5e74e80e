"""Kubernetes mode's waypoint controller: a ``Gateway`` of class ``istio-waypoint`` becomes a
ServiceAccount, a Deployment, a Service (and, when asked for, a PodDisruptionBudget) of the
Gateway's name in its namespace, and the Gateway's status says whether that worked.

What local mode does on the file's objects (:mod:`sources.waypoints`), done here the way a
Kubernetes controller does it (istiod's gateway deployment controller is the model):

* **Triggers**: the store the control plane already fills from its Gateway watch. A delta that
  touches a Gateway (or a pod labelled ``gateway.networking.k8s.io/gateway-name``) queues that
  Gateway's key, and so does the source's watch-event hook for Gateway changes the model does
  not hold (``spec.infrastructure``); no second watch is opened. The store's Gateway has no
  uid, parameters or status, so each reconcile reads the Gateway from the API (a list narrowed
  to its name: the RBAC grants gateways ``list``, not ``get``) and decides from that.
* **Writes only when different**: each object is read, and replaced (with the resourceVersion
  read: a concurrent writer makes it a 409 and a retry) only when what we render is not already
  there. "There" means: the hash of the rendered object we stamp on it matches, and every field
  we render has that value on the live object (fields the API server defaults are ignored, so a
  real cluster does not cause a write per reconcile; a hand edit of a field we own is undone).
  Two control-plane replicas therefore converge instead of fighting.
* **Ownership**: everything made carries the label ``app.kubernetes.io/managed-by:
  ambient-mesh-waypoint-controller`` and a controller ``ownerReference`` to the Gateway, so
  deleting the Gateway garbage-collects them in a cluster. The controller also deletes them
  itself when the Gateway goes (or stops being a waypoint), with the object's uid as a
  precondition; an object of the same name it did not make is never adopted, changed or deleted
  (the Gateway reports it instead).
* **Status**: ``Accepted`` (False, ``InvalidParameters``, for a bad ``ambient-mesh.io/waypoint-*``
  annotation or a ``spec.infrastructure.parametersRef``, which is not supported) and
  ``Programmed`` (True once the Deployment reports a ready replica; False with ``Pending``,
  ``NoResources`` or ``Invalid`` otherwise), plus the Service's cluster IP as the address,
  merge-patched through the status subresource with the resourceVersion read, only when they
  change. The Deployment is not watched (the RBAC grants ``get`` only): while a Gateway is not
  Programmed it is looked at again every ``status_poll`` seconds, and every Gateway every
  ``resync`` seconds, which also repairs objects someone deleted or edited.
* **Failures** (an API refusal, a timeout) are logged with the object named and retried with
  exponential backoff and jitter; nothing here can stop the control plane.

Parameters, on the Gateway (documented in docs/install.md): ``ambient-mesh.io/waypoint-replicas``,
``ambient-mesh.io/waypoint-cpu`` / ``-memory`` (requests) and ``-cpu-limit`` / ``-memory-limit``,
``ambient-mesh.io/waypoint-pdb-min-available`` or ``-pdb-max-unavailable`` (a PodDisruptionBudget),
and the Gateway API's ``spec.infrastructure.labels`` / ``annotations`` (copied onto everything
made, as Istio does).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from typing import Any

import structlog

from mesh.enrollment import DATAPLANE_MODE_LABEL
from mesh.model import Delta, Kind, Store
from mesh.model.objects import LABEL_GATEWAY_NAME, WAYPOINT_GATEWAY_CLASS
from sources.kubernetes import Backoff

log = structlog.get_logger(__name__)

GATEWAY_API_VERSION = "gateway.networking.k8s.io/v1"
GATEWAY_GROUP, _, GATEWAY_VERSION = GATEWAY_API_VERSION.partition("/")

LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "ambient-mesh-waypoint-controller"
ANNOTATION_HASH = "ambient-mesh.io/waypoint-config-hash"

# Parameters of a waypoint, as annotations of its Gateway.
ANNOTATION_REPLICAS = "ambient-mesh.io/waypoint-replicas"
ANNOTATION_CPU = "ambient-mesh.io/waypoint-cpu"
ANNOTATION_MEMORY = "ambient-mesh.io/waypoint-memory"
ANNOTATION_CPU_LIMIT = "ambient-mesh.io/waypoint-cpu-limit"
ANNOTATION_MEMORY_LIMIT = "ambient-mesh.io/waypoint-memory-limit"
ANNOTATION_PDB_MIN_AVAILABLE = "ambient-mesh.io/waypoint-pdb-min-available"
ANNOTATION_PDB_MAX_UNAVAILABLE = "ambient-mesh.io/waypoint-pdb-max-unavailable"

# Where the waypoint process finds its credentials (waypoint/main.py's defaults).
TOKEN_DIR = "/var/run/secrets/tokens"
TOKEN_FILE = f"{TOKEN_DIR}/istio-token"
ROOT_CERT_DIR = "/var/run/secrets/istio"
ROOT_CERT_FILE = f"{ROOT_CERT_DIR}/root-cert.pem"
ROOT_CERT_CONFIGMAP = "istio-ca-root-cert"
TOKEN_AUDIENCE = "istio-ca"
TOKEN_EXPIRATION_SECONDS = 43200
WAYPOINT_UID = 1337

PORT_MESH = 15008
PORT_STATUS = 15021
PORT_METRICS = 15020
READY_PATH = "/healthz/ready"

DEFAULT_REQUESTS = {"cpu": "100m", "memory": "128Mi"}
DEFAULT_LIMITS = {"cpu": "2", "memory": "1Gi"}

# Gateway API condition types and reasons.
ACCEPTED = "Accepted"
PROGRAMMED = "Programmed"
REASON_ACCEPTED = "Accepted"
REASON_INVALID_PARAMETERS = "InvalidParameters"
REASON_PROGRAMMED = "Programmed"
REASON_PENDING = "Pending"
REASON_INVALID = "Invalid"
REASON_NO_RESOURCES = "NoResources"

_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_PERCENT_OR_INT = re.compile(r"^([0-9]+%?)$")


# --- settings and parameters -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WaypointSettings:
    """What every waypoint Deployment shares: the image and where the control plane is."""

    image: str
    ca_address: str  # e.g. controlplane.istio-system.svc:15012; also the discovery address
    trust_domain: str = "cluster.local"
    image_pull_policy: str = "IfNotPresent"


@dataclass(frozen=True, slots=True)
class Parameters:
    """One waypoint's knobs, from its Gateway."""

    replicas: int | None = None  # None: leave the count to whoever scales it (an HPA), 1 at first
    requests: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_REQUESTS))
    limits: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_LIMITS))
    pdb_min_available: int | str | None = None
    pdb_max_unavailable: int | str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)  # spec.infrastructure.labels
    annotations: Mapping[str, str] = field(default_factory=dict)  # spec.infrastructure.annotations

    @property
    def wants_pdb(self) -> bool:
        return self.pdb_min_available is not None or self.pdb_max_unavailable is not None


class InvalidParameters(ValueError):
    """A Gateway whose parameters cannot be used; the message names the annotation or field."""


def _int_or_percent(key: str, value: str) -> int | str:
    if not _PERCENT_OR_INT.match(value.strip()):
        raise InvalidParameters(f"{key}: {value!r} is neither a non-negative integer nor a percentage")
    v = value.strip()
    return v if v.endswith("%") else int(v)


def parameters(gateway: Mapping[str, Any]) -> Parameters:
    """The waypoint's parameters from its Gateway (raises :class:`InvalidParameters`)."""
    md = gateway.get("metadata") or {}
    ann: Mapping[str, str] = md.get("annotations") or {}
    spec = gateway.get("spec") or {}
    infra = spec.get("infrastructure") or {}
    if infra.get("parametersRef"):
        raise InvalidParameters(
            "spec.infrastructure.parametersRef is not supported; "
            "use the ambient-mesh.io/waypoint-* annotations of the Gateway"
        )
    replicas: int | None = None
    if ANNOTATION_REPLICAS in ann:
        text = ann[ANNOTATION_REPLICAS].strip()
        if not text.isdigit() or int(text) > 1000:
            raise InvalidParameters(f"{ANNOTATION_REPLICAS}: {text!r} is not an integer from 0 to 1000")
        replicas = int(text)
    requests = dict(DEFAULT_REQUESTS)
    limits = dict(DEFAULT_LIMITS)
    for key, target, resource in (
        (ANNOTATION_CPU, requests, "cpu"),
        (ANNOTATION_MEMORY, requests, "memory"),
        (ANNOTATION_CPU_LIMIT, limits, "cpu"),
        (ANNOTATION_MEMORY_LIMIT, limits, "memory"),
    ):
        if key in ann:
            value = ann[key].strip()
            if not _QUANTITY.match(value):
                raise InvalidParameters(f"{key}: {value!r} is not a Kubernetes quantity (e.g. 500m, 256Mi)")
            target[resource] = value
    min_available = max_unavailable = None
    if ANNOTATION_PDB_MIN_AVAILABLE in ann:
        min_available = _int_or_percent(ANNOTATION_PDB_MIN_AVAILABLE, ann[ANNOTATION_PDB_MIN_AVAILABLE])
    if ANNOTATION_PDB_MAX_UNAVAILABLE in ann:
        max_unavailable = _int_or_percent(ANNOTATION_PDB_MAX_UNAVAILABLE, ann[ANNOTATION_PDB_MAX_UNAVAILABLE])
    if min_available is not None and max_unavailable is not None:
        raise InvalidParameters(
            f"{ANNOTATION_PDB_MIN_AVAILABLE} and {ANNOTATION_PDB_MAX_UNAVAILABLE} cannot both be set"
        )
    labels = infra.get("labels") or {}
    annotations = infra.get("annotations") or {}
    if not isinstance(labels, Mapping) or not isinstance(annotations, Mapping):
        raise InvalidParameters("spec.infrastructure.labels/annotations must be maps of strings")
    return Parameters(
        replicas=replicas,
        requests=requests,
        limits=limits,
        pdb_min_available=min_available,
        pdb_max_unavailable=max_unavailable,
        labels={str(k): str(v) for k, v in labels.items()},
        annotations={str(k): str(v) for k, v in annotations.items()},
    )


# --- rendering (pure) --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ObjectKind:
    """A kind the controller writes, and where it lives in the API."""

    api_version: str
    kind: str
    plural: str

    def path(self, namespace: str, name: str = "") -> str:
        base = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        path = f"{base}/namespaces/{namespace}/{self.plural}"
        return f"{path}/{name}" if name else path


SERVICE_ACCOUNT = ObjectKind("v1", "ServiceAccount", "serviceaccounts")
DEPLOYMENT = ObjectKind("apps/v1", "Deployment", "deployments")
SERVICE = ObjectKind("v1", "Service", "services")
PDB = ObjectKind("policy/v1", "PodDisruptionBudget", "poddisruptionbudgets")
GATEWAY = ObjectKind(GATEWAY_API_VERSION, "Gateway", "gateways")
MANAGED_KINDS = (SERVICE_ACCOUNT, DEPLOYMENT, SERVICE, PDB)


def _meta(gateway: Mapping[str, Any]) -> tuple[str, str, str]:
    md = gateway["metadata"]
    return md["namespace"], md["name"], md.get("uid", "")


def owner_reference(gateway: Mapping[str, Any]) -> dict[str, Any]:
    _, name, uid = _meta(gateway)
    return {
        "apiVersion": GATEWAY_API_VERSION,
        "kind": "Gateway",
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _selector(name: str) -> dict[str, str]:
    return {LABEL_GATEWAY_NAME: name}


def _metadata(gateway: Mapping[str, Any], params: Parameters) -> dict[str, Any]:
    ns, name, _ = _meta(gateway)
    return {
        "name": name,
        "namespace": ns,
        "labels": {**params.labels, LABEL_GATEWAY_NAME: name, LABEL_MANAGED_BY: MANAGED_BY},
        "annotations": dict(params.annotations),
        "ownerReferences": [owner_reference(gateway)],
    }


def render_service_account(gateway: Mapping[str, Any], params: Parameters) -> dict[str, Any]:
    # The waypoint's identity is its Gateway's name (as in Istio); the pod mounts only the
    # projected istio-ca token, never an API token.
    return {
        "apiVersion": SERVICE_ACCOUNT.api_version,
        "kind": SERVICE_ACCOUNT.kind,
        "metadata": _metadata(gateway, params),
        "automountServiceAccountToken": False,
    }


def render_deployment(
    gateway: Mapping[str, Any], params: Parameters, settings: WaypointSettings
) -> dict[str, Any]:
    ns, name, _ = _meta(gateway)
    pod_labels = {
        **params.labels,
        LABEL_GATEWAY_NAME: name,
        DATAPLANE_MODE_LABEL: "none",  # a waypoint speaks HBONE itself: never captured
        LABEL_MANAGED_BY: MANAGED_BY,
        "sidecar.istio.io/inject": "false",
    }
    pod_annotations = {
        **params.annotations,
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(PORT_METRICS),
        "prometheus.io/path": "/stats/prometheus",
    }
    container: dict[str, Any] = {
        "name": "waypoint",
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["waypoint"],
        "args": ["--gateway", f"{ns}/{name}"],
        "env": [
            {"name": "CA_ADDRESS", "value": settings.ca_address},
            {"name": "XDS_ADDRESS", "value": settings.ca_address},
            {"name": "TRUST_DOMAIN", "value": settings.trust_domain},
            {"name": "CA_ROOT_CERT", "value": ROOT_CERT_FILE},
            {"name": "TOKEN_FILE", "value": TOKEN_FILE},
            {"name": "GATEWAY_NAME", "value": name},
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        ],
        "ports": [
            {"name": "mesh", "containerPort": PORT_MESH, "protocol": "TCP"},
            {"name": "status-port", "containerPort": PORT_STATUS, "protocol": "TCP"},
            {"name": "metrics", "containerPort": PORT_METRICS, "protocol": "TCP"},
        ],
        "readinessProbe": {
            "httpGet": {"path": READY_PATH, "port": PORT_STATUS, "scheme": "HTTP"},
            "periodSeconds": 5,
            "failureThreshold": 3,
        },
        "resources": {"requests": dict(params.requests), "limits": dict(params.limits)},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "runAsUser": WAYPOINT_UID,
            "runAsGroup": WAYPOINT_UID,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "istio-token", "mountPath": TOKEN_DIR, "readOnly": True},
            {"name": ROOT_CERT_CONFIGMAP, "mountPath": ROOT_CERT_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    spec: dict[str, Any] = {
        "selector": {"matchLabels": _selector(name)},
        "template": {
            "metadata": {"labels": pod_labels, "annotations": pod_annotations},
            "spec": {
                "serviceAccountName": name,
                "automountServiceAccountToken": False,
                "terminationGracePeriodSeconds": 30,
                "securityContext": {
                    "runAsNonRoot": True,
                    "runAsUser": WAYPOINT_UID,
                    "runAsGroup": WAYPOINT_UID,
                    "fsGroup": WAYPOINT_UID,
                    "seccompProfile": {"type": "RuntimeDefault"},
                },
                "containers": [container],
                "volumes": [
                    {
                        "name": "istio-token",
                        "projected": {
                            "sources": [
                                {
                                    "serviceAccountToken": {
                                        "audience": TOKEN_AUDIENCE,
                                        "expirationSeconds": TOKEN_EXPIRATION_SECONDS,
                                        "path": "istio-token",
                                    }
                                }
                            ]
                        },
                    },
                    {"name": ROOT_CERT_CONFIGMAP, "configMap": {"name": ROOT_CERT_CONFIGMAP}},
                    {"name": "tmp", "emptyDir": {}},
                ],
            },
        },
    }
    if params.replicas is not None:
        spec["replicas"] = params.replicas
    return {
        "apiVersion": DEPLOYMENT.api_version,
        "kind": DEPLOYMENT.kind,
        "metadata": _metadata(gateway, params),
        "spec": spec,
    }


def render_service(gateway: Mapping[str, Any], params: Parameters) -> dict[str, Any]:
    _, name, _ = _meta(gateway)
    return {
        "apiVersion": SERVICE.api_version,
        "kind": SERVICE.kind,
        "metadata": _metadata(gateway, params),
        "spec": {
            "type": "ClusterIP",
            "selector": _selector(name),
            "ports": [
                {
                    "name": "mesh",
                    "port": PORT_MESH,
                    "targetPort": PORT_MESH,
                    "protocol": "TCP",
                    "appProtocol": "all",
                },
                {"name": "status-port", "port": PORT_STATUS, "targetPort": PORT_STATUS, "protocol": "TCP"},
                {"name": "metrics", "port": PORT_METRICS, "targetPort": PORT_METRICS, "protocol": "TCP"},
            ],
        },
    }


def render_pdb(gateway: Mapping[str, Any], params: Parameters) -> dict[str, Any]:
    _, name, _ = _meta(gateway)
    spec: dict[str, Any] = {
        "selector": {"matchLabels": _selector(name)},
        # A waypoint pod that is not ready serves nothing: never let it block a node drain.
        "unhealthyPodEvictionPolicy": "AlwaysAllow",
    }
    if params.pdb_min_available is not None:
        spec["minAvailable"] = params.pdb_min_available
    else:
        spec["maxUnavailable"] = params.pdb_max_unavailable
    return {
        "apiVersion": PDB.api_version,
        "kind": PDB.kind,
        "metadata": _metadata(gateway, params),
        "spec": spec,
    }


def render(
    gateway: Mapping[str, Any], params: Parameters, settings: WaypointSettings
) -> dict[ObjectKind, dict[str, Any]]:
    """Every object the waypoint of ``gateway`` needs, by kind (no PDB unless asked for), each
    stamped with the hash of its own rendering."""
    out = {
        SERVICE_ACCOUNT: render_service_account(gateway, params),
        DEPLOYMENT: render_deployment(gateway, params, settings),
        SERVICE: render_service(gateway, params),
    }
    if params.wants_pdb:
        out[PDB] = render_pdb(gateway, params)
    for obj in out.values():
        obj["metadata"]["annotations"][ANNOTATION_HASH] = config_hash(obj)
    return out


def config_hash(obj: Mapping[str, Any]) -> str:
    """Hash of a rendered object, without the hash annotation itself and the owner's uid (a
    re-created Gateway of the same parameters renders the same)."""
    clean = json.loads(json.dumps(obj))
    md = clean["metadata"]
    md.get("annotations", {}).pop(ANNOTATION_HASH, None)
    md.pop("ownerReferences", None)
    return hashlib.sha256(json.dumps(clean, sort_keys=True).encode()).hexdigest()[:16]


def contains(live: Any, wanted: Any) -> bool:
    """Every field of ``wanted`` has that value in ``live`` (maps: a subset; lists: same length,
    item by item): what the API server added by defaulting does not count as a difference."""
    if isinstance(wanted, Mapping):
        return isinstance(live, Mapping) and all(
            k in live and contains(live[k], v) for k, v in wanted.items()
        )
    if isinstance(wanted, list):
        return isinstance(live, list) and len(live) == len(wanted) and all(map(contains, live, wanted))
    return bool(live == wanted)


def is_ours(obj: Mapping[str, Any]) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return bool(labels.get(LABEL_MANAGED_BY) == MANAGED_BY)


def up_to_date(live: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    live_md = live.get("metadata") or {}
    wanted_md = wanted["metadata"]
    if (live_md.get("annotations") or {}).get(ANNOTATION_HASH) != wanted_md["annotations"][ANNOTATION_HASH]:
        return False
    if live_md.get("ownerReferences") != wanted_md["ownerReferences"]:
        return False
    body = {k: v for k, v in wanted.items() if k not in ("metadata", "apiVersion", "kind")}
    meta = {"labels": wanted_md["labels"], "annotations": wanted_md["annotations"]}
    return contains(live, body) and contains(live_md, meta)


def replacement(live: Mapping[str, Any], wanted: Mapping[str, Any], kind: ObjectKind) -> dict[str, Any]:
    """The PUT body that makes ``live`` what we want, keeping what is not ours to decide: other
    writers' labels, annotations and finalizers, the resourceVersion read (so a concurrent
    change is a 409, not lost), a Service's allocated addresses, a Deployment's replica count
    when no replicas are asked for (an autoscaler's)."""
    out: dict[str, Any] = json.loads(json.dumps(wanted))
    live_md = live.get("metadata") or {}
    md = out["metadata"]
    md["resourceVersion"] = live_md.get("resourceVersion")
    md["labels"] = {**(live_md.get("labels") or {}), **md["labels"]}
    md["annotations"] = {**(live_md.get("annotations") or {}), **md["annotations"]}
    if live_md.get("finalizers"):
        md["finalizers"] = live_md["finalizers"]
    live_spec = live.get("spec") or {}
    if kind is SERVICE:
        for key in ("clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy"):
            if key in live_spec:
                out["spec"][key] = live_spec[key]
    if kind is DEPLOYMENT and "replicas" not in out["spec"] and "replicas" in live_spec:
        out["spec"]["replicas"] = live_spec["replicas"]
    if kind is SERVICE_ACCOUNT:
        for key in ("secrets", "imagePullSecrets"):
            if key in live:
                out[key] = live[key]
    return out


# --- status (pure) -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Condition:
    type: str
    status: bool
    reason: str
    message: str


def deployment_condition(deployment: Mapping[str, Any] | None) -> Condition:
    """``Programmed`` from the Deployment's status: True once a replica is ready."""
    if deployment is None:
        return Condition(PROGRAMMED, False, REASON_PENDING, "the waypoint Deployment does not exist yet")
    ref = f"{deployment['metadata'].get('namespace')}/{deployment['metadata'].get('name')}"
    spec = deployment.get("spec") or {}
    status = deployment.get("status") or {}
    wanted = spec.get("replicas", 1)
    ready = status.get("readyReplicas") or 0
    if wanted == 0:
        return Condition(
            PROGRAMMED, False, REASON_NO_RESOURCES, f"Deployment {ref} is scaled to zero replicas"
        )
    if ready > 0:
        return Condition(
            PROGRAMMED, True, REASON_PROGRAMMED, f"{ready}/{wanted} replicas of Deployment {ref} ready"
        )
    return Condition(PROGRAMMED, False, REASON_PENDING, f"0/{wanted} replicas of Deployment {ref} ready")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def desired_status(
    gateway: Mapping[str, Any],
    conditions: Iterable[Condition],
    addresses: list[dict[str, str]] | None,
    now: Callable[[], str] = _now,
) -> dict[str, Any] | None:
    """The status to merge-patch, or None when the Gateway already says all of it.

    Conditions of other types are kept; ``lastTransitionTime`` moves only when the status does.
    """
    status = gateway.get("status") or {}
    current = [c for c in status.get("conditions") or [] if isinstance(c, Mapping)]
    generation = (gateway.get("metadata") or {}).get("generation")
    ours = {c.type: c for c in conditions}
    new: list[dict[str, Any]] = [dict(c) for c in current if c.get("type") not in ours]
    changed = False
    for cond in ours.values():
        old = next((c for c in current if c.get("type") == cond.type), None)
        text = "True" if cond.status else "False"
        same_status = old is not None and old.get("status") == text
        entry: dict[str, Any] = {
            "type": cond.type,
            "status": text,
            "reason": cond.reason,
            "message": cond.message,
            "lastTransitionTime": (old or {}).get("lastTransitionTime") if same_status else now(),
        }
        if isinstance(generation, int):
            entry["observedGeneration"] = generation
        if old is None or any(old.get(k) != v for k, v in entry.items()):
            changed = True
        new.append(entry)
    out: dict[str, Any] = {"conditions": new}
    if addresses is not None:
        out["addresses"] = addresses
        changed = changed or status.get("addresses") != addresses
    return out if changed else None


# --- the API -----------------------------------------------------------------------------------


class ApiError(Exception):
    """The API server refused a request (or could not be reached: ``status`` 0)."""

    def __init__(self, method: str, what: str, status: int, reason: str, message: str) -> None:
        super().__init__(
            f"{method} {what}: HTTP {status} {reason}: {message}" if status else f"{method} {what}: {message}"
        )
        self.method = method
        self.what = what
        self.status = status
        self.reason = reason
        self.message = message


class NotOurs(Exception):
    """An object of the waypoint's name exists and was not made by this controller."""


class KubeApi:
    """The few REST calls the controller makes, with JSON in and out, over the ``kubernetes``
    client's ApiClient (its configuration, auth and connection pool). Blocking: call it from a
    worker thread."""

    def __init__(self, api_client: Any, *, timeout: tuple[float, float] = (10.0, 30.0)) -> None:
        self._api = api_client
        self._timeout = timeout

    def _call(
        self,
        method: str,
        path: str,
        what: str,
        *,
        body: Any = None,
        query: list[tuple[str, str]] | None = None,
        content_type: str = "application/json",
    ) -> tuple[int, Any]:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        try:
            request = self._api.param_serialize(
                method=method,
                resource_path=path,
                query_params=query or [],
                header_params=headers,
                body=body,
                auth_settings=["BearerToken"],
            )
            resp = self._api.call_api(*request, _request_timeout=self._timeout)
            data = resp.read()
        except Exception as e:  # connection refused, timeout, TLS: a failure like any other
            raise ApiError(method, what, 0, "", f"{type(e).__name__}: {e}") from None
        try:
            payload = json.loads(data) if data else None
        except ValueError:
            payload = None
        if not 200 <= resp.status <= 299:
            if isinstance(payload, Mapping):
                raise ApiError(
                    method, what, resp.status, str(payload.get("reason", "")), str(payload.get("message", ""))
                )
            raise ApiError(method, what, resp.status, "", (data or b"")[:200].decode(errors="replace"))
        return resp.status, payload

    def get(self, kind: ObjectKind, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            _, obj = self._call("GET", kind.path(namespace, name), f"{kind.kind} {namespace}/{name}")
        except ApiError as e:
            if e.status == 404:
                return None
            raise
        return dict(obj)

    def create(self, kind: ObjectKind, obj: Mapping[str, Any]) -> dict[str, Any]:
        md = obj["metadata"]
        _, out = self._call(
            "POST", kind.path(md["namespace"]), f"{kind.kind} {md['namespace']}/{md['name']}", body=obj
        )
        return dict(out)

    def replace(self, kind: ObjectKind, obj: Mapping[str, Any]) -> dict[str, Any]:
        md = obj["metadata"]
        _, out = self._call(
            "PUT",
            kind.path(md["namespace"], md["name"]),
            f"{kind.kind} {md['namespace']}/{md['name']}",
            body=obj,
        )
        return dict(out)

    def delete(self, kind: ObjectKind, namespace: str, name: str, uid: str) -> None:
        """Delete that very object (uid precondition); already gone is fine."""
        body = {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "preconditions": {"uid": uid},
            "propagationPolicy": "Background",
        }
        try:
            self._call("DELETE", kind.path(namespace, name), f"{kind.kind} {namespace}/{name}", body=body)
        except ApiError as e:
            if e.status != 404:
                raise

    def gateway(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The Gateway, listed by name (the control plane may list Gateways, not get them)."""
        _, out = self._call(
            "GET",
            GATEWAY.path(namespace),
            f"Gateway {namespace}/{name}",
            query=[("fieldSelector", f"metadata.name={name}")],
        )
        items = [i for i in (out or {}).get("items") or [] if (i.get("metadata") or {}).get("name") == name]
        if not items:
            return None
        gw = dict(items[0])
        gw.setdefault("apiVersion", GATEWAY_API_VERSION)
        gw.setdefault("kind", "Gateway")
        gw["metadata"].setdefault("namespace", namespace)
        return gw

    def patch_gateway_status(
        self, namespace: str, name: str, resource_version: str, status: Mapping[str, Any]
    ) -> None:
        """Merge-patch the status subresource; the resourceVersion read makes it conditional."""
        self._call(
            "PATCH",
            GATEWAY.path(namespace, name) + "/status",
            f"Gateway {namespace}/{name} status",
            body={"metadata": {"resourceVersion": resource_version}, "status": status},
            content_type="application/merge-patch+json",
        )


# --- one reconcile (blocking) ------------------------------------------------------------------


class Outcome(Enum):
    GONE = "gone"  # no waypoint Gateway: its objects were removed
    PROGRAMMED = "programmed"  # ready; look again at the next resync
    PENDING = "pending"  # objects in place, not ready yet: look again soon
    INVALID = "invalid"  # the Gateway's parameters are wrong: nothing to do until it changes


class Reconciler:
    """Makes the API hold what one Gateway asks for. Blocking; raises :class:`ApiError` (and
    :class:`NotOurs`) for the caller to log and retry."""

    def __init__(self, api: KubeApi, settings: WaypointSettings) -> None:
        self.api = api
        self.settings = settings

    def reconcile(self, key: str) -> Outcome:
        namespace, _, name = key.partition("/")
        gw = self.api.gateway(namespace, name)
        md = (gw or {}).get("metadata") or {}
        if (
            gw is None
            or (gw.get("spec") or {}).get("gatewayClassName") != WAYPOINT_GATEWAY_CLASS
            or md.get("deletionTimestamp")
        ):
            self.remove(namespace, name)
            return Outcome.GONE
        try:
            params = parameters(gw)
        except InvalidParameters as e:
            log.warning("waypoint gateway has invalid parameters", gateway=key, reason=str(e))
            # The objects made from the last valid parameters stay: a typo must not take the
            # waypoint down.
            self.write_status(
                gw,
                [
                    Condition(ACCEPTED, False, REASON_INVALID_PARAMETERS, str(e)),
                    Condition(
                        PROGRAMMED,
                        False,
                        REASON_INVALID,
                        "not deployed: the Gateway's parameters are invalid",
                    ),
                ],
                None,
            )
            return Outcome.INVALID
        accepted = Condition(
            ACCEPTED, True, REASON_ACCEPTED, "deployed by the ambient-mesh waypoint controller"
        )
        try:
            live = {kind: self.ensure(kind, obj) for kind, obj in render(gw, params, self.settings).items()}
            if PDB not in live:
                self.remove_one(PDB, namespace, name)
        except NotOurs as e:
            self._report(gw, [accepted, Condition(PROGRAMMED, False, REASON_INVALID, str(e))])
            raise
        except ApiError as e:
            if e.status in (400, 403, 422):  # refused as such: say it where the user looks
                self._report(gw, [accepted, Condition(PROGRAMMED, False, REASON_INVALID, str(e))])
            raise
        programmed = deployment_condition(live[DEPLOYMENT])
        ip = (live[SERVICE].get("spec") or {}).get("clusterIP")
        addresses = [{"type": "IPAddress", "value": ip}] if ip and ip != "None" else None
        self.write_status(gw, [accepted, programmed], addresses)
        return Outcome.PROGRAMMED if programmed.status else Outcome.PENDING

    def ensure(self, kind: ObjectKind, wanted: dict[str, Any]) -> dict[str, Any]:
        """The live object after making it match ``wanted`` (written only when it does not)."""
        md = wanted["metadata"]
        ns, name = md["namespace"], md["name"]
        live = self.api.get(kind, ns, name)
        if live is None:
            created = self.api.create(kind, wanted)
            log.info("created waypoint object", object=f"{kind.kind} {ns}/{name}")
            return created
        if not is_ours(live):
            raise NotOurs(f"{kind.kind} {ns}/{name} exists and is not managed by the waypoint controller")
        if up_to_date(live, wanted):
            return live
        replaced = self.api.replace(kind, replacement(live, wanted, kind))
        log.info("updated waypoint object", object=f"{kind.kind} {ns}/{name}")
        return replaced

    def remove(self, namespace: str, name: str) -> None:
        for kind in MANAGED_KINDS:
            self.remove_one(kind, namespace, name)

    def remove_one(self, kind: ObjectKind, namespace: str, name: str) -> None:
        live = self.api.get(kind, namespace, name)
        if live is None or not is_ours(live):
            return
        self.api.delete(kind, namespace, name, live["metadata"]["uid"])
        log.info("deleted waypoint object", object=f"{kind.kind} {namespace}/{name}")

    def _report(self, gw: Mapping[str, Any], conditions: list[Condition]) -> None:
        """Best effort, on the way to raising the failure itself (which is what gets logged)."""
        try:
            self.write_status(gw, conditions, None)
        except ApiError as e:
            log.warning(
                "could not write waypoint gateway status", object=e.what, status=e.status, error=e.message
            )

    def write_status(
        self, gw: Mapping[str, Any], conditions: list[Condition], addresses: list[dict[str, str]] | None
    ) -> None:
        status = desired_status(gw, conditions, addresses)
        if status is None:
            return
        ns, name, _ = _meta(gw)
        self.api.patch_gateway_status(ns, name, gw["metadata"]["resourceVersion"], status)
        log.info(
            "wrote waypoint gateway status",
            gateway=f"{ns}/{name}",
            **{c.type: f"{c.status} ({c.reason})" for c in conditions},
        )


# --- the controller (asyncio) ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ControllerTiming:
    resync: float = 300.0  # every waypoint, even a ready one, is looked at this often
    status_poll: float = 5.0  # a waypoint not ready yet is looked at this often
    backoff: Backoff = field(default_factory=lambda: Backoff(initial=1.0, maximum=300.0))


def affected_gateways(delta: Delta) -> set[str]:
    """Keys of the Gateways a store delta may concern: the Gateways themselves, and those whose
    pods (``gateway-name`` label) came, changed or went (a hint that readiness changed)."""
    keys = set(delta.upserted_keys(Kind.GATEWAY)) | set(delta.removed_keys(Kind.GATEWAY))
    for uid in delta.upserted_keys(Kind.WORKLOAD):
        w = delta.snapshot.workloads.get(uid)
        if w is not None and LABEL_GATEWAY_NAME in w.labels:
            keys.add(f"{w.namespace}/{w.labels[LABEL_GATEWAY_NAME]}")
    for uid in delta.removed_keys(Kind.WORKLOAD):
        w = delta.previous.workloads.get(uid)
        if w is not None and LABEL_GATEWAY_NAME in w.labels:
            keys.add(f"{w.namespace}/{w.labels[LABEL_GATEWAY_NAME]}")
    return keys


class WaypointController:
    """Queues Gateway keys from store deltas and reconciles them one at a time on a worker
    thread, with backoff on failure, a short poll until ready and a periodic resync.

    ``start()`` (in the event loop) subscribes and queues every Gateway already in the store;
    ``aclose()`` stops it, waiting for a reconcile in flight (bounded by the API timeouts).
    """

    def __init__(
        self,
        store: Store,
        reconciler: Reconciler,
        *,
        timing: ControllerTiming | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._store = store
        self._reconciler = reconciler
        self._timing = timing or ControllerTiming()
        self._rand = rand
        self._due: dict[str, float] = {}  # key -> loop time it is due
        self._attempts: dict[str, int] = {}
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._stopping = False
        self._idle_waiters: list[asyncio.Future[None]] = []
        self._seen: dict[str, tuple[Any, str]] = {}  # key -> (generation, labels+annotations)
        self.reconciles = 0  # completed reconciles (successful or not), for tests and metrics

    def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("WaypointController already started")
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._unsubscribe = self._store.subscribe(self._on_delta)
        self.enqueue(self._store.snapshot().gateways)
        self._task = asyncio.create_task(self._run(), name="waypoint-controller")
        self._task.add_done_callback(_report_exit)
        log.info("waypoint controller started", image=self._reconciler.settings.image)

    async def aclose(self, timeout: float = 40.0) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        self._stopping = True
        if self._wake is not None:
            self._wake.set()
        task, self._task = self._task, None
        if task is None:
            return
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if not done:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        log.info("waypoint controller stopped")

    # --- queue ----------------------------------------------------------------------------

    def on_watch_event(self, plural: str, etype: str, obj: Mapping[str, Any]) -> None:
        """The Kubernetes source's ``on_event`` hook (its Gateway watcher thread).

        The store's Gateway holds only what discovery needs, so a change of the spec it does
        not model (``spec.infrastructure``) makes no delta; the watch event says it. Events that
        change neither the generation nor labels and annotations (our own status writes) are
        skipped.
        """
        if plural != GATEWAY.plural or etype == "BOOKMARK":
            return
        md = obj.get("metadata") or {}
        key = f"{md.get('namespace')}/{md.get('name')}"
        seen = (md.get("generation"), json.dumps([md.get("labels"), md.get("annotations")], sort_keys=True))
        if etype == "DELETED":
            self._seen.pop(key, None)
        elif self._seen.get(key) == seen:
            return
        else:
            self._seen[key] = seen
        self._hand_over({key})

    def _on_delta(self, delta: Delta) -> None:
        """Store subscriber: any thread."""
        self._hand_over(affected_gateways(delta))

    def _hand_over(self, keys: set[str]) -> None:
        loop = self._loop
        if not keys or loop is None:
            return
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self.enqueue(keys)
        else:
            with contextlib.suppress(RuntimeError):  # loop closed: we are stopping
                loop.call_soon_threadsafe(self.enqueue, keys)

    def enqueue(self, keys: Iterable[str], delay: float = 0.0) -> None:
        """Queue ``keys`` to be reconciled in ``delay`` seconds (sooner if already due sooner).
        Event-loop thread only."""
        if self._loop is None or self._stopping:
            return
        due = self._loop.time() + delay
        for key in keys:
            if key not in self._due or self._due[key] > due:
                self._due[key] = due
        if self._wake is not None:
            self._wake.set()

    async def wait_idle(self, timeout: float = 30.0) -> None:
        """Wait until nothing is due now (tests: a reconcile pass has finished)."""
        assert self._loop is not None
        fut: asyncio.Future[None] = self._loop.create_future()
        self._idle_waiters.append(fut)
        if self._wake is not None:
            self._wake.set()
        await asyncio.wait_for(fut, timeout)

    def _wake_idle(self) -> None:
        waiters, self._idle_waiters = self._idle_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    # --- work -----------------------------------------------------------------------------

    async def _run(self) -> None:
        assert self._loop is not None and self._wake is not None
        while not self._stopping:
            now = self._loop.time()
            ready = [k for k, t in self._due.items() if t <= now]
            if not ready:
                self._wake_idle()
                self._wake.clear()
                timeout = min(self._due.values()) - now if self._due else None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
                continue
            key = min(ready, key=lambda k: self._due[k])
            del self._due[key]
            await self._reconcile(key)
        self._wake_idle()

    async def _reconcile(self, key: str) -> None:
        timing = self._timing
        try:
            outcome = await asyncio.to_thread(self._reconciler.reconcile, key)
        except Exception as e:
            attempt = self._attempts.get(key, 0)
            self._attempts[key] = attempt + 1
            delay = timing.backoff.delay(attempt, self._rand)
            fields: dict[str, Any] = {"gateway": key, "attempt": attempt + 1, "retry_in": round(delay, 3)}
            if isinstance(e, ApiError):
                fields.update(
                    object=e.what, method=e.method, status=e.status, reason=e.reason, error=e.message
                )
            else:
                fields["error"] = f"{type(e).__name__}: {e}"
            if isinstance(e, ApiError | NotOurs):
                log.warning("waypoint reconcile failed, retrying", **fields)
            else:
                log.exception("waypoint reconcile failed unexpectedly, retrying", **fields)
            self.enqueue([key], delay)
        else:
            self._attempts.pop(key, None)
            if outcome is Outcome.PENDING:
                self.enqueue([key], timing.status_poll)
            elif outcome is not Outcome.GONE:
                self.enqueue([key], timing.resync)
        finally:
            self.reconciles += 1


def _report_exit(task: asyncio.Task[None]) -> None:
    """A bug in the queue loop stops waypoint management, never the control plane: say so."""
    if not task.cancelled() and task.exception() is not None:
        log.error("waypoint controller stopped on an error", exc_info=task.exception())
