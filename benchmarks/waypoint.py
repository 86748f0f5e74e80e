"""Waypoint benchmark: HTTP/1.1 and gRPC-shaped HTTP/2 requests through the waypoint, side by side.

    .venv/bin/python benchmarks/waypoint.py [--repeat N] [--duration S] [--profile] [--output FILE]

One run builds two nodes and their pods as network namespaces (tests/netns/topology.py), the
real discovery server (tests/discovery.py) holding the mesh's objects, a ztunnel per node and the
namespace waypoint of ``shop`` — each its own process, fed only by discovery, as the netns end to
end tests build them (tests/netns/mesh.py), but one process per proxy so that /proc tells each
one's CPU and memory. The same 1 KiB requests then go, in one run, through these paths:

1. ``direct``: plain TCP from an unenrolled client pod (node 1) to an unenrolled server pod (node 2);
2. ``mesh``: client → ztunnel → HBONE → ztunnel → server, a service without waypoint;
3. ``waypoint``: client → ztunnel → HBONE → waypoint → HBONE → ztunnel → server, a service bound
   to the waypoint (L7: HTTP parsed, an AuthorizationPolicy evaluated, endpoint chosen per request);
4. ``waypoint+jwt``: as (3), to a service on the same pods with a RequestAuthentication (inline
   ``jwks``: keys cached, no network) and a DENY ``notRequestPrincipals: ["*"]``; every request
   carries ``Authorization: Bearer`` with an RS256 token the harness minted;
5. ``waypoint+ext_authz``: as (3), to a service on the same pods with a CUSTOM policy whose
   ``envoyExtAuthzGrpc`` provider (a MeshConfig object) is an authorizer pod in the mesh, a grpcio
   ``Authorization/Check`` server (``--authorizer``: this file's lean one, or
   tests/waypoint/authz_peer.py); every request carries ``x-ext-authz: allow``;
6. ``waypoint+waf-disabled``, ``waypoint+waf-detect``, ``waypoint+waf-enforce``: as (3), to a
   service on the same pods with a ``WafPolicy`` (the OWASP Core Rule Set on libmodsecurity) in
   mode ``Disabled``, ``DetectOnly`` and ``Enforce``, paranoia level 1, default thresholds;
7. ``haproxy``: the reference, three haproxy processes in the same netns positions as (3), all
   ``mode http``: the client pod's haproxy originates mutual TLS 1.3 to a middle haproxy in the
   waypoint's position, which terminates it, routes the request and re-originates mutual TLS 1.3 to
   the server pod's haproxy, which delivers plain HTTP to the server.

(4) and (5) are reported as well as the cost they add to (3), measured in the same run.

The WAF paths (6) carry two more request shapes, HTTP/1.1 only, which ``direct`` and ``waypoint``
carry too, so that the WAF's added cost is measured against the plain waypoint in the same run:
``get1k``, a GET whose target is 1 KiB of clean query (16 parameters of words), and ``post16k``, a
POST of a clean 16 KiB JSON document (``application/json``: the CRS's JSON body processor, every
value an argument), both with a service name in ``Host`` (a numeric Host is itself a CRS finding,
920350) and a 1 KiB answer. The harness checks that every request of those paths was inspected
(or, Disabled, not) and that no rule matched, so the figures are of clean traffic. The
gRPC-shaped and the 1 KiB ``application/octet-stream`` requests are not sent on the WAF paths: a
WafPolicy's default does not feed gRPC, protobuf or octet-stream bodies to the rules (their URI and
headers still are); ``waf_microbench`` times those, and other shapes, in-process.

Load: ``wrk`` (HTTP/1.1, POST of 1 KiB, 1 KiB answer) and ``h2load`` (HTTP/2 with prior knowledge,
gRPC-shaped unary calls: POST ``application/grpc``, ``te: trailers``, 1,029-byte DATA each way,
``grpc-status`` in trailers): a throughput run with many requests in flight, then a latency run
with one connection and one request at a time (``h2load``, ``--h1`` for HTTP/1.1). The backend is
nginx. ``--quick`` (and ``--load python`` /
``--backend python``) use small Python generators and backends instead, so the harness runs
without those tools. Needs root, ``ip`` and ``nft``. Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import datapath as dp  # noqa: E402 - the data-path harness's process and /proc helpers

PYTHON = sys.executable
SELF = str(Path(__file__).resolve())
TIMES = "\N{MULTIPLICATION SIGN}"

WAF_PATHS = ("waypoint+waf-disabled", "waypoint+waf-detect", "waypoint+waf-enforce")
PATHS = ["direct", "mesh", "waypoint", "waypoint+jwt", "waypoint+ext_authz", *WAF_PATHS, "haproxy"]
WAYPOINT_PATHS = ("waypoint", "waypoint+jwt", "waypoint+ext_authz", *WAF_PATHS)
ADDED = ("waypoint+jwt", "waypoint+ext_authz")  # reported as added cost over the plain waypoint
PROTOCOLS = ["http1", "grpc"]
SHAPES = ["get1k", "post16k"]  # the WAF's request shapes, HTTP/1.1
WORKLOADS = [*PROTOCOLS, *SHAPES]


def workloads(path: str) -> list[str]:
    """What ``path`` carries: the WAF paths the WAF's shapes; ``direct`` and ``waypoint``, their
    baselines, everything; the others the 1 KiB HTTP/1.1 and gRPC-shaped requests."""
    if path in WAF_PATHS:
        return list(SHAPES)
    return list(WORKLOADS) if path in ("direct", "waypoint") else list(PROTOCOLS)


LABELS = {
    "direct": "direct TCP (pod → pod)",
    "mesh": "two ztunnels, no waypoint",
    "waypoint": "ztunnel → waypoint → ztunnel",
    "waypoint+jwt": "waypoint + JWT (RS256, cached keys)",
    "waypoint+ext_authz": "waypoint + ext_authz (gRPC Check)",
    "waypoint+waf-disabled": "waypoint + WAF Disabled",
    "waypoint+waf-detect": "waypoint + WAF DetectOnly (PL 1)",
    "waypoint+waf-enforce": "waypoint + WAF Enforce (PL 1)",
    "haproxy": "haproxy chain (mode http, TLS)",
}
ADDED_LABELS = {
    "waypoint+jwt": "JWT validation, one token per client (RS256, inline JWKS)",
    "waypoint+ext_authz": "ext_authz gRPC round trip (authorizer in the mesh)",
}
PY_PROTO_TITLES = {
    "http1": "HTTP/1.1, 1 KiB POST",
    "grpc": "gRPC-shaped HTTP/2 unary, 1 KiB",
    "get1k": "HTTP/1.1, 1 KiB GET (clean query)",
    "post16k": "HTTP/1.1, 16 KiB JSON POST (clean, inspected)",
}
PROTO_TITLES = {
    "http1": "HTTP/1.1, 1 KiB POST (wrk; latency: h2load --h1)",
    "grpc": "gRPC-shaped HTTP/2 unary, 1 KiB (h2load)",
    **{q: f"{PY_PROTO_TITLES[q]} (wrk; latency: h2load --h1)" for q in SHAPES},
}
WAF_MODES = {  # path -> the WafPolicy's spec.mode
    "waypoint+waf-disabled": "Disabled",
    "waypoint+waf-detect": "DetectOnly",
    "waypoint+waf-enforce": "Enforce",
}
ISTIO_VCPU_PER_1000, ISTIO_MB_PER_1000 = 0.25, 60.0

# The mesh: pods (node, name, namespace, service account, labels, enrolled) in Topology's order,
# which gives the addresses 10.0.<node>.<2, 3, ...>.
GATEWAY_LABEL = "gateway.networking.k8s.io/gateway-name"
POD_SPECS: list[tuple[int, str, str, str, dict[str, str], bool]] = [
    (1, "frontend", "shop", "frontend", {"app": "frontend"}, True),  # 10.0.1.2: mesh client
    (1, "client", "plain", "client", {"app": "client"}, False),  # 10.0.1.3: direct / reference client
    (2, "web", "shop", "web", {"app": "web"}, True),  # 10.0.2.2: mesh server
    (2, "server", "plain", "server", {"app": "server"}, False),  # 10.0.2.3: direct / reference server
    (2, "waypoint-0", "shop", "waypoint", {GATEWAY_LABEL: "waypoint"}, False),  # 10.0.2.4
    (2, "refmid", "plain", "refmid", {"app": "refmid"}, False),  # 10.0.2.5: the middle haproxy
    (2, "ext-authz", "shop", "ext-authz", {"app": "ext-authz"}, True),  # 10.0.2.6: the authorizer
]
WEB_VIP, NOWP_VIP, WAYPOINT_VIP = "10.96.0.20", "10.96.0.30", "10.96.0.98"
# Services on the same web pods through the same waypoint, with a RequestAuthentication / a CUSTOM
# policy bound to them; the authorizer's service.
VIPS = {
    "waypoint": WEB_VIP,
    "waypoint+jwt": "10.96.0.21",
    "waypoint+ext_authz": "10.96.0.22",
    "waypoint+waf-disabled": "10.96.0.23",
    "waypoint+waf-detect": "10.96.0.24",
    "waypoint+waf-enforce": "10.96.0.25",
    "mesh": NOWP_VIP,
}
SERVICES = {
    "waypoint": "web",
    "waypoint+jwt": "web-jwt",
    "waypoint+ext_authz": "web-extauthz",
    "waypoint+waf-disabled": "web-waf-disabled",
    "waypoint+waf-detect": "web-waf-detect",
    "waypoint+waf-enforce": "web-waf-enforce",
}
AUTHZ_VIP, AUTHZ_PORT, AUTHZ_PROVIDER = "10.96.0.40", 9000, "bench-ext-authz"
AUTHZ_HOST = "ext-authz.shop.svc.cluster.local"
JWT_ISSUER, JWT_AUDIENCE = "https://issuer.bench.example", "web"
SERVER_IP, REFMID_IP = "10.0.2.3", "10.0.2.5"
APP_PORTS = {"http1": 8080, "grpc": 8081}  # on the server pods
SVC_PORTS = {"http1": 80, "grpc": 81}  # on the services
REF_PORTS = {"http1": (18080, 15442, 15443), "grpc": (18081, 15444, 15445)}  # client, middle, server haproxy
URL_PATHS = {"http1": "/echo", "grpc": "/demo.Bench/Unary"}
BODY = b"x" * 1024
GRPC_FRAME = b"\x00\x00\x00\x04\x00" + b"y" * 1024  # length prefix + a 1 KiB message
GRPC_REQUEST_HEADERS = (("content-type", "application/grpc"), ("te", "trailers"))
SHAPE_PATHS = {"get1k": "/search", "post16k": "/orders"}
WAF_ATTACK = "/search?q=1%27%20OR%20%271%27%3D%271"  # CRS 942100 (SQL injection): blocked by Enforce
_WORDS = ["blue", "cotton", "shirt", "summer", "sale", "size", "medium", "green", "brand", "acme", "warm",
          "soft", "linen", "red", "wool", "travel", "bag", "garden", "chair", "oak", "table", "lamp"]  # fmt: skip


def _prose(n: int, start: int) -> str:
    """``n`` characters of plain words (no SQL, script or path fragments for the CRS to find)."""
    words: list[str] = []
    i = start
    while sum(len(w) + 1 for w in words) <= n:
        words.append(_WORDS[i % len(_WORDS)])
        i += 1
    return " ".join(words)[:n]


def get1k_target() -> str:
    """``/search?…``: 1,024 bytes of request target, 16 parameters of words."""
    from urllib.parse import urlencode

    head = [("q", "blue cotton shirt"), ("category", "clothing"), ("sort", "price_asc"), ("page", "3")]
    target = f"{SHAPE_PATHS['get1k']}?" + urlencode([*head, *((f"f{i}", _prose(80, i)) for i in range(12))])
    return target[:1024]


def post16k_body() -> bytes:
    """A 16,384-byte JSON order: 32 items (sku, name, quantity, a note of words), 131 values."""
    items = [
        {"sku": f"SKU-{i:05d}", "name": _prose(18, i), "qty": 1 + i % 4, "note": _prose(400, i)}
        for i in range(32)
    ]
    doc = {"customer": "c-1042", "currency": "EUR", "items": items, "memo": ""}
    size = len(json.dumps(doc, separators=(",", ":")))
    doc["memo"] = _prose(16384 - size, 7)
    body = json.dumps(doc, separators=(",", ":")).encode()
    assert len(body) == 16384, len(body)
    return body


POST16K_BODY = post16k_body()


@dataclass
class Settings:
    repeat: int = 3
    duration: int = 8  # seconds per throughput run
    latency_seconds: int = 5  # seconds per one-connection latency run
    warmup_seconds: int = 1
    h1_connections: int = 16
    h2_connections: int = 4
    h2_streams: int = 4  # concurrent streams per HTTP/2 connection
    profile_seconds: int = 8

    @classmethod
    def quick(cls) -> Settings:
        return cls(
            repeat=1,
            duration=1,
            latency_seconds=1,
            warmup_seconds=0,
            h1_connections=4,
            h2_connections=2,
            h2_streams=2,
            profile_seconds=1,
        )


# -- the mesh's objects ---------------------------------------------------------------------------


def pods_json(topo: Any) -> list[dict[str, Any]]:
    return [asdict(p) for p in topo.pods]


@dataclass(frozen=True)
class JwtMaterial:
    """An RS256 key pair's public half as an inline JWKS document, and a token it signs."""

    jwks: str
    token: str

    @classmethod
    def mint(cls, tokens: int = 1, lifetime: float = 6 * 3600) -> tuple[JwtMaterial, list[str]]:
        """A new key; the material with the first token, and ``tokens`` distinct tokens."""
        import jwt
        from cryptography.hazmat.primitives.asymmetric import rsa
        from jwt.algorithms import RSAAlgorithm

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
        jwk["kid"] = "bench"
        minted = [
            jwt.encode(
                {
                    "iss": JWT_ISSUER,
                    "sub": "bench-client",
                    "aud": JWT_AUDIENCE,
                    "exp": int(time.time() + lifetime),
                    "jti": str(i),
                },
                key,
                algorithm="RS256",
                headers={"kid": "bench"},
            )
            for i in range(tokens)
        ]
        return cls(json.dumps({"keys": [jwk]}), minted[0]), minted


