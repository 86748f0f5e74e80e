"""``ambientctl hbone serve|connect|forward``: HBONE tunnels a user can put in front of any TCP service.

``serve`` terminates HBONE and dials each stream's ``:authority``; ``connect`` is ``nc`` over one
CONNECT stream; ``forward`` accepts plain TCP and carries each connection as a CONNECT stream over
pooled HBONE connections — the same pool, client and relay code ztunnel's outbound path uses.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import sys
import time
from typing import Any, cast

import structlog

from mesh import runtime
from mesh.hbone.client import ClientProtocol, open_connection
from mesh.hbone.pool import HbonePool, PoolKey
from mesh.hbone.protocol import format_authority, parse_authority
from mesh.hbone.relay import TcpLeg, connect_and_relay, wait_relay
from mesh.hbone.server import HboneServer, InboundStream
from mesh.hbone.stream import BufferedSink, StreamError
from mesh.identity import Identity, IdentityError
from mesh.netaddr import parse_hostport
from mesh.tasks import Supervisor
from mesh.tls import CredentialError, DirCredential, PeerRejected, load_credential_dir

log = structlog.get_logger("ambientctl.hbone")

DRAIN_SECONDS = 5.0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("hbone", help="HBONE tunnel tools (serve, connect, forward)")
    hs = p.add_subparsers(dest="hbone_command", required=True, metavar="SUBCOMMAND")

    s = hs.add_parser("serve", help="terminate HBONE and relay each stream to its :authority")
    s.add_argument("--listen", required=True, metavar="ADDR", help="host:port to accept HBONE on")
    s.add_argument("--cert-dir", required=True, metavar="DIR", help="cert-chain.pem, key.pem, root-cert.pem")
    s.add_argument("--ready-file", metavar="PATH", help="write the bound host:port here once listening")
    s.set_defaults(func=cmd_serve)

    c = hs.add_parser("connect", help="one CONNECT stream, stdin/stdout like nc")
    c.add_argument("address", metavar="ADDR", help="host:port of the HBONE server")
    c.add_argument("--authority", required=True, metavar="HOST:PORT", help="target the server connects to")
    c.add_argument("--cert-dir", required=True, metavar="DIR")
    c.add_argument(
        "--expect-identity", required=True, metavar="ID", help="spiffe:// identity the server must have"
    )
    c.set_defaults(func=cmd_connect)

    f = hs.add_parser("forward", help="accept plain TCP and tunnel each connection over pooled HBONE")
    f.add_argument("--listen", required=True, metavar="ADDR", help="host:port to accept plain TCP on")
    f.add_argument("--to", required=True, metavar="HBONE_ADDR", help="host:port of the HBONE server")
    f.add_argument("--authority", required=True, metavar="HOST:PORT", help="target the server connects to")
    f.add_argument("--cert-dir", required=True, metavar="DIR")
    f.add_argument("--expect-identity", required=True, metavar="ID")
    f.add_argument("--ready-file", metavar="PATH", help="write the bound host:port here once listening")
    f.set_defaults(func=cmd_forward)


class UsageError(Exception):
    pass


def _load(cert_dir: str) -> DirCredential:
    # Straight from the files with the ssl module: this tool never imports cryptography (~9 MiB).
    try:
        return load_credential_dir(cert_dir)
    except CredentialError as e:
        raise UsageError(f"--cert-dir: {e}") from None


def _identity(value: str) -> Identity:
    try:
        return Identity.parse(value)
    except IdentityError as e:
        raise UsageError(f"--expect-identity: {e}") from None


def _addr(value: str, what: str) -> tuple[str, int]:
    try:
        return parse_hostport(value, what, listen=what == "--listen")
    except ValueError as e:
        raise UsageError(str(e)) from None


def _fail(e: Exception) -> int:
    print(f"ambientctl: {e}", file=sys.stderr)
    return 2


# -- serve ----------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        cred = _load(args.cert_dir)
        host, port = _addr(args.listen, "--listen")
    except UsageError as e:
        return _fail(e)
    return runtime.run(lambda: serve(cred, host, port, args.ready_file))


async def access_logged_relay(inbound: InboundStream) -> None:
    """Relay a stream to its authority and write one access-log line for it."""
    start = time.monotonic()
    req = inbound.request
    leg = await connect_and_relay(inbound)
    st = inbound.stream
    log.info(
        "connection complete",
        src_identity=str(inbound.peer),
        forwarded=req.header("forwarded"),
        dst=req.authority,
        bytes_sent=st.bytes_sent,
        bytes_recv=st.bytes_received,
        duration_ms=round((time.monotonic() - start) * 1000, 1),
        result="ok" if leg is not None and leg.error is None else "error",
        error=str(leg.error)
        if leg is not None and leg.error
        else ("upstream unreachable" if leg is None else None),
    )


async def serve(cred: DirCredential, host: str, port: int, ready_file: str | None) -> int:
    stop = runtime.stop_on_signals()
    server = HboneServer(access_logged_relay, cred.server, cred.identity.trust_domain)
    try:
        await server.listen(host, port)
    except OSError as e:
        return _fail(UsageError(f"--listen {host}:{port}: {e.strerror}"))
    bound = format_authority(*server.address)
    log.info("hbone server listening", address=bound, identity=str(cred.identity))
    runtime.write_ready_file(ready_file, bound)
    await stop.wait()
    log.info("draining", seconds=DRAIN_SECONDS)
    await server.close(drain_timeout=DRAIN_SECONDS)
    return 0


# -- connect --------------------------------------------------------------------------------------


def cmd_connect(args: argparse.Namespace) -> int:
    try:
        cred = _load(args.cert_dir)
        host, port = _addr(args.address, "ADDR")
        _addr(args.authority, "--authority")
        expect = _identity(args.expect_identity)
    except UsageError as e:
        return _fail(e)
    return runtime.run(lambda: connect(cred, host, port, args.authority, expect))


async def connect(cred: DirCredential, host: str, port: int, authority: str, expect: Identity) -> int:
    loop = asyncio.get_running_loop()
    try:
        conn = await open_connection(host, port, cred.client, cred.identity.trust_domain, expect)
    except (OSError, PeerRejected) as e:
        return _fail(UsageError(f"cannot reach HBONE server {host}:{port}: {e}"))
    try:
        stream = await conn.open_stream(authority)
    except Exception as e:
        conn.close()
        return _fail(UsageError(f"CONNECT {authority} failed: {e}"))
    sink = BufferedSink(stream)

    async def pump_stdin() -> None:
        stdin = cast(io.BufferedReader, sys.stdin.buffer)
        while True:
            chunk = await loop.run_in_executor(None, stdin.read1, 65536)
            if not chunk:
                break
            stream.write(chunk)
            await stream.drain()
        stream.write_eof()

    reader = asyncio.create_task(pump_stdin())
    rc = 0
    try:
        while chunk := await sink.read():
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
        await reader
    except StreamError as e:
        print(f"ambientctl: stream failed: {e}", file=sys.stderr)
        rc = 1
    finally:
        reader.cancel()
        conn.close()
    return rc


# -- forward --------------------------------------------------------------------------------------


def cmd_forward(args: argparse.Namespace) -> int:
    try:
        cred = _load(args.cert_dir)
        lhost, lport = _addr(args.listen, "--listen")
        thost, tport = _addr(args.to, "--to")
        _addr(args.authority, "--authority")
        expect = _identity(args.expect_identity)
    except UsageError as e:
        return _fail(e)
    return runtime.run(
        lambda: forward(cred, (lhost, lport), (thost, tport), args.authority, expect, args.ready_file)
    )


class Forwarder:
    """Plain TCP in, one pooled HBONE CONNECT stream per connection out."""

    def __init__(self, cred: DirCredential, to: tuple[str, int], authority: str, expect: Identity) -> None:
        self.ctx = cred.client
        self.trust_domain = cred.identity.trust_domain
        self.key = PoolKey(cred.identity, expect, None, to)
        self.authority = authority
        self.pool = HbonePool(self._dial)
        self.tasks = Supervisor("forward")
        self.loop = asyncio.get_running_loop()

    async def _dial(self, key: PoolKey) -> ClientProtocol:
        return await open_connection(
            key.dst_addr[0], key.dst_addr[1], self.ctx, self.trust_domain, key.dst_identity
        )

    def new_leg(self) -> TcpLeg:
        leg = TcpLeg(self.loop)
        self.tasks.spawn(self._tunnel(leg), name="forward-stream")
        return leg

    async def _tunnel(self, leg: TcpLeg) -> None:
        await leg.connected
        assert leg.transport is not None
        peer = leg.transport.get_extra_info("peername")
        headers = [("forwarded", f'for="{format_authority(peer[0], peer[1])}"')] if peer else []
        try:
            stream = await self.pool.open_stream(self.key, self.authority, headers)
        except Exception as e:
            log.warning("tunnel failed", authority=self.authority, error=str(e))
            leg.transport.abort()
            return
        leg.attach(stream)
        await wait_relay(leg, stream)

    async def aclose(self) -> None:
        await self.tasks.aclose()
        await self.pool.aclose()


async def forward(
    cred: DirCredential,
    listen: tuple[str, int],
    to: tuple[str, int],
    authority: str,
    expect: Identity,
    ready_file: str | None,
) -> int:
    parse_authority(authority)
    stop = runtime.stop_on_signals()
    fwd = Forwarder(cred, to, authority, expect)
    loop = asyncio.get_running_loop()
    try:
        server = await loop.create_server(fwd.new_leg, listen[0], listen[1], backlog=1024)
    except OSError as e:
        return _fail(UsageError(f"--listen {listen[0]}:{listen[1]}: {e.strerror}"))
    addr = server.sockets[0].getsockname()
    bound = format_authority(addr[0], addr[1])
    log.info("forwarding", listen=bound, to=format_authority(*to), authority=authority, expect=str(expect))
    runtime.write_ready_file(ready_file, bound)
    await stop.wait()
    server.close()
    if fwd.tasks:
        try:
            async with asyncio.timeout(DRAIN_SECONDS):
                await fwd.tasks.wait()
        except TimeoutError:
            log.warning("drain deadline passed, closing open tunnels", open=len(fwd.tasks))
    await fwd.aclose()
    await server.wait_closed()
    return 0
