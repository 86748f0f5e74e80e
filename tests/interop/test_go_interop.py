"""HBONE interop against an independent HTTP/2 stack: Go's standard library.

``go/hbone.go`` is a small HBONE client and server written only with Go's ``crypto/tls`` and the
HTTP/2 support bundled in ``net/http``. Every test here runs a (client, server) pair in front of a
plain TCP backend on 127.0.0.1:

* ``go-client-go-server``: both sides Go. These check the Go peer itself, so that a failure of a
  cross test can be blamed on our side.
* ``go-client-ambientctl-server``: Go client -> ``ambientctl hbone serve`` -> backend.
* ``ambientctl-client-go-server``: ``ambientctl hbone connect`` -> Go server -> backend.

Every cross test has ``ambientctl`` in its id; ``pytest tests/interop -k "not ambientctl"`` runs
only the Go<->Go ones.

The CLI is run as ``python -m ambientctl hbone serve --listen ADDR --cert-dir DIR --ready-file PATH``
(it must write its bound ``host:port`` into PATH) and ``python -m ambientctl hbone connect ADDR
--authority HOST:PORT --cert-dir DIR --expect-identity ID`` (stdin/stdout like nc, exit status 0
only after a 200 and a clean end of both directions).
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import glob
import hashlib
import json
import os
import queue
import selectors
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from mesh.identity import Identity
from mesh.pki import CA_KEY_USAGE, CLOCK_SKEW, CertificateAuthority, generate_key, write_credential

REPO = Path(__file__).resolve().parents[2]
GO_SRC = Path(__file__).resolve().parent / "go"
LOCALHOST = "127.0.0.1"
TRUST_DOMAIN = "cluster.local"
SERVER_ID = Identity(TRUST_DOMAIN, "server-ns", "server-sa")
CLIENT_ID = Identity(TRUST_DOMAIN, "client-ns", "client-sa")
# Upper bound for one client run or one server start-up; nothing waits this long when it works.
TIMEOUT = 60.0
MIB = 1 << 20

CLIENT_SERVER_PAIRS = [
    pytest.param("go", "go", id="go-client-go-server"),
    pytest.param("go", "ambientctl", id="go-client-ambientctl-server"),
    pytest.param("ambientctl", "go", id="ambientctl-client-go-server"),
]
GO_CLIENT_PAIRS = [p for p in CLIENT_SERVER_PAIRS if p.values[0] == "go"]


# ---------------------------------------------------------------------------------------------
# building the Go peer


def _find_go() -> str | None:
    found = shutil.which("go")
    if found:
        return found
    for candidate in sorted(glob.glob("/usr/lib/go*/bin/go"), reverse=True):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.fixture(scope="module")
def hbone_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Go HBONE peer, built once per module from ``go/`` (standard library only, offline)."""
    go = _find_go()
    if go is None:
        pytest.fail(
            "the Go toolchain is missing: these interop tests need `go` (Debian 12: "
            "apt-get install golang-go) on PATH or under /usr/lib/go*/bin",
            pytrace=False,
        )
    out = tmp_path_factory.mktemp("go-build")
    env = {
        **os.environ,
        "GOFLAGS": "-mod=mod",
        "GOPROXY": "off",
        "GOCACHE": str(out / "cache"),
        "GOPATH": str(out / "gopath"),
        "GO111MODULE": "on",
        "CGO_ENABLED": "0",
    }
    binary = out / "hbone"
    result = subprocess.run(
        [go, "build", "-o", str(binary), "."],
        cwd=GO_SRC,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"`go build` of {GO_SRC} failed:\n{result.stdout}{result.stderr}", pytrace=False)
    return binary


# ---------------------------------------------------------------------------------------------
# credentials


