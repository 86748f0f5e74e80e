"""Certificates for this node's workloads, fetched as soon as discovery lists them.

As Istio's ztunnel does. The agent hands ztunnel its pods one at a time, and acks an add only
once the pod's certificate is in: without this a restarted ztunnel facing a slow or returning
CA waited for each pod's certificate in turn (10 s per pod when the CA was away). With it, every
identity of an HBONE workload that discovery places on this node is tracked by the certificate
manager at once, so the fetches run concurrently (at most ``MAX_CONCURRENT_FETCHES`` at a time)
while discovery and the agent are still talking, and an add finds its certificate there or on
its way. The reference held on an identity ends when discovery no longer lists a workload of
that identity on this node (pods hold their own while they run).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from mesh.identity import Identity
from mesh.model import TunnelProtocol
from ztunnel.state import NodeContext


class CertPrefetch:
    def __init__(self, node: NodeContext) -> None:
        self._node = node
        self._held: set[Identity] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending = False
        self._unsubscribe: Callable[[], None] | None = None

    @property
    def identities(self) -> frozenset[Identity]:
        return frozenset(self._held)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._unsubscribe = self._node.state.subscribe(self._changed)
        self.sync()

    def _changed(self, _version: int) -> None:
        # Called by the state's writer: one sync per batch of changes, on the loop.
        loop = self._loop
        if loop is None or self._pending or loop.is_closed():
            return
        self._pending = True
        loop.call_soon_threadsafe(self.sync)

    def sync(self) -> None:
        """Track the identities discovery places on this node now, release the others."""
        self._pending = False
        if self._loop is None:
            return  # closed
        node = self._node
        want = {
            Identity(node.trust_domain, w.namespace, w.service_account)
            for w in node.snapshot().workloads.values()
            if w.node == node.node and w.tunnel_protocol is TunnelProtocol.HBONE
        }
        for identity in want - self._held:
            node.certs.track(identity)
        for identity in self._held - want:
            node.certs.untrack(identity)
        self._held = want

    def close(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        for identity in self._held:
            self._node.certs.untrack(identity)
        self._held = set()
        self._loop = None
