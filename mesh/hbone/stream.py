"""HBONE streams on asyncio: one CONNECT tunnel's worth of bytes in each direction.

A ``Stream`` is driven by its connection (``mesh.hbone.connection``) and delivers what it
receives to a ``Sink``: a TCP leg (``mesh.hbone.relay``) or a ``BufferedSink`` for coroutine
reads. Backpressure is explicit and end to end:

* a stream whose queue (bytes waiting for flow-control window) passes ``HIGH_WATER`` or whose TLS
  transport is paused reports ``writable() == False``; the TCP leg feeding it pauses reading and
  resumes from the ``on_writable`` callback;
* received bytes are acknowledged to the peer (WINDOW_UPDATE) only once the TCP leg's transport
  accepted them without pausing, so a slow reader slows the remote writer and memory in between
  stays bounded by the HTTP/2 windows.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, Protocol

from mesh.hbone.protocol import CONNECT_ERROR

if TYPE_CHECKING:
    from mesh.hbone.connection import HboneProtocol

HIGH_WATER = 512 * 1024  # queued bytes per stream before its source is paused


class StreamError(Exception):
    """A stream was reset or its connection died."""


class Sink(Protocol):
    """Where a stream delivers what it receives (a TCP leg, or a buffer for ``read()``)."""

    def on_data(self, data: bytes | memoryview) -> None: ...
    def on_eof(self) -> None: ...
    def on_reset(self, error: StreamError) -> None: ...


class Stream:
    """One CONNECT stream: a TCP connection's worth of bytes in each direction."""

    def __init__(self, owner: HboneProtocol, stream_id: int) -> None:
        self._owner = owner
        self.stream_id = stream_id
        self._sink: Sink | None = None
        self._early: list[bytes | memoryview] = []
        self._early_eof = False
        self._error: StreamError | None = None
        self._writable_cb: Callable[[], None] | None = None
        self._response: asyncio.Future[Any] | None = None  # while a client waits for the answer
        self.local_closed = False  # we sent END_STREAM or reset
        self.remote_closed = False
        self.bytes_sent = 0
        self.bytes_received = 0
        self.done: asyncio.Future[None] = owner.loop.create_future()

    # -- receiving --------------------------------------------------------------------------------

    def attach(self, sink: Sink) -> None:
        """Start delivering to ``sink``, first whatever arrived before it was attached."""
        self._sink = sink
        early, self._early = self._early, []
        for chunk in early:
            sink.on_data(chunk)
        if self._error is not None:
            sink.on_reset(self._error)
        elif self._early_eof:
            sink.on_eof()

    def ack(self, n: int) -> None:
        """The sink consumed ``n`` bytes: return them to the peer's window."""
        if n > 0 and not self._owner.dead and self._owner.conn.acknowledge(self.stream_id, n):
            self._owner.flush_soon()

    def _on_data(self, data: bytes | memoryview) -> None:
        self.bytes_received += len(data)
        if self._sink is None:
            self._early.append(data)
        else:
            self._sink.on_data(data)

    def _on_eof(self) -> None:
        self.remote_closed = True
        if self._sink is None:
            self._early_eof = True
        else:
            self._sink.on_eof()
        self._check_done()

    def _on_reset(self, error: StreamError) -> None:
        if self._error is not None or self.done.done():
            return
        self._error = error
        self.local_closed = self.remote_closed = True
        if self._response is not None and not self._response.done():
            self._response.set_exception(error)
        if self._sink is not None:
            self._sink.on_reset(error)
        self._fire_writable()
        self._check_done()

    # -- sending ----------------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._error is not None:
            raise self._error
        if self.local_closed:
            raise StreamError("stream already half-closed")
        self.bytes_sent += len(data)
        self._owner.conn.send_data(self.stream_id, data)
        self._owner.flush_soon()

    def writable(self) -> bool:
        """False while the writer should stop feeding this stream (window or transport full)."""
        if self._error is not None:
            return True  # let the writer run into the error
        return not self._owner.write_paused and self._owner.conn.pending(self.stream_id) < HIGH_WATER

    def on_writable(self, cb: Callable[[], None]) -> None:
        """Call ``cb`` once, when ``writable()`` turns true again."""
        self._writable_cb = cb
        self._owner.blocked[self.stream_id] = self

    def _fire_writable(self) -> None:
        cb, self._writable_cb = self._writable_cb, None
        if cb is not None:
            cb()

    async def drain(self) -> None:
        """Wait until the stream is writable again (for coroutine-style writers)."""
        if self.writable():
            return
        fut: asyncio.Future[None] = self._owner.loop.create_future()

        def wake() -> None:
            if not fut.done():
                fut.set_result(None)

        self.on_writable(wake)
        await fut
        if self._error is not None:
            raise self._error

    def write_eof(self) -> None:
        """Half-close: END_STREAM once queued data is out."""
        if self.local_closed:
            return
        self.local_closed = True
        if not self._owner.dead:
            self._owner.conn.end_stream(self.stream_id)
            self._owner.flush_soon()
        self._check_done()

    def reset(self, code: int = CONNECT_ERROR) -> None:
        """Abort the stream (the TCP leg was reset or failed)."""
        if self.done.done():
            return
        if not self._owner.dead:
            self._owner.conn.reset(self.stream_id, code)
            self._owner.flush_soon()
        self._on_reset(StreamError(f"stream reset locally (code {code})"))

    def _check_done(self) -> None:
        if self.local_closed and self.remote_closed and not self.done.done():
            self.done.set_result(None)
            self._owner.stream_finished(self)


