"""ztunnel killed with ``kill -9``: an app's open connection sees a reset, never a clean end.

The kernel closes a dead process's sockets with a FIN, which the app would take for the end of
the stream (a silently truncated response). ztunnel arms its app-side sockets with SO_LINGER
{on, 0} while they relay, so the kernel sends a RST instead, and disarms them before a graceful
close, so a normal end is still a FIN after every byte. A real ztunnel process (uvloop, as in
production) is killed here; both apps (the client behind outbound, the server behind inbound)
must see the reset.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest
import pytest_asyncio

from tests.netns.mesh import Mesh
from tests.netns.topology import Pod, Topology
from tests.ztunnel.ztunnel_process import ZtunnelProcess, ztunnel_process

pytestmark = [pytest.mark.netns, pytest.mark.slow]

BIG = 8 * 1024 * 1024  # more than the kernel's buffers hold: a RST at close would lose the tail


@pytest.fixture
def topo() -> Iterator[Topology]:
    with Topology(prefix=f"zk{os.getpid()}") as t:
        t.add_node()
        yield t


@dataclass
class Running:
    mesh: Mesh
    zt: ZtunnelProcess
    client: Pod
    server: Pod


@pytest_asyncio.fixture
async def running(topo: Topology) -> AsyncIterator[Running]:
    client = topo.add_pod(1, "client", "shop", "client")
    server = topo.add_pod(1, "server", "shop", "server")
    m = Mesh(topo)
    async with ztunnel_process(m, [client, server]) as zt:
        yield Running(m, zt, client, server)


async def test_kill_9_resets_open_connections_and_normal_ends_stay_clean(running: Running) -> None:
    m, zt, client, server = running.mesh, running.zt, running.client, running.server
    loop = asyncio.get_running_loop()
    server_saw: asyncio.Future[str] = loop.create_future()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = await reader.readline()
        try:
            if first == b"big\n":  # a large answer, then a normal end
                writer.write(b"x" * BIG)
                writer.write_eof()
                await writer.drain()
                await reader.read()
            else:  # hold the connection until it ends: how does it end for the server?
                writer.write(b"hello\n")
                await writer.drain()
                rest = await reader.read()
                if not server_saw.done():
                    server_saw.set_result(f"eof after {len(rest)} bytes")
        except ConnectionResetError:
            if not server_saw.done():
                server_saw.set_result("reset")
        finally:
            writer.close()

    sock = await m.factory(server).tcp_listener("0.0.0.0", 7100)
    srv = await asyncio.start_server(handle, sock=sock)
    writers: list[asyncio.StreamWriter] = []
    try:
        # A normal end is a FIN after every byte: the whole answer arrives, then a clean EOF.
        reader, writer = await m.connect(client, server.ip, 7100)
        writers.append(writer)
        writer.write(b"big\n")
        writer.write_eof()
        async with asyncio.timeout(60):
            got = 0
            while chunk := await reader.read(1 << 20):
                got += len(chunk)
        assert got == BIG

        # A connection open when ztunnel dies: reset on both sides, not a clean end.
        reader, writer = await m.connect(client, server.ip, 7100)
        writers.append(writer)
        writer.write(b"hold\n")
        async with asyncio.timeout(30):
            assert await reader.readline() == b"hello\n"
        zt.kill()
        assert await zt.wait() == -9
        async with asyncio.timeout(30):
            with pytest.raises(ConnectionResetError):
                await reader.read()
            assert await server_saw == "reset"
    finally:
        for w in writers:
            w.close()
        srv.close()
        await srv.wait_closed()
