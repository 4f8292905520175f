"""IPv6 header, extension headers, reassembly and fragmentation, checked against scapy."""

from __future__ import annotations

import ipaddress
import random

import pytest
from scapy.layers.inet import TCP, UDP
from scapy.layers.inet6 import (
    HBHOptUnknown,
    ICMPv6EchoRequest,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    RouterAlert,
    fragment6,
)

from netferry.hostd.stack import checksum as cs
from netferry.hostd.stack import ipv6

SRC = "fd00:192:168:127::2"
DST = "fd00:192:168:127::1"
S = ipaddress.IPv6Address(SRC).packed
D = ipaddress.IPv6Address(DST).packed


def test_parse_plain_udp_with_flow_label_and_class_and_padding():
    pkt = IPv6(src=SRC, dst=DST, hlim=7, tc=0xB8, fl=0x12345) / UDP(sport=1, dport=2) / b"hi"
    p = ipv6.parse_ipv6(bytes(pkt) + b"\x00" * 10)  # Ethernet padding trimmed
    assert (p.src, p.dst, p.next_header, p.hop_limit) == (S, D, 17, 7)
    assert (p.traffic_class, p.flow_label) == (0xB8, 0x12345)
    assert bytes(p.payload) == bytes(pkt[UDP]) and p.fragment is None
    assert bytes(p.raw) == bytes(pkt) and p.header == bytes(pkt)[:40]


def test_build_matches_scapy():
    payload = bytes(UDP(sport=5, dport=6) / (b"x" * 3))
    built = ipv6.build_ipv6(S, D, 17, payload, hop_limit=9, traffic_class=3, flow_label=0xABCDE)
    ref = IPv6(src=SRC, dst=DST, nh=17, hlim=9, tc=3, fl=0xABCDE) / payload
    assert built == bytes(ref)
    assert IPv6(built).fl == 0xABCDE


def test_extension_chain_walked_to_upper_layer():
    pkt = (
        IPv6(src=SRC, dst=DST)
        / IPv6ExtHdrHopByHop(options=[RouterAlert()])
        / IPv6ExtHdrDestOpt()
        / IPv6ExtHdrRouting(segleft=0, addresses=[])
        / IPv6ExtHdrDestOpt()
        / TCP(sport=1, dport=80)
    )
    p = ipv6.parse_ipv6(bytes(pkt))
    assert p.next_header == 6 and bytes(p.payload) == bytes(pkt[TCP])
    assert len(p.header) == len(bytes(pkt)) - 20


def test_no_next_header_is_accepted_with_empty_payload():
    p = ipv6.parse_ipv6(bytes(IPv6(src=SRC, dst=DST, nh=59)))
    assert p.next_header == 59 and not bytes(p.payload)


@pytest.mark.parametrize(
    ("pkt", "reason", "code", "pointer"),
    [
        # hop-by-hop anywhere but first: unrecognised next header at the field naming it
        (
            IPv6(src=SRC, dst=DST) / IPv6ExtHdrDestOpt() / IPv6ExtHdrHopByHop() / UDP(),
            "ipv6_misplaced_hop_by_hop",
            1,
            40,
        ),
        (IPv6(src=SRC, dst=DST, nh=132) / (b"\x00" * 8), "ipv6_unknown_next_header", 1, 6),
        (
            IPv6(src=SRC, dst=DST) / IPv6ExtHdrDestOpt(nh=50) / (b"\x00" * 8),
            "ipv6_unknown_next_header",
            1,
            40,
        ),
        (
            IPv6(src=SRC, dst=DST) / IPv6ExtHdrRouting(type=0, segleft=1, addresses=[DST]) / UDP(),
            "ipv6_routing_header",
            0,
            42,
        ),
        (
            IPv6(src=SRC, dst=DST)
            / IPv6ExtHdrDestOpt(options=[HBHOptUnknown(otype=0x83, optdata=b"ab")])
            / UDP(),
            "ipv6_unknown_option",
            2,
            42,
        ),
        (
            IPv6(src=SRC, dst=DST)
            / IPv6ExtHdrHopByHop(options=[HBHOptUnknown(otype=0xC9, optdata=b"ab")])
            / UDP(),
            "ipv6_unknown_option",
            2,
            42,
        ),
    ],
)
def test_parameter_problems(pkt, reason, code, pointer):
    with pytest.raises(ipv6.Ipv6ParamProblem) as e:
        ipv6.parse_ipv6(bytes(pkt))
    assert e.value.args[0] == reason and e.value.code == code and e.value.pointer == pointer


