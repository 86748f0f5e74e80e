"""The waypoint's HTTP/2 (and gRPC) engine: each downstream stream is a request, forwarded over
upstream HTTP/2 connections that are shared per upstream key.

``serve_http2`` speaks HTTP/2 with prior knowledge (the client sends the preface; on a port the
app declared HTTP/2, or after ``waypoint.sniff`` saw the preface) using the sans-IO ``h2``
library; this module only moves bytes and frames between two kinds of ``_Endpoint``: the
downstream server connection and upstream client connections held by an ``Http2UpstreamPool``.

Behaviour chosen on purpose:

* **One task per request stream** (owned by the connection's ``TaskGroup``): ``on_request``,
  then a local answer or forwarding. Forwarding runs the request body pump and the response
  relay concurrently, so both directions stream.
* **Flow control end to end** — DATA received from one side is acknowledged (WINDOW_UPDATE)
  only after it has been handed to the other side's connection (within that side's window)
  and its transport drained. A slow upstream therefore closes the client's stream window, and
  memory per stream stays bounded by the window we advertise (``stream_window``).
* **Upstream sharing** — requests whose ``Forward.upstream_key`` is equal are multiplexed over
  one upstream connection; another is dialled (``open_upstream``) when none has a free stream
  slot (the upstream's ``MAX_CONCURRENT_STREAMS``, capped at ``max_streams_per_connection``)
  or the last one is gone or going away (GOAWAY). Dials for one key are serialised so a burst
  of requests opens one connection, not one each. ``None`` keys get a connection of their own
  that is closed when the request ends. Pass one pool to many ``serve_http2`` calls to share
  upstream connections between downstream connections; by default each call has its own.
* **Trailers** pass through both ways (gRPC's ``grpc-status`` lives there); a HEADERS frame
  with END_STREAM (a gRPC trailers-only response) stays one frame.
* **RST_STREAM** propagates: a downstream reset cancels the upstream stream (same code); an
  upstream reset after the response head resets the downstream stream (same code); before
  the head it becomes a local 503 (gRPC: UNAVAILABLE), as does a connect failure or the
  upstream connection dying. A response complete before its request is ended gets the rest
  of the request refused with RST_STREAM(NO_ERROR) (RFC 9113 §8.1).
* **GOAWAY** — from the client: no new work is expected, streams in flight finish, then we
  close. From an upstream: the connection takes no new streams; streams above its
  last-stream-id fail as refused (503 / UNAVAILABLE); the others finish, then it is closed.
  (``h2`` closes its state machine on a received GOAWAY, which would kill the streams a
  graceful GOAWAY lets finish; ``_H2Connection`` keeps it open for a NO_ERROR GOAWAY and we
  enforce "no new streams" ourselves.)
* **gRPC** is ``content-type: application/grpc*``: the head's ``protocol`` is ``grpc`` and a
  local answer is trailers-only (``:status 200``, ``grpc-status``, ``grpc-message``).
* ``CONNECT`` (and extended CONNECT) is answered 405 without asking the app.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import structlog
from h2.errors import ErrorCodes
from hyperframe.frame import Frame, GoAwayFrame

from mesh.tasks import Supervisor
from waypoint.bytestream import READ_SIZE, ByteStream
from waypoint.request import (
    PAYLOAD_TOO_LARGE,
    Forward,
    OnDone,
    OnRequest,
    OpenUpstream,
    ReadBody,
    RequestHead,
    Respond,
    Tally,
    grpc_message_encode,
    resolve,
)

log = structlog.get_logger(__name__)

STREAM_WINDOW = 1024 * 1024
CONNECTION_WINDOW = 16 * 1024 * 1024
MAX_CONCURRENT_STREAMS = 100
UPSTREAM_FAILURE = b"upstream connect error or disconnect/reset before headers"

Header = tuple[bytes, bytes]
# Connection-specific fields never travel in HTTP/2 (RFC 9113 §8.2.2); ``te`` only as "trailers".
_CONNECTION_SPECIFIC = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"host"}
)


class _Reset(Exception):
    """The stream was reset by the peer (``code``), or its connection died (``code`` None)."""

    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(reason)
        self.code = code


# Items a stream's inbox delivers, in order.
@dataclass(frozen=True)
class _Headers:
    headers: list[Header]
    end: bool


@dataclass(frozen=True)
class _Data:
    data: bytes
    flow: int  # flow-controlled length (includes padding): what to acknowledge


@dataclass(frozen=True)
class _Trailers:
    headers: list[Header]


class _End:
    pass


_END = _End()
_Item = _Headers | _Data | _Trailers | _End


class _Inbox:
    """What one stream received, waiting for its handler; unacknowledged until handed on."""

    def __init__(self, endpoint: _Endpoint, sid: int) -> None:
        self.endpoint = endpoint
        self.sid = sid
        self.items: deque[_Item] = deque()
        self.error: _Reset | None = None
        self.ended = False
        self.discarding = False
        self._waiter: asyncio.Future[None] | None = None

    def push(self, item: _Item) -> None:
        if isinstance(item, _Data) and self.discarding:
            self.endpoint.ack(self.sid, item.flow)
            return
        if isinstance(item, _End) or (isinstance(item, _Headers) and item.end) or isinstance(item, _Trailers):
            if self.ended:
                return
            self.ended = True
        self.items.append(item)
        self._wake()

    def fail(self, error: _Reset) -> None:
        if self.error is None:
            self.error = error
            self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def get(self) -> _Item:
        while not self.items:
            if self.error is not None:
                raise self.error
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self.items.popleft()

    def next_is_end(self) -> bool:
        return bool(self.items) and isinstance(self.items[0], _End)

    def discard(self) -> None:
        """Drop what is queued and anything still coming, acknowledging it (the window stays open)."""
        self.discarding = True
        n = sum(i.flow for i in self.items if isinstance(i, _Data))
        self.items.clear()
        self.endpoint.ack(self.sid, n)


class _H2Connection(h2.connection.H2Connection):
    """``h2`` with graceful GOAWAY: a NO_ERROR GOAWAY leaves the connection usable for the
    streams it lets finish (``h2`` itself closes its state machine on any GOAWAY, so the rest
    of the very read that carried it would already be a protocol error). Refusing new streams
    after it is up to us (``_Endpoint.goaway``)."""

    def _receive_goaway_frame(self, frame: GoAwayFrame) -> tuple[list[Frame], list[h2.events.Event]]:
        if frame.error_code != ErrorCodes.NO_ERROR:
            return super()._receive_goaway_frame(frame)
        ev = h2.events.ConnectionTerminated()
        ev.error_code = ErrorCodes.NO_ERROR
        ev.last_stream_id = frame.last_stream_id
        ev.additional_data = frame.additional_data or None
        return [], [ev]


class _Endpoint:
    """One HTTP/2 connection over a ``ByteStream``: h2 state, a read loop, per-stream inboxes."""

    def __init__(
        self, io: ByteStream, *, client: bool, stream_window: int, connection_window: int, max_streams: int
    ) -> None:
        self.io = io
        cfg = h2.config.H2Configuration(client_side=client, header_encoding=None)
        self.conn = _H2Connection(config=cfg)
        self.inboxes: dict[int, _Inbox] = {}
        self.dead: str | None = None
        self.goaway = False
        self._window_waiters: list[asyncio.Future[None]] = []
        self.conn.initiate_connection()
        self.conn.update_settings(
            {
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: stream_window,
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_streams,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            }
            if client
            else {
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: stream_window,
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_streams,
            }
        )
        if connection_window > 65535:
            self.conn.increment_flow_control_window(connection_window - 65535)

    # -- output ----------------------------------------------------------------------------------
    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.dead is None:
            try:
                self.io.write(data)
            except ConnectionError as e:
                self.die(f"write failed: {e}")

    def ack(self, sid: int, n: int) -> None:
        if n > 0 and self.dead is None:
            self.conn.acknowledge_received_data(n, sid)
            self.flush()

    async def send_headers(self, sid: int, headers: Sequence[Header], end: bool) -> None:
        self._check(sid)
        try:
            self.conn.send_headers(sid, list(headers), end_stream=end)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError) as e:
            raise _Reset(None, f"cannot send headers: {e}") from None
        self.flush()
        await self._drain()

    async def send_data(self, sid: int, data: bytes, end: bool) -> None:
        """Send within the peer's windows, waiting for WINDOW_UPDATE as needed."""
        view = memoryview(data)
        while True:
            self._check(sid)
            try:
                window = self.conn.local_flow_control_window(sid)
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError) as e:
                raise _Reset(None, f"stream closed: {e}") from None
            n = min(window, self.conn.max_outbound_frame_size, len(view))
            if n <= 0 and view:
                await self._window()
                continue
            last = n == len(view)
            try:
                self.conn.send_data(sid, view[:n].tobytes(), end_stream=end and last)
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError) as e:
                raise _Reset(None, f"cannot send data: {e}") from None
            view = view[n:]
            self.flush()
            await self._drain()
            if last:
                return

    async def end_stream(self, sid: int) -> None:
        self._check(sid)
        try:
            self.conn.end_stream(sid)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError) as e:
            raise _Reset(None, f"cannot end stream: {e}") from None
        self.flush()

    def reset(self, sid: int, code: int = ErrorCodes.CANCEL) -> None:
        """RST_STREAM ``sid``; whoever waits on its inbox sees the reset."""
        inbox = self.inboxes.get(sid)
        if inbox is not None:
            inbox.fail(_Reset(None, f"stream reset locally (code {code})"))
        self._wake_windows()
        if self.dead is not None:
            return
        with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, KeyError):
            self.conn.reset_stream(sid, code)
            self.flush()

    def stream_open(self, sid: int) -> bool:
        s = self.conn.streams.get(sid)
        return s is not None and not s.closed

    def _check(self, sid: int) -> None:
        if self.dead is not None:
            raise _Reset(None, self.dead)
        inbox = self.inboxes.get(sid)
        if inbox is not None and inbox.error is not None:
            raise inbox.error

    async def _drain(self) -> None:
        try:
            await self.io.drain()
        except ConnectionError as e:
            self.die(f"write failed: {e}")
            raise _Reset(None, self.dead or "connection lost") from None

    async def _window(self) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._window_waiters.append(fut)
        await fut

    def _wake_windows(self) -> None:
        waiters, self._window_waiters = self._window_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    # -- input -------------------------------------------------------------------------------------
    async def read_loop(self) -> None:
        """Read and dispatch until the connection ends; never raises (the reason is in ``dead``)."""
        self.flush()
        try:
            while self.dead is None:
                data = await self.io.read(READ_SIZE)
                if not data:
                    self.die("connection closed by peer")
                    break
                try:
                    events = self.conn.receive_data(data)
                except h2.exceptions.ProtocolError as e:
                    self.flush()  # h2 queued a GOAWAY
                    self.die(f"protocol error: {e}")
                    break
                for ev in events:
                    self.dispatch(ev)
                self.flush()
                if self.done_after_goaway():
                    break
        except ConnectionError as e:
            self.die(f"connection reset: {e}")
        finally:
            if self.dead is None:
                self.die("closed")

    def done_after_goaway(self) -> bool:
        return self.goaway and not self.inboxes

    def dispatch(self, ev: h2.events.Event) -> None:
        if isinstance(ev, h2.events.DataReceived):
            assert ev.stream_id is not None and ev.data is not None and ev.flow_controlled_length is not None
            inbox = self.inboxes.get(ev.stream_id)
            if inbox is None:
                self.ack(ev.stream_id, ev.flow_controlled_length)
            else:
                inbox.push(_Data(ev.data, ev.flow_controlled_length))
        elif isinstance(ev, h2.events.StreamEnded):
            inbox = self.inboxes.get(ev.stream_id or 0)
            if inbox is not None:
                inbox.push(_END)
        elif isinstance(ev, h2.events.TrailersReceived):
            inbox = self.inboxes.get(ev.stream_id or 0)
            if inbox is not None:
                inbox.push(_Trailers(list(ev.headers or [])))
        elif isinstance(ev, h2.events.StreamReset):
            inbox = self.inboxes.get(ev.stream_id or 0)
            if inbox is not None:
                inbox.fail(_Reset(int(ev.error_code or 0), f"stream reset by peer ({ev.error_code!r})"))
            self._wake_windows()
        elif isinstance(ev, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self._wake_windows()
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.on_goaway(ev)
        else:
            self.handle(ev)

    def handle(self, ev: h2.events.Event) -> None:
        """Side-specific events (requests on the server side, responses on the client side)."""

    def on_goaway(self, ev: h2.events.ConnectionTerminated) -> None:
        self.goaway = True
        if ev.error_code != ErrorCodes.NO_ERROR:
            self.die(f"GOAWAY {ev.error_code!r}")
            return
        # Graceful: streams at or below last_stream_id finish (see ``_H2Connection``).
        last = ev.last_stream_id or 0
        for sid, inbox in list(self.inboxes.items()):
            if self.locally_initiated(sid) and sid > last:
                inbox.fail(_Reset(ErrorCodes.REFUSED_STREAM, "refused by GOAWAY"))

    def locally_initiated(self, sid: int) -> bool:
        return (sid % 2 == 1) == self.conn.config.client_side

    def die(self, reason: str) -> None:
        if self.dead is not None:
            return
        self.dead = reason
        for inbox in list(self.inboxes.values()):
            inbox.fail(_Reset(None, reason))
        self._wake_windows()

    def forget(self, sid: int) -> None:
        """The handler is done with ``sid``: acknowledge anything it left unread."""
        inbox = self.inboxes.pop(sid, None)
        if inbox is not None:
            inbox.discard()

    def close(self) -> None:
        """GOAWAY (if still possible) and close the byte stream."""
        if self.dead is None:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.conn.close_connection()
                self.flush()
            self.die("closed locally")
        self.io.close()

    def abort(self) -> None:
        self.die("aborted")
        self.io.abort()


# -- upstream ------------------------------------------------------------------------------------


class _UpstreamConn(_Endpoint):
    def __init__(self, io: ByteStream, key: Hashable | None, pool: Http2UpstreamPool) -> None:
        super().__init__(
            io,
            client=True,
            stream_window=pool.stream_window,
            connection_window=pool.connection_window,
            max_streams=pool.max_streams_per_connection,
        )
        self.key = key
        self.pool = pool
        self.reserved = 0  # stream slots handed out (open or about to be)
        self.single_use = key is None

    def has_capacity(self) -> bool:
        if self.dead is not None or self.goaway or self.single_use:
            return False
        limit = min(self.conn.remote_settings.max_concurrent_streams, self.pool.max_streams_per_connection)
        return self.reserved < limit

    def open_stream(self, headers: list[Header], end: bool) -> int:
        if self.dead is not None or (self.goaway and not self.single_use):
            raise _Reset(ErrorCodes.REFUSED_STREAM, self.dead or "connection going away")
        try:
            sid = self.conn.get_next_available_stream_id()
            self.conn.send_headers(sid, headers, end_stream=end)
        except (h2.exceptions.ProtocolError, h2.exceptions.NoAvailableStreamIDError) as e:
            raise _Reset(ErrorCodes.REFUSED_STREAM, str(e)) from None
        self.inboxes[sid] = _Inbox(self, sid)
        self.flush()
        return sid

    def handle(self, ev: h2.events.Event) -> None:
        if isinstance(ev, h2.events.ResponseReceived | h2.events.InformationalResponseReceived):
            inbox = self.inboxes.get(ev.stream_id or 0)
            if inbox is not None:
                ended = isinstance(ev, h2.events.ResponseReceived) and ev.stream_ended is not None
                inbox.push(_Headers(list(ev.headers or []), ended))

    def release(self, sid: int) -> None:
        self.forget(sid)
        self.reserved -= 1
        if self.reserved <= 0 and (self.single_use or self.goaway or self.dead is not None):
            self.close()

    def give_back(self, sid: int | None) -> None:
        """End a reservation from ``Http2UpstreamPool.acquire``: reset the stream if it is still
        open, release it; or, when no stream was opened (``sid`` None), the slot alone."""
        if sid is None:
            self.reserved -= 1
            if self.reserved <= 0 and self.single_use:
                self.close()
            return
        if self.stream_open(sid):
            self.reset(sid, ErrorCodes.CANCEL)
        self.release(sid)

    def done_after_goaway(self) -> bool:
        return (self.goaway or self.single_use) and self.reserved <= 0 and not self.inboxes


class Http2UpstreamPool:
    """Upstream HTTP/2 connections, shared by requests with equal upstream keys.

    Owns the connections' read loops; ``aclose`` closes every connection and waits for them.
    """

    def __init__(
        self,
        *,
        max_streams_per_connection: int = MAX_CONCURRENT_STREAMS,
        stream_window: int = STREAM_WINDOW,
        connection_window: int = CONNECTION_WINDOW,
    ) -> None:
        self.max_streams_per_connection = max_streams_per_connection
        self.stream_window = stream_window
        self.connection_window = connection_window
        self.conns: dict[Hashable, list[_UpstreamConn]] = {}
        self._locks: dict[Hashable, asyncio.Lock] = {}
        self._all: set[_UpstreamConn] = set()
        self.tasks = Supervisor("waypoint-h2-upstreams")
        self.dialed = 0

    async def acquire(self, key: Hashable | None, dial: Callable[[], Awaitable[ByteStream]]) -> _UpstreamConn:
        """A connection with a stream slot reserved for the caller (give it back with ``release``)."""
        if key is None:
            c = await self._dial(None, dial)
            c.reserved += 1
            return c
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            for c in self.conns.get(key, ()):
                if c.has_capacity():
                    c.reserved += 1
                    return c
            c = await self._dial(key, dial)
            self.conns.setdefault(key, []).append(c)
            c.reserved += 1
            return c

    async def _dial(self, key: Hashable | None, dial: Callable[[], Awaitable[ByteStream]]) -> _UpstreamConn:
        io = await dial()
        self.dialed += 1
        c = _UpstreamConn(io, key, self)
        self._all.add(c)
        self.tasks.spawn(self._run(c), name="h2-upstream")
        return c

    async def _run(self, c: _UpstreamConn) -> None:
        try:
            await c.read_loop()
        finally:
            self._all.discard(c)
            conns = self.conns.get(c.key)
            if conns is not None and c in conns:
                conns.remove(c)
                if not conns:
                    del self.conns[c.key]
                    lock = self._locks.get(c.key)
                    if lock is not None and not lock.locked():
                        del self._locks[c.key]
            c.close()

    async def exchange(
        self,
        key: Hashable | None,
        dial: Callable[[], Awaitable[ByteStream]],
        headers: list[Header],
        body: bytes,
        *,
        max_response: int = 4 * 1024 * 1024,
    ) -> tuple[list[Header], bytes, list[Header]]:
        """One request and its whole response (head, body, trailers) over a pooled connection:
        the waypoint's own calls (a gRPC ext_authz Check), not a relayed request.

        Raises ``ConnectionError`` when the connection cannot be had, the stream is reset or the
        response is larger than ``max_response``; cancelling resets the stream.
        """
        try:
            up = await self.acquire(key, dial)
        except (TimeoutError, OSError) as e:
            raise ConnectionError(f"connect: {e or type(e).__name__}") from e
        sid: int | None = None
        try:
            try:
                sid = up.open_stream(headers, end=not body)
                if body:
                    await up.send_data(sid, body, end=True)
                inbox = up.inboxes[sid]
                head: list[Header] = []
                data = bytearray()
                while True:
                    item = await inbox.get()
                    if isinstance(item, _Headers):
                        status = _get(item.headers, b":status") or b"0"
                        if status.startswith(b"1"):
                            continue
                        head = item.headers
                        if item.end:
                            return head, b"", []
                    elif isinstance(item, _Data):
                        data += item.data
                        up.ack(sid, item.flow)
                        if len(data) > max_response:
                            raise ConnectionError(f"response larger than {max_response} bytes")
                    elif isinstance(item, _Trailers):
                        return head, bytes(data), item.headers
                    else:
                        return head, bytes(data), []
            except _Reset as e:
                raise ConnectionError(f"stream reset: {e}") from None
        finally:
            up.give_back(sid)

    @property
    def connections(self) -> int:
        return len(self._all)

    async def aclose(self) -> None:
        for c in list(self._all):
            c.close()
        await self.tasks.aclose()


# -- downstream ------------------------------------------------------------------------------------


class _Downstream(_Endpoint):
    def __init__(
        self,
        io: ByteStream,
        serve: _Serve,
        *,
        stream_window: int,
        connection_window: int,
        max_streams: int,
    ) -> None:
        super().__init__(
            io,
            client=False,
            stream_window=stream_window,
            connection_window=connection_window,
            max_streams=max_streams,
        )
        self.serve = serve
        self.tg: asyncio.TaskGroup | None = None
        self.handlers: set[asyncio.Task[None]] = set()

    def handle(self, ev: h2.events.Event) -> None:
        if isinstance(ev, h2.events.RequestReceived):
            sid = ev.stream_id or 0
            inbox = _Inbox(self, sid)
            if ev.stream_ended is not None:
                inbox.push(_END)
            self.inboxes[sid] = inbox
            assert self.tg is not None
            t = self.tg.create_task(self.serve.stream(sid, list(ev.headers or [])), name=f"h2-stream-{sid}")
            self.handlers.add(t)
            t.add_done_callback(self.handlers.discard)

    def done_after_goaway(self) -> bool:
        return self.goaway and not self.inboxes and not self.handlers


async def serve_http2(
    down: ByteStream,
    *,
    on_request: OnRequest,
    open_upstream: OpenUpstream,
    on_done: OnDone,
    pool: Http2UpstreamPool | None = None,
    scheme: str = "http",
    stream_window: int = STREAM_WINDOW,
    connection_window: int = CONNECTION_WINDOW,
    max_concurrent_streams: int = MAX_CONCURRENT_STREAMS,
) -> None:
    """Serve an HTTP/2 (prior knowledge) connection on ``down`` until it ends.

    ``on_request(head) -> Verdict`` (sync or async) decides each stream; for a ``Forward``,
    ``open_upstream(head, forward) -> ByteStream`` is called when the pool has no usable
    connection for ``forward.upstream_key``, and must return a stream to an HTTP/2 (prior
    knowledge) server. ``on_done(record)`` is called once per request stream. Upstream
    connections live in ``pool`` (shared and owned by the caller) or, by default, in a pool of
    this connection's own, closed on return. ``down`` is closed or aborted on return.
    """
    own_pool = pool is None
    upstreams = pool if pool is not None else Http2UpstreamPool()
    serve = _Serve(on_request, open_upstream, on_done, upstreams, scheme)
    ep = _Downstream(
        down,
        serve,
        stream_window=stream_window,
        connection_window=connection_window,
        max_streams=max_concurrent_streams,
    )
    serve.ep = ep
    try:
        async with asyncio.TaskGroup() as tg:
            ep.tg = tg
            await ep.read_loop()
            # The connection ended (EOF, error, or GOAWAY with nothing left in flight): every
            # inbox was failed by ``die``; handlers still waiting on the app are cancelled.
            for t in list(ep.handlers):
                t.cancel()
    finally:
        ep.close()  # GOAWAY if the connection still works (protocol errors queued theirs), then close
        if own_pool:
            await upstreams.aclose()


class _Serve:
    """Per-request logic for one downstream connection."""

    ep: _Downstream

    def __init__(
        self,
        on_request: OnRequest,
        open_upstream: OpenUpstream,
        on_done: OnDone,
        pool: Http2UpstreamPool,
        scheme: str,
    ) -> None:
        self.on_request = on_request
        self.open_upstream = open_upstream
        self.on_done = on_done
        self.pool = pool
        self.scheme = scheme
        self.loop = asyncio.get_running_loop()

    async def stream(self, sid: int, headers: list[Header]) -> None:
        head, pseudo = _head(headers, self.scheme)
        t = Tally(head, self.loop.time())
        try:
            await self._serve(sid, head, pseudo, headers, t)
        except _Reset as e:
            if t.downstream_failure is None and t.upstream_failure is None:
                t.downstream_failure = str(e)
        except asyncio.CancelledError:
            t.downstream_failure = t.downstream_failure or self.ep.dead or "cancelled"
            self.ep.reset(sid, ErrorCodes.CANCEL)
            raise
        except Exception:
            log.exception("h2 stream handler failed", path=head.path)
            t.downstream_failure = "internal error"
            self.ep.reset(sid, ErrorCodes.INTERNAL_ERROR)
        finally:
            self.ep.forget(sid)
            self.on_done(t.record(self.loop.time()))
            task = asyncio.current_task()
            if task is not None:
                self.ep.handlers.discard(task)
            if self.ep.done_after_goaway():
                self.ep.close()

    async def _serve(
        self, sid: int, head: RequestHead, pseudo: dict[bytes, bytes], headers: list[Header], t: Tally
    ) -> None:
        if head.method == "CONNECT" or b":protocol" in pseudo:
            await self._respond(sid, t, Respond(405, b"CONNECT is not supported\n"))
            return
        verdict: Forward | Respond | ReadBody
        try:
            verdict = await resolve(self.on_request(head))
        except Exception:
            log.exception("h2 on_request failed", path=head.path)
            verdict = Respond(500, b"internal error\n")
        if isinstance(verdict, ReadBody):
            verdict = await self._read_body(sid, verdict, head)
        if isinstance(verdict, Respond):
            await self._respond(sid, t, verdict)
        else:
            await self._forward(sid, head, headers, verdict, t)

    async def _read_body(self, sid: int, rb: ReadBody, head: RequestHead) -> Forward | Respond:
        """Read the body (up to ``rb.limit`` and a bit), then ask ``rb.then``. What was read goes
        back to the front of the stream's inbox, already acknowledged (the client's window stays
        open while it is held: at most ``limit`` plus a frame)."""
        inbox = self.ep.inboxes[sid]
        taken: list[_Item] = []
        body = bytearray()
        complete = inbox.ended and not inbox.items
        try:
            while not complete and len(body) <= rb.limit:
                item = await inbox.get()
                taken.append(item)
                if isinstance(item, _Data):
                    body += item.data
                    self.ep.ack(sid, item.flow)
                elif not isinstance(item, _Headers):
                    complete = True  # trailers or the end
        finally:
            for item in reversed(taken):
                inbox.items.appendleft(_Data(item.data, 0) if isinstance(item, _Data) else item)
        if not complete and not rb.partial:
            return PAYLOAD_TOO_LARGE
        try:
            return await resolve(rb.then(bytes(body) if complete else bytes(body[: rb.limit]), complete))
        except Exception:
            log.exception("h2 on_request failed (after the body)", path=head.path)
            return Respond(500, b"internal error\n")

    async def _respond(self, sid: int, t: Tally, r: Respond) -> None:
        t.local = True
        extra = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in r.headers]
        if t.head.is_grpc:
            code = r.grpc_code()
            hdrs = [
                (b":status", b"200"),
                (b"content-type", b"application/grpc"),
                (b"grpc-status", str(code).encode()),
                (b"grpc-message", grpc_message_encode(r.grpc_text()).encode()),
            ]
            hdrs += [(k, v) for k, v in extra if k != b"content-type"]
            t.status, t.grpc_status = 200, code
            await self.ep.send_headers(sid, hdrs, end=True)
        else:
            hdrs = [(b":status", str(r.status).encode())]
            if r.body and not any(k == b"content-type" for k, _ in extra):
                hdrs.append((b"content-type", b"text/plain"))
            hdrs += [(k, v) for k, v in extra if k != b"content-length"]
            hdrs.append((b"content-length", str(len(r.body)).encode()))
            t.status = r.status
            body = r.body if t.head.method != "HEAD" else b""
            await self.ep.send_headers(sid, hdrs, end=not body)
            if body:
                await self.ep.send_data(sid, body, end=True)
                t.response_bytes += len(body)
        self._refuse_rest_of_request(sid)

    def _refuse_rest_of_request(self, sid: int) -> None:
        """Our response is complete; if the client is still sending, stop it (RFC 9113 §8.1)."""
        inbox = self.ep.inboxes.get(sid)
        if inbox is not None and not inbox.ended and inbox.error is None:
            inbox.discard()
            self.ep.reset(sid, ErrorCodes.NO_ERROR)

    async def _forward(
        self, sid: int, head: RequestHead, headers: list[Header], fwd: Forward, t: Tally
    ) -> None:
        t.upstream_key = fwd.upstream_key
        inbox = self.ep.inboxes[sid]
        try:
            up = await self.pool.acquire(fwd.upstream_key, lambda: self.open_upstream(head, fwd))
        except Exception as e:  # whatever the app's dialer raises
            t.upstream_failure = f"connect: {e or type(e).__name__}"
            log.info("h2 upstream connect failed", authority=head.authority, error=str(e))
            await self._respond(sid, t, Respond(503, UPSTREAM_FAILURE))
            return
        usid: int | None = None
        try:
            try:
                usid = up.open_stream(_upstream_headers(head, headers, fwd), end=inbox.next_is_end())
            except _Reset as e:
                t.upstream_failure = f"connect: {e}"
                await self._respond(sid, t, Respond(503, UPSTREAM_FAILURE))
                return
            if inbox.next_is_end():
                inbox.items.popleft()
            pump = self.loop.create_task(self._pump_request(sid, inbox, up, usid, t), name=f"h2-req-{sid}")
            try:
                await self._relay_response(sid, up, usid, t, fwd)
            finally:
                if not pump.done():
                    pump.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pump
        finally:
            up.give_back(usid)

    async def _pump_request(self, sid: int, inbox: _Inbox, up: _UpstreamConn, usid: int, t: Tally) -> None:
        """Downstream request body → upstream; then watch for the client resetting its stream.

        A downstream reset (at any time until the response is complete and this task is
        cancelled) resets the upstream stream, which wakes the response relay.
        """
        try:
            sent_end = inbox.ended and not inbox.items  # END_STREAM came with the headers
            while not sent_end:
                item = await inbox.get()
                if isinstance(item, _Data):
                    end = inbox.next_is_end()
                    await up.send_data(usid, item.data, end=end)
                    t.request_bytes += len(item.data)
                    self.ep.ack(sid, item.flow)
                    if end:
                        inbox.items.popleft()
                        sent_end = True
                elif isinstance(item, _Trailers):
                    await up.send_headers(usid, item.headers, end=True)
                    sent_end = True
                elif isinstance(item, _End):
                    await up.end_stream(usid)
                    sent_end = True
            await inbox.get()  # nothing follows END_STREAM: this returns only by raising a reset
        except _Reset as e:
            if inbox.error is e:  # the client reset its stream (or its connection died)
                t.downstream_failure = str(e)
                up.reset(usid, e.code if e.code is not None else ErrorCodes.CANCEL)
            # else the upstream stream failed: the relay reports it

    async def _relay_response(self, sid: int, up: _UpstreamConn, usid: int, t: Tally, fwd: Forward) -> None:
        """Upstream response → downstream, with the failure handling of the module docstring."""
        uinbox = up.inboxes[usid]
        sent_head = False
        try:
            while True:
                try:
                    item = await uinbox.get()
                except _Reset as e:
                    if self.ep.dead is not None or (
                        (dinbox := self.ep.inboxes.get(sid)) is not None and dinbox.error is not None
                    ):
                        return  # the client went away first; the pump reset the upstream
                    t.upstream_failure = "reset" if e.code is not None else str(e)
                    if e.code == ErrorCodes.REFUSED_STREAM:
                        t.upstream_failure = f"refused: {e}"
                    if sent_head:
                        self.ep.reset(sid, e.code if e.code is not None else ErrorCodes.INTERNAL_ERROR)
                    else:
                        await self._respond(sid, t, Respond(503, UPSTREAM_FAILURE))
                    return
                if isinstance(item, _Headers):
                    status = int(_get(item.headers, b":status") or b"0")
                    if 100 <= status < 200:
                        if status != 101:
                            await self.ep.send_headers(sid, item.headers, end=False)
                        continue
                    t.status = status
                    if item.end:
                        t.grpc_status = _grpc_status(item.headers)
                    sent_head = True
                    await self.ep.send_headers(
                        sid, fwd.response_headers(_response_headers(item.headers)), end=item.end
                    )
                    if item.end:
                        break
                elif isinstance(item, _Data):
                    end = uinbox.next_is_end()
                    await self.ep.send_data(sid, item.data, end=end)
                    t.response_bytes += len(item.data)
                    up.ack(usid, item.flow)
                    if end:
                        break
                elif isinstance(item, _Trailers):
                    t.grpc_status = _grpc_status(item.headers)
                    await self.ep.send_headers(sid, _response_headers(item.headers), end=True)
                    break
                elif isinstance(item, _End):
                    await self.ep.end_stream(sid)
                    break
        except _Reset as e:
            # Sending downstream failed: the client reset the stream or the connection died.
            t.downstream_failure = str(e)
            up.reset(usid, ErrorCodes.CANCEL)
            return
        self._refuse_rest_of_request(sid)


