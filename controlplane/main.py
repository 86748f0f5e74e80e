"""Entry point of the ``ambient-controlplane`` process (local mode, or ``--kubernetes``).

Start-up is ordered so that anything a user got wrong (flags, the CA directory, the YAML file,
the listen address) stops the process with exit status 2 and one clear line on stderr before
anything is served, and so that the files other processes wait for (``root-cert.pem``, the node
tokens, the ready file) exist only once the control plane can actually answer.

State directory layout::

    DIR/ca/                    the generated root (Istio's cacerts layout), unless --cacerts
    DIR/root-cert.pem          the mesh root clients trust
    DIR/token-signing-key.pem  ES256 key of the node tokens (0600, local mode)
    DIR/tokens/<node>.token    one per Node of the file (0600, local mode)

In Kubernetes mode the state comes from list/watch of the API server, callers authenticate with
projected service-account tokens checked by TokenReview, no node tokens are written, and the
root is published as the ConfigMap ``istio-ca-root-cert`` in every namespace
(:mod:`controlplane.rootcert`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import os
import ssl
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import structlog

from controlplane import xds
from controlplane.auth import (
    AuthenticationError,
    Authenticator,
    AuthenticatorUnavailable,
    LocalTokenAuthenticator,
    TokenReviewAuthenticator,
)
from controlplane.ca import bearer_token
from controlplane.jwks import DEFAULT_REFRESH as DEFAULT_JWKS_REFRESH
from controlplane.jwks import JwksCache
from controlplane.rootcert import RootCertController
from controlplane.server import DEFAULT_PORT, ServerError, parse_listen, start_server
from controlplane.tokens import DEFAULT_TOKEN_TTL, TokenError, TokenIssuer
from controlplane.waypoint_controller import KubeApi, Reconciler, WaypointController, WaypointSettings
from mesh import log as meshlog
from mesh import runtime
from mesh.files import write_atomic
from mesh.identity import Identity, IdentityError
from mesh.model import Delta, Kind, Store, Workload
from mesh.model.objects import LABEL_GATEWAY_NAME
from mesh.pki import CertificateAuthority, PkiError
from mesh.tls import ROOT_CERT_FILE
from sources import WorkloadSource
from sources.convert import ConfigError, ConvertOptions
from sources.kubernetes import KubernetesSource
from sources.local import DEFAULT_POLL_INTERVAL, LocalSource

log = structlog.get_logger(__name__)

PROG = "ambient-controlplane"
CA_SUBDIR = "ca"
EXIT_USAGE = 2


class StartupError(Exception):
    """A problem the user must fix before the control plane can start; printed as is."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="The mesh control plane: node-bound CA and discovery on one TLS gRPC port.",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--local-config", metavar="FILE", help="YAML file of Kubernetes objects (local mode)")
    mode.add_argument(
        "--kubernetes",
        action="store_true",
        help="watch the Kubernetes API (in-cluster config or --kubeconfig)",
    )
    p.add_argument(
        "--kubeconfig", metavar="PATH", help="--kubernetes: kubeconfig to use instead of in-cluster"
    )
    p.add_argument(
        "--sync-timeout",
        metavar="SECONDS",
        type=float,
        default=60.0,
        help="--kubernetes: how long to wait for the first full list before giving up",
    )
    p.add_argument("--state-dir", metavar="DIR", help="where the CA, root cert and node tokens live")
    p.add_argument(
        "--listen", metavar="ADDR", default=f"127.0.0.1:{DEFAULT_PORT}", help="HOST:PORT to serve on"
    )
    p.add_argument("--trust-domain", default="cluster.local", help="SPIFFE trust domain of the mesh")
    p.add_argument("--cacerts", metavar="DIR", help="plugged-in CA in Istio's cacerts layout")
    p.add_argument("--ready-file", metavar="PATH", help="write the bound address here once serving")
    p.add_argument(
        "--token-ttl",
        metavar="SECONDS",
        type=float,
        default=DEFAULT_TOKEN_TTL.total_seconds(),
        help="lifetime of the node tokens written at start (default: one year)",
    )
    p.add_argument(
        "--poll-interval",
        metavar="SECONDS",
        type=float,
        default=DEFAULT_POLL_INTERVAL,
        help="how often to check the local config file for changes",
    )
    p.add_argument(
        "--jwks-ca-file",
        metavar="PEM",
        help="CA bundle to verify RequestAuthentication jwksUri servers with (default: the system's)",
    )
    p.add_argument(
        "--jwks-refresh",
        metavar="SECONDS",
        type=float,
        default=DEFAULT_JWKS_REFRESH,
        help="how often to re-fetch every jwksUri (default: 20 minutes, as istiod)",
    )
    wp = p.add_mutually_exclusive_group()
    wp.add_argument(
        "--waypoint-image",
        metavar="IMAGE",
        help="--kubernetes: run the waypoint controller; waypoint Deployments run this image",
    )
    wp.add_argument(
        "--no-waypoint-controller",
        action="store_true",
        help="--kubernetes: do not run the waypoint controller (the default without --waypoint-image)",
    )
    p.add_argument(
        "--waypoint-image-pull-policy",
        default="IfNotPresent",
        choices=("Always", "IfNotPresent", "Never"),
        help="imagePullPolicy of the waypoint containers",
    )
    p.add_argument(
        "--waypoint-ca-address",
        metavar="HOST:PORT",
        help="where waypoints reach the CA and discovery "
        "(default: controlplane.$POD_NAMESPACE.svc:15012, istio-system without POD_NAMESPACE)",
    )
    p.add_argument("--log-level", default="info", choices=meshlog.LEVELS)
    return p


