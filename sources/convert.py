"""Kubernetes objects (plain dicts, as the API or a YAML file gives them) -> model objects.

Both sources use this module, the local YAML file (:mod:`sources.local`) and the Kubernetes API
watch (:mod:`sources.kubernetes`), so a manifest means the same thing in both modes. This is the edge where input is validated:
every problem raises :class:`ConfigError` naming the field path (``spec.ports[0].port``) and
the reason, and whatever comes out is a fully defaulted model object the rest of the mesh
trusts. Fields we do not use are ignored, as Kubernetes clients do; fields we use are
checked as strictly as the API server (or Istio's validating webhook) would check them,
because a value the API would have refused should not quietly mean something here.
"""

from __future__ import annotations

import enum
import ipaddress
import re
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from mesh.model import (
    ANNOTATION_DRY_RUN,
    ANNOTATION_REDIRECTION,
    DEFAULT_CLUSTER_DOMAIN,
    DEFAULT_SERVICE_ACCOUNT,
    DEFAULT_TRUST_DOMAIN,
    LABEL_USE_WAYPOINT,
    LABEL_USE_WAYPOINT_NAMESPACE,
    AuthorizationAction,
    AuthorizationPolicy,
    ClaimToHeader,
    Condition,
    Gateway,
    GatewayListener,
    JwtHeader,
    JwtRule,
    MeshObject,
    MtlsMode,
    Namespace,
    Node,
    Operation,
    PeerAuthentication,
    PolicyTargetRef,
    RequestAuthentication,
    Rule,
    RuleFrom,
    RuleTo,
    Service,
    ServiceAccount,
    ServicePort,
    Source,
    TunnelProtocol,
    WaypointRef,
    Workload,
    WorkloadSelector,
    WorkloadStatus,
)
from mesh.model.meshconfig import (
    MESH_CONFIGMAP,
    MESH_CONFIGMAP_KEY,
    ExtAuthz,
    ExtAuthzGrpc,
    ExtAuthzHttp,
    ExtAuthzRequestBody,
    ExtensionProvider,
    MeshConfig,
)
from mesh.model.policy import ROOT_NAMESPACE
from mesh.model.waf import (
    DEFAULT_INBOUND_THRESHOLD,
    DEFAULT_OUTBOUND_THRESHOLD,
    DEFAULT_PARANOIA_LEVEL,
    DEFAULT_REQUEST_BODY_LIMIT,
    MAX_BODY_LIMIT,
    MAX_RULE_ID,
    MAX_THRESHOLD,
    WAF_API_VERSION,
    BodyLimitAction,
    WafConfigError,
    WafMode,
    WafPolicy,
    check_extra_rule,
    check_media_type,
    check_tag,
)
from sources import validation
from sources.boundedyaml import YamlRefused, load_one
from sources.validation import clip, show

DEFAULT_NAMESPACE = "default"
# Pods without metadata.uid (hand-written local files) get uuid5(this, "<ns>/<name>"): stable
# across reloads and restarts, so ztunnel does not see a "new" pod every time the file changes.
POD_UID_NAMESPACE = uuid.UUID("0d1e5b5e-8a8e-5c0a-9a51-6d0c1f3a7b21")

_SERVICE_PROTOCOLS = ("TCP", "UDP", "SCTP")
_CLUSTER_SCOPED = ("Node", "Namespace")

_E = TypeVar("_E", bound=enum.Enum)


class ConfigError(ValueError):
    """Refusal of a configuration object, saying where and why.

    ``document_index`` (0-based position in a multi-document file) and ``source`` are filled
    in by the file loader; ``kind``/``name`` when the object got far enough to have them;
    ``field`` is the path inside the object ("" for the object as a whole).
    """

    def __init__(
        self,
        reason: str,
        *,
        field: str = "",
        kind: str | None = None,
        name: str | None = None,
        document_index: int | None = None,
        source: str | None = None,
    ) -> None:
        self.reason = reason
        self.field = field
        self.kind = kind
        self.name = name
        self.document_index = document_index
        self.source = source
        super().__init__(self._render())

    def _render(self) -> str:
        where = []
        if self.source:
            where.append(self.source)
        doc = f"document[{self.document_index}]" if self.document_index is not None else ""
        what = " ".join(x for x in (self.kind, self.name) if x)
        if doc and what:
            where.append(f"{doc} ({what})")
        elif doc or what:
            where.append(doc or what)
        if self.field:
            where.append(self.field)
        return ": ".join([*where, self.reason])

    def with_context(
        self,
        *,
        kind: str | None = None,
        name: str | None = None,
        document_index: int | None = None,
        source: str | None = None,
        field_prefix: str = "",
    ) -> ConfigError:
        """A copy with the context an outer layer knows added (never overriding inner)."""
        field = self.field
        if field_prefix:
            field = f"{field_prefix}.{field}" if field else field_prefix
        return ConfigError(
            self.reason,
            field=field,
            kind=self.kind or kind,
            name=self.name or name,
            document_index=self.document_index if self.document_index is not None else document_index,
            source=self.source or source,
        )


@dataclass(frozen=True, slots=True)
class ConvertOptions:
    """Mesh-wide settings that shape model objects but are not in the Kubernetes objects."""

    trust_domain: str = DEFAULT_TRUST_DOMAIN
    cluster_domain: str = DEFAULT_CLUSTER_DOMAIN
    network: str = ""
    # Refuse fields the object's schema does not define, and fields of istio/api this mesh does
    # not implement (which would otherwise be ignored and change what a policy means). The local
    # file sets it; from the API server the CRD schemas did that job, and a newer server may
    # serve fields this list does not know, so Kubernetes mode leaves it off.
    reject_unknown_fields: bool = False


