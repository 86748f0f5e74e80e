"""What one new HBONE connection costs in CPU, both ends in one process, on loopback.

    .venv/bin/python benchmarks/hbone_connect.py [--connections N] [--cold] [--profile [--sort KEY]]

Each connection is what a ztunnel does when its pool has no connection to reuse: dial, TLS 1.3
(the session resumed from the previous connection's ticket, as ztunnel's pool does; ``--cold``:
a full handshake each time), verify the peer's SPIFFE identity, HTTP/2 preface and SETTINGS,
one CONNECT stream to a loopback echo backend carrying 100 bytes each way, then close. Client,
server and backend share one event loop (uvloop), so the process's CPU time per connection is
what both ztunnels' HBONE layers spend on it, plus a small echo backend. ``--profile`` adds a
cProfile table (own time) of the same loop. It isolates the per-connection machinery that
configuration 5 of datapath.py measures as "resumed" and "cold" (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import uvloop  # noqa: E402

from mesh import log as meshlog  # noqa: E402
from mesh.hbone.client import open_connection  # noqa: E402
from mesh.hbone.relay import connect_and_relay  # noqa: E402
from mesh.hbone.server import HboneServer, InboundStream  # noqa: E402
from mesh.hbone.stream import BufferedSink  # noqa: E402
from mesh.identity import Identity  # noqa: E402
from mesh.pki import CertificateAuthority  # noqa: E402
from mesh.tls import ClientContext, client_context, server_context  # noqa: E402

CLIENT_ID = Identity("cluster.local", "shop", "frontend")
SERVER_ID = Identity("cluster.local", "shop", "web")
PAYLOAD = b"x" * 100
WARMUP = 20


async def run(connections: int, cold: bool, profile: bool, sort: str) -> str:
    ca = CertificateAuthority.generate("cluster.local")

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
        writer.close()

    backend = await asyncio.start_server(echo, "127.0.0.1", 0)
    target = f"127.0.0.1:{backend.sockets[0].getsockname()[1]}"
    async def relay(stream: InboundStream) -> None:
        await connect_and_relay(stream)

    server = HboneServer(relay, server_context(ca.issue(SERVER_ID)), "cluster.local")
    await server.listen("127.0.0.1", 0)
    host, port = server.address
    ctx = client_context(ca.issue(CLIENT_ID))
    resumed = 0

    async def one() -> None:
        nonlocal resumed
        if cold and isinstance(ctx, ClientContext):
            ctx.forget((host, port, SERVER_ID))
        conn = await open_connection(host, port, ctx, "cluster.local", SERVER_ID)
        stream = await conn.open_stream(target)
        sink = BufferedSink(stream)
        stream.write(PAYLOAD)
        stream.write_eof()
        if await sink.read_all() != PAYLOAD:
            raise RuntimeError("the echo came back wrong")
        resumed += conn.resumed
        conn.close()
        await asyncio.wait_for(conn.closed, 5)

    try:
        for _ in range(WARMUP):
            await one()
        resumed = 0
        prof = cProfile.Profile() if profile else None
        cpu0, wall0 = time.process_time(), time.perf_counter()
        if prof is not None:
            prof.enable()
        for _ in range(connections):
            await one()
        if prof is not None:
            prof.disable()
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    finally:
        await server.close()
        backend.close()
    lines = [
        f"{connections} new HBONE connections ({'full handshake each' if cold else 'TLS session resumed'}:"
        f" {resumed} resumed): {cpu / connections * 1e6:.0f} µs of CPU per connection"
        f" (both ends and the echo backend), {connections / wall:.0f} connections/s"
        + (" — under cProfile, which inflates both" if profile else "")
    ]
    if prof is not None:
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats(sort).print_stats(30)
        lines.append(out.getvalue())
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--connections", type=int, default=500)
    p.add_argument("--cold", action="store_true", help="no session resumption: a full handshake each")
    p.add_argument("--profile", action="store_true", help="append a cProfile table")
    p.add_argument("--sort", default="tottime", help="cProfile sort key (tottime, cumulative)")
    args = p.parse_args(argv)
    if args.connections < 1:
        p.error("--connections must be at least 1")
    meshlog.configure("warning")
    print(uvloop.run(run(args.connections, args.cold, args.profile, args.sort)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
