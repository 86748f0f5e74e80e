"""A node's gRPC connections to its control plane (discovery and CA), on ``grpclib``.

Why grpclib: a node proxy makes two kinds of call, the long-lived discovery stream and unary
``CreateCertificate``. grpcio costs each ztunnel and waypoint 9 MiB of RSS and threads of its
own (``benchmarks/ztunnel_memory.py``); grpclib is pure asyncio on the ``h2`` we already ship
(1 MiB), and calls run on the proxy's own event loop. The control plane's servers stay on
grpcio; both speak plain gRPC over HTTP/2, so either side can be swapped for Istio's.

Reconnecting. grpcio's backoff (1 s, x1.6, up to 120 s, shared by channels to the same address)
once left a node waiting about 20 s after its control plane came back. Here nothing is
inherited: :func:`connect` tries at most every :data:`RECONNECT_INTERVAL` (1 s) while the
control plane is unreachable (refused, reset, TLS failure, timeout: one TCP connect per second,
refused at once on a local control plane), so a control plane that listens again is used
within a second. Each connect attempt is given :data:`CONNECT_TIMEOUT` (a remote control plane
may take a while to answer a SYN). See ../shared/design/PROTOCOLS.md.

Cancelling a call. grpclib wakes a call whose stream or connection failed by cancelling the
task waiting on it and raising the failure in place of the ``CancelledError``
(``grpclib.utils.Wrapper``). A real cancel landing in the same pass of the loop (the control
plane and ztunnel told to stop together: the connection drops as ztunnel cancels its calls) is
then lost inside that error, and a retry loop catching it runs on: ztunnel once kept
reconnecting after "ztunnel stopped" until it was killed. :func:`call_in_own_task` and
:func:`cancelled_since` keep such a cancel.

Addresses are gRPC targets as users write them: ``host:port``, ``[v6]:port``, ``dns:///host:port``
or ``unix:/path`` (``unix:///path``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar, cast

import structlog
from grpclib.client import Channel, Handler
from grpclib.config import Configuration
from grpclib.protocol import H2Protocol

RECONNECT_INTERVAL = 1.0  # seconds between connect attempts while the control plane is unreachable
CONNECT_TIMEOUT = 10.0  # seconds one attempt (TCP and TLS) may take
CLOSE_TIMEOUT = 1.0  # seconds an aborted connection may take to report its end
QUIET_CONNECT = 2.0  # seconds of failed attempts before "waiting for the control plane" is logged

_T = TypeVar("_T")


def cancels_requested() -> int:
    """How many cancels of the current task are pending (``Task.cancelling``); 0 outside a task."""
    task = asyncio.current_task()
    return task.cancelling() if task is not None else 0


def cancelled_since(before: int) -> bool:
    """Whether the current task was asked to stop since :func:`cancels_requested` gave ``before``.

    Only sound where grpclib cannot have cancelled this task itself: around a call made in
    another task (the discovery session, :func:`call_in_own_task`).
    """
    return cancels_requested() > before


async def call_in_own_task(call: Awaitable[_T]) -> _T:
    """Await a grpclib call in a task of its own, so that a cancel of the caller is never lost.

    grpclib's own cancels (see the module docstring) reach the inner task only; a cancel of the
    caller reaches both and is counted on the caller. If the caller was cancelled meanwhile,
    ``CancelledError`` is raised, whatever the call ended with.
    """
    before = cancels_requested()
    inner = asyncio.ensure_future(call)
    try:
        result = await inner
    except Exception:
        if cancelled_since(before):
            raise asyncio.CancelledError from None
        raise
    if cancelled_since(before):
        raise asyncio.CancelledError
    return result


class _Protocol(H2Protocol):
    """grpclib's protocol, saying when its connection has ended (:meth:`ControlPlaneChannel.aclose`)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.ended = asyncio.Event()
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # On GOAWAY (a server stopping) or a protocol error grpclib closes the transport, which
        # starts a TLS shutdown waiting for the server's close_notify. grpcio never sends it, so
        # the connection would stay open, and a stopping control plane waits its whole grace
        # period for it (5 s with no call in flight). Nothing more is to be sent or read: abort.
        if self.transport is not None and self.transport.is_closing():
            cast(asyncio.Transport, self.transport).abort()

    def connection_lost(self, exc: BaseException | None) -> None:
        try:
            super().connection_lost(exc)
        finally:
            self.ended.set()


