"""Inbound plaintext (port 15006 in the pod netns): only when no STRICT PeerAuthentication applies.

The redirected connection is relayed to its original destination from a transparent socket bound
to the client's IP, like inbound HBONE, so the app sees the real source either way.
"""

from __future__ import annotations

import socket

import structlog

from mesh.hbone.protocol import format_authority
from ztunnel.inbound import connect_as
from ztunnel.metrics import ConnectionRecord
from ztunnel.routing import decide_inbound, plaintext_allowed
from ztunnel.state import PodContext, redirected_connection, relay_sockets

log = structlog.get_logger(__name__)


class InboundPassthrough:
    def __init__(self, pod: PodContext, *, app_connect_timeout: float = 5.0) -> None:
        self.pod = pod
        self.app_connect_timeout = app_connect_timeout

    async def handle(self, client: socket.socket) -> None:
        node = self.pod.node
        addrs = redirected_connection(client, "inbound plaintext")
        if addrs is None:
            return
        peer, (dst_ip, dst_port) = addrs
        snapshot = node.snapshot()
        dst = self.pod.workload(snapshot)
        src = snapshot.workload_by_ip(peer[0])
        rec = ConnectionRecord(
            reporter="destination",
            direction="inbound_passthrough",
            src_addr=format_authority(peer[0], peer[1]),
            dst_addr=format_authority(dst_ip, dst_port),
            src_workload=src,
            dst_workload=dst,
            dst_identity=self.pod.identity,
        )
        node.metrics.open(rec)
        if dst is None:
            rec.fail("destination pod not known yet", "NR")
        elif not plaintext_allowed(snapshot, dst):
            rec.fail("plaintext refused: STRICT mTLS", "DENY")
        elif not (decision := decide_inbound(snapshot, dst, None, peer[0], dst_port)).allow:
            rec.fail(f"denied: {decision.reason}", "DENY")
        if rec.result != "ok":
            log.info("inbound plaintext refused", src=rec.src_addr, dst=rec.dst_addr, reason=rec.reason)
            client.close()
            node.metrics.close(rec)
            return
        try:
            up = await connect_as(self.pod, peer[0], (dst_ip, dst_port), self.app_connect_timeout)
        except (OSError, TimeoutError) as e:
            rec.fail(f"app {rec.dst_addr} unreachable: {str(e) or 'timeout'}", "UF")
            client.close()
            node.metrics.close(rec)
            return
        res = await relay_sockets(client, up)
        rec.bytes_sent, rec.bytes_received = res.sent, res.received
        if res.error:
            rec.fail(res.error, "UR")
        node.metrics.close(rec)
