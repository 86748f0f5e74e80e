"""``ambientctl mesh``: a local mesh built from a user's own YAML (a :class:`~userfile.Plan`).

The same machinery as the demo (:class:`~mesh.MeshBase`: control plane, cni agent and ztunnel
per node, the waypoint supervisor, pods run through the CNI plugin chain), for whatever Nodes
and Pods the file declares; each container's ``command``/``args`` runs in its pod's netns as the
pod's user, output to ``logs/pod-<namespace>-<name>.log``.

``mesh up`` builds it and exits, leaving the processes running; every later command (``apply``,
``exec``, ``get``, ``logs``, ``down``) is another process, which finds the mesh by its run
directory and reloads what it needs from ``state.json``'s ``info`` (nodes, ports, pods) and
the mesh file. Everything is recorded before it is created (:mod:`state`), so ``mesh down``
removes what a run killed half way left.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from ambientctl.localmesh.mesh import MeshBase, NodeProcs, PodRef, Say
from ambientctl.localmesh.procs import ProcError, http_json, pause
from ambientctl.localmesh.state import RunState, locked, proc_starttime
from ambientctl.localmesh.topology import NodeNet, PodNet, TopologyError, netns_list
from ambientctl.localmesh.userfile import ContainerPlan, Plan, PodPlan, doc_key, environment, plan, render
from mesh.files import write_atomic

__all__ = ["KIND", "UserMesh", "locked"]

KIND = "mesh"  # state.info["kind"]: a run made by `ambientctl mesh up` (the demo's has none)
POD_PROC_PREFIX = "pod-"


def pod_proc(p: PodPlan, c: ContainerPlan) -> str:
    """The run-state name of a container's process (the first container's is the pod's)."""
    base = f"{POD_PROC_PREFIX}{p.namespace}-{p.name}"
    return base if c is p.containers[0] else f"{base}-{c.name}"


def pod_log(run_dir: Path, key: str) -> Path:
    ns, name = key.split("/", 1)
    return run_dir / "logs" / f"{POD_PROC_PREFIX}{ns}-{name}.log"


def user_argv(netns_path: str, uid: int, gid: int, argv: list[str]) -> list[str]:
    """``argv`` in a pod's network namespace as ``uid``:``gid`` with no supplementary groups."""
    return ["nsenter", f"--net={netns_path}", "-S", str(uid), "-G", str(gid), "--", *argv]


