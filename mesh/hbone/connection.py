"""An HBONE connection on asyncio: the buffered protocol shared by the client and server sides.

It feeds received bytes to the sans-IO core (``mesh.hbone.protocol``), hands the resulting events
to its streams (``mesh.hbone.stream``), writes what the core has to send, wakes writers blocked
on flow control, keeps the peer alive with PINGs and closes gracefully with GOAWAY. The sides
add what differs: ``mesh.hbone.client`` opens streams, ``mesh.hbone.server`` answers them.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable

import structlog

from mesh.hbone.events import (
    ConnectionTerminated,
    Data,
    Event,
    PingAcked,
    StreamEnded,
    StreamReset,
    WindowOpened,
)
from mesh.hbone.protocol import HboneConnection, ProtocolError
from mesh.hbone.stream import Stream, StreamError
from mesh.identity import Identity

log = structlog.get_logger(__name__)

TRANSPORT_HIGH_WATER = 1024 * 1024
PING_INTERVAL = 10.0
PING_TIMEOUT = 20.0
MIN_READ_BUFFER = 16 * 1024  # an HBONE connection's receive buffer grows to what the TLS layer holds


class HboneProtocol(asyncio.BufferedProtocol):
    """An HBONE connection on a TLS transport (shared by the client and server sides).

    A buffered protocol: the TLS layer decrypts straight into our receive buffer, sized to what
    it holds, instead of allocating (and, for 256 KiB reads, mapping and unmapping) a fresh
    bytes object per read. DATA payloads reach the sinks as views of that buffer; a sink (or a
    transport queue) may keep such a view, and then the buffer is left to it and the next read
    gets a new one — see ``get_buffer``.
    """

    conn: HboneConnection

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        ping_interval: float = PING_INTERVAL,
        ping_timeout: float = PING_TIMEOUT,
    ) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, Stream] = {}
        self.blocked: dict[int, Stream] = {}
        self.write_paused = False
        self.dead = False
        self.peer: Identity | None = None
        self.closed: asyncio.Future[None] = loop.create_future()
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._ping_sent_at: float | None = None
        self._ping_timer: asyncio.TimerHandle | None = None
        self.goaway_received = False
        self.on_idle: Callable[[HboneProtocol], None] | None = None
        # Bytes that arrive between the TLS handshake and ``start()`` (peer not verified yet).
        self._early: list[bytes | memoryview] | None = []
        self._rbuf: bytearray | None = None
        self._flush_pending = False

    # -- transport callbacks ------------------------------------------------------------------------

    def start(self, transport: asyncio.Transport) -> None:
        """Begin HTTP/2 on an established TLS transport."""
        self.transport = transport
        transport.set_write_buffer_limits(high=TRANSPORT_HIGH_WATER)
        self.flush()
        self._ping_timer = self.loop.call_later(self._ping_interval, self._keepalive)
        early, self._early = self._early, None
        for data in early or ():
            self.data_received(data)

    def get_buffer(self, sizehint: int) -> bytearray:
        buf = self._rbuf
        # Three references (this attribute, ``buf``, the call's argument) mean nobody kept a
        # view of the last read: reuse. Otherwise a sink still holds payload, leave it that.
        if buf is None or len(buf) < sizehint or sys.getrefcount(buf) > 3:
            buf = self._rbuf = bytearray(max(sizehint, MIN_READ_BUFFER))
        return buf

    def buffer_updated(self, nbytes: int) -> None:
        assert self._rbuf is not None
        self.data_received(memoryview(self._rbuf)[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        if self._early is not None:
            self._early.append(bytes(data))
            return
        if self.dead:
            return
        try:
            events = self.conn.receive_data(data)
        except ProtocolError as e:
            log.warning("hbone protocol error, closing connection", peer=str(self.peer), error=str(e))
            self.abort(StreamError(f"protocol error: {e}"))
            return
        for ev in events:
            self._dispatch(ev)
        self.flush()

    def eof_received(self) -> bool | None:
        self.abort(StreamError("connection closed by peer"))
        return None

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake_blocked()

    def connection_lost(self, exc: Exception | None) -> None:
        self._teardown(StreamError(f"connection lost: {exc}" if exc else "connection closed"))

    # -- plumbing -------------------------------------------------------------------------------

    def flush(self) -> None:
        self._flush_pending = False
        if self.transport is not None and not self.dead and self.conn.has_output:
            self.transport.write(self.conn.data_to_send())

    def flush_soon(self) -> None:
        """Flush at the end of this turn of the event loop: what the streams write in one turn
        (DATA, WINDOW_UPDATEs, END_STREAM, often for several streams) leaves as one TLS write
        instead of one each (profiled: ~6 writes per proxied HTTP request before)."""
        if not self._flush_pending:
            self._flush_pending = True
            self.loop.call_soon(self.flush)

    def _dispatch(self, ev: Event) -> None:
        if isinstance(ev, Data):
            st = self.streams.get(ev.stream_id)
            if st is not None:
                st._on_data(ev.data)
            else:
                self.conn.acknowledge(ev.stream_id, len(ev.data))
        elif isinstance(ev, StreamEnded):
            st = self.streams.get(ev.stream_id)
            if st is not None:
                st._on_eof()
        elif isinstance(ev, StreamReset):
            st = self.streams.get(ev.stream_id)
            if st is not None:
                st._on_reset(StreamError(f"stream reset by peer (code {ev.error_code})"))
        elif isinstance(ev, WindowOpened):
            self._wake_blocked()
        elif isinstance(ev, PingAcked):
            self._ping_sent_at = None
        elif isinstance(ev, ConnectionTerminated):
            self.goaway_received = True
            log.debug("hbone GOAWAY received", peer=str(self.peer), code=ev.error_code)
            for sid, st in list(self.streams.items()):
                if sid > ev.last_stream_id:
                    st._on_reset(StreamError("stream refused by GOAWAY"))
            self._maybe_idle()
        else:
            self.handle_event(ev)

    def handle_event(self, ev: Event) -> None:
        """Side-specific events (requests on the server, responses on the client)."""

    def _wake_blocked(self) -> None:
        for sid, st in list(self.blocked.items()):
            if st.writable():
                del self.blocked[sid]
                st._fire_writable()

    def stream_finished(self, st: Stream) -> None:
        self.streams.pop(st.stream_id, None)
        self.blocked.pop(st.stream_id, None)
        self._maybe_idle()

    def _maybe_idle(self) -> None:
        if not self.streams:
            if self.conn.closing:
                self.close()
            elif self.on_idle is not None:
                self.on_idle(self)

    def _keepalive(self) -> None:
        if self.dead:
            return
        now = self.loop.time()
        if self._ping_sent_at is not None and now - self._ping_sent_at >= self._ping_timeout:
            log.warning("hbone peer did not answer PING, closing", peer=str(self.peer))
            self.abort(StreamError("peer dead: PING not answered"))
            return
        if self._ping_sent_at is None:
            self._ping_sent_at = now
            self.conn.ping(int(now * 1000).to_bytes(8, "big"))
            self.flush()
        self._ping_timer = self.loop.call_later(min(self._ping_interval, self._ping_timeout), self._keepalive)

    def close(self) -> None:
        """GOAWAY and hang up once the last stream is done (now, if there is none)."""
        if self.dead:
            return
        self.conn.close()  # GOAWAY, once
        self.flush()
        if not self.streams and self.transport is not None:
            try:
                self.transport.close()
            except RuntimeError:
                # asyncio's SSL transport refuses close() once the peer's close_notify has
                # unwrapped it; there is nothing left to shut down gracefully then.
                self.transport.abort()

    def abort(self, error: StreamError) -> None:
        self._teardown(error)
        if self.transport is not None:
            self.transport.abort()

    def _teardown(self, error: StreamError) -> None:
        if self._ping_timer is not None:
            self._ping_timer.cancel()
            self._ping_timer = None
        self.dead = True
        for st in list(self.streams.values()):
            st._on_reset(error)
        self.streams.clear()
        self.blocked.clear()
        if not self.closed.done():
            self.closed.set_result(None)
