"""The inbound decision: may this connection reach this pod? One place for both inbound paths.

Inbound HBONE (:15008, a peer identity from mTLS) and inbound plaintext (:15006, no identity)
ask the same question: :func:`authorize` evaluates the authorizations discovery says apply to
the destination workload (global, its namespace's, the ones it lists — a STRICT
PeerAuthentication arrives as one of those, a DENY of connections without identity) with
:func:`mesh.authz.evaluate`, as Istio's ztunnel does.

Which source IP the decision (and the app) sees is decided here too: the TCP peer's address,
always — except from one of the destination's own waypoints (identity *and* IP both match),
whose ``forwarded`` header carries the original client's address. Anyone else may write
whatever they like in that header; it is ignored.
"""

from __future__ import annotations

import structlog

from mesh.authz import Connection, Decision, evaluate
from mesh.identity import Identity
from mesh.xds.state import GatewayAddress, ProxySnapshot, Workload

log = structlog.get_logger(__name__)


def authorize(snapshot: ProxySnapshot, dst: Workload, conn: Connection) -> Decision:
    """The decision for ``conn`` to ``dst``; dry-run outcomes and missing policies are logged."""
    missing = snapshot.missing_policies(dst)
    if missing:
        # Istio's ztunnel skips a listed policy it has not received (yet); say so.
        log.warning("workload lists authorizations not received", workload=dst.uid, missing=list(missing))
    decision = evaluate(snapshot.policies_for(dst), conn)
    for dry in decision.dry_run:
        log.info("dry-run authorization", workload=f"{dst.namespace}/{dst.name}", result=str(dry))
    return decision


def _waypoints_of(snapshot: ProxySnapshot, dst: Workload) -> list[GatewayAddress]:
    gws = [dst.waypoint] if dst.waypoint is not None else []
    for key in dst.services:
        svc = snapshot.services.get(key)
        if svc is not None and svc.waypoint is not None:
            gws.append(svc.waypoint)
    return gws


def from_own_waypoint(snapshot: ProxySnapshot, dst: Workload, peer: Identity | None, peer_ip: str) -> bool:
    """Whether the peer is one of ``dst``'s waypoints: its identity and its IP both match."""
    if peer is None:
        return False
    for gw in _waypoints_of(snapshot, dst):
        for e in snapshot.waypoint_endpoints(gw):
            if e.workload.identity == peer and peer_ip in e.workload.addresses:
                return True
    return False


def source_ip(
    snapshot: ProxySnapshot, dst: Workload, peer: Identity | None, peer_ip: str, forwarded: str | None
) -> str:
    """The client IP to decide on, log and show the app (module docstring)."""
    if forwarded and forwarded != peer_ip and from_own_waypoint(snapshot, dst, peer, peer_ip):
        return forwarded
    return peer_ip
