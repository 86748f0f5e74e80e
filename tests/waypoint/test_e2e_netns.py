"""Waypoints end to end in network namespaces: client -> ztunnel -> waypoint -> ztunnel -> server.

Two nodes, enrolled pods, a ztunnel per node and two waypoints (the namespace's, and a
per-service-account one for ``api``), all fed by the real discovery server from the control
plane's objects (tests/netns/mesh.py). HTTP/1.1, HTTP/2 and gRPC (a real grpcio client and
server in the pods) go through the waypoint; policies are Istio AuthorizationPolicies bound with
``targetRefs``. One mesh per module; every test leaves the objects as it found them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import re
import socket
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from controlplane.jwks import JwksCache
from mesh.hbone.client import ConnectRefused, open_connection
from mesh.identity import Identity
from mesh.model import (
    WAYPOINT_GATEWAY_CLASS,
    AuthorizationAction,
    AuthorizationPolicy,
    Gateway,
    MeshObject,
    Namespace,
    Operation,
    PolicyTargetRef,
    RequestAuthentication,
    Rule,
    RuleFrom,
    RuleTo,
    Service,
    ServicePort,
    Source,
    WaypointRef,
    WorkloadSelector,
)
from mesh.model.policy import JwtHeader, JwtRule
from mesh.tls import client_context
from mesh.xds.state import ProxySnapshot, ProxyState
from tests.controlplane.test_jwks import Jwks
from tests.netns.mesh import TRUST_DOMAIN, Mesh
from tests.netns.topology import Pod, Topology
from tests.waypoint.conftest import H1Backend, H1Client, H2Backend, H2Client
from waypoint.app import Waypoint
from waypoint.bytestream import TcpByteStream

pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

GATEWAY_LABEL = "gateway.networking.k8s.io/gateway-name"
WEB_VIP, GRPC_VIP, API_VIP = "10.96.0.20", "10.96.0.21", "10.96.0.22"
TIMEOUT = 30.0
GRPC_PEER = str(Path(__file__).with_name("grpc_peer.py"))


def principal(sa: str) -> str:
    return f"{TRUST_DOMAIN}/ns/shop/sa/{sa}"


def uri(sa: str) -> str:
    return f"spiffe://{principal(sa)}"


class Pods:
    def __init__(self, topo: Topology) -> None:
        n1, n2 = topo.add_node(), topo.add_node()
        topo.connect_nodes()
        self.frontend = topo.add_pod(n1, "frontend", "shop", "frontend", {"app": "frontend"})
        self.cart = topo.add_pod(n1, "cart", "shop", "cart", {"app": "cart"})
        self.web = topo.add_pod(n2, "web", "shop", "web", {"app": "web"})
        self.api = topo.add_pod(n2, "api", "shop", "api", {"app": "api"})
        # Waypoints are not captured by ztunnel (istio.io/dataplane-mode: none): they speak HBONE.
        self.waypoint = topo.add_pod(
            n2, "waypoint-0", "shop", "waypoint", {GATEWAY_LABEL: "waypoint"}, enrolled=False
        )
        self.wp_api = topo.add_pod(
            n2, "wp-api-0", "shop", "wp-api", {GATEWAY_LABEL: "wp-api"}, enrolled=False
        )
        # Not captured, holding a stolen frontend certificate: tunnels wherever it likes.
        self.intruder = topo.add_pod(n1, "intruder", "shop", "frontend", enrolled=False)


def service(
    name: str, vip: str, ports: tuple[ServicePort, ...], selector: dict[str, str], waypoint: bool
) -> Service:
    return Service(
        "shop",
        name,
        vips=(vip,),
        ports=ports,
        selector=selector,
        waypoint=WaypointRef("waypoint", "shop") if waypoint else None,
    )


def targeting(
    name: str, kind: str, target: str, action: AuthorizationAction, *rules: Rule
) -> AuthorizationPolicy:
    group = "gateway.networking.k8s.io" if kind == "Gateway" else ""
    return AuthorizationPolicy(
        namespace="shop",
        name=name,
        target_refs=(PolicyTargetRef(kind, target, group),),
        action=action,
        rules=rules,
    )


DENY, ALLOW = AuthorizationAction.DENY, AuthorizationAction.ALLOW
BASE: list[MeshObject] = [
    Gateway("shop", "waypoint", WAYPOINT_GATEWAY_CLASS),
    Gateway(
        "shop", "wp-api", WAYPOINT_GATEWAY_CLASS, annotations={"ambient-mesh.io/for-service-account": "api"}
    ),
    service(
        "waypoint", "10.96.0.98", (ServicePort(15008, 15008, "mesh"),), {GATEWAY_LABEL: "waypoint"}, False
    ),
    service("wp-api", "10.96.0.99", (ServicePort(15008, 15008, "mesh"),), {GATEWAY_LABEL: "wp-api"}, False),
    service(
        "web", WEB_VIP, (ServicePort(80, 8080, "http"), ServicePort(81, 8081, "http2")), {"app": "web"}, True
    ),
    service("shop-grpc", GRPC_VIP, (ServicePort(9090, 9090, "grpc"),), {"app": "web"}, True),
    service("api", API_VIP, (ServicePort(80, 8080, "http"),), {"app": "api"}, False),
    # The demo's policy: POST /admin denied on web, whatever its port or protocol.
    targeting(
        "web-no-admin",
        "Service",
        "web",
        DENY,
        Rule(to=(RuleTo(Operation(methods=("POST",), paths=("/admin",))),)),
    ),
    targeting(
        "grpc-no-admin",
        "Service",
        "shop-grpc",
        DENY,
        Rule(to=(RuleTo(Operation(paths=("/demo.Shop/Admin",))),)),
    ),
    targeting("api-no-secret", "Gateway", "wp-api", DENY, Rule(to=(RuleTo(Operation(paths=("/secret",))),))),
]


@dataclasses.dataclass
class Env:
    mesh: Mesh
    pods: Pods
    waypoint: Waypoint
    wp_api: Waypoint
    web_h1: H1Backend
    web_h2: H2Backend
    api_h1: H1Backend

    async def apply(self, *extra: MeshObject, without: tuple[str, ...] = ()) -> None:
        """The base objects (but the waypoints named in ``without``: their Gateway and Service,
        as deleting a Gateway deletes what its controller made) plus ``extra``, pushed through
        discovery to every proxy."""
        base = [o for o in BASE if not (isinstance(o, Gateway | Service) and o.key in without)]
        self.mesh.extra = [*base, *extra]
        self.mesh.publish()
        await self.mesh.converged(TIMEOUT)


@pytest.fixture(scope="module")
def topo() -> Iterator[tuple[Topology, Pods]]:
    with Topology() as t:
        yield t, Pods(t)


@pytest.fixture(scope="module")
def jwks_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Jwks]:
    """An HTTPS JWKS endpoint on the host's loopback, where the control plane fetches keys."""
    server = Jwks(tmp_path_factory.mktemp("jwks"))
    try:
        yield server
    finally:
        server.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(topo: tuple[Topology, Pods], jwks_server: Jwks) -> AsyncIterator[Env]:
    t, p = topo
    m = Mesh(t, cert_ttl=dt.timedelta(hours=1))
    m.discovery.jwks = JwksCache(m.store, refresh=0.2, ssl_context=jwks_server.trust())
    m.extra = list(BASE)
    web_h1, web_h2, api_h1 = H1Backend(), H2Backend(), H1Backend()
    try:
        await m.start()
        await web_h1.start(await m.factory(p.web).tcp_listener("0.0.0.0", 8080))
        await web_h2.start(await m.factory(p.web).tcp_listener("0.0.0.0", 8081))
        await api_h1.start(await m.factory(p.api).tcp_listener("0.0.0.0", 8080))
        wp = await m.start_waypoint(p.waypoint, "waypoint")
        wp_api = await m.start_waypoint(p.wp_api, "wp-api")
        await m.converged(TIMEOUT)
        yield Env(m, p, wp, wp_api, web_h1, web_h2, api_h1)
    finally:
        for b in (web_h1, web_h2, api_h1):
            if b.listener.server is not None:
                await b.close()
        await m.aclose()