def validate(args: argparse.Namespace) -> None:
    """Flag checks argparse cannot express; each error names the flag."""
    if not args.local_config and not args.kubernetes:
        raise StartupError("one of --local-config FILE or --kubernetes is required")
    if not args.state_dir:
        raise StartupError("--state-dir DIR is required")
    if args.jwks_refresh <= 0:
        raise StartupError(f"--jwks-refresh must be positive, not {args.jwks_refresh}")
    if args.jwks_ca_file:
        try:
            ssl.create_default_context(cafile=args.jwks_ca_file)
        except (OSError, ssl.SSLError) as e:
            raise StartupError(f"--jwks-ca-file {args.jwks_ca_file}: {e}") from None
    if args.local_config and not Path(args.local_config).is_file():
        raise StartupError(f"--local-config: {args.local_config} is not a readable file")
    if args.kubeconfig and not args.kubernetes:
        raise StartupError("--kubeconfig only makes sense with --kubernetes")
    if args.kubeconfig and not Path(args.kubeconfig).is_file():
        raise StartupError(f"--kubeconfig: {args.kubeconfig} is not a readable file")
    if not args.sync_timeout > 0:
        raise StartupError(f"--sync-timeout must be positive, not {args.sync_timeout}")
    state = Path(args.state_dir)
    if state.exists() and not state.is_dir():
        raise StartupError(f"--state-dir: {state} exists and is not a directory")
    if args.cacerts and not Path(args.cacerts).is_dir():
        raise StartupError(f"--cacerts: {args.cacerts} is not a directory")
    try:
        parse_listen(args.listen)
    except ServerError as e:
        raise StartupError(f"--listen: {e}") from None
    try:
        Identity(args.trust_domain, "default", "default")
    except IdentityError as e:
        raise StartupError(f"--trust-domain: {e}") from None
    if not args.token_ttl > 0:
        raise StartupError(f"--token-ttl must be positive, not {args.token_ttl}")
    if not args.poll_interval > 0:
        raise StartupError(f"--poll-interval must be positive, not {args.poll_interval}")
    if args.waypoint_image is not None and not args.kubernetes:
        raise StartupError("--waypoint-image only makes sense with --kubernetes")
    if args.waypoint_image is not None and (
        not args.waypoint_image.strip() or any(c.isspace() for c in args.waypoint_image)
    ):
        raise StartupError(f"--waypoint-image: {args.waypoint_image!r} is not an image reference")
    if args.waypoint_ca_address is not None:
        host, sep, port = args.waypoint_ca_address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise StartupError(f"--waypoint-ca-address: {args.waypoint_ca_address!r} is not HOST:PORT")


def load_ca(args: argparse.Namespace) -> CertificateAuthority:
    state = Path(args.state_dir)
    try:
        if args.cacerts:
            ca = CertificateAuthority.load_cacerts(args.cacerts, args.trust_domain)
        else:
            ca = CertificateAuthority.load_or_generate(state / CA_SUBDIR, args.trust_domain)
    except PkiError as e:
        raise StartupError(f"CA: {e}") from None
    write_atomic(state / ROOT_CERT_FILE, ca.roots_pem.encode(), 0o644)
    return ca


@dataclass(frozen=True, slots=True)
class Prepared:
    """Everything made before serving: built synchronously, so start-up errors come first."""

    ca: CertificateAuthority
    store: Store
    source: WorkloadSource
    authenticator: Authenticator
    issuer: TokenIssuer | None  # local mode only
    token_ttl: dt.timedelta
    api_client: Any = None  # Kubernetes mode: closed at shutdown
    waypoints: WaypointSettings | None = None  # Kubernetes mode with --waypoint-image
    watch_events: WatchEvents | None = None  # Kubernetes mode


