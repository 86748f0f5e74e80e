"""The discovery server's incremental renders: always what a full render would serve.

``ResourceCache`` re-renders only what a change can alter (a policy: the workloads whose policy
list it enters or leaves; a service: its entry and the workloads it selects; ...). These tests
drive random sequences of store edits over a small mesh where everything can collide (every
selector, waypoint, PeerAuthentication and namespace touches the same few pods) and compare,
after each batch, the maintained resources with a fresh full render of the same snapshot, and
``changed`` with the exact difference from the previous resources.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.xds import _SCOPED, TYPES, ResourceCache, Resources
from mesh.model import (
    AuthorizationAction,
    AuthorizationPolicy,
    Gateway,
    Kind,
    MeshObject,
    MtlsMode,
    Namespace,
    Operation,
    PeerAuthentication,
    PolicyTargetRef,
    Rule,
    RuleFrom,
    RuleTo,
    Service,
    ServicePort,
    Source,
    Store,
    WaypointRef,
    Workload,
    WorkloadSelector,
)
from mesh.xds.convert import ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL

NAMESPACES = ("a", "b", "istio-system")
APPS = ("x", "y")
STRICT = {"ambient-mesh.io/waypoint-mode": "strict"}

namespaces = st.sampled_from(NAMESPACES)
apps = st.sampled_from(APPS)
waypoint_refs = st.one_of(
    st.none(),
    st.builds(WaypointRef, st.sampled_from(("wp", "none", "ghost")), st.sampled_from(("a", "b"))),
)


def _labels(app: str | None, version: str) -> dict[str, str]:
    return {"version": version} | ({"app": app} if app else {})


workloads = st.builds(
    lambda i, ns, app, version, sa, ip, named, strict, ref: Workload(
        uid=f"uid-{i}",
        name=f"pod-{i % 3}",
        namespace=ns,
        node="node-1",
        service_account=sa,
        ips=(f"10.0.0.{ip}",),
        labels=_labels(app, version),
        annotations=STRICT if strict else {},
        named_ports={"http": 8080} if named else {},
        waypoint=ref,
    ),
    st.integers(0, 7),
    namespaces,
    st.one_of(st.none(), apps),
    st.sampled_from(("v1", "v2")),
    st.sampled_from(("sa1", "sa2", "wp")),
    st.integers(1, 4),
    st.booleans(),
    st.booleans(),
    waypoint_refs,
)

services = st.builds(
    lambda name, ns, app, target, extra, ref, domain: Service(
        namespace=ns,
        name=name,
        vips=(f"10.96.0.{len(name)}",),
        ports=(ServicePort(80, target, name="http"), *([ServicePort(443, 8443)] if extra else [])),
        selector={"app": app} if app else None,
        waypoint=ref,
        cluster_domain=domain,
    ),
    st.sampled_from(("x", "y", "wp")),
    namespaces,
    st.one_of(st.none(), apps),
    st.sampled_from((8080, "http", "grpc")),
    st.booleans(),
    waypoint_refs,
    st.sampled_from(("cluster.local", "cluster.local", "example.org")),
)

gateways = st.builds(
    lambda name, ns, cls, wfor, sa: Gateway(
        namespace=ns,
        name=name,
        gateway_class=cls,
        labels={"istio.io/waypoint-for": wfor},
        annotations={"ambient-mesh.io/for-service-account": sa} if sa else {},
    ),
    st.sampled_from(("wp", "ghost")),
    st.sampled_from(("a", "b")),
    st.sampled_from(("istio-waypoint", "istio-waypoint", "other")),
    st.sampled_from(("service", "workload", "all", "none")),
    st.sampled_from((None, "sa1")),
)

namespace_objects = st.builds(
    lambda name, ref, strict: Namespace(name=name, waypoint=ref, annotations=STRICT if strict else {}),
    namespaces,
    waypoint_refs,
    st.booleans(),
)

selectors = st.one_of(
    st.none(),
    st.builds(lambda app: WorkloadSelector({"app": app}), apps),
    st.builds(lambda v: WorkloadSelector({"version": v}), st.sampled_from(("v1", "v2"))),
    st.just(WorkloadSelector({})),
)

policies = st.builds(
    lambda name, ns, sel, action, port, l7, targeted: AuthorizationPolicy(
        namespace=ns,
        name=name,
        selector=None if targeted else sel,
        target_refs=(PolicyTargetRef("Gateway", "wp", "gateway.networking.k8s.io"),) if targeted else (),
        action=action,
        rules=(
            Rule(
                from_=(RuleFrom(Source(principals=("cluster.local/ns/a/sa/sa1",))),),
                to=(RuleTo(Operation(ports=(port,), methods=("GET",) if l7 else ())),),
            ),
        ),
    ),
    st.sampled_from(("p0", "p1", "converted_peer_authentication_pa0")),
    namespaces,
    selectors,
    st.sampled_from(list(AuthorizationAction)),
    st.sampled_from((8080, 9090)),
    st.booleans(),
    st.booleans(),
)

peer_authentications = st.builds(
    lambda name, ns, sel, mode, ports: PeerAuthentication(
        namespace=ns, name=name, selector=sel, mtls_mode=mode, port_level_mtls=ports
    ),
    st.sampled_from(("pa0", "pa1")),
    namespaces,
    selectors,
    st.sampled_from(list(MtlsMode)),
    st.sampled_from(({}, {8080: MtlsMode.PERMISSIVE}, {9090: MtlsMode.STRICT})),
)

objects = st.one_of(
    workloads, workloads, services, gateways, namespace_objects, policies, policies, peer_authentications
)
edits = st.one_of(
    objects.map(lambda o: ("upsert", o)),
    objects.map(lambda o: ("delete", o)),
)
batches = st.lists(st.lists(edits, min_size=1, max_size=3), min_size=1, max_size=12)


def _apply(store: Store, batch: list[tuple[str, MeshObject]]) -> None:
    ups: dict[tuple[Kind, str], MeshObject] = {}
    dels: dict[tuple[Kind, str], None] = {}
    for op, obj in batch:
        k = (obj.KIND, obj.key)
        if op == "upsert":
            dels.pop(k, None)
            ups[k] = obj
        else:
            ups.pop(k, None)
            dels[k] = None
    store.apply(upserts=list(ups.values()), deletes=list(dels))


def _versions(r: Resources) -> dict[str, dict[str, str]]:
    return {t: {name: e.version for name, e in r.by_type[t].items()} for t in TYPES}


def _audiences(r: Resources) -> dict[str, dict[str, frozenset[str]]]:
    return {t: dict(r.audiences.get(t, {})) for t in _SCOPED}


def full_render(store: Store) -> Resources:
    """What a cache started now, on the same objects, serves."""
    fresh_store = Store()
    fresh_store.replace_all(o for k in Kind for o in store.snapshot().objects(k).values())
    fresh = ResourceCache(fresh_store)
    fresh.close()
    return fresh.current()


def _diff(new: Resources, old: Resources) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for t in TYPES:
        a, b = _versions(new)[t], _versions(old)[t]
        names = {n for n in a.keys() | b.keys() if a.get(n) != b.get(n)}
        if t in _SCOPED:
            na: Mapping[str, frozenset[str]] = new.audiences.get(t, {})
            nb: Mapping[str, frozenset[str]] = old.audiences.get(t, {})
            names |= {n for n in na.keys() | nb.keys() if na.get(n) != nb.get(n)}
        out[t] = names
    return out


BASE: list[MeshObject] = [
    Namespace(name="a"),
    Workload(uid="uid-0", name="pod-0", namespace="a", node="node-1", ips=("10.0.0.1",), labels={"app": "x"}),
    Service(
        namespace="a", name="x", vips=("10.96.0.1",), ports=(ServicePort(80, 8080),), selector={"app": "x"}
    ),
]


@settings(max_examples=300)
@given(batches, st.booleans())
def test_incremental_resources_equal_a_full_render(
    steps: list[list[tuple[str, MeshObject]]], coalesce: bool
) -> None:
    store = Store()
    store.replace_all(BASE)
    cache = ResourceCache(store)
    try:
        previous = cache.current()
        for i, batch in enumerate(steps):
            _apply(store, batch)
            if coalesce and i % 2 == 0 and i != len(steps) - 1:
                continue  # two batches pending at once: rendered as one change
            got = cache.current()
            want = full_render(store)
            assert got.version == store.version
            assert _versions(got) == _versions(want)
            assert _audiences(got) == _audiences(want)
            if got is previous:
                continue  # the batch changed nothing (deletes of absent objects)
            # `changed` is exact: every name that differs, and no other.
            assert got.changed is not None and got.parent_generation == previous.generation
            assert {t: set(got.changed[t]) for t in TYPES} == _diff(got, previous)
            previous = got
    finally:
        cache.close()


def _mesh(pods_per_app: int = 5) -> list[MeshObject]:
    objs: list[MeshObject] = [Namespace(name="a"), Namespace(name="b")]
    for ns in ("a", "b"):
        for app in ("x", "y", "z"):
            objs.append(
                Service(
                    namespace=ns,
                    name=app,
                    vips=(f"10.96.{len(objs)}.1",),
                    ports=(ServicePort(80, 8080),),
                    selector={"app": app},
                )
            )
            for i in range(pods_per_app):
                objs.append(
                    Workload(
                        uid=f"{ns}-{app}-{i}",
                        name=f"{app}-{i}",
                        namespace=ns,
                        node="node-1",
                        ips=(f"10.{len(objs)}.0.{i + 1}",),
                        labels={"app": app},
                    )
                )
    allow = Rule(from_=(RuleFrom(Source(namespaces=("b",))),))
    on_x = WorkloadSelector({"app": "x"})
    objs.append(AuthorizationPolicy(namespace="a", name="on-x", selector=on_x, rules=(allow,)))
    deny = AuthorizationAction.DENY
    objs.append(AuthorizationPolicy(namespace="a", name="ns-wide", action=deny, rules=(allow,)))
    return objs


def _changed_after(store: Store, cache: ResourceCache, *objs: MeshObject) -> dict[str, frozenset[str]]:
    before = cache.current()
    store.upsert(*objs)
    got = cache.current()
    assert got.parent_generation == before.generation and got.changed is not None
    assert _versions(got) == _versions(full_render(store))
    return {t: names for t, names in got.changed.items() if names}


def test_one_policy_change_marks_only_what_it_changes() -> None:
    store = Store()
    store.replace_all(_mesh())
    cache = ResourceCache(store)
    renders = cache.full_renders
    snap = store.snapshot()
    on_x = snap.authorization_policies["a/on-x"]
    new_rules = (Rule(to=(RuleTo(Operation(ports=(9090,))),)),)
    # Rules edited: the authorization only; the workloads list it by name, unchanged.
    assert _changed_after(store, cache, dataclasses.replace(on_x, rules=new_rules)) == {
        AUTHORIZATION_TYPE_URL: frozenset({"a/on-x"})
    }
    # Retargeted from app=x to app=y: the pods of both apps (their lists), not the authorization.
    on_y = dataclasses.replace(on_x, rules=new_rules, selector=WorkloadSelector({"app": "y"}))
    assert _changed_after(store, cache, on_y) == {
        ADDRESS_TYPE_URL: frozenset({f"a-{app}-{i}" for app in ("x", "y") for i in range(5)})
    }
    # A namespace-wide policy: listed by no workload, so only itself.
    ns_wide = dataclasses.replace(snap.authorization_policies["a/ns-wide"], action=AuthorizationAction.ALLOW)
    assert _changed_after(store, cache, ns_wide) == {AUTHORIZATION_TYPE_URL: frozenset({"a/ns-wide"})}
    # A Service gains a port: itself and the workloads it selects (their port lists).
    svc = snap.services["a/z"]
    wider = dataclasses.replace(svc, ports=(*svc.ports, ServicePort(443, 8443)))
    assert _changed_after(store, cache, wider) == {
        ADDRESS_TYPE_URL: frozenset({"a/z.a.svc.cluster.local", *(f"a-z-{i}" for i in range(5))})
    }
    # A pod moved from one service to another: only that pod.
    pod = snap.workloads["b-x-0"]
    moved = dataclasses.replace(pod, labels={"app": "y"})
    assert _changed_after(store, cache, moved) == {ADDRESS_TYPE_URL: frozenset({"b-x-0"})}
    assert cache.full_renders == renders, "none of these should have re-rendered everything"
    cache.close()


def test_a_stream_behind_by_several_changes_still_diffs_only_what_changed() -> None:
    store = Store()
    store.replace_all(_mesh(2))
    cache = ResourceCache(store)
    first = cache.current()
    snap = store.snapshot()
    store.upsert(dataclasses.replace(snap.workloads["a-x-0"], labels={"app": "y"}))
    cache.current()
    store.upsert(dataclasses.replace(snap.workloads["b-z-1"], ips=("10.9.9.9",)))
    last = cache.current()
    assert set(cache.changed_since(last, ADDRESS_TYPE_URL, first.generation) or ()) == {"a-x-0", "b-z-1"}
    assert set(cache.changed_since(last, AUTHORIZATION_TYPE_URL, first.generation) or ()) == set()
    assert cache.changed_since(last, ADDRESS_TYPE_URL, None) is None
    cache.close()
