"""The mesh's view of Kubernetes objects: what routing, identity and enrollment need, typed.

These are not Kubernetes objects (that is :mod:`sources.convert`'s job): every field is
already validated and defaulted, so code that reads them can trust them. Labels and annotations
are kept whole because enrollment and waypoint selection are decided from them elsewhere.
All are frozen, slotted and hashable so the store can share one instance with every reader
and tell a real change from a re-delivery by ``==``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import ClassVar

from mesh.identity import Identity
from mesh.model.frozen import FrozenMap, freeze_fields, tuple_fields

DEFAULT_TRUST_DOMAIN = "cluster.local"
DEFAULT_CLUSTER_DOMAIN = "cluster.local"
DEFAULT_SERVICE_ACCOUNT = "default"
WAYPOINT_GATEWAY_CLASS = "istio-waypoint"

# Label keys of Istio's user-facing API that the model interprets itself.
LABEL_USE_WAYPOINT = "istio.io/use-waypoint"
LABEL_USE_WAYPOINT_NAMESPACE = "istio.io/use-waypoint-namespace"
LABEL_WAYPOINT_FOR = "istio.io/waypoint-for"
# Set by the node agent once a pod's traffic is redirected; istiod derives HBONE from it too.
ANNOTATION_REDIRECTION = "ambient.istio.io/redirection"
# Gateway API: on a Gateway's pods, which Gateway they implement.
LABEL_GATEWAY_NAME = "gateway.networking.k8s.io/gateway-name"
# Ours (PROTOCOLS.md). On a waypoint Gateway: the one service account whose workloads it serves.
ANNOTATION_FOR_SERVICE_ACCOUNT = "ambient-mesh.io/for-service-account"
# On a namespace or pod: "strict" = its node proxy accepts only its waypoint (fails closed).
ANNOTATION_WAYPOINT_MODE = "ambient-mesh.io/waypoint-mode"

_NO_LABELS: FrozenMap[str, str] = FrozenMap()
_NO_PORTS: FrozenMap[str, int] = FrozenMap()


class Kind(enum.StrEnum):
    """The kinds of object the store holds; the value is the Kubernetes kind they come from."""

    NODE = "Node"
    NAMESPACE = "Namespace"
    SERVICE_ACCOUNT = "ServiceAccount"
    WORKLOAD = "Workload"  # from a Pod
    SERVICE = "Service"
    GATEWAY = "Gateway"
    PEER_AUTHENTICATION = "PeerAuthentication"
    AUTHORIZATION_POLICY = "AuthorizationPolicy"
    REQUEST_AUTHENTICATION = "RequestAuthentication"
    MESH_CONFIG = "ConfigMap"  # only the mesh ConfigMap (mesh.model.meshconfig)
    WAF_POLICY = "WafPolicy"  # extensions.ambient-mesh.io (mesh.model.waf)


class TunnelProtocol(enum.StrEnum):
    """How peers reach a workload; mirrors ``istio.workload.TunnelProtocol``."""

    NONE = "NONE"
    HBONE = "HBONE"


class WorkloadStatus(enum.StrEnum):
    HEALTHY = "HEALTHY"
    UNHEALTHY = "UNHEALTHY"


def namespaced_key(namespace: str, name: str) -> str:
    """Store key of namespaced kinds other than workloads: ``<namespace>/<name>``."""
    return f"{namespace}/{name}"


@dataclass(frozen=True, slots=True)
class WaypointRef:
    """A reference from ``istio.io/use-waypoint[-namespace]`` labels to a waypoint Gateway.

    Istio's label value ``none`` opts the object out of a waypoint its namespace would give
    it; it is kept as a reference named ``none`` (see :attr:`opts_out`) so the three states
    (unset, opted out, named) survive without a second field.
    """

    name: str
    namespace: str

    @property
    def opts_out(self) -> bool:
        return self.name == "none"

    @property
    def key(self) -> str:
        """The waypoint Gateway's store key."""
        return namespaced_key(self.namespace, self.name)


