"""CUSTOM authorization: ask an external authorizer (ext_authz), as Envoy's ext_authz filter does.

A CUSTOM AuthorizationPolicy names a MeshConfig ``extensionProviders`` entry; when a request
matches one of its rules, the waypoint asks that provider before its DENY and ALLOW policies are
looked at (Istio's order: CUSTOM, DENY, ALLOW). Two kinds, with Envoy's semantics:

* ``envoyExtAuthzGrpc`` — ``envoy.service.auth.v3.Authorization/Check`` with the real
  ``CheckRequest`` (source and destination addresses and principals, method, path, host,
  headers, the body when asked), what OPA's Envoy plugin and other authorizers implement. An OK
  status allows, and its ``ok_response`` headers are applied to the request (``append`` /
  ``append_action`` as Envoy reads them), ``headers_to_remove`` removed,
  ``response_headers_to_add`` set on the response; any other status denies with the
  ``denied_response`` status (403 when unset), headers and body.
* ``envoyExtAuthzHttp`` — the request forwarded to the authorizer: same method, path
  ``pathPrefix`` + original path, the original ``Host``, ``Content-Length`` and the headers
  ``includeRequestHeadersInCheck`` matches (``Authorization``, ``Method``/``Path``/``Host``
  always), plus ``includeAdditionalHeadersInCheck``; no body unless asked. 200 allows (with
  ``headersToUpstreamOnAllow`` / ``headersToDownstreamOnAllow`` copied from its answer); a 5xx
  is a failure of the authorizer; anything else denies with its status and body, and its
  headers (all but Host and hop-by-hop ones, or those ``headersToDownstreamOnDeny`` names plus
  Path, Status, Content-Length, WWW-Authenticate and Location).

A failure to get an answer (no endpoint, connect error, reset, ``timeout``, malformed reply)
allows when ``failOpen`` is set and otherwise answers ``statusOnError`` (403 by default), as
Envoy does. Decisions are pure functions (:func:`check_request`, :func:`grpc_verdict`,
:func:`http_check`, :func:`http_verdict`, :func:`on_error`); :class:`ExtAuthz` only moves bytes:
gRPC over the waypoint's shared HTTP/2 connections, HTTP/1.1 with h11 on a stream of its own.
How the authorizer is reached (its Service's endpoints, through HBONE when it is in the mesh) is
the caller's ``connect``.
"""

from __future__ import annotations

import asyncio
import struct
import time
import uuid
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import h11

from mesh.model.meshconfig import ExtAuthzGrpc, ExtAuthzHttp, ExtensionProvider
from mesh.proto import core_pb2, ext_authz_pb2
from waypoint.bytestream import ByteStream
from waypoint.http2 import Http2UpstreamPool

Headers = tuple[tuple[str, str], ...]
CHECK_PATH = "/envoy.service.auth.v3.Authorization/Check"
MAX_RESPONSE = 1024 * 1024  # an authorizer's answer larger than this is a failure
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te", "trailer", "host"}
)
# Sent to an HTTP authorizer whatever includeRequestHeadersInCheck says (Envoy's allowed_headers).
_ALWAYS_TO_HTTP_AUTHORIZER = ("authorization",)
# Kept on a denial whatever headersToDownstreamOnDeny says, once it names any (istio/api).
_ALWAYS_ON_DENY = frozenset({"path", "status", "content-length", "www-authenticate", "location"})


# --- what the authorizer is told, and what it answered -------------------------------------------


@dataclass(frozen=True, slots=True)
class Peer:
    ip: str
    port: int
    principal: str = ""  # SPIFFE URI
    service: str = ""  # the destination's service host name, when known


@dataclass(frozen=True, slots=True)
class HttpFacts:
    method: str
    path: str  # the request target as received: path and query
    host: str
    scheme: str
    headers: Headers  # lower-case names, in order
    protocol: str  # "HTTP/1.1", "HTTP/2"
    request_id: str = ""
    body: bytes | None = None  # only when the provider asks for it
    partial_body: bool = False


@dataclass(frozen=True, slots=True)
class CheckFacts:
    """One request (or, for TCP, one connection: ``http`` None) as the authorizer sees it."""

    source: Peer
    destination: Peer
    http: HttpFacts | None = None


@dataclass(frozen=True, slots=True)
class Allowed:
    """Go on, with the authorizer's changes: request headers set (replacing any of the same
    name), appended, removed; response headers set and appended."""

    set_headers: Headers = ()
    append_headers: Headers = ()
    remove_headers: frozenset[str] = frozenset()
    response_set: Headers = ()
    response_append: Headers = ()
    reason: str = "allowed"
    failed_open: bool = False  # no answer from the authorizer, allowed by failOpen