def _intermediate_ca(root: CertificateAuthority) -> CertificateAuthority:
    """A signing CA one level below ``root``; its leaves carry the intermediate in their chain."""
    key = generate_key()
    now = dt.datetime.now(dt.UTC)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, TRUST_DOMAIN),
            x509.NameAttribute(NameOID.COMMON_NAME, "interop intermediate CA"),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(root.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(CA_KEY_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root.key.public_key()),
            critical=False,
        )
        .sign(root.key, hashes.SHA256())
    )
    return CertificateAuthority(TRUST_DOMAIN, key, cert, [cert], root.roots)


@dataclass(frozen=True)
class Creds:
    """Credential directories in Istio's layout (cert-chain.pem, key.pem, root-cert.pem)."""

    server: Path
    client: Path
    server_other_ca: Path  # the right identity, signed by a CA nobody else trusts
    client_other_ca: Path
    server_intermediate: Path  # signed by an intermediate below a third root; chain has 2 certs
    client_intermediate: Path


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> Creds:
    base = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority.generate(TRUST_DOMAIN)
    other_ca = CertificateAuthority.generate(TRUST_DOMAIN)
    intermediate = _intermediate_ca(CertificateAuthority.generate(TRUST_DOMAIN))

    def issue(name: str, authority: CertificateAuthority, identity: Identity) -> Path:
        directory = base / name
        write_credential(directory, authority.issue(identity))
        return directory

    made = Creds(
        server=issue("server", ca, SERVER_ID),
        client=issue("client", ca, CLIENT_ID),
        server_other_ca=issue("server-other-ca", other_ca, SERVER_ID),
        client_other_ca=issue("client-other-ca", other_ca, CLIENT_ID),
        server_intermediate=issue("server-intermediate", intermediate, SERVER_ID),
        client_intermediate=issue("client-intermediate", intermediate, CLIENT_ID),
    )
    chain = (made.server_intermediate / "cert-chain.pem").read_bytes()
    assert len(x509.load_pem_x509_certificates(chain)) == 2, "intermediate missing from the chain"
    return made


# ---------------------------------------------------------------------------------------------
# TCP backends


Handler = Callable[["Backend", socket.socket], None]


class Backend:
    """A TCP service on 127.0.0.1, one thread per connection; counts what it accepted."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.listener = socket.create_server((LOCALHOST, 0))
        self.addr = f"{LOCALHOST}:{self.listener.getsockname()[1]}"
        self.results: queue.Queue[object] = queue.Queue()  # what handlers report
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._accepted = 0
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept_loop, name=f"backend {self.addr}", daemon=True)
        self._acceptor.start()

    @property
    def accepted(self) -> int:
        with self._lock:
            return self._accepted

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            with self._lock:
                self._accepted += 1
                self._conns.append(conn)
                self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            self.handler(self, conn)
        except OSError as e:
            self.errors.append(e)
        finally:
            conn.close()

    def close(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() on Linux
        except OSError:
            pass
        self.listener.close()
        self._acceptor.join(timeout=10)
        with self._lock:
            conns, threads = list(self._conns), list(self._threads)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in threads:
            thread.join(timeout=10)


def _recv_all(conn: socket.socket, sink: Callable[[bytes], None]) -> None:
    while chunk := conn.recv(65536):
        sink(chunk)


def echo(_backend: Backend, conn: socket.socket) -> None:
    """Send back everything; half-close when the peer half-closes."""
    _recv_all(conn, conn.sendall)
    conn.shutdown(socket.SHUT_WR)


def digest_after_eof(_backend: Backend, conn: socket.socket) -> None:
    """Answer only after the peer's EOF: ``<sha256 hex> <byte count>\\n``."""
    h = hashlib.sha256()
    count = 0

    def sink(chunk: bytes) -> None:
        nonlocal count
        h.update(chunk)
        count += len(chunk)

    _recv_all(conn, sink)
    conn.sendall(f"{h.hexdigest()} {count}\n".encode())


