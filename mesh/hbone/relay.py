"""Relaying between HBONE streams and plain TCP, with backpressure both ways.

A ``TcpLeg`` is the TCP side of a tunnel: it writes what it reads into its ``Stream`` (pausing
while the stream is not writable) and is the stream's sink (acknowledging bytes once its own
transport took them). ``wait_relay`` waits for both directions to finish; ``connect_and_relay``
serves a CONNECT by dialing its target.

The app-side sockets of a node proxy are armed with :func:`rst_on_close` while they relay: if
the process dies (``kill -9``, OOM) the kernel closes them with a RST, so the app sees a
failure instead of a FIN that would pass a truncated stream off as complete. A relay that ends
normally disarms its socket (:func:`fin_on_close`) before closing it, so normal ends stay FIN.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from typing import Any, cast

import structlog

from mesh.hbone.protocol import LocalProtocolError
from mesh.hbone.server import InboundStream
from mesh.hbone.stream import HIGH_WATER, Stream, StreamError, cancel_on_end

log = structlog.get_logger(__name__)

_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: any close, even the kernel's, sends a RST
_LINGER_OFF = struct.pack("ii", 0, 0)  # the default: close() sends a FIN after the buffered bytes


def rst_on_close(sock: Any) -> None:
    """Arm ``sock`` (a socket or a transport's socket) so that however it is closed (by us, or
    by the kernel when this process dies) the peer gets a RST. Once per socket, not per frame."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)


def fin_on_close(sock: Any) -> None:
    """Disarm :func:`rst_on_close` before a graceful close: the peer gets a FIN, after every
    byte we still had to send."""
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_OFF)


class TcpLeg(asyncio.Protocol):
    """The plain-TCP side of a tunnel, relaying to and from a ``Stream`` with backpressure."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.stream: Stream | None = None
        self._write_paused = False
        self._unacked = 0
        self._reading_paused = False
        self.eof_from_tcp = False
        self.eof_from_stream = False
        self._before_attach = bytearray()
        self.error: BaseException | None = None
        self.connected: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()

    # TCP side
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        if self.stream is None:
            transport.pause_reading()  # until attached to a stream
            self._reading_paused = True
        if not self.connected.done():
            self.connected.set_result(None)

    def attach(self, stream: Stream) -> None:
        self.stream = stream
        stream.attach(self)
        if self._before_attach:
            early, self._before_attach = bytes(self._before_attach), bytearray()
            self.data_received(early)
        if self.eof_from_tcp:
            stream.write_eof()
        elif self.closed.done():
            stream.reset()  # the TCP side died before the tunnel was up
        elif self._reading_paused:
            if stream.writable():
                self._resume_reading()
            else:
                stream.on_writable(self._resume_reading)

    def data_received(self, data: bytes) -> None:
        st = self.stream
        if st is None:
            # Not attached yet (pause_reading in connection_made is not honoured by every loop):
            # hold the bytes, and stop reading once a window's worth is waiting.
            self._before_attach += data
            if len(self._before_attach) >= HIGH_WATER and self.transport is not None:
                self.transport.pause_reading()
                self._reading_paused = True
            return
        try:
            st.write(data)
        except (StreamError, LocalProtocolError) as e:
            self._fail(e)
            return
        if not st.writable() and self.transport is not None:
            self.transport.pause_reading()
            self._reading_paused = True
            st.on_writable(self._resume_reading)

    def _resume_reading(self) -> None:
        if self.transport is not None and self._reading_paused and not self.transport.is_closing():
            self._reading_paused = False
            self.transport.resume_reading()

    def eof_received(self) -> bool:
        self.eof_from_tcp = True
        if self.stream is not None:
            self.stream.write_eof()
        self._maybe_close()
        return True  # keep the write side open: this is a half-close

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._unacked and self.stream is not None:
            n, self._unacked = self._unacked, 0
            self.stream.ack(n)

    def connection_lost(self, exc: Exception | None) -> None:
        st = self.stream
        if st is not None and not st.done.done():
            if exc is not None or not self.eof_from_tcp:
                st.reset()
            else:
                st.write_eof()
        if exc is not None and self.error is None:
            self.error = exc
        if not self.connected.done():
            self.connected.set_exception(exc or ConnectionError("closed before connecting"))
        if not self.closed.done():
            self.closed.set_result(None)

    # Stream side (Sink)
    def on_data(self, data: bytes | memoryview) -> None:
        if self.transport is None or self.transport.is_closing():
            if self.stream is not None:
                self.stream.ack(len(data))
            return
        self.transport.write(data)
        if self._write_paused:
            self._unacked += len(data)
        elif self.stream is not None:
            self.stream.ack(len(data))

    def on_eof(self) -> None:
        self.eof_from_stream = True
        t = self.transport
        if t is not None and not t.is_closing() and t.can_write_eof():
            t.write_eof()
        self._maybe_close()

    def on_reset(self, error: StreamError) -> None:
        if self.error is None:
            self.error = error
        if self.transport is not None:
            self.transport.abort()

    def _fail(self, error: BaseException) -> None:
        self.error = error
        if self.stream is not None:
            self.stream.reset()
        if self.transport is not None:
            self.transport.abort()

    def _maybe_close(self) -> None:
        if self.eof_from_tcp and self.eof_from_stream and self.transport is not None:
            # Both directions ended cleanly: a graceful close (FIN), even if the socket was armed.
            fin_on_close(self.transport.get_extra_info("socket"))
            self.transport.close()


async def wait_relay(leg: TcpLeg, stream: Stream) -> None:
    """Wait until both directions of a relay are finished.

    Two done-callbacks and one future, held for the life of every relayed connection: lighter
    than ``asyncio.wait`` (which also builds a set, a counter closure and wrapper state), and a
    cancelled waiter never cancels the leg's or the stream's own futures.
    """
    a, b = leg.closed, stream.done
    if a.done() and b.done():
        return
    both: asyncio.Future[None] = a.get_loop().create_future()

    def check(_: object) -> None:
        if a.done() and b.done() and not both.done():
            both.set_result(None)

    a.add_done_callback(check)
    b.add_done_callback(check)
    try:
        await both
    finally:
        a.remove_done_callback(check)
        b.remove_done_callback(check)


async def connect_and_relay(
    inbound: InboundStream, host: str | None = None, port: int | None = None
) -> TcpLeg | None:
    """Serve a CONNECT by dialing its target over plain TCP: 503 if that fails, else relay.

    Returns the finished leg (for byte counts), or None when the target was unreachable. The
    target connection is closed however the stream ends: the dial is abandoned if the stream
    or its connection ends first, and a relay cut short aborts it.
    """
    loop = asyncio.get_running_loop()
    host = host or inbound.request.host
    port = port or inbound.request.port
    try:
        async with cancel_on_end(inbound.stream):
            _, leg = await loop.create_connection(lambda: TcpLeg(loop), host, port)
    except OSError as e:
        log.info("hbone upstream unreachable", target=f"{host}:{port}", error=str(e), status=503)
        inbound.refuse(503)
        return None
    try:
        st = inbound.accept()
        leg.attach(st)
        await wait_relay(leg, st)
    finally:
        if leg.transport is not None and not leg.transport.is_closing():
            leg.transport.abort()
    return leg
