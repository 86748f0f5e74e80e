"""The node's gRPC channel to its control plane (mesh/xds/channel.py, grpclib): targets as users
write them, connect retried at most every second with the reason logged once, a close that
leaves no connection behind, and a cancel that grpclib's own error cannot swallow."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Coroutine
from typing import Any

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.utils import Wrapper
from structlog.testing import capture_logs

from mesh.xds import channel as channel_module
from mesh.xds.channel import (
    Target,
    TargetError,
    call_in_own_task,
    connect,
    describe,
    make_channel,
    parse_target,
)
from mesh.xds.client import XdsClient
from mesh.xds.state import ProxyState


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


# --- a cancel is never lost to grpclib's error (channel.call_in_own_task, XdsClient.run) ----------


async def _blocked_in_grpclib(wrapper: Wrapper) -> None:
    """What a grpclib call waiting for a message looks like to its task."""
    with wrapper:
        await asyncio.Event().wait()


def _connection_fails(wrapper: Wrapper) -> None:
    # grpclib's reaction to a dead connection (protocol.py, process_stream_reset).
    wrapper.cancel(StreamTerminatedError("Protocol error"))


@pytest.mark.parametrize("cancel_first", [True, False])
async def test_grpclib_turns_a_cancel_into_its_error_and_call_in_own_task_keeps_it(cancel_first: bool) -> None:
    async def started(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return task

    def together(task: asyncio.Task[None], wrapper: Wrapper) -> None:
        # Both in one pass of the loop: stopping ztunnel while the control plane goes away.
        if cancel_first:
            task.cancel()
            _connection_fails(wrapper)
        else:
            _connection_fails(wrapper)
            task.cancel()

    # Awaited directly, the cancel is lost: the task ends with grpclib's error.
    wrapper = Wrapper()
    plain = await started(_blocked_in_grpclib(wrapper))
    together(plain, wrapper)
    with pytest.raises(StreamTerminatedError):
        await plain

    wrapper = Wrapper()
    kept = await started(call_in_own_task(_blocked_in_grpclib(wrapper)))
    together(kept, wrapper)
    with pytest.raises(asyncio.CancelledError):
        await kept


async def test_call_in_own_task_passes_results_and_errors_through() -> None:
    async def answer() -> int:
        return 42

    async def refused() -> None:
        raise GRPCError(Status.PERMISSION_DENIED, "no")

    assert await call_in_own_task(answer()) == 42
    with pytest.raises(GRPCError):
        await call_in_own_task(refused())
    # grpclib failing the call on its own (no cancel of ours): its error, for the caller to retry.
    wrapper = Wrapper()
    task = asyncio.ensure_future(call_in_own_task(_blocked_in_grpclib(wrapper)))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    _connection_fails(wrapper)
    with pytest.raises(StreamTerminatedError):
        await task


@pytest.mark.parametrize("cancel_first", [True, False])
async def test_xds_client_run_stops_when_cancelled_as_the_connection_fails(
    monkeypatch: pytest.MonkeyPatch, cancel_first: bool
) -> None:
    client = XdsClient(ProxyState(), node_id="ztunnel~node-a", address="127.0.0.1:1")
    sessions: list[Wrapper] = []
    waiting = asyncio.Event()

    async def session() -> None:
        sessions.append(Wrapper())
        with sessions[-1]:
            waiting.set()
            await asyncio.Event().wait()

    monkeypatch.setattr(client, "_session", session)
    run = asyncio.create_task(client.run())
    await asyncio.wait_for(waiting.wait(), 30)
    if cancel_first:
        run.cancel()
        _connection_fails(sessions[0])
    else:
        _connection_fails(sessions[0])
        run.cancel()
    # Before the fix run() logged "xds stream failed" and reconnected for ever.
    done, _ = await asyncio.wait({run}, timeout=30)
    assert run in done, f"run() kept going after its cancel ({len(sessions)} sessions)"
    assert run.cancelled()
    assert len(sessions) == 1
