"""Sans-IO HBONE: HTTP/2 CONNECT tunnels over an already-established TLS byte stream.

Bytes go in through :meth:`HboneConnection.receive_data`, events come out; bytes to send are taken
with :meth:`HboneConnection.data_to_send`. No sockets, no clocks: the asyncio adapter in
``mesh.hbone.connection`` moves the bytes, and tests drive this class directly with transcripts.

HTTP/2 framing and HPACK are the ``h2`` library's job. On top of it this layer adds what makes a
CONNECT stream behave like a TCP connection:

* outbound data is queued per stream and sent as flow-control windows allow, so a writer can see
  how much is waiting (``pending``) and stop reading its source — backpressure instead of memory;
* inbound data is handed back to the peer's window only when the application says it has consumed
  it (``acknowledge``), so a slow reader slows the remote writer;
* END_STREAM is a half-close, RST_STREAM an abort, and the request/response semantics of
  PROTOCOLS.md (200 / 400 / 401 / 503) are enforced on the server side.
"""

from __future__ import annotations

import collections
import functools
import ipaddress
import re
from collections.abc import Iterable
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import h2.stream
import hpack
from hyperframe.exceptions import HyperframeError

from mesh.hbone.events import (
    ConnectionTerminated,
    ConnectRequest,
    Data,
    Event,
    PingAcked,
    RequestRejected,
    Response,
    StreamEnded,
    StreamReset,
    WindowOpened,
)

STREAM_WINDOW = 4 * 1024 * 1024
CONNECTION_WINDOW = 16 * 1024 * 1024
MAX_FRAME_SIZE = 1024 * 1024
MAX_CONCURRENT_STREAMS = 100
DEFAULT_WINDOW = 65535

# HTTP/2 error codes used to map TCP events onto streams.
NO_ERROR = h2.errors.ErrorCodes.NO_ERROR
CANCEL = h2.errors.ErrorCodes.CANCEL
CONNECT_ERROR = h2.errors.ErrorCodes.CONNECT_ERROR
REFUSED_STREAM = h2.errors.ErrorCodes.REFUSED_STREAM
PROTOCOL_ERROR = h2.errors.ErrorCodes.PROTOCOL_ERROR
FLOW_CONTROL_ERROR = h2.errors.ErrorCodes.FLOW_CONTROL_ERROR

STATUS_OK = 200
STATUS_BAD_REQUEST = 400
STATUS_UNAUTHORIZED = 401
STATUS_UNAVAILABLE = 503

_HOSTNAME = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)


class ProtocolError(Exception):
    """The peer broke HTTP/2 or HBONE rules; the connection is unusable."""


class LocalProtocolError(Exception):
    """We asked for something the protocol state does not allow (e.g. data on a closed stream)."""


@functools.lru_cache(maxsize=1024)  # every CONNECT parses one; most repeat (bounded: peers pick them)
def parse_authority(authority: str) -> tuple[str, int]:
    """Split ``host:port`` / ``[v6]:port``; raise ValueError naming the problem."""
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0 or authority[end + 1 : end + 2] != ":":
            raise ValueError(f"authority {authority!r} is not [ipv6]:port")
        host, port_s = authority[1:end], authority[end + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"authority {authority!r} has an invalid IPv6 address") from None
    else:
        host, sep, port_s = authority.rpartition(":")
        if not sep or not host:
            raise ValueError(f"authority {authority!r} is not host:port")
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            if not _HOSTNAME.fullmatch(host):
                raise ValueError(f"authority {authority!r} has an invalid host") from None
    if not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise ValueError(f"authority {authority!r} has an invalid port {port_s!r}")
    return host, int(port_s)


def format_authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# Frame layout facts the DATA fast path needs (RFC 9113 §4.1, §6.1, §6.9).
_FRAME_HEADER = 9
_DATA = 0x0
_GOAWAY = 0x7
_WINDOW_UPDATE = 0x8
_MAX_GOAWAY_DEBUG = 16 * 1024  # debug data kept from a peer's GOAWAY; the rest is skipped
_FLAG_END_STREAM = 0x1
_FLAG_PADDED = 0x8
_MAX_WINDOW = 2**31 - 1
_PREFACE_LEN = 24
# Window credit is returned in batches of a quarter window: few WINDOW_UPDATE frames, no stalls.
_STREAM_CREDIT_BATCH = STREAM_WINDOW // 4
_CONN_CREDIT_BATCH = CONNECTION_WINDOW // 4

