"""decide_outbound as a table over proxy snapshots: what discovery carries in, a plan out. No sockets."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import pytest

from mesh.identity import Identity
from mesh.model import TunnelProtocol, WorkloadStatus
from mesh.xds.state import (
    Address,
    Endpoint,
    GatewayAddress,
    Port,
    ProxySnapshot,
    ProxyState,
    Service,
    Workload,
)
from ztunnel.routing import Chooser, Deny, Hbone, Passthrough, Plan, decide_outbound

H, NONE = TunnelProtocol.HBONE, TunnelProtocol.NONE


def snap(*values: Address) -> ProxySnapshot:
    """A proxy's state holding exactly ``values``, as discovery would have delivered them."""
    state = ProxyState()
    state.apply(addresses=[(v.uid if isinstance(v, Workload) else v.key, v) for v in values])
    return state.snapshot()


def wl(
    name: str,
    *ips: str,
    node: str = "n1",
    ns: str = "shop",
    sa: str | None = None,
    services: Mapping[str, tuple[Port, ...]] | None = None,
    tunnel: TunnelProtocol = H,
    waypoint: GatewayAddress | None = None,
    status: WorkloadStatus = WorkloadStatus.HEALTHY,
) -> Workload:
    return Workload(
        uid=f"{ns}-{name}",
        name=name,
        namespace=ns,
        addresses=ips,
        node=node,
        service_account=sa or name,
        services=services or {},
        tunnel_protocol=tunnel,
        waypoint=waypoint,
        status=status,
    )


def svc(
    name: str,
    *vips: str,
    ns: str = "shop",
    ports: tuple[Port, ...] = (Port(80, 8080),),
    waypoint: GatewayAddress | None = None,
) -> Service:
    return Service(
        name=name,
        namespace=ns,
        hostname=f"{name}.{ns}.svc.cluster.local",
        vips=vips,
        ports=ports,
        waypoint=waypoint,
    )


WEB = "shop/web.shop.svc.cluster.local"
LEGACY = "legacy/legacy.legacy.svc.cluster.local"
WP = "shop/wp.shop.svc.cluster.local"
SERVES_WEB = {WEB: (Port(80, 8080),)}

CLIENT = wl("client", "10.0.1.2")
WEB1 = wl("web1", "10.0.1.3", sa="web", services=SERVES_WEB)
WEB2 = wl("web2", "10.0.2.3", node="n2", sa="web", services=SERVES_WEB)
SICK = wl("sick", "10.0.1.9", sa="web", services=SERVES_WEB, status=WorkloadStatus.UNHEALTHY)
WEB_SVC = svc("web", "10.96.0.20")
WEB_ID = Identity("cluster.local", "shop", "web")
PLAIN = wl("legacy", "10.0.2.7", ns="legacy", tunnel=NONE, services={LEGACY: (Port(80, 9090),)})
LEGACY_SVC = svc("legacy", "10.96.0.30", ns="legacy", ports=(Port(80, 9090),))

# A waypoint, by hostname (what the control plane sends) and its pods and service.
WP_BY_NAME = GatewayAddress(namespace="shop", hostname="wp.shop.svc.cluster.local")
WP_POD = wl("wp-pod", "10.0.2.50", node="n2", sa="wp", services={WP: (Port(15008, 15008),)})
WP_POD_LOCAL = wl("wp-local", "10.0.1.50", sa="wp", services={WP: (Port(15008, 15008),)})
WP_SVC = svc("wp", "10.96.0.99", ports=(Port(15008, 15008),))
WP_ID = Identity("cluster.local", "shop", "wp")
WEB_SVC_WP = svc("web", "10.96.0.20", waypoint=WP_BY_NAME)
WEB1_WP = wl("web1", "10.0.1.3", sa="web", services=SERVES_WEB, waypoint=WP_BY_NAME)

# Named target ports: the service says 0, each workload says its own.
NAMED_SVC = svc("web", "10.96.0.20", ports=(Port(80, 0),))
NAMED_A = wl("a", "10.0.1.3", sa="web", services={WEB: (Port(80, 8080),)})
NAMED_B = wl("b", "10.0.2.3", node="n2", sa="web", services={WEB: (Port(80, 9090),)})

