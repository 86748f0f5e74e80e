"""A real waypoint on loopback, between an HBONE client and a fake destination node, fed by discovery.

The production path, in one network namespace of the test's own (:class:`PrivateNetns`):

* The control plane side is a model :class:`~mesh.model.Store` served by the real discovery
  server (tests/discovery.py); every waypoint gets its state from its own ``XdsClient``. Tests
  change what the waypoint enforces only by writing the store (:meth:`Harness.apply`), never
  the waypoint's state.
* One service, ``foo/httpbin`` (VIP :data:`VIP`, never dialed), bound to the waypoint Gateway
  ``foo/waypoint``, with one endpoint workload at ``127.0.18.2`` in the test's netns. There a :class:`DestinationNode` plays the endpoint's node proxy: an
  ``HboneServer`` on ``:15008`` presenting the endpoint's certificate that relays each CONNECT
  to an HTTP/1.1 backend. The waypoint reaches it the way it reaches any endpoint: HBONE, with
  its own certificate, to ``<endpoint IP>:15008``.
* The client dials the waypoint's HBONE port with a certificate for the identity it plays
  (issued by the same test CA), from the source address it plays, CONNECTs to ``VIP:port`` and
  sends one HTTP/1.1 request.
* A source address that is not a loopback one (the conformance table's ``10.0.0.5``,
  ``1.2.3.4``…) is a ``/32`` on the test netns's ``lo`` (root only; the host's network is never
  touched). The waypoint then sees exactly that address as the tunnel's peer, as it would see a
  pod's; nothing about the request is rewritten.
* Waypoints differ only by their path normalization (a mesh-wide setting, so one waypoint
  process per mode): :meth:`Harness.waypoint` starts one per mode on first use, all for the
  same Gateway, each with its own discovery subscription.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import socket
import ssl
import subprocess
from collections.abc import Iterable, Iterator, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import h11
import structlog.testing

from mesh.hbone.client import open_connection
from mesh.hbone.relay import connect_and_relay
from mesh.hbone.server import HboneServer, InboundStream
from mesh.hbone.stream import StreamError
from mesh.identity import Identity
from mesh.model import (
    WAYPOINT_GATEWAY_CLASS,
    Gateway,
    MeshObject,
    Service,
    ServicePort,
    TunnelProtocol,
    WaypointRef,
    Workload,
)
from mesh.netns import NetnsSocketFactory
from mesh.pathnorm import PathNormalization
from mesh.pki import CertificateAuthority, Credential
from mesh.tls import client_context, server_context
from mesh.xds.client import WAYPOINT_TYPE_URLS
from mesh.xds.state import HBONE_PORT
from tests.discovery import Discovery
from tests.netns.mesh import OwnIdentityCa
from tests.waypoint.conftest import H1Backend, Received, next_h11
from waypoint.app import Addresses, Waypoint
from waypoint.bytestream import HboneByteStream
from waypoint.routing import Me

TRUST_DOMAIN = "cluster.local"
NAMESPACE = "foo"
WAYPOINT = "waypoint"
SERVICE = "httpbin"
VIP = "10.96.0.10"  # the conformance table's destination IP; only ever named in a CONNECT
WAYPOINT_VIP = "10.96.0.11"
SERVICE_PORTS = (8000, 9000)
GATEWAY_LABEL = "gateway.networking.k8s.io/gateway-name"
ENDPOINT_IP = "127.0.18.2"  # in the test's own netns
TIMEOUT = 30.0  # generous: CI is a loaded 2-core machine
CERT_TTL = dt.timedelta(hours=1)


# -- the source addresses a client plays -----------------------------------------------------------


class PrivateNetns:
    """A network namespace of the test's own where the cases' source addresses are local.

    The waypoint's data-path sockets (its HBONE listener, its tunnels), the endpoint's node proxy
    listener and the clients' sockets are made in it (``factory``), each case's source address is
    a ``/32`` on its ``lo``; nothing of the host's network changes. Control connections (the
    discovery server, the backend behind the fake node proxy) stay on the host's loopback.
    Deleting the namespace removes every address with it.
    """

    def __init__(self, ips: Iterable[str]) -> None:
        self.ips = sorted({ip for ip in ips if not ip.startswith("127.")})
        self.name = f"l7conf{os.getpid()}"
        self.factory: NetnsSocketFactory | None = None

    def __enter__(self) -> PrivateNetns:
        _run("ip", "netns", "add", self.name)
        try:
            _run("ip", "-n", self.name, "link", "set", "lo", "up")
            for ip in self.ips:
                _run("ip", "-n", self.name, "addr", "add", f"{ip}/32", "dev", "lo")
            fd = os.open(f"/var/run/netns/{self.name}", os.O_RDONLY)
            try:
                self.factory = NetnsSocketFactory(fd, self.name)
            finally:
                os.close(fd)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        if self.factory is not None:
            self.factory.close()
            self.factory = None
        _run("ip", "netns", "del", self.name, check=False)


def _run(*cmd: str, check: bool = True) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT)
    if check and done.returncode != 0:
        raise OSError(f"{' '.join(cmd)}: {done.stderr.strip()}")


# -- the endpoint's node proxy -----------------------------------------------------------------------


class DestinationNode:
    """The endpoint's node proxy, reduced to what a waypoint needs: HBONE on ``ip:15008`` with the
    endpoint's certificate, each CONNECT relayed to ``backend``. Remembers who tunnelled where."""

    def __init__(self, credential: Credential, backend: H1Backend, netns: PrivateNetns) -> None:
        self.netns = netns
        self.credential = credential
        self.backend = backend
        self.server: HboneServer | None = None
        self.ip = ""
        self.tunnels: list[tuple[Identity, str]] = []  # (peer identity, CONNECT authority)

    async def start(self) -> DestinationNode:
        self.server = HboneServer(
            self._handle, server_context(self.credential), TRUST_DOMAIN, name="fake-node"
        )
        assert self.netns.factory is not None
        sock = await self.netns.factory.tcp_listener(ENDPOINT_IP, HBONE_PORT)
        await self.server.listen(sock=sock)
        self.ip = ENDPOINT_IP
        return self

    async def _handle(self, inbound: InboundStream) -> None:
        self.tunnels.append((inbound.peer, inbound.request.authority))
        await connect_and_relay(inbound, "127.0.0.1", self.backend.port)

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()


