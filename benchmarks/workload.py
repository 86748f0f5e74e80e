"""Workload processes for the data-path benchmark, each run as its own Python process.

``python benchmarks/workload.py echo --port-file F`` is the backend (echoes everything, keeps
connections open as long as the client does); ``latency``, ``connrate``, ``hold`` and ``rounds``
are the clients. All of them use 127.0.0.1 unless ``--host`` says otherwise (the netns configuration runs
them inside pod network namespaces, the backend listening on the pod's address). Clients print one JSON object on stdout. Kept free of project imports so that the
measuring processes stay small and identical for every configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import socket
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar, cast

try:
    import uvloop
except ImportError:  # pragma: no cover - the project depends on uvloop
    uvloop = None  # type: ignore[assignment]

T = TypeVar("T")
PAYLOAD = b"x" * 1024


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop (what the daemons use) when available."""
    if uvloop is not None:
        return uvloop.run(coro)
    return asyncio.run(coro)


def write_atomic(path: str, text: str) -> None:
    tmp = Path(path + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


# -- backend ----------------------------------------------------------------------------------------


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool:
        return False  # close once the client has finished sending


async def echo_server(port_file: str, host: str = "127.0.0.1", port: int = 0) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Echo, host, port, backlog=4096)
    port = server.sockets[0].getsockname()[1]
    write_atomic(port_file, str(port))
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    server.close()


# -- clients --------------------------------------------------------------------------------------


def recv_exactly(sock: socket.socket, n: int, buf: bytearray) -> None:
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:n])
        if k == 0:
            raise ConnectionError("connection closed early")
        got += k


