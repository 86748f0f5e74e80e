"""The L4 authorization engine against Istio's documented behaviour and ztunnel's own cases.

Expected values come from istio.io's AuthorizationPolicy reference (evaluation order, the
``spec: {}`` / ``rules: [{}]`` idioms, field meanings), from istiod's lowering of
PeerAuthentication to DENY policies, and from ztunnel's ``src/rbac.rs`` and ``src/state.rs``
tests, restated here; where ztunnel behaves in a way the documentation does not say (empty
matches, plaintext peers and ``not_`` fields) the case says so.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

import pytest

from mesh.authz import Connection, Decision, DryRun, PolicySet, compile_policy, evaluate, first_matching_rule
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

TD = "cluster.local"
ALLOW, DENY = Action.ALLOW, Action.DENY
PRESENCE = StringMatch(MatchKind.PRESENCE)

# --- builders -------------------------------------------------------------------------------


def m(
    *,
    namespaces: Sequence[str] = (),
    not_namespaces: Sequence[str] = (),
    principals: Sequence[str] = (),
    not_principals: Sequence[str] = (),
    source_ips: Sequence[str] = (),
    not_source_ips: Sequence[str] = (),
    destination_ips: Sequence[str] = (),
    not_destination_ips: Sequence[str] = (),
    destination_ports: Sequence[int] = (),
    not_destination_ports: Sequence[int] = (),
    service_accounts: Sequence[str] = (),
    not_service_accounts: Sequence[str] = (),
) -> Match:
    """A Match written the way a policy author writes it: Istio patterns, CIDRs, ``ns/sa``."""

    def strings(xs: Sequence[str]) -> tuple[StringMatch, ...]:
        return tuple(map(StringMatch.parse, xs))

    def nets(xs: Sequence[str]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(ipaddress.ip_network(x, strict=False) for x in xs)

    def accounts(xs: Sequence[str]) -> tuple[ServiceAccountMatch, ...]:
        return tuple(ServiceAccountMatch(*x.split("/", 1)) for x in xs)

    return Match(
        namespaces=strings(namespaces),
        not_namespaces=strings(not_namespaces),
        principals=strings(principals),
        not_principals=strings(not_principals),
        source_ips=nets(source_ips),
        not_source_ips=nets(not_source_ips),
        destination_ips=nets(destination_ips),
        not_destination_ips=nets(not_destination_ips),
        destination_ports=tuple(destination_ports),
        not_destination_ports=tuple(not_destination_ports),
        service_accounts=accounts(service_accounts),
        not_service_accounts=accounts(not_service_accounts),
    )


def rule(*clauses: Sequence[Match]) -> Rule:
    """``rule([a, b], [c])``: (a OR b) AND c."""
    return Rule(tuple(Clause(tuple(c)) for c in clauses))


def when(**fields: object) -> Rule:
    """A rule of one clause holding one match."""
    return rule([m(**fields)])  # type: ignore[arg-type]


def pol(
    name: str,
    *rules: Rule,
    action: Action = ALLOW,
    ns: str = "shop",
    scope: Scope = Scope.WORKLOAD_SELECTOR,
    dry_run: bool = False,
) -> Authorization:
    return Authorization(name=name, namespace=ns, scope=scope, action=action, rules=rules, dry_run=dry_run)


def mtls(
    ns: str = "shop",
    sa: str = "sleep",
    *,
    td: str = TD,
    src: str = "10.0.0.1",
    dst: str = "10.0.1.1",
    port: int = 8080,
) -> Connection:
    return Connection.of(Identity(td, ns, sa), src, dst, port)


def plain(*, src: str = "10.0.0.1", dst: str = "10.0.1.1", port: int = 8080) -> Connection:
    return Connection.of(None, src, dst, port)


# --- shared policies ------------------------------------------------------------------------

ALLOW_NOTHING = pol("allow-nothing")  # spec: {}
ALLOW_ALL = pol("allow-all", Rule())  # rules: [{}]
DENY_ALL = pol("deny-all", Rule(), action=DENY)
STRICT = pol(  # istiod's conversion of a mesh-wide STRICT PeerAuthentication
    "istio_converted_static_strict",
    when(not_principals=["*"]),
    action=DENY,
    ns="istio-system",
    scope=Scope.GLOBAL,
)
WEB_8080_PERMISSIVE = pol(  # STRICT with portLevelMtls {8080: PERMISSIVE}
    "converted_peer_authentication_web", when(not_principals=["*"], not_destination_ports=[8080]), action=DENY
)
DB_5432_STRICT = pol(  # UNSET with portLevelMtls {5432: STRICT}
    "converted_peer_authentication_db", when(not_principals=["*"], destination_ports=[5432]), action=DENY
)
FROM_FRONTEND = pol("from-frontend", when(namespaces=["frontend"]), scope=Scope.NAMESPACE)
GLOBAL_DENY_UNTRUSTED = pol(
    "deny-untrusted", when(namespaces=["untrusted"]), action=DENY, ns="istio-system", scope=Scope.GLOBAL
)
GLOBAL_ALLOW_MONITORING = pol(
    "allow-monitoring", when(namespaces=["monitoring"]), ns="istio-system", scope=Scope.GLOBAL
)
SLEEP = "cluster.local/ns/shop/sa/sleep"


@dataclass(frozen=True)
class Case:
    policies: tuple[Authorization, ...]
    conn: Connection
    allow: bool
    policy: str | None = None  # the deciding policy's key; None: the default decided
    rule: int | None = None


def case(
    id: str,
    policies: Sequence[Authorization],
    conn: Connection,
    allow: bool,
    policy: Authorization | None = None,
    rule: int | None = None,
) -> object:
    if policy is not None and rule is None:
        rule = 0
    return pytest.param(Case(tuple(policies), conn, allow, policy.key if policy else None, rule), id=id)


P_SLEEP = pol("p", when(principals=[SLEEP]))
P_PREFIX = pol("p", when(principals=["cluster.local/ns/shop/*"]))
P_SUFFIX = pol("p", when(principals=["*/sa/sleep"]))
P_PRESENCE = pol("p", when(principals=["*"]))
P_EMPTY_PREFIX = pol("p", rule([Match(principals=(StringMatch(MatchKind.PREFIX, ""),))]))
P_SPIFFE = pol("p", when(principals=["spiffe://" + SLEEP]))
NOT_BAD = pol("p", when(not_principals=["cluster.local/ns/shop/sa/bad"]))
NS = pol("p", when(namespaces=["team-*", "*-prod", "exact"]))
NS_PRESENCE_DENY = pol("p", when(namespaces=["*"]), action=DENY)
NOT_NS = pol("p", when(not_namespaces=["untrusted"]))
NS_AND_NOT = pol("p", when(namespaces=["team-*"], not_namespaces=["team-x"]))
NS_EMPTY = pol("p", rule([Match(namespaces=(StringMatch(MatchKind.EXACT, ""),))]))
SA = pol("p", when(service_accounts=["shop/sleep", "ops/admin"]))
NOT_SA_DENY = pol("p", when(not_service_accounts=["shop/sleep"]), action=DENY)
IP4 = pol("p", when(source_ips=["10.0.0.0/24"]))
IP4_HOST = pol("p", when(source_ips=["10.0.0.1"]))
IP6 = pol("p", when(source_ips=["fd00::/64"]))
IP_MIXED = pol("p", when(source_ips=["10.0.0.0/24", "fd00::/64"]))
IP_ANY4 = pol("p", when(source_ips=["0.0.0.0/0"]))
NOT_IP4_DENY = pol("p", when(not_source_ips=["10.0.0.0/8"]), action=DENY)
NOT_IP6_DENY = pol("p", when(not_source_ips=["fd00::/8"]), action=DENY)
DST_IP = pol("p", when(destination_ips=["10.0.1.0/24", "fd00:1::/64"]))
NOT_DST_IP = pol("p", when(not_destination_ips=["10.0.1.1/32"]))
PORTS = pol("p", when(destination_ports=[80, 443]))
NOT_PORTS = pol("p", when(not_destination_ports=[22]))
NS_AND_PORT = pol("p", when(namespaces=["a"], destination_ports=[80]))
NESTED = pol("p", rule([m(namespaces=["a"]), m(namespaces=["b"])], [m(destination_ports=[80])]))
MULTI_RULE = pol("p", when(namespaces=["a"]), when(namespaces=["b"]))
EMPTY_CLAUSE = pol("p", Rule((Clause(()),)))
ONLY_EMPTY_MATCH = pol("p", rule([Match()]))
ONLY_EMPTY_MATCH_DENY = pol("p", rule([Match()]), action=DENY)
EMPTY_BESIDE_REAL = pol("p", rule([Match(), m(namespaces=["a"])]))
EMPTY_MATCH_THEN_ALL = pol("p", rule([Match()]), Rule())  # rule 0 can never match
DENY_NO_RULES = pol("deny-nothing", action=DENY)
DENY_BAD = pol("deny-bad", when(namespaces=["bad"]), action=DENY)
ALLOW_A = pol("allow-a", when(namespaces=["a"]))
ALLOW_B = pol("allow-b", when(namespaces=["b"]))
ALLOW_AB = pol("allow-ab", when(namespaces=["a", "b"]))
DRY_DENY_ALL = pol("dry-deny-all", Rule(), action=DENY, dry_run=True)
DRY_ALLOW_NOTHING = pol("dry-allow-nothing", dry_run=True)
DRY_ALLOW_A = pol("dry-allow-a", when(namespaces=["a"]), dry_run=True)

CASES = [
    # evaluation order and the spec idioms
    case("no-policies", [], mtls(), True),
    case("no-policies-plaintext", [], plain(), True),
    case("allow-nothing-mtls", [ALLOW_NOTHING], mtls(), False),
    case("allow-nothing-plaintext", [ALLOW_NOTHING], plain(), False),
    case("allow-all-mtls", [ALLOW_ALL], mtls(), True, ALLOW_ALL),
    case("allow-all-plaintext", [ALLOW_ALL], plain(), True, ALLOW_ALL),
    case("deny-all", [DENY_ALL], mtls(), False, DENY_ALL),
    case("deny-all-beats-allow-all", [ALLOW_ALL, DENY_ALL], mtls(), False, DENY_ALL),
    case("deny-without-rules-matches-nothing", [DENY_NO_RULES], plain(), True),
    case("deny-beats-allow", [ALLOW_ALL, DENY_BAD], mtls("bad"), False, DENY_BAD),
    case("deny-not-matching-then-allow", [ALLOW_ALL, DENY_BAD], mtls("good"), True, ALLOW_ALL),
    case("several-allow-second-matches", [ALLOW_A, ALLOW_B], mtls("b"), True, ALLOW_B),
    case("several-allow-first-by-key", [ALLOW_B, ALLOW_AB], mtls("b"), True, ALLOW_AB),
    case("several-allow-none-matches", [ALLOW_A, ALLOW_B], mtls("c"), False),
    case("allow-nothing-beside-allow", [ALLOW_NOTHING, ALLOW_A], mtls("a"), True, ALLOW_A),
    # rules ORed, clauses ANDed, matches ORed, empty pieces (rbac.rs rbac_empty_policy)
    case("second-rule", [MULTI_RULE], mtls("b"), True, MULTI_RULE, 1),
    case("no-rule", [MULTI_RULE], mtls("c"), False),
    case("nested-ns-a-port-80", [NESTED], mtls("a", port=80), True, NESTED),
    case("nested-ns-b-port-80", [NESTED], mtls("b", port=80), True, NESTED),
    case("nested-wrong-ns", [NESTED], mtls("c", port=80), False),
    case("nested-wrong-port", [NESTED], mtls("b", port=81), False),
    case("fields-anded", [NS_AND_PORT], mtls("a", port=81), False),
    case("fields-anded-both", [NS_AND_PORT], mtls("a", port=80), True, NS_AND_PORT),
    case("clause-without-matches-matches-all", [EMPTY_CLAUSE], plain(), True, EMPTY_CLAUSE),
    case("empty-match-matches-nothing-allow", [ONLY_EMPTY_MATCH], mtls(), False),
    case("empty-match-matches-nothing-deny", [ONLY_EMPTY_MATCH_DENY], plain(), True),
    case("empty-match-beside-real-one", [EMPTY_BESIDE_REAL], mtls("a"), True, EMPTY_BESIDE_REAL),
    case("empty-match-beside-real-one-other", [EMPTY_BESIDE_REAL], mtls("b"), False),
    case("never-rule-skipped-index-kept", [EMPTY_MATCH_THEN_ALL], mtls(), True, EMPTY_MATCH_THEN_ALL, 1),
    # principals
    case("principal-exact", [P_SLEEP], mtls(), True, P_SLEEP),
    case("principal-exact-other-sa", [P_SLEEP], mtls(sa="curl"), False),
    case("principal-exact-other-td", [P_SLEEP], mtls(td="other.td"), False),
    case("principal-exact-plaintext", [P_SLEEP], plain(), False),
    case("principal-with-spiffe-never", [P_SPIFFE], mtls(), False),
    case("principal-prefix", [P_PREFIX], mtls(sa="any"), True, P_PREFIX),
    case("principal-prefix-other-ns", [P_PREFIX], mtls("shopx"), False),
    case("principal-suffix", [P_SUFFIX], mtls("anywhere", td="x.td"), True, P_SUFFIX),
    case("principal-suffix-other", [P_SUFFIX], mtls(sa="sleepy"), False),
    case("principal-presence-mtls", [P_PRESENCE], mtls(), True, P_PRESENCE),
    case("principal-presence-plaintext", [P_PRESENCE], plain(), False),
    case("principal-empty-prefix-plaintext", [P_EMPTY_PREFIX], plain(), False),
    case("principal-empty-prefix-mtls", [P_EMPTY_PREFIX], mtls(), True, P_EMPTY_PREFIX),
    case("not-principals-good", [NOT_BAD], mtls(), True, NOT_BAD),
    case("not-principals-bad", [NOT_BAD], mtls(sa="bad"), False),
    case("not-principals-plaintext", [NOT_BAD], plain(), True, NOT_BAD),
    # namespaces
    case("namespace-exact", [FROM_FRONTEND], mtls("frontend"), True, FROM_FRONTEND),
    case("namespace-other", [FROM_FRONTEND], mtls("backend"), False),
    case("namespace-plaintext", [FROM_FRONTEND], plain(), False),
    case("namespace-prefix", [NS], mtls("team-a"), True, NS),
    case("namespace-suffix", [NS], mtls("web-prod"), True, NS),
    case("namespace-exact-among-patterns", [NS], mtls("exact"), True, NS),
    case("namespace-no-pattern", [NS], mtls("exactly"), False),
    case("namespace-presence-plaintext", [NS_PRESENCE_DENY], plain(), True),
    case("namespace-presence-mtls", [NS_PRESENCE_DENY], mtls(), False, NS_PRESENCE_DENY),
    case("not-namespaces-other", [NOT_NS], mtls("trusted"), True, NOT_NS),
    case("not-namespaces-listed", [NOT_NS], mtls("untrusted"), False),
    case("not-namespaces-plaintext", [NOT_NS], plain(), True, NOT_NS),
    case("namespaces-and-not", [NS_AND_NOT], mtls("team-y"), True, NS_AND_NOT),
    case("namespaces-and-not-excluded", [NS_AND_NOT], mtls("team-x"), False),
    # ztunnel compares a plaintext peer's namespace as "": an exact "" (only possible from the
    # wire) matches it.
    case("namespace-exact-empty-plaintext", [NS_EMPTY], plain(), True, NS_EMPTY),
    case("namespace-exact-empty-mtls", [NS_EMPTY], mtls(), False),
    # service accounts (namespace + name; the trust domain is not compared)
    case("service-account", [SA], mtls(), True, SA),
    case("service-account-second", [SA], mtls("ops", "admin"), True, SA),
    case("service-account-other-td", [SA], mtls(td="other.td"), True, SA),
    case("service-account-other", [SA], mtls(sa="curl"), False),
    case("service-account-same-name-other-ns", [SA], mtls("ops", "sleep"), False),
    case("service-account-plaintext", [SA], plain(), False),
    case("not-service-accounts-listed", [NOT_SA_DENY], mtls(), True),
    case("not-service-accounts-other", [NOT_SA_DENY], mtls(sa="curl"), False, NOT_SA_DENY),
    case("not-service-accounts-plaintext", [NOT_SA_DENY], plain(), False, NOT_SA_DENY),
    # ipBlocks / notIpBlocks
    case("ipblock-v4", [IP4], plain(src="10.0.0.7"), True, IP4),
    case("ipblock-v4-outside", [IP4], plain(src="10.0.1.7"), False),
    case("ipblock-v4-host", [IP4_HOST], plain(src="10.0.0.1"), True, IP4_HOST),
    case("ipblock-v4-host-other", [IP4_HOST], plain(src="10.0.0.2"), False),
    case("ipblock-v4-mapped-v6-source", [IP4], plain(src="::ffff:10.0.0.7"), True, IP4),
    case("ipblock-v4-vs-v6-source", [IP4], plain(src="fd00::7"), False),
    case("ipblock-v4-any-vs-v6-source", [IP_ANY4], plain(src="::1"), False),
    case("ipblock-v4-any", [IP_ANY4], plain(src="192.0.2.1"), True, IP_ANY4),
    case("ipblock-v6", [IP6], plain(src="fd00::1:2"), True, IP6),
    case("ipblock-v6-outside", [IP6], plain(src="fd00:0:0:1::1"), False),
    case("ipblock-v6-vs-v4-source", [IP6], plain(src="10.0.0.7"), False),
    case("ipblock-mixed-v4", [IP_MIXED], plain(src="10.0.0.9"), True, IP_MIXED),
    case("ipblock-mixed-v6", [IP_MIXED], plain(src="fd00::9"), True, IP_MIXED),
    case("ipblock-mixed-neither", [IP_MIXED], plain(src="192.0.2.9"), False),
    case("not-ipblock-v4-inside", [NOT_IP4_DENY], plain(src="10.1.2.3"), True),
    case("not-ipblock-v4-outside", [NOT_IP4_DENY], plain(src="192.168.1.1"), False, NOT_IP4_DENY),
    case("not-ipblock-v4-vs-v6", [NOT_IP4_DENY], plain(src="fd00::1"), False, NOT_IP4_DENY),
    case("not-ipblock-v6-inside", [NOT_IP6_DENY], plain(src="fd12::1"), True),
    case("not-ipblock-v6-outside", [NOT_IP6_DENY], plain(src="2001:db8::1"), False, NOT_IP6_DENY),
    # destination IPs and ports
    case("destination-ip-v4", [DST_IP], plain(dst="10.0.1.200"), True, DST_IP),
    case("destination-ip-v6", [DST_IP], plain(src="fd00::1", dst="fd00:1::5"), True, DST_IP),
    case("destination-ip-other", [DST_IP], plain(dst="10.0.2.1"), False),
    case("not-destination-ip-listed", [NOT_DST_IP], plain(dst="10.0.1.1"), False),
    case("not-destination-ip-other", [NOT_DST_IP], plain(dst="10.0.1.2"), True, NOT_DST_IP),
    case("port-listed", [PORTS], mtls(port=443), True, PORTS),
    case("port-not-listed", [PORTS], mtls(port=8080), False),
    case("not-ports-listed", [NOT_PORTS], mtls(port=22), False),
    case("not-ports-other", [NOT_PORTS], mtls(port=2222), True, NOT_PORTS),
    # mesh-wide (GLOBAL) policies mixed with namespace ones
    case(
        "global-deny-beats-ns-allow",
        [FROM_FRONTEND, GLOBAL_DENY_UNTRUSTED],
        mtls("untrusted"),
        False,
        GLOBAL_DENY_UNTRUSTED,
    ),
    case(
        "ns-allow-under-global-deny",
        [FROM_FRONTEND, GLOBAL_DENY_UNTRUSTED],
        mtls("frontend"),
        True,
        FROM_FRONTEND,
    ),
    case("global-deny-only-allows-others", [GLOBAL_DENY_UNTRUSTED], mtls("other"), True),
    case("ns-allow-present-nothing-matches", [FROM_FRONTEND, GLOBAL_DENY_UNTRUSTED], mtls("backend"), False),
    case(
        "global-allow-with-ns-allow",
        [FROM_FRONTEND, GLOBAL_ALLOW_MONITORING],
        mtls("monitoring"),
        True,
        GLOBAL_ALLOW_MONITORING,
    ),
    case("global-allow-makes-allow-present", [GLOBAL_ALLOW_MONITORING], mtls("shop"), False),
    # PeerAuthentication, as istiod converts it
    case("strict-plaintext", [STRICT], plain(), False, STRICT),
    case("strict-mtls", [STRICT], mtls(), True),
    case("strict-with-allow", [STRICT, FROM_FRONTEND], mtls("frontend"), True, FROM_FRONTEND),
    case("strict-with-allow-plaintext", [STRICT, ALLOW_ALL], plain(), False, STRICT),
    case("port-permissive-plaintext", [WEB_8080_PERMISSIVE], plain(port=8080), True),
    case("port-permissive-other-port", [WEB_8080_PERMISSIVE], plain(port=9090), False, WEB_8080_PERMISSIVE),
    case("port-permissive-mtls", [WEB_8080_PERMISSIVE], mtls(port=9090), True),
    case("port-strict-plaintext", [DB_5432_STRICT], plain(port=5432), False, DB_5432_STRICT),
    case("port-strict-other-port", [DB_5432_STRICT], plain(port=80), True),
    case("port-strict-mtls", [DB_5432_STRICT], mtls(port=5432), True),
    # dry-run policies never decide
    case("dry-run-deny-all", [DRY_DENY_ALL], plain(), True),
    case("dry-run-deny-all-with-allow", [DRY_DENY_ALL, ALLOW_A], mtls("a"), True, ALLOW_A),
    case("dry-run-allow-nothing", [DRY_ALLOW_NOTHING], mtls(), True),
    case("dry-run-allow-not-matching", [DRY_ALLOW_A], mtls("b"), True),
    case("dry-run-allow-matching-no-enforced-match", [DRY_ALLOW_A, ALLOW_B], mtls("a"), False),
    case("dry-run-only-with-deny", [DRY_ALLOW_A, DENY_BAD], mtls("bad"), False, DENY_BAD),
]


@pytest.mark.parametrize("c", CASES)
def test_conformance(c: Case) -> None:
    d = evaluate(c.policies, c.conn)
    assert (d.allow, d.policy, d.rule) == (c.allow, c.policy, c.rule), d.reason
    assert evaluate(PolicySet(c.policies), c.conn) == d
    assert evaluate(tuple(reversed(c.policies)), c.conn) == d


# --- ztunnel's rbac.rs field table, restated ------------------------------------------------
# Three connections: plaintext 127.0.0.1 -> 127.0.0.2:8080; td/namespace/account on the same
# addresses; td-alt/ns-alt/sa-alt from 127.0.0.3 to 127.0.0.4:9090. Each field is tried alone.

PLAIN = Connection.of(None, "127.0.0.1", "127.0.0.2", 8080)
TLS = Connection.of(Identity("td", "namespace", "account"), "127.0.0.1", "127.0.0.2", 8080)
TLS_ALT = Connection.of(Identity("td-alt", "ns-alt", "sa-alt"), "127.0.0.3", "127.0.0.4", 9090)
EXACT_NS = (StringMatch(MatchKind.EXACT, "namespace"),)
EXACT_PRINCIPAL = (StringMatch(MatchKind.EXACT, "td/ns/namespace/sa/account"),)
ACCOUNT = (ServiceAccountMatch("namespace", "account"),)
IP1 = (ipaddress.ip_network("127.0.0.1/32"),)
IP2 = (ipaddress.ip_network("127.0.0.2/32"),)


@pytest.mark.parametrize(
    ("match", "plain", "tls", "alt"),
    [
        (Match(namespaces=EXACT_NS), False, True, False),
        (Match(not_namespaces=EXACT_NS), True, False, True),
        (Match(service_accounts=ACCOUNT), False, True, False),
        (Match(not_service_accounts=ACCOUNT), True, False, True),
        (Match(principals=EXACT_PRINCIPAL), False, True, False),
        (Match(not_principals=EXACT_PRINCIPAL), True, False, True),
        (Match(source_ips=IP1), True, True, False),
        (Match(not_source_ips=IP1), False, False, True),
        (Match(destination_ips=IP2), True, True, False),
        (Match(not_destination_ips=IP2), False, False, True),
        (Match(destination_ips=(ipaddress.ip_network("127.0.0.1/24", strict=False),)), True, True, True),
        (Match(destination_ports=(8080,)), True, True, False),
        (Match(not_destination_ports=(8080,)), False, False, True),
    ],
)
def test_ztunnel_field_table(match: Match, plain: bool, tls: bool, alt: bool) -> None:
    p = pol("p", rule([match]), scope=Scope.GLOBAL)
    got = [first_matching_rule(p, c) is not None for c in (PLAIN, TLS, TLS_ALT)]
    assert got == [plain, tls, alt]


def test_ztunnel_empty_policy() -> None:
    assert first_matching_rule(pol("p", rule([Match()])), PLAIN) is None  # [[[empty match]]]
    assert first_matching_rule(pol("p", Rule((Clause(()),))), PLAIN) == 0  # [[[]]]
    assert first_matching_rule(pol("p", Rule()), PLAIN) == 0  # [[]]
    assert first_matching_rule(pol("p"), PLAIN) is None  # []


@pytest.mark.parametrize(
    ("pattern", "value", "expected"),
    [
        (StringMatch(MatchKind.EXACT, "foo"), "foo", True),
        (StringMatch(MatchKind.EXACT, "foo"), "not", False),
        (StringMatch(MatchKind.EXACT, "foo"), "", False),
        (StringMatch(MatchKind.PREFIX, "foo"), "foobar", True),
        (StringMatch(MatchKind.PREFIX, "foo"), "notfoo", False),
        (StringMatch(MatchKind.PREFIX, "foo"), "", False),
        (StringMatch(MatchKind.SUFFIX, "foo"), "barfoo", True),
        (StringMatch(MatchKind.SUFFIX, "foo"), "foonot", False),
        (StringMatch(MatchKind.SUFFIX, "foo"), "", False),
        (StringMatch(MatchKind.PRESENCE), "foo", True),
        (StringMatch(MatchKind.PRESENCE), "", False),
    ],
)
def test_ztunnel_string_match(pattern: StringMatch, value: str, expected: bool) -> None:
    """rbac.rs's string_match table, through a namespace field ("" is a plaintext peer)."""
    conn = Connection.of(Identity(TD, value, "sa"), "10.0.0.1", "10.0.0.2", 80) if value else plain()
    p = pol("p", rule([Match(namespaces=(pattern,))]))
    assert (first_matching_rule(p, conn) is not None) is expected
    assert pattern.matches(value) is expected  # the model's own matcher agrees


