"""Keys, CSRs, the mesh CA, and credential files in Istio's layout.

Security rules live here, in one place, so the CA process and the tests share them:
a CSR is signed only if its signature verifies, it names exactly one SPIFFE URI SAN in the CA's
trust domain (and nothing else), and its key is ECDSA P-256 or RSA >= 2048. The issued leaf is
never a CA and never outlives the CA that signed it.
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mesh.files import write_atomic
from mesh.identity import Identity, IdentityError, identity_from_uri_sans
from mesh.tls import CERT_CHAIN_FILE, KEY_FILE, ROOT_CERT_FILE  # defined with the ssl-only loader

DEFAULT_LEAF_TTL = dt.timedelta(hours=24)
MAX_LEAF_TTL = dt.timedelta(hours=24)
ROOT_TTL = dt.timedelta(days=3650)
# Certificates are back-dated a little so that a peer whose clock runs slightly behind accepts them.
CLOCK_SKEW = dt.timedelta(minutes=1)
# What a CA certificate (root or intermediate) may do: sign certificates and CRLs.
CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)

# Istio's file names, for workload credentials and for a plugged-in CA ("cacerts").
CA_CERT_FILE = "ca-cert.pem"
CA_KEY_FILE = "ca-key.pem"

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class PkiError(Exception):
    """A key, certificate or CA directory is unusable; the message says which and why."""


class CsrRejected(PkiError):
    """The CA refuses to sign a CSR; the message is the reason given to the caller."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 key, the only key type the mesh itself makes."""
    return ec.generate_private_key(ec.SECP256R1())


def key_to_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_to_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def load_pem_certs(data: bytes | str, what: str) -> list[x509.Certificate]:
    """All certificates in a PEM blob; an empty or garbled blob is an error naming ``what``."""
    raw = data.encode() if isinstance(data, str) else data
    try:
        certs = x509.load_pem_x509_certificates(raw)
    except ValueError as e:
        raise PkiError(f"{what}: not a PEM certificate list ({e})") from None
    if not certs:
        raise PkiError(f"{what}: no certificate found")
    return certs