def send_first_then_drain(payload: bytes) -> Handler:
    """Send ``payload`` and half-close at once, then read to EOF; reports (sha256 hex, count)."""

    def handler(backend: Backend, conn: socket.socket) -> None:
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        h = hashlib.sha256()
        count = 0

        def sink(chunk: bytes) -> None:
            nonlocal count
            h.update(chunk)
            count += len(chunk)

        _recv_all(conn, sink)
        backend.results.put((h.hexdigest(), count))

    return handler


def digest_line(data: bytes) -> bytes:
    return f"{hashlib.sha256(data).hexdigest()} {len(data)}\n".encode()


# ---------------------------------------------------------------------------------------------
# processes


class Proc:
    """A child process whose stderr is collected line by line in a thread."""

    def __init__(self, argv: Sequence[str], name: str, *, pipes: bool = False) -> None:
        self.name = name
        self.argv = list(argv)
        stdio = subprocess.PIPE if pipes else subprocess.DEVNULL
        self.popen = subprocess.Popen(self.argv, stdin=stdio, stdout=stdio, stderr=subprocess.PIPE, cwd=REPO)
        self._lines: list[str] = []
        self._closed = False
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read_stderr, name=f"{name} stderr", daemon=True)
        self._reader.start()

    def _read_stderr(self) -> None:
        stream = self.popen.stderr
        assert stream is not None
        try:
            for raw in stream:
                with self._cond:
                    self._lines.append(raw.decode(errors="replace").rstrip("\n"))
                    self._cond.notify_all()
        except (OSError, ValueError):
            pass
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()

    @property
    def stderr(self) -> str:
        with self._cond:
            return "\n".join(self._lines)

    def wait_line(self, predicate: Callable[[str], bool], what: str, timeout: float = TIMEOUT) -> str:
        """The first stderr line (past or future) for which ``predicate`` holds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            seen = 0
            while True:
                for line in self._lines[seen:]:
                    if predicate(line):
                        return line
                seen = len(self._lines)
                if self._closed:
                    raise AssertionError(
                        f"{self.name} closed stderr without printing {what}; stderr:\n{self.stderr_locked()}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"{self.name} did not print {what} within {timeout}s; stderr:\n{self.stderr_locked()}"
                    )
                self._cond.wait(remaining)

    def stderr_locked(self) -> str:
        return "\n".join(self._lines)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._reader.join(timeout=5)
        for stream in (self.popen.stdin, self.popen.stdout, self.popen.stderr):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass


def _is_host_port(text: str) -> bool:
    host, sep, port = text.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)


def wait_for_ready_file(path: Path, proc: Proc, timeout: float = TIMEOUT) -> str:
    """Poll ``path`` until it holds ``host:port``; the pause between polls is a wait on the process,
    so a server that dies is reported at once. A value without a trailing newline must read the
    same twice, in case the file is being written in place."""
    deadline = time.monotonic() + timeout
    previous: str | None = None
    while True:
        try:
            text: str | None = path.read_text()
        except FileNotFoundError:
            text = None
        stable = text is not None and (text.endswith("\n") or text == previous)
        if stable and text is not None and _is_host_port(text.strip()):
            return text.strip()
        previous = text
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{proc.name} wrote no host:port into {path} within {timeout}s "
                f"(content: {text!r}); stderr:\n{proc.stderr}"
            )
        try:
            code = proc.popen.wait(timeout=0.02)
        except subprocess.TimeoutExpired:
            continue
        raise AssertionError(
            f"{proc.name} exited with status {code} before it was ready; stderr:\n{proc.stderr}"
        )


def read_until_eof(stream: IO[bytes], timeout: float = TIMEOUT) -> bytes:
    """Everything a pipe delivers until EOF, failing after ``timeout`` seconds."""
    fd = stream.fileno()
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no EOF within {timeout}s after {sum(map(len, chunks))} bytes")
            if selector.select(remaining):
                chunk = os.read(fd, 65536)
                if not chunk:
                    return b"".join(chunks)
                chunks.append(chunk)


@dataclass(frozen=True)
class Server:
    impl: str
    addr: str
    proc: Proc

    def wait_peer_line(self, identity: Identity, authority: str) -> str:
        """The Go server's log line for a CONNECT from ``identity`` to ``authority``."""
        assert self.impl == "go", "only the Go server's log format is known"
        return self.proc.wait_line(
            lambda line: line.startswith(f"peer={identity.uri} ") and f" authority={authority} " in line,
            f"peer={identity.uri} ... authority={authority}",
        )


