"""serve_http1 on loopback TCP: an h11 client → the engine → an h11 origin."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import h11
import pytest

from tests.waypoint.conftest import (
    TIMEOUT,
    App,
    H1Backend,
    H1Client,
    Listener,
    header,
    listening,
    refused_port,
)
from waypoint.bytestream import TcpByteStream, open_tcp
from waypoint.http1 import serve_http1
from waypoint.request import RBAC_DENIED, Forward, RequestHead, Verdict, deny


@contextlib.asynccontextmanager
async def h1_proxy(app: App) -> AsyncIterator[Listener]:
    async def serve(s: TcpByteStream) -> None:
        await serve_http1(s, on_request=app.on_request, open_upstream=app.open_upstream, on_done=app.on_done)

    async with listening(serve) as lst:
        yield lst


@contextlib.asynccontextmanager
async def client_via_proxy(app: App) -> AsyncIterator[H1Client]:
    async with h1_proxy(app) as proxy:
        c = await H1Client.connect(proxy.port)
        try:
            yield c
        finally:
            await c.close()


async def read_to_eof(s: TcpByteStream) -> bytes:
    out = bytearray()
    async with asyncio.timeout(TIMEOUT):
        while chunk := await s.read():
            out += chunk
    return bytes(out)


async def test_keepalive_reuses_one_upstream_connection(h1_backend: H1Backend) -> None:
    app = App(h1_backend.port)
    async with client_via_proxy(app) as c:
        for i in range(3):
            resp, body = await c.request("GET", f"/item/{i}?q=1", [("connection", "keep-alive")])
            assert resp.status_code == 200
            assert body == f"GET /item/{i}?q=1 0".encode()
            assert header(resp, "x-backend") == "h1"
        records = await app.wait_records(3)
    assert app.opens == 1
    assert h1_backend.connections == 1
    assert [r.status for r in records] == [200, 200, 200]
    assert all(not r.local and r.upstream_failure is None for r in records)
    assert records[0].response_bytes == len(b"GET /item/0?q=1 0")
    seen = h1_backend.requests[0]
    assert seen.header("host") == "svc.test:80"  # Host is kept as the client sent it
    assert seen.header("connection") is None  # hop-by-hop headers are not forwarded
    head = app.heads[0]
    assert (head.method, head.path, head.authority, head.protocol, head.http_version) == (
        "GET",
        "/item/0?q=1",
        "svc.test:80",
        "http/1.1",
        "1.1",
    )


async def test_different_upstream_keys_do_not_share(h1_backend: H1Backend) -> None:
    keys = iter(["a", "b", "b", None, None])
    app = App(h1_backend.port, decide=lambda head: Forward(upstream_key=next(keys)))
    async with client_via_proxy(app) as c:
        for _ in range(5):
            resp, _ = await c.request("GET", "/")
            assert resp.status_code == 200
    # a, b (reused once), None, None: None never shares.
    assert app.opens == 4
    assert h1_backend.connections == 4


async def test_verdict_rewrites_path_and_headers(h1_backend: H1Backend) -> None:
    def decide(head: RequestHead) -> Verdict:
        return Forward(
            upstream_key="k",
            path="/v2" + head.path,
            add_headers=(("X-Added", "yes"),),
            remove_headers=frozenset({"x-secret"}),
        )

    app = App(h1_backend.port, decide=decide)
    async with client_via_proxy(app) as c:
        resp, body = await c.request("POST", "/a%20b?x=1", [("x-secret", "s"), ("x-keep", "k")], b"hello")
    assert resp.status_code == 200
    assert body == b"POST /v2/a%20b?x=1 5"
    seen = h1_backend.requests[0]
    assert seen.target == "/v2/a%20b?x=1"
    assert seen.header("x-added") == "yes"
    assert seen.header("x-secret") is None
    assert seen.header("x-keep") == "k"
    assert seen.body == b"hello"
    assert app.heads[0].path == "/a%20b?x=1"  # the head is what the client sent


async def test_deny_is_403_and_connection_stays_usable(h1_backend: H1Backend) -> None:
    app = App(h1_backend.port, decide=lambda h: deny() if h.path.startswith("/admin") else Forward("k"))
    async with client_via_proxy(app) as c:
        resp, body = await c.request("POST", "/admin", body=b"x" * 5000)  # an unread body is discarded
        assert resp.status_code == 403
        assert body == RBAC_DENIED.encode()
        assert header(resp, "content-length") == str(len(RBAC_DENIED))
        assert header(resp, "connection") is None
        resp2, body2 = await c.request("GET", "/ok")
        assert resp2.status_code == 200
        assert body2 == b"GET /ok 0"
        records = await app.wait_records(2)
    assert [r.target for r in h1_backend.requests] == ["/ok"]
    assert records[0].local and records[0].status == 403 and records[0].request_bytes == 5000
    assert not records[1].local


async def test_async_on_request(h1_backend: H1Backend) -> None:
    app = App(h1_backend.port)

    async def decide(head: RequestHead) -> Verdict:
        await asyncio.sleep(0)
        return deny("nope")

    async def serve(s: TcpByteStream) -> None:
        await serve_http1(s, on_request=decide, open_upstream=app.open_upstream, on_done=app.on_done)

    async with listening(serve) as proxy:
        c = await H1Client.connect(proxy.port)
        resp, body = await c.request("GET", "/")
        await c.close()
    assert (resp.status_code, body) == (403, b"nope")


async def test_garbage_is_400_and_closed(h1_backend: H1Backend) -> None:
    app = App(h1_backend.port)
    async with h1_proxy(app) as proxy:
        s = await open_tcp("127.0.0.1", proxy.port)
        s.write(b"THIS IS NOT HTTP\x00\r\n\r\n")
        reply = await read_to_eof(s)
        s.close()
        await s.wait_closed()
    assert reply.startswith(b"HTTP/1.1 400 ")
    assert b"connection: close" in reply.lower()
    assert app.opens == 0 and app.heads == []


async def test_upstream_refused_is_503() -> None:
    app = App(refused_port())
    async with client_via_proxy(app) as c:
        resp, body = await c.request("GET", "/")
        assert resp.status_code == 503
        assert b"upstream connect error" in body
        resp2, _ = await c.request("GET", "/again")  # still usable
        assert resp2.status_code == 503
        records = await app.wait_records(2)
    assert records[0].local
    assert records[0].upstream_failure is not None and records[0].upstream_failure.startswith("connect")


async def test_upstream_reset_mid_response_resets_downstream(h1_backend: H1Backend) -> None:
    app = App(h1_backend.port)
    async with client_via_proxy(app) as c:
        c.send(h11.Request(method="GET", target="/reset", headers=[("host", "svc")]), h11.EndOfMessage())
        got = bytearray()
        with pytest.raises((h11.RemoteProtocolError, ConnectionError)):
            async with asyncio.timeout(TIMEOUT):
                while True:
                    ev = await next_event(c)
                    if isinstance(ev, h11.Response):
                        assert ev.status_code == 200
                    elif isinstance(ev, h11.Data):
                        got += ev.data
                    else:
                        raise AssertionError(f"unexpected {ev}")
        assert len(got) < 1000
        records = await app.wait_records(1)
    assert records[0].status == 200
    assert records[0].upstream_failure is not None


async def next_event(c: H1Client) -> object:
    while True:
        ev = c.conn.next_event()
        if ev is not h11.NEED_DATA:
            return ev
        c.conn.receive_data(await c.s.read())


async def test_chunked_upload_is_streamed(h1_backend: H1Backend) -> None:
    """The origin sees the first MiB before the client sent the rest: nothing buffers the body."""
    app = App(h1_backend.port)
    first_mib = asyncio.Event()
    chunk = b"z" * 65536

    def progress(n: int) -> None:
        if n >= 1024 * 1024:
            first_mib.set()

    h1_backend.on_body = progress
    async with client_via_proxy(app) as c:
        c.send(
            h11.Request(
                method="POST", target="/upload", headers=[("host", "svc"), ("transfer-encoding", "chunked")]
            )
        )
        for _ in range(16):
            c.send(h11.Data(data=chunk))
            await c.s.drain()
        await asyncio.wait_for(first_mib.wait(), TIMEOUT)  # before we send the second MiB
        for _ in range(16):
            c.send(h11.Data(data=chunk))
            await c.s.drain()
        c.send(h11.EndOfMessage())
        await c.s.drain()
        resp, body = await c.response()
        records = await app.wait_records(1)
    assert resp.status_code == 200
    assert body == f"POST /upload {32 * 65536}".encode()
    assert records[0].request_bytes == 32 * 65536
    assert h1_backend.requests[0].header("transfer-encoding") == "chunked"


async def test_pipelined_requests_answered_in_order(h1_backend: H1Backend) -> None:
    app = App(h1_backend.port)
    async with h1_proxy(app) as proxy:
        s = await open_tcp("127.0.0.1", proxy.port)
        s.write(
            b"GET /one HTTP/1.1\r\nhost: svc\r\n\r\n"
            b"GET /two HTTP/1.1\r\nhost: svc\r\n\r\n"
            b"GET /three HTTP/1.1\r\nhost: svc\r\nconnection: close\r\n\r\n"
        )
        reply = await read_to_eof(s)
        s.close()
        await s.wait_closed()
    bodies = [b"GET /one 0", b"GET /two 0", b"GET /three 0"]
    positions = [reply.index(b) for b in bodies]
    assert positions == sorted(positions)
    assert reply.count(b"HTTP/1.1 200 ") == 3
    assert app.opens == 1


async def test_expect_100_continue(h1_backend: H1Backend) -> None:
    app = App(h1_backend.port)
    async with client_via_proxy(app) as c:
        c.send(
            h11.Request(
                method="PUT",
                target="/put",
                headers=[("host", "svc"), ("content-length", "4"), ("expect", "100-continue")],
            )
        )
        await c.s.drain()
        ev = await asyncio.wait_for(next_event(c), TIMEOUT)
        assert isinstance(ev, h11.InformationalResponse) and ev.status_code == 100
        c.send(h11.Data(data=b"body"), h11.EndOfMessage())
        resp, body = await c.response()
    assert (resp.status_code, body) == (200, b"PUT /put 4")
    assert h1_backend.requests[0].header("expect") is None


async def test_expect_100_continue_denied_gets_final_answer_and_close(h1_backend: H1Backend) -> None:
    app = App(h1_backend.port, decide=lambda h: deny())
    async with h1_proxy(app) as proxy:
        s = await open_tcp("127.0.0.1", proxy.port)
        s.write(b"PUT /x HTTP/1.1\r\nhost: svc\r\ncontent-length: 4\r\nexpect: 100-continue\r\n\r\n")
        reply = await read_to_eof(s)
        s.close()
        await s.wait_closed()
    assert reply.startswith(b"HTTP/1.1 403 ")
    assert b"100 Continue" not in reply
    assert reply.endswith(RBAC_DENIED.encode())


async def test_head_has_no_body(h1_backend: H1Backend) -> None:
    app = App(h1_backend.port)
    async with client_via_proxy(app) as c:
        resp, body = await c.request("HEAD", "/h")
        assert resp.status_code == 200 and body == b""
        assert header(resp, "content-length") == str(len(b"HEAD /h 0"))
        _, body2 = await c.request("GET", "/g")
        assert body2 == b"GET /g 0"


async def test_client_connection_close(h1_backend: H1Backend) -> None:
    app = App(h1_backend.port)
    async with h1_proxy(app) as proxy:
        s = await open_tcp("127.0.0.1", proxy.port)
        s.write(b"GET /bye HTTP/1.1\r\nhost: svc\r\nconnection: close\r\n\r\n")
        reply = await read_to_eof(s)  # the proxy closes after the response
        s.close()
        await s.wait_closed()
    assert reply.startswith(b"HTTP/1.1 200 ")
    assert b"connection: close" in reply.lower()
    assert reply.endswith(b"GET /bye 0")


async def test_upstream_connection_close_is_not_reused(h1_backend: H1Backend) -> None:
    app = App(h1_backend.port)
    async with client_via_proxy(app) as c:
        resp, _ = await c.request("GET", "/close")
        assert resp.status_code == 200
        assert header(resp, "connection") is None  # the client's connection is unaffected
        resp2, _ = await c.request("GET", "/next")
        assert resp2.status_code == 200
    assert app.opens == 2


async def test_http10_client(h1_backend: H1Backend) -> None:
    app = App(h1_backend.port)
    async with h1_proxy(app) as proxy:
        s = await open_tcp("127.0.0.1", proxy.port)
        s.write(b"GET /old HTTP/1.0\r\nhost: svc\r\n\r\n")
        reply = await read_to_eof(s)
        s.close()
        await s.wait_closed()
    assert reply.startswith(b"HTTP/1.1 200 ")
    assert reply.endswith(b"GET /old 0")
    assert app.heads[0].http_version == "1.0"


async def test_upgrade_is_forwarded_as_plain_http(h1_backend: H1Backend) -> None:
    app = App(h1_backend.port)
    async with client_via_proxy(app) as c:
        resp, body = await c.request(
            "GET", "/ws", [("connection", "Upgrade"), ("upgrade", "websocket"), ("sec-websocket-key", "k")]
        )
        assert resp.status_code == 200 and body == b"GET /ws 0"
        resp2, _ = await c.request("GET", "/after")
        assert resp2.status_code == 200
    seen = h1_backend.requests[0]
    assert seen.header("upgrade") is None and seen.header("connection") is None
    assert seen.header("sec-websocket-key") == "k"


async def test_connect_method_is_405(h1_backend: H1Backend) -> None:
    app = App(h1_backend.port)
    async with h1_proxy(app) as proxy:
        s = await open_tcp("127.0.0.1", proxy.port)
        s.write(b"CONNECT example.com:443 HTTP/1.1\r\nhost: example.com:443\r\n\r\n")
        reply = await read_to_eof(s)
        s.close()
        await s.wait_closed()
    assert reply.startswith(b"HTTP/1.1 405 ")
    assert app.heads == []
    records = await app.wait_records(1)
    assert records[0].status == 405


# --- ReadBody: deciding after the body (ext_authz includeRequestBodyInCheck) ---------------------


def reading(limit: int, partial: bool, seen: list[tuple[bytes, bool]], allow: bool = True) -> object:
    from waypoint.request import ReadBody

    async def then(body: bytes, complete: bool) -> Verdict:
        seen.append((body, complete))
        return Forward("k") if allow else deny("body says no")

    return lambda head: ReadBody(limit, partial, then)


async def test_read_body_then_forward_the_whole_body(h1_backend: H1Backend) -> None:
    seen: list[tuple[bytes, bool]] = []
    app = App(h1_backend.port, decide=reading(10, False, seen))  # type: ignore[arg-type]
    async with client_via_proxy(app) as c:
        resp, body = await c.request("POST", "/small", body=b"hello")
        assert (resp.status_code, body) == (200, b"POST /small 5")
        resp, body = await c.request("GET", "/empty")
        assert resp.status_code == 200
        resp, body = await c.request("POST", "/big", body=b"x" * 11)
        assert (resp.status_code, body) == (413, b"Payload Too Large")  # over the limit, not partial
        resp, body = await c.request("GET", "/after")  # the connection is still good
        assert resp.status_code == 200
    assert seen == [(b"hello", True), (b"", True), (b"", True)]
    assert [r.body for r in h1_backend.requests] == [b"hello", b"", b""]


async def test_read_body_partial_and_chunked(h1_backend: H1Backend) -> None:
    seen: list[tuple[bytes, bool]] = []
    app = App(h1_backend.port, decide=reading(4, True, seen))  # type: ignore[arg-type]
    async with client_via_proxy(app) as c:
        c.send(
            h11.Request(
                method="POST", target="/chunks", headers=[("host", "svc"), ("transfer-encoding", "chunked")]
            )
        )
        for part in (b"ab", b"cd", b"ef", b"gh"):
            c.send(h11.Data(data=part))
        c.send(h11.EndOfMessage())
        await c.s.drain()
        resp, body = await c.response()
    assert (resp.status_code, body) == (200, b"POST /chunks 8")
    assert seen == [(b"abcd", False)]  # the first limit bytes; the authorizer is told it is partial
    assert h1_backend.requests[0].body == b"abcdefgh"  # forwarded whole


async def test_read_body_denied_and_100_continue(h1_backend: H1Backend) -> None:
    seen: list[tuple[bytes, bool]] = []
    app = App(h1_backend.port, decide=reading(100, False, seen, allow=False))  # type: ignore[arg-type]
    async with client_via_proxy(app) as c:
        c.send(
            h11.Request(
                method="PUT",
                target="/x",
                headers=[("host", "svc"), ("content-length", "4"), ("expect", "100-continue")],
            )
        )
        await c.s.drain()
        ev = await asyncio.wait_for(next_event(c), TIMEOUT)
        assert isinstance(ev, h11.InformationalResponse) and ev.status_code == 100  # asked for the body
        c.send(h11.Data(data=b"body"), h11.EndOfMessage())
        resp, body = await c.response()
    assert (resp.status_code, body) == (403, b"body says no")
    assert seen == [(b"body", True)] and not h1_backend.requests
