"""hostd/stack/ipv4.py alone: the reassembler, fragmentation and the header codec
(checked against scapy). Reassembly through the switch is in test_network.py."""

from __future__ import annotations

import ipaddress
import random

import pytest
from scapy.layers.inet import IP, defragment

from netferry.hostd.stack import ipv4
from tests.unit.test_network import assert_valid_ip

GUEST_IP = "192.168.127.2"
HOST_IP = "192.168.127.254"


def b(ip: str) -> bytes:
    return ipaddress.IPv4Address(ip).packed


SRC, DST = b(GUEST_IP), b(HOST_IP)


def frag(offset: int, data: bytes, mf: bool, ident: int = 1, proto: int = 17) -> ipv4.Ipv4Packet:
    fo = (ipv4.FLAG_MF if mf else 0) | (offset >> 3)
    return ipv4.parse_ipv4(ipv4.build_ipv4(SRC, DST, proto, data, ident, flags_offset=fo))


def test_reassembler_any_order():
    data = random.Random(9).randbytes(5000)
    pieces = [ipv4.parse_ipv4(p) for p in ipv4.fragment(SRC, DST, 17, data, 1500, 42)]
    for seed in range(5):
        order = pieces[:]
        random.Random(seed).shuffle(order)
        r = ipv4.Reassembler()
        results = [r.add(p, 0.0) for p in order]
        assert all(x is None for x in results[:-1])
        whole = results[-1]
        assert whole is not None and whole.payload == data
        assert not whole.is_fragment
        assert whole.src == SRC and whole.dst == DST and whole.proto == 17 and whole.ident == 42
        assert whole.header == pieces[0].header  # the first fragment's header is quoted
        assert r.held_bytes == 0 and len(r) == 0


def test_reassembler_keys_by_ident_and_protocol():
    r = ipv4.Reassembler()
    assert r.add(frag(0, b"a" * 8, True, ident=1), 0) is None
    assert r.add(frag(8, b"b" * 8, False, ident=2), 0) is None
    assert r.add(frag(8, b"c" * 8, False, ident=1, proto=1), 0) is None
    assert len(r) == 3
    whole = r.add(frag(8, b"d" * 8, False, ident=1), 0)
    assert whole is not None and whole.payload == b"a" * 8 + b"d" * 8
    assert len(r) == 2


def test_reassembler_exact_duplicate_ignored_conflicting_dropped():
    r = ipv4.Reassembler()
    r.add(frag(0, b"a" * 8, True), 0)
    assert r.add(frag(0, b"a" * 8, True), 0) is None
    assert r.stats["overlap_dropped"] == 0 and len(r) == 1
    assert r.add(frag(0, b"X" * 8, True), 0) is None  # same place, other bytes
    assert r.stats["overlap_dropped"] == 1 and len(r) == 0 and r.held_bytes == 0


@pytest.mark.parametrize(
    "sequence",
    [
        [(0, 16, True), (8, 16, False)],  # overlap into the middle
        [(8, 8, True), (0, 24, False)],  # a later piece covers an earlier one
        [(0, 8, True), (16, 8, False), (8, 8, False)],  # two different ends
        [(16, 8, False), (0, 8, True), (24, 8, True)],  # a piece past the known end
        [(0, 8, True), (24, 8, True), (16, 8, False)],  # the end arrives below a stored piece
    ],
    ids=["middle", "covering", "two_ends", "past_end", "end_below_stored"],
)
def test_reassembler_overlaps_and_inconsistent_ends_dropped(sequence):
    r = ipv4.Reassembler()
    results = [r.add(frag(off, b"\x11" * size, mf), 0) for off, size, mf in sequence]
    assert results == [None] * len(sequence)
    assert r.stats["overlap_dropped"] == 1
    assert r.stats["reassembled"] == 0
    assert len(r) == 0 and r.held_bytes == 0


def test_reassembler_unaligned_middle_fragment_dropped():
    r = ipv4.Reassembler()
    assert r.add(frag(0, b"a" * 12, True), 0) is None
    assert r.stats["overlap_dropped"] == 1 and len(r) == 0


def test_reassembler_too_big_dropped():
    r = ipv4.Reassembler()
    assert r.add(frag(65512, b"a" * 16, False), 0) is None
    assert r.stats["too_big_dropped"] == 1 and len(r) == 0


