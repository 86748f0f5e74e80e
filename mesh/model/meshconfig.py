"""Istio's MeshConfig, the part this mesh reads: ``extensionProviders`` for CUSTOM authorization.

Istio keeps mesh-wide settings in the ConfigMap ``istio`` of its root namespace (key ``mesh``,
a YAML MeshConfig). Here that ConfigMap, in the local file or in Kubernetes, becomes one
:class:`MeshConfig` object; its external-authorization providers are what a CUSTOM
AuthorizationPolicy names in ``provider.name``. Field names and defaults are istio/api's
(``mesh/v1alpha1/config.proto``); a provider of another kind (tracing, access logging) is kept
by name only, so a CUSTOM policy naming it is refused for that reason rather than "not found".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mesh.model.frozen import tuple_fields
from mesh.model.objects import Kind, namespaced_key

MESH_CONFIGMAP = "istio"  # in the root namespace, key "mesh", as Istio's
MESH_CONFIGMAP_KEY = "mesh"
DEFAULT_EXT_AUTHZ_TIMEOUT = 600.0  # seconds: istio/api's default
DEFAULT_STATUS_ON_ERROR = 403


@dataclass(frozen=True, slots=True)
class ExtAuthzRequestBody:
    """``includeRequestBodyInCheck``: send (up to ``max_request_bytes`` of) the request body."""

    max_request_bytes: int = 0
    allow_partial_message: bool = False
    pack_as_bytes: bool = False  # gRPC: in ``raw_body`` instead of ``body``


@dataclass(frozen=True, slots=True)
class ExtAuthzGrpc:
    """``envoyExtAuthzGrpc``: Envoy's ``envoy.service.auth.v3.Authorization/Check``."""

    service: str
    port: int
    timeout: float = DEFAULT_EXT_AUTHZ_TIMEOUT
    fail_open: bool = False
    status_on_error: int = DEFAULT_STATUS_ON_ERROR
    include_request_body: ExtAuthzRequestBody | None = None
    clear_route_cache: bool = False  # accepted; a waypoint routes after authorization anyway


@dataclass(frozen=True, slots=True)
class ExtAuthzHttp:
    """``envoyExtAuthzHttp``: the request forwarded to an HTTP authorizer, 200 allows."""

    service: str
    port: int
    timeout: float = DEFAULT_EXT_AUTHZ_TIMEOUT
    path_prefix: str = ""
    fail_open: bool = False
    status_on_error: int = DEFAULT_STATUS_ON_ERROR
    # Patterns as in istio/api: "abc" exact, "abc*" prefix, "*abc" suffix; lower-cased.
    include_request_headers: tuple[str, ...] = ()
    include_additional_headers: tuple[tuple[str, str], ...] = ()
    include_request_body: ExtAuthzRequestBody | None = None
    headers_to_upstream_on_allow: tuple[str, ...] = ()
    headers_to_downstream_on_deny: tuple[str, ...] = ()
    headers_to_downstream_on_allow: tuple[str, ...] = ()
    clear_route_cache: bool = False

    def __post_init__(self) -> None:
        tuple_fields(
            self,
            "include_request_headers",
            "include_additional_headers",
            "headers_to_upstream_on_allow",
            "headers_to_downstream_on_deny",
            "headers_to_downstream_on_allow",
        )


ExtAuthz = ExtAuthzGrpc | ExtAuthzHttp


@dataclass(frozen=True, slots=True)
class ExtensionProvider:
    name: str
    ext_authz: ExtAuthz | None = None  # None: a provider of another kind (named in ``kind``)
    kind: str = ""  # istio/api's field name of the provider, e.g. "envoyExtAuthzGrpc", "zipkin"

    @property
    def key(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class MeshConfig:
    """The mesh ConfigMap: ``<root namespace>/istio``."""

    KIND: ClassVar[Kind] = Kind.MESH_CONFIG

    namespace: str
    name: str
    extension_providers: tuple[ExtensionProvider, ...] = ()

    def __post_init__(self) -> None:
        tuple_fields(self, "extension_providers")

    @property
    def key(self) -> str:
        return namespaced_key(self.namespace, self.name)

    def provider(self, name: str) -> ExtensionProvider | None:
        for p in self.extension_providers:
            if p.name == name:
                return p
        return None
