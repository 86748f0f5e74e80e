"""The lookup indexes of a :class:`~mesh.model.snapshot.Snapshot`, and how to keep them current.

Each index is built in full from one snapshot's objects, or updated from the previous
snapshot's for a change that touched few workloads and services (the workload indexes for
the workloads, the service indexes for the services, the endpoint index for either: a pod
against its namespace's selecting services, a service's selector through a label index); the
two must always agree (tests/model/test_store_perf_shape.py checks that they do). Immutable
once built, like the snapshot that holds them.
"""

from __future__ import annotations

from bisect import bisect_left
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


def _same_labels(a: Workload, b: Workload) -> bool:
    return a.namespace == b.namespace and a.labels == b.labels


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


def _by_key(s: Service) -> str:
    return s.key


@dataclass(frozen=True, slots=True)
class ServiceIndexes:
    by_address: Mapping[tuple[str, int], Service]
    by_vip: Mapping[str, tuple[Service, ...]]  # every service with the VIP, by key
    by_hostname: Mapping[str, Service]
    # Every claimant (sorted keys) of a hostname; the smallest key wins, as for pod names.
    hostname_claims: Mapping[str, tuple[str, ...]]

    @classmethod
    def build(cls, services: Mapping[str, Service]) -> ServiceIndexes:
        by_address: dict[tuple[str, int], Service] = {}
        by_vip: defaultdict[str, list[Service]] = defaultdict(list)
        by_hostname: dict[str, Service] = {}
        hostname_claims: defaultdict[str, list[str]] = defaultdict(list)
        for key in sorted(services):
            s = services[key]
            by_hostname.setdefault(s.hostname, s)
            hostname_claims[s.hostname].append(key)
            for vip in s.vips:
                by_vip[vip].append(s)
                for p in s.ports:
                    by_address.setdefault((vip, p.port), s)
        return cls(
            by_address=MappingProxyType(by_address),
            by_vip=MappingProxyType({v: tuple(ss) for v, ss in by_vip.items()}),
            by_hostname=MappingProxyType(by_hostname),
            hostname_claims=MappingProxyType({h: tuple(ks) for h, ks in hostname_claims.items()}),
        )

    def updated(
        self,
        before: Mapping[str, Service],
        after: Mapping[str, Service],
        touched: Iterable[str],
    ) -> ServiceIndexes:
        """The indexes of ``after``, given that it differs from ``before`` only in ``touched``.

        Equal to ``build(after)``: only the VIPs, addresses and hostnames the touched services
        had or have are recomputed. The owner of ``vip:port`` is the first service (by key) of
        ``by_vip[vip]`` with that port, which is what a build's first-wins pass picks too.
        """
        by_address = mutable_copy(self.by_address)
        by_vip = mutable_copy(self.by_vip)
        by_hostname = mutable_copy(self.by_hostname)
        hostname_claims = mutable_copy(self.hostname_claims)
        touched_set = set(touched)
        vips: set[str] = set()
        addresses: set[tuple[str, int]] = set()
        hostnames: set[str] = set()
        for key in touched_set:
            for s, add in ((before.get(key), False), (after.get(key), True)):
                if s is None:
                    continue
                (_claims_added if add else _claims_removed)(hostname_claims, s.hostname, key)
                hostnames.add(s.hostname)
                for vip in s.vips:
                    vips.add(vip)
                    addresses.update((vip, p.port) for p in s.ports)
        for hostname in hostnames:
            owners = hostname_claims.get(hostname)
            if owners:
                by_hostname[hostname] = after[owners[0]]
            else:
                by_hostname.pop(hostname, None)
        for vip in vips:
            on_vip = [s for s in self.by_vip.get(vip, ()) if s.key not in touched_set]
            # A service listing a VIP twice is there twice, as in a build.
            on_vip += (s for k in touched_set if (s := after.get(k)) is not None for v in s.vips if v == vip)
            if on_vip:
                on_vip.sort(key=_by_key)  # stable: a service's duplicates stay together
                by_vip[vip] = tuple(on_vip)
            else:
                by_vip.pop(vip, None)
        for vip, port in addresses:
            owner = next((s for s in by_vip.get(vip, ()) if any(p.port == port for p in s.ports)), None)
            if owner is not None:
                by_address[(vip, port)] = owner
            else:
                by_address.pop((vip, port), None)
        return ServiceIndexes(
            by_address=MappingProxyType(by_address),
            by_vip=MappingProxyType(by_vip),
            by_hostname=MappingProxyType(by_hostname),
            hostname_claims=MappingProxyType(hostname_claims),
        )


