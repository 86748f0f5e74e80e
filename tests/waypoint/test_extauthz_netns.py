"""CUSTOM authorization (ext_authz) end to end in network namespaces.

client pod -> ztunnel -> waypoint -> (external authorizer) -> ztunnel -> server. The authorizer
is a real process in pods of its own (``authz_peer.py``: a grpcio server of Envoy's
``Authorization/Check`` and an HTTP authorizer), one enrolled in the mesh (the waypoint reaches it
through HBONE) and one outside it (plain TCP). Providers come from a MeshConfig object and
policies from AuthorizationPolicies in the control plane's store, carried to the waypoint by the
real discovery server; one mesh per module, every test leaves the objects as it found them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import re
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from mesh.model import (
    WAYPOINT_GATEWAY_CLASS,
    AuthorizationAction,
    AuthorizationPolicy,
    Gateway,
    MeshObject,
    Operation,
    PolicyTargetRef,
    Rule,
    RuleTo,
    Service,
    ServicePort,
    WaypointRef,
)
from mesh.model.meshconfig import (
    ExtAuthzGrpc,
    ExtAuthzHttp,
    ExtAuthzRequestBody,
    ExtensionProvider,
    MeshConfig,
)
from sources.local import parse_manifest
from tests.netns.mesh import TRUST_DOMAIN, Mesh
from tests.netns.topology import Pod, Topology
from tests.waypoint.authz_peer import DENIED_BODY
from tests.waypoint.conftest import H1Backend, H1Client
from waypoint.bytestream import TcpByteStream

pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

GATEWAY_LABEL = "gateway.networking.k8s.io/gateway-name"
WEB_VIP, AUTHZ_VIP, PLAIN_VIP = "10.96.0.30", "10.96.0.31", "10.96.0.32"
TIMEOUT = 30.0
AUTHZ_PEER = str(Path(__file__).with_name("authz_peer.py"))
AUTHZ = "ext-authz.shop.svc.cluster.local"
CUSTOM, DENY, ALLOW = AuthorizationAction.CUSTOM, AuthorizationAction.DENY, AuthorizationAction.ALLOW


class Pods:
    def __init__(self, topo: Topology) -> None:
        n1, n2 = topo.add_node(), topo.add_node()
        topo.connect_nodes()
        self.frontend = topo.add_pod(n1, "frontend", "shop", "frontend", {"app": "frontend"})
        self.authz = topo.add_pod(n1, "ext-authz", "shop", "ext-authz", {"app": "ext-authz"})
        self.web = topo.add_pod(n2, "web", "shop", "web", {"app": "web"})
        self.waypoint = topo.add_pod(
            n2, "waypoint-0", "shop", "waypoint", {GATEWAY_LABEL: "waypoint"}, enrolled=False
        )
        self.plain = topo.add_pod(
            n2, "ext-authz-plain", "shop", "plain", {"app": "ext-authz-plain"}, enrolled=False
        )


def svc(
    name: str, vip: str, ports: tuple[ServicePort, ...], selector: dict[str, str], waypoint: bool = False
) -> Service:
    return Service(
        "shop", name, vips=(vip,), ports=ports, selector=selector,
        waypoint=WaypointRef("waypoint", "shop") if waypoint else None,
    )  # fmt: skip


MESH_CONFIG = MeshConfig(
    "istio-system",
    "istio",
    (
        ExtensionProvider("grpc", ExtAuthzGrpc(AUTHZ, 9000, timeout=1.0), "envoyExtAuthzGrpc"),
        ExtensionProvider(
            "grpc-open", ExtAuthzGrpc(AUTHZ, 9000, timeout=1.0, fail_open=True), "envoyExtAuthzGrpc"
        ),
        ExtensionProvider(
            "http",
            ExtAuthzHttp(
                f"shop/{AUTHZ}",
                8000,
                timeout=5.0,
                path_prefix="/check",
                include_request_headers=("x-ext-authz",),
                headers_to_upstream_on_allow=("x-ext-authz-check-result", "x-ext-authz-seen-*"),
                headers_to_downstream_on_deny=("x-ext-authz-check-result",),
            ),
            "envoyExtAuthzHttp",
        ),
        ExtensionProvider(
            "http-plain",
            ExtAuthzHttp(
                "ext-authz-plain.shop.svc.cluster.local",
                8000,
                timeout=5.0,
                include_request_headers=("x-ext-authz",),
                headers_to_upstream_on_allow=("x-ext-authz-check-result",),
            ),
            "envoyExtAuthzHttp",
        ),
        ExtensionProvider(
            "http-hasty",
            ExtAuthzHttp(
                AUTHZ, 8000, timeout=1.0, include_request_headers=("x-ext-authz",), status_on_error=504
            ),
            "envoyExtAuthzHttp",
        ),
        ExtensionProvider(
            "grpc-body",
            ExtAuthzGrpc(
                AUTHZ, 9000, timeout=5.0, include_request_body=ExtAuthzRequestBody(16, False, False)
            ),
            "envoyExtAuthzGrpc",
        ),
        ExtensionProvider(
            "grpc-body-partial",
            ExtAuthzGrpc(AUTHZ, 9000, timeout=5.0, include_request_body=ExtAuthzRequestBody(16, True, True)),
            "envoyExtAuthzGrpc",
        ),
        # Nothing listens on 7000: the authorizer is "down".
        ExtensionProvider(
            "down", ExtAuthzGrpc(AUTHZ, 7000, timeout=5.0, status_on_error=503), "envoyExtAuthzGrpc"
        ),
        ExtensionProvider(
            "down-open", ExtAuthzGrpc(AUTHZ, 7000, timeout=5.0, fail_open=True), "envoyExtAuthzGrpc"
        ),
    ),
)
BASE: list[MeshObject] = [
    Gateway("shop", "waypoint", WAYPOINT_GATEWAY_CLASS),
    svc("waypoint", "10.96.0.98", (ServicePort(15008, 15008, "mesh"),), {GATEWAY_LABEL: "waypoint"}),
    svc("web", WEB_VIP, (ServicePort(80, 8080, "http"),), {"app": "web"}, waypoint=True),
    svc(
        "ext-authz",
        AUTHZ_VIP,
        (
            ServicePort(9000, 9000, "grpc"),
            ServicePort(8000, 8000, "http"),
            ServicePort(7000, 7000, "grpc-down"),
        ),
        {"app": "ext-authz"},
    ),
    svc("ext-authz-plain", PLAIN_VIP, (ServicePort(8000, 8000, "http"),), {"app": "ext-authz-plain"}),
    MESH_CONFIG,
]


def custom(provider: str, *paths: str, name: str = "ext") -> AuthorizationPolicy:
    return AuthorizationPolicy(
        namespace="shop",
        name=name,
        target_refs=(PolicyTargetRef("Service", "web"),),
        action=CUSTOM,
        provider=provider,
        rules=(Rule(to=(RuleTo(Operation(paths=paths)),)),),
    )


class Env:
    def __init__(self, mesh: Mesh, pods: Pods, web: H1Backend) -> None:
        self.mesh, self.pods, self.web = mesh, pods, web

    async def apply(self, *extra: MeshObject, mesh_config: MeshConfig = MESH_CONFIG) -> None:
        self.mesh.extra = [*(o for o in BASE if o is not MESH_CONFIG), mesh_config, *extra]
        self.mesh.publish()
        await self.mesh.converged(TIMEOUT)

    async def get(
        self, path: str, *headers: tuple[str, str], method: str = "GET", body: bytes = b""
    ) -> tuple[int, dict[str, list[str]], bytes]:
        r, w = await self.mesh.connect(self.pods.frontend, WEB_VIP, 80)
        c = H1Client(TcpByteStream(r, w))
        try:
            resp, data = await asyncio.wait_for(
                c.request(method, path, headers=list(headers), body=body), TIMEOUT
            )
        finally:
            await c.close()
        out: dict[str, list[str]] = {}
        for k, v in resp.headers:
            out.setdefault(k.decode(), []).append(v.decode())
        return resp.status_code, out, data


@pytest.fixture(scope="module")
def topo() -> Iterator[tuple[Topology, Pods]]:
    with Topology() as t:
        yield t, Pods(t)


@contextlib.asynccontextmanager
async def authorizer(pod: Pod) -> AsyncIterator[None]:
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", pod.netns, sys.executable, AUTHZ_PEER, "9000", "8000",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), TIMEOUT)
        assert line.strip() == b"ready", (line, await proc.stderr.read() if proc.stderr else b"")
        yield
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(topo: tuple[Topology, Pods]) -> AsyncIterator[Env]:
    t, p = topo
    m = Mesh(t, cert_ttl=dt.timedelta(hours=1))
    m.extra = list(BASE)
    web = H1Backend()
    try:
        async with authorizer(p.authz), authorizer(p.plain):
            await m.start()
            await web.start(await m.factory(p.web).tcp_listener("0.0.0.0", 8080))
            await m.start_waypoint(p.waypoint, "waypoint")
            await m.converged(TIMEOUT)
            yield Env(m, p, web)
    finally:
        if web.listener.server is not None:
            await web.close()
        await m.aclose()


def uri(sa: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/ns/shop/sa/{sa}"


async def test_grpc_authorizer_allows_denies_and_changes_headers(env: Env) -> None:
    try:
        await env.apply(custom("grpc", "/ext/*"))
        status, headers, body = await env.get(
            "/ext/a", ("x-ext-authz", "allow"), ("x-remove-me", "1"), ("x-ext-authz-check-result", "forged")
        )
        assert (status, body) == (200, b"GET /ext/a 0")
        seen = env.web.requests[-1]
        assert [v for k, v in seen.headers if k == "x-ext-authz-check-result"] == ["allowed"]  # replaced
        assert seen.header("x-remove-me") is None
        # What the authorizer was told (Envoy's AttributeContext): the original client's identity,
        # the original destination, the request.
        assert seen.header("x-ext-authz-seen-source") == uri("frontend")
        assert seen.header("x-ext-authz-seen-destination") == f"{WEB_VIP}:80 web.shop.svc.cluster.local"
        assert seen.header("x-ext-authz-seen-request") == "GET /ext/a svc.test:80 HTTP/1.1"
        assert headers["x-ext-authz-response"] == ["grpc"]  # response_headers_to_add

        before = len(env.web.requests)
        status, headers, body = await env.get("/ext/a", ("x-ext-authz", "nope"))
        assert (status, body) == (403, DENIED_BODY.encode())
        assert headers["x-ext-authz-check-result"] == ["denied"]
        assert len(env.web.requests) == before

        status, _, body = await env.get("/public")  # matches no CUSTOM rule: not asked
        assert (status, body) == (200, b"GET /public 0")
    finally:
        await env.apply()


async def test_timeout_fails_closed_unless_fail_open(env: Env) -> None:
    try:
        await env.apply(custom("grpc", "/slow"))
        status, _, body = await env.get("/slow", ("x-ext-authz", "slow"))
        assert (status, body) == (403, b"")  # statusOnError, after the provider's 1 s timeout
        await env.apply(custom("grpc-open", "/slow"))
        status, _, body = await env.get("/slow", ("x-ext-authz", "slow"))
        assert (status, body) == (200, b"GET /slow 0")
        await env.apply(custom("http-hasty", "/slow"))
        status, _, _ = await env.get("/slow", ("x-ext-authz", "slow"))
        assert status == 504  # the HTTP authorizer too, with its statusOnError
    finally:
        await env.apply()


async def test_http_authorizer(env: Env) -> None:
    try:
        await env.apply(custom("http", "/ext/*"))
        status, _, body = await env.get("/ext/b?q=1", ("x-ext-authz", "allow"), ("x-other", "secret"))
        assert (status, body) == (200, b"GET /ext/b?q=1 0")
        seen = env.web.requests[-1]
        assert seen.header("x-ext-authz-check-result") == "allowed"
        # The request as the authorizer got it: pathPrefix + path, the original Host, only the
        # headers includeRequestHeadersInCheck names (and Host, Content-Length; Connection: close).
        assert seen.header("x-ext-authz-seen-request") == "GET /check/ext/b?q=1 svc.test:80"
        assert seen.header("x-ext-authz-seen-headers") == "connection,content-length,host,x-ext-authz"
        assert seen.header("x-not-for-upstream") is None  # not in headersToUpstreamOnAllow

        status, headers, body = await env.get("/ext/b", ("x-ext-authz", "deny"))
        assert (status, body) == (403, DENIED_BODY.encode())
        assert headers["x-ext-authz-check-result"] == ["denied"]
        assert "x-internal-detail" not in headers  # not in headersToDownstreamOnDeny
    finally:
        await env.apply()


async def test_http_authorizer_outside_the_mesh(env: Env) -> None:
    try:
        await env.apply(custom("http-plain", "/ext/*"))
        status, _, _ = await env.get("/ext/c", ("x-ext-authz", "allow"))
        assert status == 200
        assert env.web.requests[-1].header("x-ext-authz-check-result") == "allowed"
        status, _, body = await env.get("/ext/c")
        assert (status, body) == (403, DENIED_BODY.encode())
    finally:
        await env.apply()


async def test_authorizer_down(env: Env) -> None:
    try:
        await env.apply(custom("down", "/ext/*"))
        status, _, _ = await env.get("/ext/d", ("x-ext-authz", "allow"))
        assert status == 503  # statusOnError
        await env.apply(custom("down-open", "/ext/*"))
        status, _, _ = await env.get("/ext/d")
        assert status == 200  # failOpen
        await env.apply(custom("no-such-provider", "/ext/*"))
        status, _, body = await env.get("/ext/d", ("x-ext-authz", "allow"))
        assert (status, body) == (403, b"RBAC: access denied")  # a CUSTOM policy never fails open
    finally:
        await env.apply()


async def test_custom_comes_before_deny_and_allow(env: Env) -> None:
    deny_secret = AuthorizationPolicy(
        namespace="shop", name="no-secret", target_refs=(PolicyTargetRef("Service", "web"),), action=DENY,
        rules=(Rule(to=(RuleTo(Operation(paths=("/ext/secret",))),)),),
    )  # fmt: skip
    allow_all = AuthorizationPolicy(
        namespace="shop",
        name="all",
        target_refs=(PolicyTargetRef("Service", "web"),),
        action=ALLOW,
        rules=(Rule(),),
    )
    try:
        await env.apply(custom("grpc", "/ext/*"), deny_secret, allow_all)
        status, _, body = await env.get("/ext/secret", ("x-ext-authz", "allow"))
        assert (status, body) == (403, b"RBAC: access denied")  # allowed by CUSTOM, denied by DENY
        status, _, body = await env.get("/ext/open", ("x-ext-authz", "no"))
        assert (status, body) == (403, DENIED_BODY.encode())  # ALLOW does not override CUSTOM's denial
        status, _, _ = await env.get("/ext/open", ("x-ext-authz", "allow"))
        assert status == 200
    finally:
        await env.apply()


def documented() -> tuple[MeshConfig, AuthorizationPolicy]:
    """docs/adding-a-waypoint.md's mesh ConfigMap and CUSTOM policy, loaded as local mode loads them."""
    doc = Path(__file__).resolve().parents[2] / "docs" / "adding-a-waypoint.md"
    objs = [o for b in re.findall(r"```yaml\n(.*?)```", doc.read_text(), re.S) for o in parse_manifest(b)]
    (mesh_config,) = [o for o in objs if isinstance(o, MeshConfig)]
    (policy,) = [o for o in objs if isinstance(o, AuthorizationPolicy) and o.action is CUSTOM]
    return mesh_config, policy


