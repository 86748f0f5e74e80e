"""``ByteStream``: the one byte-pipe shape the waypoint's protocol engines read and write.

The engines (HTTP/1.1, HTTP/2, the sniffer) run on a downstream that is an HBONE CONNECT stream
(``mesh.hbone.stream.Stream``) in production and a TCP socket in tests, and on upstreams that are
HBONE streams to a destination or plain TCP. Both are adapted here to a small coroutine API with
the flow control made explicit:

* ``read`` returns what has arrived (at most ``max_bytes``), ``b""`` at EOF, and raises
  ``ConnectionError`` after a reset. It is cancellation-safe: a ``read`` cancelled while waiting
  loses no bytes (the sniffer's bounded wait relies on it).
* ``write`` never blocks; callers ``await drain()`` after writing so a slow peer slows them.
  Over HBONE, bytes received are acknowledged to the peer (HTTP/2 WINDOW_UPDATE) only when
  ``read`` hands them out, so an engine that stops reading stops the remote writer.
* ``write_eof`` half-closes, ``close`` ends gracefully (flushes, then closes), ``abort`` resets.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Protocol, runtime_checkable

from mesh.hbone.protocol import LocalProtocolError
from mesh.hbone.stream import Stream, StreamError

READ_SIZE = 64 * 1024


class StreamReset(ConnectionResetError):
    """The stream was reset (by the peer, or aborted locally)."""


@runtime_checkable
class ByteStream(Protocol):
    """A bidirectional byte stream with explicit backpressure (see the module docstring)."""

    async def read(self, max_bytes: int = READ_SIZE) -> bytes: ...
    def write(self, data: bytes) -> None: ...
    async def drain(self) -> None: ...
    def write_eof(self) -> None: ...
    def abort(self) -> None: ...
    def close(self) -> None: ...


class TcpByteStream:
    """A ``ByteStream`` over an asyncio ``StreamReader``/``StreamWriter`` pair (a TCP connection)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def read(self, max_bytes: int = READ_SIZE) -> bytes:
        return await self.reader.read(max_bytes)

    def write(self, data: bytes) -> None:
        if self.writer.transport.is_closing():
            raise StreamReset("connection closed")
        self.writer.write(data)

    async def drain(self) -> None:
        await self.writer.drain()

    def write_eof(self) -> None:
        t = self.writer.transport
        if not t.is_closing() and t.can_write_eof():
            self.writer.write_eof()

    def abort(self) -> None:
        self.writer.transport.abort()

    def close(self) -> None:
        self.writer.close()

    async def wait_closed(self) -> None:
        """Wait until the transport is gone (for tests and orderly shutdown)."""
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass


async def open_tcp(host: str, port: int, *, limit: int = READ_SIZE) -> TcpByteStream:
    """Dial ``host:port`` over plain TCP (an ``open_upstream`` for tests and plaintext peers)."""
    reader, writer = await asyncio.open_connection(host, port, limit=limit)
    return TcpByteStream(reader, writer)


class HboneByteStream:
    """A ``ByteStream`` over an HBONE CONNECT ``Stream``, as its ``Sink``.

    Received chunks wait here unacknowledged; ``read`` hands them out and acknowledges exactly
    what it hands out, so the peer can have at most one HTTP/2 stream window in flight to us.
    ``write`` feeds the stream, and ``drain`` waits while the stream reports not writable (its
    flow-control queue is past its high-water mark or the TLS transport is paused).

    ``close`` half-closes our side (END_STREAM once queued data is out, nothing is discarded)
    and from then on reads and acknowledges whatever the peer still sends, so its writer is
    never stuck on a window we stopped opening; the stream is done when the peer ends too.
    """

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self._chunks: deque[bytes | memoryview] = deque()
        self._eof = False
        self._error: StreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._discard = False
        stream.attach(self)

    # Sink ----------------------------------------------------------------------------------------
    def on_data(self, data: bytes | memoryview) -> None:
        if self._discard:
            self.stream.ack(len(data))
            return
        self._chunks.append(data)
        self._wake()

    def on_eof(self) -> None:
        self._eof = True
        self._wake()

    def on_reset(self, error: StreamError) -> None:
        self._error = error
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    # ByteStream ----------------------------------------------------------------------------------
    async def read(self, max_bytes: int = READ_SIZE) -> bytes:
        while not self._chunks:
            if self._error is not None:
                raise StreamReset(str(self._error))
            if self._eof:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        chunk = self._chunks[0]
        if len(chunk) <= max_bytes:
            self._chunks.popleft()
            out = bytes(chunk)
        else:
            view = memoryview(chunk)
            out = bytes(view[:max_bytes])
            self._chunks[0] = view[max_bytes:]
        self.stream.ack(len(out))
        return out

    def write(self, data: bytes) -> None:
        try:
            self.stream.write(data)
        except (StreamError, LocalProtocolError) as e:
            raise StreamReset(str(e)) from None

    async def drain(self) -> None:
        try:
            await self.stream.drain()
        except StreamError as e:
            raise StreamReset(str(e)) from None

    def write_eof(self) -> None:
        self.stream.write_eof()

    def abort(self) -> None:
        self.stream.reset()

    def close(self) -> None:
        self.stream.write_eof()
        self._discard = True
        n = sum(len(c) for c in self._chunks)
        self._chunks.clear()
        self.stream.ack(n)

    async def wait_closed(self) -> None:
        """Wait until both directions of the stream are finished (or it was reset)."""
        await self.stream.done
