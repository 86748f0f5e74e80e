"""What the Kubernetes API server (and istio/api's CRD schemas) accept, as plain checks.

The conversion in :mod:`sources.convert` runs on objects from two places: the API server, which
has validated them already, and a hand-written local file, which nothing has. So the checks
here are exactly the API server's, never stricter — an object the API server stored must never
be refused — and the local file gets them too, so a name or label Kubernetes would refuse is
refused in local mode as well (with the field named) instead of meaning something odd.

* names: ``k8s.io/apimachinery/pkg/util/validation`` (``IsDNS1123Subdomain``,
  ``IsDNS1123Label``, ``IsDNS1035Label``, ``IsQualifiedName``, ``IsValidLabelValue``,
  ``IsValidPortName``), and which one applies to which kind (``ValidatePodName`` &c.);
* unknown fields: the field names each kind's schema defines (Kubernetes 1.25-1.37 OpenAPI,
  istio/api's ``customresourcedefinitions.gen.yaml`` v1 and v1beta1, Gateway API v1.0-v1.6,
  standard and experimental channels), so a newer manifest still loads while a typo such as
  ``rulez:`` is an error. Only the local source asks for these (:attr:`ConvertOptions.reject_unknown_fields
  <sources.convert.ConvertOptions.reject_unknown_fields>`): in Kubernetes mode the API server's
  own schemas did the job, and a newer server may know fields this list does not.

Every value that ends up in a message goes through :func:`show`, which bounds it: a YAML alias
graph or a 100 KB label must not be rendered whole into an error (or a log line).
"""

from __future__ import annotations

import difflib
import re
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# --- bounded rendering ---------------------------------------------------------------------------

_MAX_SHOWN = 80

_repr = reprlib.Repr()
_repr.maxlevel = 2
_repr.maxstring = _MAX_SHOWN
_repr.maxother = _MAX_SHOWN
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 4
_repr.maxlong = 40


def show(value: object) -> str:
    """``repr(value)``, cut to a bounded length (strings say how long they really were)."""
    if isinstance(value, str):
        if len(value) <= _MAX_SHOWN:
            return repr(value)
        return f"{value[: _MAX_SHOWN - 20]!r}… ({len(value)} characters)"
    try:
        text = _repr.repr(value)
    except Exception:  # a hostile __repr__ cannot come from YAML, but never fail a message
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 2 * _MAX_SHOWN else text[: 2 * _MAX_SHOWN] + "…"


def clip(value: str, limit: int = 256) -> str:
    """A string for a log field or a message's "where": at most ``limit`` characters."""
    return value if len(value) <= limit else f"{value[: limit - 1]}…"


# --- names (k8s.io/apimachinery/pkg/util/validation) ----------------------------------------------

DNS1123_LABEL_MAX = 63
DNS1123_SUBDOMAIN_MAX = 253
DNS1035_LABEL_MAX = 63
QUALIFIED_NAME_MAX = 63
LABEL_VALUE_MAX = 63
PORT_NAME_MAX = 15
# TotalAnnotationSizeLimitB: the sum of every annotation's key and value length.
ANNOTATIONS_MAX_BYTES = 256 * 1024

_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_QUALIFIED_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_PORT_NAME_CHARS = re.compile(r"[-a-z0-9]+")


def dns1123_label(value: str) -> str | None:
    """None when valid, else why not (the API server's wording, shortened)."""
    if len(value) > DNS1123_LABEL_MAX:
        return f"must be no more than {DNS1123_LABEL_MAX} characters (got {len(value)})"
    if not _DNS1123_LABEL.fullmatch(value):
        return (
            "must be a DNS-1123 label: lowercase letters, digits and '-', "
            "starting and ending with a letter or digit"
        )
    return None


def dns1123_subdomain(value: str) -> str | None:
    if len(value) > DNS1123_SUBDOMAIN_MAX:
        return f"must be no more than {DNS1123_SUBDOMAIN_MAX} characters (got {len(value)})"
    if not _DNS1123_SUBDOMAIN.fullmatch(value):
        return (
            "must be a DNS-1123 subdomain: lowercase letters, digits, '-' and '.', "
            "starting and ending with a letter or digit"
        )
    return None


