"""L7 authorization: may this HTTP request, arriving at a waypoint, go on to its destination?

Decide-then-do, like :mod:`mesh.authz` (the L4 engine): :func:`select_policies` picks the
AuthorizationPolicies a waypoint applies to a request, :func:`evaluate` is a pure function of
those policies and the facts of one :class:`Request`, returning an :class:`L7Decision` that the
proxy enforces (403) and logs. It decides as Istio's waypoint does: istiod turns each policy
into an Envoy RBAC filter (``pilot/pkg/security/authz/builder/builder.go``,
``model/{model,generator,permission,principal}.go``, ``matcher/*.go``) and Envoy evaluates it.
The corners, with the code that settles each:

- Order: a matching DENY denies; else no ALLOW policy → allow; else a matching ALLOW allows;
  else deny. AUDIT (Envoy's ``LOG`` action) never changes the decision; matches are reported.
  CUSTOM is not evaluated here (ext_authz runs before RBAC); :func:`select_policies` returns
  it apart. Dry-run policies (``istio.io/dry-run``) become Envoy *shadow rules*: evaluated,
  reported, never decisive.
- Which policy is named: Envoy keeps the rules of one action in a map ordered by the name
  istiod gives them, ``ns[<ns>]-policy[<name>]-rule[<i>]``, and reports the first that
  matches; so do we (note ``rule[10]`` sorts before ``rule[2]``).
- ``spec: {}`` (no rules) matches nothing but still counts as an ALLOW policy (istiod emits a
  never-matching policy). A rule's ``from``/``to`` entries are ORed, its fields ANDed, the
  values of one field ORed and ``not`` values negated (``Not(Or(...))``); an empty rule, or a
  ``from``/``to`` entry with no field set, matches every request. ``when`` conditions are ANDed
  with all of it.
- An unknown ``when`` key makes ``model.New`` fail: the rule is skipped, whatever the action
  (``builder.build``: "skipped invalid rule"). In an ALLOW policy that rule allows nothing (fail
  closed); in a DENY or AUDIT policy that rule never fires. (istiod's validating webhook
  refuses such a policy outright, so on a cluster with the webhook it never exists at all.)
- A bad *value* (an IP or CIDR that does not parse, a port that is not 0..65535, a
  ``request.headers``/``request.auth.claims`` key not of the form ``[name]``, a path template
  Envoy cannot parse) is a generation error. ALLOW: the whole rule is skipped, a smaller
  allow (``rule.checkError``). DENY and AUDIT: only that value is dropped, a wider match; a
  field whose values are all dropped no longer constrains anything. Every such case is listed
  in :attr:`CompiledL7Policy.problems` so the status and the logs can say so.
- Principals are compared as ``<td>/ns/<ns>/sa/<sa>``; ``*`` matches any peer identity, none
  matches a plaintext peer (``not_principals`` then always passes). Trust-domain aliases are
  applied as ``trustdomain.Bundle.ReplaceTrustDomainAliases`` does: ``cluster.local`` (or a
  member of the bundle) in a principal stands for every trust domain of the mesh.
- ``namespaces`` (and ``source.namespace``) is matched by istiod's regex ``.*/ns/<ns>/.*`` on
  the peer's SPIFFE URI, ``*`` anywhere becoming ``.*``. That keeps Istio's quirks: ``*a``
  and ``*sa`` match *every* identity (``.*a/`` eats ``<ns>/sa/``), the pattern ``sa`` matches
  identities in namespace ``ns``, and ``foo/sa`` matches namespace ``foo``. ``serviceAccounts`` / ``source.serviceAccount``
  and ``source.trustDomain`` use istiod's regexes likewise.
- ``requestPrincipals`` / ``request.auth.principal`` match the JWT ``iss`` and ``sub`` claims
  separately, split at the value's *last* ``/`` (``requestPrincipalGenerator``): ``*`` needs
  both non-empty, ``*/sub`` any issuer, ``iss/*`` any subject, ``*x`` without a slash a
  subject ending in ``x``, ``x*`` without a slash an issuer starting with ``x``.
- ``request.auth.audiences`` / ``presenter`` / ``claims[a][b]`` match the ``aud`` / ``azp`` /
  nested claim: a string claim, or any string element of a list claim; other JSON types never
  match. A malformed nested key (``[a]b``) falls back to the single name Envoy would use.
- ``hosts`` match ``:authority`` case-insensitively (ASCII) and *exactly as received*: Istio
  does not add ``host:*`` for AuthorizationPolicy (it does for routes), so ``hosts:
  ["example.com"]`` does not match ``example.com:8080``; write both. ``*`` matches every
  request. ``methods`` are case-sensitive (``get`` is not ``GET``; gRPC is always ``POST``).
- ``paths`` match the normalized path without query (:mod:`mesh.pathnorm`): exact, ``abc*``,
  ``*abc``, ``*`` (any non-empty path), and Istio's templates ``{*}`` (one segment) and
  ``{**}`` (any rest, the last operator) turned into Envoy's ``uri_template`` regexes.
- ``request.headers[name]`` matches the header's values joined by ``,`` (Envoy's view of a
  repeated header); ``*`` is presence. Pseudo-headers are only those the proxy puts into
  :class:`Headers` (``:method`` and ``:authority`` are filled in from the request).
- ``ipBlocks``/``source.ip`` are the connection's source (Envoy ``direct_remote_ip``),
  ``remoteIpBlocks``/``remote.ip`` the client address after X-Forwarded-For handling
  (``remote_ip``, the source when the proxy has none).
- ``experimental.envoy.filters.*`` conditions read Envoy filter metadata this proxy never has:
  their values never match and their ``notValues`` always do.

Evaluation is cheap because a policy is compiled once (:func:`compile_policy`, cached by object
identity and trust domains): each rule becomes one generated Python function (a short-circuit
expression over the request's precomputed attributes) and the policy's possible decisions are
prebuilt; an :class:`L7PolicySet` orders the rules of one destination by action, as Envoy does.
With about twenty applicable policies a decision costs a few microseconds.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

from mesh.identity import SCHEME as SPIFFE_SCHEME
from mesh.identity import Identity
from mesh.model.frozen import FrozenMap
from mesh.model.objects import DEFAULT_TRUST_DOMAIN, WAYPOINT_GATEWAY_CLASS
from mesh.model.policy import (
    ROOT_NAMESPACE,
    AuthorizationAction,
    AuthorizationPolicy,
    Condition,
    Operation,
    PolicyTargetRef,
    Rule,
    Source,
)

__all__ = [
    "AuditMatch",
    "CompiledL7Policy",
    "DryRun",
    "Headers",
    "IPAddress",
    "L7Decision",
    "L7PolicySet",
    "Request",
    "WaypointPolicies",
    "compile_policy",
    "evaluate",
    "first_matching_rule",
    "select_policies",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
ALLOW, DENY, AUDIT, CUSTOM = (
    AuthorizationAction.ALLOW,
    AuthorizationAction.DENY,
    AuthorizationAction.AUDIT,
    AuthorizationAction.CUSTOM,
)

# --- request facts ------------------------------------------------------------------------------

_V6_TAG = 1 << 128
_ALL_BITS = (1 << 129) - 1


def _address_key(ip: IPAddress) -> int:
    """An address as an int; IPv6 carries bit 128 so the families never match each other."""
    return int(ip) | _V6_TAG if ip.version == 6 else int(ip)


def _canonical(ip: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address (a dual-stack socket's view of IPv4) as IPv4."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _keyed(ip: IPAddress) -> tuple[IPAddress, int]:
    if type(ip) is ipaddress.IPv4Address:
        return ip, int(ip)
    ip = _canonical(ip)
    return ip, _address_key(ip)


_ASCII_LOWER = {c: c + 32 for c in range(ord("A"), ord("Z") + 1)}


def _fold(s: str) -> str:
    """ASCII-only lower case, as Envoy's ``ignore_case`` matching."""
    return s.lower() if s.isascii() else s.translate(_ASCII_LOWER)


