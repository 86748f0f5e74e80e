"""The production path for a proxy's state in tests: control-plane store -> discovery -> XdsClient.

A test writes Kubernetes-shaped objects to the control plane's :class:`~mesh.model.Store` (what
a source does); the real discovery server serves them on loopback, and each node's real
``XdsClient`` writes what it receives to that node's :class:`~mesh.xds.state.ProxyState`. No
test writes a proxy's state itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from controlplane.jwks import JwksCache
from controlplane.xds import DiscoveryServicer, register
from mesh.model import Store
from mesh.xds.client import Backoff, XdsClient, insecure_channel_factory
from mesh.xds.convert import TYPE_URLS
from mesh.xds.state import ProxySnapshot, ProxyState


@dataclass
class Subscriber:
    """One node's discovery client and the state it writes."""

    name: str
    state: ProxyState
    client: XdsClient
    task: asyncio.Task[None]

    async def until(self, predicate: Callable[[ProxySnapshot], bool], timeout: float = 30.0) -> ProxySnapshot:
        """Wait until discovery has brought a state that satisfies ``predicate``."""
        changed = asyncio.Event()
        unsubscribe = self.state.subscribe(lambda _: changed.set())
        try:
            async with asyncio.timeout(timeout):
                while not predicate(snap := self.state.snapshot()):
                    await changed.wait()
                    changed.clear()
                return snap
        finally:
            unsubscribe()


class Discovery:
    def __init__(self, store: Store | None = None) -> None:
        self.store = store if store is not None else Store()  # the control plane's
        self.jwks: JwksCache | None = None  # set before start: jwksUri keys fetched and shipped
        self.address = ""
        self.subscribers: list[Subscriber] = []  # node proxies
        self.waypoints: list[Subscriber] = []
        self._grpc: grpc.aio.Server | None = None
        self._servicer: DiscoveryServicer | None = None

    async def start(self) -> None:
        self._grpc = grpc.aio.server()
        if self.jwks is not None:
            self.jwks.start()
        self._servicer = register(self._grpc, self.store, jwks=self.jwks)
        port = self._grpc.add_insecure_port("127.0.0.1:0")
        await self._grpc.start()
        self.address = f"127.0.0.1:{port}"

    async def subscribe(
        self, node: str, timeout: float = 30.0, types: tuple[str, ...] = TYPE_URLS
    ) -> Subscriber:
        """A node's state (or a waypoint's, with its ``types``), fed over gRPC; returns once the
        first full state is in."""
        state = ProxyState()
        client = XdsClient(
            state,
            node_id=f"ztunnel~{node}" if types == TYPE_URLS else f"waypoint~{node}",
            node_name=node,
            channel_factory=insecure_channel_factory(self.address),
            backoff=Backoff(initial=0.05, maximum=1.0),
            types=types,
        )
        sub = Subscriber(node, state, client, asyncio.create_task(client.run(), name=f"xds-{node}"))
        (self.subscribers if types == TYPE_URLS else self.waypoints).append(sub)
        async with asyncio.timeout(timeout):
            await client.synced.wait()
        return sub

    async def converged(self, timeout: float = 30.0) -> None:
        """Wait until every subscriber (node proxies and waypoints) holds exactly the versions the
        server serves right now — a changed resource counts, not only added and removed names
        (the harness's server is unscoped: every waypoint gets every waypoint policy)."""
        assert self._servicer is not None
        served = self._servicer.cache.current().by_type

        async def caught_up(sub: Subscriber) -> None:
            want = {t: {name: e.version for name, e in served[t].items()} for t in sub.client.versions}
            await sub.until(lambda _: {t: dict(v) for t, v in sub.client.versions.items()} == want, timeout)

        for sub in [*self.subscribers, *self.waypoints]:
            await caught_up(sub)

    async def aclose(self) -> None:
        for sub in [*self.subscribers, *self.waypoints]:
            sub.client.stop()
            await asyncio.gather(sub.task, return_exceptions=True)
        if self._grpc is not None:
            await self._grpc.stop(grace=None)
        if self._servicer is not None:
            self._servicer.close()
        if self.jwks is not None:
            await self.jwks.aclose()