def jwt_microbench(n: int = 300) -> dict[str, float]:
    """The waypoint's JWT step alone, in this process: ``Authenticator.authenticate`` of ``n``
    new tokens (RS256 signature check: what a request pays the first time its token is seen),
    then of the same tokens again (cached: what every later request pays)."""
    from mesh.model import JwtRule, PolicyTargetRef, RequestAuthentication
    from mesh.xds.state import WaypointAuthentication
    from waypoint.jwt import Authenticated, Authenticator

    material, tokens = JwtMaterial.mint(n)
    ra = RequestAuthentication(
        "shop", "web-jwt", target_refs=(PolicyTargetRef("Service", "web-jwt", ""),),
        jwt_rules=(JwtRule(issuer=JWT_ISSUER, audiences=(JWT_AUDIENCE,), jwks=material.jwks),),
    )  # fmt: skip
    authn = Authenticator([WaypointAuthentication(ra)])
    out: dict[str, float] = {"tokens": n}
    for name in ("new_token_us", "cached_token_us"):
        times = []
        for t in tokens:
            headers = [("authorization", f"Bearer {t}")]
            t0 = time.perf_counter()
            got = authn.authenticate(headers, URL_PATHS["http1"])
            times.append((time.perf_counter() - t0) * 1e6)
            if not isinstance(got, Authenticated) or got.principal is None:
                raise dp.BenchError(f"JWT microbenchmark: token refused: {got}")
        out[name] = statistics.median(times)
    return out


def waf_micro_shapes() -> list[tuple[str, str, str, str | None, bytes]]:
    """(what, method, target, content type, body) of the requests ``waf_microbench`` times."""
    from urllib.parse import urlencode

    form = urlencode([(f"f{i}", _prose(2030, i)) for i in range(8)]).encode()
    many = json.dumps([{"k": _prose(5, i), "v": _prose(10, i)} for i in range(512)], separators=(",", ":"))
    return [
        ("GET, no query", "GET", SHAPE_PATHS["get1k"], None, b""),
        ("1 KiB GET, 16 parameters (`get1k`)", "GET", get1k_target(), None, b""),
        ("16 KiB JSON POST, 131 values (`post16k`)", "POST", SHAPE_PATHS["post16k"], "application/json",
         POST16K_BODY),
        ("16 KiB form POST, 8 fields", "POST", SHAPE_PATHS["post16k"], "application/x-www-form-urlencoded", form),
        (f"{len(many) / 1024:.0f} KiB JSON POST, 1,024 values", "POST", SHAPE_PATHS["post16k"],
         "application/json", many.encode()),
        ("16 KiB octet-stream POST (body not inspected)", "POST", SHAPE_PATHS["post16k"],
         "application/octet-stream", b"x" * 16384),
        ("gRPC unary, 1 KiB (body not inspected)", "POST", URL_PATHS["grpc"], "application/grpc", GRPC_FRAME),
    ]  # fmt: skip


def waf_microbench(n: int = 30) -> dict[str, float]:
    """The WAF stage alone, in this process, on one thread: ``WafEngine.inspect_sync`` (the whole
    transaction, ModSecurity's C time included) in Enforce, paranoia level 1, as the waypoint calls
    it (a body only when its type is inspected); per request shape, the median µs of ``n``, wall
    and the thread's CPU (on a shared machine the CPU figure is the steady one)."""
    from waypoint.waf import WafConfig, WafEngine, WafMode, WafRequest

    engine = WafEngine(max_workers=1)
    try:
        rules = engine.load(WafConfig(mode=WafMode.ENFORCE, paranoia_level=1))
        out: dict[str, float] = {"rules": rules, "samples": n}
        for what, method, target, ctype, body in waf_micro_shapes():
            headers: tuple[tuple[str, str], ...] = (("host", "web.shop.svc.cluster.local"),)
            if ctype:
                headers += (("content-type", ctype), ("content-length", str(len(body))))
            request = WafRequest(
                method=method, uri=target, headers=headers,
                body=body if body and engine.wants_body(ctype) else None, http_version="1.1",
                client_addr="10.0.1.2", client_port=40000, server_addr="10.0.2.2", server_port=8080,
            )  # fmt: skip
            wall, cpu = [], []
            for _ in range(n + 1):
                t0, c0 = time.perf_counter(), time.thread_time()
                verdict = engine.inspect_sync(request)
                wall.append((time.perf_counter() - t0) * 1e6)
                cpu.append((time.thread_time() - c0) * 1e6)
                if verdict.blocked or verdict.rule_ids:
                    raise dp.BenchError(f"WAF microbenchmark: {what}: rules matched: {verdict.rule_ids}")
            out[what] = statistics.median(wall[1:])
            out[f"{what} CPU"] = statistics.median(cpu[1:])
        return out
    finally:
        engine.close()


def request_headers(path: str, jwt_token: str) -> list[tuple[str, str]]:
    """The extra headers every request of ``path`` carries."""
    if path == "waypoint+jwt":
        return [("authorization", f"Bearer {jwt_token}")]
    if path == "waypoint+ext_authz":
        return [("x-ext-authz", "allow")]
    return []


def authority(path: str) -> str:
    """The Host of the WAF's shapes: a service name (a numeric Host is a CRS finding, 920350)."""
    return (
        f"{SERVICES[path]}.shop.svc.cluster.local" if path in SERVICES else "server.plain.svc.cluster.local"
    )


def request_target(workload: str) -> str:
    return get1k_target() if workload == "get1k" else SHAPE_PATHS.get(workload, URL_PATHS["http1"])


def shape_headers(workload: str, path: str) -> list[tuple[str, str]]:
    """Host and content type of an HTTP/1.1 workload (the 1 KiB POST keeps its numeric Host)."""
    if workload == "get1k":
        return [("host", authority(path))]
    if workload == "post16k":
        return [("host", authority(path)), ("content-type", "application/json")]
    return [("content-type", "application/octet-stream")]


def request_body(workload: str) -> bytes:
    return {"get1k": b"", "post16k": POST16K_BODY}.get(workload, BODY)


def h1_request(
    path: str, workload: str, host: str, port: int, extra: list[tuple[str, str]], target: str | None = None
) -> bytes:
    """One HTTP/1.1 request of ``workload`` on ``path``, as bytes (the Python load generator's)."""
    headers = shape_headers(workload, path)
    if not any(k == "host" for k, _ in headers):
        headers.insert(0, ("host", f"{host}:{port}"))
    body = request_body(workload)
    method = "GET" if workload == "get1k" else "POST"
    if body:
        headers.append(("content-length", str(len(body))))
    head = f"{method} {target or request_target(workload)} HTTP/1.1\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in (*headers, *extra)
    )
    return (head + "\r\n").encode("latin-1") + body


def mesh_objects(pods: list[dict[str, Any]], jwks: str) -> list[Any]:
    """What the control plane's store holds: every pod, the waypoint's Gateway and service, the
    service ``web`` bound to it, ``web-nowp`` (the same pods, no waypoint) and the demo's L7 policy;
    ``web-jwt`` and ``web-extauthz`` (the same pods, the same waypoint, the same policy) with a
    RequestAuthentication (inline ``jwks``) and a DENY of requests without a principal, and with a
    CUSTOM policy sending every request to the ``ext-authz`` service, named in the MeshConfig;
    ``web-waf-disabled``, ``web-waf-detect`` and ``web-waf-enforce`` (the same again), each with a
    WafPolicy on the Service in that mode, paranoia level 1, the rest defaults."""
    from mesh.model import (
        WAYPOINT_GATEWAY_CLASS,
        AuthorizationAction,
        AuthorizationPolicy,
        Gateway,
        JwtRule,
        Operation,
        PolicyTargetRef,
        RequestAuthentication,
        Rule,
        RuleFrom,
        RuleTo,
        Service,
        ServicePort,
        Source,
        TunnelProtocol,
        WaypointRef,
        Workload,
    )
    from mesh.model.meshconfig import ExtAuthzGrpc, ExtensionProvider, MeshConfig
    from mesh.model.waf import WafMode, WafPolicy

    workloads = [
        Workload(
            uid=f"{p['namespace']}-{p['name']}",
            name=p["name"],
            namespace=p["namespace"],
            node=f"node-{p['node']}",
            service_account=p["service_account"],
            ips=(p["ip"],),
            labels=dict(p["labels"]),
            tunnel_protocol=TunnelProtocol.HBONE if p["enrolled"] else TunnelProtocol.NONE,
            trust_domain="cluster.local",
        )
        for p in pods
    ]
    ports = (
        ServicePort(SVC_PORTS["http1"], APP_PORTS["http1"], "http"),
        ServicePort(SVC_PORTS["grpc"], APP_PORTS["grpc"], "grpc"),
    )
    return [
        *workloads,
        Gateway("shop", "waypoint", WAYPOINT_GATEWAY_CLASS),
        Service(
            "shop", "waypoint", vips=(WAYPOINT_VIP,), ports=(ServicePort(15008, 15008, "mesh"),),
            selector={GATEWAY_LABEL: "waypoint"},
        ),
        *(
            Service("shop", SERVICES[p], vips=(VIPS[p],), ports=ports, selector={"app": "web"},
                    waypoint=WaypointRef("waypoint", "shop"))
            for p in WAYPOINT_PATHS
        ),
        Service("shop", "web-nowp", vips=(NOWP_VIP,), ports=ports, selector={"app": "web"}),
        Service("shop", "ext-authz", vips=(AUTHZ_VIP,), ports=(ServicePort(AUTHZ_PORT, AUTHZ_PORT, "grpc"),),
                selector={"app": "ext-authz"}),
        AuthorizationPolicy(
            namespace="shop",
            name="web-no-admin",
            target_refs=tuple(PolicyTargetRef("Service", SERVICES[p], "") for p in WAYPOINT_PATHS),
            action=AuthorizationAction.DENY,
            rules=(Rule(to=(RuleTo(Operation(methods=("POST",), paths=("/admin",))),)),),
        ),
        RequestAuthentication(
            namespace="shop",
            name="web-jwt",
            target_refs=(PolicyTargetRef("Service", "web-jwt", ""),),
            jwt_rules=(JwtRule(issuer=JWT_ISSUER, audiences=(JWT_AUDIENCE,), jwks=jwks),),
        ),
        AuthorizationPolicy(
            namespace="shop",
            name="web-jwt-required",
            target_refs=(PolicyTargetRef("Service", "web-jwt", ""),),
            action=AuthorizationAction.DENY,
            rules=(Rule(from_=(RuleFrom(Source(not_request_principals=("*",))),)),),
        ),
        AuthorizationPolicy(
            namespace="shop",
            name="web-ext-authz",
            target_refs=(PolicyTargetRef("Service", "web-extauthz", ""),),
            action=AuthorizationAction.CUSTOM,
            provider=AUTHZ_PROVIDER,
            rules=(Rule(),),
        ),
        MeshConfig("istio-system", "istio", (
            ExtensionProvider(AUTHZ_PROVIDER, ExtAuthzGrpc(AUTHZ_HOST, AUTHZ_PORT, timeout=5.0), "envoyExtAuthzGrpc"),
        )),
        *(
            WafPolicy("shop", SERVICES[p], target_refs=(PolicyTargetRef("Service", SERVICES[p], ""),),
                      mode=WafMode(WAF_MODES[p]), paranoia_level=1)
            for p in WAF_PATHS
        ),
    ]  # fmt: skip