# Parser states of the fast path.
_HEADER, _FAST, _PADLEN, _PADDING, _H2, _WINUPD, _GOAWAY_BODY = range(7)


def _window_update(stream_id: int, increment: int) -> bytes:
    return b"\x00\x00\x04\x08\x00" + stream_id.to_bytes(4, "big") + increment.to_bytes(4, "big")


def _data_header(stream_id: int, length: int) -> bytes:
    return length.to_bytes(3, "big") + b"\x00\x00" + stream_id.to_bytes(4, "big")


class _StreamState:
    __slots__ = (
        "end_queued",
        "ended_local",
        "outbound",
        "queued",
        "recv_window",
        "remote_ended",
        "send_window",
        "to_credit",
        "unacked",
    )

    def __init__(self, send_window: int) -> None:
        # A list, not a deque: an empty deque costs ~600 bytes (one block), a stream's queue is short.
        self.outbound: list[memoryview] = []
        self.queued = 0  # bytes in ``outbound``
        self.end_queued = False  # END_STREAM once the queue drains
        self.ended_local = False
        self.remote_ended = False
        self.unacked = 0  # received bytes the application has not acknowledged yet
        # Fast path only: our own flow-control bookkeeping for this stream.
        self.send_window = send_window
        self.recv_window = STREAM_WINDOW
        self.to_credit = 0


_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+")
_BAD_VALUE = re.compile(r"[\x00\r\n]|^[ \t]|[ \t]$")
# Headers whose value differs on every stream (``forwarded`` names the client's port): indexing
# them would only churn both sides' HPACK tables, so they are sent as never-indexed literals.
_NOT_INDEXED = frozenset({"forwarded"})


def _outbound_header(name: str, value: str) -> tuple[str, str] | hpack.NeverIndexedHeaderTuple:
    """A caller's extra request or response header, checked here (h2's outbound validation is off)."""
    if not _TOKEN.fullmatch(name):
        raise LocalProtocolError(f"header name {name!r} is not a lowercase HTTP token")
    if _BAD_VALUE.search(value):
        raise LocalProtocolError(f"header {name!r} has a value with NUL, CR, LF or edge whitespace")
    return hpack.NeverIndexedHeaderTuple(name, value) if name in _NOT_INDEXED else (name, value)


class _PlainEncoder(hpack.Encoder):
    """HPACK without Huffman coding: it saves a few bytes per header at a cost in pure Python
    (per character) that dominated opening a stream; the dynamic table still indexes repeats."""

    def encode(self, headers: Iterable[Any], huffman: bool = False) -> bytes:
        return super().encode(headers, huffman=False)


# How many reset streams each connection remembers (h2 keeps 2**16 closed streams of any kind).
RESET_STREAMS_KEPT = 1024
_RESET = frozenset({h2.stream.StreamClosedBy.SEND_RST_STREAM, h2.stream.StreamClosedBy.RECV_RST_STREAM})


class _ResetStreams(collections.OrderedDict[int, Any]):
    """What h2 remembers of the streams it has forgotten: only the last resets, not every stream.

    h2 records how each closed stream ended, 2**16 of them per connection: ~115 bytes a stream,
    so a pooled connection that carries a new CONNECT stream per proxied TCP connection grew by
    that much per connection for its first 65,536 streams (≈ 7.5 MiB each; issue 24). The record
    changes what h2 does with a late frame (HEADERS, PUSH_PROMISE) for a forgotten stream only
    when the stream was reset: then it is a stream error (RST_STREAM, the connection lives on);
    after a clean end, or with no record, it is a connection error either way (STREAM_CLOSED or
    PROTOCOL_ERROR in the GOAWAY). So resets are kept, the last ``RESET_STREAMS_KEPT`` of them —
    a response still in flight to a stream we cancelled meets its record unless that many
    streams were reset on the connection meanwhile — and clean ends are not kept at all.
    """

    def __setitem__(self, stream_id: int, closed_by: Any) -> None:
        if closed_by in _RESET:
            super().__setitem__(stream_id, closed_by)
            if len(self) > RESET_STREAMS_KEPT:
                self.popitem(last=False)


