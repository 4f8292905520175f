from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class HandshakeRequest(_message.Message):
    __slots__ = ("host_id", "host_version", "protocol_version", "subnet", "mtu", "offered_offloads", "data_address", "session")
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    HOST_VERSION_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SUBNET_FIELD_NUMBER: _ClassVar[int]
    MTU_FIELD_NUMBER: _ClassVar[int]
    OFFERED_OFFLOADS_FIELD_NUMBER: _ClassVar[int]
    DATA_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    host_id: str
    host_version: str
    protocol_version: int
    subnet: str
    mtu: int
    offered_offloads: _containers.RepeatedScalarFieldContainer[str]
    data_address: str
    session: str
    def __init__(self, host_id: _Optional[str] = ..., host_version: _Optional[str] = ..., protocol_version: _Optional[int] = ..., subnet: _Optional[str] = ..., mtu: _Optional[int] = ..., offered_offloads: _Optional[_Iterable[str]] = ..., data_address: _Optional[str] = ..., session: _Optional[str] = ...) -> None: ...

class HandshakeResponse(_message.Message):
    __slots__ = ("guest_id", "guest_version", "protocol_version", "accepted_offloads", "mtu", "mac", "session", "namespace", "handshakes")
    GUEST_ID_FIELD_NUMBER: _ClassVar[int]
    GUEST_VERSION_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_OFFLOADS_FIELD_NUMBER: _ClassVar[int]
    MTU_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    HANDSHAKES_FIELD_NUMBER: _ClassVar[int]
    guest_id: str
    guest_version: str
    protocol_version: int
    accepted_offloads: _containers.RepeatedScalarFieldContainer[str]
    mtu: int
    mac: str
    session: str
    namespace: str
    handshakes: int
    def __init__(self, guest_id: _Optional[str] = ..., guest_version: _Optional[str] = ..., protocol_version: _Optional[int] = ..., accepted_offloads: _Optional[_Iterable[str]] = ..., mtu: _Optional[int] = ..., mac: _Optional[str] = ..., session: _Optional[str] = ..., namespace: _Optional[str] = ..., handshakes: _Optional[int] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ChildStatus(_message.Message):
    __slots__ = ("name", "pid", "starts")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    STARTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    pid: int
    starts: int
    def __init__(self, name: _Optional[str] = ..., pid: _Optional[int] = ..., starts: _Optional[int] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("guest_id", "guest_version", "namespace", "init_pid", "children", "data_address", "data_link_up", "host_id", "handshakes", "veth_inside", "veth_outside")
    GUEST_ID_FIELD_NUMBER: _ClassVar[int]
    GUEST_VERSION_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    INIT_PID_FIELD_NUMBER: _ClassVar[int]
    CHILDREN_FIELD_NUMBER: _ClassVar[int]
    DATA_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DATA_LINK_UP_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    HANDSHAKES_FIELD_NUMBER: _ClassVar[int]
    VETH_INSIDE_FIELD_NUMBER: _ClassVar[int]
    VETH_OUTSIDE_FIELD_NUMBER: _ClassVar[int]
    guest_id: str
    guest_version: str
    namespace: str
    init_pid: int
    children: _containers.RepeatedCompositeFieldContainer[ChildStatus]
    data_address: str
    data_link_up: bool
    host_id: str
    handshakes: int
    veth_inside: str
    veth_outside: str
    def __init__(self, guest_id: _Optional[str] = ..., guest_version: _Optional[str] = ..., namespace: _Optional[str] = ..., init_pid: _Optional[int] = ..., children: _Optional[_Iterable[_Union[ChildStatus, _Mapping]]] = ..., data_address: _Optional[str] = ..., data_link_up: _Optional[bool] = ..., host_id: _Optional[str] = ..., handshakes: _Optional[int] = ..., veth_inside: _Optional[str] = ..., veth_outside: _Optional[str] = ...) -> None: ...
