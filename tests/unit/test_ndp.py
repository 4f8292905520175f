"""Neighbour discovery: scapy-built NS/NA/RS parsed by us, our RA/NA dissected by scapy,
RFC 4861 validity checks, DAD defence, the neighbour cache and the RA timing."""

from __future__ import annotations

import ipaddress
import itertools
import random

import pytest
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    ICMPv6ND_NA,
    ICMPv6ND_NS,
    ICMPv6ND_RA,
    ICMPv6ND_RS,
    ICMPv6NDOptDNSSL,
    ICMPv6NDOptDstLLAddr,
    ICMPv6NDOptMTU,
    ICMPv6NDOptPrefixInfo,
    ICMPv6NDOptRDNSS,
    ICMPv6NDOptSrcLLAddr,
    IPv6,
)

from netferry.hostd.stack import ipv6, ndp

GW_MAC = bytes.fromhex("5a94efe40cdd")
GUEST_MAC = bytes.fromhex("5a94efe40cee")
PREFIX = ipaddress.IPv6Network("fd00:192:168:127::/64")
GW = PREFIX[1].packed
GUEST = PREFIX[2].packed
GW_LL = ipv6.link_local_from_mac(GW_MAC)
GUEST_LL = ipv6.link_local_from_mac(GUEST_MAC)
OWN = frozenset({GW, GW_LL, PREFIX[254].packed})


def a(addr: bytes) -> str:
    return str(ipaddress.IPv6Address(addr))


def ours(pkt) -> ndp.NdpMessage:
    """Parse a scapy packet's ICMPv6 part with our parser."""
    raw = ipv6.parse_ipv6(bytes(pkt))
    return ndp.parse_ndp(raw.src, raw.dst, raw.hop_limit, raw.payload)


def test_scapy_ns_parsed_and_answered():
    ns = IPv6(src=a(GUEST_LL), dst=a(ipv6.solicited_node(GW)), hlim=255) / ICMPv6ND_NS(tgt=a(GW))
    ns = ns / ICMPv6NDOptSrcLLAddr(lladdr="5a:94:ef:e4:0c:ee")
    msg = ours(ns)
    assert isinstance(msg, ndp.NeighborSolicitation)
    assert msg.target == GW and msg.source_lla == GUEST_MAC
    reply = ndp.answer_solicitation(GUEST_LL, msg, OWN, GW_MAC)
    assert reply is not None and reply.dst == GUEST_LL and reply.dst_mac == GUEST_MAC
    na = IPv6(ipv6.build_ipv6(reply.src, reply.dst, 58, reply.message, hop_limit=255))
    assert na[ICMPv6ND_NA].tgt == a(GW) and na[ICMPv6ND_NA].R == 1 and na[ICMPv6ND_NA].S == 1
    assert na[ICMPv6ND_NA].O == 1 and na[ICMPv6NDOptDstLLAddr].lladdr == "5a:94:ef:e4:0c:dd"
    assert na.src == a(GW)


def test_solicitation_for_a_guest_address_is_not_answered():
    ns = IPv6(src=a(GUEST_LL), dst=a(ipv6.solicited_node(PREFIX[3].packed)), hlim=255)
    msg = ours(ns / ICMPv6ND_NS(tgt=str(PREFIX[3])))
    assert ndp.answer_solicitation(GUEST_LL, msg, OWN, GW_MAC) is None


def test_dad_probe_for_the_gateway_defended_to_all_nodes_but_not_for_a_guest():
    probe = IPv6(src="::", dst=a(ipv6.solicited_node(GW)), hlim=255) / ICMPv6ND_NS(tgt=a(GW))
    msg = ours(probe)
    reply = ndp.answer_solicitation(ipv6.UNSPECIFIED, msg, OWN, GW_MAC)
    assert reply is not None and reply.dst == ipv6.ALL_NODES
    assert reply.dst_mac == bytes.fromhex("333300000001")
    na = IPv6(ipv6.build_ipv6(reply.src, reply.dst, 58, reply.message, hop_limit=255))
    assert na[ICMPv6ND_NA].S == 0 and na[ICMPv6ND_NA].O == 1
    # our NA is valid to our own parser as well (multicast destination, S clear)
    assert isinstance(ours(na), ndp.NeighborAdvertisement)
    guest_probe = IPv6(src="::", dst=a(ipv6.solicited_node(GUEST)), hlim=255)
    msg = ours(guest_probe / ICMPv6ND_NS(tgt=a(GUEST)))
    assert ndp.answer_solicitation(ipv6.UNSPECIFIED, msg, OWN, GW_MAC) is None


