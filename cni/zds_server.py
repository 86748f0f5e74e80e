"""The node agent's end of ZDS: it LISTENS on the SOCK_SEQPACKET socket and ztunnel connects.

PROTOCOLS.md "ZDS": ztunnel says ``ZdsHello`` first; the agent then sends the full snapshot (one
``AddWorkload`` with the pod's netns fd per enrolled pod, then ``SnapshotSent``) and afterwards
streams live ``add``/``del``, one request at a time, each answered by an ack before the next.

One ztunnel at a time: a new connection replaces the old one (ztunnel restarted), and the new one
gets the whole snapshot again, because the agent, not ztunnel, holds every pod's netns. While no
ztunnel is connected the agent keeps working; requests are simply not sent (the next snapshot
covers them) and enrolled pods fail closed through their redirection rules.

What to send is asked of a :class:`ZdsPeer` (the agent) at send time, so a pod deleted while
its ``add`` waited in the queue is skipped rather than sent with a closed fd. Wire encoding and
SCM_RIGHTS I/O are :mod:`mesh.zds`'s; this module only moves them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections import deque
from dataclasses import dataclass
from typing import Literal, Protocol

import structlog

from mesh import zds
from mesh.tasks import Supervisor

log = structlog.get_logger(__name__)

Op = Literal["add", "del"]

HELLO_TIMEOUT = 10.0
# ztunnel acks an add only once the pod's listeners (and its certificate) are up.
ACK_TIMEOUT = 30.0
ACCEPT_RETRY = 0.5


class ZdsPeer(Protocol):
    """What the server needs from the agent."""

    def snapshot_uids(self) -> list[str]:
        """UIDs of every pod ztunnel must run now (sent as the snapshot on each connect)."""
        ...

    def add_request(self, uid: str) -> zds.AddWorkload | None:
        """The ``add`` for ``uid`` (its fd stays the agent's), or None if it must not be sent now."""
        ...

    def zds_result(self, uid: str, op: Op, error: str) -> None:
        """ztunnel answered ``op`` for ``uid``; ``error`` is "" on success."""
        ...

    def zds_connected(self, connected: bool) -> None:
        """A ztunnel session began (before its snapshot) or ended."""
        ...


@dataclass(frozen=True, slots=True)
class _Request:
    op: Op
    uid: str


class _Closed(Exception):
    """The ztunnel connection ended."""


class ZdsServer:
    """Accepts ztunnel connections on ``path`` and runs one session at a time."""

    def __init__(
        self,
        path: str,
        peer: ZdsPeer,
        *,
        hello_timeout: float = HELLO_TIMEOUT,
        ack_timeout: float = ACK_TIMEOUT,
    ) -> None:
        self.path = path
        self._peer = peer
        self._hello_timeout = hello_timeout
        self._ack_timeout = ack_timeout
        self._listener: socket.socket | None = None
        self._tasks = Supervisor("zds-server")
        self._session: asyncio.Task[None] | None = None
        self._queue: deque[_Request] = deque()
        self._wake = asyncio.Event()
        self._live = False  # a session is past its snapshot computation: queue requests
        self.connected = asyncio.Event()
        self.snapshots_sent = 0

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # a stale socket from a previous agent
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.bind(self.path)
            os.chmod(self.path, 0o600)
            sock.listen(4)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._listener = sock
        self._tasks.spawn(self._accept_loop(sock), name="zds-accept")
        log.info("zds server listening", path=self.path)

    async def close(self) -> None:
        await self._tasks.aclose()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    async def __aenter__(self) -> ZdsServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- what the agent calls -------------------------------------------------------------------

    def add(self, uid: str) -> None:
        """Queue an ``add`` for ``uid`` (dropped when no ztunnel is connected: the snapshot covers it)."""
        self._enqueue(_Request("add", uid))

    def delete(self, uid: str) -> None:
        self._enqueue(_Request("del", uid))

    def _enqueue(self, req: _Request) -> None:
        if not self._live:
            return
        self._queue.append(req)
        self._wake.set()

    # -- connections ----------------------------------------------------------------------------

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(listener)
            except OSError as e:  # e.g. EMFILE: keep listening, ztunnel retries its connect
                log.error("zds: accept failed", error=str(e))
                await asyncio.sleep(ACCEPT_RETRY)  # a retry timer, not a wait for a condition
                continue
            conn.setblocking(False)
            if self._session is not None and not self._session.done():
                log.info("zds: a new ztunnel connected; replacing the previous session")
                self._session.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._session
            self._session = self._tasks.spawn(self._run_session(conn), name="zds-session")

    async def _run_session(self, sock: socket.socket) -> None:
        inbox: asyncio.Queue[tuple[bytes, list[int]] | None] = asyncio.Queue()
        reader = self._tasks.spawn(self._read(sock, inbox), name="zds-reader")
        try:
            await self._serve(sock, inbox)
        except _Closed:
            log.info("zds: ztunnel disconnected")
        except (OSError, zds.ZdsError, TimeoutError) as e:
            log.warning("zds: session failed", error=str(e) or type(e).__name__)
        finally:
            self._live = False
            self._queue.clear()
            if self.connected.is_set():
                self.connected.clear()
                self._peer.zds_connected(False)
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            sock.close()

    async def _read(self, sock: socket.socket, inbox: asyncio.Queue[tuple[bytes, list[int]] | None]) -> None:
        """Every datagram from ztunnel into ``inbox``; None once it closed. Reading all the time
        (not only when an ack is due) notices a vanished ztunnel while the agent is idle."""
        try:
            while True:
                data, fds = await zds.recv_message(sock)
                if not data and not fds:
                    break
                inbox.put_nowait((data, fds))
        except (OSError, zds.ZdsError) as e:
            log.warning("zds: read failed", error=str(e))
        inbox.put_nowait(None)

    @staticmethod
    async def _next(inbox: asyncio.Queue[tuple[bytes, list[int]] | None], timeout: float) -> bytes:
        async with asyncio.timeout(timeout):
            item = await inbox.get()
        if item is None:
            raise _Closed
        data, fds = item
        for fd in fds:  # ztunnel never sends fds; do not leak any it did
            with contextlib.suppress(OSError):
                os.close(fd)
        return data

    async def _serve(self, sock: socket.socket, inbox: asyncio.Queue[tuple[bytes, list[int]] | None]) -> None:
        zds.decode_hello(await self._next(inbox, self._hello_timeout))
        log.info("zds: ztunnel said hello")
        self.connected.set()
        self._peer.zds_connected(True)
        self._queue.clear()
        uids = self._peer.snapshot_uids()
        self._live = True  # changes from now on are queued and sent after the snapshot
        for uid in uids:
            await self._send(sock, inbox, _Request("add", uid))
        await self._send_raw(sock, inbox, zds.encode_request(zds.SnapshotSent()), None)
        self.snapshots_sent += 1
        log.info("zds: snapshot sent", pods=len(uids))
        while True:
            while self._queue:
                await self._send(sock, inbox, self._queue.popleft())
            self._wake.clear()
            await self._wake.wait()

    async def _send(
        self, sock: socket.socket, inbox: asyncio.Queue[tuple[bytes, list[int]] | None], req: _Request
    ) -> None:
        if req.op == "add":
            add = self._peer.add_request(req.uid)
            if add is None:
                return
            error = await self._send_raw(sock, inbox, zds.encode_request(add), add.netns_fd)
        else:
            error = await self._send_raw(sock, inbox, zds.encode_request(zds.DelWorkload(req.uid)), None)
        if error:
            log.warning("zds: ztunnel refused a request", op=req.op, uid=req.uid, error=error)
        else:
            log.debug("zds: acked", op=req.op, uid=req.uid)
        self._peer.zds_result(req.uid, req.op, error)

    async def _send_raw(
        self,
        sock: socket.socket,
        inbox: asyncio.Queue[tuple[bytes, list[int]] | None],
        data: bytes,
        fd: int | None,
    ) -> str:
        await zds.send_message(sock, data, [fd] if fd is not None else None)
        return zds.decode_ack(await self._next(inbox, self._ack_timeout))
