"""A whole mesh in one process: topology + control plane + a ztunnel and a fake agent per node + apps.

The control plane side is a model :class:`~mesh.model.Store` (what a source fills from YAML or
the Kubernetes API: pods, services, gateways, policies) served by the real discovery server on
loopback (tests/discovery.py); each node's ztunnel gets its state only from its own real
``XdsClient`` — exactly the production path, so nothing here writes a ztunnel's state. ztunnel runs in-process (one
``Ztunnel`` per node, sharing the event loop); the apps (echo servers and clients) run
in-process too, their sockets made inside the pods' namespaces through the same
``NetnsSocketFactory`` ztunnel uses, so their traffic really goes through the kernel's
redirection rules.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import socket
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mesh.caclient import CaError
from mesh.identity import Identity
from mesh.model import MeshObject, Service, ServicePort, Store, TunnelProtocol, WaypointRef, Workload
from mesh.netns import NetnsSocketFactory
from mesh.pki import CertificateAuthority, Credential
from mesh.xds.client import WAYPOINT_TYPE_URLS
from mesh.xds.state import ProxySnapshot
from tests.discovery import Discovery, Subscriber
from tests.netns.agent import FakeAgent
from tests.netns.topology import Pod, Topology
from tests.ztunnel.fakes import FakeCa
from waypoint.app import Addresses as WaypointAddresses
from waypoint.app import Waypoint
from waypoint.routing import Me
from ztunnel.app import Addresses, Ztunnel

TRUST_DOMAIN = "cluster.local"


class NodeBoundCa(FakeCa):
    """Like the real CA: a node may only get certificates for identities of pods on it."""

    def __init__(self, ca: CertificateAuthority, store: Store, node: str, ttl: dt.timedelta | None) -> None:
        super().__init__(ca, ttl)
        self.store = store
        self.node = node

    async def fetch_certificate(self, identity: Identity) -> Credential:
        snap = self.store.snapshot()
        if not any(w.identity == identity for w in snap.workloads_on_node(self.node)):
            raise CaError(f"no pod with {identity} on node {self.node}", retryable=False)
        return await super().fetch_certificate(identity)


class OwnIdentityCa(FakeCa):
    """Like the real CA for a workload's own credential: its own identity and nothing else."""

    def __init__(self, ca: CertificateAuthority, identity: Identity, ttl: dt.timedelta | None) -> None:
        super().__init__(ca, ttl)
        self.identity = identity

    async def fetch_certificate(self, identity: Identity) -> Credential:
        if identity != self.identity:
            raise CaError(f"{self.identity} may only obtain its own identity, not {identity}", retryable=False)
        return await super().fetch_certificate(identity)


@dataclass
class Node:
    index: int
    name: str
    zt: Ztunnel
    agent: FakeAgent
    ca: NodeBoundCa
    discovery: Subscriber

    async def until(self, predicate: Callable[[ProxySnapshot], bool], timeout: float = 30.0) -> ProxySnapshot:
        """Wait until discovery has brought this node a state that satisfies ``predicate``."""
        return await self.discovery.until(predicate, timeout)

    def get(self, which: str, path: str) -> tuple[int, str]:
        host, port = self.zt.bound[which]
        try:
            with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            body = e.read().decode()
            e.close()
            return e.code, body

    async def fetch(self, which: str, path: str) -> tuple[int, str]:
        return await asyncio.to_thread(self.get, which, path)

    async def config_dump(self) -> dict[str, object]:
        status, body = await self.fetch("admin", "/config_dump")
        assert status == 200, body
        return json.loads(body)  # type: ignore[no-any-return]


async def echo_keeping_nothing(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    counted: Callable[[int], None] | None = None,
) -> None:
    """An app for ``asyncio.start_server``: echoes until the client half-closes, then closes;
    a connection error ends it quietly. It records nothing per connection (:class:`EchoServer`
    records every peer, which memory measurements would count with ztunnel's); ``counted`` is
    told the size of each chunk as it arrives."""
    try:
        while chunk := await reader.read(65536):
            if counted is not None:
                counted(len(chunk))
            writer.write(chunk)
            await writer.drain()
        writer.write_eof()
        await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


@dataclass
class EchoServer:
    """Answers ``peer=<client ip>\\n`` then echoes everything; remembers the peers it saw."""

    server: asyncio.Server
    peers: list[str] = field(default_factory=list)
    received: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")[0]
        self.peers.append(peer)
        writer.write(f"peer={peer}\n".encode())
        await echo_keeping_nothing(reader, writer, self._count)
        try:
            await writer.wait_closed()
        except OSError:
            pass

    def _count(self, n: int) -> None:
        self.received += n


