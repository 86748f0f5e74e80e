"""``NetnsSocketFactory`` makes sockets ahead, a batch per trip to its netns thread: every socket
it hands out is still one of the netns's, of the kind asked for, never handed out twice, and the
spares are bounded and closed with the factory."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from mesh.netns import MARK_SKIP, MARK_TPROXY, SO_MARK, NetnsSocketFactory
from tests.netns.topology import Topology

pytestmark = pytest.mark.netns

SPARE = 4


@pytest.fixture
def factory() -> Iterator[NetnsSocketFactory]:
    with Topology(prefix=f"zs{os.getpid()}") as t:
        n = t.add_node()  # 10.0.1.1 exists inside the netns only
        fd = os.open(f"/var/run/netns/{t.node_ns(n)}", os.O_RDONLY)
        f = NetnsSocketFactory(fd, "spares", spare=SPARE)
        os.close(fd)
        try:
            yield f
        finally:
            f.close()


def count_trips(f: NetnsSocketFactory, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    trips = [0]
    run = f._run

    async def counted(fn: Any) -> Any:
        trips[0] += 1
        return await run(fn)

    monkeypatch.setattr(f, "_run", counted)
    return trips


async def test_a_batch_per_trip_each_socket_in_the_netns(
    factory: NetnsSocketFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    trips = count_trips(factory, monkeypatch)
    lst = await factory.tcp_listener("10.0.1.1", 0)
    loop = asyncio.get_running_loop()
    socks: list[socket.socket] = []
    try:
        for i in range(2 * SPARE + 1):
            s = await factory.tcp_socket(socket.AF_INET, mark=MARK_SKIP)
            socks.append(s)
            assert s.getsockopt(socket.SOL_SOCKET, SO_MARK) == MARK_SKIP
            assert not s.getblocking()
            # 10.0.1.1 is reachable only from inside the netns: the socket was made there.
            await loop.sock_connect(s, lst.getsockname())
            assert factory.spare_count() == SPARE - 1 - i % SPARE
        # the listener's trip, then one per batch of SPARE
        assert trips[0] == 1 + 3
        assert len({s.fileno() for s in socks}) == len(socks)
    finally:
        for s in socks:
            s.close()
        lst.close()


async def test_kinds_are_kept_apart_and_spares_bounded_under_concurrency(
    factory: NetnsSocketFactory,
) -> None:
    plain, tproxy = await asyncio.gather(
        asyncio.gather(*(factory.tcp_socket(socket.AF_INET, mark=MARK_SKIP) for _ in range(10))),
        asyncio.gather(
            *(factory.tcp_socket(socket.AF_INET, mark=MARK_TPROXY, transparent=True) for _ in range(10))
        ),
    )
    try:
        assert len({s.fileno() for s in (*plain, *tproxy)}) == 20
        assert all(s.getsockopt(socket.SOL_SOCKET, SO_MARK) == MARK_SKIP for s in plain)
        assert all(s.getsockopt(socket.SOL_SOCKET, SO_MARK) == MARK_TPROXY for s in tproxy)
        assert all(s.getsockopt(socket.SOL_IP, 19) == 1 for s in tproxy)  # IP_TRANSPARENT
        assert factory.spare_count() <= 2 * (SPARE - 1)
        v6 = await factory.tcp_socket(socket.AF_INET6, mark=MARK_SKIP)
        assert v6.family == socket.AF_INET6
        v6.close()
    finally:
        for s in (*plain, *tproxy):
            s.close()


async def test_close_closes_the_spares(factory: NetnsSocketFactory) -> None:
    s = await factory.tcp_socket(socket.AF_INET)
    spares = [x for xs in factory._spare.values() for x in xs]
    assert len(spares) == SPARE - 1 and all(x.fileno() >= 0 for x in spares)
    factory.close()
    assert all(x.fileno() == -1 for x in spares)
    assert s.fileno() >= 0  # what was handed out is the caller's
    s.close()
    with pytest.raises(OSError, match="closed"):
        await factory.tcp_socket(socket.AF_INET)


def test_spare_must_be_positive() -> None:
    with pytest.raises(ValueError, match="spare"):
        NetnsSocketFactory(0, spare=0)
