"""A real ztunnel process, for tests that must kill one (``kill -9``) or watch it from outside.

``python -m tests.ztunnel.ztunnel_process --xds HOST:PORT --ca-dir DIR --zds PATH --node NAME``
runs one :class:`~ztunnel.app.Ztunnel` on the production event loop (uvloop), fed by the real
discovery client from the test's discovery server and signing with the test's CA (saved in the
cacerts layout in ``DIR``), as the in-process harness (tests/netns/mesh.py) does. Once discovery
synced and the servers listen, it prints one JSON line ``{"bound": {...}}`` on stdout; its logs
are JSON lines on stderr. SIGTERM drains and exits 0, like ``ztunnel.main``.

:class:`ZtunnelProcess` is the parent's side: start, wait for the ready line, read the logs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from mesh import log as meshlog
from mesh import runtime
from mesh.pki import CertificateAuthority
from mesh.xds.client import Backoff, XdsClient, insecure_channel_factory
from mesh.xds.state import ProxyState
from tests.netns.agent import FakeAgent
from tests.netns.mesh import Mesh
from tests.netns.topology import Pod
from tests.ztunnel.fakes import FakeCa
from ztunnel.app import Addresses, Ztunnel, serve_until_stopped

TRUST_DOMAIN = "cluster.local"
REPO = Path(__file__).resolve().parents[2]


async def _run(args: argparse.Namespace) -> int:
    ca = FakeCa(CertificateAuthority.load_cacerts(args.ca_dir, TRUST_DOMAIN))
    state = ProxyState()
    xds = XdsClient(
        state,
        node_id=f"ztunnel~{args.node}",
        node_name=args.node,
        channel_factory=insecure_channel_factory(args.xds),
        backoff=Backoff(initial=0.05, maximum=1.0),
    )
    stop = runtime.stop_on_signals()
    xds_task = asyncio.create_task(xds.run(), name="xds")
    try:
        await xds.synced.wait()
        zt = Ztunnel(
            node=args.node,
            trust_domain=TRUST_DOMAIN,
            state=state,
            ca=ca,
            zds_path=args.zds,
            addresses=Addresses(("127.0.0.1", 0), ("127.0.0.1", 0), ("127.0.0.1", 0)),
            drain_seconds=args.drain,
            access_log_interval=args.access_log_interval,
        )
        zt.follow(xds)
        await zt.start()
        print(json.dumps({"bound": zt.bound}), flush=True)
        return await serve_until_stopped(zt, stop)
    finally:
        xds.stop()
        await asyncio.gather(xds_task, return_exceptions=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--xds", required=True)
    ap.add_argument("--ca-dir", required=True)
    ap.add_argument("--zds", required=True)
    ap.add_argument("--node", required=True)
    ap.add_argument("--drain", type=float, default=5.0)
    ap.add_argument("--access-log-interval", type=float, default=300.0)
    args = ap.parse_args()
    meshlog.configure("info", json=True)
    return runtime.run(lambda: _run(args))


class ZtunnelProcess:
    """The parent's handle: the process, its bound ports, and its log lines as they come."""

    def __init__(self, *args: str) -> None:
        self.args = args
        self.proc: asyncio.subprocess.Process | None = None
        self.bound: dict[str, tuple[str, int]] = {}
        self.logs: list[dict[str, Any]] = []
        self._logged = asyncio.Condition()
        self._reader: asyncio.Task[None] | None = None

    async def start(self, timeout: float = 30.0) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.ztunnel.ztunnel_process", *self.args,
            cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._reader = asyncio.create_task(self._read(self.proc.stderr))
        async with asyncio.timeout(timeout):
            line = await self.proc.stdout.readline()
        if not line:
            await self.stop()
            raise AssertionError(f"ztunnel process exited before it was ready: {self.logs[-5:]}")
        self.bound = {k: (h, p) for k, (h, p) in json.loads(line)["bound"].items()}

    async def _read(self, stderr: asyncio.StreamReader) -> None:
        while line := await stderr.readline():
            try:
                event = json.loads(line)
            except ValueError:
                event = {"event": line.decode(errors="replace").rstrip()}
            async with self._logged:
                self.logs.append(event)
                self._logged.notify_all()

    async def wait_log(self, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float = 30.0) -> None:
        """Wait until the log lines so far satisfy ``predicate``."""
        async with asyncio.timeout(timeout), self._logged:
            await self._logged.wait_for(lambda: predicate(self.logs))

    def kill(self, sig: int = signal.SIGKILL) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        async with asyncio.timeout(timeout):
            code = await self.proc.wait()
        if self._reader is not None:
            await self._reader
        return code

    async def stop(self) -> None:
        """Kill it if it still runs and reap it (teardown)."""
        if self.proc is None:
            return
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)


@contextlib.asynccontextmanager
async def ztunnel_process(m: Mesh, pods: list[Pod], *args: str) -> AsyncIterator[ZtunnelProcess]:
    """Node 1's ztunnel as a process of its own, fed by ``m``'s discovery and CA, with ``pods``
    added by a fake agent; killed (if still running) and cleaned up on exit."""
    m.publish()
    await m.discovery.start()
    with tempfile.TemporaryDirectory(prefix="zt-process-") as tmp:
        m.ca.save(Path(tmp) / "ca")
        zds = str(Path(tmp) / "zds.sock")
        agent = FakeAgent(zds)
        zt = ZtunnelProcess(
            "--xds", m.discovery.address, "--ca-dir", str(Path(tmp) / "ca"), "--zds", zds,
            "--node", m.node_name(1), *args,
        )  # fmt: skip
        try:
            await zt.start()
            await agent.accept(timeout=30)
            for pod in pods:
                assert await agent.add(pod) == ""
            assert await agent.snapshot_sent() == ""
            yield zt
        finally:
            await zt.stop()
            agent.close()
            await m.aclose()


if __name__ == "__main__":
    sys.exit(main())
