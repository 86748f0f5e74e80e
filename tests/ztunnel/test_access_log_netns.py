"""Access-log lines for connections that have not ended: a periodic line while a connection
lives (``--access-log-interval``, 5 minutes by default; short here), and one for each connection
still open when a drain starts, before its end is logged. A real ztunnel process, its log read
as JSON lines."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest

from tests.netns.mesh import Mesh
from tests.netns.topology import Topology
from tests.ztunnel.ztunnel_process import ztunnel_process

pytestmark = [pytest.mark.netns, pytest.mark.slow]


@pytest.fixture
def topo() -> Iterator[Topology]:
    with Topology(prefix=f"za{os.getpid()}") as t:
        t.add_node()
        yield t


def lines(logs: list[dict[str, Any]], event: str, src_port: int) -> list[dict[str, Any]]:
    """``event`` lines of the outbound connection from the client's ``src_port``."""
    return [e for e in logs if e.get("event") == event and e.get("src_addr", "").endswith(f":{src_port}")]


async def test_long_lived_and_draining_connections_are_logged(topo: Topology) -> None:
    client = topo.add_pod(1, "client", "shop", "client")
    server = topo.add_pod(1, "server", "shop", "server")
    m = Mesh(topo)
    async with ztunnel_process(m, [client, server], "--access-log-interval", "0.2", "--drain", "30") as zt:
        await m.serve(server, 7200)
        reader, writer = await m.connect(client, server.ip, 7200)
        try:
            port = writer.get_extra_info("sockname")[1]
            writer.write(b"12345")
            await writer.drain()
            async with asyncio.timeout(30):
                assert await reader.readexactly(len(f"peer={client.ip}\n") + 5) == f"peer={client.ip}\n12345".encode()
            # While it lives: "connection open" lines, with the bytes moved so far.
            await zt.wait_log(lambda logs: len(lines(logs, "connection open", port)) >= 2)
            line = lines(zt.logs, "connection open", port)[-1]
            assert (line["result"], line["bytes_sent"], line["direction"]) == ("open", 5, "outbound")
            assert line["duration_ms"] >= 200
            # SIGTERM: the drain starts with a line for the connection still open …
            zt.kill(signal.SIGTERM)
            await zt.wait_log(lambda logs: bool(lines(logs, "connection open at drain", port)))
            assert not lines(zt.logs, "connection complete", port)
            # … and its end, when it comes, is logged as ever.
            writer.write_eof()
            async with asyncio.timeout(30):
                assert await reader.read() == b""  # a clean end
            assert await zt.wait() == 0
            complete = lines(zt.logs, "connection complete", port)
            assert [(e["result"], e["bytes_sent"]) for e in complete] == [("ok", 5)]
        finally:
            writer.close()
