from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator

import pytest

from mesh.identity import Identity
from mesh.pki import CertificateAuthority, Credential

CLIENT_ID = Identity("cluster.local", "shop", "frontend")
SERVER_ID = Identity("cluster.local", "shop", "web")


@pytest.fixture(scope="session")
def ca() -> CertificateAuthority:
    return CertificateAuthority.generate("cluster.local")


@pytest.fixture(scope="session")
def client_cred(ca: CertificateAuthority) -> Credential:
    return ca.issue(CLIENT_ID)


@pytest.fixture(scope="session")
def server_cred(ca: CertificateAuthority) -> Credential:
    return ca.issue(SERVER_ID)


class Backend:
    """TCP servers on loopback: an echo port and a hashing port (replies sha256 of what it got)."""

    def __init__(self) -> None:
        self.echo_port = 0
        self.hash_port = 0
        self.stall_port = 0
        self.connections = 0
        self.peers: list[tuple[str, int]] = []
        self._servers: list[asyncio.Server] = []
        self.stalled: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            self.connections += 1
            self.peers.append(w.get_extra_info("peername"))
            try:
                while data := await r.read(256 * 1024):
                    w.write(data)
                    await w.drain()
                w.write_eof()
                await w.drain()
            except ConnectionError:
                pass
            finally:
                w.close()

        async def hasher(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            h = hashlib.sha256()
            n = 0
            while data := await r.read(1024 * 1024):
                h.update(data)
                n += len(data)
            w.write(f"{n} {h.hexdigest()}".encode())
            await w.drain()
            w.close()

        async def stall(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            self.stalled.append(w)  # never reads: the kernel buffers fill up

        for fn in (echo, hasher, stall):
            # A deep accept queue: the 1,000-connection test opens them all at once, and an
            # overflowing queue makes the kernel fall back to SYN cookies and resets.
            srv = await asyncio.start_server(fn, "127.0.0.1", 0, backlog=4096)
            self._servers.append(srv)
        self.echo_port, self.hash_port, self.stall_port = (
            s.sockets[0].getsockname()[1] for s in self._servers
        )

    async def stop(self) -> None:
        for w in self.stalled:
            w.transport.abort()
        for s in self._servers:
            s.close()
            await s.wait_closed()


@pytest.fixture
async def backend() -> AsyncIterator[Backend]:
    b = Backend()
    await b.start()
    yield b
    await b.stop()
