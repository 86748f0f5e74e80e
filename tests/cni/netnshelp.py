"""Throwaway network namespaces for the cni tests: a "pod" netns with a veth to an "outside" one.

Both ends of the veth are created inside the namespaces (nothing in the root netns), names carry
the pid, and :meth:`NetnsPair.destroy` deletes whatever exists even after a half-failed setup;
deleting a netns takes its links, nft tables and ip rules with it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

from mesh.netns import NetnsSocketFactory

POD_IP = "10.77.0.2"
PEER_IP = "10.77.0.1"


def have_root_tools() -> bool:
    return os.geteuid() == 0 and all(shutil.which(t) for t in ("ip", "nft", "nsenter", "unshare"))


def run(*args: str) -> str:
    p = subprocess.run(args, capture_output=True, text=True, timeout=30)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: exit {p.returncode}: {p.stderr.strip()}")
    return p.stdout


def nft_json(netns_path: str) -> str:
    return run("nsenter", f"--net={netns_path}", "nft", "-j", "list", "table", "inet", "istio-ambient")


@dataclass
class NetnsPair:
    pod: str
    peer: str

    @property
    def pod_path(self) -> str:
        return f"/run/netns/{self.pod}"

    @property
    def peer_path(self) -> str:
        return f"/run/netns/{self.peer}"

    def create(self) -> None:
        run("ip", "netns", "add", self.pod)
        run("ip", "netns", "add", self.peer)
        run(
            "ip",
            "-n",
            self.pod,
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            self.peer,
        )
        run("ip", "-n", self.pod, "addr", "add", f"{POD_IP}/24", "dev", "eth0")
        run("ip", "-n", self.peer, "addr", "add", f"{PEER_IP}/24", "dev", "eth0")
        for ns in (self.pod, self.peer):
            run("ip", "-n", ns, "link", "set", "lo", "up")
            run("ip", "-n", ns, "link", "set", "eth0", "up")

    def destroy(self) -> None:
        for ns in (self.pod, self.peer):
            with contextlib.suppress(RuntimeError):
                run("ip", "netns", "del", ns)

    @contextlib.contextmanager
    def sockets(self, which: str) -> Iterator[NetnsSocketFactory]:
        """A factory whose sockets live in the ``pod`` or ``peer`` netns."""
        fd = os.open(self.pod_path if which == "pod" else self.peer_path, os.O_RDONLY)
        try:
            factory = NetnsSocketFactory(fd, which)
        finally:
            os.close(fd)
        try:
            yield factory
        finally:
            factory.close()


@contextlib.contextmanager
def netns_pair(tag: str) -> Iterator[NetnsPair]:
    pair = NetnsPair(pod=f"cnit{os.getpid()}{tag}p", peer=f"cnit{os.getpid()}{tag}o")
    try:
        pair.create()
        yield pair
    finally:
        pair.destroy()


def listener(addr: str, port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port))
    s.listen(8)
    return s


def client(mark: int | None = None) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if mark is not None:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
    s.settimeout(3.0)
    return s
