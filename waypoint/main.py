"""Entry point of the ``waypoint`` process: config -> certificate + discovery -> Waypoint -> run.

    waypoint --gateway NAMESPACE/NAME [--netns PATH] [--xds-address HOST:PORT] [--ca-address ...]

Every flag also reads an environment variable (Kubernetes passes them so): the Gateway from
``WAYPOINT_GATEWAY`` (else ``POD_NAMESPACE`` and ``GATEWAY_NAME``), the mesh root certificate
from ``CA_ROOT_CERT`` and the credential the CA and discovery verify (a projected service-account
token in Kubernetes, a token the local control plane wrote in local mode) from ``TOKEN_FILE``.
``--netns`` makes every data-path socket (the HBONE listener and the tunnels to endpoints) live
in that network namespace while the control connections stay in the process's own: how local
mode runs a waypoint "in its pod". SIGTERM/SIGINT (or ``/quitquitquit``) drain and exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import structlog

from mesh import log as meshlog
from mesh import runtime
from mesh.netns import HostSocketFactory, NetnsSocketFactory, SocketFactory
from mesh.pathnorm import PathNormalization
from mesh.xds.state import ProxyState
from waypoint.app import Addresses, Waypoint
from waypoint.routing import Me

log = structlog.get_logger("waypoint")


class ConfigError(Exception):
    pass


@dataclass(frozen=True)
class Config:
    me: Me
    trust_domain: str
    ca_address: str
    xds_address: str
    root_cert: str
    token_file: str
    netns: str | None
    addresses: Addresses
    path_normalization: PathNormalization
    drain_seconds: float
    log_level: str
    ready_file: str | None
    start_timeout: float = 30.0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="waypoint", description="The L7 waypoint proxy of the ambient mesh.")
    p.add_argument("--gateway", help="NAMESPACE/NAME of the waypoint's Gateway (env WAYPOINT_GATEWAY)")
    p.add_argument("--trust-domain", help="SPIFFE trust domain (env TRUST_DOMAIN, default cluster.local)")
    p.add_argument("--ca-address", help="CA host:port (env CA_ADDRESS)")
    p.add_argument("--xds-address", help="discovery host:port (env XDS_ADDRESS, default: the CA's)")
    p.add_argument("--netns", help="network namespace (a /var/run/netns path) for the data path")
    p.add_argument("--hbone-port", type=int, default=15008)
    p.add_argument("--admin-port", type=int, default=15000, help="admin port on localhost")
    p.add_argument("--stats-port", type=int, default=15020)
    p.add_argument("--readiness-port", type=int, default=15021)
    p.add_argument(
        "--path-normalization",
        default=None,
        choices=[m.value for m in PathNormalization],
        help="the mesh's pathNormalization (env PATH_NORMALIZATION, default BASE)",
    )
    p.add_argument("--drain-seconds", type=float, default=5.0)
    p.add_argument(
        "--start-timeout",
        type=float,
        default=30.0,
        help="seconds to wait for the CA's first certificate before giving up (exit 1; default 30)",
    )
    p.add_argument("--log-level", default=None, choices=meshlog.LEVELS, help="env LOG_LEVEL, default info")
    p.add_argument("--ready-file", help="write 'started' here once serving")
    return p


def load(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> Config:
    env = os.environ if env is None else env
    a = _parser().parse_args(argv)
    gateway = a.gateway or env.get("WAYPOINT_GATEWAY")
    if not gateway and env.get("POD_NAMESPACE") and env.get("GATEWAY_NAME"):
        gateway = f"{env['POD_NAMESPACE']}/{env['GATEWAY_NAME']}"
    if not gateway:
        raise ConfigError("--gateway NAMESPACE/NAME is required (or WAYPOINT_GATEWAY)")
    ns, sep, name = gateway.partition("/")
    if not sep or not ns or not name or "/" in name:
        raise ConfigError(f"--gateway {gateway!r}: want NAMESPACE/NAME")
    ca = a.ca_address or env.get("CA_ADDRESS")
    if not ca:
        raise ConfigError("--ca-address is required (or CA_ADDRESS)")
    norm = a.path_normalization or env.get("PATH_NORMALIZATION") or PathNormalization.BASE.value
    try:
        mode = PathNormalization(norm.upper())
    except ValueError:
        raise ConfigError(
            f"PATH_NORMALIZATION {norm!r}: one of {', '.join(m.value for m in PathNormalization)}"
        ) from None
    bind = "0.0.0.0"
    return Config(
        me=Me(ns, name),
        trust_domain=a.trust_domain or env.get("TRUST_DOMAIN") or "cluster.local",
        ca_address=ca,
        xds_address=a.xds_address or env.get("XDS_ADDRESS") or ca,
        root_cert=env.get("CA_ROOT_CERT", "/var/run/secrets/istio/root-cert.pem"),
        token_file=env.get("TOKEN_FILE", "/var/run/secrets/tokens/istio-token"),
        netns=a.netns,
        addresses=Addresses(
            hbone=(bind, a.hbone_port),
            admin=("127.0.0.1", a.admin_port),
            stats=(bind, a.stats_port),
            readiness=(bind, a.readiness_port),
        ),
        path_normalization=mode,
        drain_seconds=a.drain_seconds,
        log_level=a.log_level or env.get("LOG_LEVEL") or "info",
        ready_file=a.ready_file,
        start_timeout=a.start_timeout,
    )


def socket_factory(netns: str | None) -> SocketFactory:
    if netns is None:
        return HostSocketFactory()
    fd = os.open(netns, os.O_RDONLY)
    try:
        return NetnsSocketFactory(fd, name=os.path.basename(netns))
    finally:
        os.close(fd)


async def run(cfg: Config, roots: bytes) -> int:
    from mesh.caclient import GrpcCaClient
    from mesh.xds.client import WAYPOINT_TYPE_URLS, XdsClient

    stop = runtime.stop_on_signals()
    state = ProxyState()
    factory = socket_factory(cfg.netns)
    ca = GrpcCaClient(cfg.ca_address, roots, cfg.token_file)
    xds = XdsClient(
        state,
        node_id=f"waypoint~{cfg.me.namespace}~{cfg.me.name}",
        address=cfg.xds_address,
        root_cert_pem=roots,
        token_file=cfg.token_file,
        types=WAYPOINT_TYPE_URLS,
    )
    wp = Waypoint(
        me=cfg.me,
        trust_domain=cfg.trust_domain,
        state=state,
        ca=ca,
        factory=factory,
        addresses=cfg.addresses,
        path_normalization=cfg.path_normalization,
        drain_seconds=cfg.drain_seconds,
        certificate_timeout=cfg.start_timeout,
        process_metrics=True,
    )
    # A reconnect is the control plane's sign of life: failing certificate fetches (the CA is the
    # same control plane) retry at once instead of waiting out their backoff.
    xds.on_connected(wp.certs.retry_failed)
    xds_task = asyncio.create_task(xds.run(), name="xds")
    try:
        try:
            await wp.start()
        except TimeoutError:
            # No certificate for its own identity: say why in one line and exit (the kubelet, or
            # the local mesh's supervisor, restarts it with backoff), not a traceback.
            errors = [c["last_error"] for c in wp.certs.dump() if c.get("last_error")]
            log.error(
                "waypoint cannot start: the CA gave no certificate for its identity",
                identity=wp.identity.uri,
                last_error=errors[0] if errors else "no answer from the CA",
            )
            await wp.shutdown()
            return 1
        runtime.write_ready_file(cfg.ready_file, "started")
        waits = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(wp.stop.wait())}
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        await wp.shutdown()
        return 0
    finally:
        xds.stop()
        xds_task.cancel()
        await asyncio.wait({xds_task})
        factory.close()


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = load(argv)
    except ConfigError as e:
        print(f"waypoint: {e}", file=sys.stderr)
        return 2
    try:
        with open(cfg.root_cert, "rb") as f:
            roots = f.read()
    except OSError as e:
        print(f"waypoint: CA_ROOT_CERT {cfg.root_cert}: {e.strerror}", file=sys.stderr)
        return 2
    if cfg.netns is not None and not os.path.exists(cfg.netns):
        print(f"waypoint: --netns {cfg.netns}: no such network namespace", file=sys.stderr)
        return 2
    meshlog.configure(cfg.log_level)
    return runtime.run(lambda: run(cfg, roots))
