"""The control plane process serves discovery (delta xDS) behind the node token, as the demo needs."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ambientctl.localmesh import spec
from mesh.xds.client import XdsClient
from mesh.xds.state import ProxyState

CMD = [sys.executable, "-c", "import sys; from controlplane.main import main; sys.exit(main())"]
TIMEOUT = 20.0


@pytest.fixture
def controlplane(tmp_path: Path) -> Iterator[tuple[str, Path, Path]]:
    config, state, ready, log = (tmp_path / n for n in ("mesh.yaml", "state", "ready", "log"))
    config.write_text(spec.local_config(frozenset({"shop/web"})))
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*CMD, "--local-config", str(config), "--state-dir", str(state), "--listen", "127.0.0.1:0",
             "--ready-file", str(ready)],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + TIMEOUT
        while not ready.exists():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)  # polling a file another process writes: nothing to await
        yield ready.read_text().strip(), state, log
    finally:
        proc.kill()
        proc.wait(TIMEOUT)


def client(address: str, state: Path, token: Path | None) -> XdsClient:
    return XdsClient(
        ProxyState(),
        node_id="ztunnel~node-a",
        node_name="node-a",
        address=address,
        root_cert_pem=(state / "root-cert.pem").read_bytes(),
        server_name="controlplane.istio-system.svc",
        token_file=token,
    )


async def test_discovery_with_the_node_token(controlplane: tuple[str, Path, Path]) -> None:
    address, state, _ = controlplane
    xds = client(address, state, state / "tokens" / "node-a.token")
    task = asyncio.create_task(xds.run())
    try:
        await asyncio.wait_for(xds.synced.wait(), TIMEOUT)
        snap = xds.state.snapshot()
        names = {f"{w.namespace}/{w.name}": w.tunnel_protocol.value for w in snap.workloads.values()}
        assert names["shop/web"] == "HBONE"  # annotated as redirected
        # Local mode: the enrollment labels alone make a pod HBONE (no API server to annotate).
        assert names["shop/frontend"] == "HBONE"
        assert names["legacy/old"] == "NONE"
        assert {s.name for s in snap.services.values()} == {"web"}
    finally:
        xds.stop()
        await asyncio.wait_for(task, TIMEOUT)


async def test_discovery_refused_without_a_token(controlplane: tuple[str, Path, Path]) -> None:
    address, state, log = controlplane
    xds = client(address, state, None)
    task = asyncio.create_task(xds.run())
    try:
        deadline = time.monotonic() + TIMEOUT
        while "xds stream refused" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            await asyncio.sleep(0.02)  # polling another process's log
        assert not xds.synced.is_set()
        assert "UNAUTHENTICATED" in log.read_text()
    finally:
        xds.stop()
        await asyncio.wait_for(task, TIMEOUT)
