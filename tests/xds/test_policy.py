"""Lowering AuthorizationPolicy to what ztunnel enforces: the POLICY.md table, case by case."""

from __future__ import annotations

import ipaddress

import pytest

from controlplane.lowering import PeerAuthenticationIndex, lower_authorization_policy
from mesh.model import (
    AuthorizationAction,
    AuthorizationPolicy,
    Condition,
    MtlsMode,
    Operation,
    PeerAuthentication,
    PolicyTargetRef,
    RuleFrom,
    RuleTo,
    Source,
    WorkloadSelector,
)
from mesh.model import Rule as PolicyRule
from mesh.xds.authorization import Action, Clause, Match, MatchKind, Rule, Scope, StringMatch
from tests.xds.helpers import pod

ALLOW, DENY = AuthorizationAction.ALLOW, AuthorizationAction.DENY
FROM_SLEEP = RuleFrom(Source(principals=("cluster.local/ns/shop/sa/sleep",)))
SLEEP = Match(principals=(StringMatch(MatchKind.EXACT, "cluster.local/ns/shop/sa/sleep"),))
GET_ONLY = RuleTo(Operation(methods=("GET",)))
PORT_80 = RuleTo(Operation(ports=(80,)))


def policy(*rules: PolicyRule, action: AuthorizationAction = ALLOW, **kw: object) -> AuthorizationPolicy:
    return AuthorizationPolicy(namespace="shop", name="p", action=action, rules=rules, **kw)  # type: ignore[arg-type]


def test_l4_allow_is_kept_whole() -> None:
    out = lower_authorization_policy(policy(PolicyRule(from_=(FROM_SLEEP,), to=(PORT_80,))))
    assert out.warnings == ()
    assert out.authorization is not None
    assert out.authorization.action is Action.ALLOW
    assert out.authorization.rules == (Rule((Clause((SLEEP,)), Clause((Match(destination_ports=(80,)),)))),)


def test_allow_rule_with_l7_is_dropped_and_warned() -> None:
    out = lower_authorization_policy(
        policy(PolicyRule(from_=(FROM_SLEEP,), to=(GET_ONLY,)), PolicyRule(to=(PORT_80,)))
    )
    assert out.authorization is not None
    # Only the pure L4 rule remains: what the L7 rule would have allowed is now denied.
    assert out.authorization.rules == (Rule((Clause((Match(destination_ports=(80,)),)),)),)
    assert len(out.warnings) == 1
    assert "rules[0]" in out.warnings[0] and "to[0].operation.methods" in out.warnings[0]
    assert "allows nothing" in out.warnings[0]


def test_allow_with_only_l7_rules_allows_nothing() -> None:
    out = lower_authorization_policy(policy(PolicyRule(to=(GET_ONLY,))))
    assert out.authorization is not None and out.authorization.rules == ()  # fail closed
    assert len(out.warnings) == 1


def test_deny_rule_keeps_its_l4_part() -> None:
    # A `to` with a port and a method: the method is gone, so port 80 is denied for every
    # method, i.e. more widely than written.
    get_on_80 = RuleTo(Operation(ports=(80,), methods=("GET",)))
    out = lower_authorization_policy(policy(PolicyRule(from_=(FROM_SLEEP,), to=(get_on_80,)), action=DENY))
    assert out.authorization is not None and out.authorization.action is Action.DENY
    assert out.authorization.rules == (Rule((Clause((SLEEP,)), Clause((Match(destination_ports=(80,)),)))),)
    assert len(out.warnings) == 1 and "denies more widely" in out.warnings[0]


def test_deny_rule_whose_to_is_only_l7_never_fires() -> None:
    """As istiod + ztunnel: the L7-only `to` becomes an empty Match, which matches nothing."""
    out = lower_authorization_policy(policy(PolicyRule(from_=(FROM_SLEEP,), to=(GET_ONLY,)), action=DENY))
    assert out.authorization is not None and out.authorization.action is Action.DENY
    assert out.authorization.rules == (Rule((Clause((SLEEP,)), Clause((Match(),)))),)
    assert len(out.warnings) == 1 and "never fires" in out.warnings[0]


def test_deny_rule_with_only_l7_never_fires() -> None:
    out = lower_authorization_policy(
        policy(PolicyRule(from_=(RuleFrom(Source(request_principals=("*",))),)), action=DENY)
    )
    assert out.authorization is not None
    # Its one source is an empty Match: it matches nothing, so the DENY is a no-op at L4.
    assert out.authorization.rules == (Rule((Clause((Match(),)),)),)
    assert "from[0].source.requestPrincipals" in out.warnings[0]
    assert "never fires" in out.warnings[0]