def dns1035_label(value: str) -> str | None:
    if len(value) > DNS1035_LABEL_MAX:
        return f"must be no more than {DNS1035_LABEL_MAX} characters (got {len(value)})"
    if not _DNS1035_LABEL.fullmatch(value):
        return (
            "must be a DNS-1035 label: lowercase letters, digits and '-', "
            "starting with a letter and ending with a letter or digit"
        )
    return None


def qualified_name(value: str) -> str | None:
    """``[prefix/]name``, as label and annotation keys (``IsQualifiedName``)."""
    parts = value.split("/")
    if len(parts) == 1:
        name = parts[0]
    elif len(parts) == 2:
        prefix, name = parts
        if not prefix:
            return "prefix part must not be empty"
        why = dns1123_subdomain(prefix)
        if why is not None:
            return f"prefix part {why}"
    else:
        return "must be a name with an optional DNS subdomain prefix and '/' (e.g. 'example.com/MyName')"
    if not name:
        return "name part must not be empty"
    if len(name) > QUALIFIED_NAME_MAX:
        return f"name part must be no more than {QUALIFIED_NAME_MAX} characters (got {len(name)})"
    if not _QUALIFIED_NAME.fullmatch(name):
        return (
            "name part must consist of letters, digits, '-', '_' or '.', "
            "starting and ending with a letter or digit"
        )
    return None


def label_value(value: str) -> str | None:
    if len(value) > LABEL_VALUE_MAX:
        return f"must be no more than {LABEL_VALUE_MAX} characters (got {len(value)})"
    if value and not _QUALIFIED_NAME.fullmatch(value):
        return (
            "must be empty or consist of letters, digits, '-', '_' or '.', "
            "starting and ending with a letter or digit"
        )
    return None


def port_name(value: str) -> str | None:
    """An IANA service name, as container port names and named targetPorts (``IsValidPortName``)."""
    if len(value) > PORT_NAME_MAX:
        return f"must be no more than {PORT_NAME_MAX} characters (got {len(value)})"
    if not _PORT_NAME_CHARS.fullmatch(value):
        return "must contain only lowercase letters, digits and '-'"
    if not re.search("[a-z]", value):
        return "must contain at least one letter"
    if "--" in value:
        return "must not contain consecutive '-'"
    if value.startswith("-") or value.endswith("-"):
        return "must not begin or end with '-'"
    return None


def annotations_size(annotations: Mapping[str, str]) -> str | None:
    total = sum(len(k) + len(v) for k, v in annotations.items())
    if total > ANNOTATIONS_MAX_BYTES:
        return f"may not have more than {ANNOTATIONS_MAX_BYTES} bytes in all (got {total})"
    return None


# Which name rule the API server applies to metadata.name, per kind (ValidatePodName, ...).
NAME_RULES = {
    "Node": dns1123_subdomain,
    "Namespace": dns1123_label,
    "ServiceAccount": dns1123_subdomain,
    "Pod": dns1123_subdomain,
    "Service": dns1035_label,
    # Custom resources: the apiextensions server checks names as DNS-1123 subdomains.
    "Gateway": dns1123_subdomain,
    "AuthorizationPolicy": dns1123_subdomain,
    "PeerAuthentication": dns1123_subdomain,
    "RequestAuthentication": dns1123_subdomain,
    "WafPolicy": dns1123_subdomain,
}


def api_version(value: str) -> str | None:
    """``version`` or ``group/version``: a garbled apiVersion is refused, not taken for a kind we skip."""
    group, sep, version = value.rpartition("/")
    if sep:
        if not group:
            return "group must not be empty (write 'version' or 'group/version')"
        why = dns1123_subdomain(group)
        if why is not None:
            return f"group {why}"
    if not version:
        return "version must not be empty"
    if dns1035_label(version) is not None:
        return "version must be a DNS-1035 label such as v1 or v1beta1"
    return None


