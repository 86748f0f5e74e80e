"""The proxy state as readable JSON, and back: what ztunnel's ``/config_dump`` shows.

A person reads a config dump; a tool (``ambientctl policy check --admin``) rebuilds from it the
exact state a running ztunnel decides from. So the form is the wire form made readable and
nothing else: field names are those of Istio's protos (``istio.workload.Workload``,
``istio.security.Authorization``; ``ServiceAccountMatch.serviceAccount`` is spelled that way
upstream), IPs and CIDRs are text, enums are their names, string matches are one-key objects
(``{"exact": "x"}``, ``{"prefix": ..}``, ``{"suffix": ..}``, ``{"presence": {}}``), a GatewayAddress
keeps the proto's oneof (``{"hostname": {"namespace", "hostname"}}`` or ``{"address": {"network",
"address"}}``). Empty fields of an authorization ``Match`` are left out, as proto3 JSON does.

Reading is validation at the edge, as for the wire (:mod:`mesh.xds.convert`): every malformed
or unknown field raises :class:`DumpError` naming its path (``rules[0].clauses[1].matches[0]
.source_ips[2]``), and ``*_from_json(to_json(x)) == x`` for every value.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

from mesh.model.objects import DEFAULT_SERVICE_ACCOUNT, DEFAULT_TRUST_DOMAIN, TunnelProtocol, WorkloadStatus
from mesh.xds.authorization import (
    Action,
    Authorization,
    Clause,
    IPNetwork,
    Match,
    MatchKind,
    Rule,
    Scope,
    ServiceAccountMatch,
    StringMatch,
)
from mesh.xds.state import HBONE_PORT, AppProtocol, GatewayAddress, Port, Service, Workload

__all__ = [
    "DumpError",
    "authorization_from_json",
    "service_from_json",
    "to_json",
    "workload_from_json",
]

JSON = dict[str, Any]
_E = TypeVar("_E", bound=enum.Enum)
_T = TypeVar("_T")

_STRING_FIELDS = ("namespaces", "not_namespaces", "principals", "not_principals")
_IP_FIELDS = ("source_ips", "not_source_ips", "destination_ips", "not_destination_ips")
_PORT_FIELDS = ("destination_ports", "not_destination_ports")
_SA_FIELDS = ("service_accounts", "not_service_accounts")
_MATCH_FIELDS = (*_STRING_FIELDS, *_IP_FIELDS, *_PORT_FIELDS, *_SA_FIELDS)

_HOST_NETWORK, _STANDARD = "HOST_NETWORK", "STANDARD"  # istio.workload.NetworkMode


class DumpError(ValueError):
    """A JSON value is not a valid proxy-state value; ``path`` names the bad field."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}" if path else reason)


# --- to JSON ---------------------------------------------------------------------------------


def to_json(value: Workload | Service | Authorization) -> JSON:
    """The readable JSON form of a proxy-state value (a fresh dict, safe to extend)."""
    if isinstance(value, Workload):
        return _workload(value)
    if isinstance(value, Service):
        return _service(value)
    if isinstance(value, Authorization):
        return _authorization(value)
    raise TypeError(f"to_json: not a Workload, Service or Authorization: {type(value).__name__}")


def _port(p: Port) -> JSON:
    return {"service_port": p.service_port, "target_port": p.target_port, "app_protocol": p.app_protocol.name}


def _gateway(gw: GatewayAddress | None) -> JSON | None:
    if gw is None:
        return None
    # As on the wire (mesh.xds.convert.gateway_to_proto): a hostname wins over an address.
    if gw.hostname:
        return {
            "hostname": {"namespace": gw.namespace, "hostname": gw.hostname},
            "hbone_mtls_port": gw.hbone_port,
        }
    return {"address": {"network": gw.network, "address": gw.address}, "hbone_mtls_port": gw.hbone_port}


