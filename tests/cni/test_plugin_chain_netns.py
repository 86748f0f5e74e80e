"""Our plugin chained behind Debian's real bridge + host-local, run the way a runtime runs a conflist.

No ``cnitool`` on Debian, so :func:`run_chain` is a minimal runtime: it finds each plugin by its
``type`` in ``CNI_PATH``, feeds it the network config with ``name``, ``cniVersion`` and the previous
plugin's result as ``prevResult`` on stdin and the CNI variables in the environment, in order for
ADD and in reverse for DEL (with the cached final result). The whole chain runs inside a "node"
netns so the bridge lives (and dies) there; the pod is a second netns. It runs once with the
Python plugin and once with the static Go binary (``plugin_exe``, tests/cni/conftest.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cni import rules
from cni.plugin import AgentReply, AgentRequest, PluginServer
from tests.cni.netnshelp import have_root_tools, run
from tests.cni.pluginexe import PluginExe

DEBIAN_CNI = Path("/usr/lib/cni")

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(not have_root_tools(), reason="needs root, ip, nft, nsenter, unshare"),
    pytest.mark.skipif(
        not (DEBIAN_CNI / "bridge").exists(), reason="apt-get install -y containernetworking-plugins"
    ),
]


@dataclass
class Env:
    root: Path
    node: str
    pod: str

    @property
    def pod_path(self) -> str:
        return f"/run/netns/{self.pod}"

    @property
    def node_path(self) -> str:
        return f"/run/netns/{self.node}"

    @property
    def cni_path(self) -> Path:
        return self.root / "bin"

    @property
    def ipam_dir(self) -> Path:
        return self.root / "ipam"

    @property
    def socket(self) -> str:
        return str(self.root / "agent.sock")


@pytest.fixture
def chain_env(plugin_exe: PluginExe) -> Iterator[Env]:
    root = Path(tempfile.mkdtemp(prefix="cnic", dir="/tmp"))
    e = Env(root, node=f"cnit{os.getpid()}cn", pod=f"cnit{os.getpid()}cp")
    try:
        e.cni_path.mkdir()
        for p in ("bridge", "host-local", "loopback"):
            (e.cni_path / p).symlink_to(DEBIAN_CNI / p)
        plugin_exe.install_as(e.cni_path / "ambient-cni")
        run("ip", "netns", "add", e.node)
        run("ip", "netns", "add", e.pod)
        yield e
    finally:
        for ns in (e.pod, e.node):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def conflist(e: Env) -> dict[str, Any]:
    subnet = f"10.{200 + os.getpid() % 50}.{os.getpid() % 250}.0/24"
    return {
        "cniVersion": "1.0.0",
        "name": f"cnitest{os.getpid()}",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": True,
                "ipMasq": False,
                "ipam": {
                    "type": "host-local",
                    "subnet": subnet,
                    "dataDir": str(e.ipam_dir),
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            },
            {"type": "ambient-cni", "agent_socket": e.socket, "agent_timeout": 20},
        ],
    }


async def invoke(e: Env, plugin_conf: dict[str, Any], command: str, container: str) -> dict[str, Any] | None:
    """Run one plugin as a runtime does: exec by type from CNI_PATH, inside the node netns."""
    environ = {
        "PATH": os.environ.get("PATH", ""),
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": container,
        "CNI_NETNS": e.pod_path,
        "CNI_IFNAME": "eth0",
        "CNI_PATH": str(e.cni_path),
        "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1;K8S_POD_INFRA_CONTAINER_ID={container}",
    }
    exe = e.cni_path / plugin_conf["type"]
    proc = await asyncio.create_subprocess_exec(
        "nsenter",
        f"--net={e.node_path}",
        "--",
        str(exe),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=environ,
    )
    try:
        async with asyncio.timeout(30):
            out, err = await proc.communicate(json.dumps(plugin_conf).encode())
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if proc.returncode != 0:
        raise AssertionError(f"{plugin_conf['type']} {command}: exit {proc.returncode}: {out!r} {err!r}")
    return json.loads(out) if out.strip() else None


async def run_chain(
    e: Env, conf: dict[str, Any], command: str, container: str, cached: Any = None
) -> list[Any]:
    """Results of each plugin in call order (the last ADD result is what the runtime caches)."""
    plugins = conf["plugins"] if command == "ADD" else list(reversed(conf["plugins"]))
    prev = cached
    results: list[Any] = []
    for p in plugins:
        net = {"cniVersion": conf["cniVersion"], "name": conf["name"], **p}
        if prev is not None:
            net["prevResult"] = prev
        result = await invoke(e, net, command, container)
        results.append(result)
        if command == "ADD":
            prev = result
    return results


async def test_chain_add_then_del(chain_env: Env) -> None:
    e = chain_env
    seen: list[AgentRequest] = []

    async def agent(req: AgentRequest) -> AgentReply:
        seen.append(req)
        if req.command == "ADD":
            await asyncio.to_thread(rules.apply, req.netns)
        elif req.command == "DEL" and req.netns:
            await asyncio.to_thread(rules.remove, req.netns)
        return AgentReply(True)

    conf = conflist(e)
    container = f"ctr{os.getpid()}"
    async with PluginServer(e.socket, agent):
        bridge_result, result = await run_chain(e, conf, "ADD", container)
        assert result == bridge_result  # prevResult passed through unchanged
        # Redirection is in place by the time the chain returns: before any app could start.
        assert await asyncio.to_thread(rules.verify, e.pod_path) == []
        assert [r.command for r in seen] == ["ADD"]
        pod_ip = result["ips"][0]["address"].split("/")[0]
        assert seen[0].ips == (pod_ip,)
        assert seen[0].netns == e.pod_path and seen[0].container_id == container
        addrs = run("ip", "-n", e.pod, "-j", "-4", "addr", "show", "dev", "eth0")
        assert pod_ip in addrs
        assert any(container in f.read_text() for f in e.ipam_dir.rglob("*") if f.is_file())

        await run_chain(e, conf, "DEL", container, cached=result)
        assert [r.command for r in seen] == ["ADD", "DEL"]
        assert (await asyncio.to_thread(rules.read, e.pod_path)).empty
        assert not any(container in f.read_text() for f in e.ipam_dir.rglob("*") if f.is_file())
        # DEL again is fine (idempotent), and so is DEL once the agent is gone.
        await run_chain(e, conf, "DEL", container, cached=result)
    await run_chain(e, conf, "DEL", container, cached=result)
