"""A real grpcio server or client for the netns tests, run inside a pod with ``ip netns exec``.

    python grpc_peer.py serve PORT          serves demo.Shop/Order and demo.Shop/Admin (bytes in, bytes out)
    python grpc_peer.py call HOST:PORT RPC  one unary call; prints "OK <reply>" or "<CODE> <details>"

Generic handlers with raw bytes: no generated code needed.
"""

from __future__ import annotations

import sys
from concurrent import futures

import grpc

OPTIONS = [("grpc.enable_http_proxy", 0)]


def serve(port: int) -> None:
    def order(request: bytes, context: grpc.ServicerContext) -> bytes:
        return b"order:" + request

    def admin(request: bytes, context: grpc.ServicerContext) -> bytes:
        return b"admin:" + request

    handler = grpc.method_handlers_generic_handler(
        "demo.Shop",
        {
            "Order": grpc.unary_unary_rpc_method_handler(order),
            "Admin": grpc.unary_unary_rpc_method_handler(admin),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"0.0.0.0:{port}")
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


def call(target: str, rpc: str) -> None:
    with grpc.insecure_channel(target, options=OPTIONS) as channel:
        fn = channel.unary_unary(f"/demo.Shop/{rpc}")
        try:
            reply = fn(b"x", timeout=20)
        except grpc.RpcError as e:
            print(f"{e.code().name} {e.details()}", flush=True)  # type: ignore[attr-defined]
            return
        print(f"OK {reply.decode()}", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]))
    else:
        call(sys.argv[2], sys.argv[3])
