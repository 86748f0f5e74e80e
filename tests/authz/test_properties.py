"""Properties of the L4 authorization engine, over small universes so that matches are common.

The engine compiles policies into closures; ``reference`` below is the plain reading of
ztunnel's ``Authorization::matches`` and ``assert_rbac`` on the frozen values, and every
generated case must agree with it. The other properties are the ones Istio's documentation
promises: a DENY that matches denies, a DENY that does not match changes nothing, dry-run
policies change nothing, and the order policies are found in does not matter.
"""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from mesh.authz import Connection, Decision, evaluate, first_matching_rule
from mesh.identity import Identity
from mesh.xds.authorization import (
    Action,
    Authorization,
    Clause,
    Match,
    MatchKind,
    Rule,
    Scope,
    ServiceAccountMatch,
    StringMatch,
)

NAMESPACES = ("a", "b", "team-a")
PATTERNS = (
    *map(StringMatch.parse, ("a", "b", "team-*", "*-a", "*", "cluster.local/ns/a/*", "*/sa/x")),
    StringMatch.parse("cluster.local/ns/a/sa/x"),
    StringMatch(MatchKind.PREFIX, ""),  # only from the wire: matches any string, but no plaintext principal
    StringMatch(MatchKind.EXACT, ""),  # only from the wire: a plaintext peer's namespace
)
NETWORKS = tuple(
    ipaddress.ip_network(n) for n in ("10.0.0.0/24", "10.0.0.1/32", "0.0.0.0/0", "fd00::/64", "::/0")
)
ADDRESSES = ("10.0.0.1", "10.0.0.9", "10.1.0.1", "fd00::1", "fd01::1", "::ffff:10.0.0.9")
PORTS = (80, 443, 8080)
ACCOUNTS = tuple(ServiceAccountMatch(ns, sa) for ns in ("a", "b") for sa in ("x", "y"))


def _some(values: tuple[object, ...]) -> st.SearchStrategy[tuple[object, ...]]:
    """Usually nothing (most fields of a real Match are empty), else one or two values."""
    return st.one_of(st.just(()), st.lists(st.sampled_from(values), min_size=1, max_size=2).map(tuple))


matches: st.SearchStrategy[Match] = st.builds(
    Match,
    namespaces=_some(PATTERNS),
    not_namespaces=_some(PATTERNS),
    principals=_some(PATTERNS),
    not_principals=_some(PATTERNS),
    source_ips=_some(NETWORKS),
    not_source_ips=_some(NETWORKS),
    destination_ips=_some(NETWORKS),
    not_destination_ips=_some(NETWORKS),
    destination_ports=_some(PORTS),
    not_destination_ports=_some(PORTS),
    service_accounts=_some(ACCOUNTS),
    not_service_accounts=_some(ACCOUNTS),
)
clauses = st.lists(matches, max_size=2).map(lambda ms: Clause(tuple(ms)))
rules = st.lists(clauses, max_size=2).map(lambda cs: Rule(tuple(cs)))


@st.composite
def policies(draw: st.DrawFn, action: Action | None = None, dry_run: bool | None = None) -> Authorization:
    return Authorization(
        name=draw(st.sampled_from(("p", "q", "r", "s", "t"))),
        namespace=draw(st.sampled_from(("shop", "istio-system"))),
        scope=draw(st.sampled_from(Scope)),
        action=draw(st.sampled_from(Action)) if action is None else action,
        rules=tuple(draw(st.lists(rules, max_size=3))),
        dry_run=draw(st.sampled_from((False, False, True))) if dry_run is None else dry_run,
    )


# Keys are unique among the policies that apply to one workload (they come from one store).
policy_lists = st.lists(policies(), max_size=5, unique_by=lambda p: p.key)


@st.composite
def connections(draw: st.DrawFn) -> Connection:
    identity = draw(
        st.one_of(
            st.none(),
            st.builds(
                Identity,
                trust_domain=st.sampled_from(("cluster.local", "other.td")),
                namespace=st.sampled_from(NAMESPACES),
                service_account=st.sampled_from(("x", "y")),
            ),
        )
    )
    return Connection.of(
        identity,
        draw(st.sampled_from(ADDRESSES)),
        draw(st.sampled_from(ADDRESSES)),
        draw(st.sampled_from(PORTS)),
    )


# --- the reference: ztunnel's reading, unoptimised ------------------------------------------


