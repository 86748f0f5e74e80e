"""The proxy state <-> readable JSON (``/config_dump``): round trips, the shape, refusals by path."""

from __future__ import annotations

import copy
import ipaddress
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.model import TunnelProtocol, WorkloadStatus
from mesh.xds.authorization import (
    Action,
    Authorization,
    Clause,
    Match,
    MatchKind,
    Rule,
    Scope,
    ServiceAccountMatch,
    StringMatch,
)
from mesh.xds.dump import DumpError, authorization_from_json, service_from_json, to_json, workload_from_json
from mesh.xds.state import AppProtocol, GatewayAddress, Port, Service, Workload

# Any text at all where the codec does not care what a name looks like (JSON must carry it).
text = st.text(max_size=12)
names = st.text(min_size=1, max_size=12)
segments = st.from_regex(r"[a-z][a-z0-9.-]{0,10}", fullmatch=True)
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
ips = st.one_of(ipv4, ipv6)
keys = st.builds(lambda ns, n: f"{ns}/{n}", segments, segments)

ports = st.builds(
    Port,
    service_port=st.integers(1, 65535),
    target_port=st.integers(0, 65535),
    app_protocol=st.sampled_from(list(AppProtocol)),
)
port_lists = st.lists(ports, max_size=3).map(tuple)
gateways = st.one_of(
    st.builds(GatewayAddress, namespace=names, hostname=names, hbone_port=st.integers(1, 65535)),
    st.builds(GatewayAddress, address=ips, network=text, hbone_port=st.integers(1, 65535)),
)
workloads = st.builds(
    Workload,
    uid=names,
    name=names,
    namespace=names,
    addresses=st.lists(ips, max_size=3, unique=True).map(tuple),
    node=text,
    network=text,
    tunnel_protocol=st.sampled_from(list(TunnelProtocol)),
    trust_domain=names,
    service_account=names,
    waypoint=st.one_of(st.none(), gateways),
    waypoint_strict=st.booleans(),
    waypoint_account_for=text,
    services=st.dictionaries(keys, port_lists, max_size=3),
    authorization_policies=st.lists(keys, max_size=3, unique=True).map(tuple),
    status=st.sampled_from(list(WorkloadStatus)),
    canonical_name=text,
    canonical_revision=text,
    workload_name=text,
    cluster_id=text,
    host_network=st.booleans(),
)
services = st.builds(
    Service,
    name=names,
    namespace=names,
    hostname=names,
    vips=st.lists(ips, max_size=2, unique=True).map(tuple),
    ports=port_lists,
    waypoint=st.one_of(st.none(), gateways),
)
string_matches = st.one_of(
    st.builds(StringMatch, st.sampled_from([MatchKind.EXACT, MatchKind.PREFIX, MatchKind.SUFFIX]), text),
    st.just(StringMatch(MatchKind.PRESENCE)),
)
networks = st.one_of(
    st.builds(lambda ip, n: ipaddress.ip_network(f"{ip}/{n}", strict=False), ipv4, st.integers(0, 32)),
    st.builds(lambda ip, n: ipaddress.ip_network(f"{ip}/{n}", strict=False), ipv6, st.integers(0, 128)),
)