class Headers(Mapping[str, tuple[str, ...]]):
    """A request's headers: names case-insensitive, each with every value in order.

    Built from a mapping (name → value or values) or from ``(name, value)`` pairs, as a parser
    delivers them. :meth:`joined` is the view Envoy's header matcher has: the values of a
    repeated header joined with ``,``.
    """

    __slots__ = ("_joined", "_values")

    def __init__(self, items: Mapping[str, str | Iterable[str]] | Iterable[tuple[str, str]] = ()) -> None:
        values: dict[str, list[str]] = {}
        pairs: Iterable[tuple[str, str | Iterable[str]]] = (
            items.items() if isinstance(items, Mapping) else items
        )
        for name, value in pairs:
            bucket = values.setdefault(name.lower(), [])
            if isinstance(value, str):
                bucket.append(value)
            else:
                bucket.extend(value)
        self._values = {k: tuple(v) for k, v in values.items() if v}
        self._joined = {k: ",".join(v) for k, v in self._values.items()}

    def __getitem__(self, name: str) -> tuple[str, ...]:
        return self._values[name.lower()]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._values

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Headers):
            return self._values == other._values
        return NotImplemented

    def __hash__(self) -> int:
        return hash(frozenset(self._values.items()))

    def joined(self, name: str) -> str | None:
        """The values of ``name`` (already lower case) joined by ``,``; None when absent."""
        return self._joined.get(name)

    def __repr__(self) -> str:
        return f"Headers({self._values!r})"


_NO_HEADERS = Headers()
_NO_CLAIMS: Mapping[str, object] = FrozenMap()


def _strings(value: object) -> tuple[str, ...]:
    """A claim as Envoy's list-or-string matcher sees it: its string, or its list's strings."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list | tuple):
        return tuple(v for v in value if isinstance(v, str))
    return ()


@dataclass(frozen=True, slots=True)
class Request:
    """The facts of one HTTP request at the waypoint that policy can look at.

    ``path`` is the normalized path without query (:func:`mesh.pathnorm.normalize_path`);
    ``host`` the ``:authority`` as received; ``remote_ip`` the client after X-Forwarded-For
    handling (the source when None). ``request_auth_claims`` is the validated JWT payload
    (not copied: do not mutate it). ``request_principal`` is ``<iss>/<sub>``; the ``iss`` and
    ``sub`` claims, when the payload has them, are what principal patterns are matched on.
    ``request_auth_audiences`` / ``request_auth_presenter`` default to the ``aud`` / ``azp``
    claims. The fields after ``sni`` are derived once here.
    """

    source_principal: Identity | None  # None: no peer identity
    source_ip: IPAddress
    destination_ip: IPAddress
    destination_port: int
    host: str
    method: str
    path: str
    headers: Headers = _NO_HEADERS
    remote_ip: IPAddress | None = None
    request_principal: str | None = None
    request_auth_claims: Mapping[str, object] = _NO_CLAIMS
    request_auth_audiences: tuple[str, ...] | None = None
    request_auth_presenter: str | None = None
    sni: str | None = None
    peer_principal: str | None = field(init=False, repr=False, compare=False)
    peer_uri: str | None = field(init=False, repr=False, compare=False)
    peer_namespace: str | None = field(init=False, repr=False, compare=False)
    peer_uri_ambiguous: bool = field(init=False, repr=False, compare=False)
    src_key: int = field(init=False, repr=False, compare=False)
    remote_key: int = field(init=False, repr=False, compare=False)
    dst_key: int = field(init=False, repr=False, compare=False)
    host_folded: str = field(init=False, repr=False, compare=False)
    jwt_issuer: str | None = field(init=False, repr=False, compare=False)
    jwt_subject: str | None = field(init=False, repr=False, compare=False)
    audiences: tuple[str, ...] = field(init=False, repr=False, compare=False)
    presenters: tuple[str, ...] = field(init=False, repr=False, compare=False)
    sni_value: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if not isinstance(self.headers, Headers):
            set_(self, "headers", Headers(self.headers))
        src, src_key = _keyed(self.source_ip)
        dst, dst_key = _keyed(self.destination_ip)
        remote, remote_key = (src, src_key) if self.remote_ip is None else _keyed(self.remote_ip)
        set_(self, "source_ip", src)
        set_(self, "destination_ip", dst)
        set_(self, "remote_ip", remote)
        set_(self, "src_key", src_key)
        set_(self, "dst_key", dst_key)
        set_(self, "remote_key", remote_key)
        peer = self.source_principal
        if peer is None:
            set_(self, "peer_principal", None)
            set_(self, "peer_uri", None)
            set_(self, "peer_namespace", None)
            set_(self, "peer_uri_ambiguous", False)
        else:
            principal = peer.principal
            uri = SPIFFE_SCHEME + principal
            set_(self, "peer_principal", principal)
            set_(self, "peer_uri", uri)
            set_(self, "peer_namespace", peer.namespace)
            # A trust domain or namespace "ns" puts "/ns/" twice into the URI: istiod's namespace
            # regex can then find another namespace than the identity's.
            set_(self, "peer_uri_ambiguous", "ns" in (peer.trust_domain, peer.namespace))
        host = self.host
        set_(self, "host_folded", host.lower() if host.isascii() else _fold(host))
        claims = self.request_auth_claims
        iss = sub = None
        if claims:
            iss, sub = claims.get("iss"), claims.get("sub")
            if not (isinstance(iss, str) and isinstance(sub, str)):
                iss = sub = None
        if iss is None and self.request_principal is not None:
            iss, _, sub = self.request_principal.rpartition("/")
        set_(self, "jwt_issuer", iss)
        set_(self, "jwt_subject", sub)
        audiences, presenter = self.request_auth_audiences, self.request_auth_presenter
        if audiences is None:
            audiences = _strings(claims.get("aud")) if claims else ()
        set_(self, "audiences", tuple(audiences))
        set_(
            self,
            "presenters",
            ((_strings(claims.get("azp")) if claims else ()) if presenter is None else (presenter,)),
        )
        set_(self, "sni_value", self.sni or "")

    def header(self, name: str) -> str | None:
        """Envoy's view of header ``name`` (lower case); ``:method`` and ``:authority`` are
        the request's when the headers do not carry them."""
        value = self.headers.joined(name)
        if value is None:
            if name == ":method":
                return self.method
            if name == ":authority":
                return self.host
        return value


