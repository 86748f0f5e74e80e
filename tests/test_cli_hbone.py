"""`ambientctl hbone serve|connect|forward` and `ambientctl demo` as a user runs them."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mesh.identity import Identity
from mesh.pki import CertificateAuthority, Credential, write_credential
from tests.pkihelpers import forged_credential

WEB = Identity("cluster.local", "shop", "web")
FRONTEND = Identity("cluster.local", "shop", "frontend")
CLI = [sys.executable, "-m", "ambientctl"]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    ca = CertificateAuthority.generate()
    out = {}
    for ident in (WEB, FRONTEND):
        d = tmp_path_factory.mktemp(ident.service_account)
        write_credential(d, ca.issue(ident))
        out[ident.service_account] = d
    return out


class EchoServer:
    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def echo() -> Iterator[EchoServer]:
    e = EchoServer()
    yield e
    e.close()


def wait_ready(proc: subprocess.Popen[bytes], ready: Path, timeout: float = 20) -> str:
    """Wait for a daemon's ready file; fail with its log if it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready.exists():
            return ready.read_text()
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode}: {Path(str(ready) + '.log').read_text()}")
        time.sleep(0.02)
    raise AssertionError("daemon did not become ready")


def start(args: list[str], ready: Path) -> subprocess.Popen[bytes]:
    """Start a daemon with its log in a file next to the ready file (a pipe could fill up)."""
    with open(str(ready) + ".log", "wb") as logf:
        return subprocess.Popen([*CLI, "--log-json", *args, "--ready-file", str(ready)], stderr=logf)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(15) == 0
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def serve(certs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    ready = tmp_path_factory.mktemp("serve") / "ready"
    proc = start(["hbone", "serve", "--listen", "127.0.0.1:0", "--cert-dir", str(certs["web"])], ready)
    try:
        yield wait_ready(proc, ready)
    finally:
        stop(proc)


def test_connect_roundtrip(serve: str, certs: dict[str, Path], echo: EchoServer) -> None:
    payload = os.urandom(200_000)
    out = subprocess.run(
        [
            *CLI,
            "hbone",
            "connect",
            serve,
            "--authority",
            f"127.0.0.1:{echo.port}",
            "--cert-dir",
            str(certs["frontend"]),
            "--expect-identity",
            WEB.uri,
        ],
        input=payload,
        capture_output=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr.decode()
    assert hashlib.sha256(out.stdout).digest() == hashlib.sha256(payload).digest()


def test_connect_wrong_identity_fails(serve: str, certs: dict[str, Path], echo: EchoServer) -> None:
    out = subprocess.run(
        [
            *CLI,
            "hbone",
            "connect",
            serve,
            "--authority",
            f"127.0.0.1:{echo.port}",
            "--cert-dir",
            str(certs["frontend"]),
            "--expect-identity",
            "spiffe://cluster.local/ns/shop/sa/db",
        ],
        input=b"x",
        capture_output=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert b"expected spiffe://cluster.local/ns/shop/sa/db" in out.stderr


def test_connect_unreachable_target_reports_503(serve: str, certs: dict[str, Path]) -> None:
    out = subprocess.run(
        [
            *CLI,
            "hbone",
            "connect",
            serve,
            "--authority",
            "127.0.0.1:1",
            "--cert-dir",
            str(certs["frontend"]),
            "--expect-identity",
            WEB.uri,
        ],
        input=b"x",
        capture_output=True,
        timeout=30,
    )
    assert out.returncode == 2 and b"503" in out.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--authority", "nohost", "--expect-identity", WEB.uri],
            "--authority: authority 'nohost' is not host:port",
        ),
        (["--authority", "127.0.0.1:80", "--expect-identity", "http://x"], "--expect-identity: bad scheme"),
    ],
)
def test_connect_bad_arguments(certs: dict[str, Path], args: list[str], message: str) -> None:
    out = subprocess.run(
        [*CLI, "hbone", "connect", "127.0.0.1:15008", "--cert-dir", str(certs["frontend"]), *args],
        capture_output=True,
        timeout=30,
    )
    assert out.returncode == 2 and message in out.stderr.decode()


def test_bad_cert_dir(tmp_path: Path) -> None:
    out = subprocess.run(
        [*CLI, "hbone", "serve", "--listen", "127.0.0.1:0", "--cert-dir", str(tmp_path)],
        capture_output=True,
        timeout=30,
    )
    assert out.returncode == 2 and "--cert-dir:" in out.stderr.decode() and "key.pem" in out.stderr.decode()


