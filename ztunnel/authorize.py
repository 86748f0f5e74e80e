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

Strict waypoint mode (ours, ``Workload.waypoint_strict``): the destination accepts HBONE only
from its own waypoint (and from peers an enforced ALLOW policy names by exact principal or
service account: :func:`named_by_policy`), and its L4 policy sees the original client identity that the waypoint
vouches for in ``x-forwarded-client-cert`` (Envoy's header: ``URI=<client SPIFFE ID>``),
believed from that waypoint only. By default (Istio's behaviour) the policy sees the waypoint's
own identity and the header is ignored. :class:`Hop` holds what one inbound hop presented, so
the open-connection re-check (``connection_manager``) decides on exactly the same facts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import structlog

from mesh.authz import Connection, Decision, evaluate
from mesh.identity import Identity, IdentityError
from mesh.xds.authorization import Action, MatchKind, ServiceAccountMatch
from mesh.xds.state import GatewayAddress, ProxySnapshot, Workload

log = structlog.get_logger(__name__)


XFCC = "x-forwarded-client-cert"
_XFCC_URI = re.compile(r'(?:^|;)\s*URI="?(spiffe://[^";,]+)"?', re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Hop:
    """What the inbound hop presented: its TLS identity (None: plaintext), the TCP peer's
    address, and the headers a waypoint uses to speak for its client (believed from the
    destination's own waypoint only)."""

    peer: Identity | None
    peer_ip: str
    forwarded_for: str | None = None
    client_cert: str | None = None  # x-forwarded-client-cert

    def vouched_identity(self) -> Identity | None:
        """The client identity named by ``x-forwarded-client-cert`` (``URI=spiffe://…``)."""
        if not self.client_cert:
            return None
        m = _XFCC_URI.search(self.client_cert)
        if m is None:
            return None
        try:
            return Identity.parse(m.group(1))
        except IdentityError:
            return None


def connection_for(
    snapshot: ProxySnapshot, dst: Workload, hop: Hop, dst_ip: str, dst_port: int
) -> Connection:
    """The connection facts policy decides on for ``hop`` (module docstring)."""
    ip = source_ip(snapshot, dst, hop.peer, hop.peer_ip, hop.forwarded_for)
    identity = hop.peer
    if dst.waypoint_strict and from_own_waypoint(snapshot, dst, hop.peer, hop.peer_ip):
        identity = hop.vouched_identity() or hop.peer
    return Connection.of(identity, ip, dst_ip, dst_port)


def named_by_policy(snapshot: ProxySnapshot, dst: Workload, peer: Identity) -> bool:
    """Whether an enforced ALLOW policy of ``dst`` names ``peer`` itself: its exact principal or
    its service account (not a pattern, a namespace or an address) — the peers strict waypoint
    mode still lets in directly (e.g. a scraper the owner trusts by name)."""
    principal, account = peer.principal, ServiceAccountMatch(peer.namespace, peer.service_account)
    for a in snapshot.policies_for(dst):
        if a.action is not Action.ALLOW or a.dry_run:
            continue
        for rule in a.rules:
            for clause in rule.clauses:
                for m in clause.matches:
                    if account in m.service_accounts or any(
                        p.kind is MatchKind.EXACT and p.value == principal for p in m.principals
                    ):
                        return True
    return False


def _strict_refusal(snapshot: ProxySnapshot, dst: Workload, hop: Hop) -> Decision | None:
    if not dst.waypoint_strict or from_own_waypoint(snapshot, dst, hop.peer, hop.peer_ip):
        return None
    if hop.peer is not None and named_by_policy(snapshot, dst, hop.peer):
        return None  # let in by name; the policies still decide below
    via = str(dst.waypoint) if dst.waypoint is not None else "no waypoint"
    who = str(hop.peer) if hop.peer is not None else "a plaintext client"
    return Decision(
        False,
        None,
        None,
        f"strict waypoint mode: {dst.namespace}/{dst.name} accepts only its waypoint ({via}), not {who}",
    )


def authorize_hop(snapshot: ProxySnapshot, dst: Workload, hop: Hop, conn: Connection) -> Decision:
    """:func:`authorize` after the strict-waypoint check of the hop itself."""
    refused = _strict_refusal(snapshot, dst, hop)
    return refused if refused is not None else authorize(snapshot, dst, conn)


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
