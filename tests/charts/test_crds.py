"""The base chart's CRDs: structural, valid CustomResourceDefinitions whose schemas (and CEL
rules) admit well-formed policies and refuse malformed ones, checked offline (crdschema.py)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.charts.conftest import load
from tests.charts.crdschema import admission_errors, crd_version_schema, structural_problems
from tests.charts.helm import Helm, validate_k8s

SECURITY_KINDS = ("AuthorizationPolicy", "PeerAuthentication", "RequestAuthentication")


def test_crds_are_structural_and_served_as_istio_serves_them(base_crds: dict[str, dict[str, Any]]) -> None:
    assert set(base_crds) == {*SECURITY_KINDS, "WafPolicy"}
    for kind, crd in base_crds.items():
        validate_k8s(crd, "1.27.0")
        assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        versions = {v["name"]: v for v in crd["spec"]["versions"]}
        if kind in SECURITY_KINDS:
            assert crd["spec"]["group"] == "security.istio.io"
            assert set(versions) == {"v1", "v1beta1"}
            assert versions["v1"]["storage"] and not versions["v1beta1"]["storage"]
            # Same schema in both versions: no conversion webhook needed.
            assert versions["v1"]["schema"] == versions["v1beta1"]["schema"]
        else:
            assert crd["metadata"]["name"] == "wafpolicies.extensions.ambient-mesh.io"
            assert set(versions) == {"v1alpha1"}
        for v in versions.values():
            assert v["served"] and v["subresources"] == {"status": {}}
            assert structural_problems(v["schema"]["openAPIV3Schema"]) == []


def test_structural_checker_catches_non_structural_schemas() -> None:
    bad = {
        "type": "object",
        "properties": {
            "a": {"properties": {"b": {"type": "string"}}},
            "c": {"type": "string", "oneOf": [{"type": "string"}]},
            "d": {"type": "object", "x-kubernetes-validations": [{"rule": "self.(", "message": "m"}]},
        },
    }
    problems = structural_problems(bad)
    assert any(".a: no type" in p for p in problems)
    assert any("type not allowed inside a logical junctor" in p for p in problems)
    assert any("does not compile" in p for p in problems)


def test_keep_annotation_can_be_turned_off(helm: Helm) -> None:
    docs = helm.template("base", {"crds": {"keepOnUninstall": False, "wafPolicy": False}})
    assert len(docs) == 3
    assert all("annotations" not in d["metadata"] for d in docs)


def obj(kind: str, spec: Any, version: str = "v1") -> dict[str, Any]:
    group = "extensions.ambient-mesh.io" if kind == "WafPolicy" else "security.istio.io"
    return {"apiVersion": f"{group}/{version}", "kind": kind, "metadata": {"name": "x", "namespace": "shop"}, "spec": spec}


GOOD = [
    ("AuthorizationPolicy", {}),
    (
        "AuthorizationPolicy",
        {
            "selector": {"matchLabels": {"app": "web"}},
            "action": "ALLOW",
            "rules": [
                {
                    "from": [{"source": {"principals": ["cluster.local/ns/shop/sa/frontend"], "ipBlocks": ["10.0.0.0/8"]}}],
                    "to": [{"operation": {"ports": ["8080"], "methods": ["GET"], "paths": ["/api/*"]}}],
                    "when": [{"key": "source.ip", "values": ["10.1.2.3"]}],
                }
            ],
        },
    ),
    ("AuthorizationPolicy", {"targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "waypoint"}], "action": "DENY", "rules": [{"from": [{"source": {"serviceAccounts": ["shop/bot"]}}]}]}),
    ("AuthorizationPolicy", {"action": "CUSTOM", "provider": {"name": "ext-authz"}, "rules": [{}]}),
    ("PeerAuthentication", {"mtls": {"mode": "STRICT"}}),
    ("PeerAuthentication", {"selector": {"matchLabels": {"app": "db"}}, "mtls": {"mode": "PERMISSIVE"}, "portLevelMtls": {"5432": {"mode": "DISABLE"}}}),
    ("RequestAuthentication", {"selector": {"matchLabels": {"app": "web"}}, "jwtRules": [{"issuer": "https://issuer.example", "jwksUri": "https://issuer.example/jwks", "audiences": ["shop"], "fromHeaders": [{"name": "x-jwt", "prefix": "Bearer "}], "outputClaimToHeaders": [{"header": "x-sub", "claim": "sub"}], "timeout": "1.5s", "forwardOriginalToken": True}]}),
    ("WafPolicy", {"targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "waypoint"}], "mode": "Enforce"}),
    (
        "WafPolicy",
        {
            "targetRefs": [{"kind": "Service", "name": "web"}],
            "mode": "DetectOnly",
            "paranoiaLevel": 2,
            "anomalyThresholds": {"inbound": 10, "outbound": 8},
            "ruleExclusions": [{"id": 942100}, {"tag": "attack-sqli"}],
            "bodies": {"inspectContentTypes": ["application/json", "application/x-www-form-urlencoded"], "limitBytes": 131072, "onLimit": "Reject"},
            "extraRules": ['SecRule ARGS:debug "@streq 1" "id:1000001,phase:1,deny,status:403"'],
        },
    ),
]

# (kind, spec, what the refusal must mention)
BAD = [
    ("AuthorizationPolicy", {"action": "DENI"}, "is not one of"),
    ("AuthorizationPolicy", {"action": "allow"}, "is not one of"),
    ("AuthorizationPolicy", {"rules": [{"from": [{"source": {"principal": ["x"]}}]}]}, "Additional properties"),
    ("AuthorizationPolicy", {"rules": {"from": []}}, "is not of type 'array'"),
    ("AuthorizationPolicy", {"rules": [{"to": [{"operation": {"ports": [8080]}}]}]}, "is not of type 'string'"),
    ("AuthorizationPolicy", {"rules": [{"when": [{"values": ["a"]}]}]}, "'key' is a required property"),
    ("AuthorizationPolicy", {"selector": {"matchLabels": {"app": "web"}}, "targetRefs": [{"kind": "Gateway", "name": "w"}]}, "only one of targetRefs or selector"),
    ("AuthorizationPolicy", {"targetRefs": [{"kind": "Gateway"}]}, "'name' is a required property"),
    ("AuthorizationPolicy", {"targetRefs": [{"kind": "Gateway", "name": "w", "namespace": "other"}]}, "cross namespace"),
    ("AuthorizationPolicy", {"selector": {"matchLabels": {"app": "web*"}}}, "wildcard not allowed in label value"),
    ("AuthorizationPolicy", {"selector": {"matchLabels": {"": "web"}}}, "key must not be empty"),
    ("AuthorizationPolicy", {"rules": [{"from": [{"source": {"serviceAccounts": ["shop/a"], "namespaces": ["shop"]}}]}]}, "Cannot set serviceAccounts"),
    ("AuthorizationPolicy", {"rules": [{"from": [{"source": {"serviceAccounts": [f"ns/sa{i}" for i in range(17)]}}]}]}, "is too long"),
    ("AuthorizationPolicy", {"action": "CUSTOM"}, "provider must be set exactly when action is CUSTOM"),
    ("AuthorizationPolicy", {"action": "DENY", "provider": {"name": "x"}}, "provider must be set exactly when action is CUSTOM"),
    ("AuthorizationPolicy", {"unknownField": 1}, "Additional properties"),
    ("PeerAuthentication", {"mtls": {"mode": "STRICTLY"}}, "is not one of"),
    ("PeerAuthentication", {"mtls": "STRICT"}, "is not of type 'object'"),
    ("PeerAuthentication", {"portLevelMtls": {"8080": {"mode": "DISABLE"}}}, "portLevelMtls requires selector"),
    ("PeerAuthentication", {"selector": {"matchLabels": {"app": "db"}}, "portLevelMtls": {"70000": {"mode": "DISABLE"}}}, "port must be between 1-65535"),
    ("PeerAuthentication", {"selector": {"matchLabels": {"app": "db"}}, "portLevelMtls": {"http": {"mode": "DISABLE"}}}, "port must be between 1-65535"),
    ("PeerAuthentication", {"selector": {"matchLabels": {"app": "db"}}, "portLevelMtls": {}}, "should be non-empty"),
    ("RequestAuthentication", {"jwtRules": [{"jwksUri": "https://x/jwks"}]}, "'issuer' is a required property"),
    ("RequestAuthentication", {"jwtRules": [{"issuer": ""}]}, "should be non-empty"),
    ("RequestAuthentication", {"jwtRules": [{"issuer": "i", "jwksUri": "ftp://x/jwks"}]}, "does not match"),
    ("RequestAuthentication", {"jwtRules": [{"issuer": "i", "jwksUri": "https://x/jwks", "jwks": "{}"}]}, "only one of jwks or jwksUri"),
    ("RequestAuthentication", {"jwtRules": [{"issuer": "i", "timeout": "soon"}]}, "does not match"),
    ("RequestAuthentication", {"jwtRules": [{"issuer": "i", "outputClaimToHeaders": [{"header": "x y", "claim": "sub"}]}]}, "does not match"),
    ("WafPolicy", {"mode": "Enforce"}, "'targetRefs' is a required property"),
    ("WafPolicy", {"targetRefs": [{"kind": "Service", "name": "web"}]}, "'mode' is a required property"),
    ("WafPolicy", {"targetRefs": [{"kind": "Service", "name": "web"}], "mode": "On"}, "is not one of"),
    ("WafPolicy", {"targetRefs": [{"kind": "Service", "name": "web"}], "mode": True}, "is not one of"),
    ("WafPolicy", {"targetRefs": [], "mode": "Enforce"}, "should be non-empty"),
    ("WafPolicy", {"targetRefs": [{"kind": "Deployment", "name": "web"}], "mode": "Enforce"}, "is not one of"),
    ("WafPolicy", {"targetRefs": [{"kind": "Gateway", "name": "w"}], "mode": "Enforce"}, "a Gateway is in group gateway.networking.k8s.io"),
    ("WafPolicy", {"targetRefs": [{"kind": "Service", "name": "web"}], "mode": "Enforce", "paranoiaLevel": 5}, "is greater than the maximum"),
    ("WafPolicy", {"targetRefs": [{"kind": "Service", "name": "web"}], "mode": "Enforce", "paranoiaLevel": 0}, "is less than the minimum"),
    ("WafPolicy", {"targetRefs": [{"kind": "Service", "name": "web"}], "mode": "Enforce", "anomalyThresholds": {"inbound": 0}}, "is less than the minimum"),
    ("WafPolicy", {"targetRefs": [{"kind": "Service", "name": "web"}], "mode": "Enforce", "ruleExclusions": [{"id": 1, "tag": "x"}]}, "is valid under each of"),
    ("WafPolicy", {"targetRefs": [{"kind": "Service", "name": "web"}], "mode": "Enforce", "ruleExclusions": [{}]}, "is not valid under any of the given schemas"),
    ("WafPolicy", {"targetRefs": [{"kind": "Service", "name": "web"}], "mode": "Enforce", "bodies": {"inspectContentTypes": ["json"]}}, "does not match"),
    ("WafPolicy", {"targetRefs": [{"kind": "Service", "name": "web"}], "mode": "Enforce", "bodies": {"onLimit": "Drop"}}, "is not one of"),
    ("WafPolicy", {"targetRefs": [{"kind": "Service", "name": "web"}], "mode": "Enforce", "bodies": {"limitBytes": 0}}, "is less than the minimum"),
    ("WafPolicy", {"targetRefs": [{"kind": "Service", "name": "web"}], "mode": "Enforce", "ruleExclusions": [{"tag": "a b"}]}, "does not match"),
]


@pytest.mark.parametrize("version", ["v1", "v1beta1"])
@pytest.mark.parametrize(("kind", "spec"), GOOD, ids=[f"{k}-{i}" for i, (k, _) in enumerate(GOOD)])
def test_well_formed_objects_are_admitted(base_crds: dict[str, dict[str, Any]], kind: str, spec: Any, version: str) -> None:
    if kind == "WafPolicy":
        version = "v1alpha1"
    assert admission_errors(base_crds[kind], obj(kind, spec, version)) == []


@pytest.mark.parametrize("version", ["v1", "v1beta1"])
@pytest.mark.parametrize(("kind", "spec", "why"), BAD, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(BAD)])
def test_malformed_objects_are_refused(base_crds: dict[str, dict[str, Any]], kind: str, spec: Any, why: str, version: str) -> None:
    if kind == "WafPolicy":
        version = "v1alpha1"
    errors = admission_errors(base_crds[kind], obj(kind, spec, version))
    assert errors, f"{kind} {spec} was admitted"
    assert any(why in e for e in errors), errors


def test_status_is_open_for_the_control_plane(base_crds: dict[str, dict[str, Any]]) -> None:
    """The control plane merge-patches status.conditions (ZtunnelAccepted); unknown status
    fields written by other tools are kept, as Istio's CRDs keep them."""
    ap = base_crds["AuthorizationPolicy"]
    status = crd_version_schema(ap, "v1")["properties"]["status"]
    assert status["x-kubernetes-preserve-unknown-fields"] is True
    policy = obj("AuthorizationPolicy", {})
    policy["status"] = {
        "conditions": [{"type": "ZtunnelAccepted", "status": "True", "reason": "Accepted", "message": "attached to ztunnel", "observedGeneration": 2}],
        "somethingElse": {"x": 1},
    }
    assert admission_errors(ap, policy) == []


def test_docs_examples_are_admitted(base_crds: dict[str, dict[str, Any]]) -> None:
    """A policy exactly as a user would write it in YAML (the docs' enrollment example)."""
    policy = load(
        """
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: allow-frontend, namespace: shop}
        spec:
          selector: {matchLabels: {app: backend}}
          action: ALLOW
          rules:
            - from:
                - source: {principals: ["cluster.local/ns/shop/sa/frontend"]}
        """
    )
    assert admission_errors(base_crds["AuthorizationPolicy"], policy) == []