# --- field access with paths ---------------------------------------------------------------


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, Mapping):
        return "mapping"
    return type(value).__name__


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class _Fields:
    """A mapping plus the path it sits at, so every accessor can say where a problem is."""

    __slots__ = ("data", "path")

    def __init__(self, data: Mapping[str, Any], path: str = "") -> None:
        self.data = data
        self.path = path

    def at(self, key: str) -> str:
        return _join(self.path, key)

    def error(self, key: str, reason: str) -> ConfigError:
        return ConfigError(reason, field=self.at(key) if key else self.path)

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def text(self, key: str, default: str = "", *, required: bool = False) -> str:
        value = self.data.get(key)
        if value is None:
            if required:
                raise self.error(key, "required")
            return default
        if not isinstance(value, str):
            raise self.error(key, f"must be a string, got {_type_name(value)} {show(value)}")
        if required and not value:
            raise self.error(key, "must not be empty")
        return value

    def opt_text(self, key: str) -> str | None:
        return self.text(key) if self.has(key) else None

    def flag(self, key: str, default: bool = False) -> bool:
        value = self.data.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, got {_type_name(value)} {show(value)}")
        return value

    def port(self, key: str, *, required: bool = False, default: int = 0) -> int:
        value = self.data.get(key)
        if value is None:
            if required:
                raise self.error(key, "required")
            return default
        return _port_value(value, self.at(key))

    def obj(self, key: str, *, required: bool = False) -> _Fields | None:
        value = self.data.get(key)
        if value is None:
            if required:
                raise self.error(key, "required")
            return None
        if not isinstance(value, Mapping):
            raise self.error(key, f"must be a mapping, got {_type_name(value)}")
        return _Fields(value, self.at(key))

    def required_obj(self, key: str) -> _Fields:
        fields = self.obj(key, required=True)
        assert fields is not None  # obj() raised otherwise
        return fields

    def obj_or_empty(self, key: str) -> _Fields:
        return self.obj(key) or _Fields({}, self.at(key))

    def items(self, key: str) -> Iterator[tuple[str, Any]]:
        """(path, item) for each element of a list field; an absent field is empty."""
        value = self.data.get(key)
        if value is None:
            return
        if not isinstance(value, list):
            raise self.error(key, f"must be a list, got {_type_name(value)}")
        for i, item in enumerate(value):
            yield f"{self.at(key)}[{i}]", item

    def objs(self, key: str) -> Iterator[_Fields]:
        for path, item in self.items(key):
            if not isinstance(item, Mapping):
                raise ConfigError(f"must be a mapping, got {_type_name(item)}", field=path)
            yield _Fields(item, path)

    def str_list(self, key: str) -> tuple[str, ...]:
        out = []
        for path, item in self.items(key):
            if not isinstance(item, str):
                raise ConfigError(f"must be a string, got {_type_name(item)} {show(item)}", field=path)
            if not item:
                raise ConfigError("must not be empty", field=path)
            out.append(item)
        return tuple(out)

    def str_map(self, key: str) -> dict[str, str]:
        value = self.data.get(key)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self.error(key, f"must be a mapping, got {_type_name(value)}")
        out: dict[str, str] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise self.error(key, f"keys must be strings, got {_type_name(k)} {show(k)}")
            if not isinstance(v, str):
                raise ConfigError(
                    f"must be a string, got {_type_name(v)} {show(v)} (quote it in YAML)",
                    field=f"{self.at(key)}[{clip(k, 100)}]",
                )
            out[k] = v
        return out


def _port_value(value: object, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"must be a port number 1-65535, got {_type_name(value)} {show(value)}", field=path)
    if not 1 <= value <= 65535:
        raise ConfigError(f"must be a port number 1-65535, got {value}", field=path)
    return value


def _numeric_port(value: object, path: str) -> int:
    """Istio writes ports as strings ("8080"); YAML users often write numbers. Take both."""
    if isinstance(value, str) and value.isdigit():
        return _port_value(int(value), path)
    return _port_value(value, path)


def _ip(value: str, path: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ConfigError(f"{show(value)} is not an IP address", field=path) from None


def _cidr(value: str, path: str) -> str:
    try:
        return str(ipaddress.ip_network(value, strict=False))
    except ValueError:
        raise ConfigError(f"{show(value)} is not an IP address or CIDR block", field=path) from None


def _timestamp(value: object, path: str) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):  # YAML turns unquoted timestamps into datetimes
        ts = value
    elif isinstance(value, str):
        try:
            ts = datetime.fromisoformat(value)
        except ValueError:
            raise ConfigError(
                f"{show(value)} is not an RFC 3339 time like 2024-05-01T12:00:00Z", field=path
            ) from None
    else:
        raise ConfigError(f"must be an RFC 3339 time, got {_type_name(value)}", field=path)
    return ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class _Meta:
    name: str
    namespace: str
    labels: dict[str, str]
    annotations: dict[str, str]
    uid: str
    creation_timestamp: datetime | None


def _name_problem(kind: str, name: str) -> str | None:
    rule = validation.NAME_RULES.get(kind, validation.dns1123_subdomain)
    return rule(name)


def _labels(md: _Fields) -> dict[str, str]:
    """``metadata.labels``, with the API server's rules for keys and values (ValidateLabels)."""
    labels = md.str_map("labels")
    for k, v in labels.items():
        why = validation.qualified_name(k)
        if why is not None:
            raise md.error("labels", f"key {show(k)}: {why}")
        why = validation.label_value(v)
        if why is not None:
            raise ConfigError(f"{show(v)}: {why}", field=f"{md.at('labels')}[{clip(k, 100)}]")
    return labels


def _annotations(md: _Fields) -> dict[str, str]:
    """``metadata.annotations``: keys are qualified names (checked lowercased, as the API server
    does), and all of them together at most 256 KiB (ValidateAnnotations)."""
    annotations = md.str_map("annotations")
    for k in annotations:
        why = validation.qualified_name(k.lower())
        if why is not None:
            raise md.error("annotations", f"key {show(k)}: {why}")
    why = validation.annotations_size(annotations)
    if why is not None:
        raise md.error("annotations", why)
    return annotations


def _meta(obj: _Fields, kind: str, *, namespaced: bool) -> _Meta:
    md = obj.required_obj("metadata")
    name = md.text("name", required=True)
    why = _name_problem(kind, name)
    if why is not None:
        raise md.error("name", f"{show(name)} is not a valid {kind} name: {why}")
    namespace = ""
    if namespaced:
        namespace = md.text("namespace", DEFAULT_NAMESPACE)
        why = validation.dns1123_label(namespace)
        if why is not None:
            raise md.error("namespace", f"{show(namespace)} is not a valid namespace name: {why}")
    return _Meta(
        name=name,
        namespace=namespace,
        labels=_labels(md),
        annotations=_annotations(md),
        uid=md.text("uid"),
        creation_timestamp=_timestamp(md.data.get("creationTimestamp"), md.at("creationTimestamp")),
    )


def _waypoint(labels: Mapping[str, str], own_namespace: str) -> WaypointRef | None:
    name = labels.get(LABEL_USE_WAYPOINT)
    if not name:
        return None
    return WaypointRef(name=name, namespace=labels.get(LABEL_USE_WAYPOINT_NAMESPACE) or own_namespace)


