"""L4 authorization as a node proxy receives it over discovery (``istio.security.Authorization``).

The wire form (``istio.security.Authorization``) is a mutable protobuf message; readers of the
mesh state share objects between tasks without copying, so the client turns each one into the
frozen values below at the edge. They mirror the wire form one to one (rules -> clauses ->
matches), not the Kubernetes CRD: the control plane has already lowered the CRD to what L4 can
enforce, and the proxy evaluates exactly what it was sent. A node proxy keeps them in its :class:`~mesh.xds.state.ProxyState` and evaluates them with
:mod:`mesh.authz`.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass

from mesh.model.frozen import tuple_fields

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

    An empty Match matches **no** connection (Istio's ztunnel skips it): it is what a part of a
    policy made only of L7 attributes becomes at L4. Without a peer identity (plaintext) no
    positive principal, namespace or service-account field matches and every ``not_`` one does.
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
    """Matches ORed. A clause without matches matches everything; one made only of empty
    matches matches nothing."""

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
    """One L4 policy. Rules ORed; a policy without rules matches nothing: an ALLOW without
    rules allows nothing (fail closed), a DENY without rules denies nothing."""

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