class UserMesh(MeshBase):
    STEPS = 7

    def __init__(self, state: RunState, say: Say, plan_: Plan) -> None:
        super().__init__(state, say)
        self.plan = plan_

    def pod_refs(self) -> list[PodRef]:
        return list(self.plan.pods)

    def enrolled(self, p: PodRef) -> bool:
        pod = self.plan.pod(p.key)
        return pod is not None and pod.enrolled

    def _write_config(self) -> None:
        write_atomic(self.config, self.plan.text.encode(), mode=0o644)

    def _daemons_file(self) -> Path | None:
        """What the supervisor restarts when it dies, as a kubelet would (growing backoff): the
        control plane (on the address it serves now), each node's cni agent and ztunnel."""
        daemons = {}
        for name, (started, env, log) in self.procs.specs.items():
            argv = list(started)
            if name == "controlplane":
                at = argv.index("--listen")
                argv[at + 1] = self.cp_address
            elif not name.startswith(("ztunnel-", "cni-")):
                continue
            daemons[name] = {"argv": argv, "env": env, "log": str(log)}
        path = self.state.path / "daemons.json"
        write_atomic(path, json.dumps(daemons, indent=1).encode(), mode=0o600)
        return path

    # -- up ---------------------------------------------------------------------------------------

    def up(self, source: str) -> None:
        p = self.plan
        self.state.info.update(kind=KIND, config=str(self.config), source=source)
        self.state.save()
        self.step(
            f"writing the mesh file {self.config} ({len(p.nodes)} node(s), {len(p.pods)} pod(s) from {source})"
        )
        self._write_config()

        self.step("starting the control plane (local mode: CA + discovery)")
        self.start_controlplane()
        self.state.info["controlplane"] = self.cp_address
        self.state.save()

        self.step(f"building nodes {', '.join(n.name for n in p.nodes)} as network namespaces")
        for n in p.nodes:
            node = self.topo.add_node(n.name, n.cidr)
            self.say(f"      {n.name}: netns {node.netns}, bridge br0 {node.gateway}/{node.prefixlen}")
        self.topo.connect_all(list(self.topo.nodes.values()))
        self._save_info()

        self.step("starting the cni agent and ztunnel of each node, and the waypoint supervisor")
        for node in self.topo.nodes.values():
            self._start_node(node)
            self._save_info()
        self._start_supervisor()

        self.step("running the pods: sandbox netns, then the CNI plugin chain (ours last)")
        for pod in p.pods:
            self._run_pod(pod)
            self._save_info()
        self.step("waiting for each ztunnel to take over its enrolled pods (listeners + certificates)")
        for np in self.nodes.values():
            self._wait_ztunnel(np, timeout=90.0)
        self.step("starting the pods' commands (in their netns, as their user)")
        for pod in p.pods:
            self._start_commands(pod)
        self._save_info()

    def _start_commands(self, p: PodPlan) -> None:
        net = self.pods[p.key]
        log = pod_log(self.state.path, p.key)
        if not any(c.argv for c in p.containers):
            log.parent.mkdir(exist_ok=True)
            log.touch()
            self.say(f"      {p.key}: no command (no images here): sandbox only")
            return
        for c in p.containers:
            if not c.argv:
                continue
            self.procs.start(
                pod_proc(p, c), user_argv(net.netns_path, c.uid, c.gid, list(c.argv)), environment(p, c),
                append=True, log=log, cwd=c.cwd,
            )  # fmt: skip
            who = "root" if c.uid == 0 else f"uid {c.uid}"
            self.say(f"      {p.key} [{c.name}]: {' '.join(c.argv)}  (as {who}; log {log})")

    def _save_info(self) -> None:
        self.state.info.update(
            nodes={
                n.name: {"netns": n.netns, "index": n.index, "gateway": n.gateway, "prefixlen": n.prefixlen}
                for n in self.topo.nodes.values()
            },
            ztunnels={
                name: {"admin": np.admin, "stats": np.stats, "readiness": np.readiness}
                for name, np in self.nodes.items()
            },
            pods={
                key: {"netns": net.netns, "ip": net.ip, "node": net.node.name, "host_if": net.host_if}
                for key, net in self.pods.items()
            },
            redirected=sorted(self.redirected),
        )
        self.state.save()

    # -- a later command: the mesh again, from its run directory ---------------------------------

    @classmethod
    def load(cls, state: RunState, say: Say) -> UserMesh:
        info = state.info
        config = state.path / "mesh.yaml"
        m = cls(state, say, plan(config.read_text(), str(config)))
        m.cp_address = str(info.get("controlplane", ""))
        nodes = _mapping(info.get("nodes"))
        for name, n in nodes.items():
            node = NodeNet(name, int(n["index"]), str(n["netns"]), str(n["gateway"]), int(n["prefixlen"]))
            m.topo.nodes[name] = node
        zt = _mapping(info.get("ztunnels"))
        for name, z in zt.items():
            d = state.path / name
            m.nodes[name] = NodeProcs(
                m.topo.nodes[name],
                int(z["admin"]),
                int(z["stats"]),
                int(z["readiness"]),
                d / "zds.sock",
                d / "cni.sock",
            )
        pods = _mapping(info.get("pods"))
        for key, p in pods.items():
            ns, name = key.split("/", 1)
            net = PodNet(ns, name, m.topo.nodes[p["node"]], str(p["ip"]), str(p["netns"]), str(p["host_if"]))
            m.pods[key] = net
            m.topo.pods.append(net)
        redirected = info.get("redirected")
        m.redirected = {str(k) for k in redirected} if isinstance(redirected, list) else set()
        return m

    # -- apply ------------------------------------------------------------------------------------

    def apply(self, new: Plan) -> dict[str, list[str]]:
        """Make the mesh what ``new`` says: pods gone or changed are stopped and their netns
        deleted; the file is replaced (the control plane reloads it); new pods are built, enrolled
        and started. What changed, by verb."""
        old = self.plan
        old_pods = {p.key: p for p in old.pods}
        new_pods = {p.key: p for p in new.pods}
        changed = [k for k in old_pods if k in new_pods and old_pods[k].runtime() != new_pods[k].runtime()]
        removed = [k for k in old_pods if k not in new_pods]
        added = [k for k in new_pods if k not in old_pods]
        if changed or removed:
            # First without them: the cni agents and ztunnels let go of their netns.
            gone = set(changed) | set(removed)
            for k in sorted(gone):
                self._stop_pod(old_pods[k])
            self.plan = Plan(new.nodes, tuple(p for p in new.pods if p.key not in gone), new.documents,
                             _without(new, gone))  # fmt: skip
            self._write_config()
            self._wait_released(gone)
            for k in sorted(gone):
                self._delete_sandbox(k)
            self._save_info()
        self.plan = new
        self._write_config()
        self.say(f"      {self.config.name} replaced: the control plane reloads it")
        self._wait_policies(_policy_keys(new), _policy_keys(old) - _policy_keys(new))
        build = [new_pods[k] for k in [*changed, *added]]
        for pod in build:
            self._run_pod(pod)
            self._save_info()
        for name in sorted({p.node for p in build}):
            self._wait_ztunnel(self.nodes[name], timeout=90.0)
        for pod in build:
            self._start_commands(pod)
        self._save_info()
        kept = [k for k in new_pods if k not in changed and k not in added]
        return {"created": added, "replaced": changed, "deleted": removed, "unchanged": kept}

    def _stop_pod(self, p: PodPlan, grace: float = 5.0) -> None:
        names = {pod_proc(p, c) for c in p.containers if c.argv} if p.containers else set()
        records = [r for r in self.state.procs if r.name in names]
        for r in records:
            if proc_starttime(r.pid) == r.starttime:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(r.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for r in records:
            while proc_starttime(r.pid) == r.starttime and time.monotonic() < deadline:
                _reap(r.pid)
                pause(0.05)
            if proc_starttime(r.pid) == r.starttime:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(r.pid, signal.SIGKILL)
        self.state.procs = [r for r in self.state.procs if r.name not in names]
        self.state.save()
        self.say(f"      {p.key}: processes stopped")

    def _wait_policies(self, want: set[str], gone: set[str], timeout: float = 60.0) -> None:
        """Until every ztunnel holds the file's AuthorizationPolicies and none it dropped: when
        ``apply`` returns, what it applied is in force."""

        def probe() -> bool | None:
            for np in self.nodes.values():
                dump = http_json(np.admin_url("/config_dump")) or {}
                have = {f"{a.get('namespace')}/{a.get('name')}" for a in dump.get("authorizations") or []}
                if not want <= have or have & gone:
                    return None
            return True

        if want or gone:
            name = next(iter(self.nodes.values())).ztunnel if self.nodes else "controlplane"
            self.procs.wait_for(name, "the file's authorization policies", probe, timeout)
            self.say(f"      every ztunnel has the {len(want)} authorization policy(ies) of the file")

    def _wait_released(self, keys: set[str], timeout: float = 30.0) -> None:
        """Until no ztunnel serves the pods ``keys`` any more (or ``timeout``: the netns goes anyway)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            held = set()
            for np in self.nodes.values():
                dump = http_json(np.admin_url("/config_dump")) or {}
                held |= {f"{p.get('namespace')}/{p.get('name')}" for p in dump.get("pods", [])} & keys
            if not held:
                return
            pause(0.1)
        self.say(
            f"      warning: ztunnel still held {', '.join(sorted(keys))} after {timeout:g} s; deleting anyway"
        )

    def _delete_sandbox(self, key: str) -> None:
        net = self.pods.pop(key, None)
        self.redirected.discard(key)
        if net is None:
            return
        try:
            self.topo.remove_pod(net)
        except TopologyError as e:
            raise ProcError(f"{key}: cannot delete netns {net.netns}: {e}") from None
        self.say(f"      {key}: netns {net.netns} deleted")

    def pod_running(self, p: PodPlan) -> tuple[int, int]:
        """(containers with a live process, containers with a command)."""
        alive = 0
        with_cmd = [c for c in p.containers if c.argv]
        for c in with_cmd:
            rec = next((r for r in reversed(self.state.procs) if r.name == pod_proc(p, c)), None)
            if rec is not None and proc_starttime(rec.pid) == rec.starttime:
                alive += 1
        return alive, len(with_cmd)

    def netns_exists(self, key: str) -> bool:
        net = self.pods.get(key)
        return net is not None and net.netns in netns_list()


def _mapping(value: object) -> dict[str, Any]:
    """A mapping ``state.json``'s ``info`` holds (written by :meth:`UserMesh._save_info`)."""
    return {str(k): v for k, v in value.items()} if isinstance(value, dict) else {}


def _policy_keys(p: Plan) -> set[str]:
    # Those bound to a waypoint (targetRefs) are the waypoint's, not ztunnel's.
    return {
        "/".join(doc_key(d)[1:])
        for d in p.documents
        if d.get("kind") == "AuthorizationPolicy"
        and not {"targetRef", "targetRefs"}
        & set((d.get("spec") or {}) if isinstance(d.get("spec"), dict) else {})
    }


def _without(p: Plan, keys: set[str]) -> str:
    return render(
        [d for d in p.documents if not (d.get("kind") == "Pod" and "/".join(doc_key(d)[1:]) in keys)]
    )


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