def pod_uid(namespace: str, name: str) -> str:
    """The UID a pod gets when its manifest has none.

    The one derivation: the workload the local source makes and the pod the cni side announces
    to ztunnel over ZDS must carry the same uid, so every caller uses this function.
    """
    return str(uuid.uuid5(POD_UID_NAMESPACE, f"{namespace}/{name}"))


# --- core kinds --------------------------------------------------------------------------------


def node_from_k8s(obj: _Fields, options: ConvertOptions) -> Node:
    meta = _meta(obj, "Node", namespaced=False)
    spec = obj.obj_or_empty("spec")
    if spec.has("podCIDRs"):
        cidrs = tuple(
            _cidr(c, f"{spec.at('podCIDRs')}[{i}]") for i, c in enumerate(spec.str_list("podCIDRs"))
        )
    elif spec.has("podCIDR"):
        cidrs = (_cidr(spec.text("podCIDR"), spec.at("podCIDR")),)
    else:
        cidrs = ()
    return Node(name=meta.name, labels=meta.labels, pod_cidrs=cidrs)


def namespace_from_k8s(obj: _Fields, options: ConvertOptions) -> Namespace:
    meta = _meta(obj, "Namespace", namespaced=False)
    return Namespace(
        name=meta.name,
        labels=meta.labels,
        annotations=meta.annotations,
        waypoint=_waypoint(meta.labels, meta.name),
    )


def service_account_from_k8s(obj: _Fields, options: ConvertOptions) -> ServiceAccount:
    meta = _meta(obj, "ServiceAccount", namespaced=True)
    return ServiceAccount(namespace=meta.namespace, name=meta.name)


def _pod_status(status: _Fields) -> WorkloadStatus:
    if status.text("phase") in ("Failed", "Succeeded"):
        return WorkloadStatus.UNHEALTHY
    for cond in status.objs("conditions"):
        if cond.text("type") == "Ready" and cond.text("status") == "False":
            return WorkloadStatus.UNHEALTHY
    return WorkloadStatus.HEALTHY


def workload_from_pod(obj: _Fields, options: ConvertOptions) -> Workload:
    meta = _meta(obj, "Pod", namespaced=True)
    spec = obj.obj_or_empty("spec")
    status = obj.obj_or_empty("status")

    sa_field = "serviceAccountName" if spec.text("serviceAccountName") else "serviceAccount"
    sa = spec.text(sa_field) or DEFAULT_SERVICE_ACCOUNT
    why = validation.dns1123_subdomain(sa)
    if why is not None:
        raise spec.error(sa_field, f"{show(sa)} is not a valid service account name: {why}")
    node = spec.text("nodeName")
    why = validation.dns1123_subdomain(node) if node else None
    if why is not None:
        raise spec.error("nodeName", f"{show(node)} is not a valid node name: {why}")

    ips: list[str] = []
    if status.has("podIP"):
        ips.append(_ip(status.text("podIP"), status.at("podIP")))
    for entry in status.objs("podIPs"):
        ip = _ip(entry.text("ip", required=True), entry.at("ip"))
        if ip not in ips:
            ips.append(ip)

    named_ports: dict[str, int] = {}
    for container in spec.objs("containers"):
        for port in container.objs("ports"):
            number = port.port("containerPort", required=True)
            pname = port.text("name")
            if pname:
                why = validation.port_name(pname)
                if why is not None:
                    raise port.error("name", f"{show(pname)} is not a valid port name: {why}")
                named_ports.setdefault(pname, number)

    redirected = meta.annotations.get(ANNOTATION_REDIRECTION) == "enabled"
    return Workload(
        uid=meta.uid or pod_uid(meta.namespace, meta.name),
        name=meta.name,
        namespace=meta.namespace,
        node=node,
        service_account=sa,
        ips=tuple(ips),
        labels=meta.labels,
        annotations=meta.annotations,
        network=options.network,
        # As istiod does: a pod is reached over HBONE once the node agent has redirected it.
        tunnel_protocol=TunnelProtocol.HBONE if redirected else TunnelProtocol.NONE,
        waypoint=_waypoint(meta.labels, meta.namespace),
        trust_domain=options.trust_domain,
        host_network=spec.flag("hostNetwork"),
        status=_pod_status(status),
        named_ports=named_ports,
        creation_timestamp=meta.creation_timestamp,
    )


def _service_port(port: _Fields) -> ServicePort:
    number = port.port("port", required=True)
    target: int | str = number
    raw = port.data.get("targetPort")
    if isinstance(raw, str):
        if validation.port_name(raw) is not None:
            hint = " (write a number without quotes)" if raw.isdigit() else ""
            raise port.error("targetPort", f"{show(raw)} is neither a port number nor a port name{hint}")
        target = raw
    elif raw is not None:
        target = port.port("targetPort")
    protocol = port.text("protocol", "TCP")
    if protocol not in _SERVICE_PROTOCOLS:
        raise port.error("protocol", f"must be one of {', '.join(_SERVICE_PROTOCOLS)}")
    name = port.text("name")
    why = validation.dns1123_label(name) if name else None
    if why is not None:
        raise port.error("name", f"{show(name)} is not a valid port name: {why}")
    app_protocol = port.opt_text("appProtocol")
    why = validation.qualified_name(app_protocol) if app_protocol else None
    if why is not None:
        raise port.error("appProtocol", f"{show(app_protocol)}: {why}")
    return ServicePort(
        port=number,
        target_port=target,
        name=name,
        app_protocol=app_protocol,
        protocol=protocol,
    )


def service_from_k8s(obj: _Fields, options: ConvertOptions) -> Service:
    meta = _meta(obj, "Service", namespaced=True)
    spec = obj.obj_or_empty("spec")

    vips: list[str] = []
    cluster_ip = spec.text("clusterIP")
    if cluster_ip and cluster_ip != "None":
        vips.append(_ip(cluster_ip, spec.at("clusterIP")))
    for path, item in spec.items("clusterIPs"):
        if not isinstance(item, str):
            raise ConfigError(f"must be a string, got {_type_name(item)}", field=path)
        if item != "None":
            ip = _ip(item, path)
            if ip not in vips:
                vips.append(ip)

    ports: list[ServicePort] = []
    seen: dict[tuple[int, str], str] = {}
    names: dict[str, str] = {}
    port_fields = list(spec.objs("ports"))
    for pf in port_fields:
        p = _service_port(pf)
        if (p.port, p.protocol) in seen:
            raise pf.error("port", f"{p.protocol} port {p.port} is already in {seen[p.port, p.protocol]}")
        seen[p.port, p.protocol] = pf.path
        if len(port_fields) > 1:
            if not p.name:
                raise pf.error("name", "required when a Service has more than one port")
            if p.name in names:
                raise pf.error("name", f"{show(p.name)} is already used by {names[p.name]}")
            names[p.name] = pf.path
        ports.append(p)

    selector = spec.str_map("selector")
    return Service(
        namespace=meta.namespace,
        name=meta.name,
        vips=tuple(vips),
        ports=tuple(ports),
        # Kubernetes drops an empty selector on the way in: both mean "no selector".
        selector=selector or None,
        labels=meta.labels,
        annotations=meta.annotations,
        waypoint=_waypoint(meta.labels, meta.namespace),
        cluster_domain=options.cluster_domain,
        creation_timestamp=meta.creation_timestamp,
    )