def test_deny_sources_ored_an_l7_only_one_drops_out() -> None:
    rule = PolicyRule(from_=(FROM_SLEEP, RuleFrom(Source(request_principals=("a/b",)))), to=(PORT_80,))
    out = lower_authorization_policy(policy(rule, action=DENY))
    assert out.authorization is not None
    # The L7-only source is an empty Match (matches nothing); sleep on port 80 is still denied.
    assert out.authorization.rules == (
        Rule((Clause((SLEEP, Match())), Clause((Match(destination_ports=(80,)),)))),
    )
    assert len(out.warnings) == 1 and "denies more widely" in out.warnings[0]


@pytest.mark.parametrize(
    ("condition", "match"),
    [
        (
            Condition("source.ip", values=("10.0.0.0/8",)),
            Match(source_ips=(ipaddress.ip_network("10.0.0.0/8"),)),
        ),
        (
            Condition("destination.ip", not_values=("10.0.0.1",)),
            Match(not_destination_ips=(ipaddress.ip_network("10.0.0.1/32"),)),
        ),
        (Condition("destination.port", values=("80", "443")), Match(destination_ports=(80, 443))),
        (
            Condition("source.namespace", values=("shop*",)),
            Match(namespaces=(StringMatch(MatchKind.PREFIX, "shop"),)),
        ),
        (
            Condition("source.principal", not_values=("spiffe://cluster.local/ns/a/sa/b",)),
            Match(not_principals=(StringMatch(MatchKind.EXACT, "cluster.local/ns/a/sa/b"),)),
        ),
    ],
)
def test_l4_when_conditions(condition: Condition, match: Match) -> None:
    out = lower_authorization_policy(policy(PolicyRule(when=(condition,))))
    assert out.warnings == ()
    assert out.authorization is not None and out.authorization.rules == (Rule((Clause((match,)),)),)


@pytest.mark.parametrize(
    "condition",
    [
        Condition("request.headers[x-user]", values=("admin",)),
        Condition("request.auth.claims[iss]", values=("x",)),
        Condition("destination.port", values=("http",)),  # not a number: cannot be enforced
    ],
)
def test_l7_or_invalid_when_conditions(condition: Condition) -> None:
    allow = lower_authorization_policy(policy(PolicyRule(from_=(FROM_SLEEP,), when=(condition,))))
    assert allow.authorization is not None and allow.authorization.rules == ()
    deny = lower_authorization_policy(policy(PolicyRule(from_=(FROM_SLEEP,), when=(condition,)), action=DENY))
    # The condition becomes an empty Match: this DENY rule can never fire at L4.
    assert deny.authorization is not None
    assert deny.authorization.rules == (Rule((Clause((SLEEP,)), Clause((Match(),)))),)
    assert allow.warnings and deny.warnings and "never fires" in deny.warnings[0]


@pytest.mark.parametrize(
    ("pattern", "kind", "value", "hit", "miss"),
    [
        ("*", MatchKind.PRESENCE, "", "x", ""),
        ("ab*", MatchKind.PREFIX, "ab", "abc", "cab"),
        ("*ab", MatchKind.SUFFIX, "ab", "cab", "abc"),
        ("ab", MatchKind.EXACT, "ab", "ab", "abc"),
    ],
)
def test_string_patterns(pattern: str, kind: MatchKind, value: str, hit: str, miss: str) -> None:
    m = StringMatch.parse(pattern)
    assert (m.kind, m.value) == (kind, value)
    assert m.matches(hit) and not m.matches(miss)


def test_not_forms_and_ip_blocks_in_sources() -> None:
    src = Source(not_principals=("*",), namespaces=("shop",), not_ip_blocks=("192.168.0.0/16",))
    out = lower_authorization_policy(policy(PolicyRule(from_=(RuleFrom(src),)), action=DENY))
    assert out.warnings == ()
    assert out.authorization is not None
    (match,) = out.authorization.rules[0].clauses[0].matches
    assert match.not_principals == (StringMatch(MatchKind.PRESENCE),)
    assert match.namespaces == (StringMatch(MatchKind.EXACT, "shop"),)
    assert match.not_source_ips == (ipaddress.ip_network("192.168.0.0/16"),)


@pytest.mark.parametrize(
    ("namespace", "selector", "scope"),
    [
        ("istio-system", None, Scope.GLOBAL),
        ("shop", None, Scope.NAMESPACE),
        ("shop", WorkloadSelector({"app": "web"}), Scope.WORKLOAD_SELECTOR),
        ("istio-system", WorkloadSelector({"app": "web"}), Scope.WORKLOAD_SELECTOR),
    ],
)
def test_scope(namespace: str, selector: WorkloadSelector | None, scope: Scope) -> None:
    p = AuthorizationPolicy(namespace=namespace, name="p", selector=selector)
    out = lower_authorization_policy(p)
    assert out.authorization is not None and out.authorization.scope is scope
    assert out.authorization.key == f"{namespace}/p"
    assert out.authorization.rules == ()  # spec: {} ALLOW = deny all, kept as such


