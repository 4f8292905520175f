"""UDP (RFC 768): datagram codec. Where datagrams go is decided above it: the network
layer (hostd/stack/network.py) serves DHCP and DNS on the gateway in-process and checks the
length and checksum of every guest datagram once; the transport layer
(hostd/stack/transport.py) gives the rest to port-forward sessions, open NAT flows or new
ones. A zero checksum from a guest means "none" and is accepted; a wrong one drops the
datagram. `parse_udp` is the codec for datagrams that come whole out of reassembly."""

from __future__ import annotations

import struct

from netferry.hostd.stack.checksum import checksum, pseudo_header_sum_v4, verify

HEADER = struct.Struct("!HHHH")
HEADER_LEN = 8
PROTO_UDP = 17


class UdpError(ValueError):
    pass


def parse_udp(
    src: bytes, dst: bytes, data: bytes | memoryview, verify_checksum: bool = True
) -> tuple[int, int, bytes | memoryview]:
    """(source port, destination port, payload); raises UdpError with a counter name.

    `verify_checksum=False` for offload links, where the guest leaves the sum to us."""
    if len(data) < HEADER_LEN:
        raise UdpError("udp_truncated")
    sport, dport, length, csum = HEADER.unpack_from(data)
    if length < HEADER_LEN or length > len(data):
        raise UdpError("udp_bad_length")
    if (
        csum
        and verify_checksum
        and not verify(data[:length], pseudo_header_sum_v4(src, dst, PROTO_UDP, length))
    ):
        raise UdpError("udp_bad_checksum")
    return sport, dport, data[HEADER_LEN:length]


def build_udp(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    length = HEADER_LEN + len(payload)
    seg = HEADER.pack(sport, dport, length, 0) + payload
    csum = checksum(seg, pseudo_header_sum_v4(src, dst, PROTO_UDP, length)) or 0xFFFF
    return seg[:6] + csum.to_bytes(2, "big") + seg[8:]