@dataclass(frozen=True, slots=True)
class Node:
    KIND: ClassVar[Kind] = Kind.NODE

    name: str
    labels: Mapping[str, str] = _NO_LABELS
    pod_cidrs: tuple[str, ...] = ()  # spec.podCIDRs (or spec.podCIDR); local mode places waypoints there

    def __post_init__(self) -> None:
        freeze_fields(self, "labels")
        tuple_fields(self, "pod_cidrs")

    @property
    def key(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class Namespace:
    KIND: ClassVar[Kind] = Kind.NAMESPACE

    name: str
    labels: Mapping[str, str] = _NO_LABELS
    annotations: Mapping[str, str] = _NO_LABELS
    waypoint: WaypointRef | None = None

    def __post_init__(self) -> None:
        freeze_fields(self, "labels", "annotations")

    @property
    def key(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class ServiceAccount:
    """Explicit ServiceAccount objects; a pod's account exists whether or not one is listed."""

    KIND: ClassVar[Kind] = Kind.SERVICE_ACCOUNT

    namespace: str
    name: str

    @property
    def key(self) -> str:
        return namespaced_key(self.namespace, self.name)


@dataclass(frozen=True, slots=True)
class Workload:
    """One pod. Keyed by its Kubernetes UID, which is also what ZDS identifies pods by."""

    KIND: ClassVar[Kind] = Kind.WORKLOAD

    uid: str
    name: str
    namespace: str
    node: str = ""  # empty while unscheduled
    service_account: str = DEFAULT_SERVICE_ACCOUNT
    ips: tuple[str, ...] = ()  # canonical text form, IPv4 and/or IPv6; empty if not yet known
    labels: Mapping[str, str] = _NO_LABELS
    annotations: Mapping[str, str] = _NO_LABELS
    network: str = ""
    tunnel_protocol: TunnelProtocol = TunnelProtocol.NONE
    waypoint: WaypointRef | None = None  # from the pod's own labels only
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    host_network: bool = False
    status: WorkloadStatus = WorkloadStatus.HEALTHY
    # container port name -> number, for Services whose targetPort is a name
    named_ports: Mapping[str, int] = _NO_PORTS
    creation_timestamp: datetime | None = None

    def __post_init__(self) -> None:
        freeze_fields(self, "labels", "annotations", "named_ports")
        tuple_fields(self, "ips")

    @property
    def key(self) -> str:
        return self.uid

    @property
    def identity(self) -> Identity:
        return Identity(self.trust_domain, self.namespace, self.service_account)


@dataclass(frozen=True, slots=True)
class ServicePort:
    port: int
    # A number, or the name of a container port (resolved per workload via named_ports).
    target_port: int | str
    name: str = ""
    app_protocol: str | None = None
    protocol: str = "TCP"

    def target_for(self, workload: Workload) -> int | None:
        """The port to dial on ``workload``; None when a named target port is not declared."""
        if isinstance(self.target_port, int):
            return self.target_port
        return workload.named_ports.get(self.target_port)


@dataclass(frozen=True, slots=True)
class Service:
    KIND: ClassVar[Kind] = Kind.SERVICE

    namespace: str
    name: str
    vips: tuple[str, ...] = ()  # empty for headless services
    ports: tuple[ServicePort, ...] = ()
    # None: no selector, endpoints are not derived from pods (as in Kubernetes).
    selector: Mapping[str, str] | None = None
    labels: Mapping[str, str] = _NO_LABELS
    annotations: Mapping[str, str] = _NO_LABELS
    waypoint: WaypointRef | None = None  # from the service's own labels only
    cluster_domain: str = DEFAULT_CLUSTER_DOMAIN
    creation_timestamp: datetime | None = None

    def __post_init__(self) -> None:
        freeze_fields(self, "selector", "labels", "annotations")
        tuple_fields(self, "vips", "ports")

    @property
    def key(self) -> str:
        return namespaced_key(self.namespace, self.name)

    @property
    def hostname(self) -> str:
        return f"{self.name}.{self.namespace}.svc.{self.cluster_domain}"

    def port(self, number: int, protocol: str = "TCP") -> ServicePort | None:
        for p in self.ports:
            if p.port == number and p.protocol == protocol:
                return p
        return None

    def selects(self, workload: Workload) -> bool:
        """Kubernetes semantics: same namespace, and a non-empty selector all of whose labels
        the pod carries. An empty or missing selector selects nothing."""
        if not self.selector or workload.namespace != self.namespace:
            return False
        labels = workload.labels
        return all(labels.get(k) == v for k, v in self.selector.items())


@dataclass(frozen=True, slots=True)
class GatewayListener:
    name: str
    port: int
    protocol: str
    hostname: str | None = None


@dataclass(frozen=True, slots=True)
class Gateway:
    """A Gateway API Gateway; with class ``istio-waypoint`` it declares a waypoint."""

    KIND: ClassVar[Kind] = Kind.GATEWAY

    namespace: str
    name: str
    gateway_class: str
    listeners: tuple[GatewayListener, ...] = ()
    labels: Mapping[str, str] = _NO_LABELS
    annotations: Mapping[str, str] = _NO_LABELS
    creation_timestamp: datetime | None = None

    def __post_init__(self) -> None:
        freeze_fields(self, "labels", "annotations")
        tuple_fields(self, "listeners")

    @property
    def key(self) -> str:
        return namespaced_key(self.namespace, self.name)

    @property
    def is_waypoint(self) -> bool:
        return self.gateway_class == WAYPOINT_GATEWAY_CLASS

    @property
    def waypoint_for(self) -> str:
        """``service`` (Istio's default), ``workload``, ``all`` or ``none``."""
        return self.labels.get(LABEL_WAYPOINT_FOR, "service")

    @property
    def for_service_account(self) -> str | None:
        """The one service account a per-account waypoint serves; None for a namespace waypoint."""
        return self.annotations.get(ANNOTATION_FOR_SERVICE_ACCOUNT) or None
