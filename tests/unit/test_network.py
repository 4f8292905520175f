"""hostd/stack/network.py frame by frame: the switch, ARP and the port rules, the gateway's
IPv4 layer (routing, reassembly through the switch, sending to guests) and its services
(DHCP, DNS, echo), and garbage. The protocol codecs have their own files (test_ipv4.py,
test_arp.py, test_icmp.py, test_udp.py, test_ethernet.py, test_tcp.py), the transport layer
test_transport.py, the receive path's per-flow delivery test_receive_path.py.

Frames are built and checked with scapy (an independent implementation), DNS with dnslib.
No sockets, no clock: every call gets `now` explicitly.
"""

from __future__ import annotations

import ipaddress
import random
import struct

import pytest
from dnslib import QTYPE, DNSRecord
from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.inet import ICMP, IP, UDP, defragment, fragment, in4_chksum
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw
from scapy.utils import checksum as scapy_checksum

from netferry.hostd.config import NetworkConfig
from netferry.hostd.stack import checksum as cs
from netferry.hostd.stack import ethernet, icmp, ipv4
from netferry.hostd.stack.network import (
    DnsQueryOutbound,
    IcmpEchoOutbound,
    LeaseEvent,
    Network,
    UdpOutbound,
)

GW_MAC = "5a:94:ef:e4:0c:dd"
MAC1 = "5a:94:ef:e4:0c:ee"  # the default static lease: .2
MAC2 = "5a:94:ef:e4:0c:ef"
MAC3 = "5a:94:ef:e4:0c:f0"
BCAST = "ff:ff:ff:ff:ff:ff"
GW_IP = "192.168.127.1"
GUEST_IP = "192.168.127.2"
GUEST2_IP = "192.168.127.3"
HOST_IP = "192.168.127.254"
REMOTE_IP = "192.0.2.7"  # TEST-NET-1: NATed, never contacted (sans-IO)


def b(ip: str) -> bytes:
    return ipaddress.IPv4Address(ip).packed


def m(mac: str) -> bytes:
    return ethernet.parse_mac(mac)


def make_net(ports: int = 1, **config) -> Network:
    net = Network(NetworkConfig(**config))
    for _ in range(ports):
        net.add_port()
    return net


def to_gw(pkt, src_mac: str = MAC1) -> bytes:
    return bytes(Ether(src=src_mac, dst=GW_MAC) / pkt)


def feed(net: Network, frame, port: int = 1, now: float = 0.0) -> dict[int, list[bytes]]:
    net.receive_frame(port, bytes(frame), now)
    return net.frames_to_send()


def only_frames(out: dict[int, list[bytes]], port: int = 1) -> list[Ether]:
    """The frames sent, all of them to `port`, parsed by scapy."""
    assert set(out) <= {port}, f"frames went to ports {sorted(out)}, expected only {port}"
    return [Ether(f) for f in out.get(port, [])]


def learn_guest(net: Network, port: int = 1, mac: str = MAC1, ip: str = GUEST_IP) -> None:
    """Teach the gateway a guest (CAM + neighbour table) with an ARP request for .1."""
    feed(net, Ether(src=mac, dst=BCAST) / ARP(op=1, hwsrc=mac, psrc=ip, pdst=GW_IP), port)


def assert_valid_ip(pkt) -> None:
    """IP header and (unfragmented) ICMP/UDP checksums are right, by scapy's own arithmetic."""
    ip = pkt[IP]
    raw = bytes(ip)
    hlen = ip.ihl * 4
    assert ip.version == 4
    assert ip.len == len(raw), "IP total length does not match the frame"
    assert scapy_checksum(raw[:hlen]) == 0, "bad IP header checksum"
    fresh = IP(raw)
    fresh.chksum = None
    assert IP(bytes(fresh)).chksum == ip.chksum
    if ip.flags.MF or ip.frag:
        return
    body = raw[hlen:]
    if ip.proto == 1:
        assert scapy_checksum(body) == 0, "bad ICMP checksum"
    elif ip.proto == 17:
        assert struct.unpack_from("!H", body, 6)[0] != 0, "UDP checksum left out"
        assert struct.unpack_from("!H", body, 4)[0] == len(body)
        assert in4_chksum(17, ip, body) == 0, "bad UDP checksum"


def assert_from_gateway(frame: Ether, dst_mac: str) -> None:
    assert frame.src == GW_MAC
    assert frame.dst == dst_mac
    assert frame[IP].src == GW_IP
    assert_valid_ip(frame)


# ---- ARP ---------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [GW_IP, HOST_IP])
def test_arp_request_for_virtual_addresses_answered_with_gateway_mac(target):
    net = make_net()
    req = Ether(src=MAC1, dst=BCAST) / ARP(op=1, hwsrc=MAC1, psrc=GUEST_IP, pdst=target)
    (reply,) = only_frames(feed(net, req))
    assert reply.dst == MAC1 and reply.src == GW_MAC
    a = reply[ARP]
    assert a.op == 2
    assert a.hwsrc == GW_MAC and a.psrc == target
    assert a.hwdst == MAC1 and a.pdst == GUEST_IP
    assert net.stats["arp_replies_out"] == 1


def test_arp_request_unicast_to_gateway_mac_answered():
    net = make_net()
    req = Ether(src=MAC1, dst=GW_MAC) / ARP(op=1, hwsrc=MAC1, psrc=GUEST_IP, pdst=GW_IP)
    (reply,) = only_frames(feed(net, req))
    assert reply[ARP].op == 2 and reply[ARP].hwsrc == GW_MAC


def test_arp_padded_to_minimum_frame_size_still_answered():
    net = make_net()
    req = Ether(src=MAC1, dst=BCAST) / ARP(op=1, hwsrc=MAC1, psrc=GUEST_IP, pdst=GW_IP)
    frame = bytes(req) + b"\x00" * 18  # 60 bytes, as NICs pad it
    (reply,) = only_frames(feed(net, frame))
    assert reply[ARP].psrc == GW_IP


@pytest.mark.parametrize("target", [GUEST2_IP, "192.168.127.77", "10.0.0.1"])
def test_arp_for_other_addresses_not_answered(target):
    net = make_net()
    req = Ether(src=MAC1, dst=BCAST) / ARP(op=1, hwsrc=MAC1, psrc=GUEST_IP, pdst=target)
    assert feed(net, req) == {}
    assert net.stats["arp_replies_out"] == 0


def test_arp_request_for_a_guest_reaches_that_guest_unanswered_by_gateway():
    net = make_net(ports=2)
    learn_guest(net, 2, MAC2, GUEST2_IP)
    req = Ether(src=MAC1, dst=BCAST) / ARP(op=1, hwsrc=MAC1, psrc=GUEST_IP, pdst=GUEST2_IP)
    out = feed(net, req, port=1)
    assert out == {2: [bytes(req)]}  # flooded to the other guest only, no gateway reply