# --- fields each schema defines ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Struct:
    """A mapping with a fixed set of fields; a field maps to its shape, or None (not looked into)."""

    fields: Mapping[str, Shape | None]
    what: str = ""  # for "not a field of <what>"


@dataclass(frozen=True, slots=True)
class ListOf:
    item: Shape


@dataclass(frozen=True, slots=True)
class MapOf:
    """A mapping with arbitrary keys, each value of one shape (``portLevelMtls``)."""

    value: Shape


Shape = Struct | ListOf | MapOf


def names(*names: str) -> dict[str, Shape | None]:
    """A struct's fields, none of them looked into."""
    return dict.fromkeys(names)


_names = names


# ObjectMeta: the same in every Kubernetes version since 1.25.
OBJECT_META = Struct(
    _names(
        "name", "generateName", "namespace", "selfLink", "uid", "resourceVersion", "generation",
        "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "labels",
        "annotations", "ownerReferences", "finalizers", "managedFields",
    ),
    "ObjectMeta",
)  # fmt: skip

# Kubernetes 1.25-1.37 (the union, so manifests written for any of them load).
POD_SPEC = _names(
    "activeDeadlineSeconds", "affinity", "automountServiceAccountToken", "containers", "dnsConfig",
    "dnsPolicy", "enableServiceLinks", "ephemeralContainers", "evictionResponders", "hostAliases",
    "hostIPC", "hostNetwork", "hostPID", "hostUsers", "hostname", "hostnameOverride",
    "imagePullSecrets", "initContainers", "nodeName", "nodeSelector", "os", "overhead",
    "preemptionPolicy", "priority", "priorityClassName", "readinessGates", "resourceClaims",
    "resources", "restartPolicy", "runtimeClassName", "schedulerName", "schedulingGates",
    "schedulingGroup", "securityContext", "serviceAccount", "serviceAccountName", "setHostnameAsFQDN",
    "shareProcessNamespace", "subdomain", "terminationGracePeriodSeconds", "tolerations",
    "topologySpreadConstraints", "volumes", "workloadRef",
)  # fmt: skip
CONTAINER_PORT = Struct(_names("containerPort", "hostIP", "hostPort", "name", "protocol"), "ContainerPort")
POD_SPEC["containers"] = ListOf(Struct({"ports": ListOf(CONTAINER_PORT)} | _names(
    "args", "command", "env", "envFrom", "image", "imagePullPolicy", "lifecycle", "livenessProbe",
    "name", "readinessProbe", "resizePolicy", "resources", "restartPolicy", "restartPolicyRules",
    "securityContext", "startupProbe", "stdin", "stdinOnce", "terminationMessagePath",
    "terminationMessagePolicy", "tty", "volumeDevices", "volumeMounts", "workingDir",
), "Container"))  # fmt: skip
POD_STATUS = _names(
    "allocatedResources", "conditions", "containerStatuses", "ephemeralContainerStatuses",
    "extendedResourceClaimStatus", "hostIP", "hostIPs", "initContainerStatuses", "message",
    "nodeAllocatableResourceClaimStatuses", "nominatedNodeName", "observedGeneration", "phase",
    "podIP", "podIPs", "qosClass", "reason", "resize", "resourceClaimStatuses", "resources",
    "startTime", "volumeHealth",
)  # fmt: skip
POD_STATUS["podIPs"] = ListOf(Struct(_names("ip"), "PodIP"))
SERVICE_SPEC = _names(
    "allocateLoadBalancerNodePorts", "clusterIP", "clusterIPs", "externalIPs", "externalName",
    "externalTrafficPolicy", "healthCheckNodePort", "internalTrafficPolicy", "ipFamilies",
    "ipFamilyPolicy", "loadBalancerClass", "loadBalancerIP", "loadBalancerSourceRanges", "ports",
    "publishNotReadyAddresses", "selector", "sessionAffinity", "sessionAffinityConfig",
    "trafficDistribution", "type",
)  # fmt: skip
SERVICE_SPEC["ports"] = ListOf(
    Struct(_names("appProtocol", "name", "nodePort", "port", "protocol", "targetPort"), "ServicePort")
)
NODE_SPEC = _names(
    "configSource", "externalID", "podCIDR", "podCIDRs", "podPreemptionPolicy", "providerID", "taints",
    "unschedulable",
)  # fmt: skip
NODE_STATUS = _names(
    "addresses", "allocatable", "capacity", "conditions", "config", "daemonEndpoints", "declaredFeatures",
    "features", "images", "nodeInfo", "phase", "runtimeHandlers", "volumesAttached", "volumesInUse",
)  # fmt: skip