class Harness:
    """Starts servers, clients and backends, and stops every one of them in :meth:`close`."""

    def __init__(self, hbone_bin: Path, tmp_path: Path) -> None:
        self.hbone_bin = hbone_bin
        self.tmp_path = tmp_path
        self._procs: list[Proc] = []
        self._backends: list[Backend] = []
        self._count = 0

    def close(self) -> None:
        try:
            for proc in self._procs:
                proc.stop()
        finally:
            for backend in self._backends:
                backend.close()

    def backend(self, handler: Handler) -> Backend:
        backend = Backend(handler)
        self._backends.append(backend)
        return backend

    def server(self, impl: str, cert_dir: Path) -> Server:
        self._count += 1
        ready = self.tmp_path / f"server-{self._count}.ready"
        common = ["--listen", f"{LOCALHOST}:0", "--cert-dir", str(cert_dir), "--ready-file", str(ready)]
        if impl == "go":
            argv = [str(self.hbone_bin), "server", *common]
        else:
            argv = [sys.executable, "-m", "ambientctl", "hbone", "serve", *common]
        proc = Proc(argv, f"{impl} server")
        self._procs.append(proc)
        if impl == "go":
            line = proc.wait_line(lambda text: text.startswith("listening="), "listening=")
            addr = line.split()[0].removeprefix("listening=")
            assert ready.read_text() == addr + "\n"
        else:
            addr = wait_for_ready_file(ready, proc)
        return Server(impl, addr, proc)

    def client_argv(
        self,
        impl: str,
        server: Server,
        authority: str,
        cert_dir: Path,
        expect: str,
        headers: Sequence[str] = (),
    ) -> list[str]:
        if impl == "go":
            argv = [
                str(self.hbone_bin), "client", "--connect", server.addr, "--authority", authority,
                "--cert-dir", str(cert_dir), "--expect-identity", expect,
            ]  # fmt: skip
            for header in headers:
                argv += ["--header", header]
            return argv
        assert not headers, "ambientctl hbone connect takes no extra headers"
        return [
            sys.executable, "-m", "ambientctl", "hbone", "connect", server.addr,
            "--authority", authority, "--cert-dir", str(cert_dir), "--expect-identity", expect,
        ]  # fmt: skip

    def run_client(
        self,
        impl: str,
        server: Server,
        authority: str,
        *,
        cert_dir: Path,
        data: bytes = b"",
        expect: str = SERVER_ID.uri,
        headers: Sequence[str] = (),
    ) -> subprocess.CompletedProcess[bytes]:
        """Run a client to completion: ``data`` on stdin, then EOF. Killed if it overruns."""
        argv = self.client_argv(impl, server, authority, cert_dir, expect, headers)
        try:
            return subprocess.run(
                argv, input=data, capture_output=True, timeout=TIMEOUT, cwd=REPO, check=False
            )
        except subprocess.TimeoutExpired as e:  # run() has killed and reaped the client
            out = e.stdout or b""
            err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else ""
            raise AssertionError(
                f"{impl} client still running after {TIMEOUT}s (killed); it had written {len(out)} bytes "
                f"to stdout; client stderr:\n{err}\n{server.impl} server stderr:\n"
                f"{server.proc.stderr}"
            ) from None

    def start_client(
        self, impl: str, server: Server, authority: str, *, cert_dir: Path, expect: str = SERVER_ID.uri
    ) -> Proc:
        """A client with stdin and stdout as pipes, for tests that drive it step by step."""
        proc = Proc(self.client_argv(impl, server, authority, cert_dir, expect), f"{impl} client", pipes=True)
        self._procs.append(proc)
        return proc