async def h1(env: Env, src: Pod, vip: str, port: int = 80) -> H1Client:
    r, w = await env.mesh.connect(src, vip, port)
    return H1Client(TcpByteStream(r, w))


def metric(wp: Waypoint, name: str, **labels: str) -> float:
    total = 0.0
    for fam in wp.metrics.registry.collect():
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


async def tunnel_status(env: Env, to: Pod, sa: str, authority: str, as_sa: str = "frontend") -> int:
    """Open HBONE from the intruder (``as_sa``'s stolen certificate) to ``to``; the CONNECT's status."""
    cred = env.mesh.ca.issue(Identity(TRUST_DOMAIN, "shop", as_sa))
    sock = await env.mesh.factory(env.pods.intruder).tcp_socket(socket.AF_INET)
    conn = await open_connection(
        to.ip,
        15008,
        client_context(cred),
        TRUST_DOMAIN,
        Identity(TRUST_DOMAIN, "shop", sa),
        sock=sock,
        timeout=TIMEOUT,
    )
    try:
        await conn.open_stream(authority)
        return 200
    except ConnectRefused as e:
        return e.status
    finally:
        conn.close()


async def grpc_call(env: Env, src: Pod, rpc: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", src.netns, sys.executable, GRPC_PEER, "call", f"{GRPC_VIP}:9090", rpc,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    assert proc.returncode == 0, err.decode()
    return out.decode().strip()


# --- HTTP/1.1, HTTP/2 and gRPC through the namespace waypoint ----------------------------------------


async def test_http1_post_admin_denied_while_get_order_passes(env: Env) -> None:
    p = env.pods
    before = metric(
        env.waypoint, "istio_requests_total", response_code="403", source_principal=uri("frontend")
    )
    c = await h1(env, p.frontend, WEB_VIP)
    try:
        resp, body = await c.request("GET", "/order")
        assert (resp.status_code, body) == (200, b"GET /order 0")
        resp, body = await c.request("POST", "/admin", body=b"{}")
        assert (resp.status_code, body) == (403, b"RBAC: access denied")
        # Normalization: a dot segment does not get around the policy (BASE, the default).
        resp, body = await c.request("POST", "/order/../admin", body=b"{}")
        assert (resp.status_code, body) == (403, b"RBAC: access denied")
        # The connection stays usable after a deny; another path of the same method passes.
        resp, body = await c.request("POST", "/order", body=b"{}")
        assert (resp.status_code, body) == (200, b"POST /order 2")
    finally:
        await c.close()
    assert [r.target for r in env.web_h1.requests if r.method == "POST"] == ["/order"]
    # The app sees the original client's address: its ztunnel believes the waypoint's forwarded.
    assert set(env.web_h1.listener.peers) == {p.frontend.ip}
    after = metric(
        env.waypoint, "istio_requests_total", response_code="403", source_principal=uri("frontend")
    )
    assert after - before == 2
    # Labelled with the endpoint each request went to.
    assert (
        metric(
            env.waypoint, "istio_requests_total", destination_workload="web", destination_principal=uri("web")
        )
        >= 2
    )
    assert (
        metric(
            env.waypoint,
            "istio_requests_total",
            response_code="200",
            destination_service="web.shop.svc.cluster.local",
        )
        >= 2
    )


async def test_http2_through_the_waypoint(env: Env) -> None:
    r, w = await env.mesh.connect(env.pods.frontend, WEB_VIP, 81)
    c = H2Client(TcpByteStream(r, w))
    try:
        ok = await c.request("GET", "/order")
        assert ok.headers[":status"] == "200" and ok.body == b"GET /order 0"
        denied = await c.request("POST", "/admin", body=b"x")
        assert denied.headers[":status"] == "403" and denied.body == b"RBAC: access denied"
    finally:
        await c.close()


async def test_grpc_through_the_waypoint(env: Env) -> None:
    server = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", env.pods.web.netns, sys.executable, GRPC_PEER, "serve", "9090",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        assert await asyncio.wait_for(server.stdout.readline(), TIMEOUT) == b"ready\n"
        assert await grpc_call(env, env.pods.frontend, "Order") == "OK order:x"
        assert await grpc_call(env, env.pods.frontend, "Admin") == "PERMISSION_DENIED RBAC: access denied"
    finally:
        server.kill()
        await server.wait()
    assert (
        metric(env.waypoint, "istio_requests_total", request_protocol="grpc", grpc_response_status="7") >= 1
    )


async def test_by_default_the_destinations_l4_policy_sees_the_waypoint(env: Env) -> None:
    """As in Istio: the destination ztunnel authorizes the waypoint's identity, not the client's."""
    only_frontend = AuthorizationPolicy(
        namespace="shop",
        name="web-l4",
        selector=WorkloadSelector({"app": "web"}),
        rules=(Rule(from_=(RuleFrom(Source(principals=(principal("frontend"),))),)),),
    )
    try:
        await env.apply(only_frontend)
        c = await h1(env, env.pods.frontend, WEB_VIP)
        try:
            resp, _ = await c.request("GET", "/order")
            assert resp.status_code == 503  # web's ztunnel refused the waypoint (401)
        finally:
            await c.close()
        with_waypoint = dataclasses.replace(
            only_frontend,
            rules=(
                Rule(from_=(RuleFrom(Source(principals=(principal("frontend"), principal("waypoint")))),)),
            ),
        )
        await env.apply(with_waypoint)
        c = await h1(env, env.pods.frontend, WEB_VIP)
        try:
            resp, _ = await c.request("GET", "/order")
            assert resp.status_code == 200
        finally:
            await c.close()
    finally:
        await env.apply()


# --- per service account ------------------------------------------------------------------------


async def test_a_per_account_waypoint_serves_only_its_account(env: Env) -> None:
    p = env.pods
    ns_before = metric(env.waypoint, "istio_requests_total", destination_service="api.shop.svc.cluster.local")
    c = await h1(env, p.frontend, API_VIP)
    try:
        resp, body = await c.request("GET", "/hello")
        assert (resp.status_code, body) == (200, b"GET /hello 0")
        resp, body = await c.request("GET", "/secret")
        assert (resp.status_code, body) == (403, b"RBAC: access denied")
    finally:
        await c.close()
    # api's traffic went through api's waypoint, never the namespace's.
    assert metric(env.wp_api, "istio_requests_total", destination_service="api.shop.svc.cluster.local") == 2
    assert (
        metric(env.waypoint, "istio_requests_total", destination_service="api.shop.svc.cluster.local")
        == ns_before
    )
    # web's traffic never reaches api's waypoint, even when a client tunnels there on purpose.
    assert metric(env.wp_api, "istio_requests_total", destination_service="web.shop.svc.cluster.local") == 0
    assert await tunnel_status(env, p.wp_api, "wp-api", f"{WEB_VIP}:80") == 400
    # Each waypoint holds exactly one certificate: its own account's.
    for wp, sa in ((env.waypoint, "waypoint"), (env.wp_api, "wp-api")):
        assert [c["identity"] for c in wp.certs.dump()] == [uri(sa)]


# --- strict waypoint mode --------------------------------------------------------------------------


async def test_strict_mode_only_the_waypoint_and_the_original_identity(env: Env) -> None:
    p = env.pods
    strict = Namespace(
        "shop",
        annotations={"ambient-mesh.io/waypoint-mode": "strict"},
        waypoint=WaypointRef("waypoint", "shop"),
    )
    only_frontend = AuthorizationPolicy(
        namespace="shop",
        name="web-l4",
        selector=WorkloadSelector({"app": "web"}),
        rules=(Rule(from_=(RuleFrom(Source(principals=(principal("frontend"),))),)),),
    )
    try:
        await env.apply(strict, only_frontend)
        # Through the waypoint, web's L4 ALLOW for frontend keeps working: it sees frontend.
        c = await h1(env, p.frontend, WEB_VIP)
        try:
            resp, _ = await c.request("GET", "/order")
            assert resp.status_code == 200
        finally:
            await c.close()
        # ... and cart, through the same waypoint, is still not frontend.
        c = await h1(env, p.cart, WEB_VIP)
        try:
            resp, _ = await c.request("GET", "/order")
            assert resp.status_code == 503
        finally:
            await c.close()
        # A client that skips the waypoint (its own HBONE straight to web) is refused ...
        assert await tunnel_status(env, p.web, "web", f"{p.web.ip}:8080", as_sa="cart") == 401
        # ... except a peer the destination's ALLOW policy names itself: frontend may come direct.
        assert await tunnel_status(env, p.web, "web", f"{p.web.ip}:8080") == 200
        # A missing waypoint fails closed: nothing reaches web.
        await env.apply(strict, only_frontend, without=("shop/waypoint",))
        served = len(env.web_h1.requests)
        r, w = await env.mesh.connect(p.frontend, WEB_VIP, 80)
        try:
            w.write(b"GET /order HTTP/1.1\r\nhost: web\r\nconnection: close\r\n\r\n")
            await w.drain()
            got = await asyncio.wait_for(r.read(), TIMEOUT)
        except ConnectionError:
            got = b""
        finally:
            w.close()
        assert not re.match(rb"HTTP/1\.1 200", got), got[:100]
        assert len(env.web_h1.requests) == served
    finally:
        await env.apply()


# --- RequestAuthentication (JWT) ------------------------------------------------------------------


async def test_jwt_through_the_waypoint(env: Env) -> None:
    from tests.waypoint.test_jwt import ISS, RULE, token

    authn = RequestAuthentication(
        namespace="shop", name="jwt", target_refs=(PolicyTargetRef("Service", "web"),), jwt_rules=(RULE,)
    )
    need_user = targeting(
        "me-needs-a-user",
        "Service",
        "web",
        DENY,
        Rule(
            from_=(RuleFrom(Source(not_request_principals=("*",))),),
            to=(RuleTo(Operation(paths=("/me",))),),
        ),
    )
    only_alice = targeting(
        "me-is-alice",
        "Service",
        "web",
        DENY,
        Rule(
            from_=(RuleFrom(Source(not_request_principals=(f"{ISS}/alice",))),),
            to=(RuleTo(Operation(paths=("/me",))),),
        ),
    )
    try:
        await env.apply(authn, need_user, only_alice)
        c = await h1(env, env.pods.frontend, WEB_VIP)
        try:
            resp, body = await c.request("GET", "/me")
            assert (resp.status_code, body) == (403, b"RBAC: access denied")  # no token: no principal
            before = len(env.web_h1.requests)
            resp, body = await c.request("GET", "/me", headers=[("authorization", f"Bearer {token()}")])
            assert (resp.status_code, body) == (200, b"GET /me 0")
            # ... and the token is not forwarded to the app.
            assert all(k != "authorization" for k, _ in env.web_h1.requests[before].headers)
            resp, body = await c.request("GET", f"/me?access_token={token()}")
            assert (resp.status_code, body) == (200, b"GET /me 0")
            assert env.web_h1.requests[-1].target == "/me"
            resp, _ = await c.request("GET", "/me", headers=[("authorization", f"Bearer {token(sub='bob')}")])
            assert resp.status_code == 403  # a valid token, but not alice
            resp, body = await c.request(
                "GET", "/order", headers=[("authorization", f"Bearer {token(exp=1)}")]
            )
            assert (resp.status_code, body) == (401, b"Jwt verification fails")
            resp, _ = await c.request("GET", "/order")
            assert resp.status_code == 200  # no token, no rule needing one
        finally:
            await c.close()
    finally:
        await env.apply()


async def state_until(state: ProxyState, predicate: Callable[[ProxySnapshot], bool]) -> None:
    """Wait until a proxy's state satisfies ``predicate`` (its next changes are watched)."""
    changed = asyncio.Event()
    unsubscribe = state.subscribe(lambda _v: changed.set())
    try:
        async with asyncio.timeout(TIMEOUT):
            while not predicate(state.snapshot()):
                await changed.wait()
                changed.clear()
    finally:
        unsubscribe()


async def test_jwt_keys_from_an_https_jwks_server_through_the_waypoint(env: Env, jwks_server: Jwks) -> None:
    """jwksUri: the control plane fetches the keys over HTTPS, the waypoint gets them through
    discovery; every kind of token gets its status through the real waypoint, and a key rotated
    in at the server is honoured once fetched."""
    import jwt as pyjwt

    from tests.waypoint.test_jwt import EC_KEY, ISS, OTHER_KEY, RSA_KEY, jwks, token

    jwks_server.doc = jwks((RSA_KEY, "k1"), (EC_KEY, "k2"))
    rule = JwtRule(
        issuer=ISS,
        audiences=("shop",),
        jwks_uri=jwks_server.uri,
        from_headers=(JwtHeader("authorization", "Bearer "), JwtHeader("x-jwt")),
        from_params=("access_token",),
    )
    authn = RequestAuthentication(
        namespace="shop",
        name="jwt-https",
        target_refs=(PolicyTargetRef("Service", "web"),),
        jwt_rules=(rule,),
    )
    need_user = targeting(
        "me-needs-a-user", "Service", "web", DENY,
        Rule(from_=(RuleFrom(Source(not_request_principals=("*",))),), to=(RuleTo(Operation(paths=("/me",))),)),
    )  # fmt: skip

    def has_keys(doc: str) -> Callable[[ProxySnapshot], bool]:
        def check(s: ProxySnapshot) -> bool:
            a = s.waypoint_authentications.get("shop/jwt-https")
            return a is not None and a.jwks_by_uri.get(jwks_server.uri) == doc

        return check

    c: H1Client | None = None
    try:
        await env.apply(authn, need_user)
        await state_until(env.waypoint.state, has_keys(jwks_server.doc))
        c = await h1(env, env.pods.frontend, WEB_VIP)

        async def status(path: str = "/me", **headers: str) -> int:
            assert c is not None
            resp, _ = await c.request(
                "GET", path, headers=[(k.replace("_", "-"), v) for k, v in headers.items()]
            )
            return int(resp.status_code)

        good = token()
        tampered = good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB")
        assert await status() == 403  # no token: no principal
        assert await status(authorization=f"Bearer {good}") == 200
        assert await status(authorization=f"Bearer {token(EC_KEY, 'k2', 'ES256')}") == 200
        assert await status(x_jwt=good) == 200  # a custom header
        assert await status(f"/me?access_token={good}") == 200  # a query parameter
        for bad in (
            token(exp=1),  # expired
            token(iss="https://elsewhere"),  # an issuer no rule names
            token(aud="other"),  # wrong audience
            tampered,
            pyjwt.encode({"iss": ISS, "sub": "mallory", "aud": "shop"}, None, algorithm="none"),
            token(OTHER_KEY, "k9"),  # a kid the keys do not have (yet)
        ):
            assert await status(authorization=f"Bearer {bad}") == 401, bad
        # Rotation at the issuer: once the control plane has fetched it, the new key works.
        jwks_server.doc = jwks((RSA_KEY, "k1"), (OTHER_KEY, "k9"))
        await state_until(env.waypoint.state, has_keys(jwks_server.doc))
        assert await status(authorization=f"Bearer {token(OTHER_KEY, 'k9')}") == 200
        assert await status(authorization=f"Bearer {token(EC_KEY, 'k2', 'ES256')}") == 401  # rotated out
    finally:
        if c is not None:
            await c.close()
        await env.apply()