DUAL = wl("dual", "10.0.1.3", "fd00::3", sa="web", services=SERVES_WEB)
DUAL_SVC = svc("web", "10.96.0.20", "fd00:96::20")


def node2(candidates: Sequence[Endpoint]) -> Endpoint:
    return next(e for e in candidates if e.workload.node == "n2")


def named(name: str) -> Chooser:
    def choose(candidates: Sequence[Endpoint]) -> Endpoint:
        return next(e for e in candidates if e.workload.name == name)

    return choose


CASES: list[tuple[str, ProxySnapshot, str, int, dict[str, object], Plan | type]] = [
    # --- pods and unknown addresses
    (
        "pod IP in mesh -> HBONE to pod:15008",
        snap(CLIENT, WEB1),
        "10.0.1.3",
        8080,
        {},
        Hbone(("10.0.1.3", 15008), "10.0.1.3:8080", WEB_ID, WEB1),
    ),
    (
        "pod not in mesh -> passthrough",
        snap(CLIENT, PLAIN),
        "10.0.2.7",
        9090,
        {},
        Passthrough(("10.0.2.7", 9090), PLAIN),
    ),
    ("unknown address -> passthrough", snap(CLIENT), "192.0.2.1", 443, {}, Passthrough(("192.0.2.1", 443))),
    (
        "pod addressed by its IPv6 -> that address",
        snap(CLIENT, DUAL),
        "fd00::3",
        8080,
        {},
        Hbone(("fd00::3", 15008), "[fd00::3]:8080", WEB_ID, DUAL),
    ),
    # --- services
    (
        "service VIP -> endpoint, target port",
        snap(CLIENT, WEB2, WEB_SVC),
        "10.96.0.20",
        80,
        {},
        Hbone(("10.0.2.3", 15008), "10.0.2.3:8080", WEB_ID, WEB2, WEB_SVC),
    ),
    (
        "service VIP -> the target port the workload lists",
        snap(CLIENT, wl("alt", "10.0.2.4", sa="web", services={WEB: (Port(80, 7070),)}), WEB_SVC),
        "10.96.0.20",
        80,
        {},
        Hbone(
            ("10.0.2.4", 15008),
            "10.0.2.4:7070",
            WEB_ID,
            wl("alt", "10.0.2.4", sa="web", services={WEB: (Port(80, 7070),)}),
            WEB_SVC,
        ),
    ),
    (
        "named target port: endpoint a's own",
        snap(CLIENT, NAMED_A, NAMED_B, NAMED_SVC),
        "10.96.0.20",
        80,
        {"choose": named("a"), "prefer_same_node": False},
        Hbone(("10.0.1.3", 15008), "10.0.1.3:8080", WEB_ID, NAMED_A, NAMED_SVC),
    ),
    (
        "named target port: endpoint b's own",
        snap(CLIENT, NAMED_A, NAMED_B, NAMED_SVC),
        "10.96.0.20",
        80,
        {"choose": named("b"), "prefer_same_node": False},
        Hbone(("10.0.2.3", 15008), "10.0.2.3:9090", WEB_ID, NAMED_B, NAMED_SVC),
    ),
    (
        "workload lists port without target -> the service's target port",
        snap(CLIENT, wl("z", "10.0.1.3", sa="web", services={WEB: (Port(80, 0),)}), WEB_SVC),
        "10.96.0.20",
        80,
        {},
        Hbone(
            ("10.0.1.3", 15008),
            "10.0.1.3:8080",
            WEB_ID,
            wl("z", "10.0.1.3", sa="web", services={WEB: (Port(80, 0),)}),
            WEB_SVC,
        ),
    ),
    (
        "neither says a target -> the service port",
        snap(CLIENT, wl("z", "10.0.1.3", sa="web", services={WEB: (Port(80, 0),)}), NAMED_SVC),
        "10.96.0.20",
        80,
        {},
        Hbone(
            ("10.0.1.3", 15008),
            "10.0.1.3:80",
            WEB_ID,
            wl("z", "10.0.1.3", sa="web", services={WEB: (Port(80, 0),)}),
            NAMED_SVC,
        ),
    ),
    (
        "workload listing the service but not the port is no endpoint for it",
        snap(CLIENT, wl("z", "10.0.1.3", sa="web", services={WEB: (Port(81, 8081),)}), WEB_SVC),
        "10.96.0.20",
        80,
        {},
        Deny,
    ),
    (
        "service VIP prefers same node",
        snap(CLIENT, WEB1, WEB2, WEB_SVC),
        "10.96.0.20",
        80,
        {},
        Hbone(("10.0.1.3", 15008), "10.0.1.3:8080", WEB_ID, WEB1, WEB_SVC),
    ),
    (
        "service VIP without same-node preference",
        snap(CLIENT, WEB1, WEB2, WEB_SVC),
        "10.96.0.20",
        80,
        {"prefer_same_node": False, "choose": node2},
        Hbone(("10.0.2.3", 15008), "10.0.2.3:8080", WEB_ID, WEB2, WEB_SVC),
    ),
    (
        "service VIP prefers healthy endpoints over same node",
        snap(CLIENT, SICK, WEB2, WEB_SVC),
        "10.96.0.20",
        80,
        {},
        Hbone(("10.0.2.3", 15008), "10.0.2.3:8080", WEB_ID, WEB2, WEB_SVC),
    ),
    (
        "only unhealthy endpoints: still used",
        snap(CLIENT, SICK, WEB_SVC),
        "10.96.0.20",
        80,
        {},
        Hbone(("10.0.1.9", 15008), "10.0.1.9:8080", WEB_ID, SICK, WEB_SVC),
    ),
    (
        "endpoint without an address is skipped",
        snap(CLIENT, wl("pending", sa="web", services=SERVES_WEB), WEB2, WEB_SVC),
        "10.96.0.20",
        80,
        {},
        Hbone(("10.0.2.3", 15008), "10.0.2.3:8080", WEB_ID, WEB2, WEB_SVC),
    ),
    ("service VIP, unknown port", snap(CLIENT, WEB1, WEB_SVC), "10.96.0.20", 81, {}, Deny),
    ("service VIP without endpoints", snap(CLIENT, WEB_SVC), "10.96.0.20", 80, {}, Deny),
    (
        "service VIP shared by services -> the one with the port",
        snap(
            CLIENT,
            WEB1,
            WEB_SVC,
            svc("tls", "10.96.0.20", ports=(Port(443, 8443),)),
            wl(
                "tls1", "10.0.1.4", sa="tls", services={"shop/tls.shop.svc.cluster.local": (Port(443, 8443),)}
            ),
        ),
        "10.96.0.20",
        443,
        {},
        Hbone(
            ("10.0.1.4", 15008),
            "10.0.1.4:8443",
            Identity("cluster.local", "shop", "tls"),
            wl(
                "tls1", "10.0.1.4", sa="tls", services={"shop/tls.shop.svc.cluster.local": (Port(443, 8443),)}
            ),
            svc("tls", "10.96.0.20", ports=(Port(443, 8443),)),
        ),
    ),
    (
        "service of non-mesh pods -> passthrough to endpoint",
        snap(CLIENT, PLAIN, LEGACY_SVC),
        "10.96.0.30",
        80,
        {},
        Passthrough(("10.0.2.7", 9090), PLAIN, LEGACY_SVC),
    ),
    (
        "IPv6 VIP -> the endpoint's IPv6 address",
        snap(CLIENT, DUAL, DUAL_SVC),
        "fd00:96::20",
        80,
        {},
        Hbone(("fd00::3", 15008), "[fd00::3]:8080", WEB_ID, DUAL, DUAL_SVC),
    ),
    (
        "IPv4 VIP of a dual-stack service -> the endpoint's IPv4 address",
        snap(CLIENT, DUAL, DUAL_SVC),
        "10.96.0.20",
        80,
        {},
        Hbone(("10.0.1.3", 15008), "10.0.1.3:8080", WEB_ID, DUAL, DUAL_SVC),
    ),
    # --- waypoints
    (
        "service waypoint -> HBONE to the waypoint, authority the VIP",
        snap(CLIENT, WEB1, WEB_SVC_WP, WP_POD, WP_SVC),
        "10.96.0.20",
        80,
        {},
        Hbone(("10.0.2.50", 15008), "10.96.0.20:80", WP_ID, None, WEB_SVC_WP, WP_POD),
    ),
    (
        "service waypoint, no endpoints of its own needed",
        snap(CLIENT, WEB_SVC_WP, WP_POD),
        "10.96.0.20",
        80,
        {},
        Hbone(("10.0.2.50", 15008), "10.96.0.20:80", WP_ID, None, WEB_SVC_WP, WP_POD),
    ),
    (
        "waypoint pods: same node preferred",
        snap(CLIENT, WEB1, WEB_SVC_WP, WP_POD, WP_POD_LOCAL, WP_SVC),
        "10.96.0.20",
        80,
        {},
        Hbone(("10.0.1.50", 15008), "10.96.0.20:80", WP_ID, None, WEB_SVC_WP, WP_POD_LOCAL),
    ),
    (
        "service waypoint by address",
        snap(CLIENT, WEB1, svc("web", "10.96.0.20", waypoint=GatewayAddress(address="10.0.2.50")), WP_POD),
        "10.96.0.20",
        80,
        {},
        Hbone(
            ("10.0.2.50", 15008),
            "10.96.0.20:80",
            WP_ID,
            None,
            svc("web", "10.96.0.20", waypoint=GatewayAddress(address="10.0.2.50")),
            WP_POD,
        ),
    ),
    (
        "waypoint by address on another HBONE port",
        snap(
            CLIENT,
            WEB1,
            svc("web", "10.96.0.20", waypoint=GatewayAddress(address="10.0.2.50", hbone_port=15009)),
            WP_POD,
        ),
        "10.96.0.20",
        80,
        {},
        Hbone(
            ("10.0.2.50", 15009),
            "10.96.0.20:80",
            WP_ID,
            None,
            svc("web", "10.96.0.20", waypoint=GatewayAddress(address="10.0.2.50", hbone_port=15009)),
            WP_POD,
        ),
    ),
    (
        "workload waypoint -> HBONE to the waypoint, authority the pod",
        snap(CLIENT, WEB1_WP, WP_POD, WP_SVC),
        "10.0.1.3",
        8080,
        {},
        Hbone(("10.0.2.50", 15008), "10.0.1.3:8080", WP_ID, WEB1_WP, None, WP_POD),
    ),
    (
        "workload waypoint does not apply to traffic for its service",
        snap(CLIENT, WEB1_WP, WEB_SVC, WP_POD, WP_SVC),
        "10.96.0.20",
        80,
        {},
        Hbone(("10.0.1.3", 15008), "10.0.1.3:8080", WEB_ID, WEB1_WP, WEB_SVC),
    ),
    (
        "service without waypoint of a pod in a namespace with one -> direct",
        snap(CLIENT, WEB1, WEB_SVC, WP_POD, WP_SVC),
        "10.96.0.20",
        80,
        {},
        Hbone(("10.0.1.3", 15008), "10.0.1.3:8080", WEB_ID, WEB1, WEB_SVC),
    ),
]


