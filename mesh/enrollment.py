"""Which pods are in the mesh: a pure function of (namespace, pod, node).

Mirrors Istio's ambient enrollment (PROTOCOLS.md "Enrollment labels and annotations"), so the
same labels mean the same thing in both meshes. Pure on purpose: the agent's watch loop, the
reconcile-on-start pass and the tests all ask the same question and must get the same answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from mesh.model import Namespace, Snapshot, Workload

DATAPLANE_MODE_LABEL = "istio.io/dataplane-mode"
DATAPLANE_MODE_AMBIENT = "ambient"
DATAPLANE_MODE_NONE = "none"

# Istio's injector writes this annotation on every pod it gave a sidecar; Istio's cni treats its
# mere presence as "has a sidecar" (cni/pkg/util podHasSidecar). The injector also sets the label
# `security.istio.io/tlsMode=istio`, but that label alone is not proof of a sidecar, so like
# Istio we key on the annotation.
SIDECAR_STATUS_ANNOTATION = "sidecar.istio.io/status"

# Written on the pod once its redirection is in place (Kubernetes mode).
REDIRECTION_ANNOTATION = "ambient.istio.io/redirection"
REDIRECTION_ENABLED = "enabled"
# Istio also lets a pod refuse redirection with this annotation value; we honour it too.
REDIRECTION_DISABLED = "disabled"

SKIPPED_NAMESPACES = frozenset({"kube-system"})


@dataclass(frozen=True, slots=True)
class Decision:
    """Whether the agent redirects a pod's traffic, and why (the reason goes to the logs)."""

    enrolled: bool
    reason: str

    @property
    def annotations(self) -> Mapping[str, str]:
        """The annotations the agent should put on the pod for this decision (none to remove)."""
        return {REDIRECTION_ANNOTATION: REDIRECTION_ENABLED} if self.enrolled else {}


def decide(namespace: Namespace | None, pod: Workload, node: str) -> Decision:
    """Decide enrollment exactly as PROTOCOLS.md says; the first rule that applies wins.

    Exclusions come before the labels so that no label can pull a pod the agent must not touch
    (another node's, hostNetwork, sidecar-injected, kube-system) into the mesh.
    """
    if pod.node != node:
        return Decision(False, f"pod is on node {pod.node or '(unscheduled)'!s}, not {node}")
    if pod.host_network:
        return Decision(False, "hostNetwork pod: it shares the node's netns")
    if pod.namespace in SKIPPED_NAMESPACES:
        return Decision(False, f"namespace {pod.namespace} is never enrolled")
    if SIDECAR_STATUS_ANNOTATION in pod.annotations:
        return Decision(False, "pod has an Istio sidecar")
    if pod.annotations.get(REDIRECTION_ANNOTATION) == REDIRECTION_DISABLED:
        return Decision(False, f"pod annotation {REDIRECTION_ANNOTATION}={REDIRECTION_DISABLED}")
    pod_mode = pod.labels.get(DATAPLANE_MODE_LABEL)
    if pod_mode == DATAPLANE_MODE_NONE:
        return Decision(False, f"pod label {DATAPLANE_MODE_LABEL}={DATAPLANE_MODE_NONE} opts out")
    if pod_mode == DATAPLANE_MODE_AMBIENT:
        return Decision(True, f"pod label {DATAPLANE_MODE_LABEL}={DATAPLANE_MODE_AMBIENT}")
    if namespace is not None and namespace.labels.get(DATAPLANE_MODE_LABEL) == DATAPLANE_MODE_AMBIENT:
        return Decision(True, f"namespace label {DATAPLANE_MODE_LABEL}={DATAPLANE_MODE_AMBIENT}")
    return Decision(False, "neither pod nor namespace is labelled for ambient")


def decide_node(snapshot: Snapshot, node: str) -> Mapping[str, Decision]:
    """Decisions for every pod on ``node``, keyed by pod UID (what the agent reconciles against)."""
    return {
        pod.uid: decide(snapshot.namespaces.get(pod.namespace), pod, node)
        for pod in snapshot.workloads_on_node(node)
    }
