"""Protocol sniffing: classification of first bytes, and sniff() on real and scripted streams."""

from __future__ import annotations

import asyncio
from collections import deque

import pytest

from tests.waypoint.conftest import TIMEOUT, App, H1Backend, listening
from waypoint.bytestream import READ_SIZE, TcpByteStream, open_tcp
from waypoint.http1 import serve_http1
from waypoint.sniff import H2_PREFACE, ReplayStream, Sniffed, classify, sniff


@pytest.mark.parametrize(
    ("data", "final", "expected"),
    [
        (H2_PREFACE, False, "h2"),
        (H2_PREFACE + b"\x00\x00\x12\x04", False, "h2"),
        (b"PRI * HTTP/2", False, None),  # could still be the preface
        (b"PRI * HTTP/2", True, "tcp"),
        (b"GET / HTTP/1.1\r\nhost: x\r\n\r\n", False, "http1"),
        (b"POST /a?b=c HTTP/1.0\n", False, "http1"),
        (b"GET /", False, None),
        (b"GET / HTTP/1.", False, None),
        (b"GET /", True, "tcp"),
        (b"", True, "tcp"),
        (b"\x16\x03\x01\x02\x00", False, "tcp"),  # a TLS ClientHello
        (b"SSH-2.0-OpenSSH_9.6\r\n", False, "tcp"),
        (b"GET / HTTP/2.0\r\n", False, "tcp"),
        (b"GET  / HTTP/1.1\r\n", False, "tcp"),
    ],
)
def test_classify(data: bytes, final: bool, expected: Sniffed | None) -> None:
    assert classify(data, final=final) == expected


class Scripted:
    """A ByteStream that delivers scripted chunks, each when the test releases it."""

    def __init__(self) -> None:
        self.chunks: deque[bytes] = deque()
        self.ready = asyncio.Event()
        self.reads = 0

    def feed(self, data: bytes) -> None:
        self.chunks.append(data)
        self.ready.set()

    async def read(self, max_bytes: int = READ_SIZE) -> bytes:
        self.reads += 1
        while not self.chunks:
            self.ready.clear()
            await self.ready.wait()
        chunk = self.chunks.popleft()
        if len(chunk) > max_bytes:
            self.chunks.appendleft(chunk[max_bytes:])
            chunk = chunk[:max_bytes]
        return chunk

    def write(self, data: bytes) -> None: ...
    async def drain(self) -> None: ...
    def write_eof(self) -> None: ...
    def abort(self) -> None: ...
    def close(self) -> None: ...


async def test_split_request_line_waits_for_more() -> None:
    s = Scripted()
    for part in (b"GE", b"T /x H", b"TTP/1.1\r\nhost: a\r\n\r\n"):
        s.feed(part)
    kind, stream = await sniff(s, timeout=TIMEOUT)
    assert kind == "http1"
    assert s.reads == 3
    assert await stream.read() == b"GET /x HTTP/1.1\r\nhost: a\r\n\r\n"


async def test_split_preface() -> None:
    s = Scripted()
    s.feed(H2_PREFACE[:5])
    s.feed(H2_PREFACE[5:] + b"frames")
    kind, stream = await sniff(s, timeout=TIMEOUT)
    assert kind == "h2"
    assert await stream.read(10) == H2_PREFACE[:10]
    assert await stream.read() == H2_PREFACE[10:] + b"frames"


async def test_eof_is_tcp() -> None:
    s = Scripted()
    s.feed(b"GET /")
    s.feed(b"")
    kind, stream = await sniff(s, timeout=TIMEOUT)
    assert kind == "tcp"
    assert await stream.read() == b"GET /"


async def test_replay_then_inner() -> None:
    s = Scripted()
    s.feed(b"rest")
    r = ReplayStream(s, b"first")
    assert await r.read(3) == b"fir"
    assert await r.read() == b"st"
    assert await r.read() == b"rest"


async def test_server_speaks_first_is_tcp_and_loses_nothing() -> None:
    """A client that waits for the server's banner: the deadline passes, tcp, no bytes consumed."""
    decided: asyncio.Future[Sniffed] = asyncio.get_running_loop().create_future()

    async def serve(s: TcpByteStream) -> None:
        kind, stream = await sniff(s, timeout=0.2)
        decided.set_result(kind)
        stream.write(b"220 smtp.example ESMTP\r\n")  # the server speaks first
        await stream.drain()
        line = await stream.read()
        stream.write(b"250 got " + line)
        await stream.drain()
        stream.close()

    async with listening(serve) as lst:
        c = await open_tcp("127.0.0.1", lst.port)
        async with asyncio.timeout(TIMEOUT):
            banner = await c.reader.readline()
            c.write(b"HELO me\r\n")
            reply = await c.reader.read()
        c.close()
        await c.wait_closed()
    assert decided.result() == "tcp"
    assert banner == b"220 smtp.example ESMTP\r\n"
    assert reply == b"250 got HELO me\r\n"


async def test_sniffed_http1_is_served(h1_backend: H1Backend) -> None:
    app = App(h1_backend.port)

    async def serve(s: TcpByteStream) -> None:
        kind, stream = await sniff(s, timeout=TIMEOUT)
        assert kind == "http1"
        await serve_http1(stream, on_request=app.on_request, open_upstream=app.open_upstream, on_done=app.on_done)

    async with listening(serve) as lst:
        c = await open_tcp("127.0.0.1", lst.port)
        c.write(b"GET /sniffed HTTP/1.1\r\nhost: svc\r\nconnection: close\r\n\r\n")
        async with asyncio.timeout(TIMEOUT):
            reply = await c.reader.read()
        c.close()
        await c.wait_closed()
    assert reply.startswith(b"HTTP/1.1 200 ")
    assert reply.endswith(b"GET /sniffed 0")


async def test_sniffed_h2_preface_over_tcp() -> None:
    decided: asyncio.Future[tuple[Sniffed, bytes]] = asyncio.get_running_loop().create_future()

    async def serve(s: TcpByteStream) -> None:
        kind, stream = await sniff(s, timeout=TIMEOUT)
        decided.set_result((kind, await stream.read(len(H2_PREFACE))))

    async with listening(serve) as lst:
        c = await open_tcp("127.0.0.1", lst.port)
        c.write(H2_PREFACE)
        kind, replayed = await asyncio.wait_for(decided, TIMEOUT)
        c.close()
        await c.wait_closed()
    assert (kind, replayed) == ("h2", H2_PREFACE)
