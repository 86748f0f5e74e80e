"""TLS contexts for HBONE: TLS 1.3 only, ALPN ``h2``, mutual authentication by SPIFFE identity.

Chain verification (expiry, issuer) is OpenSSL's job; what OpenSSL cannot know — which SPIFFE
identity a peer must have and which trust domain it belongs to — is checked right after the
handshake by :func:`verify_peer`. Every refusal is logged with the reason in plain words.

This module does not import ``cryptography`` (about 9 MiB of resident memory): peers are checked
from the certificate the ``ssl`` module has already decoded, and :func:`load_credential_dir`
builds contexts straight from a credential directory, so a process that only relays HBONE (e.g.
``ambientctl hbone``) never loads it.
"""

from __future__ import annotations

import functools
import os
import re
import ssl
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from mesh.identity import Identity, IdentityError, identity_from_uri_sans

if TYPE_CHECKING:
    from cryptography import x509

    from mesh.pki import Credential

log = structlog.get_logger(__name__)

ALPN_H2 = "h2"

# Istio's file names for a workload credential (mesh.pki uses these too).
CERT_CHAIN_FILE = "cert-chain.pem"
KEY_FILE = "key.pem"
ROOT_CERT_FILE = "root-cert.pem"


class PeerRejected(Exception):
    """The peer's certificate is not acceptable; the message says why, ``kind`` in one word
    (one of :data:`FAILURE_KINDS`, for metrics)."""

    def __init__(self, message: str, kind: str = "peer_rejected") -> None:
        super().__init__(message)
        self.kind = kind


class CredentialError(Exception):
    """A credential directory is unusable; the message names the file and the problem."""


class ClientContext(ssl.SSLContext):
    """A client context that resumes TLS sessions (RFC 8446 tickets) on new HBONE connections.

    A pooled connection needs one handshake for its whole life; when the pool dials the same
    peer again (after an idle close, a GOAWAY or a dead connection), offering the last session's
    ticket saves the certificate exchange and signatures of a full handshake. asyncio and uvloop
    take no ``session`` argument for a connection; they call :meth:`wrap_bio` with the
    ``server_hostname`` passed to ``create_connection``. :meth:`offer` therefore registers the
    session under a one-use token which the dialer passes as ``server_hostname``; ``wrap_bio``
    swaps it for the session and sends no SNI (HBONE sends none).

    Sessions are kept per *resume key* — the peer's address and the identity it must have — so
    a ticket is only ever offered to the peer that issued it, and a resumed connection is still
    checked by :func:`verify_peer` (the session carries the peer's verified certificate).
    """

    MAX_SESSIONS = 1024

    def __new__(cls, protocol: int = ssl.PROTOCOL_TLS_CLIENT) -> ClientContext:
        return super().__new__(cls, protocol)

    def __init__(self, protocol: int = ssl.PROTOCOL_TLS_CLIENT) -> None:
        self._sessions: dict[object, ssl.SSLSession] = {}
        self._offers: dict[str, ssl.SSLSession] = {}
        self._tokens = 0

    def remember(self, key: object, session: ssl.SSLSession | None) -> None:
        """Keep ``session`` for the next connection to ``key`` (only if it can be resumed)."""
        if session is None or not session.has_ticket:
            return
        self._sessions.pop(key, None)
        self._sessions[key] = session
        while len(self._sessions) > self.MAX_SESSIONS:
            del self._sessions[next(iter(self._sessions))]

    def offer(self, key: object) -> str | None:
        """A ``server_hostname`` token that makes the next ``wrap_bio`` resume ``key``'s session."""
        session = self._sessions.get(key)
        if session is None:
            return None
        self._tokens += 1
        token = f"resume-{self._tokens}.invalid"
        self._offers[token] = session
        return token

    def withdraw(self, token: str | None) -> None:
        """Forget an offer that was not used (the dial failed before the handshake started)."""
        if token is not None:
            self._offers.pop(token, None)

    def forget(self, key: object) -> None:
        self._sessions.pop(key, None)

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        if isinstance(server_hostname, str) and server_hostname in self._offers:
            session = self._offers.pop(server_hostname)
            server_hostname = None
        return super().wrap_bio(incoming, outgoing, server_side, server_hostname or None, session)


def _new_context(purpose: ssl.Purpose) -> ssl.SSLContext:
    server = purpose is ssl.Purpose.CLIENT_AUTH
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER) if server else ClientContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols([ALPN_H2])
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    if server:
        # One ticket is enough for a pool connection to resume; it saves a full handshake per dial.
        ctx.num_tickets = 1
    return ctx


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
    ctx = _new_context(purpose)
    ctx.load_verify_locations(cadata=cred.roots_pem)
    _load_chain(ctx, cred)
    return ctx


