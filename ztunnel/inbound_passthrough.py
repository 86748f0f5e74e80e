"""Inbound plaintext (port 15006 in the pod netns): a connection without peer identity.

:func:`ztunnel.authorize.authorize` decides it like any other, with no identity: under STRICT
the destination lists the converted static STRICT policy (deny without identity), so it is
refused; under PERMISSIVE it is allowed unless another policy denies. A workload in strict
waypoint mode refuses it too: only its waypoint may reach it. The redirected connection
is relayed to its original destination from a transparent socket bound
to the client's IP, like inbound HBONE, so the app sees the real source either way.
"""

from __future__ import annotations

import asyncio
import socket

import structlog

from mesh.authz import Connection
from mesh.hbone.protocol import format_authority
from ztunnel.authorize import Hop, authorize_hop
from ztunnel.inbound import connect_as
from ztunnel.metrics import ConnectionRecord
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
        with node.metrics.connection(rec):
            if dst is None:
                rec.fail("destination pod not known yet", "NR")
            else:
                hop = Hop(None, peer[0])
                conn = Connection.of(None, peer[0], dst_ip, dst_port)
                decision = authorize_hop(snapshot, dst, hop, conn)
                if not decision.allow:
                    rec.fail(decision.reason, "DENY")
            if rec.result != "ok":
                log.info("inbound plaintext refused", src=rec.src_addr, dst=rec.dst_addr, reason=rec.reason)
                client.close()
                return
            try:
                up = await connect_as(self.pod, peer[0], (dst_ip, dst_port), self.app_connect_timeout)
            except (OSError, TimeoutError) as e:
                rec.fail(f"app {rec.dst_addr} unreachable: {str(e) or 'timeout'}", "UF")
                client.close()
                return
            except BaseException:
                client.close()  # cancelled (drain) mid-dial: the client's socket is ours to close
                raise
            task = asyncio.current_task()
            assert task is not None and dst is not None
            with node.connections.track(dst.uid, conn, rec, task.cancel, hop):
                res = await relay_sockets(client, up)
            rec.bytes_sent, rec.bytes_received = res.sent, res.received
            if res.error and rec.result == "ok":
                rec.fail(res.error, "UR")
