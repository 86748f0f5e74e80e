"""Local mode: a YAML file of Kubernetes objects loaded whole into the store, and followed."""

from __future__ import annotations

import asyncio
import os
import textwrap
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from mesh.model import (
    AuthorizationAction,
    Gateway,
    Kind,
    MtlsMode,
    Store,
    TunnelProtocol,
    WaypointRef,
)
from mesh.model.waf import WafMode
from sources.convert import ConfigError, ConvertOptions
from sources.local import LoadResult, LocalSource, parse_manifest

TIMEOUT = 5.0

# The example of LOCAL_MODE.md.
EXAMPLE = """\
apiVersion: v1
kind: Node
metadata: {name: node-a}
---
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels: {istio.io/dataplane-mode: ambient}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec: {nodeName: node-a, serviceAccountName: web}
status: {podIP: 10.0.1.2}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.20
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-from-frontend, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/shop/sa/frontend"]}}]
"""

EVERY_KIND = """\
apiVersion: v1
kind: Node
metadata: {name: node-a}
---
apiVersion: v1
kind: Node
metadata: {name: node-b, labels: {topology.kubernetes.io/zone: z1}}
---
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: web, namespace: shop}
---
apiVersion: v1
kind: Pod
metadata:
  name: web-1
  namespace: shop
  labels: {app: web}
  annotations: {ambient.istio.io/redirection: enabled}
spec: {nodeName: node-a, serviceAccountName: web}
status: {podIP: 10.0.1.2}
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: shop, labels: {app: web}}
spec: {nodeName: node-b, serviceAccountName: web}
---
apiVersion: v1
kind: Pod
metadata: {name: agent, namespace: kube-system}
spec: {nodeName: node-a, hostNetwork: true}
status: {podIP: 192.168.0.10}
---
apiVersion: v1
kind: Pod
metadata: {name: agent-b, namespace: kube-system}
spec: {nodeName: node-b, hostNetwork: true}
status: {podIP: 192.168.0.10}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.20
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080, appProtocol: http}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: shop, labels: {istio.io/waypoint-for: service}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: deny-evil, namespace: shop}
spec:
  action: DENY
  rules: [{from: [{source: {namespaces: [evil]}}]}]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: istio-system}
data:
  mesh: |
    extensionProviders:
    - name: opa
      envoyExtAuthzGrpc: {service: opa.authz.svc.cluster.local, port: 9191}
---
apiVersion: extensions.ambient-mesh.io/v1alpha1
kind: WafPolicy
metadata: {name: waf, namespace: shop}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  mode: DetectOnly
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: shop}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  jwtRules: [{issuer: "https://issuer.example", jwksUri: "https://issuer.example/jwks"}]
---
# a trailing empty document is fine
"""


def write(path: Path, text: str) -> None:
    # Write-then-rename, as editors and `kubectl`-style tools do, so a poll never sees a
    # half-written file.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(textwrap.dedent(text))
    os.replace(tmp, path)


