"""SIGTERM: stop accepting, let open connections finish (up to the deadline), return 0."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator

import prometheus_client
import pytest
import structlog

from mesh import runtime
from tests.netns.mesh import Mesh
from tests.netns.topology import Topology
from ztunnel.app import serve_until_stopped

pytestmark = [pytest.mark.netns, pytest.mark.slow]


@pytest.fixture
def topo() -> Iterator[Topology]:
    with Topology(prefix=f"zd{os.getpid()}") as t:
        t.add_node()
        yield t


async def test_sigterm_drains_open_connections(topo: Topology) -> None:
    client = topo.add_pod(1, "client", "shop", "client")
    server = topo.add_pod(1, "server", "shop", "server")
    m = Mesh(topo)
    loop = asyncio.get_running_loop()
    serving: asyncio.Task[int] | None = None
    try:
        await m.start(drain_seconds=10)
        await m.serve(server, 7000)
        reader, writer = await m.connect(client, server.ip, 7000)
        try:
            writer.write(b"one ")
            await writer.drain()
            assert await reader.readline() == f"peer={client.ip}\n".encode()

            stop = runtime.stop_on_signals(signal.SIGTERM)
            try:
                zt = m.nodes[0].zt
                serving = asyncio.create_task(serve_until_stopped(zt, stop))
                os.kill(os.getpid(), signal.SIGTERM)
                async with asyncio.timeout(5):
                    await zt.draining.wait()
                # Draining: new connections are refused (nothing listens on 15001 any more) …
                with pytest.raises(OSError):
                    await m.exchange(client, server.ip, 7000, b"late", timeout=2)
                # … while the open one finishes its work.
                writer.write(b"two")
                writer.write_eof()
                async with asyncio.timeout(5):
                    assert await reader.read() == b"one two"
                async with asyncio.timeout(10):
                    assert await serving == 0
            finally:
                loop.remove_signal_handler(signal.SIGTERM)
        finally:
            writer.close()
    finally:
        if serving is not None and not serving.done():
            serving.cancel()
            await asyncio.wait({serving})
        await m.aclose()


def totals(text: str) -> tuple[float, float]:
    """(opened, closed) connection counts over every label set in a Prometheus page."""
    opened = closed = 0.0
    for line in text.splitlines():
        if line.startswith("istio_tcp_connections_opened_total{"):
            opened += float(line.rsplit(" ", 1)[1])
        elif line.startswith("istio_tcp_connections_closed_total{"):
            closed += float(line.rsplit(" ", 1)[1])
    return opened, closed


async def test_connections_cancelled_mid_relay_are_closed_in_the_metrics(topo: Topology) -> None:
    """A drain deadline of 0 cancels relays in the middle: each is still counted closed, once,
    and its access-log line says it was drained."""
    client = topo.add_pod(1, "client", "shop", "client")
    server = topo.add_pod(1, "server", "shop", "server")
    m = Mesh(topo)
    closed = False
    try:
        await m.start(drain_seconds=0)
        await m.serve(server, 7001)
        streams = [await m.connect(client, server.ip, 7001) for _ in range(3)]
        for reader, writer in streams:
            writer.write(b"x")
            await writer.drain()
            assert await reader.readline() == f"peer={client.ip}\n".encode()
        node = m.nodes[0]
        metrics = prometheus_client.generate_latest(node.zt.metrics.registry).decode()
        assert totals(metrics) == (6.0, 0.0)  # outbound + inbound per connection, all open
        with structlog.testing.capture_logs() as logs:
            closed = True
            await m.aclose()  # every ztunnel shuts down with a drain deadline of 0
        metrics = prometheus_client.generate_latest(node.zt.metrics.registry).decode()
        assert totals(metrics) == (6.0, 6.0)
        complete = [(e["direction"], e["result"], e["reason"]) for e in logs if e["event"] == "connection complete"]
        # Each relay ends by the deadline's cancellation ("drained") or, first, by its HBONE
        # stream being reset by the shutdown (an error naming why): never as a normal close,
        # and each is logged exactly once.
        assert sorted(d for d, _, _ in complete) == ["inbound"] * 3 + ["outbound"] * 3, complete
        assert all(r in ("drained", "error") for _, r, _ in complete), complete
        assert any(r == "drained" for _, r, _ in complete), complete
        for _, writer in streams:
            writer.close()
    finally:
        if not closed:
            await m.aclose()