def server_context(cred: Credential) -> ssl.SSLContext:
    """Server side of HBONE: a client certificate chained to the mesh root is required."""
    return _base_context(ssl.Purpose.CLIENT_AUTH, cred)


def client_context(cred: Credential) -> ssl.SSLContext:
    """Client side of HBONE; the server's identity is checked after the handshake."""
    return _base_context(ssl.Purpose.SERVER_AUTH, cred)


def peer_certificate(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> x509.Certificate:
    """The peer's certificate as a ``cryptography`` object (imported only when this is called)."""
    from cryptography import x509

    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        raise PeerRejected("peer presented no certificate", "no_certificate")
    return x509.load_der_x509_certificate(der)


class _NotAMeshCertificate(ValueError):
    pass


def _identity_of(cert: Mapping[str, object]) -> Identity:
    """The SPIFFE identity in the single URI SAN of a certificate decoded by ``getpeercert()``.

    The same rules (and words) as :func:`mesh.pki.identity_of`: other SAN types are ignored.
    """
    san = cert.get("subjectAltName")
    if not san:
        raise _NotAMeshCertificate("certificate has no subjectAltName")
    assert isinstance(san, tuple)
    try:
        return identity_from_uri_sans([value for kind, value in san if kind == "URI"])
    except IdentityError as e:
        raise _NotAMeshCertificate(str(e)) from None


@functools.lru_cache(maxsize=256)
def _cert_time(text: str) -> float:
    """``ssl.cert_time_to_seconds``, remembered: it runs ``strptime`` (≈ 40 µs), and every
    resumed connection from a peer carries the same two timestamps until its certificate rotates."""
    return float(ssl.cert_time_to_seconds(text))


def _check_validity_now(cert: Mapping[str, object]) -> None:
    """A resumed session skips certificate verification, and its ticket may be hours old: the
    validity period the original handshake checked may have ended since. Check it again."""
    try:
        not_before = _cert_time(str(cert["notBefore"]))
        not_after = _cert_time(str(cert["notAfter"]))
    except (KeyError, ValueError):
        raise PeerRejected(
            "resumed session's peer certificate has no readable validity period", "certificate_rejected"
        ) from None
    now = time.time()
    if now > not_after:
        raise PeerRejected("peer certificate has expired (resumed session)", "certificate_expired")
    if now < not_before:
        raise PeerRejected("peer certificate is not yet valid (resumed session)", "certificate_not_yet_valid")


def verify_peer(
    ssl_object: ssl.SSLObject | ssl.SSLSocket,
    trust_domain: str,
    expect: Identity | Callable[[Identity], bool] | None = None,
) -> Identity:
    """The peer's identity, after checking ALPN, trust domain and (client side) the expected identity.

    Reads the certificate OpenSSL verified during the handshake (``getpeercert()``), so the
    context must verify peers (``CERT_REQUIRED``, as every HBONE context does).
    """
    if ssl_object.selected_alpn_protocol() != ALPN_H2:
        raise PeerRejected(f"peer did not negotiate ALPN {ALPN_H2!r}", "alpn")
    cert = ssl_object.getpeercert()
    if cert is None:
        raise PeerRejected("peer presented no certificate", "no_certificate")
    if not cert:
        # Only a context that does not verify peers (CERT_NONE) hands back an empty dict.
        raise PeerRejected(
            "peer certificate was not verified (the TLS context must require it)", "certificate_rejected"
        )
    if ssl_object.session_reused:
        _check_validity_now(cert)
    try:
        ident = _identity_of(cert)
    except _NotAMeshCertificate as e:
        raise PeerRejected(str(e), "not_a_mesh_identity") from None
    if ident.trust_domain != trust_domain:
        raise PeerRejected(
            f"peer {ident} is from trust domain {ident.trust_domain!r}, want {trust_domain!r}", "trust_domain"
        )
    if isinstance(expect, Identity):
        if ident != expect:
            raise PeerRejected(f"peer is {ident}, expected {expect}", "wrong_identity")
    elif expect is not None and not expect(ident):
        raise PeerRejected(f"peer {ident} is not an acceptable identity", "wrong_identity")
    return ident


def _verify_kind(e: ssl.SSLCertVerificationError) -> str:
    """Why OpenSSL refused a chain: "expired", "not yet valid", "untrusted" or "other"."""
    msg = (e.verify_message or "").lower()
    if "expired" in msg:
        return "expired"
    if "not yet valid" in msg:
        return "not yet valid"
    if "issuer" in msg or "self-signed" in msg or "self signed" in msg or "signature" in msg:
        return "untrusted"
    return "other"


def describe_tls_error(exc: BaseException) -> str:
    """A short, specific reason for a failed handshake, for logs and errors users read."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        kind = _verify_kind(exc)
        if kind == "expired":
            return "peer certificate has expired"
        if kind == "not yet valid":
            return "peer certificate is not yet valid"
        if kind == "untrusted":
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
    if isinstance(exc, TimeoutError) or _is_handshake_timeout(exc):
        return "TLS handshake timed out"
    return f"{type(exc).__name__}: {exc}"


# Why a handshake failed, in one word: the values of a metric label, so a fixed, small set.
FAILURE_KINDS = (
    "timeout",  # the peer did not finish the handshake in time
    "connection_closed",  # the peer hung up or reset during the handshake
    "not_tls",  # what arrived is not TLS (garbage, plaintext HTTP, a truncated record)
    "tls_version",  # not TLS 1.3
    "alpn",  # no h2
    "no_certificate",  # no client certificate
    "certificate_expired",
    "certificate_not_yet_valid",
    "untrusted_certificate",  # not signed by the mesh root
    "certificate_rejected",  # refused by OpenSSL for another reason
    "not_a_mesh_identity",  # no single SPIFFE URI SAN
    "trust_domain",  # another trust domain
    "wrong_identity",  # not the identity the client expected
    "peer_rejected",  # refused after the handshake for another reason
    "too_many_handshakes",  # refused before the handshake: too many in flight (from this peer)
    "tls_error",  # any other TLS failure
)


def _is_handshake_timeout(exc: BaseException) -> bool:
    # uvloop reports its ``ssl_handshake_timeout`` as ConnectionAbortedError, asyncio as TimeoutError.
    return isinstance(exc, ConnectionAbortedError) and "handshake is taking longer" in str(exc)


def handshake_failure_kind(exc: BaseException) -> str:
    """One of :data:`FAILURE_KINDS` for an exception from a TLS handshake or :func:`verify_peer`.

    Metrics label refusals with it (a bounded set, whatever the peer sends); logs carry
    :func:`describe_tls_error`'s words as well.
    """
    if isinstance(exc, PeerRejected):
        return exc.kind
    if isinstance(exc, ssl.SSLCertVerificationError):
        return {
            "expired": "certificate_expired",
            "not yet valid": "certificate_not_yet_valid",
            "untrusted": "untrusted_certificate",
        }.get(_verify_kind(exc), "certificate_rejected")
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or "").lower().replace("_", " ")
        if "did not return a certificate" in reason:
            return "no_certificate"
        if "no application protocol" in reason:
            return "alpn"
        if "unsupported protocol" in reason or "protocol version" in reason:
            return "tls_version"
        if any(
            word in reason
            for word in ("wrong version", "http request", "record", "packet length", "unexpected", "decode")
        ):
            return "not_tls"
        if "expired" in reason:
            return "certificate_expired"
        if "unknown ca" in reason or "bad certificate" in reason or "certificate unknown" in reason:
            return "certificate_rejected"
        return "tls_error"
    if isinstance(exc, TimeoutError) or _is_handshake_timeout(exc):
        return "timeout"
    if isinstance(exc, ConnectionError | EOFError):
        return "connection_closed"
    if isinstance(exc, OSError):
        return "connection_closed"
    return "tls_error"


# -- contexts straight from a credential directory ------------------------------------------------


@dataclass(frozen=True, slots=True)
class DirCredential:
    """HBONE contexts built from a credential directory, and the identity its certificate names."""

    identity: Identity
    server: ssl.SSLContext
    client: ssl.SSLContext


_SSL_SOURCE = re.compile(r"\s*\(_ssl\.c:\d+\)$")


def _ssl_detail(e: BaseException) -> str:
    """An OpenSSL error without the ``(_ssl.c:NNNN)`` suffix."""
    if isinstance(e, ssl.SSLError) and len(e.args) > 1 and isinstance(e.args[1], str):
        text = e.args[1]
    else:
        text = str(e)
    return _SSL_SOURCE.sub("", text)


class _EncryptedKey(Exception):
    pass


class _HandshakeFailed(Exception):
    def __init__(self, error: ssl.SSLError, *, server_side: bool) -> None:
        super().__init__(error)
        self.error = error
        self.server_side = server_side


def _refuse_password() -> str:
    # Without a callback OpenSSL would prompt on the terminal for the key's pass phrase.
    raise _EncryptedKey


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CredentialError(f"{path}: cannot read ({e.strerror})") from None
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise CredentialError(f"{path}: not a PEM file (it is not ASCII text)") from None


def _check_pem_certs(path: Path, text: str) -> None:
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise CredentialError(f"{path}: no certificate found")
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        probe.load_verify_locations(cadata=text)
    except (ssl.SSLError, ValueError) as e:
        raise CredentialError(f"{path}: not a PEM certificate list ({_ssl_detail(e)})") from None


def _dir_context(purpose: ssl.Purpose, chain: Path, key: Path, roots: str) -> ssl.SSLContext:
    ctx = _new_context(purpose)
    ctx.load_verify_locations(cadata=roots)
    try:
        ctx.load_cert_chain(chain, key, password=_refuse_password)
    except _EncryptedKey:
        raise CredentialError(f"{key}: not an unencrypted PEM private key (it needs a pass phrase)") from None
    except ssl.SSLError as e:
        if e.reason == "KEY_VALUES_MISMATCH":
            raise CredentialError(f"{key} does not match the leaf certificate in {chain}") from None
        # The chain parsed already (_check_pem_certs), so a PEM error here is the key's.
        raise CredentialError(f"{key}: not an unencrypted PEM private key ({_ssl_detail(e)})") from None
    return ctx


def _verify_failure(e: ssl.SSLCertVerificationError, chain: Path, root: Path, *, server_side: bool) -> str:
    kind = _verify_kind(e)
    if kind == "expired":
        reason = "a certificate has expired"
    elif kind == "not yet valid":
        reason = "a certificate is not yet valid"
    elif kind == "untrusted":
        reason = f"it is not signed by a certificate in {root.name} ({e.verify_message})"
    elif server_side and "purpose" in (e.verify_message or "").lower():
        return (
            f"{chain}: the leaf certificate cannot be used as a TLS client certificate ({e.verify_message})"
        )
    else:
        reason = e.verify_message or _ssl_detail(e)
    return f"{chain} does not verify against {root}: {reason}"


def _handshake_with_itself(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> Mapping[str, object]:
    """One TLS handshake in memory between the two contexts; the certificate the client verified.

    Raises :class:`_HandshakeFailed` if either end refuses; success proves that the key, chain
    and roots fit together and are valid now.
    """
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_side=False)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    pending = [client, server]
    for _ in range(16):  # TLS 1.3 needs two round trips; the bound only guards against a loop
        for side in list(pending):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                continue
            except ssl.SSLError as e:
                raise _HandshakeFailed(e, server_side=side is server) from None
            pending.remove(side)
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if not pending:
            cert = client.getpeercert()
            assert cert, "a verified handshake always has the peer's certificate"
            return cert
    raise _HandshakeFailed(ssl.SSLError("the TLS handshake did not complete"), server_side=False)


def load_credential_dir(directory: str | os.PathLike[str]) -> DirCredential:
    """Server and client contexts from ``cert-chain.pem``, ``key.pem`` and ``root-cert.pem``.

    Checks what :func:`mesh.pki.read_credential` checks (files readable, PEM, key matches the
    leaf, one SPIFFE URI SAN) without ``cryptography``, and more: one in-memory handshake
    between the two contexts proves that the chain verifies against ``root-cert.pem`` and is
    valid now. The identity comes from that handshake. Errors are :class:`CredentialError`.
    """
    d = Path(directory)
    key, chain, root = d / KEY_FILE, d / CERT_CHAIN_FILE, d / ROOT_CERT_FILE
    if "PRIVATE KEY-----" not in _read_text(key):
        raise CredentialError(f"{key}: not an unencrypted PEM private key (no PEM private key found)")
    chain_text = _read_text(chain)
    roots = _read_text(root)
    _check_pem_certs(chain, chain_text)
    _check_pem_certs(root, roots)
    server = _dir_context(ssl.Purpose.CLIENT_AUTH, chain, key, roots)
    client = _dir_context(ssl.Purpose.SERVER_AUTH, chain, key, roots)
    try:
        cert = _handshake_with_itself(server, client)
    except _HandshakeFailed as e:
        if isinstance(e.error, ssl.SSLCertVerificationError):
            raise CredentialError(_verify_failure(e.error, chain, root, server_side=e.server_side)) from None
        raise CredentialError(
            f"{chain}: a TLS handshake with this credential fails: {_ssl_detail(e.error)}"
        ) from None
    try:
        identity = _identity_of(cert)
    except _NotAMeshCertificate as e:
        raise CredentialError(f"{chain}: leaf {e}") from None
    return DirCredential(identity, server, client)
