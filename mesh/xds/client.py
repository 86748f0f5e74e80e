"""The node side of discovery: keep a :class:`~mesh.xds.state.ProxyState` in sync with the server.

A node proxy must keep working while the control plane restarts or is unreachable, so the
client never clears what it has. While the control plane is unreachable a session tries to
connect at most every second (:func:`mesh.xds.channel.connect`), so a control plane that comes
back is used within about a second however long it was away; the jittered exponential backoff
between sessions is only for a server that is reachable but ends or refuses streams, and it
starts over once a stream delivered a response (a sign of life). gRPC runs on grpclib, on the
proxy's own event loop (:mod:`mesh.xds.channel` says why).
On each connect the client tells the server, per type, which resource versions it holds; the server then sends only the
difference (changed resources and removals). Each response is applied as one atomic store
write or refused whole (NACK with the reason), so readers never see half of a response.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import structlog
from grpclib.const import Cardinality
from grpclib.exceptions import GRPCError, StreamTerminatedError

from mesh.proto import core_pb2, discovery_pb2, status_pb2
from mesh.xds.channel import (
    ChannelFactory,
    cancelled_since,
    cancels_requested,
    connect,
    describe,
    make_channel,
)
from mesh.xds.convert import (
    ADDRESS_TYPE_URL,
    AUTHORIZATION_TYPE_URL,
    TYPE_URLS,
    ConversionError,
    address_from_any,
    authorization_from_any,
)
from mesh.xds.meshconfig import EXTENSION_PROVIDER_TYPE_URL, extension_provider_from_any
from mesh.xds.state import ProxyState
from mesh.xds.waf import WAF_POLICY_TYPE_URL, waf_policy_from_any
from mesh.xds.waypoint_policy import (
    WAYPOINT_AUTHN_TYPE_URL,
    WAYPOINT_POLICY_TYPE_URL,
    waypoint_authn_from_any,
    waypoint_policy_from_any,
)

# What a waypoint subscribes to: addresses to route by, the policies, authentications and WAF
# policies bound to it, and the external authorizers CUSTOM policies name.
WAYPOINT_TYPE_URLS = (
    ADDRESS_TYPE_URL,
    WAYPOINT_POLICY_TYPE_URL,
    WAYPOINT_AUTHN_TYPE_URL,
    EXTENSION_PROVIDER_TYPE_URL,
    WAF_POLICY_TYPE_URL,
)

log = structlog.get_logger(__name__)

DELTA_ADS = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"
_INVALID_ARGUMENT = 3  # google.rpc.Code


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with jitter: ``initial * 2**n`` capped at ``maximum``, times [0.5, 1)."""

    initial: float = 0.5
    maximum: float = 30.0

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        base = min(self.maximum, self.initial * 2.0 ** min(attempt, 32))
        return base * (0.5 + rand() / 2)


@dataclass(frozen=True, slots=True)
class AppliedUpdate:
    """One response the client applied (for observers: metrics, tests, debug endpoints)."""

    type_url: str
    nonce: str
    upserted: frozenset[str]
    removed: frozenset[str]


def secure_channel_factory(
    address: str, root_cert_pem: bytes, server_name: str | None = None
) -> ChannelFactory:
    """Channels that verify the control plane's certificate against the mesh root."""
    return lambda: make_channel(address, root_cert_pem, server_name)


def insecure_channel_factory(address: str) -> ChannelFactory:
    """Plaintext channels: tests and loopback only."""
    return lambda: make_channel(address)