@pytest.mark.parametrize(("name", "snapshot", "ip", "port", "kw", "want"), CASES, ids=[c[0] for c in CASES])
def test_decide_outbound(
    name: str, snapshot: ProxySnapshot, ip: str, port: int, kw: dict[str, object], want: Plan | type
) -> None:
    got = decide_outbound(snapshot, CLIENT, ip, port, **kw)  # type: ignore[arg-type]
    if isinstance(want, type):
        assert isinstance(got, want), got
    else:
        assert got == want


@pytest.mark.parametrize(
    ("ip", "port", "want"),
    [
        # The waypoint's own traffic to the service it fronts goes to an endpoint: no loop.
        ("10.96.0.20", 80, Hbone(("10.0.1.3", 15008), "10.0.1.3:8080", WEB_ID, WEB1, WEB_SVC_WP)),
        ("10.0.1.3", 8080, Hbone(("10.0.1.3", 15008), "10.0.1.3:8080", WEB_ID, WEB1_WP)),
    ],
)
def test_source_is_the_waypoint_goes_direct(ip: str, port: int, want: Plan) -> None:
    s = snap(CLIENT, WEB1_WP if ip == "10.0.1.3" else WEB1, WEB_SVC_WP, WP_POD, WP_SVC)
    assert decide_outbound(s, WP_POD, ip, port) == want
    # Another client is still sent through it.
    other = decide_outbound(s, CLIENT, ip, port)
    assert isinstance(other, Hbone) and other.waypoint == WP_POD


