"""mesh.tls without cryptography: peer checks from ``getpeercert()`` and contexts from a credential dir."""

from __future__ import annotations

import datetime as dt
import re
import ssl
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from mesh import pki, tls
from mesh.identity import Identity
from mesh.pki import (
    CertificateAuthority,
    Credential,
    PkiError,
    cert_to_pem,
    generate_key,
    identity_of,
    key_to_pem,
    write_credential,
)
from mesh.tls import (
    CredentialError,
    PeerRejected,
    client_context,
    load_credential_dir,
    peer_certificate,
    server_context,
    verify_peer,
)
from tests.pkihelpers import forged_credential

SERVER_ID = Identity("cluster.local", "shop", "web")
CLIENT_ID = Identity("cluster.local", "shop", "frontend")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.generate()


@pytest.fixture(scope="module")
def client_cred(ca: CertificateAuthority) -> Credential:
    return ca.issue(CLIENT_ID)


def leaf_with_sans(ca: CertificateAuthority, sans: Sequence[x509.GeneralName] | None) -> Credential:
    """A leaf signed by ``ca`` naming exactly ``sans`` (no SAN extension at all if None)."""
    key = generate_key()
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "leaf")]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    cert = builder.sign(ca.key, hashes.SHA256())
    return Credential(key_pem=key_to_pem(key), chain_pem=(cert_to_pem(cert),), roots_pem=ca.roots_pem)


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """A TLS handshake in memory; returns (client, server) SSL objects."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_side=False)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    pending = [client, server]
    for _ in range(16):
        for side in list(pending):
            try:
                side.do_handshake()
                pending.remove(side)
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if not pending:
            return client, server
    raise AssertionError("handshake did not complete")


def server_presenting(cred: Credential, client_cred: Credential) -> ssl.SSLObject:
    """The client end of a handshake with a server presenting ``cred``: its peer is that cert."""
    client, _ = handshake(server_context(cred), client_context(client_cred))
    return client


# -- verify_peer from getpeercert() ---------------------------------------------------------------


def test_verify_peer_accepts_mesh_identity(ca: CertificateAuthority, client_cred: Credential) -> None:
    client, server = handshake(server_context(ca.issue(SERVER_ID)), client_context(client_cred))
    assert verify_peer(client, "cluster.local", SERVER_ID) == SERVER_ID
    assert verify_peer(server, "cluster.local") == CLIENT_ID
    assert verify_peer(client, "cluster.local", lambda i: i.namespace == "shop") == SERVER_ID


def test_other_san_types_are_ignored(ca: CertificateAuthority, client_cred: Credential) -> None:
    cred = leaf_with_sans(ca, [x509.DNSName("web.shop"), x509.UniformResourceIdentifier(SERVER_ID.uri)])
    assert verify_peer(server_presenting(cred, client_cred), "cluster.local", SERVER_ID) == SERVER_ID


@pytest.mark.parametrize(
    ("sans", "message"),
    [
        (None, "certificate has no subjectAltName"),
        ([x509.DNSName("web.shop")], "certificate has 0 URI SANs, want exactly one SPIFFE URI"),
        (
            [
                x509.UniformResourceIdentifier(SERVER_ID.uri),
                x509.UniformResourceIdentifier("spiffe://cluster.local/ns/shop/sa/db"),
            ],
            "certificate has 2 URI SANs, want exactly one SPIFFE URI",
        ),
        (
            [x509.UniformResourceIdentifier("https://web.shop/")],
            "certificate URI SAN is not a mesh identity: ",
        ),
        (
            [x509.UniformResourceIdentifier("spiffe://cluster.local/web")],
            "certificate URI SAN is not a mesh identity: ",
        ),
    ],
)
def test_verify_peer_refuses_certificate_names(
    ca: CertificateAuthority,
    client_cred: Credential,
    sans: list[x509.GeneralName] | None,
    message: str,
) -> None:
    cred = leaf_with_sans(ca, sans)
    client = server_presenting(cred, client_cred)
    with pytest.raises(PeerRejected) as info:
        verify_peer(client, "cluster.local", SERVER_ID)
    assert str(info.value).startswith(message), info.value
    # Word for word what mesh.pki (cryptography) says about the same certificate.
    with pytest.raises(PkiError) as pki_info:
        identity_of(peer_certificate(client))
    assert str(info.value) == str(pki_info.value)


def test_verify_peer_refuses_other_trust_domain(ca: CertificateAuthority, client_cred: Credential) -> None:
    client = server_presenting(forged_credential(ca, Identity("evil.org", "shop", "web")), client_cred)
    with pytest.raises(
        PeerRejected,
        match="peer spiffe://evil.org/ns/shop/sa/web is from trust domain 'evil.org', want 'cluster.local'",
    ):
        verify_peer(client, "cluster.local")


def test_verify_peer_refuses_unexpected_identity(ca: CertificateAuthority, client_cred: Credential) -> None:
    client = server_presenting(ca.issue(SERVER_ID), client_cred)
    db = Identity("cluster.local", "shop", "db")
    with pytest.raises(PeerRejected, match=f"peer is {SERVER_ID}, expected {db}"):
        verify_peer(client, "cluster.local", db)
    with pytest.raises(PeerRejected, match=f"peer {SERVER_ID} is not an acceptable identity"):
        verify_peer(client, "cluster.local", lambda i: i.service_account == "db")


def test_verify_peer_refuses_missing_certificate(ca: CertificateAuthority) -> None:
    server_ctx = server_context(ca.issue(SERVER_ID))
    server_ctx.verify_mode = ssl.CERT_OPTIONAL
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.load_verify_locations(cadata=ca.roots_pem)
    client_ctx.set_alpn_protocols(["h2"])
    _, server = handshake(server_ctx, client_ctx)
    with pytest.raises(PeerRejected, match="^peer presented no certificate$"):
        verify_peer(server, "cluster.local")


def test_verify_peer_refuses_unverified_certificate(ca: CertificateAuthority) -> None:
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    client_ctx.set_alpn_protocols(["h2"])
    server_ctx = server_context(ca.issue(SERVER_ID))
    server_ctx.verify_mode = ssl.CERT_NONE
    client, _ = handshake(server_ctx, client_ctx)
    with pytest.raises(PeerRejected, match="not verified"):
        verify_peer(client, "cluster.local", SERVER_ID)


def test_verify_peer_refuses_missing_alpn(ca: CertificateAuthority, client_cred: Credential) -> None:
    client_ctx = client_context(client_cred)
    client_ctx.set_alpn_protocols(["http/1.1"])
    server_ctx = server_context(ca.issue(SERVER_ID))
    server_ctx.set_alpn_protocols(["h2", "http/1.1"])
    client, _ = handshake(server_ctx, client_ctx)
    with pytest.raises(PeerRejected, match="did not negotiate ALPN 'h2'"):
        verify_peer(client, "cluster.local", SERVER_ID)


# -- load_credential_dir ---------------------------------------------------------------------------


def test_file_names_match_mesh_pki() -> None:
    assert (tls.CERT_CHAIN_FILE, tls.KEY_FILE, tls.ROOT_CERT_FILE) == (
        pki.CERT_CHAIN_FILE,
        pki.KEY_FILE,
        pki.ROOT_CERT_FILE,
    )


def test_load_credential_dir(tmp_path: Path, ca: CertificateAuthority, client_cred: Credential) -> None:
    write_credential(tmp_path, ca.issue(SERVER_ID))
    loaded = load_credential_dir(tmp_path)
    assert loaded.identity == SERVER_ID
    for ctx in (loaded.server, loaded.client):
        assert ctx.minimum_version == ctx.maximum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert not ctx.check_hostname
    assert loaded.server.num_tickets == 1
    # Both contexts talk to contexts made from a Credential by the other route.
    client, server = handshake(loaded.server, client_context(client_cred))
    assert verify_peer(client, "cluster.local", SERVER_ID) == SERVER_ID
    assert verify_peer(server, "cluster.local") == CLIENT_ID
    client, server = handshake(server_context(client_cred), loaded.client)
    assert verify_peer(client, "cluster.local", CLIENT_ID) == CLIENT_ID
    assert verify_peer(server, "cluster.local") == SERVER_ID


def test_load_credential_dir_with_intermediate(tmp_path: Path) -> None:
    """cert-chain.pem = leaf + intermediate, root-cert.pem = the root (Istio's plugged-in CA)."""
    root = CertificateAuthority.generate()
    key = generate_key()
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(x509.NameOID.ORGANIZATION_NAME, "intermediate")])
    inter_cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(root.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(root.key, hashes.SHA256())
    )
    inter = CertificateAuthority("cluster.local", key, inter_cert, [inter_cert], root.roots)
    cred = inter.issue(SERVER_ID)
    write_credential(tmp_path, cred)
    assert len(cred.chain_pem) == 2
    assert load_credential_dir(tmp_path).identity == SERVER_ID