def test_arp_teaches_neighbour_table():
    net = make_net()
    assert net.neighbours.lookup(b(GUEST_IP)) is None
    learn_guest(net)
    assert net.neighbours.lookup(b(GUEST_IP)) == m(MAC1)
    # A gratuitous ARP from a moved address updates the entry.
    grat = Ether(src=MAC2, dst=BCAST) / ARP(op=2, hwsrc=MAC2, psrc=GUEST_IP, pdst=GUEST_IP)
    feed(net, grat)
    assert net.neighbours.lookup(b(GUEST_IP)) == m(MAC2)


def test_arp_probe_from_unconfigured_host_not_learned_but_answered():
    net = make_net()
    probe = Ether(src=MAC1, dst=BCAST) / ARP(op=1, hwsrc=MAC1, psrc="0.0.0.0", pdst=GW_IP)
    (reply,) = only_frames(feed(net, probe))
    assert reply[ARP].op == 2
    assert net.neighbours.items() == []


def test_ip_traffic_teaches_neighbour_table():
    net = make_net()
    feed(net, to_gw(IP(src=GUEST_IP, dst=REMOTE_IP) / UDP(sport=1, dport=2) / b"x"))
    assert net.neighbours.lookup(b(GUEST_IP)) == m(MAC1)


@pytest.mark.parametrize(
    "arp_pkt",
    [
        ARP(op=2, hwsrc=MAC1, psrc=GW_IP, pdst=GW_IP),  # claims the gateway's address
        ARP(op=2, hwsrc=MAC1, psrc=HOST_IP, pdst=GW_IP),  # claims .254
        ARP(op=1, hwsrc=MAC2, psrc=GUEST_IP, pdst=GW_IP),  # sender MAC != frame source
    ],
)
def test_arp_spoofing_dropped_and_counted(arp_pkt):
    net = make_net()
    assert feed(net, Ether(src=MAC1, dst=BCAST) / arp_pkt) == {}
    assert net.stats["arp_spoof_dropped"] == 1
    assert net.neighbours.items() == []


# ---- port rules: who may claim an address ----------------------------------------------


def test_same_port_mac_change_moves_the_neighbour_entry():
    net = make_net(ports=2)
    learn_guest(net)
    # The guest on port 1 comes back with another MAC (a VM restarted): allowed.
    grat = Ether(src=MAC3, dst=BCAST) / ARP(op=2, hwsrc=MAC3, psrc=GUEST_IP, pdst=GUEST_IP)
    out = feed(net, grat, port=1)
    assert net.neighbours.lookup(b(GUEST_IP)) == m(MAC3)
    assert out == {2: [bytes(grat)]}


def test_gratuitous_arp_for_another_ports_address_dropped_not_flooded():
    net = make_net(ports=3)
    learn_guest(net, 1, MAC1, GUEST_IP)
    learn_guest(net, 3, MAC3, "192.168.127.9")
    grat = Ether(src=MAC2, dst=BCAST) / ARP(op=2, hwsrc=MAC2, psrc=GUEST_IP, pdst=GUEST_IP)
    assert feed(net, grat, port=2) == {}  # neither the victim nor the bystander hears it
    assert net.stats["arp_address_theft_dropped"] == 1
    assert net.neighbours.lookup(b(GUEST_IP)) == m(MAC1)
    # A unicast reply aimed at the bystander, claiming the victim's address: dropped too.
    steer = Ether(src=MAC2, dst=MAC3) / ARP(op=2, hwsrc=MAC2, psrc=GUEST_IP, pdst="192.168.127.9")
    assert feed(net, steer, port=2) == {}
    assert net.stats["arp_address_theft_dropped"] == 2
    # The gateway's traffic for the victim still goes to the victim's port.
    net.send_udp(b(GW_IP), 53, b(GUEST_IP), 4000, b"answer")
    assert set(net.frames_to_send()) == {1}


@pytest.mark.parametrize("claimed", [GW_IP, HOST_IP])
@pytest.mark.parametrize("dst", [BCAST, MAC1])
def test_arp_claiming_a_virtual_address_never_reaches_another_guest(claimed, dst):
    net = make_net(ports=2)
    learn_guest(net, 1, MAC1, GUEST_IP)
    before = (net.stats["flooded"], net.stats["switched"])
    claim = Ether(src=MAC2, dst=dst) / ARP(op=2, hwsrc=MAC2, psrc=claimed, pdst=GUEST_IP)
    assert feed(net, claim, port=2) == {}
    assert net.stats["arp_gateway_claim_dropped"] == 1
    assert (net.stats["flooded"], net.stats["switched"]) == before


def test_ipv4_from_another_ports_address_dropped_and_neighbour_kept():
    net = make_net(ports=2)
    learn_guest(net, 1, MAC1, GUEST_IP)
    spoofed = to_gw(IP(src=GUEST_IP, dst=REMOTE_IP) / UDP(sport=1, dport=2) / b"x", MAC2)
    feed(net, spoofed, port=2)
    assert net.stats["ipv4_source_conflict_dropped"] == 1
    assert not net.events
    assert net.neighbours.lookup(b(GUEST_IP)) == m(MAC1)


def test_address_free_again_once_its_port_is_gone():
    net = make_net(ports=2)
    learn_guest(net, 1, MAC1, GUEST_IP)
    net.remove_port(1)
    grat = Ether(src=MAC2, dst=BCAST) / ARP(op=2, hwsrc=MAC2, psrc=GUEST_IP, pdst=GUEST_IP)
    feed(net, grat, port=2)
    assert net.neighbours.lookup(b(GUEST_IP)) == m(MAC2)
    assert net.stats["arp_address_theft_dropped"] == 0


def test_arp_from_a_broadcast_source_address_not_learned():
    net = make_net()
    bad = Ether(src=MAC1, dst=BCAST) / ARP(op=1, hwsrc=MAC1, psrc="192.168.127.255", pdst=GW_IP)
    feed(net, bad)
    assert net.neighbours.items() == []


# ---- the switch --------------------------------------------------------------------------


def test_switch_learns_source_macs_per_port():
    net = make_net(ports=2)
    feed(net, Ether(src=MAC1, dst=BCAST, type=0x88B5) / b"hello", port=1)
    feed(net, Ether(src=MAC2, dst=BCAST, type=0x88B5) / b"hello", port=2)
    assert net.cam.lookup(m(MAC1)) == 1
    assert net.cam.lookup(m(MAC2)) == 2
    assert net.cam.lookup(m(MAC3)) is None
    # Port security: a MAC another port holds is not taken (dropped, counted)...
    assert feed(net, Ether(src=MAC1, dst=BCAST, type=0x88B5) / b"stolen", port=2) == {}
    assert net.cam.lookup(m(MAC1)) == 1 and net.stats["mac_theft_dropped"] == 1
    # ... until it has aged out; then it moves to its new port.
    feed(net, Ether(src=MAC1, dst=BCAST, type=0x88B5) / b"moved", port=2, now=301.0)
    assert net.cam.lookup(m(MAC1)) == 2