# --- decisions ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DryRun:
    """What one dry-run policy said: ``rule`` is the first rule that matched, None if none."""

    policy: str
    action: AuthorizationAction
    rule: int | None

    @property
    def matched(self) -> bool:
        return self.rule is not None

    def __str__(self) -> str:
        verdict = "no rule matched" if self.rule is None else f"rule {self.rule} matched"
        return f"dry-run {self.action.value} policy {self.policy}: {verdict}"


@dataclass(frozen=True, slots=True)
class AuditMatch:
    """An AUDIT policy that matched the request (the proxy logs the request for it)."""

    policy: str
    rule: int

    def __str__(self) -> str:
        return f"audited by AUDIT policy {self.policy} rule {self.rule}"


@dataclass(frozen=True, slots=True)
class L7Decision:
    """The verdict on one request and why, shaped as :class:`mesh.authz.Decision`.

    ``policy``/``rule`` name the enforced policy (``namespace/name``) and its rule that
    decided; None when the default decided. ``dry_run`` lists every dry-run policy's result;
    ``dry_run_allow`` is what the decision would have been with those enforced too (None when
    there are none). ``audit`` lists the AUDIT policies that matched, in Envoy's order.
    """

    allow: bool
    policy: str | None
    rule: int | None
    reason: str
    dry_run: tuple[DryRun, ...] = ()
    dry_run_allow: bool | None = None
    audit: tuple[AuditMatch, ...] = ()


_NO_ALLOW_APPLIES = L7Decision(True, None, None, "allowed: no ALLOW policy applies")

# --- value generators ---------------------------------------------------------------------------


class _BadValue(ValueError):
    """istiod could not generate Envoy config for a value (``generator`` returned an error)."""


class _SkipRule(Exception):
    """The whole rule is dropped (unknown ``when`` key, or a bad value in an ALLOW policy)."""


_DIGITS = re.compile(r"[0-9]+")


def _network(value: str) -> tuple[int, int]:
    """``AddrStrToCidrRange``: an address or CIDR as (mask, network key)."""
    try:
        net = ipaddress.ip_network(value, strict=False)
    except ValueError as e:
        raise _BadValue(f"invalid IP address or CIDR {value!r}") from e
    mask = _ALL_BITS ^ ((1 << (net.max_prefixlen - net.prefixlen)) - 1)
    return mask, _address_key(_canonical(net.network_address))


def _port(value: str | int) -> int:
    if isinstance(value, int):
        port = value
    elif _DIGITS.fullmatch(value):
        port = int(value)
    else:
        raise _BadValue(f"invalid port {value!r}")
    if not 0 <= port <= 65535:
        raise _BadValue(f"invalid port {value!r}")
    return port


def _name_in_brackets(rest: str) -> str:
    """``extractNameInBrackets``: ``[NAME]`` → NAME."""
    if len(rest) < 2 or not (rest.startswith("[") and rest.endswith("]")):
        raise _BadValue(f"expecting format [<NAME>], but found {rest!r}")
    return rest[1:-1]


def _names_in_nested_brackets(rest: str) -> tuple[str, ...]:
    """``extractNameInNestedBrackets``: ``[a][b]`` → (a, b); anything else one name."""
    names: list[str] = []
    begin = 0
    while begin < len(rest):
        end = -1
        if rest[begin] == "[":
            for i in range(begin + 1, len(rest)):
                if rest[i] == "[":
                    break
                if rest[i] == "]":
                    end = i
                    break
        if end < 0:
            return (_name_in_brackets(rest),)
        names.append(rest[begin + 1 : end])
        begin = end + 1
    return tuple(names)  # empty for a bare "request.auth.claims": the payload, never a string


def _claim(claims: Mapping[str, object], path: tuple[str, ...]) -> tuple[str, ...]:
    value: object = claims
    for key in path:
        if not isinstance(value, Mapping):
            return ()
        value = value.get(key)
        if value is None:
            return ()
    return _strings(value)


