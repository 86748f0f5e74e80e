"""What the waypoint's HTTP engines and the app say to each other about one request.

The engines (``waypoint.http1``, ``waypoint.http2``) parse a request into a ``RequestHead`` and
ask the app's ``on_request`` callback for a ``Verdict``: ``Forward`` it upstream (possibly with
a rewritten path and changed headers, on a connection shared with other requests of the same
``upstream_key``) or ``Respond`` locally (a policy deny, a missing route). When the request is
over, the engine reports a ``RequestRecord`` to ``on_done`` for access logs and metrics.

Everything here is a frozen value: the app decides from a head, the engine does.
"""

from __future__ import annotations

import inspect
import urllib.parse
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Literal, TypeVar, cast

from waypoint.bytestream import ByteStream

HttpProtocol = Literal["http/1.1", "h2", "grpc"]
Headers = tuple[tuple[str, str], ...]

# gRPC status codes the engines produce themselves (https://grpc.github.io/grpc/core/md_doc_statuscodes.html).
GRPC_OK = 0
GRPC_UNKNOWN = 2
GRPC_PERMISSION_DENIED = 7
GRPC_UNIMPLEMENTED = 12
GRPC_INTERNAL = 13
GRPC_UNAVAILABLE = 14
GRPC_UNAUTHENTICATED = 16

RBAC_DENIED = "RBAC: access denied"  # Envoy's body / grpc-message for an L7 authorization deny


