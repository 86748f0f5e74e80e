"""The WAF end to end in network namespaces: WafPolicy in the control plane's store -> discovery ->
the waypoint's engines -> requests from a client pod through ztunnel and the waypoint to the app.

The Core Rule Set's own regression cases (a vendored sample: ``crs_regression/``) go through the
real waypoint: attacks are blocked with 403 and the rule the case names counted, benign requests
reach the app. Then DetectOnly, an exclusion, precedence, bodies, and a bad ``SecRule`` edited into
a running policy. One mesh per module; every test leaves the objects as it found them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from collections.abc import AsyncIterator, Iterator
from urllib.parse import quote

import h11
import pytest
import pytest_asyncio
from structlog.testing import capture_logs

from mesh.model import (
    WAYPOINT_GATEWAY_CLASS,
    AuthorizationAction,
    AuthorizationPolicy,
    Gateway,
    MeshObject,
    PolicyTargetRef,
    Rule,
    Service,
    ServicePort,
    WaypointRef,
)
from mesh.model.meshconfig import ExtAuthzGrpc, ExtAuthzRequestBody, ExtensionProvider, MeshConfig
from mesh.model.waf import BodyLimitAction, WafMode, WafPolicy
from tests.netns.mesh import TRUST_DOMAIN, Mesh
from tests.netns.topology import Topology
from tests.waypoint.conftest import H1Backend, H1Client, H2Backend, H2Client
from tests.waypoint.crs_cases import load
from tests.waypoint.test_extauthz_netns import authorizer
from waypoint.app import Waypoint
from waypoint.bytestream import TcpByteStream

pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

GATEWAY_LABEL = "gateway.networking.k8s.io/gateway-name"
WEB_VIP = "10.96.0.40"
WEB_HOST = "web.shop.svc.cluster.local"
TIMEOUT = 60.0
ON_GATEWAY = PolicyTargetRef("Gateway", "waypoint", "gateway.networking.k8s.io")
ON_WEB = PolicyTargetRef("Service", "web")
SQLI = "/products?id=" + quote("1' OR '1'='1")
XSS = "/search?q=" + quote("<script>alert(1)</script>")
ADMIN_QUERY = "/query?sql=" + quote("select name from users where id = 1")  # 942100: a false positive here


class Pods:
    def __init__(self, topo: Topology) -> None:
        n1, n2 = topo.add_node(), topo.add_node()
        topo.connect_nodes()
        self.frontend = topo.add_pod(n1, "frontend", "shop", "frontend", {"app": "frontend"})
        self.web = topo.add_pod(n2, "web", "shop", "web", {"app": "web"})
        self.authz = topo.add_pod(n1, "ext-authz", "shop", "ext-authz", {"app": "ext-authz"})
        self.waypoint = topo.add_pod(
            n2, "waypoint-0", "shop", "waypoint", {GATEWAY_LABEL: "waypoint"}, enrolled=False
        )


BASE: list[MeshObject] = [
    Gateway("shop", "waypoint", WAYPOINT_GATEWAY_CLASS),
    Service(
        "shop", "waypoint", vips=("10.96.0.99",), ports=(ServicePort(15008, 15008, "mesh"),),
        selector={GATEWAY_LABEL: "waypoint"},
    ),
    Service(
        "shop", "web", vips=(WEB_VIP,), ports=(ServicePort(80, 8080, "http"), ServicePort(81, 8081, "http2")),
        selector={"app": "web"},
        waypoint=WaypointRef("waypoint", "shop"),
    ),
    Service(
        "shop", "ext-authz", vips=("10.96.0.41",), ports=(ServicePort(9000, 9000, "grpc"),),
        selector={"app": "ext-authz"},
    ),
    MeshConfig("istio-system", "istio", (
        ExtensionProvider("grpc", ExtAuthzGrpc("ext-authz.shop.svc.cluster.local", 9000, timeout=5.0), "envoyExtAuthzGrpc"),
        ExtensionProvider(
            "grpc-body",
            ExtAuthzGrpc(
                "ext-authz.shop.svc.cluster.local", 9000, timeout=5.0,
                include_request_body=ExtAuthzRequestBody(1024, False, False),
            ),
            "envoyExtAuthzGrpc",
        ),
    )),
]  # fmt: skip


def waf(name: str = "waf", *refs: PolicyTargetRef, **fields: object) -> WafPolicy:
    return WafPolicy("shop", name, refs or (ON_GATEWAY,), **fields)  # type: ignore[arg-type]


@dataclasses.dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


class Env:
    def __init__(self, mesh: Mesh, pods: Pods, web: H1Backend, web_h2: H2Backend, wp: Waypoint) -> None:
        self.mesh, self.pods, self.web, self.web_h2, self.wp = mesh, pods, web, web_h2, wp

    async def apply(self, *extra: MeshObject) -> None:
        """Write the objects to the control plane's store; wait until the waypoint holds them and
        its WAF has loaded (or refused) every policy."""
        self.mesh.extra = [*BASE, *extra]
        self.mesh.publish()
        await self.mesh.converged(TIMEOUT)
        await self.wp.waf.settled(TIMEOUT)

    async def send(
        self, method: str, target: str, headers: tuple[tuple[str, str], ...] = (), body: bytes = b""
    ) -> Reply:
        r, w = await self.mesh.connect(self.pods.frontend, WEB_VIP, 80)
        c = H1Client(TcpByteStream(r, w))
        hdrs = [(b"host", b"svc.test:80")]
        hdrs += [
            (k.encode("latin-1"), v.encode("latin-1"))
            for k, v in headers
            if k.lower() not in ("host", "content-length")
        ]
        if body:
            hdrs.append((b"content-length", str(len(body)).encode()))
        try:
            async with asyncio.timeout(TIMEOUT):
                c.send(h11.Request(method=method.encode(), target=target.encode("latin-1"), headers=hdrs))
                if body:
                    c.send(h11.Data(data=body))
                c.send(h11.EndOfMessage())
                await c.s.drain()
                resp, data = await c.response()
        finally:
            await c.close()
        return Reply(resp.status_code, {k.decode(): v.decode("latin-1") for k, v in resp.headers}, data)

    def matches(self, rule_id: int) -> float:
        value = self.wp.metrics.registry.get_sample_value(
            "istio_waf_rule_matches_total", {"rule_id": str(rule_id)}
        )
        return value or 0.0

    def waf_dump(self) -> list[dict[str, object]]:
        dump = self.wp.config_dump()["waf"]
        assert isinstance(dump, dict)
        policies = dump["policies"]
        assert isinstance(policies, list)
        return policies


@pytest.fixture(scope="module")
def topo() -> Iterator[tuple[Topology, Pods]]:
    with Topology() as t:
        yield t, Pods(t)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(topo: tuple[Topology, Pods]) -> AsyncIterator[Env]:
    t, p = topo
    m = Mesh(t, cert_ttl=dt.timedelta(hours=1))
    m.extra = list(BASE)
    web, web_h2 = H1Backend(), H2Backend()
    try:
        async with authorizer(p.authz):
            await m.start()
            await web.start(await m.factory(p.web).tcp_listener("0.0.0.0", 8080))
            await web_h2.start(await m.factory(p.web).tcp_listener("0.0.0.0", 8081))
            wp = await m.start_waypoint(p.waypoint, "waypoint")
            await m.converged(TIMEOUT)
            yield Env(m, p, web, web_h2, wp)
    finally:
        for backend in (web, web_h2):
            if backend.listener.server is not None:
                await backend.close()
        await m.aclose()


def uri(sa: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/ns/shop/sa/{sa}"


CASES = load()


async def test_the_sample_covers_four_rule_families() -> None:
    families = {c.rule_id // 1000 for c in CASES if c.attack}
    assert families == {930, 932, 941, 942}
    assert len([c for c in CASES if c.attack]) >= 200 and len([c for c in CASES if not c.attack]) >= 5


async def test_crs_regression_sample_through_the_waypoint(env: Env) -> None:
    try:
        await env.apply(waf())
        wrong: list[str] = []
        for case in CASES:
            before = env.matches(case.rule_id)
            reply = await env.send(case.method, case.uri, case.headers, case.body)
            matched = env.matches(case.rule_id) > before
            if case.attack and not (reply.status == 403 and matched and b"request id" in reply.body):
                wrong.append(f"{case.title}: attack answered {reply.status}, rule matched: {matched}")
            if not case.attack and (reply.status != 200 or matched):
                wrong.append(f"{case.title}: benign answered {reply.status}, rule matched: {matched}")
        assert not wrong, wrong
    finally:
        await env.apply()


async def test_block_says_the_request_id(env: Env) -> None:
    try:
        await env.apply(waf())
        reply = await env.send("GET", SQLI, (("x-request-id", "req-42"),))
        assert reply.status == 403
        assert reply.headers["x-request-id"] == "req-42"
        assert reply.body == b"Request blocked by the web application firewall (request id req-42)\n"
        reply = await env.send("GET", XSS)
        assert reply.status == 403 and len(reply.headers["x-request-id"]) == 32  # one made up
        before = len(env.web.requests)
        assert (await env.send("GET", "/products?id=7")).status == 200
        assert len(env.web.requests) == before + 1
    finally:
        await env.apply()


async def test_detect_only_passes_and_logs(env: Env) -> None:
    try:
        await env.apply(waf(mode=WafMode.DETECT_ONLY))
        with capture_logs() as logs:
            reply = await env.send("GET", SQLI, (("x-request-id", "detect-1"),))
        assert (reply.status, reply.body) == (200, f"GET {SQLI} 0".encode())
        (line,) = [e for e in logs if e["event"] == "waf"]
        assert line["action"] == "detect" and line["mode"] == "DetectOnly"
        assert line["request_id"] == "detect-1"
        assert 942100 in line["rule_ids"] and line["anomaly_score"] >= 5
        assert "SQL Injection Attack Detected via libinjection" in line["messages"]
        assert line["src"] == uri("frontend") and line["dst_service"] == WEB_HOST
        assert line["policy"] == "shop/waf"
        count = env.wp.metrics.registry.get_sample_value(
            "istio_waf_requests_total",
            {"action": "detect", "mode": "DetectOnly", "destination_service": WEB_HOST},
        )
        assert count is not None and count >= 1
    finally:
        await env.apply()


async def test_an_exclusion_removes_a_false_positive(env: Env) -> None:
    try:
        await env.apply(waf())
        assert (await env.send("GET", ADMIN_QUERY)).status == 403  # 942100 on a legitimate query
        await env.apply(waf(exclude_rule_ids=(942100,)))
        assert (await env.send("GET", ADMIN_QUERY)).status == 200
        assert (await env.send("GET", XSS)).status == 403  # the rest still blocks
        await env.apply(waf(exclude_rule_tags=("attack-sqli",)))
        assert (await env.send("GET", ADMIN_QUERY)).status == 200
    finally:
        await env.apply()


async def test_the_service_policy_wins_over_the_gateway_one(env: Env) -> None:
    try:
        await env.apply(waf(), waf("web-off", ON_WEB, mode=WafMode.DISABLED))
        assert (await env.send("GET", SQLI)).status == 200
        await env.apply(waf(mode=WafMode.DISABLED), waf("web-on", ON_WEB))
        assert (await env.send("GET", SQLI)).status == 403
        assert [(p["name"], p["in_force"]) for p in env.waf_dump()] == [("waf", True), ("web-on", True)]
    finally:
        await env.apply()


async def test_bodies_by_content_type(env: Env) -> None:
    form = ("content-type", "application/x-www-form-urlencoded")
    json = ("content-type", "application/json")
    grpc = ("content-type", "application/grpc")
    try:
        await env.apply(waf(request_body_limit=1024))
        assert (
            await env.send("POST", "/login", (form,), b"user=admin&pass=" + quote("' OR 1=1 --").encode())
        ).status == 403
        assert (await env.send("POST", "/api", (json,), b'{"q": "<script>alert(1)</script>"}')).status == 403
        ok = await env.send("POST", "/api", (json,), b'{"q": "hello"}')
        assert (ok.status, ok.body) == (200, b"POST /api 14")
        assert env.web.requests[-1].body == b'{"q": "hello"}'  # what the WAF read is forwarded
        # Binary bodies are not fed to the text rules (their URI and headers are).
        assert (await env.send("POST", "/pb", (grpc,), b"\x00\x00\x00\x00\x05' OR 1=1 --")).status == 200
        # Over the limit: Reject answers 413, ProcessPartial inspects the first part.
        big = b"note=" + b"a" * 2000
        assert (await env.send("POST", "/big", (form,), big)).status == 413
        await env.apply(
            waf(request_body_limit=1024, request_body_limit_action=BodyLimitAction.PROCESS_PARTIAL)
        )
        reply = await env.send("POST", "/big", (form,), big)
        assert (reply.status, reply.body) == (200, f"POST /big {len(big)}".encode())
        assert env.web.requests[-1].body == big  # the app gets it all
        # Only the listed types when inspectContentTypes is set.
        await env.apply(waf(inspect_content_types=("application/json",)))
        assert (
            await env.send("POST", "/login", (form,), b"pass=" + quote("' OR 1=1 --").encode())
        ).status == 200
        assert (await env.send("POST", "/api", (json,), b'{"q": "<script>alert(1)</script>"}')).status == 403
    finally:
        await env.apply()


async def test_a_bad_secrule_is_refused_and_the_running_rules_stay(env: Env) -> None:
    good = waf(
        extra_rules=('SecRule ARGS:debug "@streq 1" "id:1000001,phase:1,deny,status:403,msg:\'no debug\'"',)
    )
    bad = dataclasses.replace(
        good, extra_rules=('SecRule ARGS "@rx x" "id:1000002,phase:2,deny,nosuchaction"',)
    )
    try:
        await env.apply(good)
        assert (await env.send("GET", "/x?debug=1")).status == 403
        (entry,) = env.waf_dump()
        assert entry["error"] is None and entry["latest_in_force"] is True
        rules = entry["rule_count"]
        # The policy is edited in the store; the waypoint gets it, ModSecurity refuses it.
        with capture_logs() as logs:
            await env.apply(bad)
        (entry,) = env.waf_dump()
        assert entry["in_force"] is True and entry["latest_in_force"] is False
        assert entry["rule_count"] == rules
        error = entry["error"]
        assert (
            isinstance(error, str) and "Expecting an action, got:  nosuchaction" in error
        )  # ModSecurity's words
        refused = [e for e in logs if e["event"] == "WAF policy refused, previous rules stay in force"]
        assert refused and refused[0]["error"] == error and refused[0]["policy"] == "shop/waf"
        # The previous rules (with the extra one) are still in force.
        assert (await env.send("GET", "/x?debug=1")).status == 403
        assert (await env.send("GET", SQLI)).status == 403
        loads = env.wp.metrics.registry.get_sample_value(
            "istio_waf_rule_set_loads_total", {"result": "error"}
        )
        assert loads is not None and loads >= 1
        # A fixed policy loads again.
        await env.apply(dataclasses.replace(good, extra_rules=()))
        assert (await env.send("GET", "/x?debug=1")).status == 200
        assert env.waf_dump()[0]["error"] is None
    finally:
        await env.apply()


async def test_http2_and_grpc(env: Env) -> None:
    try:
        await env.apply(waf())
        r, w = await env.mesh.connect(env.pods.frontend, WEB_VIP, 81)
        c = H2Client(TcpByteStream(r, w))
        try:
            async with asyncio.timeout(TIMEOUT):
                ok = await c.request("POST", "/api", [("content-type", "application/json")], b'{"q": "hi"}')
                assert (ok.headers[":status"], ok.body) == ("200", b"POST /api 11")
                blocked = await c.request(
                    "POST",
                    "/api",
                    [("content-type", "application/json")],
                    b'{"q": "<script>alert(1)</script>"}',
                )
                assert blocked.headers[":status"] == "403" and b"request id" in blocked.body
                # gRPC: the URI and headers are inspected, the protobuf body is not; a block is
                # PERMISSION_DENIED in a trailers-only response.
                grpc = [("content-type", "application/grpc"), ("te", "trailers")]
                frame = b"\x00\x00\x00\x00\x0b' OR '1'='1"
                passed = await c.request("POST", "/shop.Orders/Get", grpc, frame)
                assert passed.headers[":status"] == "200"
                assert passed.body == f"POST /shop.Orders/Get {len(frame)}".encode()
                denied = await c.request(
                    "POST", "/shop.Orders/Get?id=" + quote("1' OR '1'='1"), grpc, b"\x00\x00\x00\x00\x00"
                )
                assert denied.headers["grpc-status"] == "7"
                assert "request id" in denied.headers["grpc-message"]
        finally:
            await c.close()
    finally:
        await env.apply()


def custom(provider: str) -> AuthorizationPolicy:
    return AuthorizationPolicy(
        namespace="shop", name="ext", target_refs=(ON_WEB,), action=AuthorizationAction.CUSTOM,
        provider=provider, rules=(Rule(),),
    )  # fmt: skip


async def test_after_an_external_authorizer(env: Env) -> None:
    """CUSTOM first, then the WAF: with an authorizer that reads no body the WAF reads it; with
    one that asked for it (includeRequestBodyInCheck) the WAF inspects the body it read."""
    form = ("content-type", "application/x-www-form-urlencoded")
    attack = b"q=please" + quote("' OR 1=1 --").encode()
    try:
        await env.apply(waf(), custom("grpc"))
        assert (await env.send("POST", "/a", (form, ("x-ext-authz", "allow")), b"q=please")).status == 200
        assert (await env.send("POST", "/a", (form, ("x-ext-authz", "allow")), attack)).status == 403
        assert (await env.send("POST", "/a", (form, ("x-ext-authz", "no")), b"q=please")).status == 403
        await env.apply(waf(), custom("grpc-body"))
        ok = await env.send("POST", "/a", (form, ("x-ext-authz", "body")), b"q=please")
        assert (ok.status, ok.body) == (200, b"POST /a 8")
        blocked = await env.send("POST", "/a", (form, ("x-ext-authz", "body")), attack)
        assert (
            blocked.status == 403 and b"web application firewall" in blocked.body
        )  # the authorizer allowed it
    finally:
        await env.apply()
