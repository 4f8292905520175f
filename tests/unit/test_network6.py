"""IPv6 wiring of Network (network6.py), frame by frame: NDP, router advertisements, DHCPv6,
echo, the source rules and the RA guard, TCP/UDP to the transport with 16-byte addresses,
fragments, errors, emission with neighbour resolution, offload (TSO6). Frames are built and
checked by scapy: its checksums are an independent implementation of ours."""

from __future__ import annotations

import ipaddress

import pytest
from scapy.layers.dhcp6 import (
    DUID_LL,
    DHCP6_Reply,
    DHCP6_Solicit,
    DHCP6OptClientId,
    DHCP6OptElapsedTime,
    DHCP6OptIA_NA,
    DHCP6OptRapidCommit,
)
from scapy.layers.inet import TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6ND_NA,
    ICMPv6ND_NS,
    ICMPv6ND_RA,
    ICMPv6ND_RS,
    ICMPv6NDOptDstLLAddr,
    ICMPv6NDOptMTU,
    ICMPv6NDOptPrefixInfo,
    ICMPv6NDOptRDNSS,
    ICMPv6NDOptSrcLLAddr,
    ICMPv6PacketTooBig,
    ICMPv6ParamProblem,
    ICMPv6TimeExceeded,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    fragment6,
    in6_chksum,
)
from scapy.layers.l2 import Ether

from netferry.hostd.config import NetworkConfig
from netferry.hostd.stack import ethernet, icmp
from netferry.hostd.stack.network import (
    VNET_HDR,
    VNET_LEN,
    IcmpEchoOutbound,
    LeaseEvent,
    Network,
    TcpDial,
    UdpOutbound,
)

GW_MAC = "5a:94:ef:e4:0c:dd"
MAC1 = "5a:94:ef:e4:0c:ee"  # the default static lease: ::2
MAC2 = "5a:94:ef:e4:0c:ef"
PREFIX = "fd00:192:168:127::"
GW6 = f"{PREFIX}1"
HOST6 = f"{PREFIX}254"
GW_LL = "fe80::5894:efff:fee4:cdd"
GUEST6 = f"{PREFIX}2"
GUEST2_6 = f"{PREFIX}3"
GUEST_LL = "fe80::5894:efff:fee4:cee"
REMOTE6 = "2001:db8::7"  # documentation prefix: NATed, never contacted (sans-IO)


def a6(ip: str) -> bytes:
    return ipaddress.IPv6Address(ip).packed


def make_net(ports: int = 1, vnet: bool = False, **config) -> Network:
    net = Network(NetworkConfig(**config))
    for _ in range(ports):
        net.add_port(vnet=vnet)
    return net


def feed(net: Network, frame, port: int = 1, now: float = 1.0) -> dict[int, list[bytes]]:
    net.receive_frame(port, bytes(frame), now)
    return net.frames_to_send()


def frames(out: dict[int, list[bytes]], port: int = 1) -> list[Ether]:
    assert set(out) <= {port}, f"frames went to ports {sorted(out)}, expected only {port}"
    return [Ether(f) for f in out.get(port, [])]


def to_gw(pkt, src_mac: str = MAC1) -> bytes:
    return bytes(Ether(src=src_mac, dst=GW_MAC) / pkt)


def learn6(net: Network, port: int = 1, mac: str = MAC1, ip: str = GUEST6) -> None:
    """Teach the gateway a guest address (CAM + neighbour cache) with an NS for the gateway."""
    ns = IPv6(src=ip, dst=GW6, hlim=255) / ICMPv6ND_NS(tgt=GW6) / ICMPv6NDOptSrcLLAddr(lladdr=mac)
    feed(net, to_gw(ns, mac), port)


def assert_checksum_ok(pkt: Ether) -> None:
    """The upper-layer checksum is right by scapy's arithmetic."""
    ip6 = pkt[IPv6]
    upper = ip6.payload
    while isinstance(upper, IPv6ExtHdrDestOpt | IPv6ExtHdrFragment):
        upper = upper.payload
    raw = bytearray(bytes(upper))
    nh = {TCP: 6, UDP: 17}.get(type(upper), 58)
    pos = {6: 16, 17: 6, 58: 2}[nh]
    want = int.from_bytes(raw[pos : pos + 2], "big")
    raw[pos : pos + 2] = b"\0\0"
    assert in6_chksum(nh, ip6, bytes(raw)) == want


# ---- NDP ---------------------------------------------------------------------------------


def test_neighbour_solicitation_for_the_gateway_answered():
    net = make_net()
    ns = IPv6(src=GUEST_LL, dst="ff02::1:ff00:1", hlim=255) / ICMPv6ND_NS(tgt=GW6)
    ns /= ICMPv6NDOptSrcLLAddr(lladdr=MAC1)
    (na,) = frames(feed(net, Ether(src=MAC1, dst="33:33:ff:00:00:01") / ns))
    assert na.dst == MAC1 and na[IPv6].dst == GUEST_LL and na[IPv6].hlim == 255
    assert na[ICMPv6ND_NA].tgt == GW6 and na[ICMPv6ND_NA].R and na[ICMPv6ND_NA].S
    assert na[ICMPv6NDOptDstLLAddr].lladdr == GW_MAC
    assert_checksum_ok(na)
    assert net.ndp.cache.lookup(a6(GUEST_LL)) == ethernet.parse_mac(MAC1)


