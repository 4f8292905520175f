"""ICMPv6 echo and errors, built and dissected by scapy as an independent implementation."""

from __future__ import annotations

import errno
import ipaddress

import pytest
from scapy.layers.inet import TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6PacketTooBig,
    ICMPv6ParamProblem,
    ICMPv6TimeExceeded,
    IPerror6,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    UDPerror,
)

from netferry.hostd.stack import icmpv6, ipv6

GUEST = "fd00:192:168:127::2"
GW = "fd00:192:168:127::1"
G = ipaddress.IPv6Address(GUEST).packed
W = ipaddress.IPv6Address(GW).packed


def test_echo_request_parsed_and_reply_dissected_by_scapy():
    req = IPv6(bytes(IPv6(src=GUEST, dst=GW) / ICMPv6EchoRequest(id=77, seq=3, data=b"hello")))
    msg = icmpv6.parse_icmpv6(G, W, bytes(req[ICMPv6EchoRequest]))
    assert (msg.type, msg.code, msg.ident, msg.seq, bytes(msg.body)) == (128, 0, 77, 3, b"hello")
    assert not msg.is_error
    reply = icmpv6.build_echo_reply(W, G, msg.ident, msg.seq, bytes(msg.body))
    pkt = IPv6(ipv6.build_ipv6(W, G, 58, reply))
    er = pkt[ICMPv6EchoReply]
    assert (er.id, er.seq, er.data) == (77, 3, b"hello")
    # scapy recomputes the checksum: ours must equal it
    want = er.cksum
    del er.cksum
    assert IPv6(bytes(pkt))[ICMPv6EchoReply].cksum == want


def test_echo_request_built_by_us_is_valid():
    req = icmpv6.build_echo_request(G, W, 5, 6, b"x" * 10)
    pkt = IPv6(ipv6.build_ipv6(G, W, 58, req))
    assert pkt[ICMPv6EchoRequest].id == 5 and pkt[ICMPv6EchoRequest].seq == 6
    assert icmpv6.parse_icmpv6(G, W, req).type == icmpv6.ECHO_REQUEST


def test_bad_checksum_and_truncation():
    req = bytearray(bytes(IPv6(src=GUEST, dst=GW) / ICMPv6EchoRequest(id=1))[40:])
    with pytest.raises(icmpv6.Icmpv6Error, match="icmpv6_bad_checksum"):
        icmpv6.parse_icmpv6(G, ipv6.ALL_NODES, bytes(req))  # another pseudo header
    req[-1] ^= 1
    with pytest.raises(icmpv6.Icmpv6Error, match="icmpv6_bad_checksum"):
        icmpv6.parse_icmpv6(G, W, bytes(req))
    with pytest.raises(icmpv6.Icmpv6Error, match="icmpv6_truncated"):
        icmpv6.parse_icmpv6(G, W, b"\x80\x00")
    short = icmpv6.build_icmpv6(G, W, 128, 0, 0, b"")[:4]
    fixed = bytearray(short)
    with pytest.raises(icmpv6.Icmpv6Error):
        icmpv6.parse_icmpv6(G, W, bytes(fixed))


@pytest.mark.parametrize(
    ("type_", "code", "param", "layer"),
    [
        (icmpv6.DEST_UNREACHABLE, icmpv6.PORT_UNREACHABLE, 0, ICMPv6DestUnreach),
        (icmpv6.PACKET_TOO_BIG, 0, 1400, ICMPv6PacketTooBig),
        (icmpv6.TIME_EXCEEDED, icmpv6.HOP_LIMIT_EXCEEDED, 0, ICMPv6TimeExceeded),
        (icmpv6.PARAM_PROBLEM, 1, 40, ICMPv6ParamProblem),
    ],
)
def test_errors_quote_at_most_1280_and_scapy_reads_them(type_, code, param, layer):
    invoking = bytes(IPv6(src=GUEST, dst="2001:db8::9") / UDP(sport=4444, dport=53) / (b"d" * 3000))
    err = icmpv6.build_error(W, G, type_, code, invoking, param)
    pkt = ipv6.build_ipv6(W, G, 58, err)
    assert len(pkt) == 1280
    sp = IPv6(pkt)
    e = sp[layer]
    assert e.type == type_ and e.code == code
    if type_ == icmpv6.PACKET_TOO_BIG:
        assert e.mtu == 1400
    if type_ == icmpv6.PARAM_PROBLEM:
        assert e.ptr == 40
    assert sp[IPerror6].src == GUEST and sp[UDPerror].sport == 4444
    assert icmpv6.parse_icmpv6(W, G, err).is_error
    small = icmpv6.build_error(W, G, type_, code, invoking[:100], param)
    assert small[8:] == invoking[:100]