def gateway_from_k8s(obj: _Fields, options: ConvertOptions) -> Gateway:
    meta = _meta(obj, "Gateway", namespaced=True)
    spec = obj.required_obj("spec")
    listeners = []
    seen: dict[str, str] = {}
    for lf in spec.objs("listeners"):
        name = lf.text("name", required=True)
        if name in seen:
            raise lf.error("name", f"{show(name)} is already used by {seen[name]}")
        seen[name] = lf.path
        listeners.append(
            GatewayListener(
                name=name,
                port=lf.port("port", required=True),
                protocol=lf.text("protocol", required=True),
                hostname=lf.opt_text("hostname"),
            )
        )
    return Gateway(
        namespace=meta.namespace,
        name=meta.name,
        gateway_class=spec.text("gatewayClassName", required=True),
        listeners=tuple(listeners),
        labels=meta.labels,
        annotations=meta.annotations,
        creation_timestamp=meta.creation_timestamp,
    )


# --- security.istio.io ---------------------------------------------------------------------------


def _selector(spec: _Fields) -> WorkloadSelector | None:
    sel = spec.obj("selector")
    if sel is None:
        return None
    return WorkloadSelector(match_labels=sel.str_map("matchLabels"))


def _target_refs(spec: _Fields) -> tuple[PolicyTargetRef, ...]:
    refs = []
    singular = spec.obj("targetRef")
    if singular is not None and spec.has("targetRefs"):
        raise spec.error("targetRef", "use either targetRef or targetRefs, not both")
    for ref in [singular] if singular is not None else spec.objs("targetRefs"):
        refs.append(
            PolicyTargetRef(
                kind=ref.text("kind", required=True),
                name=ref.text("name", required=True),
                group=ref.text("group"),
                namespace=ref.text("namespace"),
            )
        )
    if refs and spec.has("selector"):
        raise spec.error("selector", "a policy may have a selector or targetRefs, not both")
    return tuple(refs)


def _enum(fields: _Fields, key: str, enum_type: type[_E], default: _E) -> _E:
    value = fields.text(key)
    if not value:
        return default
    try:
        return enum_type(value)
    except ValueError:
        allowed = ", ".join(str(m.value) for m in enum_type)
        raise fields.error(key, f"{show(value)} is not one of {allowed}") from None


def peer_authentication_from_k8s(obj: _Fields, options: ConvertOptions) -> PeerAuthentication:
    meta = _meta(obj, "PeerAuthentication", namespaced=True)
    spec = obj.obj_or_empty("spec")
    selector = _selector(spec)
    mtls = spec.obj_or_empty("mtls")
    mode = _enum(mtls, "mode", MtlsMode, MtlsMode.UNSET)
    port_level: dict[int, MtlsMode] = {}
    plm = spec.obj("portLevelMtls")
    if plm is not None:
        if selector is None or not selector.match_labels:
            raise spec.error("portLevelMtls", "requires a selector (ports are per workload)")
        for raw_port, setting in plm.data.items():
            path = plm.at(str(raw_port))
            port = _numeric_port(raw_port, path)
            if not isinstance(setting, Mapping):
                raise ConfigError(f"must be a mapping, got {_type_name(setting)}", field=path)
            port_level[port] = _enum(_Fields(setting, path), "mode", MtlsMode, MtlsMode.UNSET)
    return PeerAuthentication(
        namespace=meta.namespace,
        name=meta.name,
        selector=selector,
        mtls_mode=mode,
        port_level_mtls=port_level,
        creation_timestamp=meta.creation_timestamp,
    )


_SOURCE_FIELDS = {
    "principals": "principals",
    "notPrincipals": "not_principals",
    "requestPrincipals": "request_principals",
    "notRequestPrincipals": "not_request_principals",
    "namespaces": "namespaces",
    "notNamespaces": "not_namespaces",
    "serviceAccounts": "service_accounts",
    "notServiceAccounts": "not_service_accounts",
    "ipBlocks": "ip_blocks",
    "notIpBlocks": "not_ip_blocks",
    "remoteIpBlocks": "remote_ip_blocks",
    "notRemoteIpBlocks": "not_remote_ip_blocks",
}
_IP_FIELDS = {"ipBlocks", "notIpBlocks", "remoteIpBlocks", "notRemoteIpBlocks"}
_OPERATION_STR_FIELDS = {
    "hosts": "hosts",
    "notHosts": "not_hosts",
    "methods": "methods",
    "notMethods": "not_methods",
    "paths": "paths",
    "notPaths": "not_paths",
}


_SERVICE_ACCOUNT_FIELDS = {"serviceAccounts", "notServiceAccounts"}
_MAX_SERVICE_ACCOUNTS = 16  # istio/api's MaxItems


def _service_account(value: str, path: str, namespace: str) -> str:
    """``<namespace>/<name>`` or ``<name>`` (the policy's namespace), no wildcard: istio/api's rule."""
    if "*" in value:
        raise ConfigError(f"{show(value)}: no wildcard is allowed in service accounts", field=path)
    ns, sep, name = value.rpartition("/")
    if not sep:
        ns = namespace
    if not ns or not name or "/" in ns:
        raise ConfigError(
            f"{show(value)} is not <namespace>/<serviceaccount> or <serviceaccount>", field=path
        )
    return f"{ns}/{name}"


def _not_implemented(fields: _Fields, keys: tuple[str, ...], options: ConvertOptions) -> None:
    """Refuse istio/api fields this mesh does not implement, where ignoring them changes meaning.

    Only with ``reject_unknown_fields`` (the local file): from the API server the object is
    already stored, and the model has no place for them yet.
    """
    if not options.reject_unknown_fields:
        return
    for key in keys:
        if fields.data.get(key) not in (None, [], ""):
            raise fields.error(
                key,
                "is an istio/api field this mesh does not implement: refused, as ignoring it would change what the object means",
            )