@pytest.mark.parametrize(("target", "defended"), [(GW6, True), (HOST6, True), (GUEST6, False)])
def test_duplicate_address_detection(target, defended):
    net = make_net()
    group = ipaddress.IPv6Address(
        int(ipaddress.IPv6Address("ff02::1:ff00:0"))
        | (int(ipaddress.IPv6Address(target)) & 0xFFFFFF)
    )
    probe = IPv6(src="::", dst=str(group), hlim=255) / ICMPv6ND_NS(tgt=target)
    out = frames(feed(net, Ether(src=MAC1, dst="33:33:ff:00:00:01") / probe))
    if defended:
        (na,) = out
        assert na[IPv6].dst == "ff02::1" and na[ICMPv6ND_NA].tgt == target
        assert not na[ICMPv6ND_NA].S
    else:
        assert out == []  # the guest's own address passes DAD


def test_router_solicitation_answered_with_the_plan():
    net = make_net()
    net.handle_timer(0.0)  # the first unsolicited advertisement
    net.frames_to_send()
    rs = IPv6(src=GUEST_LL, dst="ff02::2", hlim=255) / ICMPv6ND_RS()
    rs /= ICMPv6NDOptSrcLLAddr(lladdr=MAC1)
    assert frames(feed(net, Ether(src=MAC1, dst="33:33:00:00:00:02") / rs, now=10.0)) == []
    deadline = net.get_timer()
    assert deadline is not None and deadline <= 10.5
    net.handle_timer(deadline)
    (ra,) = frames(net.frames_to_send())
    assert ra.dst == "33:33:00:00:00:01" and ra[IPv6].src == GW_LL and ra[IPv6].hlim == 255
    assert ra[ICMPv6ND_RA].M == 1 and ra[ICMPv6ND_RA].O == 1 and ra[ICMPv6ND_RA].routerlifetime
    assert ra[ICMPv6NDOptPrefixInfo].prefix == PREFIX and ra[ICMPv6NDOptPrefixInfo].A == 1
    assert ra[ICMPv6NDOptMTU].mtu == 1500
    assert ra[ICMPv6NDOptRDNSS].dns == [GW6]
    assert ra[ICMPv6NDOptSrcLLAddr].lladdr == GW_MAC
    assert_checksum_ok(ra)


def test_na_claiming_the_gateway_dropped_never_flooded():
    net = make_net(ports=2)
    na = IPv6(src=GUEST_LL, dst="ff02::1", hlim=255) / ICMPv6ND_NA(tgt=GW6, R=1, S=0, O=1)
    na /= ICMPv6NDOptDstLLAddr(lladdr=MAC1)
    assert feed(net, Ether(src=MAC1, dst="33:33:00:00:00:01") / na) == {}
    assert net.stats["ndp_spoof_dropped"] == 1
    # A guest's own NA is flooded to the other guest.
    na = IPv6(src=GUEST_LL, dst="ff02::1", hlim=255) / ICMPv6ND_NA(tgt=GUEST6, R=0, S=0, O=1)
    assert set(feed(net, Ether(src=MAC1, dst="33:33:00:00:00:01") / na)) == {2}


def test_ra_from_a_guest_dropped_never_flooded():
    net = make_net(ports=2)
    ra = IPv6(src=GUEST_LL, dst="ff02::1", hlim=255) / ICMPv6ND_RA()
    ra /= ICMPv6NDOptPrefixInfo(prefix="2001:db8:bad::", prefixlen=64)
    assert feed(net, Ether(src=MAC1, dst="33:33:00:00:00:01") / ra) == {}
    assert net.stats["ndp_ra_from_guest_dropped"] == 1


def test_ra_guard_off_with_port_security_off():
    """A bridged setup (port security off) may have a router behind a port: its RAs and
    redirects reach the other guests; the gateway itself still ignores them."""
    net = make_net(ports=2, port_security=False)
    ra = IPv6(src=GUEST_LL, dst="ff02::1", hlim=255) / ICMPv6ND_RA()
    ra /= ICMPv6NDOptPrefixInfo(prefix="2001:db8:1::", prefixlen=64)
    out = feed(net, Ether(src=MAC1, dst="33:33:00:00:00:01") / ra)
    assert set(out) == {2} and Ether(out[2][0]).haslayer(ICMPv6ND_RA)
    assert net.stats["ndp_ra_from_guest_dropped"] == 1  # by the gateway's own responder


def _split_behind_destopt(msg, ident: int) -> tuple:
    """The evasion: the first fragment ends after an 8-byte destination options header
    (next header ICMPv6), the NDP message is all in the second fragment."""
    body = bytes(msg)
    first = IPv6(src=GUEST_LL, dst="ff02::1", hlim=255, nh=44)
    first /= IPv6ExtHdrFragment(nh=60, m=1, offset=0, id=ident) / IPv6ExtHdrDestOpt(nh=58)
    second = IPv6(src=GUEST_LL, dst="ff02::1", hlim=255, nh=44)
    second /= IPv6ExtHdrFragment(nh=60, m=0, offset=1, id=ident) / body
    return first, second


