"""Local node tokens: what they say, where they live, and every way verification refuses one."""

from __future__ import annotations

import datetime as dt
import stat
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from controlplane.auth import AuthenticationError, LocalTokenAuthenticator
from controlplane.tokens import (
    NODE_SUBJECT,
    SIGNING_KEY_FILE,
    TokenError,
    TokenIssuer,
    token_path,
)


@pytest.fixture
def issuer(tmp_path: Path) -> TokenIssuer:
    return TokenIssuer.load_or_create(tmp_path)


def test_round_trip(issuer: TokenIssuer) -> None:
    claims = issuer.verify(issuer.issue("node-a"))
    assert (claims.namespace, claims.service_account, claims.node) == ("istio-system", "ztunnel", "node-a")
    assert claims.expires_at - claims.issued_at == dt.timedelta(days=365)


def test_token_looks_like_a_projected_service_account_token(issuer: TokenIssuer) -> None:
    token = issuer.issue("node-a")
    assert jwt.get_unverified_header(token)["alg"] == "ES256"
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["sub"] == NODE_SUBJECT
    assert claims["aud"] == ["istio-ca"]
    assert claims["kubernetes.io"]["node"]["name"] == "node-a"


def test_key_is_private_and_kept(tmp_path: Path) -> None:
    first = TokenIssuer.load_or_create(tmp_path)
    key_file = tmp_path / SIGNING_KEY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    token = first.issue("node-a")
    # A restart reads the same key, so tokens already handed out stay valid.
    assert TokenIssuer.load_or_create(tmp_path).verify(token).node == "node-a"


def test_token_files(issuer: TokenIssuer, tmp_path: Path) -> None:
    paths = issuer.write_node_tokens(tmp_path, ["node-a", "node-b"])
    assert paths == [token_path(tmp_path, "node-a"), token_path(tmp_path, "node-b")]
    assert paths[0] == tmp_path / "tokens" / "node-a.token"
    for p in paths:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert issuer.verify(paths[1].read_text()).node == "node-b"


def test_garbled_key_file_is_named(tmp_path: Path) -> None:
    (tmp_path / SIGNING_KEY_FILE).write_text("not a key")
    with pytest.raises(TokenError, match=SIGNING_KEY_FILE):
        TokenIssuer.load_or_create(tmp_path)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda i, o: o.issue("node-a"), "signature does not verify"),
        (lambda i, o: i.issue("node-a", audience="kubernetes"), "audience must be 'istio-ca'"),
        (
            lambda i, o: TokenIssuer(i._key, clock=lambda: time.time() - 7200).issue(
                "node-a", ttl=dt.timedelta(hours=1)
            ),
            "expired",
        ),
        (lambda i, o: TokenIssuer(i._key, issuer="someone-else").issue("node-a"), "not issued by"),
        (lambda i, o: "not.a.jwt", "not a well-formed JWT"),
        (
            lambda i, o: jwt.encode(
                {
                    "iss": "ambient-controlplane",
                    "sub": NODE_SUBJECT,
                    "aud": "istio-ca",
                    "iat": 1,
                    "exp": 2**40,
                },
                "a-shared-secret-long-enough-for-hs256",
                algorithm="HS256",
            ),
            "not signed with ES256",
        ),
        (
            lambda i, o: jwt.encode(
                {
                    "iss": "ambient-controlplane",
                    "sub": NODE_SUBJECT,
                    "aud": "istio-ca",
                    "iat": int(time.time()),
                },
                i._key,
                algorithm="ES256",
            ),
            "lacks the 'exp' claim",
        ),
        (
            lambda i, o: jwt.encode(
                {
                    "iss": "ambient-controlplane",
                    "sub": NODE_SUBJECT,
                    "aud": "istio-ca",
                    "iat": int(time.time()),
                    "exp": int(time.time()) + 60,
                },
                i._key,
                algorithm="ES256",
            ),
            "names no node",
        ),
    ],
    ids=["forged", "wrong-audience", "expired", "wrong-issuer", "garbage", "hs256", "no-exp", "no-node"],
)
async def test_refusals(issuer: TokenIssuer, make: object, reason: str) -> None:
    other = TokenIssuer(ec.generate_private_key(ec.SECP256R1()))
    token = make(issuer, other)  # type: ignore[operator]
    with pytest.raises(TokenError, match=reason):
        issuer.verify(token)
    with pytest.raises(AuthenticationError, match=reason):
        await LocalTokenAuthenticator(issuer).authenticate(token)


async def test_local_authenticator_caller(issuer: TokenIssuer) -> None:
    caller = await LocalTokenAuthenticator(issuer).authenticate(issuer.issue("node-b"))
    assert (caller.namespace, caller.service_account, caller.node, caller.source) == (
        "istio-system",
        "ztunnel",
        "node-b",
        "local",
    )
    assert caller.pod_name is None and caller.pod_uid is None


async def test_a_waypoint_token_proves_its_own_account_and_nothing_else(tmp_path: Path) -> None:
    from controlplane.ca import authorize
    from controlplane.tokens import waypoint_token_path
    from mesh.identity import Identity
    from mesh.model import Store

    issuer = TokenIssuer.load_or_create(tmp_path)
    (path,) = issuer.write_waypoint_tokens(tmp_path, [("shop", "waypoint", "node-a")])
    assert path == waypoint_token_path(tmp_path, "shop", "waypoint")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    caller = await LocalTokenAuthenticator(issuer).authenticate(path.read_text())
    assert (caller.namespace, caller.service_account) == ("shop", "waypoint")
    snap = Store().snapshot()
    assert authorize(caller, Identity("cluster.local", "shop", "waypoint"), snap).allowed
    other = authorize(caller, Identity("cluster.local", "shop", "web"), snap)
    assert not other.allowed and "may only obtain its own identity" in other.reason