async def test_the_documented_example(env: Env) -> None:
    mesh_config, policy = documented()
    try:
        for provider in ("sample-ext-authz-grpc", "sample-ext-authz-http"):
            await env.apply(dataclasses.replace(policy, provider=provider), mesh_config=mesh_config)
            status, _, _ = await env.get("/headers", ("x-ext-authz", "allow"))
            assert status == 200, provider
            assert env.web.requests[-1].header("x-ext-authz-check-result") == "allowed"
            status, headers, body = await env.get("/headers", ("x-ext-authz", "deny"))
            assert (status, body, headers["x-ext-authz-check-result"]) == (
                403,
                DENIED_BODY.encode(),
                ["denied"],
            )
            status, _, _ = await env.get("/other")
            assert status == 200
    finally:
        await env.apply()


async def test_the_body_goes_to_the_authorizer_when_asked(env: Env) -> None:
    try:
        await env.apply(custom("grpc-body", "/ext/*"))
        status, _, body = await env.get("/ext/e", ("x-ext-authz", "body"), method="POST", body=b"please")
        assert (status, body) == (200, b"POST /ext/e 6")
        assert env.web.requests[-1].header("x-ext-authz-seen-body") == "6 false"
        assert env.web.requests[-1].body == b"please"
        status, _, body = await env.get("/ext/e", ("x-ext-authz", "body"), method="POST", body=b"no thanks")
        assert (status, body) == (403, DENIED_BODY.encode())
        status, _, body = await env.get(
            "/ext/e", ("x-ext-authz", "body"), method="POST", body=b"please " * 10
        )
        assert (status, body) == (413, b"Payload Too Large")  # more than maxRequestBytes
        await env.apply(custom("grpc-body-partial", "/ext/*"))
        status, _, body = await env.get(
            "/ext/e", ("x-ext-authz", "body"), method="POST", body=b"please " * 10
        )
        assert (status, body) == (200, b"POST /ext/e 70")  # the app gets it all
        assert env.web.requests[-1].header("x-ext-authz-seen-body") == "16 true"  # raw_body, partial
    finally:
        await env.apply()