@pytest.fixture
def harness(hbone_bin: Path, tmp_path: Path) -> Iterator[Harness]:
    h = Harness(hbone_bin, tmp_path)
    try:
        yield h
    finally:
        h.close()


@pytest.fixture
def refused_addr() -> Iterator[str]:
    """A 127.0.0.1 port that refuses connections: bound (so nobody else takes it), not listening."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((LOCALHOST, 0))
        yield f"{LOCALHOST}:{sock.getsockname()[1]}"
    finally:
        sock.close()


def explain(result: subprocess.CompletedProcess[bytes], server: Server) -> str:
    return (
        f"client exit status {result.returncode}; client stderr:\n{result.stderr.decode(errors='replace')}\n"
        f"{server.impl} server stderr:\n{server.proc.stderr}"
    )


def assert_refused(
    result: subprocess.CompletedProcess[bytes], server: Server, backend: Backend, accepted_before: int
) -> None:
    assert result.returncode != 0, f"the client should have failed; {explain(result, server)}"
    assert b"Traceback" not in result.stderr, (
        f"the client crashed instead of refusing; {explain(result, server)}"
    )
    assert result.stdout == b"", "a refused client printed data"
    assert backend.accepted == accepted_before, "the backend was reached although the connection was refused"


def control_run(harness: Harness, client: str, server: Server, backend: Backend, cert_dir: Path) -> int:
    """Before a refusal test: the same client and server do work when nothing is wrong (so the
    refusal below is not just a client that cannot run). Returns the backend's connection count."""
    result = harness.run_client(client, server, backend.addr, cert_dir=cert_dir, data=b"ping")
    assert result.returncode == 0, f"control run (nothing wrong yet) failed; {explain(result, server)}"
    assert result.stdout == b"ping"
    return backend.accepted


# ---------------------------------------------------------------------------------------------
# tests, each for every (client, server) pair


@pytest.mark.parametrize(("client", "server_impl"), CLIENT_SERVER_PAIRS)
def test_echo_integrity_both_ways(harness: Harness, creds: Creds, client: str, server_impl: str) -> None:
    """4 MiB of random bytes go through and come back unchanged (more than any flow-control window)."""
    backend = harness.backend(echo)
    server = harness.server(server_impl, creds.server)
    data = os.urandom(4 * MIB + 17)
    forwarded = 'for="127.0.0.1:40000"'
    headers = [f"forwarded: {forwarded}", "baggage: interop=1"] if client == "go" else []

    result = harness.run_client(
        client, server, backend.addr, cert_dir=creds.client, data=data, headers=headers
    )

    assert result.returncode == 0, explain(result, server)
    assert len(result.stdout) == len(data)
    assert hashlib.sha256(result.stdout).digest() == hashlib.sha256(data).digest()
    assert backend.accepted == 1
    if client == "go":
        assert b"status=200 proto=HTTP/2.0" in result.stderr
    if server_impl == "go":
        line = server.wait_peer_line(CLIENT_ID, backend.addr)
        assert " method=CONNECT " in line
        assert " proto=HTTP/2.0 " in line
        if headers:
            assert f"forwarded={json.dumps(forwarded)} " in line
            assert line.endswith('baggage="interop=1"')


