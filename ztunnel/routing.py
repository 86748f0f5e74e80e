"""Decide-then-do routing: pure functions of (snapshot, connection facts) -> a plan.

Nothing here touches a socket; ``outbound.py``/``inbound.py`` perform the plan. Every case is a
table row in tests/ztunnel/test_routing.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mesh.hbone.protocol import format_authority
from mesh.identity import Identity
from mesh.model import (
    ROOT_NAMESPACE,
    MtlsMode,
    Service,
    Snapshot,
    TunnelProtocol,
    WaypointRef,
    Workload,
    WorkloadStatus,
)

HBONE_PORT = 15008

Chooser = Callable[[Sequence[Workload]], Workload]


def first(candidates: Sequence[Workload]) -> Workload:
    return candidates[0]


@dataclass(frozen=True, slots=True)
class Hbone:
    """Tunnel over HBONE to ``to`` (a pod's or a waypoint's :15008), CONNECT ``authority``."""

    to: tuple[str, int]
    authority: str
    expect: Identity
    dst_workload: Workload
    service: Service | None = None
    via_waypoint: bool = False
    note: str = ""  # e.g. why a configured waypoint was skipped


@dataclass(frozen=True, slots=True)
class Passthrough:
    """Plain TCP to ``to`` (destination not in the mesh)."""

    to: tuple[str, int]
    dst_workload: Workload | None = None
    service: Service | None = None
    note: str = ""


@dataclass(frozen=True, slots=True)
class Deny:
    """Close the client: nothing sensible to send it to."""

    reason: str


Plan = Hbone | Passthrough | Deny


def _waypoint_ref(snapshot: Snapshot, own: WaypointRef | None, namespace: str) -> WaypointRef | None:
    if own is not None:
        return None if own.opts_out else own
    ns = snapshot.namespaces.get(namespace)
    ref = ns.waypoint if ns is not None else None
    return None if ref is None or ref.opts_out else ref


def _candidates(
    endpoints: Sequence[Workload], src: Workload | None, prefer_same_node: bool
) -> tuple[Workload, ...]:
    usable = tuple(w for w in endpoints if w.ips)
    healthy = tuple(w for w in usable if w.status == WorkloadStatus.HEALTHY) or usable
    if prefer_same_node and src is not None and src.node:
        local = tuple(w for w in healthy if w.node == src.node)
        if local:
            return local
    return healthy


def _to_waypoint(
    snapshot: Snapshot,
    ref: WaypointRef,
    src: Workload | None,
    authority: str,
    dst: Workload,
    service: Service | None,
    choose: Chooser,
    prefer_same_node: bool,
) -> Hbone | str:
    """An HBONE plan to the waypoint, or the reason it cannot be used (then: fail open)."""
    gw = snapshot.gateways.get(ref.key)
    if gw is None or not gw.is_waypoint:
        return f"waypoint {ref.key} not found"
    eps = _candidates(
        [w for w in snapshot.endpoints(ref.key) if w.tunnel_protocol == TunnelProtocol.HBONE],
        src,
        prefer_same_node,
    )
    if not eps:
        return f"waypoint {ref.key} has no endpoints"
    if src is not None and any(src.uid == w.uid for w in snapshot.endpoints(ref.key)):
        return "source is the waypoint"
    wp = choose(eps)
    return Hbone(
        to=(wp.ips[0], HBONE_PORT),
        authority=authority,
        expect=wp.identity,
        dst_workload=dst,
        service=service,
        via_waypoint=True,
    )


def _direct(w: Workload, ip: str, port: int, service: Service | None, note: str = "") -> Hbone | Passthrough:
    if w.tunnel_protocol == TunnelProtocol.HBONE:
        return Hbone(
            to=(ip, HBONE_PORT),
            authority=format_authority(ip, port),
            expect=w.identity,
            dst_workload=w,
            service=service,
            note=note,
        )
    return Passthrough(to=(ip, port), dst_workload=w, service=service, note=note)


def decide_outbound(
    snapshot: Snapshot,
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
        sp = svc.port(dst_port)
        assert sp is not None
        eps = _candidates(
            [w for w in snapshot.endpoints(svc.key) if sp.target_for(w) is not None],
            src,
            prefer_same_node,
        )
        if not eps:
            return Deny(f"service {svc.key} has no endpoints for port {dst_port}")
        dst = choose(eps)
        note = ""
        ref = _waypoint_ref(snapshot, svc.waypoint, svc.namespace)
        if ref is not None:
            gw = snapshot.gateways.get(ref.key)
            if gw is None or gw.waypoint_for in ("service", "all"):
                wp = _to_waypoint(snapshot, ref, src, authority, dst, svc, choose, prefer_same_node)
                if isinstance(wp, Hbone):
                    return wp
                note = wp
        target = sp.target_for(dst)
        assert target is not None
        return _direct(dst, dst.ips[0], target, svc, note)
    w = snapshot.workload_by_ip(dst_ip)
    if w is None:
        return Passthrough(to=(dst_ip, dst_port))
    note = ""
    ref = _waypoint_ref(snapshot, w.waypoint, w.namespace)
    if ref is not None:
        gw = snapshot.gateways.get(ref.key)
        if gw is not None and gw.waypoint_for in ("workload", "all"):
            wp = _to_waypoint(snapshot, ref, src, authority, w, None, choose, prefer_same_node)
            if isinstance(wp, Hbone):
                return wp
            note = wp
    # The pod was addressed by one of its IPs: dial exactly that one.
    return _direct(w, dst_ip, dst_port, None, note)


@dataclass(frozen=True, slots=True)
class InboundDecision:
    allow: bool
    reason: str = ""


def decide_inbound(
    snapshot: Snapshot, dst: Workload, src_identity: Identity | None, src_ip: str, dst_port: int
) -> InboundDecision:
    """L4 authorization hook: allow everything for now (the policy issue fills this in)."""
    return InboundDecision(True)


def plaintext_allowed(snapshot: Snapshot, dst: Workload) -> bool:
    """Whether plaintext (port 15006) may reach ``dst``: not under a STRICT PeerAuthentication.

    Most specific wins: a selector policy in the workload's namespace, then its namespace-wide
    policy, then the mesh-wide one in the root namespace. UNSET defers to the next level.
    """
    levels: list[MtlsMode] = [MtlsMode.UNSET, MtlsMode.UNSET, MtlsMode.UNSET]
    for pa in snapshot.peer_authentications.values():
        if pa.namespace == dst.namespace and pa.selector is not None:
            if pa.selector.matches(dst.labels):
                levels[0] = pa.mtls_mode
        elif pa.namespace == dst.namespace and pa.selector is None:
            levels[1] = pa.mtls_mode
        elif pa.namespace == ROOT_NAMESPACE and pa.selector is None:
            levels[2] = pa.mtls_mode
    for mode in levels:
        if mode != MtlsMode.UNSET:
            return mode != MtlsMode.STRICT
    return True
