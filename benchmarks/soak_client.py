"""The soak benchmark's load generator, run in a client pod (stdlib only; JSON lines on stdout).

Against every ``--target NAME=ADDRESS`` (a Service's cluster IP) it keeps three kinds of
traffic going until SIGTERM:

* ``http``: short HTTP/1.1 GETs at a steady rate, each on a new connection;
* ``conn``: new TCP connections at a steady rate, each sending 64 bytes to the echo port and
  reading them back before closing;
* ``stream``: ``--streams`` long-lived connections to the echo port, each sending a numbered
  chunk and checking the echo, paced; one that fails is reopened half a second later.

Every failure is a line ``{"t", "flow", "traffic", "kind", "err"}`` where ``kind`` is one of
``connect_fail`` (the connection could not be opened), ``reset`` (an open connection was reset),
``eof`` (the peer ended the connection cleanly before the reply was complete: truncation),
``timeout`` (no reply within ``--timeout``), ``http_fail`` (a reply that is not a complete
200) or ``mismatch`` (echoed bytes differ). The first success of a (flow, traffic) after a
failure is a line ``{"event": "recovered", "since": <first failure>}``, and every second a
``tick`` line counts the successes, so the harness can tell when traffic came back.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from collections import defaultdict
from typing import Any

CONN_PAYLOAD = b"soak-conn-" + b"x" * 53 + b"\n"  # 64 bytes


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def classify(e: BaseException, connected: bool) -> str:
    if not connected:
        return "connect_fail"
    if isinstance(e, asyncio.IncompleteReadError):
        return "eof"
    if isinstance(e, TimeoutError):
        return "timeout"
    if isinstance(e, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
        return "reset"
    return "http_fail"


class Load:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.stop = asyncio.Event()
        self.ok: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.failing: dict[tuple[str, str], float] = {}  # (flow, traffic) -> first failure since last ok

    # -- outcomes ---------------------------------------------------------------------------------

    def fail(self, flow: str, traffic: str, kind: str, e: BaseException | str) -> None:
        now = time.time()
        self.failing.setdefault((flow, traffic), now)
        err = e if isinstance(e, str) else f"{type(e).__name__}: {e}"
        emit({"t": round(now, 3), "flow": flow, "traffic": traffic, "kind": kind, "err": err[:160]})

    def success(self, flow: str, traffic: str, count: str, n: int = 1) -> None:
        self.ok[flow][count] += n
        since = self.failing.pop((flow, traffic), None)
        if since is not None:
            emit({"t": round(time.time(), 3), "event": "recovered", "flow": flow, "traffic": traffic,
                  "since": round(since, 3)})  # fmt: skip

    # -- traffic ----------------------------------------------------------------------------------

    async def _open(self, host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        async with asyncio.timeout(self.args.timeout):
            return await asyncio.open_connection(host, port)

    async def http_once(self, flow: str, host: str) -> None:
        connected = False
        writer = None
        try:
            reader, writer = await self._open(host, self.args.http_port)
            connected = True
            async with asyncio.timeout(self.args.timeout):
                writer.write(f"GET /soak HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
                head = await reader.readuntil(b"\r\n\r\n")
                status = head.split(b"\r\n", 1)[0]
                length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), -1)  # fmt: skip
                if not status.startswith(b"HTTP/1.1 200") or length < 0:
                    self.fail(flow, "http", "http_fail", status.decode(errors="replace"))
                    return
                await reader.readexactly(length)
            self.success(flow, "http", "http_ok")
        except (
            OSError,
            TimeoutError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ValueError,
        ) as e:
            self.fail(flow, "http", classify(e, connected), e)
        finally:
            if writer is not None:
                writer.close()

    async def conn_once(self, flow: str, host: str) -> None:
        connected = False
        writer = None
        try:
            reader, writer = await self._open(host, self.args.echo_port)
            connected = True
            async with asyncio.timeout(self.args.timeout):
                writer.write(CONN_PAYLOAD)
                got = await reader.readexactly(len(CONN_PAYLOAD))
            if got != CONN_PAYLOAD:
                self.fail(flow, "conn", "mismatch", "echo differs")
                return
            self.success(flow, "conn", "conn_ok")
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as e:
            self.fail(flow, "conn", classify(e, connected), e)
        finally:
            if writer is not None:
                writer.close()

    async def paced(self, rate: float, once: Any, flow: str, host: str) -> None:
        """``once(flow, host)`` started ``rate`` times a second, whatever each takes."""
        if rate <= 0:
            return
        loop = asyncio.get_running_loop()
        step, nxt = 1.0 / rate, loop.time()
        async with asyncio.TaskGroup() as tg:
            while not self.stop.is_set():
                tg.create_task(once(flow, host))
                nxt += step
                delay = nxt - loop.time()
                if delay < -1.0:  # starved (a loaded machine): do not burst to catch up
                    nxt, delay = loop.time(), 0.0
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), max(0.0, delay))

    async def stream(self, flow: str, host: str, index: int) -> None:
        a = self.args
        loop = asyncio.get_running_loop()
        while not self.stop.is_set():
            connected, writer, opened, sent, end = False, None, time.time(), 0, "stop"
            try:
                reader, writer = await self._open(host, a.echo_port)
                connected = True
                seq, nxt = 0, loop.time()
                while not self.stop.is_set():
                    chunk = (b"%08d:%04d:" % (seq, index) * (a.chunk // 14 + 1))[: a.chunk]
                    async with asyncio.timeout(a.timeout):
                        writer.write(chunk)
                        await writer.drain()
                        got = await reader.readexactly(len(chunk))
                    if got != chunk:
                        self.fail(flow, "stream", "mismatch", f"chunk {seq} differs")
                        end = "mismatch"
                        break
                    seq += 1
                    sent += len(chunk)
                    self.success(flow, "stream", "stream_bytes", len(chunk))
                    nxt += 1.0 / a.stream_rate
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.stop.wait(), max(0.0, nxt - loop.time()))
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as e:
                end = classify(e, connected)
                self.fail(flow, "stream", end, e)
            finally:
                if writer is not None:
                    writer.close()
            if connected:
                emit({"t": round(time.time(), 3), "event": "stream_end", "flow": flow, "index": index,
                      "lived_s": round(time.time() - opened, 3), "bytes": sent, "end": end})  # fmt: skip
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), 0.5)

    async def ticks(self) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), 1.0)
            self.flush()

    def flush(self) -> None:
        if self.ok:
            emit({"t": round(time.time(), 3), "tick": {f: dict(c) for f, c in self.ok.items()}})
            self.ok.clear()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        targets = [t.split("=", 1) for t in self.args.target]
        emit({"t": round(time.time(), 3), "event": "started", "targets": dict(targets)})
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.ticks())
            for flow, host in targets:
                tg.create_task(self.paced(self.args.http_rate, self.http_once, flow, host))
                tg.create_task(self.paced(self.args.conn_rate, self.conn_once, flow, host))
                for i in range(self.args.streams):
                    tg.create_task(self.stream(flow, host, i))
        self.flush()
        emit({"t": round(time.time(), 3), "event": "stopped"})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", action="append", required=True, metavar="NAME=ADDRESS")
    p.add_argument("--http-port", type=int, default=80)
    p.add_argument("--echo-port", type=int, default=7007)
    p.add_argument("--http-rate", type=float, default=5.0, help="HTTP requests per second per target")
    p.add_argument("--conn-rate", type=float, default=5.0, help="new echo connections per second per target")
    p.add_argument("--streams", type=int, default=2, help="long-lived echo streams per target")
    p.add_argument("--stream-rate", type=float, default=8.0, help="chunks per second per stream")
    p.add_argument("--chunk", type=int, default=4096, help="bytes per stream chunk")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds for a connect or a reply")
    asyncio.run(Load(p.parse_args(argv)).run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
