"""What a waypoint serves and where a request may go (waypoint/routing.py): a table over proxy state."""

from __future__ import annotations

import dataclasses

from mesh.model import WorkloadStatus
from mesh.xds.state import AppProtocol, GatewayAddress, Port, ProxySnapshot, ProxyState, Service, Workload
from waypoint.routing import Me, Target, endpoints, resolve, service_of

WP = GatewayAddress(namespace="shop", hostname="waypoint.shop.svc.cluster.local")
WP_API = GatewayAddress(namespace="shop", hostname="wp-api.shop.svc.cluster.local")
ME, API_ME = Me("shop", "waypoint"), Me("shop", "wp-api")
WEB_KEY, API_KEY = "shop/web.shop.svc.cluster.local", "shop/api.shop.svc.cluster.local"


def svc(name: str, vip: str, ports: tuple[Port, ...], waypoint: GatewayAddress | None = None) -> Service:
    return Service(
        name, "shop", f"{name}.shop.svc.cluster.local", vips=(vip,), ports=ports, waypoint=waypoint
    )


def pod(name: str, ip: str, sa: str, services: dict[str, tuple[Port, ...]], **kw: object) -> Workload:
    return Workload(
        f"shop-{name}", name, "shop", addresses=(ip,), service_account=sa, services=services, **kw
    )  # type: ignore[arg-type]


WEB_PORTS = (
    Port(80, 8080, AppProtocol.HTTP11),
    Port(81, 8081, AppProtocol.UNKNOWN),
    Port(82, 8082, AppProtocol.TCP),
)
WEB = svc("web", "10.96.0.20", WEB_PORTS, WP)
WEB1 = pod("web-1", "10.0.2.2", "web", {WEB_KEY: WEB_PORTS})
WEB2 = dataclasses.replace(
    pod("web-2", "10.0.2.3", "web", {WEB_KEY: WEB_PORTS}), status=WorkloadStatus.UNHEALTHY
)
API_PORTS = (Port(80, 8080, AppProtocol.GRPC),)
API = svc("api", "10.96.0.22", API_PORTS)
# api is served by two accounts: api (bound to its account's waypoint) and legacy (no waypoint).
API1 = pod("api-1", "10.0.2.4", "api", {API_KEY: API_PORTS}, waypoint=WP_API, waypoint_account_for="service")
API_LEGACY = pod("api-old", "10.0.2.5", "legacy", {API_KEY: API_PORTS})
BOUND_POD = pod("solo", "10.0.2.6", "solo", {WEB_KEY: WEB_PORTS}, waypoint=WP)


def snap() -> ProxySnapshot:
    state = ProxyState()
    values = [WEB, API, WEB1, WEB2, API1, API_LEGACY, BOUND_POD]
    state.apply(addresses=[(v.uid if isinstance(v, Workload) else v.key, v) for v in values])
    return state.snapshot()


def test_service_traffic_and_its_declared_protocol() -> None:
    s = snap()
    for port, protocol, http in (
        (80, AppProtocol.HTTP11, True),
        (81, AppProtocol.UNKNOWN, None),
        (82, AppProtocol.TCP, False),
    ):
        t = resolve(s, ME, "10.96.0.20", port)
        assert isinstance(t, Target) and t.service == WEB and t.protocol is protocol and t.http is http
    t = resolve(s, ME, "10.96.0.20", 80)
    assert isinstance(t, Target)
    # Healthy endpoints first; the unhealthy one only when nothing else is left.
    assert [(w.name, p) for w, p in endpoints(s, ME, t)] == [("web-1", 8080), ("solo", 8080)]
    assert service_of(s, t) == WEB


def test_a_waypoint_refuses_what_it_does_not_serve() -> None:
    s = snap()
    assert (
        resolve(s, API_ME, "10.96.0.20", 80)
        == "service shop/web.shop.svc.cluster.local is not served by waypoint shop/wp-api"
    )
    assert (
        resolve(s, ME, "10.96.0.22", 80)
        == "service shop/api.shop.svc.cluster.local is not served by waypoint shop/waypoint"
    )
    assert resolve(s, ME, "10.0.2.2", 8080) == "workload shop/web-1 is not served by waypoint shop/waypoint"
    assert (
        resolve(s, ME, "192.0.2.1", 80) == "192.0.2.1 is neither a service nor a workload this waypoint knows"
    )


def test_an_account_waypoint_delivers_only_to_its_accounts_endpoints() -> None:
    s = snap()
    t = resolve(s, API_ME, "10.96.0.22", 80)
    assert isinstance(t, Target) and t.protocol is AppProtocol.GRPC
    assert [w.name for w, _ in endpoints(s, API_ME, t)] == ["api-1"]  # never api-old (account legacy)


def test_pod_addressed_traffic_takes_the_protocol_of_the_service_port_targeting_it() -> None:
    s = snap()
    t = resolve(s, ME, "10.0.2.6", 8080)
    assert isinstance(t, Target) and t.workload == BOUND_POD and t.protocol is AppProtocol.HTTP11
    assert [(w.name, p) for w, p in endpoints(s, ME, t)] == [("solo", 8080)]
    other = resolve(s, ME, "10.0.2.6", 9999)
    assert isinstance(other, Target) and other.protocol is AppProtocol.UNKNOWN
    assert service_of(s, t) == WEB
