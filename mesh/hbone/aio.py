"""HBONE on asyncio: connections, streams, a server, a relay to TCP and a client pool.

Everything here moves bytes between the sans-IO core (``mesh.hbone.protocol``) and transports.
Backpressure is explicit and end to end:

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
import errno
import socket
import ssl
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, cast

import structlog

from mesh.hbone.events import (
    ConnectionTerminated,
    ConnectRequest,
    Data,
    Event,
    PingAcked,
    RequestRejected,
    Response,
    StreamEnded,
    StreamReset,
    WindowOpened,
)
from mesh.hbone.protocol import (
    CONNECT_ERROR,
    STATUS_OK,
    ClientConnection,
    HboneConnection,
    LocalProtocolError,
    ProtocolError,
    ServerConnection,
    format_authority,
)
from mesh.identity import Identity
from mesh.tasks import Supervisor
from mesh.tls import ClientContext, PeerRejected, describe_tls_error, verify_peer

log = structlog.get_logger(__name__)

HIGH_WATER = 512 * 1024  # queued bytes per stream before its source is paused
TRANSPORT_HIGH_WATER = 1024 * 1024
PING_INTERVAL = 10.0
PING_TIMEOUT = 20.0
CONNECT_TIMEOUT = 10.0
HANDSHAKE_TIMEOUT = 10.0
POOL_IDLE_TIMEOUT = 300.0
READ_SIZE = 256 * 1024
MIN_READ_BUFFER = 16 * 1024  # an HBONE connection's receive buffer grows to what the TLS layer holds


class StreamError(Exception):
    """A stream was reset or its connection died."""


class ConnectRefused(Exception):
    """The HBONE server answered a CONNECT with a status other than 200."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HBONE CONNECT refused with status {status}")
        self.status = status


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

    @property
    def peer(self) -> Identity | None:
        return self._owner.peer

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
            self._owner.flush()

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
        self._owner.flush()

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
            self._owner.flush()
        self._check_done()

    def reset(self, code: int = CONNECT_ERROR) -> None:
        """Abort the stream (the TCP leg was reset or failed)."""
        if self.done.done():
            return
        if not self._owner.dead:
            self._owner.conn.reset(self.stream_id, code)
            self._owner.flush()
        self._on_reset(StreamError(f"stream reset locally (code {code})"))

    def _check_done(self) -> None:
        if self.local_closed and self.remote_closed and not self.done.done():
            self.done.set_result(None)
            self._owner.stream_finished(self)


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
        self.idle_since = time.monotonic()
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._ping_sent_at: float | None = None
        self._ping_timer: asyncio.TimerHandle | None = None
        self.goaway_received = False
        self.on_idle: Callable[[HboneProtocol], None] | None = None
        # Bytes that arrive between the TLS handshake and ``start()`` (peer not verified yet).
        self._early: list[bytes | memoryview] | None = []
        self._rbuf: bytearray | None = None

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
        if self.transport is not None and not self.dead and self.conn.has_output:
            self.transport.write(self.conn.data_to_send())

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
            self.idle_since = time.monotonic()
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


# -- client side --------------------------------------------------------------------------------


class ClientProtocol(HboneProtocol):
    conn: ClientConnection

    def __init__(self, loop: asyncio.AbstractEventLoop, **kw: float) -> None:
        super().__init__(loop, **kw)
        self.conn = ClientConnection()
        self.resumed = False  # the TLS handshake resumed an earlier session (no certificates sent)
        # Where to keep this connection's TLS session when it ends, for the next dial to resume.
        self._resume: tuple[ClientContext, object, ssl.SSLObject] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport  # started by open_connection() once the peer is verified

    @property
    def has_capacity(self) -> bool:
        return not self.dead and not self.goaway_received and self.conn.has_capacity

    async def open_stream(self, authority: str, headers: Iterable[tuple[str, str]] = ()) -> Stream:
        """CONNECT to ``authority``; returns the stream once the server answered 200."""
        if self.dead or self.goaway_received:
            raise StreamError("connection is closing")
        try:
            sid = self.conn.connect(authority, headers)
        except LocalProtocolError as e:
            raise StreamError(str(e)) from None
        st = Stream(self, sid)
        self.streams[sid] = st
        fut: asyncio.Future[Response] = self.loop.create_future()
        st._response = fut  # answered by handle_event; a reset (or the connection dying) fails it
        self.flush()
        try:
            resp = await fut
        except asyncio.CancelledError:
            st.reset()
            raise
        finally:
            st._response = None
        if resp.status != STATUS_OK:
            st._on_reset(StreamError(f"refused with status {resp.status}"))
            raise ConnectRefused(resp.status)
        return st

    def handle_event(self, ev: Event) -> None:
        if isinstance(ev, Response):
            st = self.streams.get(ev.stream_id)
            fut = st._response if st is not None else None
            if fut is not None and not fut.done():
                fut.set_result(ev)

    def _teardown(self, error: StreamError) -> None:
        if self._resume is not None:
            ctx, key, ssl_object = self._resume
            self._resume = None
            ctx.remember(key, ssl_object.session)
        super()._teardown(error)  # resets every stream, failing any response still awaited


