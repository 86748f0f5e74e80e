"""Shared builders for the discovery tests: small, readable model objects."""

from __future__ import annotations

from mesh.model import (
    Gateway,
    Namespace,
    Service,
    ServicePort,
    TunnelProtocol,
    WaypointRef,
    Workload,
)


def pod(
    name: str,
    ip: str = "10.0.0.1",
    *,
    ns: str = "shop",
    node: str = "node-a",
    sa: str = "default",
    labels: dict[str, str] | None = None,
    named_ports: dict[str, int] | None = None,
    waypoint: WaypointRef | None = None,
) -> Workload:
    return Workload(
        uid=f"uid-{ns}-{name}",
        name=name,
        namespace=ns,
        node=node,
        service_account=sa,
        ips=(ip,),
        labels=labels or {"app": name},
        tunnel_protocol=TunnelProtocol.HBONE,
        named_ports=named_ports or {},
        waypoint=waypoint,
    )


def service(
    name: str,
    vip: str = "10.96.0.1",
    *,
    ns: str = "shop",
    selector: dict[str, str] | None = None,
    ports: tuple[ServicePort, ...] = (ServicePort(port=80, target_port=8080),),
    waypoint: WaypointRef | None = None,
) -> Service:
    return Service(
        namespace=ns,
        name=name,
        vips=(vip,),
        ports=ports,
        selector=selector if selector is not None else {"app": name},
        waypoint=waypoint,
    )


def waypoint_gateway(name: str = "waypoint", ns: str = "shop", waypoint_for: str = "service") -> Gateway:
    return Gateway(
        namespace=ns,
        name=name,
        gateway_class="istio-waypoint",
        labels={"istio.io/waypoint-for": waypoint_for},
    )


def namespace(name: str = "shop", waypoint: WaypointRef | None = None) -> Namespace:
    return Namespace(name=name, waypoint=waypoint)
