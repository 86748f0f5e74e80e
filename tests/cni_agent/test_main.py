"""``ambient-cni`` as a process in local mode: plugin install, ADD, ZDS snapshot, clean SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator

import pytest

from cni import rules
from cni.main import build_parser
from tests.cni_agent.helpers import FakeZtunnel, Netns, cni_call, netns_set

ROOT = os.geteuid() == 0 and all(shutil.which(t) for t in ("ip", "nft", "nsenter", "unshare"))

MANIFEST = """\
apiVersion: v1
kind: Node
metadata: {name: node-a}
---
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop}
spec: {nodeName: node-a, serviceAccountName: web}
status: {podIP: 10.0.1.2}
"""


def test_parser_requires_a_source(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--node", "n"])
    assert "--local-config" in capsys.readouterr().err
    args = build_parser().parse_args(["--node", "n", "--kubernetes"])
    assert args.zds_socket == "/var/run/ztunnel/ztunnel.sock"
    assert args.cni_bin_dir == "/opt/cni/bin" and args.cni_conf_dir == "/etc/cni/net.d"


class Proc:
    """The agent process; its stderr (JSON log lines) is read by a task this object owns."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._new = asyncio.Event()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            self.lines.append(raw.decode(errors="replace"))
            self._new.set()
        self._new.set()

    def events(self) -> list[str]:
        out = []
        for line in self.lines:
            with contextlib.suppress(ValueError):
                out.append(str(json.loads(line).get("event", "")))
        return out

    async def wait_event(self, event: str, timeout: float = 20.0) -> None:
        async with asyncio.timeout(timeout):
            while event not in self.events():
                if self._reader.done():
                    raise AssertionError(f"agent exited before {event!r}:\n{''.join(self.lines)}")
                self._new.clear()
                await self._new.wait()

    async def close(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        await self._reader


@pytest.fixture
def workdir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="cniam", dir="/tmp")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def netns() -> Iterator[Netns]:
    with netns_set("m") as n:
        yield n


def write_inputs(workdir: str) -> str:
    conf_dir = os.path.join(workdir, "net.d")
    os.makedirs(conf_dir)
    with open(os.path.join(conf_dir, "10-bridge.conflist"), "w") as f:
        json.dump({"cniVersion": "1.0.0", "name": "podnet", "plugins": [{"type": "bridge"}]}, f)
    with open(os.path.join(workdir, "mesh.yaml"), "w") as f:
        f.write(MANIFEST)
    return conf_dir


def check_installed(workdir: str) -> None:
    assert os.path.exists(os.path.join(workdir, "ready"))
    assert os.access(os.path.join(workdir, "bin", "ambient-cni-plugin"), os.X_OK)
    with open(os.path.join(workdir, "net.d", "10-bridge.conflist")) as f:
        assert json.load(f)["plugins"][-1]["type"] == "ambient-cni-plugin"


@pytest.fixture
async def agent_proc(workdir: str) -> AsyncIterator[Proc]:
    conf_dir = write_inputs(workdir)
    argv = [
        sys.executable,
        "-m",
        "cni.main",
        "--node",
        "node-a",
        "--local-config",
        os.path.join(workdir, "mesh.yaml"),
        "--zds-socket",
        os.path.join(workdir, "zds.sock"),
        "--plugin-socket",
        os.path.join(workdir, "plugin.sock"),
        "--state-dir",
        os.path.join(workdir, "state"),
        "--ready-file",
        os.path.join(workdir, "ready"),
        "--install-plugin",
        "--cni-bin-dir",
        os.path.join(workdir, "bin"),
        "--cni-conf-dir",
        conf_dir,
    ]
    proc = Proc(await asyncio.create_subprocess_exec(*argv, stderr=asyncio.subprocess.PIPE, cwd="/"))
    try:
        yield proc
    finally:
        await proc.close()


@pytest.mark.netns
@pytest.mark.skipif(not ROOT, reason="needs root, ip, nft, nsenter, unshare")
async def test_agent_process_local_mode(agent_proc: Proc, workdir: str, netns: Netns) -> None:
    await agent_proc.wait_event("cni agent ready")
    check_installed(workdir)

    pod = netns.add()
    out = await asyncio.to_thread(
        cni_call, os.path.join(workdir, "plugin.sock"), "ADD", "shop", "web-1", "", pod
    )
    assert out.exit_code == 0, out.stdout
    assert rules.verify(pod) == []

    zt = await FakeZtunnel(os.path.join(workdir, "zds.sock")).connect()
    try:
        got = await zt.snapshot()
        assert [(r.kind, r.namespace, r.name, r.service_account, r.netns_ok) for r in got] == [
            ("add", "shop", "web-1", "web", True),
            ("snapshot_sent", "", "", "", False),
        ]
        agent_proc.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            assert await agent_proc.proc.wait() == 0
    finally:
        await zt.close()
    assert rules.verify(pod) == []  # the rules outlive the agent: the pod keeps failing closed
    assert not await asyncio.to_thread(os.path.exists, os.path.join(workdir, "zds.sock"))
