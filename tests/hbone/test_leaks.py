"""What a peer can make an HBONE server keep: upstream sockets, connections, memory, log lines.

Loopback only (the netns version with ztunnel is tests/ztunnel/test_leaks_netns.py). Each test
drives the server into the state that leaked and checks what is left once the peer is gone.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import os
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Callable, Iterator

import h2.config
import h2.connection
import pytest
from structlog.testing import capture_logs

from mesh.hbone import memory
from mesh.hbone.relay import connect_and_relay
from mesh.hbone.server import HboneServer, InboundStream
from mesh.hbone.stream import Stream, StreamError, cancel_on_end
from mesh.pki import Credential
from mesh.tls import FAILURE_KINDS, client_context, server_context

# -- cancel_on_end ---------------------------------------------------------------------------------


class _Owner:
    """Just enough of a connection for a ``Stream`` to live and end."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.dead = False
        self.finished: list[int] = []

    def stream_finished(self, st: Stream) -> None:
        self.finished.append(st.stream_id)


def _stream() -> Stream:
    return Stream(_Owner(), 1)  # type: ignore[arg-type]


async def test_cancel_on_end_abandons_the_block_when_the_stream_ends() -> None:
    st = _stream()
    dialing = asyncio.get_running_loop().create_future()
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().call_soon(st._on_reset, StreamError("stream reset by peer (code 8)"))
    with pytest.raises(StreamError, match="reset by peer"):
        async with cancel_on_end(st):
            await dialing  # never answered: only the stream ending gets us out
    assert dialing.cancelled()
    assert task.cancelling() == 0
    await asyncio.sleep(0)  # no cancellation left over for a later await


async def test_cancel_on_end_leaves_outside_cancellations_alone() -> None:
    st = _stream()
    entered = asyncio.Event()

    async def dial() -> None:
        async with cancel_on_end(st):
            entered.set()
            await asyncio.get_running_loop().create_future()

    t = asyncio.create_task(dial())
    await entered.wait()
    t.cancel()  # a drain, a policy close: not the stream's doing
    with pytest.raises(asyncio.CancelledError):
        await t
    assert not st.done.done()


async def test_cancel_on_end_with_a_stream_already_gone_or_ending_at_exit() -> None:
    st = _stream()
    st._on_reset(StreamError("connection lost"))
    with pytest.raises(StreamError, match="connection lost"):
        async with cancel_on_end(st):
            pytest.fail("the block must not run for a stream that has ended")
    # The stream ends inside the block, by the block's own doing, right before it leaves: the
    # done-callback runs after the block, and must not cancel whatever the task awaits next.
    st = _stream()
    async with cancel_on_end(st):
        st._on_reset(StreamError("refused"))
    await asyncio.sleep(0)
    await asyncio.sleep(0)


# -- upstream sockets -------------------------------------------------------------------------------


def connecting_to(port: int) -> list[str]:
    """This netns's TCP sockets still connecting (SYN_SENT) to 127.0.0.1:``port``."""
    found = []
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            if int(fields[2].split(":")[1], 16) == port and fields[3] == "02":
                found.append(line.strip())
    return found


async def until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    """Wait for a state that announces itself with no event (kernel sockets, counters)."""
    async with asyncio.timeout(timeout):
        while True:
            if predicate():
                return
            await asyncio.sleep(0.01)


@pytest.fixture
def unanswering_port() -> Iterator[int]:
    """A port whose accept queue is full: a connect to it hangs in SYN_SENT (Linux drops the SYN)."""
    lst = socket.socket()
    filler = socket.socket()
    try:
        lst.bind(("127.0.0.1", 0))
        lst.listen(0)
        filler.connect(lst.getsockname())  # backlog 0 holds one: this one
        yield lst.getsockname()[1]
    finally:
        filler.close()
        lst.close()


class Recorder:
    """``ServerStats`` that keeps the gauges and the refusals."""

    def __init__(self) -> None:
        self.connections = 0
        self.streams = 0
        self.refused: collections.Counter[str] = collections.Counter()

    def handshake_failed(self, kind: str) -> None:
        assert kind in FAILURE_KINDS, kind
        self.refused[kind] += 1

    def connections_changed(self, delta: int) -> None:
        self.connections += delta

    def streams_changed(self, delta: int) -> None:
        self.streams += delta


