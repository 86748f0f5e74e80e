"""Loopback plumbing for the waypoint engine tests: listeners that own their tasks, a fake app,
an HTTP/1.1 backend and client built on h11."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h11
import pytest

from waypoint.bytestream import ByteStream, TcpByteStream, open_tcp
from waypoint.request import Forward, RequestHead, RequestRecord, Verdict

TIMEOUT = 20.0  # generous: CI is a loaded 2-core machine


class Listener:
    """A loopback TCP server running ``serve`` per connection; ``close`` cancels and awaits them all."""

    def __init__(self, serve: Callable[[TcpByteStream], Awaitable[None]]) -> None:
        self.serve = serve
        self.tasks: set[asyncio.Task[None]] = set()
        self.accepted = 0
        self.peers: list[str] = []  # client IPs, in accept order
        self.server: asyncio.Server | None = None
        self.errors: list[BaseException] = []

    async def start(self, sock: socket.socket | None = None) -> Listener:
        """On loopback, or on ``sock`` (a listening socket, e.g. one made in a pod's netns)."""
        if sock is not None:
            self.server = await asyncio.start_server(self._on_conn, sock=sock)
        else:
            self.server = await asyncio.start_server(self._on_conn, "127.0.0.1", 0)
        return self

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def _on_conn(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)  # type: ignore[arg-type]
        self.accepted += 1
        self.peers.append(str(w.get_extra_info("peername")[0]))
        stream = TcpByteStream(r, w)
        try:
            await self.serve(stream)
        except asyncio.CancelledError:
            pass  # close() cancelled us; end normally (asyncio's stream callback chokes on cancelled tasks)
        except BaseException as e:
            self.errors.append(e)
            raise
        finally:
            w.close()
            self.tasks.discard(task)  # type: ignore[arg-type]

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for t in list(self.tasks):
            t.cancel()
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=TIMEOUT)
        await self.server.wait_closed()


@contextlib.asynccontextmanager
async def listening(serve: Callable[[TcpByteStream], Awaitable[None]]) -> AsyncIterator[Listener]:
    lst = await Listener(serve).start()
    try:
        yield lst
    finally:
        await lst.close()


