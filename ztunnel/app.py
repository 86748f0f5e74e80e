"""One ztunnel: certificate manager, pods (via ZDS), admin/metrics/readiness servers, shutdown.

Built from seams so tests can run two of them in one process: the ``ProxyState`` (written by
the discovery client, in tests too), the ``CaClient`` and the socket factory maker.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any

import structlog
from cryptography import x509

from mesh.admin import HttpServer, start_proxy_servers
from mesh.caclient import CaClient
from mesh.certs import CertManager
from mesh.pki import PkiError, load_pem_certs
from mesh.tasks import Supervisor
from mesh.xds.client import XdsClient
from mesh.xds.dump import to_json
from mesh.xds.state import ProxyState
from ztunnel.inpod import FactoryMaker, Ports, WorkloadManager, ZdsClient, netns_factory
from ztunnel.metrics import Metrics
from ztunnel.prefetch import CertPrefetch
from ztunnel.state import NodeContext

log = structlog.get_logger(__name__)

ACCESS_LOG_INTERVAL = 300.0  # seconds between the access-log lines of a connection still open


@dataclass(frozen=True, slots=True)
class Addresses:
    """Where the node-level servers listen; port 0 picks a free one (tests)."""

    admin: tuple[str, int] = ("127.0.0.1", 15000)
    stats: tuple[str, int] = ("0.0.0.0", 15020)
    readiness: tuple[str, int] = ("0.0.0.0", 15021)


def _cert_json(cert: x509.Certificate) -> dict[str, Any]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    return {
        "serial": format(cert.serial_number, "x"),
        "subject": cert.subject.rfc4514_string(),
        "uris": uris,
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
    }


class Ztunnel:
    def __init__(
        self,
        *,
        node: str,
        trust_domain: str,
        state: ProxyState,
        ca: CaClient,
        zds_path: str,
        ports: Ports | None = None,
        addresses: Addresses | None = None,
        drain_seconds: float = 5.0,
        make_factory: FactoryMaker = netns_factory,
        process_metrics: bool = False,
        prefer_same_node: bool = True,
        access_log_interval: float = ACCESS_LOG_INTERVAL,
    ) -> None:
        self.state = state
        self.certs = CertManager(ca)
        self.metrics = Metrics(process=process_metrics)
        self.node = NodeContext(
            node, trust_domain, state, self.certs, self.metrics, prefer_same_node=prefer_same_node
        )
        self.drain_seconds = drain_seconds
        self.access_log_interval = access_log_interval
        self.manager = WorkloadManager(
            self.node, ports, drain_seconds=drain_seconds, make_factory=make_factory
        )
        self.zds = ZdsClient(zds_path, self.manager)
        self.prefetch = CertPrefetch(self.node)
        self.metrics.watch_certificates(self.certs.status)
        self.addresses_config = addresses or Addresses()
        self.bound: dict[str, tuple[str, int]] = {}
        self.tasks = Supervisor(f"ztunnel-{node}")
        self.stop = asyncio.Event()
        self.draining = asyncio.Event()  # set once no listener accepts any more
        self._servers: list[HttpServer] = []

    def follow(self, xds: XdsClient) -> None:
        """Wire the discovery client that writes ``state``: its connection state and last update
        become metrics, and each reconnect is the sign of life that makes failing certificate
        fetches retry at once (the CA is the same control plane)."""
        self.metrics.watch_xds(lambda: xds.connected, lambda: xds.last_update)
        xds.on_connected(self.certs.retry_failed)

    # -- state ------------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Ready once it has state (discovery applied at least once), the pods and their certs."""
        return self.state.version > 0 and self.manager.snapshot_received and self.certs.ready

    def config_dump(self) -> dict[str, Any]:
        """What this node holds and enforces: exactly the discovery state, plus its pods."""
        snap = self.state.snapshot()
        pods = []
        for p in self.manager.pods.values():
            w = p.ctx.workload(snap)
            pods.append(
                {
                    "uid": p.ctx.uid,
                    "name": p.ctx.name,
                    "namespace": p.ctx.namespace,
                    "identity": str(p.ctx.identity),
                    "listeners": {k: f"{a[0]}:{a[1]}" for k, a in p.addresses.items()},
                    "workload_known": w is not None,
                    "authorizations": list(snap.policy_keys_for(w)) if w is not None else [],
                    "missing_authorizations": list(snap.missing_policies(w)) if w is not None else [],
                }
            )
        local = {p.ctx.uid for p in self.manager.pods.values()}
        return {
            "node": self.node.node,
            "trust_domain": self.node.trust_domain,
            "version": snap.version,
            "ready": self.ready,
            "pods": pods,
            "workloads": [
                {**to_json(w), "local": w.uid in local}
                for w in sorted(snap.workloads.values(), key=lambda w: w.uid)
            ],
            "services": [to_json(s) for _, s in sorted(snap.services.items())],
            "authorizations": [to_json(a) for _, a in sorted(snap.authorizations.items())],
            "certificates": self.certificates(),
            "connections": self.connections(),
        }

    def certificates(self) -> list[dict[str, Any]]:
        """The certificate manager's view, plus each certificate of the chain and the roots
        (``ambientctl ztunnel-config certificate`` shows them as istioctl does: Leaf,
        Intermediate, Root, each with its validity)."""
        out = []
        by_name = {str(i): i for i in self.certs.identities()}
        for item in self.certs.dump():
            identity = by_name.get(item["identity"])
            certs = self.certs.current(identity) if identity is not None else None
            if certs is not None:
                cred = certs.credential
                try:
                    item["cert_chain"] = [
                        _cert_json(c) for pem in cred.chain_pem for c in load_pem_certs(pem, "chain")
                    ]
                    item["root_certs"] = [_cert_json(c) for c in load_pem_certs(cred.roots_pem, "roots")]
                except PkiError as e:  # never: the manager built TLS contexts from these
                    item["last_error"] = str(e)
            out.append(item)
        return out

    def connections(self) -> list[dict[str, Any]]:
        """Every connection open right now (inbound and outbound), with identities and bytes."""
        now = time.time()
        return [rec.live_json(now) for rec in self.metrics.open_connections()]

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        started = await start_proxy_servers(
            addresses={name: getattr(self.addresses_config, name) for name in ("admin", "stats", "readiness")},
            config_dump=self.config_dump,
            registry=self.metrics.registry,
            ready=lambda: self.ready,
            stop=self.stop,
        )
        for name, (srv, bound) in started.items():
            self.bound[name] = bound
            self._servers.append(srv)
        self.prefetch.start()
        self.tasks.spawn(self.zds.run(), name="zds")
        if self.access_log_interval > 0:
            self.tasks.spawn(self._log_long_lived(), name="access-log-open")
        log.info(
            "ztunnel started", node=self.node.node, **{k: f"{h}:{p}" for k, (h, p) in self.bound.items()}
        )

    async def _log_long_lived(self) -> None:
        """Every interval, a line for each connection open at least that long (a timer, not a
        wait for a condition)."""
        while True:
            await asyncio.sleep(self.access_log_interval)
            self.metrics.log_open("connection open", older_than=self.access_log_interval)

    async def shutdown(self, drain_seconds: float | None = None) -> None:
        """Stop accepting, drain open connections up to the deadline, then close everything."""
        drain = self.drain_seconds if drain_seconds is None else drain_seconds
        log.info("ztunnel draining", node=self.node.node, deadline_s=drain, pods=len(self.manager.pods))
        await self.tasks.aclose()  # no more ZDS requests
        await self.manager.stop_accepting()
        # Each open connection is logged now: if the drain is cut short (SIGKILL at the end of
        # the grace period) the log still has it; its "connection complete" follows if it ends.
        self.metrics.log_open("connection open at drain")
        self.draining.set()
        await self.manager.aclose(drain)
        self.node.connections.close()
        self.prefetch.close()
        await self.certs.aclose()
        for srv in self._servers:
            with contextlib.suppress(OSError):
                await srv.close()
        log.info("ztunnel stopped", node=self.node.node)


async def serve_until_stopped(zt: Ztunnel, stop: asyncio.Event) -> int:
    """Run until ``stop`` (SIGTERM/SIGINT) or ``/quitquitquit``, then drain and return 0."""
    waits = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(zt.stop.wait())}
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
        await asyncio.wait(waits)
    await zt.shutdown()
    return 0
