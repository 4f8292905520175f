import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Protocol(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROTOCOL_UNSPECIFIED: _ClassVar[Protocol]
    PROTOCOL_TCP: _ClassVar[Protocol]
    PROTOCOL_UDP: _ClassVar[Protocol]
    PROTOCOL_UNIX: _ClassVar[Protocol]

class DnsRecordType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DNS_RECORD_TYPE_UNSPECIFIED: _ClassVar[DnsRecordType]
    DNS_RECORD_TYPE_A: _ClassVar[DnsRecordType]
    DNS_RECORD_TYPE_AAAA: _ClassVar[DnsRecordType]
    DNS_RECORD_TYPE_CNAME: _ClassVar[DnsRecordType]

class CaptureProtocol(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CAPTURE_PROTOCOL_UNSPECIFIED: _ClassVar[CaptureProtocol]
    CAPTURE_PROTOCOL_TCP: _ClassVar[CaptureProtocol]
    CAPTURE_PROTOCOL_UDP: _ClassVar[CaptureProtocol]
    CAPTURE_PROTOCOL_ICMP: _ClassVar[CaptureProtocol]
    CAPTURE_PROTOCOL_ARP: _ClassVar[CaptureProtocol]

class PolicyAction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POLICY_ACTION_UNSPECIFIED: _ClassVar[PolicyAction]
    POLICY_ACTION_ALLOW: _ClassVar[PolicyAction]
    POLICY_ACTION_DENY: _ClassVar[PolicyAction]
PROTOCOL_UNSPECIFIED: Protocol
PROTOCOL_TCP: Protocol
PROTOCOL_UDP: Protocol
PROTOCOL_UNIX: Protocol
DNS_RECORD_TYPE_UNSPECIFIED: DnsRecordType
DNS_RECORD_TYPE_A: DnsRecordType
DNS_RECORD_TYPE_AAAA: DnsRecordType
DNS_RECORD_TYPE_CNAME: DnsRecordType
CAPTURE_PROTOCOL_UNSPECIFIED: CaptureProtocol
CAPTURE_PROTOCOL_TCP: CaptureProtocol
CAPTURE_PROTOCOL_UDP: CaptureProtocol
CAPTURE_PROTOCOL_ICMP: CaptureProtocol
CAPTURE_PROTOCOL_ARP: CaptureProtocol
POLICY_ACTION_UNSPECIFIED: PolicyAction
POLICY_ACTION_ALLOW: PolicyAction
POLICY_ACTION_DENY: PolicyAction

class Forward(_message.Message):
    __slots__ = ("protocol", "local", "remote", "active", "total", "bytes_to_guest", "bytes_from_guest", "created")
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    LOCAL_FIELD_NUMBER: _ClassVar[int]
    REMOTE_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    BYTES_TO_GUEST_FIELD_NUMBER: _ClassVar[int]
    BYTES_FROM_GUEST_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    protocol: Protocol
    local: str
    remote: str
    active: int
    total: int
    bytes_to_guest: int
    bytes_from_guest: int
    created: _timestamp_pb2.Timestamp
    def __init__(self, protocol: _Optional[_Union[Protocol, str]] = ..., local: _Optional[str] = ..., remote: _Optional[str] = ..., active: _Optional[int] = ..., total: _Optional[int] = ..., bytes_to_guest: _Optional[int] = ..., bytes_from_guest: _Optional[int] = ..., created: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ExposeRequest(_message.Message):
    __slots__ = ("protocol", "local", "remote")
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    LOCAL_FIELD_NUMBER: _ClassVar[int]
    REMOTE_FIELD_NUMBER: _ClassVar[int]
    protocol: Protocol
    local: str
    remote: str
    def __init__(self, protocol: _Optional[_Union[Protocol, str]] = ..., local: _Optional[str] = ..., remote: _Optional[str] = ...) -> None: ...

class ExposeResponse(_message.Message):
    __slots__ = ("forward",)
    FORWARD_FIELD_NUMBER: _ClassVar[int]
    forward: Forward
    def __init__(self, forward: _Optional[_Union[Forward, _Mapping]] = ...) -> None: ...

class UnexposeRequest(_message.Message):
    __slots__ = ("protocol", "local")
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    LOCAL_FIELD_NUMBER: _ClassVar[int]
    protocol: Protocol
    local: str
    def __init__(self, protocol: _Optional[_Union[Protocol, str]] = ..., local: _Optional[str] = ...) -> None: ...

class UnexposeResponse(_message.Message):
    __slots__ = ("forward",)
    FORWARD_FIELD_NUMBER: _ClassVar[int]
    forward: Forward
    def __init__(self, forward: _Optional[_Union[Forward, _Mapping]] = ...) -> None: ...

class ListForwardsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListForwardsResponse(_message.Message):
    __slots__ = ("forwards",)
    FORWARDS_FIELD_NUMBER: _ClassVar[int]
    forwards: _containers.RepeatedCompositeFieldContainer[Forward]
    def __init__(self, forwards: _Optional[_Iterable[_Union[Forward, _Mapping]]] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatsResponse(_message.Message):
    __slots__ = ("stats",)
    STATS_FIELD_NUMBER: _ClassVar[int]
    stats: Stats
    def __init__(self, stats: _Optional[_Union[Stats, _Mapping]] = ...) -> None: ...

class WatchStatsRequest(_message.Message):
    __slots__ = ("interval",)
    INTERVAL_FIELD_NUMBER: _ClassVar[int]
    interval: _duration_pb2.Duration
    def __init__(self, interval: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class WatchStatsResponse(_message.Message):
    __slots__ = ("stats",)
    STATS_FIELD_NUMBER: _ClassVar[int]
    stats: Stats
    def __init__(self, stats: _Optional[_Union[Stats, _Mapping]] = ...) -> None: ...

class ProtocolStats(_message.Message):
    __slots__ = ("packets_from_guests", "packets_to_guests", "bytes_from_guests", "bytes_to_guests")
    PACKETS_FROM_GUESTS_FIELD_NUMBER: _ClassVar[int]
    PACKETS_TO_GUESTS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FROM_GUESTS_FIELD_NUMBER: _ClassVar[int]
    BYTES_TO_GUESTS_FIELD_NUMBER: _ClassVar[int]
    packets_from_guests: int
    packets_to_guests: int
    bytes_from_guests: int
    bytes_to_guests: int
    def __init__(self, packets_from_guests: _Optional[int] = ..., packets_to_guests: _Optional[int] = ..., bytes_from_guests: _Optional[int] = ..., bytes_to_guests: _Optional[int] = ...) -> None: ...

class LinkStats(_message.Message):
    __slots__ = ("name", "port", "frames_in", "frames_out", "bytes_in", "bytes_out", "dropped_out", "errors")
    class ErrorsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    FRAMES_IN_FIELD_NUMBER: _ClassVar[int]
    FRAMES_OUT_FIELD_NUMBER: _ClassVar[int]
    BYTES_IN_FIELD_NUMBER: _ClassVar[int]
    BYTES_OUT_FIELD_NUMBER: _ClassVar[int]
    DROPPED_OUT_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    name: str
    port: int
    frames_in: int
    frames_out: int
    bytes_in: int
    bytes_out: int
    dropped_out: int
    errors: _containers.ScalarMap[str, int]
    def __init__(self, name: _Optional[str] = ..., port: _Optional[int] = ..., frames_in: _Optional[int] = ..., frames_out: _Optional[int] = ..., bytes_in: _Optional[int] = ..., bytes_out: _Optional[int] = ..., dropped_out: _Optional[int] = ..., errors: _Optional[_Mapping[str, int]] = ...) -> None: ...

class Stats(_message.Message):
    __slots__ = ("time", "frames_in", "frames_out", "bytes_in", "bytes_out", "tcp", "udp", "icmp", "arp", "malformed", "dropped", "drops", "tcp_connections", "tcp_pending_dials", "udp_flows", "icmp_flows", "forwards", "links", "counters")
    class DropsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class CountersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    TIME_FIELD_NUMBER: _ClassVar[int]
    FRAMES_IN_FIELD_NUMBER: _ClassVar[int]
    FRAMES_OUT_FIELD_NUMBER: _ClassVar[int]
    BYTES_IN_FIELD_NUMBER: _ClassVar[int]
    BYTES_OUT_FIELD_NUMBER: _ClassVar[int]
    TCP_FIELD_NUMBER: _ClassVar[int]
    UDP_FIELD_NUMBER: _ClassVar[int]
    ICMP_FIELD_NUMBER: _ClassVar[int]
    ARP_FIELD_NUMBER: _ClassVar[int]
    MALFORMED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    DROPS_FIELD_NUMBER: _ClassVar[int]
    TCP_CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    TCP_PENDING_DIALS_FIELD_NUMBER: _ClassVar[int]
    UDP_FLOWS_FIELD_NUMBER: _ClassVar[int]
    ICMP_FLOWS_FIELD_NUMBER: _ClassVar[int]
    FORWARDS_FIELD_NUMBER: _ClassVar[int]
    LINKS_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    time: _timestamp_pb2.Timestamp
    frames_in: int
    frames_out: int
    bytes_in: int
    bytes_out: int
    tcp: ProtocolStats
    udp: ProtocolStats
    icmp: ProtocolStats
    arp: ProtocolStats
    malformed: int
    dropped: int
    drops: _containers.ScalarMap[str, int]
    tcp_connections: int
    tcp_pending_dials: int
    udp_flows: int
    icmp_flows: int
    forwards: int
    links: _containers.RepeatedCompositeFieldContainer[LinkStats]
    counters: _containers.ScalarMap[str, int]
    def __init__(self, time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., frames_in: _Optional[int] = ..., frames_out: _Optional[int] = ..., bytes_in: _Optional[int] = ..., bytes_out: _Optional[int] = ..., tcp: _Optional[_Union[ProtocolStats, _Mapping]] = ..., udp: _Optional[_Union[ProtocolStats, _Mapping]] = ..., icmp: _Optional[_Union[ProtocolStats, _Mapping]] = ..., arp: _Optional[_Union[ProtocolStats, _Mapping]] = ..., malformed: _Optional[int] = ..., dropped: _Optional[int] = ..., drops: _Optional[_Mapping[str, int]] = ..., tcp_connections: _Optional[int] = ..., tcp_pending_dials: _Optional[int] = ..., udp_flows: _Optional[int] = ..., icmp_flows: _Optional[int] = ..., forwards: _Optional[int] = ..., links: _Optional[_Iterable[_Union[LinkStats, _Mapping]]] = ..., counters: _Optional[_Mapping[str, int]] = ...) -> None: ...

class ListLeasesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Lease(_message.Message):
    __slots__ = ("mac", "ip", "hostname", "static", "expires")
    MAC_FIELD_NUMBER: _ClassVar[int]
    IP_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    STATIC_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_FIELD_NUMBER: _ClassVar[int]
    mac: str
    ip: str
    hostname: str
    static: bool
    expires: _timestamp_pb2.Timestamp
    def __init__(self, mac: _Optional[str] = ..., ip: _Optional[str] = ..., hostname: _Optional[str] = ..., static: _Optional[bool] = ..., expires: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListLeasesResponse(_message.Message):
    __slots__ = ("leases",)
    LEASES_FIELD_NUMBER: _ClassVar[int]
    leases: _containers.RepeatedCompositeFieldContainer[Lease]
    def __init__(self, leases: _Optional[_Iterable[_Union[Lease, _Mapping]]] = ...) -> None: ...

class DnsRecord(_message.Message):
    __slots__ = ("name", "type", "value", "ttl")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: DnsRecordType
    value: str
    ttl: int
    def __init__(self, name: _Optional[str] = ..., type: _Optional[_Union[DnsRecordType, str]] = ..., value: _Optional[str] = ..., ttl: _Optional[int] = ...) -> None: ...

class DnsZone(_message.Message):
    __slots__ = ("name", "records")
    NAME_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    records: _containers.RepeatedCompositeFieldContainer[DnsRecord]
    def __init__(self, name: _Optional[str] = ..., records: _Optional[_Iterable[_Union[DnsRecord, _Mapping]]] = ...) -> None: ...

class AddDnsRecordsRequest(_message.Message):
    __slots__ = ("zone", "records")
    ZONE_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    zone: str
    records: _containers.RepeatedCompositeFieldContainer[DnsRecord]
    def __init__(self, zone: _Optional[str] = ..., records: _Optional[_Iterable[_Union[DnsRecord, _Mapping]]] = ...) -> None: ...

class AddDnsRecordsResponse(_message.Message):
    __slots__ = ("zone",)
    ZONE_FIELD_NUMBER: _ClassVar[int]
    zone: DnsZone
    def __init__(self, zone: _Optional[_Union[DnsZone, _Mapping]] = ...) -> None: ...

class RemoveDnsRecordsRequest(_message.Message):
    __slots__ = ("zone", "names")
    ZONE_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    zone: str
    names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, zone: _Optional[str] = ..., names: _Optional[_Iterable[str]] = ...) -> None: ...

class RemoveDnsRecordsResponse(_message.Message):
    __slots__ = ("removed",)
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    removed: int
    def __init__(self, removed: _Optional[int] = ...) -> None: ...

class ListDnsZonesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListDnsZonesResponse(_message.Message):
    __slots__ = ("zones",)
    ZONES_FIELD_NUMBER: _ClassVar[int]
    zones: _containers.RepeatedCompositeFieldContainer[DnsZone]
    def __init__(self, zones: _Optional[_Iterable[_Union[DnsZone, _Mapping]]] = ...) -> None: ...

class CaptureFilter(_message.Message):
    __slots__ = ("protocol", "host", "port")
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    protocol: CaptureProtocol
    host: str
    port: int
    def __init__(self, protocol: _Optional[_Union[CaptureProtocol, str]] = ..., host: _Optional[str] = ..., port: _Optional[int] = ...) -> None: ...

class CaptureRequest(_message.Message):
    __slots__ = ("filter", "snaplen", "max_frames", "duration")
    FILTER_FIELD_NUMBER: _ClassVar[int]
    SNAPLEN_FIELD_NUMBER: _ClassVar[int]
    MAX_FRAMES_FIELD_NUMBER: _ClassVar[int]
    DURATION_FIELD_NUMBER: _ClassVar[int]
    filter: CaptureFilter
    snaplen: int
    max_frames: int
    duration: _duration_pb2.Duration
    def __init__(self, filter: _Optional[_Union[CaptureFilter, _Mapping]] = ..., snaplen: _Optional[int] = ..., max_frames: _Optional[int] = ..., duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class CaptureResponse(_message.Message):
    __slots__ = ("data", "dropped")
    DATA_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    dropped: int
    def __init__(self, data: _Optional[bytes] = ..., dropped: _Optional[int] = ...) -> None: ...

class TunnelRequest(_message.Message):
    __slots__ = ("open", "data", "close")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    open: TunnelOpen
    data: bytes
    close: TunnelClose
    def __init__(self, open: _Optional[_Union[TunnelOpen, _Mapping]] = ..., data: _Optional[bytes] = ..., close: _Optional[_Union[TunnelClose, _Mapping]] = ...) -> None: ...

class TunnelOpen(_message.Message):
    __slots__ = ("address",)
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    address: str
    def __init__(self, address: _Optional[str] = ...) -> None: ...

class TunnelClose(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TunnelResponse(_message.Message):
    __slots__ = ("connected", "data", "close")
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    connected: TunnelConnected
    data: bytes
    close: TunnelClose
    def __init__(self, connected: _Optional[_Union[TunnelConnected, _Mapping]] = ..., data: _Optional[bytes] = ..., close: _Optional[_Union[TunnelClose, _Mapping]] = ...) -> None: ...

class TunnelConnected(_message.Message):
    __slots__ = ("local_address",)
    LOCAL_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    local_address: str
    def __init__(self, local_address: _Optional[str] = ...) -> None: ...

class WatchEventsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatchEventsResponse(_message.Message):
    __slots__ = ("event",)
    EVENT_FIELD_NUMBER: _ClassVar[int]
    event: Event
    def __init__(self, event: _Optional[_Union[Event, _Mapping]] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("time", "link_up", "link_down", "lease_granted", "forward_added", "forward_removed", "connection_error", "guest_connected", "flow_denied")
    TIME_FIELD_NUMBER: _ClassVar[int]
    LINK_UP_FIELD_NUMBER: _ClassVar[int]
    LINK_DOWN_FIELD_NUMBER: _ClassVar[int]
    LEASE_GRANTED_FIELD_NUMBER: _ClassVar[int]
    FORWARD_ADDED_FIELD_NUMBER: _ClassVar[int]
    FORWARD_REMOVED_FIELD_NUMBER: _ClassVar[int]
    CONNECTION_ERROR_FIELD_NUMBER: _ClassVar[int]
    GUEST_CONNECTED_FIELD_NUMBER: _ClassVar[int]
    FLOW_DENIED_FIELD_NUMBER: _ClassVar[int]
    time: _timestamp_pb2.Timestamp
    link_up: LinkUp
    link_down: LinkDown
    lease_granted: LeaseGranted
    forward_added: ForwardAdded
    forward_removed: ForwardRemoved
    connection_error: ConnectionError
    guest_connected: GuestConnected
    flow_denied: FlowDenied
    def __init__(self, time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., link_up: _Optional[_Union[LinkUp, _Mapping]] = ..., link_down: _Optional[_Union[LinkDown, _Mapping]] = ..., lease_granted: _Optional[_Union[LeaseGranted, _Mapping]] = ..., forward_added: _Optional[_Union[ForwardAdded, _Mapping]] = ..., forward_removed: _Optional[_Union[ForwardRemoved, _Mapping]] = ..., connection_error: _Optional[_Union[ConnectionError, _Mapping]] = ..., guest_connected: _Optional[_Union[GuestConnected, _Mapping]] = ..., flow_denied: _Optional[_Union[FlowDenied, _Mapping]] = ...) -> None: ...

class GuestConnected(_message.Message):
    __slots__ = ("guest", "link")
    GUEST_FIELD_NUMBER: _ClassVar[int]
    LINK_FIELD_NUMBER: _ClassVar[int]
    guest: str
    link: str
    def __init__(self, guest: _Optional[str] = ..., link: _Optional[str] = ...) -> None: ...

class FlowDenied(_message.Message):
    __slots__ = ("flow",)
    FLOW_FIELD_NUMBER: _ClassVar[int]
    flow: FlowVerdict
    def __init__(self, flow: _Optional[_Union[FlowVerdict, _Mapping]] = ...) -> None: ...

class PolicyRule(_message.Message):
    __slots__ = ("action", "rule", "static")
    ACTION_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    STATIC_FIELD_NUMBER: _ClassVar[int]
    action: PolicyAction
    rule: str
    static: bool
    def __init__(self, action: _Optional[_Union[PolicyAction, str]] = ..., rule: _Optional[str] = ..., static: _Optional[bool] = ...) -> None: ...

class ListPolicyRulesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListPolicyRulesResponse(_message.Message):
    __slots__ = ("rules",)
    RULES_FIELD_NUMBER: _ClassVar[int]
    rules: _containers.RepeatedCompositeFieldContainer[PolicyRule]
    def __init__(self, rules: _Optional[_Iterable[_Union[PolicyRule, _Mapping]]] = ...) -> None: ...

class AddPolicyRuleRequest(_message.Message):
    __slots__ = ("action", "rule", "index")
    ACTION_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    action: PolicyAction
    rule: str
    index: int
    def __init__(self, action: _Optional[_Union[PolicyAction, str]] = ..., rule: _Optional[str] = ..., index: _Optional[int] = ...) -> None: ...

class AddPolicyRuleResponse(_message.Message):
    __slots__ = ("index", "rule")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    index: int
    rule: PolicyRule
    def __init__(self, index: _Optional[int] = ..., rule: _Optional[_Union[PolicyRule, _Mapping]] = ...) -> None: ...

class RemovePolicyRuleRequest(_message.Message):
    __slots__ = ("index",)
    INDEX_FIELD_NUMBER: _ClassVar[int]
    index: int
    def __init__(self, index: _Optional[int] = ...) -> None: ...

class RemovePolicyRuleResponse(_message.Message):
    __slots__ = ("rule",)
    RULE_FIELD_NUMBER: _ClassVar[int]
    rule: PolicyRule
    def __init__(self, rule: _Optional[_Union[PolicyRule, _Mapping]] = ...) -> None: ...

class FlowVerdict(_message.Message):
    __slots__ = ("time", "protocol", "source", "destination", "allowed", "rule")
    TIME_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    time: _timestamp_pb2.Timestamp
    protocol: str
    source: str
    destination: str
    allowed: bool
    rule: str
    def __init__(self, time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., protocol: _Optional[str] = ..., source: _Optional[str] = ..., destination: _Optional[str] = ..., allowed: _Optional[bool] = ..., rule: _Optional[str] = ...) -> None: ...

class ListConnectionsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListConnectionsResponse(_message.Message):
    __slots__ = ("flows", "allowed", "denied")
    FLOWS_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_FIELD_NUMBER: _ClassVar[int]
    DENIED_FIELD_NUMBER: _ClassVar[int]
    flows: _containers.RepeatedCompositeFieldContainer[FlowVerdict]
    allowed: int
    denied: int
    def __init__(self, flows: _Optional[_Iterable[_Union[FlowVerdict, _Mapping]]] = ..., allowed: _Optional[int] = ..., denied: _Optional[int] = ...) -> None: ...

class LinkUp(_message.Message):
    __slots__ = ("link", "port")
    LINK_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    link: str
    port: int
    def __init__(self, link: _Optional[str] = ..., port: _Optional[int] = ...) -> None: ...

class LinkDown(_message.Message):
    __slots__ = ("link", "port", "reason")
    LINK_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    link: str
    port: int
    reason: str
    def __init__(self, link: _Optional[str] = ..., port: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class LeaseGranted(_message.Message):
    __slots__ = ("mac", "ip", "hostname")
    MAC_FIELD_NUMBER: _ClassVar[int]
    IP_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    mac: str
    ip: str
    hostname: str
    def __init__(self, mac: _Optional[str] = ..., ip: _Optional[str] = ..., hostname: _Optional[str] = ...) -> None: ...

class ForwardAdded(_message.Message):
    __slots__ = ("forward",)
    FORWARD_FIELD_NUMBER: _ClassVar[int]
    forward: Forward
    def __init__(self, forward: _Optional[_Union[Forward, _Mapping]] = ...) -> None: ...

class ForwardRemoved(_message.Message):
    __slots__ = ("forward",)
    FORWARD_FIELD_NUMBER: _ClassVar[int]
    forward: Forward
    def __init__(self, forward: _Optional[_Union[Forward, _Mapping]] = ...) -> None: ...

class ConnectionError(_message.Message):
    __slots__ = ("protocol", "source", "destination", "reason")
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    protocol: str
    source: str
    destination: str
    reason: str
    def __init__(self, protocol: _Optional[str] = ..., source: _Optional[str] = ..., destination: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...