def load_pem_key(data: bytes, what: str) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise PkiError(f"{what}: not an unencrypted PEM private key ({e})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise PkiError(f"{what}: unsupported key type {type(key).__name__}")
    return key


def identity_of(cert: x509.Certificate) -> Identity:
    """The SPIFFE identity in a certificate's single URI SAN."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise PkiError("certificate has no subjectAltName") from None
    try:
        return identity_from_uri_sans(san.get_values_for_type(x509.UniformResourceIdentifier))
    except IdentityError as e:
        raise PkiError(str(e)) from None


def make_csr(identity: Identity, key: ec.EllipticCurvePrivateKey | None = None) -> tuple[bytes, bytes]:
    """A key (new unless given) and a CSR naming only ``identity``. Returns (key PEM, CSR PEM)."""
    key = key or generate_key()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return key_to_pem(key), csr.public_bytes(serialization.Encoding.PEM)


def _check_public_key(pub: object) -> None:
    if isinstance(pub, ec.EllipticCurvePublicKey):
        if not isinstance(pub.curve, ec.SECP256R1):
            raise CsrRejected(f"ECDSA key on curve {pub.curve.name}, only P-256 is accepted")
        return
    if isinstance(pub, rsa.RSAPublicKey):
        if pub.key_size < 2048:
            raise CsrRejected(f"RSA key of {pub.key_size} bits, at least 2048 are required")
        return
    raise CsrRejected(f"key type {type(pub).__name__} is not accepted (want ECDSA P-256 or RSA)")


@dataclass(frozen=True, slots=True)
class Credential:
    """A workload's key and certificate chain plus the roots it trusts. All PEM."""

    key_pem: bytes
    chain_pem: tuple[str, ...]  # leaf first, then intermediates; the root is in roots_pem
    roots_pem: str

    @property
    def leaf(self) -> x509.Certificate:
        return load_pem_certs(self.chain_pem[0], "leaf certificate")[0]

    @property
    def identity(self) -> Identity:
        return identity_of(self.leaf)

    @property
    def not_after(self) -> dt.datetime:
        return self.leaf.not_valid_after_utc

    @property
    def not_before(self) -> dt.datetime:
        return self.leaf.not_valid_before_utc


class CertificateAuthority:
    """Signs workload certificates for one trust domain.

    ``chain`` holds the signing certificate and any intermediates up to (not including) the root;
    for a self-generated root it is just the root itself.
    """

    def __init__(
        self,
        trust_domain: str,
        key: PrivateKey,
        cert: x509.Certificate,
        chain: Sequence[x509.Certificate],
        roots: Sequence[x509.Certificate],
        max_ttl: dt.timedelta = MAX_LEAF_TTL,
    ) -> None:
        self.trust_domain = trust_domain
        self.key = key
        self.cert = cert
        self.chain = list(chain)
        self.roots = list(roots)
        self.max_ttl = max_ttl

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def generate(
        cls, trust_domain: str = "cluster.local", ttl: dt.timedelta = ROOT_TTL
    ) -> CertificateAuthority:
        """A new self-signed ECDSA P-256 root for ``trust_domain``."""
        key = generate_key()
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain)])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + ttl)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(CA_KEY_USAGE, critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(trust_domain, key, cert, [cert], [cert])

    @classmethod
    def load_cacerts(cls, directory: Path | str, trust_domain: str = "cluster.local") -> CertificateAuthority:
        """Load a plugged-in CA in Istio's ``cacerts`` layout, refusing anything inconsistent."""
        d = Path(directory)
        files = {}
        for name in (CA_CERT_FILE, CA_KEY_FILE, ROOT_CERT_FILE, CERT_CHAIN_FILE):
            p = d / name
            try:
                files[name] = p.read_bytes()
            except OSError as e:
                raise PkiError(f"{p}: cannot read ({e.strerror})") from None
        ca_cert = load_pem_certs(files[CA_CERT_FILE], str(d / CA_CERT_FILE))[0]
        ca_key = load_pem_key(files[CA_KEY_FILE], str(d / CA_KEY_FILE))
        roots = load_pem_certs(files[ROOT_CERT_FILE], str(d / ROOT_CERT_FILE))
        chain = load_pem_certs(files[CERT_CHAIN_FILE], str(d / CERT_CHAIN_FILE))

        if not _same_public_key(ca_key.public_key(), ca_cert.public_key()):
            raise PkiError(f"{d / CA_KEY_FILE} does not match the public key of {d / CA_CERT_FILE}")
        try:
            bc = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            bc = None
        if bc is None or not bc.ca:
            raise PkiError(f"{d / CA_CERT_FILE} is not a CA certificate (basicConstraints CA:TRUE missing)")

        # cert-chain.pem goes from ca-cert up towards the root; it may or may not repeat ca-cert
        # and the root. Normalise to: ca-cert, intermediates..., without the root.
        root_fps = {r.fingerprint(hashes.SHA256()) for r in roots}
        links = [c for c in chain if c.fingerprint(hashes.SHA256()) not in root_fps]
        if not links or links[0].fingerprint(hashes.SHA256()) != ca_cert.fingerprint(hashes.SHA256()):
            links.insert(0, ca_cert)
        for child, parent in itertools.pairwise(links):
            _verify_issued(child, parent, f"{d / CERT_CHAIN_FILE}: {child.subject.rfc4514_string()!r}")
        top = links[-1]
        if top.fingerprint(hashes.SHA256()) in root_fps:
            links.pop()
        elif not any(_issued_by(top, r) for r in roots):
            raise PkiError(
                f"{d / CERT_CHAIN_FILE}: chain does not verify to any certificate in "
                f"{d / ROOT_CERT_FILE} (top of chain: {top.subject.rfc4514_string()!r})"
            )
        now = _now()
        for c in [ca_cert, *roots]:
            if c.not_valid_after_utc < now:
                raise PkiError(
                    f"CA certificate {c.subject.rfc4514_string()!r} expired at {c.not_valid_after_utc}"
                )
        return cls(trust_domain, ca_key, ca_cert, links or [ca_cert], roots)

    @classmethod
    def load_or_generate(
        cls, state_dir: Path | str, trust_domain: str = "cluster.local"
    ) -> CertificateAuthority:
        """Load the root kept in ``state_dir`` (cacerts layout) or make and save one on first start."""
        d = Path(state_dir)
        if (d / CA_KEY_FILE).exists():
            return cls.load_cacerts(d, trust_domain)
        ca = cls.generate(trust_domain)
        ca.save(d)
        return ca

    def save(self, directory: Path | str) -> None:
        """Write this CA in the cacerts layout (key file 0600)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        write_atomic(d / CA_KEY_FILE, key_to_pem(self.key), 0o600)
        write_atomic(d / CA_CERT_FILE, cert_to_pem(self.cert).encode(), 0o644)
        write_atomic(d / CERT_CHAIN_FILE, "".join(cert_to_pem(c) for c in self.chain).encode(), 0o644)
        write_atomic(d / ROOT_CERT_FILE, self.roots_pem.encode(), 0o644)

    # -- signing --------------------------------------------------------------------------------

    @property
    def roots_pem(self) -> str:
        return "".join(cert_to_pem(r) for r in self.roots)

    def check_csr(self, csr_pem: bytes | str) -> tuple[x509.CertificateSigningRequest, Identity]:
        """Parse and validate a CSR; returns it with the identity it asks for."""
        raw = csr_pem.encode() if isinstance(csr_pem, str) else csr_pem
        try:
            csr = x509.load_pem_x509_csr(raw)
        except ValueError as e:
            raise CsrRejected(f"CSR is not valid PEM ({e})") from None
        try:
            valid = csr.is_signature_valid
        except (InvalidSignature, ValueError):
            valid = False
        if not valid:
            raise CsrRejected("CSR signature does not verify")
        _check_public_key(csr.public_key())
        try:
            san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            raise CsrRejected("CSR has no subjectAltName; it must name one SPIFFE URI") from None
        except ValueError as e:
            raise CsrRejected(f"CSR extensions are malformed ({e})") from None
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        if len(uris) != 1 or len(san) != 1:
            raise CsrRejected(
                f"CSR subjectAltName has {len(san)} entries ({len(uris)} URIs); "
                "it must be exactly one SPIFFE URI"
            )
        try:
            ident = Identity.parse(uris[0])
        except IdentityError as e:
            raise CsrRejected(f"CSR URI SAN: {e}") from None
        if ident.trust_domain != self.trust_domain:
            raise CsrRejected(
                f"CSR asks for trust domain {ident.trust_domain!r}, this CA signs for {self.trust_domain!r}"
            )
        return csr, ident

    def sign(
        self,
        csr_pem: bytes | str,
        ttl: dt.timedelta | None = None,
        expect: Identity | None = None,
    ) -> list[str]:
        """Sign a CSR; returns the chain as PEM strings, leaf first and root last.

        ``expect`` is the identity the caller was authorized for: a CSR for any other is refused.
        """
        csr, ident = self.check_csr(csr_pem)
        if expect is not None and ident != expect:
            raise CsrRejected(f"CSR asks for {ident}, the caller is authorized for {expect}")
        now = _now()
        want = ttl if ttl is not None and ttl > dt.timedelta(0) else DEFAULT_LEAF_TTL
        not_after = min(now + min(want, self.max_ttl), self.cert.not_valid_after_utc)
        leaf = self._leaf(
            csr.public_key(),
            x509.Name([]),
            [x509.UniformResourceIdentifier(ident.uri)],
            not_after,
            client_auth=True,
        )
        return [cert_to_pem(leaf), *self.intermediates_pem(), *(cert_to_pem(r) for r in self.roots[:1])]

    def intermediates_pem(self) -> list[str]:
        """The signing certificate and intermediates a leaf must present (not the root)."""
        return [cert_to_pem(c) for c in self.chain if c not in self.roots]

    def _leaf(
        self,
        public_key: object,
        subject: x509.Name,
        names: Sequence[x509.GeneralName],
        not_after: dt.datetime,
        *,
        client_auth: bool,
    ) -> x509.Certificate:
        """Every end-entity certificate this CA makes: never a CA, never outliving the CA.

        Workload leaves (``client_auth``) carry only their SPIFFE URI, as a critical SAN with an
        empty subject; a server certificate (the control plane's) names DNS/IP SANs and a CN.
        """
        ekus = [ExtendedKeyUsageOID.SERVER_AUTH]
        if client_auth:
            ekus.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(public_key)  # type: ignore[arg-type]
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - CLOCK_SKEW)
            .not_valid_after(min(not_after, self.cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=client_auth,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage(ekus), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.cert.public_key()),  # type: ignore[arg-type]
                critical=False,
            )
            .add_extension(x509.SubjectAlternativeName(list(names)), critical=not subject)
            .sign(self.key, hashes.SHA256())
        )

    def issue_server_certificate(
        self, common_name: str, names: Sequence[x509.GeneralName], ttl: dt.timedelta
    ) -> tuple[bytes, bytes]:
        """(key PEM, chain PEM without the root) for a TLS server named by DNS/IP ``names``."""
        key = generate_key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        cert = self._leaf(key.public_key(), subject, names, _now() + ttl, client_auth=False)
        return key_to_pem(key), "".join([cert_to_pem(cert), *self.intermediates_pem()]).encode()

    def issue(self, identity: Identity, ttl: dt.timedelta | None = None) -> Credential:
        """Key, CSR and signature in one step: for tests, tools and the control plane's own cert."""
        key_pem, csr_pem = make_csr(identity)
        chain = self.sign(csr_pem, ttl)
        return credential_from_chain(key_pem, chain)


def credential_from_chain(key_pem: bytes, chain: Sequence[str]) -> Credential:
    """Split a CA response (leaf … root) into the workload's chain and its roots."""
    if not chain:
        raise PkiError("empty certificate chain")
    certs = [load_pem_certs(c, f"certificate {i} of the chain") for i, c in enumerate(chain)]
    flat = [c for group in certs for c in group]
    if len(flat) == 1:
        raise PkiError("certificate chain has only the leaf; the root must come last")
    workload = tuple(cert_to_pem(c) for c in flat[:-1])
    return Credential(key_pem=key_pem, chain_pem=workload, roots_pem=cert_to_pem(flat[-1]))


def _same_public_key(a: object, b: object) -> bool:
    def spki(k: object) -> bytes:
        return k.public_bytes(  # type: ignore[attr-defined,no-any-return]
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    return spki(a) == spki(b)


def _issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _verify_issued(child: x509.Certificate, parent: x509.Certificate, what: str) -> None:
    if not _issued_by(child, parent):
        raise PkiError(f"{what} is not signed by {parent.subject.rfc4514_string()!r}")


def write_credential(directory: Path | str, cred: Credential) -> None:
    """Write ``cert-chain.pem``, ``key.pem`` (0600) and ``root-cert.pem`` into ``directory``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    write_atomic(d / KEY_FILE, cred.key_pem, 0o600)
    write_atomic(d / CERT_CHAIN_FILE, "".join(cred.chain_pem).encode(), 0o644)
    write_atomic(d / ROOT_CERT_FILE, cred.roots_pem.encode(), 0o644)


def read_credential(directory: Path | str) -> Credential:
    """Read a credential written by :func:`write_credential` (or by Istio), checking it fits."""
    d = Path(directory)
    blobs = {}
    for name in (KEY_FILE, CERT_CHAIN_FILE, ROOT_CERT_FILE):
        try:
            blobs[name] = (d / name).read_bytes()
        except OSError as e:
            raise PkiError(f"{d / name}: cannot read ({e.strerror})") from None
    key = load_pem_key(blobs[KEY_FILE], str(d / KEY_FILE))
    chain = load_pem_certs(blobs[CERT_CHAIN_FILE], str(d / CERT_CHAIN_FILE))
    roots = load_pem_certs(blobs[ROOT_CERT_FILE], str(d / ROOT_CERT_FILE))
    if not _same_public_key(key.public_key(), chain[0].public_key()):
        raise PkiError(f"{d / KEY_FILE} does not match the leaf certificate in {d / CERT_CHAIN_FILE}")
    root_fps = {r.fingerprint(hashes.SHA256()) for r in roots}
    links = [c for c in chain if c.fingerprint(hashes.SHA256()) not in root_fps]
    cred = Credential(
        key_pem=key_to_pem(key),
        chain_pem=tuple(cert_to_pem(c) for c in links),
        roots_pem="".join(cert_to_pem(r) for r in roots),
    )
    identity_of(chain[0])  # refuse a credential that names no mesh identity
    return cred