class XdsClient:
    """Subscribes to workloads, services and authorizations (``types``; a waypoint asks for
    :data:`WAYPOINT_TYPE_URLS`) and mirrors them in ``state`` (its only writer). ``synced`` is
    set once the first full state of every type has been applied and stays set across
    reconnects, since the last state stays in force. ``run()`` returns after ``stop()``.

    For observers (metrics, the certificate manager): ``connected`` is true while a stream is
    up and has delivered a response, ``last_update`` is the wall-clock time of the last
    response applied (0 before the first), and :meth:`on_connected` callbacks run each time a
    stream delivers its first response: the control plane is alive again.
    """

    def __init__(
        self,
        state: ProxyState,
        *,
        node_id: str,
        node_name: str = "",
        channel_factory: ChannelFactory | None = None,
        address: str | None = None,
        root_cert_pem: bytes | None = None,
        server_name: str | None = None,
        token_file: Path | str | None = None,
        backoff: Backoff = Backoff(),
        on_update: Callable[[AppliedUpdate], None] | None = None,
        types: tuple[str, ...] = TYPE_URLS,
    ) -> None:
        if channel_factory is None:
            if address is None:
                raise ValueError("XdsClient needs a channel_factory or an address")
            channel_factory = (
                secure_channel_factory(address, root_cert_pem, server_name)
                if root_cert_pem is not None
                else insecure_channel_factory(address)
            )
        self.state = state
        self.synced = asyncio.Event()
        self._node_id = node_id
        self._node_name = node_name
        self._channel_factory = channel_factory
        self._token_file = Path(token_file) if token_file is not None else None
        self._backoff = backoff
        self._on_update = on_update
        self._stopping = asyncio.Event()
        self._session_task: asyncio.Task[None] | None = None
        self._types = types
        self._versions: dict[str, dict[str, str]] = {t: {} for t in types}
        self._received: set[str] = set()
        self._progress = False
        self._log = log.bind(node=node_id)
        self.connected = False
        self.last_update = 0.0
        self._connected_callbacks: list[Callable[[], None]] = []

    def on_connected(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` whenever a stream delivers its first response; returns the undo."""
        self._connected_callbacks.append(callback)
        return lambda: (
            self._connected_callbacks.remove(callback) if callback in self._connected_callbacks else None
        )

    @property
    def versions(self) -> Mapping[str, Mapping[str, str]]:
        """type URL -> resource name -> version held (what a reconnect announces)."""
        return self._versions

    # --- lifecycle -----------------------------------------------------------------------

    async def run(self) -> None:
        attempt = 0
        cancels = cancels_requested()
        try:
            while not self._stopping.is_set():
                self._progress = False
                self._session_task = asyncio.create_task(self._session(), name=f"xds-session {self._node_id}")
                try:
                    await self._session_task
                    self._log.warning("xds stream ended by the server")
                except asyncio.CancelledError:
                    if cancelled_since(cancels):
                        raise
                    break  # stop() cancelled the session
                except GRPCError as e:
                    self._log.warning("xds stream failed", code=e.status.name, details=e.message)
                except (StreamTerminatedError, OSError) as e:
                    self._log.warning("xds stream failed", code="UNAVAILABLE", details=describe(e))
                except Exception:
                    self._log.exception("xds session failed")
                finally:
                    self.connected = False
                if cancelled_since(cancels):
                    # run() was cancelled while the session failed: grpclib's error took the
                    # place of the CancelledError (mesh/xds/channel.py says how).
                    raise asyncio.CancelledError
                if self._progress:
                    attempt = 0
                delay = self._backoff.delay(attempt)
                attempt += 1
                self._log.info("xds reconnecting", delay=round(delay, 3), attempt=attempt)
                try:
                    await asyncio.wait_for(self._stopping.wait(), timeout=delay)
                except TimeoutError:
                    pass
        finally:
            task, self._session_task = self._session_task, None
            if task is not None and not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    def stop(self) -> None:
        self._stopping.set()
        if self._session_task is not None:
            self._session_task.cancel()

    # --- one connection ------------------------------------------------------------------

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        if self._token_file is None:
            return ()
        # Read on every connect: the token is rotated on disk.
        token = self._token_file.read_text().strip()
        return (("authorization", f"Bearer {token}"),)

    async def _session(self) -> None:
        channel = self._channel_factory()
        try:
            await connect(channel, self._log)
            async with channel.request(
                DELTA_ADS,
                Cardinality.STREAM_STREAM,
                discovery_pb2.DeltaDiscoveryRequest,
                discovery_pb2.DeltaDiscoveryResponse,
                metadata=self._metadata(),
            ) as call:
                await call.send_request()
                node = core_pb2.Node(id=self._node_id)
                if self._node_name:
                    node.metadata.update({"NODE_NAME": self._node_name})
                for type_url in self._types:
                    await call.send_message(
                        discovery_pb2.DeltaDiscoveryRequest(
                            node=node,
                            type_url=type_url,
                            initial_resource_versions=self._versions[type_url],
                        )
                    )
                self._log.info("xds connected", known={t: len(v) for t, v in self._versions.items()})
                while True:
                    resp = await call.recv_message()
                    if resp is None:
                        await call.end()
                        return
                    if not self._progress:
                        self._progress = self.connected = True
                        for cb in list(self._connected_callbacks):
                            cb()
                    await call.send_message(self._handle(resp))
        finally:
            await channel.aclose()

    def _handle(self, resp: discovery_pb2.DeltaDiscoveryResponse) -> discovery_pb2.DeltaDiscoveryRequest:
        """Apply one response; the ACK or NACK to send back."""
        ack = discovery_pb2.DeltaDiscoveryRequest(type_url=resp.type_url, response_nonce=resp.nonce)
        try:
            update = self._apply(resp)
        except ConversionError as e:
            self._log.error(
                "xds response refused (NACK)", type_url=resp.type_url, nonce=resp.nonce, reason=str(e)
            )
            ack.error_detail.CopyFrom(status_pb2.Status(code=_INVALID_ARGUMENT, message=str(e)))
            return ack
        self._log.debug(
            "xds applied", type_url=resp.type_url, upserted=len(update.upserted), removed=len(update.removed)
        )
        self.last_update = time.time()
        if self._on_update is not None:
            self._on_update(update)
        self._received.add(resp.type_url)
        if self._received.issuperset(self._types):
            self.synced.set()
        return ack

    def _apply(self, resp: discovery_pb2.DeltaDiscoveryResponse) -> AppliedUpdate:
        type_url = resp.type_url
        if type_url not in self._types:
            raise ConversionError(f"unexpected type {type_url!r}")
        names = [r.name for r in resp.resources]
        if len(set(names)) != len(names):
            raise ConversionError("a resource appears twice in one response")
        overlap = set(names) & set(resp.removed_resources)
        if overlap:
            raise ConversionError(f"resources both updated and removed: {sorted(overlap)}")
        versions = self._versions[type_url]
        if type_url == ADDRESS_TYPE_URL:
            self.state.apply(
                addresses=[(r.name, address_from_any(r.resource, r.name)) for r in resp.resources],
                removed_addresses=resp.removed_resources,
            )
        elif type_url == AUTHORIZATION_TYPE_URL:
            self.state.apply(
                authorizations=[authorization_from_any(r.resource, r.name) for r in resp.resources],
                removed_authorizations=resp.removed_resources,
            )
        elif type_url == WAYPOINT_POLICY_TYPE_URL:
            self.state.apply(
                waypoint_policies=[waypoint_policy_from_any(r.resource, r.name) for r in resp.resources],
                removed_waypoint_policies=resp.removed_resources,
            )
        elif type_url == EXTENSION_PROVIDER_TYPE_URL:
            self.state.apply(
                extension_providers=[extension_provider_from_any(r.resource, r.name) for r in resp.resources],
                removed_extension_providers=resp.removed_resources,
            )
        elif type_url == WAF_POLICY_TYPE_URL:
            self.state.apply(
                waf_policies=[waf_policy_from_any(r.resource, r.name) for r in resp.resources],
                removed_waf_policies=resp.removed_resources,
            )
        else:
            self.state.apply(
                waypoint_authentications=[
                    waypoint_authn_from_any(r.resource, r.name) for r in resp.resources
                ],
                removed_waypoint_authentications=resp.removed_resources,
            )
        for r in resp.resources:
            versions[r.name] = r.version
        for name in resp.removed_resources:
            versions.pop(name, None)
        return AppliedUpdate(type_url, resp.nonce, frozenset(names), frozenset(resp.removed_resources))
