"""serve_http2 on loopback TCP: an h2 client → the engine → an h2 origin."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

import h2.connection
import h2.events

from tests.waypoint.conftest import (
    TIMEOUT,
    App,
    H2Backend,
    H2Client,
    Listener,
    collect,
    listening,
    refused_port,
)
from waypoint.bytestream import TcpByteStream, open_tcp
from waypoint.http2 import Http2UpstreamPool, serve_http2
from waypoint.request import RBAC_DENIED, Forward, RequestHead, Verdict, deny


@contextlib.asynccontextmanager
async def h2_proxy(app: App, **kw: Any) -> AsyncIterator[Listener]:
    async def serve(s: TcpByteStream) -> None:
        await serve_http2(
            s, on_request=app.on_request, open_upstream=app.open_upstream, on_done=app.on_done, **kw
        )

    async with listening(serve) as lst:
        yield lst


@contextlib.asynccontextmanager
async def client_via_proxy(app: App, **kw: Any) -> AsyncIterator[H2Client]:
    async with h2_proxy(app, **kw) as proxy:
        c = await H2Client.connect(proxy.port)
        try:
            yield c
        finally:
            await c.close()


async def test_get_is_forwarded(h2_backend: H2Backend) -> None:
    app = App(h2_backend.port)
    async with client_via_proxy(app) as c:
        r = await c.request("GET", "/hello?x=1", [("x-custom", "v")])
        records = await app.wait_records(1)
    assert r.headers[":status"] == "200"
    assert r.headers["x-backend"] == "h2"
    assert r.body == b"GET /hello?x=1 0"
    seen = h2_backend.requests[0][0]
    assert seen[":authority"] == "svc.test:80" and seen["x-custom"] == "v"
    head = app.heads[0]
    assert (head.method, head.path, head.authority, head.protocol, head.http_version) == (
        "GET",
        "/hello?x=1",
        "svc.test:80",
        "h2",
        "2",
    )
    assert records[0].status == 200 and not records[0].local
    assert records[0].response_bytes == len(r.body)


async def test_body_and_trailers_both_ways(h2_backend: H2Backend) -> None:
    app = App(h2_backend.port)
    payload = os.urandom(300_000)
    async with client_via_proxy(app) as c:
        sid = c.start("POST", "/up", [("want-trailers", "1")])
        await c.peer.send_body(sid, payload, end=False)
        c.peer.conn.send_headers(sid, [("x-req-trailer", "yes")], end_stream=True)
        c.peer.flush()
        await c.peer.wait_for(lambda: c.peer.ended(sid))
        r = collect(c.peer, sid)
        records = await app.wait_records(1)
    assert r.body == f"POST /up {len(payload)}".encode()
    assert r.trailers == {"x-trailer": "done"}
    _, body, req_trailers = h2_backend.requests[0]
    assert body == payload
    assert req_trailers == {"x-req-trailer": "yes"}
    assert records[0].request_bytes == len(payload)


async def test_streams_share_one_upstream_connection(h2_backend: H2Backend) -> None:
    app = App(h2_backend.port)
    async with client_via_proxy(app) as c:
        results = await asyncio.gather(*(c.request("GET", f"/r/{i}") for i in range(20)))
        assert [r.body for r in results] == [f"GET /r/{i} 0".encode() for i in range(20)]
        await app.wait_records(20)
    assert app.opens == 1
    assert h2_backend.connections == 1


async def test_shared_pool_across_downstream_connections(h2_backend: H2Backend) -> None:
    app = App(h2_backend.port)
    pool = Http2UpstreamPool(max_streams_per_connection=2)
    try:
        async with h2_proxy(app, pool=pool) as proxy:
            c1 = await H2Client.connect(proxy.port)
            c2 = await H2Client.connect(proxy.port)
            # Hold three streams open at once: with 2 streams per connection that needs 2 upstreams.
            sids = [c.start("GET", "/hang", end=True) for c in (c1, c1, c2)]
            await h2_backend.wait(lambda: len(h2_backend.requests) == 3)
            assert pool.dialed == 2
            for c, sid in zip((c1, c1, c2), sids, strict=True):
                c.peer.conn.reset_stream(sid)
                c.peer.flush()
            await app.wait_records(3)
            r = await c2.request("GET", "/after")
            assert r.body == b"GET /after 0"
            assert pool.dialed == 2
            await c1.close()
            await c2.close()
    finally:
        await pool.aclose()


async def test_path_rewrite_and_headers(h2_backend: H2Backend) -> None:
    def decide(head: RequestHead) -> Verdict:
        return Forward(
            "k",
            path="/v2" + head.path,
            add_headers=(("x-added", "1"),),
            remove_headers=frozenset({"x-secret"}),
        )

    app = App(h2_backend.port, decide=decide)
    async with client_via_proxy(app) as c:
        r = await c.request("GET", "/p", [("x-secret", "s")])
    assert r.body == b"GET /v2/p 0"
    seen = h2_backend.requests[0][0]
    assert seen[":path"] == "/v2/p" and seen["x-added"] == "1" and "x-secret" not in seen


async def test_deny_is_local_403(h2_backend: H2Backend) -> None:
    app = App(h2_backend.port, decide=lambda h: deny() if h.path == "/admin" else Forward("k"))
    async with client_via_proxy(app) as c:
        r = await c.request("POST", "/admin", body=b"x" * 100_000)  # the unread body is refused
        r2 = await c.request("GET", "/ok")
        records = await app.wait_records(2)
    assert r.headers[":status"] == "403"
    assert r.body == RBAC_DENIED.encode()
    assert r.headers["content-length"] == str(len(RBAC_DENIED))
    assert r2.body == b"GET /ok 0"
    assert records[0].local and records[0].status == 403
    assert [h[":path"] for h, _, _ in h2_backend.requests] == ["/ok"]


async def test_upstream_refused_is_503() -> None:
    app = App(refused_port())
    async with client_via_proxy(app) as c:
        r = await c.request("GET", "/")
        r2 = await c.request("GET", "/again")
        records = await app.wait_records(2)
    assert r.headers[":status"] == "503" and r2.headers[":status"] == "503"
    assert records[0].upstream_failure is not None and records[0].upstream_failure.startswith("connect")


async def test_client_reset_reaches_upstream(h2_backend: H2Backend) -> None:
    app = App(h2_backend.port)
    async with client_via_proxy(app) as c:
        sid = c.start("GET", "/hang", end=True)
        await h2_backend.wait(lambda: len(h2_backend.requests) == 1)
        c.peer.conn.reset_stream(sid, 0x8)  # CANCEL
        c.peer.flush()
        await h2_backend.wait(lambda: bool(h2_backend.resets))
        records = await app.wait_records(1)
    assert h2_backend.resets == [("/hang", 0x8)]
    assert records[0].downstream_failure is not None


async def test_upstream_reset_reaches_client(h2_backend: H2Backend) -> None:
    app = App(h2_backend.port)
    async with client_via_proxy(app) as c:
        r = await c.request("GET", "/rst")
        records = await app.wait_records(1)
    assert r.headers[":status"] == "200"
    assert r.reset == 0xB  # the upstream's code, passed on
    assert records[0].upstream_failure == "reset"


async def test_flow_control_acknowledges_only_what_was_forwarded(h2_backend: H2Backend) -> None:
    """With the origin not reading, the client can send only about two windows' worth."""
    h2_backend.hold = True
    app = App(h2_backend.port)
    window = 65535
    total = 1024 * 1024
    async with client_via_proxy(app, stream_window=window) as c:
        sid = c.start("POST", "/slow")
        sender = asyncio.create_task(c.peer.send_body(sid, b"q" * total))
        try:
            await h2_backend.wait(lambda: h2_backend.received >= window)  # the origin's window is full
            for _ in range(2):  # round trips through the proxy: anything it would ack has arrived
                c.peer.conn.ping(os.urandom(8))
                c.peer.flush()
                acks = sum(isinstance(e, h2.events.PingAckReceived) for e in c.peer.stream_events(0))
                await c.peer.wait_for(
                    lambda acks=acks: (
                        sum(isinstance(e, h2.events.PingAckReceived) for e in c.peer.stream_events(0)) > acks
                    )
                )
            # The proxy's stream window plus what it forwarded into the origin's window, no more.
            assert h2_backend.received <= window
            assert c.peer.sent[sid] <= 2 * window
            assert not sender.done()
            h2_backend.release()
            await asyncio.wait_for(sender, TIMEOUT)
        finally:
            if not sender.done():
                sender.cancel()
        await c.peer.wait_for(lambda: c.peer.ended(sid))
    assert h2_backend.requests[0][1] == b"q" * total


