"""RequestAuthentication at the waypoint (waypoint/jwt.py): tokens minted here, every way to fail."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from mesh.model.policy import ClaimToHeader, JwtHeader, JwtRule, PolicyTargetRef, RequestAuthentication
from mesh.xds.state import WaypointAuthentication
from waypoint.jwt import NOT_CONFIGURED, VERIFICATION_FAILS, Authenticated, Authenticator, Refused

ISS = "https://issuer.example"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwks(*pairs: tuple[Any, str]) -> str:
    keys = []
    for key, kid in pairs:
        algo = RSAAlgorithm if isinstance(key, rsa.RSAPrivateKey) else ECAlgorithm
        jwk = json.loads(algo.to_jwk(key.public_key()))
        jwk["kid"] = kid
        keys.append(jwk)
    return json.dumps({"keys": keys})


def token(key: Any = RSA_KEY, kid: str = "k1", alg: str = "RS256", **claims: Any) -> str:
    body = {"iss": ISS, "sub": "alice", "aud": "shop", "exp": int(time.time()) + 600, **claims}
    return jwt.encode(
        {k: v for k, v in body.items() if v is not None}, key, algorithm=alg, headers={"kid": kid}
    )


def authn(*rules: JwtRule, jwks_by_uri: dict[str, str] | None = None) -> Authenticator:
    ra = RequestAuthentication(
        namespace="shop", name="jwt", target_refs=(PolicyTargetRef("Service", "web"),), jwt_rules=rules
    )
    return Authenticator([WaypointAuthentication(ra, jwks_by_uri or {})])


RULE = JwtRule(issuer=ISS, audiences=("shop",), jwks=jwks((RSA_KEY, "k1"), (EC_KEY, "k2")))


def bearer(t: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {t}")]


def ok(result: Authenticated | Refused) -> Authenticated:
    assert isinstance(result, Authenticated), result
    return result


def refused(result: Authenticated | Refused, message: str = VERIFICATION_FAILS) -> str:
    assert isinstance(result, Refused), result
    assert result.message == message
    return result.reason


def test_a_valid_token_yields_the_principal_and_is_removed() -> None:
    a = authn(RULE)
    got = ok(a.authenticate(bearer(token()), "/order"))
    assert got.principal == f"{ISS}/alice" and got.claims["aud"] == "shop"
    assert got.remove_headers == {"authorization"}
    # ES256 with the second key, found by kid.
    assert ok(a.authenticate(bearer(token(EC_KEY, "k2", "ES256")), "/")).principal == f"{ISS}/alice"


def test_no_token_passes_without_a_principal() -> None:
    got = ok(authn(RULE).authenticate([("authorization", "Basic dXNlcg==")], "/"))
    assert got.principal is None and got.remove_headers == frozenset()


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: token(exp=int(time.time()) - 3600), "expired"),
        (lambda: token(nbf=int(time.time()) + 3600), "not valid yet"),
        (lambda: token(aud="other"), "audience not in ['shop']"),
        (lambda: token(kid="rotated"), "no key with kid 'rotated'"),
        (lambda: token(OTHER_KEY), "InvalidSignatureError"),
        (lambda: token()[:-4] + ("AAAA" if not token().endswith("AAAA") else "BBBB"), "Signature"),
        (lambda: jwt.encode({"iss": ISS, "sub": "mallory"}, None, algorithm="none"), "algorithm 'none'"),
    ],
)
def test_bad_tokens_are_refused(make: Any, reason: str) -> None:
    assert reason in refused(authn(RULE).authenticate(bearer(make()), "/"))


def test_hmac_forged_with_the_public_key_is_refused() -> None:
    from cryptography.hazmat.primitives import serialization

    pem = RSA_KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    forged = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT","kid":"k1"}').rstrip(b"=").decode()
    body = base64.urlsafe_b64encode(json.dumps({"iss": ISS, "sub": "mallory"}).encode()).rstrip(b"=").decode()
    import hmac
    from hashlib import sha256

    sig = (
        base64.urlsafe_b64encode(hmac.new(pem, f"{forged}.{body}".encode(), sha256).digest())
        .rstrip(b"=")
        .decode()
    )
    assert "algorithm 'HS256'" in refused(authn(RULE).authenticate(bearer(f"{forged}.{body}.{sig}"), "/"))


def test_an_issuer_no_rule_names_is_refused() -> None:
    refused(authn(RULE).authenticate(bearer(token(iss="https://elsewhere")), "/"), NOT_CONFIGURED)


def test_keys_never_fetched_fail_closed() -> None:
    rule = JwtRule(issuer=ISS, jwks_uri="https://issuer.example/jwks")
    assert "never fetched" in refused(authn(rule).authenticate(bearer(token()), "/"))
    fetched = authn(rule, jwks_by_uri={"https://issuer.example/jwks": jwks((RSA_KEY, "k1"))})
    assert ok(fetched.authenticate(bearer(token()), "/")).principal == f"{ISS}/alice"


def test_query_parameter_custom_header_and_cookie() -> None:
    a = authn(RULE)
    got = ok(a.authenticate([], f"/order?x=1&access_token={token()}"))
    assert got.principal and got.path == "/order?x=1"
    custom = JwtRule(
        issuer=ISS, jwks=RULE.jwks, from_headers=(JwtHeader("x-jwt", "Token "),), from_cookies=("session",)
    )
    b = authn(custom)
    assert ok(b.authenticate([("x-jwt", f"Token {token()}")], "/")).remove_headers == {"x-jwt"}
    assert ok(b.authenticate([("cookie", f"a=b; session={token()}")], "/")).principal == f"{ISS}/alice"
    # A rule with its own locations does not read the defaults: that token is not looked at.
    assert ok(b.authenticate(bearer(token()), "/")).principal is None
    # A token in a place only another issuer's rule reads: not configured for it.
    other = JwtRule(issuer="https://other", jwks=RULE.jwks, from_headers=(JwtHeader("x-other"),))
    refused(authn(RULE, other).authenticate([("x-other", token())], "/"), NOT_CONFIGURED)


def test_outputs_and_forwarding() -> None:
    rule = JwtRule(
        issuer=ISS,
        jwks=RULE.jwks,
        forward_original_token=True,
        output_payload_to_header="x-jwt-payload",
        output_claim_to_headers=(ClaimToHeader("x-user", "sub"), ClaimToHeader("x-groups", "groups")),
    )
    t = token(scope="read write", groups=["a", "b"])
    got = ok(authn(rule).authenticate(bearer(t), "/"))
    assert "authorization" not in got.remove_headers  # forwarded as is
    added = dict(got.add_headers)
    assert added["x-jwt-payload"] == t.split(".")[1]
    assert added["x-user"] == "alice" and added["x-groups"] == '["a","b"]'
    assert got.claims["scope"] == ["read", "write"]  # space-delimited, as Istio splits it


def test_one_bad_token_among_several_refuses() -> None:
    headers = [*bearer(token()), ("authorization", "Bearer " + token(exp=1))]
    refused(authn(RULE).authenticate(headers, "/"))