async def raw_connects(
    server: HboneServer, cred: Credential, authority: str, n: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw h2 client sending ``n`` CONNECTs at once (it never reads, so it knows no limit)."""
    host, port = server.address
    reader, writer = await asyncio.open_connection(host, port, ssl=client_context(cred), server_hostname="")
    h2c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    h2c.initiate_connection()
    for _ in range(n):
        h2c.send_headers(
            h2c.get_next_available_stream_id(), [(":method", "CONNECT"), (":authority", authority)]
        )
    writer.write(h2c.data_to_send())
    await writer.drain()
    return reader, writer


async def test_connection_dropped_mid_dial_closes_every_upstream_socket(
    server_cred: Credential, client_cred: Credential, unanswering_port: int
) -> None:
    """100 streams dialing an upstream that does not answer; the peer hangs up: every dial is
    abandoned at once (not after the kernel's 2-minute connect timeout) and its socket closed."""
    n = 100
    started, finished = 0, 0
    all_started, all_finished = asyncio.Event(), asyncio.Event()

    async def handler(inbound: InboundStream) -> None:
        nonlocal started, finished
        started += 1
        if started == n:
            all_started.set()
        try:
            await connect_and_relay(inbound)
        finally:
            finished += 1
            if finished == n:
                all_finished.set()

    stats = Recorder()
    srv = HboneServer(handler, server_context(server_cred), "cluster.local", stats=stats)
    await srv.listen()
    try:
        _, writer = await raw_connects(srv, client_cred, f"127.0.0.1:{unanswering_port}", n)
        async with asyncio.timeout(30):
            await all_started.wait()
        await until(lambda: len(connecting_to(unanswering_port)) == n)
        assert stats.connections == 1 and stats.streams == n
        writer.transport.abort()
        async with asyncio.timeout(30):  # far below the kernel's connect timeout
            await all_finished.wait()
        assert connecting_to(unanswering_port) == []
        assert stats.connections == 0 and stats.streams == 0
        assert not srv.connections
    finally:
        await srv.close()


# -- handshakes -------------------------------------------------------------------------------------


def handshake_and_hang_up(host: str, port: int, ctx: ssl.SSLContext) -> None:
    """A client whose last handshake message, close_notify and FIN leave in one segment, so the
    server reads the end of the handshake and the hang-up at once (blocking; run in a thread)."""
    with socket.create_connection((host, port), timeout=30) as sock:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = ctx.wrap_bio(incoming, outgoing, server_side=False)
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(outgoing.read())
                data = sock.recv(65536)
                assert data, "the server hung up during the handshake"
                incoming.write(data)
        try:
            tls.unwrap()
        except ssl.SSLWantReadError:
            pass  # close_notify is queued; we do not wait for the server's
        sock.sendall(outgoing.read())
        sock.shutdown(socket.SHUT_WR)


async def test_peers_that_hang_up_right_after_the_handshake_are_not_kept(
    server_cred: Credential, client_cred: Credential
) -> None:
    """Peers that complete the handshake and hang up at once leave no open connection behind
    (in the server's set or the gauge), whichever comes first: the hang-up or the handshake's
    coroutine resuming."""
    stats = Recorder()

    async def handler(inbound: InboundStream) -> None:
        inbound.refuse(503)

    srv = HboneServer(handler, server_context(server_cred), "cluster.local", stats=stats)
    await srv.listen()
    try:
        host, port = srv.address
        ctx = client_context(client_cred)
        for _ in range(20):
            await asyncio.to_thread(handshake_and_hang_up, host, port, ctx)
        await until(lambda: not srv.handshakes and not srv.connections)
        assert stats.connections == 0 and stats.streams == 0
    finally:
        await srv.close()


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


async def _stall_or_garbage(host: str, port: int, i: int) -> None:
    """A client that never completes a handshake: half stall after a partial ClientHello,
    half send garbage; both then wait for the server to hang up."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        if i % 2:
            writer.write(os.urandom(512))
        else:
            writer.write(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64))
        await writer.drain()
        async with asyncio.timeout(30):
            while await reader.read(65536):
                pass
    except (ConnectionError, TimeoutError):
        pass
    finally:
        writer.transport.abort()


@pytest.fixture
async def handshake_server(server_cred: Credential) -> AsyncIterator[tuple[HboneServer, Recorder]]:
    async def handler(inbound: InboundStream) -> None:
        inbound.refuse(503)

    stats = Recorder()
    srv = HboneServer(
        handler,
        server_context(server_cred),
        "cluster.local",
        stats=stats,
        handshake_timeout=0.2,
        max_handshakes=10_000,
        max_handshakes_per_peer=10_000,  # all from 127.0.0.1: let the flood through
    )
    await srv.listen()
    try:
        yield srv, stats
    finally:
        await srv.close()


async def _flood(srv: HboneServer, total: int, concurrency: int) -> None:
    host, port = srv.address
    for start in range(0, total, concurrency):
        await asyncio.gather(*(_stall_or_garbage(host, port, i) for i in range(start, start + concurrency)))


@pytest.mark.slow
async def test_handshake_flood_does_not_stay_in_memory(
    handshake_server: tuple[HboneServer, Recorder],
) -> None:
    """2,000 handshakes that stall until timed out or send garbage, 1,000 at a time: the memory
    they used is handed back afterwards (a loose bound on resident growth, not a timing)."""
    srv, stats = handshake_server
    with capture_logs():
        await _flood(srv, 20, 20)  # warm-up: one-time costs (OpenSSL tables, caches)
        gc.collect()
        await memory.releaser.settled()
        before = rss_mib()
        await _flood(srv, 2000, 1000)
        gc.collect()
        await memory.releaser.settled()
        grown = rss_mib() - before
    assert sum(stats.refused.values()) == 2020
    assert stats.refused["timeout"] > 0 and stats.refused["not_tls"] > 0, stats.refused
    assert grown < 40, f"resident memory grew by {grown:.0f} MiB over the flood"


async def test_handshake_refusals_are_counted_and_logged_once_per_peer_and_reason(
    handshake_server: tuple[HboneServer, Recorder],
) -> None:
    srv, stats = handshake_server
    with capture_logs() as logs:
        await _flood(srv, 300, 100)
    assert sum(stats.refused.values()) == 300
    refusals = [e for e in logs if e["event"] == "hbone client refused"]
    # One line per (address, reason) in the interval: here one address, two reasons.
    assert sorted(e["kind"] for e in refusals) == ["not_tls", "timeout"], refusals
    assert all(e["client"].startswith("127.0.0.1:") and e["reason"] for e in refusals)
    assert srv.refusals.dropped == 298


async def test_handshakes_in_flight_are_capped_per_peer(server_cred: Credential) -> None:
    async def handler(inbound: InboundStream) -> None:
        inbound.refuse(503)

    stats = Recorder()
    srv = HboneServer(
        handler,
        server_context(server_cred),
        "cluster.local",
        stats=stats,
        handshake_timeout=60,
        max_handshakes_per_peer=4,
    )
    await srv.listen()
    stalled: list[asyncio.StreamWriter] = []
    try:
        host, port = srv.address
        for _ in range(4):
            _, w = await asyncio.open_connection(host, port)
            stalled.append(w)
        await until(lambda: srv.handshakes == 4)  # accepted, handshakes waiting for a ClientHello
        # The fifth from the same address is refused at once, without a handshake.
        reader, writer = await asyncio.open_connection(host, port)
        try:
            async with asyncio.timeout(30):
                with pytest.raises(ConnectionResetError):
                    while await reader.read(65536):
                        pass
                    raise ConnectionResetError("closed without a reset")
        finally:
            writer.transport.abort()
        assert stats.refused == {"too_many_handshakes": 1}
        # A legitimate client from elsewhere is not affected: here, with another source address.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.bind(("127.0.0.2", 0))
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
        async with asyncio.timeout(30):
            _, w = await asyncio.open_connection(
                sock=sock, ssl=client_context(server_cred), server_hostname=""
            )
        w.transport.abort()
        assert stats.refused == {"too_many_handshakes": 1}
    finally:
        for w in stalled:
            w.transport.abort()
        await srv.close()
