"""Local mode's waypoint controller: a waypoint Gateway in the file becomes its account, service and pod."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh.model import Store, TunnelProtocol
from sources.local import LocalSource, parse_manifest
from sources.waypoints import Placed, Unplaced, waypoint_deployments

NODES = """
apiVersion: v1
kind: Node
metadata: {name: node-b}
spec: {podCIDR: 10.0.2.0/24}
---
apiVersion: v1
kind: Node
metadata: {name: node-a}
spec: {podCIDR: 10.0.1.0/24}
---
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
"""
GATEWAY = """
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: shop}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
"""


def test_a_waypoint_gateway_becomes_account_service_and_pod(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    taken = "\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop}\nspec: {nodeName: node-a}\nstatus: {podIP: 10.0.1.254}\n"
    path.write_text(NODES + GATEWAY + taken)
    store = Store()
    LocalSource(path, store).load()
    snap = store.snapshot()
    assert "shop/waypoint" in snap.service_accounts
    svc = snap.services["shop/waypoint"]
    assert svc.vips == () and [p.port for p in svc.ports] == [15008, 15021, 15020]
    pod = snap.workload_by_name("shop", "waypoint-0")
    assert pod is not None
    # On the first node by name with a pod CIDR, at its highest free address.
    assert (pod.node, pod.ips, pod.service_account) == ("node-a", ("10.0.1.253",), "waypoint")
    assert pod.tunnel_protocol is TunnelProtocol.NONE  # dataplane-mode none: never captured
    assert [w.name for w in snap.endpoints("shop/waypoint")] == ["waypoint-0"]


def test_placement_follows_the_node_annotation_and_says_why_it_cannot() -> None:
    pinned = GATEWAY.replace(
        "namespace: shop}", "namespace: shop, annotations: {ambient-mesh.io/node: node-b}}"
    )
    results, _ = waypoint_deployments(parse_manifest(NODES + pinned))
    assert isinstance(results[0], Placed) and (results[0].pod.node, results[0].ip) == ("node-b", "10.0.2.254")
    unknown = GATEWAY.replace(
        "namespace: shop}", "namespace: shop, annotations: {ambient-mesh.io/node: node-z}}"
    )
    results, added = waypoint_deployments(parse_manifest(NODES + unknown))
    assert isinstance(results[0], Unplaced) and "node 'node-z'" in results[0].reason
    assert [type(o).__name__ for o in added] == ["ServiceAccount", "Service"]  # no pod
    bare = "apiVersion: v1\nkind: Node\nmetadata: {name: n}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n"
    results, _ = waypoint_deployments(parse_manifest(bare + GATEWAY))
    assert isinstance(results[0], Unplaced) and "spec.podCIDR" in results[0].reason


@pytest.mark.parametrize("declared", [True, False])
def test_a_service_the_file_declares_is_kept(declared: bool) -> None:
    own = "\n---\napiVersion: v1\nkind: Service\nmetadata: {name: waypoint, namespace: shop}\nspec:\n  clusterIP: 10.96.0.99\n  selector: {gateway.networking.k8s.io/gateway-name: waypoint}\n  ports: [{name: mesh, port: 15008}]\n"
    objects = parse_manifest(NODES + GATEWAY + (own if declared else ""))
    _, added = waypoint_deployments(objects)
    assert any(type(o).__name__ == "Service" for o in added) is not declared
