"""Local mode's waypoint controller and scheduler: a waypoint Gateway becomes its pod and service.

In Kubernetes the control plane's waypoint controller turns a ``Gateway`` of class
``istio-waypoint`` into a ServiceAccount, a Deployment and a Service of the Gateway's name, and
the scheduler and kubelet give the Deployment's pod a node and an IP. A local file has none of
them, so :func:`waypoint_deployments` does the same on the parsed objects, deterministically, so
the control plane (which must know the pod: discovery, the CA) and the local supervisor (which
builds the pod's network namespace and runs the process) reach the same answer from the same
file:

* the ServiceAccount ``<gateway>`` (the waypoint's identity is its Gateway's name, as in Istio);
* the Service ``<gateway>`` (headless; ports ``mesh`` 15008, ``status`` 15021, ``metrics``
  15020; selects the pod by ``gateway.networking.k8s.io/gateway-name``) unless the file
  declares one of that name;
* one Pod ``<gateway>-0`` with ``istio.io/dataplane-mode: none`` (never captured), on the node
  the Gateway's ``ambient-mesh.io/node`` annotation names, else the first node (by name) that
  declares ``spec.podCIDR``; its IP is the highest address of that CIDR no pod of the file uses.

A waypoint that cannot be placed (no node with a pod CIDR, the named node unknown or without
one, the CIDR full) gets no pod: :class:`Unplaced` says why, the control plane logs it, and
traffic bound to it fails open as with any missing waypoint (closed in strict mode).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from mesh.enrollment import DATAPLANE_MODE_LABEL
from mesh.model import (
    Gateway,
    MeshObject,
    Node,
    Service,
    ServiceAccount,
    ServicePort,
    TunnelProtocol,
    Workload,
)
from mesh.model.objects import LABEL_GATEWAY_NAME
from sources.convert import pod_uid

ANNOTATION_NODE = "ambient-mesh.io/node"  # local mode: where to run a waypoint's pod
_MAX_TRIES = 4096  # addresses looked at from the top of a node's pod CIDR
WAYPOINT_PORTS = (
    ServicePort(15008, 15008, "mesh"),
    ServicePort(15021, 15021, "status"),
    ServicePort(15020, 15020, "metrics"),
)


@dataclass(frozen=True, slots=True)
class Placed:
    gateway: Gateway
    pod: Workload

    @property
    def ip(self) -> str:
        return self.pod.ips[0]


@dataclass(frozen=True, slots=True)
class Unplaced:
    gateway: Gateway
    reason: str


def pod_name(gw: Gateway) -> str:
    return f"{gw.name}-0"


def _pod_cidr(node: Node) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    for c in node.pod_cidrs:
        net = ipaddress.ip_network(c)
        if net.version == 4:
            return net
    return ipaddress.ip_network(node.pod_cidrs[0]) if node.pod_cidrs else None


def _place(gw: Gateway, nodes: Sequence[Node], used: set[str]) -> Placed | Unplaced:
    wanted = gw.annotations.get(ANNOTATION_NODE)
    if wanted:
        node = next((n for n in nodes if n.name == wanted), None)
        if node is None:
            return Unplaced(gw, f"annotation {ANNOTATION_NODE} names node {wanted!r}, which the file does not declare")
        if not node.pod_cidrs:
            return Unplaced(gw, f"node {wanted!r} declares no spec.podCIDR to give the waypoint an address from")
    else:
        node = next((n for n in sorted(nodes, key=lambda n: n.name) if n.pod_cidrs), None)
        if node is None:
            return Unplaced(gw, "no node declares spec.podCIDR to give the waypoint an address from")
    net = _pod_cidr(node)
    assert net is not None
    # Highest first: pods declared by hand usually count up from the bottom.
    top = int(net.broadcast_address) - (1 if net.version == 4 else 0)
    bottom = int(net.network_address) + 1
    for value in range(top, max(bottom, top - _MAX_TRIES) - 1, -1):
        ip = str(ipaddress.ip_address(value))
        if ip not in used:
            used.add(ip)
            pod = Workload(
                uid=pod_uid(gw.namespace, pod_name(gw)),
                name=pod_name(gw),
                namespace=gw.namespace,
                node=node.name,
                service_account=gw.name,
                ips=(ip,),
                labels={LABEL_GATEWAY_NAME: gw.name, DATAPLANE_MODE_LABEL: "none"},
                tunnel_protocol=TunnelProtocol.NONE,
            )
            return Placed(gw, pod)
    return Unplaced(gw, f"node {node.name!r} has no free address left in {net}")


def waypoint_deployments(objects: Iterable[MeshObject]) -> tuple[list[Placed | Unplaced], list[MeshObject]]:
    """(what became of each waypoint Gateway, the objects to add to the file's)."""
    objs = list(objects)
    nodes = [o for o in objs if isinstance(o, Node)]
    used = {ip for o in objs if isinstance(o, Workload) for ip in o.ips}
    services = {o.key for o in objs if isinstance(o, Service)}
    accounts = {o.key for o in objs if isinstance(o, ServiceAccount)}
    gateways = sorted((o for o in objs if isinstance(o, Gateway) and o.is_waypoint), key=lambda g: g.key)
    results: list[Placed | Unplaced] = []
    added: list[MeshObject] = []
    for gw in gateways:
        if gw.key not in accounts:
            added.append(ServiceAccount(gw.namespace, gw.name))
        if gw.key not in services:
            added.append(
                Service(gw.namespace, gw.name, vips=(), ports=WAYPOINT_PORTS, selector={LABEL_GATEWAY_NAME: gw.name})
            )
        placed = _place(gw, nodes, used)
        results.append(placed)
        if isinstance(placed, Placed):
            added.append(placed.pod)
    return results, added
