"""The control plane tests' mesh: two nodes and their pods, as local-mode YAML."""

from __future__ import annotations

from mesh.identity import Identity
from mesh.model import Store
from sources.local import parse_manifest

TD = "cluster.local"
WEB = Identity(TD, "shop", "web")  # runs on node-a only
DB = Identity(TD, "shop", "db")  # runs on node-b only
CACHE = Identity(TD, "shop", "cache")  # one pod on each node
ZTUNNEL = Identity(TD, "istio-system", "ztunnel")


def pod(name: str, node: str, sa: str, ip: str, namespace: str = "shop", uid: str | None = None) -> str:
    uid_line = f", uid: {uid}" if uid else ""
    return f"""\
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {namespace}{uid_line}}}
spec: {{nodeName: {node}, serviceAccountName: {sa}}}
status: {{podIP: {ip}}}
"""


NODES = """\
apiVersion: v1
kind: Node
metadata: {name: node-a}
---
apiVersion: v1
kind: Node
metadata: {name: node-b}
"""

PODS = {
    "web-1": pod("web-1", "node-a", "web", "10.0.1.2"),
    "cache-a": pod("cache-a", "node-a", "cache", "10.0.1.3"),
    "db-1": pod("db-1", "node-b", "db", "10.0.2.2"),
    "cache-b": pod("cache-b", "node-b", "cache", "10.0.2.3"),
    "ztunnel-a": pod("ztunnel-a", "node-a", "ztunnel", "10.0.1.100", "istio-system", "uid-zt-a"),
    "ztunnel-b": pod("ztunnel-b", "node-b", "ztunnel", "10.0.2.100", "istio-system", "uid-zt-b"),
}


def manifest(**overrides: str | None) -> str:
    """The test mesh as YAML; ``name=None`` deletes a pod, ``name=yaml`` replaces or adds one."""
    pods = dict(PODS)
    for name, text in overrides.items():
        if text is None:
            pods.pop(name, None)
        else:
            pods[name] = text
    return "---\n".join([NODES, *pods.values()])


def load(store: Store, text: str) -> None:
    store.replace_all(parse_manifest(text))
