"""hostd/switch.py: a bug in the core costs one batch, and one in a NAT handler one event,
never the switch, its loop or a link."""

from __future__ import annotations

import asyncio

import structlog
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import ARP, Ether

from netferry.hostd.config import NetworkConfig
from netferry.hostd.switch import HostSwitch
from tests.unit.helpers import GUEST_IP, GUEST_MAC, GW_MAC, CollectLink, guest_link


def test_a_core_bug_costs_the_batch_not_the_switch(monkeypatch):
    async def main():
        sw = HostSwitch(NetworkConfig())
        link = CollectLink()
        sw.link_opened(link)  # type: ignore[arg-type]

        def broken(*_a):
            raise IndexError("a bug")

        real = sw.network.receive_frames
        monkeypatch.setattr(sw.network, "receive_frames", broken)
        with structlog.testing.capture_logs() as logs:
            for _ in range(3):
                sw.link_frames(link, [b"\x00" * 60])  # type: ignore[arg-type]
        monkeypatch.setattr(sw.network, "receive_frames", real)
        arp = Ether(src=GUEST_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(
            op=1, hwsrc=GUEST_MAC, psrc=GUEST_IP, pdst="192.168.127.1"
        )
        sw.link_frames(link, [bytes(arp)])  # type: ignore[arg-type]
        errors = sw.network.stats["internal_errors"]
        await sw.close()
        return logs, errors, [Ether(f) for f in link.sent]

    logs, errors, sent = asyncio.run(main())
    assert errors == 3
    assert [e["event"] for e in logs] == ["switch.internal_error"]  # once, not per batch
    assert len(sent) == 1 and sent[0][ARP].op == 2  # and the next batch is served


def test_a_nat_handler_that_raises_costs_its_event_not_the_flush(monkeypatch):
    async def main():
        sw = HostSwitch(NetworkConfig())
        link = guest_link(sw)

        def broken(_ev):
            raise OSError(24, "Too many open files")  # what once reached data_received

        monkeypatch.setattr(sw.udp_nat, "send", broken)
        udp = (
            Ether(src=GUEST_MAC, dst=GW_MAC)
            / IP(src=GUEST_IP, dst="192.168.127.254")
            / UDP(sport=40000, dport=9)
        )
        with structlog.testing.capture_logs() as logs:
            sw.link_frames(link, [bytes(udp), bytes(udp)])  # type: ignore[arg-type]
        arp = Ether(src=GUEST_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(
            op=1, hwsrc=GUEST_MAC, psrc=GUEST_IP, pdst="192.168.127.1"
        )
        sw.link_frames(link, [bytes(arp)])  # type: ignore[arg-type]
        errors = sw.network.stats["internal_errors"]
        await sw.close()
        return logs, errors, [Ether(f) for f in link.sent]

    logs, errors, sent = asyncio.run(main())
    assert errors == 2
    assert [e["event"] for e in logs] == ["switch.dispatch_error"]  # logged once
    assert len(sent) == 1 and sent[0][ARP].op == 2  # the link is served on