@pytest.mark.parametrize(("client", "server_impl"), CLIENT_SERVER_PAIRS)
def test_client_half_close_reaches_backend(
    harness: Harness, creds: Creds, client: str, server_impl: str
) -> None:
    """stdin EOF -> END_STREAM -> the backend sees EOF; its answer still comes back afterwards."""
    backend = harness.backend(digest_after_eof)
    server = harness.server(server_impl, creds.server)
    data = os.urandom(MIB)

    result = harness.run_client(client, server, backend.addr, cert_dir=creds.client, data=data)

    assert result.returncode == 0, explain(result, server)
    assert result.stdout == digest_line(data)


@pytest.mark.parametrize(("client", "server_impl"), CLIENT_SERVER_PAIRS)
def test_empty_stream(harness: Harness, creds: Creds, client: str, server_impl: str) -> None:
    """Immediate EOF both ways: no payload at all is still a clean, successful stream."""
    backend = harness.backend(echo)
    server = harness.server(server_impl, creds.server)

    result = harness.run_client(client, server, backend.addr, cert_dir=creds.client, data=b"")

    assert result.returncode == 0, explain(result, server)
    assert result.stdout == b""
    assert backend.accepted == 1


@pytest.mark.parametrize(("client", "server_impl"), CLIENT_SERVER_PAIRS)
def test_intermediate_ca_chains(harness: Harness, creds: Creds, client: str, server_impl: str) -> None:
    """Both leaves come with an intermediate in cert-chain.pem; peers trust only the root."""
    backend = harness.backend(digest_after_eof)
    server = harness.server(server_impl, creds.server_intermediate)
    data = os.urandom(64 * 1024)

    result = harness.run_client(client, server, backend.addr, cert_dir=creds.client_intermediate, data=data)

    assert result.returncode == 0, explain(result, server)
    assert result.stdout == digest_line(data)
    if server_impl == "go":
        server.wait_peer_line(CLIENT_ID, backend.addr)


@pytest.mark.parametrize(("client", "server_impl"), CLIENT_SERVER_PAIRS)
def test_concurrent_connections(harness: Harness, creds: Creds, client: str, server_impl: str) -> None:
    """Several clients at once through one server, each with its own data."""
    backend = harness.backend(echo)
    server = harness.server(server_impl, creds.server)
    payloads = [os.urandom(256 * 1024 + i) for i in range(6)]

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(payloads)) as pool:
        results = list(
            pool.map(
                lambda data: harness.run_client(
                    client, server, backend.addr, cert_dir=creds.client, data=data
                ),
                payloads,
            )
        )

    for data, result in zip(payloads, results, strict=True):
        assert result.returncode == 0, explain(result, server)
        assert hashlib.sha256(result.stdout).digest() == hashlib.sha256(data).digest()
    assert backend.accepted == len(payloads)


@pytest.mark.parametrize(("client", "server_impl"), CLIENT_SERVER_PAIRS)
def test_wrong_server_identity_is_refused(
    harness: Harness, creds: Creds, client: str, server_impl: str
) -> None:
    """The client expects another identity than the server's certificate names: no stream."""
    backend = harness.backend(echo)
    server = harness.server(server_impl, creds.server)
    accepted = control_run(harness, client, server, backend, creds.client)
    wrong = Identity(TRUST_DOMAIN, "server-ns", "impostor").uri

    result = harness.run_client(
        client, server, backend.addr, cert_dir=creds.client, data=b"secret", expect=wrong
    )

    assert_refused(result, server, backend, accepted)
    if client == "go":
        assert f"server identity mismatch: got {SERVER_ID.uri}, expected {wrong}".encode() in result.stderr


@pytest.mark.parametrize(("client", "server_impl"), CLIENT_SERVER_PAIRS)
def test_client_from_other_ca_is_refused(
    harness: Harness, creds: Creds, client: str, server_impl: str
) -> None:
    """A client certificate from a CA the server does not trust: the server refuses the TLS session."""
    backend = harness.backend(echo)
    server = harness.server(server_impl, creds.server)
    accepted = control_run(harness, client, server, backend, creds.client)

    result = harness.run_client(client, server, backend.addr, cert_dir=creds.client_other_ca, data=b"secret")

    assert_refused(result, server, backend, accepted)
    if server_impl == "go":
        server.proc.wait_line(lambda line: "TLS handshake error" in line, "a TLS handshake error")
        peers = [line for line in server.proc.stderr.splitlines() if line.startswith("peer=")]
        assert len(peers) == 1, f"only the control run may have reached the handler: {peers}"


