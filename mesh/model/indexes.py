"""The lookup indexes of a :class:`~mesh.model.snapshot.Snapshot`, and how to keep them current.

Each index is built in full from one snapshot's objects, or, for the workload and endpoint
indexes, updated from the previous snapshot's for a change that touched few workloads; the
two must always agree (tests/model/test_store_perf_shape.py checks that they do). Immutable
once built, like the snapshot that holds them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TypeVar

from mesh.model.objects import Service, Workload

_T = TypeVar("_T")
_K = TypeVar("_K")


def mutable_copy(m: Mapping[_K, _T]) -> dict[_K, _T]:
    """A mutable copy; ``dict(proxy)`` walks a read-only view key by key, ``.copy()`` does not
    (some 25 times faster for the 10,000 entries of a large mesh)."""
    if isinstance(m, MappingProxyType | dict):
        return m.copy()
    return dict(m)


def _claims_removed(claims: dict[_K, tuple[str, ...]], key: _K, uid: str) -> None:
    rest = tuple(u for u in claims.get(key, ()) if u != uid)
    if rest:
        claims[key] = rest
    else:
        claims.pop(key, None)


def _claims_added(claims: dict[_K, tuple[str, ...]], key: _K, uid: str) -> None:
    held = claims.get(key, ())
    if uid not in held:
        claims[key] = tuple(sorted((*held, uid)))


def _by_uid(w: Workload) -> str:
    return w.uid


@dataclass(frozen=True, slots=True)
class WorkloadIndexes:
    by_ip: Mapping[str, Workload]
    by_name: Mapping[tuple[str, str], Workload]
    by_node: Mapping[str, tuple[Workload, ...]]
    # node -> namespace -> service account -> number of pods
    accounts: Mapping[str, Mapping[str, Mapping[str, int]]]
    # Every claimant (sorted uids) of an IP / a name, so that an incremental update can tell
    # who wins once the current winner goes away. The winner is always the smallest uid.
    ip_claims: Mapping[str, tuple[str, ...]]
    name_claims: Mapping[tuple[str, str], tuple[str, ...]]

    @classmethod
    def build(cls, workloads: Mapping[str, Workload]) -> WorkloadIndexes:
        by_ip: dict[str, Workload] = {}
        by_name: dict[tuple[str, str], Workload] = {}
        ip_claims: defaultdict[str, list[str]] = defaultdict(list)
        name_claims: defaultdict[tuple[str, str], list[str]] = defaultdict(list)
        by_node: defaultdict[str, list[Workload]] = defaultdict(list)
        counts: defaultdict[str, defaultdict[str, defaultdict[str, int]]] = defaultdict(
            lambda: defaultdict(lambda: defaultdict(int))
        )
        # Sorted so that when two workloads claim one IP the winner does not depend on the
        # order things arrived in.
        for uid in sorted(workloads):
            w = workloads[uid]
            if not w.host_network:  # a hostNetwork pod shares its node's IP: not its identity
                for ip in w.ips:
                    by_ip.setdefault(ip, w)
                    claims = ip_claims[ip]
                    if not claims or claims[-1] != uid:
                        claims.append(uid)
            by_name.setdefault((w.namespace, w.name), w)
            name_claims[(w.namespace, w.name)].append(uid)
            if w.node:
                by_node[w.node].append(w)
                counts[w.node][w.namespace][w.service_account] += 1
        accounts = {
            node: MappingProxyType({ns: MappingProxyType(dict(sas)) for ns, sas in namespaces.items()})
            for node, namespaces in counts.items()
        }
        return cls(
            by_ip=MappingProxyType(by_ip),
            by_name=MappingProxyType(by_name),
            by_node=MappingProxyType({n: tuple(ws) for n, ws in by_node.items()}),
            accounts=MappingProxyType(accounts),
            ip_claims=MappingProxyType({ip: tuple(us) for ip, us in ip_claims.items()}),
            name_claims=MappingProxyType({n: tuple(us) for n, us in name_claims.items()}),
        )

    def updated(
        self,
        before: Mapping[str, Workload],
        after: Mapping[str, Workload],
        touched: Iterable[str],
    ) -> WorkloadIndexes:
        """The indexes of ``after``, given that it differs from ``before`` only in ``touched``.

        Equal (``==``) to ``build(after)``; costs O(touched) plus a copy of each top-level
        dictionary, instead of a pass over every workload.
        """
        by_ip = mutable_copy(self.by_ip)
        by_name = mutable_copy(self.by_name)
        ip_claims = mutable_copy(self.ip_claims)
        name_claims = mutable_copy(self.name_claims)
        ips: set[str] = set()
        names: set[tuple[str, str]] = set()
        nodes: set[str] = set()
        touched_set = set(touched)
        for uid in touched_set:
            for w, add in ((before.get(uid), False), (after.get(uid), True)):
                if w is None:
                    continue
                change = _claims_added if add else _claims_removed
                if not w.host_network:
                    for ip in w.ips:
                        change(ip_claims, ip, uid)
                        ips.add(ip)
                name = (w.namespace, w.name)
                change(name_claims, name, uid)
                names.add(name)
                if w.node:
                    nodes.add(w.node)
        for ip in ips:
            ip_owners = ip_claims.get(ip)
            if ip_owners:
                by_ip[ip] = after[ip_owners[0]]
            else:
                by_ip.pop(ip, None)
        for name in names:
            name_owners = name_claims.get(name)
            if name_owners:
                by_name[name] = after[name_owners[0]]
            else:
                by_name.pop(name, None)
        by_node = mutable_copy(self.by_node)
        accounts = mutable_copy(self.accounts)
        for node in nodes:
            on_node = [w for w in self.by_node.get(node, ()) if w.uid not in touched_set]
            on_node += (w for u in touched_set if (w := after.get(u)) is not None and w.node == node)
            if not on_node:
                by_node.pop(node, None)
                accounts.pop(node, None)
                continue
            on_node.sort(key=_by_uid)
            by_node[node] = tuple(on_node)
            counts: defaultdict[str, defaultdict[str, int]] = defaultdict(lambda: defaultdict(int))
            for w in on_node:
                counts[w.namespace][w.service_account] += 1
            accounts[node] = MappingProxyType({ns: MappingProxyType(dict(sas)) for ns, sas in counts.items()})
        return WorkloadIndexes(
            by_ip=MappingProxyType(by_ip),
            by_name=MappingProxyType(by_name),
            by_node=MappingProxyType(by_node),
            accounts=MappingProxyType(accounts),
            ip_claims=MappingProxyType(ip_claims),
            name_claims=MappingProxyType(name_claims),
        )


@dataclass(frozen=True, slots=True)
class ServiceIndexes:
    by_address: Mapping[tuple[str, int], Service]
    by_vip: Mapping[str, tuple[Service, ...]]
    by_hostname: Mapping[str, Service]

    @classmethod
    def build(cls, services: Mapping[str, Service]) -> ServiceIndexes:
        by_address: dict[tuple[str, int], Service] = {}
        by_vip: defaultdict[str, list[Service]] = defaultdict(list)
        by_hostname: dict[str, Service] = {}
        for key in sorted(services):
            s = services[key]
            by_hostname.setdefault(s.hostname, s)
            for vip in s.vips:
                by_vip[vip].append(s)
                for p in s.ports:
                    by_address.setdefault((vip, p.port), s)
        return cls(
            by_address=MappingProxyType(by_address),
            by_vip=MappingProxyType({v: tuple(ss) for v, ss in by_vip.items()}),
            by_hostname=MappingProxyType(by_hostname),
        )


@dataclass(frozen=True, slots=True)
class EndpointIndexes:
    endpoints: Mapping[str, tuple[Workload, ...]]  # service key -> selected workloads
    services_of: Mapping[str, tuple[Service, ...]]  # workload uid -> services selecting it
    # namespace -> its services that have a selector, by key: the only candidates for a pod.
    selecting: Mapping[str, tuple[Service, ...]]

    @classmethod
    def build(cls, services: Mapping[str, Service], workloads: Mapping[str, Workload]) -> EndpointIndexes:
        by_namespace: defaultdict[str, list[Workload]] = defaultdict(list)
        for uid in sorted(workloads):
            w = workloads[uid]
            by_namespace[w.namespace].append(w)
        endpoints: dict[str, tuple[Workload, ...]] = {}
        services_of: defaultdict[str, list[Service]] = defaultdict(list)
        selecting: defaultdict[str, list[Service]] = defaultdict(list)
        for key in sorted(services):
            s = services[key]
            if s.selector:
                selecting[s.namespace].append(s)
            selected = tuple(w for w in by_namespace.get(s.namespace, ()) if s.selects(w))
            if selected:
                endpoints[key] = selected
            for w in selected:
                services_of[w.uid].append(s)
        return cls(
            endpoints=MappingProxyType(endpoints),
            services_of=MappingProxyType({u: tuple(ss) for u, ss in services_of.items()}),
            selecting=MappingProxyType({ns: tuple(ss) for ns, ss in selecting.items()}),
        )

    def workloads_updated(
        self,
        before: Mapping[str, Workload],
        after: Mapping[str, Workload],
        touched: Iterable[str],
    ) -> EndpointIndexes:
        """The indexes for ``after`` (same services), which differs from ``before`` only in
        ``touched``: only the services that selected or now select a touched workload are
        looked at, instead of every service against every pod. Equal to a full ``build``."""
        endpoints = mutable_copy(self.endpoints)
        services_of = mutable_copy(self.services_of)
        touched_set = set(touched)
        affected: dict[str, Service] = {}
        for uid in touched_set:
            for s in self.services_of.get(uid, ()):
                affected[s.key] = s
            w = after.get(uid)
            selected = (
                tuple(s for s in self.selecting.get(w.namespace, ()) if s.selects(w)) if w is not None else ()
            )
            if selected:
                services_of[uid] = selected
                for s in selected:
                    affected[s.key] = s
            else:
                services_of.pop(uid, None)
        for key, s in affected.items():
            members = [w for w in self.endpoints.get(key, ()) if w.uid not in touched_set]
            members += (w for u in touched_set if (w := after.get(u)) is not None and s.selects(w))
            if members:
                members.sort(key=_by_uid)
                endpoints[key] = tuple(members)
            else:
                endpoints.pop(key, None)
        return EndpointIndexes(
            endpoints=MappingProxyType(endpoints),
            services_of=MappingProxyType(services_of),
            selecting=self.selecting,
        )