def test_build_error_refuses_informational_types():
    with pytest.raises(ValueError):
        icmpv6.build_error(W, G, 128, 0, b"")


def test_parse_error_finds_the_flow_through_extension_headers():
    inner = IPv6(src=GUEST, dst="2001:db8::1") / IPv6ExtHdrDestOpt() / TCP(sport=40000, dport=443)
    err = IPv6(src="2001:db8::1", dst=GUEST) / ICMPv6DestUnreach(code=4) / inner
    data = bytes(IPv6(bytes(err))[ICMPv6DestUnreach])
    q = icmpv6.parse_error(
        icmpv6.parse_icmpv6(ipaddress.IPv6Address("2001:db8::1").packed, G, data)
    )
    assert q.type == 1 and q.code == 4 and q.next_header == 6 and q.src == G
    assert (
        int.from_bytes(q.upper[:2], "big") == 40000 and int.from_bytes(q.upper[2:4], "big") == 443
    )


def test_parse_error_packet_too_big_carries_the_mtu_and_truncated_quotes():
    inner = bytes(IPv6(src=GUEST, dst=GW) / UDP(sport=1, dport=2) / (b"x" * 2000))
    msg = icmpv6.parse_icmpv6(W, G, icmpv6.build_error(W, G, 2, 0, inner, 1280))
    q = icmpv6.parse_error(msg)
    assert q.param == 1280 and q.next_header == 17 and len(q.upper) == 8
    frag = bytes(IPv6(src=GUEST, dst=GW) / IPv6ExtHdrFragment(offset=10, nh=17) / (b"y" * 64))
    q = icmpv6.parse_error(icmpv6.parse_icmpv6(W, G, icmpv6.build_error(W, G, 3, 1, frag)))
    assert q.fragment_offset == 80 and q.upper == b""
    for bad in (inner[:20], b"\x45" + inner[1:60]):
        with pytest.raises(icmpv6.Icmpv6Error):
            icmpv6.parse_error(icmpv6.parse_icmpv6(W, G, icmpv6.build_error(W, G, 1, 0, bad)))
    with pytest.raises(icmpv6.Icmpv6Error):
        icmpv6.parse_error(icmpv6.parse_icmpv6(W, G, icmpv6.build_echo_reply(W, G, 1, 1, b"")))
    chopped = bytes(IPv6(src=GUEST, dst=GW) / IPv6ExtHdrDestOpt() / UDP())[:44]
    with pytest.raises(icmpv6.Icmpv6Error):
        icmpv6.parse_error(icmpv6.parse_icmpv6(W, G, icmpv6.build_error(W, G, 1, 0, chopped)))


def test_may_send_error_rules():
    mc = bytes.fromhex("ff020000000000000000000000000001")
    assert icmpv6.may_send_error(G, W, 1, 4)
    assert not icmpv6.may_send_error(G, W, 1, 4, invoking_icmp_type=1)
    assert icmpv6.may_send_error(G, W, 1, 4, invoking_icmp_type=128)
    assert not icmpv6.may_send_error(ipv6.UNSPECIFIED, W, 1, 4)
    assert not icmpv6.may_send_error(mc, W, 1, 4)
    assert not icmpv6.may_send_error(G, mc, 1, 4)
    assert icmpv6.may_send_error(G, mc, 2, 0) and icmpv6.may_send_error(G, mc, 4, 2)