def _source(fields: _Fields, namespace: str, options: ConvertOptions) -> Source:
    _not_implemented(fields, ("trustDomains", "notTrustDomains"), options)
    values: dict[str, tuple[str, ...]] = {}
    for yaml_key, attr in _SOURCE_FIELDS.items():
        items = fields.str_list(yaml_key)
        if yaml_key in _IP_FIELDS:
            items = tuple(_cidr(v, f"{fields.at(yaml_key)}[{i}]") for i, v in enumerate(items))
        elif yaml_key in _SERVICE_ACCOUNT_FIELDS:
            if len(items) > _MAX_SERVICE_ACCOUNTS:
                raise fields.error(
                    yaml_key, f"at most {_MAX_SERVICE_ACCOUNTS} service accounts (got {len(items)})"
                )
            items = tuple(
                _service_account(v, f"{fields.at(yaml_key)}[{i}]", namespace) for i, v in enumerate(items)
            )
        values[attr] = items
    if not any(values.values()):
        raise fields.error("", "must not be empty (Istio refuses an empty source)")
    if values["service_accounts"] and (values["principals"] or values["namespaces"]):
        raise fields.error("serviceAccounts", "cannot be set with principals or namespaces (istio/api)")
    return Source(**values)


def _operation(fields: _Fields) -> Operation:
    values: dict[str, Any] = {attr: fields.str_list(key) for key, attr in _OPERATION_STR_FIELDS.items()}
    for key, attr in (("ports", "ports"), ("notPorts", "not_ports")):
        values[attr] = tuple(_numeric_port(item, path) for path, item in fields.items(key))
    if not any(values.values()):
        raise fields.error("", "must not be empty (Istio refuses an empty operation)")
    return Operation(**values)


def _rule(rule: _Fields, namespace: str, options: ConvertOptions) -> Rule:
    froms = []
    for f in rule.objs("from"):
        froms.append(RuleFrom(source=_source(f.required_obj("source"), namespace, options)))
    tos = []
    for t in rule.objs("to"):
        tos.append(RuleTo(operation=_operation(t.required_obj("operation"))))
    whens = []
    for w in rule.objs("when"):
        cond = Condition(
            key=w.text("key", required=True),
            values=w.str_list("values"),
            not_values=w.str_list("notValues"),
        )
        if not cond.values and not cond.not_values:
            raise w.error("", "needs values or notValues")
        whens.append(cond)
    return Rule(from_=tuple(froms), to=tuple(tos), when=tuple(whens))


def authorization_policy_from_k8s(obj: _Fields, options: ConvertOptions) -> AuthorizationPolicy:
    meta = _meta(obj, "AuthorizationPolicy", namespaced=True)
    spec = obj.obj_or_empty("spec")
    action = _enum(spec, "action", AuthorizationAction, AuthorizationAction.ALLOW)
    provider = spec.obj("provider")
    provider_name = provider.text("name", required=True) if provider is not None else None
    if action is AuthorizationAction.CUSTOM and provider_name is None:
        raise spec.error("provider", "required when action is CUSTOM")
    if action is not AuthorizationAction.CUSTOM and provider_name is not None:
        raise spec.error("provider", f"only allowed with action CUSTOM, not {action.value}")
    dry_run = meta.annotations.get(ANNOTATION_DRY_RUN, "false").lower()
    if dry_run not in ("true", "false"):
        raise obj.error(
            f'metadata.annotations["{ANNOTATION_DRY_RUN}"]', f'must be "true" or "false", not {show(dry_run)}'
        )
    return AuthorizationPolicy(
        namespace=meta.namespace,
        name=meta.name,
        selector=_selector(spec),
        target_refs=_target_refs(spec),
        action=action,
        provider=provider_name,
        rules=tuple(_rule(r, meta.namespace, options) for r in spec.objs("rules")),
        creation_timestamp=meta.creation_timestamp,
        dry_run=dry_run == "true",
    )


_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)(h|ms|m|s|us|ns))+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s|us|ns)")
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}


def _duration(fields: _Fields, key: str) -> float | None:
    """A protobuf Duration as Kubernetes YAML writes it (``5s``, ``1m30s``, ``250ms``), in seconds."""
    if not fields.has(key):
        return None
    text = fields.text(key)
    if not _DURATION.fullmatch(text):
        raise fields.error(key, f"{show(text)} is not a duration such as 5s, 1m30s or 250ms")
    seconds = sum(float(n) * _UNITS[u] for n, u in _DURATION_PART.findall(text))
    if seconds <= 0:
        raise fields.error(key, "must be positive")
    return seconds


def _jwt_rule(rule: _Fields, options: ConvertOptions) -> JwtRule:
    given = [k for k in ("jwksUri", "jwks_uri", "jwks") if rule.has(k)]
    if len(given) > 1:  # the CRD's rule too (jwks_uri is jwksUri's old spelling)
        raise rule.error(given[1], f"at most one of jwksUri, jwks_uri and jwks, not {' and '.join(given)}")
    return JwtRule(
        issuer=rule.text("issuer", required=True),
        audiences=rule.str_list("audiences"),
        jwks_uri=rule.text("jwksUri") or rule.text("jwks_uri"),
        jwks=rule.text("jwks"),
        from_headers=tuple(
            JwtHeader(name=h.text("name", required=True), prefix=h.text("prefix"))
            for h in rule.objs("fromHeaders")
        ),
        from_params=rule.str_list("fromParams"),
        forward_original_token=rule.flag("forwardOriginalToken"),
        output_payload_to_header=rule.text("outputPayloadToHeader"),
        output_claim_to_headers=tuple(
            ClaimToHeader(header=c.text("header", required=True), claim=c.text("claim", required=True))
            for c in rule.objs("outputClaimToHeaders")
        ),
        from_cookies=rule.str_list("fromCookies"),
        timeout=_duration(rule, "timeout"),
        space_delimited_claims=rule.str_list("spaceDelimitedClaims"),
    )


def request_authentication_from_k8s(obj: _Fields, options: ConvertOptions) -> RequestAuthentication:
    meta = _meta(obj, "RequestAuthentication", namespaced=True)
    spec = obj.obj_or_empty("spec")
    return RequestAuthentication(
        namespace=meta.namespace,
        name=meta.name,
        selector=_selector(spec),
        target_refs=_target_refs(spec),
        jwt_rules=tuple(_jwt_rule(r, options) for r in spec.objs("jwtRules")),
        creation_timestamp=meta.creation_timestamp,
    )


# --- the mesh ConfigMap -----------------------------------------------------------------------

