"""gRPC through serve_http2: a real grpcio client → the engine on loopback → a real grpcio server.

Generic handlers with bytes in and out: no protos needed.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import pytest

from tests.waypoint.conftest import TIMEOUT, App, Listener, listening, refused_port
from waypoint.bytestream import TcpByteStream
from waypoint.http2 import serve_http2
from waypoint.request import GRPC_PERMISSION_DENIED, RBAC_DENIED, Forward, RequestHead, Verdict, deny


async def unary(request: bytes, context: Any) -> bytes:
    return b"echo:" + request


async def server_stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
    for i in range(int(request)):
        yield f"msg {i}".encode()


async def fails(request: bytes, context: Any) -> bytes:
    await context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
    raise AssertionError("unreachable")


@pytest.fixture
async def grpc_port() -> AsyncIterator[int]:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "test.Echo",
                {
                    "Unary": grpc.unary_unary_rpc_method_handler(unary),
                    "Secret": grpc.unary_unary_rpc_method_handler(unary),
                    "Stream": grpc.unary_stream_rpc_method_handler(server_stream),
                    "Fails": grpc.unary_unary_rpc_method_handler(fails),
                },
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield port
    finally:
        await server.stop(None)


def policy(head: RequestHead) -> Verdict:
    return deny() if head.path == "/test.Echo/Secret" else Forward(upstream_key="grpc-backend")


@contextlib.asynccontextmanager
async def proxied_channel(app: App) -> AsyncIterator[grpc.aio.Channel]:
    async def serve(s: TcpByteStream) -> None:
        await serve_http2(s, on_request=app.on_request, open_upstream=app.open_upstream, on_done=app.on_done)

    proxy: Listener
    async with listening(serve) as proxy:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{proxy.port}")
        try:
            yield channel
        finally:
            await channel.close()


async def test_unary_ok(grpc_port: int) -> None:
    app = App(grpc_port, decide=policy)
    async with proxied_channel(app) as ch:
        call = ch.unary_unary("/test.Echo/Unary")
        assert await call(b"hello", timeout=TIMEOUT) == b"echo:hello"
        assert await call(b"again", timeout=TIMEOUT) == b"echo:again"
        records = await app.wait_records(2)
    assert app.heads[0].protocol == "grpc"
    assert app.heads[0].path == "/test.Echo/Unary"
    assert [r.grpc_status for r in records] == [0, 0]
    assert app.opens == 1  # both calls on one upstream connection


async def test_server_streaming(grpc_port: int) -> None:
    app = App(grpc_port, decide=policy)
    async with proxied_channel(app) as ch:
        call = ch.unary_stream("/test.Echo/Stream")
        got = [m async for m in call(b"50", timeout=TIMEOUT)]
        records = await app.wait_records(1)
    assert got == [f"msg {i}".encode() for i in range(50)]
    assert records[0].grpc_status == 0


async def test_denied_is_permission_denied(grpc_port: int) -> None:
    app = App(grpc_port, decide=policy)
    async with proxied_channel(app) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await ch.unary_unary("/test.Echo/Secret")(b"x", timeout=TIMEOUT)
        assert await ch.unary_unary("/test.Echo/Unary")(b"ok", timeout=TIMEOUT) == b"echo:ok"
        records = await app.wait_records(2)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert e.value.details() == RBAC_DENIED
    assert records[0].local and records[0].grpc_status == GRPC_PERMISSION_DENIED


async def test_upstream_status_passes_through(grpc_port: int) -> None:
    app = App(grpc_port, decide=policy)
    async with proxied_channel(app) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await ch.unary_unary("/test.Echo/Fails")(b"x", timeout=TIMEOUT)
        records = await app.wait_records(1)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert e.value.details() == "no such thing"
    assert records[0].grpc_status == grpc.StatusCode.NOT_FOUND.value[0]


async def test_upstream_gone_is_unavailable() -> None:
    app = App(refused_port(), decide=policy)
    async with proxied_channel(app) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await ch.unary_unary("/test.Echo/Unary")(b"x", timeout=TIMEOUT)
        records = await app.wait_records(1)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert records[0].upstream_failure is not None


def test_local_reply_grpc_mapping() -> None:
    from waypoint.request import GRPC_UNAVAILABLE, Respond, grpc_message_encode

    assert deny().grpc_code() == GRPC_PERMISSION_DENIED and deny().grpc_text() == RBAC_DENIED
    assert Respond(503, b"upstream gone").grpc_code() == GRPC_UNAVAILABLE
    assert Respond(503, b"upstream gone").grpc_text() == "upstream gone"
    assert Respond(418).grpc_code() == 2  # UNKNOWN
    assert grpc_message_encode("50% off\n") == "50%25 off%0A"