def _canonical(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _field(positive: tuple[object, ...], negative: tuple[object, ...], test: object) -> bool:
    assert callable(test)
    return (not positive or any(test(v) for v in positive)) and not any(test(v) for v in negative)


def reference_matches(p: Authorization, c: Connection) -> int | None:
    ident = c.src_identity
    uri = ident.uri if ident else ""
    ns = ident.namespace if ident else ""

    def principal(s: StringMatch) -> bool:
        return uri.startswith("spiffe://") and s.matches(uri.removeprefix("spiffe://"))

    def account(a: ServiceAccountMatch) -> bool:
        return ident is not None and (a.namespace, a.service_account) == (
            ident.namespace,
            ident.service_account,
        )

    def match(m: Match) -> bool:
        if m == Match():
            return False  # ztunnel skips an empty match
        return (
            _field(m.destination_ips, m.not_destination_ips, lambda n: c.dst_ip in n)
            and _field(m.source_ips, m.not_source_ips, lambda n: c.src_ip in n)
            and _field(m.destination_ports, m.not_destination_ports, lambda port: port == c.dst_port)
            and _field(m.service_accounts, m.not_service_accounts, account)
            and _field(m.principals, m.not_principals, principal)
            and _field(m.namespaces, m.not_namespaces, lambda s: s.matches(ns))
        )

    for i, r in enumerate(p.rules):
        if all(not cl.matches or any(match(m) for m in cl.matches) for cl in r.clauses):
            return i
    return None


def reference(ps: list[Authorization], c: Connection) -> tuple[bool, str | None, int | None]:
    ordered = sorted(ps, key=lambda p: p.key)
    for p in ordered:
        if p.action is Action.DENY and not p.dry_run and (i := reference_matches(p, c)) is not None:
            return False, p.key, i
    allows = [p for p in ordered if p.action is Action.ALLOW and not p.dry_run]
    if not allows:
        return True, None, None
    for p in allows:
        if (i := reference_matches(p, c)) is not None:
            return True, p.key, i
    return False, None, None


def verdict(d: Decision) -> tuple[bool, str | None, int | None]:
    return d.allow, d.policy, d.rule


# --- properties -------------------------------------------------------------------------------


@given(policy_lists, connections())
def test_agrees_with_the_reference(ps: list[Authorization], conn: Connection) -> None:
    assert verdict(evaluate(ps, conn)) == reference(ps, conn)
    for p in ps:
        assert first_matching_rule(p, conn) == reference_matches(p, conn)


@given(policy_lists, policies(action=Action.DENY, dry_run=False), connections())
def test_a_deny_denies_if_it_matches_and_changes_nothing_otherwise(
    ps: list[Authorization], deny: Authorization, conn: Connection
) -> None:
    ps = [p for p in ps if p.key != deny.key]
    before, after = evaluate(ps, conn), evaluate([*ps, deny], conn)
    if first_matching_rule(deny, conn) is not None:
        assert not after.allow
        assert after.policy is not None  # a DENY decided: this one or one sorting before it
    else:
        assert after == before


@given(policy_lists, policies(dry_run=True), connections())
def test_a_dry_run_policy_never_changes_the_decision(
    ps: list[Authorization], dry: Authorization, conn: Connection
) -> None:
    ps = [p for p in ps if p.key != dry.key]
    before, after = evaluate(ps, conn), evaluate([*ps, dry], conn)
    assert (after.allow, after.policy, after.rule, after.reason) == (
        before.allow,
        before.policy,
        before.rule,
        before.reason,
    )
    assert dry.key in {r.policy for r in after.dry_run}


@given(policy_lists.flatmap(lambda ps: st.tuples(st.just(ps), st.permutations(ps))), connections())
def test_policy_order_does_not_matter(
    pair: tuple[list[Authorization], list[Authorization]], conn: Connection
) -> None:
    ps, shuffled = pair
    assert evaluate(shuffled, conn) == evaluate(ps, conn)
    assert evaluate([*ps, *ps], conn) == evaluate(ps, conn)  # selected twice (namespace and listed)


@given(policy_lists, policies(action=Action.ALLOW, dry_run=False), connections())
def test_another_allow_keeps_an_allow_by_policy(
    ps: list[Authorization], allow: Authorization, conn: Connection
) -> None:
    """An ALLOW added beside ALLOW policies can only widen what is allowed."""
    ps = [p for p in ps if p.key != allow.key]
    before = evaluate(ps, conn)
    if before.allow and before.policy is not None:
        assert evaluate([*ps, allow], conn).allow


@given(policy_lists, connections())
def test_dry_run_verdict_is_the_decision_with_dry_runs_enforced(
    ps: list[Authorization], conn: Connection
) -> None:
    d = evaluate(ps, conn)
    if not any(p.dry_run for p in ps):
        assert d.dry_run == () and d.dry_run_allow is None
        return
    enforced = [Authorization(p.name, p.namespace, p.scope, p.action, p.rules) for p in ps]
    assert d.dry_run_allow == evaluate(enforced, conn).allow
    assert [r.policy for r in d.dry_run] == sorted(p.key for p in ps if p.dry_run)