@dataclass(frozen=True, slots=True)
class Denied:
    """Answer the client with this instead."""

    status: int
    body: bytes = b""
    headers: Headers = ()
    reason: str = "denied"


Verdict = Allowed | Denied


def header_matcher(patterns: Iterable[str]) -> Callable[[str], bool]:
    """istio/api's header patterns: ``abc`` exact, ``abc*`` prefix, ``*abc`` suffix (lower-case names)."""
    exact: set[str] = set()
    prefixes: list[str] = []
    suffixes: list[str] = []
    for pattern in patterns:
        p = pattern.lower()
        if p.endswith("*"):
            prefixes.append(p[:-1])
        elif p.startswith("*"):
            suffixes.append(p[1:])
        else:
            exact.add(p)
    pre, suf = tuple(prefixes), tuple(suffixes)
    return lambda name: (
        name in exact or (bool(pre) and name.startswith(pre)) or (bool(suf) and name.endswith(suf))
    )


def on_error(provider: ExtensionProvider, why: str) -> Verdict:
    """No answer from the authorizer: ``failOpen`` allows, otherwise ``statusOnError``."""
    a = provider.ext_authz
    assert a is not None
    if a.fail_open:
        return Allowed(reason=f"ext_authz {provider.name} failed ({why}); failOpen allows", failed_open=True)
    return Denied(a.status_on_error, reason=f"ext_authz {provider.name} failed: {why}")


# --- gRPC ------------------------------------------------------------------------------------------


def _address(peer: Peer) -> core_pb2.Address:
    return core_pb2.Address(socket_address=core_pb2.SocketAddress(address=peer.ip, port_value=peer.port))


def check_request(
    facts: CheckFacts, provider: ExtAuthzGrpc, now: float | None = None
) -> ext_authz_pb2.CheckRequest:
    """The ``CheckRequest`` Envoy would send for ``facts``."""
    ctx = ext_authz_pb2.AttributeContext()
    for peer, out in ((facts.source, ctx.source), (facts.destination, ctx.destination)):
        out.address.CopyFrom(_address(peer))
        out.principal = peer.principal
        out.service = peer.service
    ctx.request.time.FromNanoseconds(int((time.time() if now is None else now) * 1e9))
    h = facts.http
    if h is not None:
        http = ctx.request.http
        http.id = h.request_id
        http.method = h.method
        http.path = h.path
        http.host = h.host
        http.scheme = h.scheme
        http.protocol = h.protocol
        joined: dict[str, list[str]] = {}
        for k, v in h.headers:
            joined.setdefault(k, []).append(v)
        http.headers.update({k: ",".join(v) for k, v in joined.items()})
        http.headers[":authority"] = h.host
        http.headers[":method"] = h.method
        http.headers[":path"] = h.path
        length = next((v for k, v in h.headers if k == "content-length"), None)
        http.size = (
            int(length) if length is not None and length.isdigit() else (len(h.body) if h.body else -1)
        )
        if h.body is not None:
            if provider.include_request_body is not None and provider.include_request_body.pack_as_bytes:
                http.raw_body = h.body
            else:
                http.body = h.body.decode("utf-8", "replace")
            if h.partial_body:
                http.headers["x-envoy-auth-partial-body"] = "true"
    return ext_authz_pb2.CheckRequest(attributes=ctx)


def _option(
    opt: core_pb2.HeaderValueOption,
    present: Callable[[str], bool],
    set_: list[tuple[str, str]],
    append: list[tuple[str, str]],
) -> None:
    """One ``HeaderValueOption`` as Envoy's ext_authz applies it: the deprecated ``append`` wins
    when set; else ``append_action``."""
    name = opt.header.key.lower()
    value = opt.header.value or opt.header.raw_value.decode("latin-1")
    if not name or (not value and not opt.keep_empty_value):
        return
    if opt.HasField("append"):
        (append if opt.append.value else set_).append((name, value))
        return
    action = opt.append_action
    if action == core_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD:
        append.append((name, value))
    elif action == core_pb2.HeaderValueOption.ADD_IF_ABSENT:
        if not present(name):
            append.append((name, value))
    elif action == core_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD or (
        action == core_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS and present(name)
    ):
        set_.append((name, value))


