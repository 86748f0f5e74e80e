"""A user's own Kubernetes YAML → what ``ambientctl mesh up`` builds (a :class:`Plan`).

Pure: text in, plan (or ``ConfigError`` naming document and field) out; nothing is built here.
The file is first validated exactly as the control plane will read it
(``sources.local.parse_manifest``, all or nothing); then what only the local runtime needs is
checked here: every Pod on a declared Node, its address inside the node's pod CIDR, the
containers' ``command``/``args``/``securityContext``/``env``/``workingDir``.

What the file leaves out is filled in, and written into the mesh's own copy of the file (the one
the control plane, the cni agents and the waypoint supervisor read): a Node without
``spec.podCIDR`` gets ``10.0.<n>.0/24`` (n: its position among the nodes), a Pod without
``status.podIP`` the lowest free address of its node's CIDR (a pod already running keeps its own).

``merge`` is ``mesh apply``: objects of the new file added or replaced by (kind, namespace, name).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from mesh.enrollment import decide
from mesh.model import Namespace, Node, Workload
from sources.convert import ConfigError, pod_uid
from sources.local import parse_manifest

NOBODY = 65534  # a pod's processes run as this user unless its securityContext says otherwise
WIRE_NET = ipaddress.ip_network("10.0.254.0/24")  # topology.WIRE_NET: node-to-node addresses
CLUSTER_SCOPED = ("Node", "Namespace")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

Doc = dict[str, Any]
DocKey = tuple[str, str, str]  # (kind, namespace or "", name)


@dataclass(frozen=True)
class NodePlan:
    name: str
    cidr: str


@dataclass(frozen=True)
class ContainerPlan:
    name: str
    argv: tuple[str, ...]  # empty: the container has no command (nothing runs; no image here)
    uid: int
    gid: int
    env: tuple[tuple[str, str], ...] = ()
    cwd: str = "/"


@dataclass(frozen=True)
class PodPlan:
    namespace: str
    name: str
    node: str
    ip: str
    uid: str
    service_account: str
    enrolled: bool
    containers: tuple[ContainerPlan, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def user(self) -> tuple[int, int]:
        """(uid, gid) ``mesh exec`` runs as: the first container's, as ``kubectl exec`` picks it."""
        if self.containers:
            return self.containers[0].uid, self.containers[0].gid
        return NOBODY, NOBODY

    def runtime(self) -> tuple[str, str, tuple[ContainerPlan, ...]]:
        """What, if it changes, means the pod must be rebuilt (a new sandbox, its commands anew)."""
        return self.node, self.ip, self.containers


@dataclass(frozen=True)
class Plan:
    nodes: tuple[NodePlan, ...]
    pods: tuple[PodPlan, ...]
    documents: tuple[Doc, ...]
    text: str  # the mesh's own file: the documents, with what was left out filled in

    def pod(self, key: str) -> PodPlan | None:
        return next((p for p in self.pods if p.key == key), None)


def load_documents(text: str, source: str) -> list[Doc]:
    """The file's documents (empty ones dropped), each a mapping; ConfigError otherwise."""
    try:
        raw = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        raise ConfigError(f"not valid YAML: {e}", source=source) from None
    for i, d in enumerate(raw):
        if not isinstance(d, dict):
            raise ConfigError("a document must be a mapping (an object)", document_index=i, source=source)
    return raw


def doc_key(doc: Mapping[str, Any]) -> DocKey:
    kind = str(doc.get("kind", ""))
    meta = doc.get("metadata") or {}
    ns = "" if kind in CLUSTER_SCOPED else str(meta.get("namespace") or "default")
    return kind, ns, str(meta.get("name", ""))


def merge(current: Sequence[Doc], new: Sequence[Doc]) -> list[Doc]:
    """``mesh apply``: each object of ``new`` replaces the one of the same key, or is added."""
    out = list(current)
    where = {doc_key(d): i for i, d in enumerate(out)}
    for d in new:
        k = doc_key(d)
        if k in where:
            out[where[k]] = d
        else:
            where[k] = len(out)
            out.append(d)
    return out


def render(documents: Sequence[Doc]) -> str:
    return yaml.safe_dump_all(list(documents), sort_keys=False, explicit_start=False)


def _err(reason: str, index: int, doc: Mapping[str, Any], field: str, source: str) -> ConfigError:
    kind, ns, name = doc_key(doc)
    return ConfigError(
        reason,
        field=field,
        kind=kind,
        name=f"{ns}/{name}" if ns else name,
        document_index=index,
        source=source,
    )


