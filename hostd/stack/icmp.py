"""ICMPv4 (RFC 792): echo and the error messages the stack sends to guests.

Echo to the gateway is answered here. Echo to anything else becomes an event that the NAT
relays through an unprivileged ping socket (hostd/nat/icmp.py). Errors the stack originates
(port unreachable, administratively prohibited, TTL exceeded, fragmentation needed) quote the
offending datagram's IP header and the first 8 bytes of its payload, which is all a guest
kernel needs to match the error to its socket (it then surfaces as ECONNREFUSED & co).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from netferry.hostd.stack.checksum import checksum, ones_sum

HEADER = struct.Struct("!BBHHH")  # type, code, checksum, id, seq (or unused/mtu for errors)

ECHO_REPLY = 0
DEST_UNREACHABLE = 3
ECHO_REQUEST = 8
TIME_EXCEEDED = 11

# Destination unreachable codes
NET_UNREACHABLE = 0
HOST_UNREACHABLE = 1
PROTO_UNREACHABLE = 2
PORT_UNREACHABLE = 3
FRAG_NEEDED = 4
ADMIN_PROHIBITED = 13


class IcmpError(ValueError):
    pass


@dataclass(slots=True)
class IcmpMessage:
    type: int
    code: int
    ident: int
    seq: int
    payload: bytes


def parse_icmp(data: bytes) -> IcmpMessage:
    if len(data) < HEADER.size:
        raise IcmpError("icmp_truncated")
    if ones_sum(data) != 0xFFFF:
        raise IcmpError("icmp_bad_checksum")
    type_, code, _csum, ident, seq = HEADER.unpack_from(data)
    return IcmpMessage(type_, code, ident, seq, data[HEADER.size :])


def build_icmp(type_: int, code: int, ident: int, seq: int, payload: bytes) -> bytes:
    msg = HEADER.pack(type_, code, 0, ident, seq) + payload
    csum = checksum(msg)
    return msg[:2] + csum.to_bytes(2, "big") + msg[4:]


def build_echo_reply(ident: int, seq: int, payload: bytes) -> bytes:
    return build_icmp(ECHO_REPLY, 0, ident, seq, payload)


def build_error(type_: int, code: int, original: bytes, next_hop_mtu: int = 0) -> bytes:
    """An ICMP error quoting `original` (its IP header + 8 bytes of payload).

    `original` is the offending packet as the guest sent it, IP header first."""
    ihl = (original[0] & 0x0F) * 4 if original else 20
    quote = original[: ihl + 8]
    return build_icmp(type_, code, 0, next_hop_mtu if type_ == DEST_UNREACHABLE else 0, quote)