def grpc_verdict(resp: ext_authz_pb2.CheckResponse, facts: CheckFacts, provider_name: str) -> Verdict:
    """What a ``CheckResponse`` means for the request."""
    code = resp.status.code
    if code == 0:
        ok = resp.ok_response
        names = {k for k, _ in facts.http.headers} if facts.http is not None else set()
        set_: list[tuple[str, str]] = []
        append: list[tuple[str, str]] = []
        for opt in ok.headers:
            _option(opt, names.__contains__, set_, append)
        rset: list[tuple[str, str]] = []
        rappend: list[tuple[str, str]] = []
        for opt in ok.response_headers_to_add:
            _option(opt, lambda _n: False, rset, rappend)
        return Allowed(
            tuple(set_),
            tuple(append),
            frozenset(
                h.lower() for h in ok.headers_to_remove if not h.startswith(":") and h.lower() != "host"
            ),
            tuple(rset),
            tuple(rappend),
            reason=f"allowed by ext_authz {provider_name}",
        )
    denied = resp.error_response if resp.HasField("error_response") else resp.denied_response
    status = denied.status.code if 200 <= denied.status.code <= 599 else 403
    headers: list[tuple[str, str]] = []
    append_: list[tuple[str, str]] = []
    for opt in denied.headers:
        _option(opt, lambda _n: False, headers, append_)
    why = f": {resp.status.message[:200]}" if resp.status.message else ""
    return Denied(
        status,
        denied.body.encode(),
        tuple(h for h in headers + append_ if h[0] not in _HOP_BY_HOP),
        reason=f"denied by ext_authz {provider_name} (code {code}{why})",
    )


def _grpc_timeout(seconds: float) -> str:
    return f"{max(1, min(int(seconds * 1000), 99_999_999))}m"


def grpc_request_headers(service: str, timeout: float) -> list[tuple[bytes, bytes]]:
    return [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", CHECK_PATH.encode()),
        (b":authority", service.rpartition("/")[2].encode()),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
        (b"grpc-timeout", _grpc_timeout(timeout).encode()),
    ]


def grpc_frame(message: bytes) -> bytes:
    return struct.pack(">BI", 0, len(message)) + message


def grpc_unframe(data: bytes) -> bytes:
    """The one message of a unary gRPC response body."""
    if len(data) < 5:
        raise ValueError(f"gRPC response body of {len(data)} bytes")
    compressed, length = struct.unpack(">BI", data[:5])
    if compressed:
        raise ValueError("compressed gRPC response (none was offered)")
    if len(data) != 5 + length:
        raise ValueError(f"gRPC response body of {len(data)} bytes for a {length}-byte message")
    return data[5:]


# --- HTTP ------------------------------------------------------------------------------------------


def http_check(facts: HttpFacts, provider: ExtAuthzHttp) -> tuple[str, str, Headers, bytes]:
    """(method, target, headers, body) of the request Envoy sends an HTTP authorizer."""
    wanted = header_matcher((*provider.include_request_headers, *_ALWAYS_TO_HTTP_AUTHORIZER))
    extra = dict(provider.include_additional_headers)
    headers = [(k, v) for k, v in facts.headers if wanted(k) and k not in extra and k not in _HOP_BY_HOP]
    headers = [(k, v) for k, v in headers if k != "content-length"]
    body = facts.body or b""
    out: list[tuple[str, str]] = [
        ("host", facts.host),
        *headers,
        *extra.items(),
        ("content-length", str(len(body))),
    ]
    if facts.partial_body:
        out.append(("x-envoy-auth-partial-body", "true"))
    return facts.method, provider.path_prefix + facts.path, tuple(out), body


def http_verdict(
    status: int, headers: Headers, body: bytes, provider: ExtAuthzHttp, provider_name: str
) -> Verdict | None:
    """What the HTTP authorizer's answer means; None for a 5xx (the authorizer failed)."""
    if status >= 500:
        return None
    if status == 200:
        up = header_matcher(provider.headers_to_upstream_on_allow)
        down = header_matcher(provider.headers_to_downstream_on_allow)
        return Allowed(
            set_headers=tuple(
                (k, v) for k, v in headers if up(k) and k not in _HOP_BY_HOP and k != "content-length"
            ),
            response_set=tuple(
                (k, v) for k, v in headers if down(k) and k not in _HOP_BY_HOP and k != "content-length"
            ),
            reason=f"allowed by ext_authz {provider_name}",
        )
    if provider.headers_to_downstream_on_deny:
        keep = header_matcher(provider.headers_to_downstream_on_deny)
        passed = tuple((k, v) for k, v in headers if keep(k) or k in _ALWAYS_ON_DENY)
    else:
        passed = tuple((k, v) for k, v in headers if k not in _HOP_BY_HOP)
    passed = tuple((k, v) for k, v in passed if k != "content-length")
    return Denied(status, body, passed, reason=f"denied by ext_authz {provider_name} (HTTP {status})")