def test_broadcast_flooded_to_other_ports_not_back_to_sender():
    net = make_net(ports=3)
    frame = bytes(Ether(src=MAC1, dst=BCAST, type=0x88B5) / (b"x" * 50))
    out = feed(net, frame, port=2)
    assert out == {1: [frame], 3: [frame]}
    assert net.stats["flooded"] == 1
    # ... and the gateway looked at it too (and dropped the unknown ethertype).
    assert net.stats["unknown_ethertype_dropped"] == 1


def test_multicast_flooded_like_broadcast():
    net = make_net(ports=2, ipv6=False)  # with IPv6 off its frames are only switched
    frame = bytes(Ether(src=MAC1, dst="33:33:00:00:00:01", type=0x86DD) / (b"\x60" + b"\0" * 39))
    out = feed(net, frame, port=1)
    assert out == {2: [frame]}
    assert net.stats["ipv6_dropped"] == 1


def test_unknown_unicast_dropped_and_counted():
    net = make_net(ports=3)
    frame = Ether(src=MAC1, dst=MAC2, type=0x88B5) / b"who are you"
    assert feed(net, frame, port=1) == {}
    assert net.stats["unknown_unicast_dropped"] == 1
    assert net.stats["switched"] == 0


def test_guest_to_guest_unicast_switched_untouched():
    net = make_net(ports=3)
    learn_guest(net, 2, MAC2, GUEST2_IP)
    net.frames_to_send()
    frame = bytes(
        Ether(src=MAC1, dst=MAC2) / IP(src=GUEST_IP, dst=GUEST2_IP, ttl=1) / UDP() / b"p2p"
    )
    out = feed(net, frame, port=1)
    assert out == {2: [frame]}
    assert net.stats["switched"] == 1
    assert not net.events  # never NATed
    assert net.stats["ipv4_in"] == 0  # the gateway did not even parse it


def test_unicast_to_a_mac_on_the_sending_port_not_reflected():
    net = make_net(ports=2)
    feed(net, Ether(src=MAC2, dst=BCAST, type=0x88B5) / b"x", port=1)
    assert feed(net, Ether(src=MAC1, dst=MAC2, type=0x88B5) / b"y", port=1) == {}
    assert net.stats["unknown_unicast_dropped"] == 1


def test_remove_port_forgets_its_macs_and_neighbours():
    net = make_net(ports=2)
    learn_guest(net, 2, MAC2, GUEST2_IP)
    net.remove_port(2)
    assert net.ports == {1}
    assert net.cam.lookup(m(MAC2)) is None
    assert net.neighbours.lookup(b(GUEST2_IP)) is None
    frame = Ether(src=MAC1, dst=BCAST, type=0x88B5) / b"x"
    assert feed(net, frame, port=1) == {}


def test_frames_to_send_drains_the_outbox():
    net = make_net()
    learn_guest(net)
    assert net.frames_to_send() == {}


def test_originated_frames_recorded_when_capture_on():
    net = make_net()
    net.originated = []
    out = feed(net, Ether(src=MAC1, dst=BCAST) / ARP(op=1, hwsrc=MAC1, psrc=GUEST_IP, pdst=GW_IP))
    assert net.originated == out[1]


# ---- DHCP --------------------------------------------------------------------------------


def dhcp_frame(mac: str, xid: int, options: list, broadcast: bool = True) -> bytes:
    return bytes(
        Ether(src=mac, dst=BCAST)
        / IP(src="0.0.0.0", dst="255.255.255.255")
        / UDP(sport=68, dport=67)
        / BOOTP(chaddr=m(mac) + b"\0" * 10, xid=xid, flags=0x8000 if broadcast else 0)
        / DHCP(options=[*options, "end"])
    )


def dhcp_type(pkt) -> int:
    for opt in pkt[DHCP].options:
        if isinstance(opt, tuple) and opt[0] == "message-type":
            return opt[1]
    raise AssertionError("no message-type option")


def dhcp_option(pkt, name):
    for opt in pkt[DHCP].options:
        if isinstance(opt, tuple) and opt[0] == name:
            return opt[1]
    return None


def check_dhcp_reply(frame: Ether, xid: int, dst_mac: str, dst_ip: str, yiaddr: str) -> None:
    assert_from_gateway(frame, dst_mac)
    assert frame[IP].dst == dst_ip
    assert frame[UDP].sport == 67 and frame[UDP].dport == 68
    assert frame[BOOTP].op == 2 and frame[BOOTP].xid == xid
    assert frame[BOOTP].yiaddr == yiaddr
    assert dhcp_option(frame, "server_id") == GW_IP


@pytest.mark.parametrize("broadcast", [True, False])
def test_dhcp_dora_through_the_stack(broadcast):
    net = make_net(ports=2)
    dst_mac, dst_ip = (BCAST, "255.255.255.255") if broadcast else (MAC1, GUEST_IP)
    discover = dhcp_frame(MAC1, 0x1234, [("message-type", "discover")], broadcast)
    out = feed(net, discover, port=1, now=10.0)
    assert set(out) == {1, 2}
    assert out[2][0] == discover  # the client's broadcast is flooded to the other guest
    if broadcast:
        assert out[2][1:] == out[1]  # and the broadcast reply reaches every port
    else:
        assert out[2][1:] == []
    (offer,) = [Ether(f) for f in out[1]]
    check_dhcp_reply(offer, 0x1234, dst_mac, dst_ip, GUEST_IP)
    assert dhcp_type(offer) == 2  # OFFER
    assert dhcp_option(offer, "router") == GW_IP
    assert dhcp_option(offer, "subnet_mask") == "255.255.255.0"
    assert not net.events

    request = dhcp_frame(
        MAC1,
        0x1235,
        [
            ("message-type", "request"),
            ("server_id", GW_IP),
            ("requested_addr", GUEST_IP),
            ("hostname", b"vm1"),
        ],
        broadcast,
    )
    out = feed(net, request, port=1, now=11.0)
    (ack,) = [Ether(f) for f in out[1]]
    check_dhcp_reply(ack, 0x1235, dst_mac, dst_ip, GUEST_IP)
    assert dhcp_type(ack) == 5  # ACK
    assert dhcp_option(ack, "lease_time") == 3600
    assert list(net.events) == [LeaseEvent(MAC1, GUEST_IP, "vm1")]
    assert net.neighbours.lookup(b(GUEST_IP)) == m(MAC1)


def test_dhcp_dynamic_address_for_unknown_mac():
    net = make_net()
    out = feed(net, dhcp_frame(MAC3, 7, [("message-type", "discover")], broadcast=False))
    (offer,) = only_frames(out)
    yiaddr = ipaddress.IPv4Address(offer[BOOTP].yiaddr)
    assert yiaddr in ipaddress.IPv4Network("192.168.127.0/24")
    assert str(yiaddr) not in (GW_IP, GUEST_IP, HOST_IP, "192.168.127.0", "192.168.127.255")
    assert offer[IP].dst == str(yiaddr) and offer.dst == MAC3
    assert_valid_ip(offer)