def _object(kind: str, **top: Mapping[str, Shape | None] | None) -> Struct:
    """An object's top level: apiVersion, kind, metadata and ``top`` (a mapping of fields is a
    struct checked one level down; None lets the field hold anything)."""
    fields: dict[str, Shape | None] = {"apiVersion": None, "kind": None, "metadata": OBJECT_META}
    for name, sub in top.items():
        fields[name] = None if sub is None else Struct(sub, f"{kind} {name}")
    return Struct(fields, kind)


# istio/api (kubernetes/customresourcedefinitions.gen.yaml): v1 and v1beta1 have the same fields.
_SELECTOR = Struct(_names("matchLabels"), "WorkloadSelector")
_TARGET_REF = Struct(_names("group", "kind", "name", "namespace"), "PolicyTargetReference")
_ISTIO_STATUS = None  # IstioStatus is x-kubernetes-preserve-unknown-fields: written by istiod, not read
_SOURCE = Struct(
    _names(
        "principals", "notPrincipals", "requestPrincipals", "notRequestPrincipals", "namespaces",
        "notNamespaces", "serviceAccounts", "notServiceAccounts", "ipBlocks", "notIpBlocks",
        "remoteIpBlocks", "notRemoteIpBlocks", "trustDomains", "notTrustDomains",
    ),
    "Source",
)  # fmt: skip
_OPERATION = Struct(
    _names("hosts", "notHosts", "ports", "notPorts", "methods", "notMethods", "paths", "notPaths"),
    "Operation",
)
_RULE = Struct(
    {
        "from": ListOf(Struct({"source": _SOURCE}, "Rule.From")),
        "to": ListOf(Struct({"operation": _OPERATION}, "Rule.To")),
        "when": ListOf(Struct(_names("key", "values", "notValues"), "Condition")),
    },
    "Rule",
)
_AUTHZ_SPEC: dict[str, Shape | None] = {
    "selector": _SELECTOR,
    "targetRef": _TARGET_REF,
    "targetRefs": ListOf(_TARGET_REF),
    "action": None,
    "provider": Struct(_names("name"), "ExtensionProvider"),
    "rules": ListOf(_RULE),
}
_PEER_AUTHN_SPEC: dict[str, Shape | None] = {
    "selector": _SELECTOR,
    "mtls": Struct(_names("mode"), "MutualTLS"),
    "portLevelMtls": MapOf(Struct(_names("mode"), "MutualTLS")),
}
_JWT_RULE = Struct(
    {
        "fromHeaders": ListOf(Struct(_names("name", "prefix"), "JWTHeader")),
        "outputClaimToHeaders": ListOf(Struct(_names("header", "claim"), "ClaimToHeader")),
    }
    | _names(
        "issuer", "audiences", "jwksUri", "jwks_uri", "jwks", "fromParams", "fromCookies",
        "outputPayloadToHeader", "forwardOriginalToken", "timeout", "spaceDelimitedClaims",
    ),
    "JWTRule",
)  # fmt: skip
_REQUEST_AUTHN_SPEC: dict[str, Shape | None] = {
    "selector": _SELECTOR,
    "targetRef": _TARGET_REF,
    "targetRefs": ListOf(_TARGET_REF),
    "jwtRules": ListOf(_JWT_RULE),
}

