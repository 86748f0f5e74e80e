"""What the proxies share: the node's context (state, certificates, metrics) and one pod's context.

The state is what discovery carries (:class:`~mesh.xds.state.ProxyState`), read only here
(``snapshot()`` per decision); the discovery client writes it. Also the plain TCP<->TCP relay
used by passthrough paths.
"""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field

import structlog

from mesh.certs import CertManager
from mesh.hbone.relay import fin_on_close
from mesh.identity import Identity
from mesh.netns import SocketFactory, original_dst
from mesh.xds.state import Endpoint, ProxySnapshot, ProxyState, Workload
from ztunnel.connection_manager import ConnectionManager
from ztunnel.metrics import Metrics

log = structlog.get_logger(__name__)

COPY_SIZE = 256 * 1024


def random_choice(candidates: Sequence[Endpoint]) -> Endpoint:
    return random.choice(candidates)


@dataclass
class NodeContext:
    node: str
    trust_domain: str
    state: ProxyState
    certs: CertManager
    metrics: Metrics
    prefer_same_node: bool = True
    connect_timeout: float = 10.0
    connections: ConnectionManager = field(init=False)  # open inbound connections, re-checked

    def __post_init__(self) -> None:
        self.connections = ConnectionManager(self.state)

    def snapshot(self) -> ProxySnapshot:
        return self.state.snapshot()


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

    def workload(self, snapshot: ProxySnapshot) -> Workload | None:
        """This pod's discovery workload, matched by uid only (ZDS and discovery both name pods
        by uid). None while discovery has not sent it; a workload under this uid that is
        another pod is a mismatch between the agent and the control plane: logged, not used."""
        w = snapshot.workloads.get(self.uid)
        if w is None:
            return None
        if (w.namespace, w.name, w.service_account) != (self.namespace, self.name, self.service_account):
            log.error(
                "ZDS and discovery disagree about a pod uid",
                uid=self.uid,
                zds=f"{self.namespace}/{self.name} sa={self.service_account}",
                discovery=f"{w.namespace}/{w.name} sa={w.service_account}",
            )
            return None
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
    """Relay two connected sockets until both directions end (half-closes are passed on).

    Sockets armed with :func:`~mesh.hbone.relay.rst_on_close` are disarmed when both directions
    ended cleanly, so only a relay cut short (an error, a drain deadline) ends with a RST."""
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
        if not res.error:  # both directions ended with a FIN: end gracefully (see rst_on_close)
            fin_on_close(a)
            fin_on_close(b)
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
