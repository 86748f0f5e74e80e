"""``ambientctl demo --loopback``: the mesh's core without network namespaces or root.

The demo shows the core the local mesh stands on: two workload identities issued by a fresh mesh CA talk through an
HBONE tunnel on loopback. A recording tap sits on the wire between the two ends, so the demo can
show what an attacker on the network would see: TLS 1.3 records, never the application's bytes.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from mesh.hbone.client import ClientProtocol, open_connection
from mesh.hbone.pool import HbonePool, PoolKey
from mesh.hbone.relay import connect_and_relay
from mesh.hbone.server import HboneServer, InboundStream
from mesh.hbone.stream import BufferedSink
from mesh.identity import Identity
from mesh.pki import CertificateAuthority
from mesh.tls import client_context, server_context

FRONTEND = Identity("cluster.local", "shop", "frontend")
WEB = Identity("cluster.local", "shop", "web")
MARKER = b"SECRET-ORDER-4242"


def say(msg: str) -> None:
    print(msg, flush=True)


class Tap:
    """A TCP relay that records every byte passing between the two ends: the network's view."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.wire = bytearray()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        writers = [w]
        try:
            ur, uw = await asyncio.open_connection(*self.target)
            writers.append(uw)
            await asyncio.gather(self._pipe(r, uw), self._pipe(ur, w))
        except (ConnectionError, OSError):
            pass
        finally:
            for wr in writers:
                wr.transport.abort()
            self._tasks.discard(task)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        while data := await src.read(65536):
            self.wire += data
            dst.write(data)
            await dst.drain()
        if dst.can_write_eof():
            dst.write_eof()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def run_demo(connections: int) -> int:
    say("== ambient mesh demo: an HBONE tunnel between two workload identities ==")
    say("[1/5] creating a mesh CA (ECDSA P-256 root, trust domain cluster.local)")
    ca = CertificateAuthority.generate("cluster.local")
    say(f"[2/5] issuing workload certificates: {FRONTEND} and {WEB}")
    client_cred, server_cred = ca.issue(FRONTEND), ca.issue(WEB)

    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
        w.close()

    app = await asyncio.start_server(echo, "127.0.0.1", 0)
    app_port = app.sockets[0].getsockname()[1]
    seen: list[dict[str, Any]] = []
    all_seen = asyncio.Event()

    async def handler(inbound: InboundStream) -> None:
        leg = await connect_and_relay(inbound)
        seen.append(
            {
                "src": str(inbound.peer),
                "authority": inbound.request.authority,
                "forwarded": inbound.request.header("forwarded") or "-",
                "up": inbound.stream.bytes_received,
                "down": inbound.stream.bytes_sent,
                "ok": leg is not None and leg.error is None,
            }
        )
        if len(seen) == connections:
            all_seen.set()

    server = HboneServer(handler, server_context(server_cred), "cluster.local")
    await server.listen("127.0.0.1", 0)
    tap = Tap(server.address)
    tap_addr = await tap.start()
    say(
        f"[3/5] HBONE server for {WEB.principal} on {server.address[0]}:{server.address[1]}; app on :{app_port}"
    )
    say(f"      a recording tap on {tap_addr[0]}:{tap_addr[1]} sits on the wire in between")

    tls_info: dict[str, str] = {}

    async def dial(key: PoolKey) -> ClientProtocol:
        conn = await open_connection(
            *key.dst_addr, client_context(client_cred), "cluster.local", key.dst_identity
        )
        assert conn.transport is not None
        ssl_obj = conn.transport.get_extra_info("ssl_object")
        tls_info.update(
            version=ssl_obj.version(), cipher=ssl_obj.cipher()[0], alpn=ssl_obj.selected_alpn_protocol()
        )
        return conn

    pool = HbonePool(dial)
    key = PoolKey(FRONTEND, WEB, None, tap_addr)
    say(f"[4/5] sending {connections} TCP connections from {FRONTEND.principal} through the tunnel")
    try:
        for i in range(connections):
            st = await pool.open_stream(
                key, f"127.0.0.1:{app_port}", [("forwarded", f'for="127.0.0.1:{40000 + i}"')]
            )
            sink = BufferedSink(st)
            payload = MARKER + b" " + os.urandom(2000 + 1000 * i).hex().encode()
            st.write(payload)
            st.write_eof()
            got = await asyncio.wait_for(sink.read_all(), 10)
            if got != payload:
                say(f"connection {i}: echo mismatch")
                return 1
            await asyncio.wait_for(st.done, 10)
        await asyncio.wait_for(all_seen.wait(), 10)
    finally:
        await pool.aclose()
        await server.close()
        await tap.stop()
        app.close()

    say("[5/5] what happened:\n")
    header = f"{'#':>2}  {'source identity (verified by the server)':44} {'CONNECT :authority':18} {'up B':>6} {'down B':>6}  result"
    say(header)
    say("-" * len(header))
    for i, s in enumerate(seen):
        say(
            f"{i:>2}  {s['src']:44} {s['authority']:18} {s['up']:>6} {s['down']:>6}  {'ok' if s['ok'] else 'FAILED'}"
        )
    say("")
    say(f"server identity checked by the client: {WEB}")
    say(
        f"TLS: {tls_info.get('version')} {tls_info.get('cipher')}, ALPN {tls_info.get('alpn')}; "
        f"HBONE connections opened by the pool: {pool.dials} for {connections} TCP connections"
    )
    leaked = MARKER in tap.wire
    say(
        f"bytes seen on the wire: {len(tap.wire)}; application marker {MARKER.decode()!r} visible: "
        f"{'YES - PLAINTEXT LEAK' if leaked else 'no (encrypted)'}"
    )
    say(f"first wire bytes: {bytes(tap.wire[:16]).hex(' ')}  (0x16 0x03 = a TLS handshake record)")
    return 1 if leaked or not all(s["ok"] for s in seen) else 0
