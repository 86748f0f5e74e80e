"""Open inbound connections, re-checked whenever the authorizations may have changed.

As Istio's ztunnel (``proxy/connection_manager.rs``): an allowed connection is registered with
the facts it was authorized on; every change of the discovery state re-runs the same decision
(:func:`ztunnel.authorize.authorize`) for each registered connection, and one that is no longer
allowed is closed at once, its access-log line naming the policy that closed it. A re-check
runs once per batch of changes, on the event loop, right after the state changed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import structlog

from mesh.authz import Connection
from mesh.xds.state import ProxyState
from ztunnel.authorize import Hop, authorize, authorize_hop
from ztunnel.metrics import ConnectionRecord

log = structlog.get_logger(__name__)


@dataclass(eq=False, slots=True)
class Tracked:
    """One open inbound connection: where it goes, what it was allowed on, how to end it."""

    workload_uid: str
    conn: Connection
    rec: ConnectionRecord
    close: Callable[[], object]
    hop: Hop | None = None  # what the inbound hop presented (None: plaintext)
    closed: bool = field(default=False)


class ConnectionManager:
    def __init__(self, state: ProxyState) -> None:
        self._state = state
        self._live: set[Tracked] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending = False
        self._unsubscribe = state.subscribe(self._changed)
        self.closed_by_policy = 0  # lifetime count (tests, metrics)

    def __len__(self) -> int:
        return len(self._live)

    @contextmanager
    def track(
        self,
        workload_uid: str,
        conn: Connection,
        rec: ConnectionRecord,
        close: Callable[[], object],
        hop: Hop | None = None,
    ) -> Iterator[Tracked]:
        """Keep the connection under re-check while the block runs."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        t = Tracked(workload_uid, conn, rec, close, hop)
        self._live.add(t)
        try:
            yield t
        finally:
            self._live.discard(t)

    def _changed(self, _version: int) -> None:
        # Called by the state's writer (the discovery client, on the loop; possibly another
        # thread in tests): schedule one re-check for however many changes arrive meanwhile.
        loop = self._loop
        if loop is None or self._pending or loop.is_closed():
            return
        self._pending = True
        loop.call_soon_threadsafe(self.recheck)

    def recheck(self) -> int:
        """Re-decide every open connection on the current state; returns how many were closed."""
        self._pending = False
        snapshot = self._state.snapshot()
        closed = 0
        for t in list(self._live):
            if t.closed:
                continue
            dst = snapshot.workloads.get(t.workload_uid)
            if dst is None:
                continue  # the pod is being removed: ZDS drains it, with its own deadline
            decision = (
                authorize_hop(snapshot, dst, t.hop, t.conn)
                if t.hop is not None
                else authorize(snapshot, dst, t.conn)
            )
            if decision.allow:
                continue
            t.closed = True
            closed += 1
            t.rec.fail(f"closed by policy: {decision.reason}", "DENY")
            log.info(
                "connection closed by policy",
                src=t.rec.src_addr,
                dst=t.rec.dst_addr,
                policy=decision.policy,
                rule=decision.rule,
                reason=decision.reason,
            )
            t.close()
        self.closed_by_policy += closed
        return closed

    def close(self) -> None:
        self._unsubscribe()