_NO_UIDS: tuple[str, ...] = ()
# Sorted tuples, not sets: most label values (pod-template-hash) have one pod, and a tuple of
# one costs 48 bytes where a frozenset costs 216 (10,000 pods: ~2 MiB less).
_LabelIndex = Mapping[str, Mapping[tuple[str, str], tuple[str, ...]]]


def _selected(s: Service, labelled: _LabelIndex, workloads: Mapping[str, Workload]) -> tuple[Workload, ...]:
    """The workloads ``s`` selects, by uid: those of its namespace with the rarest of its
    selector's labels that ``Service.selects`` accepts (all of them for a one-label selector)."""
    if not s.selector:
        return ()
    in_namespace = labelled.get(s.namespace)
    if in_namespace is None:
        return ()
    candidates = min((in_namespace.get(item, _NO_UIDS) for item in s.selector.items()), key=len)
    if len(s.selector) == 1:
        return tuple(workloads[u] for u in candidates)
    return tuple(w for u in candidates if s.selects(w := workloads[u]))


_MAX_SPLICES = 16  # above this many uids for one label, a sort is cheaper


def _posting_updated(uids: tuple[str, ...], lost: set[str], gained: set[str]) -> tuple[str, ...]:
    """``uids`` (sorted) without ``lost`` and with ``gained``, still sorted: a splice per uid
    (a memmove, however many pods carry the label) rather than a sort."""
    if len(lost) + len(gained) > _MAX_SPLICES:
        return tuple(sorted((set(uids) - lost) | gained))
    result = list(uids)
    for uid in lost - gained:
        i = bisect_left(result, uid)
        if i < len(result) and result[i] == uid:
            del result[i]
    for uid in gained:
        i = bisect_left(result, uid)
        if i == len(result) or result[i] != uid:
            result.insert(i, uid)
    return tuple(result)


