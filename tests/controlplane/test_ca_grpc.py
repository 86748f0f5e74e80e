"""CreateCertificate over real TLS gRPC on loopback: node-bound issuance and every refusal."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf import struct_pb2
from grpclib.exceptions import StreamTerminatedError
from grpclib.utils import Wrapper
from structlog.testing import capture_logs

from controlplane.auth import LocalTokenAuthenticator
from controlplane.server import SERVER_NAME, RunningServer, ServerError, parse_listen, start_server
from controlplane.tokens import TokenIssuer, token_path
from mesh.caclient import CaError, GrpcCaClient
from mesh.identity import Identity
from mesh.model import Store
from mesh.pki import CertificateAuthority, load_pem_certs, make_csr
from mesh.proto import ca_pb2, ca_pb2_grpc
from tests.controlplane.meshdata import CACHE, DB, WEB, ZTUNNEL, load, manifest, pod


@dataclass
class Env:
    ca: CertificateAuthority
    store: Store
    issuer: TokenIssuer
    server: RunningServer
    dir: Path
    _closers: list[Any] = field(default_factory=list)

    def client(self, node: str = "node-a", *, roots: str | None = None, **kw: Any) -> GrpcCaClient:
        c = GrpcCaClient(self.server.address, roots or self.ca.roots_pem, token_path(self.dir, node), **kw)
        self._closers.append(c)
        return c

    def write_token(self, name: str, token: str) -> None:
        token_path(self.dir, name).write_text(token)

    async def raw(
        self,
        token: str | None,
        csr_for: Identity,
        impersonate: Identity | str | None = None,
        validity: int = 0,
    ) -> tuple[grpc.StatusCode, str, list[str]]:
        """One call with full control over token, CSR and metadata."""
        channel = grpc.aio.secure_channel(
            self.server.address,
            grpc.ssl_channel_credentials(self.ca.roots_pem.encode()),
            options=[("grpc.ssl_target_name_override", SERVER_NAME)],
        )
        self._closers.append(channel)
        md = struct_pb2.Struct()
        if impersonate is not None:
            md.update({"ImpersonatedIdentity": str(impersonate)})
        _, csr = make_csr(csr_for)
        req = ca_pb2.IstioCertificateRequest(csr=csr.decode(), validity_duration=validity, metadata=md)
        headers = [("clusterid", "Kubernetes")]
        if token is not None:
            headers.append(("authorization", f"Bearer {token}"))
        try:
            resp = await ca_pb2_grpc.IstioCertificateServiceStub(channel).CreateCertificate(
                req, metadata=headers, timeout=10
            )
        except grpc.aio.AioRpcError as e:
            return e.code(), e.details() or "", []
        return grpc.StatusCode.OK, "", list(resp.cert_chain)

    async def aclose(self) -> None:
        for c in self._closers:
            await c.close()


@pytest.fixture
async def env(tmp_path: Path, store: Store) -> AsyncIterator[Env]:
    ca = CertificateAuthority.generate()
    issuer = TokenIssuer.load_or_create(tmp_path)
    issuer.write_node_tokens(tmp_path, ["node-a", "node-b"])
    server = await start_server("127.0.0.1:0", ca, store, LocalTokenAuthenticator(issuer))
    e = Env(ca, store, issuer, server, tmp_path)
    try:
        yield e
    finally:
        await e.aclose()
        await server.stop(None)


def events(logs: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["event"] == event]


async def test_node_gets_certificates_for_its_pods(env: Env) -> None:
    client = env.client("node-a")
    with capture_logs() as logs:
        for ident in (WEB, CACHE):
            cred = await client.fetch_certificate(ident)
            assert cred.identity == ident
            cred.leaf.verify_directly_issued_by(env.ca.cert)
            assert cred.roots_pem == env.ca.roots_pem
            lifetime = cred.not_after - dt.datetime.now(dt.UTC)
            assert dt.timedelta(hours=23) < lifetime <= dt.timedelta(hours=24)
    issued = events(logs, "certificate issued")
    assert [e["identity"] for e in issued] == [WEB.uri, CACHE.uri]
    assert issued[1]["serial"] == f"{cred.leaf.serial_number:x}"
    assert issued[1]["expires"] == cred.not_after.isoformat()
    assert issued[1]["node"] == "node-a"
    assert issued[1]["caller"] == "istio-system/ztunnel"
    assert issued[1]["cluster_id"] == "Kubernetes"


async def test_identity_running_only_on_another_node_is_refused(env: Env) -> None:
    with capture_logs() as logs, pytest.raises(CaError, match="PERMISSION_DENIED.*'db'.*'node-a'") as e:
        await env.client("node-a").fetch_certificate(DB)
    assert not e.value.retryable
    [refused] = events(logs, "certificate refused")
    assert refused["code"] == "PERMISSION_DENIED"
    assert refused["identity"] == DB.uri
    assert refused["node"] == "node-a"
    assert "no pod with service account 'db'" in refused["reason"]
    # The node it does run on gets it.
    assert (await env.client("node-b").fetch_certificate(DB)).identity == DB


async def test_deleted_pod_is_refused(env: Env) -> None:
    client = env.client("node-a")
    await client.fetch_certificate(WEB)
    load(env.store, manifest(**{"web-1": None}))
    with pytest.raises(CaError, match="PERMISSION_DENIED"):
        await client.fetch_certificate(WEB)


async def test_pod_moving_between_nodes_moves_the_permission(env: Env) -> None:
    a, b = env.client("node-a"), env.client("node-b")
    await a.fetch_certificate(WEB)
    with pytest.raises(CaError, match="PERMISSION_DENIED"):
        await b.fetch_certificate(WEB)
    load(env.store, manifest(**{"web-1": pod("web-1", "node-b", "web", "10.0.1.2")}))
    assert (await b.fetch_certificate(WEB)).identity == WEB
    with pytest.raises(CaError, match="PERMISSION_DENIED"):
        await a.fetch_certificate(WEB)


async def test_node_removed_from_the_mesh_loses_everything(env: Env) -> None:
    text = manifest(**{"db-1": None, "cache-b": None, "ztunnel-b": None})
    load(env.store, text.replace("apiVersion: v1\nkind: Node\nmetadata: {name: node-b}\n---\n", ""))
    with pytest.raises(CaError, match="'node-b' is not part of the mesh"):
        await env.client("node-b").fetch_certificate(CACHE)


@pytest.mark.parametrize(
    ("make_token", "reason"),
    [
        (lambda env: TokenIssuer(ec.generate_private_key(ec.SECP256R1())).issue("node-a"), "signature"),
        (
            lambda env: TokenIssuer(env.issuer._key, clock=lambda: 0.0).issue(
                "node-a", ttl=dt.timedelta(hours=1)
            ),
            "expired",
        ),
        (lambda env: env.issuer.issue("node-a", audience="kubernetes"), "audience"),
        (lambda env: "garbage", "not a well-formed JWT"),
    ],
    ids=["forged", "expired", "wrong-audience", "garbage"],
)
async def test_bad_tokens_are_unauthenticated(env: Env, make_token: Any, reason: str) -> None:
    env.write_token("node-a", make_token(env))
    with capture_logs() as logs, pytest.raises(CaError, match=f"UNAUTHENTICATED.*{reason}") as e:
        await env.client("node-a").fetch_certificate(WEB)
    assert not e.value.retryable
    [refused] = events(logs, "certificate refused")
    assert refused["code"] == "UNAUTHENTICATED" and reason in refused["reason"]


async def test_token_is_reread_on_every_call(env: Env) -> None:
    client = env.client("node-a")
    good = token_path(env.dir, "node-a").read_text()
    env.write_token("node-a", "garbage")
    with pytest.raises(CaError, match="UNAUTHENTICATED"):
        await client.fetch_certificate(WEB)
    env.write_token("node-a", good)
    assert (await client.fetch_certificate(WEB)).identity == WEB


async def test_missing_token_file_is_retryable(env: Env) -> None:
    with pytest.raises(CaError, match="cannot read token file") as e:
        await env.client("node-x").fetch_certificate(WEB)
    assert e.value.retryable


async def test_missing_or_malformed_authorization(env: Env) -> None:
    code, details, _ = await env.raw(None, WEB, WEB)
    assert code == grpc.StatusCode.UNAUTHENTICATED and "no authorization" in details


async def test_csr_for_another_identity_than_impersonated_is_refused(env: Env) -> None:
    token = env.issuer.issue("node-a")
    with capture_logs() as logs:
        code, details, _ = await env.raw(token, csr_for=CACHE, impersonate=WEB)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"CSR asks for {CACHE}" in details
    [refused] = events(logs, "certificate refused")
    assert refused["identity"] == WEB.uri and refused["code"] == "INVALID_ARGUMENT"


async def test_malformed_impersonated_identity(env: Env) -> None:
    code, details, _ = await env.raw(env.issuer.issue("node-a"), WEB, "https://example.com/web")
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "ImpersonatedIdentity" in details


async def test_non_node_caller_only_gets_its_own_identity(env: Env) -> None:
    token = env.issuer.issue("node-a", subject="system:serviceaccount:shop:web")
    code, details, _ = await env.raw(token, CACHE, CACHE)
    assert code == grpc.StatusCode.PERMISSION_DENIED and "may only obtain its own identity" in details
    code, _, chain = await env.raw(token, WEB)  # no impersonation: its own
    assert code == grpc.StatusCode.OK
    assert load_pem_certs(chain[0], "leaf")[0].extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value.get_values_for_type(x509.UniformResourceIdentifier) == [WEB.uri]


async def test_node_proxy_gets_its_own_identity(env: Env) -> None:
    code, _, chain = await env.raw(env.issuer.issue("node-a"), ZTUNNEL)
    assert code == grpc.StatusCode.OK and len(chain) == 2


async def test_requested_validity_is_honoured(env: Env) -> None:
    code, _, chain = await env.raw(env.issuer.issue("node-a"), WEB, WEB, validity=3600)
    assert code == grpc.StatusCode.OK
    leaf = load_pem_certs(chain[0], "leaf")[0]
    assert leaf.not_valid_after_utc - dt.datetime.now(dt.UTC) <= dt.timedelta(hours=1)


async def test_server_certificate_names(env: Env) -> None:
    import ssl

    pem = ssl.get_server_certificate(("127.0.0.1", env.server.port))
    cert = load_pem_certs(pem, "server")[0]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [SERVER_NAME]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    cert.verify_directly_issued_by(env.ca.cert)


async def test_untrusted_server_is_refused(env: Env) -> None:
    other = CertificateAuthority.generate()
    with pytest.raises(CaError, match="UNAVAILABLE") as e:
        await env.client("node-a", roots=other.roots_pem, timeout=5).fetch_certificate(WEB)
    assert e.value.retryable


async def test_wrong_server_name_is_refused(env: Env) -> None:
    with pytest.raises(CaError, match="UNAVAILABLE"):
        await env.client("node-a", tls_server_name="istiod.istio-system.svc", timeout=5).fetch_certificate(
            WEB
        )


async def test_unreachable_ca_is_retryable(env: Env, tmp_path: Path) -> None:
    port = env.server.port
    await env.server.stop(None)
    client = GrpcCaClient(f"127.0.0.1:{port}", env.ca.roots_pem, token_path(env.dir, "node-a"), timeout=5)
    try:
        with pytest.raises(CaError) as e:
            await client.fetch_certificate(WEB)
        assert e.value.retryable
    finally:
        await client.close()


async def test_an_idle_ca_channel_lets_a_stopping_server_go(env: Env) -> None:
    # ztunnel keeps its CA channel between fetches. On the server's GOAWAY grpclib starts a TLS
    # shutdown that waits for a close_notify grpcio never sends: the connection stayed, and the
    # control plane waited its whole grace period (5 s in production) on every stop.
    client = env.client("node-a")
    await client.fetch_certificate(WEB)
    async with asyncio.timeout(20):
        await env.server.stop(60)
    # The next call dials again (and finds nobody listening): the channel is not stuck.
    with pytest.raises(CaError, match="UNAVAILABLE") as e:
        await client.fetch_certificate(WEB)
    assert e.value.retryable


@pytest.mark.parametrize("cancel_first", [True, False])
async def test_a_fetch_cancelled_as_its_connection_fails_is_cancelled_not_retried(
    env: Env, monkeypatch: pytest.MonkeyPatch, cancel_first: bool
) -> None:
    # grpclib wakes a call on a dead connection by cancelling its task and raising
    # StreamTerminatedError instead (grpclib.utils.Wrapper). A ztunnel stopping as its CA went
    # away once got CaError here, so its certificate manager slept and retried instead of ending.
    client = env.client("node-a")
    wrapper = Wrapper()
    waiting = asyncio.Event()

    async def blocked(*_: object) -> None:
        with wrapper:
            waiting.set()
            await asyncio.Event().wait()

    monkeypatch.setattr(client, "_create_certificate", blocked)
    fetch = asyncio.create_task(client.fetch_certificate(WEB))
    await asyncio.wait_for(waiting.wait(), 30)
    failed = StreamTerminatedError("Protocol error")
    if cancel_first:
        fetch.cancel()
        wrapper.cancel(failed)
    else:
        wrapper.cancel(failed)
        fetch.cancel()
    with pytest.raises(asyncio.CancelledError):
        await fetch


async def test_extra_servicers_and_port_in_use(store: Store, tmp_path: Path) -> None:
    ca = CertificateAuthority.generate()
    auth = LocalTokenAuthenticator(TokenIssuer.load_or_create(tmp_path))
    seen: list[Any] = []
    server = await start_server("127.0.0.1:0", ca, store, auth, [seen.append])
    try:
        assert len(seen) == 1
        with pytest.raises(ServerError, match="cannot listen"):
            await start_server(server.address, ca, store, auth)
    finally:
        await server.stop(None)


@pytest.mark.parametrize(
    ("listen", "result"),
    [
        ("127.0.0.1:15012", ("127.0.0.1", 15012)),
        ("[::1]:0", ("::1", 0)),
        ("localhost:80", ("localhost", 80)),
        ("15012", "not HOST:PORT"),
        ("::1:15012", "brackets"),
        ("127.0.0.1:http", "not a number"),
        ("127.0.0.1:70000", "out of range"),
    ],
)
def test_parse_listen(listen: str, result: tuple[str, int] | str) -> None:
    if isinstance(result, str):
        with pytest.raises(ServerError, match=result):
            parse_listen(listen)
    else:
        assert parse_listen(listen) == result


async def test_malformed_requests_are_invalid_argument_without_a_traceback(env: Env) -> None:
    token = env.issuer.issue("node-a")
    with capture_logs() as logs:
        code, details, _ = await env.raw(token, WEB, WEB, validity=2**63 - 1)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "validity_duration" in details
    assert events(logs, "certificate refused")[0]["code"] == "INVALID_ARGUMENT"
    # Bytes that are not an IstioCertificateRequest at all.
    channel = grpc.aio.secure_channel(
        env.server.address,
        grpc.ssl_channel_credentials(env.ca.roots_pem.encode()),
        options=[("grpc.ssl_target_name_override", SERVER_NAME)],
    )
    try:
        call = channel.unary_unary(
            "/istio.v1.auth.IstioCertificateService/CreateCertificate",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(b"\xff\xff\xff not protobuf", metadata=[("authorization", f"Bearer {token}")], timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await channel.close()
