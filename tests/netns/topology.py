"""Simulated nodes and pods as network namespaces, built with iproute2 and nftables.

Layout (N = node number 1.., P = pod number 2..)::

    pod netns  <prefix>p<N><P>   eth0 10.0.N.P/24, default via 10.0.N.1
         | veth
    node netns <prefix>n<N>      br0 10.0.N.1/24 (all its pods' veths), ip_forward on
         | veth "wire" 10.0.254.N/24 -- node-to-node traffic crosses it: capture there
    node netns of the other node

Everything lives inside namespaces we create (nothing in the root netns but the netns files),
names carry the test run's prefix (pid), and :meth:`Topology.destroy` removes them all even when
setup failed half way: deleting a netns deletes its links, nft tables and ip rules with it.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from dataclasses import dataclass, field

WIRE = "wire"
WIRE_NET = "10.0.254"


class HarnessError(RuntimeError):
    pass


def run(*args: str, input: str | None = None) -> str:
    p = subprocess.run(args, input=input, capture_output=True, text=True, timeout=30)
    if p.returncode != 0:
        raise HarnessError(f"{' '.join(args)}: exit {p.returncode}: {p.stderr.strip()}")
    return p.stdout


def ns_run(ns: str, *args: str, input: str | None = None) -> str:
    return run("ip", "netns", "exec", ns, *args, input=input)


# The redirection rules the cni agent will write (PROTOCOLS.md "Redirection inside the pod netns").
REDIRECT_RULES = """
table inet ambient {
  chain prerouting {
    type nat hook prerouting priority -100; policy accept;
    meta l4proto != tcp return
    meta mark & 0xfff == 0x539 return
    iifname "lo" return
    ip saddr 169.254.7.127 return
    tcp dport 15008 return
    meta l4proto tcp redirect to :15006
  }
  chain output {
    type nat hook output priority -100; policy accept;
    meta l4proto != tcp return
    meta mark & 0xfff == 0x539 return
    meta mark & 0xfff == 0x111 return
    oifname "lo" return
    ip daddr 127.0.0.0/8 return
    meta l4proto tcp redirect to :15001
  }
  chain transparent-return {
    type route hook output priority -150; policy accept;
    meta mark & 0xfff == 0x111 ct mark set 0x111
    ct mark 0x111 meta mark set 0x111
  }
}
"""


# Our netns names: <two letters><pid of the test run>n<node> / p<node><pod>.
_OURS = re.compile(r"^(zt|zd|zf)(\d+)[np]\d+$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_stale() -> list[str]:
    """Delete namespaces left by a test run that was killed before its teardown (pid gone)."""
    removed = []
    for line in run("ip", "netns", "list").splitlines():
        name = line.split(" ", 1)[0]
        m = _OURS.match(name)
        if m and not _alive(int(m.group(2))):
            with contextlib.suppress(HarnessError):
                run("ip", "netns", "del", name)
                removed.append(name)
    return removed


@dataclass(frozen=True)
class Pod:
    node: int
    index: int
    netns: str
    ip: str
    name: str
    namespace: str
    service_account: str
    labels: tuple[tuple[str, str], ...] = ()
    enrolled: bool = True

    @property
    def uid(self) -> str:
        return f"{self.namespace}-{self.name}"

    @property
    def netns_path(self) -> str:
        return f"/var/run/netns/{self.netns}"


@dataclass
class Topology:
    prefix: str = field(default_factory=lambda: f"zt{os.getpid()}")
    nodes: list[str] = field(default_factory=list)
    pods: list[Pod] = field(default_factory=list)
    _netns: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        reap_stale()

    def node_ns(self, n: int) -> str:
        return f"{self.prefix}n{n}"

    def _add_netns(self, name: str) -> None:
        run("ip", "netns", "add", name)
        self._netns.append(name)
        run("ip", "-n", name, "link", "set", "lo", "up")

    def add_node(self) -> int:
        n = len(self.nodes) + 1
        ns = self.node_ns(n)
        self._add_netns(ns)
        self.nodes.append(ns)
        run("ip", "-n", ns, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", ns, "addr", "add", f"10.0.{n}.1/24", "dev", "br0")
        run("ip", "-n", ns, "link", "set", "br0", "up")
        ns_run(ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        return n

    def connect_nodes(self) -> None:
        """One wire between node 1 and node 2, routes both ways."""
        a, b = self.node_ns(1), self.node_ns(2)
        run("ip", "link", "add", "name", WIRE, "netns", a, "type", "veth", "peer", "name", WIRE, "netns", b)
        for i, ns in ((1, a), (2, b)):
            run("ip", "-n", ns, "addr", "add", f"{WIRE_NET}.{i}/24", "dev", WIRE)
            run("ip", "-n", ns, "link", "set", WIRE, "up")
        run("ip", "-n", a, "route", "add", "10.0.2.0/24", "via", f"{WIRE_NET}.2")
        run("ip", "-n", b, "route", "add", "10.0.1.0/24", "via", f"{WIRE_NET}.1")

    def add_pod(
        self,
        node: int,
        name: str,
        namespace: str,
        service_account: str,
        labels: dict[str, str] | None = None,
        enrolled: bool = True,
    ) -> Pod:
        index = 2 + sum(1 for p in self.pods if p.node == node)
        ns = f"{self.prefix}p{node}{index}"
        ip = f"10.0.{node}.{index}"
        self._add_netns(ns)
        host_if = f"p{index}"
        run(
            "ip", "link", "add", "name", "eth0", "netns", ns, "type", "veth",
            "peer", "name", host_if, "netns", self.node_ns(node),
        )  # fmt: skip
        run("ip", "-n", self.node_ns(node), "link", "set", host_if, "master", "br0", "up")
        run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        run("ip", "-n", ns, "link", "set", "eth0", "up")
        run("ip", "-n", ns, "route", "add", "default", "via", f"10.0.{node}.1")
        pod = Pod(
            node, index, ns, ip, name, namespace, service_account, tuple((labels or {}).items()), enrolled
        )
        if enrolled:
            self.enroll(pod)
        self.pods.append(pod)
        return pod

    @staticmethod
    def enroll(pod: Pod) -> None:
        """What the cni agent does: our nft table + the transparent return path (rule/table 133)."""
        ns_run(pod.netns, "nft", "-f", "-", input=REDIRECT_RULES)
        run("ip", "-n", pod.netns, "rule", "add", "fwmark", "0x111/0xfff", "lookup", "133")
        run("ip", "-n", pod.netns, "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "133")

    def destroy(self) -> list[str]:
        """Delete every namespace we made; returns the errors (teardown must not stop half way)."""
        errors = []
        for ns in reversed(self._netns):
            try:
                run("ip", "netns", "del", ns)
            except HarnessError as e:
                errors.append(str(e))
        self._netns.clear()
        return errors

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        """Destroy; what could not be deleted fails the test (or is noted on its error)."""
        errors = self.destroy()
        if not errors:
            return
        if exc is not None:
            exc.add_note(f"and the topology was not fully destroyed: {errors}")
            return
        raise HarnessError(f"the topology was not fully destroyed: {errors}")