@pytest.mark.parametrize("kind", ["ra", "na"])
def test_ndp_hidden_behind_a_fragmented_header_chain_not_switched(kind):
    net = make_net(ports=2)
    if kind == "ra":
        msg = ICMPv6ND_RA() / ICMPv6NDOptPrefixInfo(prefix="2001:db8:bad::", prefixlen=64)
    else:
        msg = ICMPv6ND_NA(tgt=GW6, R=1, S=0, O=1) / ICMPv6NDOptDstLLAddr(lladdr=MAC1)
    first, _ = _split_behind_destopt(msg, 7)  # without its first, the second is never whole
    assert feed(net, Ether(src=MAC1, dst="33:33:00:00:00:01") / first) == {}
    assert net.stats["ipv6_incomplete_chain_dropped"] == 1
    # an NDP message in a first fragment (or an atomic one) is refused by type (RFC 6980)
    whole = IPv6(src=GUEST_LL, dst="ff02::1", hlim=255) / IPv6ExtHdrFragment(id=8) / msg
    assert feed(net, Ether(src=MAC1, dst="33:33:00:00:00:01") / whole) == {}
    assert net.stats["ndp_fragmented_dropped"] == 1
    # ordinary fragmented traffic between guests still flows
    echo = IPv6(src=GUEST_LL, dst="ff02::1") / IPv6ExtHdrFragment(id=9)
    echo /= ICMPv6EchoRequest(data=b"x" * 3000)
    for frag in fragment6(IPv6(bytes(echo)), 1280):
        assert 2 in feed(net, Ether(src=MAC1, dst="33:33:00:00:00:01") / frag)


def test_ndp_that_arrived_in_fragments_refused_by_the_gateway():
    net = make_net()
    ns = ICMPv6ND_NS(tgt=GW6) / ICMPv6NDOptSrcLLAddr(lladdr=MAC1)
    pkt = IPv6(src=GUEST6, dst=GW6, hlim=255) / IPv6ExtHdrFragment(id=3) / ns
    pieces = fragment6(IPv6(bytes(pkt)), 64)
    assert len(pieces) >= 2
    for piece in pieces:
        assert feed(net, to_gw(piece)) == {}
    atomic = IPv6(src=GUEST6, dst=GW6, hlim=255) / IPv6ExtHdrFragment(id=4, m=0) / ns
    assert feed(net, to_gw(atomic)) == {}
    assert net.stats["ndp_fragmented_dropped"] == 2 and not net.stats["ndp_na_out"]


def test_source_claiming_the_gateway_or_off_prefix_dropped():
    net = make_net(ports=2)
    for src, counter in ((GW6, "ipv6_bad_source"), ("2001:db8::1", "ipv6_bad_source")):
        pkt = IPv6(src=src, dst=GW6) / ICMPv6EchoRequest()
        assert feed(net, to_gw(pkt)) == {}
        assert net.stats[counter] >= 1
    # and not to another guest either
    pkt = IPv6(src=GW6, dst=GUEST2_6) / ICMPv6EchoRequest()
    assert feed(net, Ether(src=MAC1, dst="33:33:00:00:00:01") / pkt) == {}
    assert net.stats["ipv6_spoof_dropped"] == 1


def test_address_of_another_port_not_taken():
    net = make_net(ports=2)
    learn6(net, port=1, mac=MAC1, ip=GUEST6)
    pkt = IPv6(src=GUEST6, dst=GW6) / ICMPv6EchoRequest()
    assert feed(net, to_gw(pkt, MAC2), port=2) == {}
    assert net.stats["ipv6_source_conflict_dropped"] == 1
    assert net.ndp.cache.lookup(a6(GUEST6)) == ethernet.parse_mac(MAC1)


def test_flooding_the_neighbour_cache_does_not_free_another_ports_address():
    """B fills the cache with link-local sources: A's entry stays (B's share is capped and
    a live port's entries are never evicted for another port's), so A's address stays A's."""
    net = make_net(ports=2)
    learn6(net, port=1, mac=MAC1, ip=GUEST6)
    echo = IPv6(src=GUEST6, dst=GW6) / ICMPv6EchoRequest()
    assert feed(net, to_gw(echo, MAC2), port=2) == {}
    assert net.stats["ipv6_source_conflict_dropped"] == 1
    for i in range(4200):
        src = str(ipaddress.IPv6Address(f"fe80::1:0:0:{i + 1:x}"))
        feed(net, to_gw(IPv6(src=src, dst=GW6) / ICMPv6EchoRequest(), MAC2), port=2)
    cache = net.ndp.cache
    assert len(cache.addresses_of(ethernet.parse_mac(MAC2))) <= cache.per_port
    assert cache.peek(a6(GUEST6)) == ethernet.parse_mac(MAC1)
    assert feed(net, to_gw(echo, MAC2), port=2) == {}
    assert net.stats["ipv6_source_conflict_dropped"] == 2
    # a full cache refuses a port's new entry rather than push out another live port's
    small = make_net(ports=2)
    small.ndp.cache.max_entries = small.ndp.cache.per_port = 20
    for i in range(20):
        learn6(small, port=1, mac=MAC1, ip=f"{PREFIX}1:{i + 1:x}")
    learn6(small, port=2, mac=MAC2, ip=GUEST2_6)
    assert small.ndp.cache.peek(a6(GUEST2_6)) is None and len(small.ndp.cache) == 20
    assert small.ndp.cache.stats["refused_full"] >= 1
    small.remove_port(1)  # its entries go with it: room again
    learn6(small, port=2, mac=MAC2, ip=GUEST2_6)
    assert small.ndp.cache.peek(a6(GUEST2_6)) == ethernet.parse_mac(MAC2)


# ---- echo --------------------------------------------------------------------------------


