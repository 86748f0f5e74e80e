"""Transcript tests of the sans-IO HBONE layer: two connections wired back to back in memory."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.hbone import (
    ClientConnection,
    ConnectionTerminated,
    ConnectRequest,
    Data,
    Event,
    LocalProtocolError,
    ProtocolError,
    RequestRejected,
    Response,
    ServerConnection,
    StreamEnded,
    StreamReset,
    WindowOpened,
    parse_authority,
)
from mesh.hbone.protocol import CONNECTION_WINDOW, STREAM_WINDOW


@pytest.fixture(params=[True, False], ids=["fast-path", "h2-only"])
def fast(request: pytest.FixtureRequest) -> bool:
    """Every transcript runs against both DATA paths: the hand-written one and pure h2."""
    return bool(request.param)


class Pair:
    def __init__(self, fast: bool = True) -> None:
        self.client = ClientConnection(fast=fast)
        self.server = ServerConnection(fast=fast)
        self.to_server: list[bytes] = []  # everything the server received, for replay_server()
        self.pump()

    def replay_server(self, fast: bool, answered: int) -> ServerConnection:
        """A new server in ``self.server``'s state: fed what it received, stream ``answered`` 200."""
        twin = ServerConnection(fast=fast)
        for chunk in self.to_server:
            twin.receive_data(chunk)
        twin.respond(answered, 200)
        twin.data_to_send()
        return twin

    def pump(self) -> tuple[list[Event], list[Event]]:
        """Move bytes both ways until quiet; returns (events at client, events at server)."""
        at_client: list[Event] = []
        at_server: list[Event] = []
        while True:
            c2s = self.client.data_to_send()
            s2c = self.server.data_to_send()
            if not c2s and not s2c:
                return at_client, at_server
            if c2s:
                self.to_server.append(c2s)
                at_server += self.server.receive_data(c2s)
            if s2c:
                at_client += self.client.receive_data(s2c)

    def open(self, authority: str = "10.0.0.2:8080") -> int:
        sid = self.client.connect(authority, [("forwarded", 'for="10.0.0.1:4000"'), ("baggage", "k=v")])
        _, evs = self.pump()
        req = [e for e in evs if isinstance(e, ConnectRequest)]
        assert len(req) == 1
        self.server.respond(sid, 200)
        evs, _ = self.pump()
        assert Response(sid, 200, ((":status", "200"),)) in evs
        return sid


def only(events: list[Event], kind: type) -> list[Event]:
    return [e for e in events if isinstance(e, kind)]


def test_connect_carries_authority_and_headers(fast: bool) -> None:
    p = Pair(fast)
    sid = p.client.connect("10.0.0.2:8080", [("forwarded", 'for="10.0.0.1:4000"'), ("baggage", "k=v")])
    _, evs = p.pump()
    (req,) = only(evs, ConnectRequest)
    assert isinstance(req, ConnectRequest)
    assert (req.stream_id, req.authority, req.host, req.port) == (sid, "10.0.0.2:8080", "10.0.0.2", 8080)
    assert req.header("forwarded") == 'for="10.0.0.1:4000"'
    assert req.header("baggage") == "k=v"


def test_per_stream_headers_are_not_indexed_and_repeats_are() -> None:
    """``forwarded`` differs per stream: sent as a never-indexed literal, it leaves both HPACK
    tables alone; the authority repeats and is indexed, so later streams send an index only."""
    p = Pair()
    sizes = []
    for port in (4000, 4001, 4002):
        p.client.connect("10.0.0.2:8080", [("forwarded", f'for="10.0.0.1:{port}"')])
        out = p.client.data_to_send()
        sizes.append(len(out))
        (req,) = only(p.server.receive_data(out), ConnectRequest)
        assert isinstance(req, ConnectRequest) and req.header("forwarded") == f'for="10.0.0.1:{port}"'
        p.pump()
    enc = p.client._h2.encoder.header_table.dynamic_entries
    dec = p.server._h2.decoder.header_table.dynamic_entries
    for table in (enc, dec):  # :method CONNECT and :authority once each, forwarded never
        assert sorted(n for n, _ in table) == [b":authority", b":method"]
    assert sizes[1] < sizes[0] and sizes[1] == sizes[2]