async def http1_exchange(
    io: ByteStream, method: str, target: str, headers: Headers, body: bytes, max_response: int = MAX_RESPONSE
) -> tuple[int, Headers, bytes]:
    """One HTTP/1.1 request on ``io`` and its whole response (status, lower-case headers, body)."""
    conn = h11.Connection(our_role=h11.CLIENT)
    req = h11.Request(method=method, target=target, headers=[*headers, ("connection", "close")])
    io.write(conn.send(req))
    if body:
        io.write(conn.send(h11.Data(data=body)))
    io.write(conn.send(h11.EndOfMessage()))
    await io.drain()
    status = 0
    out_headers: Headers = ()
    data = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await io.read())  # b"": EOF, which h11 reports (or refuses mid-message)
            continue
        if isinstance(event, h11.InformationalResponse):
            continue
        if isinstance(event, h11.Response):
            status = event.status_code
            out_headers = tuple((k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in event.headers)
        elif isinstance(event, h11.Data):
            data += event.data
            if len(data) > max_response:
                raise ConnectionError(f"response larger than {max_response} bytes")
        elif isinstance(event, h11.EndOfMessage):
            return status, out_headers, bytes(data)
        elif isinstance(event, h11.ConnectionClosed):
            raise ConnectionError("the authorizer closed the connection before answering")


# --- the client ------------------------------------------------------------------------------------


class Connector(Protocol):
    """How the authorizer of a provider is reached: an endpoint key to pool connections by (or
    why there is none), and a stream to it."""

    def endpoint(self, provider: ExtensionProvider) -> Hashable | str: ...

    async def connect(self, endpoint: Hashable) -> ByteStream: ...


@dataclass
class ExtAuthz:
    """Asks providers; gRPC calls share HTTP/2 connections per endpoint."""

    connector: Connector
    pool: Http2UpstreamPool = field(default_factory=Http2UpstreamPool)
    clock: Callable[[], float] = time.time

    async def check(self, provider: ExtensionProvider, facts: CheckFacts) -> Verdict:
        a = provider.ext_authz
        assert a is not None
        endpoint = self.connector.endpoint(provider)
        if isinstance(endpoint, str):
            return on_error(provider, endpoint)
        try:
            async with asyncio.timeout(a.timeout):
                if isinstance(a, ExtAuthzGrpc):
                    return await self._grpc(provider, a, endpoint, facts)
                if facts.http is None:
                    return Denied(
                        a.status_on_error,
                        reason=f"ext_authz {provider.name}: an HTTP provider cannot check TCP",
                    )
                return await self._http(provider, a, endpoint, facts.http)
        except TimeoutError:
            return on_error(provider, f"no answer within {a.timeout:g}s")
        except Exception as e:  # refused (HBONE CONNECT, TCP), reset, malformed reply: no answer
            return on_error(provider, str(e) or type(e).__name__)

    async def _grpc(
        self, provider: ExtensionProvider, a: ExtAuthzGrpc, endpoint: Hashable, facts: CheckFacts
    ) -> Verdict:
        req = check_request(facts, a, self.clock())
        head, body, trailers = await self.pool.exchange(
            endpoint,
            lambda: self.connector.connect(endpoint),
            grpc_request_headers(a.service, a.timeout),
            grpc_frame(req.SerializeToString()),
            max_response=MAX_RESPONSE,
        )
        fields = dict(trailers or head)
        status = dict(head).get(b":status")
        if status != b"200":
            raise ConnectionError(
                f"HTTP status {status.decode('latin-1') if status else 'missing'} from the authorizer"
            )
        grpc_status = fields.get(b"grpc-status")
        if grpc_status != b"0":
            message = fields.get(b"grpc-message", b"").decode("latin-1")[:200]
            raise ConnectionError(
                f"gRPC status {grpc_status.decode('latin-1') if grpc_status else 'missing'} {message}".rstrip()
            )
        resp = ext_authz_pb2.CheckResponse()
        resp.ParseFromString(grpc_unframe(body))
        return grpc_verdict(resp, facts, provider.name)

    async def _http(
        self, provider: ExtensionProvider, a: ExtAuthzHttp, endpoint: Hashable, facts: HttpFacts
    ) -> Verdict:
        method, target, headers, body = http_check(facts, a)
        io = await self.connector.connect(endpoint)
        try:
            status, rheaders, rbody = await http1_exchange(io, method, target, headers, body)
        finally:
            io.close()
        verdict = http_verdict(status, rheaders, rbody, a, provider.name)
        if verdict is None:
            return on_error(provider, f"HTTP {status} from the authorizer")
        return verdict

    async def aclose(self) -> None:
        await self.pool.aclose()


def request_id(headers: Sequence[tuple[str, str]]) -> str:
    """The request's ``x-request-id``, or a new one (Envoy makes one for every request)."""
    for k, v in headers:
        if k == "x-request-id":
            return v
    return str(uuid.uuid4())