# -- child processes: the proxies, backends and Python load generators -----------------------------
#
# ``python benchmarks/waypoint.py _child ROLE SPEC.json`` runs one of them; SPEC.json holds what the
# parent decided (pods, paths, ports). Each writes its ready file once serving and stops on SIGTERM.


def _ready(path: str, data: dict[str, Any]) -> None:
    tmp = Path(path + ".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


async def _subscribe(address: str, name: str, waypoint: bool) -> Any:
    from mesh.xds.client import WAYPOINT_TYPE_URLS, Backoff, XdsClient, insecure_channel_factory
    from mesh.xds.convert import TYPE_URLS
    from mesh.xds.state import ProxyState

    state = ProxyState()
    client = XdsClient(
        state,
        node_id=f"{'waypoint' if waypoint else 'ztunnel'}~{name}",
        node_name=name,
        channel_factory=insecure_channel_factory(address),
        backoff=Backoff(initial=0.05, maximum=1.0),
        types=WAYPOINT_TYPE_URLS if waypoint else TYPE_URLS,
    )
    task = asyncio.create_task(client.run(), name=f"xds-{name}")
    await asyncio.wait_for(client.synced.wait(), 30)
    return state, client, task


async def _child_discovery(spec: dict[str, Any]) -> int:
    from mesh import runtime
    from tests.discovery import Discovery

    stop = runtime.stop_on_signals()
    d = Discovery()
    d.store.replace_all(mesh_objects(spec["pods"], spec["jwks"]))
    await d.start()
    _ready(spec["ready"], {"address": d.address})
    await stop.wait()
    await d.aclose()
    return 0


async def _child_ztunnel(spec: dict[str, Any]) -> int:
    """One node's ztunnel as tests/netns/mesh.py runs it, with a fake cni agent handing it the
    node's enrolled pods over ZDS, its certificates signed by the benchmark's CA."""
    from mesh import runtime
    from mesh.pki import CertificateAuthority
    from tests.netns.agent import FakeAgent
    from tests.netns.topology import Pod
    from tests.ztunnel.fakes import FakeCa
    from ztunnel.app import Addresses, Ztunnel

    stop = runtime.stop_on_signals()
    node = int(spec["node"])
    name = f"node-{node}"
    state, client, task = await _subscribe(spec["discovery"], name, waypoint=False)
    ca = FakeCa(CertificateAuthority.load_cacerts(spec["ca_dir"]))
    agent = FakeAgent(spec["zds"])
    zt = Ztunnel(
        node=name,
        trust_domain="cluster.local",
        state=state,
        ca=ca,
        zds_path=spec["zds"],
        addresses=Addresses(("127.0.0.1", 0), ("127.0.0.1", 0), ("127.0.0.1", 0)),
    )
    await zt.start()
    await agent.accept()
    for p in spec["pods"]:
        if p["node"] == node and p["enrolled"]:
            pod = Pod(**{**p, "labels": tuple(tuple(kv) for kv in p["labels"])})
            err = await agent.add(pod)
            if err:
                raise RuntimeError(f"ztunnel {name} refused {pod.name}: {err}")
    err = await agent.snapshot_sent()
    if err:
        raise RuntimeError(f"ztunnel {name}: snapshot: {err}")
    _ready(spec["ready"], {"node": name})
    await stop.wait()
    await zt.shutdown(1.0)
    agent.close()
    client.stop()
    await asyncio.gather(task, return_exceptions=True)
    return 0


async def _child_waypoint(spec: dict[str, Any]) -> int:
    """The waypoint of Gateway shop/waypoint, its data path in the waypoint pod's netns (how
    ``waypoint --netns`` runs it), fed by discovery, holding only its own certificate."""
    from mesh import runtime
    from mesh.netns import NetnsSocketFactory
    from mesh.pki import CertificateAuthority
    from tests.ztunnel.fakes import FakeCa
    from waypoint.app import Addresses, Waypoint
    from waypoint.routing import Me

    stop = runtime.stop_on_signals()
    state, client, task = await _subscribe(spec["discovery"], "shop-waypoint", waypoint=True)
    fd = os.open(spec["netns"], os.O_RDONLY)
    try:
        factory = NetnsSocketFactory(fd, name="waypoint-0")
    finally:
        os.close(fd)
    wp = Waypoint(
        me=Me("shop", "waypoint"),
        trust_domain="cluster.local",
        state=state,
        ca=FakeCa(CertificateAuthority.load_cacerts(spec["ca_dir"])),
        factory=factory,
        addresses=Addresses(("0.0.0.0", 15008), ("127.0.0.1", 0), ("127.0.0.1", 0), ("127.0.0.1", 0)),
        drain_seconds=1.0,
    )
    await wp.start()
    await wp.waf.settled(120)  # every WafPolicy loaded (the CRS: a fraction of a second each) or refused
    _ready(spec["ready"], {"stats_port": wp.bound["stats"][1], "waf": wp.waf.dump()})
    await stop.wait()
    await wp.shutdown()
    client.stop()
    await asyncio.gather(task, return_exceptions=True)
    factory.close()
    return 0


class _H1Backend(asyncio.Protocol):
    """Keep-alive HTTP/1.1: every request (Content-Length bodies) gets 200 with 1 KiB."""

    RESPONSE = (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: 1024\r\n\r\n" + BODY
    )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            length = 0
            for line in self.buf[:end].split(b"\r\n")[1:]:
                k, _, v = line.partition(b":")
                if k.strip().lower() == b"content-length":
                    length = int(v)
            if len(self.buf) < end + 4 + length:
                return
            self.buf = self.buf[end + 4 + length :]
            self.t.write(self.RESPONSE)


class _H2Backend(asyncio.Protocol):
    """HTTP/2 prior knowledge: every stream gets a gRPC-shaped answer (headers, 1,029 bytes, trailers)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        import h2.config
        import h2.connection

        self.t = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        self.c = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        self.c.initiate_connection()
        self.t.write(self.c.data_to_send())

    def data_received(self, data: bytes) -> None:
        import h2.events
        import h2.exceptions

        try:
            events = self.c.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.t.close()
            return
        for e in events:
            if isinstance(e, h2.events.DataReceived):
                self.c.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
            elif isinstance(e, h2.events.StreamEnded):
                sid = e.stream_id
                self.c.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc")])
                self.c.send_data(sid, GRPC_FRAME)
                self.c.send_headers(sid, [(b"grpc-status", b"0")], end_stream=True)
        self.t.write(self.c.data_to_send())


async def _child_backend(spec: dict[str, Any]) -> int:
    from mesh import runtime

    stop = runtime.stop_on_signals()
    loop = asyncio.get_running_loop()
    servers = [
        await loop.create_server(_H1Backend, "0.0.0.0", APP_PORTS["http1"]),
        await loop.create_server(_H2Backend, "0.0.0.0", APP_PORTS["grpc"]),
    ]
    _ready(spec["ready"], {})
    await stop.wait()
    for s in servers:
        s.close()
    return 0


def _child_authorizer(spec: dict[str, Any]) -> int:
    """A lean external authorizer: a grpcio ``envoy.service.auth.v3.Authorization/Check`` server
    (the server tests/waypoint/authz_peer.py runs, 8 threads) that allows when the request has
    ``x-ext-authz: allow`` and answers an empty OK, so that the waypoint's cost is the round trip
    and not the header edits authz_peer's answer asks for (``--authorizer peer`` runs that one)."""
    from concurrent import futures

    import grpc

    from mesh.proto import ext_authz_pb2, ext_authz_pb2_grpc

    ok = ext_authz_pb2.CheckResponse(ok_response=ext_authz_pb2.OkHttpResponse())
    denied = ext_authz_pb2.CheckResponse(
        status={"code": 7, "message": "not allowed"},
        denied_response=ext_authz_pb2.DeniedHttpResponse(status={"code": 403}, body="denied"),
    )

    class Lean(ext_authz_pb2_grpc.AuthorizationServicer):
        def Check(self, request: Any, context: grpc.ServicerContext) -> Any:
            allow = request.attributes.request.http.headers.get("x-ext-authz") == "allow"
            return ok if allow else denied

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=[("grpc.enable_http_proxy", 0)])
    ext_authz_pb2_grpc.add_AuthorizationServicer_to_server(Lean(), server)
    server.add_insecure_port(f"0.0.0.0:{AUTHZ_PORT}")
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    _ready(spec["ready"], {})
    stop.wait()
    server.stop(1).wait()
    return 0


def _percentiles(lat_us: list[float]) -> tuple[float, float]:
    if not lat_us:
        return 0.0, 0.0
    lat_us.sort()
    return lat_us[len(lat_us) // 2], lat_us[min(len(lat_us) - 1, int(len(lat_us) * 0.99))]


async def _load_h1(host: str, port: int, conns: int, seconds: float, request: bytes) -> dict[str, float]:
    lat: list[float] = []
    errors = non2xx = 0
    deadline = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal errors, non2xx
        try:
            r, w = await asyncio.open_connection(host, port)
        except OSError:
            errors += 1
            return
        try:
            while time.monotonic() < deadline:
                t0 = time.perf_counter()
                w.write(request)
                head = await r.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    k, _, v = line.partition(b":")
                    if k.strip().lower() == b"content-length":
                        length = int(v)
                await r.readexactly(length)
                lat.append((time.perf_counter() - t0) * 1e6)
                if not head.startswith(b"HTTP/1.1 2"):
                    non2xx += 1
        except (OSError, asyncio.IncompleteReadError, ValueError):
            errors += 1
        finally:
            w.close()

    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(conns)))
    elapsed = time.monotonic() - t0
    p50, p99 = _percentiles(lat)
    n = len(lat)
    return {
        "requests": n,
        "errors": errors,
        "non2xx": non2xx,
        "rps": n / elapsed,
        "p50_us": p50,
        "p99_us": p99,
    }


async def _load_h2(
    host: str, port: int, conns: int, streams: int, seconds: float, extra: list[tuple[str, str]]
) -> dict[str, float]:
    import h2.config
    import h2.connection
    import h2.events

    lat: list[float] = []
    errors = non2xx = 0
    deadline = time.monotonic() + seconds
    headers = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":authority", f"{host}:{port}".encode()),
        (b":path", URL_PATHS["grpc"].encode()),
        *((k.encode(), v.encode()) for k, v in (*GRPC_REQUEST_HEADERS, *extra)),
    ]

    async def connection() -> None:
        nonlocal errors, non2xx
        try:
            r, w = await asyncio.open_connection(host, port)
        except OSError:
            errors += 1
            return
        c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        c.initiate_connection()
        w.write(c.data_to_send())
        pending: dict[int, asyncio.Future[bool]] = {}
        status: dict[int, bytes] = {}
        grpc_status: dict[int, bytes] = {}  # in the trailers, or in the headers of a local reply

        async def reader() -> None:
            while data := await r.read(65536):
                for e in c.receive_data(data):
                    if isinstance(e, h2.events.ResponseReceived | h2.events.TrailersReceived):
                        fields = dict(e.headers)
                        if b":status" in fields:
                            status[e.stream_id] = fields[b":status"]
                        if b"grpc-status" in fields:
                            grpc_status[e.stream_id] = fields[b"grpc-status"]
                    elif isinstance(e, h2.events.DataReceived):
                        c.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
                    elif isinstance(e, h2.events.StreamEnded | h2.events.StreamReset):
                        fut = pending.pop(e.stream_id, None)
                        if fut is not None and not fut.done():
                            fut.set_result(isinstance(e, h2.events.StreamEnded))
                w.write(c.data_to_send())
            for fut in pending.values():
                if not fut.done():
                    fut.set_result(False)

        async def caller() -> None:
            nonlocal errors, non2xx
            loop = asyncio.get_running_loop()
            while time.monotonic() < deadline:
                t0 = time.perf_counter()
                sid = c.get_next_available_stream_id()
                fut: asyncio.Future[bool] = loop.create_future()
                pending[sid] = fut
                c.send_headers(sid, headers)
                c.send_data(sid, GRPC_FRAME, end_stream=True)
                w.write(c.data_to_send())
                if not await fut:
                    errors += 1
                    return
                lat.append((time.perf_counter() - t0) * 1e6)
                # Not OK: a status other than 2xx, or a gRPC status other than 0 (a local reply,
                # a JWT or authorizer denial, is ``:status 200`` with ``grpc-status`` 16 or 7).
                if not status.pop(sid, b"").startswith(b"2") or grpc_status.pop(sid, b"0") != b"0":
                    non2xx += 1

        read_task = asyncio.ensure_future(reader())
        try:
            await asyncio.gather(*(caller() for _ in range(streams)))
        except (OSError, asyncio.IncompleteReadError):
            errors += 1
        finally:
            read_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await read_task
            w.close()

    t0 = time.monotonic()
    await asyncio.gather(*(connection() for _ in range(conns)))
    elapsed = time.monotonic() - t0
    p50, p99 = _percentiles(lat)
    n = len(lat)
    return {
        "requests": n,
        "errors": errors,
        "non2xx": non2xx,
        "rps": n / elapsed,
        "p50_us": p50,
        "p99_us": p99,
    }


