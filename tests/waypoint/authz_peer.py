"""A test external authorizer for the netns tests, run inside a pod with ``ip netns exec``.

    python authz_peer.py GRPC_PORT HTTP_PORT

Speaks both of Envoy's ext_authz APIs, as Istio's sample ``ext-authz`` server does: a real
grpcio ``envoy.service.auth.v3.Authorization/Check`` server (our stubs, Envoy's field numbers)
and an HTTP authorizer. The decision is the request's ``x-ext-authz`` header:

* ``allow`` — allowed; the request gets ``x-ext-authz-check-result: allowed`` (replacing any),
  plus what the authorizer saw, for the tests to check (``x-ext-authz-seen-*``); the gRPC one
  removes ``x-remove-me`` and adds ``x-ext-authz-response`` to the response;
* ``slow`` — answers ``allow`` after 3 s (tests set a shorter timeout);
* ``body`` (gRPC) — allows when the body it was sent says ``please``;
* anything else — denied: 403 (gRPC: PERMISSION_DENIED with a ``denied_response``), a body
  naming the header, ``x-ext-authz-check-result: denied``.
"""

from __future__ import annotations

import sys
import time
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from threading import Thread

import grpc

from mesh.proto import core_pb2, ext_authz_pb2, ext_authz_pb2_grpc

DENIED_BODY = "denied by ext_authz for not found header `x-ext-authz: allow` in the request"


def _option(
    key: str, value: str, action: int = core_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
) -> core_pb2.HeaderValueOption:
    return core_pb2.HeaderValueOption(header=core_pb2.HeaderValue(key=key, value=value), append_action=action)


class Authorizer(ext_authz_pb2_grpc.AuthorizationServicer):
    def Check(
        self, request: ext_authz_pb2.CheckRequest, context: grpc.ServicerContext
    ) -> ext_authz_pb2.CheckResponse:
        a = request.attributes
        http = a.request.http
        verdict = http.headers.get("x-ext-authz", "")
        if verdict == "body":  # decide by the body it was sent (includeRequestBodyInCheck)
            text = http.body or http.raw_body.decode("utf-8", "replace")
            verdict = "allow" if "please" in text else "deny"
        if verdict == "slow":
            time.sleep(3)
            verdict = "allow"
        if verdict == "allow":
            dst = a.destination.address.socket_address
            return ext_authz_pb2.CheckResponse(
                ok_response=ext_authz_pb2.OkHttpResponse(
                    headers=[
                        _option("x-ext-authz-check-result", "allowed"),
                        _option("x-ext-authz-seen-source", a.source.principal),
                        _option(
                            "x-ext-authz-seen-destination",
                            f"{dst.address}:{dst.port_value} {a.destination.service}",
                        ),
                        _option(
                            "x-ext-authz-seen-request",
                            f"{http.method} {http.path} {http.host} {http.protocol}",
                        ),
                        _option(
                            "x-ext-authz-seen-body",
                            f"{len(http.body or http.raw_body)} {http.headers.get('x-envoy-auth-partial-body', 'false')}",
                        ),
                    ],
                    headers_to_remove=["x-remove-me"],
                    response_headers_to_add=[_option("x-ext-authz-response", "grpc")],
                )
            )
        return ext_authz_pb2.CheckResponse(
            status={"code": 7, "message": "not allowed"},
            denied_response=ext_authz_pb2.DeniedHttpResponse(
                status={"code": 403},
                body=DENIED_BODY,
                headers=[_option("x-ext-authz-check-result", "denied")],
            ),
        )


class HttpAuthorizer(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _check(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        verdict = self.headers.get("x-ext-authz", "")
        if verdict == "slow":
            time.sleep(3)
            verdict = "allow"
        if verdict == "allow":
            self.send_response(200)
            self.send_header("x-ext-authz-check-result", "allowed")
            self.send_header(
                "x-ext-authz-seen-request", f"{self.command} {self.path} {self.headers.get('host')}"
            )
            self.send_header("x-ext-authz-seen-headers", ",".join(sorted(k.lower() for k in self.headers)))
            self.send_header("x-not-for-upstream", "1")
            self.send_header("content-length", "0")
            self.end_headers()
            return
        body = DENIED_BODY.encode()
        self.send_response(403)
        self.send_header("x-ext-authz-check-result", "denied")
        self.send_header("x-internal-detail", "not for clients")
        self.send_header("content-type", "text/plain")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _check

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> None:
    grpc_port, http_port = int(sys.argv[1]), int(sys.argv[2])
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=[("grpc.enable_http_proxy", 0)])
    ext_authz_pb2_grpc.add_AuthorizationServicer_to_server(Authorizer(), server)
    server.add_insecure_port(f"0.0.0.0:{grpc_port}")
    server.start()
    http = ThreadingHTTPServer(("0.0.0.0", http_port), HttpAuthorizer)
    Thread(target=http.serve_forever, daemon=True).start()
    print("ready", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