def test_scapy_na_and_rs_parsed():
    na = IPv6(src=a(GUEST), dst=a(GW), hlim=255) / ICMPv6ND_NA(tgt=a(GUEST), R=0, S=1, O=1)
    msg = ours(na / ICMPv6NDOptDstLLAddr(lladdr="5a:94:ef:e4:0c:ee"))
    assert isinstance(msg, ndp.NeighborAdvertisement)
    assert (msg.target, msg.target_lla, msg.router, msg.solicited, msg.override) == (
        GUEST, GUEST_MAC, False, True, True,
    )  # fmt: skip
    rs = IPv6(src=a(GUEST_LL), dst="ff02::2", hlim=255) / ICMPv6ND_RS()
    msg = ours(rs / ICMPv6NDOptSrcLLAddr(lladdr="5a:94:ef:e4:0c:ee"))
    assert isinstance(msg, ndp.RouterSolicitation) and msg.source_lla == GUEST_MAC
    assert ours(IPv6(src="::", dst="ff02::2", hlim=255) / ICMPv6ND_RS()).source_lla is None


def _ra() -> ndp.RouterAdvertisement:
    return ndp.RouterAdvertisement(
        managed=True,
        other=True,
        router_lifetime=1800,
        source_lla=GW_MAC,
        mtu=1500,
        prefixes=[ndp.PrefixInfo(PREFIX.network_address.packed, 64)],
        rdnss=[GW],
        dnssl=["netferry.internal", "example.test"],
    )


def test_our_ra_dissected_by_scapy():
    msg = ndp.build_ra(GW_LL, ipv6.ALL_NODES, _ra())
    pkt = IPv6(ipv6.build_ipv6(GW_LL, ipv6.ALL_NODES, 58, msg, hop_limit=255))
    ra = pkt[ICMPv6ND_RA]
    assert ra.M == 1 and ra.O == 1 and ra.routerlifetime == 1800 and ra.chlim == 64
    assert pkt[ICMPv6NDOptSrcLLAddr].lladdr == "5a:94:ef:e4:0c:dd"
    assert pkt[ICMPv6NDOptMTU].mtu == 1500
    pi = pkt[ICMPv6NDOptPrefixInfo]
    assert pi.prefix == str(PREFIX.network_address) and pi.prefixlen == 64
    assert pi.A == 1 and pi.L == 1 and pi.validlifetime == 86400 and pi.preferredlifetime == 14400
    assert pkt[ICMPv6NDOptRDNSS].dns == [a(GW)] and pkt[ICMPv6NDOptRDNSS].lifetime == 1800
    assert pkt[ICMPv6NDOptDNSSL].searchlist == ["netferry.internal.", "example.test."]
    # the checksum scapy computes is ours
    want = ra.cksum
    del ra.cksum
    assert IPv6(bytes(pkt))[ICMPv6ND_RA].cksum == want
    # and our own parser reads it back whole
    back = ours(pkt)
    assert back == _ra()


def test_scapy_ra_parsed():
    ra = IPv6(src=a(GW_LL), dst="ff02::1", hlim=255) / ICMPv6ND_RA(M=0, O=1, routerlifetime=0)
    ra = ra / ICMPv6NDOptPrefixInfo(prefix="2001:db8::", prefixlen=64, A=0, L=1)
    ra = ra / ICMPv6NDOptRDNSS(dns=["2001:db8::53", "2001:db8::54"], lifetime=60)
    ra = ra / ICMPv6NDOptDNSSL(searchlist=["a.example"])
    msg = ours(ra)
    assert isinstance(msg, ndp.RouterAdvertisement)
    assert not msg.managed and msg.other and msg.router_lifetime == 0
    (p,) = msg.prefixes
    assert not p.autonomous and p.on_link and p.length == 64
    assert [a(x) for x in msg.rdnss] == ["2001:db8::53", "2001:db8::54"]
    assert msg.rdnss_lifetime == 60 and msg.dnssl == ["a.example"]