async def open_connection(
    host: str,
    port: int,
    ssl_ctx: ssl.SSLContext,
    trust_domain: str,
    expect: Identity,
    *,
    sock: socket.socket | None = None,
    timeout: float = CONNECT_TIMEOUT,
    ping_interval: float = PING_INTERVAL,
    ping_timeout: float = PING_TIMEOUT,
) -> ClientProtocol:
    """Dial an HBONE server and verify it is ``expect``; raise OSError/PeerRejected otherwise."""
    loop = asyncio.get_running_loop()
    # Our protocol object is kept here: with ssl, uvloop hands back its own SSL protocol instead.
    proto = ClientProtocol(loop, ping_interval=ping_interval, ping_timeout=ping_timeout)
    resume_key = (host, port, expect)
    resuming = ssl_ctx if isinstance(ssl_ctx, ClientContext) else None
    token = resuming.offer(resume_key) if resuming is not None else None
    try:
        async with asyncio.timeout(timeout):
            if sock is None:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                if not infos:
                    raise OSError(f"cannot resolve {host}")
                family = infos[0][0]
                sock = socket.socket(family, socket.SOCK_STREAM)
                sock.setblocking(False)
                target = infos[0][4]
            else:
                target = (host, port)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.sock_connect(sock, target)
            transport, _ = await loop.create_connection(
                lambda: proto,
                sock=sock,
                ssl=ssl_ctx,
                server_hostname=token or "",
                ssl_handshake_timeout=timeout,
            )
    except BaseException as e:
        if resuming is not None:
            resuming.withdraw(token)
            resuming.forget(resume_key)  # a failed dial starts over with a full handshake
        if sock is not None:
            sock.close()
        if isinstance(e, TimeoutError):
            raise TimeoutError(f"HBONE connect to {host}:{port} timed out after {timeout:g}s") from None
        if isinstance(e, ssl.SSLError):
            reason = describe_tls_error(e)
            log.warning("hbone handshake failed", server=f"{host}:{port}", reason=reason)
            raise PeerRejected(reason) from None
        raise
    ssl_object = transport.get_extra_info("ssl_object")
    try:
        proto.peer = verify_peer(ssl_object, trust_domain, expect)
    except PeerRejected as e:
        log.warning("hbone server refused", server=f"{host}:{port}", reason=str(e))
        if resuming is not None:
            resuming.forget(resume_key)
        transport.abort()
        raise
    if resuming is not None:
        proto.resumed = ssl_object.session_reused
        proto._resume = (resuming, resume_key, ssl_object)
    proto.start(transport)
    return proto


# -- server side --------------------------------------------------------------------------------

Handler = Callable[["InboundStream"], Awaitable[None]]


@dataclass
class InboundStream:
    """A CONNECT request the server application must answer (``accept()`` or ``refuse()``)."""

    request: ConnectRequest
    stream: Stream
    peer: Identity
    _proto: ServerProtocol
    answered: bool = False

    def accept(self) -> Stream:
        self._answer(STATUS_OK)
        return self.stream

    def refuse(self, status: int) -> None:
        self._answer(status)
        self.stream._on_reset(StreamError(f"refused with status {status}"))

    def _answer(self, status: int) -> None:
        if self.answered:
            raise LocalProtocolError("stream already answered")
        self.answered = True
        if self._proto.dead or self.stream.done.done():
            raise StreamError("stream is gone")
        self._proto.conn.respond(self.stream.stream_id, status)
        self._proto.flush()


class ServerProtocol(HboneProtocol):
    conn: ServerConnection

    def __init__(self, server: HboneServer, peer_addr: tuple[str, int]) -> None:
        super().__init__(server.loop, ping_interval=server.ping_interval, ping_timeout=server.ping_timeout)
        self.server = server
        self.conn = ServerConnection()
        self.peer_addr = peer_addr

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The TLS handshake is already done; ``HboneServer._handshake`` verifies the peer and
        # then calls ``start()``. Bytes arriving before that are held back by ``data_received``.
        self.transport = cast(asyncio.Transport, transport)

    def handle_event(self, ev: Event) -> None:
        if isinstance(ev, ConnectRequest):
            st = Stream(self, ev.stream_id)
            self.streams[ev.stream_id] = st
            assert self.peer is not None
            inbound = InboundStream(ev, st, self.peer, self)
            self.server.tasks.spawn(self.server.run_handler(inbound), name=f"hbone-stream-{ev.stream_id}")
        elif isinstance(ev, RequestRejected):
            log.info("hbone request rejected", peer=str(self.peer), reason=ev.reason, status=400)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.server.connections.discard(self)