def _bad_dir(tmp_path: Path, cred: Credential) -> Path:
    write_credential(tmp_path, cred)
    return tmp_path


def _expect(directory: Path, message: str) -> None:
    with pytest.raises(CredentialError) as info:
        load_credential_dir(directory)
    assert message.format(d=directory) in str(info.value), str(info.value)


def test_missing_file(tmp_path: Path, ca: CertificateAuthority) -> None:
    _expect(tmp_path, "{d}/key.pem: cannot read (No such file or directory)")
    write_credential(tmp_path, ca.issue(SERVER_ID))
    (tmp_path / "root-cert.pem").unlink()
    _expect(tmp_path, "{d}/root-cert.pem: cannot read (No such file or directory)")


def test_key_does_not_match_chain(tmp_path: Path, ca: CertificateAuthority) -> None:
    good, other = ca.issue(SERVER_ID), ca.issue(SERVER_ID)
    d = _bad_dir(tmp_path, Credential(other.key_pem, good.chain_pem, good.roots_pem))
    _expect(d, "{d}/key.pem does not match the leaf certificate in {d}/cert-chain.pem")


def test_chain_from_another_root(tmp_path: Path, ca: CertificateAuthority) -> None:
    other = CertificateAuthority.generate().issue(SERVER_ID)
    d = _bad_dir(tmp_path, Credential(other.key_pem, other.chain_pem, ca.roots_pem))
    _expect(
        d,
        "{d}/cert-chain.pem does not verify against {d}/root-cert.pem: "
        "it is not signed by a certificate in root-cert.pem",
    )


