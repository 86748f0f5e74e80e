"""Events the sans-IO HBONE connection reports. Small, frozen, and free of h2 types."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """Server side: a well-formed CONNECT arrived; answer it with ``respond()``."""

    stream_id: int
    authority: str
    host: str
    port: int
    headers: tuple[tuple[str, str], ...]

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None


@dataclass(frozen=True, slots=True)
class RequestRejected:
    """Server side: a malformed request was answered with 400 by the protocol layer itself."""

    stream_id: int
    reason: str


@dataclass(frozen=True, slots=True)
class Response:
    """Client side: the server answered a CONNECT. 200 means bytes may flow."""

    stream_id: int
    status: int
    headers: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Data:
    """Payload for a stream. Call ``acknowledge(stream_id, len(data))`` once it has been consumed.

    On the fast path ``data`` is a zero-copy view into the received bytes (immutable, so it may be
    kept); compare it with ``==`` or convert with ``bytes()``.
    """

    stream_id: int
    data: bytes | memoryview


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer half-closed the stream (END_STREAM): shut down the write side of the TCP leg."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The stream was reset (RST_STREAM): abort the TCP leg."""

    stream_id: int
    error_code: int
    remote: bool


@dataclass(frozen=True, slots=True)
class WindowOpened:
    """Flow-control window grew and queued data went out; writers blocked on it may continue."""

    stream_id: int  # 0: the whole connection


@dataclass(frozen=True, slots=True)
class PingAcked:
    payload: bytes


@dataclass(frozen=True, slots=True)
class ConnectionTerminated:
    """GOAWAY received: no new streams; streams above ``last_stream_id`` were not processed."""

    error_code: int
    last_stream_id: int
    reason: str


Event = (
    ConnectRequest
    | RequestRejected
    | Response
    | Data
    | StreamEnded
    | StreamReset
    | WindowOpened
    | PingAcked
    | ConnectionTerminated
)