def test_not_for_ztunnel() -> None:
    waypoint_bound = policy(
        PolicyRule(to=(GET_ONLY,)), target_refs=(PolicyTargetRef(kind="Gateway", name="waypoint"),)
    )
    assert lower_authorization_policy(waypoint_bound).authorization is None
    assert lower_authorization_policy(waypoint_bound).warnings == ()
    for action in (AuthorizationAction.AUDIT, AuthorizationAction.CUSTOM):
        out = lower_authorization_policy(policy(PolicyRule(), action=action))
        assert out.authorization is None
        assert out.warnings and action.value in out.warnings[0]


def test_allow_all_rule() -> None:
    out = lower_authorization_policy(policy(PolicyRule()))
    assert out.authorization is not None and out.authorization.rules == (Rule(()),)


# --- PeerAuthentication ---------------------------------------------------------------------

STATIC = "istio-system/istio_converted_static_strict"


def pa(
    namespace: str,
    name: str,
    mode: MtlsMode = MtlsMode.UNSET,
    selector: dict[str, str] | None = None,
    ports: dict[int, MtlsMode] | None = None,
) -> PeerAuthentication:
    return PeerAuthentication(
        namespace=namespace,
        name=name,
        selector=WorkloadSelector(selector) if selector is not None else None,
        mtls_mode=mode,
        port_level_mtls=ports or {},
    )


def test_peer_authentication_precedence() -> None:
    web, db = pod("web-1", labels={"app": "web"}), pod("db-1", labels={"app": "db"})
    other = pod("x-1", ns="other")
    mesh_strict = pa("istio-system", "default", MtlsMode.STRICT)
    index = PeerAuthenticationIndex(
        [
            mesh_strict,
            pa("shop", "ns", MtlsMode.PERMISSIVE),
            pa("shop", "web", MtlsMode.STRICT, {"app": "web"}),
        ]
    )
    assert index.policies_for(web) == (STATIC,)  # workload STRICT beats namespace PERMISSIVE
    assert index.policies_for(db) == ()  # namespace PERMISSIVE beats mesh STRICT
    assert index.policies_for(other) == (STATIC,)  # mesh-wide STRICT
    assert [a.key for a in index.authorizations()] == [STATIC]
    assert PeerAuthenticationIndex([]).policies_for(web) == ()  # default PERMISSIVE


def test_disable_is_ignored_and_warned() -> None:
    index = PeerAuthenticationIndex(
        [pa("istio-system", "default", MtlsMode.STRICT), pa("shop", "ns", MtlsMode.DISABLE)]
    )
    assert index.policies_for(pod("web-1")) == (STATIC,)
    assert index.warnings and "DISABLE" in index.warnings[0]


def test_port_level_modes() -> None:
    index = PeerAuthenticationIndex(
        [
            pa("shop", "web", MtlsMode.STRICT, {"app": "web"}, {8080: MtlsMode.PERMISSIVE}),
            pa("shop", "db", MtlsMode.UNSET, {"app": "db"}, {5432: MtlsMode.STRICT}),
        ]
    )
    assert index.policies_for(pod("web-1", labels={"app": "web"})) == (
        "shop/converted_peer_authentication_web",
    )
    assert index.policies_for(pod("db-1", labels={"app": "db"})) == ("shop/converted_peer_authentication_db",)
    by_key = {a.key: a for a in index.authorizations()}
    presence = (StringMatch(MatchKind.PRESENCE),)
    web = by_key["shop/converted_peer_authentication_web"]
    assert web.action is Action.DENY and web.scope is Scope.WORKLOAD_SELECTOR
    assert web.rules == (Rule((Clause((Match(not_principals=presence, not_destination_ports=(8080,)),)),)),)
    db = by_key["shop/converted_peer_authentication_db"]
    assert db.rules == (Rule((Clause((Match(not_principals=presence, destination_ports=(5432,)),)),)),)
    assert STATIC in by_key


def test_service_accounts_are_l4() -> None:
    """``serviceAccounts`` (``<ns>/<sa>``, a bare name meaning the policy's namespace, normalised
    by the source) become the wire's service-account matches, with no warning."""
    from mesh.xds.authorization import ServiceAccountMatch

    src = RuleFrom(Source(service_accounts=("shop/frontend",), not_service_accounts=("other/x",)))
    out = lower_authorization_policy(policy(PolicyRule(from_=(src,))))
    assert out.warnings == () and out.authorization is not None
    m = out.authorization.rules[0].clauses[0].matches[0]
    assert m.service_accounts == (ServiceAccountMatch("shop", "frontend"),)
    assert m.not_service_accounts == (ServiceAccountMatch("other", "x"),)