@pytest.mark.parametrize(
    ("name", "value", "reason"),
    [
        ("Forwarded", "x", "not a lowercase HTTP token"),
        (":path", "/", "not a lowercase HTTP token"),
        ("bad header", "x", "not a lowercase HTTP token"),
        ("baggage", "a\r\nx-injected: 1", "NUL, CR, LF"),
        ("baggage", " padded", "edge whitespace"),
    ],
)
def test_bad_extra_headers_are_refused_before_anything_is_sent(name: str, value: str, reason: str) -> None:
    p = Pair()
    with pytest.raises(LocalProtocolError, match=reason):
        p.client.connect("10.0.0.2:8080", [(name, value)])
    assert p.client.data_to_send() == b"" and p.client.open_streams == 0
    sid = p.client.connect("10.0.0.2:8080")
    p.pump()
    with pytest.raises(LocalProtocolError, match=reason):  # the server's answer is checked alike
        p.server.respond(sid, 200, [(name, value)])
    assert p.server.data_to_send() == b""


def test_data_both_ways_and_half_close(fast: bool) -> None:
    p = Pair(fast)
    sid = p.open()
    p.client.send_data(sid, b"hello")
    _, evs = p.pump()
    assert Data(sid, b"hello") in evs
    p.server.send_data(sid, b"world")
    p.client.end_stream(sid)  # client half-closes: server sees END_STREAM, may still send
    c_evs, s_evs = p.pump()
    assert Data(sid, b"world") in c_evs
    assert StreamEnded(sid) in s_evs
    p.server.send_data(sid, b"after half-close", end_stream=True)
    c_evs, _ = p.pump()
    assert only(c_evs, Data) == [Data(sid, b"after half-close")]
    assert StreamEnded(sid) in c_evs
    assert p.client.open_streams == 0 and p.server.open_streams == 0


@pytest.mark.parametrize("status", [400, 401, 503])
def test_refusal_statuses_close_the_stream(fast: bool, status: int) -> None:
    p = Pair(fast)
    sid = p.client.connect("10.0.0.2:8080")
    p.pump()
    p.server.respond(sid, status)
    c_evs, _ = p.pump()
    assert only(c_evs, Response)[0] == Response(sid, status, ((":status", str(status)),))
    assert p.client.open_streams == 0 and p.server.open_streams == 0
    with pytest.raises(LocalProtocolError):
        p.client.send_data(sid, b"x")


def test_reset_maps_to_abort(fast: bool) -> None:
    p = Pair(fast)
    sid = p.open()
    p.client.reset(sid)
    _, s_evs = p.pump()
    (ev,) = only(s_evs, StreamReset)
    assert isinstance(ev, StreamReset) and ev.remote and ev.error_code == 0xA  # CONNECT_ERROR
    assert p.server.open_streams == 0


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ([(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", "a:1")], "is not CONNECT"),
        ([(":method", "CONNECT"), (":authority", "10.0.0.2")], "is not host:port"),
        ([(":method", "CONNECT"), (":authority", "10.0.0.2:0")], "invalid port"),
        ([(":method", "CONNECT"), (":authority", "10.0.0.2:99999")], "invalid port"),
        ([(":method", "CONNECT"), (":authority", "bad_host!:80")], "invalid host"),
        ([(":method", "CONNECT"), (":authority", "[zz::1]:80")], "invalid IPv6"),
    ],
)
def test_malformed_requests_get_400(fast: bool, headers: list[tuple[str, str]], reason: str) -> None:
    server = ServerConnection(fast=fast)
    raw = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, validate_outbound_headers=False)
    )
    raw.initiate_connection()
    raw.send_headers(1, headers, end_stream=False)
    evs = server.receive_data(raw.data_to_send())
    (rej,) = only(evs, RequestRejected)
    assert isinstance(rej, RequestRejected) and reason in rej.reason
    answers = raw.receive_data(server.data_to_send())
    resp = [e for e in answers if isinstance(e, h2.events.ResponseReceived)]
    assert resp and dict(resp[0].headers or [])[b":status"] == b"400"


