"""ICMPv6 (RFC 4443): echo, the error messages the stack sends to guests, and received errors.

Every ICMPv6 checksum covers the IPv6 pseudo header, so each function here takes the source
and destination addresses. Echo to the gateway is answered here; echo elsewhere becomes an
event that the NAT relays through an IPv6 ping socket.

Errors the stack originates (destination unreachable, packet too big, time exceeded,
parameter problem) quote as much of the invoking packet as fits the minimum MTU 1280
(RFC 4443 2.4(c)): a guest kernel needs the header chain and the transport ports to match
the error to its socket. `may_send_error` holds the rules of RFC 4443 2.4(e) (never about an
error, nor about a packet from an unspecified or multicast source, nor, mostly, about one to
a multicast destination) and `ErrorRateLimiter` the rate limit of 2.4(f), sans-IO.

Received errors (from a guest, or what the host reports on a NATed socket) are parsed by
`parse_error` into the quoted packet's addresses, protocol and first upper-layer bytes, so the
caller can find the flow it belongs to. `error_for_errno` maps a host socket error to the
type and code relayed to the guest (ECONNREFUSED → port unreachable, EMSGSIZE → packet too big),
and `error_from_extended_err` reads the host's own ICMPv6 error from an IPV6_RECVERR control
message, so hop-limit and other errors the host received reach the guest as they were.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass

from netferry.hostd.stack.checksum import pseudo_header_sum_v6, transport_checksum_v6, verify
from netferry.hostd.stack.ipv6 import (
    EXTENSION_HEADERS,
    HEADER,
    HEADER_LEN,
    MIN_MTU,
    NH_FRAGMENT,
    NH_ICMPV6,
    UNSPECIFIED,
    is_multicast,
)

MESSAGE = struct.Struct("!BBHI")  # type, code, checksum, the 32-bit word after them
ECHO = struct.Struct("!BBHHH")  # type, code, checksum, identifier, sequence
# An error quotes as much of the invoking packet as keeps the error within 1280 bytes.
MAX_QUOTE = MIN_MTU - HEADER_LEN - MESSAGE.size

# Types
DEST_UNREACHABLE = 1
PACKET_TOO_BIG = 2
TIME_EXCEEDED = 3
PARAM_PROBLEM = 4
ECHO_REQUEST = 128
ECHO_REPLY = 129
ROUTER_SOLICITATION = 133
ROUTER_ADVERTISEMENT = 134
NEIGHBOR_SOLICITATION = 135
NEIGHBOR_ADVERTISEMENT = 136
REDIRECT = 137

# Destination unreachable codes
NO_ROUTE = 0
ADMIN_PROHIBITED = 1
BEYOND_SCOPE = 2
ADDRESS_UNREACHABLE = 3
PORT_UNREACHABLE = 4
SOURCE_POLICY_FAILED = 5
REJECT_ROUTE = 6

# Time exceeded codes
HOP_LIMIT_EXCEEDED = 0
REASSEMBLY_TIME_EXCEEDED = 1

# Parameter problem codes: see hostd.stack.ipv6.PP_*


class Icmpv6Error(ValueError):
    """A malformed ICMPv6 message; `args[0]` is the counter name for the reason."""


@dataclass(slots=True)
class Icmpv6Message:
    type: int
    code: int
    word: int  # identifier << 16 | sequence for echo; MTU; pointer; or unused
    body: bytes | memoryview  # what follows the first 8 bytes

    @property
    def is_error(self) -> bool:
        return self.type < 128

    @property
    def ident(self) -> int:
        return self.word >> 16

    @property
    def seq(self) -> int:
        return self.word & 0xFFFF


def parse_icmpv6(src: bytes, dst: bytes, data: bytes | memoryview) -> Icmpv6Message:
    """`data` is the whole ICMPv6 message; the checksum is verified with the pseudo header."""
    if len(data) < MESSAGE.size:  # every message we serve or relay has the 8-byte header
        raise Icmpv6Error("icmpv6_truncated")
    if not verify(data, pseudo_header_sum_v6(src, dst, NH_ICMPV6, len(data))):
        raise Icmpv6Error("icmpv6_bad_checksum")
    type_, code, _csum, word = MESSAGE.unpack_from(data)
    return Icmpv6Message(type_, code, word, data[MESSAGE.size :])


def build_icmpv6(
    src: bytes, dst: bytes, type_: int, code: int, word: int, body: bytes | bytearray
) -> bytes:
    msg = MESSAGE.pack(type_, code, 0, word) + body
    csum = transport_checksum_v6(src, dst, NH_ICMPV6, msg)
    return msg[:2] + csum.to_bytes(2, "big") + msg[4:]


def build_echo_reply(src: bytes, dst: bytes, ident: int, seq: int, payload: bytes) -> bytes:
    return build_icmpv6(src, dst, ECHO_REPLY, 0, ident << 16 | seq, payload)


def build_echo_request(src: bytes, dst: bytes, ident: int, seq: int, payload: bytes) -> bytes:
    return build_icmpv6(src, dst, ECHO_REQUEST, 0, ident << 16 | seq, payload)


def build_error(
    src: bytes, dst: bytes, type_: int, code: int, invoking: bytes | memoryview, param: int = 0
) -> bytes:
    """An ICMPv6 error about `invoking` (the offending packet, IPv6 header first).

    `param` is the MTU for packet too big and the pointer for parameter problem."""
    if not 0 <= type_ < 128:
        raise ValueError(f"ICMPv6 type {type_} is not an error")
    return build_icmpv6(src, dst, type_, code, param, bytes(invoking[:MAX_QUOTE]))


def may_send_error(
    src: bytes, dst: bytes, type_: int, code: int, invoking_icmp_type: int | None = None
) -> bool:
    """RFC 4443 2.4(e): may an error of `type_`/`code` be sent about a packet `src` → `dst`?

    `invoking_icmp_type` is the ICMPv6 type of the invoking packet when it is ICMPv6."""
    if invoking_icmp_type is not None and invoking_icmp_type < 128:
        return False  # never an error about an error
    if src == UNSPECIFIED or is_multicast(src):
        return False
    if is_multicast(dst):
        return type_ == PACKET_TOO_BIG or (type_ == PARAM_PROBLEM and code == 2)
    return True


class ErrorRateLimiter:
    """A token bucket for originated errors (RFC 4443 2.4(f)), sans-IO: the caller passes now."""

    __slots__ = ("_stamp", "_tokens", "burst", "dropped", "rate")

    def __init__(self, rate: float = 100.0, burst: int = 50) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._stamp: float | None = None
        self.dropped = 0

    def allow(self, now: float) -> bool:
        if self._stamp is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        self.dropped += 1
        return False


@dataclass(slots=True, frozen=True)
class QuotedPacket:
    """What an ICMPv6 error tells about the packet it is about."""

    type: int
    code: int
    param: int  # MTU (packet too big), pointer (parameter problem), else 0
    src: bytes
    dst: bytes
    next_header: int  # the quoted packet's upper-layer protocol (as far as the quote shows)
    upper: bytes  # the first bytes of its upper-layer header (ports, or echo id/seq)
    fragment_offset: int = 0  # a non-first fragment quotes no upper-layer header


def parse_error(msg: Icmpv6Message) -> QuotedPacket:
    """The invoking packet of a received error; the quote may be truncated anywhere."""
    if not msg.is_error:
        raise Icmpv6Error("icmpv6_not_an_error")
    q = msg.body
    if len(q) < HEADER_LEN:
        raise Icmpv6Error("icmpv6_error_quote_truncated")
    vtf, plen, nh, _hops, src, dst = HEADER.unpack_from(q)
    if vtf >> 28 != 6:
        raise Icmpv6Error("icmpv6_error_quote_not_ipv6")
    end = min(len(q), HEADER_LEN + plen)
    off = HEADER_LEN
    frag_offset = 0
    for _ in range(8):
        if nh not in EXTENSION_HEADERS:
            break
        if off + 8 > end:
            raise Icmpv6Error("icmpv6_error_quote_truncated")
        if nh == NH_FRAGMENT:
            frag_offset = int.from_bytes(q[off + 2 : off + 4], "big") & 0xFFF8
            nh, off = q[off], off + 8
            if frag_offset:
                break
            continue
        nh, off = q[off], off + (q[off + 1] + 1) * 8
    else:
        raise Icmpv6Error("icmpv6_error_quote_bad_chain")
    return QuotedPacket(
        msg.type, msg.code, msg.word if msg.type in (PACKET_TOO_BIG, PARAM_PROBLEM) else 0,
        bytes(src), bytes(dst), nh, bytes(q[off : min(end, off + 8)]) if not frag_offset else b"",
        frag_offset,
    )  # fmt: skip


# A host socket's error → what the guest is told (type, code). Ordered by how often they occur.
_ERRNO_TO_ICMPV6 = {
    errno.ECONNREFUSED: (DEST_UNREACHABLE, PORT_UNREACHABLE),
    errno.ENETUNREACH: (DEST_UNREACHABLE, NO_ROUTE),
    errno.EHOSTUNREACH: (DEST_UNREACHABLE, ADDRESS_UNREACHABLE),
    errno.EADDRNOTAVAIL: (DEST_UNREACHABLE, ADDRESS_UNREACHABLE),
    errno.EACCES: (DEST_UNREACHABLE, ADMIN_PROHIBITED),
    errno.EPERM: (DEST_UNREACHABLE, ADMIN_PROHIBITED),
    errno.EMSGSIZE: (PACKET_TOO_BIG, 0),
}


def error_for_errno(err: int) -> tuple[int, int] | None:
    """The ICMPv6 type and code a guest should see for a host socket error, if any.

    Time exceeded has no errno of its own: a relayed hop-limit error arrives as an
    IPV6_RECVERR extended error carrying its ICMPv6 type and code, passed through as is."""
    return _ERRNO_TO_ICMPV6.get(err)


# struct sock_extended_err (<linux/errqueue.h>), the head of an IPV6_RECVERR control message
EXTENDED_ERR = struct.Struct("=IBBBBII")
IPV6_RECVERR = 25  # <linux/in6.h>; the socket module lacks it
SO_EE_ORIGIN_LOCAL = 1
SO_EE_ORIGIN_ICMP6 = 3


def error_from_extended_err(data: bytes) -> tuple[int, int, int] | None:
    """(type, code, param) to relay for an IPV6_RECVERR message of a host socket, if any.

    An ICMPv6 error the host received passes through with its type and code (param: the MTU
    of packet too big, the pointer of parameter problem); a local EMSGSIZE (the host's own
    path MTU) becomes packet too big with that MTU. `data` is the control message's data."""
    if len(data) < EXTENDED_ERR.size:
        return None
    err, origin, type_, code, _pad, info, _data = EXTENDED_ERR.unpack_from(data)
    if origin == SO_EE_ORIGIN_ICMP6 and type_ < 128:
        return type_, code, info if type_ in (PACKET_TOO_BIG, PARAM_PROBLEM) else 0
    if origin == SO_EE_ORIGIN_LOCAL and err == errno.EMSGSIZE:
        return PACKET_TOO_BIG, 0, info
    return None


def errno_for_error(type_: int, code: int) -> int | None:
    """The errno a guest kernel reports for a received error (what Linux's icmpv6_err_convert
    does), for checking relays end to end; None for errors that set no socket error."""
    if type_ == DEST_UNREACHABLE:
        return {
            NO_ROUTE: errno.ENETUNREACH,
            ADMIN_PROHIBITED: errno.EACCES,
            BEYOND_SCOPE: errno.EHOSTUNREACH,
            ADDRESS_UNREACHABLE: errno.EHOSTUNREACH,
            PORT_UNREACHABLE: errno.ECONNREFUSED,
            SOURCE_POLICY_FAILED: errno.EACCES,
            REJECT_ROUTE: errno.EACCES,
        }.get(code, errno.EHOSTUNREACH)
    if type_ == PACKET_TOO_BIG:
        return errno.EMSGSIZE
    if type_ == PARAM_PROBLEM:
        return errno.EPROTO
    if type_ == TIME_EXCEEDED:
        return errno.EHOSTUNREACH
    return None
