"""SIGTERM: stop accepting, let open connections finish (up to the deadline), return 0."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator

import pytest

from mesh import runtime
from tests.netns.mesh import Mesh
from tests.netns.topology import Topology
from ztunnel.app import serve_until_stopped

pytestmark = [pytest.mark.netns, pytest.mark.slow]


@pytest.fixture
def topo() -> Iterator[Topology]:
    t = Topology(prefix=f"zd{os.getpid()}")
    try:
        t.add_node()
        yield t
    finally:
        assert not t.destroy()


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