@pytest.mark.parametrize(
    ("start", "end", "message"),
    [(-2, -1, "a certificate has expired"), (1, 2, "a certificate is not yet valid")],
)
def test_certificate_out_of_validity(
    tmp_path: Path, ca: CertificateAuthority, start: int, end: int, message: str
) -> None:
    now = dt.datetime.now(dt.UTC)
    cred = forged_credential(
        ca, SERVER_ID, not_before=now + dt.timedelta(hours=start), not_after=now + dt.timedelta(hours=end)
    )
    _expect(
        _bad_dir(tmp_path, cred), "{d}/cert-chain.pem does not verify against {d}/root-cert.pem: " + message
    )


def test_certificate_without_mesh_identity(tmp_path: Path, ca: CertificateAuthority) -> None:
    cred = leaf_with_sans(
        ca,
        [
            x509.UniformResourceIdentifier(SERVER_ID.uri),
            x509.UniformResourceIdentifier(CLIENT_ID.uri),
        ],
    )
    _expect(
        _bad_dir(tmp_path, cred),
        "{d}/cert-chain.pem: leaf certificate has 2 URI SANs, want exactly one SPIFFE URI",
    )


@pytest.mark.parametrize(
    ("file", "content", "message"),
    [
        ("cert-chain.pem", b"hello", "{d}/cert-chain.pem: no certificate found"),
        (
            "cert-chain.pem",
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            "{d}/cert-chain.pem: not a PEM certificate list",
        ),
        ("root-cert.pem", b"", "{d}/root-cert.pem: no certificate found"),
        ("key.pem", b"hello", "{d}/key.pem: not an unencrypted PEM private key"),
        (
            "key.pem",
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            "{d}/key.pem: not an unencrypted PEM private key",
        ),
        ("key.pem", b"\xff\xfe", "{d}/key.pem: not a PEM file"),
    ],
)
def test_garbled_file(
    tmp_path: Path, ca: CertificateAuthority, file: str, content: bytes, message: str
) -> None:
    write_credential(tmp_path, ca.issue(SERVER_ID))
    (tmp_path / file).write_bytes(content)
    _expect(tmp_path, message)