_REQUEST_BODY = validation.Struct(
    validation.names("maxRequestBytes", "allowPartialMessage", "packAsBytes"),
    "EnvoyExternalAuthorizationRequestBody",
)
_EXT_AUTHZ_COMMON = ("service", "port", "timeout", "failOpen", "clearRouteCache", "statusOnError")
_EXT_AUTHZ_SCHEMAS: Mapping[str, validation.Struct] = {
    "envoyExtAuthzGrpc": validation.Struct(
        {**validation.names(*_EXT_AUTHZ_COMMON), "includeRequestBodyInCheck": _REQUEST_BODY},
        "EnvoyExternalAuthorizationGrpcProvider",
    ),
    "envoyExtAuthzHttp": validation.Struct(
        {
            **validation.names(
                *_EXT_AUTHZ_COMMON,
                "pathPrefix",
                "includeHeadersInCheck",
                "includeRequestHeadersInCheck",
                "includeAdditionalHeadersInCheck",
                "headersToUpstreamOnAllow",
                "headersToDownstreamOnDeny",
                "headersToDownstreamOnAllow",
            ),
            "includeRequestBodyInCheck": _REQUEST_BODY,
        },
        "EnvoyExternalAuthorizationHttpProvider",
    ),
}
# istio/api's other providers: accepted by name (a CUSTOM policy naming one is refused there).
_OTHER_PROVIDERS = (
    "zipkin", "lightstep", "datadog", "stackdriver", "opencensus", "skywalking", "opentelemetry",
    "prometheus", "envoyFileAccessLog", "envoyHttpAls", "envoyTcpAls", "envoyOtelAls", "sds",
)  # fmt: skip


def is_mesh_configmap(obj: Mapping[str, Any]) -> bool:
    """Whether a ConfigMap is the mesh's: ``istio`` in the root namespace, as Istio's."""
    md = obj.get("metadata")
    return (
        isinstance(md, Mapping)
        and md.get("name") == MESH_CONFIGMAP
        and md.get("namespace", DEFAULT_NAMESPACE) == ROOT_NAMESPACE
    )


def _uint32(fields: _Fields, key: str) -> int:
    value = fields.data.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32:
        raise fields.error(key, f"must be a whole number 0-4294967295, got {_type_name(value)} {show(value)}")
    return value


def _header_patterns(fields: _Fields, key: str) -> tuple[str, ...]:
    out = []
    for i, p in enumerate(fields.str_list(key)):
        if p.strip("*") == "" or "*" in p.strip("*"):
            raise ConfigError(
                f"{show(p)} is not a header name, a prefix (abc*) or a suffix (*abc)",
                field=f"{fields.at(key)}[{i}]",
            )
        out.append(p.lower())
    return tuple(out)


def _request_body(fields: _Fields) -> ExtAuthzRequestBody | None:
    body = fields.obj("includeRequestBodyInCheck")
    if body is None:
        return None
    max_bytes = _uint32(body, "maxRequestBytes")
    if max_bytes == 0:
        raise body.error("maxRequestBytes", "required: how much of the body to hold (bytes, more than 0)")
    return ExtAuthzRequestBody(
        max_request_bytes=max_bytes,
        allow_partial_message=body.flag("allowPartialMessage"),
        pack_as_bytes=body.flag("packAsBytes"),
    )


def _ext_authz(kind: str, p: _Fields) -> ExtAuthz:
    service = p.text("service", required=True)
    host = service.rpartition("/")[2]
    if validation.dns1123_subdomain(host) is not None:
        raise p.error("service", f"{show(service)} is not [<namespace>/]<hostname> (a Service's host name)")
    status_text = p.text("statusOnError")
    status = int(status_text) if status_text.isdigit() else 0
    if status_text and not 200 <= status <= 599:
        raise p.error("statusOnError", f"{show(status_text)} is not an HTTP status code (200-599)")
    common: dict[str, Any] = {
        "service": service,
        "port": p.port("port", required=True),
        "fail_open": p.flag("failOpen"),
        "clear_route_cache": p.flag("clearRouteCache"),
        "include_request_body": _request_body(p),
    }
    timeout = _duration(p, "timeout")
    if timeout is not None:
        common["timeout"] = timeout
    if status:
        common["status_on_error"] = status
    if kind == "envoyExtAuthzGrpc":
        return ExtAuthzGrpc(**common)
    prefix = p.text("pathPrefix")
    if prefix and not prefix.startswith("/"):
        raise p.error("pathPrefix", f"{show(prefix)} must start with /")
    return ExtAuthzHttp(
        **common,
        path_prefix=prefix,
        include_request_headers=_header_patterns(p, "includeRequestHeadersInCheck")
        + _header_patterns(p, "includeHeadersInCheck"),
        include_additional_headers=tuple(
            (k.lower(), v) for k, v in sorted(p.str_map("includeAdditionalHeadersInCheck").items())
        ),
        headers_to_upstream_on_allow=_header_patterns(p, "headersToUpstreamOnAllow"),
        headers_to_downstream_on_deny=_header_patterns(p, "headersToDownstreamOnDeny"),
        headers_to_downstream_on_allow=_header_patterns(p, "headersToDownstreamOnAllow"),
    )


def _extension_provider(p: _Fields, options: ConvertOptions) -> ExtensionProvider:
    name = p.text("name", required=True)
    kinds = [k for k in p.data if k != "name"]
    if len(kinds) != 1:
        what = "none" if not kinds else " and ".join(map(show, kinds))
        raise ConfigError(f"needs exactly one provider kind (envoyExtAuthzGrpc, envoyExtAuthzHttp, ...), got {what}",
                          field=p.path)  # fmt: skip
    kind = kinds[0]
    if kind not in _EXT_AUTHZ_SCHEMAS:
        if kind not in _OTHER_PROVIDERS:
            raise p.error(kind, f"unknown provider kind {show(kind)} (this mesh implements envoyExtAuthzGrpc and "
                                "envoyExtAuthzHttp)")  # fmt: skip
        return ExtensionProvider(name, None, kind)
    spec = p.obj(kind, required=True)
    assert spec is not None
    if options.reject_unknown_fields:
        unknown = validation.unknown_field(spec.data, _EXT_AUTHZ_SCHEMAS[kind])
        if unknown is not None:
            raise ConfigError(unknown.reason, field=_join(spec.at(unknown.path) if unknown.path else spec.path,
                                                          clip(unknown.name, 100)))  # fmt: skip
    return ExtensionProvider(name, _ext_authz(kind, spec), kind)