async def test_upstream_goaway_lets_stream_finish_then_redials(h2_backend: H2Backend) -> None:
    app = App(h2_backend.port)
    async with client_via_proxy(app) as c:
        r = await c.request("GET", "/goaway")
        assert r.body == b"GET /goaway 0"
        r2 = await c.request("GET", "/next")
        assert r2.body == b"GET /next 0"
    assert app.opens == 2


async def test_upstream_dies_before_response_is_503(h2_backend: H2Backend) -> None:
    app = App(h2_backend.port)
    async with client_via_proxy(app) as c:
        sid = c.start("GET", "/hang", end=True)
        await h2_backend.wait(lambda: len(h2_backend.requests) == 1)
        await h2_backend.close()  # cancels the origin's connection handlers: the connection drops
        await c.peer.wait_for(lambda: c.peer.ended(sid))
        r = collect(c.peer, sid)
    assert r.headers[":status"] == "503"


async def test_goaway_from_client_finishes_in_flight(h2_backend: H2Backend) -> None:
    app = App(h2_backend.port)
    async with client_via_proxy(app) as c:
        sid = c.start("POST", "/late")
        c.peer.conn.close_connection()  # GOAWAY, then keep sending on the open stream
        c.peer.conn.state_machine.state = h2.connection.ConnectionState.CLIENT_OPEN
        c.peer.flush()
        await c.peer.send_body(sid, b"abc")
        await c.peer.wait_for(lambda: c.peer.ended(sid))
        r = collect(c.peer, sid)
        await c.peer.wait_for(lambda: c.peer.closed)  # the proxy hangs up once the stream is done
    assert r.body == b"POST /late 3"


