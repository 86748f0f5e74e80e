"""Entry point of the `ztunnel` process: config -> store (xDS) + CA client -> Ztunnel -> run.

SIGTERM/SIGINT (or ``/quitquitquit``): stop accepting, drain up to the deadline, exit 0.
"""

from __future__ import annotations

import asyncio
import os
import sys

import structlog

from mesh import log as meshlog
from mesh import runtime
from mesh.xds.state import ProxyState
from ztunnel.app import Addresses, Ztunnel, serve_until_stopped
from ztunnel.config import Config, ConfigError, load

log = structlog.get_logger("ztunnel")


async def run(cfg: Config, roots: bytes, token_file: str) -> int:
    from mesh.caclient import GrpcCaClient
    from mesh.xds.client import XdsClient

    stop = runtime.stop_on_signals()
    state = ProxyState()
    ca = GrpcCaClient(cfg.ca_address, roots, token_file)
    xds = XdsClient(
        state,
        node_id=f"ztunnel~{cfg.node_name}",
        node_name=cfg.node_name,
        address=cfg.xds_address,
        root_cert_pem=roots,
        token_file=token_file,
    )
    zt = Ztunnel(
        node=cfg.node_name,
        trust_domain=cfg.trust_domain,
        state=state,
        ca=ca,
        zds_path=cfg.zds_socket,
        addresses=Addresses(
            (cfg.admin_addr, cfg.admin_port),
            (cfg.stats_addr, cfg.stats_port),
            (cfg.stats_addr, cfg.readiness_port),
        ),
        drain_seconds=cfg.drain_seconds,
        process_metrics=True,
        prefer_same_node=cfg.prefer_same_node,
        access_log_interval=cfg.access_log_interval,
    )
    zt.follow(xds)
    xds_task = asyncio.create_task(xds.run(), name="xds")
    try:
        await zt.start()
        runtime.write_ready_file(cfg.ready_file, "started")
        return await serve_until_stopped(zt, stop)
    finally:
        xds.stop()
        xds_task.cancel()
        await asyncio.wait({xds_task})


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = load(argv)
    except ConfigError as e:
        print(f"ztunnel: {e}", file=sys.stderr)
        return 2
    root_file = os.environ.get("CA_ROOT_CERT", "/var/run/secrets/istio/root-cert.pem")
    token_file = os.environ.get("TOKEN_FILE", "/var/run/secrets/tokens/istio-token")
    try:
        with open(root_file, "rb") as f:
            roots = f.read()
    except OSError as e:
        print(f"ztunnel: CA_ROOT_CERT {root_file}: {e.strerror}", file=sys.stderr)
        return 2
    meshlog.configure(cfg.log_level)
    return runtime.run(lambda: run(cfg, roots, token_file))
