"""Who is calling the CA: bearer token in, verified :class:`Caller` out.

Authentication only establishes facts the token proves (service account, and the pod and node it
is bound to); whether those facts entitle the caller to a certificate is the pure
:func:`controlplane.ca.authorize`'s decision. Two sources of proof share one seam: tokens this
control plane signed itself (local mode) and Kubernetes TokenReview (the API server vouches for
a projected service account token).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import structlog

from controlplane.tokens import TOKEN_AUDIENCE, TokenError, TokenIssuer

log = structlog.get_logger(__name__)

# status.user.extra keys the API server fills in for pod-bound projected tokens.
EXTRA_POD_NAME = "authentication.kubernetes.io/pod-name"
EXTRA_POD_UID = "authentication.kubernetes.io/pod-uid"
EXTRA_NODE_NAME = "authentication.kubernetes.io/node-name"

SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"


class AuthenticationError(Exception):
    """The token does not prove who the caller is (→ UNAUTHENTICATED); the message says why."""


class AuthenticatorUnavailable(Exception):
    """The token could not be checked right now (e.g. the API server is down) (→ UNAVAILABLE)."""


@dataclass(frozen=True, slots=True)
class Caller:
    """A verified caller. ``pod_*``/``node`` are None when the token does not bind them."""

    namespace: str
    service_account: str
    pod_name: str | None = None
    pod_uid: str | None = None
    node: str | None = None
    source: Literal["local", "kubernetes"] = "local"

    def __str__(self) -> str:
        who = f"{self.namespace}/{self.service_account}"
        if self.pod_name:
            who += f" (pod {self.namespace}/{self.pod_name})"
        return who


class Authenticator(Protocol):
    async def authenticate(self, token: str) -> Caller:
        """Verify ``token``; raises AuthenticationError or AuthenticatorUnavailable."""
        ...


class LocalTokenAuthenticator:
    """Local mode: tokens signed by this control plane's :class:`TokenIssuer`."""

    def __init__(self, issuer: TokenIssuer) -> None:
        self._issuer = issuer

    async def authenticate(self, token: str) -> Caller:
        # ES256 verification takes well under a millisecond: not worth a thread hop.
        try:
            claims = self._issuer.verify(token)
        except TokenError as e:
            raise AuthenticationError(str(e)) from None
        return Caller(
            namespace=claims.namespace,
            service_account=claims.service_account,
            node=claims.node,
            source="local",
        )


def parse_service_account_username(username: str) -> tuple[str, str]:
    """``system:serviceaccount:<ns>:<sa>`` → (ns, sa); anything else is not a workload."""
    if not username.startswith(SERVICE_ACCOUNT_PREFIX):
        raise AuthenticationError(f"{username!r} is not a service account")
    parts = username[len(SERVICE_ACCOUNT_PREFIX) :].split(":")
    if len(parts) != 2 or not all(parts):
        raise AuthenticationError(f"{username!r} is not system:serviceaccount:<namespace>:<name>")
    return parts[0], parts[1]


def _single_extra(extra: Mapping[str, Any] | None, key: str) -> str | None:
    values = (extra or {}).get(key)
    if not values:
        return None
    if isinstance(values, str):
        return values or None
    if len(values) != 1 or not isinstance(values[0], str) or not values[0]:
        raise AuthenticationError(f"TokenReview user extra {key!r} must hold one value, got {values!r}")
    return str(values[0])


class TokenReviewAuthenticator:
    """Kubernetes mode: ask the API server whether a projected token is valid for ``istio-ca``.

    The ``kubernetes`` client is synchronous, so each review runs in a worker thread; the
    ``api_client`` belongs to the caller, who closes it.
    """

    def __init__(self, api_client: Any, *, audiences: Sequence[str] = (TOKEN_AUDIENCE,)) -> None:
        # Imported here: the client takes a noticeable time to import and local mode never needs it.
        from kubernetes import client

        self._api = client.AuthenticationV1Api(api_client)
        self._client = client
        self._audiences = list(audiences)

    async def authenticate(self, token: str) -> Caller:
        return await asyncio.to_thread(self._review, token)

    def _review(self, token: str) -> Caller:
        from kubernetes.client.exceptions import ApiException

        body = self._client.V1TokenReview(
            api_version="authentication.k8s.io/v1",
            kind="TokenReview",
            spec=self._client.V1TokenReviewSpec(token=token, audiences=self._audiences),
        )
        try:
            review = self._api.create_token_review(body)
        except ApiException as e:
            if e.status in (401, 403):
                # We ourselves are not allowed to review tokens: nothing the caller can fix.
                raise AuthenticatorUnavailable(
                    f"TokenReview refused by the API server ({e.status} {e.reason})"
                ) from None
            raise AuthenticatorUnavailable(f"TokenReview failed ({e.status} {e.reason})") from None
        except Exception as e:  # urllib3 connection errors and the like
            raise AuthenticatorUnavailable(f"TokenReview failed ({type(e).__name__}: {e})") from None
        status = review.status
        if status is None or not status.authenticated:
            reason = (status.error if status is not None else None) or "token not authenticated"
            raise AuthenticationError(f"TokenReview: {reason}")
        if status.audiences is not None and not set(status.audiences) & set(self._audiences):
            raise AuthenticationError(
                f"TokenReview: token audiences {status.audiences} do not include {self._audiences}"
            )
        user = status.user
        if user is None or not user.username:
            raise AuthenticationError("TokenReview: no user in the review status")
        namespace, service_account = parse_service_account_username(user.username)
        extra = user.extra
        return Caller(
            namespace=namespace,
            service_account=service_account,
            pod_name=_single_extra(extra, EXTRA_POD_NAME),
            pod_uid=_single_extra(extra, EXTRA_POD_UID),
            node=_single_extra(extra, EXTRA_NODE_NAME),
            source="kubernetes",
        )