async def _child_load(spec: dict[str, Any]) -> int:
    extra = [(k, v) for k, v in spec.get("headers", [])]
    if spec["protocol"] != "grpc":
        request = spec["request"].encode("latin-1")
        out = await _load_h1(spec["host"], spec["port"], spec["connections"], spec["seconds"], request)
    else:
        out = await _load_h2(
            spec["host"], spec["port"], spec["connections"], spec["streams"], spec["seconds"], extra
        )
    print(json.dumps(out))
    return 0


CHILDREN = {
    "discovery": _child_discovery,
    "ztunnel": _child_ztunnel,
    "waypoint": _child_waypoint,
    "backend": _child_backend,
    "load": _child_load,
}


def child_main(role: str, spec_path: str) -> int:
    from mesh import log as meshlog
    from mesh import runtime

    spec = json.loads(Path(spec_path).read_text())
    if role == "authorizer":
        return _child_authorizer(spec)
    if role in ("ztunnel", "waypoint", "discovery"):
        meshlog.configure("info", json=True)  # as in production: one access-log line per request
    return runtime.run(lambda: CHILDREN[role](spec))


# -- the parent: tools, processes, paths --------------------------------------------------------------


@dataclass(frozen=True)
class Tools:
    load: str  # "real" (wrk, h2load) or "python"
    backend: str  # "nginx" or "python"
    haproxy: str | None  # None: the reference is not run
    pyspy: str | None

    def versions(self) -> str:
        parts = []
        if self.load == "real":
            parts.append(_first_line(["wrk", "--version"]))
            parts.append(_first_line(["h2load", "--version"]))
        else:
            parts.append("load: the Python generators in this file")
        parts.append(
            _first_line(["nginx", "-v"])
            if self.backend == "nginx"
            else "backend: the Python one in this file"
        )
        if self.haproxy:
            parts.append(_first_line([self.haproxy, "-v"]))
        return "; ".join(p for p in parts if p)


def _first_line(argv: list[str]) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except OSError:
        return ""
    out = (p.stdout or p.stderr).strip().splitlines()
    return out[0].strip() if out else ""


def find_tools(args: argparse.Namespace) -> Tools | str:
    """The tools the run will use, or why it cannot run (naming the missing tool and its package)."""
    load = args.load if args.load != "auto" else ("python" if args.quick else "real")
    backend = args.backend if args.backend != "auto" else ("python" if args.quick else "nginx")
    missing = []
    if load == "real":
        if not shutil.which("wrk"):
            missing.append("wrk (Debian package wrk)")
        if not shutil.which("h2load"):
            missing.append("h2load (Debian package nghttp2-client)")
    if backend == "nginx" and not shutil.which(
        "nginx", path="/usr/sbin:/usr/bin:" + os.environ.get("PATH", "")
    ):
        missing.append("nginx (Debian package nginx-light or nginx)")
    haproxy = shutil.which("haproxy", path="/usr/sbin:/usr/bin:" + os.environ.get("PATH", ""))
    if haproxy is None and not args.quick:
        missing.append("haproxy (Debian package haproxy), the reference proxy")
    if missing:
        return (
            "missing: "
            + "; ".join(missing)
            + ". Install them (apt-get install wrk nghttp2-client nginx-light"
            " haproxy), or run with --load python / --backend python (not a measurement)"
        )
    if os.geteuid() != 0 or not all(shutil.which(t) for t in ("ip", "nft")):
        return "builds network namespaces and nft rules: run as root, with ip and nft installed"
    pyspy = shutil.which("py-spy") or (
        str(Path(PYTHON).parent / "py-spy") if (Path(PYTHON).parent / "py-spy").exists() else None
    )
    return Tools(load, backend, haproxy, pyspy)


