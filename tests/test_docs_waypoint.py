"""docs/adding-a-waypoint.md: every YAML block loads as local mode loads it, and the policy
examples decide as the page says."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

from mesh.identity import Identity
from mesh.l7authz import Headers, Request, evaluate, select_policies
from mesh.model import AuthorizationPolicy, Gateway, Namespace, RequestAuthentication, Service
from mesh.model.meshconfig import MeshConfig
from mesh.pathnorm import NormalizedPath, normalize_path
from sources.local import parse_manifest

DOC = Path(__file__).resolve().parent.parent / "docs" / "adding-a-waypoint.md"


def blocks() -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", DOC.read_text(), re.S)


def test_every_block_loads() -> None:
    kinds = [type(o) for b in blocks() for o in parse_manifest(b, source=str(DOC))]
    assert kinds == [
        Gateway,
        Service,
        Gateway,
        AuthorizationPolicy,
        AuthorizationPolicy,
        RequestAuthentication,
        AuthorizationPolicy,
        MeshConfig,
        AuthorizationPolicy,
        Namespace,
    ]
    gateways = [o for b in blocks() for o in parse_manifest(b) if isinstance(o, Gateway)]
    assert gateways[1].for_service_account == "api"


def decide(method: str, path: str, sa: str, headers: dict[str, str] | None = None) -> bool:
    policies = [
        o
        for b in blocks()
        for o in parse_manifest(b)
        if isinstance(o, AuthorizationPolicy) and o.name != "me-needs-a-user"
    ]
    chosen = select_policies(policies, waypoint=("shop", "waypoint"), service=("shop", "web"))
    norm = normalize_path(path)
    assert isinstance(norm, NormalizedPath)
    req = Request(
        source_principal=Identity("cluster.local", "shop", sa),
        source_ip=ipaddress.ip_address("10.0.1.2"),
        destination_ip=ipaddress.ip_address("10.96.0.20"),
        destination_port=80,
        host="web.shop",
        method=method,
        path=norm.path,
        headers=Headers(headers or {}),
    )
    return evaluate(chosen.rbac, req).allow


def test_the_policies_decide_as_the_page_says() -> None:
    assert decide("GET", "/order", "frontend")
    assert not decide("GET", "/order", "cart")  # ALLOW for readers is frontend's only
    assert decide("POST", "/order", "cart", {"x-tenant": "acme"})
    assert not decide("POST", "/order", "cart", {"x-tenant": "other"})
    # DENY POST /admin, also when a dot segment dresses it up.
    assert not decide("POST", "/admin", "cart", {"x-tenant": "acme"})
    assert not decide("POST", "/order/../admin", "cart", {"x-tenant": "acme"})


def test_the_jwt_example_decides_as_the_page_says() -> None:
    """The RequestAuthentication and the DENY of the JWT section, through the waypoint's own code."""
    from mesh.xds.state import WaypointAuthentication
    from tests.waypoint.test_jwt import RSA_KEY, jwks, token
    from waypoint.jwt import Authenticated, Authenticator, Refused

    objs = [o for b in blocks() for o in parse_manifest(b)]
    (ra,) = [o for o in objs if isinstance(o, RequestAuthentication)]
    uri = ra.jwt_rules[0].jwks_uri
    authn = Authenticator([WaypointAuthentication(ra, {uri: jwks((RSA_KEY, "k1"))})])
    deny = [o for o in objs if isinstance(o, AuthorizationPolicy) and o.name == "me-needs-a-user"]

    def status(headers: list[tuple[str, str]], path: str) -> int:
        got = authn.authenticate(headers, path)
        if isinstance(got, Refused):
            return 401
        assert isinstance(got, Authenticated)
        req = Request(
            source_principal=Identity("cluster.local", "shop", "frontend"),
            source_ip=ipaddress.ip_address("10.0.1.2"),
            destination_ip=ipaddress.ip_address("10.96.0.20"),
            destination_port=80,
            host="web.shop",
            method="GET",
            path=path,
            request_principal=got.principal,
            request_auth_claims=got.claims if got.principal else {},
        )
        return 200 if evaluate(deny, req).allow else 403

    good = [("authorization", f"Bearer {token()}")]
    assert status([], "/me") == 403
    assert status(good, "/me") == 200
    assert status([("authorization", f"Bearer {token(exp=1)}")], "/order") == 401
    assert status([], "/order") == 200
    assert dict(authn.authenticate(good, "/me").add_headers)["x-user"] == "alice"  # type: ignore[union-attr]
