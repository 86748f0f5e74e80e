"""Waypoint policies on the wire: ``AuthorizationPolicy`` (the model) <-> ``WaypointPolicy``.

A waypoint enforces a policy as written, every L7 field included, so it receives the user's spec
in istio/api's own message (``istio.security.v1beta1.AuthorizationPolicy``) wrapped with the
metadata that matters (namespace, name, dry-run, creation time). Nothing is lowered here; the
control plane only chooses which waypoints receive which policy. Both directions are pure and
``from_any(to_any(p)) == p``; receiving validates and names the resource and field it refuses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from datetime import UTC, datetime

from google.protobuf import any_pb2

from mesh.model.policy import (
    AuthorizationAction,
    AuthorizationPolicy,
    Condition,
    Operation,
    PolicyTargetRef,
    Rule,
    RuleFrom,
    RuleTo,
    Source,
    WorkloadSelector,
)
from mesh.proto import security_pb2, selector_pb2, waypoint_pb2
from mesh.xds.convert import ConversionError

WAYPOINT_POLICY_TYPE_URL = "type.googleapis.com/ambient.waypoint.v1alpha1.WaypointPolicy"

_SOURCE_FIELDS = tuple(f.name for f in dataclasses.fields(Source))
_OPERATION_STR_FIELDS = tuple(
    f.name for f in dataclasses.fields(Operation) if f.name not in ("ports", "not_ports")
)
_ACTIONS = {
    AuthorizationAction.ALLOW: security_pb2.AuthorizationPolicy.ALLOW,
    AuthorizationAction.DENY: security_pb2.AuthorizationPolicy.DENY,
    AuthorizationAction.AUDIT: security_pb2.AuthorizationPolicy.AUDIT,
    AuthorizationAction.CUSTOM: security_pb2.AuthorizationPolicy.CUSTOM,
}
_ACTION_OF = {v: k for k, v in _ACTIONS.items()}


def _spec_to_proto(p: AuthorizationPolicy) -> security_pb2.AuthorizationPolicy:
    spec = security_pb2.AuthorizationPolicy(action=_ACTIONS[p.action])
    if p.selector is not None:
        spec.selector.CopyFrom(selector_pb2.WorkloadSelector(match_labels=dict(p.selector.match_labels)))
    for ref in p.target_refs:
        spec.targetRefs.add(group=ref.group, kind=ref.kind, name=ref.name, namespace=ref.namespace)
    if p.provider is not None:
        spec.provider.name = p.provider
    for r in p.rules:
        rule = spec.rules.add()
        for f in r.from_:
            src = getattr(rule, "from").add().source
            for name in _SOURCE_FIELDS:
                getattr(src, name).extend(getattr(f.source, name))
        for t in r.to:
            op = rule.to.add().operation
            for name in _OPERATION_STR_FIELDS:
                getattr(op, name).extend(getattr(t.operation, name))
            op.ports.extend(str(n) for n in t.operation.ports)
            op.not_ports.extend(str(n) for n in t.operation.not_ports)
        for c in r.when:
            rule.when.add(key=c.key, values=c.values, not_values=c.not_values)
    return spec


def waypoint_policy_to_proto(p: AuthorizationPolicy) -> waypoint_pb2.WaypointPolicy:
    return waypoint_pb2.WaypointPolicy(
        namespace=p.namespace,
        name=p.name,
        spec=_spec_to_proto(p),
        dry_run=p.dry_run,
        creation_timestamp=int(p.creation_timestamp.timestamp()) if p.creation_timestamp is not None else 0,
    )


def waypoint_policy_to_any(p: AuthorizationPolicy) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(waypoint_policy_to_proto(p))
    return packed


def _ports(values: Iterable[str], where: str) -> tuple[int, ...]:
    out = []
    for i, v in enumerate(values):
        if not v.isdigit() or not 0 <= int(v) <= 65535:
            raise ConversionError(f"{where}[{i}]: {v!r} is not a port number")
        out.append(int(v))
    return tuple(out)


def _rule_from_proto(pb: security_pb2.Rule, where: str) -> Rule:
    froms = []
    for i, f in enumerate(getattr(pb, "from")):
        froms.append(RuleFrom(Source(**{name: tuple(getattr(f.source, name)) for name in _SOURCE_FIELDS})))
        if f.source.trust_domains or f.source.not_trust_domains:
            raise ConversionError(f"{where}.from[{i}].source: trust_domains is not supported")
    tos = []
    for i, t in enumerate(pb.to):
        o = t.operation
        values: dict[str, tuple[str, ...] | tuple[int, ...]] = {
            name: tuple(getattr(o, name)) for name in _OPERATION_STR_FIELDS
        }
        values["ports"] = _ports(o.ports, f"{where}.to[{i}].operation.ports")
        values["not_ports"] = _ports(o.not_ports, f"{where}.to[{i}].operation.not_ports")
        tos.append(RuleTo(Operation(**values)))  # type: ignore[arg-type]
    whens = []
    for i, c in enumerate(pb.when):
        if not c.key:
            raise ConversionError(f"{where}.when[{i}].key: empty")
        whens.append(Condition(key=c.key, values=tuple(c.values), not_values=tuple(c.not_values)))
    return Rule(from_=tuple(froms), to=tuple(tos), when=tuple(whens))


def waypoint_policy_from_proto(pb: waypoint_pb2.WaypointPolicy) -> AuthorizationPolicy:
    where = f"waypoint policy {pb.namespace or '?'}/{pb.name or '?'}"
    if not pb.namespace or not pb.name:
        raise ConversionError(f"{where}: namespace and name are required")
    spec = pb.spec
    if spec.action not in _ACTION_OF:
        raise ConversionError(f"{where}.spec.action: {spec.action} is not ALLOW, DENY, AUDIT or CUSTOM")
    action = _ACTION_OF[spec.action]
    refs = [*([spec.targetRef] if spec.HasField("targetRef") else []), *spec.targetRefs]
    for i, t in enumerate(refs):
        if not t.kind or not t.name:
            raise ConversionError(f"{where}.spec.targetRefs[{i}]: kind and name are required")
    provider = spec.provider.name if spec.HasField("provider") else None
    return AuthorizationPolicy(
        namespace=pb.namespace,
        name=pb.name,
        selector=WorkloadSelector(dict(spec.selector.match_labels)) if spec.HasField("selector") else None,
        target_refs=tuple(
            PolicyTargetRef(kind=t.kind, name=t.name, group=t.group, namespace=t.namespace) for t in refs
        ),
        action=action,
        provider=provider,
        rules=tuple(_rule_from_proto(r, f"{where}.spec.rules[{i}]") for i, r in enumerate(spec.rules)),
        creation_timestamp=datetime.fromtimestamp(pb.creation_timestamp, UTC)
        if pb.creation_timestamp
        else None,
        dry_run=pb.dry_run,
    )


def waypoint_policy_from_any(packed: any_pb2.Any, name: str) -> AuthorizationPolicy:
    pb = waypoint_pb2.WaypointPolicy()
    if not packed.Unpack(pb):
        raise ConversionError(f"waypoint policy {name}: holds {packed.type_url}, not a WaypointPolicy")
    policy = waypoint_policy_from_proto(pb)
    if policy.key != name:
        raise ConversionError(f"waypoint policy {name}: the resource holds {policy.key}")
    return policy
