"""Hypothesis-generated local-mode files (issue 24): no traceback, no hang, bounded memory, and
every refusal a clear error naming where.

Three generators: YAML text assembled from fragments (keys of the kinds we read, odd scalars,
anchors and aliases, flow and block style, stray document markers), valid objects with one
field mutated, and edits of a file in force (the last good version of a policy must survive
any mutation that keeps its identity). The CI profile of tests/conftest.py applies: no deadline.
"""

from __future__ import annotations

import copy
import tracemalloc
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.model import AuthorizationAction
from sources.convert import KINDS, ConfigError, ConvertOptions, convert
from sources.local import _settle, read_manifest

MAX_MESSAGE = 600

KEYS = [
    "apiVersion", "kind", "metadata", "name", "namespace", "labels", "annotations", "spec", "status",
    "nodeName", "serviceAccountName", "hostNetwork", "podIP", "podIPs", "ip", "containers", "ports",
    "port", "targetPort", "containerPort", "clusterIP", "selector", "matchLabels", "rules", "from",
    "source", "principals", "to", "operation", "when", "key", "values", "action", "mtls", "mode",
    "portLevelMtls", "jwtRules", "issuer", "listeners", "gatewayClassName", "items", "<<", "rulez",
]  # fmt: skip
SCALARS = [
    "v1", "Pod", "Service", "Node", "Namespace", "List", "AuthorizationPolicy", "security.istio.io/v1",
    "gateway.networking.k8s.io/v1", "Gateway", "PeerAuthentication", "DENY", "ALLOW", "STRICT", "web",
    "shop", "node-a", "10.0.1.2", "80", "-1", "0x10", "1e9", "true", "null", "~", "''", '""', "2001-02-30",
    "2024-05-01T12:00:00Z", "!!binary aGk=", "!!int x", "!!float .nan", "!!str 1", "é", "a: b", "[]", "{}",
    "*x", "&x", "!!python/object:os.system", "? a", "|", ">", "%", "@", "`",
]  # fmt: skip


@st.composite
def yaml_text(draw: st.DrawFn) -> str:
    """YAML-ish text: often valid, often almost; anchors and aliases included."""
    lines: list[str] = []
    anchors: list[str] = []
    for _ in range(draw(st.integers(0, 30))):
        choice = draw(st.integers(0, 9))
        indent = "  " * draw(st.integers(0, 4))
        key = draw(st.sampled_from(KEYS))
        if choice == 0:
            lines.append("---")
            anchors.clear()
        elif choice == 1 and anchors:
            lines.append(f"{indent}{key}: *{draw(st.sampled_from(anchors))}")
        elif choice == 2:
            name = f"a{len(anchors)}"
            refs = (
                ", ".join(f"*{a}" for a in draw(st.lists(st.sampled_from(anchors), max_size=6)))
                if anchors
                else "x"
            )
            lines.append(f"{indent}{key}: &{name} [{refs}]")
            anchors.append(name)
        elif choice == 3:
            lines.append(f"{indent}- {draw(st.sampled_from(SCALARS))}")
        elif choice == 4:
            inner = ", ".join(
                f"{draw(st.sampled_from(KEYS))}: {draw(st.sampled_from(SCALARS))}"
                for _ in range(draw(st.integers(0, 3)))
            )
            lines.append(f"{indent}{key}: {{{inner}}}")
        elif choice == 5:
            lines.append(f"{indent}{key}: {draw(st.text(max_size=20))!r}")
        else:
            lines.append(f"{indent}{key}: {draw(st.sampled_from(SCALARS))}")
    return "\n".join(lines) + "\n"


def check_bounded(text: str) -> None:
    manifest = read_manifest(text, source="f.yaml")
    for r in manifest.rejected:
        assert isinstance(r.error, ConfigError)
        assert len(str(r.error)) < MAX_MESSAGE, str(r.error)
        assert r.error.reason
        assert r.error.document_index is not None or r.error.source == "f.yaml"


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(yaml_text())
def test_any_text_is_read_or_refused_with_a_bounded_message(text: str) -> None:
    check_bounded(text)


@settings(max_examples=100)
@given(st.text(max_size=300))
def test_arbitrary_unicode_never_raises(text: str) -> None:
    check_bounded(text)


