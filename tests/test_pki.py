from __future__ import annotations

import datetime as dt
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mesh.identity import Identity
from mesh.pki import (
    CertificateAuthority,
    CsrRejected,
    PkiError,
    credential_from_chain,
    identity_of,
    load_pem_certs,
    make_csr,
    read_credential,
    write_credential,
)

WEB = Identity("cluster.local", "shop", "web")


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.generate("cluster.local")


def _csr(
    sans: list[x509.GeneralName], key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | None = None
) -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=True)
    return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_root_is_p256_ca(ca: CertificateAuthority) -> None:
    assert isinstance(ca.cert.public_key(), ec.EllipticCurvePublicKey)
    assert ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "cluster.local"


def test_issued_leaf(ca: CertificateAuthority) -> None:
    key_pem, csr_pem = make_csr(WEB)
    chain = ca.sign(csr_pem)
    assert len(chain) == 2
    leaf = load_pem_certs(chain[0], "leaf")[0]
    assert identity_of(leaf) == WEB
    ext = leaf.extensions
    assert not ext.get_extension_for_class(x509.BasicConstraints).value.ca
    ku = ext.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and ku.key_encipherment and not ku.key_cert_sign
    eku = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    san = ext.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical and san.value.get_values_for_type(x509.UniformResourceIdentifier) == [WEB.uri]
    life = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert dt.timedelta(hours=24) <= life <= dt.timedelta(hours=24, minutes=2)
    leaf.verify_directly_issued_by(ca.cert)
    cred = credential_from_chain(key_pem, chain)
    assert cred.identity == WEB


def test_ttl_is_capped(ca: CertificateAuthority) -> None:
    _, csr_pem = make_csr(WEB)
    leaf = load_pem_certs(ca.sign(csr_pem, ttl=dt.timedelta(days=365))[0], "leaf")[0]
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc <= dt.timedelta(hours=24, minutes=1)
    short = load_pem_certs(ca.sign(csr_pem, ttl=dt.timedelta(hours=1))[0], "leaf")[0]
    assert short.not_valid_after_utc - short.not_valid_before_utc <= dt.timedelta(hours=1, minutes=1)


@pytest.mark.parametrize(
    ("csr", "reason"),
    [
        (lambda: b"not a csr", "not valid PEM"),
        (lambda: _csr([]), "no subjectAltName"),
        (lambda: _csr([x509.UniformResourceIdentifier(WEB.uri), x509.DNSName("web")]), "2 entries"),
        (
            lambda: _csr(
                [
                    x509.UniformResourceIdentifier(WEB.uri),
                    x509.UniformResourceIdentifier("spiffe://cluster.local/ns/shop/sa/db"),
                ]
            ),
            "2 entries",
        ),
        (
            lambda: _csr([x509.UniformResourceIdentifier("spiffe://other.td/ns/a/sa/b")]),
            "trust domain 'other.td'",
        ),
        (lambda: _csr([x509.UniformResourceIdentifier("https://example.com/")]), "bad scheme"),
        (
            lambda: _csr([x509.UniformResourceIdentifier(WEB.uri)], ec.generate_private_key(ec.SECP384R1())),
            "only P-256",
        ),
        (
            lambda: _csr([x509.UniformResourceIdentifier(WEB.uri)], rsa.generate_private_key(65537, 1024)),
            "at least 2048",
        ),
    ],
)
def test_csr_rejections(ca: CertificateAuthority, csr: object, reason: str) -> None:
    with pytest.raises(CsrRejected, match=reason):
        ca.sign(csr())  # type: ignore[operator]


def test_rsa_2048_accepted(ca: CertificateAuthority) -> None:
    ca.sign(_csr([x509.UniformResourceIdentifier(WEB.uri)], rsa.generate_private_key(65537, 2048)))