# Envoy uri_template: the characters of one path segment (RFC 3986 pchar without '*').
_SEGMENT_CHARS = r"a-zA-Z0-9\-._~%!$&'()+,;:@="
_TEMPLATE_LITERAL = re.compile(f"[{_SEGMENT_CHARS}]+")
_PRINTABLE_PATH = re.compile(r"/[!-~]*")


def _path_template(value: str) -> re.Pattern[str]:
    """Istio's ``{*}``/``{**}`` path as Envoy's ``uri_template`` regex (full match on the path
    without query); the pattern rules are Envoy's ``parsePathPatternSyntax``."""
    pattern = value.replace("{**}", "**").replace("{*}", "*")
    if not _PRINTABLE_PATH.fullmatch(pattern):
        raise _BadValue(f"invalid path template {value!r}")
    parts: list[str] = []
    kinds: list[str] = []
    rest = pattern
    while rest:
        if rest.startswith("**"):
            kinds.append("**")
            parts.append(f"[{_SEGMENT_CHARS}/]*")
            rest = rest[2:]
        elif rest.startswith("*"):
            kinds.append("*")
            parts.append(f"[{_SEGMENT_CHARS}]+")
            rest = rest[1:]
        elif rest.startswith("/"):
            if kinds and kinds[-1] == "/":
                raise _BadValue(f"double slash in path template {value!r}")
            kinds.append("/")
            parts.append("/")
            rest = rest[1:]
        else:
            literal = rest.split("/", 1)[0]
            if not _TEMPLATE_LITERAL.fullmatch(literal):
                raise _BadValue(f"invalid literal {literal!r} in path template {value!r}")
            kinds.append("literal")
            parts.append(re.escape(literal))
            rest = rest[len(literal) :]
    globs = [k for k in kinds if k in ("*", "**")]
    if "**" in globs and globs.index("**") != len(globs) - 1:
        raise _BadValue(f"{{**}} is not the last operator in path template {value!r}")
    return re.compile("".join(parts))


def _replace_trust_domain_aliases(principal: str, bundle: tuple[str, ...]) -> list[str]:
    """``trustdomain.Bundle.ReplaceTrustDomainAliases`` for one principal."""
    parts = principal.split("/")
    if len(parts) != 5 or parts[0] == "*":
        return [principal]
    td = parts[0]
    if not (td == DEFAULT_TRUST_DOMAIN or _td_string_match(td, bundle)):
        return [principal]
    out: list[str] = []
    for alias in bundle:
        candidate = principal if _td_suffix_match(alias, td) else "/".join([alias, *parts[1:]])
        if candidate not in out:
            out.append(candidate)
    return out


def _td_prefix_match(a: str, pattern: str) -> bool:
    return pattern.endswith("*") and a.startswith(pattern[:-1])


def _td_suffix_match(a: str, pattern: str) -> bool:
    return pattern.startswith("*") and a.endswith(pattern[1:])


def _td_string_match(a: str, bundle: tuple[str, ...]) -> bool:
    return any(
        s in (a, "*")
        or _td_prefix_match(a, s)
        or _td_prefix_match(s, a)
        or _td_suffix_match(a, s)
        or _td_suffix_match(s, a)
        for s in bundle
    )


# --- compilation --------------------------------------------------------------------------------
#
# Each rule becomes one Python function, generated from an expression over the request's
# attributes (``r.method in _c0 and (r.src_key & 4294967040) == 167772160 and ...``), so that a
# rule costs one call and short-circuits; what has no cheap expression (regexes, templates,
# claims) is a constant callable in that expression.

Check = Callable[[Request], bool]
Star = Literal["present", "nonempty"]
_TRUE = "True"


def _or(parts: list[str]) -> str:
    if _TRUE in parts:
        return _TRUE
    return parts[0] if len(parts) == 1 else "(" + " or ".join(parts) + ")"


def _and(parts: list[str]) -> str:
    parts = [p for p in parts if p != _TRUE]
    if not parts:
        return _TRUE
    return parts[0] if len(parts) == 1 else "(" + " and ".join(parts) + ")"


def _not(expr: str) -> str:
    return "False" if expr == _TRUE else f"(not {expr})"


def _prefix(prefix: str) -> Callable[[str], bool]:
    return lambda s: s.startswith(prefix)


def _suffix(suffix: str) -> Callable[[str], bool]:
    return lambda s: s.endswith(suffix)


def _strings_match(values: tuple[str, ...], test: Callable[[str], bool]) -> bool:
    for v in values:  # noqa: SIM110 - a loop is faster than any(<generator>)
        if test(v):
            return True
    return False


