"""What a waypoint may do with a CONNECT: which destination it names, whether this waypoint serves
it, how to speak to it, and which endpoints a request may go to. Pure functions of the state.

A waypoint serves a destination only when discovery says so, so a client that sends it traffic
for someone else gets nothing (400): a per-service-account waypoint never touches another
account's workloads, whatever a peer asks. For a service (CONNECT to ``VIP:port``) that means
the service names this waypoint, or it has endpoints bound to this waypoint as their account's;
requests then go only to the endpoints this waypoint serves. For a pod (CONNECT to
``pod IP:port``) the pod must name this waypoint.

The protocol is the service port's declaration (``appProtocol`` or the port name prefix, lowered
by the control plane); a pod-addressed port takes the declaration of the service port that
targets it, if any. Undeclared ports are sniffed; declared TCP (and TLS) is never delayed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mesh.model import WorkloadStatus
from mesh.xds.state import AppProtocol, GatewayAddress, ProxySnapshot, Service, Workload


@dataclass(frozen=True, slots=True)
class Me:
    """This waypoint: its Gateway's namespace and name."""

    namespace: str
    name: str

    def is_(self, gw: GatewayAddress | None) -> bool:
        if gw is None:
            return False
        if gw.hostname:
            return gw.namespace == self.namespace and gw.hostname.startswith(f"{self.name}.{self.namespace}.svc.")
        return False

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class Target:
    """The original destination of one CONNECT."""

    host: str
    port: int
    service: Service | None
    workload: Workload | None  # set when a pod was addressed
    protocol: AppProtocol

    @property
    def http(self) -> bool | None:
        """True: HTTP declared; False: declared not HTTP; None: undeclared (sniff)."""
        if self.protocol in (AppProtocol.HTTP11, AppProtocol.HTTP2, AppProtocol.GRPC):
            return True
        if self.protocol in (AppProtocol.TCP, AppProtocol.TLS):
            return False
        return None


def _serves_endpoint(me: Me, svc: Service, w: Workload) -> bool:
    """Whether ``me`` may deliver ``svc``'s traffic to endpoint ``w`` (module docstring)."""
    if w.waypoint_account_for in ("service", "all") or (w.waypoint_strict and svc.waypoint is None):
        return me.is_(w.waypoint)
    return me.is_(svc.waypoint)


def resolve(snapshot: ProxySnapshot, me: Me, host: str, port: int) -> Target | str:
    """The destination of a CONNECT to ``host:port``, or why this waypoint does not serve it."""
    svc = snapshot.service_by_address(host, port)
    if svc is not None:
        if not me.is_(svc.waypoint) and not any(
            _serves_endpoint(me, svc, e.workload) for e in snapshot.endpoints(svc.key)
        ):
            return f"service {svc.key} is not served by waypoint {me.key}"
        declared = svc.port(port)
        return Target(host, port, svc, None, declared.app_protocol if declared else AppProtocol.UNKNOWN)
    w = snapshot.workload_by_ip(host)
    if w is None:
        return f"{host} is neither a service nor a workload this waypoint knows"
    if not me.is_(w.waypoint):
        return f"workload {w.namespace}/{w.name} is not served by waypoint {me.key}"
    protocol = AppProtocol.UNKNOWN
    for key, ports in w.services.items():
        for p in ports:
            s = snapshot.services.get(key)
            target = w.target_port(s, p.service_port) if s is not None else None
            if target == port and p.app_protocol is not AppProtocol.UNKNOWN:
                protocol = p.app_protocol
    return Target(host, port, None, w, protocol)


def endpoints(snapshot: ProxySnapshot, me: Me, target: Target) -> Sequence[tuple[Workload, int]]:
    """(workload, port to dial) a request to ``target`` may go to: ready, served by ``me``."""
    if target.workload is not None:
        w = target.workload
        return [(w, target.port)] if w.addresses else []
    svc = target.service
    assert svc is not None
    out: list[tuple[Workload, int]] = []
    fallback: list[tuple[Workload, int]] = []
    for e in snapshot.endpoints(svc.key):
        w = e.workload
        dial = w.target_port(svc, target.port)
        if dial is None or not w.addresses or not _serves_endpoint(me, svc, w):
            continue
        (out if w.status is WorkloadStatus.HEALTHY else fallback).append((w, dial))
    return out or fallback


def service_of(snapshot: ProxySnapshot, target: Target) -> Service | None:
    """The service a request belongs to, for policy (targetRefs kind Service) and telemetry."""
    if target.service is not None:
        return target.service
    w = target.workload
    if w is None:
        return None
    for key in w.services:
        s = snapshot.services.get(key)
        if s is not None:
            return s
    return None


