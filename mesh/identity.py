"""SPIFFE workload identities: ``spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>``.

The identity is what a certificate's single URI SAN says and what authorization reasons about,
so parsing is strict: every malformed input raises :class:`IdentityError` with a message naming
what is wrong, and nothing else escapes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

SCHEME = "spiffe://"
# SPIFFE ID spec: the whole URI is at most 2048 bytes, the trust domain at most 255.
MAX_ID_LENGTH = 2048
MAX_TRUST_DOMAIN_LENGTH = 255

_TRUST_DOMAIN_CHARS = re.compile(r"[a-z0-9._-]+")
_SEGMENT_CHARS = re.compile(r"[A-Za-z0-9._-]+")


class IdentityError(ValueError):
    """A string is not a valid mesh identity; the message says why."""


def _check_trust_domain(td: str) -> None:
    if not td:
        raise IdentityError("empty trust domain")
    if len(td) > MAX_TRUST_DOMAIN_LENGTH:
        raise IdentityError(
            f"trust domain is {len(td)} characters long, the limit is {MAX_TRUST_DOMAIN_LENGTH}"
        )
    if not _TRUST_DOMAIN_CHARS.fullmatch(td):
        bad = sorted({c for c in td if not _TRUST_DOMAIN_CHARS.fullmatch(c)})
        raise IdentityError(
            f"trust domain {td!r} has illegal characters {''.join(bad)!r} "
            "(allowed: lowercase letters, digits, '.', '-', '_')"
        )


def _check_segment(what: str, seg: str) -> None:
    if not seg:
        raise IdentityError(f"empty {what}")
    if seg in (".", ".."):
        raise IdentityError(f"{what} may not be {seg!r}")
    if not _SEGMENT_CHARS.fullmatch(seg):
        bad = sorted({c for c in seg if not _SEGMENT_CHARS.fullmatch(c)})
        raise IdentityError(
            f"{what} {seg!r} has illegal characters {''.join(bad)!r} "
            "(allowed: letters, digits, '.', '-', '_')"
        )


@dataclass(frozen=True, slots=True)
class Identity:
    """A workload identity in the Kubernetes SPIFFE form Istio uses."""

    trust_domain: str
    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        _check_trust_domain(self.trust_domain)
        _check_segment("namespace", self.namespace)
        _check_segment("service account", self.service_account)
        if len(self.uri) > MAX_ID_LENGTH:
            raise IdentityError(f"identity is {len(self.uri)} characters long, the limit is {MAX_ID_LENGTH}")

    @property
    def uri(self) -> str:
        """The SPIFFE URI, as it appears in a certificate's URI SAN."""
        return f"{SCHEME}{self.principal}"

    @property
    def principal(self) -> str:
        """The form AuthorizationPolicy uses: the URI without ``spiffe://``."""
        return f"{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    def __str__(self) -> str:
        return self.uri

    @classmethod
    def parse(cls, uri: str) -> Identity:
        """Parse a ``spiffe://`` URI."""
        if not isinstance(uri, str):
            raise IdentityError(f"identity must be a string, not {type(uri).__name__}")
        if len(uri) > MAX_ID_LENGTH:
            raise IdentityError(f"identity is {len(uri)} characters long, the limit is {MAX_ID_LENGTH}")
        if not uri.startswith(SCHEME):
            scheme = uri.split("://", 1)[0] + "://" if "://" in uri else "(none)"
            raise IdentityError(f"bad scheme {scheme!r} in {uri!r}: want 'spiffe://'")
        return cls.parse_principal(uri[len(SCHEME) :])

    @classmethod
    def parse_principal(cls, principal: str) -> Identity:
        """Parse the principal form ``<td>/ns/<ns>/sa/<sa>`` (no scheme)."""
        if not isinstance(principal, str):
            raise IdentityError(f"principal must be a string, not {type(principal).__name__}")
        if len(principal) + len(SCHEME) > MAX_ID_LENGTH:
            raise IdentityError(
                f"identity is {len(principal) + len(SCHEME)} characters long, the limit is {MAX_ID_LENGTH}"
            )
        parts = principal.split("/")
        if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa":
            raise IdentityError(
                f"{principal!r} is not of the form <trust-domain>/ns/<namespace>/sa/<service-account>"
            )
        return cls(trust_domain=parts[0], namespace=parts[2], service_account=parts[4])


def identity_from_uri_sans(uris: Sequence[str]) -> Identity:
    """The identity a certificate proves, from its URI SANs: exactly one, a mesh SPIFFE ID.

    Shared by the ``cryptography`` reader (``mesh.pki.identity_of``) and the ``ssl`` one
    (``mesh.tls.verify_peer``) so that both refuse the same certificates in the same words.
    """
    if len(uris) != 1:
        raise IdentityError(f"certificate has {len(uris)} URI SANs, want exactly one SPIFFE URI")
    try:
        return Identity.parse(uris[0])
    except IdentityError as e:
        raise IdentityError(f"certificate URI SAN is not a mesh identity: {e}") from None
