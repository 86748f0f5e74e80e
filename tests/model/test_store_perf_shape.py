"""The store's incremental indexes give exactly the answers of a full rebuild.

``Store.apply`` and ``Store.replace_all`` update the workload, service and endpoint indexes in
place for changes to few workloads and services (benchmarks/controlplane.py,
docs/benchmarks-controlplane.md). These tests drive random sequences of upserts and deletes
through the store and compare every index, and every lookup, with indexes built from scratch
over the same objects, and the endpoints with ``Service.selects`` over every pod. No timings here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mesh.model.indexes as indexes_module
import mesh.model.snapshot as snapshot_module
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
    for field in ("by_address", "by_vip", "by_hostname", "hostname_claims"):
        assert _plain(getattr(snap._service_idx, field)) == _plain(getattr(s_full, field)), field
    if snap.services and snap.workloads:  # otherwise the shared empty indexes are used
        for field in ("endpoints", "services_of", "selecting", "labelled"):
            assert _plain(getattr(got_e, field)) == _plain(getattr(e_full, field)), field
    # The build itself selects through its label index: check it against the definition.
    by_uid = [snap.workloads[u] for u in sorted(snap.workloads)]
    for key, s in snap.services.items():
        assert snap.endpoints(key) == tuple(w for w in by_uid if s.selects(w)), key
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


def test_large_batches_still_rebuild_in_full() -> None:
    # The incremental path is for small changes; a batch touching more than a quarter of a
    # kind rebuilds, and must of course agree as well.
    store = _store()
    store.upsert(*(Service(namespace="a", name=f"s{i}", selector={"app": "x"}) for i in range(10)))
    calls: list[str] = []
    real = EndpointIndexes.build.__func__  # type: ignore[attr-defined]

    def counting(cls: type[EndpointIndexes], *args: Any) -> EndpointIndexes:
        calls.append("build")
        result: EndpointIndexes = real(cls, *args)
        return result

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(EndpointIndexes, "build", classmethod(counting))
        store.upsert(*(_pod(i, app="z") for i in range(20)))  # half of the pods
        store.upsert(*(Service(namespace="a", name=f"t{i}", selector={"app": "y"}) for i in range(4)))
        store.upsert(Service(namespace="a", name="z", vips=("10.96.0.3",), selector={"app": "y"}))
    assert calls == ["build", "build"]  # not for one service among 13
    assert_same_as_full_build(store.snapshot())


def test_a_service_write_does_not_rebuild_the_indexes(monkeypatch: pytest.MonkeyPatch) -> None:
    store = _store()
    store.upsert(*(Service(namespace="a", name=f"s{i}", vips=(f"10.96.1.{i}",)) for i in range(12)))
    before = store.snapshot()

    def refuse(*args: object) -> None:
        raise AssertionError("full rebuild on a small service write")

    for cls in (WorkloadIndexes, ServiceIndexes, EndpointIndexes):
        monkeypatch.setattr(cls, "build", refuse)
    x = before.services["a/x"]
    store.upsert(dataclasses.replace(x, ports=(ServicePort(port=81, target_port=81),)))
    store.upsert(Service(namespace="a", name="y", vips=("10.96.0.9",), selector={"app": "x"}))  # retarget
    store.delete(Kind.SERVICE, "a/s0")
    # A pod and a service in one batch; and a resync (replace_all) changing one service.
    store.apply(upserts=[_pod(100, app="y"), Service(namespace="a", name="s1", selector={"app": "y"})])
    pre = store.snapshot()
    # Equal copies, as a resync reads them anew from its source.
    objects = [dataclasses.replace(o) for kind in Kind for o in pre.objects(kind).values() if o.key != "a/s2"]
    store.replace_all([*objects, Service(namespace="a", name="t9", vips=("10.96.0.1",))])
    monkeypatch.undo()
    snap = store.snapshot()
    assert_same_as_full_build(snap)
    assert [w.uid for w in snap.endpoints("a/y")] == [w.uid for w in before.endpoints("a/x")]
    assert [w.uid for w in snap.endpoints("a/s1")] == [*(w.uid for w in before.endpoints("a/y")), "uid-100"]
    assert snap.services_for_workload("uid-100") == (snap.services["a/s1"],)
    assert snap.service_by_address("10.96.0.1", 81) == snap.services["a/x"]
    assert snap.service_by_address("10.96.0.9", 80) is None  # no ports
    assert snap.services_by_vip("10.96.0.1") == (snap.services["a/t9"], snap.services["a/x"])
    assert snap.service_by_hostname("s2.a.svc.cluster.local") is None
    # Unchanged objects of a resync stay the previous snapshot's own instances.
    assert all(w is pre.workloads[u] for u, w in snap.workloads.items())
    assert snap.services["a/s3"] is pre.services["a/s3"]
    assert snap._workload_idx is pre._workload_idx


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


# Everything incremental: services collide on VIPs, addresses and hostnames ("s0.a" in "b"
# and "s0" in "a.b" are both s0.a.b.svc.cluster.local), selectors of one or two labels.
SERVICE_NAMESPACES = [*NAMESPACES, "a.b"]
SERVICE_NAMES = [*SERVICES[:3], "s0.a"]
SERVICE_KEYS = [f"{ns}/{n}" for ns in SERVICE_NAMESPACES for n in SERVICE_NAMES]
any_services = st.builds(
    Service,
    namespace=st.sampled_from(SERVICE_NAMESPACES),
    name=st.sampled_from(SERVICE_NAMES),
    vips=st.lists(st.sampled_from(["10.96.0.1", "10.96.0.2", "10.96.0.3"]), max_size=2).map(tuple),
    ports=st.lists(st.sampled_from([80, 443, 8080]).map(lambda p: ServicePort(p, p)), max_size=2).map(tuple),
    selector=st.sampled_from([*SELECTORS, {"app": "y", "tier": "1"}]),
    cluster_domain=st.sampled_from(["cluster.local", "cluster.local", "example.org"]),
)
mixed_steps = st.tuples(
    st.lists(st.one_of(workloads, any_services), max_size=4).map(_unique),
    st.lists(st.sampled_from(UIDS), max_size=2),
    st.lists(st.sampled_from(SERVICE_KEYS), max_size=2),
    st.booleans(),  # as a replace_all (a resync) instead of an apply
)


@settings(max_examples=300)
@given(
    initial=st.lists(st.one_of(workloads, any_services), max_size=20).map(_unique),
    ops=st.lists(mixed_steps, max_size=25),
    max_splices=st.sampled_from([0, 1, 16]),
)
def test_random_writes_updated_in_place_equal_a_full_build(
    initial: list[MeshObject],
    ops: list[tuple[list[MeshObject], list[str], list[str], bool]],
    max_splices: int,
) -> None:
    """With no size threshold every write that can be incremental is: pods and services
    together, deletes, resyncs, from empty and back to empty; a label's uids are spliced or
    re-sorted."""
    with (
        mock.patch.object(snapshot_module, "_INCREMENTAL_FRACTION", 0),
        mock.patch.object(indexes_module, "_MAX_SPLICES", max_splices),
    ):
        store = Store()
        store.replace_all(initial)
        assert_same_as_full_build(store.snapshot())
        for upserts, deleted_uids, deleted_services, resync in ops:
            upserted = {(o.KIND, o.key) for o in upserts}
            deletes = {(Kind.WORKLOAD, u) for u in deleted_uids}
            deletes |= {(Kind.SERVICE, k) for k in deleted_services}
            deletes -= upserted
            if resync:
                snap = store.snapshot()
                current = {(kind, key): o for kind in Kind for key, o in snap.objects(kind).items()}
                current.update({(o.KIND, o.key): o for o in upserts})
                store.replace_all(o for k, o in current.items() if k not in deletes)
            else:
                store.apply(upserts=upserts, deletes=sorted(deletes))
            assert_same_as_full_build(store.snapshot())
