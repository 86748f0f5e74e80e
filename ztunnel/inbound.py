"""Inbound HBONE (port 15008 in the pod netns).

The TLS handshake and client identity check happen in the HBONE server; here, per CONNECT
stream: the CONNECT must name this pod, :func:`ztunnel.authorize.authorize` must allow it, and
then we dial the app from inside the pod netns *as the client* — an ``IP_TRANSPARENT`` socket
marked 0x111 bound to the client's IP (:func:`ztunnel.authorize.source_ip`) — so the app sees
the real source. Status codes: 400 not for this pod, 401 denied, 503 app unreachable.
"""

from __future__ import annotations

import asyncio
import socket
import ssl

import structlog

from mesh import netaddr
from mesh.hbone.protocol import format_authority
from mesh.hbone.relay import TcpLeg, rst_on_close, wait_relay
from mesh.hbone.server import HboneServer, InboundStream
from mesh.hbone.stream import StreamError, cancel_on_end
from mesh.netns import MARK_TPROXY, family_of
from ztunnel.authorize import XFCC, Hop, authorize_hop, connection_for
from ztunnel.metrics import ConnectionRecord
from ztunnel.state import PodContext

log = structlog.get_logger(__name__)

def forwarded_for(header: str | None) -> str | None:
    """The client IP in ``forwarded: for="ip:port"`` (first hop), or None."""
    found = netaddr.forwarded_for(header)
    return found[0] if found is not None else None


async def connect_as(
    pod: PodContext, client_ip: str | None, target: tuple[str, int], timeout: float
) -> socket.socket:
    """A socket connected to ``target`` inside the pod netns, from ``client_ip`` when given."""
    loop = asyncio.get_running_loop()
    family = family_of(target[0])
    transparent = client_ip is not None and family_of(client_ip) == family
    # The factory may make the socket on another thread (inside the pod netns): if we are
    # cancelled meanwhile, that socket still arrives, and must be closed, not dropped.
    making = asyncio.ensure_future(
        pod.factory.tcp_socket(family, mark=MARK_TPROXY if transparent else None, transparent=transparent)
    )
    try:
        sock = await asyncio.shield(making)
    except asyncio.CancelledError:
        making.add_done_callback(_close_unwanted)
        raise
    try:
        if transparent:
            assert client_ip is not None
            sock.bind((client_ip, 0))
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, target)
    except BaseException:
        sock.close()
        raise
    rst_on_close(sock)  # if ztunnel dies, the app sees a reset, not a clean end
    return sock


def _close_unwanted(made: asyncio.Future[socket.socket]) -> None:
    if not made.cancelled() and made.exception() is None:
        made.result().close()


class Inbound:
    def __init__(self, pod: PodContext, *, app_connect_timeout: float = 5.0) -> None:
        self.pod = pod
        self.app_connect_timeout = app_connect_timeout
        self.server: HboneServer | None = None

    async def start(self, listener: socket.socket) -> None:
        certs = await self.pod.node.certs.get(self.pod.identity)
        self.server = HboneServer(
            self.handle,
            certs.server_ctx,
            self.pod.node.trust_domain,
            name=f"inbound-{self.pod.name}",
            stats=self.pod.node.metrics.hbone_stats("inbound"),
        )
        await self.server.listen(sock=listener)

    def rotate(self, server_ctx: ssl.SSLContext) -> None:
        """New connections use the new certificate; established ones keep theirs."""
        if self.server is not None:
            self.server.ssl_ctx = server_ctx

    async def handle(self, inbound: InboundStream) -> None:
        node = self.pod.node
        req = inbound.request
        peer_ip = inbound._proto.peer_addr[0]
        snapshot = node.snapshot()
        dst = self.pod.workload(snapshot)
        hop = Hop(inbound.peer, peer_ip, forwarded_for(req.header("forwarded")), req.header(XFCC))
        conn = connection_for(snapshot, dst, hop, req.host, req.port) if dst is not None else None
        client_ip = str(conn.src_ip) if conn is not None else peer_ip
        rec = ConnectionRecord(
            reporter="destination",
            direction="inbound",
            src_addr=client_ip,
            dst_addr=req.authority,
            src_workload=snapshot.workload_by_ip(client_ip),
            src_identity=conn.src_identity if conn is not None else inbound.peer,
            dst_workload=dst,
            dst_identity=self.pod.identity,
            mtls=True,
        )
        if dst is not None and dst.services:
            rec.service = snapshot.services.get(next(iter(dst.services)))
        with node.metrics.connection(rec):
            if dst is None or conn is None or req.host not in dst.addresses:
                rec.fail(f"CONNECT {req.authority} is not for this pod", "NR")
                inbound.refuse(400)
            else:
                decision = authorize_hop(snapshot, dst, hop, conn)
                if not decision.allow:
                    rec.fail(decision.reason, "DENY")
                    inbound.refuse(401)
                else:
                    task = asyncio.current_task()
                    assert task is not None
                    with node.connections.track(dst.uid, conn, rec, task.cancel, hop):
                        await self._relay(inbound, client_ip, rec)
            if rec.result != "ok" and rec.response_flags not in ("UR", "DC"):
                log.info("inbound connection refused", src=client_ip, dst=req.authority, reason=rec.reason)

    async def _relay(self, inbound: InboundStream, client_ip: str, rec: ConnectionRecord) -> None:
        """Dial the app, answer, relay. The app-side socket is closed however this ends: the
        dial is abandoned as soon as the stream or its connection ends (a peer that opens many
        streams and hangs up leaves nothing behind), and a leg that cannot be handed to its
        stream (gone between dial and answer) or whose relay is cut short is aborted."""
        loop = asyncio.get_running_loop()
        req = inbound.request
        try:
            async with cancel_on_end(inbound.stream):
                sock = await connect_as(self.pod, client_ip, (req.host, req.port), self.app_connect_timeout)
                # On failure or cancellation the loop closes ``sock`` itself.
                _, leg = await loop.create_connection(lambda: TcpLeg(loop), sock=sock)
        except StreamError as e:
            rec.fail(f"client went away before the app answered: {e}", "DC")
            return
        except (OSError, TimeoutError) as e:
            rec.fail(f"app {req.authority} unreachable: {str(e) or 'timeout'}", "UF")
            inbound.refuse(503)
            return
        st = inbound.stream
        try:
            inbound.accept()
            leg.attach(st)
            # From the destination's point of view "sent" is towards the app.
            rec.progress = lambda: (st.bytes_received, st.bytes_sent)
            await wait_relay(leg, st)
        except StreamError as e:
            if rec.result == "ok":
                rec.fail(f"client went away before the app answered: {e}", "DC")
        finally:
            # From the destination's point of view "sent" is towards the app.
            rec.bytes_sent, rec.bytes_received = st.bytes_received, st.bytes_sent
            if leg.error is not None and rec.result == "ok":
                rec.fail(str(leg.error), "UR")
            if leg.transport is not None and not leg.transport.is_closing():
                # A relay that finished has closed its leg already; any other end is abrupt
                # and the app is told so (RST), not handed a clean end of stream.
                leg.transport.abort()

    @property
    def address(self) -> str:
        assert self.server is not None
        return format_authority(*self.server.address)

    async def stop_accepting(self) -> None:
        if self.server is not None:
            await self.server.stop_accepting()

    async def close(self, drain_timeout: float) -> None:
        if self.server is not None:
            await self.server.close(drain_timeout=drain_timeout)
