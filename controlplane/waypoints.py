"""Which waypoint a workload's or a service's traffic must pass, and who a waypoint policy is for.

Istio's rules first (istiod's ``pilot/pkg/serviceregistry/ambient``): ``istio.io/use-waypoint``
on the object, else on its namespace (``none`` opts out), names a ``Gateway`` of class
``istio-waypoint``; it is used only when that Gateway exists and serves that kind of traffic
(``istio.io/waypoint-for``: ``service`` by default, ``workload``, ``all``, ``none``), so a
missing waypoint fails open to direct delivery. On top of them, two of ours (PROTOCOLS.md):

* **Per-service-account waypoints**: a waypoint Gateway annotated
  ``ambient-mesh.io/for-service-account: <sa>`` serves only the workloads running as ``<sa>``
  in its namespace. It binds them by itself (as Istio's annotation of the same purpose did before
  1.22): more specific than the namespace's label, less than the pod's own. A binding that names
  such a waypoint for a workload of another account is not used. Service traffic reaches it
  endpoint first: the service itself gets no waypoint from a per-account Gateway, the source
  picks an endpoint and sends to that endpoint's waypoint (``account_for`` tells the source which
  traffic that is), so one account's waypoint never handles another account's requests.
* **Strict waypoint mode** (``ambient-mesh.io/waypoint-mode: strict`` on the pod or its
  namespace): every connection to the workload must pass its waypoint. The waypoint is sent even
  when it does not exist (the source then refuses: fail closed) and whatever it serves, and the
  workload's node proxy accepts HBONE only from it.

A waypoint runs as the service account named after its Gateway (as in Istio); the waypoint
policies (bound with ``targetRefs``) are sent only to the waypoints they bind to:
:func:`policy_audiences`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from mesh.model import Gateway, Service, Snapshot, Workload
from mesh.model.objects import ANNOTATION_WAYPOINT_MODE, LABEL_GATEWAY_NAME, WaypointRef
from mesh.model.policy import ROOT_NAMESPACE, PolicyTargetRef

GATEWAY_GROUP = "gateway.networking.k8s.io"
_FOR_WORKLOADS = frozenset({"workload", "all"})
_FOR_SERVICES = frozenset({"service", "all"})


@dataclass(frozen=True, slots=True)
class WaypointBinding:
    """What discovery says about a workload's waypoint.

    ``ref`` is sent as ``Workload.waypoint``; ``account_for`` is set when it is a per-account
    waypoint (``service`` / ``workload`` / ``all``: which traffic it takes); ``problem`` says
    why a named waypoint is not used (logged, and reported in status).
    """

    ref: WaypointRef | None = None
    account_for: str = ""
    strict: bool = False
    problem: str | None = None


NO_WAYPOINT = WaypointBinding()


def waypoint_account(gw: Gateway | WaypointRef) -> tuple[str, str]:
    """(namespace, service account) the waypoint of ``gw`` runs as: named after the Gateway."""
    return gw.namespace, gw.name


def is_waypoint_pod(workload: Workload, snapshot: Snapshot) -> bool:
    """A pod implementing a waypoint (never bound to one itself)."""
    name = workload.labels.get(LABEL_GATEWAY_NAME)
    if not name:
        return False
    gw = snapshot.gateways.get(f"{workload.namespace}/{name}")
    return gw is not None and gw.is_waypoint


def is_strict(workload: Workload, snapshot: Snapshot) -> bool:
    """Strict waypoint mode: the pod's annotation, else its namespace's."""
    mode = workload.annotations.get(ANNOTATION_WAYPOINT_MODE)
    if mode is None:
        ns = snapshot.namespaces.get(workload.namespace)
        mode = ns.annotations.get(ANNOTATION_WAYPOINT_MODE) if ns is not None else None
    return (mode or "").lower() == "strict"


def account_waypoint(workload: Workload, snapshot: Snapshot) -> Gateway | None:
    """The per-account waypoint of the workload's service account, the oldest if several."""
    found = [
        gw
        for gw in snapshot.gateways.values()
        if gw.namespace == workload.namespace
        and gw.is_waypoint
        and gw.for_service_account == workload.service_account
    ]
    if not found:
        return None
    return min(found, key=lambda g: (g.creation_timestamp is None, g.creation_timestamp or 0, g.name))


def _namespace_ref(namespace: str, snapshot: Snapshot) -> WaypointRef | None:
    ns = snapshot.namespaces.get(namespace)
    return ns.waypoint if ns is not None else None