def test_ztunnel_state_deny_allow_logic() -> None:
    """state.rs assert_rbac_logic_deny_allow: dry-run wildcards, an ALLOW and a DENY in ns1."""
    policies = [
        pol("wildcard-allow", Rule(), ns="ns1", scope=Scope.NAMESPACE, dry_run=True),
        pol("wildcard-deny", Rule(), action=DENY, ns="ns1", scope=Scope.NAMESPACE, dry_run=True),
        pol(
            "foo",
            when(principals=["cluster.local/ns/default/sa/defaultacct"]),
            ns="ns1",
            scope=Scope.NAMESPACE,
        ),
        pol(
            "deny",
            when(principals=["cluster.local/ns/default/sa/denyacct"]),
            action=DENY,
            ns="ns1",
            scope=Scope.NAMESPACE,
        ),
    ]

    def conn(sa: str) -> Connection:
        return Connection.of(Identity(TD, "default", sa), "192.168.1.1", "10.0.0.1", 8080)

    assert evaluate([], conn("not-defaultacct")).allow  # a workload in ns2: nothing applies
    assert evaluate(policies, conn("defaultacct")).policy == "ns1/foo"
    assert evaluate(policies, conn("not-defaultacct")) == Decision(
        False,
        None,
        None,
        "no ALLOW policy matched (ns1/foo)",
        dry_run=(DryRun("ns1/wildcard-allow", ALLOW, 0), DryRun("ns1/wildcard-deny", DENY, 0)),
        dry_run_allow=False,
    )
    denied = evaluate(policies, conn("denyacct"))
    assert (denied.allow, denied.policy) == (False, "ns1/deny")