def some(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[tuple[Any, ...]]:
    return st.lists(strategy, max_size=2).map(tuple)


accounts = st.builds(ServiceAccountMatch, text, text)
matches = st.builds(
    Match,
    namespaces=some(string_matches),
    not_namespaces=some(string_matches),
    principals=some(string_matches),
    not_principals=some(string_matches),
    source_ips=some(networks),
    not_source_ips=some(networks),
    destination_ips=some(networks),
    not_destination_ips=some(networks),
    destination_ports=some(st.integers(1, 65535)),
    not_destination_ports=some(st.integers(1, 65535)),
    service_accounts=some(accounts),
    not_service_accounts=some(accounts),
)
authorizations = st.builds(
    Authorization,
    name=names,
    namespace=names,
    scope=st.sampled_from(list(Scope)),
    action=st.sampled_from(list(Action)),
    rules=st.lists(st.builds(Rule, some(st.builds(Clause, some(matches)))), max_size=3).map(tuple),
    dry_run=st.booleans(),
)


def through_text(value: dict[str, Any]) -> Any:
    """What a reader of /config_dump gets: the JSON text, parsed again."""
    return json.loads(json.dumps(value))


@settings(max_examples=150)
@given(workloads)
def test_workload_round_trip(w: Workload) -> None:
    assert workload_from_json(through_text(to_json(w))) == w


@settings(max_examples=100)
@given(services)
def test_service_round_trip(s: Service) -> None:
    assert service_from_json(through_text(to_json(s))) == s


@settings(max_examples=150)
@given(authorizations)
def test_authorization_round_trip(a: Authorization) -> None:
    assert authorization_from_json(through_text(to_json(a))) == a


# --- the shape a person reads ---------------------------------------------------------------

WEB = Workload(
    uid="uid-web-1",
    name="web-1",
    namespace="shop",
    addresses=("10.0.1.5", "fd00::5"),
    node="node-a",
    tunnel_protocol=TunnelProtocol.HBONE,
    service_account="web",
    waypoint=GatewayAddress(namespace="shop", hostname="waypoint.shop.svc.cluster.local"),
    services={"shop/web.shop.svc.cluster.local": (Port(80, 8080, AppProtocol.HTTP11),)},
    authorization_policies=("istio-system/istio_converted_static_strict",),
    canonical_name="web",
    canonical_revision="v2",
    workload_name="web-1",
    cluster_id="Kubernetes",
)
WEB_JSON = {
    "uid": "uid-web-1",
    "name": "web-1",
    "namespace": "shop",
    "addresses": ["10.0.1.5", "fd00::5"],
    "node": "node-a",
    "network": "",
    "tunnel_protocol": "HBONE",
    "trust_domain": "cluster.local",
    "service_account": "web",
    "waypoint": {
        "hostname": {"namespace": "shop", "hostname": "waypoint.shop.svc.cluster.local"},
        "hbone_mtls_port": 15008,
    },
    "waypoint_strict": False,
    "waypoint_account_for": "",
    "services": {
        "shop/web.shop.svc.cluster.local": [
            {"service_port": 80, "target_port": 8080, "app_protocol": "HTTP11"}
        ]
    },
    "authorization_policies": ["istio-system/istio_converted_static_strict"],
    "status": "HEALTHY",
    "canonical_name": "web",
    "canonical_revision": "v2",
    "workload_name": "web-1",
    "cluster_id": "Kubernetes",
    "network_mode": "STANDARD",
}
SVC = Service(
    name="web",
    namespace="shop",
    hostname="web.shop.svc.cluster.local",
    vips=("10.96.0.1",),
    ports=(Port(80, 0, AppProtocol.TCP),),
    waypoint=GatewayAddress(address="10.0.9.9", network="net-1", hbone_port=15009),
)
SVC_JSON = {
    "name": "web",
    "namespace": "shop",
    "hostname": "web.shop.svc.cluster.local",
    "addresses": ["10.96.0.1"],
    "ports": [{"service_port": 80, "target_port": 0, "app_protocol": "TCP"}],
    "waypoint": {"address": {"network": "net-1", "address": "10.0.9.9"}, "hbone_mtls_port": 15009},
}
AUTH = Authorization(
    name="allow-frontend",
    namespace="shop",
    scope=Scope.NAMESPACE,
    action=Action.ALLOW,
    rules=(
        Rule(
            (
                Clause(
                    (
                        Match(
                            principals=(StringMatch.parse("cluster.local/ns/frontend/*"),),
                            not_namespaces=(StringMatch.parse("*-test"), StringMatch.parse("*")),
                            source_ips=(
                                ipaddress.ip_network("10.1.0.0/16"),
                                ipaddress.ip_network("fd00::1/128"),
                            ),
                            service_accounts=(ServiceAccountMatch("frontend", "ui"),),
                        ),
                        Match(),
                    )
                ),
                Clause((Match(destination_ports=(8080,), not_destination_ports=(22,)),)),
            )
        ),
        Rule(),
    ),
    dry_run=True,
)
AUTH_JSON = {
    "name": "allow-frontend",
    "namespace": "shop",
    "scope": "NAMESPACE",
    "action": "ALLOW",
    "rules": [
        {
            "clauses": [
                {
                    "matches": [
                        {
                            "not_namespaces": [{"suffix": "-test"}, {"presence": {}}],
                            "principals": [{"prefix": "cluster.local/ns/frontend/"}],
                            "source_ips": ["10.1.0.0/16", "fd00::1/128"],
                            "service_accounts": [{"namespace": "frontend", "serviceAccount": "ui"}],
                        },
                        {},
                    ]
                },
                {"matches": [{"destination_ports": [8080], "not_destination_ports": [22]}]},
            ]
        },
        {"clauses": []},
    ],
    "dry_run": True,
}


def test_readable_shape() -> None:
    assert to_json(WEB) == WEB_JSON
    assert to_json(SVC) == SVC_JSON
    assert to_json(AUTH) == AUTH_JSON
    assert (
        to_json(Workload(uid="u", name="n", namespace="ns", host_network=True))["network_mode"]
        == "HOST_NETWORK"
    )
    assert workload_from_json(WEB_JSON) == WEB
    assert service_from_json(SVC_JSON) == SVC
    assert authorization_from_json(AUTH_JSON) == AUTH


def test_to_json_refuses_other_types() -> None:
    with pytest.raises(TypeError, match="not a Workload, Service or Authorization"):
        to_json(Port(1, 2))  # type: ignore[arg-type]


def test_defaults_and_leniency() -> None:
    """Optional fields may be left out (proto3 style); IPs are read in any spelling, stored canonical."""
    w = workload_from_json({"uid": "u", "name": "n", "namespace": "ns", "addresses": ["FD00:0::1"]})
    assert w == Workload(uid="u", name="n", namespace="ns", addresses=("fd00::1",))
    assert w.trust_domain == "cluster.local" and w.service_account == "default"
    assert workload_from_json({"uid": "u", "name": "n", "namespace": "ns", "waypoint": None}).waypoint is None
    gw = workload_from_json(
        {"uid": "u", "name": "n", "namespace": "ns", "waypoint": {"address": {"address": "10.0.0.9"}}}
    ).waypoint
    assert gw == GatewayAddress(address="10.0.0.9", hbone_port=15008)
    a = authorization_from_json({"name": "a", "namespace": "ns", "scope": "GLOBAL", "action": "DENY"})
    assert a == Authorization("a", "ns", Scope.GLOBAL, Action.DENY, (), False)
    m = authorization_from_json(
        {"name": "a", "namespace": "ns", "scope": "GLOBAL", "action": "DENY",
         "rules": [{"clauses": [{"matches": [{"source_ips": ["10.0.0.1"]}]}]}]}
    )  # fmt: skip
    assert m.rules[0].clauses[0].matches[0].source_ips == (ipaddress.ip_network("10.0.0.1/32"),)


# --- refusals name the path -----------------------------------------------------------------

Mutation = Callable[[dict[str, Any]], object]


def _set(path: tuple[str | int, ...], value: object) -> Mutation:
    def mutate(d: dict[str, Any]) -> None:
        target: Any = d
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return mutate


def _delete(*path: str | int) -> Mutation:
    def mutate(d: dict[str, Any]) -> None:
        target: Any = d
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return mutate


WORKLOAD_ERRORS = [
    (_delete("uid"), r"^w\.uid: required$"),
    (_set(("uid",), ""), r"^w\.uid: must not be empty$"),
    (_set(("name",), 7), r"^w\.name: must be a string, not a number$"),
    (_set(("addresses", 1), "10.0.0.300"), r"^w\.addresses\[1\]: '10\.0\.0\.300' is not an IP address$"),
    (_set(("addresses",), "10.0.0.1"), r"^w\.addresses: must be a list, not a string$"),
    (_set(("tunnel_protocol",), "hbone"), r"^w\.tunnel_protocol: must be one of NONE, HBONE, not 'hbone'$"),
    (_set(("status",), 1), r"^w\.status: must be one of HEALTHY, UNHEALTHY, not 1$"),
    (_set(("network_mode",), "HOST"), r"^w\.network_mode: must be one of STANDARD, HOST_NETWORK"),
    (_set(("waypoint", "hbone_mtls_port"), 0), r"^w\.waypoint\.hbone_mtls_port: port 0 is out of range"),
    (
        _set(("waypoint", "address"), {"address": "10.0.0.1"}),
        r"^w\.waypoint: exactly one of hostname and address",
    ),
    (_set(("waypoint",), {}), r"^w\.waypoint: exactly one of hostname and address"),
    (_set(("waypoint", "hostname", "hostname"), ""), r"^w\.waypoint\.hostname\.hostname: must not be empty$"),
    (
        _set(("services", "shop/web.shop.svc.cluster.local", 0, "service_port"), 70000),
        r"^w\.services\['shop/web\.shop\.svc\.cluster\.local'\]\[0\]\.service_port: port 70000 is out of range",
    ),
    (
        _set(("services", "shop/web.shop.svc.cluster.local", 0, "target_port"), True),
        r"target_port: must be a port number, not a boolean$",
    ),
    (_set(("services", "web"), []), r"^w\.services\['web'\]: 'web' is not <namespace>/<hostname>$"),
    (
        _set(("authorization_policies", 0), "a/b/c"),
        r"^w\.authorization_policies\[0\]: 'a/b/c' is not <namespace>/<name>$",
    ),
    (_set(("lokal",), True), r"^w\.lokal: unknown field$"),
    (_set(("services", "shop/web.shop.svc.cluster.local", 0, "port"), 1), r"\[0\]\.port: unknown field$"),
]


@pytest.mark.parametrize(("mutate", "message"), WORKLOAD_ERRORS)
def test_bad_workloads_are_refused_with_the_path(mutate: Mutation, message: str) -> None:
    data = copy.deepcopy(WEB_JSON)
    mutate(data)
    with pytest.raises(DumpError, match=message) as info:
        workload_from_json(data, "w")
    assert isinstance(info.value, ValueError) and info.value.path.startswith("w")


SERVICE_ERRORS = [
    (_delete("hostname"), r"^s\.hostname: required$"),
    (_set(("addresses", 0), "10.96.0.0/16"), r"^s\.addresses\[0\]: '10\.96\.0\.0/16' is not an IP address$"),
    (
        _set(("ports", 0, "app_protocol"), "HTTP"),
        r"^s\.ports\[0\]\.app_protocol: must be one of UNKNOWN, HTTP11",
    ),
    (_delete("ports", 0, "service_port"), r"^s\.ports\[0\]\.service_port: required$"),
    (
        _set(("waypoint", "address", "address"), "nope"),
        r"^s\.waypoint\.address\.address: 'nope' is not an IP",
    ),
    (_set(("vips",), []), r"^s\.vips: unknown field$"),
]


@pytest.mark.parametrize(("mutate", "message"), SERVICE_ERRORS)
def test_bad_services_are_refused_with_the_path(mutate: Mutation, message: str) -> None:
    data = copy.deepcopy(SVC_JSON)
    mutate(data)
    with pytest.raises(DumpError, match=message):
        service_from_json(data, "s")


M0 = ("rules", 0, "clauses", 0, "matches", 0)
AUTH_ERRORS = [
    (_delete("scope"), r"^a\.scope: required$"),
    (_set(("action",), "AUDIT"), r"^a\.action: must be one of ALLOW, DENY, not 'AUDIT'$"),
    (_set(("dry_run",), "yes"), r"^a\.dry_run: must be true or false, not a string$"),
    (_set(("rules",), {}), r"^a\.rules: must be a list, not an object$"),
    (_set(("rules", 0), []), r"^a\.rules\[0\]: must be an object, not a list$"),
    (
        _set((*M0, "source_ips", 0), "10.1.0.1/16"),
        r"^a\.rules\[0\]\.clauses\[0\]\.matches\[0\]\.source_ips\[0\]: '10\.1\.0\.1/16' is not a CIDR",
    ),
    (_set((*M0, "principals", 0), {}), r"matches\[0\]\.principals\[0\]: must have exactly one of exact"),
    (
        _set((*M0, "principals", 0), {"exact": "a", "prefix": "b"}),
        r"matches\[0\]\.principals\[0\]: must have exactly one of exact",
    ),
    (_set((*M0, "principals", 0), {"regex": "a"}), r"principals\[0\]\.regex: unknown field"),
    (_set((*M0, "not_namespaces", 1), {"presence": True}), r"not_namespaces\[1\]\.presence: must be \{\}$"),
    (_set((*M0, "principals", 0), {"exact": 1}), r"principals\[0\]\.exact: must be a string, not a number$"),
    (_set((*M0, "destination_ports"), [0]), r"matches\[0\]\.destination_ports\[0\]: port 0 is out of range"),
    (
        _set((*M0, "service_accounts", 0), {"namespace": "x"}),
        r"service_accounts\[0\]\.serviceAccount: required$",
    ),
    (_set((*M0, "service_account"), []), r"matches\[0\]\.service_account: unknown field$"),
    (_set(("rules", 0, "clauses", 1, "matches"), None), None),  # null = empty, as proto3 JSON
]


@pytest.mark.parametrize(("mutate", "message"), AUTH_ERRORS)
def test_bad_authorizations_are_refused_with_the_path(mutate: Mutation, message: str | None) -> None:
    data = copy.deepcopy(AUTH_JSON)
    mutate(data)
    if message is None:
        authorization_from_json(data, "a")
        return
    with pytest.raises(DumpError, match=message):
        authorization_from_json(data, "a")


@pytest.mark.parametrize(
    ("read", "value", "message"),
    [
        (workload_from_json, [], r"^must be an object, not a list$"),
        (service_from_json, None, r"^must be an object, not null$"),
        (authorization_from_json, {1: "x"}, r"^keys must be strings, not a number$"),
    ],
)
def test_not_an_object(read: Callable[[object], object], value: object, message: str) -> None:
    with pytest.raises(DumpError, match=message):
        read(value)


def test_the_config_dump_example_in_the_docs_reads_back() -> None:
    """docs/ztunnel.md shows a config_dump: its state values must be what this codec writes."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "ztunnel.md").read_text()
    section = text.split("## Reading `/config_dump`", 1)[1]
    dump = json.loads(section.split("```json\n", 1)[1].split("```", 1)[0])
    for raw in dump["workloads"]:
        w = workload_from_json({k: v for k, v in raw.items() if k != "local"})
        assert {**to_json(w), "local": raw["local"]} == raw
    for raw in dump["services"]:
        assert to_json(service_from_json(raw)) == raw
    for raw in dump["authorizations"]:
        assert to_json(authorization_from_json(raw)) == raw
