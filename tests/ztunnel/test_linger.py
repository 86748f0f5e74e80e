"""App-side sockets armed for a RST (SO_LINGER {on, 0}) still end with a FIN when a relay ends
normally: every byte reaches a slow app, then a clean EOF.

The crash path (``kill -9`` gives a RST) is tested with a real process in test_crash_netns.py.
Here the graceful path, deterministically: the app's receive window is tiny and it reads only
after ztunnel closed its side, so most of the answer still sits in ztunnel's kernel send queue
at close — which a close with SO_LINGER 0 would discard (the app would see a reset after a few
KiB), and a graceful close delivers.
"""

from __future__ import annotations

import asyncio
import socket
import struct

from mesh.hbone.relay import TcpLeg, rst_on_close
from ztunnel.state import relay_sockets

PAYLOAD = 96 * 1024


async def tcp_pair(*, small_receiver: bool = False) -> tuple[socket.socket, socket.socket]:
    """(connecting side, accepted side) on loopback; the connecting side's receive window is
    tiny when ``small_receiver``, the accepted side's send buffer large enough for PAYLOAD."""
    loop = asyncio.get_running_loop()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.setblocking(False)
        near = socket.socket()
        near.setblocking(False)
        if small_receiver:
            near.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window
        await loop.sock_connect(near, listener.getsockname())
        far, _ = await loop.sock_accept(listener)
    far.setblocking(False)
    far.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1024 * 1024)
    return near, far


async def read_all(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    out = bytearray()
    while chunk := await loop.sock_recv(sock, 65536):
        out += chunk
    return bytes(out)


def linger(sock: socket.socket) -> tuple[int, int]:
    on, seconds = struct.unpack("ii", sock.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8))
    return on, seconds


async def test_rst_on_close_is_armed() -> None:
    app, zt = await tcp_pair()
    try:
        rst_on_close(zt)
        assert linger(zt) == (1, 0)
    finally:
        app.close()
        zt.close()


async def test_relay_sockets_ends_gracefully_for_a_slow_app() -> None:
    loop = asyncio.get_running_loop()
    app, zt_app = await tcp_pair(small_receiver=True)  # the app, and ztunnel's socket to it
    zt_up, server = await tcp_pair()  # ztunnel's socket to the other side, and that side
    rst_on_close(zt_app)
    try:
        await loop.sock_sendall(server, b"y" * PAYLOAD)
        server.shutdown(socket.SHUT_WR)
        app.shutdown(socket.SHUT_WR)
        async with asyncio.timeout(30):
            res = await relay_sockets(zt_app, zt_up)  # returns once both sides are closed
            assert res.error == ""
            assert await read_all(server) == b""
            got = await read_all(app)  # only now does the app read
        assert len(got) == PAYLOAD
    finally:
        app.close()
        server.close()


async def test_tcp_leg_ends_gracefully_for_a_slow_app() -> None:
    loop = asyncio.get_running_loop()
    app, zt_app = await tcp_pair(small_receiver=True)
    rst_on_close(zt_app)
    try:
        _, leg = await loop.create_connection(lambda: TcpLeg(loop), sock=zt_app)
        assert leg.transport is not None
        app.shutdown(socket.SHUT_WR)
        leg.transport.resume_reading()  # no stream attached here: let it see the app's FIN
        leg.on_data(b"y" * PAYLOAD)  # what the stream delivers, then its end
        leg.on_eof()
        async with asyncio.timeout(30):
            await leg.closed
            got = await read_all(app)
        assert len(got) == PAYLOAD
        assert leg.error is None
    finally:
        app.close()
