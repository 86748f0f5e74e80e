"""``ambient-controlplane`` as a user runs it: a real process, its files, signals and exit codes."""

from __future__ import annotations

import asyncio
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from controlplane.main import main
from mesh.caclient import CaError, GrpcCaClient
from mesh.pki import CertificateAuthority
from tests.controlplane.meshdata import DB, WEB, manifest

_SCRIPT = Path(sys.executable).with_name("ambient-controlplane")
CMD = (
    [str(_SCRIPT)]
    if _SCRIPT.exists()
    else [sys.executable, "-c", "import sys; from controlplane.main import main; sys.exit(main())"]
)
TIMEOUT = 20.0


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CMD, *args], capture_output=True, text=True, timeout=TIMEOUT)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=TIMEOUT)


def spawn(log: Path, *args: str) -> subprocess.Popen[bytes]:
    with log.open("wb") as log_file:
        return subprocess.Popen([*CMD, *args], stdout=log_file, stderr=subprocess.STDOUT)


def start(
    procs: list[subprocess.Popen[bytes]], log: Path, ready: Path, config: Path, state: Path, *extra: str
) -> subprocess.Popen[bytes]:
    """The control plane on an ephemeral loopback port, owned by the ``procs`` fixture."""
    args = ["--local-config", str(config), "--state-dir", str(state), "--listen", "127.0.0.1:0"]
    proc = spawn(log, *args, "--ready-file", str(ready), *extra)
    procs.append(proc)
    return proc


