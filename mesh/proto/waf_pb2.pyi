# mypy: ignore-errors
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WafPolicy(_message.Message):
    __slots__ = ("namespace", "name", "target_refs", "mode", "paranoia_level", "inbound_anomaly_threshold", "outbound_anomaly_threshold", "exclude_rule_ids", "exclude_rule_tags", "extra_rules", "request_body_limit", "request_body_limit_action", "inspect_content_types", "creation_timestamp")
    class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        ENFORCE: _ClassVar[WafPolicy.Mode]
        DETECT_ONLY: _ClassVar[WafPolicy.Mode]
        DISABLED: _ClassVar[WafPolicy.Mode]
    ENFORCE: WafPolicy.Mode
    DETECT_ONLY: WafPolicy.Mode
    DISABLED: WafPolicy.Mode
    class BodyLimitAction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        REJECT: _ClassVar[WafPolicy.BodyLimitAction]
        PROCESS_PARTIAL: _ClassVar[WafPolicy.BodyLimitAction]
    REJECT: WafPolicy.BodyLimitAction
    PROCESS_PARTIAL: WafPolicy.BodyLimitAction
    class TargetRef(_message.Message):
        __slots__ = ("group", "kind", "name")
        GROUP_FIELD_NUMBER: _ClassVar[int]
        KIND_FIELD_NUMBER: _ClassVar[int]
        NAME_FIELD_NUMBER: _ClassVar[int]
        group: str
        kind: str
        name: str
        def __init__(self, group: _Optional[str] = ..., kind: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TARGET_REFS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    PARANOIA_LEVEL_FIELD_NUMBER: _ClassVar[int]
    INBOUND_ANOMALY_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    OUTBOUND_ANOMALY_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_RULE_IDS_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_RULE_TAGS_FIELD_NUMBER: _ClassVar[int]
    EXTRA_RULES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_BODY_LIMIT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_BODY_LIMIT_ACTION_FIELD_NUMBER: _ClassVar[int]
    INSPECT_CONTENT_TYPES_FIELD_NUMBER: _ClassVar[int]
    CREATION_TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    name: str
    target_refs: _containers.RepeatedCompositeFieldContainer[WafPolicy.TargetRef]
    mode: WafPolicy.Mode
    paranoia_level: int
    inbound_anomaly_threshold: int
    outbound_anomaly_threshold: int
    exclude_rule_ids: _containers.RepeatedScalarFieldContainer[int]
    exclude_rule_tags: _containers.RepeatedScalarFieldContainer[str]
    extra_rules: _containers.RepeatedScalarFieldContainer[str]
    request_body_limit: int
    request_body_limit_action: WafPolicy.BodyLimitAction
    inspect_content_types: _containers.RepeatedScalarFieldContainer[str]
    creation_timestamp: int
    def __init__(self, namespace: _Optional[str] = ..., name: _Optional[str] = ..., target_refs: _Optional[_Iterable[_Union[WafPolicy.TargetRef, _Mapping]]] = ..., mode: _Optional[_Union[WafPolicy.Mode, str]] = ..., paranoia_level: _Optional[int] = ..., inbound_anomaly_threshold: _Optional[int] = ..., outbound_anomaly_threshold: _Optional[int] = ..., exclude_rule_ids: _Optional[_Iterable[int]] = ..., exclude_rule_tags: _Optional[_Iterable[str]] = ..., extra_rules: _Optional[_Iterable[str]] = ..., request_body_limit: _Optional[int] = ..., request_body_limit_action: _Optional[_Union[WafPolicy.BodyLimitAction, str]] = ..., inspect_content_types: _Optional[_Iterable[str]] = ..., creation_timestamp: _Optional[int] = ...) -> None: ...
