"""Protobuf messages and gRPC stubs of the wire protocols we share with Istio and Envoy.

The ``.proto`` files here are our own text but keep upstream's packages, names and field
numbers, because wire compatibility with istiod and Istio's ztunnel is the point. The
``*_pb2*.py``/``.pyi`` modules are generated and checked in so that running the mesh needs no
protobuf compiler; ``bash scripts/gen_protos.sh`` regenerates them, and a test fails when they
are stale. Never edit them by hand.

- ``ca_pb2`` / ``ca_pb2_grpc``: ``istio.v1.auth`` CreateCertificate (CA, port 15012)
- ``workload_pb2``: ``istio.workload`` Address / Workload / Service (discovery resources)
- ``authorization_pb2``: ``istio.security`` Authorization (discovery resources)
- ``discovery_pb2`` / ``discovery_pb2_grpc``: delta xDS (``envoy.service.discovery.v3``)
- ``core_pb2``: ``envoy.config.core.v3`` Node; ``status_pb2``: ``google.rpc`` Status
- ``zds_pb2``: ``istio.workload.zds``, cni agent -> ztunnel over a unix socket
- ``ext_authz_pb2`` / ``ext_authz_pb2_grpc``: ``envoy.service.auth.v3`` Authorization/Check, what a
  waypoint asks an external authorizer (``http_status_pb2``: ``envoy.type.v3`` HttpStatus)
- ``meshconfig_pb2``: ``istio.mesh.v1alpha1`` MeshConfig.ExtensionProvider (ext_authz providers,
  control plane -> waypoints)
- ``waf_pb2``: ``ambient.waypoint.v1alpha1`` WafPolicy (ours: the WAF settings, control plane ->
  the waypoints a policy binds to)
"""
