"""Simulated nodes and pods as network namespaces (iproute2 only).

Layout (N = node number 1.., P = pod number 2..)::

    pod netns  <prefix><namespace>-<pod>   eth0 10.0.N.P/24, default via 10.0.N.1
               (a waypoint's pod: the highest free address of the node's pod CIDR, 10.0.N.254)
         | veth
    node netns <prefix><node>              br0 10.0.N.1/24 (its pods' veths), ip_forward on
         | veth "wire" 10.0.254.N/24 -- node-to-node traffic crosses it: the demo captures there
    node netns of the other node

Nothing is created in the root netns but the netns files: deleting a netns deletes its links,
nft tables and ip rules with it. Every netns is recorded in the run state before it exists.

The demo builds the nodes (:meth:`Topology.add_node`); the waypoint supervisor, another process,
finds them again by name (:meth:`Topology.adopt_node`, which reads the bridge's address) and
adds and removes its waypoints' pods on them (:meth:`Topology.add_pod`, :meth:`Topology.remove_pod`).
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
from dataclasses import dataclass

from ambientctl.localmesh.state import RunState

WIRE = "wire"
WIRE_NET = "10.0.254"
BRIDGE = "br0"


def node_cidr(index: int) -> str:
    """The pod CIDR of node number ``index`` (1..): its bridge is the CIDR's first address."""
    return f"10.0.{index}.0/24"


class TopologyError(RuntimeError):
    pass


def run(*args: str, input: str | None = None, timeout: float = 30) -> str:
    p = subprocess.run(args, input=input, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise TopologyError(f"{' '.join(args)}: exit {p.returncode}: {p.stderr.strip()}")
    return p.stdout


@dataclass(frozen=True)
class NodeNet:
    name: str
    index: int
    netns: str
    gateway: str  # the bridge's address: its pods' default route
    prefixlen: int = 24

    @property
    def subnet(self) -> str:
        """The node's pod CIDR (its bridge's subnet)."""
        return str(ipaddress.ip_network(f"{self.gateway}/{self.prefixlen}", strict=False))


@dataclass(frozen=True)
class PodNet:
    namespace: str
    name: str
    node: NodeNet
    ip: str
    netns: str
    host_if: str

    @property
    def netns_path(self) -> str:
        return f"/var/run/netns/{self.netns}"

    def cni_result(self) -> dict[str, object]:
        """What a bridge + host-local plugin would have returned: our plugin's prevResult."""
        mac = json.loads(run("ip", "-n", self.netns, "-j", "link", "show", "eth0"))[0]["address"]
        return {
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": "br0"},
                {"name": self.host_if},
                {"name": "eth0", "mac": mac, "sandbox": self.netns_path},
            ],
            "ips": [
                {"address": f"{self.ip}/{self.node.prefixlen}", "gateway": self.node.gateway, "interface": 2}
            ],
            "routes": [{"dst": "0.0.0.0/0", "gw": self.node.gateway}],
        }


