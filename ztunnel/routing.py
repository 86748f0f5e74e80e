"""Decide-then-do outbound routing: a pure function of (state snapshot, connection facts) -> a plan.

Nothing here touches a socket; ``outbound.py`` performs the plan. The state is what discovery
carries (:mod:`mesh.xds.state`), so the rules are Istio's ztunnel's: a service VIP is
resolved to the service, which goes to its waypoint when it names one, else to one of the
workloads that list the service (on the target port they list); a pod IP goes to its
waypoint when it names one, else to that pod. Two additions of ours (controlplane/waypoints.py):
service traffic to an endpoint bound to its service account's waypoint goes to that waypoint,
the endpoint picked first so that one account's waypoint never sees another's requests; and a
workload in strict waypoint mode is reached through its waypoint whatever the addressing. HBONE
when the destination speaks it, plain TCP otherwise; unknown addresses pass through. A waypoint
that discovery names but that has no ready pod fails open to direct delivery (the plan's
``note`` says why, for the log), as a missing one does (the control plane names only waypoints
that exist) — except in strict waypoint mode, where it fails closed. Every case is a table row
in tests/ztunnel/test_routing.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mesh.hbone.protocol import format_authority
from mesh.identity import Identity
from mesh.model import TunnelProtocol, WorkloadStatus
from mesh.xds.state import HBONE_PORT, Endpoint, GatewayAddress, ProxySnapshot, Service, Workload

Chooser = Callable[[Sequence[Endpoint]], Endpoint]


def first(candidates: Sequence[Endpoint]) -> Endpoint:
    return candidates[0]


@dataclass(frozen=True, slots=True)
class Hbone:
    """Tunnel over HBONE to ``to`` (a pod's or a waypoint's HBONE port), CONNECT ``authority``."""

    to: tuple[str, int]
    authority: str
    expect: Identity
    dst_workload: Workload | None  # None when a waypoint picks the service's endpoint
    service: Service | None = None
    waypoint: Workload | None = None
    note: str = ""  # why a waypoint was skipped (failed open), for the log


@dataclass(frozen=True, slots=True)
class Passthrough:
    """Plain TCP to ``to`` (destination not in the mesh, or not speaking HBONE)."""

    to: tuple[str, int]
    dst_workload: Workload | None = None
    service: Service | None = None
    note: str = ""


@dataclass(frozen=True, slots=True)
class Deny:
    """Close the client: nothing sensible to send it to."""

    reason: str


Plan = Hbone | Passthrough | Deny


def _candidates(endpoints: Sequence[Endpoint], src: Workload | None, prefer_same_node: bool) -> tuple[Endpoint, ...]:
    usable = tuple(e for e in endpoints if e.workload.addresses)
    healthy = tuple(e for e in usable if e.workload.status is WorkloadStatus.HEALTHY) or usable
    if prefer_same_node and src is not None and src.node:
        local = tuple(e for e in healthy if e.workload.node == src.node)
        if local:
            return local
    return healthy


def _to_waypoint(
    snapshot: ProxySnapshot,
    gw: GatewayAddress,
    src: Workload | None,
    authority: str,
    dst: Workload | None,
    service: Service | None,
    choose: Chooser,
    prefer_same_node: bool,
    strict: bool,
) -> Hbone | Deny | str | None:
    """An HBONE plan to the waypoint; None when the source is that waypoint (no loop). A waypoint
    with no ready pod fails open (the reason is returned: deliver directly and log it), as a
    missing one does, except in strict waypoint mode, where it fails closed."""
    endpoints = snapshot.waypoint_endpoints(gw)
    if src is not None and any(e.workload.uid == src.uid for e in endpoints):
        return None
    ready = [e for e in endpoints if e.workload.status is WorkloadStatus.HEALTHY]
    eps = _candidates(ready, src, prefer_same_node)
    if not eps:
        why = f"waypoint {gw} has no usable endpoints" if not endpoints else f"waypoint {gw} has no ready endpoints"
        return Deny(why + " (strict waypoint mode: fails closed)") if strict else why + ": delivered directly (fails open)"
    wp = choose(eps).workload
    return Hbone(
        to=(gw.address or wp.addresses[0], gw.hbone_port),
        authority=authority,
        expect=wp.identity,
        dst_workload=dst,
        service=service,
        waypoint=wp,
    )


def _takes_service_traffic(w: Workload, svc: Service) -> bool:
    """Whether service-addressed traffic to endpoint ``w`` goes to ``w.waypoint`` (ours)."""
    return w.waypoint_account_for in ("service", "all") or (w.waypoint_strict and svc.waypoint is None)


def _takes_workload_traffic(w: Workload) -> bool:
    """Whether traffic addressed to the pod goes to ``w.waypoint``: Istio's meaning (the control
    plane sends it only when it serves workloads), unless a per-account waypoint serves only
    service traffic and strict mode does not force it."""
    return w.waypoint_strict or w.waypoint_account_for != "service"


def _direct(w: Workload, ip: str, port: int, service: Service | None, note: str = "") -> Hbone | Passthrough:
    if w.tunnel_protocol is TunnelProtocol.HBONE:
        return Hbone(
            to=(ip, HBONE_PORT),
            authority=format_authority(ip, port),
            expect=w.identity,
            dst_workload=w,
            service=service,
            note=note,
        )
    return Passthrough(to=(ip, port), dst_workload=w, service=service, note=note)


def _same_family(ips: Sequence[str], like: str) -> str:
    v6 = ":" in like
    return next((ip for ip in ips if (":" in ip) == v6), ips[0])


def decide_outbound(
    snapshot: ProxySnapshot,
    src: Workload | None,
    dst_ip: str,
    dst_port: int,
    *,
    choose: Chooser = first,
    prefer_same_node: bool = True,
) -> Plan:
    """Where a connection from ``src`` to ``dst_ip:dst_port`` (its SO_ORIGINAL_DST) goes."""
    authority = format_authority(dst_ip, dst_port)
    svc = snapshot.service_by_address(dst_ip, dst_port)
    if svc is None and snapshot.services_by_vip(dst_ip):
        return Deny(f"service VIP {dst_ip} has no port {dst_port}")
    if svc is not None:
        eps = _candidates(
            [e for e in snapshot.endpoints(svc.key) if e.workload.target_port(svc, dst_port) is not None],
            src,
            prefer_same_node,
        )
        dst = choose(eps).workload if eps else None
        # Ours: an endpoint bound to its account's waypoint (or in strict mode, with no service
        # waypoint to take it) is reached through that waypoint; the endpoint is picked first.
        gw = dst.waypoint if dst is not None and _takes_service_traffic(dst, svc) else None
        if gw is None:
            gw = svc.waypoint
            dst = None if gw is not None else dst
        note = ""
        if gw is not None:
            strict = dst is not None and dst.waypoint_strict
            plan = _to_waypoint(snapshot, gw, src, authority, dst, svc, choose, prefer_same_node, strict)
            if isinstance(plan, str):
                note = plan
            elif plan is not None:
                return plan
            if dst is None and eps:
                dst = choose(eps).workload
        if dst is None:
            return Deny(f"service {svc.key} has no endpoints for port {dst_port}")
        target = dst.target_port(svc, dst_port)
        assert target is not None
        return _direct(dst, _same_family(dst.addresses, dst_ip), target, svc, note)
    w = snapshot.workload_by_ip(dst_ip)
    if w is None:
        return Passthrough(to=(dst_ip, dst_port))
    note = ""
    if w.waypoint is not None and _takes_workload_traffic(w):
        plan = _to_waypoint(
            snapshot, w.waypoint, src, authority, w, None, choose, prefer_same_node, w.waypoint_strict
        )
        if isinstance(plan, str):
            note = plan
        elif plan is not None:
            return plan
    # The pod was addressed by one of its IPs: dial exactly that one.
    return _direct(w, dst_ip, dst_port, None, note)
