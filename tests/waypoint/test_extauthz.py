"""ext_authz without a network: what the authorizer is told and what its answers mean (Envoy's
semantics), the wire numbers authorizers rely on, and the client against a real grpcio server on
loopback (errors, timeouts, garbage)."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import threading
import time
from collections.abc import Hashable, Iterator
from concurrent import futures
from dataclasses import dataclass

import grpc
import pytest
from google.protobuf import wrappers_pb2

from mesh.model.meshconfig import ExtAuthzGrpc, ExtAuthzHttp, ExtAuthzRequestBody, ExtensionProvider
from mesh.proto import core_pb2, ext_authz_pb2, ext_authz_pb2_grpc
from waypoint.bytestream import ByteStream, TcpByteStream
from waypoint.extauthz import (
    Allowed,
    CheckFacts,
    Denied,
    ExtAuthz,
    HttpFacts,
    Peer,
    check_request,
    grpc_frame,
    grpc_unframe,
    grpc_verdict,
    header_matcher,
    http_check,
    http_verdict,
    on_error,
)

HVO = core_pb2.HeaderValueOption
GRPC = ExtAuthzGrpc("authz.shop.svc.cluster.local", 9000, timeout=2.0)
HTTP = ExtAuthzHttp("authz.shop.svc.cluster.local", 8000)
FACTS = CheckFacts(
    Peer("10.0.1.2", 40000, "spiffe://cluster.local/ns/shop/sa/frontend"),
    Peer("10.96.0.20", 80, "spiffe://cluster.local/ns/shop/sa/waypoint", "web.shop.svc.cluster.local"),
    HttpFacts(
        "POST",
        "/api/v1?x=1",
        "web.shop",
        "http",
        (
            ("x-a", "1"),
            ("x-a", "2"),
            ("authorization", "Bearer t"),
            ("content-length", "4"),
            ("connection", "x"),
        ),
        "HTTP/1.1",
        "req-1",
    ),
)


def test_envoy_field_numbers() -> None:
    """What ext_authz servers decode: Envoy's numbers (envoy/service/auth/v3)."""
    numbers = {
        ext_authz_pb2.CheckRequest: {"attributes": 1},
        ext_authz_pb2.AttributeContext: {"source": 1, "destination": 2, "request": 4, "context_extensions": 10},
        ext_authz_pb2.AttributeContext.Peer: {"address": 1, "service": 2, "labels": 3, "principal": 4},
        ext_authz_pb2.AttributeContext.HttpRequest: {
            "id": 1, "method": 2, "headers": 3, "path": 4, "host": 5, "scheme": 6, "size": 9, "protocol": 10,
            "body": 11, "raw_body": 12, "header_map": 13,
        },
        ext_authz_pb2.CheckResponse: {"status": 1, "denied_response": 2, "ok_response": 3, "error_response": 5},
        ext_authz_pb2.OkHttpResponse: {"headers": 2, "headers_to_remove": 5, "response_headers_to_add": 6},
        ext_authz_pb2.DeniedHttpResponse: {"status": 1, "headers": 2, "body": 3},
        core_pb2.HeaderValueOption: {"header": 1, "append": 2, "append_action": 3, "keep_empty_value": 4},
        core_pb2.SocketAddress: {"address": 2, "port_value": 3},
    }  # fmt: skip
    for message, fields in numbers.items():
        assert {n: message.DESCRIPTOR.fields_by_name[n].number for n in fields} == fields, message
    service = ext_authz_pb2.DESCRIPTOR.services_by_name["Authorization"]
    assert service.full_name == "envoy.service.auth.v3.Authorization"
    assert [m.name for m in service.methods] == ["Check"]


