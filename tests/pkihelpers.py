"""Certificates the CA would never issue, for the refusal tests."""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from mesh.identity import Identity
from mesh.pki import CertificateAuthority, Credential, cert_to_pem, generate_key, key_to_pem


def forged_credential(
    ca: CertificateAuthority,
    identity: Identity,
    *,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> Credential:
    """A leaf signed by ``ca`` with arbitrary validity (e.g. already expired) and any trust domain."""
    now = dt.datetime.now(dt.UTC)
    key = generate_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - dt.timedelta(hours=1))
        .not_valid_after(not_after or now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]), critical=True
        )
        .sign(ca.key, hashes.SHA256())
    )
    return Credential(key_pem=key_to_pem(key), chain_pem=(cert_to_pem(cert),), roots_pem=ca.roots_pem)