# Connections to the API server: one held by each watch (the source's resources and the root
# ConfigMap's), plus the controllers', TokenReview's and status writes' calls. The client's
# default (5 per CPU) would make urllib3 open and discard connections ("pool is full").
API_POOL_SIZE = 32


def kubernetes_client(kubeconfig: str | None) -> Any:
    """An ApiClient from ``kubeconfig``, or the in-cluster service account when none is given."""
    from kubernetes import client, config

    cfg: Any = config  # the kubernetes package is untyped
    try:
        if kubeconfig:
            conf = client.Configuration()
            conf.connection_pool_maxsize = API_POOL_SIZE
            return cfg.new_client_from_config(config_file=kubeconfig, client_configuration=conf)
        cfg.load_incluster_config()
    except cfg.ConfigException as e:
        raise StartupError(f"--kubernetes: no usable API server configuration ({e})") from None
    conf = client.Configuration.get_default_copy()
    conf.connection_pool_maxsize = API_POOL_SIZE
    return client.ApiClient(conf)


class WatchEvents:
    """The Kubernetes source's ``on_event`` hook, relayed to whoever listens (the waypoint
    controller, made after the source)."""

    def __init__(self) -> None:
        self.listener: Callable[[str, str, Mapping[str, Any]], None] | None = None

    def __call__(self, plural: str, etype: str, obj: Mapping[str, Any]) -> None:
        if self.listener is not None:
            self.listener(plural, etype, obj)


def prepare_kubernetes(args: argparse.Namespace) -> Prepared:
    api_client = kubernetes_client(args.kubeconfig)
    store = Store()
    events = WatchEvents()
    source = KubernetesSource(
        api_client, store, options=ConvertOptions(trust_domain=args.trust_domain), on_event=events
    )
    state = Path(args.state_dir)
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca = load_ca(args)
    authenticator = TokenReviewAuthenticator(api_client)
    return Prepared(
        ca, store, source, authenticator, None, dt.timedelta(0), api_client, waypoint_settings(args), events
    )


def waypoint_settings(args: argparse.Namespace) -> WaypointSettings | None:
    """What the waypoint controller needs, or None when it is not to run."""
    if args.no_waypoint_controller or not args.waypoint_image:
        return None
    namespace = os.environ.get("POD_NAMESPACE") or "istio-system"
    return WaypointSettings(
        image=args.waypoint_image,
        ca_address=args.waypoint_ca_address or f"controlplane.{namespace}.svc:{DEFAULT_PORT}",
        trust_domain=args.trust_domain,
        image_pull_policy=args.waypoint_image_pull_policy,
    )


def waypoint_pods(workloads: Iterable[Workload]) -> list[tuple[str, str, str]]:
    """(namespace, gateway, node) of the waypoint pods local mode's controller made."""
    return sorted(
        (w.namespace, w.labels[LABEL_GATEWAY_NAME], w.node)
        for w in workloads
        if LABEL_GATEWAY_NAME in w.labels and w.service_account == w.labels[LABEL_GATEWAY_NAME]
    )


def prepare(args: argparse.Namespace) -> Prepared:
    if args.kubernetes:
        return prepare_kubernetes(args)
    # The file first: a typo in it should not leave a fresh CA behind in a new state directory.
    store = Store()
    source = LocalSource(
        args.local_config,
        store,
        poll_interval=args.poll_interval,
        options=ConvertOptions(trust_domain=args.trust_domain),
    )
    try:
        source.load()
    except ConfigError as e:
        raise StartupError(f"--local-config: {e}") from None
    state = Path(args.state_dir)
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca = load_ca(args)
    try:
        issuer = TokenIssuer.load_or_create(state)
    except TokenError as e:
        raise StartupError(str(e)) from None
    ttl = dt.timedelta(seconds=args.token_ttl)
    issuer.write_node_tokens(state, sorted(store.snapshot().nodes), ttl=ttl)
    issuer.write_waypoint_tokens(state, waypoint_pods(store.snapshot().workloads.values()), ttl=ttl)
    return Prepared(ca, store, source, LocalTokenAuthenticator(issuer), issuer, ttl)


