"""A ztunnel recovers within seconds of its control plane's return (issue 24).

The real control plane server (TLS, node token, CA and discovery on one port) is stopped while a
ztunnel (``Ztunnel`` wired as ``ztunnel.main`` wires it: discovery client, gRPC CA client) runs;
a certificate renewal falls due during the outage and fails; while it lasts something accepts
and drops connections on the port (a control plane starting up, or a proxy in front of a dead
one), then the control plane comes back on the same port. Before, gRPC's reconnect backoff and
the certificate manager's (by then 16 s) left the node without discovery or its renewed
certificate for about 20 s; now discovery is back within about a second and its reconnect makes
the failing renewal retry at once. Asserted loosely: within 10 s.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from controlplane import xds as cpxds
from controlplane.auth import LocalTokenAuthenticator
from controlplane.main import xds_authenticate
from controlplane.server import SERVER_NAME, RunningServer, start_server
from controlplane.tokens import TokenIssuer, token_path
from mesh.caclient import GrpcCaClient
from mesh.identity import Identity
from mesh.model import Store
from mesh.pki import CertificateAuthority
from mesh.xds.client import XdsClient
from mesh.xds.state import ProxyState
from sources.local import assume_local_redirection, parse_manifest
from ztunnel.app import Addresses, Ztunnel

pytestmark = [pytest.mark.slow]

TD = "cluster.local"
WEB = Identity(TD, "shop", "web")
CACHE = Identity(TD, "shop", "cache")
RECOVERY_BOUND = 10.0  # seconds; the old behaviour took about 20
FAILURES_DURING_OUTAGE = 6  # the old certificate backoff is then 16 s


def pod(name: str, node: str, sa: str, ip: str, namespace: str = "shop", uid: str = "") -> str:
    uid_line = f", uid: {uid}" if uid else ""
    return f"""\
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {namespace}{uid_line}}}
spec: {{nodeName: {node}, serviceAccountName: {sa}}}
status: {{podIP: {ip}}}
"""


MANIFEST = "---\n".join(
    [
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}\n",
        "apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\n",
        pod("web-1", "node-a", "web", "10.0.1.2"),
        pod("cache-a", "node-a", "cache", "10.0.1.3"),
        pod("ztunnel-a", "node-a", "ztunnel", "10.0.1.100", "istio-system", "uid-zt-a"),
    ]
)


class ControlPlane:
    """The control plane's server (CA + discovery), restartable on the same port."""

    def __init__(self, state_dir: Path) -> None:
        self.ca = CertificateAuthority.generate(TD)
        self.store = Store()
        self.store.replace_all(assume_local_redirection(parse_manifest(MANIFEST)))  # as local mode does
        issuer = TokenIssuer.load_or_create(state_dir)
        issuer.write_node_tokens(state_dir, ["node-a"])
        self.auth = LocalTokenAuthenticator(issuer)
        self.port = 0
        self.server: RunningServer | None = None
        self._servicers: list[cpxds.DiscoveryServicer] = []

    async def start(self) -> None:
        def register(grpc_server: Any) -> None:
            self._servicers.append(
                cpxds.register(grpc_server, self.store, authenticate=xds_authenticate(self.auth))
            )

        self.server = await start_server(f"127.0.0.1:{self.port}", self.ca, self.store, self.auth, [register])
        self.port = self.server.port

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(None)
            self.server = None
        for s in self._servicers:
            s.close()
        self._servicers.clear()


class Dropper:
    """Accepts connections on the port and drops them at once, counting them."""

    def __init__(self) -> None:
        self.accepted = 0
        self.server: asyncio.Server | None = None

    async def start(self, port: int) -> None:
        async def drop(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.accepted += 1
            writer.close()

        self.server = await asyncio.start_server(drop, "127.0.0.1", port, reuse_address=True)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None


async def test_ztunnel_reconnects_discovery_and_the_ca_within_seconds(tmp_path: Path) -> None:
    cp = ControlPlane(tmp_path)
    await cp.start()
    address = f"127.0.0.1:{cp.port}"
    roots = cp.ca.roots_pem.encode()
    token = token_path(tmp_path, "node-a")
    state = ProxyState()
    xds = XdsClient(
        state, node_id="ztunnel~node-a", node_name="node-a", address=address, root_cert_pem=roots,
        server_name=SERVER_NAME, token_file=token,
    )  # fmt: skip
    ca = GrpcCaClient(address, roots, token)
    zt = Ztunnel(
        node="node-a",
        trust_domain=TD,
        state=state,
        ca=ca,
        zds_path=str(tmp_path / "no-agent.sock"),
        addresses=Addresses(("127.0.0.1", 0), ("127.0.0.1", 0), ("127.0.0.1", 0)),
    )
    zt.follow(xds)
    reconnected = asyncio.Event()
    xds.on_connected(reconnected.set)
    xds_task = asyncio.create_task(xds.run())
    dropper = Dropper()
    certs = zt.certs

    async def until(predicate: Any, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                await certs.changed.wait()

    def entry(identity: Identity) -> dict[str, Any]:
        return next(e for e in certs.dump() if e["identity"] == str(identity))

    try:
        await zt.start()
        async with asyncio.timeout(30):
            await xds.synced.wait()
        await until(lambda: {str(i) for i in certs.identities()} == {str(WEB), str(CACHE)} and certs.ready, 30)
        rotations = entry(WEB)["rotations"]

        # The control plane goes away; WEB's renewal falls due and fails, again and again.
        await cp.stop()
        await dropper.start(cp.port)
        reconnected.clear()
        certs.refresh_now(WEB)
        await until(lambda: entry(WEB).get("last_error") and failures(zt, WEB) >= FAILURES_DURING_OUTAGE, 120)
        assert dropper.accepted > 0  # the node kept probing
        assert not reconnected.is_set()

        # Back on the same port: discovery, then the renewal, within seconds.
        await dropper.stop()
        await cp.start()
        back = time.monotonic()
        async with asyncio.timeout(60):
            await reconnected.wait()
        xds_after = time.monotonic() - back
        await until(lambda: entry(WEB)["rotations"] > rotations and "last_error" not in entry(WEB), 60)
        ca_after = time.monotonic() - back
        assert xds_after < RECOVERY_BOUND, f"discovery back after {xds_after:.1f} s"
        assert ca_after < RECOVERY_BOUND, f"certificate renewed {ca_after:.1f} s after the CA's return"
        assert certs.ready
    finally:
        xds.stop()
        await asyncio.gather(xds_task, return_exceptions=True)
        await zt.shutdown(0)
        await ca.close()
        await dropper.stop()
        await cp.stop()


def failures(zt: Ztunnel, identity: Identity) -> int:
    return next(n for i, _, n in zt.certs.status() if i == identity)
