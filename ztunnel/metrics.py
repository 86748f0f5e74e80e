"""Per-connection telemetry: Istio's ``istio_tcp_*`` metrics and one access-log line per connection.

Each ztunnel has its own registry (tests run two in one process). A :class:`ConnectionRecord` is
filled in by the proxy as the connection goes inside ``with metrics.connection(rec):``, which
counts it opened on entry and closed on exit — whatever ends it: a result, an error, or a
cancellation at drain (recorded as such) — so opened and closed always match.

An open connection also gets a line (``connection open``, result ``open``, bytes so far) every
``access_log_interval`` while it lives, and one (``connection open at drain``) when a drain
starts, so a long-lived connection, or one whose ztunnel is killed at the end of its grace
period, is not missing from the log (:meth:`Metrics.log_open`).

While the block runs the record is also in :meth:`Metrics.open_connections`: what ztunnel's
admin ``/config_dump`` lists as live connections (``ambientctl ztunnel-config connections``),
with the bytes moved so far when the proxy gave the record a ``progress`` source.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from mesh.identity import Identity
from mesh.xds.state import Service, Workload

access_log = structlog.get_logger("ztunnel.access")

LABELS = (
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_service",
    "connection_security_policy",
    "response_flags",
)


@dataclass
class ConnectionRecord:
    """What we know about one proxied connection; mutable while the connection lives."""

    reporter: str  # "source" (outbound) or "destination" (inbound)
    direction: str  # outbound / inbound / inbound_passthrough / passthrough
    src_addr: str
    dst_addr: str
    src_workload: Workload | None = None
    src_identity: Identity | None = None
    dst_workload: Workload | None = None
    dst_identity: Identity | None = None
    service: Service | None = None
    mtls: bool = False
    bytes_sent: int = 0  # towards the destination
    bytes_received: int = 0  # back from the destination
    result: str = "ok"
    reason: str = ""
    response_flags: str = "-"
    start: float = field(default_factory=time.monotonic)
    started_at: float = field(default_factory=time.time)  # wall clock, for people reading a dump
    actual_dst: str = ""  # where ztunnel connected (an endpoint's :15008, a waypoint); "" = dst_addr
    # Bytes (towards, back from the destination) moved so far, while the relay runs; the proxy
    # sets it once the relay starts and the final counts land in bytes_sent/bytes_received.
    progress: Callable[[], tuple[int, int]] | None = None

    def bytes_so_far(self) -> tuple[int, int]:
        if self.progress is not None:
            try:
                sent, received = self.progress()
            except Exception:  # a relay torn down under us: the final counts are next
                return self.bytes_sent, self.bytes_received
            return max(sent, self.bytes_sent), max(received, self.bytes_received)
        return self.bytes_sent, self.bytes_received

    def live_json(self, now: float | None = None) -> dict[str, Any]:
        """This open connection as the admin ``/config_dump`` lists it (``connections``)."""
        sw, dw = self.src_workload, self.dst_workload
        inbound = self.reporter == "destination"
        pod = dw if inbound else sw  # the local pod the connection belongs to
        sent, received = self.bytes_so_far()
        now = time.time() if now is None else now
        return {
            "direction": self.direction,
            "pod": None if pod is None else {"uid": pod.uid, "namespace": pod.namespace, "name": pod.name},
            "src": self.src_addr,
            "original_dst": self.dst_addr,
            "actual_dst": self.actual_dst or self.dst_addr,
            "protocol": "HBONE" if self.mtls else "TCP",
            "src_workload": f"{sw.namespace}/{sw.name}" if sw else None,
            "src_identity": self.src_identity.uri if self.src_identity else None,
            "dst_workload": f"{dw.namespace}/{dw.name}" if dw else None,
            "dst_identity": self.dst_identity.uri if self.dst_identity else None,
            "service": self.service.hostname if self.service else None,
            "bytes_sent": sent,
            "bytes_received": received,
            "started": dt.datetime.fromtimestamp(self.started_at, dt.UTC).isoformat(timespec="milliseconds"),
            "duration_s": round(max(0.0, now - self.started_at), 3),
            "result": self.result,
        }

    def labels(self) -> dict[str, str]:
        sw, dw = self.src_workload, self.dst_workload
        return {
            "reporter": self.reporter,
            "source_workload": sw.name if sw else "unknown",
            "source_workload_namespace": sw.namespace if sw else "unknown",
            "source_principal": self.src_identity.uri if self.src_identity else "unknown",
            "destination_workload": dw.name if dw else "unknown",
            "destination_workload_namespace": dw.namespace if dw else "unknown",
            "destination_principal": self.dst_identity.uri if self.dst_identity else "unknown",
            "destination_service": self.service.hostname if self.service else "unknown",
            "connection_security_policy": "mutual_tls" if self.mtls else "none",
            "response_flags": self.response_flags,
        }

    def fail(self, reason: str, flags: str = "UF") -> None:
        self.result = "error"
        self.reason = reason
        self.response_flags = flags


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, *, process: bool = False) -> None:
        self.registry = registry or CollectorRegistry()
        if process:
            ProcessCollector(registry=self.registry)
        self.opened = Counter(
            "istio_tcp_connections_opened",
            "TCP connections opened",
            LABELS,
            registry=self.registry,
        )
        self.closed_total = Counter(
            "istio_tcp_connections_closed",
            "TCP connections closed",
            LABELS,
            registry=self.registry,
        )
        self.sent = Counter(
            "istio_tcp_sent_bytes",
            "bytes sent towards the destination",
            LABELS,
            registry=self.registry,
        )
        self.received = Counter(
            "istio_tcp_received_bytes",
            "bytes received from the destination",
            LABELS,
            registry=self.registry,
        )
        self.failed = Counter(
            "istio_tcp_connections_failed",
            "TCP connections that ended in an error (refused, unreachable, reset; response_flags says which)",
            LABELS,
            registry=self.registry,
        )

        # Faults and load an operator watches (no Istio equivalent: our own names).
        self.tls_handshake_failures = Counter(
            "ambient_tls_handshake_failures",
            "HBONE TLS handshakes refused, by reason (mesh.tls.FAILURE_KINDS)",
            ("reason",),
            registry=self.registry,
        )
        self.hbone_connections = Gauge(
            "ambient_hbone_connections",
            "open HBONE connections (TLS done, peer verified)",
            ("direction",),
            registry=self.registry,
        )
        self.hbone_streams = Gauge(
            "ambient_hbone_streams",
            "open HBONE CONNECT streams",
            ("direction",),
            registry=self.registry,
        )

        self.xds_connected = Gauge(
            "ambient_xds_connected",
            "1 while the discovery stream to the control plane is up, else 0",
            registry=self.registry,
        )
        self.xds_last_update = Gauge(
            "ambient_xds_last_update_timestamp_seconds",
            "when the last discovery response was applied (Unix time; 0: never)",
            registry=self.registry,
        )

        self.connections_closed = 0  # lifetime count, for tests and drains to wait on
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._open: dict[int, ConnectionRecord] = {}  # id(record) -> record, in opening order

    def watch_xds(self, connected: Callable[[], bool], last_update: Callable[[], float]) -> None:
        """Read the discovery client's state at each scrape."""
        self.xds_connected.set_function(lambda: 1.0 if connected() else 0.0)
        self.xds_last_update.set_function(last_update)

    def watch_certificates(self, status: Callable[[], list[tuple[Identity, float | None, int]]]) -> None:
        """Per identity, at each scrape: seconds to expiry and failed fetches
        (:meth:`mesh.certs.CertManager.status`); an identity no pod holds any more disappears."""
        self.registry.register(_CertificateCollector(status))

    def open_connections(self) -> list[ConnectionRecord]:
        """The connections inside :meth:`connection` right now, oldest first."""
        return list(self._open.values())

    def hbone_stats(self, direction: str) -> HboneStats:
        """What an HBONE server (``mesh.hbone.server.ServerStats``) or client reports, for ``direction``."""
        return HboneStats(self, direction)

    async def wait_closed(self, count: int) -> None:
        """Wait until ``count`` connections have closed in total."""
        if self.connections_closed >= count:
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((count, fut))
        try:
            await fut
        finally:
            self._waiters = [(n, f) for n, f in self._waiters if f is not fut]

    @contextmanager
    def connection(self, rec: ConnectionRecord) -> Iterator[ConnectionRecord]:
        """Count ``rec`` opened now and closed (with its access-log line) when the block ends."""
        self.opened.labels(**rec.labels()).inc()
        self._open[id(rec)] = rec
        try:
            yield rec
        except asyncio.CancelledError:
            if rec.result == "ok":
                rec.result, rec.reason, rec.response_flags = "drained", "cancelled while draining", "DC"
            raise
        except BaseException as e:
            if rec.result == "ok":
                rec.fail(f"internal error: {type(e).__name__}: {e}", "UF")
            raise
        finally:
            self._closed(rec)

    def _closed(self, rec: ConnectionRecord) -> None:
        self._open.pop(id(rec), None)
        rec.progress = None
        labels = rec.labels()
        self.connections_closed += 1
        for n, fut in self._waiters:
            if self.connections_closed >= n and not fut.done():
                fut.set_result(None)
        self.closed_total.labels(**labels).inc()
        if rec.result == "error":
            self.failed.labels(**labels).inc()
        self.sent.labels(**labels).inc(rec.bytes_sent)
        self.received.labels(**labels).inc(rec.bytes_received)
        _access_line("connection complete", rec, labels, (rec.bytes_sent, rec.bytes_received), time.monotonic())

    def log_open(self, event: str, *, older_than: float = 0.0) -> int:
        """An access-log line ``event`` for each connection open now for at least ``older_than``
        seconds, with its bytes so far (ztunnel's periodic line for long-lived connections, and
        the line each open connection gets when a drain starts, in case the process does not
        live to log its end). Returns how many lines were written."""
        now = time.monotonic()
        written = 0
        for rec in list(self._open.values()):
            if now - rec.start >= older_than:
                _access_line(event, rec, rec.labels(), rec.bytes_so_far(), now, "open" if rec.result == "ok" else None)
                written += 1
        return written