class _RuleBuilder:
    """Turns one policy's rules into functions, with istiod's error handling for its action."""

    def __init__(self, policy: AuthorizationPolicy, trust_domains: tuple[str, ...]) -> None:
        self.policy = policy
        self.strict = policy.action is ALLOW  # a bad value drops the rule, not just the value
        self.trust_domains = trust_domains
        self.problems: list[str] = []
        self.rule_index = 0
        self.namespace: dict[str, object] = {}

    def const(self, value: object) -> str:
        name = f"_c{len(self.namespace)}"
        self.namespace[name] = value
        return name

    def _bad(self, what: str, error: _BadValue) -> None:
        if self.strict:
            raise _SkipRule(f"{what}: {error}")
        self.problems.append(f"rule {self.rule_index}: {what}: {error}; value ignored (matches more widely)")

    # -- expressions --

    def patterns(self, x: str, values: Iterable[str], star: Star, *, fold: bool = False) -> str:
        """ORed Istio patterns on the string expression ``x``: exact, ``abc*``, ``*abc``, and
        ``*``, a presence match (``present``) or Envoy's regex ``.+`` (``nonempty``)."""
        exact: set[str] = set()
        prefixes: list[str] = []
        suffixes: list[str] = []
        star_seen = False
        for v in map(_fold, values) if fold else values:
            if v == "*":
                star_seen = True
            elif v.startswith("*"):
                suffixes.append(v[1:])
            elif v.endswith("*"):
                prefixes.append(v[:-1])
            else:
                exact.add(v)
        if star_seen and (star == "present" or "" in exact):
            return _TRUE
        parts: list[str] = []
        if star_seen:
            parts.append(f"{x} != ''")
        if len(exact) == 1:
            parts.append(f"{x} == {self.const(next(iter(exact)))}")
        elif exact:
            parts.append(f"{x} in {self.const(frozenset(exact))}")
        if prefixes:
            parts.append(f"{x}.startswith({self.const(tuple(prefixes))})")
        if suffixes:
            parts.append(f"{x}.endswith({self.const(tuple(suffixes))})")
        return _or(parts)

    def optional(self, x: str, test: str) -> str:
        """``test`` on a value that may be absent (no peer, no claim): absent never matches."""
        return f"({x} is not None)" if test == _TRUE else f"({x} is not None and {test})"

    def call(self, fn: Callable[..., bool], *args: str) -> str:
        return f"{self.const(fn)}({', '.join(args)})"

    # -- fields: ``values`` ORed, ``not_values`` ORed and negated --

    def field(
        self,
        what: str,
        values: Iterable[str],
        not_values: Iterable[str],
        make: Callable[[list[str]], str],
    ) -> list[str]:
        """For a generator that fails on a whole list (or never)."""
        out: list[str] = []
        for group, negate in ((list(values), False), (list(not_values), True)):
            if not group:
                continue
            try:
                expr = make(group)
            except _BadValue as e:
                self._bad(what, e)
                continue
            out.append(_not(expr) if negate else expr)
        return out

    def per_value(
        self,
        what: str,
        values: Iterable[str | int],
        not_values: Iterable[str | int],
        make: Callable[[str | int], str],
    ) -> list[str]:
        """For a generator that can fail on one value: only that value is lost (or the rule)."""
        out: list[str] = []
        for group, negate in ((values, False), (not_values, True)):
            made: list[str] = []
            for v in group:
                try:
                    made.append(make(v))
                except _BadValue as e:
                    self._bad(what, e)
            if made:
                expr = _or(made)
                out.append(_not(expr) if negate else expr)
        return out

    # -- generators, one per attribute --

    def principals(self, values: list[str]) -> str:
        expanded = [p for v in values for p in _replace_trust_domain_aliases(v, self.trust_domains)]
        return self.optional("r.peer_principal", self.patterns("r.peer_principal", expanded, "nonempty"))

    def namespaces(self, values: list[str]) -> str:
        """istiod's regex ``.*/ns/<value, '*' as '.*'>/.*`` on the peer's SPIFFE URI."""
        regexes = [re.compile(".*/ns/" + ".*".join(map(re.escape, v.split("*"))) + "/.*") for v in values]
        matchers = tuple(r.fullmatch for r in regexes)

        def regex_match(uri: str) -> bool:
            for m in matchers:  # noqa: SIM110 - a loop is faster than any(<generator>)
                if m(uri):
                    return True
            return False

        by_regex = self.call(regex_match, "r.peer_uri")
        if any("*" in v or "/" in v for v in values):
            return self.optional("r.peer_uri", by_regex)
        # A validated identity has '/ns/' once and no '/' inside its parts, so the regex of a
        # plain name finds exactly the identity's namespace; otherwise ask the regex.
        plain = self.patterns("r.peer_namespace", values, "nonempty")
        return f"(r.peer_namespace is not None and ({by_regex} if r.peer_uri_ambiguous else {plain}))"

    def service_accounts(self, values: list[str]) -> str:
        regexes = []
        for v in values:
            ns, sep, sa = v.partition("/")
            if not sep:
                ns, sa = self.policy.namespace, v
            regexes.append(re.compile(f"spiffe://.+/ns/{re.escape(ns)}/(.+/|)sa/{re.escape(sa)}(/.+)?"))
        matchers = tuple(r.fullmatch for r in regexes)
        return self.optional("r.peer_uri", self.call(lambda uri: any(m(uri) for m in matchers), "r.peer_uri"))

    def trust_domain_values(self, values: list[str]) -> str:
        expanded: list[str] = []
        for v in values:  # Bundle.ExpandTrustDomainAliases
            for td in self.trust_domains if v in self.trust_domains else (v,):
                if td not in expanded:
                    expanded.append(td)
        regexes: list[str] = []
        for v in expanded:  # srcTrustDomainGenerator
            if v == "*":
                regexes.append("spiffe://.*")
            elif "*" not in v:
                regexes.append(f"spiffe://{re.escape(v)}/.*")
            else:
                head, tail = v.split("*", 1)
                regexes.append(f"spiffe://{re.escape(head)}[^/]*{re.escape(tail)}/.*")
        matchers = tuple(re.compile(r).fullmatch for r in regexes)
        return self.optional("r.peer_uri", self.call(lambda uri: any(m(uri) for m in matchers), "r.peer_uri"))

    def request_principal(self, value: str) -> str:
        """``requestPrincipalGenerator``: issuer and subject matched apart, split at the last '/'."""
        slash = value.rfind("/")
        found = slash >= 0
        iss, sub = (value[:slash], value[slash + 1 :]) if found else (value, "")
        i, s = "r.jwt_issuer", "r.jwt_subject"
        nonempty_i, nonempty_s = f"{i} != ''", f"{s} != ''"  # Envoy's ".+"
        if value == "*":
            ti, ts = nonempty_i, nonempty_s
        elif value.startswith("*"):
            if found:
                ti = nonempty_i if iss == "*" else f"{i}.endswith({self.const(iss[1:])})"
                ts = f"{s} == {self.const(sub)}"
            else:
                ti, ts = nonempty_i, f"{s}.endswith({self.const(value[1:])})"
        elif value.endswith("*"):
            if found:
                ti = f"{i} == {self.const(iss)}"
                ts = nonempty_s if sub == "*" else f"{s}.startswith({self.const(sub[:-1])})"
            else:
                ti, ts = f"{i}.startswith({self.const(value[:-1])})", nonempty_s
        else:
            ti, ts = f"{i} == {self.const(iss)}", f"{s} == {self.const(sub)}"
        return f"({ti} and {ts})"

    def request_principals(self, values: list[str]) -> str:
        # Issuer and subject are both set or both None.
        return f"(r.jwt_issuer is not None and {_or([self.request_principal(v) for v in values])})"

    def list_claim(self, x: str, values: list[str]) -> str:
        """A claim that is a string or a list of strings (``r.audiences``, ``r.presenters``)."""
        test = eval(f"lambda v: {self.patterns('v', values, 'nonempty')}", self.namespace)
        return self.call(_strings_match, x, self.const(test))

    def ip(self, attribute: str) -> Callable[[str | int], str]:
        def make(value: str | int) -> str:
            mask, net = _network(str(value))
            return f"(r.{attribute} & {mask}) == {net}"

        return make

    @staticmethod
    def port(value: str | int) -> str:
        return f"r.destination_port == {_port(value)}"

    def path(self, value: str | int) -> str:
        value = str(value)
        if "{*}" in value or "{**}" in value:
            match = _path_template(value).fullmatch
            return f"({self.const(match)}(r.path) is not None)"
        return self.patterns("r.path", (value,), "nonempty")

    def header(self, name: str) -> Callable[[list[str]], str]:
        def make(values: list[str]) -> str:
            v = f"_h{len(self.namespace)}"
            self.const(None)  # reserves the number
            return f"(({v} := r.header({self.const(name)})) is not None and {self.patterns(v, values, 'present')})"

        return make

    def claims(self, path: tuple[str, ...]) -> Callable[[list[str]], str]:
        def make(values: list[str]) -> str:
            found = f"{self.const(_claim)}(r.request_auth_claims, {self.const(path)})"
            return self.list_claim(found, values)

        return make

    # -- rule parts --

    def source(self, s: Source) -> list[str]:
        out: list[str] = []
        out += self.field("principals", s.principals, s.not_principals, self.principals)
        out += self.per_value("ipBlocks", s.ip_blocks, s.not_ip_blocks, self.ip("src_key"))
        out += self.per_value(
            "remoteIpBlocks", s.remote_ip_blocks, s.not_remote_ip_blocks, self.ip("remote_key")
        )
        out += self.field("namespaces", s.namespaces, s.not_namespaces, self.namespaces)
        out += self.field(
            "serviceAccounts", s.service_accounts, s.not_service_accounts, self.service_accounts
        )
        out += self.field(
            "requestPrincipals", s.request_principals, s.not_request_principals, self.request_principals
        )
        return out

    def operation(self, o: Operation) -> list[str]:
        out: list[str] = []
        out += self.per_value("ports", o.ports, o.not_ports, self.port)
        out += self.field(
            "methods", o.methods, o.not_methods, lambda v: self.patterns("r.method", v, "present")
        )
        out += self.per_value("paths", o.paths, o.not_paths, self.path)
        out += self.field(
            "hosts", o.hosts, o.not_hosts, lambda v: self.patterns("r.host_folded", v, "present", fold=True)
        )
        return out

    def condition(self, c: Condition) -> list[str]:
        """One ``when`` entry, by ``model.New``'s dispatch on the key."""
        k, vs, nvs = c.key, c.values, c.not_values
        what = f"when {k}"
        if k == "destination.ip":
            return self.per_value(what, vs, nvs, self.ip("dst_key"))
        if k == "destination.port":
            return self.per_value(what, vs, nvs, self.port)
        if k == "connection.sni":
            return self.field(what, vs, nvs, lambda v: self.patterns("r.sni_value", v, "nonempty"))
        if k.startswith("experimental.envoy.filters."):
            # Filter metadata this proxy never has: a positive match fails, a negative passes.
            return self.field(what, vs, nvs, lambda v: "False")
        if k == "source.ip":
            return self.per_value(what, vs, nvs, self.ip("src_key"))
        if k == "remote.ip":
            return self.per_value(what, vs, nvs, self.ip("remote_key"))
        if k == "source.namespace":
            return self.field(what, vs, nvs, self.namespaces)
        if k == "source.trustDomain":
            return self.field(what, vs, nvs, self.trust_domain_values)
        if k == "source.serviceAccount":
            return self.field(what, vs, nvs, self.service_accounts)
        if k == "source.principal":
            return self.field(what, vs, nvs, self.principals)
        if k == "request.auth.principal":
            return self.field(what, vs, nvs, self.request_principals)
        if k == "request.auth.audiences":
            return self.field(what, vs, nvs, lambda v: self.list_claim("r.audiences", v))
        if k == "request.auth.presenter":
            return self.field(what, vs, nvs, lambda v: self.list_claim("r.presenters", v))
        if k.startswith("request.headers"):
            try:
                name = _name_in_brackets(k.removeprefix("request.headers")).lower()
                if not name:
                    raise _BadValue("empty header name")  # Envoy refuses such a filter
            except _BadValue as e:
                return self.field(what, vs, nvs, _raise(e))
            return self.field(what, vs, nvs, self.header(name))
        if k.startswith("request.auth.claims"):
            try:
                path = _names_in_nested_brackets(k.removeprefix("request.auth.claims"))
            except _BadValue as e:
                return self.field(what, vs, nvs, _raise(e))
            return self.field(what, vs, nvs, self.claims(path))
        raise _SkipRule(f"unknown attribute {k!r} in when")

    def rule(self, index: int, rule: Rule) -> Check | None:
        """A function; None when the rule matches every request. Raises :class:`_SkipRule`."""
        self.rule_index = index
        when: list[str] = []
        for c in rule.when:
            when += self.condition(c)
        parts: list[str] = []
        # ``to`` entries ORed (an entry without fields matches everything), fields ANDed.
        if rule.to:
            parts.append(_or([_and(self.operation(t.operation)) for t in rule.to]))
        if rule.from_:
            parts.append(_or([_and(self.source(f.source)) for f in rule.from_]))
        expr = _and(parts + when)
        if expr == _TRUE:
            return None
        check: Check = eval(f"lambda r: {expr}", self.namespace)
        return check


