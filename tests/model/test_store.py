"""The store: atomic writes, deltas, versions, consistent snapshots and their indexes."""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import pytest
from structlog.testing import capture_logs

from mesh.model import (
    AuthorizationPolicy,
    Delta,
    Kind,
    MeshObject,
    Namespace,
    Node,
    Service,
    ServicePort,
    Snapshot,
    Store,
    StoreError,
    Workload,
)

TIMEOUT = 5.0


def pod(
    name: str,
    ip: str | None = None,
    *,
    ns: str = "shop",
    node: str = "node-a",
    sa: str = "default",
    labels: dict[str, str] | None = None,
    host_network: bool = False,
) -> Workload:
    return Workload(
        uid=f"uid-{ns}-{name}",
        name=name,
        namespace=ns,
        node=node,
        service_account=sa,
        ips=(ip,) if ip else (),
        labels=labels or {},
        host_network=host_network,
    )


def svc(name: str, vip: str | None, selector: dict[str, str] | None, *ports: int) -> Service:
    return Service(
        namespace="shop",
        name=name,
        vips=(vip,) if vip else (),
        ports=tuple(ServicePort(port=p, target_port=p + 8000) for p in ports),
        selector=selector,
    )


def base_objects() -> list[MeshObject]:
    return [
        Node(name="node-a"),
        Node(name="node-b"),
        Namespace(name="shop", labels={"istio.io/dataplane-mode": "ambient"}),
        pod("web-1", "10.0.1.2", sa="web", labels={"app": "web"}),
        pod("web-2", "10.0.2.2", node="node-b", sa="web", labels={"app": "web"}),
        pod("db-1", "10.0.1.3", sa="db", labels={"app": "db"}),
        svc("web", "10.96.0.20", {"app": "web"}, 80, 443),
        svc("db", "10.96.0.30", {"app": "db"}, 5432),
        AuthorizationPolicy(namespace="shop", name="allow"),
    ]


def test_empty_store() -> None:
    store = Store()
    snap = store.snapshot()
    assert store.version == snap.version == 0
    assert all(len(snap.objects(k)) == 0 for k in Kind)
    assert snap.workload_by_ip("10.0.0.1") is None
    assert snap.endpoints("shop/web") == ()
    assert "v0" in repr(snap)


def test_replace_all_reports_what_changed() -> None:
    store = Store()
    delta = store.replace_all(base_objects())
    assert delta is not None
    assert delta.version == 1 == store.version
    assert delta.upserted_keys(Kind.WORKLOAD) == {"uid-shop-web-1", "uid-shop-web-2", "uid-shop-db-1"}
    assert delta.upserted_keys(Kind.SERVICE) == {"shop/web", "shop/db"}
    assert delta.removed == {}
    assert delta.previous.version == 0
    assert delta.snapshot is store.snapshot()
    assert Kind.GATEWAY not in delta.kinds

    objs = base_objects()
    objs = [o for o in objs if getattr(o, "name", None) != "db-1"]
    web1 = objs[3]
    assert isinstance(web1, Workload)
    objs[3] = dataclasses.replace(web1, labels={"app": "web", "v": "2"})
    delta = store.replace_all(objs)
    assert delta is not None
    assert delta.version == 2
    assert delta.upserted == {Kind.WORKLOAD: {"uid-shop-web-1"}}
    assert delta.removed == {Kind.WORKLOAD: {"uid-shop-db-1"}}
    assert delta.kinds == {Kind.WORKLOAD}
    assert "uid-shop-db-1" in delta.previous.workloads
    assert "uid-shop-db-1" not in delta.snapshot.workloads


def test_reapplying_the_same_state_changes_nothing() -> None:
    store = Store()
    store.replace_all(base_objects())
    seen: list[Delta] = []
    store.subscribe(seen.append)
    assert store.replace_all(base_objects()) is None
    assert store.upsert(pod("web-1", "10.0.1.2", sa="web", labels={"app": "web"})) is None
    assert store.delete(Kind.GATEWAY, "shop/missing") is None
    assert store.version == 1
    assert seen == []


def test_replace_all_refuses_duplicates_and_changes_nothing() -> None:
    store = Store()
    store.replace_all(base_objects())
    before = store.snapshot()
    with pytest.raises(StoreError, match="duplicate Service 'shop/web'"):
        store.replace_all([*base_objects(), svc("web", None, None)])
    assert store.snapshot() is before


def test_upsert_delete_apply() -> None:
    store = Store()
    store.replace_all(base_objects())
    d = store.upsert(pod("web-3", "10.0.1.9", labels={"app": "web"}))
    assert d is not None and d.upserted == {Kind.WORKLOAD: {"uid-shop-web-3"}}
    d = store.delete(Kind.SERVICE, "shop/db", "shop/nope")
    assert d is not None and d.removed == {Kind.SERVICE: {"shop/db"}}
    d = store.apply(
        upserts=[Node(name="node-c")],
        deletes=[(Kind.NODE, "node-b"), (Kind.AUTHORIZATION_POLICY, "shop/allow")],
    )
    assert d is not None
    assert d.version == 4
    assert d.upserted == {Kind.NODE: {"node-c"}}
    assert d.removed == {Kind.NODE: {"node-b"}, Kind.AUTHORIZATION_POLICY: {"shop/allow"}}
    assert set(store.snapshot().nodes) == {"node-a", "node-c"}