def refused_port() -> int:
    """A loopback port nothing listens on (bound then closed)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


@dataclass
class App:
    """The app side of the engines: records heads and results, dials a fixed upstream port."""

    upstream_port: int
    decide: Callable[[RequestHead], Verdict] = lambda head: Forward(upstream_key="backend")
    heads: list[RequestHead] = field(default_factory=list)
    records: list[RequestRecord] = field(default_factory=list)
    opens: int = 0
    opened: list[ByteStream] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def on_request(self, head: RequestHead) -> Verdict:
        self.heads.append(head)
        return self.decide(head)

    async def open_upstream(self, head: RequestHead, fwd: Forward) -> ByteStream:
        self.opens += 1
        s = await open_tcp("127.0.0.1", self.upstream_port)
        self.opened.append(s)
        return s

    def on_done(self, rec: RequestRecord) -> None:
        self.records.append(rec)
        self._changed.set()

    async def wait_records(self, n: int) -> list[RequestRecord]:
        async with asyncio.timeout(TIMEOUT):
            while len(self.records) < n:
                self._changed.clear()
                await self._changed.wait()
        return self.records


# -- HTTP/1.1 over h11 --------------------------------------------------------------------------


@dataclass
class Received:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name), None)


class H1Backend:
    """An HTTP/1.1 origin on h11. Routes by target:

    ``/reset`` answers a head promising 1000 bytes, sends 10 and resets; ``/close`` answers with
    ``Connection: close``; anything else answers ``<METHOD> <target> <body length>``.
    ``progress`` (bytes of the current body so far) is reported to ``on_body``.
    """

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.on_body: Callable[[int], None] | None = None
        self.listener = Listener(self._serve)

    async def start(self, sock: socket.socket | None = None) -> H1Backend:
        await self.listener.start(sock)
        return self

    @property
    def port(self) -> int:
        return self.listener.port

    @property
    def connections(self) -> int:
        return self.listener.accepted

    async def _serve(self, s: TcpByteStream) -> None:
        conn = h11.Connection(h11.SERVER)
        while True:
            ev = await next_h11(conn, s)
            if not isinstance(ev, h11.Request):
                return
            body = bytearray()
            while True:
                ev2 = await next_h11(conn, s)
                if isinstance(ev2, h11.Data):
                    body += ev2.data
                    if self.on_body is not None:
                        self.on_body(len(body))
                elif isinstance(ev2, h11.EndOfMessage):
                    break
                else:
                    return
            target = ev.target.decode()
            rec = Received(
                ev.method.decode(), target, [(k.decode(), v.decode()) for k, v in ev.headers], bytes(body)
            )
            self.requests.append(rec)
            if target == "/reset":
                s.write(conn.send(h11.Response(status_code=200, headers=[("content-length", "1000")])))
                s.write(conn.send(h11.Data(data=b"x" * 10)))
                await s.drain()
                s.abort()
                return
            out = f"{rec.method} {target} {len(body)}".encode()
            headers = [("content-length", str(len(out))), ("x-backend", "h1")]
            if target == "/close":
                headers.append(("connection", "close"))
            s.write(conn.send(h11.Response(status_code=200, headers=headers)))
            if rec.method != "HEAD":
                s.write(conn.send(h11.Data(data=out)))
            s.write(conn.send(h11.EndOfMessage()))
            await s.drain()
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    async def close(self) -> None:
        await self.listener.close()


async def next_h11(conn: h11.Connection, s: ByteStream) -> object:
    while True:
        ev = conn.next_event()
        if ev is not h11.NEED_DATA:
            return ev
        conn.receive_data(await s.read(65536))


@pytest.fixture
async def h1_backend() -> AsyncIterator[H1Backend]:
    b = await H1Backend().start()
    yield b
    await b.close()


class H1Client:
    """A keep-alive HTTP/1.1 client on h11 over one TCP connection."""

    def __init__(self, stream: TcpByteStream) -> None:
        self.s = stream
        self.conn = h11.Connection(h11.CLIENT)

    @classmethod
    async def connect(cls, port: int) -> H1Client:
        return cls(await open_tcp("127.0.0.1", port))

    def send(self, *events: h11.Event) -> None:
        for ev in events:
            data = self.conn.send(ev)
            if data:
                self.s.write(data)

    async def response(self) -> tuple[h11.Response, bytes]:
        """Read one response (skipping 1xx) and its body."""
        async with asyncio.timeout(TIMEOUT):
            while True:
                ev = await next_h11(self.conn, self.s)
                if isinstance(ev, h11.Response):
                    break
                assert isinstance(ev, h11.InformationalResponse), ev
            body = bytearray()
            while True:
                ev2 = await next_h11(self.conn, self.s)
                if isinstance(ev2, h11.Data):
                    body += ev2.data
                elif isinstance(ev2, h11.EndOfMessage):
                    break
                else:
                    raise AssertionError(ev2)
        return ev, bytes(body)

    async def request(
        self, method: str, target: str, headers: list[tuple[str, str]] | None = None, body: bytes = b""
    ) -> tuple[h11.Response, bytes]:
        hdrs = [("host", "svc.test:80"), *(headers or [])]
        if body:
            hdrs.append(("content-length", str(len(body))))
        self.send(h11.Request(method=method, target=target, headers=hdrs))
        if body:
            self.send(h11.Data(data=body))
        self.send(h11.EndOfMessage())
        await self.s.drain()
        resp, data = await self.response()
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        return resp, data

    async def close(self) -> None:
        self.s.close()
        await self.s.wait_closed()


def header(resp: h11.Response, name: str) -> str | None:
    return next((v.decode() for k, v in resp.headers if k == name.encode()), None)


# -- HTTP/2 over h2 ------------------------------------------------------------------------------


class H2Peer:
    """One side of an HTTP/2 connection for tests: h2 state, a reader task, per-stream events."""

    def __init__(self, s: ByteStream, *, client: bool, auto_ack: bool = True) -> None:
        self.s = s
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=client, header_encoding="utf-8"))
        self.conn.initiate_connection()
        self.auto_ack = auto_ack
        self.events: dict[int, list[h2.events.Event]] = {}
        self.changed = asyncio.Event()
        self.closed = False
        self.on_event: Callable[[h2.events.Event], None] | None = None
        self.sent: dict[int, int] = {}  # DATA bytes sent per stream
        self.flush()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.s.write(data)

    async def run(self) -> None:
        try:
            while data := await self.s.read(65536):
                for ev in self.conn.receive_data(data):
                    sid = getattr(ev, "stream_id", 0) or 0
                    self.events.setdefault(sid, []).append(ev)
                    if isinstance(ev, h2.events.DataReceived) and self.auto_ack:
                        assert ev.flow_controlled_length is not None
                        self.conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                    if self.on_event is not None:
                        self.on_event(ev)
                self.flush()
                self.changed.set()
        except ConnectionError:
            pass
        finally:
            self.closed = True
            self.changed.set()

    async def wait_for(self, cond: Callable[[], bool]) -> None:
        async with asyncio.timeout(TIMEOUT):
            while not cond():
                if self.closed:
                    raise ConnectionError("connection closed")
                self.changed.clear()
                await self.changed.wait()

    async def send_body(self, sid: int, data: bytes, end: bool = True) -> None:
        """Send within the flow-control windows."""
        view = memoryview(data)
        while view:
            await self.wait_for(lambda: self.conn.local_flow_control_window(sid) > 0)
            n = min(len(view), self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size)
            self.conn.send_data(sid, view[:n].tobytes(), end_stream=end and n == len(view))
            self.sent[sid] = self.sent.get(sid, 0) + n
            view = view[n:]
            self.flush()
            await self.s.drain()
        if end and not data:
            self.conn.end_stream(sid)
            self.flush()

    def stream_events(self, sid: int) -> list[h2.events.Event]:
        return self.events.get(sid, [])

    def ended(self, sid: int) -> bool:
        return any(isinstance(e, h2.events.StreamEnded | h2.events.StreamReset) for e in self.stream_events(sid))


@dataclass
class H2Response:
    headers: dict[str, str]
    body: bytes
    trailers: dict[str, str]
    reset: int | None


def collect(peer: H2Peer, sid: int) -> H2Response:
    headers: dict[str, str] = {}
    trailers: dict[str, str] = {}
    body = bytearray()
    reset = None
    for ev in peer.stream_events(sid):
        if isinstance(ev, h2.events.ResponseReceived | h2.events.RequestReceived):
            headers = dict(ev.headers or [])  # type: ignore[arg-type]
        elif isinstance(ev, h2.events.DataReceived):
            body += ev.data or b""
        elif isinstance(ev, h2.events.TrailersReceived):
            trailers = dict(ev.headers or [])  # type: ignore[arg-type]
        elif isinstance(ev, h2.events.StreamReset):
            reset = int(ev.error_code or 0)
    return H2Response(headers, bytes(body), trailers, reset)


class H2Client:
    """An HTTP/2 prior-knowledge client over one TCP connection (reader task owned here)."""

    def __init__(self, s: TcpByteStream) -> None:
        self.peer = H2Peer(s, client=True)
        self.task = asyncio.get_running_loop().create_task(self.peer.run())

    @classmethod
    async def connect(cls, port: int) -> H2Client:
        return cls(await open_tcp("127.0.0.1", port))

    def start(self, method: str, path: str, headers: list[tuple[str, str]] | None = None, end: bool = False) -> int:
        sid = self.peer.conn.get_next_available_stream_id()
        hdrs = [(":method", method), (":path", path), (":scheme", "http"), (":authority", "svc.test:80")]
        self.peer.conn.send_headers(sid, hdrs + (headers or []), end_stream=end)
        self.peer.flush()
        return sid

    async def request(
        self, method: str, path: str, headers: list[tuple[str, str]] | None = None, body: bytes = b""
    ) -> H2Response:
        sid = self.start(method, path, headers, end=not body)
        if body:
            await self.peer.send_body(sid, body)
        await self.peer.wait_for(lambda: self.peer.ended(sid))
        return collect(self.peer, sid)

    async def close(self) -> None:
        self.peer.s.close()
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        assert isinstance(self.peer.s, TcpByteStream)
        await self.peer.s.wait_closed()


class H2Backend:
    """An HTTP/2 origin on h2. Answers each request when it ends with ``<METHOD> <path> <body length>``
    (trailers ``x-trailer: done`` when asked with ``want-trailers``). ``/hang`` never answers;
    ``/rst`` answers a head then resets the stream (ENHANCE_YOUR_CALM); ``/goaway`` first sends a
    graceful GOAWAY, then answers. ``hold`` stops acknowledging request data until released."""

    def __init__(self) -> None:
        self.listener = Listener(self._serve)
        self.requests: list[tuple[dict[str, str], bytes, dict[str, str]]] = []
        self.resets: list[tuple[str, int]] = []
        self.received = 0
        self.hold = False
        self.peers: list[H2Peer] = []
        self._unacked: dict[H2Peer, dict[int, int]] = {}
        self.changed = asyncio.Event()

    async def start(self, sock: socket.socket | None = None) -> H2Backend:
        await self.listener.start(sock)
        return self

    @property
    def port(self) -> int:
        return self.listener.port

    @property
    def connections(self) -> int:
        return self.listener.accepted

    def release(self) -> None:
        """Acknowledge everything held back and stop holding."""
        self.hold = False
        for peer, unacked in self._unacked.items():
            peer.auto_ack = True
            for sid, n in unacked.items():
                with contextlib.suppress(Exception):
                    peer.conn.acknowledge_received_data(n, sid)
            peer.flush()
        self._unacked.clear()

    async def wait(self, cond: Callable[[], bool]) -> None:
        async with asyncio.timeout(TIMEOUT):
            while not cond():
                self.changed.clear()
                await self.changed.wait()

    async def _serve(self, s: TcpByteStream) -> None:
        peer = H2Peer(s, client=False, auto_ack=not self.hold)
        self.peers.append(peer)
        paths: dict[int, str] = {}

        def on_event(ev: h2.events.Event) -> None:
            sid = getattr(ev, "stream_id", 0) or 0
            if isinstance(ev, h2.events.RequestReceived):
                paths[sid] = dict(ev.headers or [])[":path"]  # type: ignore[arg-type]
                if paths[sid] == "/goaway":
                    peer.conn.close_connection(last_stream_id=sid)
                    # h2 closes its state machine on GOAWAY; a graceful server keeps serving.
                    peer.conn.state_machine.state = h2.connection.ConnectionState.SERVER_OPEN
                elif paths[sid] == "/rst":
                    peer.conn.send_headers(sid, [(":status", "200")])
                    peer.conn.send_data(sid, b"partial")
                    peer.conn.reset_stream(sid, 0xB)
            elif isinstance(ev, h2.events.DataReceived):
                self.received += len(ev.data or b"")
                if not peer.auto_ack:
                    held = self._unacked.setdefault(peer, {})
                    held[sid] = held.get(sid, 0) + (ev.flow_controlled_length or 0)
            elif isinstance(ev, h2.events.StreamReset):
                self.resets.append((paths.get(sid, "?"), int(ev.error_code or 0)))
            elif isinstance(ev, h2.events.StreamEnded):
                req = collect(peer, sid)
                self.requests.append((req.headers, req.body, req.trailers))
                path = paths.get(sid, "?")
                if path in ("/hang", "/rst"):
                    return
                body = f"{req.headers[':method']} {path} {len(req.body)}".encode()
                want_trailers = "want-trailers" in req.headers
                peer.conn.send_headers(sid, [(":status", "200"), ("x-backend", "h2")])
                peer.conn.send_data(sid, body, end_stream=not want_trailers)
                if want_trailers:
                    peer.conn.send_headers(sid, [("x-trailer", "done")], end_stream=True)
            self.changed.set()

        peer.on_event = on_event
        await peer.run()

    async def close(self) -> None:
        await self.listener.close()


@pytest.fixture
async def h2_backend() -> AsyncIterator[H2Backend]:
    b = await H2Backend().start()
    yield b
    await b.close()
