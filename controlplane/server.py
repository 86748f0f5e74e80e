"""The control plane's gRPC endpoint (port 15012): TLS with a certificate from the mesh CA.

Clients (ztunnel, waypoints) trust only the mesh root, like istiod's clients do, so the server
certificate is issued by the mesh CA itself at start-up: DNS SAN
``controlplane.istio-system.svc`` (the name clients verify, via a TLS name override when they
dial an IP) plus the listen IP. Client certificates are not asked for: callers authenticate
per request with a bearer token, because a ztunnel needs a certificate before it has one.
The CA servicer is always registered; others (discovery) are plugged in by the caller.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import structlog
from cryptography import x509

from controlplane.auth import Authenticator
from controlplane.ca import DEFAULT_TRUSTED_NODE_ACCOUNTS, CaServicer
from mesh.model import Store
from mesh.pki import CertificateAuthority

log = structlog.get_logger(__name__)

SERVER_NAME = "controlplane.istio-system.svc"
DEFAULT_PORT = 15012
# The serving certificate is made at every start and lives until the next one; a year (capped
# by the CA's own expiry) means a long-running control plane never serves an expired one.
SERVING_CERT_TTL = dt.timedelta(days=365)
DEFAULT_GRACE = 5.0


class ServerError(Exception):
    """The server could not start (bad address, port in use); the message says which."""


def parse_listen(listen: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` → (host, port), with errors naming what is wrong."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not host:
        raise ServerError(f"listen address {listen!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ServerError(f"listen address {listen!r}: put an IPv6 address in brackets, [addr]:port")
    try:
        port = int(port_text)
    except ValueError:
        raise ServerError(f"listen address {listen!r}: port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ServerError(f"listen address {listen!r}: port {port} is out of range")
    return host, port


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def serving_certificate(
    ca: CertificateAuthority,
    host: str,
    *,
    dns_names: Sequence[str] = (SERVER_NAME,),
    ttl: dt.timedelta = SERVING_CERT_TTL,
) -> tuple[bytes, bytes]:
    """(key PEM, chain PEM without the root) for serving TLS at ``host``.

    Not :meth:`CertificateAuthority.sign`: workload leaves carry exactly one SPIFFE URI, this
    one carries DNS and IP names instead. An unspecified address (0.0.0.0) is no useful SAN.
    """
    names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if host and host not in dns_names:
            names.append(x509.DNSName(host))
    else:
        if not ip.is_unspecified:
            names.append(x509.IPAddress(ip))
    return ca.issue_server_certificate(dns_names[0] if dns_names else host, names, ttl)


@dataclass(frozen=True, slots=True)
class RunningServer:
    """A started server and the address it is bound to (the real port when asked for 0)."""

    server: Any  # grpc.aio.Server
    host: str
    port: int

    @property
    def address(self) -> str:
        return _join(self.host, self.port)

    async def stop(self, grace: float | None = DEFAULT_GRACE) -> None:
        """Refuse new calls, let running ones finish for ``grace`` seconds, then cancel them."""
        await self.server.stop(grace)
        log.info("control plane server stopped", address=self.address)

    async def wait(self) -> None:
        await self.server.wait_for_termination()


async def start_server(
    listen: str,
    ca: CertificateAuthority,
    store: Store,
    authenticator: Authenticator,
    extra_servicers: Sequence[Callable[[Any], None]] = (),
    *,
    trusted_node_accounts: frozenset[tuple[str, str]] = DEFAULT_TRUSTED_NODE_ACCOUNTS,
) -> RunningServer:
    """Bind ``listen`` (``host:port``, port 0 for any) with TLS and serve the CA plus extras."""
    host, port = parse_listen(listen)
    key_pem, chain_pem = serving_certificate(ca, host)
    creds = grpc.ssl_server_credentials([(key_pem, chain_pem)], require_client_auth=False)
    # grpc turns SO_REUSEPORT on by default: a second control plane on the same port would
    # then start "successfully" and share the traffic. We want the bind to fail instead.
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    CaServicer(ca, store, authenticator, trusted_node_accounts=trusted_node_accounts).register(server)
    for register in extra_servicers:
        register(server)
    try:
        bound = server.add_secure_port(_join(host, port), creds)
    except RuntimeError as e:
        await server.stop(None)
        raise ServerError(f"cannot listen on {listen}: {e}") from None
    if not bound:
        await server.stop(None)
        raise ServerError(f"cannot listen on {listen} (address in use or not local)")
    await server.start()
    running = RunningServer(server, host, bound)
    log.info("control plane server listening", address=running.address, server_name=SERVER_NAME)
    return running
