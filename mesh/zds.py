"""ZDS (cni agent <-> ztunnel) messages: a small codec over the protobufs, plus SCM_RIGHTS I/O.

The codec is sans-IO: bytes (and the fds that came with them) in, frozen events out; malformed
input raises :class:`ZdsError` with the reason, so the caller can answer with an error ack
instead of dying. The async helpers move one SOCK_SEQPACKET datagram (with its fds) at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from mesh.proto import zds_pb2

DEFAULT_SOCKET_PATH = "/var/run/ztunnel/ztunnel.sock"
MAX_MESSAGE = 64 * 1024
MAX_FDS = 4


class ZdsError(Exception):
    """A ZDS message could not be understood; the message says why."""


@dataclass(frozen=True, slots=True)
class AddWorkload:
    uid: str
    name: str
    namespace: str
    service_account: str
    netns_fd: int  # owned by whoever received it


@dataclass(frozen=True, slots=True)
class DelWorkload:
    uid: str


@dataclass(frozen=True, slots=True)
class KeepWorkload:
    uid: str


@dataclass(frozen=True, slots=True)
class SnapshotSent:
    pass


ZdsRequest = AddWorkload | DelWorkload | KeepWorkload | SnapshotSent


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def encode_hello() -> bytes:
    return bytes(zds_pb2.ZdsHello(version=zds_pb2.V1).SerializeToString())


def decode_hello(data: bytes) -> int:
    try:
        msg = zds_pb2.ZdsHello.FromString(data)
    except DecodeError as e:
        raise ZdsError(f"undecodable ZdsHello: {e}") from None
    if msg.version != zds_pb2.V1:
        raise ZdsError(f"unsupported ZDS version {msg.version}")
    return int(msg.version)


def decode_request(data: bytes, fds: list[int]) -> ZdsRequest:
    """Decode one WorkloadRequest. On error every fd in ``fds`` is closed before raising."""
    try:
        msg = zds_pb2.WorkloadRequest.FromString(data)
    except DecodeError as e:
        _close_all(fds)
        raise ZdsError(f"undecodable WorkloadRequest: {e}") from None
    kind = msg.WhichOneof("payload")
    if kind == "add":
        if len(fds) != 1:
            _close_all(fds)
            raise ZdsError(f"add: expected exactly one netns fd, got {len(fds)}")
        add = msg.add
        if not add.uid:
            _close_all(fds)
            raise ZdsError("add: uid is empty")
        info = add.workload_info
        return AddWorkload(add.uid, info.name, info.namespace, info.service_account or "default", fds[0])
    _close_all(fds)
    if kind == "del":
        uid = getattr(msg, "del").uid
        if not uid:
            raise ZdsError("del: uid is empty")
        return DelWorkload(uid)
    if kind == "keep":
        if not msg.keep.uid:
            raise ZdsError("keep: uid is empty")
        return KeepWorkload(msg.keep.uid)
    if kind == "snapshot_sent":
        return SnapshotSent()
    raise ZdsError("WorkloadRequest carries no known payload")


def encode_request(req: ZdsRequest) -> bytes:
    msg = zds_pb2.WorkloadRequest()
    if isinstance(req, AddWorkload):
        msg.add.uid = req.uid
        msg.add.workload_info.name = req.name
        msg.add.workload_info.namespace = req.namespace
        msg.add.workload_info.service_account = req.service_account
    elif isinstance(req, DelWorkload):
        getattr(msg, "del").uid = req.uid
    elif isinstance(req, KeepWorkload):
        msg.keep.uid = req.uid
    else:
        msg.snapshot_sent.SetInParent()
    return bytes(msg.SerializeToString())


def encode_ack(error: str = "") -> bytes:
    return bytes(zds_pb2.WorkloadResponse(ack=zds_pb2.Ack(error=error)).SerializeToString())


def decode_ack(data: bytes) -> str:
    """The ack's error text ("" = success)."""
    try:
        msg = zds_pb2.WorkloadResponse.FromString(data)
    except DecodeError as e:
        raise ZdsError(f"undecodable WorkloadResponse: {e}") from None
    if msg.WhichOneof("payload") != "ack":
        raise ZdsError("WorkloadResponse carries no ack")
    return str(msg.ack.error)


# -- SOCK_SEQPACKET I/O ---------------------------------------------------------------------------


async def _wait(sock: socket.socket, writable: bool) -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    if writable:
        loop.add_writer(fd, ready)
    else:
        loop.add_reader(fd, ready)
    try:
        await fut
    finally:
        if writable:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


async def recv_message(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One datagram and the fds that came with it; ``b""`` with no fds means the peer closed."""
    while True:
        try:
            data, fds, flags, _ = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS)
        except BlockingIOError:
            await _wait(sock, writable=False)
            continue
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            _close_all(list(fds))
            raise ZdsError("message or its ancillary data was truncated")
        return data, list(fds)


async def send_message(sock: socket.socket, data: bytes, fds: list[int] | None = None) -> None:
    while True:
        try:
            if fds:
                socket.send_fds(sock, [data], fds)
            else:
                sock.send(data)
            return
        except BlockingIOError:
            await _wait(sock, writable=True)
