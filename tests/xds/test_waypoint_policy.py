"""Waypoint policies: the codec's round trip and refusals, and who the server sends them to."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime
from pathlib import Path

import pytest
from google.protobuf import any_pb2
from hypothesis import given
from hypothesis import strategies as st

from controlplane.xds import Metadata
from mesh.model import (
    AuthorizationAction,
    AuthorizationPolicy,
    Condition,
    MeshObject,
    Operation,
    Rule,
    RuleTo,
    Source,
)
from mesh.model.objects import Gateway, WaypointRef
from mesh.model.policy import PolicyTargetRef, RuleFrom, WorkloadSelector
from mesh.proto import waypoint_pb2
from mesh.xds.client import WAYPOINT_TYPE_URLS
from mesh.xds.convert import ConversionError
from mesh.xds.waypoint_policy import (
    WAYPOINT_POLICY_TYPE_URL,
    waypoint_policy_from_any,
    waypoint_policy_to_any,
    waypoint_policy_to_proto,
)
from tests.xds.helpers import namespace, pod, service, waypoint_gateway
from tests.xds.test_server_client import TIMEOUT, Running, Server, make_store

words = st.from_regex(r"[a-z][a-z0-9./*-]{0,12}", fullmatch=True)
some = st.lists(words, max_size=2).map(tuple)
sources = st.builds(Source, **{f.name: some for f in dataclasses.fields(Source)})
ports = st.lists(st.integers(0, 65535), max_size=2).map(tuple)
operations = st.builds(
    Operation,
    hosts=some,
    not_hosts=some,
    ports=ports,
    not_ports=ports,
    methods=some,
    not_methods=some,
    paths=some,
    not_paths=some,
)
conditions = st.builds(Condition, key=words, values=some, not_values=some)
rules = st.builds(
    Rule,
    from_=st.lists(st.builds(RuleFrom, sources), max_size=2).map(tuple),
    to=st.lists(st.builds(RuleTo, operations), max_size=2).map(tuple),
    when=st.lists(conditions, max_size=2).map(tuple),
)
refs = st.builds(
    PolicyTargetRef,
    kind=st.sampled_from(["Gateway", "Service"]),
    name=words,
    group=st.sampled_from(["", "gateway.networking.k8s.io"]),
)
policies = st.builds(
    AuthorizationPolicy,
    namespace=words,
    name=words,
    selector=st.one_of(st.none(), st.builds(WorkloadSelector, st.dictionaries(words, words, max_size=2))),
    target_refs=st.lists(refs, min_size=1, max_size=2).map(tuple),
    action=st.sampled_from(list(AuthorizationAction)),
    provider=st.one_of(st.none(), words),
    rules=st.lists(rules, max_size=3).map(tuple),
    creation_timestamp=st.one_of(
        st.none(), st.integers(1, 2**32).map(lambda s: datetime.fromtimestamp(s, UTC))
    ),
    dry_run=st.booleans(),
)


@given(policies)
def test_round_trip(p: AuthorizationPolicy) -> None:
    assert waypoint_policy_from_any(waypoint_policy_to_any(p), p.key) == p


def test_keeps_rules_and_empty_rules_apart() -> None:
    """``spec: {}`` (allow nothing) and ``rules: [{}]`` (allow all) must survive the wire."""
    nothing = AuthorizationPolicy(namespace="shop", name="a", target_refs=(PolicyTargetRef("Gateway", "wp"),))
    everything = dataclasses.replace(nothing, rules=(Rule(),))
    assert waypoint_policy_from_any(waypoint_policy_to_any(nothing), "shop/a").rules == ()
    assert waypoint_policy_from_any(waypoint_policy_to_any(everything), "shop/a").rules == (Rule(),)


def refused(pb: waypoint_pb2.WaypointPolicy, name: str = "shop/a") -> str:
    packed = any_pb2.Any()
    packed.Pack(pb)
    with pytest.raises(ConversionError) as e:
        waypoint_policy_from_any(packed, name)
    return str(e.value)


def test_refusals_name_the_field() -> None:
    base = AuthorizationPolicy(
        namespace="shop",
        name="a",
        target_refs=(PolicyTargetRef("Gateway", "wp"),),
        rules=(Rule(to=(RuleTo(Operation(ports=(80,))),)),),
    )
    pb = waypoint_policy_to_proto(base)
    pb.spec.rules[0].to[0].operation.ports[0] = "http"
    assert (
        refused(pb)
        == "waypoint policy shop/a.spec.rules[0].to[0].operation.ports[0]: 'http' is not a port number"
    )
    pb = waypoint_policy_to_proto(base)
    pb.spec.targetRefs[0].name = ""
    assert refused(pb) == "waypoint policy shop/a.spec.targetRefs[0]: kind and name are required"
    assert (
        refused(waypoint_policy_to_proto(base), "shop/b")
        == "waypoint policy shop/b: the resource holds shop/a"
    )
    other = any_pb2.Any()
    other.Pack(waypoint_pb2.WaypointBinding())
    with pytest.raises(ConversionError, match="not a WaypointPolicy"):
        waypoint_policy_from_any(other, "shop/a")


# --- served only to the waypoints a policy binds to -----------------------------------------


def on_gateway(name: str, gateway: str) -> AuthorizationPolicy:
    return AuthorizationPolicy(
        namespace="shop",
        name=name,
        target_refs=(PolicyTargetRef("Gateway", gateway, "gateway.networking.k8s.io"),),
        action=AuthorizationAction.DENY,
        rules=(Rule(to=(RuleTo(Operation(paths=("/admin",))),)),),
    )


def account_gateway(name: str, sa: str) -> Gateway:
    return dataclasses.replace(
        waypoint_gateway(name, waypoint_for="all"), annotations={"ambient-mesh.io/for-service-account": sa}
    )


async def test_each_waypoint_receives_only_its_policies(tmp_path: Path) -> None:
    objects: list[MeshObject] = [
        namespace("shop", WaypointRef("waypoint", "shop")),
        waypoint_gateway(waypoint_for="all"),
        account_gateway("wp-cart", "cart"),
        pod("web-1", "10.0.1.1", sa="web", labels={"app": "web"}),
        pod("cart-1", "10.0.1.2", sa="cart", labels={"app": "cart"}),
        service("web", "10.96.0.10"),
        service("cart", "10.96.0.11"),
        on_gateway("web-admin", "waypoint"),
        on_gateway("cart-admin", "wp-cart"),
        AuthorizationPolicy(
            namespace="shop", name="selector", selector=WorkloadSelector({"app": "web"}), rules=(Rule(),)
        ),
    ]
    callers: dict[str, str] = {
        "Bearer wp": "shop/waypoint",
        "Bearer cart": "shop/wp-cart",
        "Bearer zt": "istio-system/ztunnel",
    }

    async def authenticate(metadata: Metadata) -> str:
        return callers[dict(metadata)["authorization"]]  # type: ignore[index]

    srv = Server(make_store(objects), authenticate=authenticate)
    await srv.start()
    try:
        got: dict[str, set[str]] = {}
        for token, caller in callers.items():
            token_file = tmp_path / "token"
            token_file.write_text(token.removeprefix("Bearer "))
            async with Running(srv.address, types=WAYPOINT_TYPE_URLS, token_file=token_file) as r:
                await asyncio.wait_for(r.client.synced.wait(), TIMEOUT)
                got[caller] = set(r.client.state.snapshot().waypoint_policies)
                if token == "Bearer wp":
                    # Adding a policy for this waypoint reaches it; one for another does not.
                    r.forget()
                    srv.store.upsert(on_gateway("web-debug", "waypoint"))
                    srv.store.upsert(on_gateway("cart-debug", "wp-cart"))
                    update = await r.next(WAYPOINT_POLICY_TYPE_URL)
                    while "shop/web-debug" not in update.upserted:
                        update = await r.next(WAYPOINT_POLICY_TYPE_URL)
                    assert set(r.client.state.snapshot().waypoint_policies) == {
                        "shop/web-admin",
                        "shop/web-debug",
                    }
                    srv.store.delete(AuthorizationPolicy.KIND, "shop/web-debug")
                    srv.store.delete(AuthorizationPolicy.KIND, "shop/cart-debug")
        assert got == {
            "shop/waypoint": {"shop/web-admin"},
            "shop/wp-cart": {"shop/cart-admin"},
            "istio-system/ztunnel": set(),
        }
    finally:
        await srv.stop()
