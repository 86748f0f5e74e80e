"""L4 authorization as a node proxy receives it over discovery, and the holder that keeps it.

The wire form (``istio.security.Authorization``) is a mutable protobuf message; readers of the
mesh state share objects between tasks without copying, so the client turns each one into the
frozen values below at the edge. They mirror the wire form one to one (rules -> clauses ->
matches), not the Kubernetes CRD: the control plane has already lowered the CRD to what L4 can
enforce, and the proxy evaluates exactly what it was sent.

The :class:`~mesh.model.Store` has no kind for these (its policy kinds are the CRDs), so a
client keeps them in an :class:`AuthorizationStore`: the same idea in small (atomic batches,
a version that only grows, read-only snapshots, change callbacks).
"""

from __future__ import annotations

import enum
import ipaddress
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import structlog

from mesh.model.frozen import tuple_fields
from mesh.subscribers import Subscribers

log = structlog.get_logger(__name__)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Scope(enum.StrEnum):
    """Which workloads a policy binds to; mirrors ``istio.security.Scope``."""

    GLOBAL = "GLOBAL"  # every workload of the mesh (root-namespace policy without selector)
    NAMESPACE = "NAMESPACE"  # every workload of ``namespace``
    WORKLOAD_SELECTOR = "WORKLOAD_SELECTOR"  # workloads naming it in ``authorization_policies``


class Action(enum.StrEnum):
    ALLOW = "ALLOW"
    DENY = "DENY"


class MatchKind(enum.StrEnum):
    EXACT = "exact"
    PREFIX = "prefix"
    SUFFIX = "suffix"
    PRESENCE = "presence"  # any non-empty value; ``value`` is ""


@dataclass(frozen=True, slots=True)
class StringMatch:
    kind: MatchKind
    value: str = ""

    @classmethod
    def parse(cls, pattern: str) -> StringMatch:
        """Istio's pattern syntax: ``*`` presence, ``abc*`` prefix, ``*abc`` suffix, else exact."""
        if pattern == "*":
            return cls(MatchKind.PRESENCE)
        if pattern.endswith("*"):
            return cls(MatchKind.PREFIX, pattern[:-1])
        if pattern.startswith("*"):
            return cls(MatchKind.SUFFIX, pattern[1:])
        return cls(MatchKind.EXACT, pattern)

    def matches(self, value: str) -> bool:
        if self.kind is MatchKind.PRESENCE:
            return bool(value)
        if self.kind is MatchKind.PREFIX:
            return value.startswith(self.value)
        if self.kind is MatchKind.SUFFIX:
            return value.endswith(self.value)
        return value == self.value


@dataclass(frozen=True, slots=True)
class ServiceAccountMatch:
    namespace: str
    service_account: str


@dataclass(frozen=True, slots=True)
class Match:
    """Populated fields ANDed, values of one field ORed, a ``not_`` field matches when none does.

    An empty Match matches every connection.
    """

    namespaces: tuple[StringMatch, ...] = ()
    not_namespaces: tuple[StringMatch, ...] = ()
    principals: tuple[StringMatch, ...] = ()
    not_principals: tuple[StringMatch, ...] = ()
    source_ips: tuple[IPNetwork, ...] = ()
    not_source_ips: tuple[IPNetwork, ...] = ()
    destination_ips: tuple[IPNetwork, ...] = ()
    not_destination_ips: tuple[IPNetwork, ...] = ()
    destination_ports: tuple[int, ...] = ()
    not_destination_ports: tuple[int, ...] = ()
    service_accounts: tuple[ServiceAccountMatch, ...] = ()
    not_service_accounts: tuple[ServiceAccountMatch, ...] = ()

    def __post_init__(self) -> None:
        tuple_fields(
            self,
            "namespaces",
            "not_namespaces",
            "principals",
            "not_principals",
            "source_ips",
            "not_source_ips",
            "destination_ips",
            "not_destination_ips",
            "destination_ports",
            "not_destination_ports",
            "service_accounts",
            "not_service_accounts",
        )


@dataclass(frozen=True, slots=True)
class Clause:
    """Matches ORed."""

    matches: tuple[Match, ...] = ()

    def __post_init__(self) -> None:
        tuple_fields(self, "matches")


@dataclass(frozen=True, slots=True)
class Rule:
    """Clauses ANDed; a rule without clauses matches everything."""

    clauses: tuple[Clause, ...] = ()

    def __post_init__(self) -> None:
        tuple_fields(self, "clauses")


@dataclass(frozen=True, slots=True)
class Authorization:
    """One L4 policy. Rules ORed; an ALLOW without rules allows nothing (fail closed)."""

    name: str
    namespace: str
    scope: Scope = Scope.WORKLOAD_SELECTOR
    action: Action = Action.ALLOW
    rules: tuple[Rule, ...] = ()
    dry_run: bool = False

    def __post_init__(self) -> None:
        tuple_fields(self, "rules")

    @property
    def key(self) -> str:
        """The xDS resource name, ``<namespace>/<name>``."""
        return f"{self.namespace}/{self.name}"


class AuthorizationStore:
    """The authorizations a discovery client holds, by ``namespace/name``.

    Written only by the discovery client, one response at a time, so a reader never sees half
    of a response; readers call :meth:`snapshot` and keep the mapping as long as they like.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._version = 0
        self._policies: Mapping[str, Authorization] = MappingProxyType({})
        self._subscribers: Subscribers[int] = Subscribers()

    @property
    def version(self) -> int:
        return self._version

    def snapshot(self) -> Mapping[str, Authorization]:
        return self._policies

    def apply(self, upserts: Iterable[Authorization] = (), deletes: Iterable[str] = ()) -> bool:
        """Upsert and delete in one step; returns whether anything changed."""
        with self._lock:
            new = dict(self._policies)
            for key in deletes:
                new.pop(key, None)
            for policy in upserts:
                new[policy.key] = policy
            if new == self._policies:
                return False
            self._policies = MappingProxyType(new)
            self._version += 1
            version, subscribers = self._version, self._subscribers.snapshot
        for callback in subscribers:
            try:
                callback(version)
            except Exception:
                log.exception("authorization subscriber failed", version=version)
        return True

    def subscribe(self, callback: Callable[[int], None]) -> Callable[[], None]:
        """Call ``callback(version)`` after every change; returns the function that stops it."""
        return self._subscribers.add(callback)