def test_reassembler_timeout_and_deadline():
    r = ipv4.Reassembler(timeout=30.0)
    assert r.next_deadline() is None
    r.add(frag(0, b"a" * 8, True, ident=1), 10.0)
    r.add(frag(0, b"a" * 8, True, ident=2), 20.0)
    assert r.next_deadline() == 40.0
    assert r.expire(39.99) == 0
    held = 8 + ipv4.FRAGMENT_OVERHEAD + ipv4.PARTIAL_OVERHEAD  # every piece and partial costs
    assert r.expire(40.0) == 1 and len(r) == 1 and r.held_bytes == held
    assert r.next_deadline() == 50.0
    assert r.expire(1000.0) == 1
    assert r.stats["timeout_dropped"] == 2 and r.held_bytes == 0


def test_reassembler_memory_bound_evicts_oldest():
    o, p = ipv4.FRAGMENT_OVERHEAD, ipv4.PARTIAL_OVERHEAD  # charged beyond the data
    limit = 2 * (p + o + 40) + o + 8
    r = ipv4.Reassembler(max_bytes=limit)
    for ident in range(1, 6):
        r.add(frag(0, b"x" * 40, True, ident=ident), float(ident))
        assert r.held_bytes <= limit
    assert len(r) == 2  # the two newest
    assert r.stats["memory_dropped"] == 3
    assert r.add(frag(40, b"y" * 8, False, ident=5), 9.0).payload == b"x" * 40 + b"y" * 8
    # One datagram alone over the limit is dropped, not held.
    r2 = ipv4.Reassembler(max_bytes=p + 2 * o + 64)
    r2.add(frag(0, b"a" * 48, True), 0)
    assert r2.add(frag(48, b"b" * 48, True), 0) is None
    assert len(r2) == 0 and r2.held_bytes == 0 and r2.stats["memory_dropped"] == 1
    assert r2.add(frag(0, b"c" * (o + 72), True, ident=9), 0) is None  # bigger than budget
    assert len(r2) == 0 and r2.held_bytes == 0


def test_fragment_fits_in_one_packet():
    (p,) = ipv4.fragment(SRC, DST, 99, b"x" * 1480, 1500, 7)
    pkt = IP(p)
    assert pkt.len == 1500 and pkt.flags == 0 and pkt.frag == 0 and pkt.id == 7
    assert_valid_ip(pkt)


@pytest.mark.parametrize(("size", "mtu"), [(1481, 1500), (3000, 1500), (65000, 9000), (100, 28)])
def test_fragment_splits_on_8_byte_boundaries(size, mtu):
    data = random.Random(size).randbytes(size)
    packets = ipv4.fragment(SRC, DST, 17, data, mtu, 0xBEEF, ttl=33, tos=0x10)
    parsed = [IP(p) for p in packets]
    assert all(len(p) <= mtu for p in packets)
    offsets = [p.frag * 8 for p in parsed]
    assert offsets == sorted(offsets) and offsets[0] == 0
    for p in parsed:
        assert p.id == 0xBEEF and p.ttl == 33 and p.tos == 0x10
        assert_valid_ip(p)
    assert all(p.flags.MF for p in parsed[:-1]) and not parsed[-1].flags.MF
    assert all(len(bytes(p.payload)) % 8 == 0 for p in parsed[:-1])
    (whole,) = defragment(parsed)
    assert bytes(IP(bytes(whole)).payload) == data


def test_fragment_mtu_too_small():
    with pytest.raises(ValueError, match="too small"):
        ipv4.fragment(SRC, DST, 17, b"x" * 100, 27, 1)


def test_build_and_parse_ipv4_against_scapy():
    raw = ipv4.build_ipv4(SRC, DST, 99, b"abc", ident=5, ttl=9, tos=4)
    p = IP(raw)
    assert (p.src, p.dst, p.proto, p.id, p.ttl, p.tos, p.len) == (
        GUEST_IP,
        HOST_IP,
        99,
        5,
        9,
        4,
        23,
    )
    assert_valid_ip(p)
    s = bytes(IP(src=GUEST_IP, dst=HOST_IP, options=b"\x94\x04\x00\x00") / b"data") + b"pad"
    pkt = ipv4.parse_ipv4(s)
    assert len(pkt.header) == 24 and pkt.payload == b"data"  # options kept, padding trimmed
