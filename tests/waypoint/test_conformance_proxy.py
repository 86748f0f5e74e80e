"""Istio's documented L7 authorization cases through the real waypoint proxy, on loopback.

The table is tests/authz/test_l7_conformance.py's (``CASES``: Istio's manifests, a request, what
Istio's waypoint decides), run there against the engine alone. Here each case's policies go
into the control plane's store and reach a real :class:`~waypoint.app.Waypoint` through the
discovery server; a client holding a certificate for the case's principal, at the case's source
address, sends the case's request (method, raw path, ``Host``, headers, a JWT for its claims)
through HBONE to the service's VIP, and the answer must be the table's: 200 from the backend
behind the endpoint's node proxy, or 403 ``RBAC: access denied`` — with the deciding policy,
the AUDIT and dry-run results read from the waypoint's own logs (tests/waypoint/loopback.py).

Non-default path normalization runs on a waypoint started with that mode. JWTs: one
RequestAuthentication bound to the waypoint trusts every issuer the cases name (with inline keys),
so every token is valid and authorization decides (an issuer nobody configured is a 401 before
authorization, in Istio as here).

Cases that cannot go through a waypoint are listed in :data:`NOT_THROUGH_THE_PROXY` with the
reason, and :func:`test_every_case_is_run_or_explained` keeps that list honest. (Not skip marks:
the suite refuses skips in CI.)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from mesh.identity import Identity
from mesh.l7authz import L7Decision, evaluate, select_policies
from mesh.model import PolicyTargetRef, RequestAuthentication
from mesh.model.policy import JwtRule
from tests.authz.test_l7_conformance import CASES, SERVICE, WAYPOINT, Case, policies
from tests.waypoint.loopback import NAMESPACE, TIMEOUT, Exchange, Harness, watching_logs
from tests.waypoint.test_jwt import RSA_KEY, jwks, token

in_module_loop = pytest.mark.asyncio(loop_scope="module")  # one harness, one event loop, per module

PLAINTEXT = (
    "no principal: the case's client speaks plaintext, and a waypoint only accepts HBONE (mTLS); "
    "test_plaintext_never_reaches_the_waypoint shows such a client gets no answer at all"
)
REMOTE_IP = (
    "remote_ip comes from X-Forwarded-For at an ingress gateway; the waypoint does not read "
    "X-Forwarded-For (its remote IP is the tunnel's peer, Istio's numTrustedProxies=0 default)"
)
NOT_THROUGH_THE_PROXY = {
    "reference: plaintext": PLAINTEXT,
    "deny notNamespaces: plaintext": PLAINTEXT,
    "allow-all": PLAINTEXT,
    "ingress: ipBlocks ignores XFF": REMOTE_IP,
    "ingress: remoteIpBlocks": REMOTE_IP,
    "ingress: remoteIpBlocks other": REMOTE_IP,
}
RUN = [c for c in CASES if c.id not in NOT_THROUGH_THE_PROXY]

ISSUERS = sorted({c.request.jwt["iss"] for c in CASES if c.request.jwt})
JWT = RequestAuthentication(
    namespace=NAMESPACE,
    name="jwt",
    target_refs=(PolicyTargetRef("Gateway", "waypoint", "gateway.networking.k8s.io"),),
    jwt_rules=tuple(JwtRule(issuer=iss, jwks=jwks((RSA_KEY, "k1"))) for iss in ISSUERS),
)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env() -> AsyncIterator[Harness]:
    if os.geteuid() != 0:
        pytest.skip("needs root: the cases run in a network namespace of their own (ip netns add)")
    async with Harness(c.request.source_ip for c in RUN) as h:
        yield h


def engine(case: Case) -> L7Decision:
    """What the engine decides for the case, as tests/authz/test_l7_conformance.py asks it."""
    selected = select_policies(policies(case.manifests), waypoint=WAYPOINT, service=SERVICE)
    return evaluate(selected.rbac, case.request.build())


async def through_the_waypoint(env: Harness, case: Case) -> Exchange:
    req = case.request
    assert req.principal is not None
    await env.apply([*policies(case.manifests), JWT])
    headers = [("host", req.host), *req.headers.items()]
    if req.jwt:
        headers.append(("authorization", f"Bearer {token(**req.jwt)}"))
    return await env.request(
        await env.waypoint(req.mode),
        identity=Identity.parse_principal(req.principal),
        source_ip=req.source_ip,
        port=req.port,
        method=req.method,
        target=req.path,
        headers=headers,
    )


@in_module_loop
@pytest.mark.parametrize("case", RUN, ids=[c.id for c in RUN])
async def test_istio_documented_behaviour_through_the_waypoint(env: Harness, case: Case) -> None:
    got = await through_the_waypoint(env, case)
    access = dict(got.access)
    assert (got.status, access.get("policy")) == (200 if case.allow else 403, case.policy), access
    decision = engine(case)
    assert access.get("rule") == decision.rule, access
    if case.allow:
        assert got.backend is not None, access
        assert (got.backend.method, got.backend.header("host")) == (case.request.method, case.request.host)
        assert env.node.tunnels[-1] == (env.waypoint_identity, f"{env.node.ip}:{case.request.port}")
    else:
        assert (got.body, access["flags"], got.backend) == (b"RBAC: access denied", "RBAC", None), access
        assert access["reason"] == decision.reason
    # AUDIT and dry-run policies never decide; the waypoint reports them as the engine does.
    assert access.get("audit") == (str(decision.audit[0]) if decision.audit else None), access
    dry = [e["result"] for e in got.logs.events("dry-run authorization")]
    assert dry == [str(d) for d in decision.dry_run]


@in_module_loop
@pytest.mark.parametrize(
    "case",
    [c for c in CASES if NOT_THROUGH_THE_PROXY.get(c.id) == PLAINTEXT],
    ids=lambda c: c.id,
)
async def test_plaintext_never_reaches_the_waypoint(env: Harness, case: Case) -> None:
    """A client without a certificate sending the case's request gets no HTTP answer: the
    waypoint's listener is HBONE only, so such a request is never authorized, whatever the
    policy (for "allow-all" Istio's engine would allow it; no plaintext client reaches a waypoint)."""
    await env.apply([*policies(case.manifests), JWT])
    wp = await env.waypoint()
    seen = len(env.backend.requests)
    req = case.request
    answer = b""
    with watching_logs() as logs:
        sock = await env.netns_socket()
        await asyncio.get_running_loop().sock_connect(sock, wp.bound["hbone"])
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            writer.write(f"{req.method} {req.path} HTTP/1.1\r\nhost: {req.host}\r\n\r\n".encode())
            async with asyncio.timeout(TIMEOUT):
                with contextlib.suppress(ConnectionError):
                    await writer.drain()
                    answer = await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
    assert not answer.startswith(b"HTTP/"), answer
    assert len(env.backend.requests) == seen
    assert not logs.events("request")


def test_every_case_is_run_or_explained() -> None:
    ids = [c.id for c in CASES]
    assert len(set(ids)) == len(ids)
    assert set(NOT_THROUGH_THE_PROXY) <= set(ids), set(NOT_THROUGH_THE_PROXY) - set(ids)
    for c in CASES:
        why = NOT_THROUGH_THE_PROXY.get(c.id)
        if why == PLAINTEXT:
            assert c.request.principal is None and c.request.remote_ip is None, c.id
        elif why == REMOTE_IP:
            assert c.request.remote_ip is not None, c.id
        else:
            assert why is None and c.request.principal is not None and c.request.remote_ip is None, c.id
    assert len(RUN) + len(NOT_THROUGH_THE_PROXY) == len(CASES)
