"""Entry point of the `ambient-cni` node agent process.

Runs, until SIGTERM/SIGINT: a source of pods and namespaces (a :class:`sources.WorkloadSource`:
the control plane's local YAML file, or the Kubernetes API) feeding its own store, the :class:`~cni.agent.NodeAgent`, the CNI plugin
server it answers ADD/DEL on, and the ZDS server ztunnel connects to. Optionally installs the
CNI plugin into the host's CNI directories first. Stopping leaves every redirection rule in
place: enrolled pods keep failing closed until the agent is back.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import structlog

from cni import install
from cni.agent import Annotate, NodeAgent
from cni.enroll import REDIRECTION_ANNOTATION, REDIRECTION_ENABLED
from cni.plugin import DEFAULT_AGENT_SOCKET, PluginServer
from cni.zds_server import ZdsServer
from mesh import log as meshlog
from mesh import runtime, zds
from mesh.model import Store
from sources import WorkloadSource

log = structlog.get_logger(__name__)

DEFAULT_STATE_DIR = "/var/lib/ambient-cni"


class StartupError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ambient-cni", description="The ambient mesh's node agent.")
    p.add_argument("--node", required=True, help="this node's name: only its pods are enrolled")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--local-config", metavar="FILE", help="the control plane's local YAML file")
    src.add_argument("--kubernetes", action="store_true", help="watch pods and namespaces in the cluster")
    p.add_argument("--zds-socket", default=zds.DEFAULT_SOCKET_PATH, metavar="PATH")
    p.add_argument("--plugin-socket", default=DEFAULT_AGENT_SOCKET, metavar="PATH")
    p.add_argument("--state-dir", default=DEFAULT_STATE_DIR, metavar="DIR")
    p.add_argument("--install-plugin", action="store_true", help="install the CNI plugin on start")
    p.add_argument("--cni-bin-dir", default=install.DEFAULT_CNI_BIN_DIR, metavar="DIR")
    p.add_argument("--cni-conf-dir", default=install.DEFAULT_CNI_CONF_DIR, metavar="DIR")
    p.add_argument(
        "--plugin-binary",
        metavar="PATH",
        help="the static plugin to install (must exist); default: "
        f"{install.DEFAULT_PLUGIN_BINARY} if present, else a wrapper running this Python",
    )
    p.add_argument("--poll-interval", type=float, default=1.0, help="local mode: seconds between file checks")
    p.add_argument("--ready-file", metavar="PATH", help="written once the agent serves both sockets")
    p.add_argument("--log-level", default="info", choices=meshlog.LEVELS)
    return p


def kubernetes_annotator(api_client: Any) -> Annotate:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    core = client.CoreV1Api(api_client)

    async def annotate(namespace: str, name: str, enabled: bool) -> None:
        body = {
            "metadata": {"annotations": {REDIRECTION_ANNOTATION: REDIRECTION_ENABLED if enabled else None}}
        }
        try:
            await asyncio.to_thread(core.patch_namespaced_pod, name, namespace, body)
        except ApiException as e:
            if e.status == 404 and not enabled:
                return  # the pod is gone: nothing to remove
            raise OSError(f"annotating pod {namespace}/{name}: {e.status} {e.reason}") from None

    return annotate


SYNC_TIMEOUT = 120.0


def local_source(args: argparse.Namespace, store: Store) -> WorkloadSource:
    """The control plane's file, loaded now: a file it refuses stops the agent before it starts."""
    from sources.convert import ConfigError
    from sources.local import LocalSource

    local = LocalSource(args.local_config, store, poll_interval=args.poll_interval)
    try:
        local.load()
    except ConfigError as e:
        raise StartupError(f"--local-config: {e}") from None
    return local


def kubernetes_source(store: Store) -> tuple[WorkloadSource, Annotate]:
    """Namespaces and pods from the API server (no status write-back), and the pod annotator."""
    from kubernetes import client
    from kubernetes import config as kconfig

    from sources.kubernetes import NAMESPACES, PODS, KubernetesSource

    config: Any = kconfig
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    api = client.ApiClient()
    source = KubernetesSource(api, store, resources=(NAMESPACES, PODS), write_status=False)
    return source, kubernetes_annotator(api)


async def serve(args: argparse.Namespace) -> int:
    stop = runtime.stop_on_signals()
    store = Store()
    annotate: Annotate | None = None
    source: WorkloadSource
    if args.local_config:
        source = local_source(args, store)
    else:
        source, annotate = kubernetes_source(store)
    source.start()
    try:
        # Without a full list the agent would take every persisted pod for deleted.
        if not await source.wait_synced(timeout=SYNC_TIMEOUT):
            raise StartupError(f"the pod source did not sync within {SYNC_TIMEOUT:g} s")

        if args.install_plugin:
            try:
                install.install(
                    install.InstallConfig(
                        args.cni_bin_dir,
                        args.cni_conf_dir,
                        agent_socket=args.plugin_socket,
                        plugin_binary=args.plugin_binary,
                    )
                )
            except (install.InstallError, OSError) as e:
                raise StartupError(f"--install-plugin: {e}") from None

        agent = NodeAgent(
            args.node,
            source.store,
            zds_path=args.zds_socket,
            plugin_socket=args.plugin_socket,
            state_dir=args.state_dir,
            annotate=annotate,
        )
        zds_server = ZdsServer(args.zds_socket, agent)
        agent.attach_zds(zds_server)
        async with agent, zds_server, PluginServer(args.plugin_socket, agent.handle_plugin):
            runtime.write_ready_file(args.ready_file, f"{args.plugin_socket}\n{args.zds_socket}\n")
            log.info("cni agent ready", node=args.node)
            await stop.wait()
            log.info("stopping; redirection rules stay in place")
            agent.log_status()
    finally:
        await source.astop()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    meshlog.configure(args.log_level)

    async def _main() -> int:
        try:
            return await serve(args)
        except StartupError as e:
            log.error("cannot start", error=str(e))
            return 2

    return runtime.run(_main)


if __name__ == "__main__":
    sys.exit(main())