def _raise(error: _BadValue) -> Callable[[list[str]], str]:
    def make(values: list[str]) -> str:
        raise error

    return make


def _envoy_name(policy: AuthorizationPolicy, rule: int) -> str:
    """The name istiod gives a rule in the RBAC filter; Envoy orders rules by it."""
    return f"ns[{policy.namespace}]-policy[{policy.name}]-rule[{rule}]"


class CompiledL7Policy:
    """An AuthorizationPolicy turned into checks, with its possible decisions prebuilt.

    ``rules`` holds ``(rule index, check)`` for every rule istiod would generate (None: the
    rule matches everything); ``problems`` says, in words, which rules or values were dropped
    and why -- for the policy's status and the logs.
    """

    __slots__ = ("_dry_run_results", "action", "decisions", "dry_run", "key", "problems", "rules", "source")

    def __init__(self, policy: AuthorizationPolicy, trust_domains: tuple[str, ...]) -> None:
        self.source = policy
        self.key = policy.key
        self.action = policy.action
        self.dry_run = policy.dry_run
        builder = _RuleBuilder(policy, trust_domains)
        rules: list[tuple[int, Check | None]] = []
        for index, rule in enumerate(policy.rules):
            try:
                rules.append((index, builder.rule(index, rule)))
            except _SkipRule as e:
                effect = "allows nothing" if policy.action is ALLOW else "never matches"
                builder.problems.append(f"rule {index} skipped ({effect}): {e}")
        # Envoy's order: by rule name, so rule[10] comes before rule[2].
        rules.sort(key=lambda ic: _envoy_name(policy, ic[0]))
        self.rules: tuple[tuple[int, Check | None], ...] = tuple(rules)
        self.problems = tuple(builder.problems)
        allow = policy.action is not DENY
        verb = {ALLOW: "allowed", DENY: "denied", AUDIT: "audited", CUSTOM: "matched"}[policy.action]
        self.decisions = tuple(
            L7Decision(allow, self.key, i, f"{verb} by {policy.action.value} policy {self.key} rule {i}")
            for i in range(len(policy.rules))
        )
        self._dry_run_results = (
            *(DryRun(self.key, policy.action, i) for i in range(len(policy.rules))),
            DryRun(self.key, policy.action, None),
        )

    def first_match(self, request: Request) -> int | None:
        """The first rule (in Envoy's order) that ``request`` matches; None when none does."""
        for index, check in self.rules:
            if check is None or check(request):
                return index
        return None

    def dry_run_result(self, request: Request) -> DryRun:
        rule = self.first_match(request)
        return self._dry_run_results[-1 if rule is None else rule]

    def __repr__(self) -> str:
        return f"CompiledL7Policy({self.key!r}, {self.action.value}{', dry-run' if self.dry_run else ''})"


