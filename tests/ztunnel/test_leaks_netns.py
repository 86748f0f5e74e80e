"""Leaks a peer can trigger on inbound HBONE, in real network namespaces (issue 24).

A peer with a valid mesh certificate opens many CONNECT streams at once and drops the HBONE
connection while ztunnel is still dialing the app for them. Every socket ztunnel opened towards
the app must be closed, whatever stage its stream was at, and each connection counted opened must
be counted closed. Sockets are counted by the kernel (``ss`` inside the destination pod's netns),
not by ztunnel's own bookkeeping.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Iterator

import h2.config
import h2.connection
import prometheus_client
import pytest
import pytest_asyncio

from mesh.identity import Identity
from mesh.tls import client_context
from tests.netns.mesh import Mesh
from tests.netns.topology import Pod, Topology, ns_run

pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]


class Pods:
    def __init__(self, topo: Topology) -> None:
        topo.add_node()
        self.app = topo.add_pod(1, "app", "shop", "app", {"app": "app"})
        # A peer outside the mesh holding a stolen mesh certificate dials the app's :15008 itself.
        self.peer = topo.add_pod(1, "peer", "legacy", "legacy", enrolled=False)


@pytest.fixture(scope="module")
def topo() -> Iterator[tuple[Topology, Pods]]:
    with Topology() as t:
        yield t, Pods(t)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh(topo: tuple[Topology, Pods]) -> AsyncIterator[tuple[Mesh, Pods]]:
    t, pods = topo
    m = Mesh(t, cert_ttl=dt.timedelta(hours=1))
    try:
        await m.start()
        yield m, pods
    finally:
        await m.aclose()


class HoldingApp:
    """The app: accepts, reads until the other side goes away, closes; counts what is open."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.accepted = 0
        self.live = 0
        self.idle = asyncio.Event()  # set whenever no connection is open
        self.idle.set()
        self._grew = asyncio.Event()

    async def start(self, m: Mesh, pod: Pod, port: int) -> None:
        sock = await m.factory(pod).tcp_listener("0.0.0.0", port)
        self.server = await asyncio.start_server(self._handle, sock=sock)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.live += 1
        self.idle.clear()
        self._grew.set()
        try:
            while await reader.read(65536):
                pass
        except OSError:
            pass
        finally:
            writer.close()
            self.live -= 1
            if self.live == 0:
                self.idle.set()

    async def reached(self, accepted: int) -> None:
        """Wait until ``accepted`` connections have been accepted in all."""
        while self.accepted < accepted:
            self._grew.clear()
            await self._grew.wait()

    async def aclose(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def established(pod: Pod, port: int) -> list[str]:
    """The TCP connections to or from ``port`` in ``pod``'s netns that are ESTABLISHED."""
    out = ns_run(pod.netns, "ss", "-tnH", "state", "established", f"( sport = :{port} or dport = :{port} )")
    return [line for line in out.splitlines() if line.strip()]


def totals(m: Mesh) -> tuple[float, float]:
    """(opened, closed) over every label set of the app's node."""
    text = prometheus_client.generate_latest(m.nodes[0].zt.metrics.registry).decode()
    opened = closed = 0.0
    for line in text.splitlines():
        if line.startswith("istio_tcp_connections_opened_total{"):
            opened += float(line.rsplit(" ", 1)[1])
        elif line.startswith("istio_tcp_connections_closed_total{"):
            closed += float(line.rsplit(" ", 1)[1])
    return opened, closed


PING_ACK = b"\x00\x00\x08\x06\x01\x00\x00\x00\x00flooded!"  # a PING frame with ACK and our payload


async def flood(m: Mesh, src: Pod, dst: Pod, port: int, streams: int, then: str, app: HoldingApp) -> None:
    """One HBONE connection from ``src`` opening ``streams`` CONNECTs to ``dst:port``, then gone.

    A raw ``h2`` client that sends its CONNECTs at once and never feeds what it receives back to
    ``h2``, so it never learns the server's stream limit. A PING follows the CONNECTs: its answer
    proves the server has read every CONNECT and started serving them. Then, while ztunnel is
    still dialing the app for them, ``then`` is ``"close"`` (close_notify and FIN), ``"rst"`` (a
    TCP RST, ``SO_LINGER`` 0) or ``"exceed"``: 50 more CONNECTs than the server's
    MAX_CONCURRENT_STREAMS allows, for which the server drops the connection itself. Or
    ``"rst-when-up"``: a RST once the app holds a connection for every stream.
    """
    loop = asyncio.get_running_loop()
    cred = m.ca.issue(Identity("cluster.local", "shop", "client"))
    sock = await m.factory(src).tcp_socket(socket.AF_INET)
    try:
        async with asyncio.timeout(30):
            await loop.sock_connect(sock, (dst.ip, 15008))
    except BaseException:
        sock.close()
        raise
    if then.startswith("rst"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    async with asyncio.timeout(30):
        reader, writer = await asyncio.open_connection(
            sock=sock, ssl=client_context(cred), server_hostname=""
        )
    h2c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))

    def connects(n: int) -> None:
        for _ in range(n):
            sid = h2c.get_next_available_stream_id()
            h2c.send_headers(sid, [(":method", "CONNECT"), (":authority", f"{dst.ip}:{port}")])

    try:
        h2c.initiate_connection()
        connects(streams)
        h2c.ping(PING_ACK[9:])
        writer.write(h2c.data_to_send())
        await writer.drain()
        received = b""
        async with asyncio.timeout(30):
            while PING_ACK not in received:
                chunk = await reader.read(65536)
                assert chunk, "the server hung up before answering the PING"
                received += chunk
        if then == "rst-when-up":
            async with asyncio.timeout(60):
                await app.reached(app.accepted + streams)
        if then == "exceed":
            connects(50)
            writer.write(h2c.data_to_send())
            async with asyncio.timeout(30):
                while await reader.read(65536):
                    pass  # until the server hangs up
    except (ConnectionError, ssl.SSLError):
        assert then == "exceed"  # the server hung up with a reset: expected only then
    finally:
        if then.startswith("rst"):
            writer.transport.abort()
        else:
            writer.close()