def test_dhcp_reply_parsed_by_scapy_is_byte_exact_udp():
    net = make_net()
    (offer,) = only_frames(feed(net, dhcp_frame(MAC1, 9, [("message-type", "discover")])))
    raw_udp = bytes(offer[UDP])
    assert len(raw_udp) == offer[UDP].len == offer[IP].len - 20
    assert len(bytes(offer[UDP].payload)) >= 300  # BOOTP minimum size


# ---- ICMP --------------------------------------------------------------------------------


def test_echo_to_gateway_answered():
    net = make_net()
    payload = bytes(range(56))
    ping = IP(src=GUEST_IP, dst=GW_IP, ttl=64) / ICMP(type=8, id=0x4242, seq=7) / payload
    (reply,) = only_frames(feed(net, to_gw(ping)))
    assert_from_gateway(reply, MAC1)
    assert reply[IP].dst == GUEST_IP
    assert reply[ICMP].type == 0 and reply[ICMP].code == 0
    assert reply[ICMP].id == 0x4242 and reply[ICMP].seq == 7
    assert bytes(reply[ICMP].payload) == payload
    assert not net.events
    assert net.stats["icmp_echo_replies"] == 1


def test_echo_with_odd_payload_and_ip_options_answered():
    net = make_net()
    ping = IP(src=GUEST_IP, dst=GW_IP, options=b"\x01\x01\x01\x00") / ICMP(id=1, seq=1) / b"abc"
    (reply,) = only_frames(feed(net, to_gw(ping)))
    assert_valid_ip(reply)
    assert bytes(reply[ICMP].payload) == b"abc"


def test_large_fragmented_echo_to_gateway_answered_in_fragments():
    net = make_net()
    payload = random.Random(3).randbytes(4000)
    ping = IP(src=GUEST_IP, dst=GW_IP, id=99) / ICMP(id=5, seq=6) / payload
    for frag in fragment(ping, fragsize=1480):
        out = feed(net, to_gw(frag))
    frames = only_frames(out)
    assert len(frames) == 3
    for f in frames:
        assert len(f) <= 1514
        assert_valid_ip(f)
    (whole,) = defragment([f[IP] for f in frames])
    whole = IP(bytes(whole))
    assert_valid_ip(whole)
    assert whole[ICMP].type == 0 and bytes(whole[ICMP].payload) == payload


def test_echo_to_host_loopback_becomes_event():
    net = make_net()
    ping = IP(src=GUEST_IP, dst=HOST_IP) / ICMP(id=9, seq=3) / b"ping!"
    assert feed(net, to_gw(ping)) == {}
    assert list(net.events) == [
        IcmpEchoOutbound(b(GUEST_IP), b(HOST_IP), "127.0.0.1", 9, 3, b"ping!")
    ]


def test_echo_to_remote_address_becomes_event():
    net = make_net()
    feed(net, to_gw(IP(src=GUEST_IP, dst=REMOTE_IP) / ICMP(id=1, seq=2) / b"x"))
    (ev,) = net.events
    assert isinstance(ev, IcmpEchoOutbound) and ev.target_ip == REMOTE_IP


def test_echo_to_host_loopback_refused_when_disabled():
    net = make_net(host_loopback=False)
    ping = IP(src=GUEST_IP, dst=HOST_IP) / ICMP(id=9, seq=3) / b"ping!"
    (err,) = only_frames(feed(net, to_gw(ping)))
    assert_from_gateway(err, MAC1)
    assert err[IP].dst == GUEST_IP
    assert err[ICMP].type == 3 and err[ICMP].code == 13
    assert bytes(err[ICMP].payload) == bytes(IP(bytes(ping)))[:28]
    assert not net.events
    assert net.stats["host_loopback_refused"] == 1


def test_udp_to_host_loopback_refused_when_disabled():
    net = make_net(host_loopback=False)
    dgram = IP(src=GUEST_IP, dst=HOST_IP) / UDP(sport=1000, dport=2000) / b"data"
    (err,) = only_frames(feed(net, to_gw(dgram)))
    assert err[ICMP].type == 3 and err[ICMP].code == 13
    assert bytes(err[ICMP].payload) == bytes(IP(bytes(dgram)))[:28]
    assert not net.events


def test_non_echo_icmp_dropped():
    net = make_net()
    assert feed(net, to_gw(IP(src=GUEST_IP, dst=GW_IP) / ICMP(type=13))) == {}
    assert net.stats["icmp_non_echo_dropped"] == 1


def test_unknown_protocol_to_gateway_gets_protocol_unreachable():
    net = make_net()
    pkt = IP(src=GUEST_IP, dst=GW_IP, proto=99) / (b"z" * 12)
    (err,) = only_frames(feed(net, to_gw(pkt)))
    assert err[ICMP].type == 3 and err[ICMP].code == 2
    assert bytes(err[ICMP].payload) == bytes(IP(bytes(pkt)))[:28]
    assert net.stats["ipv4_unknown_protocol"] == 1


# ---- UDP ---------------------------------------------------------------------------------


def test_udp_to_host_loopback_becomes_outbound_to_127_0_0_1():
    net = make_net()
    dgram = IP(src=GUEST_IP, dst=HOST_IP) / UDP(sport=40000, dport=5353) / b"hello host"
    assert feed(net, to_gw(dgram)) == {}
    (ev,) = net.events
    raw = bytes(IP(bytes(dgram)))
    assert ev == UdpOutbound(
        b(GUEST_IP), 40000, b(HOST_IP), 5353, "127.0.0.1", b"hello host", raw[:28]
    )


def test_udp_to_remote_becomes_outbound_to_that_address():
    net = make_net()
    feed(net, to_gw(IP(src=GUEST_IP, dst=REMOTE_IP) / UDP(sport=1, dport=9) / b"x"))
    (ev,) = net.events
    assert ev.target_ip == REMOTE_IP and ev.dst_ip == b(REMOTE_IP) and ev.payload == b"x"


def test_udp_with_zero_checksum_accepted():
    net = make_net()
    dgram = IP(src=GUEST_IP, dst=HOST_IP) / UDP(sport=1, dport=9, chksum=0) / b"nocsum"
    feed(net, to_gw(dgram))
    (ev,) = net.events
    assert ev.payload == b"nocsum"


def test_udp_padded_frame_trimmed_to_ip_length():
    net = make_net()
    dgram = IP(src=GUEST_IP, dst=HOST_IP) / UDP(sport=1, dport=9) / b"p"
    feed(net, to_gw(dgram) + b"\x00" * 20)
    (ev,) = net.events
    assert ev.payload == b"p"


