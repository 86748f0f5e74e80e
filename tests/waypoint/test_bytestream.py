"""The ByteStream adapters: TCP (asyncio streams) and HBONE (a real loopback HBONE client/server pair)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from mesh.hbone.client import ClientProtocol, open_connection
from mesh.hbone.server import HboneServer, InboundStream
from mesh.identity import Identity
from mesh.pki import CertificateAuthority, Credential
from mesh.tls import client_context, server_context
from tests.waypoint.conftest import TIMEOUT, App, H1Backend, listening
from waypoint.bytestream import ByteStream, HboneByteStream, StreamReset, TcpByteStream, open_tcp
from waypoint.http1 import serve_http1

CLIENT_ID = Identity("cluster.local", "shop", "ztunnel-client")
WAYPOINT_ID = Identity("cluster.local", "shop", "waypoint")


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.generate("cluster.local")


@pytest.fixture(scope="module")
def creds(ca: CertificateAuthority) -> tuple[Credential, Credential]:
    return ca.issue(CLIENT_ID), ca.issue(WAYPOINT_ID)


Handler = Callable[[HboneByteStream], Awaitable[None]]


@contextlib.asynccontextmanager
async def hbone_pair(
    creds: tuple[Credential, Credential], handler: Handler
) -> AsyncIterator[ClientProtocol]:
    """An HBONE server whose CONNECT streams are handed to ``handler`` as ByteStreams, and a client."""
    client_cred, server_cred = creds

    async def on_connect(inbound: InboundStream) -> None:
        await handler(HboneByteStream(inbound.accept()))

    srv = HboneServer(on_connect, server_context(server_cred), "cluster.local")
    await srv.listen("127.0.0.1", 0)
    conn: ClientProtocol | None = None
    try:
        host, port = srv.address
        conn = await open_connection(host, port, client_context(client_cred), "cluster.local", WAYPOINT_ID)
        yield conn
    finally:
        if conn is not None:
            conn.close()
        await srv.close()


async def read_all(s: ByteStream) -> bytes:
    out = bytearray()
    async with asyncio.timeout(TIMEOUT):
        while chunk := await s.read():
            out += chunk
    return bytes(out)


async def echo(s: ByteStream) -> None:
    while data := await s.read(100_000):
        s.write(data)
        await s.drain()
    s.write_eof()


async def test_tcp_roundtrip_and_half_close() -> None:
    async def serve(s: TcpByteStream) -> None:
        await echo(s)

    async with listening(serve) as lst:
        c = await open_tcp("127.0.0.1", lst.port)
        payload = os.urandom(500_000)

        async def send() -> None:
            for i in range(0, len(payload), 65536):
                c.write(payload[i : i + 65536])
                await c.drain()
            c.write_eof()

        sender = asyncio.create_task(send())
        got = await read_all(c)
        await sender
        c.close()
        await c.wait_closed()
    assert got == payload


async def test_tcp_abort_is_seen_as_reset_or_eof() -> None:
    aborted = asyncio.Event()

    async def serve(s: TcpByteStream) -> None:
        await s.read(1)
        s.abort()
        aborted.set()

    async with listening(serve) as lst:
        c = await open_tcp("127.0.0.1", lst.port)
        c.write(b"x")
        await asyncio.wait_for(aborted.wait(), TIMEOUT)
        with contextlib.suppress(ConnectionError):
            assert await read_all(c) == b""
        with pytest.raises(ConnectionError):
            for _ in range(100):  # the kernel reports the RST on a later write
                c.write(b"y" * 65536)
                await c.drain()
        c.close()
        await c.wait_closed()


async def test_hbone_roundtrip(creds: tuple[Credential, Credential]) -> None:
    async with hbone_pair(creds, echo) as conn:
        c = HboneByteStream(await conn.open_stream("10.0.0.1:80"))
        payload = os.urandom(3 * 1024 * 1024)

        async def send() -> None:
            for i in range(0, len(payload), 65536):
                c.write(payload[i : i + 65536])
                await c.drain()
            c.write_eof()

        sender = asyncio.create_task(send())
        got = await read_all(c)
        await sender
        await asyncio.wait_for(c.wait_closed(), TIMEOUT)
    assert got == payload


async def test_hbone_reads_return_at_most_max_bytes(creds: tuple[Credential, Credential]) -> None:
    async def serve(s: HboneByteStream) -> None:
        s.write(b"abcdefghij")
        s.write_eof()
        await s.wait_closed()

    async with hbone_pair(creds, serve) as conn:
        c = HboneByteStream(await conn.open_stream("10.0.0.1:80"))
        assert await asyncio.wait_for(c.read(4), TIMEOUT) == b"abcd"
        assert await asyncio.wait_for(c.read(4), TIMEOUT) == b"efgh"
        assert await read_all(c) == b"ij"
        c.write_eof()


async def test_hbone_backpressure_until_the_reader_reads(creds: tuple[Credential, Credential]) -> None:
    """Unread bytes are not acknowledged: the writer's stream stops being writable."""
    may_read = asyncio.Event()
    counted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def serve(s: HboneByteStream) -> None:
        await may_read.wait()
        counted.set_result(len(await read_all(s)))
        s.write_eof()

    async with hbone_pair(creds, serve) as conn:
        st = await conn.open_stream("10.0.0.1:80")
        c = HboneByteStream(st)
        sent = 0
        limit = 64 * 1024 * 1024
        while st.writable() and sent < limit:
            c.write(b"w" * 65536)
            sent += 65536
            await asyncio.sleep(0)  # let the connection move frames (not a wait for a condition)
        assert not st.writable()
        assert sent < limit
        may_read.set()
        await asyncio.wait_for(c.drain(), TIMEOUT)
        c.write_eof()
        assert await asyncio.wait_for(counted, TIMEOUT) == sent
        assert await read_all(c) == b""