def workload_binding(workload: Workload, snapshot: Snapshot) -> WaypointBinding:
    """The waypoint pod-addressed (and, for per-account waypoints, service) traffic must pass."""
    if is_waypoint_pod(workload, snapshot):
        return NO_WAYPOINT
    strict = is_strict(workload, snapshot)
    own = workload.waypoint
    ns_ref = _namespace_ref(workload.namespace, snapshot)
    if (own is not None and own.opts_out) or (own is None and ns_ref is not None and ns_ref.opts_out):
        return WaypointBinding(
            strict=strict, problem="opted out (istio.io/use-waypoint: none)" if strict else None
        )
    if own is None:
        acct = account_waypoint(workload, snapshot)
        if acct is not None and (acct.waypoint_for != "none" or strict):
            return WaypointBinding(
                WaypointRef(acct.name, acct.namespace), account_for=acct.waypoint_for, strict=strict
            )
    ref = own if own is not None else ns_ref
    if ref is None:
        return WaypointBinding(
            strict=strict, problem="strict waypoint mode without a waypoint" if strict else None
        )
    gw = snapshot.gateways.get(ref.key)
    if gw is None or not gw.is_waypoint:
        problem = f"waypoint {ref.key} does not exist"
        return WaypointBinding(ref if strict else None, strict=strict, problem=problem)
    sa = gw.for_service_account
    if sa is not None and sa != workload.service_account:
        problem = f"waypoint {ref.key} serves only service account {sa!r}"
        return WaypointBinding(ref if strict else None, strict=strict, problem=problem)
    account_for = gw.waypoint_for if sa is not None else ""
    if strict or account_for or gw.waypoint_for in _FOR_WORKLOADS:
        return WaypointBinding(ref, account_for=account_for, strict=strict)
    return WaypointBinding(strict=strict)  # a service waypoint: pod-addressed traffic skips it, as in Istio


def service_waypoint(service: Service, snapshot: Snapshot) -> WaypointRef | None:
    """The waypoint service-addressed traffic must pass: its label, else its namespace's.

    A per-account waypoint is never a service's: its workloads' bindings carry it instead.
    """
    if _is_waypoint_service(service, snapshot):
        return None
    ref = service.waypoint if service.waypoint is not None else _namespace_ref(service.namespace, snapshot)
    if ref is None or ref.opts_out:
        return None
    gw = snapshot.gateways.get(ref.key)
    if gw is None or not gw.is_waypoint or gw.waypoint_for not in _FOR_SERVICES or gw.for_service_account:
        return None
    return ref


def _is_waypoint_service(service: Service, snapshot: Snapshot) -> bool:
    gw = snapshot.gateways.get(service.key)
    return gw is not None and gw.is_waypoint


# --- who receives which waypoint policy ------------------------------------------------------------


class Targeted(Protocol):
    """A policy bound with ``targetRefs`` (AuthorizationPolicy, RequestAuthentication)."""

    @property
    def namespace(self) -> str: ...
    @property
    def key(self) -> str: ...
    @property
    def target_refs(self) -> tuple[PolicyTargetRef, ...]: ...


def _gateway_refs(policy: Targeted) -> Iterable[tuple[str, str, str]]:
    """(kind, namespace, name) of each target; a target in another namespace binds nothing (istiod)."""
    for t in policy.target_refs:
        ns = t.namespace or policy.namespace
        if ns != policy.namespace:
            continue
        yield t.kind, ns, t.name


def waypoints_of_service(service: Service, snapshot: Snapshot) -> set[str]:
    """Keys (``ns/name``) of the waypoint Gateways that handle requests to ``service``."""
    found: set[str] = set()
    ref = service_waypoint(service, snapshot)
    if ref is not None:
        found.add(ref.key)
    for w in snapshot.endpoints(service.key):
        b = workload_binding(w, snapshot)
        if b.ref is not None and b.account_for in _FOR_SERVICES:
            found.add(b.ref.key)
    return found


def policy_audiences(policies: Iterable[Targeted], snapshot: Snapshot) -> Mapping[str, frozenset[str]]:
    """Policy key → the waypoint Gateways (``ns/name``) it binds to; selector policies are absent.

    ``Gateway`` targets name the waypoint, ``Service`` targets reach the waypoints that handle
    that service, and ``GatewayClass istio-waypoint`` in the root namespace reaches them all.
    """
    waypoints = [g for g in snapshot.gateways.values() if g.is_waypoint]
    out: dict[str, frozenset[str]] = {}
    for p in policies:
        if not p.target_refs:
            continue
        keys: set[str] = set()
        for kind, ns, name in _gateway_refs(p):
            if kind == "Gateway":
                gw = snapshot.gateways.get(f"{ns}/{name}")
                if gw is not None and gw.is_waypoint:
                    keys.add(gw.key)
            elif kind == "Service":
                svc = snapshot.services.get(f"{ns}/{name}")
                if svc is not None:
                    keys |= waypoints_of_service(svc, snapshot)
            elif kind == "GatewayClass" and ns == ROOT_NAMESPACE and name == "istio-waypoint":
                keys |= {g.key for g in waypoints}
        out[p.key] = frozenset(keys)
    return out
