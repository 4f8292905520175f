"""Internet checksum (RFC 1071) without a Python loop.

The ones' complement sum of 16-bit words equals the big-endian integer value of the data
modulo 0xFFFF (2**16 ≡ 1 mod 0xFFFF), so one `int.from_bytes` and one `%` do the whole
sum in C, whatever the length. The only care needed is the 0 / 0xFFFF ambiguity of ones'
complement zero.
"""

from __future__ import annotations

import struct

_PSEUDO_V4 = struct.Struct("!4s4sBBH")
_PSEUDO_V6 = struct.Struct("!16s16sI3xB")  # RFC 8200 section 8.1: upper-layer length is 32 bits


def ones_sum(data: bytes | bytearray | memoryview) -> int:
    """Ones' complement sum of `data` (padded to even length), in 0..0xFFFF."""
    if len(data) & 1:
        data = bytes(data) + b"\x00"
    value = int.from_bytes(data, "big")
    if not value:
        return 0
    s = value % 0xFFFF
    return s if s else 0xFFFF


def checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The checksum field value for `data`, whose own checksum field is zero.

    `initial` is a ones' sum of extra words, e.g. of a pseudo header."""
    s = ones_sum(data) + initial
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def verify(data: bytes | bytearray | memoryview, initial: int = 0) -> bool:
    """True when `data` (checksum field included) sums to ones' complement zero."""
    s = ones_sum(data) + initial
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    return s == 0xFFFF


def pseudo_header_sum_v4(src: bytes, dst: bytes, proto: int, length: int) -> int:
    """Ones' sum of the IPv4 pseudo header used by TCP and UDP checksums."""
    return ones_sum(_PSEUDO_V4.pack(src, dst, 0, proto, length))


def transport_checksum_v4(src: bytes, dst: bytes, proto: int, segment: bytes | bytearray) -> int:
    """Checksum for a TCP or UDP segment (its checksum field zero) between IPv4 `src`/`dst`."""
    return checksum(segment, pseudo_header_sum_v4(src, dst, proto, len(segment)))


def verify_transport_v4(src: bytes, dst: bytes, proto: int, segment: bytes | memoryview) -> bool:
    return verify(segment, pseudo_header_sum_v4(src, dst, proto, len(segment)))


def pseudo_header_sum_v6(src: bytes, dst: bytes, next_header: int, length: int) -> int:
    """Ones' sum of the IPv6 pseudo header (RFC 8200 8.1) for TCP, UDP and ICMPv6.

    `dst` is the final destination (the last routing-header address when there is one)."""
    return ones_sum(_PSEUDO_V6.pack(src, dst, length, next_header))


def transport_checksum_v6(
    src: bytes, dst: bytes, next_header: int, segment: bytes | bytearray | memoryview
) -> int:
    """Checksum for a TCP, UDP or ICMPv6 message (its checksum field zero) between IPv6 hosts.

    UDP over IPv6 must not send 0 (it means "no checksum", which IPv6 forbids): callers building
    UDP map a 0 result to 0xFFFF, as build_udp does for IPv4."""
    return checksum(segment, pseudo_header_sum_v6(src, dst, next_header, len(segment)))


def verify_transport_v6(
    src: bytes, dst: bytes, next_header: int, segment: bytes | memoryview
) -> bool:
    return verify(segment, pseudo_header_sum_v6(src, dst, next_header, len(segment)))
