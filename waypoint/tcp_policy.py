"""Waypoint policies for traffic that is not HTTP: what Istio's TCP RBAC filter enforces.

A connection relayed as TCP has no method, path, host, header or JWT, so the HTTP-only parts of a
policy cannot be evaluated. istiod builds the waypoint's TCP filter from the same policies with
these rules (``pilot/pkg/security/authz/model``, ``forTCP``), which :func:`tcp_view` applies:

* **ALLOW**: a rule that uses an HTTP-only field is dropped (it allows nothing), so the policy
  still applies and whatever else it does not allow is denied — fail closed.
* **DENY** and **AUDIT**: only the HTTP-only fields are dropped, so the rule matches more
  connections than written (a DENY of ``POST /admin`` on a TCP port denies every connection its
  other fields match) — fail closed again.

HTTP-only: ``requestPrincipals``, ``remoteIpBlocks`` (and their ``not`` forms), ``hosts``,
``methods``, ``paths`` (and ``not`` forms), and ``when`` keys other than the connection-level ones.
"""

from __future__ import annotations

import dataclasses

from mesh.model import L4_CONDITION_KEYS, L7_OPERATION_FIELDS, L7_SOURCE_FIELDS, AuthorizationAction
from mesh.model.policy import AuthorizationPolicy, Condition, Rule, RuleFrom, RuleTo

# when keys a TCP connection has (beyond ztunnel's five): the destination's and the peer's
_TCP_KEYS = L4_CONDITION_KEYS | {"source.serviceAccount", "source.trustDomain", "connection.sni", "remote.ip"}
_CACHE: dict[int, tuple[AuthorizationPolicy, AuthorizationPolicy]] = {}


def _http_only(rule: Rule) -> bool:
    for f in rule.from_:
        if any(getattr(f.source, attr) for attr, _ in L7_SOURCE_FIELDS):
            return True
    for t in rule.to:
        if any(getattr(t.operation, attr) for attr, _ in L7_OPERATION_FIELDS):
            return True
    return any(c.key not in _TCP_KEYS for c in rule.when)


def _strip(rule: Rule) -> Rule:
    src_blank = {attr: () for attr, _ in L7_SOURCE_FIELDS}
    op_blank = {attr: () for attr, _ in L7_OPERATION_FIELDS}
    froms = tuple(RuleFrom(dataclasses.replace(f.source, **src_blank)) for f in rule.from_)
    tos = tuple(RuleTo(dataclasses.replace(t.operation, **op_blank)) for t in rule.to)
    whens: tuple[Condition, ...] = tuple(c for c in rule.when if c.key in _TCP_KEYS)
    return Rule(from_=froms, to=tos, when=whens)


def tcp_view(policy: AuthorizationPolicy) -> AuthorizationPolicy:
    """The policy as the waypoint enforces it on a TCP connection (module docstring)."""
    hit = _CACHE.get(id(policy))
    if hit is not None and hit[0] is policy:
        return hit[1]
    if policy.action is AuthorizationAction.ALLOW:
        rules = tuple(r for r in policy.rules if not _http_only(r))
    else:
        rules = tuple(_strip(r) if _http_only(r) else r for r in policy.rules)
    view = policy if rules == policy.rules else dataclasses.replace(policy, rules=rules)
    if len(_CACHE) > 4096:
        _CACHE.clear()
    _CACHE[id(policy)] = (policy, view)
    return view