@contextlib.asynccontextmanager
async def cancel_on_end(stream: Stream) -> AsyncIterator[None]:
    """Run the block only while ``stream`` lasts: if it ends first, the block is cancelled.

    For work done on a stream's behalf before it carries bytes — dialing its upstream, say —
    that must not outlive it: a peer that resets the stream or drops the connection mid-dial
    has the dial cancelled at once (and whatever it opened closed by its own cleanup), rather
    than finished and then left with nobody to hand it to. The cancellation surfaces as
    ``StreamError`` naming why the stream ended; a cancellation from outside (a drain, a
    policy close) stays a ``CancelledError``. Like ``asyncio.timeout``, the request is only
    made while the task is inside the block, so it never lands on a later ``await``.
    """
    task = asyncio.current_task()
    assert task is not None, "cancel_on_end needs a task"
    if stream.done.done():
        raise StreamError(str(stream._error or "stream already ended"))
    inside, fired = True, False

    def end(_: object) -> None:
        nonlocal fired
        if inside and not fired:  # a callback scheduled just before the block left is stale
            fired = True
            task.cancel()

    stream.done.add_done_callback(end)
    try:
        yield
    except asyncio.CancelledError:
        if fired:
            fired = False
            if task.uncancel() == 0:
                # A new exception each time: raising the stored one would grow its traceback.
                raise StreamError(str(stream._error or "stream ended")) from None
        raise
    finally:
        inside = False
        if fired:
            task.uncancel()  # our request was swallowed inside the block: take it back
        stream.done.remove_done_callback(end)


class BufferedSink:
    """A sink with coroutine reads, for tools and tests. Acknowledges data as it is read."""

    def __init__(self, stream: Stream) -> None:
        self._stream = stream
        self._chunks: list[bytes | memoryview] = []
        self._eof = False
        self._error: StreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        stream.attach(self)

    def on_data(self, data: bytes | memoryview) -> None:
        self._chunks.append(data)
        self._wake()

    def on_eof(self) -> None:
        self._eof = True
        self._wake()

    def on_reset(self, error: StreamError) -> None:
        self._error = error
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def read(self) -> bytes:
        """The next chunk, or b"" at end of stream. Raises StreamError after a reset."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._eof:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        chunk = self._chunks.pop(0)
        self._stream.ack(len(chunk))
        return bytes(chunk)

    async def read_all(self) -> bytes:
        out = bytearray()
        while chunk := await self.read():
            out += chunk
        return bytes(out)