def mesh_config_from_configmap(obj: _Fields, options: ConvertOptions) -> MeshConfig:
    """The mesh ConfigMap: its ``data.mesh`` YAML (a MeshConfig), of which ``extensionProviders``."""
    meta = _meta(obj, "ConfigMap", namespaced=True)
    data = obj.obj_or_empty("data")
    text = data.text(MESH_CONFIGMAP_KEY)
    try:
        mesh = load_one(text) if text else None
    except YamlRefused as e:
        raise data.error(MESH_CONFIGMAP_KEY, str(e)) from None
    if mesh is None:
        mesh = {}
    if not isinstance(mesh, Mapping):
        raise data.error(MESH_CONFIGMAP_KEY, f"must be a YAML mapping (a MeshConfig), got {_type_name(mesh)}")
    fields = _Fields(mesh, data.at(MESH_CONFIGMAP_KEY))
    providers = tuple(_extension_provider(p, options) for p in fields.objs("extensionProviders"))
    seen: set[str] = set()
    for i, p in enumerate(providers):
        if p.name in seen:
            raise ConfigError(
                f"provider name {show(p.name)} is used twice",
                field=f"{fields.at('extensionProviders')}[{i}].name",
            )
        seen.add(p.name)
    return MeshConfig(meta.namespace, meta.name, providers)


# --- extensions.ambient-mesh.io: WafPolicy -----------------------------------------------------

_GATEWAY_GROUP = "gateway.networking.k8s.io"
MAX_EXTRA_RULES = 64  # the CRD's maxItems
MAX_EXTRA_RULE_CHARS = 8192


def _whole(fields: _Fields, key: str, low: int, high: int, default: int) -> int:
    value = fields.data.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise fields.error(key, f"must be a whole number {low}-{high}, got {_type_name(value)} {show(value)}")
    return value


def _waf_target_refs(spec: _Fields) -> tuple[PolicyTargetRef, ...]:
    refs = []
    for ref in spec.objs("targetRefs"):
        kind = ref.text("kind", required=True)
        group = ref.text("group")
        if (kind, group) not in (("Gateway", _GATEWAY_GROUP), ("Service", "")):
            raise ConfigError(
                f"a target is a waypoint Gateway (group {_GATEWAY_GROUP}) or a Service (group \"\"), "
                f"got kind {show(kind)} group {show(group)}",
                field=ref.path,
            )
        refs.append(PolicyTargetRef(kind=kind, name=ref.text("name", required=True), group=group))
    if not refs:
        raise spec.error(
            "targetRefs", "required: the waypoint Gateway or the Services whose traffic is inspected"
        )
    return tuple(refs)


def waf_policy_from_k8s(obj: _Fields, options: ConvertOptions) -> WafPolicy:
    """``WafPolicy``: the OWASP Core Rule Set settings of the waypoints its targets reach."""
    meta = _meta(obj, "WafPolicy", namespaced=True)
    spec = obj.required_obj("spec")
    if not spec.has("mode") or isinstance(spec.data["mode"], bool):
        hint = " (YAML reads On/Off as booleans)" if spec.has("mode") else ""
        raise spec.error("mode", f"required: Enforce, DetectOnly or Disabled{hint}")
    thresholds = spec.obj_or_empty("anomalyThresholds")
    ids: list[int] = []
    tags: list[str] = []
    for ex in spec.objs("ruleExclusions"):
        if ex.has("id") == ex.has("tag"):
            raise ConfigError("exactly one of id (a rule id) or tag", field=ex.path)
        if ex.has("id"):
            ids.append(_whole(ex, "id", 1, MAX_RULE_ID, 0))
        else:
            tag = ex.text("tag")
            try:
                check_tag(tag)
            except WafConfigError:
                raise ex.error("tag", f"{show(tag)} is not a rule tag (letters, digits, _./:-)") from None
            tags.append(tag)
    bodies = spec.obj_or_empty("bodies")
    types = []
    for i, mt in enumerate(bodies.str_list("inspectContentTypes")):
        try:
            check_media_type(mt.lower(), "")
        except WafConfigError:
            raise ConfigError(
                f"{show(mt)} is not a media type (type/subtype or type/*)",
                field=f"{bodies.at('inspectContentTypes')}[{i}]",
            ) from None
        types.append(mt.lower())
    rules = spec.str_list("extraRules")
    if len(rules) > MAX_EXTRA_RULES:
        raise spec.error("extraRules", f"at most {MAX_EXTRA_RULES} rules, got {len(rules)}")
    for i, rule in enumerate(rules):
        where = f"{spec.at('extraRules')}[{i}]"
        if len(rule) > MAX_EXTRA_RULE_CHARS:
            raise ConfigError(f"at most {MAX_EXTRA_RULE_CHARS} characters, got {len(rule)}", field=where)
        try:
            check_extra_rule(i, rule)
        except WafConfigError as e:
            raise ConfigError(str(e).split(": ", 2)[-1], field=where) from None
    return WafPolicy(
        namespace=meta.namespace,
        name=meta.name,
        target_refs=_waf_target_refs(spec),
        mode=_enum(spec, "mode", WafMode, WafMode.ENFORCE),
        paranoia_level=_whole(spec, "paranoiaLevel", 1, 4, DEFAULT_PARANOIA_LEVEL),
        inbound_anomaly_threshold=_whole(thresholds, "inbound", 1, MAX_THRESHOLD, DEFAULT_INBOUND_THRESHOLD),
        outbound_anomaly_threshold=_whole(
            thresholds, "outbound", 1, MAX_THRESHOLD, DEFAULT_OUTBOUND_THRESHOLD
        ),
        exclude_rule_ids=tuple(ids),
        exclude_rule_tags=tuple(tags),
        extra_rules=rules,
        request_body_limit=_whole(bodies, "limitBytes", 1, MAX_BODY_LIMIT, DEFAULT_REQUEST_BODY_LIMIT),
        request_body_limit_action=_enum(bodies, "onLimit", BodyLimitAction, BodyLimitAction.REJECT),
        inspect_content_types=tuple(types),
        creation_timestamp=meta.creation_timestamp,
    )


# --- dispatch ------------------------------------------------------------------------------------

Converter = Callable[[_Fields, ConvertOptions], MeshObject]

_SECURITY: Mapping[str, Converter] = {
    "AuthorizationPolicy": authorization_policy_from_k8s,
    "PeerAuthentication": peer_authentication_from_k8s,
    "RequestAuthentication": request_authentication_from_k8s,
}