def latency(host: str, port: int, count: int, warmup: int) -> dict[str, float]:
    """Round trips of 1 KiB on one kept-alive connection; percentiles in microseconds."""
    sock = socket.create_connection((host, port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(len(PAYLOAD))
    samples: list[float] = []
    for i in range(warmup + count):
        t0 = time.perf_counter_ns()
        sock.sendall(PAYLOAD)
        recv_exactly(sock, len(PAYLOAD), buf)
        if i >= warmup:
            samples.append((time.perf_counter_ns() - t0) / 1000.0)
    sock.close()
    samples.sort()

    def pct(p: float) -> float:
        return samples[min(len(samples) - 1, round(p / 100 * (len(samples) - 1)))]

    return {"p50_us": pct(50), "p99_us": pct(99), "count": len(samples)}


async def connrate(host: str, port: int, duration: float, parallel: int) -> dict[str, float]:
    """Connect, send 1 KiB, receive 1 KiB, close — ``parallel`` clients for ``duration`` seconds."""
    done = 0
    errors = 0
    deadline = time.monotonic() + duration

    async def client() -> None:
        nonlocal done, errors
        while time.monotonic() < deadline:
            try:
                reader, writer = await asyncio.open_connection(host, port)
                writer.write(PAYLOAD)
                await reader.readexactly(len(PAYLOAD))
                writer.close()
                await writer.wait_closed()
                done += 1
            except (OSError, asyncio.IncompleteReadError):
                errors += 1
                await asyncio.sleep(0.01)

    start = time.monotonic()
    await asyncio.gather(*(client() for _ in range(parallel)))
    elapsed = time.monotonic() - start
    return {"conn_per_s": done / elapsed, "connections": done, "errors": errors}


async def hold(host: str, port: int, count: int, ready_file: str) -> dict[str, float]:
    """Open ``count`` connections, prove each reaches the backend (1 byte echoed), keep them open."""
    sem = asyncio.Semaphore(50)
    conns: list[asyncio.StreamWriter] = []
    errors = 0

    async def one() -> None:
        nonlocal errors
        async with sem:
            try:
                reader, writer = await asyncio.open_connection(host, port)
                writer.write(b"!")
                await asyncio.wait_for(reader.readexactly(1), 30)
                conns.append(writer)
            except (OSError, asyncio.IncompleteReadError, TimeoutError):
                errors += 1

    await asyncio.gather(*(one() for _ in range(count)))
    result = {"open": len(conns), "errors": errors}
    write_atomic(ready_file, json.dumps(result))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    for w in conns:
        w.close()
    return result


async def rounds(host: str, port: int, count: int, duration: float, ready_file: str) -> dict[str, float]:
    """``count`` kept-alive connections, each doing 1 KiB round trips one after another for
    ``duration`` seconds. Opens them all first (each proven by a 1-byte echo), writes
    ``ready_file`` and waits for SIGUSR1, so that the caller can read the CPU counters of what it
    measures between the opening and the round trips. Latencies in microseconds."""
    sem = asyncio.Semaphore(50)
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    open_errors = 0

    async def open_one() -> None:
        nonlocal open_errors
        async with sem:
            try:
                reader, writer = await asyncio.open_connection(host, port)
                sock = writer.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                writer.write(b"!")
                await asyncio.wait_for(reader.readexactly(1), 30)
                conns.append((reader, writer))
            except (OSError, asyncio.IncompleteReadError, TimeoutError):
                open_errors += 1

    await asyncio.gather(*(open_one() for _ in range(count)))
    loop = asyncio.get_running_loop()
    go = asyncio.Event()
    loop.add_signal_handler(signal.SIGUSR1, go.set)
    write_atomic(ready_file, json.dumps({"open": len(conns), "errors": open_errors}))
    await go.wait()
    samples: list[float] = []
    errors = 0
    deadline = time.monotonic() + duration

    async def run_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal errors
        try:
            while time.monotonic() < deadline:
                t0 = time.perf_counter_ns()
                writer.write(PAYLOAD)
                await reader.readexactly(len(PAYLOAD))
                samples.append((time.perf_counter_ns() - t0) / 1000.0)
        except (OSError, asyncio.IncompleteReadError):
            errors += 1

    start = time.monotonic()
    await asyncio.gather(*(run_one(r, w) for r, w in conns))
    elapsed = time.monotonic() - start
    for _, w in conns:
        w.close()
    samples.sort()

    def pct(p: float) -> float:
        return samples[min(len(samples) - 1, round(p / 100 * (len(samples) - 1)))] if samples else 0.0

    return {
        "open": len(conns),
        "open_errors": open_errors,
        "errors": errors,
        "round_trips": len(samples),
        "rt_per_s": len(samples) / elapsed,
        "p50_us": pct(50),
        "p99_us": pct(99),
    }


def main(argv: list[str]) -> int:
    raise_nofile()
    p = argparse.ArgumentParser(prog="workload")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("echo")
    e.add_argument("--port-file", required=True)
    e.add_argument("--host", default="127.0.0.1", help="address to listen on")
    e.add_argument("--port", type=int, default=0, help="port to listen on (default: any free one)")
    la = sub.add_parser("latency")
    la.add_argument("--port", type=int, required=True)
    la.add_argument("--count", type=int, default=5000)
    la.add_argument("--warmup", type=int, default=200)
    cr = sub.add_parser("connrate")
    cr.add_argument("--port", type=int, required=True)
    cr.add_argument("--duration", type=float, default=5.0)
    cr.add_argument("--parallel", type=int, default=4)
    ho = sub.add_parser("hold")
    ho.add_argument("--port", type=int, required=True)
    ho.add_argument("--count", type=int, default=1000)
    ho.add_argument("--ready-file", required=True)
    ro = sub.add_parser("rounds")
    ro.add_argument("--port", type=int, required=True)
    ro.add_argument("--count", type=int, default=1000)
    ro.add_argument("--duration", type=float, default=5.0)
    ro.add_argument("--ready-file", required=True)
    for client in (la, cr, ho, ro):
        client.add_argument("--host", default="127.0.0.1", help="address to connect to")
    args = p.parse_args(argv)
    host = args.host
    result: dict[str, float]
    if args.cmd == "echo":
        run(echo_server(args.port_file, args.host, args.port))
        return 0
    if args.cmd == "latency":
        result = latency(host, args.port, args.count, args.warmup)
    elif args.cmd == "connrate":
        result = run(connrate(host, args.port, args.duration, args.parallel))
    elif args.cmd == "rounds":
        result = run(rounds(host, args.port, args.count, args.duration, args.ready_file))
    else:
        result = run(hold(host, args.port, args.count, args.ready_file))
    print(json.dumps(result))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main(sys.argv[1:]))