def plan(text: str, source: str, previous: Plan | None = None) -> Plan:
    """What to build for ``text``; ConfigError naming document and field for anything wrong.

    ``previous`` (``mesh apply``): pods keep their address; the nodes may not change.
    """
    objects = parse_manifest(text, source=source)  # the control plane's own check, all or nothing
    docs = load_documents(text, source)
    nodes_model = [o for o in objects if isinstance(o, Node)]
    namespaces = {o.name: o for o in objects if isinstance(o, Namespace)}
    workloads = {(o.namespace, o.name): o for o in objects if isinstance(o, Workload)}
    node_index = {doc_key(d)[2]: i for i, d in enumerate(docs) if d.get("kind") == "Node"}

    nodes: list[NodePlan] = []
    taken: list[ipaddress.IPv4Network] = []
    for n in nodes_model:
        i = node_index[n.name]
        given = next((c for c in n.pod_cidrs if ipaddress.ip_network(c).version == 4), None)
        if given is None and n.pod_cidrs:
            raise _err("local mode needs an IPv4 pod CIDR", i, docs[i], "spec.podCIDR", source)
        if given is not None:
            net = ipaddress.IPv4Network(given)
            if not 8 <= net.prefixlen <= 30:
                raise _err(f"{given}: the prefix must be /8 to /30", i, docs[i], "spec.podCIDR", source)
            clash = next((t for t in [WIRE_NET, *taken] if t.overlaps(net)), None)
            if clash is not None:
                what = "the nodes' wire network" if clash == WIRE_NET else "another node's pod CIDR"
                raise _err(f"{given} overlaps {what} {clash}", i, docs[i], "spec.podCIDR", source)
        else:
            net = next(
                c
                for c in (ipaddress.IPv4Network(f"10.0.{k}.0/24") for k in range(len(nodes) + 1, 254))
                if not any(t.overlaps(c) for t in taken)
            )
            docs[i].setdefault("spec", {})
            if not isinstance(docs[i]["spec"], dict):
                docs[i]["spec"] = {}
            docs[i]["spec"]["podCIDR"] = str(net)
        taken.append(net)
        nodes.append(NodePlan(n.name, str(net)))
    if previous is not None and [(n.name, n.cidr) for n in nodes] != [
        (n.name, n.cidr) for n in previous.nodes
    ]:
        i = next(iter(node_index.values()), 0)
        raise ConfigError(
            "mesh apply cannot add, remove or change Nodes (have "
            f"{', '.join(n.name for n in previous.nodes)}): run `ambientctl mesh down` and `mesh up` again",
            field="Node" if not node_index else "spec.podCIDR", document_index=i if node_index else None,
            source=source,
        )  # fmt: skip
    cidrs = {n.name: ipaddress.IPv4Network(n.cidr) for n in nodes}

    pods: list[PodPlan] = []
    pod_docs = [(i, d) for i, d in enumerate(docs) if d.get("kind") == "Pod"]
    used = {ip for w in workloads.values() for ip in w.ips}
    for i, d in pod_docs:
        _, ns, name = doc_key(d)
        w = workloads[(ns, name)]
        if w.host_network:
            raise _err("hostNetwork pods are not supported in a local mesh", i, d, "spec.hostNetwork", source)
        if not w.node:
            raise _err("required: local mode has no scheduler; name one of the file's Nodes", i, d,
                       "spec.nodeName", source)  # fmt: skip
        if w.node not in cidrs:
            known = ", ".join(cidrs) or "none"
            raise _err(
                f"node {w.node!r} is not declared in the file (Nodes: {known})", i, d, "spec.nodeName", source
            )
        net = cidrs[w.node]
        gateway = str(net.network_address + 1)
        ip = next((x for x in w.ips if ipaddress.ip_address(x).version == 4), "")
        if w.ips and not ip:
            raise _err("local mode needs an IPv4 pod address", i, d, "status.podIP", source)
        if ip:
            addr = ipaddress.IPv4Address(ip)
            if addr not in net or addr in (net.network_address, net.broadcast_address) or ip == gateway:
                raise _err(f"{ip} is not a pod address of node {w.node}'s pod CIDR {net} (its first address "
                           f"{gateway} is the node's bridge)", i, d, "status.podIP", source)  # fmt: skip
        else:
            before = previous.pod(f"{ns}/{name}") if previous is not None else None
            if before is not None and before.node == w.node and before.ip not in used:
                ip = before.ip
            else:
                ip = next((str(h) for h in net.hosts() if str(h) != gateway and str(h) not in used), "")
                if not ip:
                    raise _err(f"no free address left in {net}", i, d, "status.podIP", source)
            used.add(ip)
            d.setdefault("status", {})
            if not isinstance(d["status"], dict):
                d["status"] = {}
            d["status"]["podIP"] = ip
        pods.append(
            PodPlan(
                ns, name, w.node, ip, w.uid or pod_uid(ns, name), w.service_account,
                enrolled=decide(namespaces.get(ns), w, w.node).enrolled,
                containers=_containers(d, i, source),
            )
        )  # fmt: skip
    return Plan(tuple(nodes), tuple(pods), tuple(docs), render(docs))