def _ns_raw(**kw) -> tuple[bytes, bytes, int, bytearray]:
    src = kw.pop("src", a(GUEST_LL))
    dst = kw.pop("dst", a(ipv6.solicited_node(GW)))
    hlim = kw.pop("hlim", 255)
    pkt = IPv6(bytes(IPv6(src=src, dst=dst, hlim=hlim) / ICMPv6ND_NS(tgt=a(GW), **kw)))
    return (
        ipaddress.IPv6Address(src).packed,
        ipaddress.IPv6Address(dst).packed,
        hlim,
        bytearray(bytes(pkt)[40:]),
    )


def _recsum(src: bytes, dst: bytes, msg: bytearray) -> bytes:
    from netferry.hostd.stack.checksum import transport_checksum_v6

    msg[2:4] = b"\x00\x00"
    msg[2:4] = transport_checksum_v6(src, dst, 58, bytes(msg)).to_bytes(2, "big")
    return bytes(msg)


def test_rfc4861_validity_checks():
    src, dst, _hl, msg = _ns_raw()
    assert ndp.parse_ndp(src, dst, 255, bytes(msg)).target == GW
    with pytest.raises(ndp.NdpError, match="ndp_bad_hop_limit"):
        ndp.parse_ndp(src, dst, 254, bytes(msg))
    bad_code = bytearray(msg)
    bad_code[1] = 1
    with pytest.raises(ndp.NdpError, match="ndp_bad_code"):
        ndp.parse_ndp(src, dst, 255, _recsum(src, dst, bad_code))
    with pytest.raises(ndp.NdpError, match="icmpv6_bad_checksum"):
        ndp.parse_ndp(src, dst, 255, bytes(msg[:-1]) + bytes([msg[-1] ^ 1]))
    zero_opt = bytearray(msg) + bytes([1, 0, 0, 0, 0, 0, 0, 0])
    with pytest.raises(ndp.NdpError, match="ndp_zero_option_length"):
        ndp.parse_ndp(src, dst, 255, _recsum(src, dst, zero_opt))
    long_opt = bytearray(msg) + bytes([1, 2]) + GUEST_MAC
    with pytest.raises(ndp.NdpError, match="ndp_truncated_option"):
        ndp.parse_ndp(src, dst, 255, _recsum(src, dst, long_opt))
    odd_lla = bytearray(msg) + bytes([1, 2]) + GUEST_MAC + bytes(8)
    with pytest.raises(ndp.NdpError, match="ndp_bad_lla_option"):
        ndp.parse_ndp(src, dst, 255, _recsum(src, dst, odd_lla))
    short = bytearray(msg[:20])
    with pytest.raises(ndp.NdpError, match="ndp_truncated"):
        ndp.parse_ndp(src, dst, 255, _recsum(src, dst, short))
    mc_target = bytearray(msg)
    mc_target[8:24] = ipv6.ALL_NODES
    with pytest.raises(ndp.NdpError, match="ndp_multicast_target"):
        ndp.parse_ndp(src, dst, 255, _recsum(src, dst, mc_target))


def test_unspecified_source_rules():
    with pytest.raises(ndp.NdpError, match="ndp_slla_from_unspecified"):
        ours(
            IPv6(src="::", dst=a(ipv6.solicited_node(GW)), hlim=255)
            / ICMPv6ND_NS(tgt=a(GW))
            / ICMPv6NDOptSrcLLAddr(lladdr="5a:94:ef:e4:0c:ee")
        )
    with pytest.raises(ndp.NdpError, match="ndp_dad_not_to_solicited_node"):
        ours(IPv6(src="::", dst=a(GW), hlim=255) / ICMPv6ND_NS(tgt=a(GW)))
    with pytest.raises(ndp.NdpError, match="ndp_slla_from_unspecified"):
        ours(
            IPv6(src="::", dst="ff02::2", hlim=255)
            / ICMPv6ND_RS()
            / ICMPv6NDOptSrcLLAddr(lladdr="5a:94:ef:e4:0c:ee")
        )
    with pytest.raises(ndp.NdpError, match="ndp_solicited_na_to_multicast"):
        ours(IPv6(src=a(GUEST), dst="ff02::1", hlim=255) / ICMPv6ND_NA(tgt=a(GUEST), S=1))


