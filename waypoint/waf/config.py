"""The WAF's configuration model and the SecLang text it compiles to.

``WafConfig`` is what a ``WafPolicy`` (``extensions.ambient-mesh.io/v1alpha1``) lowers to: a
frozen value validated at construction, so a bad field is named at the edge (extra rules are
screened by ``check_extra_rule`` here and parsed by ModSecurity at load). ``rules_text``
turns it into one SecLang document, in the order the Core Rule Set expects:

1. engine basics from ModSecurity's ``modsecurity.conf-recommended`` (engine mode, body access
   and limits, the JSON/XML body processors chosen by content type, body-parse-error rules);
2. the CRS setup (what ``crs-setup.conf`` would say): default actions for anomaly scoring and
   ``SecAction`` rules for the paranoia level, anomaly thresholds, allowed content types and
   ``tx.crs_setup_version``;
3. the CRS rules shipped by Debian's ``modsecurity-crs`` (``/usr/share/modsecurity-crs/rules``);
4. our rules that report the inbound (end of phase 2) and outbound (end of phase 4) anomaly
   scores through the log callback;
5. the exclusions (``SecRuleRemoveById`` / ``SecRuleRemoveByTag`` must come after the rules they
   remove) and the policy's extra rules.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from typing import Final

from mesh.model.waf import (
    EXTRA_RULE_DIRECTIVES,
    BodyLimitAction,
    WafConfigError,
    WafMode,
    check_extra_rule,
    check_media_type,
    check_rule_id,
    check_tag,
)

__all__ = [
    "CRS_RULES_DIR",
    "DEFAULT_UNINSPECTED_BODY_TYPES",
    "EXTRA_RULE_DIRECTIVES",
    "BodyLimitAction",
    "WafConfig",
    "WafConfigError",
    "WafMode",
    "check_extra_rule",
    "crs_rule_files",
    "media_type",
    "rules_text",
]

CRS_RULES_DIR: Final = "/usr/share/modsecurity-crs/rules"
CRS_SETUP_VERSION: Final = 334  # modsecurity-crs 3.3.4 (Debian 12)

# Our own rule ids, in the 1-99,999 range SecLang reserves for local rules. They log the CRS
# anomaly scores (``score=N`` in their data) for the engine; they are not findings. A phase that a
# disruptive action ended early does not reach them: the blocking rule's "Total Score" stands in.
INBOUND_SCORE_RULE_ID: Final = 99_001
OUTBOUND_SCORE_RULE_ID: Final = 99_002

# Bodies of these media types are never fed to the body rules: CRS text rules false-positive on
# binary protobuf frames. Their URI and headers are still inspected.
DEFAULT_UNINSPECTED_BODY_TYPES: Final = (
    "application/grpc",
    "application/grpc+proto",
    "application/grpc-web",
    "application/grpc-web+proto",
    "application/x-protobuf",
    "application/protobuf",
    "application/x-google-protobuf",
    "application/octet-stream",
)

# CRS 3.3.4's default tx.allowed_request_content_type (REQUEST-901 rule 901162).
CRS_ALLOWED_CONTENT_TYPES: Final = (
    "application/x-www-form-urlencoded",
    "multipart/form-data",
    "multipart/related",
    "text/xml",
    "application/xml",
    "application/soap+xml",
    "application/json",
    "application/cloudevents+json",
    "application/cloudevents-batch+json",
)

_MEDIA_TYPE: Final = re.compile(r"^[a-z0-9][a-z0-9!#$&^_.+-]*/[a-z0-9][a-z0-9!#$&^_.+-]*$")


@dataclass(frozen=True)
class WafConfig:
    mode: WafMode = WafMode.ENFORCE
    paranoia_level: int = 1
    inbound_anomaly_threshold: int = 5
    outbound_anomaly_threshold: int = 4
    exclude_rule_ids: tuple[int, ...] = ()
    exclude_rule_tags: tuple[str, ...] = ()
    extra_rules: tuple[str, ...] = ()
    request_body_limit: int = 128 * 1024
    request_body_limit_action: BodyLimitAction = BodyLimitAction.REJECT
    inspect_response: bool = False
    response_body_limit: int = 512 * 1024
    uninspected_body_types: tuple[str, ...] = DEFAULT_UNINSPECTED_BODY_TYPES
    # When not empty, only bodies of these media types (``type/*`` allowed) are inspected.
    inspected_body_types: tuple[str, ...] = ()
    crs_rules_dir: str = CRS_RULES_DIR

    def __post_init__(self) -> None:
        if not isinstance(self.mode, WafMode):
            raise WafConfigError(f"mode: must be one of {[m.value for m in WafMode]}, got {self.mode!r}")
        if not isinstance(self.request_body_limit_action, BodyLimitAction):
            raise WafConfigError(
                "request_body_limit_action: must be one of "
                f"{[a.value for a in BodyLimitAction]}, got {self.request_body_limit_action!r}"
            )
        if not (isinstance(self.paranoia_level, int) and 1 <= self.paranoia_level <= 4):
            raise WafConfigError(f"paranoia_level: must be an integer 1-4, got {self.paranoia_level!r}")
        for name in ("inbound_anomaly_threshold", "outbound_anomaly_threshold"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise WafConfigError(f"{name}: must be a positive integer, got {value!r}")
        for name in ("request_body_limit", "response_body_limit"):
            value = getattr(self, name)
            if not (isinstance(value, int) and 1 <= value <= 1 << 30):
                raise WafConfigError(f"{name}: must be an integer in 1..{1 << 30}, got {value!r}")
        for rid in self.exclude_rule_ids:
            check_rule_id(rid)
        for tag in self.exclude_rule_tags:
            check_tag(tag)
        for mt in self.inspected_body_types:
            check_media_type(mt, "inspected_body_types")
        for i, rule in enumerate(self.extra_rules):
            check_extra_rule(i, rule)
        for mt in self.uninspected_body_types:
            if not (isinstance(mt, str) and _MEDIA_TYPE.match(mt)):
                raise WafConfigError(f"uninspected_body_types: not a lower-case media type: {mt!r}")
        if not os.path.isdir(self.crs_rules_dir):
            raise WafConfigError(
                f"crs_rules_dir: {self.crs_rules_dir} is not a directory (apt-get install modsecurity-crs)"
            )

    def body_inspected(self, content_type: str | None) -> bool:
        """Whether a body of this Content-Type is fed to the body rules."""
        mt = media_type(content_type)
        if self.inspected_body_types:
            return mt in self.inspected_body_types or f"{mt.split('/', 1)[0]}/*" in self.inspected_body_types
        return mt not in self.uninspected_body_types


def media_type(content_type: str | None) -> str:
    """``Application/JSON; charset=utf-8`` → ``application/json`` ('' when absent)."""
    if not content_type:
        return ""
    return content_type.split(";", 1)[0].strip().lower()


def _engine_section(config: WafConfig) -> list[str]:
    engine = "On" if config.mode is WafMode.ENFORCE else "DetectionOnly"
    limit = config.request_body_limit
    return [
        "# -- engine (modsecurity.conf-recommended)",
        f"SecRuleEngine {engine}",
        "SecRequestBodyAccess On",
        f"SecRequestBodyLimit {limit}",
        f"SecRequestBodyNoFilesLimit {limit}",
        f"SecRequestBodyLimitAction {config.request_body_limit_action.value}",
        'SecRule REQUEST_HEADERS:Content-Type "^(?:application(?:/soap\\+|/)|text/)xml" '
        '"id:200000,phase:1,t:none,t:lowercase,pass,nolog,ctl:requestBodyProcessor=XML"',
        'SecRule REQUEST_HEADERS:Content-Type "^application/(?:[a-z0-9.+-]+\\+)?json" '
        '"id:200001,phase:1,t:none,t:lowercase,pass,nolog,ctl:requestBodyProcessor=JSON"',
        'SecRule REQBODY_ERROR "!@eq 0" "id:200002,phase:2,t:none,log,deny,status:400,'
        "msg:'Failed to parse request body.',logdata:'%{reqbody_error_msg}',severity:2\"",
        'SecRule MULTIPART_STRICT_ERROR "!@eq 0" "id:200003,phase:2,t:none,log,deny,status:400,'
        "msg:'Multipart request body failed strict validation'\"",
        'SecRule MULTIPART_UNMATCHED_BOUNDARY "@eq 1" "id:200004,phase:2,t:none,log,deny,'
        "msg:'Multipart parser detected a possible unmatched boundary.'\"",
        "SecPcreMatchLimit 1000",
        "SecPcreMatchLimitRecursion 1000",
        'SecRule TX:/^MSC_/ "!@streq 0" "id:200005,phase:2,t:none,deny,'
        "msg:'ModSecurity internal error flagged: %{MATCHED_VAR_NAME}'\"",
        f"SecResponseBodyAccess {'On' if config.inspect_response else 'Off'}",
        "SecResponseBodyMimeType text/plain text/html text/xml application/json",
        f"SecResponseBodyLimit {config.response_body_limit}",
        "SecResponseBodyLimitAction ProcessPartial",
        "SecAuditEngine Off",
        "SecArgumentSeparator &",
        "SecCookieFormat 0",
    ]


def _setup_section(config: WafConfig) -> list[str]:
    allowed = list(CRS_ALLOWED_CONTENT_TYPES)
    allowed += [t for t in config.uninspected_body_types if t not in allowed]
    allowed += [t for t in config.inspected_body_types if t not in allowed and not t.endswith("/*")]
    allowed_text = " ".join(f"|{t}|" for t in allowed)
    return [
        "# -- CRS setup (crs-setup.conf)",
        'SecDefaultAction "phase:1,log,auditlog,pass"',
        'SecDefaultAction "phase:2,log,auditlog,pass"',
        f'SecAction "id:900000,phase:1,nolog,pass,t:none,setvar:tx.paranoia_level={config.paranoia_level}"',
        'SecAction "id:900110,phase:1,nolog,pass,t:none,'
        f"setvar:tx.inbound_anomaly_score_threshold={config.inbound_anomaly_threshold},"
        f'setvar:tx.outbound_anomaly_score_threshold={config.outbound_anomaly_threshold}"',
        f"SecAction \"id:900220,phase:1,nolog,pass,t:none,setvar:'tx.allowed_request_content_type={allowed_text}'\"",
        f'SecAction "id:900990,phase:1,nolog,pass,t:none,setvar:tx.crs_setup_version={CRS_SETUP_VERSION}"',
    ]


def crs_rule_files(rules_dir: str = CRS_RULES_DIR) -> list[str]:
    """The CRS rule files in load order (their names sort in evaluation order)."""
    return sorted(glob.glob(os.path.join(rules_dir, "*.conf")))


def rules_text(config: WafConfig) -> str:
    """The complete SecLang document for ``config`` (CRS included by absolute path)."""
    lines = _engine_section(config) + _setup_section(config)
    lines.append("# -- OWASP Core Rule Set")
    lines += [f'Include "{path}"' for path in crs_rule_files(config.crs_rules_dir)]
    lines += [
        "# -- anomaly score reports (read by the engine)",
        f'SecAction "id:{INBOUND_SCORE_RULE_ID},phase:2,pass,t:none,log,'
        "msg:'inbound anomaly score',logdata:'score=%{tx.anomaly_score}'\"",
        f'SecAction "id:{OUTBOUND_SCORE_RULE_ID},phase:4,pass,t:none,log,'
        "msg:'outbound anomaly score',logdata:'score=%{tx.outbound_anomaly_score}'\"",
    ]
    if config.exclude_rule_ids or config.exclude_rule_tags:
        lines.append("# -- exclusions")
        lines += [f"SecRuleRemoveById {rid}" for rid in config.exclude_rule_ids]
        lines += [f'SecRuleRemoveByTag "{tag}"' for tag in config.exclude_rule_tags]
    if config.extra_rules:
        lines.append("# -- extra rules")
        lines += list(config.extra_rules)
    return "\n".join(lines) + "\n"
