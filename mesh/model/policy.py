"""Istio ``security.istio.io`` policies, as validated, typed values (see POLICY.md).

Field names follow the Istio API (snake_case; ``from`` is ``from_`` because it is a Python
keyword) so a reader can hold a YAML manifest next to the code. The shape keeps the
distinctions that change meaning: ``rules=()`` (``spec: {}``, an ALLOW that allows nothing)
is not ``rules=(Rule(),)`` (``rules: [{}]``, allow everything), and a selector of ``None``
(whole namespace) is not an empty one. Evaluation lives elsewhere; this is data.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import ClassVar, Protocol

from mesh.model.frozen import FrozenMap, freeze_fields, tuple_fields
from mesh.model.objects import Kind, namespaced_key

ROOT_NAMESPACE = "istio-system"  # policies here apply mesh-wide
# On an AuthorizationPolicy: "true" = evaluate and log, never enforce (Istio's dry-run).
ANNOTATION_DRY_RUN = "istio.io/dry-run"

# What of an AuthorizationPolicy a node proxy (L4) can evaluate; everything else needs a
# waypoint. Defined once here for the lowering (controlplane) and the status (sources).
L4_CONDITION_KEYS = frozenset(
    {"source.ip", "source.namespace", "source.principal", "destination.ip", "destination.port"}
)
# (field of the model, its name in the Istio API) of the source / operation fields only L7 has.
L7_SOURCE_FIELDS = (
    ("request_principals", "requestPrincipals"),
    ("not_request_principals", "notRequestPrincipals"),
    ("remote_ip_blocks", "remoteIpBlocks"),
    ("not_remote_ip_blocks", "notRemoteIpBlocks"),
)
L7_OPERATION_FIELDS = (
    ("hosts", "hosts"),
    ("not_hosts", "notHosts"),
    ("methods", "methods"),
    ("not_methods", "notMethods"),
    ("paths", "paths"),
    ("not_paths", "notPaths"),
)

_NO_LABELS: FrozenMap[str, str] = FrozenMap()
_NO_PORT_MTLS: FrozenMap[int, MtlsMode] = FrozenMap()
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class WorkloadSelector:
    """``selector.matchLabels``. Every listed label must be present with that value."""

    match_labels: Mapping[str, str] = _NO_LABELS

    def __post_init__(self) -> None:
        freeze_fields(self, "match_labels")

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.match_labels.items())


@dataclass(frozen=True, slots=True)
class PolicyTargetRef:
    """One of ``targetRefs``: binds a policy to a Gateway (waypoint) or Service."""

    kind: str
    name: str
    group: str = ""
    namespace: str = ""  # empty: the policy's own namespace


class MtlsMode(enum.StrEnum):
    UNSET = "UNSET"  # inherit from the namespace / mesh policy
    DISABLE = "DISABLE"  # not supported in ambient: the control plane logs and ignores it
    PERMISSIVE = "PERMISSIVE"
    STRICT = "STRICT"


@dataclass(frozen=True, slots=True)
class PeerAuthentication:
    KIND: ClassVar[Kind] = Kind.PEER_AUTHENTICATION

    namespace: str
    name: str
    selector: WorkloadSelector | None = None
    mtls_mode: MtlsMode = MtlsMode.UNSET  # spec.mtls.mode
    port_level_mtls: Mapping[int, MtlsMode] = _NO_PORT_MTLS  # spec.portLevelMtls
    creation_timestamp: datetime | None = None

    def __post_init__(self) -> None:
        freeze_fields(self, "port_level_mtls")

    @property
    def key(self) -> str:
        return namespaced_key(self.namespace, self.name)


class AuthorizationAction(enum.StrEnum):
    ALLOW = "ALLOW"
    DENY = "DENY"
    AUDIT = "AUDIT"
    CUSTOM = "CUSTOM"


@dataclass(frozen=True, slots=True)
class Source:
    """``rules[].from[].source``; fields ANDed, values of one field ORed."""

    principals: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()
    request_principals: tuple[str, ...] = ()
    not_request_principals: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    not_namespaces: tuple[str, ...] = ()
    service_accounts: tuple[str, ...] = ()  # "<namespace>/<name>" (a bare name gets the policy's)
    not_service_accounts: tuple[str, ...] = ()
    ip_blocks: tuple[str, ...] = ()  # normalised CIDRs, "10.0.0.0/8", "10.0.1.2/32"
    not_ip_blocks: tuple[str, ...] = ()
    remote_ip_blocks: tuple[str, ...] = ()
    not_remote_ip_blocks: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        tuple_fields(
            self,
            "principals",
            "not_principals",
            "request_principals",
            "not_request_principals",
            "namespaces",
            "not_namespaces",
            "service_accounts",
            "not_service_accounts",
            "ip_blocks",
            "not_ip_blocks",
            "remote_ip_blocks",
            "not_remote_ip_blocks",
        )


@dataclass(frozen=True, slots=True)
class Operation:
    """``rules[].to[].operation``. Only ports are L4; the rest need a waypoint."""

    hosts: tuple[str, ...] = ()
    not_hosts: tuple[str, ...] = ()
    ports: tuple[int, ...] = ()
    not_ports: tuple[int, ...] = ()
    methods: tuple[str, ...] = ()
    not_methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    not_paths: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        tuple_fields(
            self,
            "hosts",
            "not_hosts",
            "ports",
            "not_ports",
            "methods",
            "not_methods",
            "paths",
            "not_paths",
        )


@dataclass(frozen=True, slots=True)
class Condition:
    """``rules[].when[]``: ``key`` with ``values`` / ``notValues``."""

    key: str
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        tuple_fields(self, "values", "not_values")


@dataclass(frozen=True, slots=True)
class RuleFrom:
    source: Source = Source()


@dataclass(frozen=True, slots=True)
class RuleTo:
    operation: Operation = Operation()


@dataclass(frozen=True, slots=True)
class Rule:
    """One of ``rules[]``: ``from``, ``to`` and ``when`` ANDed; an empty rule matches all."""

    from_: tuple[RuleFrom, ...] = ()
    to: tuple[RuleTo, ...] = ()
    when: tuple[Condition, ...] = ()

    def __post_init__(self) -> None:
        tuple_fields(self, "from_", "to", "when")


@dataclass(frozen=True, slots=True)
class AuthorizationPolicy:
    KIND: ClassVar[Kind] = Kind.AUTHORIZATION_POLICY

    namespace: str
    name: str
    selector: WorkloadSelector | None = None
    target_refs: tuple[PolicyTargetRef, ...] = ()
    action: AuthorizationAction = AuthorizationAction.ALLOW
    provider: str | None = None  # provider.name, CUSTOM only
    rules: tuple[Rule, ...] = ()
    creation_timestamp: datetime | None = None
    dry_run: bool = False  # annotation istio.io/dry-run: evaluated and logged, never enforced

    def __post_init__(self) -> None:
        tuple_fields(self, "target_refs", "rules")

    @property
    def key(self) -> str:
        return namespaced_key(self.namespace, self.name)


@dataclass(frozen=True, slots=True)
class JwtHeader:
    """``jwtRules[].fromHeaders[]``: where to find the token, and its prefix (``Bearer ``)."""

    name: str
    prefix: str = ""


@dataclass(frozen=True, slots=True)
class ClaimToHeader:
    header: str
    claim: str


@dataclass(frozen=True, slots=True)
class JwtRule:
    issuer: str
    audiences: tuple[str, ...] = ()
    jwks_uri: str = ""
    jwks: str = ""  # inline JWKS document, instead of jwks_uri
    from_headers: tuple[JwtHeader, ...] = ()
    from_params: tuple[str, ...] = ()
    forward_original_token: bool = False
    output_payload_to_header: str = ""
    output_claim_to_headers: tuple[ClaimToHeader, ...] = ()
    from_cookies: tuple[str, ...] = ()
    timeout: float | None = None  # seconds; for fetching jwks_uri (default: the control plane's)
    space_delimited_claims: tuple[str, ...] = ()  # besides Istio's "scope" and "permission"

    def __post_init__(self) -> None:
        tuple_fields(
            self,
            "audiences",
            "from_headers",
            "from_params",
            "output_claim_to_headers",
            "from_cookies",
            "space_delimited_claims",
        )


@dataclass(frozen=True, slots=True)
class RequestAuthentication:
    KIND: ClassVar[Kind] = Kind.REQUEST_AUTHENTICATION

    namespace: str
    name: str
    selector: WorkloadSelector | None = None
    target_refs: tuple[PolicyTargetRef, ...] = ()
    jwt_rules: tuple[JwtRule, ...] = ()
    creation_timestamp: datetime | None = None

    def __post_init__(self) -> None:
        tuple_fields(self, "target_refs", "jwt_rules")

    @property
    def key(self) -> str:
        return namespaced_key(self.namespace, self.name)


class _Dated(Protocol):
    @property
    def namespace(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def creation_timestamp(self) -> datetime | None: ...


def oldest_first(obj: _Dated) -> tuple[bool, datetime, str, str]:
    """Sort key for Istio's "among equals the oldest wins".

    Objects without a timestamp (local files rarely carry one) sort after dated ones, and
    ties fall back to namespace/name so the outcome never depends on load order.
    """
    ts = obj.creation_timestamp
    return (ts is None, ts or _EPOCH, obj.namespace, obj.name)