class Mesh:
    def __init__(self, topo: Topology, cert_ttl: dt.timedelta | None = None) -> None:
        self.topo = topo
        self.discovery = Discovery()
        self.store = self.discovery.store  # the control plane's
        self.ca = CertificateAuthority.generate(TRUST_DOMAIN)
        self.cert_ttl = cert_ttl
        self.nodes: list[Node] = []
        self.waypoints: list[Waypoint] = []
        self.services: list[Service] = []
        self.extra: list[MeshObject] = []  # gateways, policies …
        self._factories: dict[str, NetnsSocketFactory] = {}
        self._servers: list[asyncio.Server] = []
        self._tmp = tempfile.TemporaryDirectory(prefix="zt-harness-")

    def node_name(self, n: int) -> str:
        return f"node-{n}"

    def workload(self, pod: Pod) -> Workload:
        return Workload(
            uid=pod.uid,
            name=pod.name,
            namespace=pod.namespace,
            node=self.node_name(pod.node),
            service_account=pod.service_account,
            ips=(pod.ip,),
            labels=dict(pod.labels),
            tunnel_protocol=TunnelProtocol.HBONE if pod.enrolled else TunnelProtocol.NONE,
            trust_domain=TRUST_DOMAIN,
        )

    def add_service(
        self,
        namespace: str,
        name: str,
        vip: str,
        port: int,
        target: int,
        app: str,
        waypoint: WaypointRef | None = None,
    ) -> Service:
        svc = Service(
            namespace,
            name,
            vips=(vip,),
            ports=(ServicePort(port, target),),
            selector={"app": app},
            waypoint=waypoint,
        )
        self.services.append(svc)
        return svc

    def publish(self) -> None:
        """Write the whole mesh to the control plane's store (what its source does); discovery
        carries it to the ztunnels (wait for it with :meth:`Node.until` or :meth:`converged`)."""
        self.store.replace_all([*(self.workload(p) for p in self.topo.pods), *self.services, *self.extra])

    async def converged(self, timeout: float = 30.0) -> None:
        """Wait until every node holds what the discovery server serves right now."""
        await self.discovery.converged(timeout)

    async def start(self, drain_seconds: float = 5.0) -> None:
        self.publish()
        await self.discovery.start()
        for n in range(1, len(self.topo.nodes) + 1):
            name = self.node_name(n)
            path = str(Path(self._tmp.name) / f"zds-{n}.sock")
            agent = FakeAgent(path)
            ca = NodeBoundCa(self.ca, self.store, name, self.cert_ttl)
            sub = await self.discovery.subscribe(name)
            zt = Ztunnel(
                node=name,
                trust_domain=TRUST_DOMAIN,
                state=sub.state,
                ca=ca,
                zds_path=path,
                addresses=Addresses(("127.0.0.1", 0), ("127.0.0.1", 0), ("127.0.0.1", 0)),
                drain_seconds=drain_seconds,
            )
            node = Node(n, name, zt, agent, ca, sub)
            self.nodes.append(node)
            await zt.start()
            await agent.accept()
            for pod in self.topo.pods:
                if pod.node == n and pod.enrolled:
                    err = await agent.add(pod)
                    assert err == "", err
            assert await agent.snapshot_sent() == ""

    def factory(self, pod: Pod) -> NetnsSocketFactory:
        f = self._factories.get(pod.netns)
        if f is None:
            fd = os.open(pod.netns_path, os.O_RDONLY)
            try:
                f = self._factories[pod.netns] = NetnsSocketFactory(fd, pod.name)
            finally:
                os.close(fd)
        return f

    async def serve(self, pod: Pod, port: int) -> EchoServer:
        sock = await self.factory(pod).tcp_listener("0.0.0.0", port)
        echo = EchoServer(server=None)  # type: ignore[arg-type]
        echo.server = await asyncio.start_server(echo.handle, sock=sock)
        self._servers.append(echo.server)
        return echo

    async def connect(
        self, pod: Pod, ip: str, port: int, timeout: float = 10.0
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        sock = await self.factory(pod).tcp_socket(socket.AF_INET)
        try:
            async with asyncio.timeout(timeout):
                await asyncio.get_running_loop().sock_connect(sock, (ip, port))
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock)

    async def exchange(self, pod: Pod, ip: str, port: int, payload: bytes, timeout: float = 15.0) -> bytes:
        """Connect from ``pod``, send ``payload``, half-close, read everything back."""
        reader, writer = await self.connect(pod, ip, port)
        try:
            async with asyncio.timeout(timeout):
                writer.write(payload)
                await writer.drain()
                writer.write_eof()
                return await reader.read()
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass

    async def exchange_many(
        self,
        pod: Pod,
        servers: list[Pod],
        port: int,
        count: int,
        *,
        concurrency: int = 8,
        payload: bytes = b"ping\n",
        timeout: float = 30.0,
    ) -> int:
        """``count`` new connections from ``pod`` (``concurrency`` at a time), each an
        :meth:`exchange` with the next of ``servers`` in turn (echo apps); how many failed or
        did not get ``payload`` back whole."""
        failed = 0
        todo = iter(range(count))

        async def worker() -> None:
            nonlocal failed
            for i in todo:
                srv = servers[i % len(servers)]
                try:
                    got = await self.exchange(pod, srv.ip, port, payload, timeout=timeout)
                except (OSError, TimeoutError):
                    got = b""
                failed += got != payload

        async with asyncio.TaskGroup() as tg:
            for _ in range(concurrency):
                tg.create_task(worker())
        return failed

    async def start_waypoint(self, pod: Pod, gateway: str) -> Waypoint:
        """Run the waypoint of Gateway ``shop/<gateway>`` "in" ``pod`` (its data-path sockets in the
        pod's netns), fed by discovery like any waypoint and holding only its own certificate."""
        me = Me(pod.namespace, gateway)
        sub = await self.discovery.subscribe(f"{pod.namespace}-{gateway}", types=WAYPOINT_TYPE_URLS)
        identity = Identity(TRUST_DOMAIN, me.namespace, me.name)
        wp = Waypoint(
            me=me,
            trust_domain=TRUST_DOMAIN,
            state=sub.state,
            ca=OwnIdentityCa(self.ca, identity, self.cert_ttl),
            factory=self.factory(pod),
            addresses=WaypointAddresses(("0.0.0.0", 15008), ("127.0.0.1", 0), ("127.0.0.1", 0), ("127.0.0.1", 0)),
        )
        await wp.start()
        self.waypoints.append(wp)
        return wp

    async def aclose(self) -> None:
        for srv in self._servers:
            srv.close()
            await srv.wait_closed()
        for wp in self.waypoints:
            await wp.shutdown()
        for node in self.nodes:
            await node.zt.shutdown(0)
            node.agent.close()
        await self.discovery.aclose()
        for f in self._factories.values():
            f.close()
        self._tmp.cleanup()
