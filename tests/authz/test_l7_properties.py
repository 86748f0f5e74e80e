"""Properties of the L7 engine and of path normalization, over small universes so that matches
are common.

The engine generates Python code for each rule; ``reference`` below is the plain reading of
istiod's ``model.New``/``Generate`` and Envoy's matchers on the frozen policy (namespaces by
istiod's own regex, IPs by :mod:`ipaddress`), and every generated case must agree with it. The
other properties are the ones Istio promises: a matching DENY denies, policies bound elsewhere
and dry-run policies change nothing, order does not matter; BASE normalization is idempotent
and leaves no ``..`` segment.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from hypothesis import assume, given
from hypothesis import strategies as st

from mesh.identity import Identity
from mesh.l7authz import Headers, L7Decision, Request, evaluate, first_matching_rule, select_policies
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
)
from mesh.pathnorm import NormalizedPath, PathNormalization, normalize_path

GW = PolicyTargetRef(kind="Gateway", group="gateway.networking.k8s.io", name="waypoint")
ELSEWHERE = (
    PolicyTargetRef(kind="Gateway", group="gateway.networking.k8s.io", name="other-waypoint"),
    PolicyTargetRef(kind="Service", name="reviews"),
    PolicyTargetRef(kind="GatewayClass", group="gateway.networking.k8s.io", name="istio-waypoint"),
)

PRINCIPALS = ("cluster.local/ns/default/sa/sleep", "cluster.local/ns/prod/*", "*/sa/x", "*")
NAMESPACES = ("default", "prod", "de*", "*a", "*", "ns", "sa")
NETWORKS = ("10.0.0.0/24", "10.0.0.5/32", "0.0.0.0/0", "fd00::/64")
REQUEST_PRINCIPALS = ("i/s", "*", "*/s", "i/*", "j/s")
METHODS = ("GET", "POST", "P*", "*")
PATHS = ("/a", "/a/*", "*.png", "*", "/admin")
HOSTS = ("example.com", "*.example.com", "example.com:*", "*")
HEADER_VALUES = ("1", "2", "1*", "*", "1,2")
GROUPS = ("g1", "g*")

IDENTITIES = (
    None,
    "cluster.local/ns/default/sa/sleep",
    "cluster.local/ns/prod/sa/x",
    "cluster.local/ns/ns/sa/x",
    "other.td/ns/default/sa/x",
)
ADDRESSES = ("10.0.0.5", "10.1.0.1", "fd00::1", "::ffff:10.0.0.5")
CLAIMS: tuple[dict[str, Any], ...] = (
    {},
    {"iss": "i", "sub": "s", "groups": ["g1"]},
    {"iss": "i", "sub": "t", "groups": "g2"},
)


def _some(values: tuple[Any, ...]) -> st.SearchStrategy[tuple[Any, ...]]:
    """Usually nothing (most fields are empty), else one or two values."""
    return st.one_of(
        st.just(()), st.just(()), st.lists(st.sampled_from(values), min_size=1, max_size=2).map(tuple)
    )


sources = st.builds(
    Source,
    principals=_some(PRINCIPALS),
    not_principals=_some(PRINCIPALS),
    namespaces=_some(NAMESPACES),
    not_namespaces=_some(NAMESPACES),
    ip_blocks=_some(NETWORKS),
    not_ip_blocks=_some(NETWORKS),
    remote_ip_blocks=_some(NETWORKS),
    request_principals=_some(REQUEST_PRINCIPALS),
    not_request_principals=_some(REQUEST_PRINCIPALS),
)
operations = st.builds(
    Operation,
    hosts=_some(HOSTS),
    not_hosts=_some(HOSTS),
    ports=_some((80, 8080)),
    not_ports=_some((80,)),
    methods=_some(METHODS),
    not_methods=_some(METHODS),
    paths=_some(PATHS),
    not_paths=_some(PATHS),
)
conditions = st.one_of(
    st.builds(Condition, st.just("request.headers[X-A]"), _some(HEADER_VALUES), _some(HEADER_VALUES)),
    st.builds(Condition, st.just("source.ip"), _some(NETWORKS), _some(NETWORKS)),
    st.builds(Condition, st.just("request.auth.claims[groups]"), _some(GROUPS), _some(GROUPS)),
    st.builds(Condition, st.just("source.namespace"), _some(NAMESPACES), _some(NAMESPACES)),
)
rules = st.builds(
    Rule,
    from_=st.lists(st.builds(RuleFrom, sources), max_size=2).map(tuple),
    to=st.lists(st.builds(RuleTo, operations), max_size=2).map(tuple),
    when=st.lists(conditions, max_size=2).map(tuple),
)


@st.composite
def policies(
    draw: st.DrawFn, *, name: str | None = None, refs: tuple[PolicyTargetRef, ...] = (GW,)
) -> AuthorizationPolicy:
    return AuthorizationPolicy(
        "foo",
        name or draw(st.sampled_from(("a", "b", "c", "d"))),
        target_refs=refs,
        action=draw(
            st.sampled_from((AuthorizationAction.ALLOW, AuthorizationAction.DENY, AuthorizationAction.AUDIT))
        ),
        rules=tuple(draw(st.lists(rules, max_size=3))),
        dry_run=draw(st.booleans()) and draw(st.booleans()),
    )


@st.composite
def requests(draw: st.DrawFn) -> Request:
    principal = draw(st.sampled_from(IDENTITIES))
    claims = draw(st.sampled_from(CLAIMS))
    return Request(
        None if principal is None else Identity.parse_principal(principal),
        ipaddress.ip_address(draw(st.sampled_from(ADDRESSES))),
        ipaddress.ip_address("10.96.0.1"),
        draw(st.sampled_from((80, 8080))),
        draw(st.sampled_from(("example.com", "EXAMPLE.com:80", "a.example.com", "other"))),
        draw(st.sampled_from(("GET", "POST", "PUT"))),
        draw(st.sampled_from(("/a", "/a/b", "/x.png", "/admin", "/"))),
        Headers(draw(st.sampled_from(({}, {"x-a": "1"}, {"X-A": ["1", "2"]})))),
        remote_ip=ipaddress.ip_address(draw(st.sampled_from(ADDRESSES))),
        request_principal=f"{claims['iss']}/{claims['sub']}" if claims else None,
        request_auth_claims=claims,
    )


# --- the reference: istiod's generation read literally, Envoy's matchers by hand ---------------------


def _str(patterns: tuple[str, ...], value: str | None, *, presence: bool = False) -> bool:
    if value is None:
        return False
    for p in patterns:
        if p == "*":
            if presence or value:
                return True
        elif p.startswith("*"):
            if value.endswith(p[1:]):
                return True
        elif p.endswith("*"):
            if value.startswith(p[:-1]):
                return True
        elif value == p:
            return True
    return False


def _field(values: tuple[Any, ...], not_values: tuple[Any, ...], test: Any) -> bool:
    return (not values or test(values)) and (not not_values or not test(not_values))


def _namespace(patterns: tuple[str, ...], r: Request) -> bool:
    uri = r.peer_uri
    return uri is not None and any(
        re.fullmatch(".*/ns/" + ".*".join(map(re.escape, p.split("*"))) + "/.*", uri) for p in patterns
    )


def _ip(networks: tuple[str, ...], ip: Any) -> bool:
    return any(ip in ipaddress.ip_network(n) for n in networks)


def _request_principal(patterns: tuple[str, ...], r: Request) -> bool:
    iss, sub = r.jwt_issuer, r.jwt_subject
    if iss is None or sub is None:
        return False
    for p in patterns:
        if p == "*":
            ok = bool(iss) and bool(sub)
        elif p.startswith("*/"):
            ok = bool(iss) and sub == p[2:]
        elif p.endswith("/*"):
            ok = iss == p[:-2] and bool(sub)
        else:
            ok = f"{iss}/{sub}" == p
        if ok:
            return True
    return False


def _source(s: Source, r: Request) -> bool:
    return (
        _field(s.principals, s.not_principals, lambda v: _str(v, r.peer_principal))
        and _field(s.namespaces, s.not_namespaces, lambda v: _namespace(v, r))
        and _field(s.ip_blocks, s.not_ip_blocks, lambda v: _ip(v, r.source_ip))
        and _field(s.remote_ip_blocks, (), lambda v: _ip(v, r.remote_ip))
        and _field(s.request_principals, s.not_request_principals, lambda v: _request_principal(v, r))
    )


def _operation(o: Operation, r: Request) -> bool:
    return (
        _field(
            o.hosts, o.not_hosts, lambda v: _str(tuple(h.lower() for h in v), r.host.lower(), presence=True)
        )
        and _field(o.ports, o.not_ports, lambda v: r.destination_port in v)
        and _field(o.methods, o.not_methods, lambda v: _str(v, r.method, presence=True))
        and _field(o.paths, o.not_paths, lambda v: _str(v, r.path))
    )


def _condition(c: Condition, r: Request) -> bool:
    if c.key == "request.headers[X-A]":
        joined = ",".join(r.headers["x-a"]) if "x-a" in r.headers else None
        return _field(c.values, c.not_values, lambda v: _str(v, joined, presence=True))
    if c.key == "source.ip":
        return _field(c.values, c.not_values, lambda v: _ip(v, r.source_ip))
    if c.key == "source.namespace":
        return _field(c.values, c.not_values, lambda v: _namespace(v, r))
    groups = r.request_auth_claims.get("groups")
    values = [groups] if isinstance(groups, str) else list(groups or [])
    return _field(c.values, c.not_values, lambda v: any(_str(v, g) for g in values))


def _rule(rule: Rule, r: Request) -> bool:
    return (
        (not rule.from_ or any(_source(f.source, r) for f in rule.from_))
        and (not rule.to or any(_operation(t.operation, r) for t in rule.to))
        and all(_condition(c, r) for c in rule.when)
    )


def reference(p: AuthorizationPolicy, r: Request) -> set[int]:
    return {i for i, rule in enumerate(p.rules) if _rule(rule, r)}


@given(policies(), requests())
def test_compiled_rules_agree_with_the_reference(p: AuthorizationPolicy, r: Request) -> None:
    matched = reference(p, r)
    first = first_matching_rule(p, r)
    assert (first is not None) == bool(matched)
    assert first is None or first in matched


def _verdict(d: L7Decision) -> tuple[bool, str | None, int | None]:
    return d.allow, d.policy, d.rule


@given(st.lists(policies(), max_size=4, unique_by=lambda p: p.name), policies(name="deny"), requests())
def test_a_matching_deny_always_denies(
    ps: list[AuthorizationPolicy], deny: AuthorizationPolicy, r: Request
) -> None:
    deny = AuthorizationPolicy(
        "foo", "deny", target_refs=(GW,), action=AuthorizationAction.DENY, rules=deny.rules
    )
    decision = evaluate([*ps, deny], r)
    if reference(deny, r):
        assert not decision.allow and decision.policy is not None
    if not decision.allow and decision.policy is not None:
        assert any(p.action is AuthorizationAction.DENY and not p.dry_run for p in [*ps, deny])


@given(
    st.lists(policies(), max_size=4, unique_by=lambda p: p.name),
    st.sampled_from(ELSEWHERE),
    policies(name="z"),
    requests(),
)
def test_a_policy_bound_elsewhere_never_changes_the_decision(
    ps: list[AuthorizationPolicy], ref: PolicyTargetRef, other: AuthorizationPolicy, r: Request
) -> None:
    # GatewayClass only binds in the root namespace; the others name another waypoint or service.
    elsewhere = AuthorizationPolicy("foo", "z", target_refs=(ref,), action=other.action, rules=other.rules)
    waypoint, service = ("foo", "waypoint"), ("foo", "httpbin")
    with_it = select_policies([*ps, elsewhere], waypoint=waypoint, service=service)
    without = select_policies(ps, waypoint=waypoint, service=service)
    assert with_it == without
    assert evaluate(with_it.rbac, r) == evaluate(without.rbac, r)


@given(st.lists(policies(), max_size=4, unique_by=lambda p: p.name), policies(name="dry"), requests())
def test_dry_run_never_changes_the_decision(
    ps: list[AuthorizationPolicy], dry: AuthorizationPolicy, r: Request
) -> None:
    dry = AuthorizationPolicy(
        "foo", "dry", target_refs=(GW,), action=dry.action, rules=dry.rules, dry_run=True
    )
    before, after = evaluate(ps, r), evaluate([*ps, dry], r)
    assert _verdict(before) == _verdict(after) and before.audit == after.audit
    assert any(result.policy == "foo/dry" for result in after.dry_run)


@given(
    st.lists(policies(), max_size=5, unique_by=lambda p: p.name),
    st.randoms(use_true_random=False),
    requests(),
)
def test_order_does_not_matter(ps: list[AuthorizationPolicy], rnd: Any, r: Request) -> None:
    shuffled = list(ps)
    rnd.shuffle(shuffled)
    assert evaluate(ps, r) == evaluate(shuffled, r)


@given(st.lists(policies(), max_size=4, unique_by=lambda p: p.name), requests())
def test_without_allow_policies_only_deny_denies(ps: list[AuthorizationPolicy], r: Request) -> None:
    ps = [p for p in ps if p.action is not AuthorizationAction.ALLOW or p.dry_run]
    decision = evaluate(ps, r)
    enforced_denies = [p for p in ps if p.action is AuthorizationAction.DENY and not p.dry_run]
    assert decision.allow is not any(reference(p, r) for p in enforced_denies)


# --- path normalization -------------------------------------------------------------------------

raw_paths = st.text(alphabet="/.\\%2eEfFcC5a0;?#x ~", max_size=24).map(lambda s: "/" + s)


@given(raw_paths, st.sampled_from(list(PathNormalization)))
def test_normalization_is_idempotent(raw: str, mode: PathNormalization) -> None:
    # Not quite, in Envoy: parameters are stripped from dot segments before backslashes become
    # slashes, so "/\\.;" gives "//.;" and then "//". Such paths are left out here and pinned below.
    assume("\\" not in raw or ";" not in raw)
    once = normalize_path(raw, mode)
    if not isinstance(once, NormalizedPath):
        return
    twice = normalize_path(once.forward, mode)
    assert isinstance(twice, NormalizedPath)
    assert (twice.path, twice.forward) == (once.path, once.forward)


@given(raw_paths, st.sampled_from([m for m in PathNormalization if m is not PathNormalization.NONE]))
def test_normalized_paths_have_no_dot_segments(raw: str, mode: PathNormalization) -> None:
    result = normalize_path(raw, mode)
    assert isinstance(result, NormalizedPath)  # only NUL is refused, and it is not generated
    assert result.path.startswith("/") and "?" not in result.path and "#" not in result.forward
    segments = result.path.split("/")
    assert ".." not in segments and "." not in segments
    assert "\\" not in result.path


def test_envoy_strips_dot_parameters_before_converting_backslashes() -> None:
    first = normalize_path("/\\.;")
    assert isinstance(first, NormalizedPath) and first.path == "//.;"
    assert normalize_path(first.forward) == NormalizedPath("//", "//")
    assert normalize_path("/x/\\..;/admin") == NormalizedPath("/x//..;/admin", "/x//..;/admin")
