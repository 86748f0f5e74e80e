"""Waypoint policies on the wire: ``AuthorizationPolicy`` (the model) <-> ``WaypointPolicy``, and
``RequestAuthentication`` with its fetched keys <-> ``WaypointAuthentication``.

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
from typing import Any

from google.protobuf import any_pb2

from mesh.model.policy import (
    AuthorizationAction,
    AuthorizationPolicy,
    ClaimToHeader,
    Condition,
    JwtHeader,
    JwtRule,
    Operation,
    PolicyTargetRef,
    RequestAuthentication,
    Rule,
    RuleFrom,
    RuleTo,
    Source,
    WorkloadSelector,
)
from mesh.proto import security_pb2, selector_pb2, waypoint_pb2
from mesh.xds.convert import ConversionError
from mesh.xds.state import WaypointAuthentication

WAYPOINT_POLICY_TYPE_URL = "type.googleapis.com/ambient.waypoint.v1alpha1.WaypointPolicy"
WAYPOINT_AUTHN_TYPE_URL = "type.googleapis.com/ambient.waypoint.v1alpha1.WaypointAuthentication"

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
    _refs_to_proto(p.target_refs, spec.targetRefs)
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
    provider = spec.provider.name if spec.HasField("provider") else None
    return AuthorizationPolicy(
        namespace=pb.namespace,
        name=pb.name,
        selector=WorkloadSelector(dict(spec.selector.match_labels)) if spec.HasField("selector") else None,
        target_refs=_refs_from_proto(spec, where),
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


# --- RequestAuthentication -------------------------------------------------------------------------


def _refs_to_proto(refs: Iterable[PolicyTargetRef], out: Any) -> None:
    for ref in refs:
        out.add(group=ref.group, kind=ref.kind, name=ref.name, namespace=ref.namespace)


def _refs_from_proto(pb: Any, where: str) -> tuple[PolicyTargetRef, ...]:
    refs = [*([pb.targetRef] if pb.HasField("targetRef") else []), *pb.targetRefs]
    for i, t in enumerate(refs):
        if not t.kind or not t.name:
            raise ConversionError(f"{where}.spec.targetRefs[{i}]: kind and name are required")
    return tuple(PolicyTargetRef(kind=t.kind, name=t.name, group=t.group, namespace=t.namespace) for t in refs)


def _jwt_rule_to_proto(r: JwtRule, pb: security_pb2.JWTRule) -> None:
    pb.issuer = r.issuer
    pb.audiences.extend(r.audiences)
    pb.jwks_uri = r.jwks_uri
    pb.jwks = r.jwks
    for h in r.from_headers:
        pb.from_headers.add(name=h.name, prefix=h.prefix)
    pb.from_params.extend(r.from_params)
    pb.from_cookies.extend(r.from_cookies)
    pb.forward_original_token = r.forward_original_token
    pb.output_payload_to_header = r.output_payload_to_header
    for c in r.output_claim_to_headers:
        pb.output_claim_to_headers.add(header=c.header, claim=c.claim)
    if r.timeout is not None:
        pb.timeout.FromNanoseconds(round(r.timeout * 1e9))
    pb.space_delimited_claims.extend(r.space_delimited_claims)


def _jwt_rule_from_proto(pb: security_pb2.JWTRule, where: str) -> JwtRule:
    if not pb.issuer:
        raise ConversionError(f"{where}.issuer: required")
    for i, h in enumerate(pb.from_headers):
        if not h.name:
            raise ConversionError(f"{where}.from_headers[{i}].name: required")
    return JwtRule(
        issuer=pb.issuer,
        audiences=tuple(pb.audiences),
        jwks_uri=pb.jwks_uri,
        jwks=pb.jwks,
        from_headers=tuple(JwtHeader(h.name, h.prefix) for h in pb.from_headers),
        from_params=tuple(pb.from_params),
        forward_original_token=pb.forward_original_token,
        output_payload_to_header=pb.output_payload_to_header,
        output_claim_to_headers=tuple(ClaimToHeader(c.header, c.claim) for c in pb.output_claim_to_headers),
        from_cookies=tuple(pb.from_cookies),
        timeout=pb.timeout.ToNanoseconds() / 1e9 if pb.HasField("timeout") else None,
        space_delimited_claims=tuple(pb.space_delimited_claims),
    )


def waypoint_authn_to_any(a: WaypointAuthentication) -> any_pb2.Any:
    p = a.policy
    spec = security_pb2.RequestAuthentication()
    if p.selector is not None:
        spec.selector.CopyFrom(selector_pb2.WorkloadSelector(match_labels=dict(p.selector.match_labels)))
    _refs_to_proto(p.target_refs, spec.targetRefs)
    for r in p.jwt_rules:
        _jwt_rule_to_proto(r, spec.jwt_rules.add())
    pb = waypoint_pb2.WaypointAuthentication(
        namespace=p.namespace,
        name=p.name,
        spec=spec,
        creation_timestamp=int(p.creation_timestamp.timestamp()) if p.creation_timestamp is not None else 0,
        jwks_by_uri=dict(a.jwks_by_uri),
    )
    packed = any_pb2.Any()
    packed.Pack(pb)
    return packed


def waypoint_authn_from_any(packed: any_pb2.Any, name: str) -> WaypointAuthentication:
    pb = waypoint_pb2.WaypointAuthentication()
    if not packed.Unpack(pb):
        raise ConversionError(f"waypoint authentication {name}: holds {packed.type_url}, not a WaypointAuthentication")
    where = f"waypoint authentication {pb.namespace or '?'}/{pb.name or '?'}"
    if not pb.namespace or not pb.name:
        raise ConversionError(f"{where}: namespace and name are required")
    spec = pb.spec
    policy = RequestAuthentication(
        namespace=pb.namespace,
        name=pb.name,
        selector=WorkloadSelector(dict(spec.selector.match_labels)) if spec.HasField("selector") else None,
        target_refs=_refs_from_proto(spec, where),
        jwt_rules=tuple(_jwt_rule_from_proto(r, f"{where}.spec.jwt_rules[{i}]") for i, r in enumerate(spec.jwt_rules)),
        creation_timestamp=datetime.fromtimestamp(pb.creation_timestamp, UTC) if pb.creation_timestamp else None,
    )
    if policy.key != name:
        raise ConversionError(f"{where}: the resource is named {name}")
    return WaypointAuthentication(policy, dict(pb.jwks_by_uri))