def xds_authenticate(authenticator: Authenticator) -> xds.Authenticator:
    """Discovery streams need the same Bearer node token as CreateCertificate."""

    async def authenticate(metadata: xds.Metadata) -> str:
        md = {k.lower(): v if isinstance(v, str) else v.decode(errors="replace") for k, v in metadata}
        try:
            caller = await authenticator.authenticate(bearer_token(md))
        except AuthenticationError as e:
            raise xds.AuthenticationFailed(str(e)) from None
        except AuthenticatorUnavailable as e:
            raise xds.AuthenticationFailed(str(e), grpc.StatusCode.UNAVAILABLE) from None
        return f"{caller.namespace}/{caller.service_account}"

    return authenticate


async def serve(args: argparse.Namespace, p: Prepared) -> int:
    stop = runtime.stop_on_signals()
    state = Path(args.state_dir)

    issuer = p.issuer

    def new_node_tokens(delta: Delta) -> None:
        # A node (or a waypoint) added to the file by a reload gets its token without a restart.
        added = delta.upserted_keys(Kind.NODE) - set(delta.previous.nodes)
        if added and issuer is not None:
            issuer.write_node_tokens(state, sorted(added), ttl=p.token_ttl)
        new_pods = delta.upserted_keys(Kind.WORKLOAD) - set(delta.previous.workloads)
        waypoints = waypoint_pods(delta.snapshot.workloads[uid] for uid in new_pods)
        if waypoints and issuer is not None:
            issuer.write_waypoint_tokens(state, waypoints, ttl=p.token_ttl)

    unsubscribe = p.store.subscribe(new_node_tokens)
    authenticator = p.authenticator
    controller: WaypointController | None = None
    root_cert: RootCertController | None = None
    servicers: list[xds.DiscoveryServicer] = []

    jwks = JwksCache(
        p.store,
        refresh=args.jwks_refresh,
        ssl_context=ssl.create_default_context(cafile=args.jwks_ca_file) if args.jwks_ca_file else None,
    )

    def register_discovery(grpc_server: Any) -> None:
        servicers.append(
            xds.register(grpc_server, p.store, authenticate=xds_authenticate(authenticator), jwks=jwks)
        )

    try:
        server = await start_server(args.listen, p.ca, p.store, authenticator, [register_discovery])
    except ServerError as e:
        unsubscribe()
        for s in servicers:
            s.close()
        raise StartupError(str(e)) from None
    try:
        jwks.start()
        p.source.start()
        # Serve only a complete picture: before the first full list, every node would be refused
        # certificates for pods it does run. (The local file was loaded by prepare(): no wait.)
        if not await p.source.wait_synced(args.sync_timeout):
            raise StartupError(
                f"--kubernetes: the API server was not fully listed within {args.sync_timeout:g}s "
                "(see the log for the failing resource)"
            )
        if args.kubernetes:
            # After the first full list: every namespace there is gets the root ConfigMap.
            root_cert = RootCertController(p.store, p.api_client, p.ca.roots_pem)
            root_cert.start()
        if p.waypoints is not None:
            # After the first full list: the store then holds every Gateway there is.
            controller = WaypointController(p.store, Reconciler(KubeApi(p.api_client), p.waypoints))
            if p.watch_events is not None:
                p.watch_events.listener = controller.on_watch_event
            controller.start()
        elif args.kubernetes:
            log.info(
                "waypoint controller not running",
                reason="no --waypoint-image"
                if not args.no_waypoint_controller
                else "--no-waypoint-controller",
            )
        runtime.write_ready_file(args.ready_file, server.address)
        log.info(
            "control plane ready",
            address=server.address,
            state_dir=str(state),
            trust_domain=args.trust_domain,
            mode="kubernetes" if args.kubernetes else "local",
            nodes=len(p.store.snapshot().nodes),
        )
        await stop.wait()
        log.info("stopping control plane")
    finally:
        if p.watch_events is not None:
            p.watch_events.listener = None
        if controller is not None:
            await controller.aclose()
        if root_cert is not None:
            await root_cert.aclose()
        unsubscribe()
        await jwks.aclose()
        await p.source.astop()
        if p.api_client is not None:
            p.api_client.close()
        for s in servicers:
            s.close()
        await server.stop()
    return 0


async def _serve_or_report(args: argparse.Namespace, prepared: Prepared) -> int:
    try:
        return await serve(args, prepared)
    except StartupError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        validate(args)
    except StartupError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return EXIT_USAGE
    meshlog.configure(args.log_level)
    try:
        prepared = prepare(args)
    except (StartupError, OSError) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return EXIT_USAGE
    return runtime.run(functools.partial(_serve_or_report, args, prepared))


if __name__ == "__main__":
    sys.exit(main())