def test_bad_signature_rejected(ca: CertificateAuthority) -> None:
    pem = _csr([x509.UniformResourceIdentifier(WEB.uri)])
    der = bytearray(x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x55  # inside the signature
    import base64

    body = base64.encodebytes(bytes(der)).decode()
    tampered = f"-----BEGIN CERTIFICATE REQUEST-----\n{body}-----END CERTIFICATE REQUEST-----\n"
    with pytest.raises(CsrRejected):
        ca.sign(tampered)


def test_sign_for_other_identity_refused(ca: CertificateAuthority) -> None:
    _, csr_pem = make_csr(WEB)
    with pytest.raises(CsrRejected, match="authorized for spiffe://cluster.local/ns/shop/sa/db"):
        ca.sign(csr_pem, expect=Identity("cluster.local", "shop", "db"))


def _intermediate(root: CertificateAuthority) -> CertificateAuthority:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "intermediate")]))
        .issuer_name(root.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(root.key, hashes.SHA256())
    )
    return CertificateAuthority("cluster.local", key, cert, [cert], root.roots)


def test_cacerts_roundtrip_with_intermediate(tmp_path: Path, ca: CertificateAuthority) -> None:
    inter = _intermediate(ca)
    inter.save(tmp_path)
    assert stat.S_IMODE(os.stat(tmp_path / "ca-key.pem").st_mode) == 0o600
    loaded = CertificateAuthority.load_cacerts(tmp_path)
    _, csr_pem = make_csr(WEB)
    chain = loaded.sign(csr_pem)
    certs = [load_pem_certs(c, "c")[0] for c in chain]
    assert len(certs) == 3
    certs[0].verify_directly_issued_by(certs[1])
    certs[1].verify_directly_issued_by(certs[2])
    assert certs[2] == ca.cert


def test_cacerts_key_mismatch(tmp_path: Path, ca: CertificateAuthority) -> None:
    ca.save(tmp_path)
    other = CertificateAuthority.generate()
    (tmp_path / "ca-key.pem").write_bytes(
        other.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    with pytest.raises(PkiError, match="ca-key.pem does not match"):
        CertificateAuthority.load_cacerts(tmp_path)


def test_cacerts_chain_not_to_root(tmp_path: Path, ca: CertificateAuthority) -> None:
    _intermediate(ca).save(tmp_path)
    (tmp_path / "root-cert.pem").write_text(CertificateAuthority.generate().roots_pem)
    with pytest.raises(PkiError, match="does not verify to any certificate"):
        CertificateAuthority.load_cacerts(tmp_path)


def test_cacerts_missing_and_garbage(tmp_path: Path, ca: CertificateAuthority) -> None:
    with pytest.raises(PkiError, match="ca-cert.pem: cannot read"):
        CertificateAuthority.load_cacerts(tmp_path)
    ca.save(tmp_path)
    (tmp_path / "ca-cert.pem").write_text("garbage")
    with pytest.raises(PkiError, match="ca-cert.pem: "):
        CertificateAuthority.load_cacerts(tmp_path)


def test_load_or_generate_persists(tmp_path: Path) -> None:
    first = CertificateAuthority.load_or_generate(tmp_path)
    second = CertificateAuthority.load_or_generate(tmp_path)
    assert first.cert == second.cert


def test_credential_files(tmp_path: Path, ca: CertificateAuthority) -> None:
    cred = ca.issue(WEB)
    write_credential(tmp_path, cred)
    assert stat.S_IMODE(os.stat(tmp_path / "key.pem").st_mode) == 0o600
    assert {p.name for p in tmp_path.iterdir()} == {"cert-chain.pem", "key.pem", "root-cert.pem"}
    back = read_credential(tmp_path)
    assert back.identity == WEB
    assert back.chain_pem == cred.chain_pem
    other = ca.issue(WEB)
    (tmp_path / "key.pem").write_bytes(other.key_pem)
    with pytest.raises(PkiError, match="key.pem does not match"):
        read_credential(tmp_path)
