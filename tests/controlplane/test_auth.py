"""Kubernetes TokenReview authentication against a stub API server speaking the real JSON."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from kubernetes import client

from controlplane.auth import (
    AuthenticationError,
    AuthenticatorUnavailable,
    Caller,
    TokenReviewAuthenticator,
    parse_service_account_username,
)

REVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"

ZTUNNEL_USER = {
    "username": "system:serviceaccount:istio-system:ztunnel",
    "uid": "sa-uid",
    "groups": ["system:serviceaccounts"],
    "extra": {
        "authentication.kubernetes.io/pod-name": ["ztunnel-a"],
        "authentication.kubernetes.io/pod-uid": ["uid-zt-a"],
        "authentication.kubernetes.io/node-name": ["node-a"],
    },
}

# token -> (HTTP status, TokenReview status)
ANSWERS: dict[str, tuple[int, dict[str, Any]]] = {
    "good": (201, {"authenticated": True, "audiences": ["istio-ca"], "user": ZTUNNEL_USER}),
    "unbound": (
        201,
        {"authenticated": True, "user": {"username": "system:serviceaccount:shop:web"}},
    ),
    "bad": (201, {"authenticated": False, "error": "invalid bearer token, token lookup failed"}),
    "other-audience": (201, {"authenticated": True, "audiences": ["vault"], "user": ZTUNNEL_USER}),
    "human": (201, {"authenticated": True, "audiences": ["istio-ca"], "user": {"username": "alice"}}),
    "forbidden": (403, {}),
    "broken": (500, {}),
}


class _Handler(BaseHTTPRequestHandler):
    server: _ApiServer

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append((self.path, body))
        if self.path != REVIEW_PATH:
            self.send_error(404)
            return
        code, status = ANSWERS[body["spec"]["token"]]
        if code >= 400:
            payload: dict[str, Any] = {
                "kind": "Status",
                "apiVersion": "v1",
                "status": "Failure",
                "code": code,
            }
        else:
            payload = {**body, "status": status}
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _ApiServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[tuple[str, Any]] = []


@pytest.fixture
def api_server() -> Iterator[_ApiServer]:
    server = _ApiServer()
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), name="fake-apiserver")
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def authenticator(api_server: _ApiServer) -> Iterator[TokenReviewAuthenticator]:
    config = client.Configuration()
    config.host = f"http://127.0.0.1:{api_server.server_address[1]}"
    with client.ApiClient(config) as api:
        yield TokenReviewAuthenticator(api)
        api.rest_client.pool_manager.clear()


async def test_pod_bound_token(authenticator: TokenReviewAuthenticator, api_server: _ApiServer) -> None:
    caller = await authenticator.authenticate("good")
    assert caller == Caller("istio-system", "ztunnel", "ztunnel-a", "uid-zt-a", "node-a", source="kubernetes")
    path, body = api_server.requests[0]
    assert path == REVIEW_PATH
    assert body["kind"] == "TokenReview"
    assert body["spec"] == {"token": "good", "audiences": ["istio-ca"]}


async def test_token_without_pod_binding(authenticator: TokenReviewAuthenticator) -> None:
    caller = await authenticator.authenticate("unbound")
    assert caller == Caller("shop", "web", source="kubernetes")


@pytest.mark.parametrize(
    ("token", "error", "reason"),
    [
        ("bad", AuthenticationError, "token lookup failed"),
        ("other-audience", AuthenticationError, "audiences"),
        ("human", AuthenticationError, "not a service account"),
        ("forbidden", AuthenticatorUnavailable, "403"),
        ("broken", AuthenticatorUnavailable, "500"),
    ],
)
async def test_refusals(
    authenticator: TokenReviewAuthenticator, token: str, error: type[Exception], reason: str
) -> None:
    with pytest.raises(error, match=reason):
        await authenticator.authenticate(token)


async def test_api_server_unreachable(api_server: _ApiServer) -> None:
    config = client.Configuration()
    config.host = "http://127.0.0.1:1"
    config.retries = False
    with client.ApiClient(config) as api:
        with pytest.raises(AuthenticatorUnavailable, match="TokenReview failed"):
            await TokenReviewAuthenticator(api).authenticate("good")
        api.rest_client.pool_manager.clear()


@pytest.mark.parametrize(
    ("username", "ok"),
    [
        ("system:serviceaccount:shop:web", ("shop", "web")),
        ("system:serviceaccount:shop", None),
        ("system:serviceaccount:shop:web:extra", None),
        ("system:node:node-a", None),
    ],
)
def test_parse_username(username: str, ok: tuple[str, str] | None) -> None:
    if ok is None:
        with pytest.raises(AuthenticationError):
            parse_service_account_username(username)
    else:
        assert parse_service_account_username(username) == ok