def _expired(ca: CertificateAuthority) -> Credential:
    now = dt.datetime.now(dt.UTC)
    return forged_credential(
        ca, WEB, not_before=now - dt.timedelta(hours=2), not_after=now - dt.timedelta(hours=1)
    )


def _mismatched(ca: CertificateAuthority) -> Credential:
    good, other = ca.issue(WEB), ca.issue(WEB)
    return Credential(other.key_pem, good.chain_pem, good.roots_pem)


def _other_root(ca: CertificateAuthority) -> Credential:
    cred = CertificateAuthority.generate().issue(WEB)
    return Credential(cred.key_pem, cred.chain_pem, ca.roots_pem)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_mismatched, "{d}/key.pem does not match the leaf certificate in {d}/cert-chain.pem"),
        (_other_root, "{d}/cert-chain.pem does not verify against {d}/root-cert.pem: it is not signed by"),
        (_expired, "{d}/cert-chain.pem does not verify against {d}/root-cert.pem: a certificate has expired"),
    ],
)
@pytest.mark.parametrize("command", ["serve", "connect", "forward"])
def test_unusable_cert_dir(
    tmp_path: Path, command: str, make: Callable[[CertificateAuthority], Credential], message: str
) -> None:
    write_credential(tmp_path, make(CertificateAuthority.generate()))
    args = {
        "serve": ["--listen", "127.0.0.1:0"],
        "connect": ["127.0.0.1:15008", "--authority", "127.0.0.1:80", "--expect-identity", WEB.uri],
        "forward": [
            *("--listen", "127.0.0.1:0", "--to", "127.0.0.1:15008", "--authority", "127.0.0.1:80"),
            *("--expect-identity", WEB.uri),
        ],
    }[command]
    out = subprocess.run(
        [*CLI, "hbone", command, *args, "--cert-dir", str(tmp_path)], capture_output=True, timeout=30
    )
    assert out.returncode == 2
    assert out.stderr.decode().startswith("ambientctl: --cert-dir: " + message.format(d=tmp_path)), out.stderr


def loaded_cryptography(proc: subprocess.Popen[bytes]) -> bool:
    """Whether a running process has mapped cryptography's native module (~9 MiB resident)."""
    return "cryptography" in Path(f"/proc/{proc.pid}/maps").read_text()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/maps")
def test_serve_and_forward_never_load_cryptography(
    certs: dict[str, Path], echo: EchoServer, tmp_path: Path
) -> None:
    server = start(
        ["hbone", "serve", "--listen", "127.0.0.1:0", "--cert-dir", str(certs["web"])], tmp_path / "serve"
    )
    try:
        address = wait_ready(server, tmp_path / "serve")
        forwarder = start(
            [
                *("hbone", "forward", "--listen", "127.0.0.1:0", "--to", address),
                *("--authority", f"127.0.0.1:{echo.port}", "--cert-dir", str(certs["frontend"])),
                *("--expect-identity", WEB.uri),
            ],
            tmp_path / "forward",
        )
        try:
            host, port = wait_ready(forwarder, tmp_path / "forward").rsplit(":", 1)
            with socket.create_connection((host, int(port)), timeout=10) as s:
                s.sendall(b"ping")
                s.shutdown(socket.SHUT_WR)
                assert s.recv(16) == b"ping"
            assert not loaded_cryptography(forwarder)
            assert not loaded_cryptography(server)
        finally:
            stop(forwarder)
    finally:
        stop(server)


def test_forward_many_connections(
    serve: str, certs: dict[str, Path], echo: EchoServer, tmp_path: Path
) -> None:
    ready = tmp_path / "ready"
    proc = start(
        [
            "hbone",
            "forward",
            "--listen",
            "127.0.0.1:0",
            "--to",
            serve,
            "--authority",
            f"127.0.0.1:{echo.port}",
            "--cert-dir",
            str(certs["frontend"]),
            "--expect-identity",
            WEB.uri,
        ],
        ready,
    )
    try:
        host, port = wait_ready(proc, ready).rsplit(":", 1)
        for i in range(20):
            with socket.create_connection((host, int(port)), timeout=10) as s:
                payload = os.urandom(5000 + i)
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)
                got = bytearray()
                while chunk := s.recv(65536):
                    got += chunk
                assert bytes(got) == payload
    finally:
        stop(proc)


def test_loopback_demo_runs() -> None:
    out = subprocess.run([*CLI, "demo", "--loopback", "--connections", "3"], capture_output=True, timeout=60)
    text = out.stdout.decode()
    assert out.returncode == 0, text + out.stderr.decode()
    assert "spiffe://cluster.local/ns/shop/sa/frontend" in text
    assert "visible: no (encrypted)" in text
