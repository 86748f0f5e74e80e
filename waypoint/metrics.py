"""The waypoint's telemetry: Istio's request metrics and one access-log line per request.

``istio_requests_total`` (with ``response_code`` and ``grpc_response_status``),
``istio_request_duration_milliseconds``, ``istio_request_bytes`` and ``istio_response_bytes``
histograms, labelled as Istio's waypoint labels them (``reporter="waypoint"``, source and
destination workload, principal and service). TCP traffic relayed without HTTP parsing counts in
``istio_tcp_connections_opened_total`` / ``closed_total`` with the same labels. Each waypoint
has its own registry (tests run several in one process).

The WAF adds ``istio_waf_requests_total{action, mode, destination_service}`` (every request a
WafPolicy inspected: allow, detect or block), ``istio_waf_rule_matches_total{rule_id}`` (the
first :data:`MAX_RULE_ID_LABELS` distinct rule ids keep their own series, later ones count as
``other``: extra rules may use any id) and ``istio_waf_rule_set_loads_total{result}``. Labels are
bounded: no paths, no source identities (those are in the log line, one per matched request).
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.process_collector import ProcessCollector

from mesh.identity import Identity
from mesh.xds.state import Service, Workload
from waypoint.request import RequestRecord

access_log = structlog.get_logger("waypoint.access")

_PEER_LABELS = (
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_service",
    "connection_security_policy",
)
REQUEST_LABELS = (*_PEER_LABELS, "request_protocol", "response_code", "grpc_response_status", "response_flags")
TCP_LABELS = (*_PEER_LABELS, "response_flags")
_MS_BUCKETS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000)
_BYTE_BUCKETS = (1, 10, 100, 1000, 10000, 100000, 1000000, 10000000, 100000000)
MAX_RULE_ID_LABELS = 1000  # the CRS has about 900 rules


@dataclass(frozen=True, slots=True)
class Peers:
    """Who talks to whom on one downstream connection (the labels shared by its requests)."""

    src_identity: Identity | None
    src_workload: Workload | None
    dst_workload: Workload | None
    dst_service: Service | None

    def labels(self) -> dict[str, str]:
        src, dst = self.src_workload, self.dst_workload
        return {
            "reporter": "waypoint",
            "source_workload": src.canonical_name or src.name if src else "unknown",
            "source_workload_namespace": src.namespace if src else "unknown",
            "source_principal": self.src_identity.uri if self.src_identity else "unknown",
            "destination_workload": dst.canonical_name or dst.name if dst else "unknown",
            "destination_workload_namespace": dst.namespace if dst else "unknown",
            "destination_principal": dst.identity.uri if dst else "unknown",
            "destination_service": self.dst_service.hostname if self.dst_service else "unknown",
            "connection_security_policy": "mutual_tls",
        }


class Metrics:
    def __init__(self, *, process: bool = False) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("istio_requests_total", "Requests through the waypoint", REQUEST_LABELS, registry=r)
        self.duration = Histogram(
            "istio_request_duration_milliseconds", "Request duration", REQUEST_LABELS, buckets=_MS_BUCKETS, registry=r
        )
        self.request_bytes = Histogram(
            "istio_request_bytes", "Request body size", REQUEST_LABELS, buckets=_BYTE_BUCKETS, registry=r
        )
        self.response_bytes = Histogram(
            "istio_response_bytes", "Response body size", REQUEST_LABELS, buckets=_BYTE_BUCKETS, registry=r
        )
        self.tcp_opened = Counter(
            "istio_tcp_connections_opened_total", "TCP connections relayed without HTTP", TCP_LABELS, registry=r
        )
        self.tcp_closed = Counter(
            "istio_tcp_connections_closed_total", "TCP connections relayed without HTTP", TCP_LABELS, registry=r
        )
        self.waf_requests = Counter(
            "istio_waf_requests_total",
            "Requests inspected by the waypoint's WAF",
            ("action", "mode", "destination_service"),
            registry=r,
        )
        self.waf_rule_matches = Counter(
            "istio_waf_rule_matches_total", "WAF rule matches", ("rule_id",), registry=r
        )
        self.waf_loads = Counter(
            "istio_waf_rule_set_loads_total",
            "WAF rule sets loaded (ok) or refused (error)",
            ("result",),
            registry=r,
        )
        self._rule_ids: set[int] = set()
        if process:
            ProcessCollector(registry=r)

    def waf(self, action: str, mode: str, destination_service: str, rule_ids: tuple[int, ...]) -> None:
        """Count one inspected request and its matched rules."""
        self.waf_requests.labels(action=action, mode=mode, destination_service=destination_service).inc()
        for rid in rule_ids:
            if rid not in self._rule_ids and len(self._rule_ids) < MAX_RULE_ID_LABELS:
                self._rule_ids.add(rid)
            self.waf_rule_matches.labels(rule_id=str(rid) if rid in self._rule_ids else "other").inc()

    def waf_load(self, loaded: bool) -> None:
        self.waf_loads.labels(result="ok" if loaded else "error").inc()

    def request(self, peers: Peers, rec: RequestRecord, flags: str, extra: dict[str, object]) -> None:
        """Count one finished request and write its access-log line."""
        labels = peers.labels()
        status = rec.status
        grpc = rec.grpc_status
        labels.update(
            request_protocol="grpc" if rec.head.is_grpc else "http",
            response_code=str(status) if status is not None else "0",
            grpc_response_status=str(grpc) if grpc is not None else "",
            response_flags=flags,
        )
        self.requests.labels(**labels).inc()
        self.duration.labels(**labels).observe(rec.duration * 1000)
        self.request_bytes.labels(**labels).observe(rec.request_bytes)
        self.response_bytes.labels(**labels).observe(rec.response_bytes)
        access_log.info(
            "request",
            src=labels["source_principal"],
            dst_service=labels["destination_service"],
            dst_workload=f"{labels['destination_workload_namespace']}/{labels['destination_workload']}",
            method=rec.head.method,
            path=rec.head.path,
            authority=rec.head.authority,
            protocol=rec.head.protocol,
            status=status,
            grpc_status=grpc,
            flags=flags,
            bytes_in=rec.request_bytes,
            bytes_out=rec.response_bytes,
            duration_ms=round(rec.duration * 1000, 3),
            **extra,
        )

    def tcp(self, peers: Peers, flags: str, opened: bool) -> None:
        labels = {**peers.labels(), "response_flags": flags}
        (self.tcp_opened if opened else self.tcp_closed).labels(**labels).inc()
