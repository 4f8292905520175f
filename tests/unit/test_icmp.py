"""hostd/stack/icmp.py alone: echo and error codecs, checked against scapy."""

from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.utils import checksum as scapy_checksum

from netferry.hostd.stack import icmp

GUEST_IP = "192.168.127.2"
REMOTE_IP = "192.0.2.7"


def test_icmp_build_and_parse():
    msg = icmp.build_echo_reply(0x1234, 0x5678, b"hello")
    p = ICMP(msg)
    assert p.type == 0 and p.id == 0x1234 and p.seq == 0x5678 and bytes(p.payload) == b"hello"
    assert scapy_checksum(msg) == 0
    parsed = icmp.parse_icmp(msg)
    assert (parsed.type, parsed.code, parsed.ident, parsed.seq, parsed.payload) == (
        0,
        0,
        0x1234,
        0x5678,
        b"hello",
    )
    with pytest.raises(icmp.IcmpError, match="icmp_bad_checksum"):
        icmp.parse_icmp(msg[:-1] + b"X")
    with pytest.raises(icmp.IcmpError, match="icmp_truncated"):
        icmp.parse_icmp(msg[:7])


def test_icmp_error_quotes_header_with_options_and_8_bytes():
    orig = bytes(IP(src=GUEST_IP, dst=REMOTE_IP, options=b"\x01" * 8) / UDP() / (b"x" * 100))
    err = icmp.build_error(icmp.TIME_EXCEEDED, 0, orig)
    assert err[8:] == orig[: 28 + 8]
    assert err[4:8] == b"\0\0\0\0"
    assert scapy_checksum(err) == 0
    short = icmp.build_error(icmp.DEST_UNREACHABLE, 3, orig[:24])
    assert short[8:] == orig[:24]
