"""Sans-IO HBONE: HTTP/2 CONNECT tunnels over an already-established TLS byte stream.

Bytes go in through :meth:`HboneConnection.receive_data`, events come out; bytes to send are taken
with :meth:`HboneConnection.data_to_send`. No sockets, no clocks: the asyncio adapter in
``mesh.hbone.aio`` moves the bytes, and tests drive this class directly with transcripts.

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

import ipaddress
import re
from collections.abc import Iterable

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
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


class _StreamState:
    __slots__ = ("end_queued", "ended_local", "outbound", "unacked")

    def __init__(self) -> None:
        self.outbound = bytearray()
        self.end_queued = False  # END_STREAM once the queue drains
        self.ended_local = False
        self.unacked = 0  # received bytes the application has not acknowledged yet


class HboneConnection:
    """One HTTP/2 connection carrying HBONE CONNECT streams; see the module docstring."""

    client_side: bool

    def __init__(self) -> None:
        config = h2.config.H2Configuration(
            client_side=self.client_side,
            header_encoding="utf-8",
            validate_inbound_headers=True,
            normalize_inbound_headers=True,
        )
        self._h2 = h2.connection.H2Connection(config)
        self._streams: dict[int, _StreamState] = {}
        self._events: list[Event] = []
        self._terminated = False
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

    def pending(self, stream_id: int) -> int:
        """Bytes queued on a stream that flow control has not let out yet."""
        st = self._streams.get(stream_id)
        return len(st.outbound) if st else 0

    def send_window(self, stream_id: int) -> int:
        try:
            return self._h2.local_flow_control_window(stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.NoSuchStreamError, KeyError):
            return 0

    # -- input ------------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes from the peer; returns the events they produced."""
        if self._terminated:
            return []
        try:
            h2_events = self._h2.receive_data(data)
        except (h2.exceptions.ProtocolError, HyperframeError) as e:
            self._terminated = True
            raise ProtocolError(f"{type(e).__name__}: {e}") from None
        except (ValueError, KeyError, IndexError, UnicodeError) as e:  # malformed header blocks
            self._terminated = True
            raise ProtocolError(f"malformed frame: {type(e).__name__}: {e}") from None
        out = self._events
        self._events = []
        for ev in h2_events:
            self._handle(ev, out)
        return out

    def _handle(self, ev: h2.events.Event, out: list[Event]) -> None:
        if isinstance(ev, h2.events.DataReceived):
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
            if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in ev.changed_settings:
                self._flush_opened(0, out)
        elif isinstance(ev, h2.events.PingAckReceived):
            out.append(PingAcked(ev.ping_data or b""))
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self._terminated = True
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
        if sid in self._streams:
            out.append(StreamEnded(sid))
            self._maybe_forget(sid)

    def _on_request(self, ev: h2.events.RequestReceived, out: list[Event]) -> None:
        sid = ev.stream_id or 0
        headers = tuple((str(k), str(v)) for k, v in (ev.headers or []))
        h = dict(headers)
        reason = None
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
        self._streams[sid] = _StreamState()
        out.append(ConnectRequest(sid, h[":authority"], host, port, headers))

    def _reset_rejected(self, sid: int) -> None:
        # The client may still be sending on a rejected stream; reset it so it stops.
        try:
            self._h2.reset_stream(sid, NO_ERROR)
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
            if st is not None and (st.outbound or st.end_queued):
                self._flush(s, st)
        out.append(WindowOpened(sid))

    # -- output -----------------------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        return self._h2.data_to_send()

    def send_data(
        self, stream_id: int, data: bytes | bytearray | memoryview, end_stream: bool = False
    ) -> None:
        """Queue payload on a stream; it leaves as flow control allows (see ``pending``)."""
        st = self._streams.get(stream_id)
        if st is None or st.end_queued:
            raise LocalProtocolError(f"stream {stream_id} is not open for sending")
        st.outbound += data
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

    def acknowledge(self, stream_id: int, n: int) -> None:
        """The application consumed ``n`` bytes of a stream: give the peer window back."""
        st = self._streams.get(stream_id)
        if st is not None:
            n = min(n, st.unacked)
            st.unacked -= n
        if n > 0:
            self._h2.acknowledge_received_data(n, stream_id)

    def ping(self, payload: bytes = b"\0" * 8) -> None:
        self._h2.ping(payload)

    def close(self, error_code: int = NO_ERROR) -> None:
        """Send GOAWAY; existing streams may finish (the adapter decides when to hang up)."""
        if not self._terminated:
            self._terminated = True
            self._h2.close_connection(error_code)

    def _flush(self, sid: int, st: _StreamState) -> None:
        h = self._h2
        while st.outbound:
            window = h.local_flow_control_window(sid)
            n = min(window, h.max_outbound_frame_size, len(st.outbound))
            if n <= 0:
                return
            chunk = bytes(st.outbound[:n])
            del st.outbound[:n]
            last = st.end_queued and not st.outbound
            h.send_data(sid, chunk, end_stream=last)
            st.ended_local = last
        if st.end_queued and not st.ended_local:
            st.ended_local = True
            h.end_stream(sid)
        if st.ended_local:
            self._maybe_forget(sid)

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
            self._h2.acknowledge_received_data(st.unacked, sid)
        return True


class ClientConnection(HboneConnection):
    """The dialing side: opens CONNECT streams."""

    client_side = True

    def connect(self, authority: str, headers: Iterable[tuple[str, str]] = ()) -> int:
        """Open a CONNECT stream to ``authority``; returns the stream id. Answered by a ``Response``."""
        parse_authority(authority)
        if self._terminated:
            raise LocalProtocolError("connection is closed")
        sid = self._h2.get_next_available_stream_id()
        self._h2.send_headers(sid, [(":method", "CONNECT"), (":authority", authority), *headers])
        self._streams[sid] = _StreamState()
        return sid

    @property
    def max_streams(self) -> int:
        return min(MAX_CONCURRENT_STREAMS, self._h2.remote_settings.max_concurrent_streams)

    @property
    def has_capacity(self) -> bool:
        return not self._terminated and len(self._streams) < self.max_streams


class ServerConnection(HboneConnection):
    """The accepting side: answers CONNECT streams."""

    client_side = False

    def respond(self, stream_id: int, status: int, headers: Iterable[tuple[str, str]] = ()) -> None:
        """Answer a ``ConnectRequest``: 200 opens the tunnel; anything else closes the stream."""
        if stream_id not in self._streams:
            raise LocalProtocolError(f"stream {stream_id} is not awaiting a response")
        ok = status == STATUS_OK
        self._h2.send_headers(stream_id, [(":status", str(status)), *headers], end_stream=not ok)
        if not ok:
            self._reset(stream_id, NO_ERROR)
