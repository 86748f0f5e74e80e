"""``NetnsSocketFactory``: sockets are created in the target netns; the loop thread never moves."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator

import pytest

from mesh.netns import MARK_SKIP, SO_MARK, HostSocketFactory, NetnsSocketFactory
from tests.netns.topology import Topology, run

pytestmark = pytest.mark.netns


@pytest.fixture
def netns() -> Iterator[str]:
    with Topology(prefix=f"zf{os.getpid()}") as t:
        n = t.add_node()  # br0 has 10.0.1.1 inside the netns only
        yield t.node_ns(n)


async def test_sockets_live_in_the_target_netns(netns: str) -> None:
    own = os.readlink("/proc/thread-self/ns/net")
    fd = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
    f = NetnsSocketFactory(fd, "test")
    os.close(fd)  # the factory keeps its own copy
    try:
        lst = await f.tcp_listener("10.0.1.1", 0)  # that address exists only in the netns
        up = await f.tcp_socket(socket.AF_INET, mark=MARK_SKIP)
        try:
            assert lst.getsockname()[0] == "10.0.1.1"
            assert up.getsockopt(socket.SOL_SOCKET, SO_MARK) == MARK_SKIP
            # Connect inside the netns, from the event loop thread, which never left its own netns.
            await asyncio.get_running_loop().sock_connect(up, lst.getsockname())
            assert os.readlink("/proc/thread-self/ns/net") == own
        finally:
            lst.close()
            up.close()
    finally:
        f.close()
    with pytest.raises(OSError, match="closed"):
        await f.tcp_socket(socket.AF_INET)
    assert "10.0.1.1" in run("ip", "-n", netns, "-4", "addr")


async def test_host_factory_transparent_listener_needs_no_netns() -> None:
    f = HostSocketFactory()
    lst = await f.tcp_listener("127.0.0.1", 0, transparent=True)
    try:
        assert lst.getsockopt(socket.SOL_IP, 19) == 1
    finally:
        lst.close()
        f.close()
