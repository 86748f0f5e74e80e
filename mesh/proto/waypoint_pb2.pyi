# mypy: ignore-errors
from mesh.proto import security_pb2 as _security_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WaypointBinding(_message.Message):
    __slots__ = ("strict", "account_waypoint_for")
    STRICT_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_WAYPOINT_FOR_FIELD_NUMBER: _ClassVar[int]
    strict: bool
    account_waypoint_for: str
    def __init__(self, strict: _Optional[bool] = ..., account_waypoint_for: _Optional[str] = ...) -> None: ...

class WaypointPolicy(_message.Message):
    __slots__ = ("namespace", "name", "spec", "dry_run", "creation_timestamp")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    CREATION_TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    name: str
    spec: _security_pb2.AuthorizationPolicy
    dry_run: bool
    creation_timestamp: int
    def __init__(self, namespace: _Optional[str] = ..., name: _Optional[str] = ..., spec: _Optional[_Union[_security_pb2.AuthorizationPolicy, _Mapping]] = ..., dry_run: _Optional[bool] = ..., creation_timestamp: _Optional[int] = ...) -> None: ...

class WaypointAuthentication(_message.Message):
    __slots__ = ("namespace", "name", "spec", "creation_timestamp", "jwks_by_uri")
    class JwksByUriEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    CREATION_TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    JWKS_BY_URI_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    name: str
    spec: _security_pb2.RequestAuthentication
    creation_timestamp: int
    jwks_by_uri: _containers.ScalarMap[str, str]
    def __init__(self, namespace: _Optional[str] = ..., name: _Optional[str] = ..., spec: _Optional[_Union[_security_pb2.RequestAuthentication, _Mapping]] = ..., creation_timestamp: _Optional[int] = ..., jwks_by_uri: _Optional[_Mapping[str, str]] = ...) -> None: ...
