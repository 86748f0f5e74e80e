"""The store's incremental indexes give exactly the answers of a full rebuild.

``Store.apply`` updates the workload and endpoint indexes in place for small workload changes
(benchmarks/controlplane.py, docs/benchmarks-controlplane.md). These tests drive random
sequences of upserts and deletes through the store and compare every index, and every lookup,
with indexes built from scratch over the same objects. No timings here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.model import Kind, MeshObject, Node, Service, ServicePort, Snapshot, Store, Workload
from mesh.model.indexes import EndpointIndexes, ServiceIndexes, WorkloadIndexes

UIDS = [f"uid-{i}" for i in range(12)]
IPS = [f"10.0.0.{i}" for i in range(6)]  # few, so pods collide on IPs
NAMESPACES = ["a", "b"]
NODES = ["", "node-1", "node-2", "node-3"]
SERVICES = [f"s{i}" for i in range(5)]
LABELS: list[dict[str, str]] = [{}, {"app": "x"}, {"app": "y"}, {"app": "x", "tier": "1"}, {"tier": "1"}]
SELECTORS: list[dict[str, str] | None] = [
    None,
    {},
    {"app": "x"},
    {"app": "y"},
    {"tier": "1"},
    {"app": "x", "tier": "1"},
]

workloads = st.builds(
    Workload,
    uid=st.sampled_from(UIDS),
    name=st.sampled_from(["p0", "p1", "p2", "p3"]),  # few, so names collide too
    namespace=st.sampled_from(NAMESPACES),
    node=st.sampled_from(NODES),
    service_account=st.sampled_from(["default", "sa1", "sa2"]),
    ips=st.lists(st.sampled_from(IPS), max_size=3).map(tuple),
    labels=st.sampled_from(LABELS),
    host_network=st.booleans(),
)
services = st.builds(
    Service,
    namespace=st.sampled_from(NAMESPACES),
    name=st.sampled_from(SERVICES),
    vips=st.lists(st.sampled_from(["10.96.0.1", "10.96.0.2"]), max_size=1).map(tuple),
    ports=st.just((ServicePort(port=80, target_port=8080),)),
    selector=st.sampled_from(SELECTORS),
)


def _unique(objs: list[Any]) -> list[Any]:
    by_key: dict[tuple[Kind, str], Any] = {}
    for o in objs:
        by_key[(o.KIND, o.key)] = o
    return list(by_key.values())


# One step: upserts (unique keys) plus deletes of other keys, as Store.apply requires.
steps = st.tuples(
    st.lists(st.one_of(workloads, workloads, workloads, services), max_size=3).map(_unique),
    st.lists(st.sampled_from(UIDS), max_size=2),
    st.lists(st.sampled_from([f"{ns}/{s}" for ns in NAMESPACES for s in SERVICES]), max_size=1),
)


def _plain(value: Any) -> Any:
    """Mappings (read-only views, nested) as plain dicts, so == compares contents."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def assert_same_as_full_build(snap: Snapshot) -> None:
    w_full = WorkloadIndexes.build(snap.workloads)
    s_full = ServiceIndexes.build(snap.services)
    e_full = EndpointIndexes.build(snap.services, snap.workloads)
    got_w, got_e = snap._workload_idx, snap._endpoint_idx
    for field in ("by_ip", "by_name", "by_node", "accounts", "ip_claims", "name_claims"):
        assert _plain(getattr(got_w, field)) == _plain(getattr(w_full, field)), field
    for field in ("by_address", "by_vip", "by_hostname"):
        assert _plain(getattr(snap._service_idx, field)) == _plain(getattr(s_full, field)), field
    if snap.services and snap.workloads:  # otherwise the shared empty indexes are used
        for field in ("endpoints", "services_of", "selecting"):
            assert _plain(getattr(got_e, field)) == _plain(getattr(e_full, field)), field
    # And through the public lookups, including which of several claimants wins.
    for ip in IPS:
        assert snap.workload_by_ip(ip) == w_full.by_ip.get(ip)
    for uid, w in snap.workloads.items():
        assert snap.workload_by_name(w.namespace, w.name) == w_full.by_name[(w.namespace, w.name)]
        assert snap.services_for_workload(uid) == e_full.services_of.get(uid, ())
    for node in NODES:
        assert snap.workloads_on_node(node) == w_full.by_node.get(node, ())
        assert _plain(snap.service_accounts_on_node(node)) == _plain(w_full.accounts.get(node, {}))
    for key in snap.services:
        assert snap.endpoints(key) == e_full.endpoints.get(key, ())


