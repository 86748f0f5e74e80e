# mypy: ignore-errors
import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MeshConfig(_message.Message):
    __slots__ = ()
    class ExtensionProvider(_message.Message):
        __slots__ = ("name", "envoy_ext_authz_http", "envoy_ext_authz_grpc")
        class EnvoyExternalAuthorizationRequestBody(_message.Message):
            __slots__ = ("max_request_bytes", "allow_partial_message", "pack_as_bytes")
            MAX_REQUEST_BYTES_FIELD_NUMBER: _ClassVar[int]
            ALLOW_PARTIAL_MESSAGE_FIELD_NUMBER: _ClassVar[int]
            PACK_AS_BYTES_FIELD_NUMBER: _ClassVar[int]
            max_request_bytes: int
            allow_partial_message: bool
            pack_as_bytes: bool
            def __init__(self, max_request_bytes: _Optional[int] = ..., allow_partial_message: _Optional[bool] = ..., pack_as_bytes: _Optional[bool] = ...) -> None: ...
        class EnvoyExternalAuthorizationHttpProvider(_message.Message):
            __slots__ = ("service", "port", "timeout", "path_prefix", "fail_open", "clear_route_cache", "status_on_error", "include_headers_in_check", "include_request_headers_in_check", "include_additional_headers_in_check", "include_request_body_in_check", "headers_to_upstream_on_allow", "headers_to_downstream_on_deny", "headers_to_downstream_on_allow")
            class IncludeAdditionalHeadersInCheckEntry(_message.Message):
                __slots__ = ("key", "value")
                KEY_FIELD_NUMBER: _ClassVar[int]
                VALUE_FIELD_NUMBER: _ClassVar[int]
                key: str
                value: str
                def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
            SERVICE_FIELD_NUMBER: _ClassVar[int]
            PORT_FIELD_NUMBER: _ClassVar[int]
            TIMEOUT_FIELD_NUMBER: _ClassVar[int]
            PATH_PREFIX_FIELD_NUMBER: _ClassVar[int]
            FAIL_OPEN_FIELD_NUMBER: _ClassVar[int]
            CLEAR_ROUTE_CACHE_FIELD_NUMBER: _ClassVar[int]
            STATUS_ON_ERROR_FIELD_NUMBER: _ClassVar[int]
            INCLUDE_HEADERS_IN_CHECK_FIELD_NUMBER: _ClassVar[int]
            INCLUDE_REQUEST_HEADERS_IN_CHECK_FIELD_NUMBER: _ClassVar[int]
            INCLUDE_ADDITIONAL_HEADERS_IN_CHECK_FIELD_NUMBER: _ClassVar[int]
            INCLUDE_REQUEST_BODY_IN_CHECK_FIELD_NUMBER: _ClassVar[int]
            HEADERS_TO_UPSTREAM_ON_ALLOW_FIELD_NUMBER: _ClassVar[int]
            HEADERS_TO_DOWNSTREAM_ON_DENY_FIELD_NUMBER: _ClassVar[int]
            HEADERS_TO_DOWNSTREAM_ON_ALLOW_FIELD_NUMBER: _ClassVar[int]
            service: str
            port: int
            timeout: _duration_pb2.Duration
            path_prefix: str
            fail_open: bool
            clear_route_cache: bool
            status_on_error: str
            include_headers_in_check: _containers.RepeatedScalarFieldContainer[str]
            include_request_headers_in_check: _containers.RepeatedScalarFieldContainer[str]
            include_additional_headers_in_check: _containers.ScalarMap[str, str]
            include_request_body_in_check: MeshConfig.ExtensionProvider.EnvoyExternalAuthorizationRequestBody
            headers_to_upstream_on_allow: _containers.RepeatedScalarFieldContainer[str]
            headers_to_downstream_on_deny: _containers.RepeatedScalarFieldContainer[str]
            headers_to_downstream_on_allow: _containers.RepeatedScalarFieldContainer[str]
            def __init__(self, service: _Optional[str] = ..., port: _Optional[int] = ..., timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., path_prefix: _Optional[str] = ..., fail_open: _Optional[bool] = ..., clear_route_cache: _Optional[bool] = ..., status_on_error: _Optional[str] = ..., include_headers_in_check: _Optional[_Iterable[str]] = ..., include_request_headers_in_check: _Optional[_Iterable[str]] = ..., include_additional_headers_in_check: _Optional[_Mapping[str, str]] = ..., include_request_body_in_check: _Optional[_Union[MeshConfig.ExtensionProvider.EnvoyExternalAuthorizationRequestBody, _Mapping]] = ..., headers_to_upstream_on_allow: _Optional[_Iterable[str]] = ..., headers_to_downstream_on_deny: _Optional[_Iterable[str]] = ..., headers_to_downstream_on_allow: _Optional[_Iterable[str]] = ...) -> None: ...
        class EnvoyExternalAuthorizationGrpcProvider(_message.Message):
            __slots__ = ("service", "port", "timeout", "fail_open", "clear_route_cache", "status_on_error", "include_request_body_in_check")
            SERVICE_FIELD_NUMBER: _ClassVar[int]
            PORT_FIELD_NUMBER: _ClassVar[int]
            TIMEOUT_FIELD_NUMBER: _ClassVar[int]
            FAIL_OPEN_FIELD_NUMBER: _ClassVar[int]
            CLEAR_ROUTE_CACHE_FIELD_NUMBER: _ClassVar[int]
            STATUS_ON_ERROR_FIELD_NUMBER: _ClassVar[int]
            INCLUDE_REQUEST_BODY_IN_CHECK_FIELD_NUMBER: _ClassVar[int]
            service: str
            port: int
            timeout: _duration_pb2.Duration
            fail_open: bool
            clear_route_cache: bool
            status_on_error: str
            include_request_body_in_check: MeshConfig.ExtensionProvider.EnvoyExternalAuthorizationRequestBody
            def __init__(self, service: _Optional[str] = ..., port: _Optional[int] = ..., timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., fail_open: _Optional[bool] = ..., clear_route_cache: _Optional[bool] = ..., status_on_error: _Optional[str] = ..., include_request_body_in_check: _Optional[_Union[MeshConfig.ExtensionProvider.EnvoyExternalAuthorizationRequestBody, _Mapping]] = ...) -> None: ...
        NAME_FIELD_NUMBER: _ClassVar[int]
        ENVOY_EXT_AUTHZ_HTTP_FIELD_NUMBER: _ClassVar[int]
        ENVOY_EXT_AUTHZ_GRPC_FIELD_NUMBER: _ClassVar[int]
        name: str
        envoy_ext_authz_http: MeshConfig.ExtensionProvider.EnvoyExternalAuthorizationHttpProvider
        envoy_ext_authz_grpc: MeshConfig.ExtensionProvider.EnvoyExternalAuthorizationGrpcProvider
        def __init__(self, name: _Optional[str] = ..., envoy_ext_authz_http: _Optional[_Union[MeshConfig.ExtensionProvider.EnvoyExternalAuthorizationHttpProvider, _Mapping]] = ..., envoy_ext_authz_grpc: _Optional[_Union[MeshConfig.ExtensionProvider.EnvoyExternalAuthorizationGrpcProvider, _Mapping]] = ...) -> None: ...
    def __init__(self) -> None: ...