def test_apply_refuses_contradictory_batches() -> None:
    store = Store()
    with pytest.raises(StoreError, match="twice"):
        store.upsert(Node(name="a"), Node(name="a", labels={"x": "y"}))
    with pytest.raises(StoreError, match="both upserted and deleted"):
        store.apply(upserts=[Node(name="a")], deletes=[(Kind.NODE, "a")])
    assert store.version == 0


def test_snapshots_are_immutable_and_survive_later_writes() -> None:
    store = Store()
    store.replace_all(base_objects())
    old = store.snapshot()
    store.delete(Kind.WORKLOAD, "uid-shop-web-1")
    assert "uid-shop-web-1" in old.workloads
    assert old.workload_by_ip("10.0.1.2") is not None
    assert store.snapshot().workload_by_ip("10.0.1.2") is None
    with pytest.raises(TypeError):
        old.workloads["x"] = pod("x")  # type: ignore[index]
    with pytest.raises(AttributeError):
        old.version = 7  # type: ignore[misc]


def test_typed_accessors() -> None:
    store = Store()
    store.replace_all(base_objects())
    snap = store.snapshot()
    assert set(snap.namespaces) == {"shop"}
    assert set(snap.nodes) == {"node-a", "node-b"}
    assert set(snap.authorization_policies) == {"shop/allow"}
    assert snap.get(Kind.SERVICE, "shop/web") is snap.services["shop/web"]
    assert snap.get(Kind.SERVICE, "nope") is None
    assert len(snap.service_accounts) == len(snap.gateways) == 0
    assert len(snap.peer_authentications) == len(snap.request_authentications) == 0


def test_workload_indexes() -> None:
    store = Store()
    store.replace_all(
        [
            *base_objects(),
            pod("hostnet", "192.168.0.1", host_network=True),
            pod("pending"),
            pod("unscheduled", node=""),
        ]
    )
    snap = store.snapshot()
    web1 = snap.workload_by_ip("10.0.1.2")
    assert web1 is not None and web1.name == "web-1"
    assert snap.workload_by_ip("192.168.0.1") is None  # shared node IP: never an identity
    assert snap.workload_by_name("shop", "hostnet") is not None
    assert snap.workload_by_name("shop", "nope") is None
    assert {w.name for w in snap.workloads_on_node("node-a")} == {"web-1", "db-1", "hostnet", "pending"}
    assert snap.workloads_on_node("node-z") == ()
    assert snap.service_accounts_on_node("node-a") == {"shop": {"web": 1, "db": 1, "default": 2}}
    assert snap.pods_on_node("node-b", "shop", "web") == 1
    assert snap.pods_on_node("node-b", "shop", "db") == 0
    assert snap.pods_on_node("node-z", "shop", "web") == 0


def test_node_account_counts_follow_pods() -> None:
    store = Store()
    store.replace_all(base_objects())
    store.upsert(pod("web-3", "10.0.1.5", sa="web"))
    assert store.snapshot().pods_on_node("node-a", "shop", "web") == 2
    store.delete(Kind.WORKLOAD, "uid-shop-web-1", "uid-shop-web-3")
    assert store.snapshot().pods_on_node("node-a", "shop", "web") == 0
    assert "web" not in store.snapshot().service_accounts_on_node("node-a").get("shop", {})


def test_duplicate_ips_resolve_deterministically() -> None:
    a = pod("a", "10.0.0.9")
    b = pod("b", "10.0.0.9")
    s1, s2 = Store(), Store()
    s1.replace_all([a, b])
    s2.replace_all([b, a])
    w1, w2 = s1.snapshot().workload_by_ip("10.0.0.9"), s2.snapshot().workload_by_ip("10.0.0.9")
    assert w1 is not None and w2 is not None and w1.uid == w2.uid == "uid-shop-a"


def test_service_indexes() -> None:
    store = Store()
    store.replace_all([*base_objects(), svc("headless", None, {"app": "web"}, 80)])
    snap = store.snapshot()
    web = snap.service_by_address("10.96.0.20", 443)
    assert web is not None and web.name == "web"
    assert snap.service_by_address("10.96.0.20", 8080) is None
    assert snap.service_by_address("10.96.0.99", 80) is None
    assert [s.name for s in snap.services_by_vip("10.96.0.30")] == ["db"]
    assert snap.services_by_vip("10.96.0.99") == ()
    hs = snap.service_by_hostname("headless.shop.svc.cluster.local")
    assert hs is not None and hs.vips == ()