_CACHE_SIZE = 1 << 16
_cache: dict[tuple[int, tuple[str, ...]], tuple[AuthorizationPolicy, CompiledL7Policy]] = {}


def compile_policy(
    policy: AuthorizationPolicy, trust_domains: tuple[str, ...] = (DEFAULT_TRUST_DOMAIN,)
) -> CompiledL7Policy:
    """The compiled form of ``policy``, cached by object identity (as :func:`mesh.authz.compile_policy`).

    ``trust_domains``: the mesh's trust domain first, then its aliases.
    """
    key = (id(policy), trust_domains)
    hit = _cache.get(key)
    if hit is not None and hit[0] is policy:
        return hit[1]
    compiled = CompiledL7Policy(policy, trust_domains)
    if len(_cache) >= _CACHE_SIZE:
        _cache.clear()
    _cache[key] = (policy, compiled)
    return compiled


def first_matching_rule(policy: AuthorizationPolicy, request: Request) -> int | None:
    """Whether ``policy`` matches ``request`` regardless of its action: the index of the first
    matching rule, or None."""
    return compile_policy(policy).first_match(request)


# --- evaluation ---------------------------------------------------------------------------------

_Entry = tuple[str, CompiledL7Policy, int, Check | None]


def _entries(policies: list[CompiledL7Policy]) -> tuple[_Entry, ...]:
    """Every rule of ``policies`` in Envoy's order (by the rule's name), each policy key once."""
    seen: set[str] = set()
    entries: list[_Entry] = []
    for p in policies:
        if p.key in seen:
            continue
        seen.add(p.key)
        entries.extend((_envoy_name(p.source, i), p, i, check) for i, check in p.rules)
    entries.sort(key=lambda e: e[0])
    return tuple(entries)


def _first(entries: tuple[_Entry, ...], request: Request) -> _Entry | None:
    for entry in entries:
        check = entry[3]
        if check is None or check(request):
            return entry
    return None


def _unique(policies: list[CompiledL7Policy]) -> tuple[CompiledL7Policy, ...]:
    by_key = {p.key: p for p in reversed(policies)}  # the first of a key wins
    return tuple(by_key[k] for k in sorted(by_key))


class L7PolicySet:
    """The policies applying to one request's destination at a waypoint, grouped for evaluation.

    CUSTOM policies are ignored (ext_authz's business). Cheap to build per request; a proxy
    that keeps one per destination and snapshot version saves that too.
    """

    __slots__ = ("_allow", "_audit", "_deny", "_dry_run", "_has_allow", "_no_allow_matched")

    def __init__(
        self,
        policies: Iterable[AuthorizationPolicy | CompiledL7Policy],
        trust_domains: tuple[str, ...] = (DEFAULT_TRUST_DOMAIN,),
    ) -> None:
        deny: list[CompiledL7Policy] = []
        allow: list[CompiledL7Policy] = []
        audit: list[CompiledL7Policy] = []
        dry_run: list[CompiledL7Policy] = []
        for p in policies:
            c = p if isinstance(p, CompiledL7Policy) else compile_policy(p, trust_domains)
            if c.action is CUSTOM:
                continue
            if c.dry_run:
                dry_run.append(c)
            else:
                {DENY: deny, ALLOW: allow, AUDIT: audit}[c.action].append(c)
        self._deny = _entries(deny)
        self._allow = _entries(allow)
        self._has_allow = bool(allow)
        self._audit = _unique(audit)
        self._dry_run = _unique(dry_run)
        keys = ", ".join(sorted({p.key for p in allow}))
        self._no_allow_matched = L7Decision(False, None, None, f"denied: no ALLOW policy matched ({keys})")

    def evaluate(self, request: Request) -> L7Decision:
        decision = self._decide(request)
        if not self._audit and not self._dry_run:
            return decision  # prebuilt: nothing allocated
        audit = tuple(
            AuditMatch(p.key, rule) for p in self._audit if (rule := p.first_match(request)) is not None
        )
        if not self._dry_run:
            return decision if not audit else _with(decision, audit=audit)
        results = tuple(p.dry_run_result(request) for p in self._dry_run)
        return _with(decision, audit=audit, dry_run=results, dry_run_allow=self._shadow(decision, results))

    def _decide(self, request: Request) -> L7Decision:
        entry = _first(self._deny, request)
        if entry is not None:
            return entry[1].decisions[entry[2]]
        if not self._has_allow:
            return _NO_ALLOW_APPLIES
        entry = _first(self._allow, request)
        if entry is not None:
            return entry[1].decisions[entry[2]]
        return self._no_allow_matched

    def _shadow(self, decision: L7Decision, results: tuple[DryRun, ...]) -> bool:
        """The decision again, with the dry-run policies enforced alongside the others."""
        if not decision.allow and decision.policy is not None:
            return False  # an enforced DENY matched
        if any(r.matched for r in results if r.action is DENY):
            return False
        dry_allows = [r for r in results if r.action is ALLOW]
        if not self._has_allow and not dry_allows:
            return True
        if decision.allow and decision.policy is not None:
            return True  # an enforced ALLOW matched
        return any(r.matched for r in dry_allows)