@pytest.mark.parametrize("dst", [GW6, HOST6, GW_LL])
def test_echo_to_the_gateway_answered(dst):
    net = make_net()
    src = GUEST_LL if dst == GW_LL else GUEST6
    learn6(net, ip=src)
    req = IPv6(src=src, dst=dst) / ICMPv6EchoRequest(id=7, seq=3, data=b"ping6")
    (reply,) = frames(feed(net, to_gw(req)))
    assert reply[IPv6].src == dst and reply[IPv6].dst == src
    assert reply[ICMPv6EchoReply].id == 7 and reply[ICMPv6EchoReply].data == b"ping6"
    assert_checksum_ok(reply)


def test_large_echo_reassembled_and_reply_fragmented():
    net = make_net()
    learn6(net)
    req = IPv6(src=GUEST6, dst=GW6) / ICMPv6EchoRequest(id=1, seq=1, data=b"x" * 3000)
    pieces = fragment6(IPv6(src=GUEST6, dst=GW6) / IPv6ExtHdrFragment(id=5) / req.payload, 1280)
    out: list[Ether] = []
    for piece in pieces:
        out += frames(feed(net, to_gw(piece)))
    assert len(out) == 3 and all(IPv6ExtHdrFragment in f for f in out)
    assert all(len(f[IPv6]) <= 1500 for f in out)
    assert net.reassembler6.stats["reassembled"] == 1


def test_echo_to_host6_refused_without_host_loopback():
    net = make_net(host_loopback=False)
    learn6(net)
    req = IPv6(src=GUEST6, dst=HOST6) / ICMPv6EchoRequest()
    (err,) = frames(feed(net, to_gw(req)))
    assert err[ICMPv6DestUnreach].code == 1  # administratively prohibited


def test_echo_elsewhere_goes_to_the_nat_and_hop_limit_one_expires():
    net = make_net()
    learn6(net)
    feed(net, to_gw(IPv6(src=GUEST6, dst=REMOTE6) / ICMPv6EchoRequest(id=9, seq=1, data=b"x")))
    (ev,) = net.events
    assert isinstance(ev, IcmpEchoOutbound)
    assert ev.guest_ip == a6(GUEST6) and ev.dst_ip == a6(REMOTE6) and ev.target_ip == REMOTE6
    net.events.clear()
    net.send_icmp_echo_reply(ev.dst_ip, ev.guest_ip, ev.ident, ev.seq, ev.payload)
    (reply,) = frames(net.frames_to_send())
    assert reply[IPv6].src == REMOTE6 and reply[ICMPv6EchoReply].id == 9
    assert_checksum_ok(reply)
    (err,) = frames(feed(net, to_gw(IPv6(src=GUEST6, dst=REMOTE6, hlim=1) / ICMPv6EchoRequest())))
    assert err[ICMPv6TimeExceeded].code == 0 and not net.events


# ---- UDP, TCP, DHCPv6, DNS ------------------------------------------------------------------


def test_udp_to_the_nat_and_back():
    net = make_net()
    learn6(net)
    feed(net, to_gw(IPv6(src=GUEST6, dst=HOST6) / UDP(sport=4000, dport=5000) / b"hello"))
    (ev,) = net.events
    assert isinstance(ev, UdpOutbound)
    assert (ev.guest_ip, ev.dst_ip, ev.target_ip) == (a6(GUEST6), a6(HOST6), "::1")
    assert ev.payload == b"hello" and ev.quote[:1] == b"\x60"
    net.send_udp(ev.dst_ip, ev.dst_port, ev.guest_ip, ev.guest_port, b"world" * 500)
    out = frames(net.frames_to_send())
    assert len(out) == 2 and IPv6ExtHdrFragment in out[0]  # 2500 bytes: fragmented to 1500
    # the ICMPv4 code the NAT speaks becomes ICMPv6 port unreachable
    net.send_icmp_error(
        ev.dst_ip, ev.guest_ip, icmp.DEST_UNREACHABLE, icmp.PORT_UNREACHABLE, ev.quote
    )
    (err,) = frames(net.frames_to_send())
    assert err[ICMPv6DestUnreach].code == 4 and err[IPv6].src == HOST6
    net.send_icmp_error(
        ev.dst_ip, ev.guest_ip, icmp.DEST_UNREACHABLE, icmp.FRAG_NEEDED, ev.quote, 1400
    )
    (err,) = frames(net.frames_to_send())
    assert err[ICMPv6PacketTooBig].mtu == 1400
    assert_checksum_ok(err)


def test_udp_bad_checksum_and_zero_checksum_dropped():
    net = make_net()
    learn6(net)
    pkt = IPv6(src=GUEST6, dst=HOST6) / UDP(sport=1, dport=2, chksum=0x1234) / b"x"
    feed(net, to_gw(pkt))
    pkt = IPv6(src=GUEST6, dst=HOST6) / UDP(sport=1, dport=2) / b"x"
    raw = bytearray(to_gw(pkt))
    raw[14 + 40 + 6 : 14 + 40 + 8] = b"\0\0"
    feed(net, bytes(raw))
    assert net.stats["udp_bad_checksum"] == 1 and net.stats["udp_zero_checksum"] == 1
    assert not net.events


def test_udp_to_a_closed_gateway_port_unreachable():
    net = make_net()
    learn6(net)
    (err,) = frames(feed(net, to_gw(IPv6(src=GUEST6, dst=GW6) / UDP(sport=1, dport=9) / b"x")))
    assert err[ICMPv6DestUnreach].code == 4 and err[IPv6].src == GW6


