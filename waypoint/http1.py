"""The waypoint's HTTP/1.1 engine: one downstream connection's requests, forwarded one at a time.

``serve_http1`` parses requests with ``h11`` (sans-IO; this module only moves bytes), asks the
app's ``on_request`` for a verdict, and either answers locally or forwards the request over an
upstream HTTP/1.1 connection the app opens, streaming both bodies.

Behaviour chosen on purpose:

* **Streaming and flow control** — bodies move one h11 ``Data`` event (at most one read of
  64 KiB) at a time, and the next downstream read happens only after the upstream ``drain()``
  returned (and vice versa for the response): a slow upstream slows the client, nothing
  buffers a whole body.
* **Keep-alive and pipelining** — requests on a connection are served sequentially; pipelined
  requests wait in h11's buffer until the previous response is complete.
* **Upstream reuse** — after a clean exchange (both sides keep-alive) the upstream connection is
  parked with the verdict's ``Forward.upstream_key``; the next request whose verdict carries an
  equal key reuses it, any other key closes it and dials anew. While parked it is watched:
  if the upstream closes it (or sends anything), it is discarded, never reused. ``None`` keys
  are never reused. Reuse is per downstream connection (HTTP/1.1 has no multiplexing to share).
* **Errors** — upstream connect failure (``open_upstream`` raised): local 503. Upstream closed or
  reset before the response head: local 503. After the head: the downstream is aborted (reset),
  so the client sees a truncated response as an error. Malformed request: 400 (431 for an
  oversized head) and close. A request without ``Host``: 400.
* **Local responses** (``Respond``) carry a correct ``Content-Length`` and keep the connection
  alive; an unread request body is read and discarded first (up to ``discard_limit`` bytes,
  beyond that the connection is closed after the response).
* **Expect: 100-continue** — not forwarded: the waypoint itself sends ``100 Continue`` once the
  request is authorized and the upstream connected, just before it reads the body; a request
  answered locally gets its final response without a 100 and the connection is then closed
  (the client may or may not send the body). Upstream ``100`` responses are dropped; other
  1xx (102, 103) are passed on.
* **HEAD**, 204 and 304 carry no body (h11 knows); the upstream's headers pass unchanged.
* **Connection: close** from the client closes after the response; from the upstream only the
  upstream connection is closed (``Connection`` and other hop-by-hop headers are not forwarded).
* **Upgrade** (WebSocket, h2c) is not supported: ``Upgrade`` is hop-by-hop, so it is removed and
  the request forwarded as plain HTTP (the server answers it as such, RFC 9110 §7.8); an
  upstream ``101`` is a protocol error (502-equivalent: 503 locally). ``CONNECT`` is answered
  405 without asking the app.
* Requests h11 could not parse are not reported to ``on_done`` (there is no head); they are
  logged.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import h11
import structlog

from waypoint.bytestream import READ_SIZE, ByteStream
from waypoint.request import (
    PAYLOAD_TOO_LARGE,
    Forward,
    OnDone,
    OnRequest,
    OpenUpstream,
    ReadBody,
    RequestHead,
    Respond,
    Tally,
    resolve,
)

log = structlog.get_logger(__name__)

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "expect",
        "proxy-authenticate",
    }
)
MAX_HEAD = 64 * 1024
DISCARD_LIMIT = 1024 * 1024
UPSTREAM_HEAD_FAILURE = b"upstream connect error or disconnect/reset before headers"


def _hop_by_hop(headers: Sequence[tuple[bytes, bytes]]) -> set[str]:
    names = set(HOP_BY_HOP)
    for k, v in headers:
        if k == b"connection":
            names.update(t.strip().lower() for t in v.decode("latin-1").split(",") if t.strip())
    return names


def _filtered(headers: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    drop = _hop_by_hop(headers)
    return [(k, v) for k, v in headers if k.decode("latin-1") not in drop]


@dataclass
class _Upstream:
    key: Hashable | None
    stream: ByteStream
    conn: h11.Connection = field(
        default_factory=lambda: h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
    )
    watch: asyncio.Task[None] | None = None

    async def usable(self) -> bool:
        """Stop watching the parked connection; False if the upstream closed or spoke meanwhile."""
        w, self.watch = self.watch, None
        if w is None:
            return True
        if w.done():
            return False
        w.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await w
        return True

    def park(self) -> None:
        self.watch = asyncio.get_running_loop().create_task(self._watch(), name="h1-upstream-idle")

    async def _watch(self) -> None:
        # Any byte or EOF while no request is outstanding makes the connection unusable.
        with contextlib.suppress(ConnectionError, OSError):
            await self.stream.read(1)

    def close(self) -> None:
        if self.watch is not None:
            self.watch.cancel()
        self.stream.close()


class _DownstreamGone(Exception):
    """The client reset or vanished: nothing more can be sent to it."""


async def _next_event(conn: h11.Connection, stream: ByteStream) -> h11.Event | type[h11.PAUSED]:
    """The next h11 event, reading from ``stream`` as needed (EOF is passed to h11 as b"")."""
    while True:
        ev = conn.next_event()
        if ev is not h11.NEED_DATA:
            return ev  # type: ignore[return-value]
        conn.receive_data(await stream.read(READ_SIZE))


async def serve_http1(
    down: ByteStream,
    *,
    on_request: OnRequest,
    open_upstream: OpenUpstream,
    on_done: OnDone,
    scheme: str = "http",
    idle_timeout: float | None = None,
    max_head: int = MAX_HEAD,
    discard_limit: int = DISCARD_LIMIT,
) -> None:
    """Serve HTTP/1.x requests arriving on ``down`` until either side closes.

    ``on_request(head) -> Verdict`` (sync or async) decides each request; for a ``Forward``,
    ``open_upstream(head, forward) -> ByteStream`` dials when no parked upstream connection
    has the verdict's ``upstream_key``; ``on_done(record)`` is called once per parsed request.
    ``idle_timeout`` closes a keep-alive connection that sends no next request in time.
    Returns when the connection is finished; ``down`` is closed (or aborted) by then.
    """
    session = _Session(down, on_request, open_upstream, on_done, scheme, max_head, discard_limit)
    try:
        await session.run(idle_timeout)
    finally:
        await session.finish()


class _Session:
    def __init__(
        self,
        down: ByteStream,
        on_request: OnRequest,
        open_upstream: OpenUpstream,
        on_done: OnDone,
        scheme: str,
        max_head: int,
        discard_limit: int,
    ) -> None:
        self.down = down
        self.on_request = on_request
        self.open_upstream = open_upstream
        self.on_done = on_done
        self.scheme = scheme
        self.discard_limit = discard_limit
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_head)
        self.idle: _Upstream | None = None
        self.aborted = False
        self.loop = asyncio.get_running_loop()

    async def finish(self) -> None:
        idle, self.idle = self.idle, None
        if idle is not None:
            await idle.usable()  # stops (and awaits) the idle watcher
            idle.close()
        if not self.aborted:
            self.down.close()

    def abort_down(self) -> None:
        self.aborted = True
        self.down.abort()

    async def run(self, idle_timeout: float | None) -> None:
        while True:
            try:
                async with asyncio.timeout(idle_timeout):
                    ev = await _next_event(self.conn, self.down)
            except h11.RemoteProtocolError as e:
                await self._bad_request(e)
                return
            except TimeoutError:
                return
            except ConnectionError:
                self.abort_down()
                return
            if not isinstance(ev, h11.Request):
                return  # ConnectionClosed (or nothing more we can serve)
            if not await self._exchange(ev):
                return
            self.conn.start_next_cycle()

    async def _bad_request(self, e: h11.RemoteProtocolError) -> None:
        log.info("http1 malformed request", error=str(e), status=e.error_status_hint)
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = b"bad request\n" if e.error_status_hint == 400 else b"request header too large\n"
        headers = [
            (b"content-type", b"text/plain"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        with contextlib.suppress(ConnectionError, h11.LocalProtocolError):
            self.down.write(self.conn.send(h11.Response(status_code=e.error_status_hint, headers=headers)))
            self.down.write(self.conn.send(h11.Data(data=body)))
            self.down.write(self.conn.send(h11.EndOfMessage()))
            await self.down.drain()

    # -- one request/response exchange -----------------------------------------------------------

    async def _exchange(self, req: h11.Request) -> bool:
        """Serve one request; True if the downstream connection can take the next one."""
        head = _head(req, self.scheme)
        tally = Tally(head, self.loop.time())
        keep = False
        try:
            if req.method == b"CONNECT":
                keep = await self._respond(tally, Respond(405, b"CONNECT is not supported\n"), close=True)
            elif not head.authority:
                keep = await self._respond(tally, Respond(400, b"missing Host header\n"), close=True)
            else:
                verdict: Forward | Respond | ReadBody
                try:
                    verdict = await resolve(self.on_request(head))
                except Exception:
                    log.exception("http1 on_request failed", path=head.path)
                    verdict = Respond(500, b"internal error\n")
                pending: list[h11.Event] = []
                if isinstance(verdict, ReadBody):
                    verdict, pending = await self._read_body(verdict, tally)
                if isinstance(verdict, Respond):
                    keep = await self._respond(tally, verdict)
                else:
                    keep = await self._forward(req, tally, verdict, pending)
        except _DownstreamGone:
            tally.downstream_failure = tally.downstream_failure or "reset"
            self.abort_down()
            keep = False
        finally:
            self.on_done(tally.record(self.loop.time()))
        return keep

    async def _read_body(self, rb: ReadBody, tally: Tally) -> tuple[Forward | Respond, list[h11.Event]]:
        """Read the body (up to ``rb.limit`` and a bit), then ask ``rb.then``; the events read are
        returned to be forwarded first."""
        pending: list[h11.Event] = []
        body = bytearray()
        complete = False
        try:
            if self.conn.they_are_waiting_for_100_continue:
                self.down.write(self.conn.send(h11.InformationalResponse(status_code=100, headers=[])))
            while len(body) <= rb.limit:
                ev = await _next_event(self.conn, self.down)
                if isinstance(ev, h11.Data):
                    body += ev.data
                elif isinstance(ev, h11.EndOfMessage):
                    complete = True
                else:
                    raise ConnectionError("the client went away in the middle of its body")
                pending.append(ev)
                if complete:
                    break
        except (h11.RemoteProtocolError, ConnectionError) as e:
            tally.downstream_failure = f"request body: {e}"
            raise _DownstreamGone from e
        if not complete and not rb.partial:
            return PAYLOAD_TOO_LARGE, pending
        verdict: Forward | Respond
        try:
            verdict = await resolve(rb.then(bytes(body) if complete else bytes(body[: rb.limit]), complete))
        except Exception:
            log.exception("http1 on_request failed (after the body)", path=tally.head.path)
            verdict = Respond(500, b"internal error\n")
        return verdict, pending

    async def _respond(self, tally: Tally, r: Respond, *, close: bool = False) -> bool:
        """Answer locally; True if the connection stays usable."""
        tally.local = True
        tally.status = r.status
        # A client waiting for 100-continue was never asked for its body: it may send it or not,
        # so the connection cannot be kept.
        close = close or self.conn.they_are_waiting_for_100_continue
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in r.headers]
        if not any(k == b"content-type" for k, _ in headers) and r.body:
            headers.append((b"content-type", b"text/plain"))
        headers.append((b"content-length", str(len(r.body)).encode()))
        if close:
            headers.append((b"connection", b"close"))
        try:
            self.down.write(self.conn.send(h11.Response(status_code=r.status, headers=headers)))
            if r.body and tally.head.method != "HEAD":
                self.down.write(self.conn.send(h11.Data(data=r.body)))
                tally.response_bytes += len(r.body)
            self.down.write(self.conn.send(h11.EndOfMessage()))
            await self.down.drain()
        except ConnectionError as e:
            raise _DownstreamGone from e
        if close:
            return False
        if self.conn.their_state is h11.SEND_BODY:
            return await self._discard_body(tally)
        return self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE

    async def _discard_body(self, tally: Tally) -> bool:
        """Read and drop the rest of a request body we answered without; False if it was too much."""
        seen = 0
        try:
            while True:
                ev = await _next_event(self.conn, self.down)
                if isinstance(ev, h11.Data):
                    seen += len(ev.data)
                    tally.request_bytes += len(ev.data)
                    if seen > self.discard_limit:
                        return False
                else:
                    return isinstance(ev, h11.EndOfMessage)
        except (h11.RemoteProtocolError, ConnectionError):
            return False

    async def _take_upstream(self, head: RequestHead, fwd: Forward) -> _Upstream:
        idle, self.idle = self.idle, None
        if idle is not None:
            if fwd.upstream_key is not None and idle.key == fwd.upstream_key and await idle.usable():
                return idle
            idle.close()
        stream = await self.open_upstream(head, fwd)
        return _Upstream(fwd.upstream_key, stream)

    async def _forward(self, req: h11.Request, tally: Tally, fwd: Forward, pending: list[h11.Event]) -> bool:
        head = tally.head
        tally.upstream_key = fwd.upstream_key
        try:
            up = await self._take_upstream(head, fwd)
        except Exception as e:  # whatever the app's dialer raises: OSError, TLS, HBONE refusal...
            tally.upstream_failure = f"connect: {e or type(e).__name__}"
            log.info("http1 upstream connect failed", authority=head.authority, error=str(e))
            return await self._respond(tally, Respond(503, UPSTREAM_HEAD_FAILURE))

        headers = _filtered(req.headers)
        if fwd.remove_headers:
            headers = [(k, v) for k, v in headers if k.decode("latin-1") not in fwd.remove_headers]
        headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in fwd.add_headers]
        target = (fwd.path or head.path).encode("latin-1")
        try:
            up.stream.write(up.conn.send(h11.Request(method=req.method, target=target, headers=headers)))
        except ConnectionError as e:
            up.close()
            tally.upstream_failure = f"connect: {e}"
            return await self._respond(tally, Respond(503, UPSTREAM_HEAD_FAILURE))

        if self.conn.they_are_waiting_for_100_continue:
            try:
                self.down.write(self.conn.send(h11.InformationalResponse(status_code=100, headers=[])))
            except ConnectionError as e:
                up.stream.abort()
                raise _DownstreamGone from e

        chunked = any(k == b"transfer-encoding" for k, _ in headers)
        pump = self.loop.create_task(self._pump_request(up, tally, chunked, pending), name="h1-request-body")
        reusable = False
        try:
            keep, reusable = await self._relay_response(up, tally, pump, fwd)
        finally:
            if not pump.done():
                pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
            if reusable and fwd.upstream_key is not None and not self.aborted:
                up.conn.start_next_cycle()
                up.park()
                self.idle = up
            else:
                up.close()
        return keep

    async def _pump_request(
        self, up: _Upstream, tally: Tally, chunked: bool, pending: list[h11.Event]
    ) -> None:
        """Copy the request body downstream → upstream, one event at a time (``pending``: the
        events already read, first).

        A downstream failure aborts both sides (the relay notices through the upstream); an
        upstream write failure just stops here: the relay still reads whatever it answered.
        """
        while True:
            try:
                ev = pending.pop(0) if pending else await _next_event(self.conn, self.down)
            except (h11.RemoteProtocolError, ConnectionError) as e:
                tally.downstream_failure = f"request body: {e}"
                self.abort_down()
                up.stream.abort()
                return
            try:
                if isinstance(ev, h11.Data):
                    tally.request_bytes += len(ev.data)
                    up.stream.write(up.conn.send(h11.Data(data=ev.data)))
                    await up.stream.drain()
                elif isinstance(ev, h11.EndOfMessage):
                    trailers = list(ev.headers) if chunked else []
                    up.stream.write(up.conn.send(h11.EndOfMessage(headers=trailers)))
                    await up.stream.drain()
                    return
                else:
                    return
            except ConnectionError:
                return

    async def _relay_response(
        self, up: _Upstream, tally: Tally, pump: asyncio.Task[None], fwd: Forward
    ) -> tuple[bool, bool]:
        """Copy the response upstream → downstream. Returns (downstream keep-alive, upstream reusable)."""
        sent_head = False
        chunked = False
        while True:
            try:
                ev = await _next_event(up.conn, up.stream)
                if isinstance(ev, h11.InformationalResponse) and ev.status_code == 101:
                    raise h11.RemoteProtocolError("upstream switched protocols (Upgrade is not supported)")
            except (h11.RemoteProtocolError, ConnectionError) as e:
                return await self._upstream_failed(tally, sent_head, pump, str(e) or "reset")
            if isinstance(ev, h11.ConnectionClosed):
                return await self._upstream_failed(tally, sent_head, pump, "closed before response")
            try:
                if isinstance(ev, h11.InformationalResponse):
                    if ev.status_code != 100:
                        self.down.write(
                            self.conn.send(
                                h11.InformationalResponse(
                                    status_code=ev.status_code, headers=_filtered(ev.headers)
                                )
                            )
                        )
                elif isinstance(ev, h11.Response):
                    headers = fwd.response_headers(_filtered(ev.headers))
                    chunked = not any(k == b"content-length" for k, _ in headers)
                    self.down.write(
                        self.conn.send(
                            h11.Response(status_code=ev.status_code, headers=headers, reason=ev.reason)
                        )
                    )
                    sent_head = True
                    tally.status = ev.status_code
                elif isinstance(ev, h11.Data):
                    self.down.write(self.conn.send(h11.Data(data=ev.data)))
                    tally.response_bytes += len(ev.data)
                    await self.down.drain()
                elif isinstance(ev, h11.EndOfMessage):
                    can_trail = chunked and head_allows_trailers(tally.head)
                    self.down.write(
                        self.conn.send(h11.EndOfMessage(headers=list(ev.headers) if can_trail else []))
                    )
                    await self.down.drain()
                    break
            except ConnectionError as e:
                tally.downstream_failure = f"response: {e}"
                up.stream.abort()
                raise _DownstreamGone from e
        if not pump.done():
            # The upstream answered before the request body was complete: stop sending it; the
            # client's connection cannot be kept (the rest of its body is still on the way).
            return False, False
        await pump
        if self.aborted:
            return False, False
        keep = self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE
        reusable = up.conn.our_state is h11.DONE and up.conn.their_state is h11.DONE
        return keep, reusable

    async def _upstream_failed(
        self, tally: Tally, sent_head: bool, pump: asyncio.Task[None], reason: str
    ) -> tuple[bool, bool]:
        if self.aborted:  # the downstream died first and took the upstream with it
            return False, False
        tally.upstream_failure = reason
        log.info("http1 upstream failed", authority=tally.head.authority, reason=reason, after_head=sent_head)
        if sent_head:
            self.abort_down()
            return False, False
        pump.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pump
        keep = await self._respond(tally, Respond(503, UPSTREAM_HEAD_FAILURE))
        return keep, False


def head_allows_trailers(head: RequestHead) -> bool:
    return head.http_version == "1.1" and head.method != "HEAD"


def _head(req: h11.Request, scheme: str) -> RequestHead:
    headers = tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in req.headers)
    host = next((v for k, v in headers if k == "host"), "")
    return RequestHead(
        method=req.method.decode("latin-1"),
        path=req.target.decode("latin-1"),
        authority=host,
        scheme=scheme,
        headers=headers,
        protocol="http/1.1",
        http_version=req.http_version.decode("latin-1"),
    )
