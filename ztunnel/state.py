"""What the proxies share: the node's context (store, certificates, metrics) and one pod's context.

The store is read only (``store.snapshot()`` per decision); the xDS client or a local source
writes it. Also the plain TCP<->TCP relay used by passthrough paths.
"""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field

import structlog

from mesh.identity import Identity
from mesh.model import Snapshot, Store, Workload
from mesh.netns import SocketFactory, original_dst
from ztunnel.certs import CertManager
from ztunnel.metrics import Metrics

log = structlog.get_logger(__name__)

COPY_SIZE = 256 * 1024


def random_choice(candidates: Sequence[Workload]) -> Workload:
    return random.choice(candidates)


@dataclass
class NodeContext:
    node: str
    trust_domain: str
    store: Store
    certs: CertManager
    metrics: Metrics
    prefer_same_node: bool = True
    connect_timeout: float = 10.0

    def snapshot(self) -> Snapshot:
        return self.store.snapshot()


@dataclass
class PodContext:
    """One enrolled pod, as ZDS described it, and where its sockets are made."""

    uid: str
    name: str
    namespace: str
    service_account: str
    factory: SocketFactory
    node: NodeContext
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def identity(self) -> Identity:
        return Identity(self.node.trust_domain, self.namespace, self.service_account)

    def workload(self, snapshot: Snapshot) -> Workload | None:
        w = snapshot.workloads.get(self.uid)
        if w is None:
            w = snapshot.workload_by_name(self.namespace, self.name)
        return w


@dataclass
class RelayResult:
    sent: int = 0  # a -> b
    received: int = 0  # b -> a
    error: str = ""


async def _pipe(
    src: asyncio.StreamReader,
    dst: asyncio.StreamWriter,
    other: asyncio.StreamWriter,
    res: RelayResult,
    forward: bool,
) -> None:
    try:
        while chunk := await src.read(COPY_SIZE):
            dst.write(chunk)
            if forward:
                res.sent += len(chunk)
            else:
                res.received += len(chunk)
            await dst.drain()
        if dst.can_write_eof() and not dst.is_closing():
            dst.write_eof()
    except OSError as e:
        # One side reset: reset the other too, so the peer sees the failure as a failure.
        res.error = res.error or f"{type(e).__name__}: {e}"
        dst.transport.abort()
        other.transport.abort()


async def relay_sockets(a: socket.socket, b: socket.socket) -> RelayResult:
    """Relay two connected sockets until both directions end (half-closes are passed on)."""
    res = RelayResult()
    ra, wa = await asyncio.open_connection(sock=a)
    try:
        rb, wb = await asyncio.open_connection(sock=b)
    except BaseException:
        wa.close()
        raise
    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(_pipe(ra, wb, wa, res, True))
            tg.create_task(_pipe(rb, wa, wb, res, False))
    finally:
        for w in (wa, wb):
            w.close()
        for w in (wa, wb):
            try:
                await w.wait_closed()
            except OSError:
                pass
    return res


def redirected_connection(
    client: socket.socket, listener: str
) -> tuple[tuple[str, int], tuple[str, int]] | None:
    """(peer address, original destination) of a connection nftables redirected to us.

    None (and the client closed, the reason logged) when the socket cannot tell: the peer went
    away already, or the connection did not come through a redirect.
    """
    try:
        peer = client.getpeername()
        dst = original_dst(client)
    except OSError as e:
        log.warning(f"{listener}: cannot read the original destination", error=str(e))
        client.close()
        return None
    return (peer[0], peer[1]), dst