def _workload(w: Workload) -> JSON:
    return {
        "uid": w.uid,
        "name": w.name,
        "namespace": w.namespace,
        "addresses": list(w.addresses),
        "node": w.node,
        "network": w.network,
        "tunnel_protocol": w.tunnel_protocol.name,
        "trust_domain": w.trust_domain,
        "service_account": w.service_account,
        "waypoint": _gateway(w.waypoint),
        "waypoint_strict": w.waypoint_strict,
        "waypoint_account_for": w.waypoint_account_for,
        "services": {key: [_port(p) for p in ports] for key, ports in w.services.items()},
        "authorization_policies": list(w.authorization_policies),
        "status": w.status.name,
        "canonical_name": w.canonical_name,
        "canonical_revision": w.canonical_revision,
        "workload_name": w.workload_name,
        "cluster_id": w.cluster_id,
        "network_mode": _HOST_NETWORK if w.host_network else _STANDARD,
    }


def _service(s: Service) -> JSON:
    return {
        "name": s.name,
        "namespace": s.namespace,
        "hostname": s.hostname,
        "addresses": list(s.vips),
        "ports": [_port(p) for p in s.ports],
        "waypoint": _gateway(s.waypoint),
    }


def _string_match(m: StringMatch) -> JSON:
    if m.kind is MatchKind.PRESENCE:
        return {"presence": {}}
    return {m.kind.value: m.value}


def _match(m: Match) -> JSON:
    out: JSON = {}
    for attr in _STRING_FIELDS:
        if values := getattr(m, attr):
            out[attr] = [_string_match(v) for v in values]
    for attr in _IP_FIELDS:
        if values := getattr(m, attr):
            out[attr] = [str(n) for n in values]
    for attr in _PORT_FIELDS:
        if values := getattr(m, attr):
            out[attr] = list(values)
    for attr in _SA_FIELDS:
        if values := getattr(m, attr):
            out[attr] = [{"namespace": s.namespace, "serviceAccount": s.service_account} for s in values]
    return out


def _authorization(a: Authorization) -> JSON:
    return {
        "name": a.name,
        "namespace": a.namespace,
        "scope": a.scope.name,
        "action": a.action.name,
        "rules": [
            {"clauses": [{"matches": [_match(m) for m in c.matches]} for c in r.clauses]} for r in a.rules
        ],
        "dry_run": a.dry_run,
    }


# --- from JSON -------------------------------------------------------------------------------


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


class _Object:
    """An object being read: typed access by key with paths, and a check for unknown keys."""

    def __init__(self, data: object, path: str) -> None:
        if not isinstance(data, Mapping):
            raise DumpError(path, f"must be an object, not {_type_name(data)}")
        for key in data:
            if not isinstance(key, str):
                raise DumpError(path, f"keys must be strings, not {_type_name(key)}")
        self.data: Mapping[str, Any] = data
        self.path = path
        self._read: set[str] = set()

    def at(self, key: str) -> str:
        return _join(self.path, key)

    def get(self, key: str, *, required: bool = False) -> Any:
        self._read.add(key)
        if key not in self.data:
            if required:
                raise DumpError(self.at(key), "required")
            return None
        return self.data[key]

    def text(self, key: str, default: str = "", *, required: bool = False, nonempty: bool = False) -> str:
        value = self.get(key, required=required)
        if value is None:
            return default
        if not isinstance(value, str):
            raise DumpError(self.at(key), f"must be a string, not {_type_name(value)}")
        if nonempty and not value:
            raise DumpError(self.at(key), "must not be empty")
        return value

    def flag(self, key: str) -> bool:
        value = self.get(key)
        if value is None:
            return False
        if not isinstance(value, bool):
            raise DumpError(self.at(key), f"must be true or false, not {_type_name(value)}")
        return value

    def enum(self, key: str, kind: type[_E], default: _E) -> _E:
        value = self.get(key)
        if value is None:
            return default
        return _enum_value(value, kind, self.at(key))

    def port(self, key: str, default: int, *, zero_ok: bool = False) -> int:
        value = self.get(key)
        return default if value is None else _port_number(value, self.at(key), zero_ok=zero_ok)

    def each(self, key: str, read: Callable[[Any, str], _T]) -> tuple[_T, ...]:
        """Each item of a list field, read; a missing or null field is empty."""
        return _each(self.get(key), self.at(key), read)

    def done(self) -> None:
        unknown = sorted(set(self.data) - self._read)
        if unknown:
            raise DumpError(self.at(unknown[0]), "unknown field")


