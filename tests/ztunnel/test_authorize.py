"""The inbound decision (ztunnel/authorize.py): which source IP counts, and which policies apply.

Unit tests of a pure function over a proxy-state snapshot; the end-to-end tests drive the same
decisions through discovery and real connections (test_e2e_netns.py).
"""

from __future__ import annotations

import dataclasses

import structlog

from mesh.authz import Connection
from mesh.identity import Identity
from mesh.xds.authorization import Action, Authorization, Clause, Match, MatchKind, Rule, Scope, StringMatch
from mesh.xds.state import GatewayAddress, Port, ProxySnapshot, ProxyState, Service, Workload
from ztunnel.authorize import Hop, authorize, authorize_hop, connection_for, from_own_waypoint, source_ip

TD = "cluster.local"
WP_HOST = "wp.shop.svc.cluster.local"
STRICT = Authorization(
    "istio_converted_static_strict",
    "istio-system",
    Scope.WORKLOAD_SELECTOR,
    Action.DENY,
    (Rule((Clause((Match(not_principals=(StringMatch(MatchKind.PRESENCE),)),)),)),),
)


def ident(ns: str, sa: str) -> Identity:
    return Identity(TD, ns, sa)


def state(
    *,
    dst_waypoint: bool = False,
    svc_waypoint: bool = False,
    policies: tuple[str, ...] = (),
    strict: bool = False,
) -> ProxySnapshot:
    gw = GatewayAddress(namespace="shop", hostname=WP_HOST)
    wp_svc = Service("wp", "shop", WP_HOST, vips=("10.96.0.99",), ports=(Port(15008, 15008),))
    api_svc = Service(
        "api", "shop", "api.shop.svc.cluster.local", vips=("10.96.0.10",), ports=(Port(80, 8080),),
        waypoint=gw if svc_waypoint else None,
    )  # fmt: skip
    waypoint = Workload(
        "wp-1", "wp-1", "shop", addresses=("10.0.2.9",), service_account="wp",
        services={wp_svc.key: (Port(15008, 15008),)},
    )  # fmt: skip
    api = Workload(
        "api-1", "api-1", "shop", addresses=("10.0.2.3",), service_account="api",
        waypoint=gw if dst_waypoint else None, services={api_svc.key: (Port(80, 8080),)},
        authorization_policies=policies, waypoint_strict=strict,
    )  # fmt: skip
    s = ProxyState()
    s.apply(
        addresses=[(w.uid, w) for w in (waypoint, api)] + [(v.key, v) for v in (wp_svc, api_svc)],
        authorizations=[STRICT],
    )
    return s.snapshot()


def test_forwarded_is_believed_only_from_the_destinations_own_waypoint() -> None:
    wp, other = ident("shop", "wp"), ident("shop", "client")
    for snap in (state(dst_waypoint=True), state(svc_waypoint=True)):
        api = snap.workloads["api-1"]
        assert from_own_waypoint(snap, api, wp, "10.0.2.9")
        assert source_ip(snap, api, wp, "10.0.2.9", "10.0.1.7") == "10.0.1.7"
        # A peer that lies: another identity, or the waypoint's identity from another IP.
        assert source_ip(snap, api, other, "10.0.2.9", "10.0.1.7") == "10.0.2.9"
        assert source_ip(snap, api, wp, "10.0.3.3", "10.0.1.7") == "10.0.3.3"
        assert source_ip(snap, api, None, "10.0.2.9", "10.0.1.7") == "10.0.2.9"
    # No waypoint at all: the header never counts, whoever sends it.
    snap = state()
    assert source_ip(snap, snap.workloads["api-1"], wp, "10.0.2.9", "10.0.1.7") == "10.0.2.9"


def test_authorize_applies_the_listed_strict_policy_and_names_it() -> None:
    strict_key = "istio-system/istio_converted_static_strict"
    snap = state(policies=(strict_key,))
    api = snap.workloads["api-1"]
    plain = authorize(snap, api, Connection.of(None, "10.0.9.9", "10.0.2.3", 8080))
    assert not plain.allow and plain.policy == strict_key and strict_key in plain.reason
    mtls = authorize(snap, api, Connection.of(ident("shop", "client"), "10.0.1.2", "10.0.2.3", 8080))
    assert mtls.allow
    # A workload that does not list it is PERMISSIVE: plaintext allowed.
    snap = state()
    assert authorize(snap, snap.workloads["api-1"], Connection.of(None, "10.0.9.9", "10.0.2.3", 8080)).allow


def test_a_listed_policy_not_received_is_skipped_and_logged() -> None:
    snap = state(policies=("shop/not-here",))
    api = snap.workloads["api-1"]
    with structlog.testing.capture_logs() as logs:
        decision = authorize(snap, api, Connection.of(None, "10.0.9.9", "10.0.2.3", 8080))
    assert decision.allow
    assert any(e["event"] == "workload lists authorizations not received" for e in logs), logs


