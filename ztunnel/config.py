"""ztunnel configuration: flags override environment variables; everything validated at start.

A bad value stops the process with a message naming the flag/variable and the reason, never a
stack trace from deep inside.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mesh.log import LEVELS
from mesh.model import DEFAULT_TRUST_DOMAIN
from mesh.zds import DEFAULT_SOCKET_PATH


class ConfigError(ValueError):
    """A configuration value is invalid; the message names it."""


@dataclass(frozen=True, slots=True)
class Config:
    node_name: str
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    zds_socket: str = DEFAULT_SOCKET_PATH
    ca_address: str = "127.0.0.1:15012"
    xds_address: str = "127.0.0.1:15012"
    admin_addr: str = "127.0.0.1"
    admin_port: int = 15000
    stats_addr: str = "0.0.0.0"
    stats_port: int = 15020
    readiness_port: int = 15021
    drain_seconds: float = 5.0
    log_level: str = "info"
    prefer_same_node: bool = True
    ready_file: str | None = None
    access_log_interval: float = 300.0  # a line per still-open connection this often (0: never)


_ENV = {
    "node_name": "NODE_NAME",
    "trust_domain": "TRUST_DOMAIN",
    "zds_socket": "ZTUNNEL_ZDS_SOCKET",
    "ca_address": "CA_ADDRESS",
    "xds_address": "XDS_ADDRESS",
    "admin_port": "ZTUNNEL_ADMIN_PORT",
    "stats_port": "ZTUNNEL_STATS_PORT",
    "readiness_port": "ZTUNNEL_READINESS_PORT",
    "drain_seconds": "TERMINATION_GRACE_PERIOD_SECONDS",
    "log_level": "LOG_LEVEL",
    "access_log_interval": "ZTUNNEL_ACCESS_LOG_INTERVAL",
}


def _port(name: str, value: str | int) -> int:
    try:
        n = int(value)
    except ValueError:
        raise ConfigError(f"{name}: {value!r} is not a port number") from None
    if not 0 <= n <= 65535:
        raise ConfigError(f"{name}: {n} is out of range 0-65535")
    return n


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ztunnel", description="per-node ambient mesh proxy")
    p.add_argument("--node-name", help="this node's name (env NODE_NAME)")
    p.add_argument("--trust-domain", help="SPIFFE trust domain (env TRUST_DOMAIN)")
    p.add_argument("--zds-socket", help="cni agent's ZDS socket (env ZTUNNEL_ZDS_SOCKET)")
    p.add_argument("--ca-address", help="CA host:port (env CA_ADDRESS)")
    p.add_argument("--xds-address", help="discovery host:port (env XDS_ADDRESS)")
    p.add_argument("--admin-port", help="admin port on localhost (env ZTUNNEL_ADMIN_PORT)")
    p.add_argument("--stats-port", help="metrics port (env ZTUNNEL_STATS_PORT)")
    p.add_argument("--readiness-port", help="readiness port (env ZTUNNEL_READINESS_PORT)")
    p.add_argument("--drain-seconds", help="drain deadline on SIGTERM (env TERMINATION_GRACE_PERIOD_SECONDS)")
    p.add_argument("--log-level", help=f"one of {', '.join(LEVELS)} (env LOG_LEVEL)")
    p.add_argument(
        "--access-log-interval",
        help="seconds between access-log lines of a connection still open, 0 for none (env ZTUNNEL_ACCESS_LOG_INTERVAL)",
    )
    p.add_argument("--ready-file", help="write 'ready' here once ready")
    return p


def load(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Build a :class:`Config` from ``argv`` and ``env``; raise ConfigError naming the bad value."""
    env = os.environ if env is None else env
    args = _parser().parse_args(argv)
    raw: dict[str, str] = {}
    for field, var in _ENV.items():
        flag = getattr(args, field, None)
        if flag is not None:
            raw[field] = flag
        elif env.get(var):
            raw[field] = env[var]
    node = raw.get("node_name", "")
    if not node:
        raise ConfigError("--node-name / NODE_NAME: required")
    level = raw.get("log_level", "info").lower()
    if level not in LEVELS:
        raise ConfigError(f"--log-level / LOG_LEVEL: {level!r} is not one of {', '.join(LEVELS)}")
    drain = raw.get("drain_seconds", "5")
    try:
        drain_s = float(drain)
    except ValueError:
        raise ConfigError(f"--drain-seconds: {drain!r} is not a number") from None
    if drain_s < 0:
        raise ConfigError(f"--drain-seconds: {drain_s} is negative")
    interval = raw.get("access_log_interval", "300")
    try:
        interval_s = float(interval)
    except ValueError:
        raise ConfigError(f"--access-log-interval: {interval!r} is not a number") from None
    if not 0 <= interval_s < float("inf"):
        raise ConfigError(f"--access-log-interval: {interval_s} is not a number of seconds >= 0")
    td = raw.get("trust_domain", DEFAULT_TRUST_DOMAIN)
    if not td or "/" in td:
        raise ConfigError(f"--trust-domain: {td!r} is not a valid trust domain")
    return Config(
        node_name=node,
        trust_domain=td,
        zds_socket=raw.get("zds_socket", DEFAULT_SOCKET_PATH),
        ca_address=raw.get("ca_address", "127.0.0.1:15012"),
        xds_address=raw.get("xds_address", "127.0.0.1:15012"),
        admin_port=_port("--admin-port", raw.get("admin_port", 15000)),
        stats_port=_port("--stats-port", raw.get("stats_port", 15020)),
        readiness_port=_port("--readiness-port", raw.get("readiness_port", 15021)),
        drain_seconds=drain_s,
        log_level=level,
        ready_file=args.ready_file,
        access_log_interval=interval_s,
    )
