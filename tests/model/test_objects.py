"""Model objects: immutability, equality and the small pure helpers on them."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

import pytest

from mesh.identity import Identity
from mesh.model import (
    AuthorizationPolicy,
    FrozenMap,
    Gateway,
    GatewayListener,
    Kind,
    Namespace,
    Node,
    PeerAuthentication,
    Rule,
    RuleFrom,
    Service,
    ServiceAccount,
    ServicePort,
    Source,
    WaypointRef,
    Workload,
    WorkloadSelector,
    oldest_first,
)


def test_frozen_map_is_a_hashable_read_only_mapping() -> None:
    m = FrozenMap({"a": "1", "b": "2"})
    assert m == {"a": "1", "b": "2"}
    assert m == FrozenMap([("b", "2"), ("a", "1")])
    assert hash(m) == hash(FrozenMap({"b": "2", "a": "1"}))
    assert m != {"a": "1"}
    assert m != ["a"]
    assert "a" in m and "c" not in m
    assert dict(m) == {"a": "1", "b": "2"}
    assert repr(FrozenMap({"a": 1})) == "FrozenMap({'a': 1})"
    with pytest.raises(TypeError):
        m["c"] = "3"  # type: ignore[index]


def test_frozen_map_copies_its_input() -> None:
    src = {"a": "1"}
    m = FrozenMap(src)
    src["a"] = "changed"
    assert m["a"] == "1"


def test_objects_freeze_plain_dicts_and_lists_so_they_stay_hashable() -> None:
    labels = {"app": "web"}
    w = Workload(uid="u", name="web-1", namespace="shop", labels=labels, ips=["10.0.0.1"])  # type: ignore[arg-type]
    labels["app"] = "mutated"
    assert w.labels == {"app": "web"}
    assert isinstance(w.labels, FrozenMap)
    assert w.ips == ("10.0.0.1",)
    assert hash(w) == hash(dataclasses.replace(w))
    with pytest.raises(dataclasses.FrozenInstanceError):
        w.name = "other"  # type: ignore[misc]


def test_equal_objects_compare_equal_whatever_the_mapping_type() -> None:
    a = Service(namespace="shop", name="web", selector={"app": "web"})
    b = Service(namespace="shop", name="web", selector=FrozenMap({"app": "web"}))
    assert a == b
    assert a != dataclasses.replace(b, selector={"app": "db"})


def test_keys_and_kinds() -> None:
    assert Node(name="n1").key == "n1"
    assert Node.KIND is Kind.NODE
    assert Namespace(name="shop").key == "shop"
    assert ServiceAccount(namespace="shop", name="web").key == "shop/web"
    assert Workload(uid="u-1", name="p", namespace="ns").key == "u-1"
    assert Service(namespace="shop", name="web").key == "shop/web"
    assert Gateway(namespace="shop", name="wp", gateway_class="x").key == "shop/wp"
    assert AuthorizationPolicy(namespace="shop", name="p").key == "shop/p"
    assert PeerAuthentication.KIND is Kind.PEER_AUTHENTICATION


def test_workload_identity() -> None:
    w = Workload(uid="u", name="p", namespace="shop", service_account="web", trust_domain="td")
    assert w.identity == Identity("td", "shop", "web")
    assert w.identity.principal == "td/ns/shop/sa/web"
    assert Workload(uid="u", name="p", namespace="shop").identity.service_account == "default"


def test_service_hostname_and_ports() -> None:
    svc = Service(
        namespace="shop",
        name="web",
        ports=(
            ServicePort(port=80, target_port=8080, name="http"),
            ServicePort(port=53, target_port="dns", name="dns", protocol="UDP"),
        ),
    )
    assert svc.hostname == "web.shop.svc.cluster.local"
    assert dataclasses.replace(svc, cluster_domain="corp").hostname == "web.shop.svc.corp"
    assert svc.port(80) is svc.ports[0]
    assert svc.port(53) is None
    assert svc.port(53, "UDP") is svc.ports[1]
    w = Workload(uid="u", name="p", namespace="shop", named_ports={"dns": 5353})
    assert svc.ports[0].target_for(w) == 8080
    assert svc.ports[1].target_for(w) == 5353
    assert svc.ports[1].target_for(Workload(uid="u", name="p", namespace="shop")) is None


def test_service_selection_follows_kubernetes() -> None:
    w = Workload(uid="u", name="p", namespace="shop", labels={"app": "web", "v": "1"})
    assert Service(namespace="shop", name="s", selector={"app": "web"}).selects(w)
    assert not Service(namespace="other", name="s", selector={"app": "web"}).selects(w)
    assert not Service(namespace="shop", name="s", selector={"app": "db"}).selects(w)
    assert not Service(namespace="shop", name="s", selector={"app": "web", "x": "y"}).selects(w)
    assert not Service(namespace="shop", name="s", selector=None).selects(w)
    assert not Service(namespace="shop", name="s", selector={}).selects(w)


def test_waypoint_ref() -> None:
    ref = WaypointRef(name="wp", namespace="shop")
    assert ref.key == "shop/wp"
    assert not ref.opts_out
    assert WaypointRef(name="none", namespace="shop").opts_out


def test_gateway_waypoint_properties() -> None:
    gw = Gateway(
        namespace="shop",
        name="wp",
        gateway_class="istio-waypoint",
        listeners=(GatewayListener(name="mesh", port=15008, protocol="HBONE"),),
    )
    assert gw.is_waypoint
    assert gw.waypoint_for == "service"
    assert dataclasses.replace(gw, labels={"istio.io/waypoint-for": "all"}).waypoint_for == "all"
    assert not dataclasses.replace(gw, gateway_class="istio").is_waypoint


def test_policy_shapes_keep_meaningful_distinctions() -> None:
    deny_all = AuthorizationPolicy(namespace="ns", name="a")
    allow_all = AuthorizationPolicy(namespace="ns", name="a", rules=(Rule(),))
    assert deny_all != allow_all
    rule = Rule(from_=[RuleFrom(Source(principals=["td/ns/a/sa/b"]))])  # type: ignore[arg-type]
    assert rule.from_[0].source.principals == ("td/ns/a/sa/b",)
    assert hash(rule)
    assert WorkloadSelector({"app": "web"}).matches({"app": "web", "x": "y"})
    assert not WorkloadSelector({"app": "web"}).matches({"app": "db"})
    assert WorkloadSelector().matches({})


def test_oldest_first_orders_by_timestamp_then_name() -> None:
    t1 = datetime(2024, 1, 1, tzinfo=UTC)
    t2 = datetime(2024, 6, 1, tzinfo=UTC)
    policies = [
        PeerAuthentication(namespace="b", name="undated"),
        PeerAuthentication(namespace="a", name="undated"),
        PeerAuthentication(namespace="z", name="new", creation_timestamp=t2),
        PeerAuthentication(namespace="z", name="old", creation_timestamp=t1),
    ]
    ordered = [(p.namespace, p.name) for p in sorted(policies, key=oldest_first)]
    assert ordered == [("z", "old"), ("z", "new"), ("a", "undated"), ("b", "undated")]
