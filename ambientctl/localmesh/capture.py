"""tcpdump on the inter-node wire, and a small pcap reader that tells TLS from plaintext."""

from __future__ import annotations

import select
import signal
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

TLS_CONTENT_TYPES = {20, 21, 22, 23}


class CaptureError(RuntimeError):
    pass


class Capture:
    """``tcpdump -i <iface> -w <file>`` inside a netns; ``start`` returns once it listens."""

    def __init__(self, netns: str, iface: str, path: Path) -> None:
        self.netns, self.iface, self.path = netns, iface, path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> int:
        argv = ["ip", "netns", "exec", self.netns, "tcpdump", "-i", self.iface, "-n", "-U", "--immediate-mode", "-s", "0",
                "-w", str(self.path), "tcp"]  # fmt: skip
        self.proc = subprocess.Popen(argv, stderr=subprocess.PIPE, start_new_session=True)
        assert self.proc.stderr is not None
        deadline = time.monotonic() + timeout
        seen = b""
        while b"listening on" not in seen:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                raise CaptureError(f"tcpdump did not start: {seen.decode(errors='replace').strip()}")
            ready, _, _ = select.select([self.proc.stderr], [], [], left)
            if ready:
                chunk = self.proc.stderr.read1(4096)  # type: ignore[attr-defined]
                if not chunk:
                    continue
                seen += chunk
        return self.proc.pid

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@dataclass
class Flow:
    """One TCP connection on the wire: the client's bytes and the server's, in order."""

    client: tuple[str, int]
    server: tuple[str, int]
    to_server: bytearray = field(default_factory=bytearray)
    to_client: bytearray = field(default_factory=bytearray)
    packets: int = 0

    @property
    def payload(self) -> int:
        return len(self.to_server) + len(self.to_client)

    def contains(self, marker: bytes) -> bool:
        return marker in self.to_server or marker in self.to_client

    def tls_records(self) -> tuple[int, bool]:
        """(records, every byte both ways is well-formed TLS records)."""
        total, ok = 0, True
        for data in (self.to_server, self.to_client):
            n, good = _tls_walk(bytes(data))
            total += n
            ok = ok and good
        return total, ok


def _tls_walk(data: bytes) -> tuple[int, bool]:
    i = n = 0
    while i + 5 <= len(data):
        ctype, major, _minor, length = struct.unpack_from("!BBBH", data, i)
        if ctype not in TLS_CONTENT_TYPES or major != 3:
            return n, False
        i += 5 + length
        n += 1
    return n, i == len(data) or i > len(data)  # a record cut by the end of the capture is fine


def _packets(path: Path) -> Iterator[bytes]:
    data = path.read_bytes()
    if len(data) < 24:
        return
    magic = data[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        endian = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        endian = ">"
    else:
        raise CaptureError(f"{path}: not a pcap file")
    linktype = struct.unpack_from(endian + "I", data, 20)[0]
    if linktype != 1:
        raise CaptureError(f"{path}: link type {linktype}, expected Ethernet")
    i = 24
    while i + 16 <= len(data):
        incl = struct.unpack_from(endian + "I", data, i + 8)[0]
        yield data[i + 16 : i + 16 + incl]
        i += 16 + incl


def read_flows(path: Path) -> list[Flow]:
    """TCP flows over IPv4 in capture order; the client is the side that sent the SYN."""
    flows: dict[tuple[tuple[str, int], tuple[str, int]], Flow] = {}
    order: list[Flow] = []
    for frame in _packets(path):
        if len(frame) < 14 or frame[12:14] != b"\x08\x00":
            continue
        ip = frame[14:]
        ihl = (ip[0] & 0x0F) * 4
        if ip[9] != 6:
            continue
        total = struct.unpack_from("!H", ip, 2)[0]
        src = ".".join(str(b) for b in ip[12:16])
        dst = ".".join(str(b) for b in ip[16:20])
        tcp = ip[ihl:total]
        sport, dport = struct.unpack_from("!HH", tcp, 0)
        off = (tcp[12] >> 4) * 4
        flags = tcp[13]
        payload = tcp[off:]
        a, b = (src, sport), (dst, dport)
        flow = flows.get((a, b)) or flows.get((b, a))
        if flow is None:
            syn_only = flags & 0x02 and not flags & 0x10
            client, server = (a, b) if syn_only or not flags & 0x02 else (b, a)
            flow = Flow(client, server)
            flows[(client, server)] = flow
            order.append(flow)
        flow.packets += 1
        if payload:
            (flow.to_server if a == flow.client else flow.to_client).extend(payload)
    return order
