"""ztunnel keeps nothing per proxied connection once it is over (issue 24), in real namespaces.

The soak (benchmarks/soak.py) saw ztunnel's RSS grow ≈ 180 bytes per connection, for good: the
pooled HBONE connections' h2 state recorded every closed CONNECT stream (2**16 of them per
connection). Here a client pod opens thousands of short connections to a server on its own node
and one on the other node — each an outbound connection of ztunnel 1 carried as a stream on a
pooled HBONE connection, and an inbound one of ztunnel 1 or 2 — and ``tracemalloc`` measures
what the ztunnels (everything allocated outside this test's own code) still hold after a batch,
compared with after a warm-up. No timing is asserted.
"""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from tests.netns.mesh import Mesh, echo_keeping_nothing
from tests.netns.topology import Topology

pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

PORT = 7007
WARMUP = 500
BATCH = 2500
LIMIT_PER_CONNECTION = 60  # bytes; ≈ 280 with h2 recording every closed stream, ≈ 4 without


class Pods:
    def __init__(self, topo: Topology) -> None:
        topo.add_node()
        topo.add_node()
        topo.connect_nodes()
        self.cli = topo.add_pod(1, "cli", "soak", "cli", {"app": "cli"})
        self.servers = [
            topo.add_pod(1, "srv-a", "soak", "srv", {"app": "srv"}),
            topo.add_pod(2, "srv-b", "soak", "srv", {"app": "srv"}),
        ]


@pytest.fixture(scope="module")
def topo() -> Iterator[tuple[Topology, Pods]]:
    with Topology() as t:
        yield t, Pods(t)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh(topo: tuple[Topology, Pods]) -> AsyncIterator[tuple[Mesh, Pods]]:
    t, pods = topo
    m = Mesh(t)
    servers: list[asyncio.Server] = []
    try:
        await m.start()
        for srv in pods.servers:
            sock = await m.factory(srv).tcp_listener("0.0.0.0", PORT)
            servers.append(await asyncio.start_server(echo_keeping_nothing, sock=sock))
        await m.converged()
        yield m, pods
    finally:
        for s in servers:
            s.close()
        await m.aclose()


def _held(snapshot: tracemalloc.Snapshot) -> tracemalloc.Snapshot:
    """What ztunnel (and the libraries under it) allocated: not this test's own code."""
    return snapshot.filter_traces(
        [tracemalloc.Filter(False, "*/tests/*"), tracemalloc.Filter(False, tracemalloc.__file__)]
    )


async def _all_closed(m: Mesh, connections: int) -> None:
    """Every one of ``connections`` (alternating, srv-a first) closed at both ends: node 1 has
    all the outbound ends and srv-a's inbound ones, node 2 srv-b's inbound ones."""
    async with asyncio.timeout(60):
        await m.nodes[0].zt.metrics.wait_closed(connections + (connections + 1) // 2)
        await m.nodes[1].zt.metrics.wait_closed(connections // 2)


async def test_ztunnel_memory_does_not_grow_with_connections(mesh: tuple[Mesh, Pods]) -> None:
    m, pods = mesh
    # Traced from before the warm-up, so that what the batch replaces in bounded structures
    # (caches, the last reset streams) counts as freed as well as allocated.
    tracemalloc.start(1)
    try:
        assert await m.exchange_many(pods.cli, pods.servers, PORT, WARMUP) == 0
        await _all_closed(m, WARMUP)
        gc.collect()
        before = _held(tracemalloc.take_snapshot())
        assert await m.exchange_many(pods.cli, pods.servers, PORT, BATCH) == 0
        await _all_closed(m, WARMUP + BATCH)
        gc.collect()
        after = _held(tracemalloc.take_snapshot())
    finally:
        tracemalloc.stop()
    diff = after.compare_to(before, "lineno")
    grown = sum(d.size_diff for d in diff)
    top = "\n".join(str(d) for d in diff[:8])
    assert grown < LIMIT_PER_CONNECTION * BATCH, f"{grown} bytes held after {BATCH} connections:\n{top}"
