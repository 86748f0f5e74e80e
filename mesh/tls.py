"""TLS contexts for HBONE: TLS 1.3 only, ALPN ``h2``, mutual authentication by SPIFFE identity.

Chain verification (expiry, issuer) is OpenSSL's job; what OpenSSL cannot know — which SPIFFE
identity a peer must have and which trust domain it belongs to — is checked right after the
handshake by :func:`verify_peer`. Every refusal is logged with the reason in plain words.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from collections.abc import Callable

import structlog
from cryptography import x509

from mesh.identity import Identity
from mesh.pki import Credential, PkiError, identity_of

log = structlog.get_logger(__name__)

ALPN_H2 = "h2"


class PeerRejected(Exception):
    """The peer's certificate is not acceptable; the message says why."""


def _load_chain(ctx: ssl.SSLContext, cred: Credential) -> None:
    # The ssl module only loads a key and chain from files: write them to a private temporary
    # directory and remove them at once.
    with tempfile.TemporaryDirectory(prefix="mesh-tls-") as d:
        os.chmod(d, 0o700)
        chain = os.path.join(d, "chain.pem")
        key = os.path.join(d, "key.pem")
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(cred.key_pem)
        with open(chain, "w") as f:
            f.write("".join(cred.chain_pem))
        ctx.load_cert_chain(chain, key)


def _base_context(purpose: ssl.Purpose, cred: Credential) -> ssl.SSLContext:
    ctx = ssl.SSLContext(
        ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT
    )
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols([ALPN_H2])
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=cred.roots_pem)
    _load_chain(ctx, cred)
    return ctx


def server_context(cred: Credential) -> ssl.SSLContext:
    """Server side of HBONE: a client certificate chained to the mesh root is required."""
    ctx = _base_context(ssl.Purpose.CLIENT_AUTH, cred)
    # One ticket is enough for a pool connection to resume; it saves a full handshake per dial.
    ctx.num_tickets = 1
    return ctx


def client_context(cred: Credential) -> ssl.SSLContext:
    """Client side of HBONE; the server's identity is checked after the handshake."""
    return _base_context(ssl.Purpose.SERVER_AUTH, cred)


def peer_certificate(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> x509.Certificate:
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        raise PeerRejected("peer presented no certificate")
    return x509.load_der_x509_certificate(der)


def verify_peer(
    ssl_object: ssl.SSLObject | ssl.SSLSocket,
    trust_domain: str,
    expect: Identity | Callable[[Identity], bool] | None = None,
) -> Identity:
    """The peer's identity, after checking ALPN, trust domain and (client side) the expected identity."""
    if ssl_object.selected_alpn_protocol() != ALPN_H2:
        raise PeerRejected(f"peer did not negotiate ALPN {ALPN_H2!r}")
    try:
        ident = identity_of(peer_certificate(ssl_object))
    except PkiError as e:
        raise PeerRejected(str(e)) from None
    if ident.trust_domain != trust_domain:
        raise PeerRejected(f"peer {ident} is from trust domain {ident.trust_domain!r}, want {trust_domain!r}")
    if isinstance(expect, Identity):
        if ident != expect:
            raise PeerRejected(f"peer is {ident}, expected {expect}")
    elif expect is not None and not expect(ident):
        raise PeerRejected(f"peer {ident} is not an acceptable identity")
    return ident


def describe_tls_error(exc: BaseException) -> str:
    """A short, specific reason for a failed handshake, for logs and errors users read."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        msg = (exc.verify_message or "").lower()
        if "expired" in msg:
            return "peer certificate has expired"
        if "not yet valid" in msg:
            return "peer certificate is not yet valid"
        if "issuer" in msg or "self-signed" in msg or "self signed" in msg or "signature" in msg:
            return f"peer certificate is not signed by the mesh root ({exc.verify_message})"
        return f"peer certificate rejected: {exc.verify_message or exc}"
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or "").lower().replace("_", " ")
        if "expired" in reason:
            return "our certificate was refused by the peer as expired"
        if "unknown ca" in reason:
            return "the peer does not trust our certificate's root"
        if "did not return a certificate" in reason:
            return "no client certificate was presented"
        if "bad certificate" in reason or "certificate unknown" in reason:
            return "the peer refused our certificate"
        if "no application protocol" in reason:
            return "no common ALPN protocol (want h2)"
        if "unsupported protocol" in reason or "protocol version" in reason or "wrong version" in reason:
            return "TLS version refused (HBONE needs TLS 1.3)"
        return f"TLS error: {exc.reason or exc}"
    return f"{type(exc).__name__}: {exc}"