def _items(value: object, path: str) -> Iterator[tuple[str, Any]]:
    if value is None:
        return
    if not isinstance(value, list):
        raise DumpError(path, f"must be a list, not {_type_name(value)}")
    for i, item in enumerate(value):
        yield _join(path, i), item


def _each(value: object, path: str, read: Callable[[Any, str], _T]) -> tuple[_T, ...]:
    return tuple(read(item, p) for p, item in _items(value, path))


def _enum_value(value: object, kind: type[_E], path: str) -> _E:
    names = [m.name for m in kind]
    if not isinstance(value, str) or value not in names:
        raise DumpError(path, f"must be one of {', '.join(names)}, not {value!r}")
    return kind[value]


def _port_number(value: object, path: str, *, zero_ok: bool = False) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise DumpError(path, f"must be a port number, not {_type_name(value)}")
    low = 0 if zero_ok else 1
    if not low <= value <= 65535:
        raise DumpError(path, f"port {value} is out of range ({low}-65535)")
    return value


def _text(value: object, path: str) -> str:
    if not isinstance(value, str):
        raise DumpError(path, f"must be a string, not {_type_name(value)}")
    return value


def _ip(value: object, path: str) -> str:
    text = _text(value, path)
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise DumpError(path, f"{text!r} is not an IP address") from None


def _cidr(value: object, path: str) -> IPNetwork:
    text = _text(value, path)
    try:
        return ipaddress.ip_network(text)
    except ValueError as e:
        raise DumpError(path, f"{text!r} is not a CIDR ({e})") from None


def _key(value: object, path: str, what: str) -> str:
    text = _text(value, path)
    if text.count("/") != 1 or text.startswith("/") or text.endswith("/"):
        raise DumpError(path, f"{text!r} is not <namespace>/<{what}>")
    return text


def _port_from_json(data: object, path: str) -> Port:
    o = _Object(data, path)
    port = Port(
        service_port=_port_number(o.get("service_port", required=True), o.at("service_port")),
        target_port=o.port("target_port", 0, zero_ok=True),
        app_protocol=o.enum("app_protocol", AppProtocol, AppProtocol.UNKNOWN),
    )
    o.done()
    return port


def _gateway_from_json(data: object, path: str) -> GatewayAddress | None:
    if data is None:
        return None
    o = _Object(data, path)
    port = o.port("hbone_mtls_port", HBONE_PORT)
    hostname, address = o.get("hostname"), o.get("address")
    o.done()
    if (hostname is None) == (address is None):
        raise DumpError(path, "exactly one of hostname and address is required")
    if hostname is not None:
        h = _Object(hostname, o.at("hostname"))
        gw = GatewayAddress(
            namespace=h.text("namespace", required=True, nonempty=True),
            hostname=h.text("hostname", required=True, nonempty=True),
            hbone_port=port,
        )
        h.done()
        return gw
    a = _Object(address, o.at("address"))
    gw = GatewayAddress(
        network=a.text("network"),
        address=_ip(a.get("address", required=True), a.at("address")),
        hbone_port=port,
    )
    a.done()
    return gw