def test_ra_checks():
    with pytest.raises(ndp.NdpError, match="ndp_ra_not_link_local"):
        ours(IPv6(src=a(GW), dst="ff02::1", hlim=255) / ICMPv6ND_RA())
    good = ndp.build_ra(GW_LL, ipv6.ALL_NODES, _ra())
    rdnss_at = good.index(bytes([ndp.OPT_RDNSS]))
    bad = bytearray(good)
    bad[rdnss_at + 1] = 2  # even length: not 8 + 16n
    with pytest.raises(ndp.NdpError):
        ndp.parse_ndp(GW_LL, ipv6.ALL_NODES, 255, _recsum(GW_LL, ipv6.ALL_NODES, bad))
    with pytest.raises(ndp.NdpError, match="ndp_not_ndp"):
        ours(IPv6(src=a(GUEST), dst=a(GW), hlim=255) / ICMPv6EchoRequest())


def test_random_corruption_raises_only_ndp_error():
    rng = random.Random(4861)
    good = ndp.build_ra(GW_LL, ipv6.ALL_NODES, _ra())
    for _ in range(3000):
        data = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(4, len(data))] = rng.getrandbits(8)
        data = data[: rng.randint(8, len(data))]
        try:
            ndp.parse_ndp(GW_LL, ipv6.ALL_NODES, 255, _recsum(GW_LL, ipv6.ALL_NODES, data))
        except ndp.NdpError:
            pass


def test_builders_are_read_by_scapy():
    ns = ndp.build_ns(GW_LL, ipv6.solicited_node(GUEST), GUEST, GW_MAC)
    pkt = IPv6(ipv6.build_ipv6(GW_LL, ipv6.solicited_node(GUEST), 58, ns, hop_limit=255))
    assert pkt[ICMPv6ND_NS].tgt == a(GUEST) and pkt[ICMPv6NDOptSrcLLAddr].lladdr == (
        "5a:94:ef:e4:0c:dd"
    )
    dad = ndp.build_ns(ipv6.UNSPECIFIED, ipv6.solicited_node(GUEST), GUEST, GW_MAC)
    assert ICMPv6NDOptSrcLLAddr not in IPv6(ipv6.build_ipv6(ipv6.UNSPECIFIED, GW, 58, dad))
    rs = ndp.build_rs(GUEST_LL, ipv6.ALL_ROUTERS, GUEST_MAC)
    assert ICMPv6ND_RS in IPv6(ipv6.build_ipv6(GUEST_LL, ipv6.ALL_ROUTERS, 58, rs))


def test_neighbour_cache_is_lru_bounded_and_protects_our_addresses():
    cache = ndp.NeighborCache(max_entries=3, protected=OWN)
    macs = [bytes([2, 0, 0, 0, 0, i]) for i in range(5)]
    ips = [PREFIX[10 + i].packed for i in range(5)]
    for ip, mac in zip(ips[:3], macs[:3], strict=True):
        assert cache.learn(ip, mac)
    assert cache.lookup(ips[0]) == macs[0]  # now the most recently used
    cache.learn(ips[3], macs[3])
    assert cache.lookup(ips[1]) is None and cache.lookup(ips[0]) == macs[0]
    assert len(cache) == 3 and cache.stats["evicted"] == 1
    assert not cache.learn(GW, macs[4]) and cache.stats["refused"] == 1
    assert not cache.learn(ipv6.UNSPECIFIED, macs[4])
    assert not cache.learn(ipv6.ALL_NODES, macs[4])
    assert not cache.learn(ips[4], b"\x33\x33\x00\x00\x00\x01")
    cache.learn(ips[0], macs[4])
    assert cache.lookup(ips[0]) == macs[4] and cache.stats["changed"] == 1
    assert cache.addresses_of(macs[4]) == [ips[0]]
    cache.forget_macs([macs[4]])
    assert cache.lookup(ips[0]) is None and len(cache) == 2


