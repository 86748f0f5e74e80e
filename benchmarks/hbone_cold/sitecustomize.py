"""Benchmark-only switch for *cold* HBONE connections in the ztunnels of configuration 5.

``benchmarks/datapath.py`` puts this directory on ``PYTHONPATH`` and sets
``BENCH_HBONE_COLD_FILE`` while it builds the local mesh, so that Python imports this module at
start-up in every mesh process; it acts only in ztunnels (an argv naming ``ztunnel.main``) and only while
that file exists. Then the client side's HBONE pool never reuses a connection (every new TCP
connection dials its own HBONE connection, closed as soon as its one stream ends); if the file
says ``full``, no TLS session is offered for resumption either: every connection pays a full
TLS 1.3 handshake. Without the file the ztunnel behaves exactly as in production (one
``stat`` per new stream is the whole cost). Nothing outside this benchmark uses it.
"""

from __future__ import annotations

import os
import sys
from typing import Any


def _install(flag: str) -> None:
    from mesh import tls
    from mesh.hbone import pool

    checkout, arm_idle, offer = pool.HbonePool._checkout, pool.HbonePool._arm_idle, tls.ClientContext.offer

    def cold() -> bool:
        return os.path.exists(flag)

    async def cold_checkout(self: Any, key: Any) -> Any:
        if not cold():
            return await checkout(self, key)
        conn = await self._dialer(key)
        self.dials += 1
        self._add(key, conn)
        return conn

    def cold_arm_idle(self: Any, key: Any, conn: Any) -> None:
        saved = self._idle_timeout
        if cold():
            self._idle_timeout = 0.0  # closed on the next loop turn once its stream is gone
        try:
            arm_idle(self, key, conn)
        finally:
            self._idle_timeout = saved

    def full() -> bool:
        try:
            with open(flag) as f:
                return f.read().strip() == "full"
        except FileNotFoundError:
            return False

    def cold_offer(self: Any, key: object) -> str | None:
        return None if full() else offer(self, key)

    pool.HbonePool._checkout = cold_checkout  # type: ignore[method-assign]
    pool.HbonePool._arm_idle = cold_arm_idle  # type: ignore[method-assign]
    tls.ClientContext.offer = cold_offer  # type: ignore[method-assign]


def _install_trim() -> None:
    """``benchmarks/ztunnel_memory.py --probe-trim``: SIGUSR2 calls ``malloc_trim(0)``, to measure
    what a trim would give back after a burst (no ztunnel code path calls it there)."""
    import ctypes
    import signal

    trim = ctypes.CDLL(None).malloc_trim
    signal.signal(signal.SIGUSR2, lambda signum, frame: trim(0))


if any("ztunnel.main" in arg for arg in getattr(sys, "orig_argv", [])):
    _flag = os.environ.get("BENCH_HBONE_COLD_FILE")
    if _flag:
        _install(_flag)
    if os.environ.get("BENCH_ZTUNNEL_TRIM_ON_SIGUSR2"):
        _install_trim()
