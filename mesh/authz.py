"""L4 authorization: may this connection reach the workload it is addressed to?

Decide-then-do: :func:`evaluate` is a pure function of the policies that apply to the
destination workload and the facts of one connection, returning a :class:`Decision` that the
inbound path enforces and logs. It decides exactly as Istio's ztunnel (``src/rbac.rs``,
``assert_rbac`` in ``src/state.rs``), including the corners the CRD documentation is silent on:

- An enforced DENY that matches denies; else no enforced ALLOW policy allows; else an ALLOW
  that matches allows; else deny. Dry-run policies are evaluated, reported, never decisive.
- A policy without rules matches nothing, ALLOW or DENY. A rule without clauses matches every
  connection, and so does a clause without matches; but a Match with no field populated
  matches *nothing*, so a clause made only of empty Matches never matches.
- Without a peer identity (plaintext) no principal pattern matches, not even a prefix ``""``,
  so every ``not_principals`` does; service accounts likewise. The peer namespace is taken to
  be ``""`` and matched like any string: ``namespaces: [presence]`` fails, ``not_namespaces``
  passes, and an exact ``""`` would match.
- Service accounts compare namespace and name only; the trust domain is not looked at.
- Principals are compared in the ``<trust-domain>/ns/<ns>/sa/<sa>`` form (no ``spiffe://``).

Evaluation is fast because policies are compiled once (:func:`compile_policy`, cached by
object identity, so the frozen values the discovery client hands out are compiled the first
time a connection meets them) and a destination's policies can be grouped once into a
:class:`PolicySet` that the proxy state keeps per workload and snapshot version. A decision
then costs a few small function calls per applicable policy and, without dry-run policies,
allocates nothing: decisions are built at compile time.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from operator import attrgetter

from mesh.identity import Identity
from mesh.xds.authorization import (
    Action,
    Authorization,
    Clause,
    IPNetwork,
    Match,
    MatchKind,
    Rule,
    ServiceAccountMatch,
    StringMatch,
)

__all__ = [
    "CompiledPolicy",
    "Connection",
    "Decision",
    "DryRun",
    "IPAddress",
    "PolicySet",
    "compile_policy",
    "evaluate",
    "first_matching_rule",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Addresses and networks become ints so that a CIDR test is one ``&`` and one ``==``. An IPv6
# value carries bit 128, which every IPv4 mask keeps, so the two families never match each other.
_V6_TAG = 1 << 128
_ALL_BITS = (1 << 129) - 1


def _address_key(ip: IPAddress) -> int:
    return int(ip) | _V6_TAG if ip.version == 6 else int(ip)


def _network_key(net: IPNetwork) -> tuple[int, int]:
    mask = _ALL_BITS ^ ((1 << (net.max_prefixlen - net.prefixlen)) - 1)
    return mask, _address_key(net.network_address)


def _canonical(ip: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address (a dual-stack socket's view of IPv4) as IPv4, as ztunnel's
    ``socket::to_canonical`` does before any policy sees it."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@dataclass(frozen=True, slots=True)
class Connection:
    """The facts of one inbound connection that L4 policy can look at.

    ``dst_port`` is the workload's port (the target port, not HBONE's 15008). The fields after
    ``dst_port`` are derived once here so that evaluating many policies does not redo them.
    """

    src_identity: Identity | None  # None: plaintext, no peer identity
    src_ip: IPAddress
    dst_ip: IPAddress
    dst_port: int
    peer_principal: str | None = field(init=False, repr=False, compare=False)
    peer_namespace: str = field(init=False, repr=False, compare=False)
    peer_service_account: tuple[str, str] | None = field(init=False, repr=False, compare=False)
    src_key: int = field(init=False, repr=False, compare=False)
    dst_key: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        src, dst = _canonical(self.src_ip), _canonical(self.dst_ip)
        set_ = object.__setattr__
        set_(self, "src_ip", src)
        set_(self, "dst_ip", dst)
        set_(self, "src_key", _address_key(src))
        set_(self, "dst_key", _address_key(dst))
        peer = self.src_identity
        if peer is None:
            set_(self, "peer_principal", None)
            set_(self, "peer_namespace", "")
            set_(self, "peer_service_account", None)
        else:
            set_(self, "peer_principal", peer.principal)
            set_(self, "peer_namespace", peer.namespace)
            set_(self, "peer_service_account", (peer.namespace, peer.service_account))

    @classmethod
    def of(
        cls, src_identity: Identity | None, src_ip: str | IPAddress, dst_ip: str | IPAddress, dst_port: int
    ) -> Connection:
        """Build from address strings (``ValueError`` if one is not an IP address)."""
        return cls(src_identity, ipaddress.ip_address(src_ip), ipaddress.ip_address(dst_ip), dst_port)


@dataclass(frozen=True, slots=True)
class DryRun:
    """What one dry-run policy said about the connection: ``rule`` is the first rule that
    matched, None when none did."""

    policy: str
    action: Action
    rule: int | None

    @property
    def matched(self) -> bool:
        return self.rule is not None

    def __str__(self) -> str:
        verdict = "no rule matched" if self.rule is None else f"rule {self.rule} matched"
        return f"dry-run {self.action.value} policy {self.policy}: {verdict}"


@dataclass(frozen=True, slots=True)
class Decision:
    """The verdict on one connection and why.

    ``policy``/``rule`` name the enforced policy (``namespace/name``) and the index of its rule
    that decided; both are None when the default decided (no ALLOW policy applies, or none
    matched). ``dry_run`` lists every dry-run policy's result, by key; ``dry_run_allow`` is
    what the decision would have been had those policies been enforced too (None when there
    are none) -- the figure to look at before turning a dry run into the real thing.
    """

    allow: bool
    policy: str | None
    rule: int | None
    reason: str
    dry_run: tuple[DryRun, ...] = ()
    dry_run_allow: bool | None = None


_NO_ALLOW_APPLIES = Decision(True, None, None, "allowed: no ALLOW policy applies")

# --- compilation -------------------------------------------------------------------------------

Check = Callable[[Connection], bool]


def _string_test(patterns: tuple[StringMatch, ...]) -> Callable[[str], bool]:
    """One test for a list of ORed patterns: a set lookup and two C-level tuple scans."""
    exact = frozenset(p.value for p in patterns if p.kind is MatchKind.EXACT)
    prefixes = tuple(p.value for p in patterns if p.kind is MatchKind.PREFIX)
    suffixes = tuple(p.value for p in patterns if p.kind is MatchKind.SUFFIX)
    presence = any(p.kind is MatchKind.PRESENCE for p in patterns)
    if presence:
        # Presence accepts every non-empty value; only "" can still match something else.
        empty_matches = "" in exact or "" in prefixes or "" in suffixes
        return (lambda v: True) if empty_matches else bool
    if not prefixes and not suffixes:
        return exact.__contains__
    return lambda v: v in exact or v.startswith(prefixes) or v.endswith(suffixes)


def _principals(patterns: tuple[StringMatch, ...], negate: bool) -> Check:
    test = _string_test(patterns)
    if negate:
        return lambda c: c.peer_principal is None or not test(c.peer_principal)
    return lambda c: c.peer_principal is not None and test(c.peer_principal)


def _namespaces(patterns: tuple[StringMatch, ...], negate: bool) -> Check:
    test = _string_test(patterns)
    if negate:
        return lambda c: not test(c.peer_namespace)
    return lambda c: test(c.peer_namespace)


def _service_accounts(accounts: tuple[ServiceAccountMatch, ...], negate: bool) -> Check:
    # A plaintext peer's ``None`` is in no set: positive fails, negative passes.
    wanted = frozenset((a.namespace, a.service_account) for a in accounts)
    if negate:
        return lambda c: c.peer_service_account not in wanted
    return lambda c: c.peer_service_account in wanted


def _ports(ports: tuple[int, ...], negate: bool) -> Check:
    wanted = frozenset(ports)
    if negate:
        return lambda c: c.dst_port not in wanted
    return lambda c: c.dst_port in wanted


def _ips(nets: tuple[IPNetwork, ...], negate: bool, source: bool) -> Check:
    keys = tuple(_network_key(n) for n in nets)
    if len(keys) == 1:
        ((mask, net),) = keys
        if source:
            if negate:
                return lambda c: (c.src_key & mask) != net
            return lambda c: (c.src_key & mask) == net
        if negate:
            return lambda c: (c.dst_key & mask) != net
        return lambda c: (c.dst_key & mask) == net

    def contains(k: int) -> bool:
        for mask, net in keys:  # noqa: SIM110 - a loop is ~2.5x faster than any(<generator>)
            if (k & mask) == net:
                return True
        return False

    if source:
        if negate:
            return lambda c: not contains(c.src_key)
        return lambda c: contains(c.src_key)
    if negate:
        return lambda c: not contains(c.dst_key)
    return lambda c: contains(c.dst_key)


def _match_checks(m: Match) -> tuple[Check, ...]:
    """One check per populated field; ANDed. Cheapest checks first (all must pass anyway)."""
    checks: list[Check] = []
    for ports, negate in ((m.destination_ports, False), (m.not_destination_ports, True)):
        if ports:
            checks.append(_ports(ports, negate))
    for nets, negate, source in (
        (m.destination_ips, False, False),
        (m.not_destination_ips, True, False),
        (m.source_ips, False, True),
        (m.not_source_ips, True, True),
    ):
        if nets:
            checks.append(_ips(nets, negate, source))
    for accounts, negate in ((m.service_accounts, False), (m.not_service_accounts, True)):
        if accounts:
            checks.append(_service_accounts(accounts, negate))
    for patterns, negate in ((m.principals, False), (m.not_principals, True)):
        if patterns:
            checks.append(_principals(patterns, negate))
    for patterns, negate in ((m.namespaces, False), (m.not_namespaces, True)):
        if patterns:
            checks.append(_namespaces(patterns, negate))
    return tuple(checks)


def _all_of(checks: tuple[Check, ...]) -> Check:
    if len(checks) == 1:
        return checks[0]

    def all_of(c: Connection) -> bool:
        for check in checks:  # noqa: SIM110 - a loop is ~2.5x faster than all(<generator>)
            if not check(c):
                return False
        return True

    return all_of


def _any_of(checks: tuple[Check, ...]) -> Check:
    if len(checks) == 1:
        return checks[0]

    def any_of(c: Connection) -> bool:
        for check in checks:  # noqa: SIM110 - a loop is ~2.5x faster than any(<generator>)
            if check(c):
                return True
        return False

    return any_of


def _never(c: Connection) -> bool:
    """Stands for a clause or rule that no connection can match."""
    return False


def _clause(clause: Clause) -> Check | None:
    """A check; None when the clause matches everything (it has no matches); :func:`_never`
    when it has matches but every one is empty (ztunnel skips empty matches)."""
    if not clause.matches:
        return None
    matches = tuple(_all_of(checks) for checks in map(_match_checks, clause.matches) if checks)
    return _any_of(matches) if matches else _never


def _rule(rule: Rule) -> Check | None:
    """A check; None when the rule matches everything; :func:`_never` when it matches nothing."""
    checks: list[Check] = []
    for clause in rule.clauses:
        check = _clause(clause)
        if check is _never:
            return _never
        if check is not None:
            checks.append(check)
    return _all_of(tuple(checks)) if checks else None


class CompiledPolicy:
    """An :class:`Authorization` turned into checks, with its possible decisions prebuilt."""

    __slots__ = ("_dry_run_results", "_rules", "action", "decisions", "dry_run", "key", "source")

    def __init__(self, policy: Authorization) -> None:
        self.source = policy
        self.key = policy.key
        self.action = policy.action
        self.dry_run = policy.dry_run
        rules: list[tuple[int, Check | None]] = []
        for index, rule in enumerate(policy.rules):
            check = _rule(rule)
            if check is not _never:
                rules.append((index, check))
        self._rules: tuple[tuple[int, Check | None], ...] = tuple(rules)
        verb = "allowed" if policy.action is Action.ALLOW else "denied"
        self.decisions = tuple(
            Decision(
                policy.action is Action.ALLOW,
                self.key,
                i,
                f"{verb} by {policy.action.value} policy {self.key} rule {i}",
            )
            for i in range(len(policy.rules))
        )
        self._dry_run_results = (
            *(DryRun(self.key, policy.action, i) for i in range(len(policy.rules))),
            DryRun(self.key, policy.action, None),
        )

    def first_match(self, conn: Connection) -> int | None:
        """The index of the first rule ``conn`` matches; None when it matches none."""
        for index, check in self._rules:
            if check is None or check(conn):
                return index
        return None

    def dry_run_result(self, conn: Connection) -> DryRun:
        rule = self.first_match(conn)
        return self._dry_run_results[-1 if rule is None else rule]

    def __repr__(self) -> str:
        return f"CompiledPolicy({self.key!r}, {self.action.value}{', dry-run' if self.dry_run else ''})"


_CACHE_SIZE = 1 << 16
_cache: dict[int, tuple[Authorization, CompiledPolicy]] = {}


def compile_policy(policy: Authorization) -> CompiledPolicy:
    """The compiled form of ``policy``, cached by object identity.

    Identity, not equality: hashing a frozen policy walks all of it (slower than compiling a
    small one), while the discovery client hands out each received policy as one object that
    lives as long as it is current. The entry keeps the object alive, so its id cannot be
    reused while cached; the cache is bounded by dropping everything when full.
    """
    hit = _cache.get(id(policy))
    if hit is not None and hit[0] is policy:
        return hit[1]
    compiled = CompiledPolicy(policy)
    if len(_cache) >= _CACHE_SIZE:
        _cache.clear()
    _cache[id(policy)] = (policy, compiled)
    return compiled


def first_matching_rule(policy: Authorization, conn: Connection) -> int | None:
    """Whether ``policy`` matches ``conn`` regardless of its action: the index of the first
    matching rule, or None."""
    return compile_policy(policy).first_match(conn)


_by_key = attrgetter("key")


def _by_key_once(policies: list[CompiledPolicy]) -> tuple[CompiledPolicy, ...]:
    """Sorted by key, each key once: a policy can be selected twice (by namespace and listed
    by the workload), and keys are unique in a snapshot."""
    if len(policies) < 2:
        return tuple(policies)
    policies.sort(key=_by_key)
    return tuple(p for i, p in enumerate(policies) if i == 0 or p.key != policies[i - 1].key)


class PolicySet:
    """The policies applying to one destination, grouped and ordered for evaluation.

    Sorting by key makes the decision (including which policy is named) independent of the
    order policies were found in; a key given twice counts once. Cheap enough to build per connection; a proxy state that
    keeps one per workload and snapshot version saves that too.
    """

    __slots__ = ("_allow", "_deny", "_dry_run", "_no_allow_matched")

    def __init__(self, policies: Iterable[Authorization | CompiledPolicy]) -> None:
        deny: list[CompiledPolicy] = []
        allow: list[CompiledPolicy] = []
        dry_run: list[CompiledPolicy] = []
        for p in policies:
            c = p if isinstance(p, CompiledPolicy) else compile_policy(p)
            if c.dry_run:
                dry_run.append(c)
            elif c.action is Action.DENY:
                deny.append(c)
            else:
                allow.append(c)
        self._deny = _by_key_once(deny)
        self._allow = _by_key_once(allow)
        self._dry_run = _by_key_once(dry_run)
        self._no_allow_matched: Decision | None = None

    def evaluate(self, conn: Connection) -> Decision:
        decision = self._decide(conn)
        return self._with_dry_run(decision, conn) if self._dry_run else decision

    def _decide(self, conn: Connection) -> Decision:
        for p in self._deny:
            rule = p.first_match(conn)
            if rule is not None:
                return p.decisions[rule]
        if not self._allow:
            return _NO_ALLOW_APPLIES
        for p in self._allow:
            rule = p.first_match(conn)
            if rule is not None:
                return p.decisions[rule]
        decision = self._no_allow_matched
        if decision is None:
            keys = ", ".join(p.key for p in self._allow)
            decision = self._no_allow_matched = Decision(
                False, None, None, f"no ALLOW policy matched ({keys})"
            )
        return decision

    def _with_dry_run(self, decision: Decision, conn: Connection) -> Decision:
        results = tuple(p.dry_run_result(conn) for p in self._dry_run)
        # The decision again, with the dry-run policies enforced alongside the others.
        if not decision.allow and decision.policy is not None:
            shadow = False  # an enforced DENY matched
        elif any(r.matched for r in results if r.action is Action.DENY):
            shadow = False
        else:
            dry_allows = [r for r in results if r.action is Action.ALLOW]
            if not self._allow and not dry_allows:
                shadow = True
            elif decision.allow and decision.policy is not None:
                shadow = True  # an enforced ALLOW matched
            else:
                shadow = any(r.matched for r in dry_allows)
        return replace(decision, dry_run=results, dry_run_allow=shadow)


def evaluate(policies: PolicySet | Iterable[Authorization], conn: Connection) -> Decision:
    """Decide ``conn`` against the policies already selected for its destination workload
    (global, the workload's namespace's, and those the workload lists by key)."""
    ps = policies if isinstance(policies, PolicySet) else PolicySet(policies)
    return ps.evaluate(conn)
