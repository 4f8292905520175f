from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MappingProtocol(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MAPPING_PROTOCOL_UNSPECIFIED: _ClassVar[MappingProtocol]
    MAPPING_PROTOCOL_TCP: _ClassVar[MappingProtocol]
    MAPPING_PROTOCOL_UDP: _ClassVar[MappingProtocol]

class MappingStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MAPPING_STATUS_UNSPECIFIED: _ClassVar[MappingStatus]
    MAPPING_STATUS_APPLIED: _ClassVar[MappingStatus]
    MAPPING_STATUS_REMOVED: _ClassVar[MappingStatus]
    MAPPING_STATUS_ERROR: _ClassVar[MappingStatus]
    MAPPING_STATUS_OK: _ClassVar[MappingStatus]

class MappingError(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MAPPING_ERROR_UNSPECIFIED: _ClassVar[MappingError]
    MAPPING_ERROR_ADDRESS_IN_USE: _ClassVar[MappingError]
    MAPPING_ERROR_BAD_ADDRESS: _ClassVar[MappingError]
    MAPPING_ERROR_PERMISSION_DENIED: _ClassVar[MappingError]
    MAPPING_ERROR_NOT_FOUND: _ClassVar[MappingError]
    MAPPING_ERROR_INVALID_ARGUMENT: _ClassVar[MappingError]
MAPPING_PROTOCOL_UNSPECIFIED: MappingProtocol
MAPPING_PROTOCOL_TCP: MappingProtocol
MAPPING_PROTOCOL_UDP: MappingProtocol
MAPPING_STATUS_UNSPECIFIED: MappingStatus
MAPPING_STATUS_APPLIED: MappingStatus
MAPPING_STATUS_REMOVED: MappingStatus
MAPPING_STATUS_ERROR: MappingStatus
MAPPING_STATUS_OK: MappingStatus
MAPPING_ERROR_UNSPECIFIED: MappingError
MAPPING_ERROR_ADDRESS_IN_USE: MappingError
MAPPING_ERROR_BAD_ADDRESS: MappingError
MAPPING_ERROR_PERMISSION_DENIED: MappingError
MAPPING_ERROR_NOT_FOUND: MappingError
MAPPING_ERROR_INVALID_ARGUMENT: MappingError

class Mapping(_message.Message):
    __slots__ = ("protocol", "host_ip", "port")
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    HOST_IP_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    protocol: MappingProtocol
    host_ip: str
    port: int
    def __init__(self, protocol: _Optional[_Union[MappingProtocol, str]] = ..., host_ip: _Optional[str] = ..., port: _Optional[int] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("agent", "resync")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    RESYNC_FIELD_NUMBER: _ClassVar[int]
    agent: str
    resync: bool
    def __init__(self, agent: _Optional[str] = ..., resync: _Optional[bool] = ...) -> None: ...

class SyncDone(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StreamMappingsRequest(_message.Message):
    __slots__ = ("id", "hello", "add", "remove", "sync_done")
    ID_FIELD_NUMBER: _ClassVar[int]
    HELLO_FIELD_NUMBER: _ClassVar[int]
    ADD_FIELD_NUMBER: _ClassVar[int]
    REMOVE_FIELD_NUMBER: _ClassVar[int]
    SYNC_DONE_FIELD_NUMBER: _ClassVar[int]
    id: int
    hello: Hello
    add: Mapping
    remove: Mapping
    sync_done: SyncDone
    def __init__(self, id: _Optional[int] = ..., hello: _Optional[_Union[Hello, _Mapping]] = ..., add: _Optional[_Union[Mapping, _Mapping]] = ..., remove: _Optional[_Union[Mapping, _Mapping]] = ..., sync_done: _Optional[_Union[SyncDone, _Mapping]] = ...) -> None: ...

class StreamMappingsResponse(_message.Message):
    __slots__ = ("id", "mapping", "status", "error", "message", "swept")
    ID_FIELD_NUMBER: _ClassVar[int]
    MAPPING_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SWEPT_FIELD_NUMBER: _ClassVar[int]
    id: int
    mapping: Mapping
    status: MappingStatus
    error: MappingError
    message: str
    swept: _containers.RepeatedCompositeFieldContainer[Mapping]
    def __init__(self, id: _Optional[int] = ..., mapping: _Optional[_Union[Mapping, _Mapping]] = ..., status: _Optional[_Union[MappingStatus, str]] = ..., error: _Optional[_Union[MappingError, str]] = ..., message: _Optional[str] = ..., swept: _Optional[_Iterable[_Union[Mapping, _Mapping]]] = ...) -> None: ...

class ListMappingsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MappingInfo(_message.Message):
    __slots__ = ("mapping", "agent", "agent_connected", "upstream", "active", "total")
    MAPPING_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    AGENT_CONNECTED_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    mapping: Mapping
    agent: str
    agent_connected: bool
    upstream: str
    active: int
    total: int
    def __init__(self, mapping: _Optional[_Union[Mapping, _Mapping]] = ..., agent: _Optional[str] = ..., agent_connected: _Optional[bool] = ..., upstream: _Optional[str] = ..., active: _Optional[int] = ..., total: _Optional[int] = ...) -> None: ...

class ListMappingsResponse(_message.Message):
    __slots__ = ("mappings",)
    MAPPINGS_FIELD_NUMBER: _ClassVar[int]
    mappings: _containers.RepeatedCompositeFieldContainer[MappingInfo]
    def __init__(self, mappings: _Optional[_Iterable[_Union[MappingInfo, _Mapping]]] = ...) -> None: ...