@dataclass(frozen=True, slots=True)
class EndpointIndexes:
    endpoints: Mapping[str, tuple[Workload, ...]]  # service key -> selected workloads
    services_of: Mapping[str, tuple[Service, ...]]  # workload uid -> services selecting it
    # namespace -> its services that have a selector, by key: the only candidates for a pod.
    selecting: Mapping[str, tuple[Service, ...]]
    # namespace -> (label, value) -> uids of its workloads carrying it: a selector's pods are
    # the intersection of its labels' sets, without looking at the namespace's other pods.
    labelled: _LabelIndex

    @classmethod
    def build(cls, services: Mapping[str, Service], workloads: Mapping[str, Workload]) -> EndpointIndexes:
        lists: defaultdict[str, defaultdict[tuple[str, str], list[str]]] = defaultdict(
            lambda: defaultdict(list)
        )
        for uid in sorted(workloads):
            w = workloads[uid]
            if w.labels:
                in_namespace = lists[w.namespace]
                for item in w.labels.items():
                    in_namespace[item].append(uid)
        labelled: _LabelIndex = MappingProxyType(
            {
                ns: MappingProxyType({item: tuple(uids) for item, uids in items.items()})
                for ns, items in lists.items()
            }
        )
        endpoints: dict[str, tuple[Workload, ...]] = {}
        services_of: defaultdict[str, list[Service]] = defaultdict(list)
        selecting: defaultdict[str, list[Service]] = defaultdict(list)
        for key in sorted(services):
            s = services[key]
            if not s.selector:
                continue
            selecting[s.namespace].append(s)
            selected = _selected(s, labelled, workloads)
            if selected:
                endpoints[key] = selected
            for w in selected:
                services_of[w.uid].append(s)
        return cls(
            endpoints=MappingProxyType(endpoints),
            services_of=MappingProxyType({u: tuple(ss) for u, ss in services_of.items()}),
            selecting=MappingProxyType({ns: tuple(ss) for ns, ss in selecting.items()}),
            labelled=labelled,
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
            labelled=self._labels_updated(before, after, touched_set),
        )

    def _labels_updated(
        self, before: Mapping[str, Workload], after: Mapping[str, Workload], touched: set[str]
    ) -> _LabelIndex:
        gained: defaultdict[tuple[str, tuple[str, str]], set[str]] = defaultdict(set)
        lost: defaultdict[tuple[str, tuple[str, str]], set[str]] = defaultdict(set)
        for uid in touched:
            old, new = before.get(uid), after.get(uid)
            if old is not None and new is not None and _same_labels(old, new):
                continue  # most pod updates (an IP, a status): nothing to do
            if old is not None:
                for item in old.labels.items():
                    lost[(old.namespace, item)].add(uid)
            if new is not None:
                for item in new.labels.items():
                    gained[(new.namespace, item)].add(uid)
        if not gained and not lost:
            return self.labelled
        labelled = mutable_copy(self.labelled)
        copied: dict[str, dict[tuple[str, str], tuple[str, ...]]] = {}
        for ns, item in gained.keys() | lost.keys():
            in_namespace = copied.get(ns)
            if in_namespace is None:
                in_namespace = copied[ns] = mutable_copy(self.labelled.get(ns, {}))
            uids = _posting_updated(
                in_namespace.get(item, _NO_UIDS), lost.get((ns, item), set()), gained.get((ns, item), set())
            )
            if uids:
                in_namespace[item] = uids
            else:
                in_namespace.pop(item, None)
        for ns, in_namespace in copied.items():
            if in_namespace:
                labelled[ns] = MappingProxyType(in_namespace)
            else:
                labelled.pop(ns, None)
        return MappingProxyType(labelled)

    def services_updated(
        self,
        before: Mapping[str, Service],
        after: Mapping[str, Service],
        touched: Iterable[str],
        workloads: Mapping[str, Workload],
    ) -> EndpointIndexes:
        """The indexes for ``after`` (same ``workloads`` as these indexes were made for), which
        differs from ``before`` only in ``touched``: only the touched services' selectors are
        evaluated, through the label index, and only the pods they selected or select have
        their services recomputed. Equal to a full ``build``."""
        endpoints = mutable_copy(self.endpoints)
        services_of = mutable_copy(self.services_of)
        touched_set = set(touched)
        namespaces: set[str] = set()
        pods: set[str] = set()  # selected before or now by a touched service
        selected_by: defaultdict[str, list[Service]] = defaultdict(list)  # uid -> touched services now
        for key in touched_set:
            old, new = before.get(key), after.get(key)
            if old is not None and old.selector:
                namespaces.add(old.namespace)
            pods.update(w.uid for w in self.endpoints.get(key, ()))
            selected = _selected(new, self.labelled, workloads) if new is not None else ()
            if selected:
                endpoints[key] = selected
            else:
                endpoints.pop(key, None)
            if new is not None and new.selector:
                namespaces.add(new.namespace)
                for w in selected:
                    pods.add(w.uid)
                    selected_by[w.uid].append(new)
        for uid in pods:
            services = [s for s in self.services_of.get(uid, ()) if s.key not in touched_set]
            services += selected_by.get(uid, ())
            if services:
                services.sort(key=_by_key)
                services_of[uid] = tuple(services)
            else:
                services_of.pop(uid, None)
        selecting = mutable_copy(self.selecting)
        for ns in namespaces:
            in_namespace = [s for s in self.selecting.get(ns, ()) if s.key not in touched_set]
            in_namespace += (
                s for k in touched_set if (s := after.get(k)) is not None and s.selector and s.namespace == ns
            )
            if in_namespace:
                in_namespace.sort(key=_by_key)
                selecting[ns] = tuple(in_namespace)
            else:
                selecting.pop(ns, None)
        return EndpointIndexes(
            endpoints=MappingProxyType(endpoints),
            services_of=MappingProxyType(services_of),
            selecting=MappingProxyType(selecting),
            labelled=self.labelled,
        )
