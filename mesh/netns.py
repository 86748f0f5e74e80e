"""Sockets in the right network namespace: the ``SocketFactory`` seam.

In in-pod mode ztunnel listens and dials *inside* each enrolled pod's network namespace. A socket
belongs to the namespace of the thread that created it and keeps it for its whole life, so only
``socket()`` itself has to run in the pod netns. :class:`NetnsSocketFactory` does that on one
dedicated helper thread that called ``setns(2)`` once and never leaves; the event loop thread
never changes namespace. :class:`HostSocketFactory` makes plain sockets (tests on loopback).

A trip to the helper thread costs a thread wake-up and two hand-overs of the GIL, which
profiles put at ≈ 20 % of ztunnel's CPU per new connection (docs/benchmarks.md, run E). So
unconnected sockets are made ahead, in batches of :data:`SPARE_SOCKETS` per kind (family,
mark, transparent): one trip per batch, and a connection takes a ready socket on the loop
thread. A spare socket is only an fd (no port, no address until it connects); at most
``SPARE_SOCKETS - 1`` wait per kind a pod uses, and they are closed with the factory.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, TypeVar

# Linux socket options the stdlib does not name (values from <linux/in.h>, <linux/netfilter_ipv4.h>).
IP_TRANSPARENT = 19
SO_ORIGINAL_DST = 80
SO_MARK = getattr(socket, "SO_MARK", 36)

# Marks shared with the redirection rules (PROTOCOLS.md "Redirection inside the pod netns"):
# the one definition, cni.rules matches on these.
MARK_MASK = 0xFFF  # the bits of the mark the rules compare
MARK_SKIP = 0x539  # ztunnel's own upstream sockets: never redirected
MARK_TPROXY = 0x111  # transparent sockets carrying a client's source IP to the app

CLONE_NEWNET = 0x40000000

SPARE_SOCKETS = 4  # sockets made per trip to a netns helper thread (one used, the rest kept)

_T = TypeVar("_T")
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def setns(fd: int, nstype: int = CLONE_NEWNET) -> None:
    """``setns(2)`` for the calling thread (``os.setns`` only exists from Python 3.12)."""
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def family_of(addr: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def _make_listener(addr: str, port: int, transparent: bool, backlog: int) -> socket.socket:
    sock = socket.socket(family_of(addr), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if transparent:
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        sock.bind((addr, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _make_socket(family: socket.AddressFamily, mark: int | None, transparent: bool) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if mark is not None:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        if transparent:
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _make_batch(
    n: int, family: socket.AddressFamily, mark: int | None, transparent: bool
) -> list[socket.socket]:
    """``n`` sockets of one kind, or an error with none left open (at least one is made)."""
    socks = [_make_socket(family, mark, transparent)]
    try:
        socks.extend(_make_socket(family, mark, transparent) for _ in range(n - 1))
    except OSError:
        pass  # short of fds: the first one is enough for now
    return socks


def original_dst(sock: socket.socket) -> tuple[str, int]:
    """Where a redirected IPv4 connection was going (``SO_ORIGINAL_DST``, a ``sockaddr_in``)."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port = int.from_bytes(raw[2:4], "big")
    return socket.inet_ntoa(raw[4:8]), port


class SocketFactory(Protocol):
    """Creates the sockets a proxy needs; where they live (which netns) is the factory's business."""

    async def tcp_listener(
        self, addr: str, port: int, *, transparent: bool = False, backlog: int = 1024
    ) -> socket.socket:
        """A bound, listening, non-blocking TCP socket."""
        ...

    async def tcp_socket(
        self, family: socket.AddressFamily, *, mark: int | None = None, transparent: bool = False
    ) -> socket.socket:
        """An unconnected non-blocking TCP socket, optionally with SO_MARK / IP_TRANSPARENT."""
        ...

    def close(self) -> None:
        """Release what the factory holds (threads, namespace fds)."""
        ...


class HostSocketFactory:
    """Plain sockets in the caller's own namespace."""

    async def tcp_listener(
        self, addr: str, port: int, *, transparent: bool = False, backlog: int = 1024
    ) -> socket.socket:
        return _make_listener(addr, port, transparent, backlog)

    async def tcp_socket(
        self, family: socket.AddressFamily, *, mark: int | None = None, transparent: bool = False
    ) -> socket.socket:
        return _make_socket(family, mark, transparent)

    def close(self) -> None:
        pass


class NetnsSocketFactory:
    """Sockets created inside the network namespace ``netns_fd`` refers to.

    The factory keeps its own duplicate of the fd (the caller may close theirs), one helper
    thread that entered the namespace in its initializer, and up to ``spare - 1`` sockets of each
    kind made ahead (the module docstring says why). Call it from one event loop thread.
    """

    def __init__(self, netns_fd: int, name: str = "netns", *, spare: int = SPARE_SOCKETS) -> None:
        if spare < 1:
            raise ValueError("spare must be at least 1")
        self._fd = os.dup(netns_fd)
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"netns-{name}", initializer=self._enter
        )
        self._closed = False
        self._batch = spare
        self._spare: dict[tuple[socket.AddressFamily, int | None, bool], list[socket.socket]] = {}

    def _enter(self) -> None:
        setns(self._fd)

    @property
    def fd(self) -> int:
        return self._fd

    async def _run(self, fn: Callable[[], _T]) -> _T:
        if self._closed:
            raise OSError("socket factory is closed")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def run_sync(self, fn: Callable[[], _T]) -> _T:
        """Run ``fn`` on the helper thread and wait (for code outside an event loop)."""
        return self._executor.submit(fn).result()

    async def tcp_listener(
        self, addr: str, port: int, *, transparent: bool = False, backlog: int = 1024
    ) -> socket.socket:
        return await self._run(lambda: _make_listener(addr, port, transparent, backlog))

    async def tcp_socket(
        self, family: socket.AddressFamily, *, mark: int | None = None, transparent: bool = False
    ) -> socket.socket:
        key = (family, mark, transparent)
        ready = self._spare.get(key)
        if ready:
            return ready.pop()
        batch = await self._run(lambda: _make_batch(self._batch, family, mark, transparent))
        if self._closed:  # closed while the batch was being made
            for made in batch:
                made.close()
            raise OSError("socket factory is closed")
        sock, rest = batch[0], batch[1:]
        kept = self._spare.setdefault(key, [])
        room = max(0, self._batch - 1 - len(kept))  # two batches made at once: keep one's worth
        kept.extend(rest[:room])
        for extra in rest[room:]:
            extra.close()
        return sock

    def spare_count(self) -> int:
        """Sockets made ahead and not yet handed out (tests, debugging)."""
        return sum(len(v) for v in self._spare.values())

    def _close_spares(self) -> None:
        spares, self._spare = self._spare, {}
        for socks in spares.values():
            for sock in socks:
                sock.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._close_spares()
        self._executor.shutdown(wait=True)
        os.close(self._fd)