# --- the Decision itself --------------------------------------------------------------------


def test_reasons() -> None:
    assert str(DryRun("shop/x", DENY, 1)) == "dry-run DENY policy shop/x: rule 1 matched"
    assert str(DryRun("shop/x", ALLOW, None)) == "dry-run ALLOW policy shop/x: no rule matched"
    assert evaluate([DENY_ALL], mtls()).reason == "denied by DENY policy shop/deny-all rule 0"
    assert evaluate([MULTI_RULE], mtls("b")).reason == "allowed by ALLOW policy shop/p rule 1"
    assert evaluate([], mtls()).reason == "allowed: no ALLOW policy applies"
    # sorted, each key once even when a policy was selected twice (namespace and listed)
    assert evaluate([ALLOW_B, ALLOW_A, ALLOW_B], mtls("c")).reason == (
        "no ALLOW policy matched (shop/allow-a, shop/allow-b)"
    )


def test_several_matching_denies_name_the_first_by_key() -> None:
    d1 = pol("z-deny", Rule(), action=DENY)
    d2 = pol("a-deny", Rule(), action=DENY)
    assert evaluate([d1, d2], mtls()).policy == "shop/a-deny"


@pytest.mark.parametrize(
    ("policies", "conn", "dry_run", "dry_run_allow"),
    [
        ([ALLOW_ALL], mtls(), (), None),
        ([DRY_DENY_ALL], mtls(), (DryRun("shop/dry-deny-all", DENY, 0),), False),
        ([DRY_DENY_ALL, DENY_ALL], mtls(), (DryRun("shop/dry-deny-all", DENY, 0),), False),
        # no enforced ALLOW and the dry-run one does not match: ztunnel's "dry-run: no allow policies match"
        ([DRY_ALLOW_A], mtls("b"), (DryRun("shop/dry-allow-a", ALLOW, None),), False),
        ([DRY_ALLOW_A], mtls("a"), (DryRun("shop/dry-allow-a", ALLOW, 0),), True),
        ([DRY_ALLOW_NOTHING], mtls(), (DryRun("shop/dry-allow-nothing", ALLOW, None),), False),
        ([DRY_ALLOW_A, ALLOW_B], mtls("b"), (DryRun("shop/dry-allow-a", ALLOW, None),), True),
        ([DRY_ALLOW_A, ALLOW_B], mtls("a"), (DryRun("shop/dry-allow-a", ALLOW, 0),), True),
        ([DRY_ALLOW_A, ALLOW_B], mtls("c"), (DryRun("shop/dry-allow-a", ALLOW, None),), False),
        (
            [DRY_ALLOW_A, DRY_DENY_ALL],
            mtls("a"),
            (DryRun("shop/dry-allow-a", ALLOW, 0), DryRun("shop/dry-deny-all", DENY, 0)),
            False,
        ),
        (
            [pol("dry-deny-a", when(namespaces=["a"]), action=DENY, dry_run=True)],
            mtls("b"),
            (DryRun("shop/dry-deny-a", DENY, None),),
            True,
        ),
    ],
)
def test_dry_run_reported(
    policies: list[Authorization], conn: Connection, dry_run: tuple[DryRun, ...], dry_run_allow: bool | None
) -> None:
    d = evaluate(policies, conn)
    assert d.dry_run == dry_run
    assert d.dry_run_allow is dry_run_allow
    assert all(r.matched is (r.rule is not None) for r in d.dry_run)
    assert all(str(r).startswith(f"dry-run {r.action.value} policy {r.policy}: ") for r in d.dry_run)
    enforced = [p for p in policies if not p.dry_run]
    e = evaluate(enforced, conn)
    assert (d.allow, d.policy, d.rule, d.reason) == (e.allow, e.policy, e.rule, e.reason)