def test_ra_scheduler_initial_periodic_and_solicited():
    s = ndp.RaScheduler(now=100.0, max_interval=600.0, rng=random.Random(1))
    assert s.next_deadline() == 100.0
    assert not s.handle_timer(99.0)
    times = []
    now = 100.0
    for _ in range(10):
        now = s.next_deadline()
        assert s.handle_timer(now)
        times.append(now)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(g <= ndp.MAX_INITIAL_INTERVAL for g in gaps[:2])
    assert all(198.0 <= g <= 600.0 for g in gaps[3:])
    assert len(set(gaps[3:])) > 1  # jittered
    # a solicitation brings the next advertisement forward, within MAX_RA_DELAY ...
    last = times[-1]
    s.on_solicitation(last + 100.0)
    assert last + 100.0 <= s.next_deadline() <= last + 100.0 + ndp.MAX_RA_DELAY
    assert s.handle_timer(s.next_deadline())
    # ... but never closer than MIN_DELAY_BETWEEN_RAS to the previous one
    sent = s.next_deadline()
    s2 = ndp.RaScheduler(now=0.0, max_interval=600.0, rng=random.Random(2))
    assert s2.handle_timer(0.0)
    s2.on_solicitation(0.5)
    assert s2.next_deadline() >= ndp.MIN_DELAY_BETWEEN_RAS
    assert s2.solicited == 1 and sent > 0
    with pytest.raises(ValueError):
        ndp.RaScheduler(now=0.0, max_interval=2.0)


def test_router_solicitation_shorter_than_8_bytes_is_invalid():
    rs = bytearray(ndp.build_rs(GUEST_LL, ipv6.ALL_ROUTERS)[:4])
    with pytest.raises(ndp.NdpError, match="icmpv6_truncated"):
        ndp.parse_ndp(GUEST_LL, ipv6.ALL_ROUTERS, 255, _recsum(GUEST_LL, ipv6.ALL_ROUTERS, rs))


def _responder(now: float = 0.0) -> ndp.NdpResponder:
    from netferry.hostd.config import NetworkConfig

    cfg = NetworkConfig(dns_search=["netferry.internal"])
    own = frozenset(a.packed for a in cfg.virtual_addresses6)
    ra = ndp.router_advertisement_for(cfg)
    return ndp.NdpResponder(cfg.gateway_mac, own, ra, now, rng=random.Random(3))


def _in(r: ndp.NdpResponder, pkt, mac: bytes = GUEST_MAC, now: float = 0.0):
    p = ipv6.parse_ipv6(bytes(pkt))
    return r.handle(mac, p.src, p.dst, p.hop_limit, p.payload, now)


def test_responder_answers_learns_and_refuses_spoofs():
    r = _responder()
    ns = IPv6(src=a(GUEST), dst=a(ipv6.solicited_node(GW)), hlim=255) / ICMPv6ND_NS(tgt=a(GW))
    (reply,) = _in(r, ns / ICMPv6NDOptSrcLLAddr(lladdr="5a:94:ef:e4:0c:ee"))
    assert reply.dst == GUEST and reply.dst_mac == GUEST_MAC and reply.hop_limit == 255
    assert r.cache.lookup(GUEST) == GUEST_MAC
    # without a source link-layer option the reply goes to the Ethernet source
    (reply,) = _in(r, IPv6(src=a(PREFIX[7].packed), dst=a(GW), hlim=255) / ICMPv6ND_NS(tgt=a(GW)))
    assert reply.dst_mac == GUEST_MAC
    # the link-local of the gateway is answered too; host loopback (::254) as well
    for target in (GW_LL, PREFIX[0x254].packed):
        ns = IPv6(src=a(GUEST_LL), dst=a(ipv6.solicited_node(target)), hlim=255)
        assert len(_in(r, ns / ICMPv6ND_NS(tgt=a(target)))) == 1
    # a guest advertising the gateway's address, or any router advertisement: dropped, counted
    na = IPv6(src=a(GUEST), dst="ff02::1", hlim=255) / ICMPv6ND_NA(tgt=a(GW), O=1)
    assert _in(r, na / ICMPv6NDOptDstLLAddr(lladdr="5a:94:ef:e4:0c:ee")) == []
    assert _in(r, IPv6(src=a(GUEST_LL), dst="ff02::1", hlim=255) / ICMPv6ND_RA()) == []
    assert r.stats["ndp_spoof_dropped"] == 1 and r.stats["ndp_ra_from_guest_dropped"] == 1
    assert r.cache.lookup(GW) is None
    # a link-layer option naming another MAC than the frame's source is not learned
    ns = IPv6(src=a(PREFIX[9].packed), dst=a(ipv6.solicited_node(GW)), hlim=255)
    _in(r, ns / ICMPv6ND_NS(tgt=a(GW)) / ICMPv6NDOptSrcLLAddr(lladdr="02:00:00:00:00:09"))
    assert r.cache.lookup(PREFIX[9].packed) is None and r.stats["ndp_lla_mismatch_dropped"] == 1
    # invalid messages are counted by reason
    assert _in(r, IPv6(src=a(GUEST), dst=a(GW), hlim=64) / ICMPv6ND_NS(tgt=a(GW))) == []
    assert r.stats["ndp_bad_hop_limit"] == 1


