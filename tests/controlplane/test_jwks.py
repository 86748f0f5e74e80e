"""The control plane's JWKS cache: jwksUri fetched over HTTPS, refreshed, last good kept on failure,
and shipped inline in the waypoint's WaypointAuthentication resources."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from controlplane.jwks import JwksCache, JwksError, fetch_jwks
from controlplane.xds import ResourceCache
from mesh.model import Store
from mesh.model.policy import JwtRule, PolicyTargetRef, RequestAuthentication
from mesh.xds.waypoint_policy import WAYPOINT_AUTHN_TYPE_URL, waypoint_authn_from_any

TIMEOUT = 20.0
DOC_A = json.dumps({"keys": [{"kty": "EC", "crv": "P-256", "kid": "a", "x": "AA", "y": "AA"}]})
DOC_B = json.dumps({"keys": [{"kty": "EC", "crv": "P-256", "kid": "b", "x": "BB", "y": "BB"}]})


class Jwks:
    """An HTTPS JWKS server on 127.0.0.1 with a certificate of its own; ``doc`` is what it serves."""

    def __init__(self, tmp: Path) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "jwks.test")])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
            )
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256())
        )
        self.cert = tmp / "jwks.pem"
        self.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        keyfile = tmp / "jwks.key"
        keyfile.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        self.doc: str | None = DOC_A
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if outer.doc is None:
                    self.send_error(503)
                    return
                body = outer.doc.encode()
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert, keyfile)
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.uri = f"https://127.0.0.1:{self.server.server_address[1]}/keys"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def trust(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cert))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def jwks_server(tmp_path: Path) -> Iterator[Jwks]:
    s = Jwks(tmp_path)
    yield s
    s.close()


def authn(uri: str) -> RequestAuthentication:
    return RequestAuthentication(
        namespace="shop",
        name="jwt",
        target_refs=(PolicyTargetRef("Service", "web"),),
        jwt_rules=(JwtRule(issuer="https://issuer.test", jwks_uri=uri),),
    )


def test_fetch_verifies_the_server_and_the_document(jwks_server: Jwks) -> None:
    assert fetch_jwks(jwks_server.uri, 5, jwks_server.trust()) == DOC_A
    with pytest.raises(JwksError, match="CERTIFICATE_VERIFY_FAILED"):
        fetch_jwks(jwks_server.uri, 5, None)  # not signed by a system root
    jwks_server.doc = '{"not": "keys"}'
    with pytest.raises(JwksError, match='want an object with a "keys" list'):
        fetch_jwks(jwks_server.uri, 5, jwks_server.trust())


async def test_keys_are_fetched_refreshed_kept_and_shipped(jwks_server: Jwks) -> None:
    store = Store()
    store.replace_all([authn(jwks_server.uri)])
    failed: asyncio.Queue[str] = asyncio.Queue()
    cache = JwksCache(
        store,
        refresh=0.05,
        ssl_context=jwks_server.trust(),
        on_failure=lambda _uri, error: failed.put_nowait(error),
    )
    changed = asyncio.Event()
    cache.subscribe(lambda _v: changed.set())
    resources = ResourceCache(store, cache)
    cache.start()
    try:
        await asyncio.wait_for(changed.wait(), TIMEOUT)
        assert cache.documents() == {jwks_server.uri: DOC_A}
        entry = resources.current().by_type[WAYPOINT_AUTHN_TYPE_URL]["shop/jwt"]
        shipped = waypoint_authn_from_any(entry.resource.resource, "shop/jwt")
        assert shipped.jwks_by_uri == {jwks_server.uri: DOC_A}
        # Rotation: the next refresh brings the new keys, and the resource follows.
        changed.clear()
        jwks_server.doc = DOC_B
        await asyncio.wait_for(changed.wait(), TIMEOUT)
        entry = resources.current().by_type[WAYPOINT_AUTHN_TYPE_URL]["shop/jwt"]
        assert waypoint_authn_from_any(entry.resource.resource, "shop/jwt").jwks_by_uri == {
            jwks_server.uri: DOC_B
        }
        # The server failing keeps the last good keys.
        jwks_server.doc = None
        version = cache.version
        for _ in range(2):
            assert "503" in await asyncio.wait_for(failed.get(), TIMEOUT)
        assert cache.documents() == {jwks_server.uri: DOC_B} and cache.version == version
        # The policy removed: its keys are dropped.
        store.replace_all([])
        await asyncio.sleep(0)  # the store's change is handled on the loop's next turn
        assert cache.documents() == {}
    finally:
        await cache.aclose()
        resources.close()
