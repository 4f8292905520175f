"""hostd/stack/arp.py alone: the ARP codec (against scapy) and the neighbour table.
The port rules for ARP senders are in test_network.py."""

from __future__ import annotations

import ipaddress

import pytest
from scapy.layers.l2 import ARP

from netferry.hostd.stack import arp, ethernet

GW_MAC = "5a:94:ef:e4:0c:dd"
MAC1 = "5a:94:ef:e4:0c:ee"
MAC2 = "5a:94:ef:e4:0c:ef"
MAC3 = "5a:94:ef:e4:0c:f0"
GW_IP = "192.168.127.1"
GUEST_IP = "192.168.127.2"
GUEST2_IP = "192.168.127.3"


def b(ip: str) -> bytes:
    return ipaddress.IPv4Address(ip).packed


def m(mac: str) -> bytes:
    return ethernet.parse_mac(mac)


def test_arp_codec_against_scapy():
    raw = arp.build_arp(arp.OP_REPLY, m(GW_MAC), b(GW_IP), m(MAC1), b(GUEST_IP))
    p = ARP(raw)
    assert (p.op, p.hwsrc, p.psrc, p.hwdst, p.pdst) == (2, GW_MAC, GW_IP, MAC1, GUEST_IP)
    parsed = arp.parse_arp(bytes(ARP(op=1, hwsrc=MAC2, psrc=GUEST2_IP, pdst=GW_IP)))
    assert parsed.op == 1 and parsed.sender_mac == m(MAC2) and parsed.target_ip == b(GW_IP)
    with pytest.raises(arp.ArpError):
        arp.parse_arp(raw[:27])


def test_neighbour_table_bounded_and_ignores_zero():
    t = arp.NeighbourTable(max_entries=2)
    t.learn(b"\0\0\0\0", m(MAC1))
    t.learn(b(GUEST_IP), m(MAC1))
    t.learn(b(GUEST2_IP), m(MAC2))
    t.learn(b("192.168.127.4"), m(MAC3))
    assert t.lookup(b("192.168.127.4")) is None and len(t.items()) == 2
    t.learn(b(GUEST_IP), m(MAC3))  # an update is always allowed
    assert t.lookup(b(GUEST_IP)) == m(MAC3)
    t.forget_macs([m(MAC3)])
    assert t.lookup(b(GUEST_IP)) is None and t.lookup(b(GUEST2_IP)) == m(MAC2)