def test_check_request_carries_the_request() -> None:
    req = check_request(FACTS, GRPC, now=1_700_000_000.5)
    a = req.attributes
    assert (a.source.address.socket_address.address, a.source.address.socket_address.port_value) == (
        "10.0.1.2",
        40000,
    )
    assert a.source.principal == "spiffe://cluster.local/ns/shop/sa/frontend"
    assert a.destination.service == "web.shop.svc.cluster.local"
    assert a.request.time.seconds == 1_700_000_000
    h = a.request.http
    assert (h.id, h.method, h.path, h.host, h.scheme, h.protocol, h.size) == (
        "req-1", "POST", "/api/v1?x=1", "web.shop", "http", "HTTP/1.1", 4,
    )  # fmt: skip
    assert h.headers["x-a"] == "1,2"  # repeated headers joined, as Envoy does
    assert (h.headers[":path"], h.headers[":method"], h.headers[":authority"]) == (
        "/api/v1?x=1",
        "POST",
        "web.shop",
    )
    assert not h.body and not h.raw_body


def test_check_request_body() -> None:
    http = FACTS.http
    assert http is not None
    with_body = CheckFacts(
        FACTS.source,
        FACTS.destination,
        dataclasses.replace(http, body=b"ab\xff", partial_body=True),
    )
    h = check_request(with_body, GRPC).attributes.request.http
    assert h.body == "ab\ufffd" and h.headers["x-envoy-auth-partial-body"] == "true"
    packed = ExtAuthzGrpc(GRPC.service, GRPC.port, include_request_body=ExtAuthzRequestBody(10, True, True))
    assert check_request(with_body, packed).attributes.request.http.raw_body == b"ab\xff"


def test_tcp_check_has_no_http() -> None:
    req = check_request(CheckFacts(FACTS.source, FACTS.destination), GRPC)
    assert not req.attributes.request.HasField("http")


def _opt(
    key: str, value: str, action: int | None = None, append: bool | None = None
) -> core_pb2.HeaderValueOption:
    o = HVO(header=core_pb2.HeaderValue(key=key, value=value))
    if action is not None:
        o.append_action = action  # type: ignore[assignment]
    if append is not None:
        o.append.CopyFrom(wrappers_pb2.BoolValue(value=append))
    return o


def test_ok_response_header_semantics() -> None:
    ok = ext_authz_pb2.OkHttpResponse(
        headers=[
            _opt("x-app", "a", append=True),  # the deprecated flag decides when set
            _opt("x-set", "s", append=False),
            _opt("x-default", "d"),  # APPEND_IF_EXISTS_OR_ADD
            _opt("x-a", "new", HVO.ADD_IF_ABSENT),  # present: skipped
            _opt("x-absent", "new", HVO.ADD_IF_ABSENT),
            _opt("X-Over", "o", HVO.OVERWRITE_IF_EXISTS_OR_ADD),
            _opt("x-a", "only-if", HVO.OVERWRITE_IF_EXISTS),
            _opt("x-none", "never", HVO.OVERWRITE_IF_EXISTS),  # absent: skipped
            _opt("x-empty", ""),  # empty values dropped unless keep_empty_value
        ],
        headers_to_remove=["x-gone", ":path", "Host"],
        response_headers_to_add=[_opt("x-resp", "r", HVO.OVERWRITE_IF_EXISTS_OR_ADD), _opt("x-resp2", "r2")],
    )
    v = grpc_verdict(ext_authz_pb2.CheckResponse(ok_response=ok), FACTS, "p")
    assert isinstance(v, Allowed)
    assert v.set_headers == (("x-set", "s"), ("x-over", "o"), ("x-a", "only-if"))
    assert v.append_headers == (("x-app", "a"), ("x-default", "d"), ("x-absent", "new"))
    assert v.remove_headers == {"x-gone"}  # pseudo-headers and Host are never removed
    assert (v.response_set, v.response_append) == ((("x-resp", "r"),), (("x-resp2", "r2"),))


def test_denied_response() -> None:
    denied = ext_authz_pb2.CheckResponse(
        status={"code": 16, "message": "who are you"},
        denied_response=ext_authz_pb2.DeniedHttpResponse(
            status={"code": 401},
            body="login first",
            headers=[_opt("www-authenticate", "Bearer", append=False)],
        ),
    )
    v = grpc_verdict(denied, FACTS, "opa")
    assert isinstance(v, Denied)
    assert (v.status, v.body, v.headers) == (401, b"login first", (("www-authenticate", "Bearer"),))
    assert "opa" in v.reason and "who are you" in v.reason
    bare = grpc_verdict(ext_authz_pb2.CheckResponse(status={"code": 7}), FACTS, "opa")
    assert isinstance(bare, Denied) and (bare.status, bare.body) == (403, b"")


