"""MeshConfig ``extensionProviders`` on the wire, in istio/api's own message
(``istio.mesh.v1alpha1.MeshConfig.ExtensionProvider``): the external authorizers CUSTOM
policies name, served to waypoints. Only ext_authz providers travel (a waypoint has no use for
tracing or logging providers). ``from_any(to_any(p)) == p``; receiving validates and names the
resource and field it refuses.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import any_pb2

from mesh.model.meshconfig import (
    DEFAULT_EXT_AUTHZ_TIMEOUT,
    DEFAULT_STATUS_ON_ERROR,
    ExtAuthzGrpc,
    ExtAuthzHttp,
    ExtAuthzRequestBody,
    ExtensionProvider,
)
from mesh.proto import meshconfig_pb2
from mesh.xds.convert import ConversionError

EXTENSION_PROVIDER_TYPE_URL = "type.googleapis.com/istio.mesh.v1alpha1.MeshConfig.ExtensionProvider"

_Pb = meshconfig_pb2.MeshConfig.ExtensionProvider


def _body_to_proto(body: ExtAuthzRequestBody | None, out: _Pb.EnvoyExternalAuthorizationRequestBody) -> None:
    if body is not None:
        out.max_request_bytes = body.max_request_bytes
        out.allow_partial_message = body.allow_partial_message
        out.pack_as_bytes = body.pack_as_bytes


def _body_from_proto(
    pb: _Pb.EnvoyExternalAuthorizationHttpProvider | _Pb.EnvoyExternalAuthorizationGrpcProvider,
) -> ExtAuthzRequestBody | None:
    if not pb.HasField("include_request_body_in_check"):
        return None
    b = pb.include_request_body_in_check
    if b.max_request_bytes == 0:
        raise ConversionError("include_request_body_in_check.max_request_bytes: must be more than 0")
    return ExtAuthzRequestBody(b.max_request_bytes, b.allow_partial_message, b.pack_as_bytes)


def _common_to_proto(
    a: ExtAuthzGrpc | ExtAuthzHttp,
    out: _Pb.EnvoyExternalAuthorizationGrpcProvider | _Pb.EnvoyExternalAuthorizationHttpProvider,
) -> None:
    out.service, out.port, out.fail_open, out.clear_route_cache = a.service, a.port, a.fail_open, a.clear_route_cache
    out.status_on_error = str(a.status_on_error)
    out.timeout.FromNanoseconds(round(a.timeout * 1e9))
    if a.include_request_body is not None:
        _body_to_proto(a.include_request_body, out.include_request_body_in_check)


def extension_provider_to_any(p: ExtensionProvider) -> any_pb2.Any:
    pb = _Pb(name=p.name)
    a = p.ext_authz
    if isinstance(a, ExtAuthzGrpc):
        _common_to_proto(a, pb.envoy_ext_authz_grpc)
    elif isinstance(a, ExtAuthzHttp):
        h = pb.envoy_ext_authz_http
        _common_to_proto(a, h)
        h.path_prefix = a.path_prefix
        h.include_request_headers_in_check.extend(a.include_request_headers)
        h.include_additional_headers_in_check.update(dict(a.include_additional_headers))
        h.headers_to_upstream_on_allow.extend(a.headers_to_upstream_on_allow)
        h.headers_to_downstream_on_deny.extend(a.headers_to_downstream_on_deny)
        h.headers_to_downstream_on_allow.extend(a.headers_to_downstream_on_allow)
    else:
        raise ValueError(f"extension provider {p.name}: only ext_authz providers are sent")
    packed = any_pb2.Any()
    packed.Pack(pb)
    return packed


def _common(
    pb: _Pb.EnvoyExternalAuthorizationHttpProvider | _Pb.EnvoyExternalAuthorizationGrpcProvider, where: str
) -> dict[str, Any]:
    if not pb.service:
        raise ConversionError(f"{where}.service: required")
    if not 1 <= pb.port <= 65535:
        raise ConversionError(f"{where}.port: {pb.port} is not a port")
    status = DEFAULT_STATUS_ON_ERROR
    if pb.status_on_error:
        if not pb.status_on_error.isdigit() or not 200 <= int(pb.status_on_error) <= 599:
            raise ConversionError(
                f"{where}.status_on_error: {pb.status_on_error[:20]!r} is not an HTTP status"
            )
        status = int(pb.status_on_error)
    timeout = pb.timeout.ToNanoseconds() / 1e9 if pb.HasField("timeout") else DEFAULT_EXT_AUTHZ_TIMEOUT
    if timeout <= 0:
        raise ConversionError(f"{where}.timeout: must be positive")
    return {
        "service": pb.service,
        "port": pb.port,
        "timeout": timeout,
        "fail_open": pb.fail_open,
        "status_on_error": status,
        "include_request_body": _body_from_proto(pb),
        "clear_route_cache": pb.clear_route_cache,
    }


def extension_provider_from_any(packed: any_pb2.Any, name: str) -> ExtensionProvider:
    pb = _Pb()
    if not packed.Unpack(pb):
        raise ConversionError(f"extension provider {name}: holds {packed.type_url}, not an ExtensionProvider")
    where = f"extension provider {pb.name or '?'}"
    if pb.name != name:
        raise ConversionError(f"{where}: the resource is named {name}")
    which = pb.WhichOneof("provider")
    if which == "envoy_ext_authz_grpc":
        return ExtensionProvider(
            pb.name,
            ExtAuthzGrpc(**_common(pb.envoy_ext_authz_grpc, f"{where}.envoy_ext_authz_grpc")),
            "envoyExtAuthzGrpc",
        )
    if which == "envoy_ext_authz_http":
        h = pb.envoy_ext_authz_http
        return ExtensionProvider(
            pb.name,
            ExtAuthzHttp(
                **_common(h, f"{where}.envoy_ext_authz_http"),
                path_prefix=h.path_prefix,
                include_request_headers=tuple(h.include_request_headers_in_check)
                + tuple(x.lower() for x in h.include_headers_in_check),
                include_additional_headers=tuple(sorted(h.include_additional_headers_in_check.items())),
                headers_to_upstream_on_allow=tuple(h.headers_to_upstream_on_allow),
                headers_to_downstream_on_deny=tuple(h.headers_to_downstream_on_deny),
                headers_to_downstream_on_allow=tuple(h.headers_to_downstream_on_allow),
            ),
            "envoyExtAuthzHttp",
        )
    raise ConversionError(f"{where}: no ext_authz provider (envoy_ext_authz_grpc or envoy_ext_authz_http)")