def test_example_from_local_mode_doc(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    write(path, EXAMPLE)
    store = Store()
    delta = LocalSource(path, store).load()
    assert delta is not None and delta.version == 1
    snap = store.snapshot()
    web = snap.workload_by_ip("10.0.1.2")
    assert web is not None
    assert (web.namespace, web.name, web.node, web.service_account) == ("shop", "web-1", "node-a", "web")
    assert [w.name for w in snap.endpoints("shop/web")] == ["web-1"]
    svc = snap.service_by_address("10.96.0.20", 80)
    assert svc is not None and svc.ports[0].target_port == 8080
    assert snap.namespaces["shop"].labels["istio.io/dataplane-mode"] == "ambient"
    policy = snap.authorization_policies["shop/web-from-frontend"]
    assert policy.rules[0].from_[0].source.principals == ("cluster.local/ns/shop/sa/frontend",)
    assert snap.pods_on_node("node-a", "shop", "web") == 1


def test_every_kind(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    write(path, EVERY_KIND)
    store = Store()
    LocalSource(path, store, options=ConvertOptions(trust_domain="td.example")).load()
    snap = store.snapshot()
    # The waypoint Gateway gets its ServiceAccount and Service from local mode's controller (no
    # node declares a podCIDR here, so no pod: tests/model/test_local_waypoints.py).
    assert {k: len(snap.objects(k)) for k in Kind} == {
        Kind.NODE: 2,
        Kind.NAMESPACE: 1,
        Kind.SERVICE_ACCOUNT: 2,
        Kind.WORKLOAD: 4,
        Kind.SERVICE: 2,
        Kind.GATEWAY: 1,
        Kind.PEER_AUTHENTICATION: 1,
        Kind.AUTHORIZATION_POLICY: 1,
        Kind.REQUEST_AUTHENTICATION: 1,
        Kind.MESH_CONFIG: 1,
        Kind.WAF_POLICY: 1,
    }
    assert snap.waf_policies["shop/waf"].mode is WafMode.DETECT_ONLY
    opa = snap.extension_provider("opa")
    assert opa is not None and opa.kind == "envoyExtAuthzGrpc"
    web1 = snap.workload_by_name("shop", "web-1")
    assert web1 is not None
    assert web1.tunnel_protocol is TunnelProtocol.HBONE
    assert web1.identity.uri == "spiffe://td.example/ns/shop/sa/web"
    web2 = snap.workload_by_name("shop", "web-2")
    assert web2 is not None and web2.ips == ()
    agent = snap.workload_by_name("kube-system", "agent")
    assert agent is not None and agent.host_network and agent.service_account == "default"
    assert snap.workload_by_ip("192.168.0.10") is None  # shared by hostNetwork pods
    assert snap.namespaces["shop"].waypoint == WaypointRef("waypoint", "shop")
    gw = snap.gateways["shop/waypoint"]
    assert isinstance(gw, Gateway) and gw.is_waypoint
    assert snap.peer_authentications["istio-system/default"].mtls_mode is MtlsMode.STRICT
    assert snap.authorization_policies["shop/deny-evil"].action is AuthorizationAction.DENY
    assert snap.request_authentications["shop/jwt"].target_refs[0].name == "waypoint"
    assert snap.pods_on_node("node-b", "shop", "web") == 1


def test_list_documents_are_expanded() -> None:
    objs = parse_manifest(
        textwrap.dedent(
            """\
            apiVersion: v1
            kind: List
            items:
            - {apiVersion: v1, kind: Node, metadata: {name: n}}
            - {apiVersion: v1, kind: Namespace, metadata: {name: ns}}
            ---
            apiVersion: v1
            kind: List
            """
        )
    )
    assert sorted(o.key for o in objs) == ["n", "ns"]


def test_unknown_kinds_are_ignored_with_a_warning() -> None:
    with capture_logs() as logs:
        objs = parse_manifest(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cfg, namespace: shop}\n---\n"
            "apiVersion: v1\nkind: Node\nmetadata: {name: n}\n",
            source="f.yaml",
        )
    assert [o.key for o in objs] == ["n"]
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == 1
    w = warnings[0]
    assert w["event"] == "local config: ignored a ConfigMap (only istio-system/istio, the mesh config, is read)"
    assert (w["kind"], w["document"], w["name"], w["source"]) == ("ConfigMap", 0, "shop/cfg", "f.yaml")


NODE = "apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\n"
POD_A = (
    "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: shop}\n"
    "spec: {nodeName: node-a}\nstatus: {podIP: 10.0.1.2}\n"
)

FILE_ERRORS = [
    # (file text, document index, kind, name, field, reason fragment)
    pytest.param(
        NODE + "---\nkind: Pod\nmetadata: x: y\n",
        1,
        None,
        None,
        "",
        "invalid YAML at line 6 column 12: mapping values are not allowed",
        id="yaml-syntax",
    ),
    pytest.param(
        NODE + "---\n- just\n- a list\n", 1, None, None, "", "must be a mapping", id="not-a-mapping"
    ),
    pytest.param(
        NODE + "---\napiVersion: v1\nmetadata: {name: x}\n",
        1,
        None,
        "default/x",
        "kind",
        "required",
        id="no-kind",
    ),
    pytest.param(
        NODE + "---\n" + POD_A + "---\napiVersion: v1\nkind: Service\nmetadata: {name: s, "
        "namespace: shop}\nspec: {ports: [{port: 80}, {name: b, port: x}]}\n",
        2,
        "Service",
        "shop/s",
        "spec.ports[0].name",
        "more than one port",
        id="service-port",
    ),
    pytest.param(
        NODE + "---\n" + POD_A + "---\n" + POD_A,
        2,
        "Pod",
        "shop/a",
        "metadata.name",
        "duplicate of Pod shop/a (document[1])",
        id="duplicate-pod",
    ),
    pytest.param(
        NODE + "---\n" + NODE,
        1,
        "Node",
        "node-a",
        "metadata.name",
        "duplicate of Node node-a (document[0])",
        id="duplicate-node",
    ),
    pytest.param(
        NODE + "---\n" + POD_A + "---\n" + POD_A.replace("name: a", "name: b"),
        2,
        "Pod",
        "shop/b",
        "status.podIP",
        "10.0.1.2 is already the IP of Pod shop/a",
        id="duplicate-pod-ip",
    ),
    pytest.param(
        NODE
        + "---\n"
        + POD_A.replace("name: a,", "name: a, uid: u1,")
        + "---\n"
        + POD_A.replace("name: a,", "name: b, uid: u1,").replace("10.0.1.2", "10.0.1.3"),
        2,
        "Pod",
        "shop/b",
        "metadata.uid",
        "uid u1 is also Pod shop/a",
        id="duplicate-uid",
    ),
    pytest.param(
        "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.1}\n"
        "---\napiVersion: v1\nkind: Service\nmetadata: {name: b}\nspec: {clusterIP: 10.96.0.1}",
        1,
        "Service",
        "default/b",
        "spec.clusterIP",
        "already the IP of Service default/a",
        id="duplicate-vip",
    ),
    pytest.param(POD_A, 0, "Pod", "shop/a", "spec.nodeName", "no Node named 'node-a'", id="unknown-node"),
    pytest.param(
        NODE + "---\napiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Pod, "
        "metadata: {name: p}, status: {podIP: nope}}\n",
        1,
        "Pod",
        "default/p",
        "items[0].status.podIP",
        "not an IP address",
        id="list-item",
    ),
    pytest.param(
        NODE + "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        "metadata: {name: p, namespace: shop}\nspec: {rules: [{to: [{operation: "
        "{ports: [0]}}]}]}\n",
        1,
        "AuthorizationPolicy",
        "shop/p",
        "spec.rules[0].to[0].operation.ports[0]",
        "port number 1-65535",
        id="policy",
    ),
]


@pytest.mark.parametrize(("text", "doc", "kind", "name", "field", "reason"), FILE_ERRORS)
def test_a_bad_object_is_rejected_alone_and_load_raises_it(
    tmp_path: Path,
    text: str,
    doc: int,
    kind: str | None,
    name: str | None,
    field: str,
    reason: str,
) -> None:
    """load() applies what is good and raises the first problem (startup refuses on it)."""
    path = tmp_path / "mesh.yaml"
    path.write_text(text)
    store = Store()
    watcher = Watcher()
    with capture_logs() as logs, pytest.raises(ConfigError) as info:
        LocalSource(path, store, on_load=watcher).load()
    e = info.value
    assert (e.document_index, e.kind, e.name, e.field) == (doc, kind, name, field)
    assert reason in e.reason
    assert e.source == str(path)
    assert str(e).startswith(f"{path}: document[{doc}]")
    result = watcher.results.get_nowait()
    assert [r.error for r in result.rejected] == [e]
    # The rest of the file applied (a lone pod on an unknown node leaves nothing: refused whole).
    assert store.version == (0 if kind == "Pod" and field == "spec.nodeName" else 1)
    assert result.applied == (store.version == 1)
    rejected = [entry for entry in logs if entry["event"] == "local config rejected"]
    assert rejected and rejected[0]["document"] == doc and rejected[0]["field"] == field


def test_unreadable_files(tmp_path: Path) -> None:
    store = Store()
    with pytest.raises(ConfigError, match="cannot read the file"):
        LocalSource(tmp_path / "missing.yaml", store).load()
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"kind: \xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8"):
        LocalSource(path, store).load()


def test_load_twice_is_a_no_op(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    write(path, EXAMPLE)
    store = Store()
    source = LocalSource(path, store)
    assert source.load() is not None
    assert source.load() is None
    assert store.version == 1


# --- following the file ----------------------------------------------------------------------


class Watcher:
    """Collects LoadResults so tests can wait for the next reload instead of sleeping."""

    def __init__(self) -> None:
        self.results: asyncio.Queue[LoadResult] = asyncio.Queue()

    def __call__(self, result: LoadResult) -> None:
        self.results.put_nowait(result)

    async def next(self) -> LoadResult:
        return await asyncio.wait_for(self.results.get(), TIMEOUT)


async def test_reload_applies_changes_and_deletions(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    write(path, EVERY_KIND)
    store = Store()
    watcher = Watcher()
    source = LocalSource(path, store, poll_interval=0.01, on_load=watcher)
    source.load()
    assert (await watcher.next()).ok
    async with source:
        # Change one pod's labels and drop the RequestAuthentication and web-2.
        text = EVERY_KIND.replace(
            "metadata: {name: web-2, namespace: shop, labels: {app: web}}",
            "metadata: {name: web-2, namespace: shop, labels: {app: x}}",
        )
        text = text.split("kind: RequestAuthentication")[0].rsplit("---", 1)[0]
        write(path, text)
        result = await watcher.next()
        assert result.ok and result.delta is not None
        assert result.delta.version == 2
        assert result.delta.upserted == {Kind.WORKLOAD: {source_uid(store, "web-2")}}
        assert result.delta.removed == {Kind.REQUEST_AUTHENTICATION: {"shop/jwt"}}
        assert [w.name for w in store.snapshot().endpoints("shop/web")] == ["web-1"]

        # Delete most of the file: everything not in it goes.
        write(path, EXAMPLE)
        result = await watcher.next()
        assert result.delta is not None
        snap = store.snapshot()
        assert snap.workload_by_name("shop", "web-2") is None
        assert len(snap.gateways) == len(snap.peer_authentications) == 0
        assert snap.workload_by_name("shop", "web-1") is not None
    assert store.version == 3


def source_uid(store: Store, name: str) -> str:
    w = store.snapshot().workload_by_name("shop", name)
    assert w is not None
    return w.uid


async def test_bad_reload_keeps_the_last_good_version_of_the_bad_object(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    write(path, EXAMPLE)
    store = Store()
    watcher = Watcher()
    source = LocalSource(path, store, poll_interval=0.01, on_load=watcher)
    source.load()
    await watcher.next()
    good = store.snapshot()
    async with source:
        with capture_logs() as logs:
            write(
                path,
                EXAMPLE.replace("port: 80,", "port: eighty,") + "---\n" + NODE.replace("node-a", "node-z"),
            )
            result = await watcher.next()
        assert not result.ok and result.applied and result.error is None
        [rejected] = result.rejected
        assert (rejected.error.document_index, rejected.error.field) == (3, "spec.ports[0].port")
        assert rejected.object == ("Service", "shop/web") and rejected.kept
        assert source.last_error is rejected.error
        snap = store.snapshot()
        assert snap.services["shop/web"] is good.services["shop/web"]  # the last good version
        assert set(snap.nodes) == {"node-a", "node-z"}  # and the rest of the edit applied
        assert any(
            e["event"] == "local config rejected" and e["log_level"] == "error" and e["kept_last_good"]
            for e in logs
        )
        good = store.snapshot()

        # The file disappearing is just another bad state.
        path.unlink()
        result = await watcher.next()
        assert result.error is not None and "cannot read the file" in result.error.reason
        assert store.snapshot() is good

        # Fixed: applied, error cleared.
        write(path, EXAMPLE.replace("10.0.1.2", "10.0.1.9"))
        result = await watcher.next()
        assert result.ok and source.last_error is None
        assert store.snapshot().workload_by_ip("10.0.1.9") is not None


async def test_same_size_rewrite_within_one_timestamp_tick_is_seen(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    write(path, EXAMPLE)
    store = Store()
    watcher = Watcher()
    source = LocalSource(path, store, on_load=watcher)
    source.load()
    await watcher.next()
    st = path.stat()
    # Same length, and the mtime forced back to the old value: only the content differs.
    path.write_text(EXAMPLE.replace("10.0.1.2", "10.0.1.3"))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size
    result = await source.poll_once()
    assert result is not None and result.ok
    assert store.snapshot().workload_by_ip("10.0.1.3") is not None
    assert await source.poll_once() is None  # content unchanged now


async def test_start_stop(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    write(path, EXAMPLE)
    store = Store()
    watcher = Watcher()
    source = LocalSource(path, store, poll_interval=0.01, on_load=watcher)
    source.start()
    with pytest.raises(RuntimeError, match="already started"):
        source.start()
    result = await watcher.next()  # the first poll loads the file
    assert result.ok and store.version == 1
    await source.astop()
    await source.astop()  # idempotent
    source.start()  # and restartable
    await source.astop()


async def test_wait_synced_once_a_version_of_the_file_is_in_force(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    write(path, "kind: [")  # refused: nothing of it is in force
    store = Store()
    source = LocalSource(path, store, poll_interval=0.01)
    source.start()
    assert not await source.wait_synced(timeout=0.05)
    write(path, EXAMPLE)
    assert await source.wait_synced(timeout=TIMEOUT)
    assert store.version == 1
    write(path, "kind: [")  # a refused reload keeps the last good state: still synced
    assert await source.wait_synced(timeout=0)
    await source.astop()


async def test_wait_synced_at_once_after_load_and_false_once_stopped(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    write(path, EXAMPLE)
    loaded = LocalSource(path, Store())
    loaded.load()
    assert await loaded.wait_synced(timeout=0)
    missing = LocalSource(tmp_path / "missing.yaml", Store(), poll_interval=0.01)
    missing.start()
    waiting = asyncio.create_task(missing.wait_synced())
    await asyncio.sleep(0)
    await missing.astop()
    assert await asyncio.wait_for(waiting, TIMEOUT) is False


def test_both_sources_are_workload_sources(tmp_path: Path) -> None:
    """mypy checks the classes against the protocol; this checks that the check exists."""
    import typing

    from sources import WorkloadSource, kubernetes, local

    for module, cls in ((local, local.LocalSource), (kubernetes, kubernetes.KubernetesSource)):
        hints = typing.get_type_hints(module._conforms)
        assert hints["source"] is cls and hints["return"] is WorkloadSource
    store = Store()
    assert LocalSource(tmp_path / "mesh.yaml", store).store is store


async def test_a_failing_listener_does_not_stop_the_watch(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    write(path, EXAMPLE)
    store = Store()
    failed, recovered = asyncio.Event(), asyncio.Event()

    def listener(result: LoadResult) -> None:
        if not failed.is_set():
            failed.set()
            raise RuntimeError("listener bug")
        recovered.set()

    with capture_logs() as logs:
        async with LocalSource(path, store, poll_interval=0.01, on_load=listener):
            await asyncio.wait_for(failed.wait(), TIMEOUT)
            write(path, EXAMPLE.replace("10.0.1.2", "10.0.1.4"))
            await asyncio.wait_for(recovered.wait(), TIMEOUT)
    assert store.snapshot().workload_by_ip("10.0.1.4") is not None
    assert any(e["event"] == "local config poll failed" for e in logs)


def test_local_mode_marks_enrolled_pods_hbone(tmp_path: Path) -> None:
    """No API server to annotate: the enrollment labels decide HBONE in local mode."""
    from mesh.model import Store, TunnelProtocol
    from sources.local import LocalSource

    f = tmp_path / "mesh.yaml"
    f.write_text(
        """
apiVersion: v1
kind: Node
metadata: {name: node-a}
---
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop}
spec: {nodeName: node-a}
status: {podIP: 10.0.1.2}
---
apiVersion: v1
kind: Pod
metadata: {name: optout, namespace: shop, labels: {istio.io/dataplane-mode: none}}
spec: {nodeName: node-a}
status: {podIP: 10.0.1.3}
---
apiVersion: v1
kind: Pod
metadata: {name: old, namespace: legacy}
spec: {nodeName: node-a}
status: {podIP: 10.0.1.4}
---
apiVersion: v1
kind: Pod
metadata: {name: solo, namespace: legacy, labels: {istio.io/dataplane-mode: ambient}}
spec: {nodeName: node-a}
status: {podIP: 10.0.1.5}
"""
    )
    store = Store()
    LocalSource(f, store).load()
    snap = store.snapshot()

    def proto(ns: str, name: str) -> TunnelProtocol:
        w = snap.workload_by_name(ns, name)
        assert w is not None
        return w.tunnel_protocol

    assert proto("shop", "web") is TunnelProtocol.HBONE
    assert proto("shop", "optout") is TunnelProtocol.NONE
    assert proto("legacy", "old") is TunnelProtocol.NONE
    assert proto("legacy", "solo") is TunnelProtocol.HBONE