def workload_from_json(data: object, path: str = "") -> Workload:
    """A workload from its :func:`to_json` form; ``path`` prefixes the field paths of errors."""
    o = _Object(data, path)
    services: dict[str, tuple[Port, ...]] = {}
    raw_services = o.get("services")
    if raw_services is not None:
        s = _Object(raw_services, o.at("services"))
        for key, ports in s.data.items():
            at = f"{s.path}[{key!r}]"
            _key(key, at, "hostname")
            services[key] = _each(ports, at, _port_from_json)
    mode = o.text("network_mode", _STANDARD)
    if mode not in (_STANDARD, _HOST_NETWORK):
        raise DumpError(o.at("network_mode"), f"must be one of {_STANDARD}, {_HOST_NETWORK}, not {mode!r}")
    w = Workload(
        uid=o.text("uid", required=True, nonempty=True),
        name=o.text("name", required=True, nonempty=True),
        namespace=o.text("namespace", required=True, nonempty=True),
        addresses=o.each("addresses", _ip),
        node=o.text("node"),
        network=o.text("network"),
        tunnel_protocol=o.enum("tunnel_protocol", TunnelProtocol, TunnelProtocol.NONE),
        trust_domain=o.text("trust_domain") or DEFAULT_TRUST_DOMAIN,
        service_account=o.text("service_account") or DEFAULT_SERVICE_ACCOUNT,
        waypoint=_gateway_from_json(o.get("waypoint"), o.at("waypoint")),
        waypoint_strict=o.flag("waypoint_strict"),
        waypoint_account_for=o.text("waypoint_account_for"),
        services=services,
        authorization_policies=o.each("authorization_policies", lambda v, p: _key(v, p, "name")),
        status=o.enum("status", WorkloadStatus, WorkloadStatus.HEALTHY),
        canonical_name=o.text("canonical_name"),
        canonical_revision=o.text("canonical_revision"),
        workload_name=o.text("workload_name"),
        cluster_id=o.text("cluster_id"),
        host_network=mode == _HOST_NETWORK,
    )
    o.done()
    return w


def service_from_json(data: object, path: str = "") -> Service:
    """A service from its :func:`to_json` form."""
    o = _Object(data, path)
    s = Service(
        name=o.text("name", required=True, nonempty=True),
        namespace=o.text("namespace", required=True, nonempty=True),
        hostname=o.text("hostname", required=True, nonempty=True),
        vips=o.each("addresses", _ip),
        ports=o.each("ports", _port_from_json),
        waypoint=_gateway_from_json(o.get("waypoint"), o.at("waypoint")),
    )
    o.done()
    return s


def _string_match_from_json(data: object, path: str) -> StringMatch:
    o = _Object(data, path)
    if len(o.data) != 1:
        raise DumpError(path, "must have exactly one of exact, prefix, suffix, presence")
    [(kind, value)] = o.data.items()
    if kind == "presence":
        if value != {}:
            raise DumpError(_join(path, kind), "must be {}")
        return StringMatch(MatchKind.PRESENCE)
    if kind not in ("exact", "prefix", "suffix"):
        raise DumpError(_join(path, kind), "unknown field (want exact, prefix, suffix or presence)")
    return StringMatch(MatchKind(kind), _text(value, _join(path, kind)))


def _service_account_from_json(data: object, path: str) -> ServiceAccountMatch:
    o = _Object(data, path)
    sa = ServiceAccountMatch(o.text("namespace", required=True), o.text("serviceAccount", required=True))
    o.done()
    return sa


def _match_from_json(data: object, path: str) -> Match:
    o = _Object(data, path)
    values: dict[str, tuple[object, ...]] = {}
    for attr in _STRING_FIELDS:
        values[attr] = o.each(attr, _string_match_from_json)
    for attr in _IP_FIELDS:
        values[attr] = o.each(attr, _cidr)
    for attr in _PORT_FIELDS:
        values[attr] = o.each(attr, _port_number)
    for attr in _SA_FIELDS:
        values[attr] = o.each(attr, _service_account_from_json)
    o.done()
    return Match(**values)  # type: ignore[arg-type]


def _clause_from_json(data: object, path: str) -> Clause:
    o = _Object(data, path)
    c = Clause(o.each("matches", _match_from_json))
    o.done()
    return c


def _rule_from_json(data: object, path: str) -> Rule:
    o = _Object(data, path)
    r = Rule(o.each("clauses", _clause_from_json))
    o.done()
    return r


def authorization_from_json(data: object, path: str = "") -> Authorization:
    """An authorization from its :func:`to_json` form."""
    o = _Object(data, path)
    a = Authorization(
        name=o.text("name", required=True, nonempty=True),
        namespace=o.text("namespace", required=True, nonempty=True),
        scope=_enum_value(o.get("scope", required=True), Scope, o.at("scope")),
        action=_enum_value(o.get("action", required=True), Action, o.at("action")),
        rules=o.each("rules", _rule_from_json),
        dry_run=o.flag("dry_run"),
    )
    o.done()
    return a
