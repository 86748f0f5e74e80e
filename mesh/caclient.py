"""How a node proxy obtains workload certificates: the ``CaClient`` seam.

ztunnel's certificate manager only needs "give me a fresh credential for this identity"; the
gRPC implementation (Istio's CreateCertificate with the node token and ImpersonatedIdentity) and
test fakes both satisfy this protocol.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
from pathlib import Path
from typing import Any, Protocol

import grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf import struct_pb2

from mesh.identity import Identity
from mesh.pki import (
    DEFAULT_LEAF_TTL,
    Credential,
    PkiError,
    credential_from_chain,
    generate_key,
    make_csr,
)
from mesh.proto import ca_pb2, ca_pb2_grpc
from mesh.xds.channel import CONTROL_PLANE_CHANNEL_OPTIONS


class CaError(Exception):
    """The CA refused or could not be reached; ``retryable`` says whether backing off may help."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class CaClient(Protocol):
    async def fetch_certificate(self, identity: Identity) -> Credential:
        """A new key and certificate chain for ``identity`` (raises ``CaError``)."""
        ...


DEFAULT_SERVER_NAME = "controlplane.istio-system.svc"
DEFAULT_CLUSTER_ID = "Kubernetes"
IMPERSONATED_IDENTITY = "ImpersonatedIdentity"
DEFAULT_TIMEOUT = 10.0

# Status codes that may succeed on a later attempt; everything else needs a human (or a new
# token, or a new pod) before asking again makes sense.
_RETRYABLE = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED", "INTERNAL"})


class GrpcCaClient:
    """Istio's ``CreateCertificate`` over TLS, authenticated with a node token file.

    The token is re-read on every call because its owner (kubelet, or the local control plane)
    rotates it in place. The channel is made on first use, inside the running event loop,
    which grpc.aio channels are bound to; :meth:`close` releases it.

    While the CA is unreachable a call fails at once (UNAVAILABLE, with the reason: refused,
    or TLS); the channel keeps probing at most every second (:mod:`mesh.xds.channel`), so the
    first retry after the control plane's return finds it connected. The certificate manager
    retries at once when discovery reconnects (:meth:`mesh.certs.CertManager.retry_failed`).
    """

    def __init__(
        self,
        address: str,
        root_cert_pem: bytes | str,
        token_file: str | os.PathLike[str],
        cluster_id: str = DEFAULT_CLUSTER_ID,
        tls_server_name: str = DEFAULT_SERVER_NAME,
        *,
        ttl: dt.timedelta = DEFAULT_LEAF_TTL,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.address = address
        self._roots = root_cert_pem.encode() if isinstance(root_cert_pem, str) else root_cert_pem
        self._token_file = Path(token_file)
        self.cluster_id = cluster_id
        self.tls_server_name = tls_server_name
        self._ttl = ttl
        self._timeout = timeout
        self._channel: Any = None
        self._stub: Any = None

    def _ensure_stub(self) -> Any:
        if self._stub is None:
            creds = grpc.ssl_channel_credentials(root_certificates=self._roots)
            self._channel = grpc.aio.secure_channel(
                self.address,
                creds,
                options=[("grpc.ssl_target_name_override", self.tls_server_name), *CONTROL_PLANE_CHANNEL_OPTIONS],
            )
            self._stub = ca_pb2_grpc.IstioCertificateServiceStub(self._channel)
        return self._stub

    async def _token(self) -> str:
        try:
            text = await asyncio.to_thread(self._token_file.read_text)
        except OSError as e:
            # The file may appear later (a projected token being mounted): worth retrying.
            raise CaError(f"cannot read token file {self._token_file} ({e.strerror})") from None
        token = text.strip()
        if not token:
            raise CaError(f"token file {self._token_file} is empty")
        return token

    async def fetch_certificate(self, identity: Identity) -> Credential:
        token = await self._token()
        key = generate_key()
        key_pem, csr_pem = make_csr(identity, key)
        metadata = struct_pb2.Struct()
        metadata.update({IMPERSONATED_IDENTITY: identity.uri})
        request = ca_pb2.IstioCertificateRequest(
            csr=csr_pem.decode(),
            validity_duration=int(self._ttl.total_seconds()),
            metadata=metadata,
        )
        stub = self._ensure_stub()
        try:
            response: ca_pb2.IstioCertificateResponse = await stub.CreateCertificate(
                request,
                metadata=(("authorization", f"Bearer {token}"), ("clusterid", self.cluster_id)),
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as e:
            code = e.code()
            name = getattr(code, "name", str(code))
            raise CaError(
                f"CA at {self.address} refused {identity}: {name}: {e.details()}",
                retryable=name in _RETRYABLE,
            ) from None
        try:
            cred = credential_from_chain(key_pem, list(response.cert_chain))
            got = cred.identity
        except PkiError as e:
            raise CaError(f"CA at {self.address} returned an unusable chain for {identity}: {e}") from None
        if got != identity:
            raise CaError(f"CA at {self.address} issued {got} when asked for {identity}", retryable=False)
        if not _same_key(cred.leaf.public_key(), key):
            raise CaError(f"CA at {self.address} issued a certificate for another key", retryable=False)
        return cred

    async def close(self) -> None:
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            await channel.close()

    async def __aenter__(self) -> GrpcCaClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _same_key(public: object, key: ec.EllipticCurvePrivateKey) -> bool:
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if not isinstance(public, ec.EllipticCurvePublicKey):
        return False
    return public.public_bytes(*spki) == key.public_key().public_bytes(*spki)
