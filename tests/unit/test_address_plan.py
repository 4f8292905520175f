"""The configurable address plan, frame by frame: slirp4netns's 10.0.2.0/24 plan (guest .100,
gateway and host loopback both .2, DNS .3 of its own, DHCP .15-.30) and its validation."""

from __future__ import annotations

import ipaddress

import pytest
from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import ARP, Ether

from netferry.hostd.cli import build_parser, config_from_args
from netferry.hostd.config import NetworkConfig, parse_dhcp_range
from netferry.hostd.stack.network import DnsQueryOutbound, Network, TcpDial, UdpOutbound

GW_MAC = "5a:94:ef:e4:0c:dd"
GUEST_MAC = "02:00:00:00:00:64"
GUEST = "10.0.2.100"
GW = "10.0.2.2"
DNS = "10.0.2.3"
A = ipaddress.IPv4Address


def slirp_config(**extra) -> NetworkConfig:
    return NetworkConfig(
        subnet=ipaddress.IPv4Network("10.0.2.0/24"),
        gateway_ip=A(GW),
        host_ip=A(GW),
        dns_ip=A(DNS),
        guest_ip=A(GUEST),
        dhcp_range=(A("10.0.2.15"), A("10.0.2.30")),
        dns_upstreams=[("127.0.0.1", 53)],
        **extra,
    )


def slirp_net(**extra) -> Network:
    net = Network(slirp_config(**extra))
    net.add_port()
    return net


def feed(net: Network, pkt) -> list[Ether]:
    net.receive_frame(1, bytes(Ether(src=GUEST_MAC, dst=GW_MAC) / pkt), 0.0)
    return [Ether(f) for f in net.frames_to_send().get(1, [])]


@pytest.mark.parametrize("target", [GW, DNS])
def test_arp_answers_gateway_and_dns(target):
    net = slirp_net()
    req = ARP(op=1, hwsrc=GUEST_MAC, psrc=GUEST, pdst=target)
    net.receive_frame(1, bytes(Ether(src=GUEST_MAC, dst="ff:ff:ff:ff:ff:ff") / req), 0.0)
    (reply,) = [Ether(f) for f in net.frames_to_send()[1]]
    assert reply[ARP].op == 2 and reply[ARP].psrc == target and reply[ARP].hwsrc == GW_MAC


@pytest.mark.parametrize("target", [GW, DNS])
def test_echo_to_gateway_and_dns_answered_even_without_host_loopback(target):
    net = slirp_net(host_loopback=False)
    (reply,) = feed(net, IP(src=GUEST, dst=target) / ICMP(type=8, id=9, seq=1) / b"ping")
    assert reply[IP].src == target and reply[ICMP].type == 0 and bytes(reply[ICMP].payload)
    assert not net.events


def test_tcp_to_gateway_goes_to_host_loopback():
    net = slirp_net()
    assert feed(net, IP(src=GUEST, dst=GW) / TCP(sport=40000, dport=8080, flags="S")) == []
    (ev,) = net.events
    assert isinstance(ev, TcpDial) and ev.target_ip == "127.0.0.1" and ev.target_port == 8080


def test_tcp_to_gateway_refused_without_host_loopback():
    net = slirp_net(host_loopback=False)
    (err,) = feed(net, IP(src=GUEST, dst=GW) / TCP(sport=40000, dport=8080, flags="S"))
    assert err[ICMP].type == 3 and err[ICMP].code == 13 and err[IP].src == GW
    assert not net.events


def test_udp_to_gateway_goes_to_host_loopback_but_dhcp_stays_with_the_gateway():
    net = slirp_net()
    assert feed(net, IP(src=GUEST, dst=GW) / UDP(sport=4000, dport=5353) / b"hi") == []
    (ev,) = net.events
    assert isinstance(ev, UdpOutbound) and ev.target_ip == "127.0.0.1" and ev.payload == b"hi"
    net.events.clear()
    discover = (
        IP(src="0.0.0.0", dst="255.255.255.255")
        / UDP(sport=68, dport=67)
        / BOOTP(chaddr=bytes.fromhex(GUEST_MAC.replace(":", "")), xid=7, flags=0x8000)
        / DHCP(options=[("message-type", "discover"), "end"])
    )
    net.receive_frame(1, bytes(Ether(src=GUEST_MAC, dst="ff:ff:ff:ff:ff:ff") / discover), 0.0)
    (offer,) = [Ether(f) for f in net.frames_to_send()[1]]
    assert offer[IP].src == GW
    assert offer[BOOTP].yiaddr == "10.0.2.15"  # the first of slirp4netns's pool
    opts = dict(o for o in offer[DHCP].options if isinstance(o, tuple))
    assert opts["router"] == GW and opts["name_server"] == DNS


