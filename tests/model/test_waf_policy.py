"""WafPolicy (extensions.ambient-mesh.io/v1alpha1): conversion and validation at the edge, the
local file, agreement with the CRD, and the wire codec's round trip and refusals."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.model import Kind, PolicyTargetRef
from mesh.model.waf import BodyLimitAction, WafMode, WafPolicy
from mesh.proto import waf_pb2
from mesh.xds.convert import ConversionError
from mesh.xds.waf import WAF_POLICY_TYPE_URL, waf_policy_from_any, waf_policy_to_any, waf_policy_to_proto
from sources.convert import ConfigError, ConvertOptions, convert
from sources.local import parse_manifest
from tests.charts.test_crds import GOOD

STRICT = ConvertOptions(reject_unknown_fields=True)
GW = {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "waypoint"}


def obj(spec: dict[str, Any], name: str = "waf") -> dict[str, Any]:
    return {
        "apiVersion": "extensions.ambient-mesh.io/v1alpha1",
        "kind": "WafPolicy",
        "metadata": {"name": name, "namespace": "shop", "creationTimestamp": "2026-01-02T03:04:05Z"},
        "spec": spec,
    }


FULL = {
    "targetRefs": [GW, {"kind": "Service", "name": "web"}],
    "mode": "DetectOnly",
    "paranoiaLevel": 2,
    "anomalyThresholds": {"inbound": 10, "outbound": 8},
    "ruleExclusions": [{"id": 942100}, {"tag": "attack-xss"}, {"id": 920350}],
    "bodies": {
        "inspectContentTypes": ["application/JSON", "text/*"],
        "limitBytes": 4096,
        "onLimit": "ProcessPartial",
    },
    "extraRules": ['SecRule ARGS:debug "@streq 1" "id:1000001,phase:1,deny,status:403"'],
}


def test_every_field() -> None:
    p = convert(obj(FULL), STRICT)
    assert p == WafPolicy(
        namespace="shop",
        name="waf",
        target_refs=(
            PolicyTargetRef("Gateway", "waypoint", "gateway.networking.k8s.io"),
            PolicyTargetRef("Service", "web"),
        ),
        mode=WafMode.DETECT_ONLY,
        paranoia_level=2,
        inbound_anomaly_threshold=10,
        outbound_anomaly_threshold=8,
        exclude_rule_ids=(942100, 920350),
        exclude_rule_tags=("attack-xss",),
        extra_rules=('SecRule ARGS:debug "@streq 1" "id:1000001,phase:1,deny,status:403"',),
        request_body_limit=4096,
        request_body_limit_action=BodyLimitAction.PROCESS_PARTIAL,
        inspect_content_types=("application/json", "text/*"),
        creation_timestamp=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
    )
    assert p.KIND is Kind.WAF_POLICY and p.key == "shop/waf"


def test_defaults() -> None:
    p = convert(obj({"targetRefs": [GW], "mode": "Enforce"}), STRICT)
    assert isinstance(p, WafPolicy)
    assert (p.mode, p.paranoia_level, p.inbound_anomaly_threshold, p.outbound_anomaly_threshold) == (
        WafMode.ENFORCE, 1, 5, 4,
    )  # fmt: skip
    assert (p.request_body_limit, p.request_body_limit_action, p.inspect_content_types) == (
        131072, BodyLimitAction.REJECT, (),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("change", "field", "reason"),
    [
        ({"mode": None}, "spec.mode", "required"),
        ({"mode": True}, "spec.mode", "YAML reads On/Off as booleans"),
        ({"mode": "On"}, "spec.mode", "is not one of Enforce, DetectOnly, Disabled"),
        ({"targetRefs": []}, "spec.targetRefs", "required"),
        ({"targetRefs": [{"kind": "Gateway", "name": "w"}]}, "spec.targetRefs[0]", "a waypoint Gateway"),
        (
            {"targetRefs": [{"kind": "Deployment", "name": "w"}]},
            "spec.targetRefs[0]",
            "got kind 'Deployment'",
        ),
        ({"targetRefs": [{"kind": "Service"}]}, "spec.targetRefs[0].name", "required"),
        ({"paranoiaLevel": 5}, "spec.paranoiaLevel", "whole number 1-4"),
        ({"paranoiaLevel": "2"}, "spec.paranoiaLevel", "got string"),
        ({"anomalyThresholds": {"inbound": 0}}, "spec.anomalyThresholds.inbound", "whole number 1-10000"),
        ({"ruleExclusions": [{"id": 1, "tag": "x"}]}, "spec.ruleExclusions[0]", "exactly one of"),
        ({"ruleExclusions": [{}]}, "spec.ruleExclusions[0]", "exactly one of"),
        ({"ruleExclusions": [{"id": 10**8}]}, "spec.ruleExclusions[0].id", "whole number 1-9999999"),
        ({"ruleExclusions": [{"tag": "a b"}]}, "spec.ruleExclusions[0].tag", "not a rule tag"),
        ({"bodies": {"limitBytes": 0}}, "spec.bodies.limitBytes", "whole number 1-1073741824"),
        ({"bodies": {"onLimit": "Drop"}}, "spec.bodies.onLimit", "is not one of Reject, ProcessPartial"),
        (
            {"bodies": {"inspectContentTypes": ["json"]}},
            "spec.bodies.inspectContentTypes[0]",
            "not a media type",
        ),
        ({"extraRules": ["Include /etc/passwd"]}, "spec.extraRules[0]", "directive 'Include' is not allowed"),
        (
            {"extraRules": ['SecRule ARGS "@rx x" "id:1,exec:/bin/sh"']},
            "spec.extraRules[0]",
            "'exec:' is not allowed",
        ),
        ({"extraRules": ['SecRule REQUEST_URI "@pmFromFile x" "id:1"']}, "spec.extraRules[0]", "no files"),
        ({"extraRules": ["x" * 9000]}, "spec.extraRules[0]", "at most 8192 characters"),
        ({"extraRules": [""]}, "spec.extraRules[0]", "must not be empty"),
        (
            {"modes": "Enforce"},
            "spec.modes",
            "unknown field 'modes' of WafPolicy spec (did you mean 'mode'?)",
        ),
    ],
)
def test_bad_fields_are_named(change: dict[str, Any], field: str, reason: str) -> None:
    spec: dict[str, Any] = {"targetRefs": [GW], "mode": "Enforce", **change}
    spec = {k: v for k, v in spec.items() if v is not None}
    with pytest.raises(ConfigError) as e:
        convert(obj(spec), STRICT)
    assert e.value.field == field and reason in e.value.reason, str(e.value)
    assert str(e.value).startswith("WafPolicy shop/waf: ")


def test_apiversion_and_kind_are_checked() -> None:
    bad = obj({"targetRefs": [GW], "mode": "Enforce"})
    bad["apiVersion"] = "extensions.ambient-mesh.io/v1"
    with pytest.raises(ConfigError, match="WafPolicy is read as extensions.ambient-mesh.io/v1alpha1"):
        convert(bad)
    bad["apiVersion"], bad["kind"] = "extensions.ambient-mesh.io/v1alpha1", "WafPolcy"
    with pytest.raises(ConfigError, match="extensions.ambient-mesh.io has no kind 'WafPolcy'"):
        convert(bad)


def test_the_crds_examples_convert() -> None:
    """What the CRD accepts, the converter accepts (tests/charts/test_crds.py's GOOD WafPolicies)."""
    examples = [spec for kind, spec in GOOD if kind == "WafPolicy"]
    assert examples
    for spec in examples:
        assert isinstance(convert(obj(copy.deepcopy(spec)), STRICT), WafPolicy)


def test_from_the_local_file() -> None:
    (p,) = parse_manifest(
        """\
apiVersion: extensions.ambient-mesh.io/v1alpha1
kind: WafPolicy
metadata: {name: reviews, namespace: shop}
spec:
  targetRefs: [{kind: Service, name: reviews}]
  mode: Enforce
  ruleExclusions: [{id: 942100}]
"""
    )
    assert isinstance(p, WafPolicy) and p.exclude_rule_ids == (942100,)
    with pytest.raises(
        ConfigError, match=r"spec\.mode: required: Enforce, DetectOnly or Disabled \(YAML reads On/Off"
    ):
        parse_manifest(
            "apiVersion: extensions.ambient-mesh.io/v1alpha1\nkind: WafPolicy\n"
            "metadata: {name: w, namespace: shop}\nspec: {targetRefs: [{kind: Service, name: web}], mode: On}\n"
        )


words = st.from_regex(r"[a-z][a-z0-9-]{0,12}", fullmatch=True)
policies = st.builds(
    WafPolicy,
    namespace=words,
    name=words,
    target_refs=st.lists(
        st.sampled_from(
            [
                PolicyTargetRef("Service", "web"),
                PolicyTargetRef("Gateway", "waypoint", "gateway.networking.k8s.io"),
            ]
        ),
        min_size=1,
        max_size=2,
    ).map(tuple),
    mode=st.sampled_from(list(WafMode)),
    paranoia_level=st.integers(1, 4),
    inbound_anomaly_threshold=st.integers(1, 10000),
    outbound_anomaly_threshold=st.integers(1, 10000),
    exclude_rule_ids=st.lists(st.integers(1, 9_999_999), max_size=3).map(tuple),
    exclude_rule_tags=st.lists(st.from_regex(r"[a-z][a-z/-]{0,10}", fullmatch=True), max_size=2).map(tuple),
    extra_rules=st.lists(st.just('SecRule ARGS "@rx x" "id:1000001,deny"'), max_size=2).map(tuple),
    request_body_limit=st.integers(1, 1 << 30),
    request_body_limit_action=st.sampled_from(list(BodyLimitAction)),
    inspect_content_types=st.lists(st.sampled_from(["application/json", "text/*"]), max_size=2).map(tuple),
    creation_timestamp=st.one_of(
        st.none(), st.integers(1, 2**32).map(lambda s: datetime.fromtimestamp(s, UTC))
    ),
)


@given(policies)
def test_wire_round_trip(p: WafPolicy) -> None:
    assert waf_policy_from_any(waf_policy_to_any(p), p.key) == p


def test_the_wire_is_checked_again() -> None:
    good = WafPolicy("shop", "w", (PolicyTargetRef("Service", "web"),))
    pb = waf_policy_to_proto(good)
    pb.paranoia_level = 9
    packed = waf_policy_to_any(good)
    packed.Pack(pb)
    with pytest.raises(
        ConversionError, match=r"WafPolicy shop/w: spec\.paranoiaLevel: must be an integer 1-4"
    ):
        waf_policy_from_any(packed, "shop/w")
    pb = waf_policy_to_proto(good)
    pb.extra_rules.append('SecRule ARGS "@rx x" "id:1,exec:/bin/sh"')
    packed.Pack(pb)
    with pytest.raises(ConversionError, match="'exec:' is not allowed"):
        waf_policy_from_any(packed, "shop/w")
    with pytest.raises(ConversionError, match="resource name does not match"):
        waf_policy_from_any(waf_policy_to_any(good), "shop/other")
    packed.type_url = WAF_POLICY_TYPE_URL.replace("WafPolicy", "WaypointPolicy")
    with pytest.raises(ConversionError, match="expected"):
        waf_policy_from_any(packed, "shop/w")
    assert waf_pb2.WafPolicy.DESCRIPTOR.full_name == "ambient.waypoint.v1alpha1.WafPolicy"


# --- from Kubernetes (the fake API server, through the real client) ------------------------------


def test_from_kubernetes_and_without_the_crd() -> None:
    from mesh.model import Store
    from sources.kubernetes import RESOURCES, WAF_POLICIES, Resource
    from tests.k8s.fakeapi import FakeApiServer
    from tests.k8s.helpers import running, wait_store

    assert WAF_POLICIES in RESOURCES and WAF_POLICIES.optional
    with FakeApiServer() as fake:
        fake.add(obj({"targetRefs": [GW], "mode": "DetectOnly", "ruleExclusions": [{"id": 942100}]}))
        store = Store()
        with running(fake, store):
            snap = wait_store(store, lambda s: "shop/waf" in s.waf_policies)
            p = snap.waf_policies["shop/waf"]
            assert (p.mode, p.exclude_rule_ids) == (WafMode.DETECT_ONLY, (942100,))
        # A cluster without the CRD (crds.wafPolicy: false): the API server answers 404; the
        # source still syncs, with no WafPolicy.
        missing = Resource(
            "nosuchpolicies", WAF_POLICIES.api_version, "WafPolicy", Kind.WAF_POLICY, optional=True
        )
        store = Store()
        with running(fake, store, resources=(missing,)):
            assert dict(store.snapshot().waf_policies) == {}