def test_endpoints_follow_selectors_and_labels() -> None:
    store = Store()
    store.replace_all(
        [*base_objects(), svc("nosel", "10.96.0.40", None, 80), pod("x", ns="other", labels={"app": "web"})]
    )
    snap = store.snapshot()
    assert [w.name for w in snap.endpoints("shop/web")] == ["web-1", "web-2"]
    assert [w.name for w in snap.endpoints("shop/db")] == ["db-1"]
    assert snap.endpoints("shop/nosel") == ()
    assert [s.name for s in snap.services_for_workload("uid-shop-web-1")] == ["web"]
    assert snap.services_for_workload("uid-other-x") == ()

    # a label change moves a pod between services
    store.upsert(pod("web-1", "10.0.1.2", sa="web", labels={"app": "db"}))
    snap = store.snapshot()
    assert [w.name for w in snap.endpoints("shop/web")] == ["web-2"]
    assert [w.name for w in snap.endpoints("shop/db")] == ["db-1", "web-1"]
    # ... and a selector change too
    store.upsert(svc("web", "10.96.0.20", {"app": "db"}, 80))
    assert [w.name for w in store.snapshot().endpoints("shop/web")] == ["db-1", "web-1"]


def test_unrelated_changes_reuse_indexes() -> None:
    # Copy-on-write: a policy change must not rebuild workload/service indexes.
    store = Store()
    store.replace_all(base_objects())
    before = store.snapshot()
    store.upsert(AuthorizationPolicy(namespace="shop", name="other"))
    after = store.snapshot()
    assert after.workloads is before.workloads
    assert after._workload_idx is before._workload_idx
    assert after._endpoint_idx is before._endpoint_idx
    store.upsert(Node(name="node-c"))
    assert store.snapshot()._service_idx is before._service_idx


def test_subscribers_see_every_delta_in_order() -> None:
    store = Store()
    seen: list[tuple[int, Snapshot]] = []
    unsubscribe = store.subscribe(lambda d: seen.append((d.version, store.snapshot())))
    store.replace_all(base_objects())
    store.upsert(Node(name="node-c"))
    assert [v for v, _ in seen] == [1, 2]
    # the store's snapshot is already the new one when subscribers run
    assert [s.version for _, s in seen] == [1, 2]
    unsubscribe()
    store.upsert(Node(name="node-d"))
    assert len(seen) == 2
    unsubscribe()  # idempotent


def test_a_failing_subscriber_does_not_stop_the_others() -> None:
    store = Store()

    def broken(delta: Delta) -> None:
        raise RuntimeError("boom")

    seen: list[int] = []
    store.subscribe(broken)
    store.subscribe(lambda d: seen.append(d.version))
    with capture_logs() as logs:
        store.upsert(Node(name="a"))
    assert seen == [1]
    assert store.version == 1
    assert any(e["event"] == "store subscriber failed" for e in logs)


def test_writing_from_a_subscriber_is_refused() -> None:
    store = Store()
    errors: list[BaseException] = []

    def writer(delta: Delta) -> None:
        try:
            store.upsert(Node(name="from-callback"))
        except RuntimeError as e:
            errors.append(e)

    store.subscribe(writer)
    store.upsert(Node(name="a"))
    assert len(errors) == 1
    assert set(store.snapshot().nodes) == {"a"}
    store.upsert(Node(name="b"))  # the store is still usable afterwards
    assert store.version == 2


async def test_queue_subscription() -> None:
    store = Store()
    with store.subscribe_queue() as queue:
        assert queue.empty()
        store.replace_all(base_objects())
        store.upsert(Node(name="node-c"))
        first = await asyncio.wait_for(queue.get(), TIMEOUT)
        second = queue.get_nowait()
        assert (first.version, second.version) == (1, 2)
        assert queue.empty()
    store.upsert(Node(name="node-d"))
    assert queue.empty()  # closed: no more deliveries


async def test_queue_subscription_as_async_iterator() -> None:
    store = Store()
    queue = store.subscribe_queue()
    store.upsert(Node(name="a"))
    store.upsert(Node(name="b"))
    versions = []
    async for delta in queue:
        versions.append(delta.version)
        if len(versions) == 2:
            break
    queue.close()
    assert versions == [1, 2]


async def test_queue_gets_deltas_committed_from_other_threads() -> None:
    store = Store()
    with store.subscribe_queue() as queue:
        writer = threading.Thread(target=store.upsert, args=(Node(name="from-thread"),))
        writer.start()
        delta = await asyncio.wait_for(queue.get(), TIMEOUT)
        await asyncio.to_thread(writer.join, TIMEOUT)
        assert delta.upserted == {Kind.NODE: {"from-thread"}}


def test_concurrent_writers_get_distinct_consecutive_versions() -> None:
    store = Store()
    versions: list[int] = []
    store.subscribe(lambda d: versions.append(d.version))
    threads = [
        threading.Thread(target=lambda i=i: [store.upsert(Node(name=f"n{i}-{j}")) for j in range(50)])
        for i in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert versions == list(range(1, 201))
    assert len(store.snapshot().nodes) == 200
