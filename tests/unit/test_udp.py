"""hostd/stack/udp.py alone: the datagram codec, checked against scapy."""

from __future__ import annotations

import ipaddress

import pytest
from scapy.layers.inet import IP, UDP, in4_chksum
from scapy.packet import Raw

from netferry.hostd.stack import udp

GW_IP = "192.168.127.1"
GUEST_IP = "192.168.127.2"
HOST_IP = "192.168.127.254"


def b(ip: str) -> bytes:
    return ipaddress.IPv4Address(ip).packed


SRC, DST = b(GUEST_IP), b(HOST_IP)


def test_udp_build_and_parse():
    seg = udp.build_udp(SRC, DST, 1234, 53, b"query")
    pkt = IP(bytes(IP(src=GUEST_IP, dst=HOST_IP, proto=17) / Raw(seg)))
    assert in4_chksum(17, pkt, seg) == 0
    assert UDP(seg).sport == 1234 and UDP(seg).len == 13
    assert udp.parse_udp(SRC, DST, seg + b"trailing") == (1234, 53, b"query")
    with pytest.raises(udp.UdpError, match="udp_bad_checksum"):
        udp.parse_udp(SRC, b(GW_IP), seg)  # a different pseudo header
    with pytest.raises(udp.UdpError, match="udp_truncated"):
        udp.parse_udp(SRC, DST, seg[:7])
    with pytest.raises(udp.UdpError, match="udp_bad_length"):
        udp.parse_udp(SRC, DST, seg[:10])


def test_udp_checksum_zero_is_sent_as_ffff():
    # Find a payload whose checksum computes to 0: RFC 768 says send 0xFFFF.
    for i in range(200000):
        payload = i.to_bytes(4, "big")
        seg = udp.build_udp(SRC, DST, 1, 2, payload)
        if seg[6:8] == b"\xff\xff":
            pkt = IP(src=GUEST_IP, dst=HOST_IP, proto=17)
            assert in4_chksum(17, pkt, seg) == 0
            assert udp.parse_udp(SRC, DST, seg)[2] == payload
            return
    pytest.fail("no payload with a zero checksum found")
