"""ProxyState: what a node proxy holds, applied one discovery response at a time."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from mesh.xds.authorization import Authorization, Scope
from mesh.xds.state import Address, Port, ProxySnapshot, ProxyState, Service, Workload

HOST = "shop/web.shop.svc.cluster.local"
DB_HOST = "shop/db.shop.svc.cluster.local"


def wl(
    uid: str,
    *ips: str,
    ns: str = "shop",
    services: Mapping[str, tuple[Port, ...]] | None = None,
    policies: tuple[str, ...] = (),
) -> Workload:
    return Workload(
        uid=uid,
        name=uid,
        namespace=ns,
        addresses=ips,
        services=services or {},
        authorization_policies=policies,
    )


def svc(name: str, *vips: str, ns: str = "shop", ports: tuple[Port, ...] = (Port(80, 8080),)) -> Service:
    return Service(name=name, namespace=ns, hostname=f"{name}.{ns}.svc.cluster.local", vips=vips, ports=ports)


def named(*values: Address) -> list[tuple[str, Address]]:
    return [(v.uid if isinstance(v, Workload) else v.key, v) for v in values]


def auth(key: str, scope: Scope = Scope.WORKLOAD_SELECTOR) -> Authorization:
    ns, name = key.split("/")
    return Authorization(name=name, namespace=ns, scope=scope)


def endpoint_ports(snap: ProxySnapshot, key: str) -> dict[str, tuple[Port, ...]]:
    return {e.workload.uid: e.ports for e in snap.endpoints(key)}


# --- addresses -----------------------------------------------------------------------------


def test_apply_and_remove_workloads_and_services() -> None:
    s = ProxyState()
    assert s.version == 0 and s.snapshot().workloads == {}
    web = wl("w1", "10.0.0.1", "fd00::1", services={HOST: (Port(80, 8080),)})
    assert s.apply(addresses=named(web, svc("web", "10.96.0.1")))
    snap = s.snapshot()
    assert snap.workloads == {"w1": web}
    assert set(snap.services) == {HOST}
    assert snap.workload_by_ip("10.0.0.1") is web and snap.workload_by_ip("fd00::1") is web
    assert snap.workload_by_ip("10.0.0.2") is None
    assert [x.key for x in snap.services_by_vip("10.96.0.1")] == [HOST]
    assert snap.service_by_address("10.96.0.1", 80) == svc("web", "10.96.0.1")
    assert snap.service_by_address("10.96.0.1", 81) is None
    assert endpoint_ports(snap, HOST) == {"w1": (Port(80, 8080),)}

    assert s.apply(removed_addresses=["w1", HOST])
    snap = s.snapshot()
    assert snap.workloads == {} and snap.services == {}
    assert snap.workload_by_ip("10.0.0.1") is None and snap.services_by_vip("10.96.0.1") == ()
    assert snap.endpoints(HOST) == ()


def test_update_moves_ips_and_vips() -> None:
    s = ProxyState()
    s.apply(addresses=named(wl("w1", "10.0.0.1"), svc("web", "10.96.0.1")))
    s.apply(addresses=named(wl("w1", "10.0.0.2"), svc("web", "10.96.0.2")))
    snap = s.snapshot()
    assert snap.workload_by_ip("10.0.0.1") is None
    assert snap.workload_by_ip("10.0.0.2") == wl("w1", "10.0.0.2")
    assert snap.services_by_vip("10.96.0.1") == () and len(snap.services_by_vip("10.96.0.2")) == 1


def test_removals_apply_before_additions_in_one_batch() -> None:
    s = ProxyState()
    s.apply(addresses=named(wl("old", "10.0.0.1")))
    # A pod replaced by another with its IP, in one response.
    s.apply(addresses=named(wl("new", "10.0.0.1")), removed_addresses=["old"])
    snap = s.snapshot()
    assert set(snap.workloads) == {"new"}
    assert snap.workload_by_ip("10.0.0.1") == wl("new", "10.0.0.1")


def test_a_name_switching_kind_replaces_the_old_value() -> None:
    name = "shop/x.shop.svc.cluster.local"
    s = ProxyState()
    w = Workload(
        uid=name, name="x", namespace="shop", addresses=("10.0.0.1",), services={HOST: (Port(80, 80),)}
    )
    s.apply(addresses=[(name, w)])
    assert s.apply(addresses=[(name, svc("x", "10.96.0.7"))])
    snap = s.snapshot()
    assert name not in snap.workloads and name in snap.services
    assert snap.workload_by_ip("10.0.0.1") is None and snap.endpoints(HOST) == ()
    assert len(snap.services_by_vip("10.96.0.7")) == 1
    assert s.apply(addresses=[(name, w)])
    snap = s.snapshot()
    assert name in snap.workloads and name not in snap.services
    assert snap.services_by_vip("10.96.0.7") == ()
    assert snap.workload_by_ip("10.0.0.1") == w and set(endpoint_ports(snap, HOST)) == {name}


def test_two_workloads_claiming_one_ip_newer_wins() -> None:
    s = ProxyState()
    a, b = wl("a", "10.0.0.1"), wl("b", "10.0.0.1", "10.0.0.2")
    s.apply(addresses=named(a))
    with capture_logs() as logs:
        s.apply(addresses=named(b))
    assert s.snapshot().workload_by_ip("10.0.0.1") == b
    assert any(e["event"].startswith("two workloads claim one IP") and e["ip"] == "10.0.0.1" for e in logs)
    # Removing the older one leaves the newer's claim alone.
    s.apply(removed_addresses=["a"])
    assert s.snapshot().workload_by_ip("10.0.0.1") == b
    s.apply(addresses=named(a))
    assert s.snapshot().workload_by_ip("10.0.0.1") == a


def test_ip_still_claimed_after_the_newer_claimant_leaves() -> None:
    """Host-network pods all carry their node's IP; one leaving must not unindex the others.

    Removing (or readdressing) the workload that currently owns an IP drops the IP from the
    index even though another live workload still claims it.
    """
    s = ProxyState()
    a, b = wl("a", "10.0.0.1"), wl("b", "10.0.0.1")
    s.apply(addresses=named(a, b))
    s.apply(removed_addresses=["b"])
    assert s.snapshot().workload_by_ip("10.0.0.1") == a
    s.apply(addresses=named(b))
    s.apply(addresses=named(wl("b", "10.0.0.9")))  # b moves away from the shared IP
    assert s.snapshot().workload_by_ip("10.0.0.1") == a


def test_vip_index_with_several_services() -> None:
    s = ProxyState()
    web = svc("web", "10.96.0.1", ports=(Port(80, 8080),))
    db = svc("db", "10.96.0.1", "10.96.0.2", ports=(Port(5432, 5432), Port(80, 8081)))
    s.apply(addresses=named(web, db))
    snap = s.snapshot()
    assert [x.key for x in snap.services_by_vip("10.96.0.1")] == [DB_HOST, HOST]  # by key
    assert snap.service_by_address("10.96.0.1", 5432) == db
    assert snap.service_by_address("10.96.0.1", 80) == db  # both have it: the first by key
    assert snap.service_by_address("10.96.0.2", 80) == db
    s.apply(removed_addresses=[DB_HOST])
    snap = s.snapshot()
    assert [x.key for x in snap.services_by_vip("10.96.0.1")] == [HOST]
    assert snap.service_by_address("10.96.0.1", 80) == web
    assert snap.services_by_vip("10.96.0.2") == ()


def test_endpoints_follow_the_workloads_services_maps() -> None:
    s = ProxyState()
    # A workload may name a service before the service itself arrives.
    s.apply(addresses=named(wl("w1", "10.0.0.1", services={HOST: (Port(80, 8080),)})))
    assert endpoint_ports(s.snapshot(), HOST) == {"w1": (Port(80, 8080),)}
    s.apply(
        addresses=named(
            svc("web", "10.96.0.1"),
            wl("w2", "10.0.0.2", services={HOST: (Port(80, 9090),), DB_HOST: ()}),
        )
    )
    snap = s.snapshot()
    assert endpoint_ports(snap, HOST) == {"w1": (Port(80, 8080),), "w2": (Port(80, 9090),)}
    assert endpoint_ports(snap, DB_HOST) == {"w2": ()}
    # w1 changes its ports, then moves to the other service.
    s.apply(addresses=named(wl("w1", "10.0.0.1", services={HOST: (Port(80, 7070),)})))
    assert endpoint_ports(s.snapshot(), HOST)["w1"] == (Port(80, 7070),)
    s.apply(addresses=named(wl("w1", "10.0.0.1", services={DB_HOST: (Port(5432, 5432),)})))
    snap = s.snapshot()
    assert endpoint_ports(snap, HOST) == {"w2": (Port(80, 9090),)}
    assert endpoint_ports(snap, DB_HOST) == {"w1": (Port(5432, 5432),), "w2": ()}
    # The endpoint carries the workload as it is now.
    (e,) = [e for e in snap.endpoints(DB_HOST) if e.workload.uid == "w1"]
    assert e.workload is snap.workloads["w1"]
    # Removing the service leaves what workloads say; removing workloads empties it.
    s.apply(removed_addresses=[HOST])
    assert endpoint_ports(s.snapshot(), HOST) == {"w2": (Port(80, 9090),)}
    s.apply(removed_addresses=["w1", "w2"])
    assert s.snapshot().endpoints(HOST) == () and s.snapshot().endpoints(DB_HOST) == ()


# --- authorizations ------------------------------------------------------------------------


def test_policy_selection() -> None:
    s = ProxyState()
    s.apply(
        authorizations=[
            auth("istio-system/mesh", Scope.GLOBAL),
            auth("shop/ns", Scope.NAMESPACE),
            auth("other/ns", Scope.NAMESPACE),
            auth("shop/listed"),
            auth("shop/unlisted"),
        ]
    )
    web = wl("w1", policies=("shop/listed", "shop/later", "istio-system/mesh"))
    other = wl("o1", ns="other")
    snap = s.snapshot()
    assert set(snap.policy_keys_for(web)) == {"istio-system/mesh", "shop/ns", "shop/listed", "shop/later"}
    assert len(snap.policy_keys_for(web)) == 4  # each once, though listed and global
    assert {a.key for a in snap.policies_for(web)} == {"istio-system/mesh", "shop/ns", "shop/listed"}
    assert snap.missing_policies(web) == ("shop/later",)
    assert {a.key for a in snap.policies_for(other)} == {"istio-system/mesh", "other/ns"}
    assert snap.missing_policies(other) == ()

    # The listed policy arrives; a namespace policy becomes a selector policy; one is removed.
    s.apply(
        authorizations=[auth("shop/later"), auth("shop/ns", Scope.WORKLOAD_SELECTOR)],
        removed_authorizations=["istio-system/mesh"],
    )
    snap = s.snapshot()
    assert {a.key for a in snap.policies_for(web)} == {"shop/listed", "shop/later"}
    assert snap.missing_policies(web) == ("istio-system/mesh",)
    assert {a.key for a in snap.policies_for(other)} == {"other/ns"}
    assert set(snap.authorizations) == {"other/ns", "shop/listed", "shop/unlisted", "shop/later", "shop/ns"}


# --- versions, subscribers, snapshots ------------------------------------------------------


def test_version_grows_only_on_change() -> None:
    s = ProxyState()
    w, a = wl("w1", "10.0.0.1"), auth("shop/p")
    assert s.apply(addresses=named(w)) and s.version == 1
    assert not s.apply(addresses=named(w)) and s.version == 1  # same value
    assert not s.apply() and s.version == 1
    assert not s.apply(removed_addresses=["nobody"], removed_authorizations=["shop/nothing"])
    assert s.version == 1
    assert s.apply(authorizations=[a]) and s.version == 2
    assert not s.apply(authorizations=[auth("shop/p")]) and s.version == 2  # equal, not identical
    assert s.apply(addresses=named(wl("w1", "10.0.0.2")), authorizations=[auth("shop/q")])
    assert s.version == 3  # one batch, one step
    assert s.apply(removed_authorizations=["shop/p"]) and s.version == 4
    assert s.snapshot().version == 4


def test_subscribers_are_called_after_each_change() -> None:
    s = ProxyState()
    seen: list[tuple[int, int]] = []

    def broken(version: int) -> None:
        raise RuntimeError("subscriber bug")

    s.subscribe(broken)
    stop = s.subscribe(lambda v: seen.append((v, s.snapshot().version)))
    with capture_logs() as logs:
        s.apply(addresses=named(wl("w1")))
    s.apply(addresses=named(wl("w1")))  # no change, no call
    s.apply(authorizations=[auth("shop/p")])
    # Called with the new version, when the new snapshot is already published.
    assert seen == [(1, 1), (2, 2)]
    assert any(e["event"] == "proxy state subscriber failed" for e in logs)
    stop()
    s.apply(removed_authorizations=["shop/p"])
    assert seen == [(1, 1), (2, 2)]


def test_snapshots_are_unaffected_by_later_writes() -> None:
    s = ProxyState()
    s.apply(
        addresses=named(wl("w1", "10.0.0.1", services={HOST: (Port(80, 8080),)}), svc("web", "10.96.0.1")),
        authorizations=[auth("shop/ns", Scope.NAMESPACE)],
    )
    before = s.snapshot()
    s.apply(
        addresses=named(wl("w1", "10.0.0.2", services={DB_HOST: ()}), svc("web", "10.96.0.9")),
        removed_authorizations=["shop/ns"],
    )
    s.apply(addresses=named(wl("w2", "10.0.0.1")))
    assert before.version == 1
    assert before.workloads["w1"].addresses == ("10.0.0.1",)
    assert before.workload_by_ip("10.0.0.1") == before.workloads["w1"]
    assert before.workload_by_ip("10.0.0.2") is None
    assert before.service_by_address("10.96.0.1", 80) is not None
    assert set(endpoint_ports(before, HOST)) == {"w1"} and before.endpoints(DB_HOST) == ()
    assert [a.key for a in before.policies_for(wl("x"))] == ["shop/ns"]
    # And nobody can change them behind the writer's back.
    with pytest.raises(TypeError):
        before.workloads["w9"] = wl("w9")  # type: ignore[index]
    with pytest.raises(TypeError):
        before.authorizations["shop/x"] = auth("shop/x")  # type: ignore[index]


# --- the incremental indexes equal a rebuild from scratch ------------------------------------

NAMES = [f"shop/n{i}" for i in range(4)]  # a name may hold a workload or a service
AUTH_KEYS = ["istio-system/g", "shop/a", "shop/b", "other/c"]
VIPS = ["10.96.0.1", "10.96.0.2", "10.96.0.3"]
PORTS = [Port(80, 8080), Port(80, 9090), Port(443, 0)]
# (addresses, removed_addresses, authorizations, removed_authorizations) of one apply
Batch = tuple[list[tuple[str, Address]], list[str], list[Authorization], list[str]]


@dataclass
class Reference:
    """The obvious model: plain dicts, every lookup computed from them on demand."""

    workloads: dict[str, Workload] = field(default_factory=dict)
    services: dict[str, Service] = field(default_factory=dict)
    auths: dict[str, Authorization] = field(default_factory=dict)
    claimed: dict[str, int] = field(default_factory=dict)  # uid -> when it last changed
    clock: int = 0

    def apply(
        self,
        addresses: list[tuple[str, Address]],
        removed: list[str],
        authorizations: list[Authorization],
        removed_auths: list[str],
    ) -> bool:
        before = (dict(self.workloads), dict(self.services), dict(self.auths))
        for name in removed:
            self.workloads.pop(name, None)
            self.services.pop(name, None)
        for name, value in addresses:
            if isinstance(value, Workload):
                if self.workloads.get(name) == value:
                    continue
                self.services.pop(name, None)
                self.workloads[name] = value
                self.clock += 1
                self.claimed[name] = self.clock
            else:
                if self.services.get(name) == value:
                    continue
                self.workloads.pop(name, None)
                self.services[name] = value
        for key in removed_auths:
            self.auths.pop(key, None)
        for a in authorizations:
            self.auths[a.key] = a
        return before != (self.workloads, self.services, self.auths)

    def workload_by_ip(self, ip: str) -> Workload | None:
        """The most recently changed workload that claims ``ip``: "the newer wins"."""
        owners = [w for w in self.workloads.values() if ip in w.addresses]
        return max(owners, key=lambda w: self.claimed[w.uid], default=None)

    def services_by_vip(self, vip: str) -> list[str]:
        return sorted(k for k, s in self.services.items() if vip in s.vips)

    def endpoints(self, key: str) -> dict[str, tuple[Port, ...]]:
        return {uid: w.services[key] for uid, w in self.workloads.items() if key in w.services}

    def policy_keys_for(self, w: Workload) -> set[str]:
        scoped = {
            k
            for k, a in self.auths.items()
            if a.scope is Scope.GLOBAL or (a.scope is Scope.NAMESPACE and a.namespace == w.namespace)
        }
        return scoped | set(w.authorization_policies)


def workloads_for(name: str, shared_ips: bool) -> st.SearchStrategy[Workload]:
    i = NAMES.index(name)
    ips = [f"10.0.0.{j}" for j in range(3)] if shared_ips else [f"10.0.{i}.{j}" for j in range(3)]
    return st.builds(
        Workload,
        uid=st.just(name),
        name=st.just(name),
        namespace=st.sampled_from(["shop", "other"]),
        addresses=st.lists(st.sampled_from(ips), max_size=2, unique=True).map(tuple),
        services=st.dictionaries(
            st.sampled_from(NAMES), st.lists(st.sampled_from(PORTS), max_size=2).map(tuple)
        ),
        authorization_policies=st.lists(st.sampled_from(AUTH_KEYS), max_size=2, unique=True).map(tuple),
    )


def services_for(name: str) -> st.SearchStrategy[Service]:
    ns, short = name.split("/")
    return st.builds(
        Service,
        name=st.just(short),
        namespace=st.just(ns),
        hostname=st.just(short),  # key == name
        vips=st.lists(st.sampled_from(VIPS), max_size=2, unique=True).map(tuple),
        ports=st.lists(st.sampled_from(PORTS), max_size=2).map(tuple),
    )


@st.composite
def batches(draw: st.DrawFn, shared_ips: bool) -> Batch:
    """One response pair, as the client applies it: no name both upserted and removed, none twice."""
    upserted = draw(st.lists(st.sampled_from(NAMES), max_size=3, unique=True))
    removed = draw(
        st.lists(st.sampled_from([n for n in NAMES if n not in upserted]), max_size=2, unique=True)
    )
    addresses: list[tuple[str, Address]] = []
    for name in upserted:
        value: Address = draw(st.one_of(workloads_for(name, shared_ips), services_for(name)))
        addresses.append((name, value))
    auth_keys = draw(st.lists(st.sampled_from(AUTH_KEYS), max_size=2, unique=True))
    removed_auths = draw(st.lists(st.sampled_from([k for k in AUTH_KEYS if k not in auth_keys]), max_size=2))
    auths = [auth(k, draw(st.sampled_from(list(Scope)))) for k in auth_keys]
    return addresses, removed, auths, removed_auths


def check_against(ref: Reference, snap: ProxySnapshot, *, ips: list[str]) -> None:
    assert dict(snap.workloads) == ref.workloads
    assert dict(snap.services) == ref.services
    assert dict(snap.authorizations) == ref.auths
    for vip in VIPS:
        assert [x.key for x in snap.services_by_vip(vip)] == ref.services_by_vip(vip), vip
    for key in NAMES:
        eps = snap.endpoints(key)
        assert {e.workload.uid: e.ports for e in eps} == ref.endpoints(key), key
        assert all(e.workload is snap.workloads[e.workload.uid] for e in eps)
    for w in ref.workloads.values():
        keys = snap.policy_keys_for(w)
        assert len(keys) == len(set(keys)) and set(keys) == ref.policy_keys_for(w), w.uid
        assert set(snap.missing_policies(w)) == {k for k in w.authorization_policies if k not in ref.auths}
    for ip in ips:
        assert snap.workload_by_ip(ip) == ref.workload_by_ip(ip), ip


ALL_OWN_IPS = [f"10.0.{i}.{j}" for i in range(len(NAMES)) for j in range(3)]


@settings(max_examples=150)
@given(st.lists(batches(shared_ips=False), max_size=8))
def test_incremental_indexes_equal_a_rebuild(
    steps: list[Batch],
) -> None:
    """Every IP claimed by one workload at most; everything else as it comes."""
    s, ref = ProxyState(), Reference()
    snapshots: list[tuple[ProxySnapshot, Reference]] = []
    for addresses, removed, auths, removed_auths in steps:
        version = s.version
        changed = ref.apply(addresses, removed, auths, removed_auths)
        assert (
            s.apply(
                addresses=addresses,
                removed_addresses=removed,
                authorizations=auths,
                removed_authorizations=removed_auths,
            )
            is changed
        )
        assert s.version == version + changed
        check_against(ref, s.snapshot(), ips=ALL_OWN_IPS)
        snapshots.append(
            (
                s.snapshot(),
                Reference(dict(ref.workloads), dict(ref.services), dict(ref.auths), dict(ref.claimed)),
            )
        )
    for snap, then in snapshots:  # and every earlier snapshot still shows its own moment
        check_against(then, snap, ips=ALL_OWN_IPS)


@settings(max_examples=150)
@given(st.lists(batches(shared_ips=True), max_size=8))
def test_ip_index_with_shared_ips_equals_a_rebuild(
    steps: list[Batch],
) -> None:
    """Workloads contend for three IPs: each IP goes to its newest live claimant."""
    s, ref = ProxyState(), Reference()
    for addresses, removed, auths, removed_auths in steps:
        ref.apply(addresses, removed, auths, removed_auths)
        with capture_logs():  # the contention warnings, many per example
            s.apply(
                addresses=addresses,
                removed_addresses=removed,
                authorizations=auths,
                removed_authorizations=removed_auths,
            )
        check_against(ref, s.snapshot(), ips=[f"10.0.0.{j}" for j in range(3)])
