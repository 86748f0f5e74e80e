"""What a long-lived HBONE connection keeps per stream once the stream is over: nothing but a
bounded record of the last resets (issue 24: ztunnel's RSS grew ≈ 115 bytes per stream and per
side on its pooled connections, the closed-stream records of h2).

Sans-IO: a client and a server connection back to back in memory, a stream per "proxied TCP
connection" as ztunnel does; ``tracemalloc`` measures what survives a batch after a warm-up.
"""

from __future__ import annotations

import gc
import tracemalloc

import h2.stream
import pytest

from mesh.hbone import ClientConnection, ConnectRequest, Event, Response, ServerConnection
from mesh.hbone.protocol import RESET_STREAMS_KEPT, _ResetStreams


@pytest.fixture(params=[True, False], ids=["fast-path", "h2-only"])
def fast(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


class Wire:
    """A client and a server connection wired back to back; unlike tests/hbone/test_protocol.py's
    ``Pair`` it keeps none of the bytes it moved (they would be the growth measured)."""

    def __init__(self, fast: bool) -> None:
        self.client = ClientConnection(fast=fast)
        self.server = ServerConnection(fast=fast)
        self.pump()

    def pump(self) -> tuple[list[Event], list[Event]]:
        at_client: list[Event] = []
        at_server: list[Event] = []
        while True:
            c2s = self.client.data_to_send()
            s2c = self.server.data_to_send()
            if not c2s and not s2c:
                return at_client, at_server
            if c2s:
                at_server += self.server.receive_data(c2s)
            if s2c:
                at_client += self.client.receive_data(s2c)

    def request(self, port: int) -> int:
        sid = self.client.connect(f"10.0.0.2:{port}", [("forwarded", f'for="10.0.0.1:{port}"')])
        _, evs = self.pump()
        assert any(isinstance(e, ConnectRequest) and e.stream_id == sid for e in evs)
        return sid

    def proxied(self, n: int) -> None:
        """One stream as ztunnel carries a short TCP connection; every 10th ends otherwise:
        refused (503), reset by the app side, reset by the client."""
        sid = self.request(10000 + n % 50000)
        kind = n % 10
        if kind == 7:
            self.server.respond(sid, 503)
            self.pump()
            return
        self.server.respond(sid, 200)
        self.pump()
        self.client.send_data(sid, b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
        self.pump()
        if kind == 8:
            self.server.reset(sid)
        elif kind == 9:
            self.client.reset(sid)
        else:
            self.client.end_stream(sid)
            self.server.send_data(sid, b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", end_stream=True)
        self.pump()

    def gone(self) -> None:
        assert self.client.open_streams == 0 and self.server.open_streams == 0


def test_a_connection_keeps_nothing_per_finished_stream() -> None:
    """After a warm-up, 6,000 more streams (three in ten reset or refused) leave less than
    256 KiB behind on the two connections together (≈ 105 KiB: tables of bounded records and
    caches; with h2's own records of every closed stream, 1.1 MiB)."""
    wire = Wire(fast=True)  # the records are h2's on both DATA paths; this is the one ztunnel runs
    # Traced from the start, so that what the batch replaces in bounded structures (the reset
    # records, parse_authority's cache) counts as freed, not only what it adds as grown.
    tracemalloc.start(1)
    try:
        for n in range(3500):  # more than RESET_STREAMS_KEPT resets: the record is full
            wire.proxied(n)
        wire.gone()
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        for n in range(3500, 9500):
            wire.proxied(n)
        wire.gone()
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 256 * 1024, f"{grown} bytes kept after 6,000 finished streams"
    # And the streams all behaved: the connection is still usable.
    sid = wire.request(1)
    wire.server.respond(sid, 200)
    c_evs, _ = wire.pump()
    assert Response(sid, 200, ((":status", "200"),)) in c_evs


def test_reset_records_are_bounded_and_clean_ends_not_kept() -> None:
    rec = _ResetStreams()
    rec[1] = h2.stream.StreamClosedBy.SEND_END_STREAM
    rec[3] = h2.stream.StreamClosedBy.RECV_END_STREAM
    rec[5] = None  # closed implicitly
    assert len(rec) == 0
    for sid in range(7, 7 + 2 * (RESET_STREAMS_KEPT + 10), 2):
        rec[sid] = (
            h2.stream.StreamClosedBy.SEND_RST_STREAM if sid % 4 else h2.stream.StreamClosedBy.RECV_RST_STREAM
        )
    assert len(rec) == RESET_STREAMS_KEPT
    assert 7 not in rec and sid in rec  # the oldest went first


def test_a_late_answer_to_a_cancelled_stream_is_still_only_a_stream_error(fast: bool) -> None:
    """The one record that matters is kept across any number of clean streams: the client
    cancels a CONNECT whose 200 is already on its way; thousands of streams later (h2 has
    forgotten the stream itself), the 200 arrives — a stream error answered with RST_STREAM,
    not a connection error that would reset every other stream on the connection."""
    wire = Wire(fast)
    wire.proxied(0)  # the server's first header block (and any table size update) is out
    sid = wire.request(2)
    wire.client.reset(sid)
    wire.server.respond(sid, 200)
    late = wire.server.data_to_send()  # the answer, still on its way
    wire.pump()  # the client's RST_STREAM reaches the server
    for n in range(1, 2001):  # 2,000 streams of every kind, 400 of them reset
        wire.proxied(n)
    assert sid not in wire.client._h2.streams
    wire.client.receive_data(late)  # no ProtocolError
    assert not wire.client.terminated
    nxt = wire.request(3)
    wire.server.respond(nxt, 200)
    c_evs, _ = wire.pump()
    assert Response(nxt, 200, ((":status", "200"),)) in c_evs
