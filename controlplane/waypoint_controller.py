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
  annotation, or a ``spec.infrastructure.parametersRef`` ConfigMap that is missing or sets what
  we do not support) and
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
made, as Istio does). As in Istio, ``spec.infrastructure.parametersRef`` may name a ConfigMap of
the Gateway's namespace whose keys ``deployment`` and ``podDisruptionBudget`` are YAML overlays
of those objects; of them we read ``spec.replicas``, the waypoint container's ``resources``
(container ``waypoint``, or Istio's ``istio-proxy``) and the PDB's ``minAvailable`` /
``maxUnavailable`` (they win over the annotations), and refuse anything else by name. The
ConfigMap is read at each reconcile (RBAC: ``get`` of configmaps): an edit of it takes effect
at the next one (the Gateway changing, or the resync).
"""

from __future__ import annotations

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

from controlplane import kubeapi
from controlplane.kubeapi import ApiError, ObjectKind
from controlplane.workqueue import WorkQueue
from mesh.enrollment import DATAPLANE_MODE_LABEL
from mesh.model import Delta, Kind, Store
from mesh.model.objects import LABEL_GATEWAY_NAME, WAYPOINT_GATEWAY_CLASS
from sources.boundedyaml import YamlRefused, load_one
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


def parameters_ref(gateway: Mapping[str, Any]) -> str | None:
    """The name of the ConfigMap ``spec.infrastructure.parametersRef`` names (in the Gateway's
    namespace), or None; raises :class:`InvalidParameters` for a reference to anything else."""
    infra = (gateway.get("spec") or {}).get("infrastructure") or {}
    ref = infra.get("parametersRef")
    if not ref:
        return None
    if not isinstance(ref, Mapping):
        raise InvalidParameters("spec.infrastructure.parametersRef must be an object")
    group, kind, name = ref.get("group", ""), ref.get("kind"), ref.get("name")
    if group not in ("", "core") or kind != "ConfigMap":
        raise InvalidParameters(
            f"spec.infrastructure.parametersRef: {group or 'core'}/{kind} is not supported; "
            'only a ConfigMap (group "", kind ConfigMap) of the Gateway\'s namespace'
        )
    if not isinstance(name, str) or not name:
        raise InvalidParameters("spec.infrastructure.parametersRef.name is required")
    return name


def parameters(gateway: Mapping[str, Any], config_map: Mapping[str, Any] | None = None) -> Parameters:
    """The waypoint's parameters from its Gateway's annotations, then from the ConfigMap its
    ``spec.infrastructure.parametersRef`` names (``config_map``, read by the caller), whose
    values win. Raises :class:`InvalidParameters`."""
    md = gateway.get("metadata") or {}
    ann: Mapping[str, str] = md.get("annotations") or {}
    spec = gateway.get("spec") or {}
    infra = spec.get("infrastructure") or {}
    if parameters_ref(gateway) is not None and config_map is None:
        raise InvalidParameters("spec.infrastructure.parametersRef: the ConfigMap was not read")
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
    if config_map is not None:
        overlay = config_map_parameters(config_map)
        if overlay.replicas is not None:
            replicas = overlay.replicas
        requests.update(overlay.requests)
        limits.update(overlay.limits)
        if overlay.pdb is not None:
            min_available, max_unavailable = overlay.pdb
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


# --- parametersRef ConfigMap (pure) ------------------------------------------------------------

# Its keys, as Istio names them: each a YAML overlay of the object of that kind. Ours reads the
# fields below out of them; anything else is refused by name rather than silently ignored.
PARAMETERS_DEPLOYMENT = "deployment"
PARAMETERS_PDB = "podDisruptionBudget"
# Container names an overlay may address: ours, and Istio's (so its examples carry over).
WAYPOINT_CONTAINERS = ("waypoint", "istio-proxy")


@dataclass(frozen=True, slots=True)
class Overlay:
    """What a parametersRef ConfigMap sets (None / empty: left as the annotations say)."""

    replicas: int | None = None
    requests: Mapping[str, str] = field(default_factory=dict)
    limits: Mapping[str, str] = field(default_factory=dict)
    pdb: tuple[int | str | None, int | str | None] | None = None  # (minAvailable, maxUnavailable)


def _only(obj: Any, allowed: Iterable[str], where: str) -> Mapping[str, Any]:
    allowed = sorted(allowed)
    if not isinstance(obj, Mapping):
        raise InvalidParameters(f"{where} must be a map")
    extra = sorted(str(k) for k in obj if k not in allowed)
    if extra:
        raise InvalidParameters(f"{where}.{extra[0]} is not supported (only {', '.join(allowed)})")
    return obj


def _quantities(obj: Any, where: str) -> dict[str, str]:
    out = {}
    for k, v in _only(obj, ("cpu", "memory"), where).items():
        text = str(v).strip() if isinstance(v, str | int) and not isinstance(v, bool) else ""
        if not _QUANTITY.match(text):
            raise InvalidParameters(f"{where}.{k}: {v!r} is not a Kubernetes quantity (e.g. 500m, 256Mi)")
        out[str(k)] = text
    return out


def _int_or_percent_value(value: Any, where: str) -> int | str:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        return _int_or_percent(where, value)
    raise InvalidParameters(f"{where}: {value!r} is neither a non-negative integer nor a percentage")


def config_map_parameters(config_map: Mapping[str, Any]) -> Overlay:
    """The parameters a Gateway's parametersRef ConfigMap sets, from its ``deployment`` key
    (``spec.replicas``, the waypoint container's ``resources``) and ``podDisruptionBudget`` key
    (``spec.minAvailable`` or ``spec.maxUnavailable``). Raises :class:`InvalidParameters`
    naming the key and field."""
    md = config_map.get("metadata") or {}
    ref = f"ConfigMap {md.get('namespace')}/{md.get('name')}"
    data = config_map.get("data") or {}
    _only(data, (PARAMETERS_DEPLOYMENT, PARAMETERS_PDB), f"{ref}: data")
    docs: dict[str, Any] = {}
    for key, text in data.items():
        try:
            docs[key] = load_one(str(text))
        except YamlRefused as e:
            raise InvalidParameters(f"{ref}: {key}: {e}") from None
    replicas: int | None = None
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if docs.get(PARAMETERS_DEPLOYMENT) is not None:
        where = f"{ref}: {PARAMETERS_DEPLOYMENT}"
        spec = _only(
            _only(docs[PARAMETERS_DEPLOYMENT], ("spec",), where).get("spec") or {},
            ("replicas", "template"),
            f"{where}.spec",
        )
        if "replicas" in spec:
            value = spec["replicas"]
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 1000:
                raise InvalidParameters(f"{where}.spec.replicas: {value!r} is not an integer from 0 to 1000")
            replicas = value
        template = _only(spec.get("template") or {}, ("spec",), f"{where}.spec.template")
        pod_spec = _only(template.get("spec") or {}, ("containers",), f"{where}.spec.template.spec")
        containers = pod_spec.get("containers") or []
        if not isinstance(containers, list):
            raise InvalidParameters(f"{where}.spec.template.spec.containers must be a list")
        for i, item in enumerate(containers):
            cwhere = f"{where}.spec.template.spec.containers[{i}]"
            c = _only(item, ("name", "resources"), cwhere)
            if c.get("name") not in WAYPOINT_CONTAINERS:
                raise InvalidParameters(
                    f"{cwhere}.name: {c.get('name')!r} is not the waypoint container "
                    f"({' or '.join(WAYPOINT_CONTAINERS)})"
                )
            resources = _only(c.get("resources") or {}, ("requests", "limits"), f"{cwhere}.resources")
            requests.update(_quantities(resources.get("requests") or {}, f"{cwhere}.resources.requests"))
            limits.update(_quantities(resources.get("limits") or {}, f"{cwhere}.resources.limits"))
    pdb: tuple[int | str | None, int | str | None] | None = None
    if docs.get(PARAMETERS_PDB) is not None:
        where = f"{ref}: {PARAMETERS_PDB}"
        spec = _only(
            _only(docs[PARAMETERS_PDB], ("spec",), where).get("spec") or {},
            ("minAvailable", "maxUnavailable"),
            f"{where}.spec",
        )
        if "minAvailable" in spec and "maxUnavailable" in spec:
            raise InvalidParameters(f"{where}.spec: minAvailable and maxUnavailable cannot both be set")
        if spec:
            pdb = (
                _int_or_percent_value(spec["minAvailable"], f"{where}.spec.minAvailable")
                if "minAvailable" in spec
                else None,
                _int_or_percent_value(spec["maxUnavailable"], f"{where}.spec.maxUnavailable")
                if "maxUnavailable" in spec
                else None,
            )
    return Overlay(replicas, requests, limits, pdb)


# --- rendering (pure) --------------------------------------------------------------------------


SERVICE_ACCOUNT = ObjectKind("v1", "ServiceAccount", "serviceaccounts")
DEPLOYMENT = ObjectKind("apps/v1", "Deployment", "deployments")
SERVICE = ObjectKind("v1", "Service", "services")
PDB = ObjectKind("policy/v1", "PodDisruptionBudget", "poddisruptionbudgets")
GATEWAY = ObjectKind(GATEWAY_API_VERSION, "Gateway", "gateways")
CONFIG_MAP = ObjectKind("v1", "ConfigMap", "configmaps")  # parametersRef: read only
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


class NotOurs(Exception):
    """An object of the waypoint's name exists and was not made by this controller."""


class KubeApi(kubeapi.KubeApi):
    """The generic calls plus the Gateway's own (listed by name, status merge-patched)."""

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
            params = parameters(gw, self.parameters_config_map(gw))
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

    def parameters_config_map(self, gw: Mapping[str, Any]) -> dict[str, Any] | None:
        """The ConfigMap the Gateway's parametersRef names, read now (None without one)."""
        name = parameters_ref(gw)
        if name is None:
            return None
        namespace = gw["metadata"]["namespace"]
        cm = self.api.get(CONFIG_MAP, namespace, name)
        if cm is None:
            raise InvalidParameters(
                f"spec.infrastructure.parametersRef: ConfigMap {namespace}/{name} does not exist"
            )
        return cm

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
    """Queues Gateway keys from store deltas and the Gateway watch, and reconciles them one at a
    time on a worker thread (:class:`~controlplane.workqueue.WorkQueue`), with backoff on
    failure, a short poll until ready and a periodic resync.

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
        self._queue = WorkQueue(
            "waypoint-controller",
            self._work,
            subject="waypoint",
            backoff=self._timing.backoff,
            describe=_describe,
            rand=rand,
        )
        self._unsubscribe: Callable[[], None] | None = None
        self._seen: dict[str, tuple[Any, str]] = {}  # key -> (generation, labels+annotations)

    @property
    def reconciles(self) -> int:
        """Completed reconciles (successful or not), for tests and metrics."""
        return self._queue.processed

    def start(self) -> None:
        self._queue.start()
        self._unsubscribe = self._store.subscribe(self._on_delta)
        self.enqueue(self._store.snapshot().gateways)
        log.info("waypoint controller started", image=self._reconciler.settings.image)

    async def aclose(self, timeout: float = 40.0) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        await self._queue.aclose(timeout)
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
        self._queue.hand_over({key})

    def _on_delta(self, delta: Delta) -> None:
        """Store subscriber: any thread."""
        self._queue.hand_over(affected_gateways(delta))

    def enqueue(self, keys: Iterable[str], delay: float = 0.0) -> None:
        """Queue ``keys`` to be reconciled in ``delay`` seconds (sooner if already due sooner).
        Event-loop thread only."""
        self._queue.enqueue(keys, delay)

    async def wait_idle(self, timeout: float = 30.0) -> None:
        """Wait until nothing is due now (tests: a reconcile pass has finished)."""
        await self._queue.wait_idle(timeout)

    # --- work (worker thread) -------------------------------------------------------------

    def _work(self, key: str) -> float | None:
        """One reconcile; when to look at the Gateway again."""
        outcome = self._reconciler.reconcile(key)
        if outcome is Outcome.PENDING:
            return self._timing.status_poll
        if outcome is Outcome.GONE:
            return None
        return self._timing.resync


def _describe(key: str, e: Exception) -> tuple[dict[str, Any], bool]:
    fields: dict[str, Any] = {"gateway": key}
    if isinstance(e, ApiError):
        fields.update(object=e.what, method=e.method, status=e.status, reason=e.reason, error=e.message)
    else:
        fields["error"] = f"{type(e).__name__}: {e}"
    return fields, isinstance(e, ApiError | NotOurs)
