"""How a node proxy obtains workload certificates: the ``CaClient`` seam.

ztunnel's certificate manager only needs "give me a fresh credential for this identity"; the
gRPC implementation (Istio's CreateCertificate with the node token and ImpersonatedIdentity) and
test fakes both satisfy this protocol.
"""

from __future__ import annotations

from typing import Protocol

from mesh.identity import Identity
from mesh.pki import Credential


class CaError(Exception):
    """The CA refused or could not be reached; ``retryable`` says whether backing off may help."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class CaClient(Protocol):
    async def fetch_certificate(self, identity: Identity) -> Credential:
        """A new key and certificate chain for ``identity`` (raises ``CaError``)."""
        ...