class RssSampler:
    """The largest VmRSS of ``pids`` seen while it runs (every 0.2 s)."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.peak = dict.fromkeys(pids, 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            for pid in self.pids:
                with contextlib.suppress(OSError, dp.BenchError):
                    self.peak[pid] = max(self.peak[pid], dp.rss_mib(pid))
            if self._stop.wait(0.2):
                return

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class Bench:
    def __init__(
        self, s: Settings, tools: Tools, work: Path, procs: dp.Processes, authorizer: str = "lean"
    ) -> None:
        self.s = s
        self.tools = tools
        self.work = work
        self.procs = procs
        self.authorizer = authorizer  # "lean" (the child above) or "peer" (tests/waypoint/authz_peer.py)
        self.jwt, _ = JwtMaterial.mint()
        self.topo: Any = None
        self.pods: dict[str, Any] = {}
        self.pids: dict[str, int] = {}  # role -> pid (ztunnel-1, ztunnel-2, waypoint, haproxy-*)
        self.waypoint_stats = 0
        self.waf_policies: list[dict[str, Any]] = []  # the waypoint's config_dump "waf" section
        self.n = 0

    def _next(self, stem: str) -> Path:
        self.n += 1
        return self.work / f"{self.n:03d}-{stem}"

    # -- building -------------------------------------------------------------------------------------

    def build(self) -> None:
        from mesh.identity import Identity
        from mesh.pki import CertificateAuthority, write_credential
        from tests.netns.topology import Topology

        self.topo = Topology()
        n1, n2 = self.topo.add_node(), self.topo.add_node()
        self.topo.connect_nodes()
        for node, name, ns, sa, labels, enrolled in POD_SPECS:
            self.pods[name] = self.topo.add_pod(n1 if node == 1 else n2, name, ns, sa, labels, enrolled)
        ca = CertificateAuthority.generate("cluster.local")
        ca_dir = self.work / "ca"
        ca.save(ca_dir)
        for name in ("client", "refmid", "server"):
            d = self.work / "creds" / name
            write_credential(d, ca.issue(Identity("cluster.local", "plain", name)))
            (d / "combined.pem").write_bytes(
                (d / "cert-chain.pem").read_bytes() + (d / "key.pem").read_bytes()
            )
        base = {"pods": pods_json(self.topo), "ca_dir": str(ca_dir), "jwks": self.jwt.jwks}

        discovery = self.child("discovery", base)
        address = self.wait_ready(discovery)["address"]
        base["discovery"] = address
        starting = [
            self.child("ztunnel", {**base, "node": n, "zds": str(self.work / f"zds-{n}.sock")})
            for n in (1, 2)
        ]
        starting.append(self.child("waypoint", {**base, "netns": self.pods["waypoint-0"].netns_path}))
        for role, (proc, _) in zip(("ztunnel-1", "ztunnel-2", "waypoint"), starting, strict=True):
            info = self.wait_ready((proc, _))
            self.pids[role] = proc.pid
            if role == "waypoint":
                self.waypoint_stats = int(info["stats_port"])
                self.waf_policies = info.get("waf", [])
                self.check_waf_loaded()
        for pod in ("web", "server"):
            self.start_backend(pod)
        self.start_authorizer()
        if self.tools.haproxy:
            self.start_haproxy_chain()
        self.check_enforced()
        self.check_waf()

    def child(self, role: str, spec: dict[str, Any], prefix: list[str] | None = None) -> tuple[Any, Path]:
        ready = self._next(f"{role}.ready")
        spec_path = self._next(f"{role}.json")
        spec_path.write_text(json.dumps({**spec, "ready": str(ready)}))
        proc = self.procs.start(role, [*(prefix or []), PYTHON, SELF, "_child", role, str(spec_path)])
        return proc, ready

    def wait_ready(self, started: tuple[Any, Path], timeout: float = 60.0) -> dict[str, Any]:
        proc, ready = started
        dp.wait_for(ready.exists, f"{proc.args[-2]} child", [proc], timeout=timeout)
        data: dict[str, Any] = json.loads(ready.read_text())
        return data

    def netns(self, pod: str) -> list[str]:
        return ["ip", "netns", "exec", self.pods[pod].netns]

    def start_backend(self, pod: str) -> None:
        if self.tools.backend == "python":
            self.wait_ready(self.child("backend", {}, prefix=self.netns(pod)))
            return
        d = self._next(f"nginx-{pod}")
        d.mkdir()
        body = BODY.decode()
        # nginx cannot return NUL bytes from its config: the gRPC-shaped answer is 1,029 bytes of
        # text in place of the 5-byte length prefix and message (no proxy on the path parses it).
        grpc_body = "GRPC:" + "y" * 1024
        temp = " ".join(
            f"{k}_temp_path {d}/{k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        conf = d / "nginx.conf"
        conf.write_text(
            f"daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n"
            "events { worker_connections 8192; }\n"
            f"http {{\n  access_log off;\n  {temp}\n  keepalive_requests 10000000;\n  keepalive_timeout 300s;\n"
            f"  server {{\n    listen 0.0.0.0:{APP_PORTS['http1']};\n"
            f'    location / {{ default_type application/octet-stream; return 200 "{body}"; }}\n  }}\n'
            f"  server {{\n    listen 0.0.0.0:{APP_PORTS['grpc']} http2;\n"
            "    location / { default_type application/grpc; add_trailer grpc-status 0 always;"
            f' return 200 "{grpc_body}"; }}\n  }}\n}}\n'
        )
        proc = self.procs.start(f"nginx-{pod}", [*self.netns(pod), "nginx", "-c", str(conf)])
        dp.wait_for(
            lambda: all(dp.listening(p, proc.pid) for p in APP_PORTS.values()), f"nginx in {pod}", [proc]
        )

    def start_authorizer(self) -> None:
        if self.authorizer == "peer":
            peer = ROOT / "tests" / "waypoint" / "authz_peer.py"
            argv = [*self.netns("ext-authz"), PYTHON, str(peer), str(AUTHZ_PORT), str(AUTHZ_PORT + 1)]
            proc = self.procs.start("authz-peer", argv)
            log = dp.LOGS[proc.pid]  # its stdout: it prints "ready" once serving
            dp.wait_for(lambda: b"ready" in log.read_bytes(), "authz_peer.py", [proc], timeout=60)
        else:
            started = self.child("authorizer", {}, prefix=self.netns("ext-authz"))
            self.wait_ready(started)
            proc = started[0]
        self.pids["authorizer"] = proc.pid

    def check_enforced(self) -> None:
        """Before measuring: without its header a request of ``waypoint+jwt`` (no token) or of
        ``waypoint+ext_authz`` (the authorizer says no) is refused, with it it is not — the
        policies are in force and the figures are of the work they ask for."""
        for path in ADDED:
            for protocol in PROTOCOLS:
                for headers, refused in (([], True), (request_headers(path, self.jwt.token), False)):
                    out = self.python_load(path, protocol, 1, 1, 0.3, headers)
                    n, non2xx = out["requests"], out["non2xx"]
                    if n <= 0 or out["errors"] or non2xx != (n if refused else 0):
                        raise dp.BenchError(
                            f"{path}/{protocol} with headers {[k for k, _ in headers]}: expected every"
                            f" request {'refused' if refused else 'answered 2xx'}, got {out}"
                        )

    def check_waf_loaded(self) -> None:
        """Every WafPolicy of the mesh is in force in the waypoint, as written."""
        got = {d["name"]: d for d in self.waf_policies}
        for path in WAF_PATHS:
            d = got.get(SERVICES[path])
            if d is None or not d["in_force"] or d["error"] or d["mode"] != WAF_MODES[path]:
                raise dp.BenchError(f"{path}: its WafPolicy is not in force in the waypoint: {d}")

    def check_waf(self) -> None:
        """Before measuring: an SQL injection is refused (403) by the Enforce path only, and the
        WAF's clean shapes pass everywhere: the policies are in force, the shapes are clean."""
        for path in WAF_PATHS:
            refused = path == "waypoint+waf-enforce"
            out = self.python_load(path, "get1k", 1, 1, 0.3, [], target=WAF_ATTACK)
            n, non2xx = out["requests"], out["non2xx"]
            if n <= 0 or out["errors"] or non2xx != (n if refused else 0):
                raise dp.BenchError(
                    f"{path}: an SQL injection: expected every request"
                    f" {'refused' if refused else 'answered 2xx'}, got {out}"
                )
            for shape in SHAPES:
                out = self.python_load(path, shape, 1, 1, 0.3, [])
                if out["requests"] <= 0 or out["errors"] or out["non2xx"]:
                    raise dp.BenchError(f"{path}/{shape}: expected every request answered 2xx, got {out}")

    def start_haproxy_chain(self) -> None:
        """client pod: plain in, TLS out → refmid pod: TLS in, route, TLS out → server pod: TLS in,
        plain to the server. ``mode http`` everywhere, mutual TLS 1.3 on both TLS hops, HTTP/1.1
        for the HTTP/1.1 test and HTTP/2 (ALPN h2, prior knowledge at the ends) for gRPC."""
        assert self.tools.haproxy
        creds = self.work / "creds"
        root = creds / "client" / "root-cert.pem"
        head = (
            "global\n  maxconn 5000\n"
            "defaults\n  mode http\n  option http-keep-alive\n  timeout connect 5s\n"
            "  timeout client 1h\n  timeout server 1h\n  timeout http-keep-alive 1h\n"
        )
        tls_in = f"ssl crt {{crt}} ca-file {root} verify required ssl-min-ver TLSv1.3 alpn {{alpn}}"
        tls_out = f"ssl verify required ca-file {root} crt {{crt}} ssl-min-ver TLSv1.3 alpn {{alpn}}"
        confs: dict[str, str] = {"client": head, "refmid": head, "server": head}
        for proto, (c_port, m_port, s_port) in REF_PORTS.items():
            alpn = "h2" if proto == "grpc" else "http/1.1"
            h2 = " proto h2" if proto == "grpc" else ""
            app = APP_PORTS[proto]
            c_crt, m_crt, s_crt = (creds / n / "combined.pem" for n in ("client", "refmid", "server"))
            confs["client"] += (
                f"frontend in_{proto}\n  bind 127.0.0.1:{c_port}{h2}\n  default_backend out_{proto}\n"
                f"backend out_{proto}\n  server mid {REFMID_IP}:{m_port} "
                + tls_out.format(crt=c_crt, alpn=alpn)
                + "\n"
            )
            confs["refmid"] += (
                f"frontend in_{proto}\n  bind 0.0.0.0:{m_port} " + tls_in.format(crt=m_crt, alpn=alpn) + "\n"
                f"  default_backend out_{proto}\n"
                f"backend out_{proto}\n  server srv {SERVER_IP}:{s_port} "
                + tls_out.format(crt=m_crt, alpn=alpn)
                + "\n"
            )
            confs["server"] += (
                f"frontend in_{proto}\n  bind 0.0.0.0:{s_port} " + tls_in.format(crt=s_crt, alpn=alpn) + "\n"
                f"  default_backend out_{proto}\n"
                f"backend out_{proto}\n  server app 127.0.0.1:{app}{h2}\n"
            )
        for pod, ports in (("server", 2), ("refmid", 1), ("client", 0)):
            conf = self._next(f"haproxy-{pod}.cfg")
            conf.write_text(confs[pod])
            proc = self.procs.start(
                f"haproxy-{pod}", [*self.netns(pod), self.tools.haproxy, "-db", "-f", str(conf)]
            )
            want = [REF_PORTS[p][ports] for p in PROTOCOLS]
            dp.wait_for(
                lambda w=want, pid=proc.pid: all(dp.listening(p, pid) for p in w), f"haproxy {pod}", [proc]
            )
            self.pids[f"haproxy-{pod}"] = proc.pid

    def teardown(self) -> list[str]:
        self.procs.stop_all()
        return self.topo.destroy() if self.topo is not None else []

    # -- one measurement --------------------------------------------------------------------------

    def target(self, path: str, protocol: str) -> tuple[str, str, int]:
        """(client pod, host, port) a request of ``path`` is sent from and to."""
        proto = "grpc" if protocol == "grpc" else "http1"  # the WAF's shapes are HTTP/1.1
        if path == "direct":
            return "client", SERVER_IP, APP_PORTS[proto]
        if path == "haproxy":
            return "client", "127.0.0.1", REF_PORTS[proto][0]
        return "frontend", VIPS[path], SVC_PORTS[proto]

    def proxies(self, path: str) -> list[str]:
        """The proxies whose CPU a request of ``path`` costs (on ``waypoint+ext_authz`` ztunnel-2
        also carries the waypoint's HBONE stream to the authorizer, which is counted apart)."""
        if path in WAYPOINT_PATHS:
            return ["ztunnel-1", "waypoint", "ztunnel-2"]
        return {
            "direct": [],
            "mesh": ["ztunnel-1", "ztunnel-2"],
            "haproxy": ["haproxy-client", "haproxy-refmid", "haproxy-server"],
        }[path]

    def middle(self, path: str) -> str | None:
        return "waypoint" if path in WAYPOINT_PATHS else {"haproxy": "haproxy-refmid"}.get(path)

    def load(
        self, path: str, protocol: str, conns: int, streams: int, seconds: int, latency: bool = False
    ) -> dict[str, float]:
        """One load-generator run; returns requests, rps, p50_us, p99_us, errors, non2xx.

        ``latency``: the one-connection run. For HTTP/1.1 it is ``h2load --h1`` rather than wrk,
        whose per-request latencies on one connection are not self-consistent here (226,008
        requests in 3.0 s on one connection, each waiting for the last, reported with a mean of
        386 µs and a p99 of 7 ms); h2load's per-request log is exact.
        """
        out = self._load(path, protocol, conns, streams, seconds, latency)
        if out["requests"] <= 0 or out["non2xx"] >= out["requests"]:
            raise dp.BenchError(f"{path}/{protocol}: no successful request ({out})")
        return out

    def _load(
        self, path: str, protocol: str, conns: int, streams: int, seconds: int, latency: bool
    ) -> dict[str, float]:
        pod, host, port = self.target(path, protocol)
        timeout = seconds + 60
        extra = request_headers(path, self.jwt.token)
        if self.tools.load == "python":
            return self.python_load(path, protocol, conns, streams, seconds, extra)
        url = f"http://{host}:{port}" + (
            URL_PATHS["grpc"] if protocol == "grpc" else request_target(protocol)
        )
        if protocol != "grpc" and not latency:
            script = self.work / f"wrk-{protocol}-{path}.lua"
            if not script.exists():
                script.write_text(wrk_script(path, protocol))
            argv = ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--timeout", "10s", "-s", str(script)]
            for k, v in extra:
                argv += ["-H", f"{k}: {v}"]
            argv.append(url)
            return parse_wrk(self.run_out("wrk", [*self.netns(pod), *argv], timeout))
        body = self.work / f"{protocol}-request.bin"
        if not body.exists():
            body.write_bytes(GRPC_FRAME if protocol == "grpc" else request_body(protocol))
        log_file = self._next("h2load.log")
        argv = ["h2load", "-t1", f"-c{conns}", f"-m{streams}", f"-D{seconds}"]
        if body.stat().st_size:  # h2load POSTs its -d file; without one it GETs
            argv += ["-d", str(body)]
        headers = (
            GRPC_REQUEST_HEADERS
            if protocol == "grpc"
            # h2load adds a "host" header to its own: the Host is set as :authority
            else tuple((":authority" if k == "host" else k, v) for k, v in shape_headers(protocol, path))
        )
        for k, v in (*headers, *extra):
            argv += ["-H", f"{k}: {v}"]
        if protocol != "grpc":
            argv.append("--h1")
        argv += ["--log-file", str(log_file), url]
        out = parse_h2load(self.run_out("h2load", [*self.netns(pod), *argv], timeout), log_file)
        log_file.unlink(missing_ok=True)
        return out

    def python_load(
        self,
        path: str,
        protocol: str,
        conns: int,
        streams: int,
        seconds: float,
        headers: list[tuple[str, str]],
        target: str | None = None,
    ) -> dict[str, float]:
        """One run of this file's Python load generator (``_child load``) in the client's pod
        (``target``: another request target for the HTTP/1.1 workloads)."""
        pod, host, port = self.target(path, protocol)
        spec = {"protocol": protocol, "host": host, "port": port, "connections": conns,
                "streams": streams, "seconds": seconds, "headers": headers}  # fmt: skip
        if protocol != "grpc":
            spec["request"] = h1_request(path, protocol, host, port, headers, target).decode("latin-1")
        spec_path = self._next("load.json")
        spec_path.write_text(json.dumps(spec))
        out = self.run_out(
            "load", [*self.netns(pod), PYTHON, SELF, "_child", "load", str(spec_path)], seconds + 60
        )
        return dict(json.loads(out))

    def run_out(self, name: str, argv: list[str], timeout: float) -> str:
        proc = self.procs.start(name, argv, stdout=subprocess.PIPE)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.procs.stop(proc)
            raise dp.BenchError(f"{name} timed out after {timeout:.0f} s") from None
        self.procs.stop(proc)
        if proc.returncode != 0:
            raise dp.BenchError(f"{name} failed with {proc.returncode}:\n{dp.log_tail(proc)}")
        return out.decode()

    def waypoint_counters(self) -> dict[str, float]:
        """What the waypoint says it handled: ``requests`` (istio_requests_total summed over every
        label set), ``waf_<action>`` (istio_waf_requests_total by action: allow, detect, block) and
        ``waf_matches`` (istio_waf_rule_matches_total summed)."""
        url = f"http://127.0.0.1:{self.waypoint_stats}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            text = r.read().decode()
        out: dict[str, float] = defaultdict(float)
        for line in text.splitlines():
            name, _, rest = line.partition("{")
            if not rest or line.startswith("#"):
                continue
            value = float(line.rsplit(" ", 1)[1])
            if name == "istio_requests_total":
                out["requests"] += value
            elif name == "istio_waf_requests_total":
                action = rest.split('action="', 1)[1].split('"', 1)[0]
                out[f"waf_{action}"] += value
            elif name == "istio_waf_rule_matches_total":
                out["waf_matches"] += value
        return out

    def waypoint_requests(self) -> float:
        return self.waypoint_counters()["requests"]

    def check_alive(self) -> None:
        for proc in self.procs.procs:
            if proc.poll() is not None and proc.args[-3:-1] != ["_child", "load"]:
                raise dp.BenchError(f"{proc.args!r} died with {proc.returncode}:\n{dp.log_tail(proc)}")

    def measure(self, path: str, protocol: str, profile_dir: Path | None = None) -> dict[str, float]:
        s = self.s
        conns, streams = (s.h1_connections, 1) if protocol == "http1" else (s.h2_connections, s.h2_streams)
        pids = [self.pids[r] for r in self.proxies(path)]
        middle = self.middle(path)
        out: dict[str, float] = {}
        if s.warmup_seconds:
            self.load(path, protocol, conns, streams, s.warmup_seconds)
        authz = [self.pids["authorizer"]] if path == "waypoint+ext_authz" else []
        counted0 = self.waypoint_counters()
        seen0 = counted0["requests"]
        cpu0, authz0 = dp.cpu_split(pids), dp.cpu_split(authz)
        mid0 = dp.cpu_split([self.pids[middle]]) if middle else (0.0, 0.0)
        with RssSampler([self.pids[middle]] if middle else []) as rss:
            tput = self.load(path, protocol, conns, streams, s.duration)
        cpu1, authz1 = dp.cpu_split(pids), dp.cpu_split(authz)
        mid1 = dp.cpu_split([self.pids[middle]]) if middle else (0.0, 0.0)
        counted1 = self.waypoint_counters()
        seen = counted1["requests"] - seen0
        n = tput["requests"]
        out["rps"] = tput["rps"]
        out["load_p50_us"], out["load_p99_us"] = tput["p50_us"], tput["p99_us"]
        out["errors"] = tput["errors"] + tput["non2xx"]
        out["waypoint_requests_per_client_request"] = seen / max(n, 1)
        if pids:
            out["cpu_us_per_req"] = (sum(cpu1) - sum(cpu0)) / max(n, 1) * 1e6
        if middle:
            user, system = dp.per_op_us(mid0, mid1, n)
            out["mid_cpu_user_us_per_req"], out["mid_cpu_sys_us_per_req"] = user, system
            out["mid_cpu_us_per_req"] = user + system
            out["mid_rss_mib"] = rss.peak[self.pids[middle]]
        if authz:
            out["authz_cpu_us_per_req"] = sum(dp.per_op_us(authz0, authz1, n))
        # Through the waypoint every request must be counted by it, on every other path none.
        through = path in WAYPOINT_PATHS
        if through != (seen > 0) or (through and seen < 0.9 * n):
            raise dp.BenchError(
                f"{path}/{protocol}: the waypoint counted {seen:.0f} requests for {n:.0f} sent"
            )
        if path in WAF_PATHS:
            # Inspected: every request (none when Disabled); clean: no rule matched, none refused.
            waf = {
                k: counted1[k] - counted0[k] for k in ("waf_allow", "waf_detect", "waf_block", "waf_matches")
            }
            out["waf_inspected_per_req"] = sum(
                waf[k] for k in ("waf_allow", "waf_detect", "waf_block")
            ) / max(n, 1)
            inspected = WAF_MODES[path] != "Disabled"
            if (
                waf["waf_detect"]
                or waf["waf_block"]
                or waf["waf_matches"]
                or (inspected != (out["waf_inspected_per_req"] >= 0.9))
            ):
                raise dp.BenchError(f"{path}/{protocol}: the WAF counted {waf} for {n:.0f} requests sent")
        lat = self.load(path, protocol, 1, 1, s.latency_seconds, latency=True)
        out["p50_us"], out["p99_us"] = lat["p50_us"], lat["p99_us"]
        out["errors"] += lat["errors"] + lat["non2xx"]
        if profile_dir is not None and through and self.tools.pyspy:
            self.profile(path, protocol, conns, streams, profile_dir)
        self.check_alive()
        return out

    def profile(self, path: str, protocol: str, conns: int, streams: int, profile_dir: Path) -> None:
        """py-spy (Python frames, ``--nonblocking``: the waypoint is never paused) on the waypoint
        during one more throughput run of ``path`` and ``protocol``; beside it, the run's rate,
        to turn samples into µs per request."""
        assert self.tools.pyspy
        secs = self.s.profile_seconds
        outfile = profile_dir / f"{path}-{protocol}.txt"
        argv = [
            self.tools.pyspy,
            "record",
            "-p",
            str(self.pids["waypoint"]),
            "-d",
            str(secs),
            "-r",
            str(SPY_RATE),
        ]
        argv += ["--nonblocking", "--format", "raw", "-o", str(outfile)]
        spy = self.procs.start(f"py-spy-{path}-{protocol}", argv)
        out = self.load(path, protocol, conns, streams, secs + 2)
        spy.wait(timeout=60)
        self.procs.stop(spy)
        if not outfile.exists():
            raise dp.BenchError(f"py-spy wrote nothing:\n{dp.log_tail(spy)}")
        outfile.with_suffix(".json").write_text(json.dumps({"requests": out["rps"] * secs}))