def test_tcp_syn_to_host6_dials_and_handshakes():
    net = make_net()
    learn6(net)
    syn = IPv6(src=GUEST6, dst=HOST6) / TCP(sport=40000, dport=8080, flags="S", seq=100)
    feed(net, to_gw(syn))
    (dial,) = net.events
    assert isinstance(dial, TcpDial) and dial.target_ip == "::1" and dial.target_port == 8080
    assert dial.conn.key == (a6(GUEST6), 40000, a6(HOST6), 8080)
    net.tcp_accept(dial.conn, 1.0)
    (synack,) = frames(net.frames_to_send(1.0))
    assert synack[TCP].flags == "SA" and synack[TCP].ack == 101
    assert dict(synack[TCP].options)["MSS"] == 1440  # MTU 1500 - 40 - 20
    assert_checksum_ok(synack)
    # data from the guest reaches the connection
    data = (
        IPv6(src=GUEST6, dst=HOST6)
        / TCP(sport=40000, dport=8080, flags="PA", seq=101, ack=synack[TCP].seq + 1)
        / b"GET /"
    )
    feed(net, to_gw(data), now=1.1)
    assert dial.conn.read() == b"GET /"


def test_tcp_to_the_gateway_refused_with_rst():
    net = make_net()
    learn6(net)
    syn = IPv6(src=GUEST6, dst=GW6) / TCP(sport=40000, dport=22, flags="S", seq=1)
    (rst,) = frames(feed(net, to_gw(syn)))
    assert rst[TCP].flags == "RA" and rst[IPv6].src == GW6
    assert_checksum_ok(rst)


def test_dhcpv6_solicit_with_rapid_commit_gets_the_static_lease():
    net = make_net()
    sol = (
        IPv6(src=GUEST_LL, dst="ff02::1:2")
        / UDP(sport=546, dport=547)
        / DHCP6_Solicit(trid=0x1234)
        / DHCP6OptClientId(duid=DUID_LL(lladdr=MAC1))
        / DHCP6OptElapsedTime()
        / DHCP6OptRapidCommit()
        / DHCP6OptIA_NA(iaid=1)
    )
    (reply,) = frames(feed(net, Ether(src=MAC1, dst="33:33:00:01:00:02") / sol))
    assert reply[IPv6].src == GW_LL and reply[IPv6].dst == GUEST_LL
    assert reply[UDP].sport == 547 and reply[UDP].dport == 546 and DHCP6_Reply in reply
    assert_checksum_ok(reply)
    (ev,) = net.events
    assert ev == LeaseEvent(MAC1, GUEST6, None)
    assert net.guest_ip6_for_mac(ethernet.parse_mac(MAC1)) == a6(GUEST6)
    assert net.ndp.cache.lookup(a6(GUEST6)) == ethernet.parse_mac(MAC1)


def _solicit6(mac: str, duid_mac: str, trid: int, src: str = GUEST_LL) -> bytes:
    sol = (
        IPv6(src=src, dst="ff02::1:2")
        / UDP(sport=546, dport=547)
        / DHCP6_Solicit(trid=trid)
        / DHCP6OptClientId(duid=DUID_LL(lladdr=duid_mac))
        / DHCP6OptRapidCommit()
        / DHCP6OptIA_NA(iaid=1)
    )
    return bytes(Ether(src=mac, dst="33:33:00:01:00:02") / sol)


def test_dhcpv6_addresses_limited_per_port():
    """The port a request came by reaches the server: one guest inventing DUIDs gets
    `port_max_leases` addresses (neighbour cache, port security and state file with them),
    a guest on another port is still served."""
    net = make_net(ports=2, port_max_leases=2)
    for i in range(4):
        feed(net, _solicit6(MAC2, f"02:66:00:00:00:{i:02x}", i), port=1)
    assert [e.ip for e in net.events] == [f"{PREFIX}1000", f"{PREFIX}1001"]
    assert net.dhcp6.stats.port_limit_refused == 2
    net.events.clear()
    feed(net, _solicit6("02:00:00:00:00:33", "02:00:00:00:00:33", 9, "fe80::33"), port=2)
    assert [e.ip for e in net.events] == [f"{PREFIX}1002"]


def test_malformed_dhcpv6_lease_event_never_escapes_the_timer():
    from netferry.hostd.services import dhcpv6

    net = make_net()
    duid = bytes(DUID_LL(lladdr=MAC2)).hex()
    lease = dhcpv6.Lease("not-a-mac", ipaddress.IPv6Address(f"{PREFIX}1005"), 5.0, None,
                         False, duid, 1)  # fmt: skip
    assert not net.dhcp6.restore_lease(lease, 1.0)  # refused at the door...
    # ...and should a bad event reach the stack anyway, the timer counts and drops it
    net.dhcp6._events.append(dhcpv6.LeaseReleased("not-a-mac", lease.ip, None, "expired"))
    net.dhcp6._events.append(dhcpv6.LeaseReleased(MAC2, lease.ip, None, "expired"))
    net.handle_timer(100.0)
    assert net.stats["dhcp6_lease_event_malformed"] == 1
    assert list(net.events) == [LeaseEvent(MAC2, f"{PREFIX}1005", None, True)]