@settings(max_examples=300, deadline=None)
@given(
    initial=st.lists(st.one_of(workloads, services), max_size=20).map(_unique),
    ops=st.lists(steps, max_size=25),
)
def test_random_writes_keep_indexes_equal_to_a_full_build(
    initial: list[MeshObject], ops: list[tuple[list[MeshObject], list[str], list[str]]]
) -> None:
    store = Store()
    store.replace_all(initial)
    assert_same_as_full_build(store.snapshot())
    for upserts, deleted_uids, deleted_services in ops:
        upserted = {(o.KIND, o.key) for o in upserts}
        deletes = [(Kind.WORKLOAD, u) for u in deleted_uids if (Kind.WORKLOAD, u) not in upserted]
        deletes += [(Kind.SERVICE, k) for k in deleted_services if (Kind.SERVICE, k) not in upserted]
        store.apply(upserts=upserts, deletes=deletes)
        assert_same_as_full_build(store.snapshot())


def _pod(i: int, app: str = "x", node: str = "node-1", ip: str | None = None) -> Workload:
    return Workload(
        uid=f"uid-{i:03d}",
        name=f"p{i}",
        namespace="a",
        node=node,
        ips=(ip or f"10.1.0.{i}",),
        labels={"app": app},
    )


def _store(pods: int = 40) -> Store:
    store = Store()
    objs: list[MeshObject] = [Node(name="node-1")]
    objs += [_pod(i, app="x" if i % 2 else "y") for i in range(pods)]
    objs += [
        Service(namespace="a", name="x", vips=("10.96.0.1",), selector={"app": "x"}),
        Service(namespace="a", name="y", vips=("10.96.0.2",), selector={"app": "y"}),
    ]
    store.replace_all(objs)
    return store


def test_a_one_pod_write_does_not_rebuild_the_indexes(monkeypatch: pytest.MonkeyPatch) -> None:
    store = _store()

    def refuse(*args: object) -> None:
        raise AssertionError("full rebuild on a one-pod write")

    monkeypatch.setattr(WorkloadIndexes, "build", refuse)
    monkeypatch.setattr(EndpointIndexes, "build", refuse)
    store.upsert(_pod(3, app="y", node="node-2", ip="10.1.0.200"))  # relabel, move, new IP
    store.delete(Kind.WORKLOAD, "uid-004")
    store.apply(upserts=[_pod(100, app="x")], deletes=[(Kind.WORKLOAD, "uid-005")])
    monkeypatch.undo()
    snap = store.snapshot()
    assert_same_as_full_build(snap)
    assert [w.uid for w in snap.endpoints("a/y")][:2] == ["uid-000", "uid-002"]
    assert "uid-003" in {w.uid for w in snap.endpoints("a/y")}
    assert snap.workload_by_ip("10.1.0.200") == snap.workloads["uid-003"]
    assert snap.workload_by_ip("10.1.0.3") is None
    assert snap.services_for_workload("uid-100") == (snap.services["a/x"],)


def test_large_batches_and_service_changes_still_rebuild_in_full() -> None:
    # The incremental path is for small workload changes; everything else rebuilds and must
    # of course agree as well.
    store = _store()
    calls: list[str] = []
    real = EndpointIndexes.build.__func__  # type: ignore[attr-defined]

    def counting(cls: type[EndpointIndexes], *args: Any) -> EndpointIndexes:
        calls.append("build")
        result: EndpointIndexes = real(cls, *args)
        return result

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(EndpointIndexes, "build", classmethod(counting))
        store.upsert(*(_pod(i, app="z") for i in range(20)))  # half of the pods
        store.upsert(Service(namespace="a", name="z", vips=("10.96.0.3",), selector={"app": "y"}))
    assert calls == ["build", "build"]
    assert_same_as_full_build(store.snapshot())


# Pods only, on top of a fixed set of services: every small step takes the incremental path.
pod_steps = st.tuples(
    st.lists(workloads, min_size=1, max_size=2).map(_unique), st.lists(st.sampled_from(UIDS), max_size=1)
)
fixed_services = [
    Service(namespace=ns, name=f"s{i}", vips=(f"10.96.{n}.{i}",), selector=sel)
    for n, ns in enumerate(NAMESPACES)
    for i, sel in enumerate(SELECTORS)
]


@settings(max_examples=200, deadline=None)
@given(
    initial=st.lists(workloads, min_size=8, max_size=20).map(_unique), ops=st.lists(pod_steps, max_size=30)
)
def test_random_pod_writes_keep_indexes_equal_to_a_full_build(
    initial: list[MeshObject], ops: list[tuple[list[MeshObject], list[str]]]
) -> None:
    store = Store()
    store.replace_all([*initial, *fixed_services])
    for upserts, deleted_uids in ops:
        upserted = {o.key for o in upserts}
        store.apply(upserts=upserts, deletes=[(Kind.WORKLOAD, u) for u in deleted_uids if u not in upserted])
        assert_same_as_full_build(store.snapshot())
