"""``WafPolicy`` (``extensions.ambient-mesh.io/v1alpha1``): a waypoint's web application firewall.

Ours, not Istio's: the OWASP Core Rule Set on libmodsecurity, run by the waypoints its
``targetRefs`` bind it to (a waypoint Gateway: every request through that waypoint; a Service:
the requests for that service, which win over the Gateway's). The control plane converts and
validates it (:mod:`sources.convert`), serves it to those waypoints only (:mod:`mesh.xds.waf`),
and each waypoint lowers it to its engine's ``WafConfig`` (:mod:`waypoint.waf`).

What is checked here is what can be checked without ModSecurity: ranges, names, and the
directives an extra rule may use (:func:`check_extra_rule`: no files, programs, scripts, DNS or
shared collections from a policy). Whether ModSecurity parses an extra rule is known only when a
waypoint loads it; a rule it refuses leaves that waypoint's previous rule set in force.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from datetime import datetime
from typing import ClassVar, Final

from mesh.model.frozen import tuple_fields
from mesh.model.objects import Kind, namespaced_key
from mesh.model.policy import PolicyTargetRef

WAF_API_VERSION: Final = "extensions.ambient-mesh.io/v1alpha1"
DEFAULT_PARANOIA_LEVEL: Final = 1
DEFAULT_INBOUND_THRESHOLD: Final = 5  # CRS 3.3.4's defaults
DEFAULT_OUTBOUND_THRESHOLD: Final = 4
DEFAULT_REQUEST_BODY_LIMIT: Final = 128 * 1024
MAX_BODY_LIMIT: Final = 1 << 30
MAX_THRESHOLD: Final = 10_000
MAX_RULE_ID: Final = 9_999_999

_MEDIA_TYPE: Final = re.compile(r"^[a-z0-9][a-z0-9!#$&^_.+-]*/(?:\*|[a-z0-9][a-z0-9!#$&^_.+-]*)$")
_TAG: Final = re.compile(r"^[A-Za-z0-9_./:-]+$")


class WafMode(enum.Enum):
    """``Enforce`` blocks, ``DetectOnly`` evaluates and logs, ``Disabled`` evaluates nothing.

    Not On/Off: YAML 1.1 reads those as booleans.
    """

    ENFORCE = "Enforce"
    DETECT_ONLY = "DetectOnly"
    DISABLED = "Disabled"


class BodyLimitAction(enum.Enum):
    """What happens to a request body larger than the limit."""

    REJECT = "Reject"  # block with 413 (Enforce) / log (DetectOnly)
    PROCESS_PARTIAL = "ProcessPartial"  # inspect the first ``limit`` bytes only


class WafConfigError(ValueError):
    """A WAF setting is invalid; the message names the field."""


@dataclass(frozen=True, slots=True)
class WafPolicy:
    KIND: ClassVar[Kind] = Kind.WAF_POLICY

    namespace: str
    name: str
    target_refs: tuple[PolicyTargetRef, ...] = ()
    mode: WafMode = WafMode.ENFORCE
    paranoia_level: int = DEFAULT_PARANOIA_LEVEL
    inbound_anomaly_threshold: int = DEFAULT_INBOUND_THRESHOLD
    outbound_anomaly_threshold: int = DEFAULT_OUTBOUND_THRESHOLD
    exclude_rule_ids: tuple[int, ...] = ()
    exclude_rule_tags: tuple[str, ...] = ()
    extra_rules: tuple[str, ...] = ()
    request_body_limit: int = DEFAULT_REQUEST_BODY_LIMIT
    request_body_limit_action: BodyLimitAction = BodyLimitAction.REJECT
    # Media types whose bodies are inspected (``type/*`` allowed); empty: every type except the
    # binary ones (gRPC, protobuf, octet-stream), whose headers and URI are still inspected.
    inspect_content_types: tuple[str, ...] = ()
    creation_timestamp: datetime | None = None

    def __post_init__(self) -> None:
        tuple_fields(
            self,
            "target_refs",
            "exclude_rule_ids",
            "exclude_rule_tags",
            "extra_rules",
            "inspect_content_types",
        )

    @property
    def key(self) -> str:
        return namespaced_key(self.namespace, self.name)


def check_policy(p: WafPolicy) -> None:
    """Raise ``WafConfigError`` naming the first bad field (in the resource's own spelling)."""
    if not (isinstance(p.paranoia_level, int) and 1 <= p.paranoia_level <= 4):
        raise WafConfigError(f"spec.paranoiaLevel: must be an integer 1-4, got {p.paranoia_level!r}")
    for field, value in (
        ("inbound", p.inbound_anomaly_threshold),
        ("outbound", p.outbound_anomaly_threshold),
    ):
        if not (isinstance(value, int) and 1 <= value <= MAX_THRESHOLD):
            raise WafConfigError(
                f"spec.anomalyThresholds.{field}: must be an integer 1-{MAX_THRESHOLD}, got {value!r}"
            )
    if not (isinstance(p.request_body_limit, int) and 1 <= p.request_body_limit <= MAX_BODY_LIMIT):
        raise WafConfigError(
            f"spec.bodies.limitBytes: must be an integer 1-{MAX_BODY_LIMIT}, got {p.request_body_limit!r}"
        )
    for rid in p.exclude_rule_ids:
        check_rule_id(rid)
    for tag in p.exclude_rule_tags:
        check_tag(tag)
    for mt in p.inspect_content_types:
        check_media_type(mt, "spec.bodies.inspectContentTypes")
    for i, rule in enumerate(p.extra_rules):
        check_extra_rule(i, rule, field="spec.extraRules")
    if not p.target_refs:
        raise WafConfigError("spec.targetRefs: at least one target (a waypoint Gateway or a Service)")
    for i, ref in enumerate(p.target_refs):
        if (ref.kind, ref.group) not in (("Gateway", "gateway.networking.k8s.io"), ("Service", "")):
            raise WafConfigError(
                f"spec.targetRefs[{i}]: must be a Gateway (group gateway.networking.k8s.io) or a Service "
                f'(group ""), got kind {ref.kind!r} group {ref.group!r}'
            )
        if ref.namespace and ref.namespace != p.namespace:
            raise WafConfigError(f"spec.targetRefs[{i}].namespace: must be the policy's own ({p.namespace})")


def check_rule_id(rid: object, field: str = "exclude_rule_ids") -> None:
    if isinstance(rid, bool) or not (isinstance(rid, int) and 1 <= rid <= MAX_RULE_ID):
        raise WafConfigError(f"{field}: not a rule id (1-{MAX_RULE_ID}): {rid!r}")


def check_tag(tag: object, field: str = "exclude_rule_tags") -> None:
    if not (isinstance(tag, str) and _TAG.match(tag) and len(tag) <= 256):
        raise WafConfigError(f"{field}: not a tag (letters, digits, _./:-): {tag!r}")


def check_media_type(mt: object, field: str) -> None:
    if not (isinstance(mt, str) and _MEDIA_TYPE.match(mt)):
        raise WafConfigError(f"{field}: not a lower-case media type (type/subtype or type/*): {mt!r}")


# What a policy's extra rules may say. A WafPolicy is written by a service's owners, not by the
# mesh operator: its rules must not make the waypoint read or write files, run programs or Lua
# scripts, fetch rules, query DNS (Debian builds libmodsecurity 3 with Lua, curl and GeoIP), set
# the process environment, or write the persistent collections several threads share (their
# in-memory store is not safe for concurrent writers: upstream issue #3054).
EXTRA_RULE_DIRECTIVES: Final = frozenset(
    {
        "SecRule",
        "SecAction",
        "SecMarker",
        "SecRuleRemoveById",
        "SecRuleRemoveByTag",
        "SecRuleRemoveByMsg",
        "SecRuleUpdateTargetById",
        "SecRuleUpdateTargetByTag",
        "SecRuleUpdateTargetByMsg",
        "SecRuleUpdateActionById",
    }
)
_FORBIDDEN_IN_RULES: Final = re.compile(
    r"@(?:inspectFile|pmFromFile|pmf|ipMatchFromFile|ipMatchF|fuzzyHash|rbl|geoLookup)\b"
    r"|\b(?:exec|setenv|initcol|setsid|setuid|setrsc|expirevar|deprecatevar)\s*:"
    r"|\bsetvar\s*:\s*'?\s*!?(?:ip|global|session|user|resource)\."
    r"|\bctl\s*:\s*(?:auditEngine|auditLogParts)\b",
    re.IGNORECASE,
)


def check_extra_rule(index: int, rule: object, *, field: str = "extra_rules") -> None:
    """Refuse what an extra rule may not do (see ``EXTRA_RULE_DIRECTIVES``); ModSecurity parses the rest."""
    if not isinstance(rule, str) or not rule.strip():
        raise WafConfigError(f"{field}: item {index} must be a non-empty string")
    logical = re.sub(r"\\\r?\n", " ", rule)  # SecLang line continuations
    for raw in logical.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        directive = line.split(None, 1)[0]
        if directive not in EXTRA_RULE_DIRECTIVES:
            raise WafConfigError(
                f"{field}: item {index}: directive {directive!r} is not allowed "
                f"(allowed: {', '.join(sorted(EXTRA_RULE_DIRECTIVES))})"
            )
    forbidden = _FORBIDDEN_IN_RULES.search(logical)
    if forbidden:
        raise WafConfigError(
            f"{field}: item {index}: {forbidden.group(0)!r} is not allowed "
            "(no files, programs, scripts, DNS, environment or shared collections from a policy)"
        )