def test_dns_to_dns6_forwarded_with_its_server_address():
    net = make_net()
    learn6(net)
    from scapy.layers.dns import DNS, DNSQR

    q = DNS(id=1, rd=1, qd=DNSQR(qname="www.example.test", qtype="AAAA"))
    feed(net, to_gw(IPv6(src=GUEST6, dst=GW6) / UDP(sport=5353, dport=53) / q))
    (ev,) = net.events
    assert ev.server_ip == a6(GW6) and ev.guest_ip == a6(GUEST6)


# ---- emission: neighbour resolution ---------------------------------------------------------


def test_unknown_guest_solicited_and_queue_flushed_on_advertisement():
    net = make_net()
    feed(net, Ether(src=MAC1, dst="ff:ff:ff:ff:ff:ff", type=0x9000) / b"hello")  # CAM learns
    net.send_udp(a6(HOST6), 53, a6(GUEST6), 4000, b"late")
    (ns,) = frames(net.frames_to_send())
    assert ns[ICMPv6ND_NS].tgt == GUEST6 and ns[IPv6].dst == "ff02::1:ff00:2"
    na = IPv6(src=GUEST6, dst=GW_LL, hlim=255) / ICMPv6ND_NA(tgt=GUEST6, S=1, O=1)
    na /= ICMPv6NDOptDstLLAddr(lladdr=MAC1)
    (udp,) = frames(feed(net, to_gw(na)))
    assert udp[UDP].dport == 4000 and bytes(udp[UDP].payload) == b"late"


# ---- malformed input, fragments, errors -----------------------------------------------------


def test_unknown_next_header_answered_with_parameter_problem():
    net = make_net()
    learn6(net)
    pkt = IPv6(src=GUEST6, dst=GW6, nh=200) / (b"\0" * 16)
    (pp,) = frames(feed(net, to_gw(pkt)))
    assert pp[ICMPv6ParamProblem].code == 1 and pp[ICMPv6ParamProblem].ptr == 6
    assert net.stats["ipv6_unknown_next_header"] == 1


def test_overlapping_fragments_dropped_and_counted():
    net = make_net()
    learn6(net)
    payload = bytes(UDP(sport=1, dport=2) / (b"A" * 64))
    base = IPv6(src=GUEST6, dst=HOST6)
    f1 = base / IPv6ExtHdrFragment(nh=17, offset=0, m=1, id=9) / payload[:48]
    f2 = base / IPv6ExtHdrFragment(nh=17, offset=4, m=0, id=9) / payload[32:]  # overlaps
    feed(net, to_gw(f1))
    feed(net, to_gw(f2))
    assert net.reassembler6.stats["overlap_dropped"] == 1 and not net.events


def test_reassembly_timeout_answered_with_time_exceeded():
    net = make_net(reassembly_timeout=5.0)
    learn6(net)
    payload = bytes(UDP(sport=1, dport=2) / (b"A" * 64))
    f1 = IPv6(src=GUEST6, dst=HOST6) / IPv6ExtHdrFragment(nh=17, offset=0, m=1, id=3) / payload[:48]
    feed(net, to_gw(f1), now=100.0)
    net.handle_timer(106.0)
    out = [f for f in frames(net.frames_to_send()) if ICMPv6TimeExceeded in f]
    (te,) = out
    assert te[ICMPv6TimeExceeded].code == 1


@pytest.mark.parametrize(
    ("name", "raw", "counter"),
    [
        ("truncated", b"\x60" + bytes(20), "ipv6_truncated"),
        ("bad_version", b"\x40" + bytes(39), "ipv6_bad_version"),
        (
            "bad_length",
            bytes(IPv6(src=GUEST6, dst=GW6, plen=500) / ICMPv6EchoRequest()),
            "ipv6_bad_payload_length",
        ),
        (
            "bad_extension_chain",
            bytes(IPv6(src=GUEST6, dst=GW6, nh=60, plen=4) / b"\x3a\x05\0\0"),
            "ipv6_truncated_extension",
        ),
        (
            "tiny_first_fragment",
            bytes(IPv6(src=GUEST6, dst=GW6) / IPv6ExtHdrFragment(nh=6, m=1, id=1) / (b"\0" * 8)),
            "ipv6_incomplete_chain",
        ),
    ],
)
def test_malformed_counted_and_dropped(name, raw, counter):
    net = make_net()
    learn6(net)
    feed(net, Ether(src=MAC1, dst=GW_MAC, type=0x86DD) / raw)
    assert net.stats[counter] == 1, dict(net.stats)
    assert not net.events


def test_ipv6_off_drops_and_counts_as_before():
    net = make_net(ipv6=False)
    assert feed(net, to_gw(IPv6(src=GUEST6, dst=GW6) / ICMPv6EchoRequest())) == {}
    assert net.stats["ipv6_dropped"] == 1
    assert net.ndp is None and net.dhcp6 is None and net.gateway_ip6 is None


# ---- offload: TSO6 and partial checksums ----------------------------------------------------


