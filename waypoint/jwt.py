"""RequestAuthentication at the waypoint: find, validate and hand on end-user JWTs, as Istio's Envoy does.

The RequestAuthentications bound to this waypoint (``targetRefs``, selected like the
AuthorizationPolicies) become one :class:`Authenticator`. Per request:

* **Where tokens are looked for**: each rule's ``fromHeaders`` (name and prefix),
  ``fromParams`` and ``fromCookies``; a rule that names none uses Istio's defaults,
  ``Authorization: Bearer <token>`` and the ``access_token`` query parameter.
* **No token**: the request passes with no request principal (an AuthorizationPolicy with
  ``requestPrincipals: ["*"]`` is how to require one).
* **A token**: it must be valid for a rule whose issuer it names and which looks for it where it
  was found, else **401** (``Jwt issuer is not configured`` / ``Jwt verification fails``).
  Valid means: the signature verifies with a key of the rule's JWKS (inline ``jwks``, or the
  ``jwksUri`` document the control plane fetched — none fetched yet: fail closed), by ``kid``
  when the token has one; an asymmetric algorithm matching the key (never ``none`` nor HMAC);
  ``exp``/``nbf`` within 60 s of clock skew (Envoy's default); ``iss``; ``aud`` intersecting
  ``audiences`` when the rule lists any.
* **What it yields**: the request principal ``<iss>/<sub>``, the claims (``scope``,
  ``permission`` and the rule's ``spaceDelimitedClaims`` split on spaces into lists, as Istio
  does), audiences and presenter — for :mod:`mesh.l7authz` — and the header changes: the token
  removed unless ``forwardOriginalToken``, ``outputPayloadToHeader`` (the payload, base64url, as
  Envoy sends it) and ``outputClaimToHeaders``.

Validated tokens are cached (by token text, until their expiry), so a client sending the same
token does not pay the signature check on every request.
"""

from __future__ import annotations

import base64
import json
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from typing import Any

import jwt
import structlog

from mesh.model.policy import JwtRule
from mesh.xds.state import WaypointAuthentication

log = structlog.get_logger(__name__)

LEEWAY = 60  # seconds of clock skew, Envoy's default
DEFAULT_SPACE_DELIMITED = ("scope", "permission")
ASYMMETRIC = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
NOT_CONFIGURED = "Jwt issuer is not configured"
VERIFICATION_FAILS = "Jwt verification fails"
CACHE_SIZE = 1024


@dataclass(frozen=True, slots=True)
class Authenticated:
    """A request that carried no token (``principal`` None) or a valid one."""

    principal: str | None = None
    claims: Mapping[str, Any] = field(default_factory=dict)
    remove_headers: frozenset[str] = frozenset()
    add_headers: tuple[tuple[str, str], ...] = ()
    path: str | None = None  # the request target without the token's query parameter
    issuer_rule: str | None = None  # "ns/name rule[i]" that validated it


@dataclass(frozen=True, slots=True)
class Refused:
    """401: a token was present and is not acceptable; ``reason`` goes to the log only."""

    message: str
    reason: str


@dataclass(frozen=True, slots=True)
class _Location:
    kind: str  # "header" | "param" | "cookie"
    name: str
    prefix: str = ""


@dataclass(frozen=True, slots=True)
class _Rule:
    where: str
    rule: JwtRule
    locations: tuple[_Location, ...]
    keys: jwt.PyJWKSet | None
    keys_error: str | None


_DEFAULT_LOCATIONS = (_Location("header", "authorization", "Bearer "), _Location("param", "access_token"))


def _locations(rule: JwtRule) -> tuple[_Location, ...]:
    locs = [
        *(_Location("header", h.name.lower(), h.prefix) for h in rule.from_headers),
        *(_Location("param", p) for p in rule.from_params),
        *(_Location("cookie", c) for c in rule.from_cookies),
    ]
    return tuple(locs) or _DEFAULT_LOCATIONS