class HboneConnection:
    """One HTTP/2 connection carrying HBONE CONNECT streams; see the module docstring.

    With ``fast=True`` (the default) DATA and WINDOW_UPDATE frames bypass ``h2``: the frame
    headers are parsed here, payloads are handed on as zero-copy slices, and both directions'
    flow-control windows are kept here. Everything else (SETTINGS, HEADERS, RST_STREAM, PING,
    GOAWAY, and frames for streams we do not track) still goes through ``h2``, which also keeps
    the stream state machine: END_STREAM is fed to it as an empty DATA frame. ``fast=False``
    uses ``h2`` for everything; both paths pass the same transcript and fuzz tests.
    """

    client_side: bool

    def __init__(self, *, fast: bool = True) -> None:
        config = h2.config.H2Configuration(
            client_side=self.client_side,
            header_encoding="utf-8",
            validate_inbound_headers=True,
            normalize_inbound_headers=True,
            # What we send is built here from parsed, checked values: h2 need not re-check it.
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self._h2 = h2.connection.H2Connection(config)
        self._h2.encoder = _PlainEncoder()
        # h2 4.x's record of closed streams (see _ResetStreams); should a later h2 keep it under
        # another name, tests/hbone/test_stream_memory.py sees the memory grow again.
        self._h2._closed_streams = _ResetStreams()
        self._fast = fast
        self._streams: dict[int, _StreamState] = {}
        self._events: list[Event] = []
        self._terminated = False  # fatal: nothing more is read or written
        self.goaway_sent = False  # graceful: no new streams, open ones finish
        self.goaway_received = False
        self._last_stream_id = 0  # the last peer stream we accept, once GOAWAY is sent
        self._goaway = bytearray()
        self._out: list[bytes | memoryview] = []
        # Fast-path state: parser and connection-level windows.
        self._preface_left = 0 if self.client_side else _PREFACE_LEN
        self._state = _HEADER
        self._hdr = bytearray()
        self._remaining = 0
        self._pad = 0
        self._cur: _StreamState | None = None
        self._cur_sid = 0
        self._cur_end = False
        self._wu = bytearray()
        self._conn_send_window = DEFAULT_WINDOW
        self._conn_recv_window = CONNECTION_WINDOW
        self._conn_to_credit = 0
        self._h2.initiate_connection()
        settings: dict[h2.settings.SettingCodes | int, int] = {
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME_SIZE,
        }
        if not self.client_side:
            settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = MAX_CONCURRENT_STREAMS
        self._h2.update_settings(settings)
        self._h2.increment_flow_control_window(CONNECTION_WINDOW - DEFAULT_WINDOW)

    # -- introspection ----------------------------------------------------------------------------

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    @property
    def terminated(self) -> bool:
        return self._terminated

    @property
    def closing(self) -> bool:
        """No new streams: GOAWAY was sent or received, or the connection failed."""
        return self._terminated or self.goaway_sent or self.goaway_received

    def pending(self, stream_id: int) -> int:
        """Bytes queued on a stream that flow control has not let out yet."""
        st = self._streams.get(stream_id)
        return st.queued if st else 0

    def send_window(self, stream_id: int) -> int:
        """How many bytes flow control lets us send on a stream right now."""
        if self._fast:
            st = self._streams.get(stream_id)
            return max(0, min(st.send_window, self._conn_send_window)) if st else 0
        try:
            return self._h2.local_flow_control_window(stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.NoSuchStreamError, KeyError):
            return 0

    # -- input ------------------------------------------------------------------------------------

    def receive_data(self, data: bytes | memoryview) -> list[Event]:
        """Feed bytes from the peer; returns the events they produced."""
        if self._terminated:
            return []
        out = self._events
        self._events = []
        self._receive_frames(data, out)
        return out

    def _feed_h2(self, data: bytes | bytearray | memoryview, out: list[Event]) -> None:
        try:
            h2_events = self._h2.receive_data(data)
        except (h2.exceptions.ProtocolError, HyperframeError) as e:
            self._terminated = True
            raise ProtocolError(f"{type(e).__name__}: {e}") from None
        except (ValueError, KeyError, IndexError, UnicodeError) as e:  # malformed header blocks
            self._terminated = True
            raise ProtocolError(f"malformed frame: {type(e).__name__}: {e}") from None
        for ev in h2_events:
            self._handle(ev, out)

    def _protocol_error(self, reason: str) -> ProtocolError:
        self._terminated = True
        try:
            self._h2.close_connection(PROTOCOL_ERROR)
        except h2.exceptions.ProtocolError:
            pass
        return ProtocolError(reason)

    def _receive_frames(self, data: bytes | memoryview, out: list[Event]) -> None:
        """Split the byte stream into frames: GOAWAY (and on the fast path DATA / WINDOW_UPDATE)
        are handled here, everything else goes to h2."""
        mv = memoryview(data)
        i, n = 0, len(data)
        while i < n and not self._terminated:
            state = self._state
            if self._preface_left:
                k = min(self._preface_left, n - i)
                self._feed_h2(mv[i : i + k], out)
                self._preface_left -= k
                i += k
            elif state == _HEADER:
                if not self._hdr and n - i >= _FRAME_HEADER:
                    i += _FRAME_HEADER  # the usual case: the whole header is here, no copy
                    self._frame_header(mv[i - _FRAME_HEADER : i], out)
                else:
                    k = min(_FRAME_HEADER - len(self._hdr), n - i)
                    self._hdr += mv[i : i + k]
                    i += k
                    if len(self._hdr) == _FRAME_HEADER:
                        self._frame_header(self._hdr, out)
                        self._hdr.clear()
            elif state == _FAST:
                k = min(self._remaining, n - i)
                self._deliver(mv[i : i + k], out)
                i += k
                self._remaining -= k
                if not self._remaining:
                    self._end_fast_frame(out)
            elif state == _H2:
                k = min(self._remaining, n - i)
                self._feed_h2(mv[i : i + k], out)
                i += k
                self._remaining -= k
                if not self._remaining:
                    self._state = _HEADER
            elif state == _PADLEN:
                self._pad = data[i]
                i += 1
                self._remaining -= 1
                if self._pad > self._remaining:
                    raise self._protocol_error("DATA padding longer than the frame")
                self._remaining -= self._pad
                self._credit_padding(1)
                self._state = _FAST if self._remaining else _PADDING
                if not self._remaining and not self._pad:
                    self._end_fast_frame(out)
            elif state == _PADDING:
                k = min(self._pad, n - i)
                i += k
                self._pad -= k
                self._credit_padding(k)
                if not self._pad:
                    self._end_fast_frame(out)
            elif state == _GOAWAY_BODY:
                k = min(self._remaining, n - i)
                room = _MAX_GOAWAY_DEBUG + 8 - len(self._goaway)
                self._goaway += mv[i : i + min(k, max(room, 0))]
                i += k
                self._remaining -= k
                if not self._remaining:
                    self._state = _HEADER
                    self._on_goaway(out)
            else:  # _WINUPD
                k = min(4 - len(self._wu), n - i)
                self._wu += mv[i : i + k]
                i += k
                if len(self._wu) == 4:
                    self._state = _HEADER
                    self._window_update(self._cur_sid, int.from_bytes(self._wu, "big") & _MAX_WINDOW, out)

    def _frame_header(self, hdr: bytearray | memoryview, out: list[Event]) -> None:
        length = int.from_bytes(hdr[0:3], "big")
        ftype, flags = hdr[3], hdr[4]
        sid = int.from_bytes(hdr[5:9], "big") & _MAX_WINDOW
        st = self._streams.get(sid) if ftype == _DATA and self._fast else None
        if ftype == _GOAWAY and sid == 0 and length >= 8:
            # Handled here, not by h2: h2 closes its state machine on GOAWAY, which would stop
            # the streams that GOAWAY lets finish.
            self._goaway.clear()
            self._remaining = length
            self._state = _GOAWAY_BODY
        elif st is not None and not st.remote_ended and length > 0:
            if length > MAX_FRAME_SIZE:
                raise self._protocol_error(f"DATA frame of {length} bytes exceeds our maximum frame size")
            if length > st.recv_window or length > self._conn_recv_window:
                raise self._protocol_error(f"peer overran the flow-control window on stream {sid}")
            st.recv_window -= length
            self._conn_recv_window -= length
            self._cur, self._cur_sid, self._remaining = st, sid, length
            self._cur_end = bool(flags & _FLAG_END_STREAM)
            self._state = _PADLEN if flags & _FLAG_PADDED else _FAST
        elif ftype == _WINDOW_UPDATE and length == 4:
            # Read here on both paths: on the h2-only one, only to answer a zero increment on a
            # stream (which h2 would make a connection error) before handing the frame to h2.
            self._cur_sid = sid
            self._wu.clear()
            self._state = _WINUPD
        else:
            self._feed_h2(bytes(hdr), out)
            self._remaining = length
            self._state = _H2 if length else _HEADER

    def _deliver(self, payload: memoryview, out: list[Event]) -> None:
        st = self._cur
        assert st is not None
        st.unacked += len(payload)
        out.append(Data(self._cur_sid, payload))

    def _credit_padding(self, n: int) -> None:
        st = self._cur
        assert st is not None
        st.to_credit += n
        self._conn_to_credit += n
        self._send_credit(self._cur_sid, st)

    def _end_fast_frame(self, out: list[Event]) -> None:
        self._state = _HEADER
        if self._cur_end:
            # Let h2 run the stream state machine: an empty DATA frame with END_STREAM.
            self._feed_h2(b"\x00\x00\x00\x00\x01" + self._cur_sid.to_bytes(4, "big"), out)
        self._cur = None

    def _on_goaway(self, out: list[Event]) -> None:
        body = self._goaway
        last = int.from_bytes(body[0:4], "big") & _MAX_WINDOW
        code = int.from_bytes(body[4:8], "big")
        self.goaway_received = True
        out.append(ConnectionTerminated(code, last, bytes(body[8:]).decode("utf-8", "replace")))
        if code != NO_ERROR:
            self._terminated = True

    def _window_update(self, sid: int, inc: int, out: list[Event]) -> None:
        if not self._fast and (inc or sid not in self._streams):
            self._feed_h2(_window_update(sid, inc), out)  # h2 keeps the windows on this path
            return
        if sid == 0:
            if inc == 0:
                raise self._protocol_error("WINDOW_UPDATE with a zero increment on the connection")
            self._conn_send_window += inc
            if self._conn_send_window > _MAX_WINDOW:
                raise self._protocol_error("connection flow-control window overflow")
            self._flush_opened(0, out)
            return
        st = self._streams.get(sid)
        if st is None:
            return  # allowed for streams that are already closed
        if inc == 0 or st.send_window + inc > _MAX_WINDOW:
            # A stream error (RFC 9113 §6.9, §6.9.1): reset it, and report the code we sent.
            code = FLOW_CONTROL_ERROR if inc else PROTOCOL_ERROR
            self._reset(sid, code)
            out.append(StreamReset(sid, int(code), remote=False))
            return
        st.send_window += inc
        self._flush_opened(sid, out)

    def _handle(self, ev: h2.events.Event, out: list[Event]) -> None:
        if isinstance(ev, h2.events.DataReceived):
            # Only the h2-only path (or DATA for streams the fast path does not track) lands here.
            sid = ev.stream_id
            assert sid is not None
            data = ev.data or b""
            padding = (ev.flow_controlled_length or 0) - len(data)
            if padding:
                self._h2.acknowledge_received_data(padding, sid)
            st = self._streams.get(sid)
            if st is None:
                # A stream we already forgot: hand the window straight back.
                if data:
                    self._h2.acknowledge_received_data(len(data), sid)
                return
            if data:
                st.unacked += len(data)
                out.append(Data(sid, data))
            if ev.stream_ended is not None:
                self._remote_ended(sid, out)
        elif isinstance(ev, h2.events.StreamEnded):
            self._remote_ended(ev.stream_id or 0, out)
        elif isinstance(ev, h2.events.StreamReset):
            sid = ev.stream_id or 0
            if self._forget(sid):
                out.append(StreamReset(sid, int(ev.error_code or 0), remote=ev.remote_reset))
        elif isinstance(ev, h2.events.RequestReceived):
            self._on_request(ev, out)
        elif isinstance(ev, h2.events.ResponseReceived):
            self._on_response(ev, out)
        elif isinstance(ev, h2.events.WindowUpdated):
            self._flush_opened(ev.stream_id or 0, out)
        elif isinstance(ev, h2.events.RemoteSettingsChanged):
            changed = ev.changed_settings.get(h2.settings.SettingCodes.INITIAL_WINDOW_SIZE)
            if changed is not None:
                # An original value of 0 is a window of 0, not "unset" (RFC 9113 §6.9.2).
                old = DEFAULT_WINDOW if changed.original_value is None else changed.original_value
                delta = changed.new_value - old
                for st in self._streams.values():
                    st.send_window += delta
                self._flush_opened(0, out)
        elif isinstance(ev, h2.events.PingAckReceived):
            out.append(PingAcked(ev.ping_data or b""))
        elif isinstance(ev, h2.events.ConnectionTerminated):  # only for malformed GOAWAY frames
            self._terminated = True
            self.goaway_received = True
            out.append(
                ConnectionTerminated(
                    int(ev.error_code or 0),
                    ev.last_stream_id or 0,
                    (ev.additional_data or b"").decode("utf-8", "replace"),
                )
            )
        elif isinstance(ev, h2.events.TrailersReceived | h2.events.InformationalResponseReceived):
            pass  # no meaning in HBONE
        # Other events (settings acks, priority, unknown frames) need no action.

    def _remote_ended(self, sid: int, out: list[Event]) -> None:
        st = self._streams.get(sid)
        if st is not None:
            st.remote_ended = True
            out.append(StreamEnded(sid))
            self._maybe_forget(sid)

    def _new_stream(self, sid: int) -> _StreamState:
        st = _StreamState(self._h2.remote_settings.initial_window_size)
        self._streams[sid] = st
        return st

    def _on_request(self, ev: h2.events.RequestReceived, out: list[Event]) -> None:
        sid = ev.stream_id or 0
        headers = tuple((str(k), str(v)) for k, v in (ev.headers or []))
        h = dict(headers)
        reason = None
        if self.goaway_sent and sid > self._last_stream_id:
            self._reset_rejected(sid, REFUSED_STREAM)
            return
        if self.client_side:
            reason = "request received on a client connection"
        elif h.get(":method") != "CONNECT":
            reason = f"method {h.get(':method')!r} is not CONNECT"
        elif ":protocol" in h:
            reason = "extended CONNECT is not HBONE"
        else:
            try:
                host, port = parse_authority(h.get(":authority", ""))
            except ValueError as e:
                reason = str(e)
        if reason is not None:
            self._h2.send_headers(sid, [(":status", str(STATUS_BAD_REQUEST))], end_stream=True)
            self._reset_rejected(sid)
            out.append(RequestRejected(sid, reason))
            return
        st = self._new_stream(sid)
        if ev.stream_ended is not None:
            st.remote_ended = True
        out.append(ConnectRequest(sid, h[":authority"], host, port, headers))

    def _reset_rejected(self, sid: int, code: int = NO_ERROR) -> None:
        # The client may still be sending on a rejected stream; reset it so it stops.
        try:
            self._h2.reset_stream(sid, code)
        except h2.exceptions.StreamClosedError:
            pass

    def _on_response(self, ev: h2.events.ResponseReceived, out: list[Event]) -> None:
        sid = ev.stream_id or 0
        headers = tuple((str(k), str(v)) for k, v in (ev.headers or []))
        status_s = dict(headers).get(":status", "")
        status = int(status_s) if status_s.isdigit() else 0
        out.append(Response(sid, status, headers))
        if status != STATUS_OK and sid in self._streams:
            # A refused tunnel carries no bytes; make sure the stream is gone on both sides.
            self._reset(sid, CANCEL)

    def _flush_opened(self, sid: int, out: list[Event]) -> None:
        targets: Iterable[int] = list(self._streams) if sid == 0 else [sid]
        for s in targets:
            st = self._streams.get(s)
            if st is not None and (st.queued or st.end_queued):
                self._flush(s, st)
        out.append(WindowOpened(sid))

    # -- output -----------------------------------------------------------------------------------

    def _drain_h2(self) -> None:
        """Move h2's pending output into ours, so raw frames we add later keep their order."""
        # h2's data_to_send() copies and replaces its buffer even when it is empty; this runs
        # several times per DATA frame, so look at the buffer first (h2 4.x keeps it here).
        if self._h2._data_to_send:
            self._out.append(self._h2.data_to_send())

    @property
    def has_output(self) -> bool:
        """Whether ``data_to_send()`` would return bytes."""
        return bool(self._out) or bool(self._h2._data_to_send)

    def data_to_send(self) -> bytes:
        self._drain_h2()
        if not self._out:
            return b""
        out = b"".join(self._out)
        self._out.clear()
        return out

    def send_data(
        self, stream_id: int, data: bytes | bytearray | memoryview, end_stream: bool = False
    ) -> None:
        """Queue payload on a stream; it leaves as flow control allows (see ``pending``)."""
        st = self._streams.get(stream_id)
        if st is None or st.end_queued:
            raise LocalProtocolError(f"stream {stream_id} is not open for sending")
        if data:
            # The queue keeps a reference: callers must not mutate ``data`` afterwards.
            st.outbound.append(data if isinstance(data, memoryview) else memoryview(data))
            st.queued += len(data)
        st.end_queued = end_stream
        self._flush(stream_id, st)

    def end_stream(self, stream_id: int) -> None:
        """Half-close our side once queued data is out (TCP FIN from our TCP leg)."""
        st = self._streams.get(stream_id)
        if st is None or st.end_queued:
            return
        st.end_queued = True
        self._flush(stream_id, st)

    def reset(self, stream_id: int, error_code: int = CONNECT_ERROR) -> None:
        """Abort a stream (our TCP leg was reset or failed)."""
        self._reset(stream_id, error_code)

    def _reset(self, sid: int, code: int) -> None:
        if self._forget(sid):
            try:
                self._h2.reset_stream(sid, code)
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                pass

    def acknowledge(self, stream_id: int, n: int) -> bool:
        """The application consumed ``n`` bytes of a stream: give the peer window back.

        Returns whether that queued output (a WINDOW_UPDATE; on the fast path one per quarter
        window, so most calls queue nothing and need no flush).
        """
        st = self._streams.get(stream_id)
        if st is not None:
            n = min(n, st.unacked)
            st.unacked -= n
        if n <= 0:
            return False
        if not self._fast:
            self._h2.acknowledge_received_data(n, stream_id)
            return True
        self._conn_to_credit += n
        if st is not None:
            st.to_credit += n
        return self._send_credit(stream_id, st)

    def _send_credit(self, sid: int, st: _StreamState | None) -> bool:
        frames = []
        if st is not None and st.to_credit >= _STREAM_CREDIT_BATCH and not st.remote_ended:
            frames.append(_window_update(sid, st.to_credit))
            st.recv_window += st.to_credit
            st.to_credit = 0
        if self._conn_to_credit >= _CONN_CREDIT_BATCH:
            frames.append(_window_update(0, self._conn_to_credit))
            self._conn_recv_window += self._conn_to_credit
            self._conn_to_credit = 0
        if frames and not self._terminated:
            self._drain_h2()
            self._out.extend(frames)
            return True
        return False

    def ping(self, payload: bytes = b"\0" * 8) -> None:
        self._h2.ping(payload)

    def close(self, error_code: int = NO_ERROR) -> None:
        """Send GOAWAY: no new streams; open streams may finish (the adapter decides when to hang up).

        The frame is written here rather than by h2, whose ``close_connection`` moves its state
        machine to CLOSED and so would stop the very streams a graceful GOAWAY lets finish.
        """
        if self._terminated or self.goaway_sent:
            return
        self.goaway_sent = True
        self._last_stream_id = self._h2.highest_inbound_stream_id
        self._drain_h2()
        self._out.append(
            b"\x00\x00\x08\x07\x00\x00\x00\x00\x00"
            + self._last_stream_id.to_bytes(4, "big")
            + int(error_code).to_bytes(4, "big")
        )
        if error_code != NO_ERROR:
            self._terminated = True

    def _flush(self, sid: int, st: _StreamState) -> None:
        if self._fast:
            self._flush_fast(sid, st)
        else:
            self._flush_h2(sid, st)
        if st.end_queued and not st.queued and not st.ended_local:
            st.ended_local = True
            self._h2.end_stream(sid)
        if st.ended_local:
            self._maybe_forget(sid)

    def _flush_h2(self, sid: int, st: _StreamState) -> None:
        h = self._h2
        while st.outbound:
            n = min(h.local_flow_control_window(sid), h.max_outbound_frame_size)
            if n <= 0:
                return
            chunk = st.outbound[0]
            if len(chunk) <= n:
                del st.outbound[0]
            else:
                chunk, st.outbound[0] = chunk[:n], chunk[n:]
            st.queued -= len(chunk)
            h.send_data(sid, bytes(chunk))

    def _flush_fast(self, sid: int, st: _StreamState) -> None:
        if not st.outbound:
            return
        max_frame = self._h2.max_outbound_frame_size
        first = True
        while st.outbound:
            n = min(st.send_window, self._conn_send_window, max_frame)
            if n <= 0:
                return
            if first:
                self._drain_h2()  # HEADERS etc. queued in h2 must go out before this DATA
                first = False
            chunk = st.outbound[0]
            if len(chunk) <= n:
                del st.outbound[0]
            else:
                chunk, st.outbound[0] = chunk[:n], chunk[n:]
            size = len(chunk)
            st.queued -= size
            st.send_window -= size
            self._conn_send_window -= size
            self._out.append(_data_header(sid, size))
            self._out.append(chunk)

    def _maybe_forget(self, sid: int) -> None:
        stream = self._h2.streams.get(sid)
        if stream is None or stream.closed:
            self._forget(sid)

    def _forget(self, sid: int) -> bool:
        st = self._streams.pop(sid, None)
        if st is None:
            return False
        if st.unacked:
            # Give the connection window back for bytes the application will never consume.
            if self._fast:
                self._conn_to_credit += st.unacked
                self._send_credit(sid, None)
            else:
                self._h2.acknowledge_received_data(st.unacked, sid)
        return True


class ClientConnection(HboneConnection):
    """The dialing side: opens CONNECT streams."""

    client_side = True

    def connect(self, authority: str, headers: Iterable[tuple[str, str]] = ()) -> int:
        """Open a CONNECT stream to ``authority``; returns the stream id. Answered by a ``Response``."""
        parse_authority(authority)
        if self.closing:
            raise LocalProtocolError("connection is closing (GOAWAY) or closed")
        extra = [_outbound_header(name, value) for name, value in headers]
        sid = self._h2.get_next_available_stream_id()
        self._h2.send_headers(sid, [(":method", "CONNECT"), (":authority", authority), *extra])
        self._new_stream(sid)
        return sid

    @property
    def max_streams(self) -> int:
        return min(MAX_CONCURRENT_STREAMS, self._h2.remote_settings.max_concurrent_streams)

    @property
    def has_capacity(self) -> bool:
        return not self.closing and len(self._streams) < self.max_streams


class ServerConnection(HboneConnection):
    """The accepting side: answers CONNECT streams."""

    client_side = False

    def respond(self, stream_id: int, status: int, headers: Iterable[tuple[str, str]] = ()) -> None:
        """Answer a ``ConnectRequest``: 200 opens the tunnel; anything else closes the stream."""
        if stream_id not in self._streams:
            raise LocalProtocolError(f"stream {stream_id} is not awaiting a response")
        extra = [_outbound_header(name, value) for name, value in headers]
        ok = status == STATUS_OK
        self._h2.send_headers(stream_id, [(":status", str(status)), *extra], end_stream=not ok)
        if not ok:
            self._reset(stream_id, NO_ERROR)