def test_udp_to_gateway_closed_port_gets_port_unreachable_quoting_it():
    net = make_net()
    dgram = IP(src=GUEST_IP, dst=GW_IP, id=4321) / UDP(sport=33333, dport=9999) / (b"q" * 40)
    (err,) = only_frames(feed(net, to_gw(dgram)))
    assert_from_gateway(err, MAC1)
    assert err[IP].dst == GUEST_IP
    assert err[ICMP].type == 3 and err[ICMP].code == 3
    quote = bytes(err[ICMP].payload)
    assert quote == bytes(IP(bytes(dgram)))[:28]
    inner = IP(quote)
    assert inner.src == GUEST_IP and inner.dst == GW_IP and inner.id == 4321
    assert inner[UDP].sport == 33333 and inner[UDP].dport == 9999
    assert not net.events


def test_ttl_1_to_a_nated_address_gets_time_exceeded():
    net = make_net()
    dgram = IP(src=GUEST_IP, dst=REMOTE_IP, ttl=1) / UDP(sport=5, dport=33434) / b"trace"
    (err,) = only_frames(feed(net, to_gw(dgram)))
    assert_from_gateway(err, MAC1)
    assert err[ICMP].type == 11 and err[ICMP].code == 0
    assert bytes(err[ICMP].payload) == bytes(IP(bytes(dgram)))[:28]
    assert not net.events
    assert net.stats["ttl_exceeded"] == 1


def test_ttl_1_echo_to_remote_gets_time_exceeded():
    net = make_net()
    ping = IP(src=GUEST_IP, dst=REMOTE_IP, ttl=1) / ICMP(id=3, seq=4)
    (err,) = only_frames(feed(net, to_gw(ping)))
    assert err[ICMP].type == 11
    assert not net.events


@pytest.mark.parametrize(
    "dst", ["127.0.0.1", "0.0.0.1", "224.0.0.251", "192.168.127.9", "240.0.0.1"]
)
def test_udp_to_unroutable_addresses_dropped(dst):
    net = make_net()
    assert feed(net, to_gw(IP(src=GUEST_IP, dst=dst) / UDP(sport=1, dport=2))) == {}
    assert not net.events
    assert net.stats["ipv4_unroutable_dropped"] == 1


def test_udp_broadcast_to_other_port_dropped():
    net = make_net()
    frame = Ether(src=MAC1, dst=BCAST) / IP(src=GUEST_IP, dst="192.168.127.255") / UDP(dport=137)
    assert feed(net, frame) == {}
    assert net.stats["udp_broadcast_dropped"] == 1


@pytest.mark.parametrize("src", ["192.168.127.255", "192.168.127.0"])
def test_martian_source_in_subnet_dropped(src):
    net = make_net()
    out = feed(net, to_gw(IP(src=src, dst=GW_IP) / ICMP(id=1, seq=1)))
    assert out == {}
    assert net.stats["ipv4_bad_source"] == 1
    assert net.neighbours.lookup(b(src)) is None


def test_tcp_syn_with_ttl_1_gets_only_time_exceeded():
    from scapy.layers.inet import TCP

    net = make_net()
    syn = IP(src=GUEST_IP, dst=REMOTE_IP, ttl=1) / TCP(sport=1234, dport=80, flags="S")
    frames = only_frames(feed(net, to_gw(syn)))
    assert [(f[IP].src, f[IP].proto) for f in frames] == [(GW_IP, 1)]
    assert frames[0][ICMP].type == 11
    assert not net.events


@pytest.mark.parametrize("dst", ["255.255.255.255", "192.168.127.255", "224.0.0.1"])
def test_tcp_syn_to_broadcast_or_multicast_dropped_silently(dst):
    from scapy.layers.inet import TCP

    net = make_net()
    syn = IP(src=GUEST_IP, dst=dst) / TCP(sport=1234, dport=80, flags="S")
    assert feed(net, to_gw(syn)) == {}
    assert not net.events


# ---- fragments ---------------------------------------------------------------------------


def big_udp(n: int = 3000, ident: int = 777, seed: int = 1):
    payload = random.Random(seed).randbytes(n)
    pkt = IP(src=GUEST_IP, dst=HOST_IP, id=ident) / UDP(sport=4000, dport=5000) / payload
    return pkt, payload


@pytest.mark.parametrize("order", ["in_order", "reversed", "shuffled", "last_first"])
def test_fragments_reassembled_into_one_outbound(order):
    net = make_net(ipv6=False)  # no router advertisement timer
    pkt, payload = big_udp()
    frags = [to_gw(f) for f in fragment(pkt, fragsize=1000)]
    assert len(frags) == 4
    if order == "reversed":
        frags.reverse()
    elif order == "shuffled":
        random.Random(5).shuffle(frags)
    elif order == "last_first":
        frags = frags[-1:] + frags[:-1]
    for i, f in enumerate(frags):
        assert feed(net, f, now=float(i)) == {}
        assert len(net.events) == (1 if i == len(frags) - 1 else 0)
    (ev,) = net.events
    assert isinstance(ev, UdpOutbound)
    assert ev.payload == payload and ev.guest_port == 4000 and ev.dst_port == 5000
    assert ev.target_ip == "127.0.0.1"
    assert net.reassembler.stats["reassembled"] == 1
    assert net.reassembler.stats["fragments"] == 4
    assert len(net.reassembler) == 0 and net.reassembler.held_bytes == 0
    assert net.get_timer() is None


def test_interleaved_fragments_of_two_datagrams():
    net = make_net()
    p1, d1 = big_udp(2000, ident=1, seed=1)
    p2, d2 = big_udp(2000, ident=2, seed=2)
    f1 = fragment(p1, fragsize=800)
    f2 = fragment(p2, fragsize=800)
    for a, c in zip(f1, f2, strict=True):
        feed(net, to_gw(a))
        feed(net, to_gw(c))
    assert sorted(ev.payload for ev in net.events) == sorted([d1, d2])


def test_duplicate_fragment_harmless():
    net = make_net()
    pkt, payload = big_udp()
    frags = fragment(pkt, fragsize=1000)
    for f in [frags[0], frags[0], *frags[1:]]:
        feed(net, to_gw(f))
    (ev,) = net.events
    assert ev.payload == payload
    assert net.reassembler.stats["overlap_dropped"] == 0