def _poll(proc: subprocess.Popen[bytes], log: Path, done: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if done():
            return
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before {what}: {log.read_text()}")
        time.sleep(0.02)  # polling files another process writes: there is nothing to await
    raise AssertionError(f"no {what} after {TIMEOUT}s: {log.read_text()}")


async def wait_for_file(proc: subprocess.Popen[bytes], path: Path, log: Path) -> None:
    await asyncio.to_thread(_poll, proc, log, path.exists, str(path))


async def wait_for_text(proc: subprocess.Popen[bytes], log: Path, text: str) -> None:
    await asyncio.to_thread(_poll, proc, log, lambda: text in log.read_text(), repr(text))


async def wait_ready(proc: subprocess.Popen[bytes], ready: Path, log: Path) -> str:
    """The bound address from the ready file; the process's log if it dies first."""
    await wait_for_file(proc, ready, log)
    return await asyncio.to_thread(ready.read_text)


async def test_local_mode_process(tmp_path: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    config, state = tmp_path / "mesh.yaml", tmp_path / "state"
    ready, log = tmp_path / "ready", tmp_path / "log"
    config.write_text(manifest())
    proc = start(procs, log, ready, config, state, "--poll-interval", "0.05")
    address = await wait_ready(proc, ready, log)
    assert address.startswith("127.0.0.1:")

    token = state / "tokens" / "node-a.token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert (state / "tokens" / "node-b.token").exists()
    client = GrpcCaClient(address, (state / "root-cert.pem").read_text(), token)
    try:
        assert (await client.fetch_certificate(WEB)).identity == WEB
        with pytest.raises(CaError, match="PERMISSION_DENIED"):
            await client.fetch_certificate(DB)
    finally:
        await client.close()

    # A node added to the file gets its token without a restart; a broken file changes nothing.
    config.write_text(manifest() + "---\napiVersion: v1\nkind: Node\nmetadata: {name: node-c}\n")
    await wait_for_file(proc, state / "tokens" / "node-c.token", log)
    config.write_text("kind: [")
    await wait_for_text(proc, log, "local config rejected")
    client = GrpcCaClient(address, (state / "root-cert.pem").read_text(), token)
    try:
        assert (await client.fetch_certificate(WEB)).identity == WEB
    finally:
        await client.close()

    proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, TIMEOUT) == 0
    text = log.read_text()
    assert "certificate issued" in text and "certificate refused" in text


async def test_restart_keeps_the_root_and_tokens_valid(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    config, state = tmp_path / "mesh.yaml", tmp_path / "state"
    config.write_text(manifest())
    roots = []
    old_token = tmp_path / "node-a.token.first"
    for i in range(2):
        ready, log = tmp_path / f"ready{i}", tmp_path / f"log{i}"
        proc = start(procs, log, ready, config, state)
        address = await wait_ready(proc, ready, log)
        roots.append((state / "root-cert.pem").read_text())
        if i == 0:
            old_token.write_bytes((state / "tokens" / "node-a.token").read_bytes())
        else:
            # A token handed out before the restart still works: same signing key.
            client = GrpcCaClient(address, roots[1], old_token)
            try:
                assert (await client.fetch_certificate(WEB)).identity == WEB
            finally:
                await client.close()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, TIMEOUT) == 0
    assert roots[0] == roots[1]


def test_bad_yaml_exits_2_naming_document_and_field(tmp_path: Path) -> None:
    bad = manifest().replace("spec: {nodeName: node-a, serviceAccountName: web}", "spec: {nodeName: node-q}")
    config = tmp_path / "mesh.yaml"
    config.write_text(bad)
    result = run("--local-config", str(config), "--state-dir", str(tmp_path / "state"))
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ambient-controlplane: --local-config:")
    assert "document[2]" in last and "spec.nodeName" in last and "node-q" in last
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "one of --local-config FILE or --kubernetes is required"),
        (
            ["--local-config", "{config}", "--kubeconfig", "{config}", "--state-dir", "{tmp}/s"],
            "--kubernetes",
        ),
        (["--local-config", "{config}"], "--state-dir DIR is required"),
        (["--local-config", "{tmp}/missing.yaml", "--state-dir", "{tmp}/s"], "is not a readable file"),
        (["--local-config", "{config}", "--state-dir", "{tmp}/s", "--listen", "15012"], "--listen"),
        (
            ["--local-config", "{config}", "--state-dir", "{tmp}/s", "--trust-domain", "Bad!"],
            "--trust-domain",
        ),
        (["--local-config", "{config}", "--state-dir", "{tmp}/s", "--token-ttl", "0"], "--token-ttl"),
        (["--local-config", "{config}", "--state-dir", "{tmp}/s", "--cacerts", "{tmp}/nope"], "--cacerts"),
        (["--local-config", "{config}", "--state-dir", "{config}"], "not a directory"),
    ],
)
def test_bad_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    """Flag validation happens before logging or the event loop start: checked in-process."""
    config = tmp_path / "mesh.yaml"
    config.write_text(manifest())
    assert main([a.format(tmp=tmp_path, config=config) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ambient-controlplane: ") and message in err


def test_unusable_cacerts_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "mesh.yaml"
    config.write_text(manifest())
    result = run(
        "--local-config", str(config), "--state-dir", str(tmp_path / "s"), "--cacerts", str(tmp_path)
    )
    assert result.returncode == 2
    assert "ambient-controlplane: CA: " in result.stderr and "ca-cert.pem" in result.stderr


async def test_plugged_in_ca(tmp_path: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    """--cacerts: the served root is the plugged-in one, and nothing is generated."""
    cacerts = tmp_path / "cacerts"
    ca = CertificateAuthority.generate()
    ca.save(cacerts)
    config, state = tmp_path / "mesh.yaml", tmp_path / "state"
    ready, log = tmp_path / "ready", tmp_path / "log"
    config.write_text(manifest())
    proc = start(procs, log, ready, config, state, "--cacerts", str(cacerts))
    await wait_ready(proc, ready, log)
    assert (state / "root-cert.pem").read_text() == ca.roots_pem
    assert not (state / "ca").exists()
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, TIMEOUT) == 0


async def test_kubernetes_mode_process(tmp_path: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    """--kubernetes: state from list/watch, callers authenticated by TokenReview, node-bound CA."""
    from tests.k8s.fakeapi import FakeApiServer
    from tests.k8s.helpers import namespace, node, pod

    with FakeApiServer() as fake:
        for obj in (
            node("node-a"),
            node("node-b"),
            namespace("shop", **{"istio.io/dataplane-mode": "ambient"}),
            namespace("istio-system"),
            pod("web-1", "10.0.1.2", node_name="node-a"),
        ):
            fake.add(obj)
        db = pod("db-1", "10.0.2.2", node_name="node-b", labels={"app": "db"})
        db["spec"]["serviceAccountName"] = "db"
        fake.add(db)
        ztunnel = pod(
            "ztunnel-a", "10.0.1.100", ns="istio-system", node_name="node-a", labels={"app": "ztunnel"}
        )
        ztunnel["spec"]["serviceAccountName"] = "ztunnel"
        fake.add(ztunnel)
        fake.token_users["ztunnel-a-token"] = {
            "username": "system:serviceaccount:istio-system:ztunnel",
            "extra": {
                "authentication.kubernetes.io/pod-name": ["ztunnel-a"],
                "authentication.kubernetes.io/pod-uid": ["uid-istio-system-ztunnel-a"],
                "authentication.kubernetes.io/node-name": ["node-a"],
            },
        }
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(
            "apiVersion: v1\nkind: Config\ncurrent-context: fake\n"
            f"clusters: [{{name: fake, cluster: {{server: '{fake.url}'}}}}]\n"
            "users: [{name: fake, user: {token: admin}}]\n"
            "contexts: [{name: fake, context: {cluster: fake, user: fake}}]\n"
        )
        state, ready, log = tmp_path / "state", tmp_path / "ready", tmp_path / "log"
        proc = spawn(
            log,
            "--kubernetes",
            "--kubeconfig",
            str(kubeconfig),
            "--state-dir",
            str(state),
            "--listen",
            "127.0.0.1:0",
            "--ready-file",
            str(ready),
        )
        procs.append(proc)
        address = await wait_ready(proc, ready, log)
        assert not (state / "tokens").exists()  # no local node tokens in Kubernetes mode
        token = tmp_path / "token"
        token.write_text("ztunnel-a-token")
        roots = (state / "root-cert.pem").read_text()

        def published(ns: str) -> bool:
            cm = fake.get("configmaps", f"{ns}/istio-ca-root-cert")
            return cm is not None and cm["data"] == {"root-cert.pem": roots}

        # The CA's root, published in every namespace (the one made later too).
        await asyncio.to_thread(
            fake.wait_for, lambda: published("shop") and published("istio-system"), TIMEOUT
        )
        fake.add(namespace("payments"))
        await asyncio.to_thread(fake.wait_for, lambda: published("payments"), TIMEOUT)
        client = GrpcCaClient(address, roots, token)
        try:
            assert (await client.fetch_certificate(WEB)).identity == WEB  # web-1 runs on node-a
            with pytest.raises(CaError, match="PERMISSION_DENIED"):
                await client.fetch_certificate(DB)  # db-1 runs on node-b only
        finally:
            await client.close()
        token.write_text("forged")
        client = GrpcCaClient(address, roots, token)
        try:
            with pytest.raises(CaError, match="UNAUTHENTICATED"):
                await client.fetch_certificate(WEB)
        finally:
            await client.close()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, TIMEOUT) == 0
