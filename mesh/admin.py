"""Admin (15000, localhost), metrics (15020) and readiness (15021) of ztunnel and the waypoint:

Enough HTTP for curl, Prometheus, kubelet and ``ambientctl``: GET and POST (a request body is
read and ignored; the query carries the arguments), one request per connection.

Each server holds at most ``MAX_CONNECTIONS`` connections (stats and readiness listen on every
address). At the cap, a new connection evicts the oldest one that has not sent its request yet
(reset), so a flood of idle connections cannot keep kubelet's probe or Prometheus out: a real
client sends its request at once and is answered before the flood catches up with it. If every
held connection is being answered, the new one is reset.
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from mesh import log as meshlog
from mesh.hbone.relay import rst_on_close

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"


Route = Callable[[dict[str, str]], Awaitable[Response] | Response]

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}


def json_response(data: object, status: int = 200) -> Response:
    return Response(status, json.dumps(data, indent=2, default=str).encode() + b"\n", "application/json")


MAX_BODY = 64 * 1024
MAX_CONNECTIONS = 64  # per server
HEAD_TIMEOUT = 10.0  # to send the request head
DEFAULT_LEVEL = "info"


def current_level() -> str:
    """The process-wide log level now (one of ``mesh.log.LEVELS``)."""
    return logging.getLevelName(meshlog._threshold).lower()


def logging_route(query: dict[str, str]) -> Response:
    """``/logging``: the current level; ``?level=L`` sets it, ``?reset`` puts back the default.

    As Istio's ztunnel (``POST /logging?level=``), the answer names the level in force after
    the request: ``current log level is debug``.
    """
    level = query.get("level")
    if "reset" in query:
        if level is not None:
            return Response(400, b"level and reset cannot be combined\n")
        level = DEFAULT_LEVEL
    if level is not None:
        try:
            meshlog.set_level(level)
        except ValueError as e:
            return Response(400, f"{e}\n".encode())
        log.info("log level changed", level=level)
    return Response(200, f"current log level is {current_level()}\n".encode())


async def _drain_body(reader: asyncio.StreamReader, head: bytes) -> None:
    """Read a request body (POST) so that closing the connection does not reset it unread."""
    for raw in head.split(b"\r\n")[1:]:
        name, _, value = raw.partition(b":")
        if name.strip().lower() == b"content-length":
            try:
                length = int(value.strip())
            except ValueError:
                return
            if 0 < length <= MAX_BODY:
                async with asyncio.timeout(HEAD_TIMEOUT):
                    await reader.readexactly(length)
            return


class HttpServer:
    def __init__(self, routes: dict[str, Route], name: str, *, max_connections: int = MAX_CONNECTIONS) -> None:
        self.routes = routes
        self.name = name
        self.server: asyncio.Server | None = None
        self.max_connections = max_connections
        self._waiting: dict[asyncio.StreamWriter, None] = {}  # no request yet, oldest first
        self._answering = 0
        self.evicted = 0  # lifetime count of connections reset at the cap

    def _admit(self, writer: asyncio.StreamWriter) -> bool:
        """Make room for ``writer`` (evicting the oldest idle connection at the cap)."""
        if len(self._waiting) + self._answering >= self.max_connections:
            if not self._waiting:
                _reset(writer)
                self.evicted += 1
                return False
            oldest = next(iter(self._waiting))
            del self._waiting[oldest]
            _reset(oldest)
            self.evicted += 1
        self._waiting[writer] = None
        return True

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self.server = await asyncio.start_server(self._serve, host, port)
        addr = self.server.sockets[0].getsockname()
        return addr[0], addr[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._admit(writer):
            return
        answering = False
        try:
            async with asyncio.timeout(HEAD_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            await _drain_body(reader, head)
            if writer not in self._waiting:
                return  # evicted while its request was arriving
            # The whole request is in: answered now, and no longer evictable.
            del self._waiting[writer]
            answering = True
            self._answering += 1
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = line.split(" ")
            if len(parts) != 3:
                resp = Response(400, b"bad request line\n")
            elif parts[0] not in ("GET", "POST"):
                resp = Response(405, b"GET or POST only\n")
            else:
                url = urllib.parse.urlsplit(parts[1])
                query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
                route = self.routes.get(url.path)
                if route is None:
                    resp = Response(404, f"no such page; try {', '.join(sorted(self.routes))}\n".encode())
                else:
                    r = route(query)
                    resp = await r if not isinstance(r, Response) else r
            writer.write(
                f"HTTP/1.1 {resp.status} {_REASONS.get(resp.status, 'Status')}\r\n"
                f"Content-Type: {resp.content_type}\r\nContent-Length: {len(resp.body)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + resp.body
            )
            await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._waiting.pop(writer, None)
            if answering:
                self._answering -= 1
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def _reset(writer: asyncio.StreamWriter) -> None:
    rst_on_close(writer.get_extra_info("socket"))
    writer.transport.abort()


async def start_proxy_servers(
    *,
    addresses: Mapping[str, tuple[str, int]],
    config_dump: Callable[[], Any],
    registry: Any,
    ready: Callable[[], bool],
    stop: asyncio.Event,
) -> dict[str, tuple[HttpServer, tuple[str, int]]]:
    """The three servers every proxy runs, as Istio's do: ``admin`` (``/config_dump``,
    ``/logging``, ``/quitquitquit``, which sets ``stop``), ``stats`` (Prometheus ``/metrics``) and
    ``readiness`` (``/healthz/ready``). ``addresses`` maps each name to where it listens; returns
    name -> (server, bound address)."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    def metrics_route(_: dict[str, str]) -> Response:
        return Response(200, generate_latest(registry), CONTENT_TYPE_LATEST)

    def ready_route(_: dict[str, str]) -> Response:
        return Response(200, b"ready\n") if ready() else Response(503, b"not ready\n")

    def quit_route(_: dict[str, str]) -> Response:
        stop.set()
        return Response(200, b"shutting down\n")

    servers = {
        "admin": HttpServer(
            {
                "/config_dump": lambda _: json_response(config_dump()),
                "/logging": logging_route,
                "/quitquitquit": quit_route,
            },
            "admin",
        ),
        "stats": HttpServer({"/metrics": metrics_route, "/stats/prometheus": metrics_route}, "stats"),
        "readiness": HttpServer({"/healthz/ready": ready_route}, "readiness"),
    }
    started: dict[str, tuple[HttpServer, tuple[str, int]]] = {}
    try:
        for name, srv in servers.items():
            host, port = addresses[name]
            started[name] = (srv, await srv.start(host, port))
    except BaseException:
        for srv, _ in started.values():
            await srv.close()
        raise
    return started
