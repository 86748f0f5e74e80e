"""The L7 engine's corners, each against the istiod or Envoy code that settles it.

Where a case looks surprising (namespace patterns, hosts with ports, requestPrincipals split at
the last slash, errors widening a DENY) it restates what ``pilot/pkg/security/authz`` generates
and Envoy then does; the module docstring of :mod:`mesh.l7authz` lists the sources.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from mesh.identity import Identity
from mesh.l7authz import (
    CompiledL7Policy,
    Headers,
    L7PolicySet,
    Request,
    compile_policy,
    evaluate,
    first_matching_rule,
    select_policies,
)
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

ALLOW, DENY, AUDIT, CUSTOM = (
    AuthorizationAction.ALLOW,
    AuthorizationAction.DENY,
    AuthorizationAction.AUDIT,
    AuthorizationAction.CUSTOM,
)
GW = PolicyTargetRef(kind="Gateway", group="gateway.networking.k8s.io", name="waypoint")


def req(
    principal: str | None = "cluster.local/ns/default/sa/sleep",
    *,
    source_ip: str = "10.0.0.5",
    remote_ip: str | None = None,
    destination_ip: str = "10.96.0.10",
    port: int = 8000,
    host: str = "httpbin.foo",
    method: str = "GET",
    path: str = "/",
    headers: Mapping[str, str | Sequence[str]] | None = None,
    claims: Mapping[str, Any] | None = None,
    request_principal: str | None = None,
    audiences: tuple[str, ...] | None = None,
    presenter: str | None = None,
    sni: str | None = None,
) -> Request:
    return Request(
        None if principal is None else Identity.parse_principal(principal),
        ipaddress.ip_address(source_ip),
        ipaddress.ip_address(destination_ip),
        port,
        host,
        method,
        path,
        Headers(headers or {}),
        remote_ip=None if remote_ip is None else ipaddress.ip_address(remote_ip),
        request_principal=request_principal,
        request_auth_claims=claims or {},
        request_auth_audiences=audiences,
        request_auth_presenter=presenter,
        sni=sni,
    )


def policy(
    *rules: Rule, action: AuthorizationAction = ALLOW, name: str = "p", dry_run: bool = False
) -> AuthorizationPolicy:
    return AuthorizationPolicy("foo", name, target_refs=(GW,), action=action, rules=rules, dry_run=dry_run)


def src(**kw: Any) -> Rule:
    return Rule(from_=(RuleFrom(Source(**kw)),))


def op(**kw: Any) -> Rule:
    return Rule(to=(RuleTo(Operation(**kw)),))


def when(key: str, values: Sequence[str] = (), not_values: Sequence[str] = ()) -> Rule:
    return Rule(when=(Condition(key, tuple(values), tuple(not_values)),))


def matches(rule: Rule, request: Request, action: AuthorizationAction = ALLOW) -> bool:
    return first_matching_rule(policy(rule, action=action), request) is not None


# --- Request and Headers --------------------------------------------------------------------------


def test_headers_are_case_insensitive_and_repeated_values_join_with_commas() -> None:
    h = Headers([("X-Token", "a"), ("x-token", "b"), ("Accept", "*/*")])
    assert h["X-TOKEN"] == ("a", "b") and "x-token" in h and len(h) == 2
    assert h.joined("x-token") == "a,b" and h.joined("missing") is None
    assert Headers({"X-A": ["1", "2"]}) == Headers([("x-a", "1"), ("x-a", "2")])
    assert hash(Headers({"a": "1"})) == hash(Headers({"A": "1"}))


def test_request_derives_once() -> None:
    r = req(
        source_ip="::ffff:10.0.0.5",
        host="HttpBin.FOO",
        claims={"iss": "i", "sub": "s", "aud": ["a", 1], "azp": "p"},
    )
    assert r.source_ip == ipaddress.ip_address("10.0.0.5") and r.remote_ip == r.source_ip
    assert r.peer_uri == "spiffe://cluster.local/ns/default/sa/sleep"
    assert (r.host_folded, r.jwt_issuer, r.jwt_subject) == ("httpbin.foo", "i", "s")
    assert (r.audiences, r.presenters, r.sni_value) == (("a",), ("p",), "")
    # Without iss/sub claims the request principal is split at its last slash.
    assert (
        req(request_principal="https://idp/x/alice").jwt_issuer,
        req(request_principal="https://idp/x/alice").jwt_subject,
    ) == (
        "https://idp/x",
        "alice",
    )
    assert req(audiences=("x",), presenter="y", claims={"aud": "z"}).audiences == ("x",)


# --- fields ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "principal", "expected"),
    [
        ("cluster.local/ns/default/sa/sleep", "cluster.local/ns/default/sa/sleep", True),
        ("cluster.local/ns/default/*", "cluster.local/ns/default/sa/sleep", True),
        ("*/sa/sleep", "example.org/ns/x/sa/sleep", True),
        ("*", "example.org/ns/x/sa/y", True),
        ("*", None, False),
        ("cluster.local/ns/default/sa/other", "cluster.local/ns/default/sa/sleep", False),
    ],
)
def test_principals(pattern: str, principal: str | None, expected: bool) -> None:
    assert matches(src(principals=(pattern,)), req(principal)) is expected
    assert matches(src(not_principals=(pattern,)), req(principal)) is not expected


@pytest.mark.parametrize(
    ("pattern", "principal", "expected"),
    [
        ("default", "cluster.local/ns/default/sa/sleep", True),
        ("def*", "cluster.local/ns/default/sa/sleep", True),
        ("*ult", "cluster.local/ns/default/sa/sleep", True),
        ("*", "cluster.local/ns/default/sa/sleep", True),
        ("prod", "cluster.local/ns/default/sa/sleep", False),
        ("*", None, False),
        ("default", None, False),
        # istiod's regex ".*/ns/<v>/.*": quirks kept on purpose.
        ("*a", "cluster.local/ns/prod/sa/x", True),  # ".*a/" eats "prod/sa/"
        ("*-a", "cluster.local/ns/prod/sa/x-a", False),
        ("sa", "cluster.local/ns/ns/sa/x", True),  # "/ns/sa/" is found after namespace "ns"
        ("ns", "ns/ns/prod/sa/x", True),  # trust domain "ns"
        ("prod/sa", "cluster.local/ns/prod/sa/x", True),
    ],
)
def test_namespaces_follow_istiods_regex(pattern: str, principal: str | None, expected: bool) -> None:
    assert matches(src(namespaces=(pattern,)), req(principal)) is expected
    assert matches(src(not_namespaces=(pattern,)), req(principal)) is not expected
    assert matches(when("source.namespace", [pattern]), req(principal)) is expected


@pytest.mark.parametrize(
    ("value", "iss", "sub", "expected"),
    [
        ("*", "https://idp", "alice", True),
        ("*", "", "alice", False),
        ("https://idp/alice", "https://idp", "alice", True),
        ("https://idp/bob", "https://idp", "alice", False),
        ("*/alice", "anything", "alice", True),
        ("*idp/alice", "https://idp", "alice", True),
        ("*idp/alice", "https://idp2", "alice", False),
        ("*ice", "any", "alice", True),  # no slash: a subject suffix
        ("https://idp/*", "https://idp", "anyone", True),
        ("https://idp/al*", "https://idp", "alice", True),
        ("https://idp/al*", "https://idp", "bob", False),
        ("https:*", "https://idp", "x", True),  # no slash: an issuer prefix "https:"
        ("https:*", "http://idp", "x", False),
    ],
)
def test_request_principals_split_at_the_last_slash(value: str, iss: str, sub: str, expected: bool) -> None:
    claims = {"iss": iss, "sub": sub}
    assert matches(src(request_principals=(value,)), req(claims=claims)) is expected
    assert matches(when("request.auth.principal", [value]), req(claims=claims)) is expected
    assert matches(src(not_request_principals=(value,)), req(claims=claims)) is not expected


def test_request_principals_need_a_token() -> None:
    assert not matches(src(request_principals=("*",)), req())
    assert matches(src(not_request_principals=("*",)), req())


def test_hosts_are_case_insensitive_and_exact_about_ports() -> None:
    assert matches(op(hosts=("Example.COM",)), req(host="example.com"))
    assert not matches(op(hosts=("example.com",)), req(host="example.com:80"))
    assert matches(op(hosts=("example.com:*",)), req(host="EXAMPLE.com:80"))
    assert matches(op(hosts=("*.example.com",)), req(host="a.EXAMPLE.com"))
    assert matches(op(hosts=("*",)), req(host=""))  # :authority is always present
    assert not matches(op(not_hosts=("*",)), req())


def test_methods_are_case_sensitive_with_patterns() -> None:
    assert matches(op(methods=("GET",)), req(method="GET"))
    assert not matches(op(methods=("get",)), req(method="GET"))
    assert matches(op(methods=("P*",)), req(method="PUT"))
    assert matches(op(methods=("*",)), req(method="ANYTHING"))
    assert matches(op(not_methods=("GET", "HEAD")), req(method="POST"))


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        ("/a", "/a", True),
        ("/a", "/a/", False),
        ("/a/*", "/a/b/c", True),
        ("*.png", "/x/y.png", True),
        ("*", "/", True),
        ("/a/{*}", "/a/b", True),
        ("/a/{*}", "/a/b/c", False),
        ("/a/{*}", "/a/", False),
        ("/a/{*}/c", "/a/b/c", True),
        ("/a/{**}", "/a/b/c", True),
        ("/a/{**}", "/a/", True),
        ("/a/{**}", "/a", False),
        ("/{*}/x/{**}", "/v1/x/y/z", True),
        ("/a/{*}", "/a/b*c", False),  # '*' is no segment character
        ("/a/{*}.txt", "/a/readme.txt", True),  # Envoy parses a literal after the glob
    ],
)
def test_paths_and_templates(pattern: str, path: str, expected: bool) -> None:
    assert matches(op(paths=(pattern,)), req(path=path)) is expected
    assert matches(op(not_paths=(pattern,)), req(path=path)) is not expected


def test_ports_and_destination_conditions() -> None:
    assert matches(op(ports=(8000,)), req(port=8000))
    assert not matches(op(not_ports=(8000,)), req(port=8000))
    assert matches(when("destination.port", ["8000", "9000"]), req(port=9000))
    assert matches(when("destination.ip", ["10.96.0.0/16"]), req())
    assert not matches(when("destination.ip", ["10.97.0.10"]), req())


def test_source_and_remote_ips() -> None:
    assert matches(src(ip_blocks=("10.0.0.0/24",)), req(source_ip="10.0.0.9"))
    assert matches(src(ip_blocks=("10.0.0.0/24",)), req(source_ip="::ffff:10.0.0.9"))
    assert not matches(src(ip_blocks=("::/0",)), req(source_ip="10.0.0.9"))
    assert matches(src(not_ip_blocks=("10.0.0.0/24",)), req(source_ip="fd00::1"))
    assert matches(when("source.ip", ["10.0.0.5"]), req())
    assert matches(when("remote.ip", ["1.2.3.4"]), req(remote_ip="1.2.3.4"))
    assert matches(src(remote_ip_blocks=("10.0.0.5/32",)), req())  # defaults to the source


def test_headers_when() -> None:
    r = req(headers={"X-Env": ["dev", "test"], "X-Empty": ""})
    assert matches(when("request.headers[x-env]", ["dev,test"]), r)  # Envoy joins repeated values
    assert not matches(when("request.headers[x-env]", ["dev"]), r)
    assert matches(when("request.headers[X-ENV]", ["dev*"]), r)
    assert matches(when("request.headers[x-empty]", ["*"]), r)  # presence, even empty
    assert not matches(when("request.headers[x-missing]", ["*"]), r)
    assert matches(when("request.headers[x-missing]", not_values=["x"]), r)
    assert matches(when("request.headers[:method]", ["GET"]), r)
    assert matches(when("request.headers[:authority]", ["httpbin.*"]), r)


def test_claims_nested_lists_and_other_types() -> None:
    claims = {
        "iss": "i",
        "sub": "s",
        "groups": ["a", "b"],
        "nested": {"key": {"x": "v"}},
        "admin": True,
        "n": 1,
    }
    r = req(claims=claims)
    assert matches(when("request.auth.claims[groups]", ["b"]), r)
    assert matches(when("request.auth.claims[nested][key][x]", ["v"]), r)
    assert not matches(when("request.auth.claims[nested][key]", ["*"]), r)  # a map is no string
    assert not matches(when("request.auth.claims[admin]", ["true"]), r)
    assert not matches(when("request.auth.claims[n]", ["1"]), r)
    assert matches(when("request.auth.claims[missing]", not_values=["x"]), r)
    assert not matches(when("request.auth.claims[nested.key]", ["*"]), r)  # one name, with a dot


def test_audiences_presenter_sni() -> None:
    r = req(claims={"iss": "i", "sub": "s", "aud": ["api", "web"], "azp": "cli"}, sni="www.example.com")
    assert matches(when("request.auth.audiences", ["web"]), r)
    assert matches(when("request.auth.presenter", ["c*"]), r)
    assert matches(when("connection.sni", ["*.example.com"]), r)
    assert not matches(when("connection.sni", ["*"]), req())
    assert matches(when("connection.sni", not_values=["*"]), req())


def test_service_accounts_and_trust_domains() -> None:
    r = req("cluster.local/ns/default/sa/sleep")
    assert matches(src(service_accounts=("default/sleep",)), r)
    assert not matches(src(service_accounts=("other/sleep",)), r)
    assert matches(when("source.serviceAccount", ["default/sleep"]), r)
    # A bare name is in the policy's namespace ("foo").
    assert matches(when("source.serviceAccount", ["sleep"]), req("cluster.local/ns/foo/sa/sleep"))
    assert matches(when("source.trustDomain", ["cluster.local"]), r)
    assert matches(when("source.trustDomain", ["cluster.*"]), r)
    assert not matches(when("source.trustDomain", ["example.org"]), r)
    assert matches(when("source.principal", ["cluster.local/ns/default/*"]), r)


def test_trust_domain_aliases() -> None:
    old = policy(src(principals=("old.td/ns/default/sa/sleep",)))
    local = policy(src(principals=("cluster.local/ns/default/sa/sleep",)), name="local")
    peer = req("new.td/ns/default/sa/sleep")
    bundle = ("new.td", "old.td")
    assert compile_policy(old, bundle).first_match(peer) == 0
    assert compile_policy(old).first_match(peer) is None
    # "cluster.local" stands for the mesh's own trust domain and its aliases.
    assert compile_policy(local, bundle).first_match(peer) == 0
    assert compile_policy(local, bundle).first_match(req("old.td/ns/default/sa/sleep")) == 0
    assert evaluate(L7PolicySet([old], trust_domains=bundle), peer).allow
    ts = policy(when("source.trustDomain", ["new.td"]))
    assert compile_policy(ts, bundle).first_match(req("old.td/ns/a/sa/b")) == 0


def test_experimental_filter_metadata_is_never_there() -> None:
    assert not matches(when("experimental.envoy.filters.network.mysql_proxy[db.table]", ["[update]"]), req())
    assert matches(when("experimental.envoy.filters.network.mysql_proxy[db.table]", not_values=["x"]), req())


def test_empty_entries_match_everything() -> None:
    assert matches(Rule(), req(principal=None))
    assert matches(Rule(from_=(RuleFrom(Source()),), to=(RuleTo(Operation()),)), req(principal=None))
    assert matches(Rule(to=(RuleTo(Operation()), RuleTo(Operation(methods=("POST",))))), req())


# --- errors ---------------------------------------------------------------------------------------


def test_unknown_when_key_skips_the_rule_whatever_the_action() -> None:
    rule = when("request.foo", ["bar"])
    allow = compile_policy(policy(rule, Rule()))
    assert [i for i, _ in allow.rules] == [1]
    assert allow.problems == ("rule 0 skipped (allows nothing): unknown attribute 'request.foo' in when",)
    assert evaluate([policy(rule)], req()).allow is False  # an ALLOW policy still applies
    deny = policy(rule, action=DENY)
    assert evaluate([deny], req()).allow is True
    assert compile_policy(deny).problems == (
        "rule 0 skipped (never matches): unknown attribute 'request.foo' in when",
    )


def test_bad_values_drop_an_allow_rule_but_widen_a_deny() -> None:
    rule = Rule(
        to=(RuleTo(Operation(methods=("GET",))),), when=(Condition("source.ip", ("bogus", "10.9.9.9")),)
    )
    allow = compile_policy(policy(rule))
    assert allow.rules == () and "invalid IP address or CIDR 'bogus'" in allow.problems[0]
    deny = compile_policy(policy(rule, action=DENY))
    assert deny.first_match(req(source_ip="10.9.9.9")) == 0
    assert deny.first_match(req(source_ip="10.0.0.1")) is None  # the good value still counts
    assert deny.problems == (
        "rule 0: when source.ip: invalid IP address or CIDR 'bogus'; value ignored (matches more widely)",
    )
    # Every value bad: the condition is gone and the DENY matches every GET.
    all_bad = policy(Rule(to=rule.to, when=(Condition("destination.port", ("http",)),)), action=DENY)
    assert evaluate([all_bad], req()).allow is False
    assert evaluate([all_bad], req(method="POST")).allow is True


@pytest.mark.parametrize(
    "key", ["request.headers", "request.headersx", "request.headers[]", "request.auth.claims[a]b"]
)
def test_malformed_map_keys(key: str) -> None:
    assert compile_policy(policy(when(key, ["x"]))).rules == ()
    deny = compile_policy(policy(when(key, ["x"]), action=DENY))
    assert deny.first_match(req()) == 0 and deny.problems


def test_invalid_path_template() -> None:
    assert compile_policy(policy(op(paths=("/a/{**}/{*}",)))).rules == ()
    assert (
        compile_policy(policy(op(paths=("/a/{*}", "/b/{x}")), action=DENY)).first_match(req(path="/a/z")) == 0
    )


# --- decisions ------------------------------------------------------------------------------------


def test_envoy_reports_the_first_rule_by_name() -> None:
    rules = [op(paths=(f"/r{i}",)) for i in range(11)] + [Rule()]
    p = policy(*rules, action=DENY)
    # "rule[10]" and "rule[11]" sort before "rule[1]" and "rule[2]": Envoy names the first.
    assert [i for i, _ in compile_policy(p).rules][:5] == [0, 10, 11, 1, 2]
    assert evaluate([p], req(path="/r10")).rule == 10
    assert evaluate([p], req(path="/r2")).rule == 11  # rule 11 matches everything, and comes first
    a, b = policy(Rule(), action=DENY, name="b"), policy(Rule(), action=DENY, name="a")
    assert evaluate([a, b], req()).policy == "foo/a"


def test_decision_shapes() -> None:
    allow = policy(op(methods=("GET",)), name="allow")
    deny = policy(op(paths=("/admin",)), action=DENY, name="deny")
    ps = L7PolicySet([allow, deny])
    d = ps.evaluate(req(path="/admin"))
    assert (d.allow, d.policy, d.rule, d.reason) == (
        False,
        "foo/deny",
        0,
        "denied by DENY policy foo/deny rule 0",
    )
    d = ps.evaluate(req())
    assert (d.allow, d.policy, d.rule, d.reason) == (
        True,
        "foo/allow",
        0,
        "allowed by ALLOW policy foo/allow rule 0",
    )
    assert ps.evaluate(req()) is d  # prebuilt: nothing allocated
    assert evaluate([], req()).reason == "allowed: no ALLOW policy applies"


def test_dry_run_shadow_decision() -> None:
    dry_allow = policy(op(methods=("GET",)), name="dry-allow", dry_run=True)
    dry_deny = policy(op(paths=("/x",)), action=DENY, name="dry-deny", dry_run=True)
    d = evaluate([dry_allow, dry_deny], req(method="POST"))
    assert d.allow and d.dry_run_allow is False  # the dry-run ALLOW would have denied it
    assert evaluate([dry_allow, dry_deny], req()).dry_run_allow is True
    assert evaluate([dry_allow, dry_deny], req(path="/x")).dry_run_allow is False
    audit_dry = policy(Rule(), action=AUDIT, name="audit", dry_run=True)
    d = evaluate([audit_dry], req())
    assert d.audit == () and str(d.dry_run[0]) == "dry-run AUDIT policy foo/audit: rule 0 matched"


def test_duplicate_keys_count_once_and_custom_is_ignored() -> None:
    p = policy(Rule(), action=DENY)
    assert evaluate([p, p], req()).policy == "foo/p"
    custom = AuthorizationPolicy("foo", "c", target_refs=(GW,), action=CUSTOM, provider="x", rules=(Rule(),))
    assert evaluate([custom], req()).reason == "allowed: no ALLOW policy applies"


def test_compile_cache_is_by_identity_and_trust_domains() -> None:
    p = policy(Rule())
    assert compile_policy(p) is compile_policy(p)
    assert compile_policy(p, ("a.td",)) is not compile_policy(p)
    assert isinstance(compile_policy(p), CompiledL7Policy) and "ALLOW" in repr(compile_policy(p))


# --- selection ------------------------------------------------------------------------------------


def bound(
    ns: str, name: str, *refs: PolicyTargetRef, action: AuthorizationAction = ALLOW
) -> AuthorizationPolicy:
    return AuthorizationPolicy(
        ns, name, target_refs=refs, action=action, provider="x" if action is CUSTOM else None
    )


@pytest.mark.parametrize(
    ("p", "selected"),
    [
        (bound("foo", "gw", GW), True),
        (bound("bar", "gw-other-ns", GW), False),  # a Gateway ref is in the policy's namespace
        (
            bound(
                "foo",
                "gw-other-name",
                PolicyTargetRef(kind="Gateway", group="gateway.networking.k8s.io", name="w2"),
            ),
            False,
        ),
        (bound("foo", "gw-no-group", PolicyTargetRef(kind="Gateway", name="waypoint")), False),
        (
            bound(
                "foo",
                "gw-own-ns",
                PolicyTargetRef(
                    kind="Gateway", group="gateway.networking.k8s.io", name="waypoint", namespace="foo"
                ),
            ),
            True,
        ),
        (
            bound(
                "foo",
                "gw-cross-ns",
                PolicyTargetRef(
                    kind="Gateway", group="gateway.networking.k8s.io", name="waypoint", namespace="bar"
                ),
            ),
            False,
        ),
        (bound("foo", "svc", PolicyTargetRef(kind="Service", name="httpbin")), True),
        (bound("foo", "svc-core", PolicyTargetRef(kind="Service", group="core", name="httpbin")), True),
        (bound("foo", "svc-other", PolicyTargetRef(kind="Service", name="reviews")), False),
        (bound("bar", "svc-other-ns", PolicyTargetRef(kind="Service", name="httpbin")), False),
        (
            bound("foo", "svc-cross-ns", PolicyTargetRef(kind="Service", name="httpbin", namespace="bar")),
            False,
        ),
        (
            bound(
                "foo", "se", PolicyTargetRef(kind="ServiceEntry", group="networking.istio.io", name="httpbin")
            ),
            False,
        ),
        (
            bound(
                "istio-system",
                "class",
                PolicyTargetRef(
                    kind="GatewayClass", group="gateway.networking.k8s.io", name="istio-waypoint"
                ),
            ),
            True,
        ),
        (
            bound(
                "foo",
                "class-not-root",
                PolicyTargetRef(
                    kind="GatewayClass", group="gateway.networking.k8s.io", name="istio-waypoint"
                ),
            ),
            False,
        ),
        (
            bound(
                "istio-system",
                "class-other",
                PolicyTargetRef(kind="GatewayClass", group="gateway.networking.k8s.io", name="istio"),
            ),
            False,
        ),
        (bound("foo", "two-refs", PolicyTargetRef(kind="Service", name="reviews"), GW), True),
        (AuthorizationPolicy("foo", "selector", selector=WorkloadSelector({"app": "httpbin"})), False),
        (AuthorizationPolicy("foo", "namespace-wide"), False),
        (AuthorizationPolicy("istio-system", "mesh-wide"), False),
    ],
    ids=lambda v: v.name if isinstance(v, AuthorizationPolicy) else str(v),
)
def test_select_policies(p: AuthorizationPolicy, selected: bool) -> None:
    got = select_policies([p], waypoint=("foo", "waypoint"), service=("foo", "httpbin"))
    assert (got.rbac == (p,)) is selected


def test_select_policies_splits_custom_sorts_and_dedupes() -> None:
    a, c = bound("foo", "a", GW), bound("foo", "c", GW, action=CUSTOM)
    b = bound("foo", "b", PolicyTargetRef(kind="Service", name="httpbin"), action=DENY)
    got = select_policies([c, b, a, a], waypoint=("foo", "waypoint"), service=("foo", "httpbin"))
    assert [p.name for p in got.rbac] == ["a", "b"] and [p.name for p in got.custom] == ["c"]
    no_service = select_policies([b], waypoint=("foo", "waypoint"), service=None)
    assert no_service.rbac == ()
    se = bound("foo", "se", PolicyTargetRef(kind="ServiceEntry", group="networking.istio.io", name="ext"))
    got = select_policies(
        [se], waypoint=("foo", "waypoint"), service=("foo", "ext"), service_kind="ServiceEntry"
    )
    assert got.rbac == (se,)
    other_root = bound(
        "mesh",
        "class",
        PolicyTargetRef(kind="GatewayClass", group="gateway.networking.k8s.io", name="istio-waypoint"),
    )
    got = select_policies([other_root], waypoint=("foo", "waypoint"), service=None, root_namespace="mesh")
    assert got.rbac == (other_root,)