# Gateway API v1.0-v1.6, standard and experimental channels (v1 and v1beta1 are the same).
_GATEWAY_SPEC: dict[str, Shape | None] = _names(
    "addresses", "allowedListeners", "backendTLS", "defaultScope", "gatewayClassName", "infrastructure", "tls"
)
_GATEWAY_SPEC["listeners"] = ListOf(
    Struct(_names("allowedRoutes", "hostname", "name", "port", "protocol", "tls"), "Listener")
)
_GATEWAY_STATUS = _names("addresses", "attachedListenerSets", "conditions", "listeners")

# Ours: charts/base/templates/crd-wafpolicy.yaml.
_WAF_SPEC: dict[str, Shape | None] = {
    "targetRefs": ListOf(Struct(_names("group", "kind", "name"), "WafPolicy targetRef")),
    "mode": None,
    "paranoiaLevel": None,
    "anomalyThresholds": Struct(_names("inbound", "outbound"), "WafPolicy anomalyThresholds"),
    "ruleExclusions": ListOf(Struct(_names("id", "tag"), "WafPolicy ruleExclusion")),
    "bodies": Struct(_names("inspectContentTypes", "limitBytes", "onLimit"), "WafPolicy bodies"),
    "extraRules": None,
}

SCHEMAS: Mapping[str, Struct] = {
    "Pod": _object("Pod", spec=POD_SPEC, status=POD_STATUS),
    "Service": _object("Service", spec=SERVICE_SPEC, status=_names("conditions", "loadBalancer")),
    "Node": _object("Node", spec=NODE_SPEC, status=NODE_STATUS),
    "Namespace": _object("Namespace", spec=_names("finalizers"), status=_names("conditions", "phase")),
    "ServiceAccount": _object(
        "ServiceAccount", automountServiceAccountToken=None, imagePullSecrets=None, secrets=None
    ),
    "Gateway": _object("Gateway", spec=_GATEWAY_SPEC, status=_GATEWAY_STATUS),
    "ConfigMap": _object("ConfigMap", data=None, binaryData=None, immutable=None),
    "AuthorizationPolicy": _object("AuthorizationPolicy", spec=_AUTHZ_SPEC, status=_ISTIO_STATUS),
    "PeerAuthentication": _object("PeerAuthentication", spec=_PEER_AUTHN_SPEC, status=_ISTIO_STATUS),
    "RequestAuthentication": _object("RequestAuthentication", spec=_REQUEST_AUTHN_SPEC, status=_ISTIO_STATUS),
    "WafPolicy": _object("WafPolicy", spec=_WAF_SPEC, status=None),
}


@dataclass(frozen=True, slots=True)
class UnknownField:
    """Where (a field path) and which field a schema does not define."""

    path: str
    name: str
    known: tuple[str, ...] = field(default=())
    what: str = ""

    @property
    def reason(self) -> str:
        hint = difflib.get_close_matches(self.name, self.known, n=1, cutoff=0.6)
        did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
        of = f" of {self.what}" if self.what else ""
        return f"unknown field {show(self.name)}{of}{did_you_mean}"


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def unknown_field(obj: Mapping[str, Any], schema: Struct) -> UnknownField | None:
    """The first field (in document order) ``schema`` does not define, or None.

    Only walks what is a mapping or a list where the schema expects one; a value of the wrong
    type is the converter's to report (it says what type it wants).
    """
    stack: list[tuple[Any, Shape, str]] = [(obj, schema, "")]
    while stack:
        value, shape, path = stack.pop()
        if isinstance(shape, Struct):
            if not isinstance(value, Mapping):
                continue
            children = []
            for key, child in value.items():
                if not isinstance(key, str) or key not in shape.fields:
                    return UnknownField(path, key if isinstance(key, str) else show(key),
                                        tuple(shape.fields), shape.what)  # fmt: skip
                sub = shape.fields[key]
                if sub is not None and child is not None:
                    children.append((child, sub, _join(path, key)))
            stack.extend(reversed(children))
        elif isinstance(shape, ListOf):
            if isinstance(value, list):
                stack.extend(
                    (item, shape.item, f"{path}[{i}]") for i, item in reversed(list(enumerate(value)))
                )
        elif isinstance(value, Mapping):
            stack.extend((v, shape.value, _join(path, str(k))) for k, v in reversed(list(value.items())))
    return None
