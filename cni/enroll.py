"""Enrollment decisions, as the node agent uses them (the rules live in ``mesh.enrollment``).

The control plane's local source asks the same question, so the rules are in ``mesh``.
"""

from mesh.enrollment import (
    DATAPLANE_MODE_AMBIENT,
    DATAPLANE_MODE_LABEL,
    DATAPLANE_MODE_NONE,
    REDIRECTION_ANNOTATION,
    REDIRECTION_DISABLED,
    REDIRECTION_ENABLED,
    SIDECAR_STATUS_ANNOTATION,
    SKIPPED_NAMESPACES,
    Decision,
    decide,
    decide_node,
)

__all__ = [
    "DATAPLANE_MODE_AMBIENT",
    "DATAPLANE_MODE_LABEL",
    "DATAPLANE_MODE_NONE",
    "REDIRECTION_ANNOTATION",
    "REDIRECTION_DISABLED",
    "REDIRECTION_ENABLED",
    "SIDECAR_STATUS_ANNOTATION",
    "SKIPPED_NAMESPACES",
    "Decision",
    "decide",
    "decide_node",
]
