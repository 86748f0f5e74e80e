"""HBONE over real sockets on loopback: relay, pool, refusals, flow control, keepalive."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import os
import ssl
from collections.abc import AsyncIterator

import pytest
from structlog.testing import capture_logs

from mesh.hbone.client import ClientProtocol, ConnectRefused, open_connection
from mesh.hbone.pool import HbonePool, PoolKey
from mesh.hbone.relay import connect_and_relay
from mesh.hbone.server import Handler, HboneServer, InboundStream
from mesh.hbone.stream import BufferedSink, Stream, StreamError
from mesh.identity import Identity
from mesh.pki import CertificateAuthority, Credential
from mesh.tls import PeerRejected, client_context, server_context
from tests.hbone.conftest import CLIENT_ID, SERVER_ID, Backend
from tests.pkihelpers import forged_credential


@contextlib.asynccontextmanager
async def serving(
    cred: Credential, handler: Handler = connect_and_relay, port: int = 0
) -> AsyncIterator[HboneServer]:
    """An HBONE server on loopback for the duration of the block."""
    srv = HboneServer(handler, server_context(cred), "cluster.local")
    await srv.listen("127.0.0.1", port)
    try:
        yield srv
    finally:
        await srv.close()


@pytest.fixture
async def server(server_cred: Credential) -> AsyncIterator[HboneServer]:
    async with serving(server_cred) as srv:
        yield srv


async def dial(
    server: HboneServer, cred: Credential, expect: Identity = SERVER_ID, **kw: float
) -> ClientProtocol:
    host, port = server.address
    return await open_connection(host, port, client_context(cred), "cluster.local", expect, **kw)


async def roundtrip(stream: Stream, payload: bytes) -> bytes:
    sink = BufferedSink(stream)

    async def send() -> None:
        for i in range(0, len(payload), 65536):
            stream.write(payload[i : i + 65536])
            await stream.drain()
        stream.write_eof()

    sender = asyncio.create_task(send())
    got = await sink.read_all()
    await sender
    return got


async def test_echo_through_tunnel(server: HboneServer, client_cred: Credential, backend: Backend) -> None:
    conn = await dial(server, client_cred)
    assert conn.peer == SERVER_ID
    st = await conn.open_stream(f"127.0.0.1:{backend.echo_port}", [("forwarded", 'for="127.0.0.1:1"')])
    payload = os.urandom(300_000)
    assert await roundtrip(st, payload) == payload
    await asyncio.wait_for(st.done, 5)
    assert st.bytes_sent == st.bytes_received == len(payload)
    conn.close()
    await asyncio.wait_for(conn.closed, 5)


async def test_server_sees_client_identity(
    client_cred: Credential, server_cred: Credential, backend: Backend
) -> None:
    seen: list[Identity] = []

    async def handler(inbound: InboundStream) -> None:
        seen.append(inbound.peer)
        await connect_and_relay(inbound)

    async with serving(server_cred, handler) as srv:
        conn = await dial(srv, client_cred)
        st = await conn.open_stream(f"127.0.0.1:{backend.echo_port}")
        assert await roundtrip(st, b"ping") == b"ping"
        assert seen == [CLIENT_ID]
        conn.close()


async def test_half_close_keeps_other_direction(
    server: HboneServer, client_cred: Credential, backend: Backend
) -> None:
    conn = await dial(server, client_cred)
    st = await conn.open_stream(f"127.0.0.1:{backend.hash_port}")
    sink = BufferedSink(st)
    st.write(b"a" * 1000)
    st.write_eof()  # the hasher only answers after our EOF: the reverse direction must stay open
    reply = await asyncio.wait_for(sink.read_all(), 10)
    assert reply == f"1000 {hashlib.sha256(b'a' * 1000).hexdigest()}".encode()
    conn.close()


async def test_unreachable_upstream_is_503(server: HboneServer, client_cred: Credential) -> None:
    conn = await dial(server, client_cred)
    with pytest.raises(ConnectRefused) as e:
        await conn.open_stream("127.0.0.1:1")
    assert e.value.status == 503
    # The connection stays usable.
    assert conn.has_capacity
    conn.close()


async def test_upstream_reset_resets_stream(server: HboneServer, client_cred: Credential) -> None:
    async def rst(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.read(1)
        sock = w.get_extra_info("socket")
        import socket
        import struct

        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        w.transport.abort()

    upstream = await asyncio.start_server(rst, "127.0.0.1", 0)
    try:
        conn = await dial(server, client_cred)
        st = await conn.open_stream(f"127.0.0.1:{upstream.sockets[0].getsockname()[1]}")
        sink = BufferedSink(st)
        st.write(b"x")

        with pytest.raises(StreamError):
            await asyncio.wait_for(sink.read_all(), 5)
        conn.close()
    finally:
        upstream.close()


@pytest.mark.slow
async def test_1000_concurrent_connections_over_pool(
    server: HboneServer, client_cred: Credential, backend: Backend
) -> None:
    host, port = server.address
    ctx = client_context(client_cred)
    key = PoolKey(CLIENT_ID, SERVER_ID, None, (host, port))
    max_streams_seen = 0

    async def dialer(k: PoolKey) -> ClientProtocol:
        return await open_connection(k.dst_addr[0], k.dst_addr[1], ctx, "cluster.local", k.dst_identity)

    pool = HbonePool(dialer)
    all_open = asyncio.Event()
    opened = 0

    async def one(i: int) -> None:
        nonlocal max_streams_seen, opened
        st = await pool.open_stream(key, f"127.0.0.1:{backend.echo_port}")
        opened += 1
        if opened == 1000:
            max_streams_seen = max(len(c.streams) for c in pool.connections(key))
            all_open.set()
        await all_open.wait()  # all 1000 tunnels are open at once before any data moves
        payload = os.urandom(2048 + i)
        got = await roundtrip(st, payload)
        assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()

    try:
        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(1000))), 120)
        assert backend.connections == 1000
        assert pool.dials == 10  # at most 100 streams per connection, no extra dials
        assert max_streams_seen == 100
        assert all(len(c.streams) == 0 for c in pool.connections())
    finally:
        await pool.aclose()


async def test_one_dial_per_key(server: HboneServer, client_cred: Credential, backend: Backend) -> None:
    host, port = server.address
    ctx = client_context(client_cred)
    calls = 0
    gate = asyncio.Event()

    async def dialer(k: PoolKey) -> ClientProtocol:
        nonlocal calls
        calls += 1
        await gate.wait()
        return await open_connection(host, port, ctx, "cluster.local", k.dst_identity)

    pool = HbonePool(dialer)
    key = PoolKey(CLIENT_ID, SERVER_ID, None, (host, port))
    tasks = [asyncio.create_task(pool.open_stream(key, f"127.0.0.1:{backend.echo_port}")) for _ in range(20)]
    await asyncio.sleep(0)  # let every task reach the pool
    gate.set()
    streams = await asyncio.gather(*tasks)
    assert calls == 1
    for st in streams:
        st.reset()
    await pool.aclose()


async def _dial_and_close(server: HboneServer, ctx: ssl.SSLContext, backend: Backend) -> ClientProtocol:
    host, port = server.address
    conn = await open_connection(host, port, ctx, "cluster.local", SERVER_ID)
    st = await conn.open_stream(f"127.0.0.1:{backend.echo_port}")
    assert await roundtrip(st, b"ticket") == b"ticket"  # by now the session ticket has arrived
    conn.close()
    await asyncio.wait_for(conn.closed, 5)
    return conn


async def test_redial_resumes_the_tls_session(
    server: HboneServer, client_cred: Credential, backend: Backend
) -> None:
    ctx = client_context(client_cred)
    first = await _dial_and_close(server, ctx, backend)
    assert not first.resumed
    server.connections.clear()
    host, port = server.address
    again = await open_connection(host, port, ctx, "cluster.local", SERVER_ID)
    assert again.resumed and again.peer == SERVER_ID
    st = await again.open_stream(f"127.0.0.1:{backend.echo_port}")
    assert await roundtrip(st, b"resumed") == b"resumed"
    # The server checked the client's identity from the resumed session, as after a full one.
    assert [p.peer for p in server.connections] == [CLIENT_ID]
    again.close()


async def test_sessions_are_only_offered_to_the_peer_that_issued_them(
    server: HboneServer, client_cred: Credential, server_cred: Credential, backend: Backend
) -> None:
    ctx = client_context(client_cred)
    await _dial_and_close(server, ctx, backend)
    async with serving(server_cred) as other:
        host, port = other.address
        conn = await open_connection(host, port, ctx, "cluster.local", SERVER_ID)
        assert not conn.resumed  # another address: no ticket offered
        conn.close()


async def test_a_refused_ticket_falls_back_to_a_full_handshake(
    client_cred: Credential, server_cred: Credential, backend: Backend
) -> None:
    """A server that cannot decrypt the ticket (restarted: new ticket keys) does a full handshake."""
    ctx = client_context(client_cred)
    async with serving(server_cred) as first:
        host, port = first.address
        await _dial_and_close(first, ctx, backend)
    async with serving(server_cred, port=port):
        conn = await open_connection(host, port, ctx, "cluster.local", SERVER_ID)
        assert not conn.resumed and conn.peer == SERVER_ID
        st = await conn.open_stream(f"127.0.0.1:{backend.echo_port}")
        assert await roundtrip(st, b"full") == b"full"
        conn.close()


async def test_idle_connection_closed(server: HboneServer, client_cred: Credential, backend: Backend) -> None:
    host, port = server.address
    ctx = client_context(client_cred)

    async def dialer(k: PoolKey) -> ClientProtocol:
        return await open_connection(host, port, ctx, "cluster.local", k.dst_identity)

    pool = HbonePool(dialer, idle_timeout=0.05)
    key = PoolKey(CLIENT_ID, SERVER_ID, None, (host, port))
    st = await pool.open_stream(key, f"127.0.0.1:{backend.echo_port}")
    (conn,) = pool.connections(key)
    assert await roundtrip(st, b"x") == b"x"
    await asyncio.wait_for(conn.closed, 5)
    assert pool.connections(key) == []
    await pool.aclose()


async def test_dead_peer_detected_by_ping(server: HboneServer, client_cred: Credential) -> None:
    conn = await dial(server, client_cred, ping_interval=0.05, ping_timeout=0.2)
    await asyncio.wait_for(server.connected.wait(), 5)  # the server finished its side of the handshake
    for proto in server.connections:
        assert proto.transport is not None
        proto.transport.pause_reading()  # the server stops answering anything, PINGs included
    with capture_logs() as logs:
        await asyncio.wait_for(conn.closed, 5)
    assert any("did not answer PING" in e["event"] for e in logs)


async def test_slow_reader_slows_writer(
    server: HboneServer, client_cred: Credential, backend: Backend
) -> None:
    """The upstream never reads: the client must block with bounded bytes in flight."""
    conn = await dial(server, client_cred)
    st = await conn.open_stream(f"127.0.0.1:{backend.stall_port}")
    chunk = b"z" * 65536
    sent = 0
    blocked = False
    while sent < 64 * 1024 * 1024:
        st.write(chunk)
        sent += len(chunk)
        try:
            await asyncio.wait_for(st.drain(), 1.0)
        except TimeoutError:
            blocked = True
            break
    assert blocked, "writer was never slowed down"
    # In flight: stream window (4 MiB) + queued (< 512 KiB + a chunk) + transport/kernel buffers.
    assert sent < 24 * 1024 * 1024
    st.reset()
    conn.close()


async def test_open_stream_fails_when_the_connection_dies_before_the_answer(
    client_cred: Credential, server_cred: Credential
) -> None:
    arrived = asyncio.Event()

    async def never_answer(inbound: InboundStream) -> None:
        arrived.set()
        await asyncio.Event().wait()

    async with serving(server_cred, never_answer) as srv:
        conn = await dial(srv, client_cred)
        opening = asyncio.create_task(conn.open_stream("127.0.0.1:9"))
        await asyncio.wait_for(arrived.wait(), 5)
        for proto in srv.connections:
            proto.abort(StreamError("test: server gone"))
        with pytest.raises(StreamError):
            await asyncio.wait_for(opening, 5)
        assert not conn.streams


async def test_cancelled_relay_waiter_leaves_the_relay_alone(
    server: HboneServer, client_cred: Credential, backend: Backend
) -> None:
    """Cancelling whoever waits on a relay must not cancel the leg's or the stream's futures."""
    from mesh.hbone.relay import TcpLeg, wait_relay

    conn = await dial(server, client_cred)
    st = await conn.open_stream(f"127.0.0.1:{backend.echo_port}")
    leg = TcpLeg(asyncio.get_running_loop())
    waiter = asyncio.create_task(wait_relay(leg, st))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert not leg.closed.cancelled() and not st.done.cancelled()
    assert await roundtrip(st, b"still relaying") == b"still relaying"
    conn.close()


class _KeepingSink:
    """Keeps the payload views it is handed (as a transport queue may), or copies them."""

    def __init__(self, stream: Stream, keep: bool) -> None:
        self.stream = stream
        self.keep = keep
        self.chunks: list[bytes | memoryview] = []
        self.received = 0
        self.want = 0
        self.arrived = asyncio.Event()
        stream.attach(self)

    def on_data(self, data: bytes | memoryview) -> None:
        self.chunks.append(data if self.keep else bytes(data))
        self.received += len(data)
        self.stream.ack(len(data))
        if self.received >= self.want:
            self.arrived.set()

    def on_eof(self) -> None:
        self.arrived.set()

    def on_reset(self, error: StreamError) -> None:
        self.arrived.set()


async def _echo_one_read_at_a_time(
    conn: ClientProtocol, sink: _KeepingSink, rounds: int
) -> tuple[bytes, set[int]]:
    """Send distinct chunks one round trip at a time (so each arrives in its own read)."""
    sent = bytearray()
    buffers = set()
    for i in range(rounds):
        chunk = bytes([i % 251]) * (700 + 97 * i)
        sink.want = len(sent) + len(chunk)
        sink.arrived.clear()
        sink.stream.write(chunk)
        sent += chunk
        await asyncio.wait_for(sink.arrived.wait(), 5)
        buffers.add(id(conn._rbuf))
    return bytes(sent), buffers


async def test_payload_views_a_sink_keeps_are_never_overwritten(
    server: HboneServer, client_cred: Credential, backend: Backend
) -> None:
    """Payloads are views of the receive buffer: one a sink keeps must not be reused under it."""
    conn = await dial(server, client_cred)
    sink = _KeepingSink(await conn.open_stream(f"127.0.0.1:{backend.echo_port}"), keep=True)
    sent, buffers = await _echo_one_read_at_a_time(conn, sink, 40)
    assert any(isinstance(c, memoryview) for c in sink.chunks)  # the zero-copy path was taken
    assert b"".join(bytes(c) for c in sink.chunks) == sent
    assert len(buffers) > 1  # every kept view made the next read take a new buffer
    conn.close()


async def test_receive_buffer_reused_when_no_view_is_kept(
    server: HboneServer, client_cred: Credential, backend: Backend
) -> None:
    conn = await dial(server, client_cred)
    sink = _KeepingSink(await conn.open_stream(f"127.0.0.1:{backend.echo_port}"), keep=False)
    sent, buffers = await _echo_one_read_at_a_time(conn, sink, 40)
    assert b"".join(sink.chunks) == sent
    assert len(buffers) == 1  # one receive buffer for all 40 reads
    conn.close()


@pytest.mark.slow
async def test_256mib_transfer(server: HboneServer, client_cred: Credential, backend: Backend) -> None:
    conn = await dial(server, client_cred)
    st = await conn.open_stream(f"127.0.0.1:{backend.hash_port}")
    sink = BufferedSink(st)
    block = os.urandom(1024 * 1024)
    h = hashlib.sha256()
    total = 256 * 1024 * 1024
    for _ in range(total // len(block)):
        st.write(block)
        h.update(block)
        await st.drain()
    st.write_eof()
    reply = await asyncio.wait_for(sink.read_all(), 120)
    assert reply == f"{total} {h.hexdigest()}".encode()
    conn.close()


# -- refusals -------------------------------------------------------------------------------------


async def _expect_server_refusal(server: HboneServer, cred: Credential, reason: str) -> None:
    host, port = server.address
    with capture_logs() as logs:
        with pytest.raises((PeerRejected, StreamError, ssl.SSLError, OSError)):
            conn = await open_connection(host, port, client_context(cred), "cluster.local", SERVER_ID)
            # TLS 1.3: the client may finish before the server rejects its certificate.
            await asyncio.wait_for(conn.open_stream("127.0.0.1:9"), 5)
        for _ in range(100):
            if any(e.get("event") == "hbone client refused" for e in logs):
                break
            await asyncio.sleep(0.01)
    refusals = [e for e in logs if e.get("event") == "hbone client refused"]
    assert refusals, logs
    assert reason in refusals[0]["reason"], refusals[0]


async def test_refuses_expired_client_cert(server: HboneServer, ca: CertificateAuthority) -> None:
    now = dt.datetime.now(dt.UTC)
    cred = forged_credential(
        ca, CLIENT_ID, not_before=now - dt.timedelta(hours=2), not_after=now - dt.timedelta(hours=1)
    )
    await _expect_server_refusal(server, cred, "expired")


async def test_refuses_client_from_other_root(server: HboneServer, ca: CertificateAuthority) -> None:
    other = CertificateAuthority.generate("cluster.local")
    cred = other.issue(CLIENT_ID)
    # The client trusts the mesh root (so it accepts the server) but its own cert is from elsewhere.
    cred = Credential(cred.key_pem, cred.chain_pem, ca.roots_pem)
    await _expect_server_refusal(server, cred, "not signed by the mesh root")


async def test_refuses_client_from_other_trust_domain(server: HboneServer, ca: CertificateAuthority) -> None:
    cred = forged_credential(ca, Identity("evil.org", "shop", "frontend"))
    await _expect_server_refusal(server, cred, "trust domain 'evil.org'")


async def test_refuses_client_without_certificate(server: HboneServer, ca: CertificateAuthority) -> None:
    host, port = server.address
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=ca.roots_pem)
    ctx.set_alpn_protocols(["h2"])
    with capture_logs() as logs:
        with pytest.raises((PeerRejected, StreamError, ssl.SSLError, OSError)):
            conn = await open_connection(host, port, ctx, "cluster.local", SERVER_ID)
            await asyncio.wait_for(conn.open_stream("127.0.0.1:9"), 5)
        for _ in range(100):
            if any(e.get("event") == "hbone client refused" for e in logs):
                break
            await asyncio.sleep(0.01)
    refusals = [e for e in logs if e.get("event") == "hbone client refused"]
    assert refusals and "no client certificate" in refusals[0]["reason"], logs


async def test_client_refuses_wrong_server_identity(server: HboneServer, client_cred: Credential) -> None:
    with (
        capture_logs() as logs,
        pytest.raises(PeerRejected, match="expected spiffe://cluster.local/ns/shop/sa/db"),
    ):
        await dial(server, client_cred, expect=Identity("cluster.local", "shop", "db"))
    assert any(e.get("event") == "hbone server refused" for e in logs)


async def test_client_refuses_expired_server(ca: CertificateAuthority, client_cred: Credential) -> None:
    now = dt.datetime.now(dt.UTC)
    bad = forged_credential(
        ca, SERVER_ID, not_before=now - dt.timedelta(hours=2), not_after=now - dt.timedelta(hours=1)
    )
    async with serving(bad) as srv:
        with pytest.raises(PeerRejected, match="expired"):
            await dial(srv, client_cred)