async def settled(m: Mesh, app: HoldingApp, pod: Pod, port: int) -> None:
    """Every connection ztunnel counted opened is counted closed, the app holds none, and the
    kernel has no ESTABLISHED socket left on the app port in the pod's netns."""
    opened, _ = totals(m)
    try:
        async with asyncio.timeout(60):
            await m.nodes[0].zt.metrics.wait_closed(int(opened))
    except TimeoutError:
        opened, closed = totals(m)
        pytest.fail(f"ztunnel metrics: {opened} connections opened, {closed} closed")
    try:
        async with asyncio.timeout(60):
            await app.idle.wait()
    except TimeoutError:
        pytest.fail(
            f"{app.live} of {app.accepted} app connections still open; "
            f"{len(established(pod, port))} sockets ESTABLISHED in the pod netns"
        )
    # The app closes a socket only once ztunnel's side of it went away: nothing is left
    # ESTABLISHED on either side now.
    assert established(pod, port) == []
    opened, closed = totals(m)
    assert opened == closed, (opened, closed)


@pytest.mark.parametrize(
    ("then", "port"),
    [
        pytest.param("close", 9101, id="100-streams-then-close"),
        pytest.param("rst", 9102, id="100-streams-then-rst"),
        pytest.param("exceed", 9103, id="more-than-max-concurrent-streams"),
        pytest.param("rst-when-up", 9104, id="100-streams-relaying-then-rst"),
    ],
)
async def test_dropped_connection_closes_every_app_socket(
    mesh: tuple[Mesh, Pods], then: str, port: int
) -> None:
    m, p = mesh
    app = HoldingApp()
    await app.start(m, p.app, port)
    try:
        for _ in range(3):
            opened_before, _ = totals(m)
            await flood(m, p.peer, p.app, port, 100, then, app)
            await settled(m, app, p.app, port)
            # Every CONNECT was served (counted, authorized, dialed or abandoned): the flood
            # did reach the code that leaked.
            assert totals(m)[0] - opened_before == 100
    finally:
        await app.aclose()