def test_unknown_option_action_bits_skip_and_discard():
    ok = IPv6(src=SRC, dst=DST) / IPv6ExtHdrDestOpt(options=[HBHOptUnknown(otype=0x1E)]) / UDP()
    assert ipv6.parse_ipv6(bytes(ok)).next_header == 17
    drop = IPv6(src=SRC, dst=DST) / IPv6ExtHdrDestOpt(options=[HBHOptUnknown(otype=0x5E)]) / UDP()
    with pytest.raises(ipv6.Ipv6Error) as e:
        ipv6.parse_ipv6(bytes(drop))
    assert type(e.value) is ipv6.Ipv6Error and e.value.args[0] == "ipv6_unknown_option"
    # action 3 to a multicast destination: discarded without an error message
    mc = IPv6(src=SRC, dst="ff02::1") / IPv6ExtHdrDestOpt(options=[HBHOptUnknown(otype=0xDE)])
    with pytest.raises(ipv6.Ipv6Error) as e:
        ipv6.parse_ipv6(bytes(mc / UDP()))
    assert type(e.value) is ipv6.Ipv6Error


def _raw(pkt) -> bytearray:
    return bytearray(bytes(pkt))


def test_malformed_packets_raise_typed_errors():
    base = _raw(IPv6(src=SRC, dst=DST) / IPv6ExtHdrDestOpt() / UDP())
    cases = {
        "ipv6_truncated": base[:39],
        "ipv6_bad_payload_length": base[:-1],
    }
    bad_version = bytearray(base)
    bad_version[0] = 0x45
    cases["ipv6_bad_version"] = bad_version
    ext_too_long = bytearray(base)
    ext_too_long[41] = 5  # the destination options header claims 48 bytes
    cases["ipv6_truncated_extension"] = ext_too_long
    bad_opt = bytearray(base)
    bad_opt[42:48] = bytes([1, 9, 0, 0, 0, 0])  # PadN longer than the header
    cases["ipv6_bad_option_length"] = bad_opt
    mc_src = _raw(IPv6(src="ff02::1", dst=DST) / UDP())
    cases["ipv6_multicast_source"] = mc_src
    jumbo = _raw(IPv6(src=SRC, dst=DST) / IPv6ExtHdrHopByHop() / UDP())
    jumbo[4:6] = b"\x00\x00"
    cases["ipv6_jumbogram"] = jumbo
    chain = IPv6(src=SRC, dst=DST)
    for _ in range(ipv6.MAX_EXTENSION_HEADERS + 1):
        chain = chain / IPv6ExtHdrDestOpt()
    cases["ipv6_too_many_extensions"] = _raw(chain / UDP())
    for reason, data in cases.items():
        with pytest.raises(ipv6.Ipv6Error) as e:
            ipv6.parse_ipv6(bytes(data))
        assert e.value.args[0] == reason, reason


def test_random_garbage_never_raises_anything_but_ipv6_error():
    rng = random.Random(15)
    good = bytes(
        IPv6(src=SRC, dst=DST)
        / IPv6ExtHdrHopByHop(options=[RouterAlert()])
        / IPv6ExtHdrFragment(offset=0, m=1, id=7)
        / UDP()
        / (b"z" * 16)
    )
    r = ipv6.Reassembler()
    for _ in range(3000):
        data = bytearray(good)
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(len(data))] = rng.getrandbits(8)
        data = data[: rng.randint(0, len(data))] if rng.random() < 0.3 else data
        try:
            p = ipv6.parse_ipv6(bytes(data))
            r.add(p, 0.0)
        except ipv6.Ipv6Error:
            pass