# --- Connection and compilation -------------------------------------------------------------


def test_connection_parses_and_derives_once() -> None:
    c = Connection.of(Identity(TD, "shop", "sleep"), "::ffff:10.0.0.1", "fd00::1", 80)
    assert c.src_ip == ipaddress.IPv4Address("10.0.0.1")  # canonical, as ztunnel's to_canonical
    assert c.dst_ip == ipaddress.IPv6Address("fd00::1")
    assert (c.peer_principal, c.peer_namespace, c.peer_service_account) == (SLEEP, "shop", ("shop", "sleep"))
    p = plain()
    assert (p.peer_principal, p.peer_namespace, p.peer_service_account) == (None, "", None)
    assert c == Connection(c.src_identity, c.src_ip, c.dst_ip, 80)
    with pytest.raises(ValueError, match="does not appear to be an IPv4 or IPv6 address"):
        Connection.of(None, "10.0.0", "10.0.0.1", 80)


def test_compile_cache_is_by_identity() -> None:
    a = pol("p", when(namespaces=["a"]))
    b = pol("p", when(namespaces=["a"]))  # equal, another object
    assert compile_policy(a) is compile_policy(a)
    assert compile_policy(a) is not compile_policy(b)
    assert compile_policy(a).source is a
    assert "shop/p" in repr(compile_policy(a))


def test_policy_set_accepts_compiled_policies_and_is_reusable() -> None:
    ps = PolicySet([compile_policy(ALLOW_A), DENY_BAD])
    assert ps.evaluate(mtls("a")).policy == ALLOW_A.key
    assert ps.evaluate(mtls("bad")).policy == DENY_BAD.key
    first = ps.evaluate(mtls("c"))
    assert ps.evaluate(mtls("d")) is first  # the default decision is built once per set