def test_dns_answered_at_its_own_address_and_from_it():
    net = slirp_net()
    from dnslib import DNSRecord

    query = DNSRecord.question("host.containers.internal").pack()
    (reply,) = feed(net, IP(src=GUEST, dst=DNS) / UDP(sport=5000, dport=53) / query)
    assert reply[IP].src == DNS and reply[UDP].sport == 53
    answer = DNSRecord.parse(bytes(reply[UDP].payload))
    assert str(answer.rr[0].rdata) == GW  # the host is the gateway in this plan
    feed(
        net,
        IP(src=GUEST, dst=DNS) / UDP(sport=5000, dport=53) / DNSRecord.question("a.example").pack(),
    )
    (ev,) = net.events
    assert isinstance(ev, DnsQueryOutbound)


def test_dns_address_refuses_other_ports():
    net = slirp_net()
    (err,) = feed(net, IP(src=GUEST, dst=DNS) / UDP(sport=5000, dport=80) / b"x")
    assert err[ICMP].type == 3 and err[ICMP].code == 3 and err[IP].src == DNS
    (rst,) = feed(net, IP(src=GUEST, dst=DNS) / TCP(sport=5000, dport=80, flags="S"))
    assert rst[TCP].flags.R and rst[IP].src == DNS
    feed(net, IP(src=GUEST, dst=DNS) / TCP(sport=5001, dport=53, flags="S"))
    (ev,) = net.events
    assert isinstance(ev, TcpDial) and ev.service == "dns"


def test_default_plan_unchanged():
    c = NetworkConfig()
    assert (str(c.gateway_ip), str(c.host_ip), str(c.dns_ip), str(c.guest_ip)) == (
        "192.168.127.1",
        "192.168.127.254",
        "192.168.127.1",
        "192.168.127.2",
    )


def test_host_switch_flags_make_the_slirp_plan():
    args = build_parser().parse_args(
        [
            "--listen=stdio://",
            "--subnet=10.0.2.0/24",
            "--gateway-ip=10.0.2.2",
            "--host-ip=10.0.2.2",
            "--dns-ip=10.0.2.3",
            "--guest-ip=10.0.2.100",
            "--dhcp-range=10.0.2.15-10.0.2.30",
            "--dns-upstream=127.0.0.1",
        ]
    )
    got = config_from_args(args)
    want = slirp_config()
    for name in ("gateway_ip", "host_ip", "dns_ip", "guest_ip", "dhcp_range"):
        assert getattr(got, name) == getattr(want, name)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"gateway_ip": A("10.0.3.1")}, "gateway address 10.0.3.1 is not a host of"),
        ({"dns_ip": A("10.0.2.255")}, "dns address 10.0.2.255 is not a host of"),
        ({"guest_ip": A("10.0.2.1")}, "guest address 10.0.2.1 is one of the switch's own"),
        ({"dhcp_range": (A("10.0.2.30"), A("10.0.3.2"))}, "DHCP range"),
    ],
)
def test_bad_plans_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NetworkConfig(subnet=ipaddress.IPv4Network("10.0.2.0/24"), **kwargs)


@pytest.mark.parametrize("text", ["10.0.2.15", "10.0.2.30-10.0.2.15", "a-b"])
def test_bad_dhcp_range_text(text):
    with pytest.raises(ValueError, match="DHCP range"):
        parse_dhcp_range(text)


@pytest.mark.parametrize("plan", ["default", "slirp"])
def test_unicast_dhcp_to_the_gateway_is_served_but_not_to_a_separate_dns(plan):
    """Renewals go unicast to the server; in the default plan DNS is the gateway itself."""
    net = Network(NetworkConfig()) if plan == "default" else Network(slirp_config())
    net.add_port()
    gw = str(net.config.gateway_ip)
    client = "192.168.127.50" if plan == "default" else "10.0.2.50"
    request = (
        IP(src=client, dst=gw)
        / UDP(sport=68, dport=67)
        / BOOTP(chaddr=bytes.fromhex(GUEST_MAC.replace(":", "")), xid=9, ciaddr=client)
        / DHCP(options=[("message-type", "request"), "end"])
    )
    feed(net, request)
    assert net.dhcp.stats.requests == 1
    if plan == "slirp":
        (err,) = feed(net, IP(src=GUEST, dst=DNS) / UDP(sport=68, dport=67) / b"x")
        assert err[ICMP].type == 3 and err[ICMP].code == 3
        assert net.dhcp.stats.requests == 1
