"""Installing the static Go plugin (the image's binary) instead of the Python wrapper.

tests/cni_agent/test_install.py covers the conflist side and the wrapper fallback; here: which
plugin gets installed, that it is copied byte for byte and idempotently, and that the installed
binary serves a runtime's ADD/DEL through a real agent socket.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

from cni import install, main
from cni.plugin import AgentReply, AgentRequest, PluginServer

CONFLIST = {"cniVersion": "1.0.0", "name": "podnet", "plugins": [{"type": "bridge"}]}


def dirs(tmp: Path, plugin_binary: str | None = None, python: str = sys.executable) -> install.InstallConfig:
    conf = tmp / "net.d"
    conf.mkdir(exist_ok=True)
    if not (conf / "10-bridge.conflist").exists():
        (conf / "10-bridge.conflist").write_text(json.dumps(CONFLIST))
    return install.InstallConfig(
        str(tmp / "bin"),
        str(conf),
        agent_socket=str(tmp / "a.sock"),
        python=python,
        plugin_binary=plugin_binary,
    )


def test_installs_the_binary_byte_for_byte_and_idempotently(go_plugin: Path, tmp_path: Path) -> None:
    cfg = dirs(tmp_path, plugin_binary=str(go_plugin))
    first = install.install(cfg)
    assert first.binary_changed and first.conflist_changed
    installed = Path(first.binary)
    assert installed.read_bytes() == go_plugin.read_bytes()
    assert installed.stat().st_mode & 0o777 == 0o755
    assert not [p for p in os.listdir(cfg.cni_bin_dir) if p.endswith(".tmp")]
    stamp = installed.stat().st_mtime_ns

    again = install.install(cfg)
    assert not again.binary_changed and not again.conflist_changed
    assert installed.stat().st_mtime_ns == stamp

    # A new image brings a new binary: replaced (by rename, so a running copy is never half-written).
    newer = tmp_path / "newer"
    newer.write_bytes(go_plugin.read_bytes() + b"\0")
    inode = installed.stat().st_ino
    upgraded = install.install(dirs(tmp_path, plugin_binary=str(newer)))
    assert upgraded.binary_changed and not upgraded.conflist_changed
    assert installed.read_bytes() == newer.read_bytes() and installed.stat().st_ino != inode

    assert install.uninstall(cfg).binary_changed
    assert not installed.exists()


def test_a_wrapper_left_by_an_older_agent_is_replaced(go_plugin: Path, tmp_path: Path) -> None:
    old = install.install(dirs(tmp_path, plugin_binary=None, python="/usr/bin/python3"))
    if Path(install.DEFAULT_PLUGIN_BINARY).exists():  # inside the image: already the binary
        assert Path(old.binary).read_bytes() == Path(install.DEFAULT_PLUGIN_BINARY).read_bytes()
    else:
        assert Path(old.binary).read_text() == install.wrapper_script("/usr/bin/python3")
    new = install.install(dirs(tmp_path, plugin_binary=str(go_plugin)))
    assert new.binary_changed and Path(new.binary).read_bytes() == go_plugin.read_bytes()


def test_an_explicit_binary_must_exist(tmp_path: Path) -> None:
    cfg = dirs(tmp_path, plugin_binary=str(tmp_path / "absent"))
    with pytest.raises(install.InstallError, match="does not exist"):
        install.install(cfg)
    assert not (tmp_path / "bin" / install.PLUGIN_TYPE).exists()
    assert json.loads((tmp_path / "net.d" / "10-bridge.conflist").read_text()) == CONFLIST
    with pytest.raises(install.InstallError, match="cannot read"):
        install.install(dirs(tmp_path, plugin_binary=str(tmp_path)))


def test_the_agent_passes_plugin_binary() -> None:
    args = main.build_parser().parse_args(["--node", "n", "--kubernetes", "--plugin-binary", "/x/plugin"])
    assert args.plugin_binary == "/x/plugin"
    assert main.build_parser().parse_args(["--node", "n", "--kubernetes"]).plugin_binary is None


async def test_installed_binary_serves_add_and_del(go_plugin: Path, tmp_path: Path) -> None:
    """What the kubelet's runtime does on a node: exec <bin-dir>/ambient-cni-plugin, cwd /, a bare env."""

    def setup() -> tuple[install.InstallResult, dict[str, str]]:
        result = install.install(dirs(tmp_path, plugin_binary=str(go_plugin)))
        return result, json.loads(Path(result.conflist).read_text())["plugins"][-1]

    result, entry = await asyncio.to_thread(setup)
    seen: list[AgentRequest] = []

    async def agent(req: AgentRequest) -> AgentReply:
        seen.append(req)
        return AgentReply(True)

    prev = {"cniVersion": "1.0.0", "ips": [{"address": "10.1.0.7/24"}]}
    net = {"cniVersion": "1.0.0", "name": "podnet", **entry}
    environ = {
        "CNI_CONTAINERID": "ctr",
        "CNI_NETNS": "/var/run/netns/p",
        "CNI_IFNAME": "eth0",
        "CNI_PATH": str(tmp_path / "bin"),
        "CNI_ARGS": "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1;K8S_POD_UID=u1",
    }

    def call(command: str, stdin: Mapping[str, object]) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [result.binary],
            input=json.dumps(stdin).encode(),
            env={**environ, "CNI_COMMAND": command},
            capture_output=True,
            timeout=60,
            cwd="/",
        )

    async with PluginServer(entry["agent_socket"], agent):
        add = await asyncio.to_thread(call, "ADD", {**net, "prevResult": prev})
        dele = await asyncio.to_thread(call, "DEL", net)
    assert add.returncode == 0 and json.loads(add.stdout) == prev, add
    assert dele.returncode == 0 and dele.stdout == b"", dele
    assert [(r.command, r.pod_namespace, r.pod_name, r.pod_uid, r.ips) for r in seen] == [
        ("ADD", "shop", "web-1", "u1", ("10.1.0.7",)),
        ("DEL", "shop", "web-1", "u1", ()),
    ]


def test_image_chart_and_agent_agree_on_the_binary_path() -> None:
    """The Dockerfile puts the binary where the agent looks by default and the chart points."""
    repo = Path(__file__).resolve().parents[2]
    dockerfile = (repo / "Dockerfile").read_text(encoding="utf-8")
    daemonset = (repo / "charts" / "cni" / "templates" / "daemonset.yaml").read_text(encoding="utf-8")
    assert f"COPY --from=plugin /out/ambient-cni-plugin {install.DEFAULT_PLUGIN_BINARY}\n" in dockerfile
    assert "CGO_ENABLED=0" in dockerfile and "COPY cni/plugin-go/ ./" in dockerfile
    assert f"- --plugin-binary={install.DEFAULT_PLUGIN_BINARY}\n" in daemonset