def wrk_script(path: str, workload: str) -> str:
    """wrk's Lua script for an HTTP/1.1 workload on ``path`` (the target is in the URL)."""
    if workload == "http1":
        return WRK_SCRIPT
    lines = [f'wrk.method = "{"GET" if workload == "get1k" else "POST"}"']
    for k, v in shape_headers(workload, path):
        lines.append(f'wrk.headers["{k.title()}"] = "{v}"')
    body = request_body(workload).decode()
    if body:
        assert "]==]" not in body
        lines.append(f"wrk.body = [==[{body}]==]")
    return "\n".join(lines) + "\n" + WRK_DONE


WRK_DONE = """\
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "errors": %d, "non2xx": %d, "p50_us": %d, "p99_us": %d}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99)))
end
"""
WRK_SCRIPT = (
    """\
wrk.method = "POST"
wrk.body = string.rep("x", 1024)
wrk.headers["Content-Type"] = "application/octet-stream"
"""
    + WRK_DONE
)


def parse_wrk(out: str) -> dict[str, float]:
    for line in out.splitlines():
        if line.startswith("WRKJSON "):
            d = json.loads(line[len("WRKJSON ") :])
            return {
                "requests": d["requests"],
                "rps": d["requests"] / (d["duration_us"] / 1e6),
                "p50_us": d["p50_us"],
                "p99_us": d["p99_us"],
                "errors": d["errors"],
                "non2xx": d["non2xx"],
            }
    raise dp.BenchError(f"wrk printed no summary:\n{out[-2000:]}")


def parse_h2load(out: str, log_file: Path) -> dict[str, float]:
    """h2load's summary for counts and rate; latency percentiles from its per-request log
    (``--log-file``: start µs, status, µs to the end of the response)."""
    rps = succeeded = failed = 0.0
    non2xx = 0.0
    for raw in out.splitlines():
        line = raw.strip()
        if line.startswith("finished in"):
            rps = float(line.split(",")[1].split()[0])
        elif line.startswith("requests:"):
            fields = {v.split()[1]: float(v.split()[0]) for v in line[len("requests:") :].split(",")}
            succeeded = fields["succeeded"]
            failed = fields["failed"] + fields["errored"] + fields["timeout"]
        elif line.startswith("status codes:"):
            for part in line[len("status codes:") :].split(","):
                count, code = part.split()
                if code != "2xx":
                    non2xx += float(count)
    lat = []
    for row in log_file.read_text().splitlines():
        cols = row.split("\t")
        if len(cols) >= 3 and cols[1].startswith("2"):
            lat.append(float(cols[2]))
    if not succeeded or not lat:
        raise dp.BenchError(f"h2load: no successful request:\n{out[-2000:]}")
    p50, p99 = _percentiles(lat)
    return {
        "requests": succeeded,
        "rps": rps,
        "p50_us": p50,
        "p99_us": p99,
        "errors": failed,
        "non2xx": non2xx,
    }


# -- profile summary ----------------------------------------------------------------------------------

SPY_RATE = 200  # py-spy samples per second: one busy sample is 5,000 µs of the waypoint's time

BUCKETS = [  # (what the frame's file path contains, bucket) — first match wins
    # A WAF worker thread in libmodsecurity shows as the Python frame that called it (cffi releases
    # the GIL; py-spy counts the thread busy while it runs): its C time lands in capi.py.
    ("/waypoint/waf/capi.py", "WAF: libmodsecurity, C (waypoint/waf/capi.py)"),
    ("/waypoint/waf/", "WAF: Python (waypoint/waf: engine, findings, policies)"),
    ("/cffi/", "WAF: Python (waypoint/waf: engine, findings, policies)"),
    ("/concurrent/futures/", "thread pool (concurrent.futures, threading)"),
    ("/threading.py", "thread pool (concurrent.futures, threading)"),
    ("/waypoint/jwt.py", "JWT (waypoint/jwt.py)"),
    ("/jwt/", "PyJWT + cryptography"),
    ("/cryptography/", "PyJWT + cryptography"),
    ("/waypoint/extauthz.py", "ext_authz client (waypoint/extauthz.py)"),
    ("/google/protobuf/", "protobuf"),
    ("/waypoint/http1.py", "waypoint HTTP/1.1 engine (waypoint/http1.py)"),
    ("/waypoint/http2.py", "waypoint HTTP/2 engine (waypoint/http2.py)"),
    ("/waypoint/metrics.py", "metrics + access log (waypoint/metrics.py)"),
    ("/waypoint/", "waypoint, other (app, routing, bytestream, request)"),
    ("/mesh/l7authz", "L7 authorization (mesh/l7authz)"),
    ("/mesh/pathnorm", "path normalization (mesh/pathnorm.py)"),
    ("/mesh/hbone/", "HBONE (mesh/hbone)"),
    ("/mesh/log.py", "logging (structlog, mesh/log.py, json)"),
    ("/structlog/", "logging (structlog, mesh/log.py, json)"),
    ("/json/", "logging (structlog, mesh/log.py, json)"),
    ("/prometheus_client/", "prometheus_client"),
    ("/h11/", "h11"),
    ("/h2/", "h2 + hpack + hyperframe"),
    ("/hpack/", "h2 + hpack + hyperframe"),
    ("/hyperframe/", "h2 + hpack + hyperframe"),
    ("/ssl.py", "TLS (ssl.py: OpenSSL and its copies)"),
    ("/asyncio/runners.py", "event loop in C (uvloop: system calls, transports)"),
    ("/asyncio/", "asyncio (Python parts)"),
    ("/mesh/", "mesh, other"),
]


def _frame_file(frame: str) -> str:
    """``name (path:line)`` → ``/path`` (py-spy prints paths relative to ``sys.path``)."""
    _, sep, loc = frame.partition(" (")
    return "/" + loc.rstrip(")").rsplit(":", 1)[0].lstrip("/") if sep else ""


def _bucket(frame: str) -> str:
    file = _frame_file(frame)
    return next((b for needle, b in BUCKETS if needle in file), "other")


def _own(path: Path, key: Any) -> tuple[int, dict[str, int]]:
    """Busy samples, and own samples by ``key(innermost frame)``."""
    own: dict[str, int] = defaultdict(int)
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        total += int(count_s)
        own[key(stack.split(";")[-1])] += int(count_s)
    return total, own


def profile_buckets(path: Path) -> tuple[int, list[tuple[str, int]]]:
    """Own time per component: each sample's innermost frame, by the file it is in."""
    total, own = _own(path, _bucket)
    return total, sorted(own.items(), key=lambda kv: -kv[1])


def profile_us(profile_dir: Path, path: str, protocol: str, key: Any) -> dict[str, float] | None:
    """The waypoint's own time in µs per request by ``key``, ``"total"`` included, from the
    recording of ``path`` (samples times the sampling interval, over the requests while recording)."""
    raw, side = profile_dir / f"{path}-{protocol}.txt", profile_dir / f"{path}-{protocol}.json"
    if not raw.exists() or not side.exists():
        return None
    requests = max(float(json.loads(side.read_text())["requests"]), 1.0)
    total, own = _own(raw, key)
    per = 1e6 / SPY_RATE / requests
    return {"total": total * per, **{k: n * per for k, n in own.items()}}


def added_time_markdown(profile_dir: Path, top: int = 8) -> str:
    """Where the added paths' extra time goes: the waypoint's own µs per request by component
    and by function, each added path minus the plain waypoint path."""
    lines = [
        "## Where the added time goes (py-spy on the waypoint, own time, µs per request)",
        "",
        f"From the same recordings: busy samples {TIMES} {1e6 / SPY_RATE:,.0f} µs ÷ the requests of the"
        " recording (its throughput run's rate times its length), for the plain waypoint path and each added"
        " path; Δ = added path minus waypoint. Sampled, and from throughput runs, so ± a few µs; the"
        " authorizer's own CPU is not in it (see the added-cost table).",
        "",
    ]
    for protocol in WORKLOADS:
        base = profile_us(profile_dir, "waypoint", protocol, _bucket)
        candidates = [p for p in (*ADDED, *WAF_PATHS) if protocol in workloads(p)]
        added = {p: profile_us(profile_dir, p, protocol, _bucket) for p in candidates}
        present = [p for p in candidates if added[p] is not None]
        if base is None or not present:
            continue
        lines += [f"### {PY_PROTO_TITLES[protocol]}: by component", ""]
        lines.append("| component | waypoint | " + " | ".join(f"{p} | Δ" for p in present) + " |")
        lines.append("|---|---:|" + "---:|---:|" * len(present))
        comps = sorted(
            set(base) | {c for p in present for c in added[p] or {}},
            key=lambda c: (
                c != "total",
                -max(abs((added[p] or {}).get(c, 0) - base.get(c, 0)) for p in present),
            ),
        )
        for c in comps:
            cells = [f"{_f(base.get(c, 0.0), 1)}"]
            for p in present:
                v = (added[p] or {}).get(c, 0.0)
                cells += [_f(v, 1), f"{v - base.get(c, 0.0):+,.1f}"]
            name = "**all (busy samples)**" if c == "total" else c
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
        fbase = profile_us(profile_dir, "waypoint", protocol, dp._function) or {}
        for p in present:
            fadded = profile_us(profile_dir, p, protocol, dp._function) or {}
            delta = sorted(
                ((fn, v - fbase.get(fn, 0.0)) for fn, v in fadded.items() if fn != "total"),
                key=lambda kv: -kv[1],
            )[:top]
            lines += [f"### {PY_PROTO_TITLES[protocol]}: {p}, the functions that grew most", ""]
            lines += ["| # | function | own µs/req | Δ µs/req |", "|---|---|---:|---:|"]
            for i, (fn, d) in enumerate(delta, 1):
                fn_md = fn.replace("|", "\\|")
                lines.append(f"| {i} | `{fn_md}` | {fadded[fn]:,.1f} | {d:+,.1f} |")
            lines.append("")
    return "\n".join(lines)


