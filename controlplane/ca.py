"""The mesh CA's CreateCertificate: node-bound authorization, then signing.

The security core of the product is :func:`authorize`, a pure function of (verified caller,
requested identity, state snapshot): a node proxy may hold the identity of a pod only while such
a pod is scheduled on *its* node, so a compromised node can never mint certificates for
workloads running elsewhere. Everything else here is plumbing around it: read the token,
authenticate, decide, sign, and log the outcome either way so refusals are visible to operators.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
import structlog
from cryptography import x509

from controlplane.auth import AuthenticationError, Authenticator, AuthenticatorUnavailable, Caller
from mesh.identity import Identity, IdentityError
from mesh.model import DEFAULT_TRUST_DOMAIN, Snapshot, Store
from mesh.pki import CertificateAuthority, CsrRejected
from mesh.proto import ca_pb2, ca_pb2_grpc

log = structlog.get_logger(__name__)

IMPERSONATED_IDENTITY = "ImpersonatedIdentity"
SERVICE_NAME = "istio.v1.auth.IstioCertificateService"
# Longest certificate a workload may ask for (istiod's default maximum workload TTL: 90 days).
MAX_VALIDITY_SECONDS = 90 * 24 * 3600


def _decode_request(data: bytes) -> ca_pb2.IstioCertificateRequest | None:
    request = ca_pb2.IstioCertificateRequest()
    try:
        request.ParseFromString(data)
    except Exception:
        return None
    return request
DEFAULT_TRUSTED_NODE_ACCOUNTS: frozenset[tuple[str, str]] = frozenset({("istio-system", "ztunnel")})


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of :func:`authorize`; ``node`` is the node the decision was made for."""

    allowed: bool
    code: grpc.StatusCode
    reason: str
    node: str | None = None


def _allow(reason: str, node: str | None = None) -> Decision:
    return Decision(True, grpc.StatusCode.OK, reason, node)


def _deny(reason: str, node: str | None = None) -> Decision:
    return Decision(False, grpc.StatusCode.PERMISSION_DENIED, reason, node)


def caller_node(caller: Caller, snapshot: Snapshot) -> Decision:
    """Which node a node proxy speaks for, established from the strongest evidence available.

    A pod-bound token (Kubernetes) is only as good as the pod it names: the pod must still exist
    with that uid and service account, and the node is the pod's ``spec.nodeName`` from our own
    state, never a claim in the token. A local token names the node directly (we signed it), but
    the node must still be part of the mesh.
    """
    if caller.pod_name or caller.pod_uid:
        if not caller.pod_name or not caller.pod_uid:
            return _deny("token is bound to a pod but lacks its name or uid")
        pod = snapshot.workload_by_name(caller.namespace, caller.pod_name)
        where = f"{caller.namespace}/{caller.pod_name}"
        if pod is None:
            return _deny(f"caller's pod {where} does not exist")
        if pod.uid != caller.pod_uid:
            return _deny(f"caller's pod {where} has uid {pod.uid}, the token is for uid {caller.pod_uid}")
        if pod.service_account != caller.service_account:
            return _deny(
                f"caller's pod {where} runs as service account {pod.service_account!r}, "
                f"the token is for {caller.service_account!r}"
            )
        if not pod.node:
            return _deny(f"caller's pod {where} is not scheduled on any node")
        if caller.node and caller.node != pod.node:
            return _deny(
                f"token says node {caller.node!r}, caller's pod {where} is on {pod.node!r}", pod.node
            )
        return _allow("caller's pod verified", pod.node)
    if caller.source != "local":
        return _deny("node proxy token is not bound to a pod (need a pod-bound projected token)")
    if not caller.node:
        return _deny("node proxy token names no node")
    if caller.node not in snapshot.nodes:
        return _deny(f"node {caller.node!r} is not part of the mesh", caller.node)
    return _allow("node token verified", caller.node)


def authorize(
    caller: Caller,
    requested: Identity,
    snapshot: Snapshot,
    *,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    trusted_node_accounts: frozenset[tuple[str, str]] = DEFAULT_TRUSTED_NODE_ACCOUNTS,
) -> Decision:
    """May ``caller`` receive a certificate for ``requested``, given ``snapshot``? Pure."""
    if requested.trust_domain != trust_domain:
        return _deny(f"{requested} is outside trust domain {trust_domain!r}", caller.node)
    own = Identity(trust_domain, caller.namespace, caller.service_account)
    is_node_proxy = (caller.namespace, caller.service_account) in trusted_node_accounts
    if requested == own:
        # Every workload may hold its own identity: the token already proves it. Istio does
        # the same for a node proxy's own certificate.
        return _allow("caller's own identity", caller.node)
    if not is_node_proxy:
        return _deny(f"{caller.namespace}/{caller.service_account} may only obtain its own identity {own}")
    where = caller_node(caller, snapshot)
    if not where.allowed:
        return where
    node = where.node
    assert node is not None  # caller_node always names the node when it allows
    if snapshot.pods_on_node(node, requested.namespace, requested.service_account) == 0:
        return _deny(
            f"no pod with service account {requested.service_account!r} in namespace "
            f"{requested.namespace!r} is scheduled on node {node!r}",
            node,
        )
    return _allow(f"a pod of {requested.namespace}/{requested.service_account} runs on node {node!r}", node)