def test_encrypted_key_is_refused_without_prompting(tmp_path: Path, ca: CertificateAuthority) -> None:
    cred = ca.issue(SERVER_ID)
    key = serialization.load_pem_private_key(cred.key_pem, None)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    write_credential(tmp_path, Credential(encrypted, cred.chain_pem, cred.roots_pem))
    _expect(tmp_path, "{d}/key.pem: not an unencrypted PEM private key (it needs a pass phrase)")


# -- the hbone tool never loads cryptography -------------------------------------------------------


def test_hbone_tool_does_not_import_cryptography() -> None:
    code = (
        "import sys, ambientctl.main, ambientctl.hbone, mesh.tls, mesh.hbone.client, mesh.hbone.server, mesh.hbone.relay, mesh.hbone.pool\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'cryptography'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


class _FakeSession:
    def __init__(self, has_ticket: bool = True) -> None:
        self.has_ticket = has_ticket


def test_client_context_keeps_a_bounded_number_of_resumable_sessions() -> None:
    from typing import Any, cast

    from mesh.tls import ClientContext

    ctx = ClientContext()
    ctx.MAX_SESSIONS = 3
    ctx.remember("no-ticket", cast(Any, _FakeSession(has_ticket=False)))
    assert ctx.offer("no-ticket") is None  # nothing to resume from a session without a ticket
    for key in ("a", "b", "c", "d"):
        ctx.remember(key, cast(Any, _FakeSession()))
    assert ctx.offer("a") is None  # the oldest went
    token = ctx.offer("d")
    assert token is not None and token.endswith(".invalid")
    ctx.withdraw(token)
    ctx.forget("d")
    assert ctx.offer("d") is None


class _ResumedSession:
    """What verify_peer reads from an SSLObject whose handshake resumed a session."""

    def __init__(self, not_before: str, not_after: str) -> None:
        self.session_reused = True
        self._cert = {
            "subjectAltName": (("URI", "spiffe://cluster.local/ns/shop/sa/web"),),
            "notBefore": not_before,
            "notAfter": not_after,
        }

    def selected_alpn_protocol(self) -> str:
        return "h2"

    def getpeercert(self) -> dict[str, object]:
        return self._cert


@pytest.mark.parametrize(
    ("not_before", "not_after", "reason"),
    [
        ("Jan  1 00:00:00 2020 GMT", "Jan  1 00:00:00 2021 GMT", "expired (resumed session)"),
        ("Jan  1 00:00:00 2999 GMT", "Jan  1 00:00:00 3000 GMT", "not yet valid (resumed session)"),
        ("yesterday", "tomorrow", "no readable validity period"),
    ],
)
def test_resumed_session_is_refused_once_the_certificate_is_out_of_date(
    not_before: str, not_after: str, reason: str
) -> None:
    from typing import Any, cast

    from mesh.tls import PeerRejected, verify_peer

    with pytest.raises(PeerRejected, match=re.escape(reason)):
        verify_peer(cast(Any, _ResumedSession(not_before, not_after)), "cluster.local")


def test_resumed_session_with_a_current_certificate_is_accepted() -> None:
    from typing import Any, cast

    from mesh.tls import verify_peer

    ident = verify_peer(
        cast(Any, _ResumedSession("Jan  1 00:00:00 2020 GMT", "Jan  1 00:00:00 2999 GMT")), "cluster.local"
    )
    assert str(ident) == "spiffe://cluster.local/ns/shop/sa/web"