async def test_hbone_abort_resets_peer(creds: tuple[Credential, Credential]) -> None:
    outcome: asyncio.Future[BaseException | bytes] = asyncio.get_running_loop().create_future()

    async def serve(s: HboneByteStream) -> None:
        try:
            outcome.set_result(await read_all(s))
        except ConnectionError as e:
            outcome.set_result(e)

    async with hbone_pair(creds, serve) as conn:
        c = HboneByteStream(await conn.open_stream("10.0.0.1:80"))
        c.write(b"partial")
        await c.drain()
        c.abort()
        result = await asyncio.wait_for(outcome, TIMEOUT)
        with pytest.raises(StreamReset):
            c.write(b"more")
    assert isinstance(result, StreamReset)


async def test_hbone_read_is_cancellation_safe(creds: tuple[Credential, Credential]) -> None:
    go = asyncio.Event()

    async def serve(s: HboneByteStream) -> None:
        await go.wait()
        s.write(b"late")
        s.write_eof()
        await s.wait_closed()

    async with hbone_pair(creds, serve) as conn:
        c = HboneByteStream(await conn.open_stream("10.0.0.1:80"))
        reader = asyncio.create_task(c.read())
        await asyncio.sleep(0)
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        go.set()
        assert await read_all(c) == b"late"
        c.write_eof()


async def test_http1_engine_over_hbone(creds: tuple[Credential, Credential], h1_backend: H1Backend) -> None:
    """The waypoint's shape: HBONE terminated, HTTP/1.1 parsed on the CONNECT stream, TCP upstream."""
    app = App(h1_backend.port)

    async def serve(s: HboneByteStream) -> None:
        await serve_http1(s, on_request=app.on_request, open_upstream=app.open_upstream, on_done=app.on_done)
        # HboneServer resets a stream still open when its handler returns: let the client finish.
        await s.wait_closed()

    async with hbone_pair(creds, serve) as conn:
        c = HboneByteStream(await conn.open_stream("10.96.0.10:80"))
        c.write(b"GET /a HTTP/1.1\r\nhost: svc\r\n\r\nGET /b HTTP/1.1\r\nhost: svc\r\nconnection: close\r\n\r\n")
        reply = await read_all(c)
        c.write_eof()
        await asyncio.wait_for(c.wait_closed(), TIMEOUT)
    assert reply.count(b"HTTP/1.1 200 ") == 2
    assert reply.endswith(b"GET /b 0")
    assert app.opens == 1
