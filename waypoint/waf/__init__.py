"""The waypoint's web application firewall: the OWASP Core Rule Set on libmodsecurity.

``capi`` binds the C library (cffi, ABI mode), ``config`` holds the ``WafConfig`` model and the
SecLang it compiles to, ``findings`` parses ModSecurity's log messages, ``engine`` runs
transactions on a bounded thread pool and swaps rule sets atomically, ``policies`` keeps one
engine per distinct ``WafPolicy`` config of the waypoint and picks the one for a request.

The waypoint calls ``await engine.inspect(WafRequest(...))`` after authorization (or
``await engine.begin(...)`` and then ``exchange.inspect_response(...)`` when responses are
inspected) and answers ``verdict.status`` with ``verdict.request_id`` when ``verdict.blocked``.
"""

from waypoint.waf.capi import RuleLoadError, WafLibraryError
from waypoint.waf.config import (
    DEFAULT_UNINSPECTED_BODY_TYPES,
    BodyLimitAction,
    WafConfig,
    WafConfigError,
    WafMode,
    rules_text,
)
from waypoint.waf.engine import WafAction, WafEngine, WafExchange, WafRequest, WafResponse, WafVerdict
from waypoint.waf.findings import Finding

__all__ = [
    "DEFAULT_UNINSPECTED_BODY_TYPES",
    "BodyLimitAction",
    "Finding",
    "RuleLoadError",
    "WafAction",
    "WafConfig",
    "WafConfigError",
    "WafEngine",
    "WafExchange",
    "WafLibraryError",
    "WafMode",
    "WafRequest",
    "WafResponse",
    "WafVerdict",
    "rules_text",
]