def test_source_by_address_waypoint_goes_direct() -> None:
    by_address = svc("web", "10.96.0.20", waypoint=GatewayAddress(address="10.0.2.50"))
    s = snap(CLIENT, WEB1, by_address, WP_POD)
    assert decide_outbound(s, WP_POD, "10.96.0.20", 80) == Hbone(
        ("10.0.1.3", 15008), "10.0.1.3:8080", WEB_ID, WEB1, by_address
    )


def test_deny_reasons_name_what_is_missing() -> None:
    cases = [
        (snap(CLIENT, WEB_SVC), "10.96.0.20", 81, "no port 81"),
        (snap(CLIENT, WEB_SVC), "10.96.0.20", 80, f"{WEB} has no endpoints for port 80"),
        (snap(CLIENT, WEB_SVC_WP), "10.96.0.20", 80, f"{WEB} has no endpoints for port 80"),
    ]
    for s, ip, port, reason in cases:
        got = decide_outbound(s, CLIENT, ip, port)
        assert isinstance(got, Deny) and reason in got.reason, got


def test_no_source_workload() -> None:
    """Traffic from outside any known workload (e.g. the node) still routes; no same-node pick."""
    s = snap(WEB1, WEB2, WEB_SVC)
    got = decide_outbound(s, None, "10.96.0.20", 80, choose=node2)
    assert got == Hbone(("10.0.2.3", 15008), "10.0.2.3:8080", WEB_ID, WEB2, WEB_SVC)