@pytest.mark.parametrize(("client", "server_impl"), CLIENT_SERVER_PAIRS)
def test_server_from_other_ca_is_refused(
    harness: Harness, creds: Creds, client: str, server_impl: str
) -> None:
    """The server has the expected identity, but signed by a CA the client does not trust."""
    backend = harness.backend(echo)
    good_server = harness.server(server_impl, creds.server)
    accepted = control_run(harness, client, good_server, backend, creds.client)
    server = harness.server(server_impl, creds.server_other_ca)

    result = harness.run_client(client, server, backend.addr, cert_dir=creds.client, data=b"secret")

    assert_refused(result, server, backend, accepted)
    if client == "go":
        assert b"peer certificate chain does not verify against root-cert.pem" in result.stderr


@pytest.mark.parametrize(("client", "server_impl"), CLIENT_SERVER_PAIRS)
def test_unreachable_target_is_503(
    harness: Harness, creds: Creds, refused_addr: str, client: str, server_impl: str
) -> None:
    backend = harness.backend(echo)
    server = harness.server(server_impl, creds.server)
    control_run(harness, client, server, backend, creds.client)

    result = harness.run_client(client, server, refused_addr, cert_dir=creds.client, data=b"x")

    assert result.returncode != 0, explain(result, server)
    assert b"Traceback" not in result.stderr, explain(result, server)
    assert result.stdout == b""
    if client == "go":
        assert b"status=503 " in result.stderr, explain(result, server)


@pytest.mark.parametrize(("client", "server_impl"), GO_CLIENT_PAIRS)
def test_authority_without_port_is_400(harness: Harness, creds: Creds, client: str, server_impl: str) -> None:
    """``:authority`` must be host:port; the Go client sends whatever it is told to."""
    server = harness.server(server_impl, creds.server)

    result = harness.run_client(client, server, LOCALHOST, cert_dir=creds.client, data=b"x")

    assert result.returncode != 0, explain(result, server)
    assert result.stdout == b""
    assert b"status=400 " in result.stderr, explain(result, server)


@pytest.mark.parametrize(
    ("client", "server_impl"),
    [pytest.param("go", "ambientctl", id="go-client-ambientctl-server")],
)
def test_backend_half_close_reaches_client_while_it_still_sends(
    harness: Harness, creds: Creds, client: str, server_impl: str
) -> None:
    """The backend half-closes first: the client must see END_STREAM (EOF) while its own side is
    still open, and what it sends afterwards must still arrive.

    Only against ``ambientctl hbone serve``: Go's net/http server cannot end a response while the
    request body is still open (returning from the handler resets the stream), so the Go server
    waits for the client's END_STREAM first. The Go client does support this direction.
    """
    payload = os.urandom(256 * 1024)
    upload = os.urandom(256 * 1024)
    backend = harness.backend(send_first_then_drain(payload))
    server = harness.server(server_impl, creds.server)
    proc = harness.start_client(client, server, backend.addr, cert_dir=creds.client)
    assert proc.popen.stdin is not None
    assert proc.popen.stdout is not None

    received = read_until_eof(proc.popen.stdout)  # stdin is still open
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
    assert proc.popen.poll() is None, "the client quit after the server's END_STREAM"

    proc.popen.stdin.write(upload)
    proc.popen.stdin.close()
    assert proc.popen.wait(timeout=TIMEOUT) == 0, proc.stderr
    assert backend.results.get(timeout=TIMEOUT) == (hashlib.sha256(upload).hexdigest(), len(upload))