class ControlPlaneChannel(Channel):
    """A grpclib channel that :meth:`aclose` closes for good before it returns. (grpclib's
    :meth:`Channel.close` starts a TLS shutdown that waits for the server's close_notify, which
    grpcio servers do not send: the connection would outlive the channel, and the loop.)"""

    def _protocol_factory(self) -> H2Protocol:
        return _Protocol(Handler(), self._config, self._h2_config)

    async def aclose(self) -> None:
        protocol = self._protocol
        self.close()  # ends the calls still open
        if isinstance(protocol, _Protocol) and protocol.transport is not None:
            # uvloop's transports do not subclass asyncio.Transport, but have abort().
            cast(asyncio.Transport, protocol.transport).abort()  # nothing is left to send
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await protocol.ended.wait()


ChannelFactory = Callable[[], ControlPlaneChannel]


class TargetError(ValueError):
    """A control-plane address that is not a gRPC target this client can dial."""


@dataclass(frozen=True, slots=True)
class Target:
    host: str | None = None
    port: int | None = None
    path: str | None = None  # a unix socket

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        return f"[{self.host}]:{self.port}" if self.host and ":" in self.host else f"{self.host}:{self.port}"


def parse_target(address: str) -> Target:
    """``host:port``, ``[v6]:port``, ``dns:///host:port``, ``unix:/path`` -> :class:`Target`."""
    if address.startswith("unix:"):
        path = address[len("unix:") :]
        if path.startswith("//"):
            path = path[2:]
        if not path.startswith("/"):
            raise TargetError(f"control-plane address {address!r}: a unix socket needs an absolute path")
        return Target(path=path)
    rest = address[len("dns:///") :] if address.startswith("dns:///") else address
    if rest.startswith("["):
        host, sep, port = rest[1:].partition("]:")
    else:
        host, sep, port = rest.rpartition(":")
    if not sep or not host or (":" in host and not rest.startswith("[")):
        raise TargetError(f"control-plane address {address!r} is not host:port")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise TargetError(f"control-plane address {address!r}: bad port {port!r}")
    return Target(host=host, port=int(port))


def tls_context(root_cert_pem: bytes | str) -> ssl.SSLContext:
    """Verifies the control plane against the mesh root only; TLS 1.2+, HTTP/2."""
    roots = root_cert_pem.decode() if isinstance(root_cert_pem, bytes) else root_cert_pem
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=roots)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["h2"])
    return ctx


def make_channel(
    address: str, root_cert_pem: bytes | str | None = None, server_name: str | None = None
) -> ControlPlaneChannel:
    """A channel to ``address``: TLS verified against ``root_cert_pem`` with the certificate's
    name checked as ``server_name`` (default: the host), or plaintext without roots (tests and
    loopback only). Call it inside the running event loop, which the channel binds to; it
    connects on first use."""
    target = parse_target(address)
    ctx = tls_context(root_cert_pem) if root_cert_pem is not None else None
    config = Configuration(ssl_target_name_override=server_name or target.host) if ctx else None
    if target.path is not None:
        return ControlPlaneChannel(path=target.path, ssl=ctx, config=config)
    return ControlPlaneChannel(target.host, target.port, ssl=ctx, config=config)


def describe(error: BaseException) -> str:
    """Why a connection failed, in a few words (for logs and CaError)."""
    if isinstance(error, TimeoutError):
        return f"no answer within {CONNECT_TIMEOUT:g} s"
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"TLS: {error.verify_message}"
    if isinstance(error, ssl.SSLError):
        return f"TLS: {error.reason or error}"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror.lower()
    return str(error) or type(error).__name__


async def connect_once(channel: Channel) -> None:
    """One connect attempt (no-op when connected); raises ``OSError`` or ``TimeoutError``."""
    async with asyncio.timeout(CONNECT_TIMEOUT):
        await channel.__connect__()


async def connect(channel: Channel, log: structlog.typing.FilteringBoundLogger) -> None:
    """Connect, trying at most every :data:`RECONNECT_INTERVAL` until it succeeds (or the task is
    cancelled); after :data:`QUIET_CONNECT`, says that it is waiting and why, once per reason."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    said = ""
    while True:
        attempt = loop.time()
        try:
            await connect_once(channel)
            return
        except (OSError, TimeoutError) as e:
            reason = describe(e)
            if reason != said and loop.time() - started >= QUIET_CONNECT:
                log.info("waiting for the control plane", reason=reason)
                said = reason
        await asyncio.sleep(max(0.0, RECONNECT_INTERVAL - (loop.time() - attempt)))