def _get(headers: Sequence[Header], name: bytes) -> bytes | None:
    return next((v for k, v in headers if k == name), None)


def _grpc_status(headers: Sequence[Header]) -> int | None:
    v = _get(headers, b"grpc-status")
    try:
        return int(v) if v is not None else None
    except ValueError:
        return None


def _head(headers: Sequence[Header], scheme: str) -> tuple[RequestHead, dict[bytes, bytes]]:
    pseudo = {k: v for k, v in headers if k.startswith(b":")}
    regular = tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in headers if not k.startswith(b":"))
    authority = pseudo.get(b":authority") or next(
        (v.encode("latin-1") for k, v in regular if k == "host"), b""
    )
    content_type = next((v for k, v in regular if k == "content-type"), "")
    head = RequestHead(
        method=pseudo.get(b":method", b"").decode("latin-1"),
        path=pseudo.get(b":path", b"").decode("latin-1"),
        authority=authority.decode("latin-1"),
        scheme=pseudo.get(b":scheme", scheme.encode()).decode("latin-1"),
        headers=regular,
        protocol="grpc" if content_type.startswith("application/grpc") else "h2",
        http_version="2",
    )
    return head, pseudo


def _upstream_headers(head: RequestHead, headers: Sequence[Header], fwd: Forward) -> list[Header]:
    out: list[Header] = [
        (b":method", head.method.encode("latin-1")),
        (b":scheme", head.scheme.encode("latin-1")),
        (b":authority", head.authority.encode("latin-1")),
        (b":path", (fwd.path or head.path).encode("latin-1")),
    ]
    drop = {n.encode("latin-1") for n in fwd.remove_headers}
    for k, v in headers:
        if k.startswith(b":") or k in _CONNECTION_SPECIFIC or k in drop:
            continue
        if k == b"te" and v.lower() != b"trailers":
            continue
        out.append((k, v))
    out += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in fwd.add_headers]
    return out


def _response_headers(headers: Sequence[Header]) -> list[Header]:
    return [(k, v) for k, v in headers if k not in _CONNECTION_SPECIFIC]
