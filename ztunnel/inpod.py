"""In-pod mode: the ZDS client and the per-pod proxies it starts and stops.

The cni agent listens on a SOCK_SEQPACKET unix socket; we connect (retrying with backoff), say
``ZdsHello{V1}``, then answer every ``WorkloadRequest`` with an ack. ``add`` comes with the pod's
netns fd: we open 15001/15006/15008 inside that netns. ``del`` closes a pod's listeners and
drains its connections. After ``snapshot_sent`` every pod the agent did not mention (by ``add``
or ``keep``) since this connection started is removed. A malformed message is answered with an
error ack and logged; it never ends the session.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from mesh import zds
from mesh.certs import Certs, backoff_delays
from mesh.hbone.relay import rst_on_close
from mesh.identity import Identity
from mesh.netns import NetnsSocketFactory, SocketFactory
from mesh.tasks import Supervisor
from ztunnel.inbound import Inbound
from ztunnel.inbound_passthrough import InboundPassthrough
from ztunnel.outbound import Outbound
from ztunnel.state import NodeContext, PodContext

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Ports:
    outbound: int = 15001
    inbound_plaintext: int = 15006
    inbound: int = 15008
    bind: str = "0.0.0.0"


class PodProxy:
    """The three listeners of one pod and every connection they accepted."""

    def __init__(self, ctx: PodContext, ports: Ports, cert_timeout: float = 10.0) -> None:
        self.ctx = ctx
        self.ports = ports
        self.cert_timeout = cert_timeout
        self.outbound = Outbound(ctx)
        self.inbound = Inbound(ctx)
        self.passthrough = InboundPassthrough(ctx)
        self.tasks = Supervisor(f"pod-{ctx.namespace}/{ctx.name}")
        self._listeners: list[socket.socket] = []
        self._unsubscribe: Callable[[], None] | None = None
        self._tracked = False
        self.addresses: dict[str, tuple[str, int]] = {}

    async def start(self) -> None:
        f, p = self.ctx.factory, self.ports
        certs = self.ctx.node.certs
        certs.track(self.ctx.identity)
        self._tracked = True
        try:
            out = await f.tcp_listener(p.bind, p.outbound)
            self._listeners.append(out)
            plain = await f.tcp_listener(p.bind, p.inbound_plaintext)
            self._listeners.append(plain)
            hbone = await f.tcp_listener(p.bind, p.inbound)
            self._listeners.append(hbone)
            for name, s in (("outbound", out), ("inbound_plaintext", plain), ("inbound", hbone)):
                addr = s.getsockname()
                self.addresses[name] = (addr[0], addr[1])
            await certs.get(self.ctx.identity, timeout=self.cert_timeout)
            self._unsubscribe = certs.subscribe(self._rotated)
            await self.inbound.start(hbone)
        except BaseException:
            await self.close(0)
            raise
        self.tasks.spawn(self._accept(out, self.outbound.handle), name="accept-outbound")
        self.tasks.spawn(self._accept(plain, self.passthrough.handle), name="accept-inbound-plaintext")

    def _rotated(self, identity: Identity, certs: Certs) -> None:
        if identity == self.ctx.identity:
            self.inbound.rotate(certs.server_ctx)

    async def _accept(self, listener: socket.socket, handle: Callable[[socket.socket], object]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(listener)
            except OSError as e:
                if e.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("accept failed, backing off", error=str(e))
                    await asyncio.sleep(0.1)
                    continue
                raise
            conn.setblocking(False)
            rst_on_close(conn)  # if ztunnel dies, the app sees a reset, not a clean end
            self.tasks.spawn(handle(conn), name="connection")  # type: ignore[arg-type]

    @property
    def open_connections(self) -> int:
        accepting = 2
        inbound = len(self.inbound.server.tasks) - 1 if self.inbound.server is not None else 0
        return max(0, len(self.tasks) - accepting) + max(0, inbound)

    async def stop_accepting(self) -> None:
        accepting = [t for t in self.tasks._tasks if t.get_name().startswith("accept-")]
        for t in accepting:
            t.cancel()
        if accepting:
            await asyncio.wait(accepting)
        await self.inbound.stop_accepting()
        for s in self._listeners:
            s.close()
        self._listeners.clear()

    async def close(self, drain_timeout: float) -> None:
        """Stop accepting, let connections finish for up to ``drain_timeout`` s, then cut them.

        The identity is released at once: the pod is gone, established TLS sessions do not
        need the certificate any more, and no new connection will be made for it.
        """
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._tracked:
            self._tracked = False
            self.ctx.node.certs.untrack(self.ctx.identity)
        await self.stop_accepting()
        inbound_closing = asyncio.ensure_future(self.inbound.close(drain_timeout))
        if drain_timeout > 0 and self.tasks:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(drain_timeout):
                    await self.tasks.wait()
        await self.tasks.aclose()
        await inbound_closing
        await self.outbound.aclose()
        self.ctx.factory.close()


FactoryMaker = Callable[[int, str], SocketFactory]


def netns_factory(fd: int, name: str) -> SocketFactory:
    return NetnsSocketFactory(fd, name)


class WorkloadManager:
    """Pods by uid; applies ZDS requests. Acks are the return value ("" = ok)."""

    def __init__(
        self,
        node: NodeContext,
        ports: Ports | None = None,
        *,
        drain_seconds: float = 5.0,
        make_factory: FactoryMaker = netns_factory,
        cert_timeout: float = 10.0,
    ) -> None:
        self.node = node
        self.cert_timeout = cert_timeout
        self.ports = ports or Ports()
        self.drain_seconds = drain_seconds
        self.make_factory = make_factory
        self.pods: dict[str, PodProxy] = {}
        self._seen: set[str] = set()
        self.snapshot_received = False
        self.changed = asyncio.Condition()
        self._closing = Supervisor("pods-closing")

    def new_session(self) -> None:
        self._seen = set()

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def apply(self, req: zds.ZdsRequest) -> str:
        try:
            if isinstance(req, zds.AddWorkload):
                return await self._add(req)
            if isinstance(req, zds.DelWorkload):
                self._seen.discard(req.uid)
                await self._remove(req.uid, self.drain_seconds)
                return ""
            if isinstance(req, zds.KeepWorkload):
                if req.uid not in self.pods:
                    return f"keep: unknown pod {req.uid}"
                self._seen.add(req.uid)
                return ""
            stale = [uid for uid in self.pods if uid not in self._seen]
            for uid in stale:
                log.info("pod not in the agent's snapshot, removing", uid=uid)
                await self._remove(uid, self.drain_seconds)
            self.snapshot_received = True
            return ""
        finally:
            await self._notify()

    async def _add(self, req: zds.AddWorkload) -> str:
        self._seen.add(req.uid)
        if req.uid in self.pods:
            os.close(req.netns_fd)  # already running (agent reconnect): nothing to change
            return ""
        try:
            factory = self.make_factory(req.netns_fd, req.name)
        except OSError as e:
            return f"cannot use the pod's netns: {e}"
        finally:
            os.close(req.netns_fd)
        ctx = PodContext(req.uid, req.name, req.namespace, req.service_account, factory, self.node)
        proxy = PodProxy(ctx, self.ports, self.cert_timeout)
        try:
            await proxy.start()
        except (OSError, TimeoutError, ValueError) as e:
            self._seen.discard(req.uid)
            log.error("cannot start the pod's proxy", pod=f"{req.namespace}/{req.name}", error=str(e))
            return f"starting proxy for {req.namespace}/{req.name}: {str(e) or 'timeout waiting for certificate'}"
        self.pods[req.uid] = proxy
        log.info(
            "pod added",
            pod=f"{req.namespace}/{req.name}",
            uid=req.uid,
            identity=str(ctx.identity),
            listeners={k: f"{a[0]}:{a[1]}" for k, a in proxy.addresses.items()},
        )
        return ""

    async def _remove(self, uid: str, drain: float) -> None:
        proxy = self.pods.pop(uid, None)
        if proxy is None:
            return
        log.info("pod removed, draining", pod=f"{proxy.ctx.namespace}/{proxy.ctx.name}", drain_s=drain)
        # Draining happens in the background so the agent's next request is not held up.
        self._closing.spawn(proxy.close(drain), name=f"close-{uid}")

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> None:
        async with asyncio.timeout(timeout), self.changed:
            await self.changed.wait_for(predicate)

    async def stop_accepting(self) -> None:
        await asyncio.gather(*(p.stop_accepting() for p in self.pods.values()))

    async def aclose(self, drain: float) -> None:
        proxies = list(self.pods.values())
        self.pods.clear()
        await asyncio.gather(*(p.close(drain) for p in proxies))
        await self._closing.wait()
        await self._closing.aclose()


class ZdsClient:
    """Connects to the agent's socket and feeds requests to the :class:`WorkloadManager`."""

    def __init__(self, path: str, manager: WorkloadManager) -> None:
        self.path = path
        self.manager = manager
        self.backoff = backoff_delays(0.1, 5.0)
        self.connected = asyncio.Event()

    async def run(self) -> None:
        attempt = 0
        loop = asyncio.get_running_loop()
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, self.path)
            except OSError as e:
                sock.close()
                delay = self.backoff(attempt)
                if attempt in (0, 5) or attempt % 20 == 0:
                    log.info("zds: agent not reachable yet, retrying", path=self.path, error=str(e))
                attempt += 1
                await asyncio.sleep(delay)  # a retry timer, not a wait for a condition
                continue
            attempt = 0
            try:
                await self._session(sock)
            except OSError as e:
                log.warning("zds: connection to the agent failed", error=str(e))
            finally:
                self.connected.clear()
                sock.close()

    async def _session(self, sock: socket.socket) -> None:
        log.info("zds: connected to the agent", path=self.path)
        self.manager.new_session()
        await zds.send_message(sock, zds.encode_hello())
        self.connected.set()
        while True:
            try:
                data, fds = await zds.recv_message(sock)
            except zds.ZdsError as e:
                log.warning("zds: bad message", error=str(e))
                await zds.send_message(sock, zds.encode_ack(str(e)))
                continue
            if not data and not fds:
                log.info("zds: agent closed the connection")
                return
            try:
                req = zds.decode_request(data, fds)
            except zds.ZdsError as e:
                log.warning("zds: malformed request", error=str(e))
                await zds.send_message(sock, zds.encode_ack(str(e)))
                continue
            error = await self.manager.apply(req)
            if error:
                log.warning("zds: request failed", request=type(req).__name__, error=error)
            await zds.send_message(sock, zds.encode_ack(error))