def test_header_patterns() -> None:
    m = header_matcher(["X-Exact", "x-pre*", "*-suf"])
    assert [m(n) for n in ("x-exact", "x-exactly", "x-prefix", "x-pre", "a-suf", "-suf", "suf")] == [
        True, False, True, True, True, True, False,
    ]  # fmt: skip
    assert not header_matcher([])("anything")


def test_http_check_request() -> None:
    assert FACTS.http is not None
    provider = ExtAuthzHttp(
        "a",
        1,
        path_prefix="/check",
        include_request_headers=("x-a*",),
        include_additional_headers=(("x-fixed", "1"),),
    )
    method, target, headers, body = http_check(FACTS.http, provider)
    assert (method, target, body) == ("POST", "/check/api/v1?x=1", b"")
    # Host first, the matched headers, Authorization always, the fixed ones; no hop-by-hop
    # header, and Content-Length of what is sent (no body here).
    assert headers == (
        ("host", "web.shop"), ("x-a", "1"), ("x-a", "2"), ("authorization", "Bearer t"), ("x-fixed", "1"),
        ("content-length", "0"),
    )  # fmt: skip


def test_http_verdicts() -> None:
    p = ExtAuthzHttp(
        "a", 1, headers_to_upstream_on_allow=("x-up*",), headers_to_downstream_on_allow=("x-down",)
    )
    answer = (
        ("x-up-1", "u"),
        ("x-down", "d"),
        ("x-other", "o"),
        ("content-length", "0"),
        ("connection", "close"),
    )
    v = http_verdict(200, answer, b"", p, "h")
    assert isinstance(v, Allowed)
    assert (v.set_headers, v.response_set) == ((("x-up-1", "u"),), (("x-down", "d"),))
    assert http_verdict(503, (), b"", p, "h") is None  # the authorizer failed: failOpen decides
    d = http_verdict(401, (*answer, ("www-authenticate", "Basic")), b"no", p, "h")
    assert isinstance(d, Denied) and (d.status, d.body) == (401, b"no")
    assert dict(d.headers) == {"x-up-1": "u", "x-down": "d", "x-other": "o", "www-authenticate": "Basic"}
    p2 = ExtAuthzHttp("a", 1, headers_to_downstream_on_deny=("x-down",))
    d2 = http_verdict(403, (*answer, ("location", "/login")), b"", p2, "h")
    assert isinstance(d2, Denied) and dict(d2.headers) == {"x-down": "d", "location": "/login"}


def test_on_error() -> None:
    closed = on_error(ExtensionProvider("p", ExtAuthzGrpc("a", 1, status_on_error=503)), "boom")
    assert isinstance(closed, Denied) and closed.status == 503 and "boom" in closed.reason
    opened = on_error(ExtensionProvider("p", ExtAuthzGrpc("a", 1, fail_open=True)), "boom")
    assert isinstance(opened, Allowed) and opened.failed_open


def test_grpc_framing() -> None:
    assert grpc_unframe(grpc_frame(b"abc")) == b"abc"
    for bad in (b"", b"\x00\x00\x00\x00\x05abc", b"\x01\x00\x00\x00\x01a"):
        with pytest.raises(ValueError):
            grpc_unframe(bad)


# --- the client, against a real grpcio server on loopback ----------------------------------------


class _Servicer(ext_authz_pb2_grpc.AuthorizationServicer):
    def __init__(self) -> None:
        self.seen: list[ext_authz_pb2.CheckRequest] = []
        self.release = threading.Event()

    def Check(
        self, request: ext_authz_pb2.CheckRequest, context: grpc.ServicerContext
    ) -> ext_authz_pb2.CheckResponse:
        self.seen.append(request)
        mode = request.attributes.request.http.headers.get("x-mode", "")
        if mode == "hang":
            self.release.wait(10)
        if mode == "error":
            context.abort(grpc.StatusCode.UNAVAILABLE, "backend down")
        if mode == "deny":
            return ext_authz_pb2.CheckResponse(status={"code": 7})
        return ext_authz_pb2.CheckResponse(
            ok_response=ext_authz_pb2.OkHttpResponse(headers=[_opt("x-ok", "1")])
        )