def test_rate_limiter_is_a_token_bucket_on_the_callers_clock():
    rl = icmpv6.ErrorRateLimiter(rate=10.0, burst=3)
    assert [rl.allow(0.0) for _ in range(5)] == [True, True, True, False, False]
    assert rl.dropped == 2
    assert rl.allow(0.1) and not rl.allow(0.1)
    assert sum(rl.allow(10.0) for _ in range(10)) == 3


def test_errno_mapping_both_ways():
    assert icmpv6.error_for_errno(errno.ECONNREFUSED) == (1, 4)
    assert icmpv6.error_for_errno(errno.ENETUNREACH) == (1, 0)
    assert icmpv6.error_for_errno(errno.EMSGSIZE) == (2, 0)
    assert icmpv6.error_for_errno(errno.EAGAIN) is None
    for err in (errno.ECONNREFUSED, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EACCES):
        assert icmpv6.errno_for_error(*icmpv6.error_for_errno(err)) == err
    assert icmpv6.errno_for_error(3, 0) == errno.EHOSTUNREACH
    assert icmpv6.errno_for_error(4, 0) == errno.EPROTO
    assert icmpv6.errno_for_error(128, 0) is None


def test_random_corruption_of_received_errors_raises_only_icmpv6_error():
    import random

    rng = random.Random(4443)
    inner = bytes(
        IPv6(src=GUEST, dst=GW) / IPv6ExtHdrDestOpt() / IPv6ExtHdrFragment() / UDP() / (b"x" * 8)
    )
    good = icmpv6.build_error(W, G, 1, 4, inner)
    for _ in range(3000):
        data = bytearray(good)
        for _ in range(rng.randint(1, 5)):
            data[rng.randrange(len(data))] = rng.getrandbits(8)
        data = data[: rng.randint(0, len(data))]
        if len(data) >= 4:
            data[2:4] = b"\x00\x00"
            csum = icmpv6.transport_checksum_v6(W, G, 58, bytes(data))
            data[2:4] = csum.to_bytes(2, "big")
        try:
            msg = icmpv6.parse_icmpv6(W, G, bytes(data))
            if msg.is_error:
                icmpv6.parse_error(msg)
        except icmpv6.Icmpv6Error:
            pass


def test_extended_error_of_a_real_host_socket_on_loopback():
    """The host kernel's own port unreachable on ::1, read from the error queue as the NAT
    would, becomes the error relayed to the guest."""
    import socket

    closed = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    closed.bind(("::1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nobody listens there now
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        s.setsockopt(socket.IPPROTO_IPV6, icmpv6.IPV6_RECVERR, 1)
        s.connect(("::1", port))
        s.send(b"x")
        s.settimeout(5)
        with pytest.raises(ConnectionRefusedError):
            s.recv(10)
        # the error queue holds the ICMPv6 message itself
        _data, ancdata, _flags, _addr = s.recvmsg(10, 1024, socket.MSG_ERRQUEUE)
    finally:
        s.close()
    ((level, kind, data),) = ancdata
    assert level == socket.IPPROTO_IPV6 and kind == icmpv6.IPV6_RECVERR
    assert icmpv6.error_from_extended_err(data) == (1, 4, 0)


def test_extended_error_mapping():
    pack = icmpv6.EXTENDED_ERR.pack
    too_big = pack(errno.EMSGSIZE, icmpv6.SO_EE_ORIGIN_ICMP6, 2, 0, 0, 1400, 0)
    assert icmpv6.error_from_extended_err(too_big) == (2, 0, 1400)
    hops = pack(errno.EHOSTUNREACH, icmpv6.SO_EE_ORIGIN_ICMP6, 3, 0, 0, 0, 0)
    assert icmpv6.error_from_extended_err(hops) == (3, 0, 0)
    local = pack(errno.EMSGSIZE, icmpv6.SO_EE_ORIGIN_LOCAL, 0, 0, 0, 1280, 0)
    assert icmpv6.error_from_extended_err(local) == (2, 0, 1280)
    other = pack(errno.ETIMEDOUT, icmpv6.SO_EE_ORIGIN_LOCAL, 0, 0, 0, 0, 0)
    assert icmpv6.error_from_extended_err(other) is None
    assert icmpv6.error_from_extended_err(b"\x00" * 8) is None