def test_offload_port_gets_tcpv6_gso_with_partial_checksum():
    net = make_net(vnet=True)
    vnet = bytes(VNET_LEN)
    ns = (
        IPv6(src=GUEST6, dst=GW6, hlim=255)
        / ICMPv6ND_NS(tgt=GW6)
        / ICMPv6NDOptSrcLLAddr(lladdr=MAC1)
    )
    net.receive_frame(1, vnet + to_gw(ns), 1.0)
    net.frames_to_send()
    syn = IPv6(src=GUEST6, dst=HOST6) / TCP(
        sport=40000, dport=80, flags="S", seq=1, options=[("MSS", 1440)], window=65535
    )
    net.receive_frame(1, vnet + to_gw(syn), 1.0)
    (dial,) = net.events
    net.tcp_accept(dial.conn, 1.0)
    (synack,) = net.frames_to_send(1.0)[1]
    ack = IPv6(src=GUEST6, dst=HOST6) / TCP(
        sport=40000,
        dport=80,
        flags="A",
        seq=2,
        ack=Ether(synack[VNET_LEN:])[TCP].seq + 1,
        window=65535,
    )
    net.receive_frame(1, vnet + to_gw(ack), 1.1)
    net.frames_to_send(1.1)
    dial.conn.send(b"z" * 10000)
    net.tcp_touch(dial.conn)
    out = net.frames_to_send(1.2)[1]
    flags, gso_type, hdr_len, gso_size, start, offset = VNET_HDR.unpack_from(out[0])
    assert flags == 1 and gso_type == 4 and start == 54 and offset == 16  # TCPV6, NEEDS_CSUM
    assert gso_size == 1440 and hdr_len == 54 + 20
    frame = Ether(out[0][VNET_LEN:])
    assert frame[IPv6].plen == len(bytes(frame[IPv6].payload)) > 1440


def test_na_for_another_ports_address_refused():
    net = make_net(ports=2)
    learn6(net, port=1, mac=MAC1, ip=GUEST6)
    na = IPv6(src=GUEST2_6, dst=GW6, hlim=255) / ICMPv6ND_NA(tgt=GUEST6, S=0, O=1)
    na /= ICMPv6NDOptDstLLAddr(lladdr=MAC2)
    assert feed(net, to_gw(na, MAC2), port=2) == {}
    assert net.stats["ndp_address_theft_dropped"] == 1
    assert net.ndp.cache.lookup(a6(GUEST6)) == ethernet.parse_mac(MAC1)
    # flooded to all nodes: not passed on to the victim's port either
    assert feed(net, Ether(src=MAC2, dst="33:33:00:00:00:01") / na.copy(), port=2) == {}


def test_slirp4netns_plan_gateway_is_the_host():
    from netferry.hostd.config import slirp4netns_plan6

    net = make_net(**slirp4netns_plan6())
    learn6(net, ip="fd00::100")
    req = IPv6(src="fd00::100", dst="fd00::2") / ICMPv6EchoRequest(id=1, seq=1)
    (reply,) = frames(feed(net, to_gw(req)))
    assert reply[IPv6].src == "fd00::2" and ICMPv6EchoReply in reply
    syn = IPv6(src="fd00::100", dst="fd00::2") / TCP(sport=40000, dport=8080, flags="S")
    feed(net, to_gw(syn))
    (dial,) = net.events
    assert dial.target_ip == "::1"
    net.events.clear()
    from scapy.layers.dns import DNS, DNSQR

    q = DNS(id=1, rd=1, qd=DNSQR(qname="example.test", qtype="AAAA"))
    feed(net, to_gw(IPv6(src="fd00::100", dst="fd00::3") / UDP(sport=5353, dport=53) / q))
    (ev,) = net.events
    assert ev.server_ip == a6("fd00::3")


@pytest.mark.parametrize(
    ("type_", "code", "want"),
    [
        (icmp.DEST_UNREACHABLE, icmp.HOST_UNREACHABLE, (1, 3)),
        (icmp.DEST_UNREACHABLE, icmp.NET_UNREACHABLE, (1, 0)),
        (icmp.DEST_UNREACHABLE, icmp.ADMIN_PROHIBITED, (1, 1)),
        (icmp.TIME_EXCEEDED, 0, (3, 0)),
    ],
)
def test_icmpv4_codes_mapped_for_ipv6_guests(type_, code, want):
    net = make_net()
    learn6(net)
    quote = bytes(IPv6(src=GUEST6, dst=REMOTE6) / UDP(sport=1, dport=2))
    net.send_icmp_error(a6(REMOTE6), a6(GUEST6), type_, code, quote)
    (err,) = frames(net.frames_to_send())
    assert (err[IPv6].payload.type, err[IPv6].payload.code) == want
    assert_checksum_ok(err)


def test_tcp_syn_with_hop_limit_one_answered_time_exceeded_no_dial():
    net = make_net()
    learn6(net)
    syn = IPv6(src=GUEST6, dst=REMOTE6, hlim=1) / TCP(sport=40000, dport=443, flags="S")
    (err,) = frames(feed(net, to_gw(syn)))
    assert err[ICMPv6TimeExceeded].code == 0 and not net.events


def test_icmpv6_errors_rate_limited():
    net = make_net()
    learn6(net)
    sent = 0
    for i in range(200):
        out = feed(net, to_gw(IPv6(src=GUEST6, dst=GW6) / UDP(sport=i + 1, dport=9)), now=5.0)
        sent += len(out.get(1, []))
    assert 0 < sent < 200 and net.stats["icmpv6_error_rate_limited"] == 200 - sent


