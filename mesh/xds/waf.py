"""``WafPolicy`` on the wire (``ambient.waypoint.v1alpha1.WafPolicy``, ours): control plane ->
the waypoints a policy binds to. ``from_any(to_any(p)) == p``; receiving checks every field again
(:func:`mesh.model.waf.check_policy`) and names the resource and field it refuses, so a
waypoint never lowers a policy the control plane would have refused.
"""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf import any_pb2
from google.protobuf.message import DecodeError

from mesh.model.policy import PolicyTargetRef
from mesh.model.waf import BodyLimitAction, WafConfigError, WafMode, WafPolicy, check_policy
from mesh.proto import waf_pb2
from mesh.xds.convert import ConversionError

WAF_POLICY_TYPE_URL = "type.googleapis.com/ambient.waypoint.v1alpha1.WafPolicy"

_Pb = waf_pb2.WafPolicy
_MODES = {
    WafMode.ENFORCE: _Pb.ENFORCE,
    WafMode.DETECT_ONLY: _Pb.DETECT_ONLY,
    WafMode.DISABLED: _Pb.DISABLED,
}
_ACTIONS = {
    BodyLimitAction.REJECT: _Pb.REJECT,
    BodyLimitAction.PROCESS_PARTIAL: _Pb.PROCESS_PARTIAL,
}


def waf_policy_to_proto(p: WafPolicy) -> waf_pb2.WafPolicy:
    pb = _Pb(
        namespace=p.namespace,
        name=p.name,
        mode=_MODES[p.mode],
        paranoia_level=p.paranoia_level,
        inbound_anomaly_threshold=p.inbound_anomaly_threshold,
        outbound_anomaly_threshold=p.outbound_anomaly_threshold,
        exclude_rule_ids=p.exclude_rule_ids,
        exclude_rule_tags=p.exclude_rule_tags,
        extra_rules=p.extra_rules,
        request_body_limit=p.request_body_limit,
        request_body_limit_action=_ACTIONS[p.request_body_limit_action],
        inspect_content_types=p.inspect_content_types,
        creation_timestamp=int(p.creation_timestamp.timestamp()) if p.creation_timestamp else 0,
    )
    for ref in p.target_refs:
        pb.target_refs.add(group=ref.group, kind=ref.kind, name=ref.name)
    return pb


def waf_policy_to_any(p: WafPolicy) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(waf_policy_to_proto(p))
    return packed


def waf_policy_from_proto(pb: waf_pb2.WafPolicy) -> WafPolicy:
    where = f"WafPolicy {pb.namespace}/{pb.name}"
    if not pb.namespace or not pb.name:
        raise ConversionError("WafPolicy: namespace and name are required")
    modes = {v: k for k, v in _MODES.items()}
    actions = {v: k for k, v in _ACTIONS.items()}
    if pb.mode not in modes:
        raise ConversionError(f"{where}: spec.mode: unknown value {pb.mode}")
    if pb.request_body_limit_action not in actions:
        raise ConversionError(f"{where}: spec.bodies.onLimit: unknown value {pb.request_body_limit_action}")
    policy = WafPolicy(
        namespace=pb.namespace,
        name=pb.name,
        target_refs=tuple(PolicyTargetRef(kind=t.kind, name=t.name, group=t.group) for t in pb.target_refs),
        mode=modes[pb.mode],
        paranoia_level=pb.paranoia_level,
        inbound_anomaly_threshold=pb.inbound_anomaly_threshold,
        outbound_anomaly_threshold=pb.outbound_anomaly_threshold,
        exclude_rule_ids=tuple(pb.exclude_rule_ids),
        exclude_rule_tags=tuple(pb.exclude_rule_tags),
        extra_rules=tuple(pb.extra_rules),
        request_body_limit=pb.request_body_limit,
        request_body_limit_action=actions[pb.request_body_limit_action],
        inspect_content_types=tuple(pb.inspect_content_types),
        creation_timestamp=(
            datetime.fromtimestamp(pb.creation_timestamp, UTC) if pb.creation_timestamp else None
        ),
    )
    try:
        check_policy(policy)
    except WafConfigError as e:
        raise ConversionError(f"{where}: {e}") from None
    return policy


def waf_policy_from_any(packed: any_pb2.Any, name: str) -> WafPolicy:
    if packed.type_url != WAF_POLICY_TYPE_URL:
        raise ConversionError(f"{name}: expected {WAF_POLICY_TYPE_URL}, got {packed.type_url}")
    pb = _Pb()
    try:
        pb.ParseFromString(packed.value)
    except DecodeError as e:
        raise ConversionError(f"{name}: not a WafPolicy: {e}") from None
    policy = waf_policy_from_proto(pb)
    if policy.key != name:
        raise ConversionError(f"{name}: resource name does not match the policy ({policy.key})")
    return policy