def raw_fragment(offset: int, data: bytes, mf: bool, ident: int = 55, dst: str = HOST_IP):
    flags = "MF" if mf else 0
    return IP(src=GUEST_IP, dst=dst, id=ident, proto=17, flags=flags, frag=offset // 8) / Raw(data)


def test_overlapping_fragments_dropped():
    net = make_net()
    udp_hdr = bytes(UDP(sport=1, dport=2, len=8 + 24, chksum=0))
    feed(net, to_gw(raw_fragment(0, udp_hdr + b"A" * 8, mf=True)))
    feed(net, to_gw(raw_fragment(8, b"B" * 24, mf=False)))  # overlaps [8, 16)
    assert net.reassembler.stats["overlap_dropped"] == 1
    assert len(net.reassembler) == 0 and net.reassembler.held_bytes == 0
    assert not net.events
    # What would have completed the datagram now starts (and leaves) a fresh partial only.
    feed(net, to_gw(raw_fragment(16, b"C" * 16, mf=False)))
    assert not net.events


def test_fragments_with_a_hole_and_a_piece_past_the_end_not_reassembled():
    # Sizes add up to the total, but [8,16) is missing and [24,32) lies beyond the end.
    net = make_net()
    udp_hdr = bytes(UDP(sport=1, dport=2, len=24, chksum=0))
    feed(net, to_gw(raw_fragment(0, udp_hdr, mf=True)))
    feed(net, to_gw(raw_fragment(24, b"C" * 8, mf=True)))
    feed(net, to_gw(raw_fragment(16, b"B" * 8, mf=False)))
    assert not net.events
    assert net.reassembler.stats["reassembled"] == 0


def test_reassembly_timeout_via_handle_timer():
    net = make_net(reassembly_timeout=5.0, ipv6=False)  # no router advertisement timer
    pkt, _ = big_udp()
    frags = fragment(pkt, fragsize=1000)
    feed(net, to_gw(frags[0]), now=100.0)
    feed(net, to_gw(frags[1]), now=102.0)
    assert net.get_timer() == 105.0  # from the first fragment
    net.handle_timer(104.9)
    assert len(net.reassembler) == 1
    net.handle_timer(105.0)
    assert len(net.reassembler) == 0 and net.reassembler.held_bytes == 0
    assert net.reassembler.stats["timeout_dropped"] == 1
    assert net.get_timer() is None
    for f in frags[2:]:
        feed(net, to_gw(f), now=106.0)
    assert not net.events  # the first half is gone for good


def test_reassembly_memory_bounded_and_still_works():
    limit = 4096
    net = make_net(reassembly_max_bytes=limit)
    # First fragments of many datagrams that never complete.
    for ident in range(1, 20):
        pkt, _ = big_udp(3000, ident=ident)
        feed(net, to_gw(fragment(pkt, fragsize=1480)[0]), now=float(ident))
        assert net.reassembler.held_bytes <= limit
    assert net.reassembler.stats["memory_dropped"] > 0
    assert len(net.reassembler) <= limit // 1480
    # A datagram bigger than the whole budget cannot be reassembled...
    pkt, _ = big_udp(6000, ident=500)
    for f in fragment(pkt, fragsize=1480):
        feed(net, to_gw(f), now=30.0)
        assert net.reassembler.held_bytes <= limit
    assert not net.events
    # ... but a small fragmented one still is: old partials are evicted to make room.
    pkt, payload = big_udp(2000, ident=600)
    for f in fragment(pkt, fragsize=1480):
        feed(net, to_gw(f), now=31.0)
    (ev,) = net.events
    assert ev.payload == payload


# ---- sending to guests -------------------------------------------------------------------


@pytest.mark.parametrize("mtu", [1500, 576, 9000])
def test_send_udp_bigger_than_mtu_is_fragmented_validly(mtu):
    net = make_net(mtu=mtu)
    learn_guest(net)
    net.frames_to_send()
    payload = random.Random(mtu).randbytes(12000)
    net.send_udp(b(GW_IP), 53, b(GUEST_IP), 40000, payload)
    frames = only_frames(net.frames_to_send())
    expected = -(-(len(payload) + 8) // ((mtu - 20) & ~7))
    assert len(frames) == expected
    idents = {f[IP].id for f in frames}
    assert len(idents) == 1
    for f in frames:
        assert_from_gateway(f, MAC1)
        assert f[IP].len <= mtu
    assert all(f[IP].flags.MF for f in frames[:-1]) and not frames[-1][IP].flags.MF
    (whole,) = defragment([f[IP] for f in frames])
    whole = IP(bytes(whole))
    assert_valid_ip(whole)
    assert whole[UDP].sport == 53 and whole[UDP].dport == 40000
    assert bytes(whole[UDP].payload) == payload


def test_send_udp_that_fits_is_one_frame():
    net = make_net()
    learn_guest(net)
    net.frames_to_send()
    net.send_udp(b(HOST_IP), 7, b(GUEST_IP), 8, b"x" * 1472)  # exactly 1500 bytes of IP
    (f,) = only_frames(net.frames_to_send())
    assert f[IP].len == 1500 and not f[IP].flags.MF and f[IP].frag == 0
    assert f[IP].src == HOST_IP
    assert_valid_ip(f)


def test_send_ip_to_unknown_guest_arps_queues_and_flushes_on_reply():
    net = make_net(ports=2)
    feed(net, Ether(src=MAC2, dst=BCAST, type=0x88B5) / b"x", port=2)  # CAM knows MAC2
    net.send_udp(b(GW_IP), 53, b(GUEST2_IP), 1234, b"queued")
    out = net.frames_to_send()
    assert set(out) == {1, 2}  # the ARP request is broadcast
    (req,) = [Ether(f) for f in out[2]]
    assert req.dst == BCAST and req.src == GW_MAC
    assert req[ARP].op == 1 and req[ARP].psrc == GW_IP and req[ARP].hwsrc == GW_MAC
    assert req[ARP].pdst == GUEST2_IP
    assert net.stats["arp_requests_out"] == 1
    reply = Ether(src=MAC2, dst=GW_MAC) / ARP(
        op=2, hwsrc=MAC2, psrc=GUEST2_IP, hwdst=GW_MAC, pdst=GW_IP
    )
    (frame,) = only_frames(feed(net, reply, port=2), port=2)
    assert_from_gateway(frame, MAC2)
    assert frame[IP].dst == GUEST2_IP
    assert frame[UDP].dport == 1234 and bytes(frame[UDP].payload) == b"queued"
    # Nothing left queued: a second reply sends nothing more.
    assert feed(net, reply, port=2) == {}


def test_arp_queue_is_bounded():
    net = make_net()
    feed(net, Ether(src=MAC2, dst=BCAST, type=0x88B5) / b"x")
    for i in range(70):
        net.send_udp(b(GW_IP), 53, b(GUEST2_IP), 1000 + i, b"q")
    net.frames_to_send()
    assert net.stats["arp_queue_dropped"] == 6
    reply = Ether(src=MAC2, dst=GW_MAC) / ARP(op=2, hwsrc=MAC2, psrc=GUEST2_IP, pdst=GW_IP)
    frames = only_frames(feed(net, reply))
    assert [f[UDP].dport for f in frames] == list(range(1000, 1064))


def test_send_ip_outside_subnet_dropped():
    net = make_net()
    net.send_udp(b(GW_IP), 53, b(REMOTE_IP), 1, b"x")
    assert net.frames_to_send() == {}
    assert net.stats["no_route_dropped"] == 1


def test_send_icmp_error_and_echo_reply_to_known_guest():
    net = make_net()
    learn_guest(net)
    net.frames_to_send()
    orig = bytes(IP(src=GUEST_IP, dst=REMOTE_IP) / UDP(sport=1, dport=2) / b"0123456789")
    net.send_icmp_error(b(GW_IP), b(GUEST_IP), icmp.DEST_UNREACHABLE, icmp.FRAG_NEEDED, orig, 1400)
    net.send_icmp_echo_reply(b(REMOTE_IP), b(GUEST_IP), 77, 78, b"pong")
    err, echo = only_frames(net.frames_to_send())
    assert err[ICMP].type == 3 and err[ICMP].code == 4 and err[ICMP].nexthopmtu == 1400
    assert bytes(err[ICMP].payload) == orig[:28]
    assert_valid_ip(err)
    assert echo[IP].src == REMOTE_IP and echo[ICMP].type == 0
    assert echo[ICMP].id == 77 and echo[ICMP].seq == 78 and bytes(echo[ICMP].payload) == b"pong"
    assert_valid_ip(echo)


# ---- DNS ---------------------------------------------------------------------------------


def dns_query(name: str, qtype: str = "A", port: int = 45678):
    q = DNSRecord.question(name, qtype)
    data = q.pack()
    return q, data, IP(src=GUEST_IP, dst=GW_IP) / UDP(sport=port, dport=53) / data


@pytest.mark.parametrize(
    ("name", "answer"),
    [("host.containers.internal", HOST_IP), ("gateway.docker.internal", GW_IP)],
)
def test_dns_local_name_answered_through_the_stack(name, answer):
    net = make_net()
    q, _, pkt = dns_query(name)
    (reply,) = only_frames(feed(net, to_gw(pkt)))
    assert_from_gateway(reply, MAC1)
    assert reply[IP].dst == GUEST_IP
    assert reply[UDP].sport == 53 and reply[UDP].dport == 45678
    resp = DNSRecord.parse(bytes(reply[UDP].payload))
    assert resp.header.id == q.header.id and resp.header.qr == 1
    assert resp.header.rcode == 0
    assert [(str(rr.rname), QTYPE[rr.rtype], str(rr.rdata)) for rr in resp.rr] == [
        (name + ".", "A", answer)
    ]
    assert not net.events


def test_dns_other_name_becomes_forward_event():
    net = make_net()
    _, data, pkt = dns_query("www.example.test", port=5353)
    assert feed(net, to_gw(pkt)) == {}
    assert list(net.events) == [DnsQueryOutbound(b(GUEST_IP), 5353, data, net.dns_ip)]


def test_dns_garbage_to_gateway_dropped_silently():
    net = make_net()
    assert feed(net, to_gw(IP(src=GUEST_IP, dst=GW_IP) / UDP(sport=1, dport=53) / b"xy")) == {}
    assert not net.events


# ---- garbage -----------------------------------------------------------------------------


def fix_ip_checksum(raw: bytes) -> bytes:
    hlen = (raw[0] & 15) * 4
    hdr = bytearray(raw[:hlen])
    hdr[10:12] = b"\0\0"
    hdr[10:12] = cs.checksum(hdr).to_bytes(2, "big")
    return bytes(hdr) + raw[hlen:]


GOOD_UDP = IP(src=GUEST_IP, dst=HOST_IP) / UDP(sport=1, dport=2) / b"payload!"
GOOD_PING = IP(src=GUEST_IP, dst=GW_IP) / ICMP(id=1, seq=1) / b"payload!"
ETH_IP = bytes(Ether(src=MAC1, dst=GW_MAC, type=0x0800))
ETH_ARP = bytes(Ether(src=MAC1, dst=GW_MAC, type=0x0806))


def _garbage():
    udp_raw = bytes(GOOD_UDP)
    ping_raw = bytes(GOOD_PING)
    bad_udp_csum = bytearray(udp_raw)
    bad_udp_csum[26] ^= 0xFF
    bad_icmp_csum = bytearray(ping_raw)
    bad_icmp_csum[22] ^= 0xFF
    bad_udp_len = bytearray(udp_raw)
    bad_udp_len[24:26] = (200).to_bytes(2, "big")
    short_udp_len = bytearray(udp_raw)
    short_udp_len[24:26] = (4).to_bytes(2, "big")
    return [
        ("empty", b"", "malformed_ethernet"),
        ("truncated_ethernet", ETH_IP[:13], "malformed_ethernet"),
        (
            "multicast_source",
            bytes(Ether(src="01:00:5e:00:00:01", dst=GW_MAC)),
            "malformed_ethernet",
        ),
        ("zero_source", bytes(Ether(src="00:00:00:00:00:00", dst=GW_MAC)), "malformed_ethernet"),
        ("ipv4_truncated", ETH_IP + udp_raw[:12], "ipv4_truncated"),
        ("ipv4_version_6", ETH_IP + fix_ip_checksum(b"\x65" + udp_raw[1:]), "ipv4_bad_version"),
        ("ipv4_ihl_4", ETH_IP + fix_ip_checksum(b"\x44" + udp_raw[1:]), "ipv4_bad_header_length"),
        ("ipv4_ihl_past_end", ETH_IP + b"\x4f" + udp_raw[1:30], "ipv4_bad_header_length"),
        (
            "ipv4_total_too_long",
            ETH_IP + fix_ip_checksum(udp_raw[:2] + b"\x05\x00" + udp_raw[4:]),
            "ipv4_bad_total_length",
        ),
        (
            "ipv4_total_below_header",
            ETH_IP + fix_ip_checksum(udp_raw[:2] + b"\x00\x10" + udp_raw[4:]),
            "ipv4_bad_total_length",
        ),
        (
            "ipv4_bad_checksum",
            ETH_IP + udp_raw[:10] + b"\xde\xad" + udp_raw[12:],
            "ipv4_bad_checksum",
        ),
        (
            "ipv4_reserved_flag",
            ETH_IP + fix_ip_checksum(udp_raw[:6] + b"\x80\x00" + udp_raw[8:]),
            "ipv4_reserved_flag",
        ),
        (
            "ipv4_source_outside_subnet",
            bytes(Ether(src=MAC1, dst=GW_MAC) / IP(src="10.1.1.1", dst=HOST_IP) / UDP()),
            "ipv4_bad_source",
        ),
        (
            "ipv4_source_is_gateway",
            bytes(Ether(src=MAC1, dst=GW_MAC) / IP(src=GW_IP, dst=HOST_IP) / UDP()),
            "ipv4_bad_source",
        ),
        (
            "udp_truncated",
            bytes(Ether(src=MAC1, dst=GW_MAC) / IP(src=GUEST_IP, dst=HOST_IP, proto=17) / b"abcd"),
            "udp_truncated",
        ),
        ("udp_length_past_end", ETH_IP + bytes(bad_udp_len), "udp_bad_length"),
        ("udp_length_below_header", ETH_IP + bytes(short_udp_len), "udp_bad_length"),
        ("udp_bad_checksum", ETH_IP + bytes(bad_udp_csum), "udp_bad_checksum"),
        (
            "icmp_truncated",
            bytes(Ether(src=MAC1, dst=GW_MAC) / IP(src=GUEST_IP, dst=GW_IP, proto=1) / b"\x08\0"),
            "icmp_truncated",
        ),
        ("icmp_bad_checksum", ETH_IP + bytes(bad_icmp_csum), "icmp_bad_checksum"),
        ("arp_truncated", ETH_ARP + bytes(ARP(psrc=GUEST_IP, hwsrc=MAC1))[:20], "malformed_arp"),
        ("arp_not_ethernet", ETH_ARP + bytes(ARP(hwtype=6, hwsrc=MAC1)), "malformed_arp"),
        ("arp_bad_opcode", ETH_ARP + bytes(ARP(op=9, hwsrc=MAC1)), "malformed_arp"),
        (
            "ipv6_bad_payload_length",
            bytes(Ether(src=MAC1, dst=GW_MAC, type=0x86DD)) + b"\x60" * 40,
            "ipv6_bad_payload_length",
        ),
        (
            "vlan",
            bytes(Ether(src=MAC1, dst=GW_MAC, type=0x8100)) + b"\0" * 46,
            "unknown_ethertype_dropped",
        ),
    ]


GARBAGE = _garbage()


@pytest.mark.parametrize(("name", "frame", "counter"), GARBAGE, ids=[g[0] for g in GARBAGE])
def test_malformed_frame_dropped_and_counted(name, frame, counter):
    net = make_net()
    assert feed(net, frame) == {}
    assert net.stats[counter] == 1, dict(net.stats)
    assert not net.events
    assert net.stats["frames_in"] == 1


def test_valid_frames_used_by_the_garbage_table_are_accepted():
    # The garbage above is one change away from these: they must work, or the test proves nothing.
    net = make_net()
    feed(net, ETH_IP + bytes(GOOD_UDP))
    assert len(net.events) == 1
    assert len(only_frames(feed(net, ETH_IP + bytes(GOOD_PING)))) == 1


def _corpus() -> list[bytes]:
    frames = [
        dhcp_frame(MAC1, 1, [("message-type", "discover")]),
        dhcp_frame(MAC1, 2, [("message-type", "request"), ("requested_addr", GUEST_IP)]),
        to_gw(dns_query("host.containers.internal")[2]),
        to_gw(dns_query("www.example.test", "AAAA")[2]),
        to_gw(GOOD_UDP),
        to_gw(GOOD_PING),
        to_gw(IP(src=GUEST_IP, dst=REMOTE_IP, ttl=1) / UDP(sport=9, dport=9)),
        to_gw(IP(src=GUEST_IP, dst=GW_IP) / UDP(sport=9, dport=999) / b"closed"),
        bytes(Ether(src=MAC1, dst=BCAST) / ARP(op=1, hwsrc=MAC1, psrc=GUEST_IP, pdst=GW_IP)),
        bytes(Ether(src=MAC1, dst=GW_MAC) / ARP(op=2, hwsrc=MAC1, psrc=GUEST2_IP, pdst=GW_IP)),
    ]
    pkt, _ = big_udp(3000)
    frames += [to_gw(f) for f in fragment(pkt, fragsize=1000)]
    pkt = IP(src=GUEST_IP, dst=GW_IP, id=3) / ICMP() / (b"z" * 3000)
    frames += [to_gw(f) for f in fragment(pkt, fragsize=1480)]
    return frames


def _random_ipv4(rng: random.Random) -> bytes:
    body_len = rng.randrange(0, 80)
    proto = rng.choice([1, 6, 17, 17, 99, rng.randrange(256)])
    flags_offset = rng.choice([0, 0, 0x2000, 0x4000, rng.randrange(0x8000)])
    src = rng.choice([GUEST_IP, GUEST2_IP, "0.0.0.0", "10.0.0.1"])
    dst = rng.choice([GW_IP, HOST_IP, REMOTE_IP, "255.255.255.255", "192.168.127.255"])
    header = ipv4.HEADER.pack(
        0x45,
        0,
        20 + body_len,
        rng.randrange(4),  # few idents, so fragments collide
        flags_offset,
        rng.randrange(3),
        proto,
        0,
        b(src),
        b(dst),
    )
    return fix_ip_checksum(header + rng.randbytes(body_len))


def test_fuzz_never_raises_counts_everything_and_keeps_working():
    rng = random.Random(20240611)
    limit = 64 * 1024
    net = make_net(reassembly_max_bytes=limit, reassembly_timeout=2.0)
    corpus = _corpus()
    n = 4000
    now = 0.0
    emitted: list[bytes] = []
    for i in range(n):
        kind = i % 5
        if kind == 0:
            frame = rng.randbytes(rng.randrange(0, 128))
        elif kind == 1:
            ethertype = rng.choice([0x0800, 0x0806, 0x86DD, rng.randrange(0x10000)])
            dst = rng.choice([GW_MAC, BCAST])
            frame = bytes(Ether(src=MAC1, dst=dst, type=ethertype)) + rng.randbytes(
                rng.randrange(0, 100)
            )
        elif kind == 2:
            frame = bytearray(rng.choice(corpus))
            for _ in range(rng.randrange(1, 5)):
                pos = rng.randrange(12, len(frame))  # keep the source MAC sane most of the time
                frame[pos] = rng.randrange(256)
        elif kind == 3:
            base = rng.choice(corpus)
            cut = rng.randrange(0, len(base) + 1)
            frame = base[:cut] + (
                rng.randbytes(rng.randrange(0, 40)) if rng.random() < 0.3 else b""
            )
        else:
            frame = ETH_IP + _random_ipv4(rng)
        now += 0.01
        net.receive_frame(1, bytes(frame), now)
        if i % 100 == 0:
            net.handle_timer(now)
        for frames in net.frames_to_send().values():
            emitted.extend(frames)
        assert net.reassembler.held_bytes <= limit
    net.events.clear()

    stats = net.stats
    assert stats["frames_in"] == n
    for counter in [
        "malformed_ethernet",
        "unknown_ethertype_dropped",
        "malformed_arp",
        "ipv4_truncated",
        "ipv4_bad_checksum",
        "ipv4_bad_version",
        "ipv4_bad_total_length",
        "ipv4_bad_source",
        "udp_bad_checksum",
        "icmp_bad_checksum",
    ]:
        assert stats[counter] > 0, (counter, dict(stats))
    assert net.reassembler.stats["fragments"] > 0

    # Everything the gateway emitted in answer to the garbage is well formed.
    assert emitted
    for raw in emitted:
        frame = Ether(raw)
        assert frame.src == GW_MAC
        if frame.type == 0x0800:
            assert_valid_ip(frame)
        elif frame.type == 0x86DD:  # router advertisements, ICMPv6 errors, NDP
            assert frame[IPv6].plen == len(bytes(frame[IPv6].payload))
        else:
            assert frame.type == 0x0806 and frame[ARP].hwsrc == GW_MAC

    # And the gateway still works.
    net.handle_timer(now + 10)
    net.frames_to_send()  # the router advertisements due by now
    assert len(net.reassembler) == 0 and net.reassembler.held_bytes == 0
    (reply,) = only_frames(feed(net, to_gw(GOOD_PING), now=now + 10))
    assert reply[ICMP].type == 0
