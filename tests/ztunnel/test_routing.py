"""decide_outbound / decide_inbound / plaintext_allowed as tables: no sockets."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from mesh.identity import Identity
from mesh.model import (
    LABEL_WAYPOINT_FOR,
    WAYPOINT_GATEWAY_CLASS,
    Gateway,
    MeshObject,
    MtlsMode,
    Namespace,
    PeerAuthentication,
    Service,
    ServicePort,
    Snapshot,
    Store,
    TunnelProtocol,
    WaypointRef,
    Workload,
    WorkloadStatus,
)
from mesh.model.policy import WorkloadSelector
from ztunnel.routing import Deny, Hbone, Passthrough, decide_inbound, decide_outbound, plaintext_allowed

H = TunnelProtocol.HBONE


def wl(name: str, ip: str, node: str = "n1", ns: str = "shop", **kw: object) -> Workload:
    kw.setdefault("tunnel_protocol", H)
    return Workload(
        uid=f"{ns}-{name}", name=name, namespace=ns, node=node, ips=(ip,), service_account=name, **kw
    )  # type: ignore[arg-type]


def snap(*objs: MeshObject) -> Snapshot:
    s = Store()
    s.replace_all(objs)
    return s.snapshot()


CLIENT = wl("client", "10.0.1.2")
WEB1 = wl("web", "10.0.1.3", labels={"app": "web"})
WEB2 = Workload(
    uid="shop-web2",
    name="web2",
    namespace="shop",
    node="n2",
    ips=("10.0.2.3",),
    service_account="web",
    labels={"app": "web"},
    tunnel_protocol=H,
)
SICK = Workload(
    uid="shop-sick",
    name="sick",
    namespace="shop",
    node="n1",
    ips=("10.0.1.9",),
    service_account="web",
    labels={"app": "web"},
    tunnel_protocol=H,
    status=WorkloadStatus.UNHEALTHY,
)
PLAIN = wl("legacy", "10.0.2.7", ns="legacy", tunnel_protocol=TunnelProtocol.NONE, labels={"app": "legacy"})
WEB_SVC = Service(
    "shop", "web", vips=("10.96.0.20",), ports=(ServicePort(80, 8080),), selector={"app": "web"}
)
LEGACY_SVC = Service(
    "legacy", "legacy", vips=("10.96.0.30",), ports=(ServicePort(80, 9090),), selector={"app": "legacy"}
)
WEB_ID = Identity("cluster.local", "shop", "web")

# waypoint for the shop namespace
WP_GW = Gateway("shop", "wp", WAYPOINT_GATEWAY_CLASS)
WP_POD = wl("wp-pod", "10.0.2.50", node="n2", labels={"gateway": "wp"})
WP_SVC = Service(
    "shop", "wp", vips=("10.96.0.99",), ports=(ServicePort(15008, 15008),), selector={"gateway": "wp"}
)
SHOP_NS_WP = Namespace("shop", waypoint=WaypointRef("wp", "shop"))


def first_node2(ws: Sequence[Workload]) -> Workload:
    return next(w for w in ws if w.node == "n2")


CASES: list[tuple[str, Snapshot, str, int, dict[str, object], object]] = [
    (
        "pod IP in mesh -> HBONE to pod:15008",
        snap(CLIENT, WEB1),
        "10.0.1.3",
        8080,
        {},
        Hbone(("10.0.1.3", 15008), "10.0.1.3:8080", WEB1.identity, WEB1),
    ),
    (
        "service VIP -> endpoint, target port",
        snap(CLIENT, WEB2, WEB_SVC),
        "10.96.0.20",
        80,
        {},
        Hbone(("10.0.2.3", 15008), "10.0.2.3:8080", WEB_ID, WEB2, WEB_SVC),
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
        {"prefer_same_node": False, "choose": first_node2},
        Hbone(("10.0.2.3", 15008), "10.0.2.3:8080", WEB_ID, WEB2, WEB_SVC),
    ),
    (
        "service VIP prefers healthy endpoints",
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
    ("service VIP, unknown port", snap(CLIENT, WEB1, WEB_SVC), "10.96.0.20", 81, {}, Deny),
    ("service VIP without endpoints", snap(CLIENT, WEB_SVC), "10.96.0.20", 80, {}, Deny),
    (
        "pod not in mesh -> passthrough",
        snap(CLIENT, PLAIN),
        "10.0.2.7",
        9090,
        {},
        Passthrough(("10.0.2.7", 9090), PLAIN),
    ),
    (
        "service of non-mesh pods -> passthrough to endpoint",
        snap(CLIENT, PLAIN, LEGACY_SVC),
        "10.96.0.30",
        80,
        {},
        Passthrough(("10.0.2.7", 9090), PLAIN, LEGACY_SVC),
    ),
    ("unknown address -> passthrough", snap(CLIENT), "192.0.2.1", 443, {}, Passthrough(("192.0.2.1", 443))),
    (
        "service with namespace waypoint -> waypoint, authority VIP",
        snap(CLIENT, WEB1, WEB_SVC, WP_GW, WP_POD, WP_SVC, SHOP_NS_WP),
        "10.96.0.20",
        80,
        {},
        Hbone(("10.0.2.50", 15008), "10.96.0.20:80", WP_POD.identity, WEB1, WEB_SVC, via_waypoint=True),
    ),
    (
        "pod IP, waypoint for services only -> direct",
        snap(CLIENT, WEB1, WEB_SVC, WP_GW, WP_POD, WP_SVC, SHOP_NS_WP),
        "10.0.1.3",
        8080,
        {},
        Hbone(("10.0.1.3", 15008), "10.0.1.3:8080", WEB1.identity, WEB1),
    ),
    (
        "pod IP, waypoint for all -> waypoint",
        snap(
            CLIENT,
            WEB1,
            WP_POD,
            WP_SVC,
            SHOP_NS_WP,
            Gateway("shop", "wp", WAYPOINT_GATEWAY_CLASS, labels={LABEL_WAYPOINT_FOR: "all"}),
        ),
        "10.0.1.3",
        8080,
        {},
        Hbone(("10.0.2.50", 15008), "10.0.1.3:8080", WP_POD.identity, WEB1, via_waypoint=True),
    ),
    (
        "missing waypoint fails open to direct",
        snap(CLIENT, WEB1, WEB_SVC, SHOP_NS_WP),
        "10.96.0.20",
        80,
        {},
        Hbone(("10.0.1.3", 15008), "10.0.1.3:8080", WEB_ID, WEB1, WEB_SVC, note="waypoint shop/wp not found"),
    ),
    (
        "service opting out of the namespace waypoint -> direct",
        snap(
            CLIENT,
            WEB1,
            WP_GW,
            WP_POD,
            WP_SVC,
            SHOP_NS_WP,
            Service(
                "shop",
                "web",
                vips=("10.96.0.20",),
                ports=(ServicePort(80, 8080),),
                selector={"app": "web"},
                waypoint=WaypointRef("none", "shop"),
            ),
        ),
        "10.96.0.20",
        80,
        {},
        Hbone(
            ("10.0.1.3", 15008),
            "10.0.1.3:8080",
            WEB_ID,
            WEB1,
            Service(
                "shop",
                "web",
                vips=("10.96.0.20",),
                ports=(ServicePort(80, 8080),),
                selector={"app": "web"},
                waypoint=WaypointRef("none", "shop"),
            ),
        ),
    ),
]


@pytest.mark.parametrize(("name", "snapshot", "ip", "port", "kw", "want"), CASES, ids=[c[0] for c in CASES])
def test_decide_outbound(
    name: str, snapshot: Snapshot, ip: str, port: int, kw: dict[str, object], want: object
) -> None:
    got = decide_outbound(snapshot, CLIENT, ip, port, **kw)  # type: ignore[arg-type]
    if isinstance(want, type):
        assert isinstance(got, want), got
    else:
        assert got == want


def test_waypoint_does_not_loop_to_itself() -> None:
    s = snap(CLIENT, WEB1, WEB_SVC, WP_GW, WP_POD, WP_SVC, SHOP_NS_WP)
    got = decide_outbound(s, WP_POD, "10.96.0.20", 80)
    assert isinstance(got, Hbone) and not got.via_waypoint and got.to == ("10.0.1.3", 15008)


def test_inbound_hook_allows_by_default() -> None:
    assert decide_inbound(snap(WEB1), WEB1, CLIENT.identity, "10.0.1.2", 8080).allow


@pytest.mark.parametrize(
    ("policies", "allowed"),
    [
        ((), True),
        ((PeerAuthentication("istio-system", "mesh", mtls_mode=MtlsMode.STRICT),), False),
        (
            (
                PeerAuthentication("shop", "ns", mtls_mode=MtlsMode.PERMISSIVE),
                PeerAuthentication("istio-system", "mesh", mtls_mode=MtlsMode.STRICT),
            ),
            True,
        ),
        ((PeerAuthentication("shop", "ns", mtls_mode=MtlsMode.STRICT),), False),
        (
            (
                PeerAuthentication("shop", "ns", mtls_mode=MtlsMode.STRICT),
                PeerAuthentication(
                    "shop", "web", selector=WorkloadSelector({"app": "web"}), mtls_mode=MtlsMode.PERMISSIVE
                ),
            ),
            True,
        ),
        ((PeerAuthentication("other", "ns", mtls_mode=MtlsMode.STRICT),), True),
    ],
)
def test_plaintext_allowed(policies: tuple[PeerAuthentication, ...], allowed: bool) -> None:
    assert plaintext_allowed(snap(WEB1, *policies), WEB1) is allowed
