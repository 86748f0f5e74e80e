"""Waypoint policies on TCP connections (waypoint/tcp_policy.py): Istio's TCP filter, fail closed."""

from __future__ import annotations

import ipaddress

from mesh.identity import Identity
from mesh.l7authz import Request, evaluate
from mesh.model import (
    AuthorizationAction,
    AuthorizationPolicy,
    Condition,
    Operation,
    Rule,
    RuleFrom,
    RuleTo,
    Source,
)
from mesh.model.policy import PolicyTargetRef
from waypoint.tcp_policy import tcp_view

FRONTEND = "cluster.local/ns/shop/sa/frontend"
REF = (PolicyTargetRef("Service", "web"),)


def policy(action: AuthorizationAction, *rules: Rule) -> AuthorizationPolicy:
    return AuthorizationPolicy(namespace="shop", name="p", target_refs=REF, action=action, rules=rules)


def tcp(sa: str, port: int = 5432) -> Request:
    return Request(
        source_principal=Identity("cluster.local", "shop", sa),
        source_ip=ipaddress.ip_address("10.0.1.2"),
        destination_ip=ipaddress.ip_address("10.96.0.20"),
        destination_port=port,
        host="",
        method="",
        path="",
    )


def allowed(p: AuthorizationPolicy, req: Request) -> bool:
    return evaluate([tcp_view(p)], req).allow


def test_an_allow_rule_with_http_fields_allows_no_tcp() -> None:
    p = policy(
        AuthorizationAction.ALLOW,
        Rule(from_=(RuleFrom(Source(principals=(FRONTEND,))),), to=(RuleTo(Operation(methods=("GET",))),)),
        Rule(to=(RuleTo(Operation(ports=(5432,))),)),
    )
    view = tcp_view(p)
    assert view.rules == (Rule(to=(RuleTo(Operation(ports=(5432,))),)),)
    assert allowed(p, tcp("cart", 5432)) and not allowed(p, tcp("frontend", 6000))


def test_a_deny_with_http_fields_denies_more_widely() -> None:
    p = policy(
        AuthorizationAction.DENY,
        Rule(
            from_=(RuleFrom(Source(principals=(FRONTEND,))),),
            to=(RuleTo(Operation(methods=("POST",), paths=("/admin",))),),
            when=(Condition("request.headers[x-a]", ("1",)), Condition("destination.port", ("5432",))),
        ),
    )
    # Only the connection-level parts are left: frontend on 5432 is denied whatever it sends.
    assert not allowed(p, tcp("frontend", 5432))
    assert allowed(p, tcp("cart", 5432)) and allowed(p, tcp("frontend", 6000))


def test_an_l4_policy_is_kept_as_is() -> None:
    p = policy(AuthorizationAction.ALLOW, Rule(from_=(RuleFrom(Source(principals=(FRONTEND,))),)))
    assert tcp_view(p) is p
