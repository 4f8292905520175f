"""The NAT's per-guest shares are per guest, not per address: `Network.guest_owner` names
the switch port a guest address sits on, so a dual-stack guest's IPv4 and IPv6 sockets and
flows draw from one share of the descriptor budget (`--max-connections-per-guest`) and of
the UDP flow table (`--flow-guest-share`), while guests on two ports keep one each. Real
UDP sockets to loopback (nothing needs to listen: a connected UDP socket just sends)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import ICMPv6ND_NS, ICMPv6NDOptSrcLLAddr, IPv6
from scapy.layers.l2 import ARP, Ether

from netferry.hostd.config import NetworkConfig
from netferry.hostd.nat.budget import BudgetExceeded, DescriptorBudget
from netferry.hostd.nat.udp import UdpNat
from netferry.hostd.stack.network import Network
from netferry.hostd.stack.transport import UdpOutbound

GW_MAC, GW_IP, GW6 = "5a:94:ef:e4:0c:dd", "192.168.127.1", "fd00:192:168:127::1"
A_MAC, A4, A6 = "02:00:00:00:00:0a", "192.168.127.10", "fd00:192:168:127::a"
B_MAC, B4, B6 = "02:00:00:00:00:0b", "192.168.127.11", "fd00:192:168:127::b"


def packed(ip: str) -> bytes:
    return ipaddress.ip_address(ip).packed


def two_guests() -> Network:
    """Guest A on port 1 and guest B on port 2, each with an IPv4 and an IPv6 address the
    gateway learned (ARP request, neighbour solicitation)."""
    net = Network(NetworkConfig())
    net.add_port()
    net.add_port()
    for port, mac, ip4, ip6 in ((1, A_MAC, A4, A6), (2, B_MAC, B4, B6)):
        arp = Ether(src=mac, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=mac, psrc=ip4, pdst=GW_IP)
        ns = IPv6(src=ip6, dst=GW6, hlim=255) / ICMPv6ND_NS(tgt=GW6)
        ns /= ICMPv6NDOptSrcLLAddr(lladdr=mac)
        net.receive_frame(port, bytes(arp), 1.0)
        net.receive_frame(port, bytes(Ether(src=mac, dst=GW_MAC) / ns), 1.0)
    net.frames_to_send()
    return net


def test_a_guests_addresses_of_both_families_are_its_port():
    net = two_guests()
    assert net.guest_owner(packed(A4)) == net.guest_owner(packed(A6)) == 1
    assert net.guest_owner(packed(B4)) == net.guest_owner(packed(B6)) == 2
    unknown = packed("fd00:192:168:127::99")
    assert net.guest_owner(unknown) == unknown  # no port known: the address itself
    assert net.guest_owner(packed("192.168.127.99")) == packed("192.168.127.99")


def test_the_descriptor_budget_gives_a_dual_stack_guest_one_share():
    net = two_guests()
    budget = DescriptorBudget(100, per_guest=2, guest_owner=net.guest_owner)
    held = [budget.open(socket.AF_INET, socket.SOCK_DGRAM, guest=packed(ip), what="t")
            for ip in (A4, A6, B4, B6)]  # fmt: skip
    try:
        assert budget.by_guest == {1: 2, 2: 2}
        for ip in (A4, A6, B6):  # each guest has used its two, whichever family asks
            with pytest.raises(BudgetExceeded):
                budget.open(socket.AF_INET, socket.SOCK_DGRAM, guest=packed(ip), what="t")
        assert budget.stats["refused_guest_share"] == 3
        held.pop(0).close()  # A gives one back: A (by IPv6 now) may open one again
        held.append(budget.open(socket.AF_INET, socket.SOCK_DGRAM, guest=packed(A6), what="t"))
    finally:
        for s in held:
            s.close()
    assert budget.in_use == 0 and budget.by_guest == {}


def outbound(guest: str, sport: int) -> UdpOutbound:
    if ":" in guest:
        dst, target = GW6, "::1"
        quote = bytes(IPv6(src=guest, dst=dst) / UDP(sport=sport, dport=9))[:48]
    else:
        dst, target = "192.168.127.254", "127.0.0.1"
        quote = bytes(IP(src=guest, dst=dst) / UDP(sport=sport, dport=9))[:28]
    return UdpOutbound(packed(guest), sport, packed(dst), 9, target, b"x", quote)


def test_udp_nat_shares_are_per_guest_across_families():
    async def scenario() -> tuple[dict, dict, set]:
        net = two_guests()
        budget = DescriptorBudget(100, per_guest=3, guest_owner=net.guest_owner)
        nat = UdpNat(net, lambda: None, idle_timeout=30, max_flows=4, budget=budget,
                     guest_share=0.5)  # type: ignore[arg-type]  # fmt: skip
        try:
            nat.send(outbound(B4, 5000))
            nat.send(outbound(B6, 5001))
            # A floods new flows from both its addresses: past its half of the full table
            # it evicts its own oldest, never B's two.
            for i in range(10):
                nat.send(outbound(A4 if i % 2 else A6, 6000 + i))
            owners = nat.flows.owners()
            by_guest = dict(budget.by_guest)
            left = {(ipaddress.ip_address(k[0]).compressed, k[1]) for k in nat.flows}
        finally:
            nat.close()
        return owners, by_guest, left

    owners, by_guest, left = asyncio.run(scenario())
    assert owners == {2: 2, 1: 2} and by_guest == {2: 2, 1: 2}
    assert {(B4, 5000), (B6, 5001)} <= left
    assert left - {(B4, 5000), (B6, 5001)} == {(A4, 6009), (A6, 6008)}  # A's newest two