def test_responder_router_advertisements_on_time_and_on_solicitation():
    r = _responder(now=0.0)
    assert r.next_deadline() == 0.0
    (ra,) = r.handle_timer(0.0)
    assert ra.src == GW_LL and ra.dst == ipv6.ALL_NODES
    assert ra.dst_mac == b"\x33\x33\x00\x00\x00\x01"
    pkt = IPv6(ipv6.build_ipv6(ra.src, ra.dst, 58, ra.message, hop_limit=ra.hop_limit))
    assert pkt[ICMPv6NDOptPrefixInfo].prefix == str(PREFIX.network_address)
    assert pkt[ICMPv6NDOptPrefixInfo].A == 1 and pkt[ICMPv6ND_RA].M == 1 and pkt[ICMPv6ND_RA].O == 1
    assert pkt[ICMPv6NDOptRDNSS].dns == [a(GW)] and pkt[ICMPv6NDOptMTU].mtu == 1500
    assert pkt[ICMPv6NDOptDNSSL].searchlist == ["netferry.internal."]
    assert r.handle_timer(1.0) == []
    rs = IPv6(src=a(GUEST_LL), dst="ff02::2", hlim=255) / ICMPv6ND_RS()
    assert _in(r, rs / ICMPv6NDOptSrcLLAddr(lladdr="5a:94:ef:e4:0c:ee"), now=10.0) == []
    assert 10.0 <= r.next_deadline() <= 10.5 and r.cache.lookup(GUEST_LL) == GUEST_MAC
    assert len(r.handle_timer(r.next_deadline())) == 1


def test_responder_solicits_unknown_guests():
    r = _responder()
    ns = r.solicit(GUEST)
    pkt = IPv6(ipv6.build_ipv6(ns.src, ns.dst, 58, ns.message, hop_limit=ns.hop_limit))
    assert pkt.dst == a(ipv6.solicited_node(GUEST)) and pkt[ICMPv6ND_NS].tgt == a(GUEST)
    assert ns.dst_mac == bytes.fromhex("3333ff000002")
    assert pkt[ICMPv6NDOptSrcLLAddr].lladdr == "5a:94:ef:e4:0c:dd"


def test_neighbour_cache_per_port_share_and_live_ports_kept():
    ports = {bytes([2, 0, 0, 0, 0, 1]): 1, bytes([2, 0, 0, 0, 0, 2]): 2}
    a, b = ports
    cache = ndp.NeighborCache(max_entries=32, protected=OWN)
    cache.port_of = ports.get
    assert cache.per_port == 16
    assert cache.learn(PREFIX[2].packed, a)
    for i in range(100):  # port 2 churns only its own share
        assert cache.learn(PREFIX[1000 + i].packed, b)
    assert len(cache.addresses_of(b)) == 16 and cache.stats["port_evicted"] == 84
    assert cache.lookup(PREFIX[2].packed) == a
    for i in range(15):
        assert cache.learn(PREFIX[100 + i].packed, a)
    assert len(cache) == 32  # each port at its share, and the cache full
    c = bytes([2, 0, 0, 0, 0, 3])
    ports[c] = 3
    assert not cache.learn(PREFIX[5000].packed, c) and cache.stats["refused_full"] == 1
    del ports[a]  # port 1 gone (its MAC left the CAM table): its entries may go
    assert cache.learn(PREFIX[5000].packed, c) and cache.stats["evicted"] == 1