def _with(
    d: L7Decision,
    *,
    audit: tuple[AuditMatch, ...],
    dry_run: tuple[DryRun, ...] = (),
    dry_run_allow: bool | None = None,
) -> L7Decision:
    """``d`` with the reported extras (one constructor call: ``dataclasses.replace`` is slow)."""
    return L7Decision(d.allow, d.policy, d.rule, d.reason, dry_run, dry_run_allow, audit)


def evaluate(policies: L7PolicySet | Iterable[AuthorizationPolicy], request: Request) -> L7Decision:
    """Decide ``request`` against the policies :func:`select_policies` chose for it."""
    ps = policies if isinstance(policies, L7PolicySet) else L7PolicySet(policies)
    return ps.evaluate(request)


# --- selection ----------------------------------------------------------------------------------

_GATEWAY_GROUP = "gateway.networking.k8s.io"
_SERVICE_ENTRY_GROUP = "networking.istio.io"


@dataclass(frozen=True, slots=True)
class WaypointPolicies:
    """The policies a waypoint applies to one request: ``rbac`` (ALLOW, DENY, AUDIT, dry-run
    ones included) for :func:`evaluate`, ``custom`` for the external authorizer. Sorted by key."""

    rbac: tuple[AuthorizationPolicy, ...] = ()
    custom: tuple[AuthorizationPolicy, ...] = ()


def _group_is(ref: PolicyTargetRef, group: str) -> bool:
    return (ref.group or "core") == group  # config.CanonicalGroup: "" is the core group


class _Bound(Protocol):
    @property
    def namespace(self) -> str: ...
    @property
    def target_refs(self) -> tuple[PolicyTargetRef, ...]: ...


def attaches(
    policy: _Bound,
    *,
    waypoint: tuple[str, str],
    service: tuple[str, str] | None,
    root_namespace: str = ROOT_NAMESPACE,
    service_kind: str = "Service",
) -> bool:
    """Whether a targetRefs-bound object (an AuthorizationPolicy, a RequestAuthentication)
    applies to a request of ``service`` through waypoint ``waypoint`` (see :func:`select_policies`)."""
    return any(_attaches(policy, ref, waypoint, service, service_kind, root_namespace) for ref in policy.target_refs)


def _attaches(
    policy: _Bound,
    ref: PolicyTargetRef,
    waypoint: tuple[str, str],
    service: tuple[str, str] | None,
    service_kind: str,
    root_namespace: str,
) -> bool:
    """``WorkloadPolicyMatcher.ShouldAttachPolicy`` for a waypoint, one targetRef."""
    if ref.namespace and ref.namespace != policy.namespace:
        # istiod's webhook refuses any targetRef namespace (cross-namespace references are not
        # supported); one naming another namespace can never apply.
        return False
    if service is not None and policy.namespace == service[0] and ref.name == service[1]:
        if service_kind == "Service" and ref.kind == "Service" and _group_is(ref, "core"):
            return True
        if (
            service_kind == "ServiceEntry"
            and ref.kind == "ServiceEntry"
            and _group_is(ref, _SERVICE_ENTRY_GROUP)
        ):
            return True
    if (
        policy.namespace == root_namespace
        and ref.kind == "GatewayClass"
        and _group_is(ref, _GATEWAY_GROUP)
        and ref.name == WAYPOINT_GATEWAY_CLASS
    ):
        return True
    return (
        policy.namespace == waypoint[0]
        and ref.kind == "Gateway"
        and _group_is(ref, _GATEWAY_GROUP)
        and ref.name == waypoint[1]
    )


def select_policies(
    policies: Iterable[AuthorizationPolicy],
    *,
    waypoint: tuple[str, str],
    service: tuple[str, str] | None,
    root_namespace: str = ROOT_NAMESPACE,
    service_kind: Literal["Service", "ServiceEntry"] = "Service",
) -> WaypointPolicies:
    """The policies waypoint ``(namespace, gateway name)`` applies to a request for ``service``
    (``(namespace, name)`` of the destination Service or ServiceEntry, None when it has none).

    A policy applies when one of its ``targetRefs`` names this waypoint's Gateway (policy in the
    waypoint's namespace), the destination service (policy in the service's namespace), or the
    GatewayClass ``istio-waypoint`` (policy in the root namespace). ``selector``-bound and
    unbound policies are never a waypoint's (ztunnel's).
    """
    rbac: dict[str, AuthorizationPolicy] = {}
    custom: dict[str, AuthorizationPolicy] = {}
    for p in policies:
        if not p.target_refs:
            continue
        if any(_attaches(p, ref, waypoint, service, service_kind, root_namespace) for ref in p.target_refs):
            (custom if p.action is CUSTOM else rbac).setdefault(p.key, p)
    return WaypointPolicies(
        rbac=tuple(rbac[k] for k in sorted(rbac)), custom=tuple(custom[k] for k in sorted(custom))
    )