@settings(max_examples=25)
@given(levels=st.integers(6, 12), width=st.integers(5, 12))
def test_alias_bombs_of_any_shape_stay_bounded(levels: int, width: int) -> None:
    lines = [
        "apiVersion: v1",
        "kind: Pod",
        "metadata:",
        "  name: p",
        "  labels:",
        "    l0: &l0 [" + ", ".join(["x"] * width) + "]",
    ]
    lines += [f"    l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    tracemalloc.start()
    try:
        check_bounded("\n".join(lines) + "\n")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 50 * 1024 * 1024


# --- one field mutated in a valid object -------------------------------------------------------

VALID = [
    yaml.safe_load(t)
    for t in (
        "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop, labels: {app: web}}\n"
        "spec: {nodeName: node-a, serviceAccountName: web, containers: [{name: c, ports: [{containerPort: 80, name: http}]}]}\n"
        "status: {podIP: 10.0.1.2, podIPs: [{ip: 10.0.1.2}]}",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n"
        "spec: {clusterIP: 10.96.0.20, selector: {app: web}, ports: [{name: http, port: 80, targetPort: 8080}]}",
        "apiVersion: v1\nkind: Node\nmetadata: {name: node-a, labels: {zone: a}}\nspec: {podCIDR: 10.0.1.0/24}",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny, namespace: shop}\n"
        "spec: {action: DENY, selector: {matchLabels: {app: web}}, rules: [{from: [{source: {principals: [a/b]}}],"
        " to: [{operation: {ports: ['80']}}], when: [{key: source.ip, values: [10.0.0.1]}]}]}",
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p, namespace: shop}\n"
        "spec: {selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}, portLevelMtls: {8080: {mode: PERMISSIVE}}}",
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: r, namespace: shop}\n"
        "spec: {jwtRules: [{issuer: i, jwksUri: 'https://x/jwks', fromHeaders: [{name: a, prefix: b}]}]}",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: w, namespace: shop}\n"
        "spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}",
        "apiVersion: extensions.ambient-mesh.io/v1alpha1\nkind: WafPolicy\nmetadata: {name: waf, namespace: shop}\n"
        "spec: {targetRefs: [{kind: Service, name: web}], mode: Enforce, paranoiaLevel: 2,"
        " anomalyThresholds: {inbound: 7}, ruleExclusions: [{id: 942100}, {tag: attack-xss}],"
        " bodies: {limitBytes: 1024, onLimit: Reject, inspectContentTypes: [application/json]},"
        " extraRules: ['SecRule ARGS:debug \"@streq 1\" \"id:1000001,phase:1,deny\"']}",
    )
]
STRICT = ConvertOptions(reject_unknown_fields=True)

VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=40),
    st.sampled_from(["", "x" * 300, "Web", "a--b", "10.0.0.1", "10.0.0.0/8", "é", "*", "80", "node-a"]),
    st.lists(st.text(max_size=5), max_size=3),
    st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3),
)


def paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += paths(v, (*prefix, i))
    return out


@st.composite
def mutated(draw: st.DrawFn, base: dict[str, Any] | None = None) -> tuple[dict[str, Any], tuple[Any, ...]]:
    obj = copy.deepcopy(base if base is not None else draw(st.sampled_from(VALID)))
    path = draw(st.sampled_from(paths(obj)[1:]))
    parent = obj
    for step in path[:-1]:
        parent = parent[step]
    how = draw(st.integers(0, 2))
    last = path[-1]
    if how == 0:
        parent[last] = draw(VALUES)
    elif how == 1 and isinstance(parent, dict):
        del parent[last]
    elif isinstance(parent, dict):
        parent[draw(st.text(min_size=1, max_size=12))] = draw(VALUES)
    else:
        parent[last] = draw(VALUES)
    return obj, path


@settings(max_examples=400)
@given(mutated())
def test_a_mutated_object_converts_or_fails_naming_the_field(
    case: tuple[dict[str, Any], tuple[Any, ...]],
) -> None:
    obj, _ = case
    try:
        convert(obj, STRICT)
    except ConfigError as e:
        assert len(str(e)) < MAX_MESSAGE, str(e)
        assert e.reason
        # An error about one field says which (the object as a whole only for "missing"/"empty").
        assert e.field or e.reason.startswith(("must be a mapping", "required"))


# --- edits of a file in force ------------------------------------------------------------------

NODE = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"}}


@settings(max_examples=200)
@given(mutated(VALID[4]))
def test_a_mutation_that_keeps_a_policys_identity_never_removes_it(
    case: tuple[dict[str, Any], tuple[Any, ...]],
) -> None:
    """The last good version stays: with its kind, name and namespace unchanged, a DENY that is
    mutated into anything is either the new version or the old one — never gone."""
    obj, path = case
    deny = VALID[4]
    previous = {("AuthorizationPolicy", "shop/deny"): convert(deny)}
    assert previous[("AuthorizationPolicy", "shop/deny")] is not None
    text = yaml.safe_dump_all([NODE, obj])
    manifest = read_manifest(text, previous=previous)  # type: ignore[arg-type]
    same_identity = (
        isinstance(obj.get("metadata"), dict)
        and obj["metadata"].get("name") == "deny"
        and obj["metadata"].get("namespace") == "shop"
    )
    policies = [o for o in manifest.objects if o.KIND.value == "AuthorizationPolicy"]
    kind = obj.get("kind")
    other_kind = isinstance(kind, str) and kind != "AuthorizationPolicy" and kind in KINDS  # another object
    if (same_identity or path[0] in ("apiVersion", "kind")) and not other_kind:
        assert len(policies) == 1, manifest
        if policies[0] != previous["AuthorizationPolicy", "shop/deny"]:
            assert manifest.rejected == ()  # a new version is in force only when it is valid
            assert policies[0].action in AuthorizationAction  # type: ignore[attr-defined]


def test_settle_is_callable_on_nothing() -> None:
    assert _settle([], [], {}, "f").objects == ()
