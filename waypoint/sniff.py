"""Protocol sniffing for undeclared ports: is this connection HTTP/2, HTTP/1.x, or opaque TCP?

Only for ports whose protocol nobody declared (no ``appProtocol``, no ``http-``/``grpc-`` port
name): a port declared HTTP or TCP is never sniffed — the app decides that before calling
``sniff`` and runs the declared engine directly, so a server-speaks-first protocol on a declared
TCP port pays no wait.

``sniff`` peeks at the client's first bytes for a bounded time. The HTTP/2 connection preface
(``PRI * HTTP/2.0``) means h2 with prior knowledge; a complete HTTP/1.x request line means
http1; anything else, EOF, or silence until the deadline (a protocol where the server speaks
first, e.g. MySQL, SMTP) means tcp. The bytes it read are not lost: the returned stream replays
them before reading on.
"""

from __future__ import annotations

import asyncio
import re
from typing import Literal

from waypoint.bytestream import READ_SIZE, ByteStream

Sniffed = Literal["h2", "http1", "tcp"]

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DEFAULT_TIMEOUT = 1.0  # how long a silent client may take before we call it server-speaks-first
MAX_PEEK = 8 * 1024  # a request line longer than this is not worth waiting for

_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z]+"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") [^\s]+ HTTP/1\.[0-9]\r?\n")
_PARTIAL_LINE = re.compile(rb"(?:" + _TOKEN + rb")(?: [^\s]*(?: (.*))?)?", re.S)
_VERSION = b"HTTP/1.?\r"  # "?" is any digit


def _could_become_request_line(data: bytes) -> bool:
    m = _PARTIAL_LINE.fullmatch(data)
    if m is None:
        return False
    rest = m.group(1)
    if rest is None:
        return True
    if len(rest) > len(_VERSION):
        return False
    return all(
        (want == ord("?") and chr(got).isdigit()) or got == want for got, want in zip(rest, _VERSION, strict=False)
    )


class ReplayStream:
    """A ``ByteStream`` that first returns ``prefix``, then reads from ``inner``."""

    def __init__(self, inner: ByteStream, prefix: bytes) -> None:
        self.inner = inner
        self._prefix = prefix

    async def read(self, max_bytes: int = READ_SIZE) -> bytes:
        if self._prefix:
            out, self._prefix = self._prefix[:max_bytes], self._prefix[max_bytes:]
            return out
        return await self.inner.read(max_bytes)

    def write(self, data: bytes) -> None:
        self.inner.write(data)

    async def drain(self) -> None:
        await self.inner.drain()

    def write_eof(self) -> None:
        self.inner.write_eof()

    def abort(self) -> None:
        self.inner.abort()

    def close(self) -> None:
        self.inner.close()


def classify(data: bytes, *, final: bool) -> Sniffed | None:
    """Decide from the first bytes, or None if more bytes could still change the answer.

    ``final``: no more bytes are coming (EOF, deadline, or enough read), so answer anyway.
    """
    if data.startswith(H2_PREFACE):
        return "h2"
    if _REQUEST_LINE.match(data):
        return "http1"
    if not final and len(data) < MAX_PEEK:
        if H2_PREFACE.startswith(data):
            return None
        if _could_become_request_line(data):
            return None
    return "tcp"


async def sniff(
    stream: ByteStream, *, timeout: float = DEFAULT_TIMEOUT, max_bytes: int = MAX_PEEK
) -> tuple[Sniffed, ByteStream]:
    """Peek at ``stream`` for at most ``timeout`` seconds; return the protocol and a replaying stream.

    Use only on undeclared ports (see the module docstring). The returned stream must be used
    instead of ``stream``: it replays the peeked bytes first.
    """
    buf = bytearray()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    verdict: Sniffed | None = None
    while verdict is None:
        remaining = deadline - loop.time()
        if remaining <= 0:
            verdict = classify(bytes(buf), final=True)
            break
        try:
            async with asyncio.timeout(remaining):
                chunk = await stream.read(max(1, max_bytes - len(buf)))
        except TimeoutError:
            verdict = classify(bytes(buf), final=True)
            break
        except ConnectionError:
            verdict = "tcp"  # let the TCP relay see (and report) the reset
            break
        buf += chunk
        verdict = classify(bytes(buf), final=not chunk or len(buf) >= max_bytes)
    assert verdict is not None
    return verdict, ReplayStream(stream, bytes(buf)) if buf else stream