def _int(value: Any, where: str, index: int, doc: Doc, source: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32:
        raise _err(f"{value!r} is not a user/group id (an integer 0..4294967295)", index, doc, where, source)
    return value


def _strings(value: Any, where: str, index: int, doc: Doc, source: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise _err(f"must be a list of strings, got {value!r:.80}", index, doc, where, source)
    return tuple(value)


def _containers(d: Doc, index: int, source: str) -> tuple[ContainerPlan, ...]:
    spec = d.get("spec") or {}
    pod_sc = spec.get("securityContext") or {}
    if not isinstance(pod_sc, dict):
        raise _err("must be a mapping", index, d, "spec.securityContext", source)
    pod_uid_ = _int(pod_sc.get("runAsUser"), "spec.securityContext.runAsUser", index, d, source)
    pod_gid = _int(pod_sc.get("runAsGroup"), "spec.securityContext.runAsGroup", index, d, source)
    raw = spec.get("containers") or []
    if not isinstance(raw, list):
        raise _err("must be a list", index, d, "spec.containers", source)
    out: list[ContainerPlan] = []
    for c_i, c in enumerate(raw):
        at = f"spec.containers[{c_i}]"
        if not isinstance(c, dict):
            raise _err("must be a mapping", index, d, at, source)
        name = c.get("name") or f"c{c_i}"
        if not isinstance(name, str):
            raise _err("must be a string", index, d, f"{at}.name", source)
        command = _strings(c.get("command"), f"{at}.command", index, d, source)
        args = _strings(c.get("args"), f"{at}.args", index, d, source)
        if args and not command:
            raise _err("args without command: a local mesh has no image whose entrypoint would take them",
                       index, d, f"{at}.command", source)  # fmt: skip
        sc = c.get("securityContext") or {}
        if not isinstance(sc, dict):
            raise _err("must be a mapping", index, d, f"{at}.securityContext", source)
        uid = _int(sc.get("runAsUser"), f"{at}.securityContext.runAsUser", index, d, source)
        gid = _int(sc.get("runAsGroup"), f"{at}.securityContext.runAsGroup", index, d, source)
        uid = uid if uid is not None else pod_uid_ if pod_uid_ is not None else NOBODY
        gid = gid if gid is not None else pod_gid if pod_gid is not None else (0 if uid == 0 else NOBODY)
        env: list[tuple[str, str]] = []
        for e_i, e in enumerate(c.get("env") or []):
            where = f"{at}.env[{e_i}]"
            if not isinstance(e, dict) or not isinstance(e.get("name"), str):
                raise _err("must be a mapping with a name", index, d, where, source)
            if "valueFrom" in e:
                raise _err("valueFrom is not supported in a local mesh: give value", index, d,
                           f"{where}.valueFrom", source)  # fmt: skip
            value = e.get("value", "")
            if not isinstance(value, str):
                raise _err(
                    f"must be a string (quote it), got {value!r:.40}", index, d, f"{where}.value", source
                )
            env.append((e["name"], value))
        cwd = c.get("workingDir") or "/"
        if not isinstance(cwd, str) or not cwd.startswith("/"):
            raise _err("must be an absolute path", index, d, f"{at}.workingDir", source)
        out.append(ContainerPlan(name, command + args, uid, gid, tuple(env), cwd))
    return tuple(out)


def environment(pod: PodPlan, c: ContainerPlan) -> dict[str, str]:
    """A container's environment: a plain one (no host variables leak in), plus its ``env``."""
    env = {"PATH": DEFAULT_PATH, "HOME": "/", "HOSTNAME": pod.name, "POD_NAME": pod.name,
           "POD_NAMESPACE": pod.namespace, "POD_IP": pod.ip}  # fmt: skip
    env.update(c.env)
    return env