def bearer_token(metadata: Mapping[str, str]) -> str:
    """The token of an ``authorization: Bearer <token>`` header, else AuthenticationError."""
    value = metadata.get("authorization")
    if not value:
        raise AuthenticationError("no authorization metadata (want 'Bearer <token>')")
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError("authorization metadata is not 'Bearer <token>'")
    return token.strip()


def requested_identity(request: ca_pb2.IstioCertificateRequest) -> Identity | None:
    """The ``ImpersonatedIdentity`` a node proxy asks for, or None (the caller's own)."""
    if not request.HasField("metadata"):
        return None
    field = request.metadata.fields.get(IMPERSONATED_IDENTITY)
    if field is None:
        return None
    if field.WhichOneof("kind") != "string_value":
        raise IdentityError(f"metadata.{IMPERSONATED_IDENTITY} must be a string")
    return Identity.parse(field.string_value)


class CaServicer(ca_pb2_grpc.IstioCertificateServiceServicer):  # type: ignore[misc]
    """``IstioCertificateService`` over grpc.aio, deciding against the store's current snapshot."""

    def __init__(
        self,
        ca: CertificateAuthority,
        store: Store,
        authenticator: Authenticator,
        *,
        trusted_node_accounts: frozenset[tuple[str, str]] = DEFAULT_TRUSTED_NODE_ACCOUNTS,
    ) -> None:
        self._ca = ca
        self._store = store
        self._authenticator = authenticator
        self._trusted = trusted_node_accounts

    def register(self, server: Any) -> None:
        """As the generated ``add_..._to_server``, with a request decoder that never raises: bytes
        that are not an ``IstioCertificateRequest`` reach :meth:`CreateCertificate` as None and are
        answered INVALID_ARGUMENT (gRPC's own decoder would log a traceback and answer UNKNOWN)."""
        handlers = {
            "CreateCertificate": grpc.unary_unary_rpc_method_handler(
                self.CreateCertificate,
                request_deserializer=_decode_request,
                response_serializer=ca_pb2.IstioCertificateResponse.SerializeToString,
            )
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
        server.add_registered_method_handlers(SERVICE_NAME, handlers)

    async def CreateCertificate(
        self, request: ca_pb2.IstioCertificateRequest | None, context: Any
    ) -> ca_pb2.IstioCertificateResponse:
        md = {k.lower(): v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        facts: dict[str, Any] = {"peer": context.peer(), "cluster_id": md.get("clusterid")}

        async def refuse(code: grpc.StatusCode, reason: str, **more: Any) -> NoReturn:
            log.warning("certificate refused", code=code.name, reason=reason, **facts, **more)
            await context.abort(code, reason)
            raise AssertionError("context.abort() returned")

        if request is None:
            await refuse(grpc.StatusCode.INVALID_ARGUMENT, "the request is not an IstioCertificateRequest")
        if request.validity_duration < 0 or request.validity_duration > MAX_VALIDITY_SECONDS:
            await refuse(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"validity_duration {request.validity_duration}s is outside 0..{MAX_VALIDITY_SECONDS}s",
            )
        try:
            caller = await self._authenticator.authenticate(bearer_token(md))
        except AuthenticationError as e:
            await refuse(grpc.StatusCode.UNAUTHENTICATED, str(e))
        except AuthenticatorUnavailable as e:
            await refuse(grpc.StatusCode.UNAVAILABLE, str(e))
        facts["caller"] = str(caller)
        facts["caller_source"] = caller.source
        try:
            wanted = requested_identity(request) or Identity(
                self._ca.trust_domain, caller.namespace, caller.service_account
            )
        except IdentityError as e:
            await refuse(grpc.StatusCode.INVALID_ARGUMENT, f"metadata.{IMPERSONATED_IDENTITY}: {e}")
        facts["identity"] = str(wanted)

        snapshot = self._store.snapshot()
        decision = authorize(
            caller,
            wanted,
            snapshot,
            trust_domain=self._ca.trust_domain,
            trusted_node_accounts=self._trusted,
        )
        facts["node"] = decision.node
        if not decision.allowed:
            await refuse(decision.code, decision.reason, state_version=snapshot.version)

        ttl = dt.timedelta(seconds=request.validity_duration) if request.validity_duration > 0 else None
        try:
            chain = self._ca.sign(request.csr, ttl, expect=wanted)
        except CsrRejected as e:
            await refuse(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        leaf = x509.load_pem_x509_certificate(chain[0].encode())
        log.info(
            "certificate issued",
            serial=f"{leaf.serial_number:x}",
            expires=leaf.not_valid_after_utc.isoformat(),
            reason=decision.reason,
            state_version=snapshot.version,
            **facts,
        )
        return ca_pb2.IstioCertificateResponse(cert_chain=chain)