def _fragments(payload_len: int, frag_size: int, ident: int = 0x1234):
    pkt = IPv6(src=SRC, dst=DST) / IPv6ExtHdrFragment(id=ident) / UDP(sport=7, dport=9)
    pkt = pkt / (bytes(range(256)) * (payload_len // 256 + 1))
    pkt = IPv6(bytes(pkt))
    frags = fragment6(pkt, frag_size)
    return pkt, [ipv6.parse_ipv6(bytes(f)) for f in frags]


def test_reassembles_scapy_fragments_in_any_order():
    whole, frags = _fragments(5000, 1280)
    assert len(frags) > 3 and all(f.fragment for f in frags)
    rng = random.Random(1)
    rng.shuffle(frags)
    r = ipv6.Reassembler()
    results = [r.add(f, 0.0) for f in frags]
    done = [p for p in results if p is not None]
    assert len(done) == 1 and results[-1] is done[0]
    assert done[0].next_header == 17 and bytes(done[0].payload) == bytes(whole[UDP])
    assert r.held_bytes == 0 and len(r) == 0 and r.stats["reassembled"] == 1
    # the reassembled packet is a valid IPv6 packet without the fragment header
    assert bytes(IPv6(bytes(done[0].raw))[UDP]) == bytes(whole[UDP])


def test_extension_headers_before_the_fragment_header_survive_reassembly():
    pkt = IPv6(src=SRC, dst=DST) / IPv6ExtHdrHopByHop(options=[RouterAlert()])
    pkt = pkt / IPv6ExtHdrFragment(id=5) / UDP() / (b"q" * 3000)
    frags = [ipv6.parse_ipv6(bytes(f)) for f in fragment6(IPv6(bytes(pkt)), 1280)]
    r = ipv6.Reassembler()
    out = [r.add(f, 0.0) for f in frags][-1]
    assert out is not None and out.next_header == 17
    assert IPv6(bytes(out.raw))[UDP].load == b"q" * 3000


def test_atomic_fragment_is_processed_alone():
    r = ipv6.Reassembler()
    _, frags = _fragments(3000, 1280, ident=99)
    assert r.add(frags[0], 0.0) is None
    atomic = ipv6.parse_ipv6(
        bytes(IPv6(src=SRC, dst=DST) / IPv6ExtHdrFragment(id=99, m=0, offset=0) / UDP() / b"a")
    )
    out = r.add(atomic, 0.0)
    assert out is not None and out.next_header == 17 and bytes(out.payload)[8:] == b"a"
    assert r.stats["atomic"] == 1 and len(r) == 1  # the queue of ident 99 is untouched


def test_overlap_discards_the_whole_datagram():
    def frag(offset, m, data):
        hdr = IPv6(src=SRC, dst=DST) / IPv6ExtHdrFragment(id=3, offset=offset // 8, m=m, nh=17)
        return ipv6.parse_ipv6(bytes(hdr / data))

    r = ipv6.Reassembler()
    assert r.add(frag(0, 1, bytes(UDP(sport=1, dport=2, len=48)) + b"a" * 8), 0.0) is None
    assert r.add(frag(8, 1, b"b" * 16), 0.0) is None  # overlaps 8..16
    assert r.stats["overlap_dropped"] == 1 and len(r) == 0 and r.held_bytes == 0
    # the rest of the datagram afterwards does not complete anything
    assert r.add(frag(16, 0, b"c" * 32), 0.0) is None
    assert r.stats["reassembled"] == 0


def test_exact_duplicate_is_ignored_and_conflicting_ends_drop():
    def frag(offset, m, data):
        hdr = IPv6(src=SRC, dst=DST) / IPv6ExtHdrFragment(id=4, offset=offset // 8, m=m, nh=17)
        return ipv6.parse_ipv6(bytes(hdr / data))

    r = ipv6.Reassembler()
    first = frag(0, 1, bytes(UDP(sport=1, dport=2, len=24)) + b"a" * 8)
    r.add(first, 0.0)
    assert r.add(first, 0.0) is None and r.stats["duplicates"] == 1 and len(r) == 1
    r.add(frag(24, 0, b"x" * 8), 0.0)
    assert r.add(frag(24, 0, b"x" * 16), 0.0) is None  # a second, different end
    assert r.stats["overlap_dropped"] == 1 and len(r) == 0


def test_zero_length_final_fragments_cost_and_are_bounded():
    r = ipv6.Reassembler(max_bytes=10 * ipv6.FRAGMENT_OVERHEAD, max_datagrams=1000)
    for ident in range(50):
        f = IPv6(src=SRC, dst=DST) / IPv6ExtHdrFragment(id=ident, offset=100, m=0, nh=17)
        assert r.add(ipv6.parse_ipv6(bytes(f)), 0.0) is None
    assert r.held_bytes <= r.max_bytes and len(r) <= 10
    assert r.stats["memory_dropped"] >= 40


def test_tiny_non_final_fragments_are_errors_at_parse():
    f = IPv6(src=SRC, dst=DST) / IPv6ExtHdrFragment(id=1, offset=0, m=1, nh=17) / b"abc"
    with pytest.raises(ipv6.Ipv6ParamProblem) as e:
        ipv6.parse_ipv6(bytes(f))
    assert e.value.code == 0 and e.value.pointer == 4
    empty = IPv6(src=SRC, dst=DST) / IPv6ExtHdrFragment(id=1, offset=8, m=1, nh=17)
    with pytest.raises(ipv6.Ipv6Error):
        ipv6.parse_ipv6(bytes(empty))


def test_fragment_beyond_65535_is_a_parameter_problem_at_the_offset_field():
    f = IPv6(src=SRC, dst=DST) / IPv6ExtHdrFragment(id=1, offset=8190, m=0, nh=17) / (b"a" * 80)
    with pytest.raises(ipv6.Ipv6ParamProblem) as e:
        ipv6.parse_ipv6(bytes(f))
    assert e.value.pointer == 42


def test_first_fragment_without_the_whole_header_chain():
    # RFC 7112: the upper-layer header must be in the first fragment
    f = IPv6(src=SRC, dst=DST) / IPv6ExtHdrFragment(id=1, offset=0, m=1, nh=6) / (b"t" * 8)
    with pytest.raises(ipv6.Ipv6ParamProblem) as e:
        ipv6.parse_ipv6(bytes(f))
    assert e.value.code == 3
    ext = IPv6ExtHdrFragment(id=1, offset=0, m=1, nh=60) / (bytes([17, 4]) + b"\x00" * 6)
    with pytest.raises(ipv6.Ipv6ParamProblem):
        ipv6.parse_ipv6(bytes(IPv6(src=SRC, dst=DST) / ext))
    nested = IPv6ExtHdrFragment(id=1, offset=0, m=1, nh=44) / IPv6ExtHdrFragment(nh=17) / UDP()
    with pytest.raises(ipv6.Ipv6Error):
        ipv6.parse_ipv6(bytes(IPv6(src=SRC, dst=DST) / nested))


def test_per_datagram_budget():
    _, frags = _fragments(20000, 1280)
    r = ipv6.Reassembler(max_datagram_bytes=4000)
    out = [r.add(f, 0.0) for f in frags]
    assert not any(out) and r.stats["datagram_budget_dropped"] >= 1 and r.held_bytes < 4000


def test_bound_on_partial_datagrams_evicts_the_oldest():
    r = ipv6.Reassembler(max_datagrams=4)
    for ident in range(10):
        _, frags = _fragments(3000, 1280, ident=ident)
        r.add(frags[0], float(ident))
    assert len(r) == 4 and r.stats["too_many_dropped"] == 6


def test_timeout_returns_first_fragments_for_time_exceeded():
    r = ipv6.Reassembler(timeout=60.0)
    _, a = _fragments(3000, 1280, ident=1)
    _, b = _fragments(3000, 1280, ident=2)
    r.add(a[0], 0.0)
    r.add(b[1], 10.0)  # no first fragment: nothing to quote
    assert r.next_deadline() == 60.0
    assert r.expire(59.9) == [] and len(r) == 2
    (quote,) = r.expire(60.0)
    assert quote == bytes(a[0].raw)[:1232] and len(r) == 1
    assert r.next_deadline() == 70.0
    assert r.expire(70.0) == [] and len(r) == 0 and r.held_bytes == 0
    assert r.next_deadline() is None and r.stats["timeout_dropped"] == 2


def test_fragment_roundtrip_with_scapy_and_our_reassembler():
    payload = bytes(UDP(sport=1, dport=2) / (bytes(range(256)) * 30))
    frags = ipv6.fragment(S, D, 17, payload, 1500, ident=0xDEAD, flow_label=7, traffic_class=4)
    assert len(frags) == 6 and all(len(f) <= 1500 for f in frags)
    for f in frags:
        sp = IPv6(f)
        assert sp[IPv6ExtHdrFragment].id == 0xDEAD and sp.fl == 7 and sp.tc == 4
        assert sp[IPv6ExtHdrFragment].offset * 8 % 8 == 0
    r = ipv6.Reassembler()
    out = [r.add(ipv6.parse_ipv6(f), 0.0) for f in reversed(frags)][-1]
    assert out is not None and bytes(out.payload) == payload
    small = ipv6.fragment(S, D, 17, b"x" * 100, 1500, ident=1)
    assert len(small) == 1 and IPv6(small[0]).nh == 17
    with pytest.raises(ValueError):
        ipv6.fragment(S, D, 17, b"x" * 2000, 1000, ident=1)


def test_hop_limit_and_address_helpers():
    assert ipv6.forward_hop_limit(64) == 63 and ipv6.forward_hop_limit(1) is None
    assert ipv6.forward_hop_limit(0) is None
    mac = bytes.fromhex("5a94efe40cdd")
    assert ipaddress.IPv6Address(ipv6.link_local_from_mac(mac)) == ipaddress.IPv6Address(
        "fe80::5894:efff:fee4:cdd"
    )
    assert ipaddress.IPv6Address(ipv6.solicited_node(D)) == ipaddress.IPv6Address("ff02::1:ff00:1")
    assert ipv6.multicast_mac(ipv6.ALL_NODES) == bytes.fromhex("333300000001")
    assert ipv6.is_link_local(ipv6.link_local_from_mac(mac)) and not ipv6.is_link_local(D)


def test_pseudo_header_checksum_matches_scapy():
    pkt = IPv6(bytes(IPv6(src=SRC, dst=DST) / UDP(sport=1000, dport=53) / b"abcde"))
    seg = bytearray(bytes(pkt[UDP]))
    want = int.from_bytes(seg[6:8], "big")
    seg[6:8] = b"\x00\x00"
    assert cs.transport_checksum_v6(S, D, 17, bytes(seg)) == want
    assert cs.verify_transport_v6(S, D, 17, bytes(pkt[UDP]))
    icmp = IPv6(bytes(IPv6(src=SRC, dst=DST) / ICMPv6EchoRequest(id=1, seq=2, data=b"ping")))
    assert cs.verify_transport_v6(S, D, 58, bytes(icmp[ICMPv6EchoRequest]))
    assert not cs.verify_transport_v6(D, S, 17, bytes(pkt[UDP])[:-1] + b"f")
    # the existing IPv4 API is unchanged
    assert cs.pseudo_header_sum_v4(b"\x01\x02\x03\x04", b"\x05\x06\x07\x08", 17, 8) > 0


def test_deadline_heap_is_compacted_behind_a_long_lived_partial():
    """Stale deadline entries leave only from the heap's front: one partial that stays (its
    deadline first) must not pin every later dropped one (overlaps, completions)."""

    def frag(ident, offset, m, data):
        hdr = IPv6(src=SRC, dst=DST) / IPv6ExtHdrFragment(id=ident, offset=offset // 8, m=m, nh=17)
        return ipv6.parse_ipv6(bytes(hdr / data))

    r = ipv6.Reassembler()
    assert r.add(frag(1, 0, 1, bytes(UDP(sport=1, dport=2, len=48)) + b"a" * 8), 0.0) is None
    for ident in range(2, 20002):  # each pair overlaps: a partial made, then dropped
        r.add(frag(ident, 0, 1, b"b" * 16), 1.0)
        r.add(frag(ident, 8, 1, b"c" * 16), 1.0)
    assert len(r) == 1 and r.stats["overlap_dropped"] == 20000
    assert len(r._deadlines) <= 2 * len(r) + 64 + 1
    assert r.next_deadline() == r.timeout  # the long-lived one still expires on time
    assert r.expire(r.timeout) and len(r) == 0