@dataclass(frozen=True)
class _Loopback:
    port: int

    def endpoint(self, provider: ExtensionProvider) -> Hashable | str:
        return ("127.0.0.1", self.port) if self.port else "no endpoint"

    async def connect(self, endpoint: Hashable) -> ByteStream:
        assert isinstance(endpoint, tuple)
        r, w = await asyncio.open_connection(*endpoint)
        return TcpByteStream(r, w)


@pytest.fixture(scope="module")
def grpc_server() -> Iterator[tuple[int, _Servicer]]:
    servicer = _Servicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    ext_authz_pb2_grpc.add_AuthorizationServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port, servicer
    finally:
        servicer.release.set()
        server.stop(None).wait(10)


def _facts(mode: str) -> CheckFacts:
    assert FACTS.http is not None
    return CheckFacts(
        FACTS.source, FACTS.destination, dataclasses.replace(FACTS.http, headers=(("x-mode", mode),))
    )


async def test_client_against_grpcio(grpc_server: tuple[int, _Servicer]) -> None:
    port, servicer = grpc_server
    client = ExtAuthz(_Loopback(port))
    try:
        provider = ExtensionProvider("p", ExtAuthzGrpc("authz.test", port, timeout=5.0))
        ok = await client.check(provider, _facts("allow"))
        assert isinstance(ok, Allowed) and ok.append_headers == (("x-ok", "1"),)
        assert servicer.seen[-1].attributes.source.principal == FACTS.source.principal
        assert isinstance(await client.check(provider, _facts("deny")), Denied)
        # A gRPC error is a failure to answer, not a denial: failOpen decides.
        failed = await client.check(provider, _facts("error"))
        assert isinstance(failed, Denied) and failed.status == 403 and "UNAVAILABLE" not in failed.reason
        assert "14" in failed.reason
        opened = ExtensionProvider("p", ExtAuthzGrpc("authz.test", port, timeout=5.0, fail_open=True))
        assert isinstance(await client.check(opened, _facts("error")), Allowed)
        # Concurrent checks share one HTTP/2 connection.
        results = await asyncio.gather(*(client.check(provider, _facts("allow")) for _ in range(20)))
        assert all(isinstance(r, Allowed) for r in results)
        assert client.pool.dialed == 1
        # A timeout answers statusOnError and leaves the connection usable.
        slow = ExtensionProvider("p", ExtAuthzGrpc("authz.test", port, timeout=0.3, status_on_error=504))
        started = time.monotonic()
        timed_out = await client.check(slow, _facts("hang"))
        assert isinstance(timed_out, Denied) and timed_out.status == 504 and "0.3s" in timed_out.reason
        assert time.monotonic() - started < 5
        servicer.release.set()
        assert isinstance(await client.check(provider, _facts("allow")), Allowed)
    finally:
        await client.aclose()


async def test_client_errors_without_an_authorizer() -> None:
    client = ExtAuthz(_Loopback(0))
    provider = ExtensionProvider("p", ExtAuthzGrpc("authz.test", 1, status_on_error=503))
    v = await client.check(provider, _facts("allow"))
    assert isinstance(v, Denied) and v.status == 503 and "no endpoint" in v.reason
    # Something listening that is not an authorizer (closes at once): a failure, not a crash.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        closer = ExtAuthz(_Loopback(port))

        def accept_and_close() -> None:
            s.accept()[0].close()

        accept = asyncio.get_running_loop().run_in_executor(None, accept_and_close)
        http = ExtensionProvider("h", ExtAuthzHttp("authz.test", port, timeout=5.0))
        v = await closer.check(http, _facts("allow"))
        await accept
        assert isinstance(v, Denied) and v.status == 403
        await closer.aclose()
    await client.aclose()
