"""The node's gRPC channel to its control plane (mesh/xds/channel.py, grpclib): targets as users
write them, connect retried at most every second with the reason logged once, and a close that
leaves no connection behind."""

from __future__ import annotations

import asyncio
import socket

import pytest
from structlog.testing import capture_logs

from mesh.xds import channel as channel_module
from mesh.xds.channel import Target, TargetError, connect, describe, make_channel, parse_target


@pytest.mark.parametrize(
    ("address", "target"),
    [
        ("127.0.0.1:15012", Target("127.0.0.1", 15012)),
        ("istiod.istio-system.svc:15012", Target("istiod.istio-system.svc", 15012)),
        ("dns:///istiod.istio-system.svc:15012", Target("istiod.istio-system.svc", 15012)),
        ("[::1]:15012", Target("::1", 15012)),
        ("unix:/run/cp.sock", Target(path="/run/cp.sock")),
        ("unix:///run/cp.sock", Target(path="/run/cp.sock")),
    ],
)
def test_targets(address: str, target: Target) -> None:
    assert parse_target(address) == target
    assert parse_target(str(target)) == target


@pytest.mark.parametrize(
    ("address", "says"),
    [
        ("127.0.0.1", "not host:port"),
        (":15012", "not host:port"),
        ("::1:15012", "not host:port"),
        ("host:http", "bad port 'http'"),
        ("host:0", "bad port '0'"),
        ("host:65536", "bad port '65536'"),
        ("unix:run/cp.sock", "absolute path"),
    ],
)
def test_bad_targets_are_named(address: str, says: str) -> None:
    with pytest.raises(TargetError, match=says) as e:
        parse_target(address)
    assert repr(address) in str(e.value)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_connect_retries_each_interval_and_says_why_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(channel_module, "RECONNECT_INTERVAL", 0.05)
    monkeypatch.setattr(channel_module, "QUIET_CONNECT", 0.1)
    port = free_port()
    accepted = asyncio.Event()
    ch = make_channel(f"127.0.0.1:{port}")
    try:
        with capture_logs() as logs:
            task = asyncio.create_task(connect(ch, channel_module.structlog.get_logger("test")))
            await asyncio.sleep(0.4)  # several refused attempts
            assert not task.done()

            async def on_client(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
                accepted.set()
                await _r.read()  # until the client goes
                w.close()

            server = await asyncio.start_server(on_client, "127.0.0.1", port)
            try:
                async with asyncio.timeout(10):
                    await task  # connected within an interval of the server's return
                    await accepted.wait()
                waiting = [e for e in logs if e["event"] == "waiting for the control plane"]
                assert len(waiting) == 1 and waiting[0]["reason"] == "connection refused"
                await ch.aclose()
                assert ch._protocol is None
            finally:
                server.close()
                await server.wait_closed()
    finally:
        await ch.aclose()


async def test_aclose_without_a_connection_is_a_no_op() -> None:
    ch = make_channel("127.0.0.1:1")
    await ch.aclose()
    await ch.aclose()


def test_describe() -> None:
    assert describe(ConnectionRefusedError(111, "Connection refused")) == "connection refused"
    assert describe(TimeoutError()).startswith("no answer within")
