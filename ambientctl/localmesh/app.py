"""The demo's pod apps: ``python -m ambientctl.localmesh.app serve|get``, run inside a pod netns.

``serve`` is a tiny HTTP server answering ``hello from <ns>/<pod>, you are <client ip>``;
``get`` makes one request carrying a marker header and prints a JSON line with the outcome.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


def serve(name: str, port: int, ready_file: str | None) -> int:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = f"hello from {name}, you are {self.client_address[0]}\n".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

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


def get(url: str, marker: str, timeout: float) -> int:
    u = urlsplit(url)
    out: dict[str, object] = {"url": url}
    conn = http.client.HTTPConnection(u.hostname or "", u.port or 80, timeout=timeout)
    try:
        conn.connect()
        assert conn.sock is not None
        host, port = conn.sock.getsockname()[:2]
        out["local"] = f"{host}:{port}"
        conn.request("GET", u.path or "/", headers={"X-Order": marker})
        r = conn.getresponse()
        body = r.read()
        out.update(status=r.status, body=body.decode(errors="replace").strip(), bytes=len(body))
    except (OSError, http.client.HTTPException) as e:
        out.update(status=0, error=f"{type(e).__name__}: {e}")
    finally:
        conn.close()
    print(json.dumps(out), flush=True)
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
    a = p.parse_args(argv)
    if a.cmd == "serve":
        return serve(a.name, a.port, a.ready_file)
    return get(a.url, a.marker, a.timeout)


if __name__ == "__main__":
    sys.exit(main())
