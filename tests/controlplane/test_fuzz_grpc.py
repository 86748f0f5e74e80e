"""Hypothesis against the control plane's gRPC endpoints, as production serves them (one TLS
server: the CA's CreateCertificate and delta xDS, node-token authentication).

Whatever an authenticated node sends — bytes that are not protobuf, certificate requests with
arbitrary CSRs, lifetimes and metadata, discovery requests with arbitrary types, names, nonces,
versions and NACKs — is answered with a gRPC status that says what was wrong (never UNKNOWN or
INTERNAL, which mean an unhandled exception), no error with a traceback is logged, and the
server goes on serving a well-formed request afterwards.

The server runs on an event loop of its own in a thread, so hypothesis can drive it with blocking
calls; its deadline is off (a loaded CI machine), every call has a timeout.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from controlplane import xds
from controlplane.auth import LocalTokenAuthenticator
from controlplane.main import xds_authenticate
from controlplane.server import SERVER_NAME, start_server
from controlplane.tokens import TokenIssuer
from mesh.model import Store
from mesh.pki import CertificateAuthority, make_csr
from mesh.proto import ca_pb2, ca_pb2_grpc, core_pb2, discovery_pb2, discovery_pb2_grpc, status_pb2
from mesh.xds.client import WAYPOINT_TYPE_URLS
from mesh.xds.convert import TYPE_URLS
from tests.controlplane.meshdata import WEB, load, manifest

TIMEOUT = 20.0
CREATE = "/istio.v1.auth.IstioCertificateService/CreateCertificate"
XDS = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"
# UNKNOWN and INTERNAL mean the handler raised; everything else is an answer.
UNHANDLED = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
FUZZ = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@dataclass(repr=False)
class Served:
    channel: grpc.Channel
    token: str
    logs: list[dict[str, Any]]

    def __repr__(self) -> str:
        return "Served(...)"

    @property
    def auth(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.token}")]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp: Path = tmp_path_factory.mktemp("cp")
    store = Store()
    load(store, manifest())
    ca = CertificateAuthority.generate()
    issuer = TokenIssuer.load_or_create(tmp)
    authenticator = LocalTokenAuthenticator(issuer)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="control-plane", daemon=True)
    thread.start()
    servicers: list[xds.DiscoveryServicer] = []

    def register(server: Any) -> None:
        servicers.append(xds.register(server, store, authenticate=xds_authenticate(authenticator)))

    with capture_logs() as logs:
        server = asyncio.run_coroutine_threadsafe(
            start_server("127.0.0.1:0", ca, store, authenticator, [register]), loop
        ).result(TIMEOUT)
        channel = grpc.secure_channel(
            server.address,
            grpc.ssl_channel_credentials(ca.roots_pem.encode()),
            options=[("grpc.ssl_target_name_override", SERVER_NAME)],
        )
        try:
            yield Served(channel, issuer.issue("node-a"), logs)
        finally:
            channel.close()
            asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(TIMEOUT)
            for s in servicers:
                s.close()
            loop.call_soon_threadsafe(loop.stop)
            thread.join(TIMEOUT)
            loop.close()


def no_traceback(logs: list[dict[str, Any]]) -> None:
    """No log entry carries an exception (a NACK is logged as an error: that is an answer)."""
    bad = [e for e in logs if e.get("exc_info") or e.get("exception") or "Traceback" in str(e.get("event", ""))]
    assert not bad, bad[:3]


def create(served: Served, payload: bytes) -> grpc.StatusCode:
    call = served.channel.unary_unary(
        CREATE, request_serializer=lambda b: b, response_deserializer=lambda b: b
    )
    try:
        call(payload, metadata=served.auth, timeout=TIMEOUT)
    except grpc.RpcError as e:
        return e.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def still_issues(served: Served) -> None:
    _, csr = make_csr(WEB)
    stub = ca_pb2_grpc.IstioCertificateServiceStub(served.channel)
    md = struct_pb2.Struct()
    md.update({"ImpersonatedIdentity": WEB.uri})  # as ztunnel asks for its pods
    resp = stub.CreateCertificate(
        ca_pb2.IstioCertificateRequest(csr=csr.decode(), metadata=md), metadata=served.auth, timeout=TIMEOUT
    )
    assert resp.cert_chain


@FUZZ
@given(st.binary(max_size=2048))
def test_ca_arbitrary_bytes(served: Served, payload: bytes) -> None:
    assert create(served, payload) not in UNHANDLED
    no_traceback(served.logs)


_text = st.text(max_size=200)
_metadata = st.dictionaries(st.sampled_from(["ImpersonatedIdentity", "other", ""]), _text, max_size=2)


@FUZZ
@given(
    csr=st.one_of(_text, st.just(make_csr(WEB)[1].decode())),
    validity=st.one_of(st.integers(-(2**63), 2**63 - 1), st.just(0)),
    metadata=_metadata,
)
def test_ca_arbitrary_requests(served: Served, csr: str, validity: int, metadata: dict[str, str]) -> None:
    md = struct_pb2.Struct()
    md.update(metadata)
    req = ca_pb2.IstioCertificateRequest(csr=csr, validity_duration=validity, metadata=md)
    assert create(served, req.SerializeToString()) not in UNHANDLED
    no_traceback(served.logs)
    still_issues(served)


_types = st.one_of(st.sampled_from([*TYPE_URLS, *WAYPOINT_TYPE_URLS]), _text)
_requests = st.builds(
    discovery_pb2.DeltaDiscoveryRequest,
    type_url=_types,
    resource_names_subscribe=st.lists(_text, max_size=5),
    resource_names_unsubscribe=st.lists(_text, max_size=5),
    initial_resource_versions=st.dictionaries(_text, _text, max_size=3),
    response_nonce=_text,
    error_detail=st.one_of(
        st.none(), st.builds(status_pb2.Status, code=st.integers(-(2**31), 2**31 - 1), message=_text)
    ),
    node=st.one_of(st.none(), st.builds(core_pb2.Node, id=_text, cluster=_text)),
)


def stream(served: Served, requests: list[discovery_pb2.DeltaDiscoveryRequest]) -> grpc.StatusCode | None:
    """Send ``requests`` on one stream, read what comes for a moment, end it; the status if the
    server ended it."""
    stub = discovery_pb2_grpc.AggregatedDiscoveryServiceStub(served.channel)
    done = threading.Event()

    def requests_then_wait() -> Iterator[discovery_pb2.DeltaDiscoveryRequest]:
        yield from requests
        done.wait(TIMEOUT)

    call = stub.DeltaAggregatedResources(requests_then_wait(), metadata=served.auth, timeout=TIMEOUT)
    try:
        for _ in call:  # answers; the last request is in once the server answered or ended
            break
        done.set()
        call.cancel()
        return None
    except grpc.RpcError as e:
        done.set()
        return None if e.code() == grpc.StatusCode.CANCELLED else e.code()  # type: ignore[no-any-return]


@FUZZ
@given(st.lists(_requests, min_size=1, max_size=4))
def test_xds_arbitrary_requests(served: Served, requests: list[discovery_pb2.DeltaDiscoveryRequest]) -> None:
    ended = stream(served, [*requests, discovery_pb2.DeltaDiscoveryRequest(type_url=TYPE_URLS[0])])
    assert ended not in UNHANDLED
    no_traceback(served.logs)
    # ... and a well-formed subscription still gets its state.
    assert stream(served, [discovery_pb2.DeltaDiscoveryRequest(type_url=TYPE_URLS[0])]) is None