async def test_garbage_closes_connection(h2_backend: H2Backend) -> None:
    app = App(h2_backend.port)
    async with h2_proxy(app) as proxy:
        s = await open_tcp("127.0.0.1", proxy.port)
        s.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        async with asyncio.timeout(TIMEOUT):
            while await s.read():
                pass
        s.close()
        await s.wait_closed()
    assert app.heads == []


# --- ReadBody: deciding after the body (ext_authz includeRequestBodyInCheck) ---------------------


def reading(limit: int, partial: bool, seen: list[tuple[bytes, bool]]) -> object:
    from waypoint.request import ReadBody

    async def then(body: bytes, complete: bool) -> Verdict:
        seen.append((body, complete))
        return deny("no") if body.startswith(b"deny") else Forward("k")

    return lambda head: ReadBody(limit, partial, then)


async def test_read_body_then_forward(h2_backend: H2Backend) -> None:
    seen: list[tuple[bytes, bool]] = []
    app = App(h2_backend.port, decide=reading(100_000, False, seen))  # type: ignore[arg-type]
    big = os.urandom(90_000)  # more than the client's initial window: read while held
    async with client_via_proxy(app) as c:
        r = await c.request("POST", "/a", body=big)
        assert r.headers[":status"] == "200" and r.body == b"POST /a 90000"
        r = await c.request("GET", "/b")
        assert r.headers[":status"] == "200"
        r = await c.request("POST", "/c", body=b"deny me")
        assert (r.headers[":status"], r.body) == ("403", b"no")
        r = await c.request("POST", "/d", body=b"x" * 100_001)
        assert (r.headers[":status"], r.body) == ("413", b"Payload Too Large")
    assert seen == [(big, True), (b"", True), (b"deny me", True)]
    assert h2_backend.requests[0][1] == big  # forwarded whole


async def test_read_body_partial(h2_backend: H2Backend) -> None:
    seen: list[tuple[bytes, bool]] = []
    app = App(h2_backend.port, decide=reading(10, True, seen))  # type: ignore[arg-type]
    async with client_via_proxy(app) as c:
        r = await c.request("POST", "/p", body=b"0123456789abcdef")
    assert r.headers[":status"] == "200" and r.body == b"POST /p 16"
    assert seen == [(b"0123456789", False)]
    assert h2_backend.requests[0][1] == b"0123456789abcdef"
