"""Client connection pool for HBONE.

Key = (source identity, destination identity, source IP, destination address), as in
PROTOCOLS.md: a connection is only ever shared by streams that would present the same certificate
to the same peer from the same address. At most 100 concurrent streams ride one connection; the
101st opens another. Concurrent requests for a key that has no usable connection share a single
dial. Connections with no streams are closed after ``idle_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import structlog

from mesh.hbone.client import ClientProtocol
from mesh.hbone.connection import HboneProtocol
from mesh.hbone.stream import Stream, StreamError
from mesh.identity import Identity

log = structlog.get_logger(__name__)

POOL_IDLE_TIMEOUT = 300.0


@dataclass(frozen=True, slots=True)
class PoolKey:
    src_identity: Identity
    dst_identity: Identity
    src_ip: str | None
    dst_addr: tuple[str, int]


Dialer = Callable[[PoolKey], Awaitable[ClientProtocol]]


class HbonePool:
    """Shares HBONE connections between streams; see the module docstring."""

    def __init__(self, dialer: Dialer, idle_timeout: float = POOL_IDLE_TIMEOUT) -> None:
        self._dialer = dialer
        self._idle_timeout = idle_timeout
        self._conns: dict[PoolKey, list[ClientProtocol]] = {}
        self._dialing: dict[PoolKey, asyncio.Future[ClientProtocol]] = {}
        self._idle_timers: dict[HboneProtocol, asyncio.TimerHandle] = {}
        self._closed = False
        self.dials = 0  # connections opened, for tests and metrics

    def connections(self, key: PoolKey | None = None) -> list[ClientProtocol]:
        if key is not None:
            return list(self._conns.get(key, []))
        return [c for conns in self._conns.values() for c in conns]

    async def open_stream(
        self, key: PoolKey, authority: str, headers: Iterable[tuple[str, str]] = ()
    ) -> Stream:
        """A CONNECT stream to ``authority`` over a pooled connection for ``key``."""
        headers = list(headers)
        while True:
            conn = await self._checkout(key)
            try:
                return await conn.open_stream(authority, headers)
            except StreamError:
                # The connection died or went away under us before the stream got going: if it
                # is no longer usable, try a fresh one once more; a real refusal is raised as is.
                if conn.has_capacity:
                    raise
                self._drop(key, conn)
                if self._closed:
                    raise

    async def _checkout(self, key: PoolKey) -> ClientProtocol:
        while True:
            if self._closed:
                raise StreamError("pool is closed")
            for conn in self._conns.get(key, []):
                if conn.has_capacity:
                    self._cancel_idle(conn)
                    return conn
            pending = self._dialing.get(key)
            if pending is None:
                pending = asyncio.get_running_loop().create_future()
                self._dialing[key] = pending
                try:
                    conn = await self._dialer(key)
                except BaseException as e:
                    self._dialing.pop(key, None)
                    if not pending.done():
                        pending.set_exception(e)
                        pending.exception()  # mark retrieved: waiters may be gone
                    raise
                self.dials += 1
                self._dialing.pop(key, None)
                self._add(key, conn)
                pending.set_result(conn)
                if conn.has_capacity:
                    return conn
            else:
                conn = await asyncio.shield(pending)
                if conn.has_capacity:
                    return conn
            # The shared connection filled up before we got a stream on it: loop for another.

    def _add(self, key: PoolKey, conn: ClientProtocol) -> None:
        self._conns.setdefault(key, []).append(conn)
        conn.on_idle = lambda c: self._arm_idle(key, c)
        conn.closed.add_done_callback(lambda _: self._drop(key, conn))

    def _arm_idle(self, key: PoolKey, conn: HboneProtocol) -> None:
        self._cancel_idle(conn)
        loop = asyncio.get_running_loop()
        self._idle_timers[conn] = loop.call_later(self._idle_timeout, self._expire, key, conn)

    def _cancel_idle(self, conn: HboneProtocol) -> None:
        t = self._idle_timers.pop(conn, None)
        if t is not None:
            t.cancel()

    def _expire(self, key: PoolKey, conn: HboneProtocol) -> None:
        self._idle_timers.pop(conn, None)
        if not conn.streams:
            log.debug("closing idle hbone connection", dst=key.dst_addr, peer=str(conn.peer))
            self._drop(key, conn)
            conn.close()

    def _drop(self, key: PoolKey, conn: HboneProtocol) -> None:
        self._cancel_idle(conn)
        conns = self._conns.get(key)
        if conns and conn in conns:
            conns.remove(conn)
            if not conns:
                del self._conns[key]

    async def aclose(self) -> None:
        """Close every pooled connection (GOAWAY; open streams are aborted)."""
        self._closed = True
        for key, conns in list(self._conns.items()):
            for conn in list(conns):
                self._drop(key, conn)
                conn.abort(StreamError("pool closed"))
        for fut in self._dialing.values():
            with contextlib.suppress(asyncio.InvalidStateError):
                fut.cancel()
