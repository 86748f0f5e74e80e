"""The demo's pod apps: ``python -m ambientctl.localmesh.app serve|get``, run inside a pod netns.

``serve`` is a tiny HTTP server answering ``hello from <ns>/<pod>, you are <client ip>``, and on
``/stream`` a line every 0.2 s for as long as the client stays (a long-lived connection);
``get`` makes one request (``--method``, GET by default; POST sends a small body) carrying a
marker header and prints a JSON line with the outcome; the server answers POST as it answers GET;
``hold`` opens ``/stream`` and prints JSON lines: once data flows (``open``), every 5 lines
(``receiving``), and when the connection ends (``closed``: after how long, why) — what the demo watches a policy close.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

STREAM_INTERVAL = 0.2
STREAM_SECONDS = 600.0


def serve(name: str, port: int, ready_file: str | None) -> int:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.startswith("/stream"):
                self._stream()
                return
            self._hello()

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            self._hello()

        def _hello(self) -> None:
            body = f"hello from {name}, you are {self.client_address[0]}\n".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

        def _stream(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Connection", "close")
            self.end_headers()
            deadline = time.monotonic() + STREAM_SECONDS
            tick = 0
            try:
                while time.monotonic() < deadline:
                    self.wfile.write(f"{name} tick {tick}\n".encode())
                    self.wfile.flush()
                    tick += 1
                    time.sleep(STREAM_INTERVAL)  # pacing the stream, not waiting for a condition
            except OSError:
                pass  # the client (or ztunnel, on its behalf) went away

        def log_message(self, format: str, *args: object) -> None:
            sys.stderr.write(f"{name}: {self.client_address[0]} {format % args}\n")

    srv = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    if ready_file:
        tmp = ready_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{port}\n")
        os.replace(tmp, ready_file)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


def get(url: str, marker: str, timeout: float, method: str = "GET") -> int:
    u = urlsplit(url)
    out: dict[str, object] = {"url": url}
    conn = http.client.HTTPConnection(u.hostname or "", u.port or 80, timeout=timeout)
    try:
        conn.connect()
        assert conn.sock is not None
        host, port = conn.sock.getsockname()[:2]
        out["local"] = f"{host}:{port}"
        payload = b'{"order": 42}' if method in ("POST", "PUT", "PATCH") else None
        conn.request(method, u.path or "/", body=payload, headers={"X-Order": marker})
        r = conn.getresponse()
        body = r.read()
        out.update(status=r.status, body=body.decode(errors="replace").strip(), bytes=len(body))
    except (OSError, http.client.HTTPException) as e:
        out.update(status=0, error=f"{type(e).__name__}: {e}")
    finally:
        conn.close()
    print(json.dumps(out), flush=True)
    return 0


def hold(url: str, timeout: float) -> int:
    """Open ``url`` (a ``/stream``) and read until the connection ends; JSON lines on stdout."""
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname or "", u.port or 80, timeout=timeout)
    lines = 0
    error = None
    opened = 0.0
    try:
        conn.connect()
        assert conn.sock is not None
        host, port = conn.sock.getsockname()[:2]
        conn.request("GET", u.path or "/stream")
        r = conn.getresponse()
        first = r.readline()
        if r.status != 200 or not first:
            print(json.dumps({"event": "failed", "status": r.status}), flush=True)
            return 1
        opened = time.monotonic()
        lines = 1
        print(json.dumps({"event": "open", "local": f"{host}:{port}", "status": r.status,
                          "first": first.decode(errors="replace").strip()}), flush=True)  # fmt: skip
        while r.readline():
            lines += 1
            if lines % 5 == 0:
                print(json.dumps({"event": "receiving", "lines": lines}), flush=True)
    except (OSError, http.client.HTTPException) as e:
        error = f"{type(e).__name__}: {e}"
        if not opened:
            print(json.dumps({"event": "failed", "error": error}), flush=True)
            return 1
    finally:
        conn.close()
    after = round(time.monotonic() - opened, 2)
    print(json.dumps({"event": "closed", "after_s": after, "lines": lines, "error": error}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ambientctl.localmesh.app")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--name", required=True)
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--ready-file")
    g = sub.add_parser("get")
    g.add_argument("url")
    g.add_argument("--marker", default="")
    g.add_argument("--timeout", type=float, default=10.0)
    g.add_argument("--method", default="GET")
    h = sub.add_parser("hold")
    h.add_argument("url")
    h.add_argument("--timeout", type=float, default=30.0)
    a = p.parse_args(argv)
    if a.cmd == "serve":
        return serve(a.name, a.port, a.ready_file)
    if a.cmd == "hold":
        return hold(a.url, a.timeout)
    return get(a.url, a.marker, a.timeout, a.method.upper())


if __name__ == "__main__":
    sys.exit(main())