# --- strict waypoint mode: only the waypoint, and the identity it vouches for ----------------------

XFCC_FRONTEND = 'By=spiffe://cluster.local/ns/shop/sa/wp;URI="spiffe://cluster.local/ns/shop/sa/frontend"'


def test_by_default_policy_sees_the_waypoint_and_ignores_its_client_cert_header() -> None:
    snap = state(dst_waypoint=True)
    api = snap.workloads["api-1"]
    hop = Hop(ident("shop", "wp"), "10.0.2.9", forwarded_for="10.0.1.5", client_cert=XFCC_FRONTEND)
    conn = connection_for(snap, api, hop, "10.0.2.3", 8080)
    assert conn.src_identity == ident("shop", "wp") and str(conn.src_ip) == "10.0.1.5"
    assert authorize_hop(snap, api, hop, conn).allow


def test_strict_mode_accepts_only_the_waypoint_and_believes_what_it_vouches_for() -> None:
    snap = state(dst_waypoint=True, strict=True)
    api = snap.workloads["api-1"]
    hop = Hop(ident("shop", "wp"), "10.0.2.9", forwarded_for="10.0.1.5", client_cert=XFCC_FRONTEND)
    conn = connection_for(snap, api, hop, "10.0.2.3", 8080)
    assert conn.src_identity == ident("shop", "frontend") and str(conn.src_ip) == "10.0.1.5"
    assert authorize_hop(snap, api, hop, conn).allow
    # A client that skips the waypoint, however it dresses up its headers, is refused.
    liar = Hop(ident("shop", "frontend"), "10.0.1.5", client_cert=XFCC_FRONTEND)
    decision = authorize_hop(snap, api, liar, connection_for(snap, api, liar, "10.0.2.3", 8080))
    assert not decision.allow
    assert decision.reason == (
        "strict waypoint mode: shop/api-1 accepts only its waypoint (shop/wp.shop.svc.cluster.local), "
        "not spiffe://cluster.local/ns/shop/sa/frontend"
    )
    # The waypoint's identity from another address is not the waypoint either.
    stolen = Hop(ident("shop", "wp"), "10.0.1.66")
    assert not authorize_hop(snap, api, stolen, connection_for(snap, api, stolen, "10.0.2.3", 8080)).allow
    plaintext = Hop(None, "10.0.1.5")
    decision = authorize_hop(snap, api, plaintext, connection_for(snap, api, plaintext, "10.0.2.3", 8080))
    assert not decision.allow and decision.reason.endswith("not a plaintext client")


def test_a_vouched_identity_must_be_a_spiffe_uri() -> None:
    for header, want in [
        (XFCC_FRONTEND, ident("shop", "frontend")),
        ("URI=spiffe://cluster.local/ns/a/sa/b", ident("a", "b")),
        ("Hash=abc;URI=spiffe://nope", None),
        ("By=spiffe://cluster.local/ns/shop/sa/wp", None),
        ("", None),
    ]:
        assert Hop(None, "10.0.0.1", client_cert=header).vouched_identity() == want, header


def test_strict_mode_lets_in_a_peer_an_allow_policy_names_itself() -> None:
    named = Authorization(
        "scraper", "shop", Scope.WORKLOAD_SELECTOR, Action.ALLOW,
        (Rule((Clause((Match(principals=(StringMatch(MatchKind.EXACT, "cluster.local/ns/mon/sa/scraper"),)),)),)),),
    )  # fmt: skip
    by_prefix = Authorization(
        "mon-ns", "shop", Scope.WORKLOAD_SELECTOR, Action.ALLOW,
        (Rule((Clause((Match(principals=(StringMatch(MatchKind.PREFIX, "cluster.local/ns/mon/"),)),)),)),),
    )  # fmt: skip
    s = ProxyState()
    s.apply(
        addresses=[(w.uid, w) for w in state(dst_waypoint=True, strict=True).workloads.values()]
        + [(v.key, v) for v in state().services.values()],
        authorizations=[STRICT, named, by_prefix],
    )
    snap = s.snapshot()
    api = dataclasses.replace(snap.workloads["api-1"], authorization_policies=("shop/scraper", "shop/mon-ns"))
    scraper, other = Hop(ident("mon", "scraper"), "10.0.9.1"), Hop(ident("mon", "other"), "10.0.9.2")
    assert authorize_hop(snap, api, scraper, connection_for(snap, api, scraper, "10.0.2.3", 8080)).allow
    # A pattern is not a name: mon/other is not let past the waypoint.
    assert not authorize_hop(snap, api, other, connection_for(snap, api, other, "10.0.2.3", 8080)).allow
