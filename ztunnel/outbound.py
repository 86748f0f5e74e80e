"""Outbound (port 15001 in the pod netns): the app's redirected connections.

Decide: ``SO_ORIGINAL_DST`` + snapshot -> :func:`ztunnel.routing.decide_outbound`. Do: an HBONE
CONNECT over a pooled mTLS connection made with the source pod's certificate (verifying the
destination's identity), or plain TCP passthrough from a socket marked 0x539. Every failure is
logged with its reason and the client connection closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

import structlog

from mesh.caclient import CaError
from mesh.hbone.client import ClientProtocol, ConnectRefused, open_connection
from mesh.hbone.pool import HbonePool, PoolKey
from mesh.hbone.protocol import format_authority
from mesh.hbone.relay import TcpLeg, wait_relay
from mesh.hbone.stream import StreamError
from mesh.log import ThrottledLog
from mesh.netns import MARK_SKIP, family_of
from mesh.tls import PeerRejected
from ztunnel.metrics import ConnectionRecord
from ztunnel.routing import Deny, Hbone, Passthrough, decide_outbound
from ztunnel.state import PodContext, random_choice, redirected_connection, relay_sockets

log = structlog.get_logger(__name__)
# Once a minute per reason: every connection to a service whose waypoint is down would say it.
_SKIPPED_WAYPOINT = ThrottledLog(log, interval=60.0)


class Outbound:
    def __init__(self, pod: PodContext) -> None:
        self.pod = pod
        self.pool = HbonePool(self._dial)

    async def _dial(self, key: PoolKey) -> ClientProtocol:
        certs = await self.pod.node.certs.get(key.src_identity)
        sock = await self.pod.factory.tcp_socket(family_of(key.dst_addr[0]), mark=MARK_SKIP)
        return await open_connection(
            key.dst_addr[0],
            key.dst_addr[1],
            certs.client_ctx,
            self.pod.node.trust_domain,
            key.dst_identity,
            sock=sock,
            timeout=self.pod.node.connect_timeout,
        )

    async def handle(self, client: socket.socket) -> None:
        """Serve one accepted client socket (owned from here on)."""
        node = self.pod.node
        addrs = redirected_connection(client, "outbound")
        if addrs is None:
            return
        peer, (dst_ip, dst_port) = addrs
        snapshot = node.snapshot()
        src = self.pod.workload(snapshot)
        rec = ConnectionRecord(
            reporter="source",
            direction="outbound",
            src_addr=format_authority(peer[0], peer[1]),
            dst_addr=format_authority(dst_ip, dst_port),
            src_workload=src,
            src_identity=self.pod.identity,
        )
        plan = decide_outbound(
            snapshot,
            src,
            dst_ip,
            dst_port,
            choose=random_choice,
            prefer_same_node=node.prefer_same_node,
        )
        # Everything the labels say is known before the connection is counted opened.
        if isinstance(plan, Deny):
            rec.fail(plan.reason, "NR")
        else:
            rec.dst_workload = plan.dst_workload
            rec.service = plan.service
        if not isinstance(plan, Deny):
            rec.actual_dst = format_authority(*plan.to)
            if plan.note:  # a waypoint skipped: failed open
                _SKIPPED_WAYPOINT.warning((plan.note,), "waypoint skipped", dst=rec.dst_addr, reason=plan.note)
        if isinstance(plan, Hbone):
            rec.dst_identity = plan.expect
            rec.mtls = True
            rec.direction = "outbound_waypoint" if plan.waypoint is not None else "outbound"
        elif isinstance(plan, Passthrough):
            rec.direction = "passthrough"
        with node.metrics.connection(rec):
            if isinstance(plan, Deny):
                log.warning("outbound connection refused", dst=rec.dst_addr, reason=plan.reason)
                client.close()
            elif isinstance(plan, Hbone):
                await self._hbone(client, peer, plan, rec)
            else:
                await self._passthrough(client, plan, rec)

    async def _hbone(
        self, client: socket.socket, peer: tuple[str, int], plan: Hbone, rec: ConnectionRecord
    ) -> None:
        loop = asyncio.get_running_loop()
        key = PoolKey(self.pod.identity, plan.expect, peer[0], plan.to)
        headers = [("forwarded", f'for="{format_authority(peer[0], peer[1])}"')]
        try:
            stream = await self.pool.open_stream(key, plan.authority, headers)
        except ConnectRefused as e:
            rec.fail(f"destination refused with {e.status}", "UF")
        except (OSError, PeerRejected, StreamError, TimeoutError) as e:
            rec.fail(f"hbone to {format_authority(*plan.to)} failed: {e}", "UF")
        except CaError as e:
            rec.fail(f"no certificate for {self.pod.identity}: {e}", "UF")
        else:
            try:
                _, leg = await loop.connect_accepted_socket(lambda: TcpLeg(loop), client)
            except OSError as e:
                stream.reset()
                client.close()
                rec.fail(f"client went away: {e}", "DC")
                return
            leg.attach(stream)
            rec.progress = lambda: (stream.bytes_sent, stream.bytes_received)
            try:
                await wait_relay(leg, stream)
            finally:
                rec.bytes_sent, rec.bytes_received = stream.bytes_sent, stream.bytes_received
                if leg.error is not None:
                    rec.fail(str(leg.error), "UR")
                if leg.transport is not None:
                    leg.transport.close()
            return
        log.warning("outbound connection failed", dst=rec.dst_addr, reason=rec.reason)
        client.close()

    async def _passthrough(self, client: socket.socket, plan: Passthrough, rec: ConnectionRecord) -> None:
        loop = asyncio.get_running_loop()
        up = await self.pod.factory.tcp_socket(family_of(plan.to[0]), mark=MARK_SKIP)
        try:
            async with asyncio.timeout(self.pod.node.connect_timeout):
                await loop.sock_connect(up, plan.to)
        except (OSError, TimeoutError) as e:
            up.close()
            client.close()
            rec.fail(f"passthrough to {format_authority(*plan.to)} failed: {str(e) or 'timeout'}", "UF")
            log.warning("outbound connection failed", dst=rec.dst_addr, reason=rec.reason)
            return
        res = await relay_sockets(client, up)
        rec.bytes_sent, rec.bytes_received = res.sent, res.received
        if res.error:
            rec.fail(res.error, "UR")

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await self.pool.aclose()
