"""Config, ZDS codec, certificate manager: no network namespaces needed."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import socket

import pytest

from mesh import zds
from mesh.certs import CertManager, backoff_delays, refresh_delay
from mesh.hbone.pool import PoolKey
from mesh.identity import Identity
from mesh.netns import HostSocketFactory
from mesh.pki import CertificateAuthority
from mesh.proto import zds_pb2
from mesh.xds.state import ProxyState
from tests.ztunnel.fakes import FakeCa
from ztunnel import config
from ztunnel.inbound import forwarded_for
from ztunnel.metrics import ConnectionRecord, Metrics
from ztunnel.outbound import Outbound
from ztunnel.routing import Passthrough
from ztunnel.state import NodeContext, PodContext

ID_A = Identity("cluster.local", "shop", "a")
ID_B = Identity("cluster.local", "shop", "b")


# -- config -----------------------------------------------------------------------------------


def test_config_from_env_and_flags() -> None:
    cfg = config.load(
        ["--admin-port", "16000"], {"NODE_NAME": "n1", "ZTUNNEL_ADMIN_PORT": "1", "LOG_LEVEL": "DEBUG"}
    )
    assert (cfg.node_name, cfg.admin_port, cfg.log_level) == ("n1", 16000, "debug")
    assert cfg.access_log_interval == 300.0
    cfg = config.load([], {"NODE_NAME": "n1", "ZTUNNEL_ACCESS_LOG_INTERVAL": "60"})
    assert cfg.access_log_interval == 60.0


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        ([], {}, "NODE_NAME: required"),
        (["--node-name", "n", "--stats-port", "x"], {}, "--stats-port: 'x' is not a port number"),
        (["--node-name", "n", "--admin-port", "70000"], {}, "out of range"),
        (["--node-name", "n"], {"LOG_LEVEL": "loud"}, "LOG_LEVEL: 'loud'"),
        (["--node-name", "n", "--drain-seconds", "-1"], {}, "negative"),
        (["--node-name", "n", "--trust-domain", "a/b"], {}, "--trust-domain"),
        (["--node-name", "n", "--access-log-interval", "soon"], {}, "--access-log-interval: 'soon'"),
        (["--node-name", "n", "--access-log-interval", "-5"], {}, "--access-log-interval: -5.0"),
        (["--node-name", "n", "--access-log-interval", "nan"], {}, "--access-log-interval: nan"),
    ],
)
def test_config_errors_name_the_value(argv: list[str], env: dict[str, str], message: str) -> None:
    with pytest.raises(config.ConfigError, match=message):
        config.load(argv, env)


# -- ZDS codec --------------------------------------------------------------------------------


def test_zds_roundtrip_and_errors() -> None:
    r, w = os.pipe()
    os.close(w)
    add = zds.AddWorkload("u1", "web", "shop", "web-sa", r)
    got = zds.decode_request(zds.encode_request(add), [r])
    assert got == add
    os.close(r)
    for req in (zds.DelWorkload("u1"), zds.KeepWorkload("u2"), zds.SnapshotSent()):
        assert zds.decode_request(zds.encode_request(req), []) == req
    assert zds.decode_ack(zds.encode_ack("boom")) == "boom"
    assert zds.decode_hello(zds.encode_hello()) == zds_pb2.V1


@pytest.mark.parametrize(
    ("data", "nfds", "message"),
    [
        (b"\xff\xff\xff", 0, "undecodable"),
        (b"", 0, "no known payload"),
        (zds.encode_request(zds.AddWorkload("u", "n", "ns", "sa", -1)), 0, "exactly one netns fd"),
        (zds.encode_request(zds.AddWorkload("u", "n", "ns", "sa", -1)), 2, "exactly one netns fd"),
        (zds.encode_request(zds.AddWorkload("", "n", "ns", "sa", -1)), 1, "uid is empty"),
        (zds.encode_request(zds.DelWorkload("")), 1, "del: uid is empty"),
    ],
)
def test_zds_malformed_closes_fds(data: bytes, nfds: int, message: str) -> None:
    fds = []
    for _ in range(nfds):
        r, w = os.pipe()
        os.close(w)
        fds.append(r)
    with pytest.raises(zds.ZdsError, match=message):
        zds.decode_request(data, fds)
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


async def test_zds_fds_travel_over_seqpacket() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a.setblocking(False)
    b.setblocking(False)
    r, w = os.pipe()
    try:
        await zds.send_message(a, zds.encode_request(zds.AddWorkload("u", "n", "ns", "sa", r)), [r])
        data, fds = await zds.recv_message(b)
        req = zds.decode_request(data, fds)
        assert isinstance(req, zds.AddWorkload)
        os.write(w, b"x")
        assert os.read(req.netns_fd, 1) == b"x"
        os.close(req.netns_fd)
    finally:
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()


def test_forwarded_header() -> None:
    assert forwarded_for('for="10.0.1.2:4567"') == "10.0.1.2"
    assert forwarded_for('for="[fd00::1]:80"') == "fd00::1"
    assert forwarded_for("for=10.0.1.2") == "10.0.1.2"
    assert forwarded_for("nonsense") is None
    assert forwarded_for(None) is None


# -- certificate manager ------------------------------------------------------------------------


def test_backoff_and_refresh_schedule() -> None:
    d = backoff_delays()
    assert [d(i) for i in range(4)] == [0.5, 1.0, 2.0, 4.0]
    assert d(20) == 150.0
    cred = CertificateAuthority.generate().issue(ID_A, dt.timedelta(hours=2))
    half = refresh_delay(cred, cred.not_before)
    assert abs(half - (cred.not_after - cred.not_before).total_seconds() / 2) < 1
    # Backdated not_before: the half-life counts from when we got it.
    got_at = cred.not_before + dt.timedelta(minutes=30)
    assert abs(refresh_delay(cred, got_at) - (cred.not_after - got_at).total_seconds() / 2) < 1
    assert refresh_delay(cred, cred.not_after + dt.timedelta(seconds=5)) == 0


async def test_cert_manager_tracks_refcounts_and_drops() -> None:
    ca = FakeCa()
    m = CertManager(ca)
    try:
        m.track(ID_A)
        m.track(ID_A)
        certs = await m.get(ID_A, timeout=5)
        assert certs.credential.identity == ID_A
        assert m.ready and ca.calls == [ID_A]
        m.untrack(ID_A)
        assert m.current(ID_A) is not None
        m.untrack(ID_A)
        assert m.current(ID_A) is None and m.identities() == []
        with pytest.raises(Exception, match="no pod with that identity"):
            await m.get(ID_A)
    finally:
        await m.aclose()


async def test_cert_manager_retries_with_backoff_and_rotates() -> None:
    ca = FakeCa()
    ca.fail_next = 2
    m = CertManager(ca, backoff=lambda n: 0.01)
    rotated: list[Identity] = []
    m.subscribe(lambda ident, _c: rotated.append(ident))
    try:
        m.track(ID_B)
        first = await m.get(ID_B, timeout=5)
        assert len(ca.calls) == 3
        m.refresh_now(ID_B)
        async with asyncio.timeout(5):
            while m.current(ID_B) is first:
                await m.changed.wait()
        assert rotated == [ID_B, ID_B]
        assert m.dump()[0]["rotations"] == 1
    finally:
        await m.aclose()


async def test_cert_manager_limits_concurrent_fetches() -> None:
    ca = FakeCa()
    ca.gate = asyncio.Event()
    m = CertManager(ca)
    try:
        ids = [Identity("cluster.local", "ns", f"sa{i}") for i in range(12)]
        for i in ids:
            m.track(i)
        async with asyncio.timeout(5):
            await ca.wait_in_flight(8)
        assert ca.in_flight == 8
        ca.gate.set()
        await asyncio.gather(*(m.get(i, timeout=10) for i in ids))
        assert ca.max_in_flight == 8
    finally:
        await m.aclose()


async def test_cert_manager_refreshes_at_half_life() -> None:
    ca = FakeCa(ttl=dt.timedelta(seconds=2))
    m = CertManager(ca)
    try:
        m.track(ID_A)
        first = await m.get(ID_A, timeout=5)
        async with asyncio.timeout(5):  # due after ~1 s: half of the 2 s the certificate has left
            while m.current(ID_A) is first:
                await m.changed.wait()
        assert len(ca.calls) == 2
    finally:
        await m.aclose()


def test_main_rejects_bad_config_with_a_clear_message(capsys: pytest.CaptureFixture[str]) -> None:
    from ztunnel.main import main

    assert main(["--node-name", "n1", "--admin-port", "http"]) == 2
    assert "--admin-port: 'http' is not a port number" in capsys.readouterr().err


async def test_connection_record_is_closed_once_however_it_ends() -> None:
    """Opened and closed always match: a normal end, an error and a cancellation mid-relay."""
    metrics = Metrics()

    def count(name: str) -> float:
        value = metrics.registry.get_sample_value(f"istio_tcp_connections_{name}_total", labels)
        return value or 0.0

    rec = ConnectionRecord("source", "outbound", "10.0.1.2:1000", "10.0.2.2:80")
    labels = rec.labels()
    with metrics.connection(rec):
        assert count("opened") == 1 and count("closed") == 0
    assert count("closed") == 1 and rec.result == "ok"

    failing = ConnectionRecord("source", "outbound", "10.0.1.2:1001", "10.0.2.2:80")
    with pytest.raises(RuntimeError), metrics.connection(failing):
        raise RuntimeError("boom")
    assert failing.result == "error" and "boom" in failing.reason

    relaying = asyncio.Event()
    cancelled = ConnectionRecord("source", "outbound", "10.0.1.2:1002", "10.0.2.2:80")

    async def relay() -> None:
        with metrics.connection(cancelled):
            relaying.set()
            await asyncio.Event().wait()  # a relay that never ends by itself

    task = asyncio.create_task(relay())
    await relaying.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cancelled.result == "drained" and cancelled.response_flags == "DC"
    assert metrics.connections_closed == 3
    opened = sum(
        s.value for m in metrics.registry.collect() if m.name == "istio_tcp_connections_opened" for s in m.samples
        if s.name.endswith("_total")
    )  # fmt: skip
    closed = sum(
        s.value for m in metrics.registry.collect() if m.name == "istio_tcp_connections_closed" for s in m.samples
        if s.name.endswith("_total")
    )  # fmt: skip
    assert opened == closed == 3


class RecordingFactory(HostSocketFactory):
    """Plain host sockets, remembering the family each upstream socket was made for."""

    def __init__(self) -> None:
        self.families: list[socket.AddressFamily] = []

    async def tcp_socket(
        self, family: socket.AddressFamily, *, mark: int | None = None, transparent: bool = False
    ) -> socket.socket:
        self.families.append(family)
        return await super().tcp_socket(family, transparent=transparent)


async def test_outbound_sockets_follow_the_destination_address_family() -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.read())
        writer.write_eof()
        writer.close()

    server = await asyncio.start_server(echo, "::1", 0)
    port = server.sockets[0].getsockname()[1]
    factory = RecordingFactory()
    node = NodeContext("n1", "cluster.local", ProxyState(), CertManager(FakeCa()), Metrics())
    out = Outbound(PodContext("u", "client", "shop", "client", factory, node))
    app, peer = socket.socketpair()
    try:
        rec = ConnectionRecord("source", "passthrough", "10.0.1.2:1", f"[::1]:{port}")
        relay = asyncio.create_task(out._passthrough(app, Passthrough(to=("::1", port)), rec))
        reader, writer = await asyncio.open_connection(sock=peer)
        writer.write(b"over v6")
        writer.write_eof()
        async with asyncio.timeout(10):
            assert await reader.read() == b"over v6"
            await relay
        writer.close()
        assert rec.result == "ok" and factory.families == [socket.AF_INET6]
        # The HBONE dial too: a v6 peer gets a v6 socket (the dial then fails: nothing listens).
        client_id = Identity("cluster.local", "shop", "client")
        node.certs.track(client_id)
        key = PoolKey(client_id, Identity("cluster.local", "shop", "web"), "fd00::2", ("::1", 1))
        with pytest.raises(OSError):
            await out._dial(key)
        assert factory.families == [socket.AF_INET6, socket.AF_INET6]
    finally:
        await out.aclose()
        await node.certs.aclose()
        server.close()
        await server.wait_closed()