def test_settings_windows_and_frame_size(fast: bool) -> None:
    p = Pair(fast)
    sid = p.open()
    assert p.client.send_window(sid) == STREAM_WINDOW
    assert p.server.send_window(sid) == STREAM_WINDOW
    assert p.client._h2.max_outbound_frame_size == 1024 * 1024
    assert p.client._h2.remote_settings.max_concurrent_streams == 100
    # The connection window (16 MiB) is what lets several 4 MiB streams run at once.
    sids = [sid] + [p.open() for _ in range(3)]
    for s in sids:
        p.client.send_data(s, b"w" * STREAM_WINDOW)
    _, s_evs = p.pump()
    assert sum(len(e.data) for e in only(s_evs, Data)) == CONNECTION_WINDOW  # type: ignore[attr-defined]


def test_unacknowledged_data_stops_the_sender(fast: bool) -> None:
    """A reader that does not consume closes the window: the writer's data queues, bounded."""
    p = Pair(fast)
    sid = p.open()
    payload = b"x" * (STREAM_WINDOW + 100_000)
    p.client.send_data(sid, payload)
    _, s_evs = p.pump()
    got = sum(len(e.data) for e in only(s_evs, Data))  # type: ignore[attr-defined]
    assert got == STREAM_WINDOW
    assert p.client.pending(sid) == 100_000
    # Consuming half of it reopens the window and the rest flows.
    p.server.acknowledge(sid, STREAM_WINDOW // 2)
    c_evs, s_evs = p.pump()
    assert WindowOpened(sid) in c_evs
    assert sum(len(e.data) for e in only(s_evs, Data)) == 100_000  # type: ignore[attr-defined]
    assert p.client.pending(sid) == 0


def test_connection_window_returned_for_reset_streams(fast: bool) -> None:
    """Bytes never consumed because the stream died must not shrink the connection window."""
    p = Pair(fast)
    for _ in range(6):  # 6 x 4 MiB > 16 MiB connection window
        sid = p.open()
        p.client.send_data(sid, b"y" * STREAM_WINDOW)
        p.pump()
        p.server.reset(sid)
        p.pump()
    sid = p.open()
    p.client.send_data(sid, b"z" * 1000)
    _, s_evs = p.pump()
    assert Data(sid, b"z" * 1000) in s_evs


def test_many_streams_and_limit(fast: bool) -> None:
    p = Pair(fast)
    sids = [p.client.connect(f"10.0.0.2:{8000 + i}") for i in range(100)]
    assert not p.client.has_capacity
    _, s_evs = p.pump()
    assert len(only(s_evs, ConnectRequest)) == 100
    for sid in sids:
        p.server.respond(sid, 200)
        p.client.end_stream(sid)
        p.server.end_stream(sid)
    p.pump()
    assert p.client.has_capacity and p.client.open_streams == 0


def test_garbage_is_a_protocol_error(fast: bool) -> None:
    server = ServerConnection(fast=fast)
    with pytest.raises(ProtocolError):
        server.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\0" * 64)
    assert server.terminated
    assert server.receive_data(b"more") == []


def test_parse_authority() -> None:
    assert parse_authority("[fd00::1]:15008") == ("fd00::1", 15008)
    assert parse_authority("web.shop.svc.cluster.local:80") == ("web.shop.svc.cluster.local", 80)


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "h2-only"])
@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4096), st.booleans())
def test_fuzz_server_only_protocol_errors(fast: bool, blob: bytes, with_preface: bool) -> None:
    server = ServerConnection(fast=fast)
    data = (PREFACE + blob) if with_preface else blob
    try:
        for i in range(0, len(data), 97):
            server.receive_data(data[i : i + 97])
    except ProtocolError:
        return
    assert len(server.data_to_send()) < 1_000_000


frame = st.tuples(
    st.integers(0, 10),  # type
    st.integers(0, 255),  # flags
    st.integers(0, 7),  # stream id
    st.binary(max_size=64),
)


@pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "h2-only"])
@settings(max_examples=300, deadline=None)
@given(st.lists(frame, max_size=20))
def test_fuzz_server_with_framed_garbage(fast: bool, frames: list[tuple[int, int, int, bytes]]) -> None:
    """Structurally valid frames with random contents get deeper into the state machine."""
    server = ServerConnection(fast=fast)
    out = bytearray(PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
    for ftype, flags, sid, payload in frames:
        out += len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + sid.to_bytes(4, "big") + payload
    try:
        server.receive_data(bytes(out))
    except ProtocolError:
        return


@pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "h2-only"])
@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from([0, 0, 0, 3, 8]), st.integers(0, 255), st.binary(max_size=300)), max_size=12
    )
)
def test_fuzz_frames_on_an_open_stream(fast: bool, frames: list[tuple[int, int, bytes]]) -> None:
    """Random DATA / RST_STREAM / WINDOW_UPDATE frames (any flags, padding) on a live stream."""
    p = Pair(fast)
    sid = p.open()
    out = bytearray()
    for ftype, flags, payload in frames:
        out += len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + sid.to_bytes(4, "big") + payload
    try:
        evs = p.server.receive_data(bytes(out))
    except ProtocolError:
        return
    got = sum(len(e.data) for e in evs if isinstance(e, Data))
    assert got <= len(out)
    assert len(p.server.data_to_send()) < 1_000_000


def test_goaway_lets_open_streams_finish(fast: bool) -> None:
    """A graceful GOAWAY refuses new streams but open ones still carry data and END_STREAM."""
    p = Pair(fast)
    sid = p.open()
    p.server.close()
    c_evs, _ = p.pump()
    (term,) = only(c_evs, ConnectionTerminated)
    assert isinstance(term, ConnectionTerminated) and term.error_code == 0 and term.last_stream_id == sid
    assert p.client.closing and not p.client.has_capacity
    with pytest.raises(LocalProtocolError):
        p.client.connect("10.0.0.2:8080")
    p.client.send_data(sid, b"still flowing", end_stream=True)
    p.server.send_data(sid, b"reply", end_stream=True)
    c_evs, s_evs = p.pump()
    assert Data(sid, b"still flowing") in s_evs and StreamEnded(sid) in s_evs
    assert Data(sid, b"reply") in c_evs and StreamEnded(sid) in c_evs
    assert p.client.open_streams == 0 and p.server.open_streams == 0


def test_streams_opened_after_goaway_are_refused(fast: bool) -> None:
    p = Pair(fast)
    p.open()
    p.server.close()
    # The client has not seen the GOAWAY yet and opens another stream.
    late = p.client.connect("10.0.0.2:9090")
    c_evs, s_evs = p.pump()
    assert not only(s_evs, ConnectRequest)
    resets = only(c_evs, StreamReset)
    assert resets and resets[0].stream_id == late and resets[0].error_code == 7  # type: ignore[attr-defined]


@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(min_value=1, max_value=4000), max_size=40), fast=st.booleans())
def test_any_split_of_the_byte_stream_gives_the_same_events(cuts: list[int], fast: bool) -> None:
    """Frame headers and payloads cut anywhere (as TCP may) parse exactly as when whole."""
    p = Pair(fast)
    sid = p.open()
    payloads = [b"a" * 3, bytes(range(256)) * 9, b"z" * 1500]
    for data in payloads:
        p.client.send_data(sid, data)
    p.client.end_stream(sid)
    wire = p.client.data_to_send()

    def merged(events: list[Event]) -> tuple[bytes, list[type]]:
        body = b"".join(bytes(e.data) for e in events if isinstance(e, Data))
        return body, [type(e) for e in events if not isinstance(e, Data)]

    whole = p.replay_server(fast, answered=sid)
    reference = merged(whole.receive_data(wire))
    assert reference[0] == b"".join(payloads)

    split = p.replay_server(fast, answered=sid)
    events: list[Event] = []
    i = 0
    for cut in cuts:
        events += split.receive_data(wire[i : i + cut])
        i += cut
    events += split.receive_data(wire[i:])
    assert merged(events) == reference


# -- flow-control edge cases (RFC 9113 §6.5.2, §6.9) -------------------------------------------------


def _settings_frame(initial_window: int) -> bytes:
    """A peer SETTINGS frame carrying only SETTINGS_INITIAL_WINDOW_SIZE."""
    return b"\x00\x00\x06\x04\x00\x00\x00\x00\x00" + b"\x00\x04" + initial_window.to_bytes(4, "big")


def _window_update_frame(stream_id: int, increment: int) -> bytes:
    return b"\x00\x00\x04\x08\x00" + stream_id.to_bytes(4, "big") + increment.to_bytes(4, "big")