def _keys(rule: JwtRule, jwks_by_uri: Mapping[str, str]) -> tuple[jwt.PyJWKSet | None, str | None]:
    doc = rule.jwks or jwks_by_uri.get(rule.jwks_uri)
    if not doc:
        return None, f"no keys for {rule.jwks_uri or 'the rule'} (never fetched)"
    try:
        return jwt.PyJWKSet.from_json(doc), None
    except (jwt.PyJWKSetError, jwt.InvalidKeyError, ValueError, TypeError) as e:
        return None, f"unusable JWKS: {e}"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Authenticator:
    """The RequestAuthentications that apply to one request target (module docstring)."""

    def __init__(self, authns: Iterable[WaypointAuthentication], *, clock: Any = time.time) -> None:
        rules: list[_Rule] = []
        for a in sorted(authns, key=lambda a: a.key):
            for i, r in enumerate(a.policy.jwt_rules):
                keys, error = _keys(r, a.jwks_by_uri)
                rules.append(_Rule(f"{a.key} jwtRules[{i}]", r, _locations(r), keys, error))
        self._rules = tuple(rules)
        self._locations = tuple(dict.fromkeys(loc for r in rules for loc in r.locations))
        self._clock = clock
        self._cache: OrderedDict[str, tuple[float, _Rule, dict[str, Any]]] = OrderedDict()

    @property
    def empty(self) -> bool:
        return not self._rules

    def authenticate(self, headers: Sequence[tuple[str, str]], target: str) -> Authenticated | Refused:
        """Find and validate the request's tokens; ``headers`` lower-case, ``target`` raw."""
        if not self._rules:
            return Authenticated()
        found = self._find(headers, target)
        if not found:
            return Authenticated()
        result: Authenticated | None = None
        for loc, token in found:
            checked = self._check(loc, token)
            if isinstance(checked, Refused):
                return checked
            if result is None:
                result = checked
        assert result is not None
        return self._outputs(result, found, headers, target)

    # -- finding -------------------------------------------------------------------------------

    def _find(self, headers: Sequence[tuple[str, str]], target: str) -> list[tuple[_Location, str]]:
        found: list[tuple[_Location, str]] = []
        query: dict[str, list[str]] | None = None
        cookies: SimpleCookie | None = None
        for loc in self._locations:
            if loc.kind == "header":
                for name, value in headers:
                    if name == loc.name and value.startswith(loc.prefix) and value[len(loc.prefix) :].strip():
                        found.append((loc, value[len(loc.prefix) :].strip()))
            elif loc.kind == "param":
                if query is None:
                    query = urllib.parse.parse_qs(urllib.parse.urlsplit(target).query, keep_blank_values=False)
                found.extend((loc, v) for v in query.get(loc.name, ()))
            else:
                if cookies is None:
                    cookies = SimpleCookie()
                    for name, value in headers:
                        if name == "cookie":
                            try:
                                cookies.load(value)
                            except Exception:
                                pass
                morsel = cookies.get(loc.name)
                if morsel is not None and morsel.value:
                    found.append((loc, morsel.value))
        return found

    # -- validating ----------------------------------------------------------------------------

    def _check(self, loc: _Location, token: str) -> Authenticated | Refused:
        now = self._clock()
        hit = self._cache.get(token)
        if hit is not None and hit[0] > now and loc in hit[1].locations:
            self._cache.move_to_end(token)
            return Authenticated(self._principal(hit[2]), hit[2], issuer_rule=hit[1].where)
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as e:
            return Refused(VERIFICATION_FAILS, f"not a JWT: {e}")
        iss = unverified.get("iss")
        candidates = [r for r in self._rules if r.rule.issuer == iss and loc in r.locations]
        if not candidates:
            return Refused(NOT_CONFIGURED, f"issuer {iss!r} has no rule reading the token from its {loc.kind} {loc.name}")
        alg = header.get("alg")
        if alg not in ASYMMETRIC:
            return Refused(VERIFICATION_FAILS, f"algorithm {alg!r} is not accepted")
        reasons = []
        for r in candidates:
            verdict = self._verify(r, token, header, alg)
            if isinstance(verdict, str):
                reasons.append(f"{r.where}: {verdict}")
                continue
            claims = self._split(r.rule, verdict)
            exp = claims.get("exp")
            until = float(exp) + LEEWAY if isinstance(exp, int | float) else now + 300
            self._cache[token] = (until, r, claims)
            if len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
            return Authenticated(self._principal(claims), claims, issuer_rule=r.where)
        return Refused(VERIFICATION_FAILS, "; ".join(reasons))

    def _verify(self, r: _Rule, token: str, header: Mapping[str, Any], alg: str) -> dict[str, Any] | str:
        if r.keys is None:
            return r.keys_error or "no keys"
        kid = header.get("kid")
        keys = [k for k in r.keys.keys if kid is None or k.key_id == kid]
        if not keys:
            return f"no key with kid {kid!r}"
        last = "no usable key"
        for k in keys:  # the key's type must suit ``alg`` (PyJWT refuses an RSA key for ES256)
            try:
                return dict(
                    jwt.decode(
                        token,
                        k.key,
                        algorithms=[alg],
                        issuer=r.rule.issuer,
                        audience=list(r.rule.audiences) or None,
                        leeway=LEEWAY,
                        options={"verify_aud": bool(r.rule.audiences)},
                    )
                )
            except jwt.ExpiredSignatureError:
                return "token has expired"
            except jwt.ImmatureSignatureError:
                return "token is not valid yet"
            except jwt.InvalidAudienceError:
                return f"audience not in {list(r.rule.audiences)}"
            except jwt.InvalidIssuerError:
                return "issuer mismatch"
            except jwt.PyJWTError as e:
                last = f"{type(e).__name__}: {e}"
        return last

    @staticmethod
    def _split(rule: JwtRule, claims: dict[str, Any]) -> dict[str, Any]:
        for name in (*DEFAULT_SPACE_DELIMITED, *rule.space_delimited_claims):
            v = claims.get(name)
            if isinstance(v, str):
                claims[name] = v.split()
        return claims

    @staticmethod
    def _principal(claims: Mapping[str, Any]) -> str | None:
        iss, sub = claims.get("iss"), claims.get("sub")
        return f"{iss}/{sub}" if isinstance(iss, str) and isinstance(sub, str) else None

    # -- what is forwarded ---------------------------------------------------------------------

    def _outputs(
        self,
        result: Authenticated,
        found: list[tuple[_Location, str]],
        headers: Sequence[tuple[str, str]],
        target: str,
    ) -> Authenticated:
        rule = next(r for r in self._rules if r.where == result.issuer_rule).rule
        remove: set[str] = set()
        params: set[str] = set()
        if not rule.forward_original_token:
            for loc, _ in found:
                if loc.kind == "header":
                    remove.add(loc.name)
                elif loc.kind == "param":
                    params.add(loc.name)
        add: list[tuple[str, str]] = []
        token = found[0][1]
        if rule.output_payload_to_header:
            payload = token.split(".")[1] if token.count(".") == 2 else _b64(json.dumps(result.claims).encode())
            add.append((rule.output_payload_to_header.lower(), payload))
            remove.add(rule.output_payload_to_header.lower())
        for c in rule.output_claim_to_headers:
            value = result.claims.get(c.claim)
            if value is None:
                continue
            text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
            add.append((c.header.lower(), text))
            remove.add(c.header.lower())
        path = None
        if params:
            parts = urllib.parse.urlsplit(target)
            kept = [(k, v) for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True) if k not in params]
            path = urllib.parse.urlunsplit(("", "", parts.path, urllib.parse.urlencode(kept), ""))
        return Authenticated(result.principal, result.claims, frozenset(remove), tuple(add), path, result.issuer_rule)
