"""Build the local mesh, run the traffic, collect the evidence.

Order matters and mirrors a real node: control plane → nodes (netns + bridge + wire) → per node
the cni agent and ztunnel → each pod "run" as a container runtime does (sandbox netns, main
network plugin's work, then our chained CNI plugin with its prevResult, which returns only once
redirection is in place) → wait for ztunnel to own every enrolled pod → apps → capture → traffic.
Next to the node daemons runs the waypoint supervisor (``supervisor.py``): whatever waypoint
``Gateway`` the file gains later (the waypoint act's, or a user's on a ``--keep`` mesh), it runs.

:class:`MeshBase` is that machinery for any set of nodes and pods; :class:`LocalMesh` is the
demo's (``spec``'s topology, its apps, traffic and acts), ``usermesh.UserMesh`` a user's file's
(``ambientctl mesh``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ambientctl.localmesh import spec, supervisor
from ambientctl.localmesh.capture import Capture, Flow, read_flows
from ambientctl.localmesh.procs import (
    Procs,
    free_ports,
    http_get,
    http_json,
    pause,
    python_main,
    read_json_lines,
)
from ambientctl.localmesh.state import RunState
from ambientctl.localmesh.topology import WIRE, NodeNet, PodNet, Topology

Say = Callable[[str], None]


class DemoError(RuntimeError):
    pass


class PodRef(Protocol):
    """What the mesh machinery needs to know of a pod (the demo's ``spec.PodSpec``, a user
    file's ``userfile.PodPlan``)."""

    @property
    def namespace(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def node(self) -> str: ...
    @property
    def ip(self) -> str: ...
    @property
    def key(self) -> str: ...
    @property
    def uid(self) -> str: ...


@dataclass
class NodeProcs:
    node: NodeNet
    admin: int
    stats: int
    readiness: int
    zds: Path
    plugin: Path

    @property
    def ztunnel(self) -> str:
        return f"ztunnel-{self.node.name}"

    @property
    def agent(self) -> str:
        return f"cni-{self.node.name}"

    def admin_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.admin}{path}"


@dataclass
class Outcome:
    request: spec.Request
    reply: dict[str, Any]
    log: dict[str, Any] | None = None  # ztunnel access-log record of the source (or dest) side
    peer_log: dict[str, Any] | None = None  # the destination ztunnel's record


@dataclass
class Results:
    outcomes: list[Outcome] = field(default_factory=list)
    flows: list[Flow] = field(default_factory=list)
    packets: int = 0
    config_dumps: dict[str, Any] = field(default_factory=dict)


class MeshBase:
    """The machinery every local mesh shares (the demo's, a user's ``ambientctl mesh up``): the
    control plane, per node the cni agent and ztunnel, the waypoint supervisor, and pods run as a
    container runtime runs them. Subclasses say which pods there are and write the mesh file."""

    STEPS = 9

    def __init__(self, state: RunState, say: Say) -> None:
        self.state = state
        self.say = say
        self.procs = Procs(state)
        self.topo = Topology(state)
        self.nodes: dict[str, NodeProcs] = {}
        self.pods: dict[str, PodNet] = {}
        self.cp_dir = state.path / "controlplane"
        self.config = state.path / "mesh.yaml"
        self.cp_address = ""
        self._step = 0
        self.redirected: set[str] = set()

    def step(self, msg: str) -> None:
        self._step += 1
        self.say(f"[{self._step}/{self.STEPS}] {msg}")

    # -- what a subclass says ---------------------------------------------------------------------

    def pod_refs(self) -> list[PodRef]:
        """Every pod of the mesh file (not the waypoints' pods: the supervisor runs those)."""
        raise NotImplementedError

    def enrolled(self, p: PodRef) -> bool:
        """The pod is in the ambient mesh (its traffic is captured)."""
        raise NotImplementedError

    def _write_config(self) -> None:
        raise NotImplementedError

    def _confirmed(self, p: PodRef) -> None:
        """The cni agent set up redirection for enrolled pod ``p``."""
        self.redirected.add(p.key)

    # -- the processes ----------------------------------------------------------------------------

    def start_controlplane(self) -> None:
        ready = self.state.path / "controlplane.ready"
        self.procs.start(
            "controlplane",
            [*python_main("controlplane.main"), "--local-config", str(self.config), "--state-dir",
             str(self.cp_dir), "--listen", "127.0.0.1:0", "--ready-file", str(ready), "--poll-interval", "0.5"],
        )  # fmt: skip
        self.cp_address = self.procs.wait_file("controlplane", ready).strip()
        self.say(f"      serving on {self.cp_address}; root cert and node tokens in {self.cp_dir}")

    def _daemons_file(self) -> Path | None:
        """A file of node daemons the supervisor restarts when they die (None: it restarts none;
        the demo's restart tests stop and start them by hand)."""
        return None

    def _start_supervisor(self) -> None:
        ready = self.state.path / "supervisor.ready"
        self.procs.start(
            supervisor.PROC_NAME,
            supervisor.argv(
                self.state.path, self.config, self.cp_dir, self.cp_address,
                {n.name: n.netns for n in self.topo.nodes.values()}, ready, daemons=self._daemons_file(),
            ),
        )  # fmt: skip
        self.procs.wait_file(supervisor.PROC_NAME, ready)
        self.say(
            f"      waypoint supervisor: watches {self.config.name} for waypoint Gateways, runs them "
            f"(log {self.state.path / 'logs' / 'supervisor.log'})"
        )

    def waypoints(self) -> dict[str, Any]:
        """What the supervisor runs now: ``{"ns/gateway": {"phase", "node", "ip", "admin_port", ...}}``."""
        waypoints = supervisor.read_status(self.state.path).get("waypoints", {})
        return waypoints if isinstance(waypoints, dict) else {}

    def _start_node(self, node: NodeNet) -> None:
        d = self.state.path / node.name
        d.mkdir()
        admin, stats, readiness = free_ports(3)
        np = NodeProcs(node, admin, stats, readiness, d / "zds.sock", d / "cni.sock")
        self.nodes[node.name] = np
        self._start_agent(np)
        self._start_ztunnel(np)
        self.say(
            f"      {node.name}: cni agent ({np.plugin.name}, {np.zds.name}), ztunnel admin :{admin}, "
            f"metrics :{stats}, readiness :{readiness}"
        )

    def exec_argv(self, pod_key: str, argv: list[str]) -> list[str]:
        """``argv`` run inside the network namespace of pod ``pod_key`` (``ip netns exec``)."""
        return ["ip", "netns", "exec", self.pods[pod_key].netns, *argv]

    def _add_pod(self, p: PodRef) -> PodNet:
        net = self.pods.get(p.key)
        if net is None:
            net = self.topo.add_pod(p.namespace, p.name, self.topo.nodes[p.node], p.ip)
            self.pods[p.key] = net
        return net

    def _start_agent(self, np: NodeProcs, *, append: bool = False) -> None:
        d = self.state.path / np.node.name
        ready = d / "cni.ready"
        ready.unlink(missing_ok=True)  # a restart waits for the new process's file
        self.procs.start(
            np.agent,
            [*python_main("cni.main"), "--node", np.node.name, "--local-config", str(self.config),
             "--zds-socket", str(np.zds), "--plugin-socket", str(np.plugin), "--state-dir", str(d / "cni"),
             "--poll-interval", "0.5", "--ready-file", str(ready)],
            append=append,
        )  # fmt: skip
        self.procs.wait_file(np.agent, ready)

    def _start_ztunnel(self, np: NodeProcs, *, append: bool = False) -> None:
        d = self.state.path / np.node.name
        ready = d / "ztunnel.ready"
        ready.unlink(missing_ok=True)
        env = dict(os.environ)
        env.update(
            CA_ROOT_CERT=str(self.cp_dir / "root-cert.pem"),
            TOKEN_FILE=str(self.cp_dir / "tokens" / f"{np.node.name}.token"),
        )
        self.procs.start(
            np.ztunnel,
            [*python_main("ztunnel.main"), "--node-name", np.node.name, "--ca-address", self.cp_address,
             "--xds-address", self.cp_address, "--zds-socket", str(np.zds), "--admin-port", str(np.admin),
             "--stats-port", str(np.stats), "--readiness-port", str(np.readiness), "--drain-seconds", "1",
             "--ready-file", str(ready)],
            env,
            append=append,
        )  # fmt: skip
        self.procs.wait_file(np.ztunnel, ready)

    # -- one process at a time (restart tests) ----------------------------------------------------

    def stop(self, name: str, sig: signal.Signals = signal.SIGKILL) -> int:
        """Stop one of the mesh's processes (e.g. ``ztunnel-node-a``, ``cni-node-a``); its exit status."""
        return self.procs.stop(name, sig)

    def start_ztunnel(self, node: str) -> None:
        """Start a new ztunnel process for ``node`` (same ports, same ZDS socket, log appended) and
        wait until it serves every enrolled pod of the node again (``/config_dump``, ``/healthz/ready``)."""
        np = self.nodes[node]
        self._start_ztunnel(np, append=True)
        self._wait_ztunnel(np)

    def start_agent(self, node: str) -> None:
        """Start a new cni agent process for ``node`` (same state dir and sockets, log appended);
        returns once it serves its sockets."""
        self._start_agent(self.nodes[node], append=True)

    def _run_pod(self, p: PodRef) -> None:
        net = self._add_pod(p)
        np = self.nodes[p.node]
        conf = {
            "cniVersion": "1.0.0",
            "name": "ambient-demo",
            "type": "ambient-cni-plugin",
            "agent_socket": str(np.plugin),
            "agent_timeout": 20,
            "prevResult": net.cni_result(),
        }
        env = {
            "PATH": os.environ.get("PATH", ""),
            "CNI_COMMAND": "ADD",
            "CNI_CONTAINERID": f"{self.state.run_id}-{p.namespace}-{p.name}",
            "CNI_NETNS": net.netns_path,
            "CNI_IFNAME": "eth0",
            "CNI_PATH": "",
            "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={p.namespace};K8S_POD_NAME={p.name};"
            f"K8S_POD_UID={p.uid}",
        }
        r = subprocess.run(
            [sys.executable, "-m", "cni.plugin_main"],
            input=json.dumps(conf).encode(), capture_output=True, env=env, timeout=40,
        )  # fmt: skip
        if r.returncode != 0:
            raise DemoError(
                f"CNI ADD {p.key}: exit {r.returncode}: {r.stdout.decode().strip()} {r.stderr.decode()}"
            )
        enrolled = self.enrolled(p)
        if enrolled:
            self._confirmed(p)
        what = "redirection rules in place" if enrolled else "not enrolled, left alone"
        self.say(f"      {p.key:14} on {p.node}: {p.ip:9} netns {net.netns}  ({what})")

    def _wait_ztunnel(self, np: NodeProcs, timeout: float = 45.0) -> None:
        pods = self.pod_refs()
        want = {p.key for p in pods if p.node == np.node.name and self.enrolled(p)}

        def probe() -> dict[str, Any] | None:
            dump = http_json(np.admin_url("/config_dump"))
            if not dump or not dump.get("ready"):
                return None
            have = {f"{p['namespace']}/{p['name']}" for p in dump.get("pods", []) if p.get("listeners")}
            if not want <= have or len(dump.get("workloads", [])) < len(pods):
                return None
            hbone = {
                f"{w['namespace']}/{w['name']}"
                for w in dump["workloads"]
                if w.get("tunnel_protocol") == "HBONE"
            }
            if hbone != self.redirected:
                return None
            status, _ = http_get(f"http://127.0.0.1:{np.readiness}/healthz/ready")
            return dump if status == 200 else None

        dump = self.procs.wait_for(np.ztunnel, "ready with its pods", probe, timeout)
        ids = sorted({p["identity"] for p in dump["pods"]})
        self.say(
            f"      {np.node.name}: ready, {len(dump['pods'])} pod(s), certificates for {', '.join(ids)}"
        )

    def ztunnel_log(self, node: str) -> Path:
        return self.state.path / "logs" / f"ztunnel-{node}.log"

    def _access_logs(self, node: str) -> list[dict[str, Any]]:
        return [r for r in read_json_lines(self.ztunnel_log(node)) if r.get("event") == "connection complete"]


class LocalMesh(MeshBase):
    """The demo's mesh: ``spec``'s fixed topology, its apps, traffic and acts."""

    def __init__(self, state: RunState, say: Say) -> None:
        super().__init__(state, say)
        # In mesh.yaml after the pods, in order: the policy act's policies, the waypoint act's
        # Gateway and policies (replaced or removed by key as a user would edit the file).
        self.policies: list[spec.Document] = []
        self.web_waypoint: str | None = None  # the label istio.io/use-waypoint on Service web
        self.capture: Capture | None = None

    def pod_refs(self) -> list[PodRef]:
        return list(spec.PODS)

    def enrolled(self, p: PodRef) -> bool:
        return spec.NAMESPACES[p.namespace]

    def _confirmed(self, p: PodRef) -> None:
        # Local mode has no API server for the agent to annotate the pod through: the demo,
        # which owns the file, records the agent's confirmation the same way.
        super()._confirmed(p)
        self._write_config()

    # -- build ------------------------------------------------------------------------------------

    def build(self, *, enroll: bool = True) -> None:
        """Build the whole mesh. ``enroll=False`` stops after making the pods' sandboxes (netns,
        veth, address): no CNI plugin has run, no ztunnel serves them and no app is started —
        call :meth:`enroll_pods` later to run the plugin chain for them (the data-path benchmark
        measures the same pods before and after)."""
        self.step(f"writing the local-mode config {self.config}")
        self._write_config()
        for ns, enrolled in spec.NAMESPACES.items():
            self.say(
                f"      namespace {ns}: {'enrolled (istio.io/dataplane-mode=ambient)' if enrolled else 'not enrolled'}"
            )

        self.step("starting the control plane (local mode: CA + discovery)")
        self.start_controlplane()

        self.step(f"building nodes {', '.join(spec.NODES)} as network namespaces, joined by a wire")
        for name in spec.NODES:
            node = self.topo.add_node(name)
            self.say(f"      {name}: netns {node.netns}, bridge br0 {node.gateway}/24")
        a, b = (self.topo.nodes[n] for n in spec.NODES)
        self.topo.connect(a, b)

        self.step("starting the cni agent and ztunnel of each node, and the waypoint supervisor")
        for node in self.topo.nodes.values():
            self._start_node(node)
        self._start_supervisor()

        if not enroll:
            self.step("running the pods: sandbox netns only (the CNI plugin chain runs later)")
            for p in spec.PODS:
                self._add_pod(p)
            return

        self.step("running the pods: sandbox netns, then the CNI plugin chain (ours last)")
        for p in spec.PODS:
            self._run_pod(p)

        self.step("waiting for each ztunnel to take over its enrolled pods (listeners + certificates)")
        for np in self.nodes.values():
            self._wait_ztunnel(np)

        self.step("starting the apps (a small HTTP server on :8080 in every pod)")
        for p in spec.PODS:
            self._start_app(p)

    def _write_config(self) -> None:
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text(
            spec.local_config(
                frozenset(self.redirected),
                tuple(p.yaml for p in self.policies),
                web_waypoint=self.web_waypoint,
            )
        )
        os.replace(tmp, self.config)

    def apply_policy(self, policy: spec.Document) -> None:
        """Add ``policy`` to mesh.yaml (or replace the document of the same key), as a user editing
        the file would; the control plane, which polls the file, reloads it and pushes the result
        to the ztunnels (and the waypoint supervisor starts or stops waypoints)."""
        at = next((i for i, p in enumerate(self.policies) if p.key == policy.key), None)
        if at is None:
            self.policies.append(policy)
        else:
            self.policies[at] = policy
        self._write_config()

    def remove_policy(self, key: str) -> bool:
        """Delete the document ``key`` from mesh.yaml; False if it was not there."""
        kept = [p for p in self.policies if p.key != key]
        if len(kept) == len(self.policies):
            return False
        self.policies = kept
        self._write_config()
        return True

    def use_waypoint(self, gateway: str | None) -> None:
        """Label Service ``web`` ``istio.io/use-waypoint: <gateway>`` (None: remove the label)."""
        self.web_waypoint = gateway
        self._write_config()

    def enroll_pods(self) -> None:
        """After ``build(enroll=False)``: the CNI plugin chain for every pod, then wait until each
        ztunnel serves its enrolled pods. The apps are not started."""
        self.step("running the CNI plugin chain (ours last) for the pods")
        for p in spec.PODS:
            self._run_pod(p)
        self.step("waiting for each ztunnel to take over its enrolled pods (listeners + certificates)")
        for np in self.nodes.values():
            self._wait_ztunnel(np)

    def _start_app(self, p: spec.PodSpec) -> None:
        net = self.pods[p.key]
        ready = self.state.path / "apps" / f"{p.namespace}-{p.name}.ready"
        ready.parent.mkdir(exist_ok=True)
        name = f"app-{p.namespace}-{p.name}"
        self.procs.start(
            name,
            ["ip", "netns", "exec", net.netns, sys.executable, "-m", "ambientctl.localmesh.app", "serve",
             "--name", p.key, "--port", str(spec.APP_PORT), "--ready-file", str(ready)],
        )  # fmt: skip
        self.procs.wait_file(name, ready)

    # -- traffic ----------------------------------------------------------------------------------

    def run_traffic(self) -> Results:
        res = Results()
        a = self.topo.nodes[spec.NODES[0]]
        pcap = self.state.path / "wire.pcap"
        self.step(
            f"capturing the wire between the nodes (tcpdump -i {WIRE} in {a.netns}) and sending traffic"
        )
        self.capture = Capture(a.netns, WIRE, pcap)
        pid = self.capture.start()
        self.state.add_proc("tcpdump", pid)
        try:
            for req in spec.REQUESTS:
                reply = self._client(req)
                res.outcomes.append(Outcome(req, reply))
                ok = reply.get("status") == 200
                self.say(
                    f"      {req.src:14} -> {req.url:32} "
                    f"{'HTTP ' + str(reply.get('status')) if ok else 'FAILED ' + str(reply.get('error'))}"
                )
            self._collect_logs(res)
            self._wait_capture(pcap)
        finally:
            self.capture.stop()
        res.flows = read_flows(pcap)
        res.packets = sum(f.packets for f in res.flows)
        for np in self.nodes.values():
            res.config_dumps[np.node.name] = http_json(np.admin_url("/config_dump"))
        return res

    def _wait_capture(self, pcap: Path, timeout: float = 5.0) -> None:
        """Until the capture file holds a connection for every cross-node request (or the deadline)."""
        want = {(r.dst_pod.ip, 15008 if r.mesh else spec.APP_PORT) for r in spec.REQUESTS if r.cross_node}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                seen = {f.server for f in read_flows(pcap) if f.payload}
            except (OSError, ValueError, IndexError):
                seen = set()
            if want <= seen:
                return
            pause(0.1)

    def _client(self, req: spec.Request) -> dict[str, Any]:
        return self.request(req.src, req.url)

    def request(self, src: str, url: str, timeout: float = 10.0, method: str = "GET") -> dict[str, Any]:
        """One HTTP request from inside pod ``src`` (carrying the marker): the client's JSON outcome."""
        net = self.pods[src]
        r = subprocess.run(
            ["ip", "netns", "exec", net.netns, sys.executable, "-m", "ambientctl.localmesh.app", "get",
             url, "--marker", spec.MARKER, "--timeout", str(timeout), "--method", method],
            capture_output=True, text=True, timeout=timeout + 20,
        )  # fmt: skip
        try:
            out: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            out = {"status": 0, "error": f"client exit {r.returncode}: {r.stderr.strip()[-300:]}"}
        return out

    def _collect_logs(self, res: Results, timeout: float = 15.0) -> None:
        """Match every request to ztunnel's access-log records (written when a connection closes)."""
        deadline = time.monotonic() + timeout
        while True:
            pending = False
            for o in res.outcomes:
                local = str(o.reply.get("local", ""))
                src, dst = o.request.src_pod, o.request.dst_pod
                if o.request.mesh:
                    if o.log is None:
                        o.log = _find(self._access_logs(src.node), "outbound", src_addr=local)
                    if o.peer_log is None:
                        o.peer_log = _find(self._access_logs(dst.node), "inbound", src_ip=src.ip, dst_ip=dst.ip,
                                           skip=[x.peer_log for x in res.outcomes if x is not o])  # fmt: skip
                    pending |= o.log is None or o.peer_log is None
                elif spec.NAMESPACES[dst.namespace]:
                    if o.peer_log is None:
                        o.peer_log = _find(self._access_logs(dst.node), "inbound_passthrough", src_addr=local)
                    pending |= o.peer_log is None
            if not pending or time.monotonic() > deadline:
                return
            pause(0.1)


def _find(
    records: list[dict[str, Any]],
    direction: str,
    *,
    src_addr: str = "",
    src_ip: str = "",
    dst_ip: str = "",
    skip: list[dict[str, Any] | None] | None = None,
) -> dict[str, Any] | None:
    for r in records:
        if r.get("direction") != direction:
            continue
        if skip and any(r is s or r == s for s in skip if s is not None):
            continue
        if src_addr and r.get("src_addr") != src_addr:
            continue
        # The inbound HBONE record names the client by IP only (no port).
        if src_ip and str(r.get("src_addr", "")).rsplit(":", 1)[0] != src_ip and r.get("src_addr") != src_ip:
            continue
        if dst_ip and not str(r.get("dst_addr", "")).startswith(dst_ip + ":"):
            continue
        return r
    return None