def _frames(wire: bytes) -> list[tuple[int, int, bytes]]:
    """(type, stream id, payload) of each frame in ``wire``."""
    out = []
    i = 0
    while i < len(wire):
        length = int.from_bytes(wire[i : i + 3], "big")
        out.append((wire[i + 3], int.from_bytes(wire[i + 5 : i + 9], "big"), wire[i + 9 : i + 9 + length]))
        i += 9 + length
    return out


def _data_sent(wire: bytes, sid: int) -> int:
    return sum(len(payload) for ftype, s, payload in _frames(wire) if ftype == 0x0 and s == sid)


@pytest.mark.parametrize("repeat", [1, 2], ids=["once", "twice"])
def test_initial_window_of_zero_sends_nothing_until_window_update(fast: bool, repeat: int) -> None:
    """SETTINGS_INITIAL_WINDOW_SIZE = 0 (sent once, or again: a change from 0 to 0) leaves every
    stream without window; each WINDOW_UPDATE then lets out exactly its increment."""
    p = Pair(fast)
    sid = p.open()
    for _ in range(repeat):
        p.client.receive_data(_settings_frame(0))
    assert only(p.client.receive_data(b""), Data) == []
    wire = p.client.data_to_send()  # SETTINGS ACKs only
    assert {ftype for ftype, _, _ in _frames(wire)} == {0x4}
    p.client.send_data(sid, b"x" * 1000)
    assert _data_sent(p.client.data_to_send(), sid) == 0
    assert p.client.send_window(sid) == 0 and p.client.pending(sid) == 1000
    evs = p.client.receive_data(_window_update_frame(sid, 300))
    assert WindowOpened(sid) in evs
    assert _data_sent(p.client.data_to_send(), sid) == 300
    assert p.client.pending(sid) == 700
    p.client.receive_data(_window_update_frame(sid, 700))
    assert _data_sent(p.client.data_to_send(), sid) == 700
    assert p.client.pending(sid) == 0


def test_initial_window_raised_from_zero_opens_streams_by_the_new_value(fast: bool) -> None:
    """A later SETTINGS changes every stream's window by new - old, and old is 0 here, not 65,535."""
    p = Pair(fast)
    sid = p.open()
    p.client.receive_data(_settings_frame(0))
    p.client.send_data(sid, b"y" * 1000)
    assert _data_sent(p.client.data_to_send(), sid) == 0
    p.client.receive_data(_settings_frame(100))
    assert _data_sent(p.client.data_to_send(), sid) == 100
    p.client.receive_data(_window_update_frame(sid, 900))
    assert _data_sent(p.client.data_to_send(), sid) == 900
    assert p.client.pending(sid) == 0


def test_zero_window_update_on_a_stream_resets_that_stream(fast: bool) -> None:
    """A stream error (§6.9): RST_STREAM PROTOCOL_ERROR, reported as the reset it is; the
    connection and its other streams carry on."""
    p = Pair(fast)
    sid = p.open()
    other = p.open()
    evs = p.client.receive_data(_window_update_frame(sid, 0))
    assert only(evs, StreamReset) == [StreamReset(sid, 0x1, remote=False)]  # PROTOCOL_ERROR
    wire = p.client.data_to_send()
    assert _frames(wire) == [(0x3, sid, b"\x00\x00\x00\x01")]
    assert only(p.server.receive_data(wire), StreamReset) == [StreamReset(sid, 0x1, remote=True)]
    assert not p.client.terminated and p.client.open_streams == 1
    p.client.send_data(other, b"still fine")
    _, s_evs = p.pump()
    assert Data(other, b"still fine") in s_evs


def test_zero_window_update_on_the_connection_is_a_connection_error(fast: bool) -> None:
    """A connection error (§6.9): GOAWAY PROTOCOL_ERROR, and ProtocolError raised to the caller."""
    p = Pair(fast)
    sid = p.open()
    with pytest.raises(ProtocolError):
        p.client.receive_data(_window_update_frame(0, 0))
    assert p.client.terminated
    (goaway,) = _frames(p.client.data_to_send())
    assert goaway[0] == 0x7 and goaway[1] == 0
    assert int.from_bytes(goaway[2][4:8], "big") == 0x1  # PROTOCOL_ERROR
    assert p.client.receive_data(_window_update_frame(sid, 10)) == []  # nothing more is read