def profile_markdown(profile_dir: Path, top: int = 15) -> str:
    lines = [
        "## Profile of the waypoint under load (py-spy, Python frames, own time)",
        "",
        "Recorded with `py-spy record --nonblocking -r 200` on the waypoint process during one more"
        " throughput run per protocol. Only busy samples count. Own time of `Runner.run` is time in"
        " uvloop's C event loop (socket system calls, transports); `SSLObject.read`/`write` is OpenSSL"
        " with the copies around it. Every thread is sampled: the WAF's worker threads run ModSecurity"
        " with the GIL released, and their C time is the own time of the `waypoint/waf/capi.py` frame"
        " that called it (most CRS rules run in phase 2, `process_request_body`, with or without a body);"
        " own time of `_worker` is a worker thread in the pool's queue while runnable: hand-off, not work.",
        "",
    ]
    recordings = [("waypoint", q, PY_PROTO_TITLES[q]) for q in PROTOCOLS] + [
        ("waypoint+waf-enforce", q, f"WAF Enforce (PL 1), {PY_PROTO_TITLES[q]}") for q in SHAPES
    ]
    for name, protocol, title in recordings:
        path = profile_dir / f"{name}-{protocol}.txt"  # the plain waypoint path; the WAF in Enforce
        if not path.exists():
            continue
        total, buckets = profile_buckets(path)
        lines += [f"### {title}: by component ({total} busy samples)", ""]
        lines += ["| component | own % |", "|---|---:|"]
        lines += [f"| {b} | {100 * n / max(total, 1):.1f} |" for b, n in buckets]
        lines.append("")
        total, ranked = dp.summarize_profile(path, top)
        lines += [f"### {title}: top functions", ""]
        lines += ["| # | function | own % | incl. % |", "|---|---|---:|---:|"]
        for i, (fn, n, inc) in enumerate(ranked, 1):
            fn_md = fn.replace("|", "\\|")
            lines.append(f"| {i} | `{fn_md}` | {100 * n / total:.1f} | {100 * inc / total:.1f} |")
        lines.append("")
    return "\n".join(lines)


# -- report -----------------------------------------------------------------------------------------


def _f(v: float | None, digits: int = 0) -> str:
    return "—" if v is None else f"{v:,.{digits}f}"


def _r(a: float | None, b: float | None) -> str:
    if a is None or b is None or b <= 0:
        return "—"
    return f"{a / b:.2f}{TIMES}"


def _paired(
    runs: dict[str, dict[str, list[dict[str, float]]]],
    path: str,
    protocol: str,
    key: str,
    ratio: bool = False,
) -> float | None:
    """Median over the repeats of (``path`` minus ``waypoint``), or the ratio, for ``key``, each pair from
    the same repeat, so that the machine's drift between repeats cancels."""
    pairs = [
        (b[key], r[key])
        for b, r in zip(runs["waypoint"][protocol], runs[path][protocol], strict=False)
        if key in b and key in r
    ]
    if not pairs:
        return None
    return statistics.median(r / b if ratio else r - b for b, r in pairs if not ratio or b > 0)


def _signed(v: float | None) -> str:
    return "—" if v is None else f"{v:+,.0f}"


