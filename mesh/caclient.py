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
from typing import Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf import struct_pb2
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError, StreamTerminatedError

from mesh.identity import Identity
from mesh.pki import (
    DEFAULT_LEAF_TTL,
    Credential,
    PkiError,
    credential_from_chain,
    generate_key,
    make_csr,
)
from mesh.proto import ca_pb2
from mesh.xds.channel import ControlPlaneChannel, call_in_own_task, connect_once, describe, make_channel


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
CREATE_CERTIFICATE = "/istio.v1.auth.IstioCertificateService/CreateCertificate"

# Status codes that may succeed on a later attempt; everything else needs a human (or a new
# token, or a new pod) before asking again makes sense.
_RETRYABLE = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED", "INTERNAL"})


class GrpcCaClient:
    """Istio's ``CreateCertificate`` over TLS, authenticated with a node token file.

    The token is re-read on every call because its owner (kubelet, or the local control plane)
    rotates it in place. The channel (grpclib, :mod:`mesh.xds.channel`) is made on first use,
    inside the running event loop it binds to, and reconnects on the next call after a loss;
    :meth:`close` releases it.

    While the CA is unreachable a call fails at once (UNAVAILABLE, with the reason: refused,
    reset, TLS), and the next call tries to connect again; the certificate manager retries at
    once when discovery reconnects (:meth:`mesh.certs.CertManager.retry_failed`).
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
        self._channel: ControlPlaneChannel | None = None

    def _ensure_channel(self) -> ControlPlaneChannel:
        if self._channel is None:
            self._channel = make_channel(self.address, self._roots, self.tls_server_name)
        return self._channel

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
        channel = self._ensure_channel()
        try:
            await connect_once(channel)
        except (OSError, TimeoutError) as e:
            raise CaError(f"CA at {self.address} unreachable for {identity}: UNAVAILABLE: {describe(e)}") from None
        try:
            response = await call_in_own_task(self._create_certificate(channel, request, token))
        except GRPCError as e:
            name = e.status.name
            raise CaError(
                f"CA at {self.address} refused {identity}: {name}: {e.message}", retryable=name in _RETRYABLE
            ) from None
        except TimeoutError:
            raise CaError(
                f"CA at {self.address} did not answer for {identity} within {self._timeout:g} s: DEADLINE_EXCEEDED"
            ) from None
        except (StreamTerminatedError, OSError) as e:
            raise CaError(
                f"CA at {self.address} lost the connection for {identity}: UNAVAILABLE: {describe(e)}"
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

    async def _create_certificate(
        self, channel: ControlPlaneChannel, request: ca_pb2.IstioCertificateRequest, token: str
    ) -> ca_pb2.IstioCertificateResponse:
        async with channel.request(
            CREATE_CERTIFICATE,
            Cardinality.UNARY_UNARY,
            ca_pb2.IstioCertificateRequest,
            ca_pb2.IstioCertificateResponse,
            timeout=self._timeout,
            metadata=(("authorization", f"Bearer {token}"), ("clusterid", self.cluster_id)),
        ) as call:
            await call.send_message(request, end=True)
            response = await call.recv_message()
        if response is None:
            raise GRPCError(Status.INTERNAL, "the CA answered no message")
        return response

    async def close(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.aclose()

    async def __aenter__(self) -> GrpcCaClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _same_key(public: object, key: ec.EllipticCurvePrivateKey) -> bool:
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if not isinstance(public, ec.EllipticCurvePublicKey):
        return False
    return public.public_bytes(*spki) == key.public_key().public_bytes(*spki)