# --- ours: per-service-account waypoints and strict waypoint mode (controlplane/waypoints.py) ------

WP_CART_BY_NAME = GatewayAddress(namespace="shop", hostname="wp-cart.shop.svc.cluster.local")
WP_CART = "shop/wp-cart.shop.svc.cluster.local"
WP_CART_POD = wl(
    "wp-cart-pod", "10.0.2.60", node="n2", sa="wp-cart", services={WP_CART: (Port(15008, 15008),)}
)
WP_CART_SVC = svc("wp-cart", "10.96.0.98", ports=(Port(15008, 15008),))
WP_CART_ID = Identity("cluster.local", "shop", "wp-cart")


def prefer(name: str) -> Chooser:
    """The endpoint named ``name`` when it is a candidate (the waypoint pod is chosen too)."""

    def choose(candidates: Sequence[Endpoint]) -> Endpoint:
        return next((e for e in candidates if e.workload.name == name), candidates[0])

    return choose


def account_bound(w: Workload, gw: GatewayAddress, account_for: str, strict: bool = False) -> Workload:
    return dataclasses.replace(w, waypoint=gw, waypoint_account_for=account_for, waypoint_strict=strict)


# web is served by two accounts: web (no waypoint) and cart (its own waypoint).
CART_EP = wl("cart1", "10.0.2.4", node="n2", sa="cart", services=SERVES_WEB)
CART_EP_WP = account_bound(CART_EP, WP_CART_BY_NAME, "service")
ACCOUNT_SNAP = snap(CLIENT, WEB1, CART_EP_WP, WEB_SVC, WP_CART_POD, WP_CART_SVC)


