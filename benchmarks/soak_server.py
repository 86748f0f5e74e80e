"""The soak benchmark's server pod: HTTP on one port, TCP echo on another (stdlib only).

Runs as a pod's command (``python3 soak_server.py``, as the pod's unprivileged user, inside its
netns), so it imports nothing from the repository. HTTP answers every request with a small
fixed body and closes (each request of the load is a new connection); the echo port returns
every byte until the peer closes, so a long-lived stream can check what comes back.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time

BODY_BYTES = 512
HEADER_LIMIT = 8192


class Counts:
    def __init__(self) -> None:
        self.http = 0
        self.echo_conns = 0
        self.echo_bytes = 0
        self.errors = 0


async def http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: bytes, n: Counts) -> None:
    try:
        async with asyncio.timeout(30):
            await reader.readuntil(b"\r\n\r\n")
            head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
            writer.write(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
            await writer.drain()
        n.http += 1
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
        n.errors += 1
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: Counts) -> None:
    n.echo_conns += 1
    try:
        while data := await reader.read(65536):
            n.echo_bytes += len(data)
            writer.write(data)
            await writer.drain()
    except OSError:
        n.errors += 1
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def main_async(args: argparse.Namespace) -> None:
    n = Counts()
    name = os.environ.get("POD_NAME", "server")
    body = (f"{name} ".encode() * BODY_BYTES)[:BODY_BYTES]
    servers = [
        await asyncio.start_server(lambda r, w: http(r, w, body, n), "0.0.0.0", args.http_port,
                                   backlog=1024, limit=HEADER_LIMIT),
        await asyncio.start_server(lambda r, w: echo(r, w, n), "0.0.0.0", args.echo_port, backlog=1024),
    ]  # fmt: skip
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(json.dumps({"event": "serving", "http": args.http_port, "echo": args.echo_port}), flush=True)
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), args.report_every)
        print(json.dumps({"t": round(time.time(), 3), "http": n.http, "echo_conns": n.echo_conns,
                          "echo_bytes": n.echo_bytes, "errors": n.errors}), flush=True)  # fmt: skip
    for s in servers:
        s.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--http-port", type=int, default=8080)
    p.add_argument("--echo-port", type=int, default=7007)
    p.add_argument("--report-every", type=float, default=60.0, help="seconds between count lines")
    asyncio.run(main_async(p.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
