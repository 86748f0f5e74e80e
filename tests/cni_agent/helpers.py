"""A fake ztunnel ZDS client, throwaway pod netns, and the agent wired to its two servers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field

from cni import plugin
from cni.agent import Annotate, NodeAgent, is_netns
from cni.plugin import PluginServer
from cni.zds_server import ZdsServer
from mesh import zds
from mesh.model import Store

NODE = "node1"


@dataclass(frozen=True, slots=True)
class Received:
    """One request as the fake ztunnel saw it."""

    kind: str  # add | del | keep | snapshot_sent
    uid: str = ""
    name: str = ""
    namespace: str = ""
    service_account: str = ""
    netns_ok: bool = False  # the fd that came with an add was a network namespace
    acked_error: str = ""


class FakeZtunnel:
    """Connects like ztunnel/inpod.py: hello first, then one ack per request.

    ``fail[uid] = n`` answers the first ``n`` adds of ``uid`` with an error ack.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.received: asyncio.Queue[Received] = asyncio.Queue()
        self.fail: dict[str, int] = {}
        self.inodes: dict[str, int] = {}  # uid -> inode of the last netns fd received
        self.closed = asyncio.Event()
        self._sock: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None

    async def connect(self) -> FakeZtunnel:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, self.path)
            await zds.send_message(sock, zds.encode_hello())
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._task = asyncio.get_running_loop().create_task(self._run(sock))
        return self

    async def _run(self, sock: socket.socket) -> None:
        try:
            while True:
                data, fds = await zds.recv_message(sock)
                if not data and not fds:
                    return
                req = zds.decode_request(data, fds)
                error = ""
                if isinstance(req, zds.AddWorkload):
                    try:
                        # readlink gives "net:[ino]" for fds opened via /proc/<pid>/ns/net, the
                        # path for bind-mounted /run/netns/x: accept either, check it is a netns.
                        link = os.readlink(f"/proc/self/fd/{req.netns_fd}")
                        ok = is_netns(req.netns_fd) and (
                            link.startswith("net:") or link.startswith("/run/netns/")
                        )
                        self.inodes[req.uid] = os.fstat(req.netns_fd).st_ino
                    finally:
                        os.close(req.netns_fd)
                    if self.fail.get(req.uid, 0) > 0:
                        self.fail[req.uid] -= 1
                        error = "injected failure"
                    got = Received("add", req.uid, req.name, req.namespace, req.service_account, ok, error)
                elif isinstance(req, zds.DelWorkload):
                    got = Received("del", req.uid)
                elif isinstance(req, zds.KeepWorkload):
                    got = Received("keep", req.uid)
                else:
                    got = Received("snapshot_sent")
                await zds.send_message(sock, zds.encode_ack(error))
                self.received.put_nowait(got)
        except OSError:
            return
        finally:
            self.closed.set()

    async def next(self, timeout: float = 10.0) -> Received:
        async with asyncio.timeout(timeout):
            return await self.received.get()

    async def snapshot(self, timeout: float = 10.0) -> list[Received]:
        """Everything up to and including the next snapshot_sent."""
        out: list[Received] = []
        while not out or out[-1].kind != "snapshot_sent":
            out.append(await self.next(timeout))
        return out

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None


# -- netns ------------------------------------------------------------------------------------


def sh(*args: str) -> str:
    p = subprocess.run(args, capture_output=True, text=True, timeout=30)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: exit {p.returncode}: {p.stderr.strip()}")
    return p.stdout


@dataclass
class Netns:
    """Named pod namespaces for one test: ``cnia<pid><tag><n>``, all removed by :meth:`destroy`."""

    tag: str
    names: list[str] = field(default_factory=list)

    def add(self) -> str:
        name = f"cnia{os.getpid()}{self.tag}{len(self.names)}"
        self.names.append(name)
        sh("ip", "netns", "add", name)
        sh("ip", "-n", name, "link", "set", "lo", "up")
        return f"/run/netns/{name}"

    def delete(self, path: str) -> None:
        name = os.path.basename(path)
        sh("ip", "netns", "del", name)

    def destroy(self) -> None:
        for name in self.names:
            with contextlib.suppress(RuntimeError):
                sh("ip", "netns", "del", name)


@contextlib.contextmanager
def netns_set(tag: str) -> Iterator[Netns]:
    ns = Netns(tag)
    try:
        yield ns
    finally:
        ns.destroy()


def nft_text(netns_path: str) -> str:
    return sh("nsenter", f"--net={netns_path}", "nft", "-a", "list", "table", "inet", "istio-ambient")


# -- the agent and its servers ----------------------------------------------------------------


class Harness:
    """NodeAgent + ZdsServer + PluginServer on sockets in ``d``; restartable on the same state."""

    def __init__(self, d: str, store: Store, annotate: Annotate | None = None) -> None:
        self.dir = d
        self.annotate = annotate
        self.store = store
        self.zds_path = os.path.join(d, "zds.sock")
        self.plugin_path = os.path.join(d, "plugin.sock")
        self.state_dir = os.path.join(d, "state")
        self.agent: NodeAgent | None = None
        self.zds: ZdsServer | None = None
        self.plugin: PluginServer | None = None

    async def start(self) -> NodeAgent:
        agent = NodeAgent(
            NODE,
            self.store,
            zds_path=self.zds_path,
            plugin_socket=self.plugin_path,
            state_dir=self.state_dir,
            pod_wait=1.0,
            annotate=self.annotate,
        )
        server = ZdsServer(self.zds_path, agent)
        agent.attach_zds(server)
        await agent.start()
        await server.start()
        self.plugin = PluginServer(self.plugin_path, agent.handle_plugin)
        await self.plugin.start()
        self.agent, self.zds = agent, server
        return agent

    async def stop(self) -> None:
        if self.plugin is not None:
            await self.plugin.close()
            self.plugin = None
        if self.zds is not None:
            await self.zds.close()
            self.zds = None
        if self.agent is not None:
            await self.agent.stop()
            self.agent = None

    def cni(self, command: str, namespace: str, name: str, uid: str, netns: str) -> plugin.Output:
        return cni_call(self.plugin_path, command, namespace, name, uid, netns)

    async def acni(self, command: str, namespace: str, name: str, uid: str, netns: str) -> plugin.Output:
        return await asyncio.to_thread(self.cni, command, namespace, name, uid, netns)


def cni_call(
    agent_socket: str, command: str, namespace: str, name: str, uid: str, netns: str
) -> plugin.Output:
    """What the container runtime does: run the plugin with its env and stdin (blocking)."""
    args = f"IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name}"
    env = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": f"ctr-{namespace}-{name}",
        "CNI_NETNS": netns,
        "CNI_IFNAME": "eth0",
        "CNI_PATH": "/opt/cni/bin",
        "CNI_ARGS": f"{args};K8S_POD_UID={uid}" if uid else args,
    }
    conf = {
        "cniVersion": "1.0.0",
        "name": "test",
        "type": "ambient-cni-plugin",
        "agent_socket": agent_socket,
        "agent_timeout": 20,
        "prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "10.1.0.2/24"}]},
    }
    return plugin.run(env, json.dumps(conf).encode())