def test_service_traffic_goes_to_the_picked_endpoints_account_waypoint() -> None:
    got = decide_outbound(
        ACCOUNT_SNAP, CLIENT, "10.96.0.20", 80, choose=prefer("cart1"), prefer_same_node=False
    )
    assert got == Hbone(("10.0.2.60", 15008), "10.96.0.20:80", WP_CART_ID, CART_EP_WP, WEB_SVC, WP_CART_POD)
    # The other account's endpoint is reached directly: cart's waypoint never sees web's traffic.
    got = decide_outbound(
        ACCOUNT_SNAP, CLIENT, "10.96.0.20", 80, choose=prefer("web1"), prefer_same_node=False
    )
    assert got == Hbone(("10.0.1.3", 15008), "10.0.1.3:8080", WEB_ID, WEB1, WEB_SVC)
    # The waypoint itself delivers to the endpoint.
    got = decide_outbound(
        ACCOUNT_SNAP, WP_CART_POD, "10.96.0.20", 80, choose=prefer("cart1"), prefer_same_node=False
    )
    assert got == Hbone(
        ("10.0.2.4", 15008), "10.0.2.4:8080", Identity("cluster.local", "shop", "cart"), CART_EP_WP, WEB_SVC
    )


def test_account_waypoint_for_services_lets_pod_addressed_traffic_skip_it_unless_strict() -> None:
    got = decide_outbound(ACCOUNT_SNAP, CLIENT, "10.0.2.4", 8080)
    assert isinstance(got, Hbone) and got.waypoint is None and got.to == ("10.0.2.4", 15008)
    for account_for, strict in (("workload", False), ("all", False), ("service", True)):
        s = snap(
            CLIENT, account_bound(CART_EP, WP_CART_BY_NAME, account_for, strict), WP_CART_POD, WP_CART_SVC
        )
        got = decide_outbound(s, CLIENT, "10.0.2.4", 8080)
        assert isinstance(got, Hbone) and got.waypoint == WP_CART_POD, (account_for, strict)
        assert got.authority == "10.0.2.4:8080"


def test_strict_mode_fails_closed_without_a_waypoint_pod() -> None:
    strict = account_bound(WEB1, WP_BY_NAME, "", strict=True)
    for ip, port in (("10.0.1.3", 8080), ("10.96.0.20", 80)):
        got = decide_outbound(snap(CLIENT, strict, WEB_SVC), CLIENT, ip, port)
        assert isinstance(got, Deny) and "has no usable endpoints" in got.reason, (ip, got)
    # With its waypoint running, service traffic goes there too (there is no service waypoint).
    got = decide_outbound(snap(CLIENT, strict, WEB_SVC, WP_POD, WP_SVC), CLIENT, "10.96.0.20", 80)
    assert isinstance(got, Hbone) and got.waypoint == WP_POD and got.authority == "10.96.0.20:80"


def test_a_waypoint_without_ready_pods_fails_open_to_direct_delivery() -> None:
    """As a missing one does (the control plane does not send it): delivered directly, with the
    reason for the log; strict waypoint mode fails closed instead (test_strict_mode_fails_closed_…)."""
    sick_wp = dataclasses.replace(WP_POD, status=WorkloadStatus.UNHEALTHY)
    by_address = svc("web", "10.96.0.20", waypoint=GatewayAddress(address="10.0.9.9"))
    cases = [
        (snap(CLIENT, WEB1, WEB_SVC_WP, WP_SVC), "10.96.0.20", 80, "has no usable endpoints"),
        (snap(CLIENT, WEB1, WEB_SVC_WP, WP_SVC, sick_wp), "10.96.0.20", 80, "has no ready endpoints"),
        (snap(CLIENT, WEB1, by_address), "10.96.0.20", 80, "has no usable endpoints"),
        (snap(CLIENT, WEB1_WP), "10.0.1.3", 8080, "has no usable endpoints"),
    ]
    for s, ip, port, why in cases:
        got = decide_outbound(s, CLIENT, ip, port)
        assert isinstance(got, Hbone) and got.waypoint is None and got.to == ("10.0.1.3", 15008), got
        assert why in got.note and got.note.endswith("delivered directly (fails open)"), got.note