# (apiVersion, kind) -> converter. Gateway v1beta1 is accepted too: same shape, and older
# manifests still say it.
CONVERTERS: Mapping[tuple[str, str], Converter] = {
    ("v1", "Node"): node_from_k8s,
    ("v1", "Namespace"): namespace_from_k8s,
    ("v1", "ServiceAccount"): service_account_from_k8s,
    ("v1", "Pod"): workload_from_pod,
    ("v1", "Service"): service_from_k8s,
    ("v1", "ConfigMap"): mesh_config_from_configmap,  # the mesh's only: see is_mesh_configmap
    ("gateway.networking.k8s.io/v1", "Gateway"): gateway_from_k8s,
    ("gateway.networking.k8s.io/v1beta1", "Gateway"): gateway_from_k8s,
    **{(f"security.istio.io/{v}", k): f for v in ("v1", "v1beta1") for k, f in _SECURITY.items()},
    (WAF_API_VERSION, "WafPolicy"): waf_policy_from_k8s,
}


# The groups whose kinds we read: there, a kind we read at a version we do not (or, in
# security.istio.io, a kind that does not exist) is a mistake to refuse, not an object to skip.
# Other kinds of these groups (HTTPRoute, ConfigMap, ...) and every other group are skipped.
_VERSIONS: Mapping[tuple[str, str], tuple[str, ...]] = (
    {("", kind): ("v1",) for kind in ("Node", "Namespace", "ServiceAccount", "Pod", "Service", "ConfigMap")}
    | {("gateway.networking.k8s.io", "Gateway"): ("v1", "v1beta1")}
    | {("security.istio.io", kind): ("v1", "v1beta1") for kind in _SECURITY}
    | {("extensions.ambient-mesh.io", "WafPolicy"): ("v1alpha1",)}
)
_CLOSED_GROUPS = ("security.istio.io", "extensions.ambient-mesh.io")
# Kinds refused in any other group: skipping one with a mistyped group ("security.istio.i/v1")
# would silently remove a security policy. (Gateway and Service are left alone: Istio's own
# networking.istio.io Gateway and Knative's Service are other objects of those names.)
_SECURITY_KINDS = frozenset(_SECURITY)
KINDS = frozenset(kind for _, kind in _VERSIONS)


def type_of(obj: Mapping[str, Any]) -> tuple[str, str]:
    """(apiVersion, kind), validated as present strings."""
    fields = _Fields(obj)
    return fields.text("apiVersion", required=True), fields.text("kind", required=True)


def _converter(obj: Mapping[str, Any]) -> Converter | None:
    """The converter for this object's type; None for a type we skip; ConfigError for a garbled one."""
    api_version, kind = type_of(obj)
    converter = CONVERTERS.get((api_version, kind))
    if converter is not None:
        return converter
    why = validation.api_version(api_version)
    if why is not None:
        raise ConfigError(f"{show(api_version)} is not an apiVersion: {why}", field="apiVersion")
    group = api_version.rpartition("/")[0]
    versions = _VERSIONS.get((group, kind))
    if versions is None and kind in _SECURITY_KINDS:
        group, versions = "security.istio.io", _VERSIONS["security.istio.io", kind]
    if versions is not None:
        read = " or ".join(f"{group}/{v}" if group else v for v in versions)
        raise ConfigError(f"{kind} is read as {read}, not {show(api_version)}", field="apiVersion")
    if group in _CLOSED_GROUPS:
        kinds = ", ".join(sorted(k for g, k in _VERSIONS if g == group))
        raise ConfigError(f"{group} has no kind {show(kind)} (it has {kinds})", field="kind")
    return None


def is_supported(obj: Mapping[str, Any]) -> bool:
    """Whether :func:`convert` turns this object into something (else the caller ignores it)."""
    converter = CONVERTERS.get(type_of(obj))
    return converter is not None and (converter is not mesh_config_from_configmap or is_mesh_configmap(obj))


def describe(obj: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """Best-effort (kind, "namespace/name" or "name") for error messages; never raises.

    Both are cut to a bounded length: they go into every message about the object.
    """
    kind = clip(obj["kind"], 100) if isinstance(obj.get("kind"), str) else None
    md = obj.get("metadata")
    if not isinstance(md, Mapping) or not isinstance(md.get("name"), str):
        return kind, None
    ns = md.get("namespace")
    name: str = clip(md["name"], 260)
    if kind in _CLUSTER_SCOPED:
        pass  # the API server drops a namespace given to a cluster-scoped object
    elif isinstance(ns, str) and ns:
        name = f"{clip(ns, 70)}/{name}"
    else:
        name = f"{DEFAULT_NAMESPACE}/{name}"
    return kind, name


def identify(obj: Mapping[str, Any]) -> tuple[str, str] | None:
    """(kind, "namespace/name" or "name") when the object surely means that object of a kind we
    read (its kind, name and namespace are valid, whatever else is wrong with it); else None.

    What a loader needs to keep the last good version of an object it must refuse.
    """
    kind = obj.get("kind")
    md = obj.get("metadata")
    if not isinstance(kind, str) or kind not in KINDS or not isinstance(md, Mapping):
        return None
    name, ns = md.get("name"), md.get("namespace", DEFAULT_NAMESPACE)
    if not isinstance(name, str) or _name_problem(kind, name) is not None:
        return None
    if kind in _CLUSTER_SCOPED:
        return kind, name
    if not isinstance(ns, str) or validation.dns1123_label(ns or DEFAULT_NAMESPACE) is not None:
        return None
    return kind, f"{ns or DEFAULT_NAMESPACE}/{name}"


def object_id(obj: MeshObject) -> tuple[str, str]:
    """What :func:`identify` says for the Kubernetes object ``obj`` was converted from."""
    if isinstance(obj, Workload):
        return "Pod", f"{obj.namespace}/{obj.name}"
    return obj.KIND.value, obj.key


def convert(obj: Mapping[str, Any], options: ConvertOptions | None = None) -> MeshObject | None:
    """Convert one Kubernetes object; None for kinds the mesh does not use.

    Raises :class:`ConfigError` (with kind and name filled in when known) for a bad object.
    """
    if not isinstance(obj, Mapping):
        raise ConfigError(f"must be a mapping (a Kubernetes object), got {_type_name(obj)}")
    kind, name = describe(obj)
    options = options or ConvertOptions()
    try:
        converter = _converter(obj)
        if converter is None or (converter is mesh_config_from_configmap and not is_mesh_configmap(obj)):
            return None
        if options.reject_unknown_fields:
            unknown = validation.unknown_field(obj, validation.SCHEMAS[obj["kind"]])
            if unknown is not None:
                raise ConfigError(unknown.reason, field=_join(unknown.path, clip(unknown.name, 100)))
        return converter(_Fields(obj), options)
    except ConfigError as e:
        raise e.with_context(kind=kind, name=name) from None