@dataclass(frozen=True)
class RequestHead:
    """A request as the downstream client sent it.

    ``path`` is the raw request target (``/a/b?q=1``, undecoded), ``authority`` the ``Host``
    header (HTTP/1.1) or ``:authority`` (HTTP/2) as received, ``headers`` the regular (non-pseudo)
    header fields in order with lower-case names and values decoded as latin-1 (byte-preserving).
    ``protocol`` is ``grpc`` for an HTTP/2 request whose content-type is ``application/grpc*``.
    """

    method: str
    path: str
    authority: str
    scheme: str
    headers: Headers
    protocol: HttpProtocol
    http_version: str  # "1.0", "1.1" or "2"

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (lower-case), or None."""
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def header_values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name]

    @property
    def is_grpc(self) -> bool:
        return self.protocol == "grpc"


@dataclass(frozen=True)
class Forward:
    """Send the request upstream.

    ``upstream_key`` names the upstream connection pool the request belongs to: requests with
    equal (hashable) keys may share one upstream connection (HTTP/1.1 keep-alive reuse, HTTP/2
    multiplexing); a new connection is opened with the app's ``open_upstream(head, forward)``
    only when none is usable. Make it identify what ``open_upstream`` dials, e.g.
    ``(endpoint ip, port, expected identity)``. ``None`` (the default) never shares: each
    request gets its own upstream connection, closed when the request is over.

    ``path`` replaces the request target sent upstream (None: as received). Headers named in
    ``remove_headers`` (lower-case) are dropped, then ``add_headers`` are appended. On the
    response head, headers named in ``response_set`` are replaced by its values, and
    ``response_append`` appended (an external authorizer's ``response_headers_to_add``).
    """

    upstream_key: Hashable | None = None
    path: str | None = None
    add_headers: Headers = ()
    remove_headers: frozenset[str] = frozenset()
    response_set: Headers = ()
    response_append: Headers = ()

    def response_headers(self, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """The upstream's response head as the client gets it (``response_set``/``response_append``)."""
        if not self.response_set and not self.response_append:
            return headers
        drop = {k.lower().encode("latin-1") for k, _ in self.response_set}
        out = [(k, v) for k, v in headers if k not in drop]
        out += [
            (k.lower().encode("latin-1"), v.encode("latin-1"))
            for k, v in (*self.response_set, *self.response_append)
        ]
        return out


@dataclass(frozen=True)
class Respond:
    """Answer locally without going upstream.

    For a gRPC request the engine answers trailers-only (HTTP 200, ``grpc-status``,
    ``grpc-message``, no body): ``grpc_status`` when set, else the gRPC mapping of ``status``
    (403 → PERMISSION_DENIED, 401 → UNAUTHENTICATED, 503 → UNAVAILABLE, …); ``grpc_message``
    defaults to ``body`` decoded.
    """

    status: int = 403
    body: bytes = b""
    headers: Headers = ()
    grpc_status: int | None = None
    grpc_message: str | None = None

    def grpc_code(self) -> int:
        return self.grpc_status if self.grpc_status is not None else grpc_status_for_http(self.status)

    def grpc_text(self) -> str:
        if self.grpc_message is not None:
            return self.grpc_message
        return self.body.decode("utf-8", "replace")


Verdict = Forward | Respond


@dataclass(frozen=True)
class ReadBody:
    """Decide only after reading the request body (an external authorizer asked for it).

    The engine reads up to ``limit`` bytes of the body (answering ``100 Continue`` first when the
    client waits for it), then calls ``then(body, complete)`` for the verdict. A body larger than
    ``limit`` is answered 413 unless ``partial``: then ``then`` gets its first ``limit`` bytes or
    more, and ``complete`` False. Whatever is forwarded afterwards gets the whole body, as
    received (what was read is sent first, the rest streams).
    """

    limit: int
    partial: bool
    then: Callable[[bytes, bool], Verdict | Awaitable[Verdict]]


PAYLOAD_TOO_LARGE = Respond(413, b"Payload Too Large", (("content-type", "text/plain"),))


def deny(message: str = RBAC_DENIED) -> Respond:
    """A policy deny as Envoy answers it: 403 with a text body, or gRPC PERMISSION_DENIED."""
    return Respond(
        status=403,
        body=message.encode(),
        headers=(("content-type", "text/plain"),),
        grpc_status=GRPC_PERMISSION_DENIED,
        grpc_message=message,
    )


def grpc_status_for_http(status: int) -> int:
    """The gRPC status a client derives from an HTTP status (gRPC's http-grpc-status-mapping)."""
    return {
        400: GRPC_INTERNAL,
        401: GRPC_UNAUTHENTICATED,
        403: GRPC_PERMISSION_DENIED,
        404: GRPC_UNIMPLEMENTED,
        429: GRPC_UNAVAILABLE,
        502: GRPC_UNAVAILABLE,
        503: GRPC_UNAVAILABLE,
        504: GRPC_UNAVAILABLE,
    }.get(status, GRPC_UNKNOWN)


def grpc_message_encode(message: str) -> str:
    """Percent-encode a ``grpc-message`` value as the gRPC HTTP/2 spec requires."""
    return urllib.parse.quote(message, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~")


@dataclass(frozen=True)
class RequestRecord:
    """How one request went, reported once to ``on_done`` when it is over.

    ``status`` is the HTTP status sent downstream (None if the downstream got no response head,
    e.g. a reset); ``grpc_status`` the ``grpc-status`` seen in the response trailers (or headers
    of a trailers-only response), None for non-gRPC or when none arrived. Byte counts are body
    bytes (request: received from downstream; response: sent downstream). ``local`` is True
    when the waypoint answered itself (a ``Respond`` verdict, or an engine error such as 503).
    ``upstream_failure`` names why the upstream failed (``connect: <error>``, ``reset``,
    ``protocol error: …``), ``downstream_failure`` why the client side failed (``reset``, …).
    """

    head: RequestHead
    status: int | None
    grpc_status: int | None
    request_bytes: int
    response_bytes: int
    duration: float  # seconds from the request head to the end of the exchange
    local: bool
    upstream_failure: str | None = None
    downstream_failure: str | None = None
    upstream_key: Hashable | None = field(default=None, compare=False)


T = TypeVar("T")

# The app's callbacks, shared by both engines.
OnRequest = Callable[[RequestHead], Verdict | ReadBody | Awaitable[Verdict | ReadBody]]
"""Decide a request: may be sync or async. An exception is answered 500 (gRPC INTERNAL)."""
OpenUpstream = Callable[[RequestHead, Forward], Awaitable[ByteStream]]
"""Dial the upstream for ``forward.upstream_key``; raise (OSError, ...) when unreachable → 503."""
OnDone = Callable[[RequestRecord], None]
"""Called exactly once per request the engine parsed, when it is over (must not raise)."""


async def resolve(value: T | Awaitable[T]) -> T:
    """Await ``value`` if the callback returned an awaitable."""
    if inspect.isawaitable(value):
        return cast(T, await value)
    return value


@dataclass
class Tally:
    """A request's :class:`RequestRecord` while it is under way (both engines fill one in)."""

    head: RequestHead
    start: float
    status: int | None = None
    grpc_status: int | None = None
    request_bytes: int = 0
    response_bytes: int = 0
    local: bool = False
    upstream_failure: str | None = None
    downstream_failure: str | None = None
    upstream_key: Hashable | None = None

    def record(self, now: float) -> RequestRecord:
        return RequestRecord(
            head=self.head,
            status=self.status,
            grpc_status=self.grpc_status,
            request_bytes=self.request_bytes,
            response_bytes=self.response_bytes,
            duration=now - self.start,
            local=self.local,
            upstream_failure=self.upstream_failure,
            downstream_failure=self.downstream_failure,
            upstream_key=self.upstream_key,
        )
