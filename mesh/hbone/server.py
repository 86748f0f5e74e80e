"""The accepting side of HBONE: ``HboneServer`` and the CONNECT requests it hands to a handler.

Each verified connection is a ``ServerProtocol``; each CONNECT on it becomes an ``InboundStream``
that the handler answers with ``accept()`` (200, then relay, e.g. ``mesh.hbone.relay``) or
``refuse(status)``. A handler that returns without answering gets a 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, cast

import structlog

from mesh.hbone.connection import PING_INTERVAL, PING_TIMEOUT, HboneProtocol
from mesh.hbone.events import ConnectRequest, Event, RequestRejected
from mesh.hbone.memory import release_memory
from mesh.hbone.protocol import STATUS_OK, LocalProtocolError, ServerConnection, format_authority
from mesh.hbone.stream import Stream, StreamError
from mesh.identity import Identity
from mesh.log import ThrottledLog
from mesh.tasks import Supervisor
from mesh.tls import PeerRejected, describe_tls_error, handshake_failure_kind, verify_peer

log = structlog.get_logger(__name__)

HANDSHAKE_TIMEOUT = 10.0
# Handshakes in flight, per peer address and in all. Each holds TLS state and buffers (tens of
# KiB) until it completes or times out; past these a new connection is refused at once, so a
# flood of stalled handshakes has a bounded cost (and a peer cannot take every slot).
MAX_HANDSHAKES_PER_PEER = 128
MAX_HANDSHAKES = 1024
REFUSAL_LOG_INTERVAL = 60.0  # one "hbone client refused" line per peer address and reason per interval

_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a RST

Handler = Callable[["InboundStream"], Awaitable[None]]


class ServerStats(Protocol):
    """Where a server reports what an operator watches: refused handshakes by reason
    (:data:`mesh.tls.FAILURE_KINDS`, plus ``too_many_handshakes``), open connections and streams."""

    def handshake_failed(self, kind: str) -> None: ...
    def connections_changed(self, delta: int) -> None: ...
    def streams_changed(self, delta: int) -> None: ...


class NoStats:
    def handshake_failed(self, kind: str) -> None:
        pass

    def connections_changed(self, delta: int) -> None:
        pass

    def streams_changed(self, delta: int) -> None:
        pass


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
        self._proto.flush_soon()


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
            self.server.stats.streams_changed(1)
            assert self.peer is not None
            inbound = InboundStream(ev, st, self.peer, self)
            self.server.tasks.spawn(self.server.run_handler(inbound), name=f"hbone-stream-{ev.stream_id}")
        elif isinstance(ev, RequestRejected):
            peer = str(self.peer)
            self.server.refusals.info(
                (peer, "rejected"), "hbone request rejected", peer=peer, reason=ev.reason, status=400
            )

    def stream_finished(self, st: Stream) -> None:
        super().stream_finished(st)
        self.server.stats.streams_changed(-1)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.server._forget(self)


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
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        stats: ServerStats | None = None,
        max_handshakes: int = MAX_HANDSHAKES,
        max_handshakes_per_peer: int = MAX_HANDSHAKES_PER_PEER,
    ) -> None:
        self.handler = handler
        self.ssl_ctx = ssl_ctx
        self.trust_domain = trust_domain
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.handshake_timeout = handshake_timeout
        self.loop = asyncio.get_running_loop()
        self.tasks = Supervisor(name)
        self.connections: set[ServerProtocol] = set()
        self.connected = asyncio.Event()  # set whenever a verified connection starts
        self.stats: ServerStats = stats or NoStats()
        self.refusals = ThrottledLog(log, interval=REFUSAL_LOG_INTERVAL)
        self.max_handshakes = max_handshakes
        self.max_handshakes_per_peer = max_handshakes_per_peer
        self.handshaking: dict[str, int] = {}  # peer address -> handshakes in flight
        self.handshakes = 0  # in flight, in all
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
            peer = (addr[0], addr[1])
            if (
                self.handshakes >= self.max_handshakes
                or self.handshaking.get(peer[0], 0) >= self.max_handshakes_per_peer
            ):
                self._refused(peer, "too_many_handshakes", "too many TLS handshakes in flight")
                with contextlib.suppress(OSError):
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                conn.close()
                continue
            self.handshakes += 1
            self.handshaking[peer[0]] = self.handshaking.get(peer[0], 0) + 1
            self.tasks.spawn(self._handshake(conn, peer), name="hbone-handshake")

    def _refused(self, addr: tuple[str, int], kind: str, reason: str) -> None:
        self.stats.handshake_failed(kind)
        # One line per peer address and reason per interval: a flood of refusals costs a
        # counter increment each, not a log line each.
        self.refusals.warning(
            (addr[0], kind), "hbone client refused", client=format_authority(*addr), kind=kind, reason=reason
        )

    async def _handshake(self, conn: socket.socket, addr: tuple[str, int]) -> None:
        try:
            started = await self._tls(conn, addr)
        finally:
            self.handshakes -= 1
            left = self.handshaking.pop(addr[0]) - 1
            if left:
                self.handshaking[addr[0]] = left
        if started is None:
            # Each failed handshake leaves its TLS state's memory with the allocator, which keeps
            # it (glibc does not give freed heap memory back by itself): hand it back once a burst
            # of failures is over, so a flood's peak does not stay resident for good.
            if not self.handshakes:
                release_memory()
            return
        proto, tls = started
        self.connections.add(proto)
        self.stats.connections_changed(1)
        self.connected.set()
        proto.start(tls)

    async def _tls(
        self, conn: socket.socket, addr: tuple[str, int]
    ) -> tuple[ServerProtocol, asyncio.Transport] | None:
        """The TLS handshake and the peer check: a started connection, or None (refused, logged)."""
        try:
            # uvloop returns its SSL protocol here, not ours: keep our own reference.
            proto = ServerProtocol(self, addr)
            tls, _ = await self.loop.connect_accepted_socket(
                lambda: proto,
                conn,
                ssl=self.ssl_ctx,
                ssl_handshake_timeout=self.handshake_timeout,
            )
        except (ssl.SSLError, ConnectionError, TimeoutError, OSError) as e:
            self._refused(addr, handshake_failure_kind(e), describe_tls_error(e))
            conn.close()
            return None
        try:
            proto.peer = verify_peer(tls.get_extra_info("ssl_object"), self.trust_domain)
        except PeerRejected as e:
            self._refused(addr, e.kind, str(e))
            tls.abort()
            return None
        if proto.dead:
            # The peer hung up before this coroutine resumed from the handshake: nothing to
            # start, and nothing to keep (connection_lost has run already, and would not again).
            tls.abort()
            return None
        return proto, tls

    def _forget(self, proto: ServerProtocol) -> None:
        if proto in self.connections:
            self.connections.discard(proto)
            self.stats.connections_changed(-1)

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
        self.refusals.close()