# -- what the waypoint logs ----------------------------------------------------------------------------


@dataclass
class LogWatch:
    """Log entries captured while a request runs; :meth:`access_line` waits for the waypoint's
    access-log line (written when the request is done, possibly after the client has its answer)."""

    entries: list[MutableMapping[str, Any]]
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def notify(
        self, _logger: object, _method: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        self.changed.set()
        return event

    async def access_line(self) -> MutableMapping[str, Any]:
        async with asyncio.timeout(TIMEOUT):
            while True:
                lines = [e for e in self.entries if e.get("event") == "request" and "flags" in e]
                if lines:
                    assert len(lines) == 1, lines
                    return lines[0]
                self.changed.clear()
                await self.changed.wait()

    def events(self, name: str) -> list[MutableMapping[str, Any]]:
        return [e for e in self.entries if e.get("event") == name]


@contextlib.contextmanager
def watching_logs() -> Iterator[LogWatch]:
    watch = LogWatch([])
    with structlog.testing.capture_logs(processors=[watch.notify]) as entries:
        watch.entries = entries
        yield watch


# -- the harness ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Exchange:
    """One request through the waypoint, as the client and the waypoint saw it."""

    status: int
    body: bytes
    access: MutableMapping[str, Any]  # the waypoint's access-log line
    logs: LogWatch
    backend: Received | None  # what reached the backend, if anything


def base_objects(endpoint_ip: str) -> list[MeshObject]:
    """The Gateway, its service, the service behind it (every port declared HTTP) and its endpoint."""
    return [
        Gateway(NAMESPACE, WAYPOINT, WAYPOINT_GATEWAY_CLASS),
        Service(
            NAMESPACE,
            WAYPOINT,
            vips=(WAYPOINT_VIP,),
            ports=(ServicePort(HBONE_PORT, HBONE_PORT, "mesh"),),
            selector={GATEWAY_LABEL: WAYPOINT},
        ),
        Service(
            NAMESPACE,
            SERVICE,
            vips=(VIP,),
            ports=tuple(ServicePort(p, p, f"http-{p}") for p in SERVICE_PORTS),
            selector={"app": SERVICE},
            waypoint=WaypointRef(WAYPOINT, NAMESPACE),
        ),
        Workload(
            uid=f"{SERVICE}-0-uid",
            name=f"{SERVICE}-0",
            namespace=NAMESPACE,
            node="node-1",
            service_account=SERVICE,
            ips=(endpoint_ip,),
            labels={"app": SERVICE},
            tunnel_protocol=TunnelProtocol.HBONE,
            trust_domain=TRUST_DOMAIN,
        ),
    ]


class Harness:
    def __init__(self, source_ips: Iterable[str] = ()) -> None:
        self.ca = CertificateAuthority.generate(TRUST_DOMAIN)
        self.discovery = Discovery()
        self.backend = H1Backend()
        self.endpoint_identity = Identity(TRUST_DOMAIN, NAMESPACE, SERVICE)
        self.netns = PrivateNetns(source_ips)
        self.node = DestinationNode(self.ca.issue(self.endpoint_identity, CERT_TTL), self.backend, self.netns)
        self.waypoints: dict[PathNormalization, Waypoint] = {}
        self._credentials: dict[Identity, ssl.SSLContext] = {}
        self._stack = contextlib.AsyncExitStack()

    @property
    def waypoint_identity(self) -> Identity:
        return Identity(TRUST_DOMAIN, NAMESPACE, WAYPOINT)

    async def __aenter__(self) -> Harness:
        try:
            self._stack.enter_context(self.netns)
            await self.backend.start()
            self._stack.push_async_callback(self.backend.close)
            await self.node.start()
            self._stack.push_async_callback(self.node.close)
            self.discovery.store.replace_all(base_objects(self.node.ip))
            await self.discovery.start()
            self._stack.push_async_callback(self.discovery.aclose)
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(self, *_: object) -> None:
        await self._stack.aclose()

    async def apply(self, objects: Sequence[MeshObject]) -> None:
        """The base objects plus ``objects`` (policies), pushed through discovery to every waypoint."""
        self.discovery.store.replace_all([*base_objects(self.node.ip), *objects])
        await self.discovery.converged(TIMEOUT)

    async def waypoint(self, mode: PathNormalization = PathNormalization.BASE) -> Waypoint:
        """The waypoint ``foo/waypoint`` normalizing paths with ``mode`` (started on first use)."""
        wp = self.waypoints.get(mode)
        if wp is not None:
            return wp
        me = Me(NAMESPACE, WAYPOINT)
        sub = await self.discovery.subscribe(
            f"{NAMESPACE}-{WAYPOINT}-{mode.value.lower()}", TIMEOUT, WAYPOINT_TYPE_URLS
        )
        wp = Waypoint(
            me=me,
            trust_domain=TRUST_DOMAIN,
            state=sub.state,
            ca=OwnIdentityCa(self.ca, self.waypoint_identity, CERT_TTL),
            factory=self._factory(),
            addresses=Addresses(("127.0.0.1", 0), ("127.0.0.1", 0), ("127.0.0.1", 0), ("127.0.0.1", 0)),
            path_normalization=mode,
        )
        await wp.start()
        self._stack.push_async_callback(wp.shutdown)
        self.waypoints[mode] = wp
        return wp

    def _factory(self) -> NetnsSocketFactory:
        assert self.netns.factory is not None
        return self.netns.factory

    async def netns_socket(self) -> socket.socket:
        """An unconnected TCP socket in the test's netns (where the waypoint listens)."""
        return await self._factory().tcp_socket(socket.AF_INET)

    def credential(self, identity: Identity) -> ssl.SSLContext:
        """A client TLS context for ``identity`` (one per identity: keys are slow to make)."""
        ctx = self._credentials.get(identity)
        if ctx is None:
            ctx = self._credentials[identity] = client_context(self.ca.issue(identity, CERT_TTL))
        return ctx

    async def request(
        self,
        wp: Waypoint,
        *,
        identity: Identity,
        source_ip: str,
        port: int,
        method: str,
        target: str,
        headers: Sequence[tuple[str, str]],
    ) -> Exchange:
        """One HTTP/1.1 request from ``identity`` at ``source_ip`` to ``VIP:port`` through ``wp``."""
        seen = len(self.backend.requests)
        with watching_logs() as logs:
            sock = await self._factory().tcp_socket(socket.AF_INET)
            try:
                sock.bind((source_ip, 0))
            except BaseException:
                sock.close()
                raise
            conn = await open_connection(
                *wp.bound["hbone"],
                self.credential(identity),
                TRUST_DOMAIN,
                self.waypoint_identity,
                sock=sock,
                timeout=TIMEOUT,
            )
            try:
                async with asyncio.timeout(TIMEOUT):
                    s = HboneByteStream(await conn.open_stream(f"{VIP}:{port}"))
                    h = h11.Connection(h11.CLIENT)
                    s.write(h.send(h11.Request(method=method, target=target, headers=list(headers))))
                    s.write(h.send(h11.EndOfMessage()))
                    await s.drain()
                    resp = await next_h11(h, s)
                    assert isinstance(resp, h11.Response), resp
                    body = bytearray()
                    while isinstance(ev := await next_h11(h, s), h11.Data):
                        body += ev.data
                    assert isinstance(ev, h11.EndOfMessage), ev
                    s.close()
                    access = await logs.access_line()
            finally:
                conn.close()  # GOAWAY; the connection goes once the stream is done both ways
                try:
                    await asyncio.wait_for(asyncio.shield(conn.closed), TIMEOUT)
                except TimeoutError:
                    conn.abort(StreamError("the test client gave up waiting"))
        got = self.backend.requests[seen:]
        assert len(got) <= 1, got
        return Exchange(resp.status_code, bytes(body), access, logs, got[0] if got else None)