def test_flow_refusals_and_host_failures_not_throttled_by_the_error_limiter():
    """A host without IPv6 routes fails every v6 connect (ENETUNREACH): each SYN gets its
    unreachable at once (happy eyeballs), however many, as each UDP datagram the host could
    not send; the global limiter is only for the gateway's errors about guest packets."""
    from scapy.layers.inet import TCPerror

    from netferry.hostd.nat import host_errors

    net = make_net()
    learn6(net)
    for i in range(200):
        syn = IPv6(src=GUEST6, dst=REMOTE6) / TCP(sport=20000 + i, dport=443, flags="S")
        feed(net, to_gw(syn), now=5.0)
    dials = [e for e in net.events if isinstance(e, TcpDial)]
    assert len(dials) == 200
    for dial in dials:
        net.tcp_refuse(dial.conn, 5.0, unreachable=icmp.NET_UNREACHABLE)
    answers = frames(net.frames_to_send(5.0))
    assert len(answers) == 200
    assert {a[ICMPv6DestUnreach].code for a in answers} == {0}
    assert {a[TCPerror].sport for a in answers} == {20000 + i for i in range(200)}
    for i in range(200):  # a UDP send that failed with ENETUNREACH (the NAT's relay_errno)
        dgram = bytes(IPv6(src=GUEST6, dst=REMOTE6) / UDP(sport=30000 + i, dport=53) / b"q")
        assert host_errors.relay_errno(net, a6(REMOTE6), a6(GUEST6), dgram, 101)
    assert len(frames(net.frames_to_send(5.0))) == 200
    assert not net.stats["icmpv6_error_rate_limited"]
    # the gateway's own errors about guest packets stay limited
    for i in range(200):
        feed(net, to_gw(IPv6(src=GUEST6, dst=GW6) / UDP(sport=i + 1, dport=9)), now=5.0)
    assert net.stats["icmpv6_error_rate_limited"] > 0


def _corpus6() -> list[bytes]:
    base = IPv6(src=GUEST6, dst=GW6)
    pkts = [
        base / ICMPv6EchoRequest(data=b"abc"),
        IPv6(src=GUEST_LL, dst="ff02::1:ff00:1", hlim=255) / ICMPv6ND_NS(tgt=GW6),
        IPv6(src=GUEST_LL, dst="ff02::2", hlim=255) / ICMPv6ND_RS(),
        IPv6(src=GUEST_LL, dst="ff02::1", hlim=255) / ICMPv6ND_NA(tgt=GUEST6),
        base / UDP(sport=5, dport=53) / (b"\x00\x01\x01\x00\x00\x01" + bytes(6)),
        IPv6(src=GUEST_LL, dst="ff02::1:2") / UDP(sport=546, dport=547) / DHCP6_Solicit(),
        IPv6(src=GUEST6, dst=HOST6) / TCP(sport=1, dport=80, flags="S"),
        IPv6(src=GUEST6, dst=REMOTE6) / UDP(sport=1, dport=2) / (b"u" * 40),
        base / IPv6ExtHdrDestOpt() / ICMPv6EchoRequest(),
    ]
    out = [to_gw(p) for p in pkts]
    big = (
        IPv6(src=GUEST6, dst=HOST6)
        / IPv6ExtHdrFragment(id=3)
        / UDP(sport=1, dport=2)
        / (b"f" * 3000)
    )
    out += [to_gw(f) for f in fragment6(big, 1280)]
    return out


def test_fuzz_ipv6_never_raises_and_keeps_working():
    import random

    rng = random.Random(20261130)
    net = make_net(ports=2, reassembly_timeout=2.0)
    corpus = _corpus6()
    now = 1.0
    for i in range(3000):
        frame = bytearray(rng.choice(corpus))
        if i % 3 == 0:
            for _ in range(rng.randrange(1, 6)):
                pos = rng.randrange(14, len(frame))
                frame[pos] = rng.randrange(256)
        elif i % 3 == 1:
            frame = frame[: rng.randrange(14, len(frame) + 1)]
        if rng.random() < 0.2:
            frame[0:6] = bytes.fromhex("333300000001")
        now += 0.01
        net.receive_frame(rng.choice([1, 2]), bytes(frame), now)
        if i % 50 == 0:
            net.handle_timer(now)
        net.frames_to_send(now)
        net.events.clear()
    stats = net.stats
    assert stats["ipv6_in"] > 100 and net.reassembler6.stats["fragments"] > 0
    assert stats["ipv6_truncated"] + stats["ipv6_bad_payload_length"] > 0
    assert stats["icmpv6_bad_checksum"] + stats["ndp_bad_hop_limit"] + stats["udp_bad_checksum"] > 0
    net.handle_timer(now + 100)
    net.frames_to_send()
    assert len(net.reassembler6) == 0
    learn6(net, port=1)
    (reply,) = frames(
        feed(net, to_gw(IPv6(src=GUEST6, dst=GW6) / ICMPv6EchoRequest()), now=now + 100)
    )
    assert ICMPv6EchoReply in reply


def test_port_forward_active_open_to_a_v6_guest():
    net = make_net()
    learn6(net)
    conn = net.tcp_connect(a6(GUEST6), 80, a6(GW6), 40001, 1.0)
    assert conn is not None
    (syn,) = frames(net.frames_to_send(1.0))
    assert syn[IPv6].src == GW6 and syn[IPv6].dst == GUEST6 and syn[TCP].flags == "S"
    assert dict(syn[TCP].options)["MSS"] == 1440
    assert_checksum_ok(syn)
    synack = IPv6(src=GUEST6, dst=GW6) / TCP(
        sport=80, dport=40001, flags="SA", seq=500, ack=syn[TCP].seq + 1, window=65535
    )
    (ack,) = frames(feed(net, to_gw(synack), now=1.1))
    assert ack[TCP].flags == "A" and ack[TCP].ack == 501