def added_cost_markdown(
    runs: dict[str, dict[str, list[dict[str, float]]]],
    paths: list[str],
    authorizer: str,
    jwt_micro: dict[str, float] | None,
) -> list[str]:
    added = [p for p in ADDED if p in paths and "waypoint" in paths]
    if not added:
        return []
    lines = [
        "",
        "## Added cost over the plain waypoint path (same run)",
        "",
        "| added to the waypoint | protocol | waypoint p50 µs | added p50 µs | added p99 µs"
        " | added waypoint CPU µs/req | added proxies' CPU µs/req | authorizer CPU µs/req | req/s ÷ waypoint |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    summary: dict[str, list[str]] = {p: [] for p in added}
    for p in added:
        for q in PROTOCOLS:
            if not runs[p][q] or not runs["waypoint"][q]:
                continue
            base_p50 = statistics.median(r["p50_us"] for r in runs["waypoint"][q])
            d50, d99 = _paired(runs, p, q, "p50_us"), _paired(runs, p, q, "p99_us")
            dcpu, dall = _paired(runs, p, q, "mid_cpu_us_per_req"), _paired(runs, p, q, "cpu_us_per_req")
            authz = [r["authz_cpu_us_per_req"] for r in runs[p][q] if "authz_cpu_us_per_req" in r]
            lines.append(
                f"| {ADDED_LABELS[p]} | {q} | {_f(base_p50)} | {_signed(d50)} | {_signed(d99)} | {_signed(dcpu)}"
                f" | {_signed(dall)} | {_f(statistics.median(authz)) if authz else '—'}"
                f" | {_r(_paired(runs, p, q, 'rps', ratio=True), 1.0)} |"
            )
            summary[p].append(
                f"{'HTTP/1.1' if q == 'http1' else 'gRPC'}: {_signed(d50)} µs p50, {_signed(d99)} µs p99,"
                f" {_signed(dcpu)} µs of waypoint CPU"
            )
    lines += [
        "",
        "Each figure is the median over the repeats of (added path minus `waypoint` path) measured in the same"
        " repeat, on the same waypoint, services on the same backend pods: the `waypoint` path evaluates one"
        " DENY policy; `waypoint+jwt` adds a RequestAuthentication (inline JWKS, so no network) and a DENY"
        ' `notRequestPrincipals: ["*"]`, every request carrying `Authorization: Bearer` with one RS256'
        " token; `waypoint+ext_authz` adds a CUSTOM policy whose `envoyExtAuthzGrpc` provider is an"
        " authorizer pod in the mesh (node 2; the waypoint reaches it through HBONE and ztunnel-2), every"
        " request carrying `x-ext-authz: allow`. Latency: the one-connection runs; CPU: the throughput"
        " runs. Proxies' CPU includes ztunnel-2's share of the authorizer's HBONE stream; the"
        " authorizer's own CPU is the column after it. A difference smaller than the repeats' spread"
        " (see Every repeat) is noise: the machine is shared.",
        "",
        "Added cost per request:",
        "",
    ]
    for p in added:
        lines.append(f"- **{ADDED_LABELS[p]}** — " + "; ".join(summary[p]) + ".")
    if jwt_micro:
        lines.append(
            f"- The RS256 signature check is paid once per token, not per request: the waypoint caches"
            f" validated tokens (waypoint/jwt.py, by token text until `exp`), so the `waypoint+jwt` path,"
            f" one token per client, measures the cached case. The JWT step alone, in-process"
            f" (`Authenticator.authenticate`, median of {jwt_micro['tokens']:.0f} tokens):"
            f" {jwt_micro['new_token_us']:,.0f} µs for a token not seen before (signature checked),"
            f" {jwt_micro['cached_token_us']:,.1f} µs for a cached one."
        )
    lines.append(
        "- Authorizer: "
        + (
            "the lean grpcio Check server in benchmarks/waypoint.py (`_child authorizer`: tests/waypoint/"
            "authz_peer.py's server, 8 threads, answering an empty OK — no header edits to apply)."
            if authorizer == "lean"
            else "tests/waypoint/authz_peer.py (its OK adds four request headers, removes one and adds a"
            " response header: the waypoint's cost includes applying them)."
        )
    )
    return lines


def waf_markdown(
    runs: dict[str, dict[str, list[dict[str, float]]]],
    paths: list[str],
    waf_micro: dict[str, float] | None,
    waf_policies: list[dict[str, Any]],
) -> list[str]:
    """The WAF's table: its three modes on the WAF's shapes, next to the plain waypoint of the
    same run, the added cost paired by repeat; then the engine alone, in-process, per shape."""
    present = [p for p in WAF_PATHS if p in paths and "waypoint" in paths]
    if not present:
        return []
    rules = {d["name"]: d.get("rule_count") for d in waf_policies}
    lines = [
        "",
        "## The WAF: added cost over the plain waypoint path (same run)",
        "",
        "| WafPolicy on the service | request | req/s | req/s ÷ waypoint | p50 µs | p99 µs | added p50 µs"
        " | added p99 µs | waypoint CPU µs/req | added waypoint CPU µs/req | added proxies' CPU µs/req"
        " | inspected per request |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    summary: dict[str, list[str]] = {p: [] for p in present}
    for q in SHAPES:
        base = runs["waypoint"][q]
        if not base:
            continue
        b = {
            k: statistics.median(r[k] for r in base)
            for k in ("rps", "p50_us", "p99_us", "mid_cpu_us_per_req")
        }
        lines.append(
            f"| none (`waypoint`) | {q} | {_f(b['rps'])} | 1.00{TIMES} | {_f(b['p50_us'])} | {_f(b['p99_us'])}"
            f" | — | — | {_f(b['mid_cpu_us_per_req'])} | — | — | — |"
        )
        for p in present:
            rs = runs[p][q]
            if not rs:
                continue
            med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
            d50, d99 = _paired(runs, p, q, "p50_us"), _paired(runs, p, q, "p99_us")
            dcpu, dall = _paired(runs, p, q, "mid_cpu_us_per_req"), _paired(runs, p, q, "cpu_us_per_req")
            lines.append(
                f"| {WAF_MODES[p]}{'' if p == 'waypoint+waf-disabled' else ', PL 1'} | {q} | {_f(med['rps'])}"
                f" | {_r(_paired(runs, p, q, 'rps', ratio=True), 1.0)} | {_f(med['p50_us'])} | {_f(med['p99_us'])}"
                f" | {_signed(d50)} | {_signed(d99)} | {_f(med.get('mid_cpu_us_per_req'))} | {_signed(dcpu)}"
                f" | {_signed(dall)} | {_f(med.get('waf_inspected_per_req'), 2)} |"
            )
            summary[p].append(
                f"{PY_PROTO_TITLES[q].removeprefix('HTTP/1.1, ')}: {_signed(d50)} µs p50, {_signed(d99)} µs p99,"
                f" {_signed(dcpu)} µs of waypoint CPU, {_r(_paired(runs, p, q, 'rps', ratio=True), 1.0)} the req/s"
            )
    lines += [
        "",
        "Requests (HTTP/1.1, Host a service name, answer 1 KiB): `get1k`, a GET whose target is 1,024 bytes of"
        " clean query (16 parameters of words); `post16k`, a POST of a clean 16,384-byte JSON order"
        " (`application/json`: 32 items, 131 values, each an argument of the CRS's JSON body processor)."
        " Each WafPolicy targets its own Service (same pods, same waypoint, same DENY policy as `waypoint`),"
        " paranoia level 1, default thresholds and body limit (128 KiB: the whole body is buffered and"
        " inspected before it goes upstream)"
        + (f"; {rules.get(SERVICES['waypoint+waf-enforce'])} rules loaded" if rules else "")
        + ". Before measuring, the harness checks that an SQL injection is refused by the Enforce service"
        " only, and during every throughput run that the waypoint's `istio_waf_requests_total` grew by one per"
        " request on DetectOnly and Enforce (not at all on Disabled: `inspected per request`) with no rule"
        " matched: the figures are of clean traffic, no finding logged. Added figures: median over the repeats"
        " of (WAF path minus `waypoint` path in the same repeat); latency from the one-connection runs, CPU from"
        " the throughput runs; the waypoint's CPU includes its WAF threads (one per core per rule set). A"
        " difference smaller than the repeats' spread (see Every repeat) is noise: the machine is shared.",
        "",
        "Added cost per request:",
        "",
    ]
    for p in present:
        lines.append(
            f"- **WAF {LABELS[p].removeprefix('waypoint + WAF ')}** — " + "; ".join(summary[p]) + "."
        )
    lines.append(
        "- gRPC is not measured through the WAF: a WafPolicy's default (`bodies.inspectContentTypes` empty)"
        " does not feed gRPC, protobuf or `application/octet-stream` bodies to the rules (the CRS would read"
        " binary as text and false-positive); their URI and headers still are inspected: the last rows below."
    )
    if waf_micro:
        lines += [
            "",
            f"The WAF stage alone (`WafEngine.inspect_sync`, one transaction start to end, ModSecurity's C time"
            f" included, as the waypoint runs it on a worker thread), in-process, Enforce, paranoia level 1,"
            f" {waf_micro['rules']:.0f} rules, median of {waf_micro['samples']:.0f}; the body is given only when"
            " its type is inspected. Its cost grows with the number of arguments and their bytes, not with the"
            " request's size as such:",
            "",
            "| request | µs per request, one thread: wall | CPU |",
            "|---|---:|---:|",
        ]
        lines += [
            f"| {k} | {_f(v)} | {_f(waf_micro.get(f'{k} CPU'))} |"
            for k, v in waf_micro.items()
            if k not in ("rules", "samples") and not k.endswith(" CPU")
        ]
    return lines


def report(
    medians: dict[str, dict[str, dict[str, float]]],
    runs: dict[str, dict[str, list[dict[str, float]]]],
    s: Settings,
    tools: Tools,
    command: str,
    started: dt.datetime,
    elapsed: float,
    quick: bool,
    load_start: float,
    authorizer: str = "lean",
    jwt_micro: dict[str, float] | None = None,
    waf_micro: dict[str, float] | None = None,
    waf_policies: list[dict[str, Any]] | None = None,
) -> str:
    paths = [p for p in PATHS if any(medians[p].values())]
    titles = PROTO_TITLES if tools.load == "real" else PY_PROTO_TITLES
    lines = [
        "# Waypoint benchmark" + (" (QUICK MODE — not a measurement)" if quick else ""),
        "",
        f"- date: {started:%Y-%m-%d %H:%M} UTC, {elapsed / 60:.1f} min",
        f"- CPU: {dp.cpu_model()}, {os.cpu_count()} cores; kernel {platform.release()}",
        f"- load average (1 min) at start {load_start:.2f}, at end {os.getloadavg()[0]:.2f}",
        f"- commit: {dp.git_revision()}",
        f"- command: `{command}`",
        f"- tools: {tools.versions()}",
        f"- settings: repeat {s.repeat} (median shown, path order rotated); throughput runs {s.duration} s"
        f" (HTTP/1.1: {s.h1_connections} connections; HTTP/2: {s.h2_connections} connections,"
        f" {s.h2_streams} streams each), latency runs {s.latency_seconds} s on one connection, one request at"
        f" a time; warm-up {s.warmup_seconds} s per path and protocol",
    ]
    if not tools.haproxy:
        lines.append("- reference: **not run: haproxy not found** (Debian package haproxy)")
    for protocol in WORKLOADS:
        m = {p: medians[p][protocol] for p in paths if medians[p].get(protocol)}
        if not m:
            continue
        d, ref = m.get("direct", {}), m.get("haproxy", {})
        lines += [
            "",
            f"## {titles[protocol]}",
            "",
            "| path | req/s | p50 µs | p99 µs | added p50 µs | added p99 µs | proxies' CPU µs/req |"
            " middle hop CPU µs/req | middle hop RSS MiB | errors |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for p, x in m.items():
            added = (
                ("—", "—")
                if p == "direct" or not d
                else (_f(x["p50_us"] - d["p50_us"]), _f(x["p99_us"] - d["p99_us"]))
            )
            lines.append(
                f"| {LABELS[p]} | {_f(x['rps'])} | {_f(x['p50_us'])} | {_f(x['p99_us'])} | {added[0]} | {added[1]}"
                f" | {_f(x.get('cpu_us_per_req'))} | {_f(x.get('mid_cpu_us_per_req'))}"
                f" | {_f(x.get('mid_rss_mib'), 1)} | {_f(x['errors'])} |"
            )
        lines += [
            "",
            "| path | req/s ÷ direct | p50 ÷ direct | p99 ÷ direct | req/s ÷ reference | added p50 ÷ reference"
            " | added p99 ÷ reference | CPU/req ÷ reference | middle hop CPU/req ÷ reference"
            " | middle hop RSS ÷ reference |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for p, x in m.items():
            if p == "direct":
                continue
            to_ref = ["—"] * 6
            if ref and p != "haproxy":
                to_ref = [
                    _r(x["rps"], ref["rps"]),
                    _r(x["p50_us"] - d["p50_us"], ref["p50_us"] - d["p50_us"]),
                    _r(x["p99_us"] - d["p99_us"], ref["p99_us"] - d["p99_us"]),
                    _r(x.get("cpu_us_per_req"), ref.get("cpu_us_per_req")),
                    _r(x.get("mid_cpu_us_per_req"), ref.get("mid_cpu_us_per_req")),
                    _r(x.get("mid_rss_mib"), ref.get("mid_rss_mib")),
                ]
            lines.append(
                f"| {LABELS[p]} | {_r(x['rps'], d.get('rps'))} | {_r(x['p50_us'], d.get('p50_us'))}"
                f" | {_r(x['p99_us'], d.get('p99_us'))} | " + " | ".join(to_ref) + " |"
            )
    lines += [
        "",
        "req/s: the throughput run. p50/p99: the latency run (one connection, one request in flight;"
        " h2load's per-request log, `--h1` for HTTP/1.1, or the Python generator);"
        " added = the path's minus direct TCP's. Proxies' CPU: user+system seconds of every proxy"
        " process on the path (/proc/PID/stat; the two ztunnels, plus the waypoint; the three haproxy)"
        " over the throughput run, per request. Middle hop: the waypoint, or the middle haproxy. RSS:"
        " the largest VmRSS seen during the throughput run. Errors: failed or non-2xx requests."
        " The ztunnel processes also run their discovery clients; every load generator, backend and"
        " proxy shares the same cores.",
        *added_cost_markdown(runs, paths, authorizer, jwt_micro),
        *waf_markdown(runs, paths, waf_micro, waf_policies or []),
        "",
        "## On Istio's basis (≈ 0.25 vCPU and 60 MB per 1,000 requests/s for its waypoint)",
        "",
        "| middle hop | protocol | req/s | vCPU per 1,000 req/s | ÷ Istio's 0.25 | RSS MB under load"
        " | MB per 1,000 req/s | ÷ Istio's 60 |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for p in ("waypoint", "haproxy"):
        if p not in paths:
            continue
        for protocol in PROTOCOLS:
            x = medians[p][protocol]
            vcpu = x["mid_cpu_us_per_req"] / 1000  # CPU-s per request, times 1,000 requests/s
            mb = x["mid_rss_mib"] * 1.048576
            per_k = mb / (x["rps"] / 1000) if x["rps"] else None
            lines.append(
                f"| {'waypoint' if p == 'waypoint' else 'middle haproxy'} | {protocol} | {_f(x['rps'])}"
                f" | {vcpu:.3f} | {vcpu / ISTIO_VCPU_PER_1000:.2f}{TIMES} | {_f(mb, 1)} | {_f(per_k, 1)}"
                f" | {_r(per_k, ISTIO_MB_PER_1000)} |"
            )
    lines += [
        "",
        f"vCPU per 1,000 req/s = the middle hop's CPU-seconds per request {TIMES} 1,000. MB per 1,000 req/s ="
        " its RSS under the load ÷ the load in thousands of req/s, as Istio states it (memory does not"
        " scale linearly with the rate: the absolute RSS is the column before).",
        "",
        "## Every repeat",
        "",
        "| path | protocol | figure | values |",
        "|---|---|---|---|",
    ]
    for p in paths:
        for protocol in workloads(p):
            rs = runs[p][protocol]
            for k in rs[0] if rs else {}:
                lines.append(
                    f"| {LABELS[p]} | {protocol} | {k} | {', '.join(_f(r[k], 2 if 'rss' in k else 0) for r in rs)} |"
                )
    lines.append("")
    return "\n".join(lines)


# -- main -------------------------------------------------------------------------------------------


def orders(repeat: int) -> Iterator[list[str]]:
    for i in range(repeat):
        k = i % len(PATHS)
        order = PATHS[k:] + PATHS[:k]
        yield order[::-1] if i % 2 else order


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--repeat", type=int, default=None, help="repeats, median reported (default 3)")
    p.add_argument("--duration", type=int, default=None, help="seconds per throughput run (default 8)")
    p.add_argument("--latency-seconds", type=int, default=None, help="seconds per latency run (default 5)")
    p.add_argument(
        "--quick", action="store_true", help="every path once, tiny durations, Python load and backend"
    )
    p.add_argument(
        "--load",
        choices=["auto", "real", "python"],
        default="auto",
        help="wrk + h2load (real; default) or the Python generators (default with --quick)",
    )
    p.add_argument(
        "--backend",
        choices=["auto", "nginx", "python"],
        default="auto",
        help="nginx (default) or the Python backend (default with --quick)",
    )
    p.add_argument(
        "--authorizer",
        choices=["lean", "peer"],
        default="lean",
        help="the ext_authz server: this file's lean one (default) or tests/waypoint/authz_peer.py",
    )
    p.add_argument("--profile", action="store_true", help="py-spy the waypoint under load, summarize")
    p.add_argument("--profile-seconds", type=int, default=None, help="py-spy recording length (default 8)")
    p.add_argument("--output", metavar="FILE", help="write the markdown report here (default: stdout)")
    p.add_argument("--json", metavar="FILE", help="also write the raw figures as JSON")
    return p.parse_args(argv)  # fmt: skip


def main(argv: list[str]) -> int:
    if argv[:1] == ["_child"]:
        return child_main(argv[1], argv[2])
    args = parse_args(argv)
    s = Settings.quick() if args.quick else Settings()
    for key in ("repeat", "duration", "latency_seconds", "profile_seconds"):
        if getattr(args, key) is not None:
            setattr(s, key, getattr(args, key))
    tools = find_tools(args)
    if isinstance(tools, str):
        print(f"waypoint bench: {tools}", file=sys.stderr)
        return 2
    if args.profile and tools.pyspy is None:
        print("waypoint bench: --profile needs py-spy (pip install py-spy)", file=sys.stderr)
        return 2
    dp.raise_nofile()
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    command = shlex.join(["python", os.path.relpath(__file__, ROOT), *argv])
    started = dt.datetime.now(dt.UTC)
    load_start = os.getloadavg()[0]
    t0 = time.monotonic()

    def _term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)
    paths = [p for p in PATHS if p != "haproxy" or tools.haproxy]
    runs: dict[str, dict[str, list[dict[str, float]]]] = {p: {q: [] for q in workloads(p)} for p in PATHS}
    with tempfile.TemporaryDirectory(prefix="waypoint-bench-") as tmp:
        work = Path(tmp)
        (work / "logs").mkdir()
        procs = dp.Processes(work / "logs")
        bench = Bench(s, tools, work, procs, authorizer=args.authorizer)
        profile_dir = work / "profile" if args.profile else None
        if profile_dir is not None:
            profile_dir.mkdir()
        text = ""
        try:
            print(f"[{time.monotonic() - t0:6.1f}s] building the mesh", file=sys.stderr)
            bench.build()
            for i, order in enumerate(orders(s.repeat)):
                for path in (p for p in order if p in paths):
                    for protocol in workloads(path) if i % 2 == 0 else workloads(path)[::-1]:
                        print(
                            f"[{time.monotonic() - t0:6.1f}s] repeat {i + 1}/{s.repeat}: {path} {protocol}",
                            file=sys.stderr,
                        )
                        runs[path][protocol].append(
                            bench.measure(path, protocol, profile_dir if i == 0 else None)
                        )
            jwt_micro = jwt_microbench()
            print(f"[{time.monotonic() - t0:6.1f}s] the WAF engine in-process", file=sys.stderr)
            waf_micro = waf_microbench(3 if args.quick else 30)
            medians = {
                p: {
                    q: {k: statistics.median(r[k] for r in rs) for k in rs[0]} if (rs := runs[p][q]) else {}
                    for q in workloads(p)
                }
                for p in PATHS
            }
            text = report(
                medians, runs, s, tools, command, started, time.monotonic() - t0, args.quick, load_start,
                args.authorizer, jwt_micro, waf_micro, bench.waf_policies,
            )  # fmt: skip
            if profile_dir is not None:
                text += "\n" + profile_markdown(profile_dir) + "\n" + added_time_markdown(profile_dir)
        except dp.BenchError as e:
            print(f"waypoint bench: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("waypoint bench: interrupted, stopping everything", file=sys.stderr)
            return 130
        finally:
            old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                errors = bench.teardown()
            finally:
                for sig, handler in old.items():
                    signal.signal(sig, handler)
            if errors:
                print(f"waypoint bench: teardown: {'; '.join(errors)}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "settings": asdict(s),
                    "tools": asdict(tools),
                    "authorizer": args.authorizer,
                    "jwt_microbench": jwt_micro,
                    "waf_microbench": waf_micro,
                    "runs": runs,
                },
                indent=1,
            )
        )
    if args.output:
        Path(args.output).write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
