"""The dialing side of HBONE: ``open_connection`` and the ``ClientProtocol`` it returns.

``open_connection`` dials, runs the TLS handshake (resuming the last session to the same address
and identity through ``mesh.tls.ClientContext``) and verifies that the server is the expected
identity; ``ClientProtocol.open_stream`` sends a CONNECT and returns the stream once it is
answered 200. ``mesh.hbone.pool`` shares these connections between streams.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Iterable
from typing import cast

import structlog

from mesh.hbone.connection import PING_INTERVAL, PING_TIMEOUT, HboneProtocol
from mesh.hbone.events import Event, Response
from mesh.hbone.protocol import STATUS_OK, ClientConnection, LocalProtocolError
from mesh.hbone.stream import Stream, StreamError
from mesh.identity import Identity
from mesh.tls import ClientContext, PeerRejected, describe_tls_error, verify_peer

log = structlog.get_logger(__name__)

CONNECT_TIMEOUT = 10.0


class ConnectRefused(Exception):
    """The HBONE server answered a CONNECT with a status other than 200."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HBONE CONNECT refused with status {status}")
        self.status = status


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
        self.flush_soon()
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
