"""A fake cni node agent: listens on the ZDS socket and hands pods' netns fds to ztunnel."""

from __future__ import annotations

import asyncio
import os
import socket

from mesh import zds
from tests.netns.topology import Pod


class FakeAgent:
    """Accepts one ztunnel at a time; each request waits for ztunnel's ack, as the real agent."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.bind(path)
        self.sock.listen(4)
        self.sock.setblocking(False)
        self.conn: socket.socket | None = None

    async def accept(self, timeout: float = 10.0) -> None:
        """Wait for ztunnel to connect and say hello."""
        async with asyncio.timeout(timeout):
            conn, _ = await asyncio.get_running_loop().sock_accept(self.sock)
            conn.setblocking(False)
            data, fds = await zds.recv_message(conn)
        assert not fds
        zds.decode_hello(data)
        if self.conn is not None:
            self.conn.close()
        self.conn = conn

    async def request(self, req: zds.ZdsRequest, fds: list[int] | None = None, timeout: float = 15.0) -> str:
        assert self.conn is not None
        async with asyncio.timeout(timeout):
            await zds.send_message(self.conn, zds.encode_request(req), fds)
            data, _ = await zds.recv_message(self.conn)
        return zds.decode_ack(data)

    async def raw(self, data: bytes, timeout: float = 5.0) -> str:
        """Send arbitrary bytes (malformed-message tests) and return the ack's error."""
        assert self.conn is not None
        async with asyncio.timeout(timeout):
            await zds.send_message(self.conn, data)
            reply, _ = await zds.recv_message(self.conn)
        return zds.decode_ack(reply)

    async def add(self, pod: Pod) -> str:
        fd = os.open(pod.netns_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return await self.request(
                zds.AddWorkload(pod.uid, pod.name, pod.namespace, pod.service_account, fd), [fd]
            )
        finally:
            os.close(fd)

    async def delete(self, pod: Pod) -> str:
        return await self.request(zds.DelWorkload(pod.uid))

    async def snapshot_sent(self) -> str:
        return await self.request(zds.SnapshotSent())

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        self.sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