class Topology:
    def __init__(self, state: RunState) -> None:
        self.state = state
        self.nodes: dict[str, NodeNet] = {}
        self.pods: list[PodNet] = []

    def _add_netns(self, name: str) -> None:
        self.state.add_netns(name)  # recorded first: a failure below still gets it deleted
        run("ip", "netns", "add", name)
        run("ip", "-n", name, "link", "set", "lo", "up")

    def add_node(self, name: str, pod_cidr: str | None = None) -> NodeNet:
        """Node number ``len(nodes) + 1``: its bridge gets the first address of ``pod_cidr``
        (default :func:`node_cidr` of its number)."""
        index = len(self.nodes) + 1
        cidr = ipaddress.ip_network(pod_cidr or node_cidr(index))
        node = NodeNet(
            name, index, f"{self.state.prefix}{name}", str(cidr.network_address + 1), cidr.prefixlen
        )
        self._add_netns(node.netns)
        ns = node.netns
        run("ip", "-n", ns, "link", "add", BRIDGE, "type", "bridge")
        run("ip", "-n", ns, "addr", "add", f"{node.gateway}/{node.prefixlen}", "dev", BRIDGE)
        run("ip", "-n", ns, "link", "set", BRIDGE, "up")
        run("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        self.nodes[name] = node
        return node

    def connect(self, a: NodeNet, b: NodeNet) -> None:
        """The wire between two nodes, with a route to each other's pod subnet."""
        run("ip", "link", "add", "name", WIRE, "netns", a.netns, "type", "veth", "peer", "name", WIRE,
            "netns", b.netns)  # fmt: skip
        for n in (a, b):
            run("ip", "-n", n.netns, "addr", "add", f"{WIRE_NET}.{n.index}/24", "dev", WIRE)
            run("ip", "-n", n.netns, "link", "set", WIRE, "up")
        run("ip", "-n", a.netns, "route", "add", b.subnet, "via", f"{WIRE_NET}.{b.index}")
        run("ip", "-n", b.netns, "route", "add", a.subnet, "via", f"{WIRE_NET}.{a.index}")

    def connect_all(self, nodes: list[NodeNet]) -> None:
        """Join ``nodes``: two by a direct wire (:meth:`connect`); three or more through a hub, a
        netns ``<prefix>wire`` holding a bridge every node's ``wire`` veth is plugged into.
        Each node routes every other node's pod subnet via that node's wire address."""
        if len(nodes) < 2:
            return
        if len(nodes) == 2:
            self.connect(nodes[0], nodes[1])
            return
        hub = f"{self.state.prefix}{WIRE}"
        self._add_netns(hub)
        run("ip", "-n", hub, "link", "add", BRIDGE, "type", "bridge")
        run("ip", "-n", hub, "link", "set", BRIDGE, "up")
        for n in nodes:
            port = f"n{n.index}"
            run("ip", "link", "add", "name", WIRE, "netns", n.netns, "type", "veth", "peer", "name", port,
                "netns", hub)  # fmt: skip
            run("ip", "-n", hub, "link", "set", port, "master", BRIDGE, "up")
            run("ip", "-n", n.netns, "addr", "add", f"{WIRE_NET}.{n.index}/24", "dev", WIRE)
            run("ip", "-n", n.netns, "link", "set", WIRE, "up")
        for n in nodes:
            for other in nodes:
                if other is not n:
                    run("ip", "-n", n.netns, "route", "add", other.subnet, "via", f"{WIRE_NET}.{other.index}")

    def adopt_node(self, name: str, netns: str) -> NodeNet:
        """A node another process built (:meth:`add_node`): its bridge's IPv4 address tells the
        gateway and prefix its new pods get. Not recorded here: the netns is not ours to delete."""
        try:
            links = json.loads(run("ip", "-n", netns, "-j", "-4", "addr", "show", "dev", BRIDGE))
        except (TopologyError, ValueError) as e:
            raise TopologyError(f"node {name}: no bridge {BRIDGE} in netns {netns}: {e}") from None
        addrs = [a for link in links for a in link.get("addr_info", []) if a.get("family") == "inet"]
        if not addrs:
            raise TopologyError(f"node {name}: bridge {BRIDGE} in netns {netns} has no IPv4 address")
        gateway, prefixlen = str(addrs[0]["local"]), int(addrs[0]["prefixlen"])
        node = NodeNet(name, 0, netns, gateway, prefixlen)  # index: only the builder numbers nodes
        self.nodes[name] = node
        return node

    def pod_ip(self, node: NodeNet) -> str:
        return f"10.0.{node.index}.{2 + sum(1 for p in self.pods if p.node == node)}"

    def add_pod(self, namespace: str, name: str, node: NodeNet, ip: str) -> PodNet:
        """The sandbox a container runtime makes, with what the main CNI plugin (bridge) does."""
        netns = f"{self.state.prefix}{namespace}-{name}"
        # Unique on the node's bridge: the last octet within a /24 (the demo's), else the whole address.
        host_if = (
            f"v{ip.rsplit('.', 1)[1]}" if node.prefixlen >= 24 else f"v{int(ipaddress.ip_address(ip)):08x}"
        )
        pod = PodNet(namespace, name, node, ip, netns, host_if)
        self._add_netns(netns)
        run("ip", "link", "add", "name", "eth0", "netns", netns, "type", "veth", "peer", "name", host_if,
            "netns", node.netns)  # fmt: skip
        run("ip", "-n", node.netns, "link", "set", host_if, "master", BRIDGE, "up")
        run("ip", "-n", netns, "addr", "add", f"{ip}/{node.prefixlen}", "dev", "eth0")
        run("ip", "-n", netns, "link", "set", "eth0", "up")
        run("ip", "-n", netns, "route", "add", "default", "via", node.gateway)
        self.pods.append(pod)
        return pod

    def remove_pod(self, pod: PodNet) -> None:
        """Delete the pod's netns (its veth, and the peer on the bridge, go with it), then forget it."""
        if pod.netns in netns_list():
            run("ip", "netns", "del", pod.netns)
        if pod in self.pods:
            self.pods.remove(pod)
        if pod.netns in self.state.netns:
            self.state.netns.remove(pod.netns)
            self.state.save()


def netns_list() -> set[str]:
    return {line.split(" ", 1)[0] for line in run("ip", "netns", "list").splitlines() if line.strip()}
