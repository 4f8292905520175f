"""hostd/nat/tcp.py with failures injected: descriptors running out while dialling, and
connect() failing at once, cost one connection (RST or ICMP), never the switch."""

from __future__ import annotations

import asyncio
import errno

import pytest
import structlog
from scapy.layers.inet import ICMP, IP, TCP
from scapy.layers.l2 import ARP, Ether

from netferry.hostd.config import NetworkConfig
from netferry.hostd.nat import tcp as nat_tcp
from netferry.hostd.switch import HostSwitch
from tests.unit.helpers import GUEST_IP, GUEST_MAC, GW_MAC, CollectLink


def emfile(*_args, **_kw):
    raise OSError(errno.EMFILE, "Too many open files")


def test_dial_without_descriptors_answers_unreachable_and_logs_once(monkeypatch):
    monkeypatch.setattr(nat_tcp, "host_socket", emfile)

    async def main():
        sw = HostSwitch(NetworkConfig())
        link = CollectLink()
        sw.link_opened(link)  # type: ignore[arg-type]
        arp = Ether(src=GUEST_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(
            op=1, hwsrc=GUEST_MAC, psrc=GUEST_IP, pdst="192.168.127.1"
        )
        sw.link_frames(link, [bytes(arp)])  # type: ignore[arg-type]
        link.sent.clear()
        with structlog.testing.capture_logs() as logs:
            for sport in (40000, 40001, 40002):
                syn = (
                    Ether(src=GUEST_MAC, dst=GW_MAC)
                    / IP(src=GUEST_IP, dst="192.168.127.254")
                    / TCP(sport=sport, dport=80, flags="S", seq=1)
                )
                sw.link_frames(link, [bytes(syn)])  # type: ignore[arg-type]
        stats = dict(sw.tcp_nat.stats)
        await sw.close()
        return link.sent, logs, stats

    sent, logs, stats = asyncio.run(main())
    replies = [Ether(f) for f in sent]
    assert len(replies) == 3
    for r in replies:
        assert r.haslayer(ICMP) and r[ICMP].type == 3 and r[ICMP].code == 1  # host unreachable
    assert stats["socket_errors"] == 3 and stats["unreachable"] == 3
    assert [e["event"] for e in logs].count("nat.tcp.socket_failed") == 1


@pytest.mark.parametrize("err", [errno.ECONNREFUSED, errno.ENETUNREACH])
def test_dial_failure_codes(monkeypatch, err):
    """connect() failing at once maps to RST (refused) or ICMP net unreachable."""

    class FailingSocket:
        def __init__(self, *_a):
            self.closed = False

        def connect_ex(self, _addr):
            return err

        def close(self):
            self.closed = True

    monkeypatch.setattr(nat_tcp, "host_socket", lambda budget, family, guest: FailingSocket())

    async def main():
        sw = HostSwitch(NetworkConfig())
        link = CollectLink()
        sw.link_opened(link)  # type: ignore[arg-type]
        syn = (
            Ether(src=GUEST_MAC, dst=GW_MAC)
            / IP(src=GUEST_IP, dst="192.168.127.254")
            / TCP(sport=40000, dport=80, flags="S", seq=1)
        )
        sw.link_frames(link, [bytes(syn)])  # type: ignore[arg-type]
        await sw.close()
        return [Ether(f) for f in link.sent]

    (reply,) = asyncio.run(main())
    if err == errno.ECONNREFUSED:
        assert reply[TCP].flags == "RA"
    else:
        assert reply[ICMP].type == 3 and reply[ICMP].code == 0  # net unreachable