class HboneServer:
    """Accepts HBONE: TLS 1.3 with a verified client identity, then CONNECT streams to ``handler``.

    Accepting and the TLS handshake run here (``sock_accept`` + ``connect_accepted_socket``)
    rather than inside ``create_server`` so that a refused client (no certificate, expired, wrong
    root, wrong trust domain) is logged with the reason instead of vanishing inside the loop.
    The listening socket may come from a ``SocketFactory`` (e.g. opened inside a pod netns).
    """

    def __init__(
        self,
        handler: Handler,
        ssl_ctx: ssl.SSLContext,
        trust_domain: str,
        *,
        ping_interval: float = PING_INTERVAL,
        ping_timeout: float = PING_TIMEOUT,
        name: str = "hbone",
    ) -> None:
        self.handler = handler
        self.ssl_ctx = ssl_ctx
        self.trust_domain = trust_domain
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.loop = asyncio.get_running_loop()
        self.tasks = Supervisor(name)
        self.connections: set[ServerProtocol] = set()
        self.connected = asyncio.Event()  # set whenever a verified connection starts
        self._sock: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None

    async def listen(
        self, host: str = "127.0.0.1", port: int = 0, *, sock: socket.socket | None = None
    ) -> None:
        """Start accepting on ``sock`` (already bound) or on a new socket bound to host:port."""
        if sock is None:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((host, port))
            except OSError:
                sock.close()
                raise
        sock.listen(1024)
        sock.setblocking(False)
        self._sock = sock
        self._accepting = self.tasks.spawn(self._accept_loop(sock), name="hbone-accept")

    @property
    def address(self) -> tuple[str, int]:
        assert self._sock is not None
        addr = self._sock.getsockname()
        return addr[0], addr[1]

    async def _accept_loop(self, sock: socket.socket) -> None:
        while True:
            try:
                conn, addr = await self.loop.sock_accept(sock)
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("hbone accept failed, backing off", error=str(e))
                    await asyncio.sleep(0.1)
                    continue
                if e.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                raise
            self.tasks.spawn(self._handshake(conn, (addr[0], addr[1])), name="hbone-handshake")

    async def _handshake(self, conn: socket.socket, addr: tuple[str, int]) -> None:
        client = format_authority(*addr)
        try:
            # uvloop returns its SSL protocol here, not ours: keep our own reference.
            proto = ServerProtocol(self, addr)
            tls, _ = await self.loop.connect_accepted_socket(
                lambda: proto,
                conn,
                ssl=self.ssl_ctx,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
            )
        except (ssl.SSLError, ConnectionError, TimeoutError, OSError) as e:
            log.warning("hbone client refused", client=client, reason=describe_tls_error(e))
            conn.close()
            return
        try:
            proto.peer = verify_peer(tls.get_extra_info("ssl_object"), self.trust_domain)
        except PeerRejected as e:
            log.warning("hbone client refused", client=client, reason=str(e))
            tls.abort()
            return
        self.connections.add(proto)
        self.connected.set()
        proto.start(tls)

    async def run_handler(self, inbound: InboundStream) -> None:
        try:
            await self.handler(inbound)
        except (StreamError, ConnectionError) as e:
            log.debug("hbone stream ended with error", peer=str(inbound.peer), error=str(e))
        finally:
            if not inbound.answered and not inbound._proto.dead:
                with contextlib.suppress(StreamError, LocalProtocolError):
                    inbound.refuse(503)
            if not inbound.stream.done.done():
                inbound.stream.reset()

    async def stop_accepting(self) -> None:
        """Close the listening socket; established connections are not touched."""
        if self._accepting is not None:
            self._accepting.cancel()
            await asyncio.wait({self._accepting})
            self._accepting = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def close(self, drain_timeout: float = 0.0) -> None:
        """Stop accepting; GOAWAY; let open streams finish for up to ``drain_timeout`` s; then abort."""
        await self.stop_accepting()
        for proto in list(self.connections):
            proto.close()
        if drain_timeout > 0 and self.tasks:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(drain_timeout):
                    await self.tasks.wait()
        for proto in list(self.connections):
            proto.abort(StreamError("server shutting down"))
        await self.tasks.aclose()


# -- TCP legs and relaying ----------------------------------------------------------------------


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
            self.transport.close()


async def relay_to_tcp(
    stream: Stream,
    connect: Callable[[Callable[[], TcpLeg]], Awaitable[tuple[asyncio.BaseTransport, TcpLeg]]],
) -> TcpLeg:
    """Open the upstream TCP leg with ``connect`` (a ``loop.create_connection`` partial)."""
    loop = asyncio.get_running_loop()
    _, leg = await connect(lambda: TcpLeg(loop))
    leg.attach(stream)
    return leg


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

    Returns the finished leg (for byte counts), or None when the target was unreachable.
    """
    loop = asyncio.get_running_loop()
    host = host or inbound.request.host
    port = port or inbound.request.port
    try:
        _, leg = await loop.create_connection(lambda: TcpLeg(loop), host, port)
    except OSError as e:
        log.info("hbone upstream unreachable", target=f"{host}:{port}", error=str(e), status=503)
        inbound.refuse(503)
        return None
    st = inbound.accept()
    leg.attach(st)
    await wait_relay(leg, st)
    return leg