def _access_line(
    event: str,
    rec: ConnectionRecord,
    labels: dict[str, str],
    moved: tuple[int, int],
    now: float,
    result: str | None = None,
) -> None:
    access_log.info(
        event,
        direction=rec.direction,
        src_addr=rec.src_addr,
        dst_addr=rec.dst_addr,
        src_workload=labels["source_workload"],
        src_namespace=labels["source_workload_namespace"],
        src_identity=labels["source_principal"],
        dst_workload=labels["destination_workload"],
        dst_namespace=labels["destination_workload_namespace"],
        dst_identity=labels["destination_principal"],
        dst_service=labels["destination_service"],
        security=labels["connection_security_policy"],
        bytes_sent=moved[0],
        bytes_recv=moved[1],
        duration_ms=round((now - rec.start) * 1000, 1),
        result=result or rec.result,
        reason=rec.reason or None,
    )


class _CertificateCollector(Collector):
    def __init__(self, status: Callable[[], list[tuple[Identity, float | None, int]]]) -> None:
        self._status = status

    def collect(self) -> Iterator[Metric]:
        expiry = GaugeMetricFamily(
            "ambient_certificate_expiry_seconds",
            "seconds until the identity's certificate expires (negative: expired; absent: none yet)",
            labels=("identity",),
        )
        failures = CounterMetricFamily(
            "ambient_certificate_fetch_failures",
            "certificate fetches (issue or renewal) that failed, per identity",
            labels=("identity",),
        )
        for identity, left, failed in self._status():
            if left is not None:
                expiry.add_metric((identity.uri,), left)
            failures.add_metric((identity.uri,), failed)
        yield expiry
        yield failures


class HboneStats:
    """HBONE connection and stream gauges for one direction, and handshake refusals by reason."""

    def __init__(self, metrics: Metrics, direction: str) -> None:
        self._failures = metrics.tls_handshake_failures
        self._connections = metrics.hbone_connections.labels(direction=direction)
        self._streams = metrics.hbone_streams.labels(direction=direction)

    def handshake_failed(self, kind: str) -> None:
        self._failures.labels(reason=kind).inc()

    def connections_changed(self, delta: int) -> None:
        self._connections.inc(delta)

    def streams_changed(self, delta: int) -> None:
        self._streams.inc(delta)
